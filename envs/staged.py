"""``PruneGym/Staged-v0``: run the model one layer group at a time, read its answer after each, stop or go on."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from envs.interface import StagedInterface
from envs.observation import stage_features
from envs.per_input import PerInput
from envs.runtime.plan import LayerPlan, SparsityPlan
from envs.runtime.staged import Readout, StagedRun

__all__ = ["STOP_START", "Staged"]

STOP_START = 0.25  # a Gaussian policy's start on the stop entry (the env stops at >= 0.5): runs on, explores stopping


class Staged(PerInput):
    """One input per episode, up to one step per layer group in depth order, each decided after reading the model.

    At reset the input is probed as in :class:`~envs.per_input.PerInput`, and for a
    multiple-choice item the choices are brought to the probe's depth too. Step ``t`` either
    **stops** (the answer is the model's at the current depth: every later layer is skipped) or
    runs layer group ``t`` under the keep fractions it gives, continuing from the stored hidden
    state and KV cache (:class:`envs.runtime.staged.StagedRun`: nothing is computed twice). After
    each group the model's current answer is read through the final norm and the LM head, restricted
    to what the task scores (the logit lens; :mod:`envs.runtime.staged`), and the next observation
    reports it. The episode ends at a stop or after the last group; the item is then scored under
    the plan that ran, and the reward is paid.

    ## Action Space

    Continuous (``PruneGym/Staged-v0``): ``Box(0, 1, (4,), float32)``: ``[stop, layers, heads, mlp]``;
    ``stop >= 0.5`` stops, else the other three are the group's keep fractions as in
    :class:`~envs.layer_by_layer.LayerByLayer` (with several ``mlp_rules``, a fifth entry picks the
    rule). Out-of-range values and ``+-inf`` are clipped into [0, 1]; NaN or a wrong shape raise
    ``ValueError``.

    Discrete (``PruneGym/StagedDiscrete-v0``): ``Discrete(1 + len(presets))``: 0 stops, ``k >= 1``
    runs the group under preset ``k - 1`` (default :data:`envs.action.LAYER_PRESETS`, dense first);
    out of range raises ``ValueError``.

    With ``budget`` set, the action wall scales the group's fractions down as in ``LayerByLayer``.

    ## Observation Space

    ``Box(-10, 10, (17 + n_probe,), float32)``: :data:`envs.observation.LAYER_FEATURES` of the group
    to run next (step, importance, FLOPs share, FLOPs used so far, share after it, the previous
    group's fractions, the budget), :data:`envs.observation.STAGE_FEATURES` (layers run over all
    layers; the readout's margin between its two best answers, entropy and top probability; whether
    its pick changed since the previous readout; the cosine similarity of the last prompt position's
    hidden state before and after the last group; whether it is a choice readout; the budget left),
    then the probe's features (:class:`~envs.observation.Probe`).

    ## Rewards

    Zero for every step but the last; then :func:`envs.rewards.reward` of the item's accuracy and
    the cost relative to dense, as in ``PerInput``. The cost is the probe, every group that ran and
    every readout: measured, each stage is timed as it runs (the choices' own tokens are the
    scorer's, as in every environment, and are not timed; their readout rows are); calibrated, the
    cost model predicts the plan that ran and the readouts add their LM-head FLOPs at the dense
    model's latency per FLOP.

    ## Episode End

    Terminates at a stop or after ``num_groups`` steps (the ladder's rungs, with one). Never truncates.

    ## Arguments

    Those of :class:`~envs.per_input.PerInput`, except ``num_groups`` (default 7: 4 layers per group
    after the embedded model's 2-layer probe) and ``probe_prunable`` (always ``False``: stages
    continue from the probe). ``mlp_rules`` takes one rule only, as in ``LayerByLayer``.
    ``ladder``: a **cascade** (BiLD, LM cascades): whole-model ``[layers, heads, mlp]`` triples,
    cheapest first. Step ``t`` then runs rung ``t``'s whole plan; the action is only the stop
    (``Discrete(2)``: 0 accepts the current answer, 1 escalates; continuous ``Box(0, 1, (1,))``). An
    escalation reuses every layer before the first one whose plan differs from the rung that ran
    and recomputes the rest (their KV caches too), and pays for what it recomputes.

    ## Version History

    - v0: first version.
    """

    interface_class = StagedInterface
    interface: StagedInterface

    def __init__(
        self, *, num_groups: int | None = None, ladder: list[list[float]] | None = None, **kwargs: Any
    ) -> None:
        if kwargs.get("probe_prunable"):
            raise ValueError("Staged continues from the probe's state: probe_prunable must be False")
        super().__init__(num_groups=num_groups, **kwargs)
        self.interface.with_ladder(ladder)
        import gymnasium as gym

        if self.discrete:
            self.action_space = gym.spaces.Discrete(self.interface.action_size)
        else:
            self.action_space = gym.spaces.Box(0.0, 1.0, shape=(self.interface.action_size,), dtype=np.float32)
        self._run: StagedRun | None = None
        self.last_head_cost: Any = None  # measured: the LM head's cost at the last outcome
        self._t = 0
        self._fr = np.zeros((self.num_groups, 3))

    def policy_start(self, keep: float) -> np.ndarray:
        """A Gaussian policy starts with its keep fractions at ``keep`` and its stop entry at :data:`STOP_START`.

        Below the stop threshold, so that the first episodes mostly run on and the stop is explored
        (a start with every entry at ``keep = 1`` would stop every episode after the probe).
        """
        start = super().policy_start(keep)
        start[0] = STOP_START
        return start

    # ------------------------------------------------------------------ episode
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw an item, probe it, bring its choices to the probe's depth, read the answer there."""
        _, info = super().reset(seed=seed, options=options)
        item = self._item
        conts = None
        if item.kind == "mc":
            conts = [self.scorer.encode(self.slm, " " + c) for c in item.choices]
        self._run = StagedRun(
            self.slm, self._probe_res, conts, mc_norm=self.scorer.mc_norm, lens_vocab=self.probe.lens_vocab
        )
        self._t = 0
        self._fr = np.zeros((self.num_groups, 3))
        self._plan_now = self.interface.plan_until(self._fr, 0)  # what has run: the probe's layers
        self._parts: list[SparsityPlan] = []  # ladder: each rung's recomputed part
        self._flags = {"action_clipped": False, "wall_clipped": False}
        self._stage_costs: list[Any] = []
        self._readouts: list[Readout] = []
        self._saturation = 0.0
        self._read()
        self._stage_obs = self._observe()
        return self._stage_obs.copy(), {**info, "readout_pick": self._readouts[-1].pick}

    def _read(self) -> None:
        """Read the answer at the current depth (timed in measured mode)."""
        run = self._run
        assert run is not None
        P = self._probe_res.prompt_len
        if self.cost_kind == "measured":
            box: list[Readout] = []
            self._stage_costs.append(self.cost_source.cost(self.slm.dense_plan(), lambda: box.append(run.readout()), P))
            self._readouts.append(box[-1])
        else:
            self._readouts.append(run.readout())

    def _observe(self) -> np.ndarray:
        t, P = self._t, self._probe_res.prompt_len
        iface = self.interface
        if iface.ladder:  # the layer features of the next rung: its fractions, the FLOPs computed so far
            used = sum(iface.actions.flops_fraction(p, P) for p in self._computed())
            rung = iface.ladder[min(t, len(iface.ladder) - 1)]
            prev = iface.ladder[t - 1] if t > 0 else (1.0, 1.0, 1.0)
            budget = 1.0 if self.budget is None else float(self.budget)
            head = [t / len(iface.ladder), 1.0, iface.actions.flops_fraction(iface.rung_plan(rung), P), used, 0.0]
            layer = np.concatenate([np.asarray([*head, *prev, budget], np.float32), self._obs])  # type: ignore[list-item]
        else:
            layer = iface.step_observation(self._obs, t, self._fr, P)  # type: ignore[arg-type]
        used = float(layer[3])
        rd = self._readouts[-1]
        changed = len(self._readouts) > 1 and rd.pick != self._readouts[-2].pick
        budget = 1.0 if self.budget is None else float(self.budget)
        assert self._run is not None
        return stage_features(
            layer,
            rd,
            depth=self._run.depth / self.spec_.num_layers,
            changed=changed,
            saturation=self._saturation,
            budget_left=budget - used,
        )

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Stop and answer now, or run the next group (or ladder rung) and read the answer after it.

        A step that raises (a bad action, an interrupted forward) leaves the episode where it was.
        """
        if self._done or self._item is None or self._run is None:
            raise RuntimeError("the episode is over: call reset() before step()")
        stop, act = self.interface.split_action(action)
        t, P = self._t, self._probe_res.prompt_len
        if stop:
            return self._end(stopped=True)
        iface, run = self.interface, self._run
        L = self.spec_.num_layers
        clipped = walled = False
        fr = self._fr.copy()
        if iface.ladder:
            plan = iface.rung_plan(iface.ladder[t])
            now = self._plan_now.layers
            start = next((i for i in range(run.first_layer, L) if plan.layers[i] != now[i] or i >= run.depth), L)
            layer, what = L, f"rung {t} {list(iface.ladder[t])} (layers {start}.. recomputed)"
        else:
            fr_t, clipped, walled = iface.step_fractions(act, t, self._fr, P)
            fr[t] = fr_t
            plan = iface.plan_until(fr, t + 1)
            start, layer = run.depth, iface.stop_layer(t)
            what = f"group {t} ran at {np.round(fr_t, 3).tolist()}"
        snap = run.snapshot()
        before = run.last_hidden()

        def stage(conts: bool = True) -> None:
            run.restore(snap)
            run.rewind(start)
            run.advance(plan, layer, conts=conts)

        try:
            if self.cost_kind == "measured":
                cost = self.cost_source.cost(plan, lambda: stage(False), P)
                run.advance_conts()
            else:
                stage()
                cost = self._partial_cost(plan, start) if iface.ladder else None
        except BaseException:
            run.restore(snap)
            raise
        self._fr, self._plan_now = fr, plan
        if iface.ladder:
            self._parts.append(self._part(plan, start))
        self._flags["action_clipped"] |= clipped
        self._flags["wall_clipped"] |= walled
        if cost is not None:
            self._stage_costs.append(cost)
        self._saturation = float(torch.nn.functional.cosine_similarity(before.float(), run.last_hidden().float(), 0))
        self._t = t + 1
        if self._t == iface.steps:
            return self._end(stopped=False)
        self._read()
        self._stage_obs = self._observe()
        info = {"step": t, "action_clipped": clipped, "wall_clipped": walled, "readout_pick": self._readouts[-1].pick}
        self._last_render = f"item {self._item.id}: {what}"
        return self._stage_obs.copy(), 0.0, False, False, info

    def _part(self, plan: SparsityPlan, start: int) -> SparsityPlan:
        """``plan`` with the layers before ``start`` off: what a rung recomputes (all of it on the first rung)."""
        assert self._run is not None
        if start <= self._run.first_layer:  # the first rung: the whole plan, probe layers included, as a plan costs
            return plan
        off = LayerPlan(False, (), (), 0)
        return SparsityPlan(
            self.spec_, tuple(lp if i >= start else off for i, lp in enumerate(plan.layers)), {"kind": "part"}
        )

    def _partial_cost(self, plan: SparsityPlan, start: int) -> Any:
        """Calibrated cost of a rung's recomputed part."""
        return self.cost_source.cost(self._part(plan, start), None, self._probe_res.prompt_len)

    def _computed(self) -> list[SparsityPlan]:
        """The plans whose layers ran so far (ladder: each rung's recomputed part; else the plan so far)."""
        return list(self._parts) if self.interface.ladder else [self._plan_now]

    # ------------------------------------------------------------------ the end
    def _end(self, *, stopped: bool) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Score the item under the plan that ran; pay the reward; end the episode."""
        r, info = self.outcome(stopped=stopped)
        self._done = True
        self.last_plan = self._plan_now
        return self._stage_obs.copy(), r, True, False, info

    def checkpoint(self) -> dict[str, Any]:
        """Everything the open episode has done so far, for :meth:`return_to` (exit tables)."""
        if self._done or self._run is None:
            raise RuntimeError("no episode is open: call reset() first")
        return {
            "run": self._run.snapshot(),
            "t": self._t,
            "fr": self._fr.copy(),
            "plan": self._plan_now,
            "parts": list(self._parts),
            "costs": list(self._stage_costs),
            "readouts": list(self._readouts),
            "saturation": self._saturation,
            "obs": self._stage_obs.copy(),
            "flags": dict(self._flags),
        }

    def return_to(self, cp: dict[str, Any]) -> None:
        """Reopen the episode where :meth:`checkpoint` left it (the same input, the same stages run)."""
        assert self._run is not None
        self._run.restore(cp["run"])
        self._t, self._fr, self._plan_now = cp["t"], cp["fr"].copy(), cp["plan"]
        self._parts, self._stage_costs, self._readouts = list(cp["parts"]), list(cp["costs"]), list(cp["readouts"])
        self._saturation, self._stage_obs, self._flags = cp["saturation"], cp["obs"].copy(), dict(cp["flags"])
        self._done = False

    def outcome(self, *, stopped: bool = True, head_cost: Any = None) -> tuple[float, dict[str, Any]]:
        """The reward and info a stop *now* would give, without ending the episode.

        For exit tables (:func:`agents.staged.exit_table`). In measured mode the LM head at the last
        prompt position is timed here, as at a real stop, unless ``head_cost`` gives its cost (the
        same work at every depth); :attr:`last_head_cost` keeps what was used.
        """
        if self._done or self._item is None or self._run is None:
            raise RuntimeError("no episode is open: call reset() first")
        t = self._t
        run = self._run
        assert run is not None
        P = self._probe_res.prompt_len
        plan = self._plan_now
        box: list[torch.Tensor] = []

        def head() -> None:
            with torch.no_grad():  # as every other timed run: no autograd graph in the measured time
                box.append(self.slm.finish(run.state, "last").logits)

        if self.cost_kind == "measured":
            if head_cost is None:
                head_cost = self.cost_source.cost(plan, head, P)
            self.last_head_cost = head_cost
            cost = self._probe_cost
            for c in [*self._stage_costs, head_cost]:
                cost = cost + c
        elif self.interface.ladder:
            cost = self.cost_source.cost(self.interface.probe_plan, None, P) if not self._stage_costs else None
            for c in self._stage_costs:
                cost = c if cost is None else cost + c
            cost = cost + self._readout_cost()
        else:
            cost = self.cost_source.cost(plan, None, P) + self._readout_cost()
        r, info = self._score_plan(plan, run.prefill(plan, box[-1] if box else None), cost, True)
        acc, lat_f = info["accuracy"], info["latency_fraction"]
        info |= {
            "action_fractions": self._fr[:t].reshape(-1).tolist(),
            **self._flags,
            "stopped": stopped,
            "groups_run": 0 if self.interface.ladder else t,
            "rungs_run": t if self.interface.ladder else 0,
            "exit_layer": run.depth,
            "readouts": len(self._readouts),
            "readout_flops": float(sum(x.flops for x in self._readouts)),
            "readout_pick": self._readouts[-1].pick,
            "layer_runs": list(run.layer_runs),
        }
        self._last_render = (
            f"item {self._item.id} ({self._item.task}, {P} tokens): {'stopped' if stopped else 'ran'} after "
            f"{t} of {self.interface.steps} steps (layer {run.depth})\nplan: {plan.describe()}\n"
            f"latency {lat_f:.0%} of dense ({cost.source}), accuracy {acc:.2f}, reward {r:+.3f}"
        )
        return float(r), info

    def _readout_cost(self) -> Any:
        """The readouts' calibrated cost: their FLOPs at the dense prompt's predicted latency per FLOP."""
        P = self._probe_res.prompt_len
        dense = self._dense_cost
        share = sum(x.flops for x in self._readouts) / max(self.slm.dense_plan().flops(P)["total"], 1.0)
        energy = None if dense.energy_j is None else dense.energy_j * share
        return replace(dense, latency_s=dense.latency_s * share, energy_j=energy, raw={"readout_share": share})

    def step_plan(self, plan: SparsityPlan, *, keep_open: bool = False) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Not available: a staged episode's plan is made by its steps."""
        raise NotImplementedError("Staged episodes are stepped group by group; use PerInput for explicit plans")

    def retime(self, plan: SparsityPlan) -> float:
        """Not available: a staged episode's plan is made by its steps."""
        raise NotImplementedError("Staged episodes are stepped group by group; use PerInput to time explicit plans")
