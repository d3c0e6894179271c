"""Claims end to end on the tiny model: record, train on the replay twin, export with claims, validate live."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from agents.controller import Controller
from agents.validation import check_claims, replay_claims
from experiments.record import recording
from experiments.train import CONF_DIR, train
from experiments.validate import main as validate_main


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, cost_path) -> Path:
    """A folder of two recordings of the tiny discrete env: train and test."""
    root = tmp_path_factory.mktemp("rec") / "tiny"
    for split in ("train", "test"):
        overrides = ["env=tiny_discrete", f"split={split}", "n_items=12", "shard_size=6", "repeats=3"]
        recording(_compose("record", [*overrides, f"out={root / split}", f"+env.kwargs.cost_model={cost_path}"]))
    return root


@pytest.fixture(scope="module")
def exported(recorded, tmp_path_factory) -> Path:
    """LinUCB trained on the train recording's twin, exported with claims on the test recording."""
    from agents.export import export_from_path

    run = tmp_path_factory.mktemp("run")
    overrides = ["env=per_input_replay", f"env.kwargs.dataset={recorded}", "algo=linucb", "stop.iterations=3"]
    train(_compose("train", [*overrides, "eval.episodes=8", f"run_dir={run}"]))
    described = json.loads((run / "env_config.json").read_text())
    assert described["data"]["split"] == "train" and described["replay"]["inputs"] == 12
    return export_from_path(run, run / "ctl", claims_dataset=recorded, claims_split="test")


def test_a_policy_trained_on_the_twin_exports_for_the_live_environment(exported, recorded):
    ctl = Controller.from_pretrained(exported)
    assert ctl.env_id == "PruneGym/PerInputDiscrete-v0"  # the recorded environment, not the twin
    claims = ctl.card["metrics"]["claims"]
    assert claims["inputs"] == 12 and claims["split"] == "test"
    again = replay_claims(ctl, recorded, split="test")
    assert again["accuracy"] == claims["accuracy"] and again["latency_fraction"] == claims["latency_fraction"]


def test_validate_holds_for_true_claims(exported, capsys):
    # Accuracy is exact (the same scorer on the same inputs); the latency of 12 tiny-model inputs on a shared
    # machine swings by more than the 5% bound, so it is only bounded loosely here. The 5% check is made
    # where the timing means something: the replay comparison benchmark and the embedded entries' slow test.
    assert validate_main([str(exported), "--repeats", "5", "--latency-tol", "1.0"]) == 0
    assert "claim(s) hold" in capsys.readouterr().out


def test_validate_fails_claims_the_controller_does_not_reach(exported, tmp_path, capsys):
    import shutil

    from agents.controller import card_digest

    doctored = tmp_path / "doctored"
    shutil.copytree(exported, doctored)
    card = json.loads((doctored / "card.json").read_text())
    accuracy = card["metrics"]["claims"]["accuracy"]
    card["metrics"]["claims"]["accuracy"] = accuracy + 0.2 if accuracy <= 0.8 else accuracy - 0.2
    card["metrics"]["claims"]["latency_fraction"] *= 0.5
    card["card_sha256"] = card_digest(card)  # a card that verifies, but claims too much
    (doctored / "card.json").write_text(json.dumps(card))
    assert validate_main([str(doctored), "--repeats", "3", "--latency-tol", "1.0"]) == 1  # fails on accuracy alone
    assert "does not hold" in capsys.readouterr().out


def test_check_claims_bounds():
    claims = {"accuracy": 0.80, "latency_fraction": 0.70}
    assert check_claims(claims, {"accuracy": 0.79, "latency_fraction": 0.72})["ok"]
    assert not check_claims(claims, {"accuracy": 0.77, "latency_fraction": 0.70})["ok"]
    assert not check_claims(claims, {"accuracy": 0.80, "latency_fraction": 0.74})["ok"]


def test_validate_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        validate_main([])
    assert validate_main([str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
