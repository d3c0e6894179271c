import numpy as np
import pytest

from agents.frontier import (
    Rule,
    auc,
    best_static,
    cv_two_level_rule,
    fit_two_level_rule,
    interp_frontier,
    oracle_choice,
    oracle_frontier,
    static_hull,
    upper_hull,
)


def test_upper_hull_drops_dominated_and_concave_points():
    x = np.array([0.5, 0.6, 0.7, 0.8, 1.0, 0.9])
    y = np.array([0.2, 0.25, 0.6, 0.55, 0.7, 0.7])
    hx, hy = upper_hull(x, y)
    # (0.6, 0.25) lies under the chord from (0.5, .2) to (0.7, .6); (0.8, .55) and (1.0, .7) are dominated.
    assert hx.tolist() == [0.5, 0.7, 0.9]
    assert hy.tolist() == [0.2, 0.6, 0.7]


def test_static_hull_is_mixture_of_two_plans():
    acc = np.array([[1, 0, 1], [1, 0, 0]], dtype=float)  # plan means: 1.0, 0.0, 0.5
    cost = np.array([1.0, 0.5, 0.8])
    hx, hy = static_hull(acc, cost)
    assert hx.tolist() == [0.5, 1.0]  # the middle plan (0.8, 0.5) lies under the chord (0.8, 0.6)
    assert interp_frontier(hx, hy, np.array([0.8]))[0] == pytest.approx(0.6)
    assert np.isnan(interp_frontier(hx, hy, np.array([0.4]))[0])
    assert best_static(acc, cost, np.array([0.8, 0.79, 0.4])).tolist()[:2] == [0.5, 0.0]
    assert np.isnan(best_static(acc, cost, np.array([0.4]))[0])


def test_oracle_on_hand_example():
    # Item 0 is right only under the dense plan, item 1 under every plan.
    acc = np.array([[1, 0], [1, 1]], dtype=float)
    cost = np.array([1.0, 0.5])
    fx, fy = oracle_frontier(acc, cost)
    assert fx.tolist() == [0.5, 0.75]
    assert fy.tolist() == [0.5, 1.0]
    # The oracle runs item 1 cheaply: full accuracy at cost 0.75, where the static hull has 0.75.
    hx, hy = static_hull(acc, cost)
    assert interp_frontier(hx, hy, np.array([0.75]))[0] == pytest.approx(0.75)
    assert oracle_choice(acc, cost, lam=0.5).tolist() == [0, 1]
    assert oracle_choice(acc, cost, lam=10.0).tolist() == [1, 1]


def test_oracle_dominates_every_static_plan_and_the_hull():
    rng = np.random.default_rng(0)
    acc = (rng.random((40, 12)) < np.linspace(0.3, 0.9, 12)).astype(float)
    cost = np.linspace(0.45, 1.0, 12)
    fx, fy = oracle_frontier(acc, cost)
    hx, hy = static_hull(acc, cost)
    assert np.all(np.diff(fx) >= 0) and np.all(np.diff(fy) >= -1e-12)
    for p in range(12):
        assert interp_frontier(fx, fy, np.array([cost[p]]))[0] >= acc[:, p].mean() - 1e-12
    grid = np.linspace(0.45, 1.0, 30)
    assert np.all(interp_frontier(fx, fy, grid) >= interp_frontier(hx, hy, grid) - 1e-12)
    # The integral Lagrangian solution at any price is a feasible point on or under the frontier.
    for lam in (0.0, 0.3, 1.0, 3.0):
        ch = oracle_choice(acc, cost, lam)
        c, a = cost[ch].mean(), acc[np.arange(40), ch].mean()
        assert a <= interp_frontier(fx, fy, np.array([c]))[0] + 1e-9


def test_oracle_frontier_matches_brute_force_on_small_case():
    rng = np.random.default_rng(1)
    acc = rng.random((3, 3)).round(1)
    cost = np.array([0.5, 0.7, 1.0])
    fx, fy = oracle_frontier(acc, cost)
    best = {}
    for a in range(3):
        for b in range(3):
            for c in range(3):
                mc = cost[[a, b, c]].mean()
                ma = (acc[0, a] + acc[1, b] + acc[2, c]) / 3
                best[mc] = max(best.get(mc, -1), ma)
    for mc, ma in best.items():  # the relaxed frontier is never below an integral choice
        assert interp_frontier(fx, fy, np.array([mc]))[0] >= ma - 1e-9
    # ... and touches the integral optimum at its breakpoints
    for x, y in zip(fx, fy, strict=True):
        assert any(abs(mc - x) < 1e-9 and abs(ma - y) < 1e-9 for mc, ma in best.items())


def test_two_level_rule_finds_the_feature_split():
    n = 60
    feature = np.arange(n, dtype=float)
    # Low-feature inputs survive the cheap plan, high-feature inputs need the dense one.
    acc = np.zeros((n, 2))
    acc[:, 0] = 1.0
    acc[: n // 2, 1] = 1.0
    cost = np.array([1.0, 0.5])
    rule = fit_two_level_rule(feature, acc, cost, budget=0.8)
    assert isinstance(rule, Rule)
    plans = rule.apply(feature)
    assert acc[np.arange(n), plans].mean() == 1.0
    assert cost[plans].mean() <= 0.8
    assert fit_two_level_rule(feature, acc, cost, budget=0.4) is None
    cc, ca = cv_two_level_rule(feature, acc, cost, np.array([0.8, 1.0]), folds=5)
    assert ca[0] > 0.9 and cc[0] <= 0.85
    cc2, _ = cv_two_level_rule(feature, acc, cost, np.array([0.8]), folds=5, extra_cost=0.05)
    assert cc2[0] <= 0.8 + 1e-9


def test_auc():
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(auc(np.array([0.5, 0.5]), np.array([1, 1])))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\[N, P\]"):
        oracle_frontier(np.ones((2, 3)), np.ones(2))
