"""Accuracy/cost frontiers on plain numbers: static plans, their convex hull, the oracle, a two-level rule.

Inputs are a score matrix ``acc[N, P]`` (item ``i`` under plan ``p``, in [0, 1]) and the plans'
costs ``cost[P]`` (measured latency relative to dense). Costs and accuracies are means over items.

- :func:`best_static`: the best single plan whose cost fits the budget.
- :func:`static_hull`: the upper concave hull of the static points. A random mixture of two
  static plans (time-sharing) reaches any point on it, so an adaptive controller has to beat the
  hull, not just the best single plan.
- :func:`oracle_frontier`: the per-input hindsight oracle, i.e. each input gets its own plan to
  maximise total accuracy subject to a mean-cost budget (a multiple-choice knapsack). Solved
  through its Lagrangian: at price ``lam`` every input independently takes the plan maximising
  ``acc - lam * cost``; sweeping ``lam`` traces the upper concave envelope, and between two
  breakpoints a randomised choice for one input interpolates. That envelope is the LP optimum,
  an upper bound on the integral oracle that differs from it by at most one input's step.
- :func:`cv_two_level_rule`: a first realistic controller, "if the probe feature is below a
  threshold run plan A, else plan B", with threshold and plans chosen by cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check(acc: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acc = np.asarray(acc, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if acc.ndim == 1:
        acc = acc[None]
    if acc.ndim != 2 or cost.ndim != 1 or acc.shape[1] != cost.shape[0]:
        raise ValueError(f"acc must be [N, P] and cost [P]; got {acc.shape} and {cost.shape}")
    if acc.shape[0] == 0 or cost.shape[0] == 0:
        raise ValueError("need at least one item and one plan")
    if not (np.isfinite(acc).all() and np.isfinite(cost).all()):
        raise ValueError("acc and cost must be finite")
    return acc, cost


def best_static(acc: np.ndarray, cost: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Mean accuracy of the best single plan with ``cost <= budget`` (NaN where none fits)."""
    acc, cost = _check(acc, cost)
    mean = acc.mean(0)
    out = np.full(len(np.atleast_1d(budgets)), np.nan)
    for j, b in enumerate(np.atleast_1d(budgets)):
        ok = cost <= b + 1e-12
        if ok.any():
            out[j] = mean[ok].max()
    return out


def upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper concave hull of points, from the cheapest (best at that cost) to the best; increasing part only."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    order = np.lexsort((-y, x))
    hx: list[float] = []
    hy: list[float] = []
    for px, py in zip(x[order], y[order], strict=True):
        if hx and px == hx[-1]:
            continue  # same cost, lower accuracy (sorted best first)
        if hy and py <= hy[-1]:
            continue  # costs more, gains nothing
        while len(hx) >= 2 and (hx[-1] - hx[-2]) * (py - hy[-2]) >= (px - hx[-2]) * (hy[-1] - hy[-2]):
            hx.pop()
            hy.pop()
        hx.append(float(px))
        hy.append(float(py))
    return np.array(hx), np.array(hy)


def interp_frontier(fx: np.ndarray, fy: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Value of a concave frontier at each budget: NaN below its cheapest point, flat beyond its last."""
    b = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    out = np.interp(b, fx, fy)
    out[b < fx[0] - 1e-12] = np.nan
    return out


def static_hull(acc: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (mean cost, mean accuracy) of the best random mixture of static plans."""
    acc, cost = _check(acc, cost)
    return upper_hull(cost, acc.mean(0))


def oracle_frontier(acc: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (mean cost, mean accuracy) of the per-input hindsight oracle.

    Each input starts at its cheapest plan; the positive-slope segments of every input's own upper
    hull are then taken in order of decreasing slope (the Lagrangian sweep), which is optimal for
    the relaxed knapsack.
    """
    acc, cost = _check(acc, cost)
    n = acc.shape[0]
    start_c = start_a = 0.0
    segs: list[tuple[float, float, float]] = []
    for i in range(n):
        hx, hy = upper_hull(cost, acc[i])
        start_c += hx[0]
        start_a += hy[0]
        for k in range(1, len(hx)):
            dc, da = hx[k] - hx[k - 1], hy[k] - hy[k - 1]
            segs.append((da / dc, dc, da))
    segs.sort(key=lambda s: -s[0])
    fx = [start_c]
    fy = [start_a]
    for _, dc, da in segs:
        fx.append(fx[-1] + dc)
        fy.append(fy[-1] + da)
    return np.array(fx) / n, np.array(fy) / n


def oracle_choice(acc: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """Per-input plan index at price ``lam``: argmax of ``acc - lam * cost``, ties to the cheaper plan."""
    acc, cost = _check(acc, cost)
    val = acc - lam * cost[None]
    best = val.max(1, keepdims=True)
    tied = np.isclose(val, best, rtol=0, atol=1e-12)
    return np.where(tied, cost[None], np.inf).argmin(1)


@dataclass(frozen=True)
class Rule:
    """If ``feature <= threshold`` run plan ``low`` else plan ``high`` (plan indices)."""

    threshold: float
    low: int
    high: int

    def apply(self, feature: np.ndarray) -> np.ndarray:
        """Plan index per input."""
        return np.where(np.asarray(feature) <= self.threshold, self.low, self.high)


def fit_two_level_rule(
    feature: np.ndarray, acc: np.ndarray, cost: np.ndarray, budget: float, n_thresholds: int = 9
) -> Rule | None:
    """The rule with the highest mean accuracy whose mean cost fits ``budget`` (``None`` if none fits)."""
    acc, cost = _check(acc, cost)
    f = np.asarray(feature, dtype=np.float64)
    n = len(f)
    qs = np.unique(np.quantile(f, np.linspace(0, 1, n_thresholds + 2)[1:-1])) if n > 1 else f
    best: tuple[float, float, Rule] | None = None
    for t in np.concatenate([qs, [np.inf]]):
        m = f <= t
        lo_a, hi_a = acc[m].sum(0), acc[~m].sum(0)
        tot = lo_a[:, None] + hi_a[None, :]
        c = (m.sum() * cost[:, None] + (~m).sum() * cost[None, :]) / n
        tot = np.where(c <= budget + 1e-12, tot, -np.inf)
        a, b = np.unravel_index(np.argmax(tot - 1e-9 * c), tot.shape)  # ties: the cheaper rule
        if not np.isfinite(tot[a, b]):
            continue
        key = (float(tot[a, b]), -float(c[a, b]))
        if best is None or key > best[:2]:
            best = (*key, Rule(float(t), int(a), int(b)))
    return None if best is None else best[2]


def cv_two_level_rule(
    feature: np.ndarray,
    acc: np.ndarray,
    cost: np.ndarray,
    budgets: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    extra_cost: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out (mean cost, mean accuracy) of the two-level rule fitted per budget by K-fold CV.

    Args:
        feature: Probe feature per input.
        acc: ``[N, P]`` scores.
        cost: ``[P]`` plan costs.
        budgets: Mean-cost budgets (the probe's ``extra_cost`` counts against them).
        folds: Number of folds.
        seed: Seed of the fold assignment.
        extra_cost: Cost of computing the feature, added to every input.

    Returns:
        Two arrays over budgets; NaN where no rule fits a budget.
    """
    acc, cost = _check(acc, cost)
    f = np.asarray(feature, dtype=np.float64)
    n = acc.shape[0]
    fold = np.random.default_rng(seed).permutation(n) % max(2, min(folds, n))
    out_c = np.full(len(budgets), np.nan)
    out_a = np.full(len(budgets), np.nan)
    for j, b in enumerate(budgets):
        tot_a = tot_c = 0.0
        ok = True
        for k in np.unique(fold):
            tr, te = fold != k, fold == k
            rule = fit_two_level_rule(f[tr], acc[tr], cost, b - extra_cost)
            if rule is None:
                ok = False
                break
            p = rule.apply(f[te])
            tot_a += acc[te][np.arange(te.sum()), p].sum()
            tot_c += (cost[p] + extra_cost).sum()
        if ok:
            out_c[j], out_a[j] = tot_c / n, tot_a / n
    return out_c, out_a


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for binary ``label`` (ties count half; NaN if one class)."""
    s, y = np.asarray(score, dtype=np.float64), np.asarray(label).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))
