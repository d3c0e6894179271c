"""Staged controllers and stop rules in the evaluation sweep, beside the static plans."""

from __future__ import annotations

import numpy as np
import pytest

from agents import evaluation as ev
from agents.baselines import Dense, StaticUniform
from agents.staged import (
    MarginThreshold,
    StagedController,
    StagedPass,
    as_run,
    episode,
    exit_depths,
    exit_table,
    staged_env_kwargs,
)

ENV = {"probe_layers": 1, "probe_dim": 4}


@pytest.fixture(autouse=True)
def one_thread_here(one_thread):
    yield


def envs(cost: str, n: int = 4, split: str = "test", **staged_kw):
    """The tiny model's per-input and staged evaluation environments over the same inputs (test split by default)."""
    extra = {"calibrate_cost": True} if cost == "calibrated" else {}
    common = {"model": "tiny-llama", "task": "generated", "split": split, "n_items": n, "cost": cost}
    per_input = ev.evaluation_env(**common, env_kwargs={**ENV, "num_groups": 1, **extra})
    staged = ev.evaluation_env(**common, env_kwargs={**ENV, **extra, **staged_kw}, env="Staged")
    return per_input, staged


def dense_act(obs):
    return 1


def stop_at_once(obs):
    return 0


def test_staged_pass_in_a_calibrated_sweep_equals_its_parts_run_alone():
    """The pass's exit table and controller runs equal the table and episodes run outside the sweep."""
    pin, staged = envs("calibrated", discrete=True)
    sp = StagedPass(staged, [(dense_act, "always on", "on"), (stop_at_once, "stop now", "stop")])
    static, ctrl, _ = ev.sweep(pin, [Dense(), StaticUniform(layers=0.5)], 4, staged=sp)
    alone = exit_table(staged, 4)
    assert sp.table is not None
    assert np.array_equal(sp.table.rel, alone.rel) and np.array_equal(sp.table.lat, alone.lat)
    assert np.array_equal(sp.table.obs, alone.obs)
    on, stop = sp.runs
    G = staged.interface.steps
    assert np.array_equal(on.rel, alone.rel[:, G]) and np.array_equal(on.lat, alone.lat[:, G])
    assert np.array_equal(stop.rel, alone.rel[:, 0]) and np.array_equal(stop.lat, alone.lat[:, 0])
    assert (stop.lat < on.lat).all()
    assert ctrl == [] and len(static) == 2
    # a stop rule read off the pass's table is a run like any other
    run = as_run(sp.table, MarginThreshold(np.inf).exits(sp.table), "never stops", "calm")
    assert np.array_equal(run.rel, on.rel)


def test_measured_staged_pass_is_paired_with_the_dense_plan():
    """Measured: every staged fraction is its best round over the dense plan's best round on the same input."""
    pin, staged = envs("measured", 3, discrete=True)
    sp = StagedPass(staged, [(dense_act, "always on", "on")])
    static, _, _ = ev.sweep(pin, [Dense()], 3, rounds=2, staged=sp)
    dense_s = static[0].latency_s
    assert np.allclose(sp.table.lat, sp.table.latency_s / dense_s[:, None])
    assert np.allclose(sp.runs[0].lat, sp.runs[0].latency_s / dense_s)
    assert sp.runs[0].extra["timing_rounds"] == 2
    # the fraction grows with the stages that ran
    assert (np.diff(sp.table.latency_s.mean(0)[:-1]) > 0).all()


def test_staged_sweep_refuses_other_inputs_and_a_missing_dense_reference():
    pin, same_inputs = envs("measured", 3, discrete=True)
    other_split = ev.evaluation_env(
        model="tiny-llama", task="generated", split="val", n_items=3, env_kwargs={**ENV, "discrete": True}, env="Staged"
    )
    with pytest.raises(ValueError, match="other inputs"):
        ev.sweep(pin, [Dense()], 3, staged=StagedPass(other_split))
    with pytest.raises(ValueError, match="needs Dense"):
        ev.sweep(pin, [StaticUniform(layers=0.5)], 3, staged=StagedPass(same_inputs))


def test_exit_depths_are_the_static_twins_of_every_stop():
    from agents.baselines import Context

    _, staged = envs("calibrated", 2, discrete=True)
    depths = exit_depths(staged)
    iface = staged.interface
    assert [d.layers for d in depths] == [1, *(iface.stop_layer(t) for t in range(iface.steps - 1))]
    table = exit_table(staged, 2)
    pin = ev.evaluation_env(
        model="tiny-llama",
        task="generated",
        split="test",
        n_items=2,
        cost="calibrated",
        env_kwargs={**ENV, "num_groups": 1, "calibrate_cost": True},
    )
    for i in range(2):  # a fixed exit answers as the staged stop at the same depth
        obs, info = pin.reset(options={"item": i})
        for t, d in enumerate(depths):
            plan = d(obs, Context(pin.interface, item_index=i, prompt_len=info["prompt_tokens"]))
            _, _, _, _, res = pin.step_plan(plan, keep_open=True)
            assert res["accuracy_dense_relative"] == table.rel[i, t]
        pin.close_episode()


def test_episode_reports_the_decision_time_and_ends():
    _, staged = envs("calibrated", 2, discrete=True)
    info, dec = episode(staged, 1, dense_act)
    assert info["groups_run"] == staged.interface.steps and dec >= 0.0
    info, _ = episode(staged, 1, stop_at_once)
    assert info["groups_run"] == 0 and info["stopped"]


@pytest.mark.parametrize("discrete", [True, False])
def test_exported_staged_controller_rebuilds_its_environment(tmp_path, discrete):
    """A staged policy's card rebuilds the environment it was trained in; another interface is refused."""
    from tests.test_parity import export_random

    _, staged = envs("calibrated", 2, discrete=discrete)
    size = staged.action_space.n if discrete else staged.action_space.shape[0]
    ctrl = export_random(staged, tmp_path)
    card_action = ctrl.card["interface"]["action"]
    assert (card_action["n"] if discrete else card_action["shape"][0]) == size  # stop included
    kwargs = staged_env_kwargs(ctrl.card)
    assert kwargs["discrete"] is discrete
    rebuilt = ev.evaluation_env(
        model="tiny-llama", task="generated", n_items=2, cost="calibrated", env_kwargs=kwargs, env="Staged"
    )
    sc = StagedController(ctrl, rebuilt, "mine")
    info, _ = episode(rebuilt, 0, sc)
    assert "accuracy_dense_relative" in info
    other = ev.evaluation_env(
        model="tiny-llama",
        task="generated",
        n_items=2,
        cost="calibrated",
        env_kwargs={**kwargs, "num_groups": 1},
        env="Staged",
    )
    with pytest.raises(ValueError, match="another staged interface"):
        StagedController(ctrl, other)
    with pytest.raises(ValueError, match="stage by stage"):
        ctrl.select_plan(np.zeros(ctrl.observation_size, np.float32), staged.slm, prompt_len=8)
    with pytest.raises(ValueError, match="not a staged controller"):
        staged_env_kwargs({"interface": {"kind": "per_input"}})


def test_stop_rules_fit_on_train_and_read_off_a_new_table():
    """The CALM grid gives one run per threshold; a delta too strict for the table is kept with its reason."""
    from agents.staged import (
        CALM_FAMILY,
        CLASSIFIER_FAMILY,
        RISK_CLASSIFIER_FAMILY,
        RISK_FAMILY,
        STOP_MODELS,
        fit_stop_rules,
    )
    from tests.test_stop_rules import synthetic

    train, test = synthetic(400, seed=1), synthetic(300, seed=2)
    rules = fit_stop_rules(train, deltas=(0.10, 0.001), epsilon=0.05, grid_size=10)
    assert rules.train_items == 400 and np.isinf(rules.grid[0])
    runs, records = rules.evaluate(test)
    calm = [r for r in runs if r.family == CALM_FAMILY]
    assert len(calm) == len(rules.grid) and np.array_equal(calm[0].rel, test.rel[:, test.groups])
    assert [(r["delta"], r["score"]) for r in records] == [
        (0.10, "margin"),
        (0.001, "margin"),
        (0.10, "stop classifier"),
        (0.001, "stop classifier"),
    ]
    ok, refused, ok_clf, refused_clf = records
    assert "refused" in refused and "calibration inputs" in refused["refused"]
    assert "refused" in refused_clf and "train inputs" in refused_clf["refused"]
    for r in (ok, ok_clf):
        assert r["agreement"] >= 0.9 - 0.05 and 0.0 <= r["stopped_early"] <= 1.0
    assert [r.family for r in runs].count(RISK_FAMILY) == 1
    assert [r.family for r in runs].count(RISK_CLASSIFIER_FAMILY) == 1
    clf = [r for r in runs if r.family == CLASSIFIER_FAMILY]
    assert not isinstance(rules.classifiers, str) and len(clf) == len(rules.classifiers) > 5
    assert len({c.kind for c in rules.classifiers}) == 1 and rules.classifiers[0].kind in STOP_MODELS
    assert clf[0].rel.mean() > 0.9 and clf[-1].lat.mean() < clf[0].lat.mean()
    # a table where every stop agrees fits no classifier: recorded with the reason, the other rules stand
    easy = synthetic(100, seed=3)
    easy.rel[:] = 1.0
    none = fit_stop_rules(easy, deltas=(0.10,), epsilon=0.05, grid_size=5)
    assert isinstance(none.classifiers, str) and "nothing to learn" in none.classifiers
    assert not [r for r in none.evaluate(test)[0] if r.family == CLASSIFIER_FAMILY]


def test_evaluate_command_runs_staged_controllers_and_stop_rules(tmp_path):
    """``experiments.evaluate`` puts an exported staged controller and the stop rules beside the dense plan."""
    import json

    from experiments.evaluate import main
    from tests.test_parity import export_random

    _, staged = envs("calibrated", 2, discrete=True)
    ctrl = export_random(staged, tmp_path)
    out = tmp_path / "eval"
    main(
        [
            "--model=tiny-llama",
            "--task=generated",
            "--n-items=4",
            "--threads=1",
            "--env-kwargs",
            json.dumps({**ENV, "num_groups": 1}),
            "--pareto",
            "--stop-rules",
            "--fit-items=30",
            "--deltas",
            "0.2",
            "--controller",
            str(ctrl.folder),
            "--out",
            str(out),
        ]
    )
    runs = json.loads((out / "results.json").read_text())["runs"]
    families = {r["family"] for r in runs}
    assert {"static", "staged random", "CALM threshold (staged, train-fitted)"} <= families
    assert all(r["n"] == 4 for r in runs)
    # the static sweep holds every stop's static twin
    names = {r["name"] for r in runs}
    assert {f"StaticDepth({d})" for d in (1, 2, 3)} <= names, names
    assert "Risk-controlled stop" in (out / "results.md").read_text()


def test_a_sweep_shared_among_workers_equals_the_sweep_in_one_process():
    """Calibrated cost: two forked workers give the static, controller and staged results of one process, in order."""
    pin, staged = envs("calibrated", 5, discrete=True)
    cands = [Dense(), StaticUniform(layers=0.5)]
    ctrls = [(StaticUniform(mlp=0.5), "mlp half")]

    def run(workers):
        sp = StagedPass(staged, [(dense_act, "always on", "on"), (stop_at_once, "stop now", "stop")])
        static, ctrl, obs = ev.sweep(pin, cands, 5, ctrls, seed=1, staged=sp, workers=workers)
        return static + ctrl + sp.runs, obs, sp.table

    one, obs1, table1 = run(1)
    two, obs2, table2 = run(2)
    assert np.array_equal(obs1, obs2)
    for a, b in zip(one, two, strict=True):
        assert a.name == b.name and a.tasks == b.tasks
        for f in ("raw", "rel", "lat", "flops"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), (a.name, f)
    for f in ("rel", "raw", "lat", "obs", "flops", "prompt_tokens"):
        assert np.array_equal(getattr(table1, f), getattr(table2, f)), f
    assert table2.item_ids == [it.id for it in pin.items[:5]] and table1.tasks == table2.tasks


def test_measured_sweep_in_workers_pairs_each_input_with_its_own_dense_timing():
    pin, staged = envs("measured", 4, discrete=True)
    sp = StagedPass(staged, [(dense_act, "always on", "on")])
    static, _, obs = ev.sweep(pin, [Dense(), StaticUniform(layers=0.5)], 4, rounds=2, staged=sp, workers=2)
    assert obs.shape[0] == 4 and static[0].lat == pytest.approx(np.ones(4))
    assert np.allclose(static[1].lat, static[1].latency_s / static[0].latency_s)
    assert np.allclose(sp.table.lat, sp.table.latency_s / static[0].latency_s[:, None])
    assert static[0].extra["timing_workers"] == 2 and sp.runs[0].extra["timing_workers"] == 2


def test_a_failing_worker_stops_the_sweep_with_its_traceback():
    pin, _ = envs("calibrated", 4)

    def broken(obs, ctx):
        if ctx.item_index == 3:
            raise KeyError("no plan for input 3")
        return StaticUniform(layers=0.5)(obs, ctx)

    broken.name = "broken"  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match=r"worker 1 failed:(.|\n)*no plan for input 3"):
        ev.sweep(pin, [Dense()], 4, [(broken, "b")], workers=2)
    with pytest.raises(ValueError, match="workers"):
        ev.sweep(pin, [Dense()], 4, workers=0)


def test_workers_for_gives_one_worker_per_timing_threads_worth_of_cores(monkeypatch):
    from envs.measure import meters

    monkeypatch.setattr(meters, "usable_cores", lambda: 2)
    assert ev.workers_for(1) == 2 and ev.workers_for(2) == 1 and ev.workers_for(4) == 1
    assert ev.workers_for(1, 3) == 3
    with pytest.raises(ValueError, match="workers"):
        ev.workers_for(1, 0)
    import multiprocessing as mp

    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])  # a platform that cannot fork
    assert ev.workers_for(1) == 1 and ev.workers_for(1, 1) == 1
    with pytest.raises(ValueError, match="workers=1"):
        ev.workers_for(1, 2)


def _stopping_work(shard, tick):
    """A test worker: ``("fail", None)`` raises at once; ``("sleep", (seconds, path))`` sleeps, then writes ``path``."""
    import time as _time
    from pathlib import Path

    kind, arg = shard
    if kind == "fail":
        raise RuntimeError("worker failed on purpose")
    _time.sleep(float(arg[0]))
    Path(arg[1]).write_text("finished")
    return {}


def test_a_failed_worker_lets_the_others_finish_stopping_then_terminates_them(tmp_path, monkeypatch):
    """A worker already on its way out (the same Ctrl-C) is not cut off mid-cleanup; one that keeps going is."""
    import time

    mark = tmp_path / "mark"
    with pytest.raises(RuntimeError, match="worker failed on purpose"):
        ev.in_workers(_stopping_work, [("sleep", (1.0, str(mark))), ("fail", None)], role="test")
    assert mark.read_text() == "finished"  # it got its grace

    monkeypatch.setattr(ev, "STOP_GRACE_S", 0.5)
    late = tmp_path / "late"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="test worker 1 failed"):
        ev.in_workers(_stopping_work, [("sleep", (60.0, str(late))), ("fail", None)], role="test")
    assert not late.exists() and time.perf_counter() - t0 < 30  # terminated, not waited for


@pytest.mark.parametrize("model", ["logistic(C=1)", "boosted trees(depth=2)"])
def test_exported_stop_classifier_decides_as_it_was_fitted(tmp_path, model):
    """The exported stop classifier takes the fitted rule's stops, on its table and in episodes on new inputs."""
    import json
    from dataclasses import replace

    from agents.controller import Controller
    from agents.export import export_stop_classifier
    from agents.staged import controller_exits, risk_controlled_classifier, stop_ceiling

    _, train_env = envs("calibrated", 60, split="train", discrete=True)
    train = exit_table(train_env)
    assert train.meta["group_action"] == 1  # the dense preset ran each group
    clfs, _ = stop_ceiling(train, models=[model])
    clf = clfs[len(clfs) // 2]
    assert clf.kind == model and 0 < (clf.exits(train) < train.groups).mean() < 1  # it stops on some inputs only
    ctrl = Controller.from_pretrained(export_stop_classifier(clf, train, tmp_path / "clf", slm=train_env.slm))
    assert np.array_equal(controller_exits(ctrl, train), clf.exits(train))
    card = ctrl.card
    assert card["algo"] == "stop classifier" and card["policy"]["model"] == model
    assert card["policy"]["certificate"] is None
    assert card["interface"] == json.loads(json.dumps(train.meta["env"]["interface"]))
    # episodes on new inputs, in the environment the card describes, stop where the fitted rule stops
    _, test_env = envs("calibrated", 8, **staged_env_kwargs(card))
    test = exit_table(test_env)
    sc = StagedController(ctrl, test_env)
    got = [episode(test_env, i, sc)[0] for i in range(8)]
    assert [g["groups_run"] for g in got] == clf.exits(test).tolist()
    assert np.array_equal([g["accuracy_dense_relative"] for g in got], test.take(clf.exits(test))["rel"])
    # a certified operating point carries its certificate into the card and the model card
    rc = risk_controlled_classifier(train, 0.3, 0.1, models=[model])
    folder = export_stop_classifier(rc.rule, train, tmp_path / "cert", slm=train_env.slm, certified=rc)
    cert = Controller.from_pretrained(folder).card["policy"]["certificate"]
    assert cert["delta"] == 0.3 and cert["n"] == 30 and "agreement with the dense model >= 0.7" in cert["guarantee"]
    readme = (folder / "README.md").read_text()
    assert "**Certified**" in readme
    # the model card's example runs as written
    snippet = readme.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(folder))
    shown: dict = {}
    exec(compile(snippet, "README.md", "exec"), shown)  # noqa: S102 - the card's own example
    assert shown["info"]["groups_run"] == rc.rule.exits(test)[0]
    with pytest.raises(ValueError, match="another rule's"):
        export_stop_classifier(clf, train, tmp_path / "bad", slm=train_env.slm, certified=rc)
    # the command fits the rules on a saved train table and exports the operating point asked for
    from experiments.export import main as export_main

    saved = train.save(tmp_path / "train.npz")
    assert export_main([str(saved), "--latency", "0.6", "--out", str(tmp_path / "cli")]) == 0
    cli = Controller.from_pretrained(tmp_path / "cli").card["policy"]
    assert cli["certificate"] is None and abs(cli["train_table"]["latency_fraction"] - 0.6) < 0.05
    assert export_main([str(saved), "--delta", "0.3", "--epsilon", "0.1", "--out", str(tmp_path / "cli-cert")]) == 0
    assert Controller.from_pretrained(tmp_path / "cli-cert").card["policy"]["certificate"]["delta"] == 0.3
    with pytest.raises(SystemExit, match="cannot be certified"):
        export_main([str(saved), "--delta", "0.001", "--out", str(tmp_path / "no")])
    for bad in (["--out", "x"], ["--delta", "0.1", "--latency", "0.5", "--out", "x"]):
        with pytest.raises(SystemExit):
            export_main([str(saved), *bad])
    with pytest.raises(ValueError, match="bars for"):
        export_stop_classifier(clf, replace(train, obs=train.obs[:, 1:]), tmp_path / "b", slm=train_env.slm)
    box = json.loads(json.dumps(train.meta))
    box["env"]["interface"]["action"]["kind"] = "box"
    with pytest.raises(ValueError, match="discrete staged"):
        export_stop_classifier(clf, replace(train, meta=box), tmp_path / "b", slm=train_env.slm)
