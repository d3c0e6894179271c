"""The staged environment: stages never recompute, the readout is the LM head's, a stop is a truncated plan."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the ids)
from envs.tasks.scoring import Scorer
from tests.conftest import tiny_kwargs


@pytest.fixture(scope="module", autouse=True)
def one_thread_here(one_thread):
    yield


def _env(cost_path, discrete=True, **over):
    eid = "PruneGym/StagedDiscrete-v0" if discrete else "PruneGym/Staged-v0"
    kw = tiny_kwargs("Staged", cost_path, task="generated", n_items=12) | over
    return gym.make(eid, **kw).unwrapped


def _items(env, kind):
    return [i for i, it in enumerate(env.items) if it.kind == kind]


@pytest.mark.parametrize("kind", ["mc", "exact"])
@pytest.mark.parametrize("stop_at", [0, 1, 2])
def test_stopping_equals_the_truncated_plan_bit_for_bit(cost_path, kind, stop_at):
    env = _env(cost_path)
    idx = _items(env, kind)
    assert idx, f"the tiny mix has no {kind} item"
    presets = len(env.presets)
    for i in idx[:3]:
        env.reset(options={"item": i})
        done, t, info = False, 0, {}
        while not done:
            a = 0 if t == stop_at else 1 + (t % presets)  # varied presets before the stop
            _, _, done, _, info = env.step(a)
            t += 1
        plan = env.last_plan
        assert info["stopped"] == (stop_at < env.num_groups)
        ref = Scorer().score(env.slm, env.items[i], plan, env._dense_ref)
        assert info["accuracy_raw"] == ref.raw and info["accuracy_dense_relative"] == ref.dense_relative
        layers = env.interface.stop_layer(min(stop_at, env.num_groups) - 1) if stop_at else env.probe.layers
        assert all(not lp.run for lp in plan.layers[layers:]), "every later layer is skipped"
        if kind == "mc":
            own = Scorer()
            own_ll = own._mc(env.slm, env.items[i], plan)["loglik"]
            env.reset(options={"item": i})
            for s in range(stop_at):
                env.step(1 + (s % presets))
            env.scorer.prefill = env._run.prefill(env.interface.plan_until(env._fr, stop_at))
            try:
                staged_ll = env.scorer._mc(env.slm, env.items[i], env.scorer.prefill.plan)["loglik"]
            finally:
                env.scorer.prefill = None
            assert staged_ll == own_ll, "the choices' log-likelihoods are the truncated plan's, bit for bit"


@torch.no_grad()
def test_readout_equals_the_lm_head_on_the_hidden_state(cost_path):
    env = _env(cost_path)
    slm = env.slm
    for kind in ("mc", "exact"):
        i = _items(env, kind)[0]
        env.reset(options={"item": i})
        _, _, done, _, _ = env.step(2)  # a pruned group, then read
        assert not done
        plan = env.interface.plan_until(env._fr, 1)
        rd = env._readouts[-1]
        item = env.items[i]
        prompt = env.scorer.encode(slm, item.prompt)
        if kind == "mc":
            conts = [env.scorer.encode(slm, " " + c) for c in item.choices]
            vocab = sorted({t for c in conts for t in c})
            where = {t: j for j, t in enumerate(vocab)}
            want = []
            for c in conts:
                ids = torch.tensor([prompt + c[:-1]])
                h = slm.forward(ids, plan, logits="none").hidden[0, len(prompt) - 1 :]  # normed
                lp = torch.log_softmax(slm.lm_head(h)[:, vocab].float(), -1)
                want.append(float(sum(lp[j, where[t]] for j, t in enumerate(c))))
            assert torch.allclose(rd.scores.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)
            assert rd.pick == int(np.argmax(want)) and rd.choice
        else:
            h = slm.forward(torch.tensor([prompt]), plan, logits="none").hidden[0, -1]
            lg = slm.lm_head(h)[: env.probe.lens_vocab].float()
            assert rd.pick == int(lg.argmax()) and not rd.choice
            p = torch.softmax(lg, -1)
            assert rd.top == pytest.approx(float(p.max()), abs=1e-5)


def test_each_layer_runs_once_and_stages_continue(cost_path):
    env = _env(cost_path)
    env.reset(options={"item": _items(env, "mc")[0]})
    done = False
    while not done:
        _, _, done, _, info = env.step(1)  # the dense preset for every group
    k = env.probe.layers
    assert info["layer_runs"][k:] == [1] * (env.slm.spec.num_layers - k)
    assert info["layer_runs"][:k] == [0] * k, "the probe's layers are reused, not run again"
    assert not info["stopped"] and info["accuracy_dense_relative"] == 1.0
    assert info["readouts"] == env.num_groups  # after the probe and after every group but the last


def test_readouts_are_paid_for(cost_path):
    env = _env(cost_path)
    env.reset(options={"item": _items(env, "mc")[0]})
    _, _, _, _, stopped = env.step(0)
    assert stopped["readout_flops"] > 0
    plan_only = env.cost_source.cost(env.last_plan, None, stopped["prompt_tokens"]).latency_s
    assert stopped["latency_s"] > plan_only
    assert stopped["latency_fraction"] < 1.0


def test_continuous_stop_and_bad_actions(cost_path):
    env = _env(cost_path, discrete=False)
    env.reset(seed=0)
    n = env.action_space.shape[0]
    assert n == 4
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([np.nan, 1, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.ones(n + 1))
    _, r, term, _, info = env.step(np.array([0.2, 1.5, -1.0, 0.5]))
    assert not term and r == 0.0 and info["action_clipped"]
    _, r, term, _, info = env.step(np.array([0.9, 1.0, 1.0, 1.0]))
    assert term and info["stopped"] and info["groups_run"] == 1
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(n))
    denv = _env(cost_path)
    denv.reset(seed=0)
    for bad in (denv.action_space.n, -1, 0.5, np.nan):
        with pytest.raises(ValueError, match="discrete action"):
            denv.step(bad)


def test_probe_prunable_is_refused(cost_path):
    with pytest.raises(ValueError, match="probe_prunable"):
        _env(cost_path, probe_prunable=True)


def test_measured_mode_times_every_stage(cost_path):
    env = _env(cost_path, cost="measured")
    env.reset(options={"item": _items(env, "mc")[0]})
    env.step(1)
    graphs: list[bool] = []
    score = env._score_plan

    def spy(plan, prefill, cost, reused):
        graphs.append(prefill.first.requires_grad)
        return score(plan, prefill, cost, reused)

    env._score_plan = spy
    _, _, _, _, info = env.step(0)
    assert graphs == [False], "the timed LM head at the stop builds no autograd graph, as no other timed run does"
    assert info["cost_source"] == "measured" and info["latency_s"] > 0
    assert info["latency_s"] > info["probe_latency_s"]


# ---------------------------------------------------------------------------------------- the cascade ladder
def test_ladder_escalation_reuses_exactly_the_layers_before_the_first_difference(cost_path):
    env = _env(cost_path, ladder=[[0.5, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert env.action_space.n == 2
    iface, L = env.interface, env.slm.spec.num_layers
    cheap = iface.rung_plan(iface.ladder[0])
    k = env.probe.layers
    first_diff = next(i for i in range(k, L) if not cheap.layers[i].run)
    i = _items(env, "mc")[0]
    env.reset(options={"item": i})
    _, r, done, _, info = env.step(1)  # run the cheap rung
    assert not done and r == 0.0
    _, _, done, _, info = env.step(1)  # escalate to dense: the last rung ends the episode
    assert done and not info["stopped"] and info["rungs_run"] == 2
    want = [0] * k + [1] * (first_diff - k) + [int(cheap.layers[j].run) + 1 for j in range(first_diff, L)]
    assert info["layer_runs"] == want
    ref = Scorer().score(env.slm, env.items[i], env.slm.dense_plan(), env._dense_ref)
    assert info["accuracy_dense_relative"] == ref.dense_relative == 1.0
    own = Scorer()._mc(env.slm, env.items[i], env.slm.dense_plan())["loglik"]
    env.reset(options={"item": i})
    env.step(1)
    env.step(1)
    assert env.last_plan.layers == env.slm.dense_plan().layers
    env.reset(options={"item": i})
    env.step(1)
    _, _, done, _, cheap_info = env.step(0)  # accept the cheap rung's answer
    assert done and cheap_info["stopped"] and cheap_info["rungs_run"] == 1
    assert cheap_info["accuracy_raw"] == Scorer().score(env.slm, env.items[i], cheap, env._dense_ref).raw
    assert cheap_info["latency_s"] < info["latency_s"], "escalation pays for what it recomputes"
    assert own == Scorer()._mc(env.slm, env.items[i], env.slm.dense_plan())["loglik"]


def test_ladder_with_heads_recomputes_from_the_first_group(cost_path):
    env = _env(cost_path, ladder=[[1.0, 0.5, 1.0], [1.0, 1.0, 1.0]], discrete=False)
    assert env.action_space.shape == (1,)
    env.reset(options={"item": _items(env, "mc")[0]})
    env.step(np.array([0.0]))
    _, _, done, _, info = env.step(np.array([0.2]))
    k = env.probe.layers
    assert done and info["layer_runs"][k:] == [2] * (env.slm.spec.num_layers - k)


def test_ladder_is_validated_and_passes_check_env(cost_path):
    from gymnasium.utils.env_checker import check_env

    with pytest.raises(ValueError, match="grow in FLOPs"):
        _env(cost_path, ladder=[[1.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    with pytest.raises(ValueError, match="rung"):
        _env(cost_path, ladder=[[1.0, 1.0]])
    for discrete in (True, False):
        check_env(_env(cost_path, discrete=discrete, ladder=[[0.5, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    cfg = _env(cost_path, ladder=[[0.5, 1.0, 0.5], [1.0, 1.0, 1.0]]).config()["interface"]
    from envs.interface import Interface

    assert Interface.from_config(cfg, _env(cost_path).slm).ladder == ((0.5, 1.0, 0.5), (1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------- per-token exits
def test_token_exit_equals_the_truncated_plan_and_leaves_later_caches_alone(tiny_llama):
    from envs.runtime.staged import TokenExit, exit_forward, truncated

    slm = tiny_llama
    L = slm.spec.num_layers
    prompt = torch.arange(1, 9)[None]
    plan = slm.dense_plan()
    for threshold, depth in ((0.0, 2), (1.01, L)):
        cache = slm.new_cache()
        slm.forward(prompt, plan, cache=cache)
        ref_cache = slm.new_cache()
        slm.forward(prompt, plan, cache=ref_cache)
        out, got, reads = exit_forward(slm, torch.tensor([[5]]), plan, cache, TokenExit((2,), threshold, 64))
        ref = slm.forward(torch.tensor([[5]]), truncated(plan, depth), cache=ref_cache, logits="last")
        assert got == depth and reads == 1
        assert torch.equal(out.logits, ref.logits), "an exit is the plan that skips every later layer, bit for bit"
        assert [cache.layer_tokens(i) for i in range(L)] == [9] * depth + [8] * (L - depth)
        assert cache.length == 9


def test_per_token_env_with_exits(cost_path):
    from gymnasium.utils.env_checker import check_env

    from envs.interface import Interface

    kw = tiny_kwargs("PerToken", cost_path, n_items=4)
    plain = gym.make("PruneGym/PerTokenDiscrete-v1", **kw).unwrapped
    early = gym.make("PruneGym/PerTokenDiscrete-v1", **kw, exit_threshold=0.0, exit_every=2).unwrapped
    check_env(early)
    plain.reset(options={"item": 0})
    early.reset(options={"item": 0})
    _, _, _, _, a = plain.step(0)
    _, _, _, _, b = early.step(0)
    assert a["exit_layer"] == plain.slm.spec.num_layers and b["exit_layer"] == 2 and b["exit_readouts"] == 1
    assert b["latency_s"] < a["latency_s"] and b["flops_fraction"] < a["flops_fraction"]
    cfg = early.config()["interface"]
    assert cfg["action"]["token_exit"]["threshold"] == 0.0
    assert Interface.from_config(cfg, early.slm).token_exit == early.interface.token_exit
    with pytest.raises(ValueError, match="exit_threshold"):
        gym.make("PruneGym/PerTokenDiscrete-v1", **kw, exit_threshold=2.0)
