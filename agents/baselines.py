"""Controllers: everything that chooses a plan for an input, behind one interface.

A controller is a callable ``controller(obs, ctx) -> choice``: ``obs`` is the probe's observation
of the input (:mod:`envs.observation`), ``ctx`` a :class:`Context` with the environment's interface
and the item; the choice is a :class:`~envs.runtime.plan.SparsityPlan`. The evaluation harness runs the
choice and measures it; controllers never see the answer, except :class:`Oracle`, which is the
hindsight upper bound and says so.

Baselines:

- :class:`Dense`: everything runs.
- :class:`StaticUniform`: the same keep fractions everywhere (layers, heads, MLP).
- :class:`StaticImportance`: ShortGPT-style — the layers with the lowest block influence are
  removed (globally, not per group), plus importance-ordered heads and MLP channels, sized to a
  FLOPs budget.
- :class:`StaticMix`: a seeded random choice between two static plans with probability ``p`` —
  time-sharing, which reaches every point of the static convex hull.
- :class:`RandomPlan`: a uniformly random plan of a candidate set.
- :class:`EntropyThreshold`: a hand-written rule on the probe's next-token entropy: confident
  inputs get the cheap plan.
- :class:`Oracle`: per-input hindsight choice from a table of measured scores.
- :class:`PolicyController`: a trained policy (RLlib module, exported controller or bandit) acting
  in the environment's action space, read through the environment's interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from envs.runtime.plan import SparsityPlan, plan_from_counts


@dataclass
class Context:
    """What a controller may know besides the observation.

    Attributes:
        interface: The environment's :class:`~envs.interface.Interface` (its observation and
            action → plan mapping; the model is ``interface.slm``).
        item_index: Index of the input in the evaluation set (only the oracle uses it).
        prompt_len: Tokens of the input's prompt (the action wall's FLOPs are counted over them).
    """

    interface: Any
    item_index: int = -1
    prompt_len: int = 0

    @property
    def slm(self) -> Any:
        """The model."""
        return self.interface.slm

    @property
    def feature_names(self) -> list[str]:
        """Names of the observation's entries."""
        return self.interface.feature_names


class PlanController(Protocol):
    """The controller interface: observation (and context) to plan."""

    name: str

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """Choose the plan for this input."""
        ...


def fractions_plan(ctx: Context, fractions: Sequence[float] | np.ndarray, mlp_rule: str | None = None) -> SparsityPlan:
    """The plan of one ``[layers, heads, mlp]`` triple applied to every group (or a full ``[G, 3]`` array).

    ``mlp_rule`` (:data:`envs.runtime.plan.MLP_RULES`) applies to every group; ``None`` is the
    environment's own rule.
    """
    f = np.asarray(fractions, dtype=np.float64)
    n_groups = len(ctx.interface.actions.groups)
    if f.shape == (3,):
        f = np.tile(f, (n_groups, 1))
    rules = None if mlp_rule is None else [mlp_rule] * n_groups
    return ctx.interface.actions.plan(f.reshape(n_groups, 3), rules)


@dataclass
class Dense:
    """Run everything."""

    name: str = "Dense"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The dense plan."""
        return SparsityPlan.dense(ctx.slm.spec)


@dataclass
class StaticUniform:
    """The same keep fractions for every input and every layer group."""

    layers: float = 1.0
    heads: float = 1.0
    mlp: float = 1.0
    name: str = ""
    mlp_rule: str = "static"  # which MLP channels (envs.runtime.plan.MLP_RULES): per-token rules are static plans too

    def __post_init__(self) -> None:
        for k in ("layers", "heads", "mlp"):
            v = getattr(self, k)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"StaticUniform.{k} must be in [0, 1], got {v!r}")
        from envs.runtime.plan import MLP_RULES

        if self.mlp_rule not in MLP_RULES:
            raise ValueError(f"StaticUniform.mlp_rule must be one of {MLP_RULES}, got {self.mlp_rule!r}")
        if not self.name:
            rule = "" if self.mlp_rule == "static" else f" {self.mlp_rule}"
            self.name = f"Static(L{self.layers:.2f} H{self.heads:.2f} M{self.mlp:.2f}{rule})"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The fixed plan."""
        return fractions_plan(ctx, (self.layers, self.heads, self.mlp), self.mlp_rule)


@dataclass
class StaticDepth:
    """Every input exits after its first ``layers`` layers: a fixed-depth early exit, the static twin of a stop."""

    layers: int
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.layers, bool) or int(self.layers) != self.layers or self.layers < 0:
            raise ValueError(f"StaticDepth.layers must be a non-negative integer, got {self.layers!r}")
        self.name = self.name or f"StaticDepth({self.layers})"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The first ``layers`` layers dense, every later one skipped."""
        s = ctx.slm.spec
        if self.layers > s.num_layers:
            raise ValueError(f"StaticDepth({self.layers}) on a {s.num_layers}-layer model")
        from envs.runtime.staged import truncated

        return truncated(SparsityPlan(s, SparsityPlan.dense(s).layers, {"kind": "depth"}), self.layers)


@dataclass
class StaticImportance:
    """ShortGPT-style static pruning at a FLOPs budget.

    Layers are removed globally in order of increasing block influence (never the probe's layers,
    which the environment always runs), then — if removing the next layer would overshoot the
    budget — heads and MLP channels of the running layers are trimmed uniformly, by importance, to
    land on the budget.

    Args:
        budget: Decoder FLOPs relative to dense, in (0, 1].
        seq_len: Sequence length the FLOPs are counted at.
        layer_share: Fraction of the savings taken by removing layers (the rest from heads and MLP).
    """

    budget: float = 0.7
    seq_len: int = 128
    layer_share: float = 0.7
    name: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"StaticImportance.budget must be in (0, 1], got {self.budget!r}")
        if not 0.0 <= self.layer_share <= 1.0:
            raise ValueError(f"StaticImportance.layer_share must be in [0, 1], got {self.layer_share!r}")
        if not self.name:
            self.name = f"StaticImportance({self.budget:.2f})"
        self._cache: dict[tuple[int, frozenset[int]], SparsityPlan] = {}

    def plan_for(self, slm: Any, fixed_dense: Sequence[int] = ()) -> SparsityPlan:
        """The plan for ``slm`` (cached per model)."""
        fixed = frozenset(fixed_dense)
        key = (id(slm), fixed)
        if key in self._cache:
            return self._cache[key]
        spec, imp = slm.spec, slm.importance
        L, full = spec.num_layers, SparsityPlan.dense(spec).flops(self.seq_len)["total"]
        per_layer = [[i] for i in range(L)]  # counts per layer: (runs, query heads, MLP channels)

        def plan(running: set[int], f: float) -> SparsityPlan:
            nh, nc = max(1, round(f * spec.num_heads)), max(1, round(f * spec.intermediate_size))
            counts = [c for i in range(L) for c in (int(i in running), nh, nc)]
            return plan_from_counts(spec, imp, per_layer, counts, fixed_dense=fixed)

        def cost(p: SparsityPlan) -> float:
            return p.flops(self.seq_len)["total"] / full

        target_layers = 1.0 - (1.0 - self.budget) * self.layer_share
        running = set(range(L))
        for i in [i for i in reversed(imp.layer_order) if i not in fixed]:
            if cost(plan(running - {i}, 1.0)) < target_layers - 1e-9:
                break
            running.discard(i)
        # Trim heads and MLP of the running layers (same fraction) until the budget is met.
        best = plan(running, 1.0)
        if cost(best) > self.budget:
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                trial = plan(running, mid)
                if cost(trial) > self.budget:
                    hi = mid
                else:
                    lo, best = mid, trial
            if cost(best) > self.budget:
                best = plan(running, lo)
        best = SparsityPlan(best.spec, best.layers, {"kind": "static_importance", "budget": self.budget})
        self._cache[key] = best
        return best

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The fixed plan."""
        return self.plan_for(ctx.slm, ctx.interface.actions.fixed_dense)


@dataclass
class StaticMix:
    """Time-sharing between two static controllers: ``b`` with probability ``p``, else ``a``.

    Seeded, so an evaluation is reproducible; its expected accuracy and cost are the ``p``-weighted
    mix of the two plans', which is how the static convex hull is reached.
    """

    a: PlanController
    b: PlanController
    p: float = 0.5
    seed: int = 0
    name: str = ""
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"StaticMix.p must be in [0, 1], got {self.p!r}")
        self._rng = np.random.default_rng(self.seed)
        if not self.name:
            self.name = f"StaticMix({self.a.name} | {self.b.name}, p={self.p:.2f})"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """One of the two plans, at random."""
        return (self.b if self._rng.random() < self.p else self.a)(obs, ctx)


@dataclass
class RandomPlan:
    """A uniformly random choice among candidate controllers (seeded)."""

    candidates: Sequence[PlanController]
    seed: int = 0
    name: str = "Random"

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("RandomPlan needs at least one candidate")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """A random candidate's plan."""
        return self.candidates[int(self._rng.integers(len(self.candidates)))](obs, ctx)


@dataclass
class EntropyThreshold:
    """Confident inputs (next-token entropy under the probe at or below ``threshold``) get ``cheap``.

    A hand-written heuristic: low entropy after the first layers suggests the model has already
    "made up its mind", so the rest can be pruned harder.
    """

    threshold: float
    cheap: PlanController
    full: PlanController
    feature: str = "entropy"
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"EntropyThreshold({self.threshold:.3f})"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The cheap plan for confident inputs, the full one otherwise."""
        names = list(ctx.feature_names)
        if self.feature not in names:
            raise ValueError(f"observation has no feature {self.feature!r}; features are {names}")
        value = float(np.asarray(obs)[names.index(self.feature)])
        return (self.cheap if value <= self.threshold else self.full)(obs, ctx)


@dataclass
class Oracle:
    """Per-input hindsight: the plan each input is given by the oracle's knapsack solution.

    Built from a table of measured per-input scores (``choice[i]`` is a candidate index for item
    ``i``), so it is an upper bound, not a controller one could deploy.
    """

    candidates: Sequence[PlanController]
    choice: np.ndarray
    name: str = "Oracle"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The hindsight plan of this item."""
        if not 0 <= ctx.item_index < len(self.choice):
            raise ValueError(f"Oracle has choices for {len(self.choice)} items, asked for item {ctx.item_index}")
        return self.candidates[int(self.choice[ctx.item_index])](obs, ctx)


@dataclass
class PolicyController:
    """A trained policy acting in the environment's action space, its actions read as the environment reads them.

    The action becomes a plan through the context's interface (:meth:`envs.interface.PerInputInterface.decide`,
    or every group in turn for ``LayerByLayer``), so an action means here exactly what it meant in training.

    Args:
        policy: ``obs -> action`` (keep fractions or a preset index).
        name: Display name.
    """

    policy: Callable[[np.ndarray], Any]
    name: str = "Policy"

    def __call__(self, obs: np.ndarray, ctx: Context) -> SparsityPlan:
        """The plan of the policy's action(s)."""
        iface = ctx.interface
        obs = np.asarray(obs, dtype=np.float32)
        if hasattr(iface, "decide_all"):  # LayerByLayer: one action per group, each seeing the ones before
            probe_features = obs[-iface.probe.dim :] if iface.probe.dim else np.zeros(0, np.float32)
            return iface.decide_all(self.policy, probe_features, ctx.prompt_len)[0]
        return iface.decide(self.policy(obs), ctx.prompt_len)[0]
