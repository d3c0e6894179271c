"""experiments.compare on hand-made run folders: IQM with bootstrap CIs, the budget statement, the outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.compare import compare, iqm_with_ci, main


def fake_run(folder, algo, seed, reward, steps=128, trials=1):
    folder.mkdir(parents=True)
    final = {
        "algo": algo,
        "env_id": "PruneGym/PerInput-v0",
        "seed": seed,
        "iterations": 2,
        "env_steps": steps,
        "tuning_trials": trials,
        "eval_split": "test",
        "eval": {"reward": reward, "accuracy": 0.9, "cost": 0.5, "episodes": 4},
        "train": {},
    }
    (folder / "final.json").write_text(json.dumps(final))
    rows = [{"iteration": i, "env_steps": 64 * i, "reward": reward * i / 2} for i in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_iqm_matches_definition():
    vals = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]
    point, lo, hi = iqm_with_ci(vals, reps=500)
    assert point == pytest.approx(np.mean([2.0, 3.0, 4.0, 5.0]))  # the middle half
    assert lo <= point <= hi and hi < 100
    assert iqm_with_ci([0.7]) == (0.7, 0.7, 0.7)


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    for s in range(4):
        fake_run(tmp_path / f"{s}_ppo_s{s}", "ppo", s, 0.5 + 0.01 * s)
        fake_run(tmp_path / f"{s + 4}_linucb_s{s}", "linucb", s, 0.3)
    main([str(tmp_path), "--reps", "300"])
    md = (tmp_path / "compare.md").read_text()
    assert "Equal budget" in md and "| ppo | 4 | 128 | 1 |" in md
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["equal_budget"] is True
    assert data["algorithms"]["linucb"]["reward"]["iqm"] == pytest.approx(0.3)
    assert data["algorithms"]["ppo"]["curve"]["env_steps"] == [64.0, 128.0]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| linucb |" in capsys.readouterr().out


def test_unequal_budget_is_flagged(tmp_path):
    fake_run(tmp_path / "a", "ppo", 0, 0.5, steps=128)
    fake_run(tmp_path / "b", "sac", 0, 0.5, steps=256)
    summary = compare(tmp_path, reps=100)
    assert summary["equal_budget"] is False and "Budgets differ" in summary["markdown"]


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        compare(tmp_path)


TINY = "leaderboard/data/tiny-per-input"  # recorded splits of the tiny model (train 64, test 32 inputs)


def replay_run(folder, algo, seed, reward, *, episodes=40, eval_seed=10000, latency="median"):
    fake_run(folder, algo, seed, reward)
    final = json.loads((folder / "final.json").read_text())
    final["env_id"] = "PruneGym/PerInputDiscreteReplay-v0"
    (folder / "final.json").write_text(json.dumps(final))
    config = {
        "train_split": "train",
        "eval": {"split": "test", "episodes": episodes, "seed": eval_seed},
        "env": {
            "id": "PruneGym/PerInputDiscreteReplay-v0",
            "kwargs": {"dataset": TINY, "latency": latency, "reward": {"form": "linear", "lam": 0.5}},
        },
    }
    (folder / "run_config.json").write_text(json.dumps(config))


def test_replay_runs_get_reference_lines_that_the_twin_confirms(tmp_path):
    """The references are what stepping the twin pays: every preset on the runs' seeded evaluation draws."""
    from envs.replay import Replay

    for s in range(3):
        replay_run(tmp_path / f"{s}_dqn_s{s}", "dqn", s, 0.4 + 0.01 * s)
    summary = compare(tmp_path, reps=100)
    (ref,) = summary["references"]
    twin = Replay(dataset=TINY, split="test", latency="median", reward={"form": "linear", "lam": 0.5})
    per_preset = []
    for a in range(twin.action_space.n):  # each preset on the same 40 seeded draws as the runs' evaluation
        rewards = []
        for ep in range(40):
            twin.reset(seed=10000 + ep)
            rewards.append(twin.step(a)[1])
        per_preset.append(np.mean(rewards))
    best = int(np.argmax(per_preset))
    assert ref["draws"] == 40 and ref["best_static"]["path"] == [best]
    assert ref["best_static"]["reward"] == pytest.approx(per_preset[best])
    assert ref["oracle"]["reward"] >= ref["best_static"]["reward"] - 1e-12
    assert ref["learnable"]["reward"] <= ref["oracle"]["reward"] + 1e-12
    md = summary["markdown"]
    assert "reference: best static preset" in md and "learnable ceiling" in md and "hindsight oracle" in md
    # without the references (or for live runs) there are none
    assert compare(tmp_path, reps=100, references=False)["references"] == []


def test_live_runs_have_no_references(tmp_path):
    fake_run(tmp_path / "a", "ppo", 0, 0.5)
    assert compare(tmp_path, reps=100)["references"] == []


def test_best_run_is_the_best_algorithms_best_seed(tmp_path):
    for s, r in enumerate((0.2, 0.6, 0.4)):
        fake_run(tmp_path / f"p{s}", "ppo", s, r)
        fake_run(tmp_path / f"l{s}", "linucb", s, 0.3)
    best = compare(tmp_path, reps=100)["best"]
    assert best["algorithm"] == "ppo" and best["seed"] == 1 and best["reward"] == pytest.approx(0.6)


def test_stratified_bootstrap_per_task():
    from experiments.compare import stratified_bootstrap_ci

    scores = np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, 13.0]])
    point, lo, hi = stratified_bootstrap_ci(scores, reps=300)
    assert lo <= point <= hi
    with pytest.raises(ValueError, match="runs, tasks"):
        stratified_bootstrap_ci(np.array([1.0, 2.0]))


def test_equal_budget_is_the_budget_asked_for_not_the_overshoot(tmp_path):
    for name, steps in (("a", 100352), ("b", 100032)):
        fake_run(tmp_path / name, name, 0, 0.5, steps=steps)
        final = json.loads((tmp_path / name / "final.json").read_text())
        final["budget"] = {"env_steps": 100000}
        (tmp_path / name / "final.json").write_text(json.dumps(final))
    summary = compare(tmp_path, reps=100)
    assert summary["equal_budget"] is True and "Equal budget" in summary["markdown"]
