"""``PruneGym/PerInput-v0``: choose the plan for one input from a probe of its first layers (a contextual bandit)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from envs.base import PruneEnv, finite, plan_summary
from envs.interface import PerInputInterface
from envs.observation import Probe
from envs.rewards import RewardConfig, reward, reward_range
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import run_full, run_rest

INTERFACE_ARGS = tuple(inspect.signature(PerInputInterface.build).parameters)[1:]  # after slm


class PerInput(PruneEnv):
    """One input per episode, one decision: how much of the model runs on it.

    At reset the environment draws an item of the task mix and runs the *probe* (the embedding and
    the first ``probe_layers`` decoder layers, densely) on its prompt; the observation describes the
    prompt from there. The action sets the plan for the rest of the model; the prompt is finished
    under that plan *from the probe's state* (the probe's layers are not run again), the item is
    scored, and the episode ends.

    ## Action Space

    Continuous (``PruneGym/PerInput-v0``): ``Box(0, 1, (3 * num_groups,), float32)``, keep
    fractions ``[layers_0, heads_0, mlp_0, layers_1, ...]`` for ``num_groups`` contiguous groups of
    the layers after the probe: the fraction of the group's layers that run (the least important,
    by the model's importance ordering, are skipped), and the fraction of query heads (whole KV
    groups first) and of MLP channels kept in each running layer. Fractions become counts by
    rounding. Values outside [0, 1] and ``+-inf`` are clipped into [0, 1]; NaN or a wrong shape raise
    ``ValueError``.

    Discrete (``PruneGym/PerInputDiscrete-v0``): ``Discrete(len(presets))``; preset ``k`` applies
    the triple ``presets[k]`` (default :data:`envs.base.PRESETS`, dense first) to every group. An
    integer outside the range raises ``ValueError``.

    With ``budget`` set, AMC's *action wall* scales the keep fractions down until the plan's decoder
    FLOPs (probe layers included) are at most ``budget`` of the dense model's (``info["wall_clipped"]``).

    ## Observation Space

    ``Box(-10, 10, (n,), float32)``: the probe features of :mod:`envs.observation` (prompt length,
    next-token entropy and top-1 probability and the log-likelihood of the prompt's last tokens under
    the LM head applied to the probe's hidden state, hidden-state and attention norms, block influence
    of each probe layer, and a fixed seeded projection of the mean-pooled hidden state to
    ``probe_dim`` dimensions), ``n = 6 + 2 * probe_layers + probe_dim``. Fixed transforms, no fitted
    statistics; :meth:`config` records what a controller needs to compute the same features.

    ## Rewards

    :func:`envs.rewards.reward` of the item's accuracy (``reward["accuracy"]``: agreement with the
    dense model by default, or the raw task score) and the cost relative to the dense model on the
    same prompt: latency (and energy, if weighted) of probe + rest over dense. With
    ``cost="calibrated"`` the latency is predicted by the device's :class:`~envs.measure.cost_model.CostModel`
    for the whole plan (the probe layers run densely inside it; a probe that has to be re-run adds its
    own prediction; the probe's few LM-head rows for its features are not in the calibrated figure,
    ``experiments.bench.envs`` measures them); with ``cost="measured"`` the probe and the rest are timed by a
    :class:`~envs.measure.meters.Meter` on this machine and the dense prompt is timed once per item.

    ## Episode End

    Terminates after the single step. Never truncates.

    ## Arguments

    - ``model``: model name (``"smollm2-135m"``, ``"tiny-llama"``, a folder ...); one copy per process.
    - ``task``: a mix name (``"generated"``, ``"mc"``, ...), a task name, a YAML file or a ``{task: weight}`` map.
    - ``split``, ``n_items``, ``data_seed``: which items (default 64 validation items).
    - ``max_prompt_tokens``: items with longer prompts are left out.
    - ``num_groups``: layer groups of the action (default 3).
    - ``probe_layers`` (2), ``probe_dim`` (32), ``probe_seed`` (0), ``ll_positions`` (8), ``lens_vocab`` (2048):
      the probe (see :mod:`envs.observation`).
    - ``probe_prunable``: if ``True`` the action covers the probe layers too; when it prunes them
      the prompt is re-run from the start (the probe's cost is paid twice). Default ``False``: the
      probe layers always run densely and are reused.
    - ``discrete``, ``presets``: the discrete variant.
    - ``budget``: action-wall budget (FLOPs fraction) or ``None``.
    - ``mlp_rules``: which MLP channels run (:data:`envs.runtime.plan.MLP_RULES`; default ``["static"]``).
      One rule: every plan uses it. Several: the agent also picks the rule per group
      (:class:`envs.action.ActionMap`: a discrete action names a (preset, rule) pair, a continuous one has
      ``[layers, heads, mlp, rule]`` per group).
    - ``predictor``: a channel predictor's name or folder (``python -m experiments.predictor``), needed
      by the ``predicted`` rule.
    - ``exit_maps``: exit maps' name or folder (``python -m experiments.exit_maps``): a plan whose last
      layer does not run answers through the map of its last layer that ran
      (:mod:`envs.runtime.exit_maps`; the dense path is unchanged). ``None`` (default): the plain
      final norm. Environments on one model share its exit maps: the last one made sets them.
    - ``cost``: ``"calibrated"`` (deterministic) or ``"measured"`` (wall clock; registered nondeterministic).
    - ``cost_model``: a calibration file or :class:`~envs.measure.cost_model.CostModel` (default: the device's
      file at :func:`envs.measure.cost_model.default_path`); ``calibrate_cost=True`` fits a quick one there if
      none exists, else a missing file raises ``FileNotFoundError`` naming
      ``python -m experiments.calibrate_cost``. ``force_calibration`` accepts a file from elsewhere.
    - ``meter``: :class:`~envs.measure.meters.Meter` settings in measured mode (default one timed run, no
      warm-up, energy off: the timed run *is* the run that is scored).
    - ``reward``: :class:`~envs.rewards.RewardConfig` fields (form, lam, weights, budget, penalty, accuracy).
    - ``scorer``: :class:`~envs.tasks.scoring.Scorer` settings.
    - ``dtype``, ``threads``, ``render_mode`` (``"ansi"`` or ``None``).

    ## Version History

    - v0: first version.
    """

    def __init__(self, *, reward: RewardConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        own = {k: kwargs.pop(k) for k in INTERFACE_ARGS if k in kwargs}  # the interface's; the rest is PruneEnv's
        super().__init__(reward=reward, **kwargs)
        self._set_spaces(self.interface_class.build(self.slm, **own))
        self.reward_range = reward_range(self.reward_cfg)
        self._item: Any = None
        self._probe_res: Any = None
        self._probe_cost: Any = None
        self._prompt_t: Any = None
        self._obs: np.ndarray | None = None
        self._done = True
        self.last_plan: SparsityPlan | None = None

    interface_class: type[PerInputInterface] = PerInputInterface

    @property
    def probe(self) -> Probe:
        """The observation probe (the interface's)."""
        return self.interface.probe

    @property
    def probe_features(self) -> np.ndarray:
        """The probe's features of the current input (a copy).

        Raises:
            RuntimeError: No input was drawn yet.
        """
        if self._probe_res is None:
            raise RuntimeError("call reset() first: no input has been probed")
        return self._probe_res.features.copy()

    def probe_features_of(self, item: int | str) -> np.ndarray:
        """The probe's features of ``item`` (index or id), as :attr:`probe_features` after its reset.

        Only the probe runs: no dense reference, nothing timed, the current episode left alone. For
        harnesses that need every input's probe before they run the episodes (the entropy heuristic's
        thresholds), so that the costlier work of a reset is done once, where it is needed.
        """
        import torch

        it = self._pick_item({"item": item})
        ids = torch.tensor([self._prompt_ids(it)], device=self.slm.device)
        return self.interface.observe(ids).features.copy()

    # ------------------------------------------------------------------ episode
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw an item, compute its dense reference (once per item), run the probe."""
        super().reset(seed=seed)
        item = self._pick_item(options)
        ids = self._prompt_ids(item)
        self._dense_ref = self._dense_cached("ref", item, lambda: self.scorer.dense_reference(self.slm, item))
        import torch

        t = torch.tensor([ids], device=self.slm.device)
        self._dense_cost = self._dense_prefill_cost(item, t)
        if self.cost_kind == "measured":
            self._probe_cost, self._probe_res = self._timed_probe(t)
        else:
            self._probe_res = self.interface.observe(t)
            self._probe_cost = None
        self._item, self._done, self._prompt_t = item, False, t
        self._obs = self._probe_res.features
        self._last_render = f"item {item.id} ({item.task}, {len(ids)} tokens): waiting for the plan"
        return self._obs.copy(), {"item_id": item.id, "task": item.task, "prompt_tokens": len(ids)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Run the rest of the prompt under the action's plan, score the item, return the reward."""
        if self._done or self._item is None:
            raise RuntimeError("PerInput episodes last one step: call reset() before step()")
        plan, fr, clipped, walled = self.interface.decide(action, self._probe_res.prompt_len)
        r, info = self._finish(plan, fr, {"action_clipped": clipped, "wall_clipped": walled})
        return self._obs.copy(), r, True, False, info  # type: ignore[union-attr]

    def step_plan(self, plan: Any, *, keep_open: bool = False) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Run an explicit :class:`~envs.runtime.plan.SparsityPlan` on the current input instead of an action.

        For baselines and evaluation harnesses whose plans are not keep fractions (e.g. ShortGPT
        layer removal). The probe is reused when the plan runs the probe's layers densely; otherwise
        the prompt is re-run from the start and the probe's cost is paid on top.

        Args:
            plan: A plan for this environment's model.
            keep_open: Leave the episode open, so that the same input (the same probe result) can
                be scored under another plan; the dense reference and probe cost are reused.
        """
        if self._done or self._item is None:
            raise RuntimeError("PerInput episodes last one step: call reset() before step_plan()")
        plan = self.slm.check_plan(plan)
        r, info = self._finish(plan, None, {"action_clipped": False, "wall_clipped": False})
        if keep_open:
            self._done = False
        return self._obs.copy(), r, True, False, info  # type: ignore[union-attr]

    def retime(self, plan: SparsityPlan) -> float:
        """Time ``plan`` on the current input once more, as a step measures it: probe plus the rest, seconds.

        Nothing is scored. For evaluation harnesses that take the best of several interleaved timing
        rounds per input (:func:`agents.evaluation.sweep`), so that one burst of another process's load
        does not decide a plan's latency. The probe is timed again too, so each round is a whole run.

        Raises:
            ValueError: The environment does not measure latency (``cost="calibrated"`` is deterministic).
            RuntimeError: No input is open.
        """
        if self.cost_kind != "measured":
            raise ValueError("retime times real runs: build the environment with cost='measured'")
        if self._item is None or self._probe_res is None:
            raise RuntimeError("call reset() first: no input is open to time")
        plan = self.slm.check_plan(plan)
        probe_cost, _ = self._timed_probe(self._prompt_t)
        rest = self.cost_source.cost(plan, self._rest_of(plan), self._probe_res.prompt_len)
        return float(probe_cost.latency_s + rest.latency_s)

    def _timed_probe(self, ids: Any) -> tuple[Any, Any]:
        """The probe of the prompt ``ids`` (``[1, P]``), measured: its cost and its result."""
        box: list[Any] = []
        cost = self.cost_source.cost(
            self.interface.probe_plan, lambda: box.append(self.interface.observe(ids)), ids.shape[1]
        )
        return cost, box[-1]

    def _rest_of(self, plan: SparsityPlan) -> Any:
        """The run of the prompt under ``plan`` after the probe, as a callable that returns its ``Prefill``.

        It continues from the probe's state when the plan runs the probe's layers whole, else starts over.
        """
        probe = self._probe_res
        if self.interface.reuses_probe(plan):
            return lambda: run_rest(self.slm, probe, plan, self.probe.layers)
        return lambda: run_full(self.slm, probe.ids, plan)

    def close_episode(self) -> None:
        """End the current episode without a step (harnesses that scored it with ``step_plan(keep_open=True)``)."""
        self._done = True

    def _score_plan(self, plan: SparsityPlan, prefill: Any, cost: Any, reused: bool) -> tuple[float, dict[str, Any]]:
        """Score the item under ``plan`` from ``prefill``: the reward and the info every episode of an input reports.

        ``prefill`` is the prompt as it ran; ``Staged`` adds its own entries to the info.
        """
        P = self._probe_res.prompt_len
        self.scorer.prefill = prefill
        try:
            score = self.scorer.score(self.slm, self._item, plan, self._dense_ref)
        finally:
            self.scorer.prefill = None
        acc = score.dense_relative if self.reward_cfg.accuracy == "dense_relative" else score.raw
        lat_f, en_f = self._fractions_of(cost, self._dense_cost)
        r = reward(float(acc), lat_f, en_f, self.reward_cfg)
        info = {
            "item_id": self._item.id,
            "task": self._item.task,
            "kind": self._item.kind,
            "prompt_tokens": P,
            "accuracy": float(acc),
            "accuracy_raw": float(score.raw),
            "accuracy_dense_relative": float(score.dense_relative),
            "flops_fraction": self.builder.flops_fraction(plan, P),
            **self._cost_info(cost, self._dense_cost, lat_f, en_f),
            "probe_layers": self.probe.layers,
            "probe_reused": reused,
            "probe_latency_s": None if self._probe_cost is None else finite(self._probe_cost.latency_s),
            "plan": plan_summary(plan),
            "reward_form": self.reward_cfg.form,
        }
        return float(r), info

    def _finish(self, plan: SparsityPlan, fr: np.ndarray | None, extra: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Finish the prompt under ``plan`` (of fractions ``fr``, when an action made it); score; reward and info."""
        P = self._probe_res.prompt_len
        reused = self.interface.reuses_probe(plan)
        box: list[Any] = []
        rest = self._rest_of(plan)
        run = lambda: box.append(rest())  # noqa: E731
        if self.cost_kind == "measured":
            cost = self.cost_source.cost(plan, run, P) + self._probe_cost
        else:
            run()
            cost = self.cost_source.cost(plan, None, P)
            if not reused:
                cost = cost + self.cost_source.cost(self.interface.probe_plan, None, P)
        r, info = self._score_plan(plan, box[-1], cost, reused)
        info |= {"action_fractions": None if fr is None else fr.reshape(-1).tolist(), **extra}
        acc, lat_f, flops_f = info["accuracy"], info["latency_fraction"], info["flops_fraction"]
        self._done = True
        self.last_plan = plan
        self._last_render = (
            f"item {self._item.id} ({self._item.task}, {P} tokens)\nplan: {plan.describe()}\n"
            f"flops {flops_f:.0%}, latency {lat_f:.0%} of dense ({cost.source}), "
            f"accuracy {acc:.2f}, reward {r:+.3f}"
        )
        return float(r), info
