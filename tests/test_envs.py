"""The Gymnasium environments on tiny models: API conformance, determinism, vectorisation, bad actions."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs.base import shared_lm
from tests.conftest import MODEL, synthetic_cost_model, tiny_kwargs  # noqa: F401  (fixtures: cost_path)


@pytest.fixture(scope="module", autouse=True)
def one_thread_here(one_thread):
    """Tiny matmuls on a shared 2-core machine run ~10x faster on one thread (no spinning pool)."""
    yield


def test_every_id_is_registered_once_with_the_right_flags():
    ids = envs.env_ids()
    assert len(ids) == len(set(ids)) == 16
    for env_id in ids:
        spec = gym.spec(env_id)
        assert spec.nondeterministic == ("Measured" in env_id)
        assert spec.kwargs["cost"] == ("measured" if "Measured" in env_id else "calibrated")
        assert spec.kwargs["discrete"] == ("Discrete" in env_id)
        assert isinstance(spec.entry_point, str)


@pytest.mark.parametrize("env_id", envs.env_ids())
def test_check_env(env_id, cost_path):
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path))
    check_env(env.unwrapped)
    space = env.action_space
    assert isinstance(space, gym.spaces.Discrete if "Discrete" in env_id else gym.spaces.Box)
    env.close()


def _rollout(env, seed: int, episodes: int = 3):
    env.action_space.seed(seed)
    out = []
    obs, info = env.reset(seed=seed)
    out.append((obs, info))
    for _ in range(episodes):
        done = False
        while not done:
            obs, r, term, trunc, info = env.step(env.action_space.sample())
            out.append((obs, r, term, info))
            done = term or trunc
        obs, info = env.reset()
        out.append((obs, info))
    return out


def _same(a, b) -> bool:
    from gymnasium.utils.env_checker import data_equivalence

    return data_equivalence(a, b, exact=True)


@pytest.mark.parametrize(
    "name", ["PerInput", "LayerByLayer", "PerToken", "PerInputDiscrete", "Staged", "StagedDiscrete"]
)
def test_seeded_runs_repeat_exactly_in_calibrated_mode(name, cost_path):
    env_id = envs.env_id(name.removesuffix("Discrete"), discrete=name.endswith("Discrete"))
    a = _rollout(gym.make(env_id, **tiny_kwargs(env_id, cost_path)), seed=7)
    b = _rollout(gym.make(env_id, **tiny_kwargs(env_id, cost_path)), seed=7)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert _same(x, y)
    c = _rollout(gym.make(env_id, **tiny_kwargs(env_id, cost_path)), seed=8)
    assert not all(_same(x, y) for x, y in zip(a, c, strict=False))


@pytest.mark.parametrize("name", ["PerInput", "LayerByLayer", "PerToken", "Staged"])
def test_sync_vector_env(name, cost_path):
    env_id = envs.env_id(name.removesuffix("Discrete"), discrete=name.endswith("Discrete"))
    vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **tiny_kwargs(env_id, cost_path)) for _ in range(3)])
    obs, _ = vec.reset(seed=3)
    assert obs.shape == (3, *vec.single_observation_space.shape)
    for _ in range(6):
        obs, rew, term, trunc, info = vec.step(vec.action_space.sample())
        assert rew.shape == (3,) and np.isfinite(rew).all()
        assert vec.single_observation_space.contains(obs[0])
    models = {id(e.unwrapped.slm) for e in vec.envs}
    assert len(models) == 1, "vector envs must share one model per process"
    vec.close()


def _dense_logits(slm):
    ids = torch.arange(12)[None] % slm.spec.vocab_size
    return slm.forward(ids, None).logits


@pytest.mark.parametrize("name", ["PerInput", "LayerByLayer", "PerToken", "Staged"])
def test_bad_actions(name, cost_path):
    env_id = envs.env_id(name.removesuffix("Discrete"), discrete=name.endswith("Discrete"))
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path)).unwrapped
    before = _dense_logits(env.slm)
    n = env.action_space.shape[0]
    env.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(n, np.nan))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.ones(n + 1))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.ones((1, n)))
    # The failed calls changed nothing: the same episode continues with a clipped action.
    a = np.resize(np.array([-np.inf, np.inf, -0.5, 1.5, 0.3]), n)
    _, r, _, _, info = env.step(a)
    assert info["action_clipped"] and np.isfinite(r)
    assert all(0.0 <= f <= 1.0 for f in info.get("action_fractions", [0.0]))
    assert torch.equal(before, _dense_logits(env.slm)), "the model must never stay pruned"


def test_bad_discrete_actions(cost_path):
    env = gym.make("PruneGym/PerInputDiscrete-v0", **tiny_kwargs("PerInput", cost_path)).unwrapped
    env.reset(seed=0)
    n = env.action_space.n
    for bad in (n, -1, 0.5, np.array([1, 2]), np.nan):
        with pytest.raises(ValueError, match="discrete action"):
            env.step(bad)
    _, _, term, _, info = env.step(np.int64(0))
    assert term and info["plan"]["layers_run"] == env.slm.spec.num_layers


def test_dense_action_matches_the_plain_scorer(cost_path):
    """Probe reuse is exact: the env's accuracy equals the task scorer's on a from-scratch run."""
    from envs.tasks.scoring import Scorer

    env = gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PerInput", cost_path)).unwrapped
    scorer = Scorer()
    for i in range(len(env.items)):
        env.reset(options={"item": i})
        action = np.array([1.0, 0.5, 0.5, 0.5, 1.0, 0.25], dtype=np.float32)
        _, _, _, _, info = env.step(action)
        plan = env.builder.plan(action.reshape(-1, 3))
        ref = scorer.score(env.slm, env.items[i], plan)
        assert info["accuracy_raw"] == pytest.approx(ref.raw)
        assert info["accuracy_dense_relative"] == pytest.approx(ref.dense_relative)
        env.reset(options={"item": i})
        _, _, _, _, info = env.step(np.ones(6, dtype=np.float32))
        assert info["accuracy_dense_relative"] == 1.0 and info["latency_fraction"] == pytest.approx(1.0)


def test_probe_prunable_reruns_and_pays_twice(cost_path):
    env = gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PerInput", cost_path, probe_prunable=True)).unwrapped
    env.reset(seed=0)
    _, _, _, _, dense = env.step(np.ones(6, dtype=np.float32))
    assert dense["probe_reused"]
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([1, 0.5, 1, 1, 1, 1], dtype=np.float32))
    assert not info["probe_reused"]
    assert info["latency_s"] > 0


def test_budget_wall_keeps_flops_within_budget(cost_path):
    for name in ("PerInput", "PerToken", "LayerByLayer"):
        env_id = envs.env_id(name.removesuffix("Discrete"), discrete=name.endswith("Discrete"))
        env = gym.make(env_id, **tiny_kwargs(env_id, cost_path, budget=0.6)).unwrapped
        env.reset(seed=1)
        done = False
        while not done:
            _, _, done, _, info = env.step(np.ones(env.action_space.shape, dtype=np.float32))
        assert info["wall_clipped"]
        assert info["flops_fraction"] <= 0.6 + 1e-9


def test_per_token_dense_plan_follows_the_dense_continuation(cost_path):
    """A dense plan every step must reproduce the dense greedy continuation (KV cache consistent)."""
    env = gym.make("PruneGym/PerToken-v1", **tiny_kwargs("PerToken", cost_path, max_new_tokens=6)).unwrapped
    for seed in range(3):
        env.reset(seed=seed)
        done, agrees = False, []
        while not done:
            _, _, done, _, info = env.step(np.ones(6, dtype=np.float32))
            agrees.append(info["accuracy"])
        assert agrees and all(a == 1.0 for a in agrees)
    # Pruned tokens in between still leave the cache usable (and the episode well formed).
    env.reset(seed=0)
    steps = 0
    done = False
    while not done:
        a = np.ones(6, dtype=np.float32) if steps % 2 else np.array([0.5, 0.5, 0.5, 1, 0.5, 0.25], dtype=np.float32)
        _, r, done, _, info = env.step(a)
        steps += 1
        assert np.isfinite(r)
    assert steps == info["step"] + 1


def test_per_token_free_running(cost_path):
    env = gym.make("PruneGym/PerToken-v1", **tiny_kwargs("PerToken", cost_path, feed="own")).unwrapped
    env.reset(seed=0)
    done, n = False, 0
    while not done:
        _, _, done, _, _ = env.step(env.action_space.sample())
        n += 1
    assert 1 <= n <= env.max_new_tokens


def test_layer_by_layer_pays_only_at_the_end(cost_path):
    env = gym.make("PruneGym/LayerByLayer-v0", **tiny_kwargs("LayerByLayer", cost_path)).unwrapped
    obs, _ = env.reset(seed=0)
    assert env.num_groups == env.slm.spec.num_layers - 1
    rewards = []
    done = False
    while not done:
        obs, r, done, _, info = env.step(env.action_space.sample())
        rewards.append(r)
    assert len(rewards) == env.num_groups
    assert all(r == 0.0 for r in rewards[:-1])
    assert "latency_fraction" in info and "accuracy" in info


def test_info_carries_raw_figures_with_sources(cost_path):
    env = gym.make(
        "PruneGym/PerInput-v0", **tiny_kwargs("PerInput", cost_path, reward={"energy_weight": 1.0})
    ).unwrapped
    env.reset(seed=0)
    _, r, _, _, info = env.step(np.full(6, 0.5, dtype=np.float32))
    for key in ("latency_s", "dense_latency_s", "energy_j", "dense_energy_j", "latency_fraction", "energy_fraction"):
        assert isinstance(info[key], float) and info[key] > 0
    assert info["latency_source"] == "calibrated" and info["energy_source"] == "estimated"
    assert info["device"].startswith("cpu:")
    assert 0 < info["flops_fraction"] < 1


def test_measured_mode_times_the_run(cost_path):
    env = gym.make("PruneGym/PerInputMeasured-v0", **tiny_kwargs("PerInput", cost_path)).unwrapped
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.full(6, 0.5, dtype=np.float32))
    assert info["latency_source"] == "measured" and info["latency_s"] > 0 and info["probe_latency_s"] > 0
    with pytest.raises(ValueError, match="energy"):
        env2 = gym.make(
            "PruneGym/PerInputMeasured-v0", **tiny_kwargs("PerInput", cost_path, reward={"energy_weight": 1})
        )
        env2.reset(seed=0)
        env2.step(np.full(6, 0.5, dtype=np.float32))


def test_missing_calibration_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments.calibrate_cost"):
        gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PerInput", str(tmp_path / "none.json")))


def test_render_ansi_shows_the_plan(cost_path):
    env = gym.make("PruneGym/PerInput-v0", render_mode="ansi", **tiny_kwargs("PerInput", cost_path))
    env.reset(seed=0)
    env.step(np.full(6, 0.5, dtype=np.float32))
    text = env.render()
    assert "plan: layers" in text and "reward" in text


def test_conf_env_files_build(cost_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf"
    files = sorted((conf / "env").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        with initialize_config_dir(str(conf), version_base=None):
            cfg = OmegaConf.to_container(compose("train", overrides=[f"env={f.stem}"]).env, resolve=False)
        if cfg["id"] in envs.replay_ids():
            continue  # needs a recorded dataset: tests/test_replay.py builds it
        assert cfg["id"] in envs.env_ids()
        over = tiny_kwargs(cfg["id"], cost_path)
        if cfg["kwargs"].get("num_groups") is None:
            over.pop("num_groups", None)
        env = envs.make_env(cfg, **over)
        env.reset(seed=0)
        env.step(env.action_space.sample())
        env.close()


def test_probe_config_is_reproducible(cost_path):
    a = gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PerInput", cost_path)).unwrapped
    cfg = a.config()
    probe = cfg["interface"]["observation"]["probe"]
    assert probe["feature_names"][:3] == ["log_len", "entropy", "top1"]
    assert len(probe["feature_names"]) == a.observation_space.shape[0]
    import json

    from envs.interface import Interface

    json.dumps(cfg)
    again = Interface.from_config(json.loads(json.dumps(cfg["interface"])), a.slm)
    assert again.config() == cfg["interface"]


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_ten_thousand_random_steps_do_not_leak(cost_path):
    env = gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PerInput", cost_path, n_items=32))
    env.action_space.seed(0)
    env.reset(seed=0)
    t0 = time.perf_counter()

    def run(n: int) -> None:
        for _ in range(n):
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            assert np.isfinite(r)
            if term or trunc:
                env.reset()

    run(1000)  # warm-up: every item's dense reference, plan and weight-view caches filled
    gc.collect()
    start = _rss()
    run(9000)
    gc.collect()
    grown = (_rss() - start) / start
    assert grown <= 0.05, f"RSS grew {grown:.1%} over 9000 steps"
    assert time.perf_counter() - t0 < 1800


def test_probe_lens_log_likelihood():
    """The probe's log-likelihood equals the full LM head's on the probe state, and the subset lens is consistent."""
    from envs.observation import Probe

    slm = shared_lm(MODEL)
    ids = torch.tensor([[5, 17, 33, 40, 2, 60, 71]])
    full = Probe(slm, layers=1, proj_dim=0, ll_positions=3, lens_vocab=None).run(ids)
    with torch.no_grad():
        st = slm.start(ids)
        slm.run_layers(st, slm.dense_plan(), 0, 1)
        logp = torch.log_softmax(slm.lm_head(slm.final_norm(st.hidden))[0].float(), -1)
    nll = -logp[3:6].gather(-1, ids[0, 4:, None]).squeeze(-1) / np.log(slm.spec.vocab_size)
    assert full.features[3] == pytest.approx(float(nll.mean()), abs=1e-5)
    entropy = float(-(logp[-1].exp() * logp[-1]).sum()) / np.log(slm.spec.vocab_size)
    assert full.features[1] == pytest.approx(entropy, abs=1e-5)
    sub = Probe(slm, layers=1, proj_dim=0, ll_positions=3, lens_vocab=50).run(ids)  # tokens 60, 71 lie outside
    assert np.isfinite(sub.features).all() and sub.features[3] > 0
