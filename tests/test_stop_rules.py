"""Stop rules of the staged environment: exit tables are what episodes give; CALM, risk-controlled and ceiling rules."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from agents.staged import (
    STOP_MODELS,
    ExitTable,
    MarginThreshold,
    StopClassifier,
    as_run,
    at_latency,
    exit_table,
    first_true,
    fit_for_latency,
    margin_grid,
    risk_controlled,
    risk_controlled_classifier,
    stop_ceiling,
)
from tests.conftest import tiny_kwargs


@pytest.fixture(scope="module", autouse=True)
def one_thread_here(one_thread):
    yield


def make_table(obs: np.ndarray, rel: np.ndarray, lat: np.ndarray, names: list[str]) -> ExitTable:
    """An exit table of one task whose raw scores are the dense-relative ones and whose FLOPs follow latency."""
    n = len(obs)
    ids = [f"i{i}" for i in range(n)]
    return ExitTable(
        ids, ["t"] * n, obs.astype(np.float32), rel, rel.copy(), lat, lat * 0.1, np.full(n, 0.1), lat.copy(),
        np.full(n, 20), names,
    )  # fmt: skip


def synthetic(n: int, G: int = 5, seed: int = 0) -> ExitTable:
    """A table whose truth is known: a stop after ``t`` groups agrees when the margin there exceeds 2."""
    rng = np.random.default_rng(seed)
    names = ["step", "margin", "noise"]
    margin = np.cumsum(rng.exponential(1.0, (n, G)), axis=1)  # margins grow with depth
    obs = np.stack([np.tile(np.arange(G) / G, (n, 1)), margin, rng.standard_normal((n, G))], axis=-1)
    rel = np.ones((n, G + 1))
    rel[:, :G] = (margin > 2.0 + rng.normal(0, 0.3, (n, G))).astype(float)
    return make_table(obs, rel, np.tile(np.linspace(0.2, 1.0, G + 1), (n, 1)), names)


def test_first_true():
    m = np.array([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true(m).tolist() == [1, 3, 0]


def test_margin_threshold_exits_and_fit_for_latency():
    table = synthetic(200)
    never = MarginThreshold(np.inf).exits(table)
    assert (never == table.groups).all()
    assert table.take(never)["rel"].mean() == 1.0
    grid = margin_grid(table)
    assert np.isinf(grid[0]) and (np.diff(grid[1:]) < 0).all()
    lats = [table.take(MarginThreshold(g).exits(table))["lat"].mean() for g in grid]
    assert all(a >= b for a, b in zip(lats, lats[1:], strict=False)), "lower thresholds stop earlier"
    for target in (0.5, 0.8):
        rule = fit_for_latency(table, target)
        got = table.take(rule.exits(table))["lat"].mean()
        assert got >= target
        lower = [g for g in grid if g < rule.threshold]
        if lower:
            assert table.take(MarginThreshold(lower[0]).exits(table))["lat"].mean() < target


def test_risk_controlled_meets_its_guarantee_on_new_inputs():
    """Over many seeded calibration draws, the certified rule rarely disagrees on more than delta of fresh inputs."""
    delta, eps, draws = 0.1, 0.1, 60
    truth = synthetic(20000, seed=999)
    bad = 0
    saved = []
    for seed in range(draws):
        rc = risk_controlled(synthetic(300, seed=seed), delta, eps)
        agree = truth.take(rc.rule.exits(truth))["rel"].mean()
        bad += agree < 1 - delta
        saved.append(1 - truth.take(rc.rule.exits(truth))["lat"].mean())
    assert bad / draws <= eps + 3 * np.sqrt(eps * (1 - eps) / draws)
    assert np.mean(saved) > 0.05, "the certified rule must still stop early on many inputs"


def test_risk_controlled_refuses_what_it_cannot_certify():
    with pytest.raises(ValueError, match="59"):
        risk_controlled(synthetic(40), 0.05, 0.05)
    graded = synthetic(100)
    graded.rel[:, 0] = 0.5
    with pytest.raises(ValueError, match="0/1"):
        risk_controlled(graded, 0.1, 0.1)


def test_risk_controlled_classifier_meets_its_guarantee_on_new_inputs():
    """Learn-then-Test on the classifier's score: over seeded draws, disagreement above delta stays rare."""
    delta, eps, draws = 0.1, 0.1, 40
    truth = synthetic(20000, seed=999)
    bad, saved = 0, []
    for seed in range(draws):
        # the guarantee comes from the calibration half, whatever model the fit half chose: one keeps it fast
        rc = risk_controlled_classifier(synthetic(300, seed=seed), delta, eps, seed=seed, models=["logistic(C=1)"])
        assert rc.score == "stop classifier" and rc.setting in rc.grid
        got = truth.take(rc.rule.exits(truth))
        bad += got["rel"].mean() < 1 - delta
        saved.append(1 - got["lat"].mean())
    assert bad / draws <= eps + 3 * np.sqrt(eps * (1 - eps) / draws)
    assert np.mean(saved) > 0.05, "the certified rule must still stop early on many inputs"


def test_risk_controlled_classifier_refuses_what_it_cannot_certify():
    # delta = epsilon = 0.05 needs 59 calibration inputs: half of the train table, so about 118 train inputs
    with pytest.raises(ValueError, match="59 calibration inputs.*118 train inputs, got 100"):
        risk_controlled_classifier(synthetic(100), 0.05, 0.05)
    for kw, msg in (
        ({"fit_share": 1.0}, "fit_share"),
        ({"lambdas": [0.1, 0.2]}, "lambdas"),
        ({"lambdas": []}, "lambdas"),
    ):
        with pytest.raises(ValueError, match=msg):
            risk_controlled_classifier(synthetic(300), 0.1, 0.1, **kw)
    # lambda = 0 is the dense model itself, even where the classifier is certain
    never = stop_ceiling(synthetic(300), [0.0, 0.5])[0][0]
    test = synthetic(300, seed=5)
    test.obs[:, :, 1] = 1e6  # margins so large that the predicted agreement saturates at 1.0
    assert (never.exits(test) == test.groups).all()
    rc = risk_controlled_classifier(synthetic(300), 0.1, 0.1)
    d = rc.to_dict()
    assert d["score"] == "stop classifier" and "lambda" in d and d["n"] == 150
    assert rc.setting_text().startswith("λ")


def test_stop_ceiling_learns_the_margin_rule():
    train, test = synthetic(400, seed=1), synthetic(400, seed=2)
    classifiers, losses = stop_ceiling(train)
    assert set(losses) == set(STOP_MODELS) and all(np.isfinite(v) for v in losses.values())
    lats = []
    for c in classifiers:
        got = test.take(c.exits(test))
        assert 0 <= got["rel"].mean() <= 1
        lats.append(got["lat"].mean())
    assert all(a >= b for a, b in zip(lats, lats[1:], strict=False)), "a larger lambda stops earlier"
    strict = classifiers[0]
    assert test.take(strict.exits(test))["rel"].mean() >= 0.9
    run = as_run(test, strict.exits(test), "x", "ceiling")
    assert run.lat.shape == (400,) and run.extra["stopped_early"] > 0.2
    # the bar is lowest where a stop saves most (the synthetic latency rises with depth)
    assert (np.diff(strict.bars) > 0).all()
    with pytest.raises(ValueError, match="bars for"):
        StopClassifier(strict.model, strict.bars[:-1]).exits(test)
    for bad in ([], [-0.1], [np.inf]):
        with pytest.raises(ValueError, match="lambdas"):
            stop_ceiling(train, bad)


def interaction(n: int, G: int = 3, seed: int = 0) -> ExitTable:
    """A stop agrees when two observation entries have the same sign: no weighted sum of them tells it."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, G)), rng.standard_normal((n, G))
    obs = np.stack([a, b, rng.standard_normal((n, G))], axis=-1).astype(np.float32)
    rel = np.ones((n, G + 1))
    rel[:, :G] = (np.sign(a) == np.sign(b)) & (rng.random((n, G)) < 0.95)
    return make_table(obs, rel, np.tile(np.linspace(0.2, 1.0, G + 1), (n, 1)), ["a", "b", "x"])


def test_cross_validation_chooses_the_model_that_fits_the_stops():
    """Where agreement hangs on two entries together, the trees win the cross-validation and rank new stops."""
    from agents.frontier import auc

    train, test = interaction(400, seed=1), interaction(400, seed=2)
    classifiers, losses = stop_ceiling(train, [0.5])
    best = min(losses, key=losses.__getitem__)
    assert best.startswith("boosted trees") and classifiers[0].kind == best, losses
    assert min(v for k, v in losses.items() if k.startswith("logistic")) > losses[best] + 0.1
    y = test.rel[:, : test.groups].reshape(-1) >= 1
    assert auc(classifiers[0].agreement(test).reshape(-1), y) > 0.85
    only = stop_ceiling(train, [0.5], models=["logistic(C=1)"])
    assert list(only[1]) == ["logistic(C=1)"]
    assert auc(only[0][0].agreement(test).reshape(-1), y) < 0.65
    with pytest.raises(ValueError, match="unknown stop models"):
        stop_ceiling(train, [0.5], models=["forest"])
    with pytest.raises(ValueError, match="unknown stop models"):
        stop_ceiling(train, [0.5], models=[])


def late_gain(n: int, G: int = 5, seed: int = 0) -> ExitTable:
    """Stops agree as often at every depth but the last, which agrees far more often and saves little.

    Each input has an ease ``e``, seen with noise at every step; a stop before the last step agrees
    with probability ``sigmoid(1.5 e - 0.3)``, at the last one ``sigmoid(1.5 e + 2)``.
    """
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(n)
    step = np.tile(np.arange(G), (n, 1))
    last = (step == G - 1).astype(float)
    seen = e[:, None] + rng.normal(0, 0.3, (n, G))
    obs = np.stack([last, seen], axis=-1).astype(np.float32)
    p = 1 / (1 + np.exp(-(1.5 * e[:, None] - 0.3 + 2.3 * last)))
    rel = np.ones((n, G + 1))
    rel[:, :G] = (rng.random((n, G)) < p).astype(float)
    return make_table(obs, rel, np.tile(np.linspace(0.1, 1.0, G + 1), (n, 1)), ["last", "e"])


def test_cost_aware_stops_beat_one_bar_for_every_depth():
    """Same classifier, same inputs: weighing the risk against the saving beats one bar for every depth.

    One bar waits for the last step, where stops agree most but save least; the cost-aware rule
    stops the inputs that are safe enough where a stop saves most.
    """
    train, test = late_gain(2000, seed=3), late_gain(2000, seed=4)
    classifiers, _ = stop_ceiling(train, np.linspace(0.01, 2.0, 60))
    G = test.groups
    one_bar = [StopClassifier(classifiers[0].model, np.full(G, b)) for b in np.linspace(0.05, 0.999, 80)]

    def frontier(rules):
        pts = [(test.take(r.exits(test))["lat"].mean(), test.take(r.exits(test))["rel"].mean()) for r in rules]
        return pts + [(1.0, 1.0)]

    def at(pts, x):  # the best mixture of two operating points at latency x
        return max(
            a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0])
            for a in pts
            for b in pts
            if a[0] <= x <= b[0] and b[0] > a[0]
        )

    for x in (0.4, 0.55, 0.7):
        assert at(frontier(classifiers), x) >= at(frontier(one_bar), x) + 0.03, x


def test_table_round_trip(tmp_path):
    t = synthetic(10)
    path = t.save(tmp_path / "t.npz")
    back = ExitTable.load(path)
    assert back.item_ids == t.item_ids and back.feature_names == t.feature_names
    assert np.array_equal(back.obs, t.obs) and np.array_equal(back.rel, t.rel)
    with pytest.raises(KeyError, match="no feature"):
        t.feature("nope")


def test_exit_table_is_what_episodes_give(cost_path):
    """Every row and depth of the table equals a real episode that stops there (calibrated: exactly)."""
    kw = tiny_kwargs("Staged", cost_path, task="generated", n_items=6)
    env = gym.make("PruneGym/StagedDiscrete-v0", **kw).unwrapped
    table = exit_table(env, 3)
    G = env.num_groups
    assert table.obs.shape == (3, G, env.observation_space.shape[0])
    for i in range(3):
        for t in range(G + 1):
            obs, _ = env.reset(options={"item": i})
            info = {}
            for s in range(t + 1):
                if s == t and t < G:
                    assert np.array_equal(obs, table.obs[i, t])
                    _, _, done, _, info = env.step(0)
                    break
                if s < G:
                    obs, _, done, _, info = env.step(1)
            assert info["accuracy_dense_relative"] == table.rel[i, t]
            assert info["latency_fraction"] == table.lat[i, t]
            assert info["groups_run"] == t


@pytest.mark.parametrize(
    ("deltas", "epsilon", "needle"),
    [((0.05, 1.5), 0.05, "delta must be in"), ((), 0.05, "at least one delta"), ((0.1,), 0.0, "epsilon must be in")],
)
def test_a_bad_delta_or_epsilon_is_an_error_not_a_refusal(deltas, epsilon, needle):
    """fit_stop_rules records a delta it cannot certify as refused, but raises on one that is no probability."""
    from agents.staged import check_risk_settings, fit_stop_rules

    with pytest.raises(ValueError, match=needle):
        check_risk_settings(deltas, epsilon)
    with pytest.raises(ValueError, match=needle):
        fit_stop_rules(None, deltas, epsilon)  # type: ignore[arg-type]  # checked before the table is read
    assert check_risk_settings([0.02, "0.1"], "0.05") == ((0.02, 0.1), 0.05)  # type: ignore[list-item]


def test_at_latency_finds_the_trade_off_that_meets_a_latency_on_the_train_table():
    """The operating point moved to a latency target sits there on the train table, and stops as its bars say."""
    table = synthetic(400, seed=4)
    clfs, _ = stop_ceiling(table, [0.2, 1.0], models=["logistic(C=1)"])
    for target in (0.45, 0.6, 0.8):
        moved = at_latency(clfs[0], table, target)
        lat = table.take(moved.exits(table))["lat"].mean()
        assert abs(lat - target) < 0.01, (target, lat)
        assert moved.kind == clfs[0].kind and moved.model is clfs[0].model and f"{lat:.3f}" in moved.name
        # the bars stay the cost-aware ones: 1 - lambda * saving, the savings of the fit
        saving = (1 - clfs[1].bars) / clfs[1].lam
        assert np.allclose(moved.bars, 1 - moved.lam * saving)
    faster = [table.take(at_latency(clfs[1], table, t).exits(table))["lat"].mean() for t in (0.4, 0.5, 0.7)]
    assert faster == sorted(faster)
    with pytest.raises(ValueError, match="no cost-aware trade-off"):
        at_latency(StopClassifier(clfs[0].model, clfs[0].bars), table, 0.5)
