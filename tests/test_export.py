"""Exported controllers: save -> load -> same actions, clear errors, no Ray at load time, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.controller import CARD_FILE, ONNX_FILE, Controller, ControllerError
from envs.runtime.models import tiny_model
from envs.runtime.sparse_lm import SparseLM
from tests.conftest import random_importance

ROOT = Path(__file__).resolve().parent.parent
PROBE = {"model": "tiny-llama", "num_groups": 2, "probe_layers": 2, "probe_dim": 8}
OBS_DIM = 6 + 2 * 2 + 8
OBS = gym.spaces.Box(-10.0, 10.0, (OBS_DIM,), np.float32)
BOX = gym.spaces.Box(0.0, 1.0, (6,), np.float32)
DISCRETE = gym.spaces.Discrete(10)
PER_INPUT, PER_INPUT_D = "PruneGym/PerInput-v0", "PruneGym/PerInputDiscrete-v0"


@pytest.fixture(scope="module")
def slm() -> SparseLM:
    model = SparseLM(tiny_model("llama", seed=0), name="tiny-llama")
    model.set_importance(random_importance(model.spec, seed=1))
    return model


def build_module(algo: str, action_space: gym.Space):
    """An RLlib RLModule with random weights, built locally (no Ray cluster)."""
    import importlib

    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    names = {"ppo": "PPOConfig", "appo": "APPOConfig", "impala": "IMPALAConfig", "sac": "SACConfig", "dqn": "DQNConfig"}
    cfg_cls = getattr(importlib.import_module(f"ray.rllib.algorithms.{algo}"), names[algo])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = (
            cfg_cls()
            .environment(observation_space=OBS, action_space=action_space)
            .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[32, 32]))
        )
        return config.get_rl_module_spec().build()


def reference_policy(module, action_space):
    """The training stack's own greedy policy (agents.rllib.greedy_policy) over the module."""
    from types import SimpleNamespace

    from agents.rllib import greedy_policy

    algo = SimpleNamespace(
        get_module=lambda: module, config=SimpleNamespace(normalize_actions=True, clip_actions=False)
    )
    return greedy_policy(algo, action_space)


def observations(n: int = 48, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, OBS_DIM)) * 3).astype(np.float32)


@pytest.mark.parametrize(
    ("algo", "space", "env_id"),
    [("ppo", BOX, PER_INPUT), ("sac", BOX, PER_INPUT), ("dqn", DISCRETE, PER_INPUT_D), ("ppo", DISCRETE, PER_INPUT_D)],
    ids=["ppo-box", "sac-box", "dqn-discrete", "ppo-discrete"],
)
def test_rllib_export_roundtrip(tmp_path, slm, algo, space, env_id):
    from agents.export import export_rllib_module

    module = build_module(algo, space)
    out = export_rllib_module(module, tmp_path / "ctl", algo=algo, env_id=env_id, env_kwargs=PROBE, slm=slm)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CARD_FILE, ONNX_FILE, "model.safetensors"]
    ctl = Controller.from_pretrained(out, slm)
    ref = reference_policy(module, space)
    xs = observations()
    got = [ctl.select_action(x) for x in xs]
    want = [ref(x) for x in xs]
    if isinstance(space, gym.spaces.Box):
        np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5, rtol=0)
        assert np.ptp(np.stack(got), axis=0).max() > 1e-3  # the policy's action depends on the observation
        np.testing.assert_allclose(ctl.select_action(xs), np.stack(want), atol=1e-5, rtol=0)  # batch form
    else:
        assert got == [int(a) for a in want]
        assert all(isinstance(a, int) for a in got)
    card = json.loads((out / CARD_FILE).read_text())
    assert card["model"]["weights_hash"] == slm.weights_hash
    assert card["observation"]["probe"]["proj_dim"] == 8
    assert card["env"] == {**card["env"], "id": env_id, "version": 0, "kind": "per_input"}
    plan = ctl.select_plan(xs[0], slm)
    assert all(plan.layers[i].run and plan.layers[i].mlp_channels == slm.spec.intermediate_size for i in range(2))


def test_safetensors_hold_the_policy_weights(tmp_path, slm):
    from safetensors.torch import load_file

    from agents.export import export_rllib_module

    module = build_module("ppo", BOX)
    out = export_rllib_module(module, tmp_path / "ctl", algo="ppo", env_id=PER_INPUT, env_kwargs=PROBE, slm=slm)
    saved = load_file(str(out / "model.safetensors"))
    state = module.state_dict()
    assert set(saved) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(saved[k], v)


@pytest.mark.parametrize("algo", ["appo", "impala"])
def test_appo_impala_share_ppo_export(tmp_path, slm, algo):
    from agents.export import export_rllib_module

    module = build_module(algo, BOX)
    out = export_rllib_module(module, tmp_path / algo, algo=algo, env_id=PER_INPUT, env_kwargs=PROBE, slm=slm)
    ctl, ref = Controller.from_pretrained(out, slm), reference_policy(module, BOX)
    for x in observations(8):
        np.testing.assert_allclose(ctl.select_action(x), ref(x), atol=1e-5, rtol=0)


def fitted_bandit(seed: int = 0):
    from agents.bandit import BanditController

    rng = np.random.default_rng(seed)
    ctl = BanditController(10, OBS_DIM, seed=seed)
    x = rng.standard_normal((200, OBS_DIM)) * 2 + 1
    arms = rng.integers(0, 10, 200)
    rewards = x[:, 0] * (arms - 4.5) / 5 + x[:, 1] * (arms % 3) + rng.standard_normal(200) * 0.1
    ctl.fit(x, arms, rewards)
    return ctl


def export_bandit_to(path, slm, **kw):
    from agents.export import export_bandit

    return export_bandit(fitted_bandit(), path, env_id=PER_INPUT_D, env_kwargs=PROBE, slm=slm, **kw)


def test_bandit_export_roundtrip(tmp_path, slm):
    bandit = fitted_bandit()
    out = export_bandit_to(tmp_path / "bandit", slm)
    ctl = Controller.from_pretrained(out, slm)
    xs = observations(64, seed=3)
    got = [ctl.select_action(x) for x in xs]
    assert got == [bandit.greedy(x) for x in xs]
    assert len(set(got)) > 1
    assert ctl.card["observation"]["normalization"]["mean"] == pytest.approx(bandit.mean.tolist())


def write_run(tmp_path: Path, slm, module) -> Path:
    """A training run directory as experiments.train leaves it, with an RLlib module checkpoint."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "iter_000002"
    module.save_to_path(str(ckpt / "learner_group" / "learner" / "rl_module" / "default_policy"))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"folder": "iter_000002", "iteration": 2}))
    cfg = {"algo": {"name": "ppo"}, "env": {"id": PER_INPUT, "kwargs": PROBE}, "seed": 0}
    (run / "run_config.json").write_text(json.dumps(cfg))
    rows = [{"iteration": i, "env_steps": 32 * i, "reward": 0.1 * i, "accuracy": 0.9, "cost": 0.7} for i in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {
        "iterations": 2,
        "eval_split": "test",
        "eval": {"reward": 0.25, "accuracy": 0.875, "cost": 0.625, "episodes": 8},
    }
    (run / "final.json").write_text(json.dumps({**final, "train": rows[-1]}))
    return run


def test_export_from_run_directory(tmp_path, slm):
    from agents.export import export_from_path

    module = build_module("ppo", BOX)
    run = write_run(tmp_path, slm, module)
    out = export_from_path(run, tmp_path / "ctl", slm=slm)
    ctl = Controller.from_pretrained(out, slm)
    assert ctl.card["metrics"]["held_out"]["accuracy"] == 0.875
    assert ctl.card["metrics"]["iterations"] == 2
    assert "| held-out | 0.2500 | 0.8750 | 0.6250 |" in (out / "README.md").read_text()
    ref = reference_policy(module, BOX)
    for x in observations(8):
        np.testing.assert_allclose(ctl.select_action(x), ref(x), atol=1e-5, rtol=0)


def test_export_cli_help():
    from experiments.export import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def bandit_export(tmp_path_factory, slm) -> Path:
    return export_bandit_to(tmp_path_factory.mktemp("exp") / "bandit", slm)


def copy_export(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused(tmp_path, slm, bandit_export):
    folder = copy_export(bandit_export, tmp_path / "c")
    data = bytearray((folder / ONNX_FILE).read_bytes())
    data[-5] ^= 0xFF
    (folder / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ControllerError, match=r"model.onnx does not match card.json.*modified or is incomplete"):
        Controller.from_pretrained(folder)


def test_missing_file_and_bad_schema_are_refused(tmp_path, bandit_export):
    folder = copy_export(bandit_export, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ControllerError, match="model.safetensors is missing"):
        Controller.from_pretrained(folder)
    folder = copy_export(bandit_export, tmp_path / "d")
    card = json.loads((folder / CARD_FILE).read_text())
    card["schema_version"] = 99
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ControllerError, match="schema_version 99"):
        Controller.from_pretrained(folder)
    with pytest.raises(ControllerError, match="no card.json"):
        Controller.from_pretrained(tmp_path)


def test_controller_for_another_model_is_refused(slm, bandit_export):
    other = SparseLM(tiny_model("llama", seed=1), name="tiny-llama-other")
    with pytest.raises(ControllerError) as exc:
        Controller.from_pretrained(bandit_export, other)
    msg = str(exc.value)
    assert slm.weights_hash in msg and other.weights_hash in msg and "tiny-llama-other" in msg
    ctl = Controller.from_pretrained(bandit_export)  # loads without a model; refuses it when planning
    with pytest.raises(ControllerError, match="weights hash"):
        ctl.select_plan(np.zeros(OBS_DIM, np.float32), other)


def test_wrong_observation_size_is_refused(bandit_export):
    ctl = Controller.from_pretrained(bandit_export)
    with pytest.raises(ValueError, match=f"observation has 5 values, but this controller expects {OBS_DIM}"):
        ctl.select_action(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=rf"shape \(batch, {OBS_DIM}\)"):
        ctl.select_action(np.zeros((2, OBS_DIM + 1), np.float32))


def test_controller_never_imports_ray(bandit_export):
    code = (
        "import sys, numpy as np\n"
        "from agents.controller import Controller\n"
        "from agents.adaptive import adaptive_generate\n"
        "from envs.runtime.models import tiny_model\n"
        "from envs.runtime.sparse_lm import SparseLM\n"
        "slm = SparseLM(tiny_model('llama', seed=0), name='tiny-llama')\n"
        f"c = Controller.from_pretrained({str(bandit_export)!r}, slm)\n"
        f"a = c.select_action(np.ones({OBS_DIM}, np.float32))\n"
        f"p = c.select_plan(np.ones({OBS_DIM}, np.float32), slm)\n"
        "out = adaptive_generate(slm, c, [5, 6, 7, 8, 9], max_new_tokens=3)\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]\n"
        "print('ok', a, out.sequences.shape[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")


# ------------------------------------------------------------------------------------------ atomic writes
def test_interrupted_export_leaves_no_folder(tmp_path, slm, monkeypatch):
    import agents.export as export

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(export, "render_readme", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_bandit_to(tmp_path / "ctl", slm)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    first = export_bandit_to(tmp_path / "ctl", slm)
    card = (first / CARD_FILE).read_text()
    monkeypatch.setattr(export, "render_readme", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_bandit_to(tmp_path / "ctl", slm, force=True)  # a failed replacement keeps the old export
    assert (first / CARD_FILE).read_text() == card
    assert [p.name for p in tmp_path.iterdir()] == ["ctl"]
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--force"):
        export_bandit_to(tmp_path / "ctl", slm)


# ------------------------------------------------------------------------------------------ adaptive inference
def test_adaptive_generate_per_input_matches_generate_under_the_chosen_plan(slm, bandit_export):
    from agents.adaptive import adaptive_generate

    ctl = Controller.from_pretrained(bandit_export, slm)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    out = adaptive_generate(slm, ctl, ids, max_new_tokens=6)
    assert len(out.plans) == 1 and out.sequences.shape == (1, 16)
    probe = ctl.probe(slm)
    np.testing.assert_array_equal(out.observations[0], probe.run(ids).features)
    assert out.actions[0] == ctl.select_action(out.observations[0])
    torch.testing.assert_close(out.sequences, slm.generate(ids, out.plans[0], max_new_tokens=6))


def test_adaptive_generate_per_token(tmp_path, slm):
    from agents.adaptive import adaptive_generate
    from agents.export import export_rllib_module
    from envs.per_token import TOKEN_FEATURES

    obs = gym.spaces.Box(-10.0, 10.0, (len(TOKEN_FEATURES),), np.float32)
    from ray.rllib.algorithms.ppo import PPOConfig

    module = PPOConfig().environment(observation_space=obs, action_space=BOX).get_rl_module_spec().build()
    kw = {"model": "tiny-llama", "num_groups": 2, "max_new_tokens": 8}
    out_dir = export_rllib_module(
        module, tmp_path / "tok", algo="ppo", env_id="PruneGym/PerToken-v0", env_kwargs=kw, slm=slm
    )
    ctl = Controller.from_pretrained(out_dir, slm)
    assert ctl.env_kind == "per_token"
    out = adaptive_generate(slm, ctl, [4, 8, 15, 16, 23], max_new_tokens=5)
    assert out.sequences.shape == (1, 10) and len(out.plans) == 4
    assert [o[0] for o in out.observations] == pytest.approx([t / 8 for t in range(4)])
    for o, a in zip(out.observations, out.actions, strict=True):
        np.testing.assert_allclose(ctl.select_action(o), a)
