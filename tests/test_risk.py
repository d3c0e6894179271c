"""Learn-then-Test threshold choice: binomial p-values, calibration size, the guarantee, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agents.risk import RiskChoice, binomial_pvalue, ltt_select, min_calibration


def _direct_cdf(errors: int, n: int, delta: float) -> float:
    return sum(math.comb(n, k) * delta**k * (1 - delta) ** (n - k) for k in range(errors + 1))


@pytest.mark.parametrize("errors,n,delta", [(0, 10, 0.1), (3, 20, 0.2), (5, 59, 0.05), (12, 100, 0.1), (40, 40, 0.3)])
def test_binomial_pvalue_matches_direct_sum(errors, n, delta):
    assert binomial_pvalue(errors, n, delta) == pytest.approx(_direct_cdf(errors, n, delta), rel=1e-9, abs=1e-15)


def test_binomial_pvalue_monotone_in_errors():
    p = [binomial_pvalue(k, 200, 0.1) for k in range(201)]
    assert all(a <= b for a, b in zip(p, p[1:], strict=False))
    assert p[0] == pytest.approx(0.9**200)
    assert p[-1] == pytest.approx(1.0)


def test_binomial_pvalue_rejects_bad_arguments():
    with pytest.raises(ValueError):
        binomial_pvalue(-1, 10, 0.1)
    with pytest.raises(ValueError):
        binomial_pvalue(11, 10, 0.1)
    with pytest.raises(ValueError):
        binomial_pvalue(1, 10, 1.0)


def test_min_calibration_known_value():
    assert 0.95**59 <= 0.05 < 0.95**58
    assert min_calibration(0.05, 0.05) == 59


@pytest.mark.parametrize(
    "delta,epsilon", [(0.1, 0.1), (0.01, 0.05), (0.2, 0.01), (0.5, 0.5), (0.05, 0.001), (0.9, 0.9)]
)
def test_min_calibration_boundary(delta, epsilon):
    n = min_calibration(delta, epsilon)
    assert n >= 1
    assert (1 - delta) ** n <= epsilon
    assert n == 1 or (1 - delta) ** (n - 1) > epsilon
    # Zero errors at exactly that size is certified; one input fewer is not.
    assert binomial_pvalue(0, n, delta) <= epsilon
    assert n == 1 or binomial_pvalue(0, n - 1, delta) > epsilon


def test_guarantee_on_nested_synthetic_table():
    """With known true risks, the chosen candidate's risk exceeds delta in at most ~epsilon of draws."""
    delta = epsilon = 0.1
    draws, n, m = 600, 400, 40
    risks = np.linspace(0.0, 0.3, m)
    rng = np.random.default_rng(20240611)
    u = rng.random((draws, n))
    # Nested losses: a riskier candidate errs on every input a safer one errs on, as exits do.
    losses = u[:, :, None] < risks[None, None, :]
    chosen = np.array([ltt_select(losses[d], delta, epsilon).index for d in range(draws)])
    true_risk = risks[chosen]
    violation = float(np.mean(true_risk > delta))
    assert violation <= epsilon + 3 * math.sqrt(epsilon * (1 - epsilon) / draws)
    # Not over-conservative: it picks candidates close to (but under) delta, far from the safe end.
    assert true_risk.mean() > 0.06
    assert np.mean(chosen == 0) < 0.01


def test_choice_fields_and_json():
    losses = np.zeros((100, 4), dtype=int)
    losses[:3, 1] = 1
    losses[:30, 2] = 1
    losses[:, 3] = 1
    choice = ltt_select(losses, delta=0.1, epsilon=0.1)
    assert isinstance(choice, RiskChoice)
    assert choice.index == 1
    assert choice.errors == 3
    assert choice.n == 100
    assert len(choice.pvalues) == 3  # the walk stopped at column 2
    assert choice.pvalues[2] > 0.1 >= choice.pvalues[1]
    d = json.loads(json.dumps(choice.to_dict()))
    assert d["index"] == 1 and d["errors"] == 3 and len(d["pvalues"]) == 3


def test_all_candidates_certified_picks_last():
    losses = np.zeros((200, 5), dtype=bool)
    choice = ltt_select(losses, delta=0.1, epsilon=0.1)
    assert choice.index == 4
    assert len(choice.pvalues) == 5


def test_refuses_too_few_calibration_inputs():
    losses = np.zeros((58, 3), dtype=bool)
    with pytest.raises(ValueError, match=r"59") as info:
        ltt_select(losses, delta=0.05, epsilon=0.05)
    assert "58" in str(info.value)
    assert ltt_select(np.zeros((59, 3), dtype=bool), delta=0.05, epsilon=0.05).index == 2


@pytest.mark.parametrize(
    "losses",
    [
        np.array([[0, 1], [2, 0]] * 50),
        np.array([[0.0, 0.5]] * 100),
        np.array([[0.0, np.nan]] * 100),
        np.array([["a", "b"]] * 100),
        np.zeros(100),
        np.zeros((100, 2, 2)),
        np.zeros((0, 3)),
        np.zeros((100, 0)),
    ],
)
def test_bad_losses_raise(losses):
    with pytest.raises(ValueError):
        ltt_select(losses, delta=0.1, epsilon=0.1)


@pytest.mark.parametrize("delta,epsilon", [(0.0, 0.1), (1.0, 0.1), (-0.1, 0.1), (0.1, 0.0), (0.1, 1.5)])
def test_bad_levels_raise(delta, epsilon):
    with pytest.raises(ValueError):
        ltt_select(np.zeros((500, 2), dtype=bool), delta=delta, epsilon=epsilon)


def test_failing_safest_candidate_raises():
    losses = np.zeros((100, 3), dtype=bool)
    losses[:20, :] = True  # column 0 errs on 20% of inputs, far above delta
    with pytest.raises(ValueError, match=r"safest candidate .* not certified"):
        ltt_select(losses, delta=0.1, epsilon=0.1)
