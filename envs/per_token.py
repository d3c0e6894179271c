"""``PruneGym/PerToken-v1``: choose the plan for each generated token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from envs.base import PruneEnv, plan_summary
from envs.interface import PerTokenInterface
from envs.observation import TOKEN_FEATURES
from envs.rewards import RewardConfig, reward, reward_range
from envs.runtime.plan import SparsityPlan

__all__ = ["TOKEN_FEATURES", "PerToken"]


class PerToken(PruneEnv):
    """Generation, one step per token: the agent sets the plan for the next forward of the decoder.

    At reset the environment draws an item, runs its prompt densely (the prefill is not part of the
    episode's cost: this environment is about decoding) and knows the dense model's greedy
    continuation of it (computed once per item, up to ``max_new_tokens`` tokens or EOS). Step ``t``
    feeds token ``x_t`` through the model under the action's plan, extending the KV cache (which
    :class:`~envs.runtime.sparse_lm.KVCache` keeps consistent across plans: a skipped layer caches nothing
    for that token, a dropped KV head is masked), and compares the pruned model's prediction of the
    next token with the dense continuation. With ``feed="dense"`` (default, teacher forcing) ``x_t``
    is the dense continuation's token, so every step is scored against the same context; with
    ``feed="own"`` it is the pruned model's own previous prediction (free-running generation).

    ## Action Space

    Continuous (``PruneGym/PerToken-v1``): ``Box(0, 1, (3 * num_groups,), float32)``, keep fractions
    ``[layers, heads, mlp]`` per contiguous layer group, as in :class:`~envs.per_input.PerInput` but
    over all layers. Out-of-range values and ``+-inf`` are clipped; NaN or a wrong shape raise ``ValueError``.

    Discrete (``PruneGym/PerTokenDiscrete-v1``): ``Discrete(len(presets))`` (default
    :data:`envs.action.PRESETS`, dense first); out of range raises ``ValueError``. Bad actions are
    refused or clipped as :mod:`envs.action` says.

    With ``budget``, the action wall scales the fractions so the token's decoder FLOPs are at most
    ``budget`` of dense.

    ## Observation Space

    ``Box(-10, 10, (8,), float32)`` (:data:`TOKEN_FEATURES`, computed by
    :class:`envs.observation.TokenObserver`): step ``t / max_new_tokens``; the entropy (over
    ``log(vocab)``), top-1 probability and top-1/top-2 margin of the distribution that predicted
    ``x_t`` (the previous forward's); the negative log-likelihood of ``x_t`` under it (over
    ``log(vocab)``); ``log1p`` of the RMS of the last running layer's output and of the mean norm of
    its attention heads' output at the previous forward; the previous plan's FLOPs fraction (1 after
    the dense prefill). Everything a deployed controller can compute from its own forwards.

    ## Rewards

    Per step, :func:`envs.rewards.reward` of the token's agreement with the dense continuation (0
    or 1) and the token's cost relative to a dense decoding step, divided by the number of steps the
    dense continuation allows, so the return is the mean per-token reward (for the linear form:
    mean agreement minus ``lam`` times mean cost). Calibrated costs predict a one-token forward;
    measured costs time it (the dense step at the same position is timed once per item).

    ## Episode End

    Terminates when the dense continuation is used up (``feed="dense"``: ``len - 1`` steps, at most
    ``max_new_tokens``), or, with ``feed="own"``, when the pruned model emits EOS or after
    ``max_new_tokens`` steps. Never truncates.

    ## Arguments

    Those of :class:`~envs.per_input.PerInput` that are not about the probe (``model``, ``task``,
    ``split``, ``n_items``, ``data_seed``, ``max_prompt_tokens``, ``num_groups``, ``discrete``,
    ``presets``, ``budget``, ``mlp_rules``, ``predictor``, ``exit_maps``, ``cost``, ``cost_model``, ``calibrate_cost``,
    ``force_calibration``, ``meter``, ``reward``, ``scorer``, ``dtype``, ``threads``, ``render_mode``), plus
    ``max_new_tokens`` (16) and ``feed`` (``"dense"`` or ``"own"``), and CALM's per-token exit:
    ``exit_threshold`` (``None``: off) and ``exit_every`` (4): after every ``exit_every`` layers of the
    token's plan the next-token distribution over the probe's lens vocabulary is read, and the token
    stops there once its top-1 minus top-2 probability reaches the threshold (the later layers cache
    nothing for it; the readouts are in the cost; ``info["exit_layer"]`` says where it stopped).

    ## Version History

    - v1: the observation no longer has ``prev_agree`` (whether the previous token agreed with the
      dense model), which no deployed controller can know; it is 8 features long.
    - v0: first version.
    """

    interface: PerTokenInterface

    def __init__(
        self,
        *,
        num_groups: int = 3,
        max_new_tokens: int = 16,
        feed: str = "dense",
        discrete: bool = False,
        presets: Sequence[Sequence[float]] | None = None,
        budget: float | None = None,
        mlp_rules: Sequence[str] = ("static",),
        exit_threshold: float | None = None,
        exit_every: int = 4,
        reward: RewardConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if feed not in ("dense", "own"):
            raise ValueError(f"feed must be 'dense' (teacher forcing) or 'own' (free running), got {feed!r}")
        super().__init__(reward=reward, **kwargs)
        self._set_spaces(
            PerTokenInterface.build(
                self.slm,
                num_groups=num_groups,
                max_new_tokens=max_new_tokens,
                discrete=discrete,
                presets=presets,
                budget=budget,
                mlp_rules=mlp_rules,
                exit_threshold=exit_threshold,
                exit_every=exit_every,
            )
        )
        self.max_new_tokens, self.feed = self.interface.horizon, feed
        self.reward_range = reward_range(self.reward_cfg)
        self._eos = getattr(self.scorer.tokenizer_of(self.slm), "eos_token_id", None)
        self._dense_plan = self.slm.dense_plan()
        self._done = True
        self._tokens = self.interface.observer()
        self.last_plan: SparsityPlan | None = None

    # ------------------------------------------------------------------ helpers
    def _forward(self, token: int, plan: Any, cache: Any) -> Any:
        """One decoding step; with a per-token exit rule, stops at the first sure readout (``self._exit``)."""
        ids = torch.tensor([[token]], device=self.slm.device)
        rule = self.interface.token_exit
        if rule is None:
            self._exit = (self.slm.spec.num_layers, 0)
            return self.slm.forward(ids, plan, cache=cache, logits="last", observer=self._tokens.hook)
        from envs.runtime.staged import exit_forward

        out, depth, reads = exit_forward(self.slm, ids, plan, cache, rule, observer=self._tokens.hook)
        self._exit = (depth, reads)
        return out

    def _ran(self, plan: SparsityPlan) -> SparsityPlan:
        """The plan the last step really ran: ``plan`` up to its exit layer."""
        from envs.runtime.staged import truncated

        return truncated(plan, self._exit[0])

    def _readout_cost(self, past: int) -> Any:
        """The last step's exit readouts, calibrated: their FLOPs at the dense step's latency per FLOP."""
        from dataclasses import replace

        dense = self._dense_step
        rule = self.interface.token_exit
        if rule is None or not self._exit[1]:
            return replace(dense, latency_s=0.0, energy_j=None if dense.energy_j is None else 0.0, raw={})
        share = self._exit[1] * rule.readout_flops(self.slm) / max(self._dense_plan.flops(1, past)["total"], 1.0)
        energy = None if dense.energy_j is None else dense.energy_j * share
        return replace(dense, latency_s=dense.latency_s * share, energy_j=energy, raw={"readout_share": share})

    def _dense_reference(self, prompt: list[int]) -> dict[str, Any]:
        """Dense greedy continuation (and, when measured, the dense step cost at each position)."""
        slm, dense = self.slm, self._dense_plan
        cache = slm.new_cache()
        with torch.no_grad():
            out = slm.forward(torch.tensor([prompt], device=slm.device), dense, cache=cache, logits="last")
            tokens = [int(out.logits[0, -1].argmax())]
            costs: list[Any] = []
            while len(tokens) < self.max_new_tokens + 1:
                if tokens[-1] == self._eos and len(tokens) >= 2:
                    break
                snap = cache.snapshot()
                box: list[Any] = []

                def run(tok: int = tokens[-1], snap: Any = snap, box: list[Any] = box) -> None:
                    cache.restore(snap)
                    box.append(slm.forward(torch.tensor([[tok]], device=slm.device), dense, cache=cache, logits="last"))

                if self.cost_kind == "measured":
                    costs.append(self.cost_source.cost(dense, run, 1))
                else:
                    run()
                tokens.append(int(box[-1].logits[0, -1].argmax()))
        return {"tokens": tokens, "costs": costs}

    # ------------------------------------------------------------------ episode
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw an item, run its prompt densely, and observe the first generated token."""
        super().reset(seed=seed)
        item = self._pick_item(options)
        prompt = self._prompt_ids(item)
        self._ref = self._dense_cached(f"token_ref:{self.max_new_tokens}", item, lambda: self._dense_reference(prompt))
        self._cache = self.slm.new_cache()
        self._tokens.reset()
        with torch.no_grad():
            out = self.slm.forward(
                torch.tensor([prompt], device=self.slm.device),
                self._dense_plan,
                cache=self._cache,
                logits="last",
                observer=self._tokens.hook,
            )
        self._item, self._P, self._t, self._done = item, len(prompt), 0, False
        self._n_steps = min(len(self._ref["tokens"]) - 1, self.max_new_tokens)
        self._token = self._ref["tokens"][0]
        self._dense_step = None if self.cost_kind == "measured" else self.cost_source.cost(self._dense_plan, None, 1)
        self._totals = {"agree": 0.0, "latency_s": 0.0, "dense_latency_s": 0.0, "flops": 0.0, "steps": 0}
        self._obs = self._tokens.features(out.logits[0, -1], self._token, 0, 1.0)
        self._last_render = f"item {item.id} ({item.task}, {len(prompt)} tokens): prefilled densely"
        return self._obs.copy(), {"item_id": item.id, "task": item.task, "prompt_tokens": len(prompt)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Feed the current token under the action's plan; reward its agreement and cost."""
        if self._done:
            raise RuntimeError("the episode is over: call reset() before step()")
        past = self._P + self._t
        plan, fr, clipped, walled = self.interface.decide(action, past)
        cache, snap, box = self._cache, self._cache.snapshot(), []

        def run() -> None:
            cache.restore(snap)
            with torch.no_grad():
                box.append(self._forward(self._token, plan, cache))

        if self.cost_kind == "measured":
            cost = self.cost_source.cost(plan, run, 1)
            costs = self._ref["costs"]
            dense = costs[min(self._t, len(costs) - 1)]  # free-running past the dense continuation: its last step
            plan = self._ran(plan)
        else:
            run()
            plan = self._ran(plan)
            cost = self.cost_source.cost(plan, None, 1) + self._readout_cost(past)
            dense = self._dense_step
        logits = box[-1].logits[0, -1]
        pred = int(logits.argmax())
        target = self._ref["tokens"][self._t + 1] if self._t + 1 < len(self._ref["tokens"]) else None
        agree = float(pred == target)
        lat_f, en_f = self._fractions_of(cost, dense)
        r = reward(agree, lat_f, en_f, self.reward_cfg) / self._n_steps
        flops_f = self.builder.flops_fraction(plan, 1, past)
        tot = self._totals
        tot["agree"] += agree
        tot["latency_s"] += cost.latency_s
        tot["dense_latency_s"] += dense.latency_s
        tot["flops"] += flops_f
        tot["steps"] += 1
        self._t += 1
        if self.feed == "dense":
            done = self._t >= self._n_steps
            self._token = target if target is not None else pred
        else:
            done = pred == self._eos or self._t >= self.max_new_tokens
            self._token = pred
        self._done = done
        self._obs = self._tokens.features(logits, self._token, self._t, flops_f)
        self.last_plan = plan
        n = tot["steps"]
        info = {
            "item_id": self._item.id,
            "task": self._item.task,
            "step": self._t - 1,
            "token": pred,
            "dense_token": -1 if target is None else int(target),
            "accuracy": agree,
            "flops_fraction": flops_f,
            **self._cost_info(cost, dense, lat_f, en_f),
            "plan": plan_summary(plan),
            "exit_layer": self._exit[0],
            "exit_readouts": self._exit[1],
            "action_fractions": fr.reshape(-1).tolist(),
            "action_clipped": clipped,
            "wall_clipped": walled,
            "reward_form": self.reward_cfg.form,
            "episode_accuracy": tot["agree"] / n,
            "episode_latency_fraction": tot["latency_s"] / max(tot["dense_latency_s"], 1e-12),
            "episode_flops_fraction": tot["flops"] / n,
        }
        self._last_render = (
            f"item {self._item.id} token {self._t - 1}: plan {plan.describe()}\n"
            f"flops {flops_f:.0%}, latency {lat_f:.0%} of dense ({cost.source}), "
            f"{'agrees' if agree else 'differs'} (pred {pred}, dense {info['dense_token']}), reward {r:+.4f}"
        )
        return self._obs.copy(), float(r), bool(done), False, info
