"""``PruneGym/LayerByLayer-v0``: decide the plan one decoder layer (or layer group) at a time, AMC-style."""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.action import LAYER_PRESETS
from envs.interface import LayerByLayerInterface
from envs.observation import LAYER_FEATURES
from envs.per_input import PerInput

__all__ = ["LAYER_FEATURES", "LAYER_PRESETS", "LayerByLayer"]


class LayerByLayer(PerInput):
    """One input per episode, one step per layer group: the agent sets each group's keep fractions in turn.

    The episode's input is probed as in :class:`~envs.per_input.PerInput`. Step ``t`` decides the
    keep fractions of layer group ``t`` (by default every layer after the probe is its own group, as
    in AMC); after the last group the prompt is finished under the assembled plan from the probe's
    state, the item is scored, and the reward is paid.

    ## Action Space

    Continuous (``PruneGym/LayerByLayer-v0``): ``Box(0, 1, (3,), float32)``: for the current group,
    the fraction of its layers that run (the least important are skipped; for a one-layer group the
    layer runs when the fraction is >= 0.5), and the fractions of query heads (whole KV groups first)
    and MLP channels kept in its running layers. Out-of-range values and ``+-inf`` are clipped into
    [0, 1]; NaN or a wrong shape raise ``ValueError``.

    Discrete (``PruneGym/LayerByLayerDiscrete-v0``): ``Discrete(len(presets))`` over per-group
    triples (default :data:`LAYER_PRESETS`: dense first, skip last); out of range raises ``ValueError``.

    With ``budget`` set, the action wall scales the current group's fractions down so that the
    FLOPs of the groups decided so far, this one, the probe layers and the cheapest possible choice
    for the groups still to come (nothing) stay within ``budget`` of dense.

    ## Observation Space

    ``Box(-10, 10, (9 + n_probe,), float32)``: the current group's description (:data:`LAYER_FEATURES`:
    step ``t / G``; the group's importance, its mean block influence from the model's importance
    calibration over the largest layer's; its share of the decoder's FLOPs; the FLOPs fraction used by
    the groups decided so far, probe layers included; the share of the groups after it; the previous
    step's three fractions; the budget, 1 without one) followed by the probe features of
    :class:`~envs.per_input.PerInput`.

    ## Rewards

    Zero for every step but the last; then :func:`envs.rewards.reward` of the item's accuracy and
    its cost relative to dense, exactly as in :class:`~envs.per_input.PerInput`.

    ## Episode End

    Terminates after ``num_groups`` steps. Never truncates.

    ## Arguments

    Those of :class:`~envs.per_input.PerInput`, except ``num_groups``: ``None`` (default) gives one
    group per layer after the probe; an integer groups them contiguously.
    ``mlp_rules`` takes one rule only (every plan runs it): one step decides one group, and a rule
    chosen per step is not built.

    ## Version History

    - v0: first version.
    """

    interface_class = LayerByLayerInterface
    interface: LayerByLayerInterface

    def __init__(self, *, num_groups: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_groups=num_groups, **kwargs)
        self._t = 0
        self._fr = np.zeros((self.num_groups, 3))
        self._any_clipped = self._any_walled = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw an item and probe it; the first observation describes the first group."""
        _, info = super().reset(seed=seed, options=options)
        self._t = 0
        self._fr = np.zeros((self.num_groups, 3))
        self._any_clipped = self._any_walled = False
        return self._layer_obs(), info

    def _layer_obs(self) -> np.ndarray:
        return self.interface.step_observation(self._obs, self._t, self._fr, self._probe_res.prompt_len)  # type: ignore[arg-type]

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Set the current group's fractions; after the last group run, score and pay the reward.

        A step that raises (a bad action, an interrupted forward) leaves the episode where it was.
        """
        if self._done or self._item is None:
            raise RuntimeError("the episode is over: call reset() before step()")
        t = self._t
        fr_t, clipped, walled = self.interface.step_fractions(action, t, self._fr, self._probe_res.prompt_len)
        if t + 1 < self.num_groups:
            self._fr[t] = fr_t
            self._any_clipped |= clipped
            self._any_walled |= walled
            self._t = t + 1
            self._last_render = f"item {self._item.id}: group {t} set to {np.round(fr_t, 3).tolist()}"
            info = {"group": t, "action_clipped": clipped, "wall_clipped": walled}
            return self._layer_obs(), 0.0, False, False, info
        fr = self._fr.copy()
        fr[t] = fr_t
        flags = {"action_clipped": self._any_clipped or clipped, "wall_clipped": self._any_walled or walled}
        r, info = self._finish(self.interface.actions.plan(fr), fr, flags)  # the episode advances only if this returns
        self._fr = fr
        obs = self._layer_obs()  # the terminal observation describes the last group
        return obs, r, True, False, info
