"""What is trained is what is deployed: an exported controller sees and decides exactly as its environment.

For every environment kind and both action kinds, a policy is exported from the environment's own
description (``env.config()``), loaded back as a standalone :class:`~agents.controller.Controller`,
and driven beside the environment on 64 inputs: the controller's own observation of each input
(computed by the deployment path: ``Controller.observe`` / ``agents.adaptive.TokenSession``) must
equal the environment's bit for bit, and so must the plan it chooses. The tiny model runs in the
fast set, the embedded SmolLM2-135M in the slow one.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents.controller import Controller
from tests.conftest import synthetic_cost_model, tiny_kwargs

N_INPUTS = 64


class RandomPolicy(torch.nn.Module):
    """A seeded linear policy: keep fractions through a sigmoid (some outside [0, 1], to be clipped) or an arg-max."""

    def __init__(self, obs_dim: int, kind: str, size: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.weight = torch.nn.Parameter(torch.randn(size, obs_dim, generator=g) * 0.5)
        self.bias = torch.nn.Parameter(torch.randn(size, generator=g))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        z = obs @ self.weight.t() + self.bias
        if self.kind == "discrete":
            return torch.argmax(z, dim=-1)
        return torch.sigmoid(z) * 1.2 - 0.1


def export_random(env, tmp_path) -> Controller:
    from agents.export import export_policy

    cfg = env.config()
    iface = cfg["interface"]
    act = iface["action"]
    size = int(act["n"]) if act["kind"] == "discrete" else int(np.prod(act["shape"]))
    policy = RandomPolicy(int(np.prod(iface["observation"]["shape"])), act["kind"], size)
    out = export_policy(
        policy,
        tmp_path / "ctl",
        algo="random",
        env_config=cfg,
        slm=env.slm,
        tensors=dict(policy.state_dict()),
        policy_card={"type": "seeded linear test policy"},
        action_kind=act["kind"],
        action_size=size,
    )
    return Controller.from_pretrained(out, env.slm)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check_parity(env, ctl: Controller, n: int) -> dict[str, int]:
    """Drive ``ctl`` beside ``env`` on ``n`` inputs; returns counts of what was compared."""
    from agents.adaptive import TokenSession

    slm, kind = env.slm, ctl.env_kind
    counts = {"inputs": 0, "observations": 0, "plans": 0, "pruned_plans": 0}
    for i in range(n):
        obs, _ = env.reset(options={"item": i})
        ids = env.scorer.encode(slm, env.items[i].prompt)
        if kind == "per_token":
            session = TokenSession(slm, ctl, torch.tensor([ids]))
            token, done = int(session.logits.argmax()), False
            while not done:
                mine = session.observe(token)
                assert same(mine, obs), f"input {i}, step {session.step}: {mine} != {obs}"
                action, plan = session.decide(mine)
                obs, _, done, _, info = env.step(action)
                assert plan == env.last_plan, f"input {i}, step {session.step}"
                session.feed(token, plan)
                token = info["dense_token"]  # the environment feeds the dense continuation (feed="dense")
                counts["observations"] += 1
                counts["plans"] += 1
                counts["pruned_plans"] += not plan.is_dense
        else:
            res = ctl.observe(slm, ids)
            plan = ctl.select_plan(res.features, slm, prompt_len=len(ids))
            if kind == "layer_by_layer":
                again, observations, actions = ctl.interface(slm).decide_all(ctl.select_action, res.features, len(ids))
                assert again == plan
                for t, (mine, action) in enumerate(zip(observations, actions, strict=True)):
                    assert same(mine, obs), f"input {i}, group {t}"
                    obs, *_ = env.step(action)
                    counts["observations"] += 1
            else:
                assert same(res.features, obs), f"input {i}: {res.features} != {obs}"
                env.step(ctl.select_action(obs))
                counts["observations"] += 1
            assert plan == env.last_plan, f"input {i}: {plan.describe()} != {env.last_plan.describe()}"
            counts["plans"] += 1
            counts["pruned_plans"] += not plan.is_dense
        counts["inputs"] += 1
    return counts


KINDS = [(name, discrete) for name in ("PerInput", "LayerByLayer", "PerToken") for discrete in (False, True)]


@pytest.mark.parametrize(("name", "discrete"), KINDS, ids=[f"{n}{'Discrete' if d else ''}" for n, d in KINDS])
def test_exported_controller_sees_and_decides_as_its_environment(name, discrete, cost_path, tmp_path):
    env_id = envs.env_id(name, discrete=discrete)
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path, n_items=N_INPUTS)).unwrapped
    assert len(env.items) >= N_INPUTS
    ctl = export_random(env, tmp_path)
    counts = check_parity(env, ctl, N_INPUTS)
    assert counts["inputs"] == N_INPUTS and counts["pruned_plans"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "discrete"), KINDS, ids=[f"{n}{'Discrete' if d else ''}" for n, d in KINDS])
def test_parity_on_the_embedded_model(name, discrete, smollm, tmp_path_factory, tmp_path):
    from envs.base import shared_lm

    slm = shared_lm("smollm2-135m")
    path = tmp_path_factory.mktemp("cost") / "smollm.json"
    synthetic_cost_model(slm).save(path)
    env_id = envs.env_id(name, discrete=discrete)
    kw = {"model": "smollm2-135m", "task": "mc", "n_items": N_INPUTS, "cost_model": str(path)}
    if name == "PerToken":  # decoding: short prompts of the generated mix, 4 tokens each
        kw.update(task="generated", max_new_tokens=4)
    env = gym.make(env_id, **kw).unwrapped
    ctl = export_random(env, tmp_path)
    counts = check_parity(env, ctl, N_INPUTS)
    assert counts["inputs"] == N_INPUTS and counts["pruned_plans"] > 0


def test_a_card_from_an_older_description_is_refused(cost_path, tmp_path):
    """The controller rebuilds only what the card describes; a description that does not rebuild is refused."""
    import json

    from agents.controller import ControllerError, card_digest

    env_id = envs.env_id("PerInput")
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path)).unwrapped
    ctl = export_random(env, tmp_path)
    card = json.loads((ctl.folder / "card.json").read_text())
    card["interface"]["observation"]["probe"]["feature_names"][3] = "nll_median"  # a feature this probe never computes
    card["card_sha256"] = card_digest(card)  # hashed again: only the description itself is wrong
    (ctl.folder / "card.json").write_text(json.dumps(card))
    again = Controller.from_pretrained(ctl.folder)
    with pytest.raises(ControllerError, match="does not rebuild"):
        again.interface(env.slm)


@pytest.mark.parametrize("name", ["PerInput", "LayerByLayer"])
def test_adaptive_generate_runs_the_plan_its_environment_would(name, cost_path, tmp_path):
    from agents.adaptive import adaptive_generate

    env_id = envs.env_id(name)
    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path)).unwrapped
    ctl = export_random(env, tmp_path)
    for i in range(4):
        obs, _ = env.reset(options={"item": i})
        ids = torch.tensor([env.scorer.encode(env.slm, env.items[i].prompt)])
        out = adaptive_generate(env.slm, ctl, ids, max_new_tokens=4)
        assert same(out.observations[0], obs)
        done = False
        for action in out.actions:  # the controller's actions, stepped through the environment
            assert not done
            _, _, done, _, _ = env.step(action)
        assert done and out.plans == [env.last_plan]
        torch.testing.assert_close(out.sequences, env.slm.generate(ids, out.plans[0], max_new_tokens=4))


def test_evaluation_decides_with_the_controllers_own_interface(cost_path, tmp_path):
    from agents import evaluation as ev

    kw = tiny_kwargs("PerInput", cost_path)
    env = gym.make(envs.env_id("LayerByLayer"), **tiny_kwargs("LayerByLayer", cost_path)).unwrapped
    ctl = export_random(env, tmp_path)
    evaluation = ev.evaluation_env(
        model="tiny-llama",
        task="generated",
        split="val",
        n_items=6,
        cost="calibrated",
        env_kwargs={"cost_model": cost_path, **ev.probe_kwargs(ctl.card["interface"])},
    )
    run = ev.run_controller(evaluation, ev.ExportedController(ctl, evaluation), 3)
    for i in range(3):
        obs, _ = env.reset(options={"item": i})
        while True:
            obs, _, done, _, info = env.step(ctl.select_action(obs))
            if done:
                break
        assert run.flops[i] == pytest.approx(info["flops_fraction"])
    other = ev.evaluation_env(
        model="tiny-llama",
        task="generated",
        split="val",
        n_items=6,
        cost="calibrated",
        env_kwargs={"cost_model": cost_path, "probe_layers": 2, "probe_dim": kw["probe_dim"], "num_groups": 2},
    )
    with pytest.raises(ValueError, match="probe_kwargs"):
        ev.ExportedController(ctl, other)
