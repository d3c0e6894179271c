"""Adaptive inference for users: a :class:`~agents.controller.Controller` chooses the plan :class:`SparseLM` runs.

:func:`adaptive_generate` is greedy generation as :meth:`envs.runtime.sparse_lm.SparseLM.generate` does it,
with the plan chosen by the controller the way its training environment chose it (the card's
``env.kind``):

- ``per_input`` (``PruneGym/PerInput*``): the probe (:class:`envs.observation.Probe`, configured from the
  card) runs the prompt's first layers densely; the controller picks one plan from its features; the
  prompt is finished under that plan *from the probe's state* (the probe's layers are not run twice,
  as in the environment) and the continuation is generated under the same plan. The result equals
  ``slm.generate(input_ids, plan)`` with that plan.
- ``per_token`` (``PruneGym/PerToken*``): the prompt runs densely; before each new token the controller
  sees :data:`envs.per_token.TOKEN_FEATURES` of the previous forward and picks the plan for the next
  one. One feature cannot be known without the dense model, ``prev_agree`` (whether the previous
  token agreed with the dense model's); it is held at 1, its value after the dense prefill.

Controllers trained on ``LayerByLayer`` decide inside a forward, layer by layer; they are not
supported here (the message says so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.controller import Controller, ControllerError

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
        actions: The controller's actions, one per plan.
        observations: What the controller saw, one per plan.
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
        ControllerError: The controller is for another model, or for ``LayerByLayer``.
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
    kind = controller.env_kind
    if kind == "per_input":
        return _per_input(slm, controller, ids, max_new_tokens, eos_token_id)
    if kind == "per_token":
        return _per_token(slm, controller, ids, max_new_tokens, eos_token_id)
    raise ControllerError(
        f"adaptive_generate supports per-input and per-token controllers; this one was trained on {controller.env_id} "
        "(decisions inside a forward, layer by layer). Use controller.select_action with that environment instead"
    )


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
    from envs.base import run_full, run_rest

    probe = ctl.probe(slm)
    res = probe.run(ids)
    t0 = time.perf_counter()
    action = ctl.select_action(res.features)
    plan = ctl.plan_for_action(action, slm, seq_len=res.prompt_len)
    decide = time.perf_counter() - t0
    k = probe.layers
    dense_probe = all(plan.layers[i] == slm.dense_plan().layers[i] for i in range(k))
    pre = run_rest(slm, res, plan, k) if dense_probe else run_full(slm, ids, plan)
    seq = _decode(slm, plan, pre.cache, pre.first, ids, n, eos)
    return AdaptiveOutput(seq, [plan], [action], [res.features], res.seconds, decide)


def _per_token(slm: SparseLM, ctl: Controller, ids: torch.Tensor, n: int, eos: int | None) -> AdaptiveOutput:
    env = ctl.card["env"]
    horizon = int(env.get("max_new_tokens", 16))
    log_v = math.log(max(slm.spec.vocab_size, 2))
    signals: dict[str, torch.Tensor] = {}

    def observe(i: int, name: str, t: torch.Tensor) -> None:
        if name in ("attn_heads", "layer_out"):
            signals[name] = t  # the last layer's wins, as in the environment

    def features(logits: torch.Tensor, token: int, step: int, prev_flops: float) -> np.ndarray:
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        top = torch.topk(p, 2).values
        a, h = signals.get("attn_heads"), signals.get("layer_out")
        attn = float(a.float().norm(dim=-1).mean()) / math.sqrt(slm.spec.num_heads) if a is not None else 0.0
        hid = float(h[0, -1].float().pow(2).mean().sqrt()) if h is not None else 0.0
        feats = [
            step / horizon,
            float(-(p * logp).sum()) / log_v,
            float(top[0]),
            float(top[0] - top[1]),
            float(-logp[token]) / log_v,
            math.log1p(hid),
            math.log1p(attn),
            prev_flops,
            1.0,  # prev_agree: unknowable without the dense model; its value after the dense prefill
        ]
        clip = float(ctl.card["observation"].get("high", 10.0))
        out = np.nan_to_num(np.asarray(feats, dtype=np.float32), nan=0.0, posinf=clip, neginf=-clip)
        return np.clip(out, -clip, clip).astype(np.float32)

    builder = ctl._builder(slm)
    cache = slm.new_cache()
    out = slm.forward(ids, slm.dense_plan(), cache=cache, logits="last", observer=observe)
    logits = out.logits[0, -1]
    seq, P = ids, ids.shape[1]
    result = AdaptiveOutput(seq)
    prev_flops = 1.0
    for step in range(n):
        token = int(logits.argmax())
        seq = torch.cat([seq, torch.tensor([[token]], device=seq.device)], dim=1)
        if (eos is not None and token == eos) or step == n - 1:
            break
        obs = features(logits, token, step, prev_flops)
        t0 = time.perf_counter()
        action = ctl.select_action(obs)
        plan = ctl.plan_for_action(action, slm, seq_len=1, past_len=P + step)
        result.decide_seconds += time.perf_counter() - t0
        result.plans.append(plan)
        result.actions.append(action)
        result.observations.append(obs)
        nxt = torch.tensor([[token]], device=seq.device)
        logits = slm.forward(nxt, plan, cache=cache, logits="last", observer=observe).logits[0, -1]
        prev_flops = builder.flops_fraction(plan, 1, P + step)
    result.sequences = seq
    return result
