"""Adaptive inference for users: a :class:`~agents.controller.Controller` chooses the plan :class:`SparseLM` runs.

:func:`adaptive_generate` is greedy generation as :meth:`envs.runtime.sparse_lm.SparseLM.generate`
does it, with the plan chosen by the controller the way its training environment chose it (the
card's ``interface``, rebuilt by :meth:`~agents.controller.Controller.interface`):

- ``per_input`` (``PruneGym/PerInput*``): the probe runs the prompt's first layers densely; the
  controller picks one plan from its features; the prompt is finished under that plan *from the
  probe's state* (the probe's layers are not run twice, as in the environment) and the
  continuation is generated under the same plan. The result equals ``slm.generate(input_ids,
  plan)`` with that plan.
- ``layer_by_layer`` (``PruneGym/LayerByLayer*``): the same probe; the controller then decides
  every layer group in turn, each decision seeing the ones before (as in an episode), and the
  assembled plan runs as for a per-input controller.
- ``per_token`` (``PruneGym/PerToken*``): the prompt runs densely; before each new token the
  controller sees the features of the forward that predicted it
  (:class:`envs.observation.TokenObserver`) and picks the plan for the next forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.controller import Controller

if TYPE_CHECKING:
    from envs.runtime.plan import SparsityPlan
    from envs.runtime.sparse_lm import SparseLM


@dataclass
class AdaptiveOutput:
    """What :func:`adaptive_generate` returns.

    Attributes:
        sequences: ``[1, P + n]`` token ids, prompt included.
        plans: The plans run: one for a per-input controller, one per generated token after the
            first for a per-token controller (the first token comes from the dense prefill).
        actions: The controller's actions: one for a per-input controller, one per layer group for a
            layer-by-layer controller, one per plan for a per-token controller.
        observations: What the controller saw, one per action.
        probe_seconds: Wall time of the probe (per-input controllers).
        decide_seconds: Wall time of the controller's decisions (all of them).
    """

    sequences: torch.Tensor
    plans: list[SparsityPlan] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)
    observations: list[np.ndarray] = field(default_factory=list)
    probe_seconds: float = 0.0
    decide_seconds: float = 0.0


@torch.no_grad()
def adaptive_generate(
    slm: SparseLM,
    controller: Controller,
    input_ids: torch.Tensor | list[int],
    *,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
) -> AdaptiveOutput:
    """Greedy generation under the plans ``controller`` chooses (see the module docstring).

    Args:
        slm: The model the controller was trained for (checked by weights hash).
        controller: A loaded controller.
        input_ids: One prompt, ``[P]`` or ``[1, P]``.
        max_new_tokens: Tokens to generate.
        eos_token_id: Stop at this token (default: the tokenizer's, if any).

    Raises:
        ControllerError: The controller is for another model.
        ValueError: More than one prompt, or an empty one.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(
            f"adaptive_generate takes one prompt, [P] or [1, P], got shape {tuple(ids.shape)}; loop over a batch"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = ids.to(slm.device)
    if eos_token_id is None and slm.tokenizer is not None:
        eos_token_id = getattr(slm.tokenizer, "eos_token_id", None)
    if controller.env_kind == "per_token":
        return _per_token(slm, controller, ids, max_new_tokens, eos_token_id)
    return _per_input(slm, controller, ids, max_new_tokens, eos_token_id)


def _decode(
    slm: SparseLM, plan: SparsityPlan, cache: Any, first: torch.Tensor, seq: torch.Tensor, n: int, eos: int | None
) -> torch.Tensor:
    """Greedy decoding under a fixed plan from a prefilled cache (the loop of ``SparseLM.generate``)."""
    logits = first
    for step in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if (eos is not None and bool((nxt == eos).all())) or step == n - 1:
            break
        logits = slm.forward(nxt, plan, cache=cache, logits="last").logits[:, -1]
    return seq


def _per_input(slm: SparseLM, ctl: Controller, ids: torch.Tensor, n: int, eos: int | None) -> AdaptiveOutput:
    from envs.runtime.sparse_lm import run_full, run_rest

    iface: Any = ctl.interface(slm)
    res = ctl.observe(slm, ids)
    t0 = time.perf_counter()
    if ctl.env_kind == "layer_by_layer":
        plan, observations, actions = iface.decide_all(ctl.select_action, res.features, res.prompt_len)
    else:
        actions, observations = [ctl.select_action(res.features)], [res.features]
        plan = iface.decide(actions[0], res.prompt_len)[0]
    decide = time.perf_counter() - t0
    pre = run_rest(slm, res, plan, iface.probe.layers) if iface.reuses_probe(plan) else run_full(slm, ids, plan)
    seq = _decode(slm, plan, pre.cache, pre.first, ids, n, eos)
    return AdaptiveOutput(seq, [plan], actions, observations, res.seconds, decide)


class TokenSession:
    """Per-token decisions of a per-token controller over one decoding sequence, as ``PerToken`` steps them.

    The prompt is prefilled densely. Then, for each token fed: :meth:`observe` gives the features of
    the forward that predicted it (step ``t``), :meth:`decide` the controller's plan for the forward
    that feeds it, and :meth:`feed` runs that forward, extending the KV cache.

    Args:
        slm: The model.
        controller: A per-token controller.
        input_ids: The prompt, ``[1, P]``.
    """

    def __init__(self, slm: SparseLM, controller: Controller, input_ids: torch.Tensor) -> None:
        self.slm, self.ctl = slm, controller
        self.interface: Any = controller.interface(slm)
        self.tokens = self.interface.observer()
        self.cache = slm.new_cache()
        out = slm.forward(input_ids, slm.dense_plan(), cache=self.cache, logits="last", observer=self.tokens.hook)
        self.logits = out.logits[0, -1]
        self.prompt_len, self.step, self.prev_flops = int(input_ids.shape[1]), 0, 1.0

    def observe(self, token: int) -> np.ndarray:
        """The observation before feeding ``token`` (what the last forward predicted, or the caller's choice)."""
        return self.tokens.features(self.logits, token, self.step, self.prev_flops)

    def decide(self, observation: np.ndarray) -> tuple[Any, SparsityPlan]:
        """The controller's action and plan for the next forward."""
        action = self.ctl.select_action(observation)
        return action, self.interface.decide(action, self.prompt_len + self.step)[0]

    def feed(self, token: int, plan: SparsityPlan) -> torch.Tensor:
        """Run ``token`` under ``plan``; returns the logits of the next token."""
        past = self.prompt_len + self.step
        nxt = torch.tensor([[token]], device=self.slm.device)
        out = self.slm.forward(nxt, plan, cache=self.cache, logits="last", observer=self.tokens.hook)
        self.logits = out.logits[0, -1]
        self.prev_flops = self.interface.actions.flops_fraction(plan, 1, past)
        self.step += 1
        return self.logits


def _per_token(slm: SparseLM, ctl: Controller, ids: torch.Tensor, n: int, eos: int | None) -> AdaptiveOutput:
    session = TokenSession(slm, ctl, ids)
    seq = ids
    result = AdaptiveOutput(seq)
    for step in range(n):
        token = int(session.logits.argmax())
        seq = torch.cat([seq, torch.tensor([[token]], device=seq.device)], dim=1)
        if (eos is not None and token == eos) or step == n - 1:
            break
        obs = session.observe(token)
        t0 = time.perf_counter()
        action, plan = session.decide(obs)
        result.decide_seconds += time.perf_counter() - t0
        result.plans.append(plan)
        result.actions.append(action)
        result.observations.append(obs)
        session.feed(token, plan)
    result.sequences = seq
    return result
