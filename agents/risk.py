"""Risk-controlled threshold choice: Learn-then-Test with a binomial tail bound.

A controller that skips work (exits early, prunes harder) sometimes disagrees with the dense model.
A user states the disagreement they accept, ``delta``, and how sure they want to be that it holds,
``1 - epsilon``: the chosen threshold must agree with the dense model on at least ``1 - delta`` of
new inputs, with probability at least ``1 - epsilon`` over the draw of the calibration set.

Learn-then-Test (Angelopoulos et al., 2021) turns this into multiple testing. For each candidate
threshold the null hypothesis is "its true risk exceeds ``delta``"; the number of disagreements on
``n`` calibration inputs gives an exact binomial p-value for it; a candidate is certified when its
null is rejected at level ``epsilon``. Candidates ordered from safest to riskiest are tested in that
fixed sequence, stopping at the first that is not certified. Fixed-sequence testing controls the
family-wise error at ``epsilon`` with no correction for the number of candidates, which is why the
ordering matters and why this is the rule CALM (Schuster et al., 2022) uses for early exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom


def check_level(name: str, value: float) -> float:
    """Return ``value`` (a delta or an epsilon) as a float, or raise when it is not strictly between 0 and 1."""
    try:
        level = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from exc
    if not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return level


def binomial_pvalue(errors: int, n: int, delta: float) -> float:
    """P-value of the null "true risk > delta" after ``errors`` disagreements among ``n`` inputs.

    Under the null the error count is stochastically at least Binomial(n, delta), so observing as
    few as ``errors`` has probability at most ``P(Binomial(n, delta) <= errors)``, which is returned.
    A small value is evidence that the true risk is at most ``delta``.

    Args:
        errors: Disagreements observed on the calibration inputs.
        n: Number of calibration inputs.
        delta: Risk level of the null, in (0, 1).

    Returns:
        The binomial lower-tail probability, in [0, 1].

    Raises:
        ValueError: If ``n`` is negative, ``errors`` is outside ``[0, n]`` or ``delta`` is outside (0, 1).
    """
    delta = check_level("delta", delta)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0 <= errors <= n:
        raise ValueError(f"errors must be in [0, n] = [0, {n}], got {errors}")
    return float(min(1.0, max(0.0, binom.cdf(int(errors), int(n), delta))))


def min_calibration(delta: float, epsilon: float) -> int:
    """Smallest calibration size at which a candidate with no errors is certified.

    With zero errors the p-value is ``(1 - delta) ** n``; below the returned size even a candidate
    that never disagrees cannot be certified, so a smaller calibration set cannot support the request.

    Args:
        delta: Accepted disagreement rate, in (0, 1).
        epsilon: Accepted probability that the guarantee fails, in (0, 1).

    Returns:
        The smallest ``n`` with ``(1 - delta) ** n <= epsilon``.

    Raises:
        ValueError: If ``delta`` or ``epsilon`` is outside (0, 1).
    """
    delta = check_level("delta", delta)
    epsilon = check_level("epsilon", epsilon)
    n = max(1, math.ceil(math.log(epsilon) / math.log1p(-delta)))
    # The logarithms can round across an integer boundary; settle it on the defining inequality.
    while n > 1 and (1.0 - delta) ** (n - 1) <= epsilon:
        n -= 1
    while (1.0 - delta) ** n > epsilon:
        n += 1
    return n


@dataclass(frozen=True)
class RiskChoice:
    """The certified candidate and the evidence behind it.

    Attributes:
        index: Chosen candidate (column of the loss table), the riskiest one certified.
        delta: Accepted disagreement rate.
        epsilon: Accepted probability that the guarantee fails.
        n: Number of calibration inputs.
        errors: Disagreements of the chosen candidate on the calibration inputs.
        pvalues: P-value of every candidate tested, in order; when the walk stopped early, the last
            entry is the first candidate that was not certified.
    """

    index: int
    delta: float
    epsilon: float
    n: int
    errors: int
    pvalues: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain-dict form."""
        return {
            "index": int(self.index),
            "delta": float(self.delta),
            "epsilon": float(self.epsilon),
            "n": int(self.n),
            "errors": int(self.errors),
            "pvalues": [float(p) for p in self.pvalues],
        }


def _binary_losses(losses: np.ndarray) -> np.ndarray:
    """Validate a ``[n, m]`` table of 0/1 losses and return it as booleans."""
    table = np.asarray(losses)
    if table.ndim != 2:
        raise ValueError(f"losses must be 2-D [n inputs, m candidates], got shape {table.shape}")
    n, m = table.shape
    if n < 1 or m < 1:
        raise ValueError(f"losses needs at least one input and one candidate, got shape {table.shape}")
    if table.dtype == np.bool_:
        return table
    if not (np.issubdtype(table.dtype, np.integer) or np.issubdtype(table.dtype, np.floating)):
        raise ValueError(f"losses must be boolean or numeric 0/1, got dtype {table.dtype}")
    binary = (table == 0) | (table == 1)
    if not binary.all():
        bad = table[~binary].flat[0]
        raise ValueError(f"losses must contain only 0 and 1 (disagreed or not), found {bad!r}")
    return table == 1


def ltt_select(losses: np.ndarray, delta: float, epsilon: float) -> RiskChoice:
    """Choose the riskiest candidate certified to disagree with the dense model at most ``delta``.

    Candidates are tested in column order by fixed-sequence testing: column ``j`` is certified when
    its binomial p-value is at most ``epsilon``, and the walk stops at the first column that is not.
    With probability at least ``1 - epsilon`` over the calibration draw, the returned candidate's
    true disagreement rate is at most ``delta``.

    Args:
        losses: ``[n, m]`` table of 0/1 (or booleans); entry ``[i, j]`` says whether candidate ``j``
            disagreed with the dense model on calibration input ``i``. Columns are ordered from the
            safest candidate (column 0) to the riskiest.
        delta: Accepted disagreement rate, in (0, 1).
        epsilon: Accepted probability that the guarantee fails, in (0, 1).

    Returns:
        The chosen candidate with its error count and the p-values of the candidates tested.

    Raises:
        ValueError: If ``delta`` or ``epsilon`` is outside (0, 1); if ``losses`` is not a non-empty
            2-D table of 0/1; if there are fewer calibration inputs than ``min_calibration(delta,
            epsilon)``; or if the safest candidate itself is not certified.
    """
    delta = check_level("delta", delta)
    epsilon = check_level("epsilon", epsilon)
    table = _binary_losses(losses)
    n, m = table.shape
    needed = min_calibration(delta, epsilon)
    if n < needed:
        raise ValueError(
            f"delta={delta} and epsilon={epsilon} need at least {needed} calibration inputs "
            f"(even a candidate with no errors cannot be certified with fewer); got {n}"
        )
    errors = table.sum(axis=0).astype(int)
    pvalues: list[float] = []
    for j in range(m):
        p = binomial_pvalue(int(errors[j]), n, delta)
        pvalues.append(p)
        if p > epsilon:
            break
    else:
        j = m
    if j == 0:
        raise ValueError(
            f"the safest candidate (column 0) is not certified at delta={delta}, epsilon={epsilon}: "
            f"{int(errors[0])} errors in {n} inputs give p-value {pvalues[0]:.4g} > epsilon. "
            "A column 0 that is the exact dense model never errs and is always certified once "
            "enough calibration inputs are given."
        )
    index = j - 1
    return RiskChoice(
        index=index,
        delta=delta,
        epsilon=epsilon,
        n=n,
        errors=int(errors[index]),
        pvalues=tuple(pvalues),
    )
