"""Reliability: random and hostile actions against every registered environment, with memory watched.

Each id gets a stream of steps on the tiny model: mostly random valid actions, and in between
hostile ones (NaN, infinities, wrong shapes, strings, complex numbers, booleans, objects, out-of-range
presets, steps after the episode ended, resets mid-episode). A valid action must step; a hostile one
must raise ``ValueError`` (``RuntimeError`` after the end) and leave the episode exactly where it
was; ``+-inf`` and out-of-range numbers are clipped, as the environments document. The fast set runs
200 steps per id; the slow set 10,000 and reports the resident memory growth.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest

import envs
from tests.conftest import tiny_kwargs

CLIPPED = "clipped"
REFUSED = "refused"


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hostile_actions(space: gym.Space, rng: np.random.Generator) -> list[tuple[object, str]]:
    """Actions an agent (or an attacker) may send, each with what the environment must do with it."""
    if isinstance(space, gym.spaces.Discrete):
        n = int(space.n)
        return [
            (n, REFUSED),
            (-1, REFUSED),
            (10**20, REFUSED),
            (np.int64(n), REFUSED),
            (np.int64(-1), REFUSED),
            (1.5, REFUSED),
            (float("nan"), REFUSED),
            (float("inf"), REFUSED),
            (True, REFUSED),
            (np.bool_(False), REFUSED),
            ("1", REFUSED),
            (1 + 0j, REFUSED),
            (None, REFUSED),
            ([0, 1], REFUSED),
            (object(), REFUSED),
            (np.array([[1]]), CLIPPED),  # one integer, whatever its array shape: accepted as that preset
            (float(n - 1), CLIPPED),  # an integral float names a preset
            (np.uint8(0), CLIPPED),  # any NumPy integer type
        ]
    shape = space.shape
    size = int(np.prod(shape))
    good = rng.random(size)
    return [
        (np.full(shape, np.nan), REFUSED),
        (np.ones(size + 1), REFUSED),
        (np.ones((1, *shape)), REFUSED),
        (np.ones(0), REFUSED),
        ("0.5", REFUSED),
        ([str(x) for x in good], REFUSED),
        (good.astype(np.complex128), REFUSED),
        (np.ones(shape, dtype=bool), REFUSED),
        (None, REFUSED),
        (object(), REFUSED),
        ({"a": 1}, REFUSED),
        (np.full(shape, np.inf), CLIPPED),
        (np.full(shape, -np.inf), CLIPPED),
        (np.full(shape, 1e300), CLIPPED),
        (np.full(shape, -7.0), CLIPPED),
        (np.ones(shape, dtype=np.int64), CLIPPED),
        (good.tolist(), CLIPPED),
    ]


def fuzz(env_id: str, cost_path: str, steps: int, seed: int = 0) -> dict[str, int]:
    """Run ``steps`` steps of random and hostile actions; returns counts of what happened."""
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path, n_items=8)).unwrapped
    space, obs_space = env.action_space, env.observation_space
    space.seed(seed)
    rng = np.random.default_rng(seed)
    hostile = hostile_actions(space, rng)
    counts = {"steps": 0, "valid": 0, "refused": 0, "clipped": 0, "after_end": 0, "resets": 0, "episodes": 0}
    obs, _ = env.reset(seed=seed)
    done = False
    while counts["steps"] < steps:
        counts["steps"] += 1
        roll = rng.random()
        if done:
            with pytest.raises(RuntimeError, match="reset"):
                env.step(space.sample())
            counts["after_end"] += 1
            obs, _ = env.reset()
            counts["resets"] += 1
            counts["episodes"] += 1
            done = False
            continue
        if roll < 0.02:
            obs, _ = env.reset()
            counts["resets"] += 1
            continue
        if roll < 0.35:
            action, expect = hostile[int(rng.integers(len(hostile)))]
            if expect == REFUSED:
                with pytest.raises(ValueError):
                    env.step(action)
                counts["refused"] += 1
                continue  # the episode is where it was: the next valid step continues it
            counts["clipped"] += 1
        else:
            action = space.sample()
            counts["valid"] += 1
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs_space.contains(obs), f"{env_id}: observation outside its space after {action!r}"
        assert np.isfinite(reward), f"{env_id}: reward {reward} after {action!r}"
        done = terminated or truncated
    env.close()
    return counts


@pytest.mark.parametrize("env_id", envs.env_ids())
def test_random_and_hostile_actions(env_id, cost_path):
    counts = fuzz(env_id, cost_path, steps=200)
    assert counts["refused"] > 20 and counts["valid"] > 60 and counts["episodes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("env_id", envs.env_ids())
def test_ten_thousand_fuzz_steps_hold_memory(env_id, cost_path):
    fuzz(env_id, cost_path, steps=500, seed=1)  # warm the caches (dense references, plans, weight views)
    before = _rss()
    counts = fuzz(env_id, cost_path, steps=10_000, seed=2)
    growth = (_rss() - before) / 2**20
    print(f"{env_id}: {counts}, RSS growth {growth:+.1f} MiB")
    assert counts["steps"] == 10_000
    assert growth < 64, f"{env_id}: resident memory grew {growth:.1f} MiB over 10,000 steps"


def test_layer_by_layer_step_that_raises_leaves_the_episode_where_it_was(cost_path, monkeypatch):
    """A failure inside a step (a bad action, or the forward itself) changes nothing; the retry continues."""
    env_id = envs.env_id("LayerByLayer")
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path)).unwrapped
    obs0, _ = env.reset(seed=3)
    G = env.num_groups
    obs1, *_ = env.step(np.array([1.0, 0.5, 0.5]))
    with pytest.raises(ValueError):
        env.step(np.array([np.nan, 1.0, 1.0]))
    for _ in range(G - 2):
        obs1, *_ = env.step(np.array([1.0, 0.5, 0.5]))
    calls = {"n": 0}
    finish = type(env)._finish

    def failing_once(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("interrupted forward")
        return finish(self, *a, **kw)

    monkeypatch.setattr(type(env), "_finish", failing_once)
    with pytest.raises(RuntimeError, match="interrupted"):
        env.step(np.array([1.0, 1.0, 1.0]))  # the last group: the forward fails
    obs2, reward, terminated, _, info = env.step(np.array([1.0, 1.0, 1.0]))  # the retry finishes the episode
    assert terminated and np.isfinite(reward) and calls["n"] == 2
    assert info["plan"]["layers_run"] == env.slm.spec.num_layers
