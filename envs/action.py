"""What an environment's action means: validation, presets, the action wall, and keep fractions -> plan.

An :class:`ActionMap` is the one description of an environment's action that the environment,
an exported :class:`~agents.controller.Controller`, the evaluation and replay all rebuild from
(:meth:`ActionMap.config` / :meth:`ActionMap.from_config`). It needs the model runtime and numpy,
never gymnasium, so a deployed controller carries no training stack.

Bad actions, the same for every environment:

- A continuous action must be real numbers of the action's shape. Complex numbers, strings,
  booleans, objects and a wrong shape raise :class:`ValueError` naming the expected shape; NaN
  raises too; ``+-inf`` and values outside [0, 1] are clipped into [0, 1] (reported as clipped).
- A discrete action must be one integer (or an integral float) in range, else :class:`ValueError`;
  booleans are refused (``True`` is not "preset 1").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from envs.runtime.kernels import missing_predictor
from envs.runtime.plan import MLP_RULES, PlanBuilder, SparsityPlan

# Preset actions of the discrete variants: (layers, heads, mlp) keep fractions applied to every group.
PRESETS: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),
    (1.0, 1.0, 0.75),
    (1.0, 0.75, 0.75),
    (1.0, 0.5, 0.5),
    (0.9, 1.0, 1.0),
    (0.8, 1.0, 1.0),
    (0.8, 0.75, 0.75),
    (0.7, 1.0, 1.0),
    (0.6, 1.0, 1.0),
    (0.5, 0.5, 0.5),
)
# Per-group presets of LayerByLayer's discrete variant: (run, heads, mlp); "skip" last.
LAYER_PRESETS: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),
    (1.0, 1.0, 0.5),
    (1.0, 0.75, 0.75),
    (1.0, 0.5, 1.0),
    (1.0, 0.5, 0.5),
    (1.0, 0.25, 0.25),
    (0.0, 0.0, 0.0),
)
ACTION_VERSION = 1


def action_wall(
    fractions: np.ndarray, cost_of: Callable[[np.ndarray], float], budget: float | None
) -> tuple[np.ndarray, bool]:
    """AMC's action wall: scale ``fractions`` down until ``cost_of`` (a cost fraction) is <= ``budget``.

    Returns the (possibly scaled) fractions and whether they were changed. When even all-zero
    fractions exceed the budget (fixed dense layers cost more), the zeros are returned.
    """
    if budget is None or cost_of(fractions) <= budget:
        return fractions, False
    lo, hi = 0.0, 1.0
    for _ in range(14):  # keep fractions become integer counts: 14 halvings are finer than any count
        mid = (lo + hi) / 2
        if cost_of(fractions * mid) <= budget:
            lo = mid
        else:
            hi = mid
    return fractions * lo, True


def check_presets(
    presets: Sequence[Sequence[float]] | None, default: Sequence[Sequence[float]] = PRESETS
) -> np.ndarray:
    """Preset keep-fraction triples as a ``[n, 3]`` array (``default`` when ``None``).

    Raises:
        ValueError: Not at least two triples of fractions in [0, 1].
    """
    try:
        p = np.asarray(default if presets is None else presets, dtype=np.float64)
    except (TypeError, ValueError):
        p = np.empty((0,))
    if p.ndim != 2 or p.shape[1] != 3 or len(p) < 2 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(
            "presets must be a list of at least two [layers, heads, mlp] keep-fraction triples in [0, 1], "
            f"got {presets!r}"
        )
    return p


def _real_array(action: Any) -> np.ndarray | None:
    """``action`` as a float64 array when it holds only real numbers (no bool, complex, str, object)."""
    try:
        raw = np.asarray(action)
    except (TypeError, ValueError):
        return None
    if raw.dtype.kind not in "iuf":  # b (bool), c (complex), U/S (str), O (object), V, M, m
        return None
    return raw.astype(np.float64)


def discrete_action(action: Any, n: int) -> int:
    """The index a discrete action names: one integer (or integral float) in ``[0, n)``.

    Raises:
        ValueError: Anything else (booleans, strings, NaN, out of range).
    """
    if type(action) is int or (isinstance(action, np.integer) and not isinstance(action, np.bool_)):
        k = int(action)  # the common case (a sampled or argmax action), without an array round trip
        if not 0 <= k < n:
            raise ValueError(f"discrete action must be in [0, {n - 1}], got {k}")
        return k
    a = _real_array(action)
    whole = a is not None and a.size == 1 and bool(np.isfinite(a).all()) and float(a.reshape(())).is_integer()
    if not whole:
        raise ValueError(f"a discrete action must be one integer in [0, {n - 1}], got {action!r}")
    k = int(a.reshape(()))  # type: ignore[union-attr]
    if not 0 <= k < n:
        raise ValueError(f"discrete action must be in [0, {n - 1}], got {k}")
    return k


def box_action(action: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """A continuous action as float64 of ``shape``, clipped into [0, 1], and whether it was clipped.

    Raises:
        ValueError: Not real numbers of that shape, or NaN.
    """
    a = _real_array(action)
    if a is None:
        raise ValueError(
            f"action must be real numbers of shape {shape} (keep fractions [layers, heads, mlp] per layer "
            f"group), got {action!r}"
        )
    if a.shape != shape:
        raise ValueError(
            f"action must have shape {shape} (keep fractions [layers, heads, mlp] per layer group), got shape {a.shape}"
        )
    if np.isnan(a).any():
        raise ValueError(f"action contains NaN at {np.flatnonzero(np.isnan(a)).tolist()}; actions must be numbers")
    clipped = bool(((a < 0) | (a > 1)).any())
    return np.clip(a, 0.0, 1.0), clipped


class ActionMap:
    """An environment's action and how it becomes a :class:`~envs.runtime.plan.SparsityPlan`.

    Args:
        slm: The model (its spec and importance orderings).
        groups: Layer groups the keep fractions apply to.
        fixed_dense: Layers that always run whole (a probe's).
        discrete: Discrete presets instead of continuous keep fractions.
        presets: The discrete presets (``[n, 3]``).
        budget: The action wall's FLOPs budget (fraction of dense) or ``None``.
        per_group: Each action sets one group's triple (LayerByLayer) instead of every group's.
        mlp_rules: Which MLP channels run (:data:`envs.runtime.plan.MLP_RULES`). One rule: every plan
            uses it. Several: the agent chooses one per decision and group. A discrete action then
            names a (preset, rule) pair, ``index = preset * len(mlp_rules) + rule``; a continuous one
            gains a fourth entry per group, ``[layers, heads, mlp, rule]``, whose value in [0, 1]
            picks ``mlp_rules[min(int(value * len(mlp_rules)), len(mlp_rules) - 1)]``.
    """

    def __init__(
        self,
        slm: Any,
        groups: Sequence[Sequence[int]],
        *,
        fixed_dense: Iterable[int] = (),
        discrete: bool = False,
        presets: Sequence[Sequence[float]] | np.ndarray = PRESETS,
        budget: float | None = None,
        per_group: bool = False,
        mlp_rules: Sequence[str] = ("static",),
    ) -> None:
        rules = tuple(mlp_rules) if not isinstance(mlp_rules, str) else (mlp_rules,)
        if not rules or len(set(rules)) != len(rules) or any(r not in MLP_RULES for r in rules):
            raise ValueError(f"mlp_rules must be distinct rules from {MLP_RULES}, got {mlp_rules!r}")
        if "predicted" in rules and getattr(slm, "predictor", None) is None:
            raise ValueError(missing_predictor(f"mlp_rules={list(rules)}"))
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)):
            raise ValueError(f"budget must be a cost fraction in (0, 1] or None, got {budget!r}")
        if budget is not None and not 0.0 < float(budget) <= 1.0:
            raise ValueError(f"budget must be a cost fraction in (0, 1] or None, got {budget!r}")
        self.builder = PlanBuilder(slm, groups, fixed_dense)
        self.groups = self.builder.groups
        self.fixed_dense = self.builder.fixed
        self.discrete = bool(discrete)
        self.presets = check_presets(presets)
        self.budget = None if budget is None else float(budget)
        self.per_group = bool(per_group)
        self.width = 1 if self.per_group else len(self.groups)  # groups one action sets
        self.mlp_rules = rules
        self.chooses_rule = len(rules) > 1
        if self.per_group and self.chooses_rule:
            raise ValueError(
                f"mlp_rules={list(rules)}: an environment that decides one layer group per step runs one MLP rule "
                "(pass a single rule)"
            )
        self.cols = 4 if self.chooses_rule else 3  # entries per group of a continuous action

    # ------------------------------------------------------------------ description
    @property
    def kind(self) -> str:
        """``"discrete"`` or ``"box"``."""
        return "discrete" if self.discrete else "box"

    @property
    def n(self) -> int:
        """Number of discrete actions (presets, times the rules when the agent chooses one)."""
        return len(self.presets) * len(self.mlp_rules)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of a continuous action: three keep fractions per group it sets (and a rule, when chosen)."""
        return (self.cols * self.width,)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this map for the same model (JSON-ready)."""
        return {
            "version": ACTION_VERSION,
            "kind": self.kind,
            "shape": list(self.shape),
            "n": self.n if self.discrete else None,
            "low": 0.0,
            "high": 1.0,
            "groups": [list(g) for g in self.groups],
            "fixed_dense": list(self.fixed_dense),
            "presets": self.presets.tolist(),
            "budget": self.budget,
            "per_group": self.per_group,
            "fractions": "[layers, heads, mlp] keep fractions per group (envs.runtime.plan.plan_from_counts)",
        } | ({} if self.mlp_rules == ("static",) else {"mlp_rules": list(self.mlp_rules)})  # default left out:
        # descriptions written before rules existed stay equal to today's

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], slm: Any) -> ActionMap:
        """The map :meth:`config` describes, for ``slm``.

        Raises:
            ValueError: Another action version, or settings that do not fit the model.
        """
        if int(cfg.get("version", -1)) != ACTION_VERSION:
            raise ValueError(
                f"action description version {cfg.get('version')!r}, this PruneGym reads {ACTION_VERSION}: "
                "re-export the controller with this version"
            )
        L = slm.spec.num_layers
        groups = [[int(i) for i in g] for g in cfg["groups"]]
        bad = sorted({i for g in groups for i in g if not 0 <= i < L})
        if bad:
            raise ValueError(f"action groups name layers {bad}, but the model has {L} layers")
        return cls(
            slm,
            groups,
            fixed_dense=[int(i) for i in cfg.get("fixed_dense", [])],
            discrete=cfg["kind"] == "discrete",
            presets=cfg["presets"],
            budget=cfg.get("budget"),
            per_group=bool(cfg.get("per_group", False)),
            mlp_rules=tuple(cfg.get("mlp_rules", ("static",))),
        )

    # ------------------------------------------------------------------ actions
    def fractions(self, action: Any) -> tuple[np.ndarray, bool]:
        """Validate one action; return the keep fractions it sets (``[width, 3]``) and whether it was clipped.

        Raises:
            ValueError: An action that is not one (see the module docstring); the message says what is expected.
        """
        fr, _, clipped = self.fractions_and_rules(action)
        return fr, clipped

    def fractions_and_rules(self, action: Any) -> tuple[np.ndarray, tuple[str, ...], bool]:
        """Validate one action: its keep fractions (``[width, 3]``), MLP rules (one per group it sets), clipped.

        Raises:
            ValueError: An action that is not one (see the module docstring).
        """
        R = len(self.mlp_rules)
        if self.discrete:
            k = discrete_action(action, self.n)
            return np.tile(self.presets[k // R], (self.width, 1)), (self.mlp_rules[k % R],) * self.width, False
        a, clipped = box_action(action, self.shape)
        a = a.reshape(self.width, self.cols)
        if not self.chooses_rule:
            return a, (self.mlp_rules[0],) * self.width, clipped
        rules = tuple(self.mlp_rules[min(int(v * R), R - 1)] for v in a[:, 3])
        return a[:, :3].copy(), rules, clipped

    def preset_index(self, action: Any) -> int:
        """The preset a discrete action names.

        Raises:
            ValueError: Not one integer in ``[0, n)``.
        """
        return discrete_action(action, self.n) // len(self.mlp_rules)

    def group_rules(self, rules: Sequence[str] | None) -> tuple[str, ...] | None:
        """Every group's rule for a whole-plan decision (``None`` for the all-static default)."""
        if rules is None:
            rules = (self.mlp_rules[0],) * len(self.groups)
        rules = tuple(rules)
        if len(rules) == 1 and len(self.groups) > 1:
            rules *= len(self.groups)
        return None if all(r == "static" for r in rules) else rules

    def plan(self, fractions: np.ndarray, rules: Sequence[str] | None = None) -> SparsityPlan:
        """The plan of keep fractions for every group (``[len(groups), 3]``) with their MLP ``rules``.

        ``rules=None`` means this map's single rule (its first) in every group.
        """
        return self.builder.plan(fractions, self.group_rules(rules))

    def flops_fraction(self, plan: SparsityPlan, seq_len: int, past_len: int = 0) -> float:
        """Decoder FLOPs of ``plan`` relative to dense."""
        return self.builder.flops_fraction(plan, seq_len, past_len)

    def walled(
        self, fractions: np.ndarray, seq_len: int, past_len: int = 0, rules: Sequence[str] | None = None
    ) -> tuple[np.ndarray, bool]:
        """Whole-plan fractions after the action wall (``budget``) for ``seq_len`` tokens after ``past_len``."""
        return action_wall(
            fractions, lambda f: self.flops_fraction(self.plan(f, rules), seq_len, past_len), self.budget
        )

    def decide(self, action: Any, seq_len: int, past_len: int = 0) -> tuple[SparsityPlan, np.ndarray, bool, bool]:
        """A whole-plan action -> ``(plan, fractions, clipped, walled)``, exactly as the environment steps it."""
        fr, rules, clipped = self.fractions_and_rules(action)
        fr, walled = self.walled(fr, seq_len, past_len, rules)
        return self.plan(fr, rules), fr, clipped, walled
