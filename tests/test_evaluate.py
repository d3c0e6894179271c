import numpy as np
import pytest

from agents import evaluation as ev
from agents.baselines import Dense, StaticUniform
from agents.frontier import interp_frontier, oracle_frontier
from experiments import evaluate as cli
from experiments import report


def fake_run(name, rel, lat, family="static"):
    rel = np.asarray(rel, dtype=np.float64)
    n = len(rel)
    return ev.Run(name, family, rel, rel, np.full(n, lat), np.full(n, lat), np.full(n, lat), ["t"] * n, np.zeros(n))


def static_runs(seed=0, n=40, p=6):
    rng = np.random.default_rng(seed)
    lats = np.linspace(1.0, 0.5, p)
    # Cheaper plans fail more inputs; which inputs fail is input-dependent (the adaptive headroom).
    hard = rng.random(n)
    return [fake_run(f"s{j}", (hard > (1 - lat) * 1.6).astype(float), lat) for j, lat in enumerate(lats)]


def test_oracle_is_at_least_every_static_plan():
    for seed in range(5):
        static = static_runs(seed)
        acc = np.stack([r.rel for r in static], 1)
        cost = np.array([r.lat.mean() for r in static])
        ox, oy = oracle_frontier(acc, cost)
        assert np.all(interp_frontier(ox, oy, cost) >= acc.mean(0) - 1e-12)


def test_headline_static_family_cannot_beat_hull_and_oracle_closes_gap():
    static = static_runs(1)
    acc = np.stack([r.rel for r in static], 1)
    cost = np.array([r.lat.mean() for r in static])
    # A controller that gives each input its cheapest plan that keeps it right: the oracle's choice.
    ok = acc > 0.5
    cheapest = np.where(ok.any(1), np.argmax(ok * cost[None] * -1 + ok * 10, axis=1), 0)
    choice_lat = cost[cheapest]
    oracle_like = ev.Run(
        "o",
        "o",
        acc[np.arange(len(acc)), cheapest],
        acc[np.arange(len(acc)), cheapest],
        choice_lat,
        choice_lat,
        choice_lat,
        ["t"] * len(acc),
        np.zeros(len(acc)),
    )
    rows = ev.headline(static, {"copy": static, "oracle-like": [oracle_like]}, targets=(0.8,), n_boot=50)
    by = {(r["scoring"], r["controller"]): r for r in rows}
    hull = by[("dense_relative", "static hull (StaticMix)")]["accuracy"]
    assert by[("dense_relative", "copy")]["vs_hull"] <= 1e-12
    assert by[("dense_relative", "oracle (hindsight)")]["accuracy"] >= hull
    ci = by[("dense_relative", "static hull (StaticMix)")]["ci95"]
    assert ci[0] <= hull <= ci[1]
    md = report.headline_markdown(rows)
    assert "static hull" in md and "oracle" in md


def test_headline_marks_unreached_targets():
    static = [fake_run("a", [1, 1, 0, 1], 1.0), fake_run("b", [1, 0, 0, 1], 0.9)]
    rows = ev.headline(static, {}, targets=(0.7,), n_boot=20)
    assert all(not np.isfinite(r["accuracy"]) for r in rows)
    assert "not reached" in report.headline_markdown(rows)
    # An unreached target shows no interval, even when some bootstrap resamples reach it.
    rows = [{**r, "ci95": [0.4, 0.6]} for r in rows]
    assert "[0.400, 0.600]" not in report.headline_markdown(rows)


def tiny_eval_env(cost: str = "measured", n_items: int = 3, **kw):
    """The tiny model's evaluation environment on generated test items (calibrated: fitted on the spot)."""
    extra = {"calibrate_cost": True} if cost == "calibrated" else {}
    return ev.evaluation_env(
        model="tiny-llama",
        task="generated",
        split="test",
        n_items=n_items,
        cost=cost,
        env_kwargs={"num_groups": 1, "probe_layers": 1, "probe_dim": 4, **extra},
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_env():
    return tiny_eval_env("calibrated", 6)


def test_evaluation_is_reproducible_in_calibrated_mode(tiny_env):
    ctrl = StaticUniform(layers=0.5)
    a = ev.run_controller(tiny_env, ctrl, 4)
    b = ev.run_controller(tiny_env, ctrl, 4)
    assert np.array_equal(a.rel, b.rel) and np.array_equal(a.raw, b.raw)
    assert np.array_equal(a.lat, b.lat)
    assert a.summary()["n"] == 4


def test_static_table_matches_live_runs(tiny_env):
    cands = [Dense(), StaticUniform(layers=0.5)]
    table, obs = ev.static_table(tiny_env, cands, 3)
    live = ev.run_controller(tiny_env, cands[1], 3)
    assert obs.shape[0] == 3
    assert np.array_equal(table[1].raw, live.raw) and np.array_equal(table[1].lat, live.lat)
    assert np.allclose(table[0].lat, 1.0)


def test_outputs_written(tmp_path, tiny_env):
    runs, _ = ev.static_table(tiny_env, [Dense(), StaticUniform(layers=0.5)], 2)
    rows = ev.headline(runs, {}, targets=(0.7,), n_boot=10)
    report.save_results(tmp_path, runs, rows, "x")
    assert (tmp_path / "results.json").is_file() and (tmp_path / "per_input.csv").read_text().count("\n") == 5
    report.pareto_plot(runs, {}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_parse_controller_errors(tiny_env):
    with pytest.raises(ValueError, match="unknown controller"):
        cli.parse_controller("nonsense", tiny_env)
    with pytest.raises(ValueError, match="bad controller spec"):
        cli.parse_controller("static:1,2", tiny_env)


def test_sweep_interleaves_controllers_with_the_same_results(tiny_env):
    ctrl = StaticUniform(layers=0.5, mlp=0.5)
    static, runs, obs = ev.sweep(tiny_env, [Dense()], 3, [(ctrl, "mine")], seed=3)
    live = ev.run_controller(tiny_env, ctrl, 3)
    assert [r.family for r in runs] == ["mine"] and len(static) == 1 and obs.shape[0] == 3
    assert np.array_equal(runs[0].rel, live.rel) and np.array_equal(runs[0].lat, live.lat)
    probes = ev.probe_observations(tiny_env, 3)
    assert np.allclose(probes, obs)
    assert np.allclose(tiny_env.probe_features_of(tiny_env.items[1].id), obs[1])  # by id too
    assert len(ev.entropy_rules(probes, tiny_env.probe.feature_names)) == 3


def test_same_round_latency_pairs_each_input_with_its_dense_timing():
    from dataclasses import replace

    dense = replace(fake_run("Dense", [1, 1, 1, 1], 1.0), latency_s=np.array([0.10, 0.30, 0.10, 0.30]))
    half = replace(fake_run("half", [1, 0, 1, 0], 0.5), latency_s=np.array([0.05, 0.15, 0.05, 0.15]))
    d, h = ev.same_round_latency([dense, half], dense)
    assert d.lat.mean() == pytest.approx(1.0) and h.lat.mean() == pytest.approx(0.5)
    assert h.extra["latency_fraction_single_dense"] == pytest.approx(0.5)
    # A slow phase that hits every plan of the same inputs moves no fraction.
    slow = [replace(r, latency_s=r.latency_s * np.array([1.0, 3.0, 1.0, 3.0])) for r in (dense, half)]
    assert ev.same_round_latency(slow, slow[0])[1].lat.mean() == pytest.approx(0.5)
    # Per input, not a ratio of means: a plan that saves only on the long inputs.
    part = replace(fake_run("part", [1, 1, 1, 1], 0.5), latency_s=np.array([0.10, 0.15, 0.10, 0.15]))
    p = ev.same_round_latency([dense, part], dense)[1]
    assert np.allclose(p.lat, [1.0, 0.5, 1.0, 0.5])
    assert p.extra["latency_fraction_ratio_of_means"] == pytest.approx(0.5 / 0.8)


def test_measured_sweep_keeps_each_plans_best_round(monkeypatch):
    env = tiny_eval_env()
    cands = [Dense(), StaticUniform(layers=0.5)]
    timed: list[str] = []

    def quick(plan):
        timed.append(plan.describe())
        return 1e-9

    monkeypatch.setattr(env, "retime", quick)
    static, _, _ = ev.sweep(env, cands, 3, rounds=3)
    assert len(timed) == 2 * 3 * 2  # two extra rounds of both plans on each of 3 inputs
    assert sorted(set(timed)) == sorted({c(None, ev.context(env)).describe() for c in cands})
    for r in static:
        assert np.allclose(r.latency_s, r.decision_s + 1e-9) and r.extra["timing_rounds"] == 3
    # Later rounds that are slower leave the first round's timing.
    monkeypatch.setattr(env, "retime", lambda plan: 1e3)
    first, _, _ = ev.sweep(env, cands, 3, rounds=2)
    assert np.all(first[0].latency_s < 1e3)
    with pytest.raises(ValueError, match="rounds"):
        ev.sweep(env, cands, 3, rounds=0)


def test_calibrated_sweep_takes_one_round(tiny_env, monkeypatch):
    monkeypatch.setattr(tiny_env, "retime", lambda plan: pytest.fail("a calibrated cost needs no timing rounds"))
    static, _, _ = ev.sweep(tiny_env, [Dense()], 2, rounds=3)
    assert "timing_rounds" not in static[0].extra


def test_retime_times_the_open_input_without_touching_its_episode():
    env = tiny_eval_env(timing_threads=1)
    assert env.cost_source.meter.threads == 1  # the evaluation's timing threads reach the meter
    env.reset(options={"item": 0})
    plan = StaticUniform(layers=0.5)(None, ev.context(env))
    _, _, _, _, a = env.step_plan(plan, keep_open=True)
    assert env.retime(plan) > 0 and env.retime(env.slm.dense_plan()) > 0
    _, _, _, _, b = env.step_plan(plan, keep_open=True)
    assert a["accuracy_raw"] == b["accuracy_raw"] and a["flops_fraction"] == b["flops_fraction"]
    env.close_episode()


def test_retime_refuses_calibrated_cost_and_a_closed_env(tiny_env):
    with pytest.raises(ValueError, match="measured"):
        tiny_env.retime(tiny_env.slm.dense_plan())
    env = tiny_eval_env()
    with pytest.raises(RuntimeError, match="reset"):
        env.retime(env.slm.dense_plan())


def test_sweep_warns_when_other_processes_hold_the_timing_cores(monkeypatch):
    from envs.measure import meters

    env = tiny_eval_env(timing_threads=1)
    cores = meters.usable_cores()
    monkeypatch.setattr(meters, "busy_cores_elsewhere", lambda interval_s=0.5: float(cores))
    with pytest.warns(RuntimeWarning, match="cores busy"):
        ev.sweep(env, [Dense()], 1, rounds=1)
    monkeypatch.setattr(meters, "busy_cores_elsewhere", lambda interval_s=0.5: 0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ev.sweep(env, [Dense()], 1, rounds=1)


def test_timing_settings_defaults_and_errors():
    assert ev.timing_settings() == (ev.TIMING_ROUNDS, ev.TIMING_THREADS)
    assert ev.timing_settings(3, 2) == (3, 2)
    with pytest.raises(ValueError, match="rounds"):
        ev.timing_settings(0, None)


def test_measured_sweep_takes_fractions_against_dense_in_the_same_rounds():
    env = tiny_eval_env()
    static, _, _ = ev.sweep(env, [Dense(), StaticUniform(layers=0.5)], 3)
    assert static[0].lat.mean() == pytest.approx(1.0)
    assert np.allclose(static[1].lat, static[1].latency_s / static[0].latency_s)
    assert "latency_fraction_single_dense" in static[1].extra


def test_a_plan_two_parts_choose_runs_and_is_timed_once_per_input_and_round(monkeypatch):
    """A controller picking the dense plan shares the dense plan's run: same score, same seconds plus its decision."""
    env = tiny_eval_env()
    ran: list[str] = []
    step, retime = env.step_plan, env.retime

    def counting_step(plan, **kw):
        ran.append(plan.describe())
        return step(plan, **kw)

    def counting_retime(plan):
        ran.append(plan.describe())
        return retime(plan)

    monkeypatch.setattr(env, "step_plan", counting_step)
    monkeypatch.setattr(env, "retime", counting_retime)
    half = StaticUniform(layers=0.5)
    static, runs, _ = ev.sweep(env, [Dense(), half], 3, [(Dense(), "always dense"), (half, "always half")], rounds=2)
    assert len(ran) == 3 * 2 * 2  # two distinct plans, three inputs, two rounds
    d, h = static
    again_d, again_h = runs
    for mine, theirs in ((again_d, d), (again_h, h)):
        assert np.array_equal(mine.rel, theirs.rel) and np.array_equal(mine.raw, theirs.raw)
        assert np.allclose(mine.latency_s - mine.decision_s, theirs.latency_s - theirs.decision_s)
        assert mine.extra["inputs_timed_with_another_part"] + theirs.extra.get("inputs_timed_with_another_part", 0) == 3


def test_every_measured_sweep_command_reads_its_timing_options_in_one_way(monkeypatch):
    """experiments.evaluate, bench.latency and bench.staged share the timing options, their defaults and checks."""
    import argparse

    from envs.measure import meters
    from experiments.cli import add_timing_arguments, timing_arguments

    monkeypatch.setattr(meters, "usable_cores", lambda: 2)
    p = argparse.ArgumentParser()
    add_timing_arguments(p)
    assert timing_arguments(p, p.parse_args([])) == (ev.TIMING_ROUNDS, ev.TIMING_THREADS, 2)
    assert timing_arguments(p, p.parse_args(["--rounds", "3", "--timing-threads", "2"])) == (3, 2, 1)
    for bad in (["--workers", "0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            timing_arguments(p, p.parse_args(bad))
    helps = {a.dest: a.help for a in cli.parser()._actions if a.dest in ("timing_threads", "workers")}
    assert helps["timing_threads"] == next(a.help for a in p._actions if a.dest == "timing_threads")
