from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_importance

from envs.measure.cost_model import (
    FEATURES,
    CalibratedCost,
    CalibrationMismatchError,
    Cost,
    CostModel,
    MeasuredCost,
    anchor_plans,
    default_path,
    make_cost_source,
    plan_features,
    random_plans,
)
from envs.measure.meters import FakeClock, Meter, MixedSourceError
from envs.runtime.models import tiny_model
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import SparseLM, torch_threads

# Seconds per unit of each feature: intercept, layers, attn blocks, mlp blocks, gather blocks, GFLOPs x3.
W_LAT = np.array([0.02, 0.004, 0.002, 0.001, 0.0005, 3.0, 5.0, 2.0])
CPU_POWER_W = 7.0
THREADS_BUSY = 2.0  # the fake workload keeps two cores busy: estimated energy = 2 * 7 W * latency


def synthetic(slm: SparseLM) -> tuple[Meter, FakeClock]:
    """Make ``slm.forward`` advance a fake clock by a known linear cost of its plan; return a meter on it."""
    clock, cpu = FakeClock(), FakeClock()
    real = slm.forward

    def forward(ids, plan=None, **kw):
        out = real(ids, plan, **kw)
        lat = float(plan_features(plan, ids.shape[-1]) @ W_LAT)
        clock.advance(lat)
        cpu.advance(THREADS_BUSY * lat)
        return out

    slm.forward = forward  # instance attribute: what the cost model's run functions call
    meter = Meter(warmup=0, repeats=2, energy="estimate", cpu_power_w=CPU_POWER_W, cpu_time=cpu, clock=clock)
    return meter, clock


def truth(plan, seq_len: int) -> float:
    return float(plan_features(plan, seq_len) @ W_LAT)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a multi-threaded pool crawl when the cores are shared; the fits here time a fake clock.
    with torch_threads(1):
        yield


@pytest.fixture
def fitted(tiny_llama) -> tuple[CostModel, SparseLM]:
    meter, _ = synthetic(tiny_llama)
    return CostModel.fit(tiny_llama, seq_lens=(16, 32), n_plans=20, meter=meter, seed=3), tiny_llama


def test_plan_features_agree_with_plan_flops(tiny_llama):
    for plan in random_plans(tiny_llama.spec, tiny_llama.importance, 10, seed=0) + anchor_plans(
        tiny_llama.spec, tiny_llama.importance
    ):
        x = dict(zip(FEATURES, plan_features(plan, 24), strict=True))
        fl = plan.flops(24)
        assert (x["attn_proj_gflops"] + x["attn_score_gflops"]) * 1e9 == pytest.approx(fl["attention"])
        assert x["mlp_gflops"] * 1e9 == pytest.approx(fl["mlp"])
        assert x["layers_run"] == plan.layers_run and x["intercept"] == 1.0
        assert x["attn_blocks"] == sum(bool(lp.heads) for lp in plan.layers if lp.run)
    dense = plan_features(tiny_llama.dense_plan(), 24)
    assert dense[FEATURES.index("attn_gather_blocks")] == 0


def test_random_plans_are_seeded_and_valid(tiny_llama):
    a = random_plans(tiny_llama.spec, tiny_llama.importance, 8, seed=5)
    b = random_plans(tiny_llama.spec, tiny_llama.importance, 8, seed=5)
    c = random_plans(tiny_llama.spec, tiny_llama.importance, 8, seed=6)
    assert a == b and a != c
    assert {p.meta["num_groups"] for p in a} <= {1, 2, 3}
    with pytest.raises(ValueError, match="low"):
        random_plans(tiny_llama.spec, tiny_llama.importance, 1, low=2.0)


def test_fit_recovers_a_synthetic_linear_cost_exactly(fitted):
    cm, slm = fitted
    for b in cm.buckets.values():
        np.testing.assert_allclose(b.latency_coef, W_LAT, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b.energy_coef, W_LAT * THREADS_BUSY * CPU_POWER_W, rtol=1e-6, atol=1e-9)
        assert b.fit_mape < 1e-6 and b.n_plans == 20 and b.noisy_fraction == 0.0
    for plan in random_plans(slm.spec, slm.importance, 12, seed=99):
        for T in (16, 32):
            est = cm.predict(plan, T)
            assert est.latency_s == pytest.approx(truth(plan, T), rel=1e-9)
            assert est.energy_j == pytest.approx(truth(plan, T) * THREADS_BUSY * CPU_POWER_W, rel=1e-9)
            assert est.source == "calibrated" and est.energy_source == "estimated" and not est.extrapolated
    assert cm.meta["energy_source"] == "estimated" and cm.meta["device"].startswith("cpu:")


def test_drift_check_on_the_same_synthetic_cost_is_zero(tiny_llama, capsys):
    meter, _ = synthetic(tiny_llama)
    cm = CostModel.fit(tiny_llama, seq_lens=(16,), n_plans=12, meter=meter)
    out = cm.drift(tiny_llama, n_plans=5, seq_len=16, meter=meter, verbose=True)
    assert out["n"] == 5 and out["mape"] < 1e-6 and out["energy_mape"] < 1e-6 and len(out["rows"]) == 5
    assert "MAPE" in capsys.readouterr().out


def test_between_buckets_interpolates_and_outside_extrapolates(fitted):
    cm, slm = fitted
    plan = slm.uniform_plan(layers=0.75, heads=0.5, mlp=0.5)
    mid = cm.predict(plan, 24)
    # both bucket models are exact, so their blend at 24 tokens is exact too
    assert mid.buckets == (16, 32) and mid.latency_s == pytest.approx(truth(plan, 24), rel=1e-9)
    far = cm.predict(plan, 64)
    assert far.extrapolated and far.buckets == (32,)
    with pytest.raises(ValueError, match="calibrated for"):
        cm.predict(SparseLM(tiny_model("llama", num_layers=2)).dense_plan(), 16)


def test_save_load_round_trip(fitted, tmp_path: Path):
    cm, slm = fitted
    path = cm.save(tmp_path / "cm.json")
    data = json.loads(path.read_text())
    meta = data["meta"]
    assert meta["model"] == "tiny-llama" and meta["weights_hash"] == slm.weights_hash and meta["dtype"] == "float32"
    assert {"torch", "transformers", "numpy", "python"} <= set(meta["packages"]) and meta["threads"] >= 1
    back = CostModel.load(path, slm=slm)
    for plan in random_plans(slm.spec, slm.importance, 5, seed=1):
        assert back.predict(plan, 20) == cm.predict(plan, 20)


def _edited(cm: CostModel, tmp_path: Path, **meta) -> Path:
    data = cm.to_dict()
    data["meta"].update(meta)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_calibration_from_another_device_is_refused(fitted, tmp_path: Path):
    cm, slm = fitted
    path = _edited(cm, tmp_path, device="cpu:Some Other CPU 9000")
    with pytest.raises(CalibrationMismatchError, match="device: file has 'cpu:Some Other CPU 9000'") as err:
        CostModel.load(path, slm=slm)
    assert "calibrate_cost" in str(err.value) and "force=True" in str(err.value)
    with pytest.warns(UserWarning, match="Some Other CPU"):
        forced = CostModel.load(path, slm=slm, force=True)
    assert forced.meta["device"] == "cpu:Some Other CPU 9000"
    with pytest.raises(CalibrationMismatchError, match="threads: file has 99"):
        CostModel.load(_edited(cm, tmp_path, threads=99))
    with pytest.raises(CalibrationMismatchError, match="device kind"):
        CostModel.load(cm.save(tmp_path / "ok.json"), device="cuda")


def test_calibration_for_another_model_is_refused(fitted, tmp_path: Path):
    cm, _ = fitted
    path = cm.save(tmp_path / "cm.json")
    other = SparseLM(tiny_model("llama", seed=7), name="tiny-llama")  # same shape, other weights
    with pytest.raises(CalibrationMismatchError, match="weights_hash: file has") as err:
        CostModel.load(path, slm=other)
    assert "model:" not in str(err.value)  # only what differs is named
    renamed = SparseLM(tiny_model("llama", seed=0), name="tiny-llama-v2")
    renamed.set_importance(random_importance(renamed.spec, seed=1))
    with pytest.raises(CalibrationMismatchError, match="model: file has 'tiny-llama', this model has 'tiny-llama-v2'"):
        CostModel.load(path, slm=renamed)


def test_calibration_under_other_engine_code_warns_and_is_not_the_default(fitted, tmp_path: Path):
    from envs.measure.cost_model import default_path
    from envs.measure.meters import runtime_code_hash

    cm, slm = fitted
    here = runtime_code_hash()
    assert cm.meta["runtime"] == here and default_path(slm).name.endswith(f"-r{here[:8]}.json")
    with pytest.warns(UserWarning, match="other engine code"):
        CostModel.load(_edited(cm, tmp_path, runtime="0" * 16), slm=slm)


def test_cost_sources_share_one_interface(fitted):
    cm, slm = fitted
    plan = slm.uniform_plan(heads=0.5)

    def must_not_run():
        raise AssertionError("a calibrated cost must not run the plan")

    calibrated = CalibratedCost(cm)
    c1, c2 = calibrated.cost(plan, must_not_run, 32), calibrated.cost(plan, must_not_run, 32)
    assert c1 == c2 and c1.source == "calibrated" and c1.latency_s == pytest.approx(truth(plan, 32))
    assert not c1.noisy and c1.raw["buckets"] == (32,)

    meter, _ = synthetic(slm)
    ids = torch.zeros(1, 32, dtype=torch.long)
    measured = MeasuredCost(meter)
    m = measured.cost(plan, lambda: slm.forward(ids, plan, logits="last"), 32)
    assert m.source == "measured" and m.energy_source == "estimated" and m.latency_s == pytest.approx(truth(plan, 32))
    assert m.raw["repeats"] == 2
    with pytest.raises(ValueError, match="run_fn"):
        measured.cost(plan, None, 32)
    total = m + m
    assert total.latency_s == pytest.approx(2 * m.latency_s) and total.source == "measured"
    with pytest.raises(MixedSourceError, match="source"):
        _ = m + c1


def test_make_cost_source(fitted, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path))
    cm, slm = fitted
    assert make_cost_source("measured", slm=slm).kind == "measured"
    with pytest.raises(FileNotFoundError, match="experiments.calibrate_cost"):
        make_cost_source("calibrated", slm=slm)
    cm.save(default_path(slm))
    src = make_cost_source("calibrated", slm=slm)
    assert isinstance(src, CalibratedCost) and isinstance(src.cost(slm.dense_plan(), None, 16), Cost)
    with pytest.raises(ValueError, match="measured' or 'calibrated"):
        make_cost_source("guessed", slm=slm)


def test_fit_needs_enough_plans(tiny_llama):
    with pytest.raises(ValueError, match="n_plans must be >= 10"):
        CostModel.fit(tiny_llama, n_plans=5, meter=synthetic(tiny_llama)[0])


def test_calibrate_cost_cli_smoke(tmp_path: Path, capsys):
    from experiments.calibrate_cost import main

    out = tmp_path / "cm.json"
    args = ["--model", "tiny-llama", "--seq-lens", "8", "16", "--n-plans", "10", "--drift-plans", "3"]
    res = main([*args, "--warmup", "0", "--repeats", "1", "--energy", "off", "--threads", "1", "--output", str(out)])
    assert res["path"] == out and out.is_file() and res["drift"]["n"] == 3
    text = capsys.readouterr().out
    assert "drift at 16 tokens over 3 fresh plans: latency MAPE" in text
    cm = CostModel.load(out)
    assert sorted(cm.buckets) == [8, 16] and cm.meta["energy_source"] is None
    assert cm.predict(SparsityPlan.dense(cm.spec), 16).energy_j is None


def test_fit_leaves_out_a_contention_spike():
    from envs.measure.cost_model import _fit_wls

    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(30), rng.uniform(0, 1, (30, 3))])
    w = np.array([0.01, 0.02, 0.03, 0.04])
    y = X @ w
    y[7] *= 3.0  # another process stalled this measurement
    coef, n_out = _fit_wls(X, y)
    assert n_out == 1
    np.testing.assert_allclose(coef, w, rtol=1e-9)
    assert _fit_wls(X, X @ w)[1] == 0


def test_noisy_fit_keeps_prices_non_negative_and_predictions_monotone():
    from envs.measure.cost_model import _fit_wls

    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(12), rng.integers(1, 30, 12), rng.random((12, 2)) * 5])
    true = np.array([0.01, 0.002, 0.05, 0.0])
    y = X @ true * (1 + rng.normal(0, 0.25, 12))  # a loaded machine: 25% noise
    y[3] *= 4  # one badly slowed measurement
    coef, _ = _fit_wls(X, np.abs(y))
    assert (coef >= 0).all()
    # more work never costs less
    base = np.array([1.0, 10, 1.0, 1.0])
    for j in range(1, 4):
        more = base.copy()
        more[j] *= 2
        assert more @ coef >= base @ coef
