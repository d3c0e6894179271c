"""One description of what an environment's agent sees and does, shared by everything that must agree on it.

An :class:`Interface` holds an environment's observation (the :class:`~envs.observation.Probe`,
the per-token or per-layer features) and its :class:`~envs.action.ActionMap`. The environment
builds one from its arguments; :meth:`Interface.config` writes it as JSON into ``env.config()``
and from there into an exported controller's card; :meth:`Interface.from_config` rebuilds the
same interface for a model, and the :class:`~agents.controller.Controller`,
:func:`agents.adaptive.adaptive_generate` and the evaluation use nothing else. What is trained is
therefore what is deployed: the observation and the action → plan mapping are computed by the
same code from the same settings (tests check it bit for bit).

Nothing here imports gymnasium or Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from envs.action import LAYER_PRESETS, PRESETS, ActionMap
from envs.observation import OBS_CLIP, LayerFeatures, Probe, ProbeResult, TokenObserver
from envs.runtime.plan import LayerPlan, SparsityPlan, layer_groups

INTERFACE_VERSION = 1


class Interface:
    """Base of the three interfaces: the action map and the observation's size and bounds.

    Args:
        slm: The model.
        actions: The action map.
    """

    kind: ClassVar[str] = ""
    KINDS: ClassVar[dict[str, type[Interface]]] = {}

    def __init__(self, slm: Any, actions: ActionMap) -> None:
        self.slm, self.actions = slm, actions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Interface.KINDS[cls.kind] = cls

    # ------------------------------------------------------------------ description
    @property
    def feature_names(self) -> list[str]:
        """Names of the observation's entries."""
        raise NotImplementedError

    @property
    def observation_size(self) -> int:
        """Length of the observation vector."""
        return len(self.feature_names)

    def observation_config(self) -> dict[str, Any]:
        """The observation's description (what rebuilds the same features)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The whole description, JSON-ready: kind, observation and action."""
        return {
            "version": INTERFACE_VERSION,
            "kind": self.kind,
            "observation": {
                "shape": [self.observation_size],
                "dtype": "float32",
                "low": -OBS_CLIP,
                "high": OBS_CLIP,
                "features": self.feature_names,
                **self.observation_config(),
            },
            "action": self.actions.config(),
        }

    @staticmethod
    def from_config(cfg: Mapping[str, Any], slm: Any) -> Interface:
        """Rebuild the interface :meth:`config` describes, for ``slm``.

        Raises:
            ValueError: Another version or kind, or a description that does not rebuild itself exactly.
        """
        if int(cfg.get("version", -1)) != INTERFACE_VERSION:
            raise ValueError(
                f"interface version {cfg.get('version')!r}; this PruneGym reads version {INTERFACE_VERSION}: "
                "re-export the controller with this version"
            )
        kind = str(cfg.get("kind"))
        if kind not in Interface.KINDS:
            raise ValueError(f"unknown interface kind {kind!r}; known: {sorted(Interface.KINDS)}")
        iface = Interface.KINDS[kind]._from_config(cfg, slm)
        if iface.config() != _plain(cfg):
            mine, theirs = iface.config(), _plain(cfg)
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"the {kind} description does not rebuild itself for this model (differs in {diff})")
        return iface

    @classmethod
    def _from_config(cls, cfg: Mapping[str, Any], slm: Any) -> Interface:
        raise NotImplementedError


def _plain(value: Any) -> Any:
    """JSON-equal form (tuples as lists, ints as they are)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------- per input
class PerInputInterface(Interface):
    """``PerInput``: the probe of the prompt, then one action that sets the plan of the rest.

    Args:
        slm: The model.
        actions: The action map (its fixed-dense layers are the probe's unless it is prunable).
        probe: The probe.
        probe_prunable: Whether the action may prune the probe's layers (then the prompt is re-run).
    """

    kind = "per_input"
    DEFAULT_PRESETS: ClassVar[Sequence[Sequence[float]]] = PRESETS
    PER_GROUP: ClassVar[bool] = False  # whether one action sets one group (LayerByLayer) or all of them

    def __init__(self, slm: Any, actions: ActionMap, probe: Probe, probe_prunable: bool = False) -> None:
        super().__init__(slm, actions)
        self.probe, self.probe_prunable = probe, bool(probe_prunable)
        s, k = slm.spec, probe.layers
        dense = SparsityPlan.dense(s).layers
        off = LayerPlan(False, (), (), 0)
        # The plan that runs only the probe's layers (the cost of a probe that is not reused).
        self.probe_plan = SparsityPlan(
            s, tuple(dense[i] if i < k else off for i in range(s.num_layers)), {"kind": "probe"}
        )

    @classmethod
    def build(
        cls,
        slm: Any,
        *,
        num_groups: int | None = 3,
        probe_layers: int = 2,
        probe_dim: int = 32,
        probe_seed: int = 0,
        ll_positions: int = 8,
        lens_vocab: int | None = 2048,
        probe_prunable: bool = False,
        discrete: bool = False,
        presets: Sequence[Sequence[float]] | None = None,
        budget: float | None = None,
        mlp_rules: Sequence[str] = ("static",),
    ) -> PerInputInterface:
        """The interface of ``PerInput`` (or ``LayerByLayer``) with these arguments (see the environment's docstring).

        ``num_groups=None`` gives one group per layer the action controls; ``presets=None`` the
        class's :attr:`DEFAULT_PRESETS`.

        Raises:
            ValueError: A setting out of range; the message gives the range.
        """
        probe = Probe(slm, probe_layers, probe_dim, probe_seed, ll_positions, lens_vocab)
        groups, fixed = cls._groups(slm, probe, num_groups, probe_prunable)
        actions = ActionMap(
            slm,
            groups,
            fixed_dense=fixed,
            discrete=discrete,
            presets=cls.DEFAULT_PRESETS if presets is None else presets,
            budget=budget,
            per_group=cls.PER_GROUP,
            mlp_rules=mlp_rules,
        )
        return cls(slm, actions, probe, probe_prunable)

    @staticmethod
    def _groups(slm: Any, probe: Probe, num_groups: int | None, prunable: bool) -> tuple[list[list[int]], list[int]]:
        L, k = slm.spec.num_layers, probe.layers
        first = 0 if prunable else k
        if num_groups is None:
            num_groups = max(L - first, 1)
        if (
            isinstance(num_groups, bool)
            or not isinstance(num_groups, int | np.integer)
            or not 1 <= num_groups <= L - first
        ):
            raise ValueError(f"num_groups must be in [1, {L - first}] (layers the action controls), got {num_groups!r}")
        groups = [[first + i for i in g] for g in layer_groups(L - first, int(num_groups))]
        return groups, list(range(first))

    @property
    def feature_names(self) -> list[str]:
        """The probe's feature names."""
        return list(self.probe.feature_names)

    def observation_config(self) -> dict[str, Any]:
        """The probe's description and whether it may be pruned."""
        return {"probe": self.probe.config(), "probe_prunable": self.probe_prunable}

    @classmethod
    def _from_config(cls, cfg: Mapping[str, Any], slm: Any) -> PerInputInterface:
        probe = Probe.from_config(dict(cfg["observation"]["probe"]), slm)
        return cls(slm, ActionMap.from_config(cfg["action"], slm), probe, bool(cfg["observation"]["probe_prunable"]))

    # ------------------------------------------------------------------ use
    def observe(self, ids: torch.Tensor | list[int]) -> ProbeResult:
        """Probe a prompt: the observation is ``result.features``; the state is kept for :meth:`finish`."""
        return self.probe.run(ids)

    def decide(self, action: Any, prompt_len: int) -> tuple[SparsityPlan, np.ndarray, bool, bool]:
        """The plan of one action for a prompt of ``prompt_len`` tokens: ``(plan, fractions, clipped, walled)``."""
        return self.actions.decide(action, prompt_len)

    def reuses_probe(self, plan: SparsityPlan) -> bool:
        """Whether ``plan`` runs the probe's layers whole, so the rest continues from the probe's state."""
        return all(plan.layers[i] == self.probe_plan.layers[i] for i in range(self.probe.layers))


# ---------------------------------------------------------------------------------------- per layer
class LayerByLayerInterface(PerInputInterface):
    """``LayerByLayer``: the probe, then one action per layer group, each seeing what was decided so far."""

    kind = "layer_by_layer"
    DEFAULT_PRESETS = LAYER_PRESETS
    PER_GROUP = True

    def __init__(self, slm: Any, actions: ActionMap, probe: Probe, probe_prunable: bool = False) -> None:
        if not actions.per_group:
            raise ValueError("LayerByLayer's action map sets one group per action (per_group=True)")
        super().__init__(slm, actions, probe, probe_prunable)
        self.layer_features = LayerFeatures(slm.importance, slm.spec.num_layers, actions.groups)

    @property
    def num_groups(self) -> int:
        """Steps of an episode."""
        return len(self.actions.groups)

    @property
    def feature_names(self) -> list[str]:
        """The layer features, then the probe's."""
        from envs.observation import LAYER_FEATURES

        return list(LAYER_FEATURES) + list(self.probe.feature_names)

    def used(self, fractions: np.ndarray, t: int, prompt_len: int) -> float:
        """FLOPs fraction of the groups before ``t`` (later ones off), probe layers included."""
        f = fractions.copy()
        f[t:] = 0.0
        return self.actions.flops_fraction(self.actions.plan(f), prompt_len)

    def step_observation(
        self, probe_features: np.ndarray, t: int, fractions: np.ndarray, prompt_len: int
    ) -> np.ndarray:
        """The observation before deciding group ``t`` (``fractions``: ``[G, 3]``, groups ``>= t`` unset)."""
        used = self.used(fractions, t, prompt_len)
        return self.layer_features.features(t, fractions, used, self.actions.budget, probe_features)

    def step_fractions(
        self, action: Any, t: int, fractions: np.ndarray, prompt_len: int
    ) -> tuple[np.ndarray, bool, bool]:
        """Group ``t``'s fractions for ``action``: ``(triple, clipped, walled)``.

        The action wall keeps the groups decided so far, this one, the probe layers and nothing
        for the groups to come within the budget.
        """
        fr, clipped = self.actions.fractions(action)

        def cost_of(f: np.ndarray) -> float:
            full = fractions.copy()
            full[t] = f[0]
            full[t + 1 :] = 0.0
            return self.actions.flops_fraction(self.actions.plan(full), prompt_len)

        from envs.action import action_wall

        fr, walled = action_wall(fr, cost_of, self.actions.budget)
        return fr[0], clipped, walled

    def decide_all(
        self, policy: Callable[[np.ndarray], Any], probe_features: np.ndarray, prompt_len: int
    ) -> tuple[SparsityPlan, list[np.ndarray], list[Any]]:
        """Run ``policy`` through every group as an episode does: ``(plan, observations, actions)``."""
        fr = np.zeros((self.num_groups, 3))
        observations, actions = [], []
        for t in range(self.num_groups):
            obs = self.step_observation(probe_features, t, fr, prompt_len)
            action = policy(obs)
            fr[t], _, _ = self.step_fractions(action, t, fr, prompt_len)
            observations.append(obs)
            actions.append(action)
        return self.actions.plan(fr), observations, actions


# ---------------------------------------------------------------------------------------- staged
STOP_THRESHOLD = 0.5  # a continuous action stops when its first entry is at least this


class StagedInterface(LayerByLayerInterface):
    """``Staged``: after each layer group the model's own answer is read, and the agent stops or runs the next group.

    The action is the per-group action of :class:`LayerByLayerInterface` with a **stop** in front:
    discrete index 0 stops, index ``k >= 1`` is the group action ``k - 1``; a continuous action is
    ``[stop, *group_action]`` and stops when ``stop >= 0.5``.

    With a **ladder** (:meth:`with_ladder`: whole-model keep-fraction triples, cheapest first), a
    step runs the next rung's whole plan instead of one group, and the action is only the stop:
    ``Discrete(2)`` (0 stops, 1 escalates) or ``Box(0, 1, (1,))``.
    """

    kind = "staged"
    DEFAULT_GROUPS: ClassVar[int] = 7

    def __init__(self, slm: Any, actions: ActionMap, probe: Probe, probe_prunable: bool = False) -> None:
        super().__init__(slm, actions, probe, probe_prunable)
        self.ladder: tuple[tuple[float, float, float], ...] = ()

    def with_ladder(self, ladder: Sequence[Sequence[float]] | None) -> StagedInterface:
        """Set the cascade ladder (``None`` or empty: group by group); returns ``self``.

        Raises:
            ValueError: A rung that is not three fractions in [0, 1], or a ladder whose plans do not
                grow in FLOPs (a rung no denser than the one before it is never worth escalating to).
        """
        rungs: list[tuple[float, float, float]] = []
        for r in ladder or ():
            triple = tuple(float(x) for x in r)
            if len(triple) != 3 or not all(0.0 <= x <= 1.0 for x in triple):
                raise ValueError(f"a ladder rung is [layers, heads, mlp] in [0, 1], got {list(r)!r}")
            rungs.append(triple)  # type: ignore[arg-type]
        flops = [self.actions.flops_fraction(self.rung_plan(r), 64) for r in rungs]
        if any(b <= a for a, b in zip(flops, flops[1:], strict=False)):
            raise ValueError(f"ladder rungs must grow in FLOPs, cheapest first; got FLOPs fractions {flops}")
        self.ladder = tuple(rungs)
        return self

    def rung_plan(self, rung: Sequence[float]) -> SparsityPlan:
        """The whole-model plan of one ladder rung (its triple in every group)."""
        return self.actions.plan(np.tile(np.asarray(rung, np.float64), (len(self.actions.groups), 1)))

    @classmethod
    def build(cls, slm: Any, *, num_groups: int | None = None, **kwargs: Any) -> StagedInterface:  # type: ignore[override]
        """The interface of ``Staged`` (arguments as :meth:`PerInputInterface.build`).

        ``num_groups=None`` gives :attr:`DEFAULT_GROUPS` groups (fewer on a model with fewer layers after the probe).
        """
        if num_groups is None:
            first = 0 if kwargs.get("probe_prunable") else int(kwargs.get("probe_layers", 2))
            num_groups = max(min(cls.DEFAULT_GROUPS, slm.spec.num_layers - first), 1)
        return super().build(slm, num_groups=num_groups, **kwargs)  # type: ignore[return-value]

    @property
    def feature_names(self) -> list[str]:
        """The layer features, the readout's, then the probe's."""
        from envs.observation import LAYER_FEATURES, STAGE_FEATURES

        return list(LAYER_FEATURES) + list(STAGE_FEATURES) + list(self.probe.feature_names)

    def config(self) -> dict[str, Any]:
        """As :meth:`Interface.config`, with the stop action described."""
        cfg = super().config()
        acts = self.actions
        then = "1 escalates to the next rung" if self.ladder else "group actions are index - 1"
        group = cfg["action"]
        cfg["action"] = {
            **group,
            # the environment's action space, stop included (what a policy outputs; the group map's own
            # size is kept beside it and is what the map is rebuilt from)
            "n": self.action_size if acts.discrete else None,
            "shape": group["shape"] if acts.discrete else [self.action_size],
            "group_n": group["n"],
            "group_shape": group["shape"],
            "stop": f"index 0; {then}" if acts.discrete else f"entry 0 >= {STOP_THRESHOLD}",
        }
        if self.ladder:
            cfg["action"]["ladder"] = [list(r) for r in self.ladder]
        return cfg

    @classmethod
    def _from_config(cls, cfg: Mapping[str, Any], slm: Any) -> StagedInterface:
        probe = Probe.from_config(dict(cfg["observation"]["probe"]), slm)
        action = {k: v for k, v in dict(cfg["action"]).items() if k not in ("stop", "ladder", "group_n", "group_shape")}
        action |= {"n": cfg["action"].get("group_n"), "shape": cfg["action"].get("group_shape")}
        iface = cls(slm, ActionMap.from_config(action, slm), probe, bool(cfg["observation"]["probe_prunable"]))
        return iface.with_ladder(cfg["action"].get("ladder"))

    @property
    def steps(self) -> int:
        """Decisions of an episode: the groups, or the ladder's rungs."""
        return len(self.ladder) if self.ladder else self.num_groups

    @property
    def action_size(self) -> int:
        """``Discrete`` size (discrete) or ``Box`` length (continuous) of the action, stop included."""
        acts = self.actions
        if self.ladder:
            return 2 if acts.discrete else 1
        return 1 + (acts.n if acts.discrete else int(np.prod(acts.shape)))

    def split_action(self, action: Any) -> tuple[bool, Any]:
        """``(stop, group_action)`` of one action; ``group_action`` is ``None`` when it stops.

        Raises:
            ValueError: A discrete action out of range, or a continuous one of the wrong shape or with NaN.
        """
        from envs.action import box_action, discrete_action

        if self.actions.discrete:
            k = discrete_action(action, self.action_size)  # 0 stops
            if self.ladder:
                return k == 0, None
            return (True, None) if k == 0 else (False, k - 1)
        a, _ = box_action(action, (self.action_size,))  # the group part is clipped again, and flagged, below
        raw = np.asarray(action, dtype=np.float64)
        stop = bool(a[0] >= STOP_THRESHOLD)
        if self.ladder or stop:
            return stop, None
        return False, raw[1:]

    def stop_layer(self, t: int) -> int:
        """The layer after group ``t`` (where a run that has done groups ``<= t`` stands)."""
        return self.actions.groups[t][-1] + 1

    def plan_until(self, fractions: np.ndarray, t: int) -> SparsityPlan:
        """The plan of groups ``< t`` at ``fractions`` with every later layer off (what has run after ``t`` steps)."""
        f = fractions.copy()
        f[t:] = 0.0
        return self.actions.plan(f)


# ---------------------------------------------------------------------------------------- per token
class PerTokenInterface(Interface):
    """``PerToken``: the features of the forward that predicted the current token, then that token's plan.

    Args:
        slm: The model.
        actions: The action map over every layer.
        horizon: ``max_new_tokens`` (the step feature's scale).
    """

    kind = "per_token"

    def __init__(self, slm: Any, actions: ActionMap, horizon: int, token_exit: Any = None) -> None:
        super().__init__(slm, actions)
        self.horizon = int(horizon)
        self.token_exit = token_exit  # envs.runtime.staged.TokenExit, or None: every token runs its whole plan

    @classmethod
    def build(
        cls,
        slm: Any,
        *,
        num_groups: int = 3,
        max_new_tokens: int = 16,
        discrete: bool = False,
        presets: Sequence[Sequence[float]] | None = None,
        budget: float | None = None,
        mlp_rules: Sequence[str] = ("static",),
        exit_threshold: float | None = None,
        exit_every: int = 4,
    ) -> PerTokenInterface:
        """The interface of ``PerToken`` with these arguments.

        ``exit_threshold`` turns on CALM's per-token exit (:class:`envs.runtime.staged.TokenExit`):
        after every ``exit_every`` layers the next-token distribution is read, and the token stops
        there once its top-1 minus top-2 probability reaches the threshold.
        """
        L = slm.spec.num_layers
        if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer) or not 1 <= num_groups <= L:
            raise ValueError(f"num_groups must be in [1, {L}], got {num_groups!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 2:
            raise ValueError(
                f"max_new_tokens must be an integer >= 2 (one generated token is the dense prefill's), got "
                f"{max_new_tokens!r}"
            )
        actions = ActionMap(
            slm,
            layer_groups(L, int(num_groups)),
            discrete=discrete,
            presets=PRESETS if presets is None else presets,
            budget=budget,
            mlp_rules=mlp_rules,
        )
        return cls(slm, actions, int(max_new_tokens), token_exit_rule(slm, exit_threshold, exit_every))

    def observer(self) -> TokenObserver:
        """A fresh observer for one decoding sequence."""
        return TokenObserver(self.slm.spec, self.horizon)

    @property
    def feature_names(self) -> list[str]:
        """:data:`~envs.observation.TOKEN_FEATURES`."""
        from envs.observation import TOKEN_FEATURES

        return list(TOKEN_FEATURES)

    def observation_config(self) -> dict[str, Any]:
        """The token features' description."""
        return {"tokens": self.observer().config()}

    def config(self) -> dict[str, Any]:
        """As :meth:`Interface.config`, with the per-token exit rule when there is one."""
        cfg = super().config()
        if self.token_exit is not None:
            cfg["action"]["token_exit"] = {
                "exits": list(self.token_exit.exits),
                "threshold": self.token_exit.threshold,
                "lens_vocab": self.token_exit.lens_vocab,
            }
        return cfg

    @classmethod
    def _from_config(cls, cfg: Mapping[str, Any], slm: Any) -> PerTokenInterface:
        tokens = TokenObserver.from_config(dict(cfg["observation"]["tokens"]), slm.spec)
        action = {k: v for k, v in dict(cfg["action"]).items() if k != "token_exit"}
        rule = None
        if "token_exit" in cfg["action"]:
            from envs.runtime.staged import TokenExit

            te = cfg["action"]["token_exit"]
            rule = TokenExit(tuple(int(e) for e in te["exits"]), float(te["threshold"]), int(te["lens_vocab"]))
        return cls(slm, ActionMap.from_config(action, slm), tokens.horizon, rule)

    def decide(self, action: Any, past_len: int) -> tuple[SparsityPlan, np.ndarray, bool, bool]:
        """The plan of one action for the token after ``past_len`` cached ones (as :meth:`ActionMap.decide`)."""
        return self.actions.decide(action, 1, past_len)


def token_exit_rule(slm: Any, threshold: float | None, every: int, lens_vocab: int = 2048) -> Any:
    """The per-token exit rule of a threshold and a spacing (``None`` threshold: no exits).

    Raises:
        ValueError: A threshold outside [0, 1] or a spacing below 1.
    """
    if threshold is None:
        return None
    from envs.runtime.staged import TokenExit

    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"exit_threshold is a probability margin in [0, 1], got {threshold!r}")
    if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
        raise ValueError(f"exit_every must be an integer >= 1, got {every!r}")
    L = slm.spec.num_layers
    return TokenExit(
        tuple(range(int(every), L, int(every))), float(threshold), min(int(lens_vocab), slm.spec.vocab_size)
    )
