"""The activation benchmark's paired bootstrap of a rule's gap to the static curve."""

from __future__ import annotations

import numpy as np

from experiments.bench.activation import hull_gap_ci


def _table(gain: float, prompts: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns: dense, static at 0.6 and 0.8 of dense latency, a rule at the same latencies ``gain`` better.

    The tests leave dense out of the hulls, so that the gap at 0.7 is ``gain`` itself.
    """
    rng = np.random.default_rng(seed)
    lat = np.tile([1.0, 0.6, 0.8, 0.6, 0.8], (prompts, 1)) + rng.normal(0, 0.01, (prompts, 5))
    lat[:, 0] = 1.0
    base = rng.uniform(0.2, 0.6, (prompts, 1)) + np.array([[0.0, 0.0, 0.2]])
    agr = np.concatenate([np.ones((prompts, 1)), base[:, 1:], base[:, 1:] + gain], axis=1)
    return lat, agr, np.ones(prompts)


def test_a_rule_better_on_every_prompt_has_a_ci_around_its_gain():
    lat, agr, w = _table(0.1)
    cis = hull_gap_ci(lat, agr, w, [3, 4], [1, 2], targets=(0.7,), n=400)
    lo, hi = cis[0]
    assert 0.05 < lo <= 0.1 <= hi < 0.15


def test_an_equal_rule_has_a_ci_that_contains_zero():
    lat, agr, w = _table(0.0)
    lo, hi = hull_gap_ci(lat, agr, w, [3, 4], [1, 2], targets=(0.7,), n=400)[0]
    assert lo <= 0.0 <= hi


def test_a_target_the_hulls_do_not_reach_has_no_ci():
    lat, agr, w = _table(0.1)
    assert hull_gap_ci(lat, agr, w, [3, 4], [1, 2], targets=(0.3, 0.7), n=200)[0] is None
