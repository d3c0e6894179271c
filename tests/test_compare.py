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
