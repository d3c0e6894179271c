"""The learnable ceiling finds the signal the observations carry, and finds none where there is none."""

from __future__ import annotations

import numpy as np
import pytest

from agents.ceiling import learnable_ceiling


def synthetic(n: int, seed: int, informative: bool):
    """Two actions; the better one is decided by the sign of the first feature (when informative)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    good = (x[:, 0] > 0).astype(int) if informative else rng.integers(0, 2, n)
    rewards = np.where(np.arange(2)[None] == good[:, None], 1.0, 0.0) + rng.normal(0, 0.01, (n, 2))
    return x, rewards


def test_ceiling_learns_an_informative_observation():
    xtr, rtr = synthetic(300, 0, True)
    xte, rte = synthetic(200, 1, True)
    c = learnable_ceiling(xtr, rtr, xte, rte)
    assert c.oracle > 0.99 and c.best_static < 0.65
    assert c.learnable > 0.9 and c.cv_reward > 0.9
    assert c.model in c.candidates


def test_ceiling_stays_at_static_without_signal():
    xtr, rtr = synthetic(300, 2, False)
    xte, rte = synthetic(200, 3, False)
    c = learnable_ceiling(xtr, rtr, xte, rte)
    assert abs(c.learnable - c.best_static) < 0.12
    assert c.oracle > c.learnable + 0.3


def test_ceiling_refuses_mismatched_recordings():
    x, r = synthetic(20, 0, True)
    with pytest.raises(ValueError, match="same observations"):
        learnable_ceiling(x, r, x[:, :2], r)
    with pytest.raises(ValueError, match="fewer than"):
        learnable_ceiling(x[:3], r[:3], x, r)
