"""``experiments.bench.staged --from-reports``: the rules re-fitted on a saved run's measurements, nothing timed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.staged import ExitTable


def saved_table(n: int, seed: int) -> ExitTable:
    """A staged exit table as a run saves it: 4 groups after a 2-layer probe of a 10-layer model."""
    rng = np.random.default_rng(seed)
    G = 4
    depth = np.tile(np.array([2, 4, 6, 8]) / 10, (n, 1))
    margin = np.cumsum(rng.exponential(1.0, (n, G)), axis=1)
    obs = np.stack([depth, margin, rng.standard_normal((n, G))], axis=-1).astype(np.float32)
    rel = np.ones((n, G + 1))
    rel[:, :G] = (margin > 2.0 + rng.normal(0, 0.5, (n, G))).astype(float)
    lat = np.tile(np.linspace(0.2, 1.0, G + 1), (n, 1))
    meta = {"env": {"interface": {"observation": {"probe": {"layers": 2}}}}}
    return ExitTable(
        [f"i{i}" for i in range(n)],
        ["t"] * n,
        obs,
        rel,
        rel * 0.5,
        lat,
        lat * 0.1,
        np.full(n, 0.1),
        lat.copy(),
        np.full(n, 20),
        ["depth", "margin", "noise"],
        meta,
    )


def write_saved_run(root, n_test: int = 120) -> str:
    """A saved run under ``root/reports`` (task ``mc``, embedded model): tables, static runs and the command."""
    reports = root / "reports"
    reports.mkdir()
    saved_table(400, 1).save(reports / "staged_train_mc.npz")
    saved_table(n_test, 2).save(reports / "staged_test_mc.npz")
    rng = np.random.default_rng(3)
    static, per = [], {}
    for name, lat, agree in (("Dense", 1.0, 1.0), ("StaticDepth(2)", 0.2, 0.5), ("Static(L0.60)", 0.6, 0.6)):
        static.append({"name": name, "family": "static", "decision_ms": 0.1, "throughput_tok_s": 200.0 / lat})
        rel = (rng.random(n_test) < agree).astype(float)
        per[name] = {"rel": rel.tolist(), "raw": (rel * 0.5).tolist(), "lat": [lat] * n_test}
        per[name] |= {"latency_s": [lat * 0.1] * n_test, "flops": [lat] * n_test}
    command = "python -m experiments.bench.staged --train 400"
    data = {"command": command, "static": static, "static_per_input": per}
    (reports / "bench_staged_mc.json").write_text(json.dumps(data))
    return command


def test_stop_layers_come_from_the_depth_feature():
    from experiments.bench.staged import stop_layers

    assert stop_layers(saved_table(5, 0)) == (2, [4, 6, 8, 10])


def test_from_reports_refits_the_rules_on_the_saved_measurements(tmp_path, monkeypatch, capsys):
    import experiments.bench.staged as bench

    command = write_saved_run(tmp_path)
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(bench, "_envs", None)  # nothing may build an environment (or load a model)
    bench.main(["--from-reports", "--no-write"])
    out = capsys.readouterr().out
    assert f"the measurements are those `{command}` saved under reports/" in out
    assert "fitted on 400 train inputs" in out and "evaluated on 120 held-out test inputs" in out
    assert "learnable ceiling (stop classifier)" in out and "| stop classifier |" in out
    assert "| 0 | 2 |" in out and "| 4 | 10 |" in out and "stop classifier AUC" in out  # the readout table
    assert "| Static(L0.60) | 0." in out and "| 333 |" in out  # static runs as saved, throughput included
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_from_reports_names_what_is_missing(tmp_path, monkeypatch):
    import experiments.bench.staged as bench

    write_saved_run(tmp_path)
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path)
    with pytest.raises(SystemExit, match="staged_train_mc-known.npz is missing"):
        bench.main(["--from-reports", "--no-write", "--task", "mc-known"])
    (tmp_path / "reports" / "staged_test_mc.npz").unlink()
    short = saved_table(60, 2)
    short.save(tmp_path / "reports" / "staged_test_mc.npz")
    with pytest.raises(SystemExit, match="holds 120 test inputs, the exit table 60"):
        bench.main(["--from-reports", "--no-write"])


def test_a_saved_run_reads_back_as_it_was():
    """Run.from_saved inverts summary() and columns(): the same figures, the extra entries kept, nothing more."""
    from agents.evaluation import Run

    rng = np.random.default_rng(0)
    n = 12
    cols = [rng.random(n) for _ in range(5)]
    run = Run("Static(L0.60)", "static", *cols, ["t"] * n, np.full(n, 2e-4), {"throughput_tok_s": 333.0})
    back = Run.from_saved(json.loads(json.dumps(run.summary())), json.loads(json.dumps(run.columns())), run.tasks)
    assert back.summary() == run.summary() and back.extra == run.extra
    with pytest.raises(ValueError, match="holds 12 inputs, not 11"):
        Run.from_saved(run.summary(), run.columns(), run.tasks[:11])
