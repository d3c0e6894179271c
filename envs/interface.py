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


# ---------------------------------------------------------------------------------------- per token
class PerTokenInterface(Interface):
    """``PerToken``: the features of the forward that predicted the current token, then that token's plan.

    Args:
        slm: The model.
        actions: The action map over every layer.
        horizon: ``max_new_tokens`` (the step feature's scale).
    """

    kind = "per_token"

    def __init__(self, slm: Any, actions: ActionMap, horizon: int) -> None:
        super().__init__(slm, actions)
        self.horizon = int(horizon)

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
    ) -> PerTokenInterface:
        """The interface of ``PerToken`` with these arguments."""
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
        return cls(slm, actions, int(max_new_tokens))

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

    @classmethod
    def _from_config(cls, cfg: Mapping[str, Any], slm: Any) -> PerTokenInterface:
        tokens = TokenObserver.from_config(dict(cfg["observation"]["tokens"]), slm.spec)
        return cls(slm, ActionMap.from_config(cfg["action"], slm), tokens.horizon)

    def decide(self, action: Any, past_len: int) -> tuple[SparsityPlan, np.ndarray, bool, bool]:
        """The plan of one action for the token after ``past_len`` cached ones (as :meth:`ActionMap.decide`)."""
        return self.actions.decide(action, 1, past_len)
