"""``PruneGym/LayerByLayer-v0``: decide the plan one decoder layer (or layer group) at a time, AMC-style."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import wall
from envs.observation import OBS_CLIP
from envs.per_input import PerInput
from envs.rewards import RewardConfig

# Per-layer presets of the discrete variant: (run, heads, mlp); "skip" last.
LAYER_PRESETS: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),
    (1.0, 1.0, 0.5),
    (1.0, 0.75, 0.75),
    (1.0, 0.5, 1.0),
    (1.0, 0.5, 0.5),
    (1.0, 0.25, 0.25),
    (0.0, 0.0, 0.0),
)
LAYER_FEATURES = (
    "step",
    "importance",
    "flops_share",
    "used",
    "remaining_share",
    "prev_layers",
    "prev_heads",
    "prev_mlp",
    "budget",
)


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

    ## Version History

    - v0: first version.
    """

    def __init__(
        self,
        *,
        num_groups: int | None = None,
        presets: Sequence[Sequence[float]] | None = None,
        reward: RewardConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from envs.base import shared_lm

        probe_layers = int(kwargs.get("probe_layers", 2))
        if num_groups is None:
            slm = shared_lm(kwargs.get("model", "smollm2-135m"), kwargs.get("dtype", "float32"), kwargs.get("threads"))
            first = 0 if kwargs.get("probe_prunable", False) else probe_layers
            num_groups = max(slm.spec.num_layers - first, 1)
        super().__init__(
            num_groups=num_groups,
            presets=LAYER_PRESETS if presets is None else presets,
            reward=reward,
            **kwargs,
        )
        G, L = self.num_groups, self.spec_.num_layers
        self.action_space = self._action_space(1)
        n = len(LAYER_FEATURES) + self.probe.dim
        self.observation_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(n,), dtype=np.float32)
        scores = list(self.slm.importance.layer_scores)
        if len(scores) != L:  # no calibration scores: fall back to the ordering's ranks
            rank = {layer: r for r, layer in enumerate(self.slm.importance.layer_order)}
            scores = [1.0 - rank[i] / L for i in range(L)]
        top = max(max(scores), 1e-12)
        self._importance = np.array([np.mean([scores[i] / top for i in g]) for g in self.groups], dtype=np.float64)
        self._share = np.array([len(g) / L for g in self.groups], dtype=np.float64)
        self._after = np.array([self._share[t + 1 :].sum() for t in range(G)], dtype=np.float64)
        self._t = 0
        self._fr = np.zeros((G, 3))
        self._any_clipped = self._any_walled = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw an item and probe it; the first observation describes the first group."""
        _, info = super().reset(seed=seed, options=options)
        self._t = 0
        self._fr = np.zeros((self.num_groups, 3))
        self._any_clipped = self._any_walled = False
        return self._layer_obs(), info

    def _used(self, t: int) -> float:
        """FLOPs fraction of the groups before ``t`` (later ones at zero), probe layers included."""
        f = self._fr.copy()
        f[t:] = 0.0
        return self.builder.flops_fraction(self.builder.plan(f), self._probe_res.prompt_len)

    def _layer_obs(self) -> np.ndarray:
        t = self._t
        prev = self._fr[t - 1] if t > 0 else np.ones(3)
        head = [
            t / self.num_groups,
            self._importance[t],
            self._share[t],
            self._used(t),
            self._after[t],
            *prev,
            1.0 if self.budget is None else self.budget,
        ]
        return np.clip(np.concatenate([np.asarray(head, np.float32), self._obs]), -OBS_CLIP, OBS_CLIP).astype(
            np.float32
        )

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Set the current group's fractions; after the last group run, score and pay the reward."""
        if self._done or self._item is None:
            raise RuntimeError("the episode is over: call reset() before step()")
        fr, clipped = self._fractions(action, 1)
        t, P = self._t, self._probe_res.prompt_len

        def cost_of(f: np.ndarray) -> float:
            full = self._fr.copy()
            full[t] = f[0]
            full[t + 1 :] = 0.0
            return self.builder.flops_fraction(self.builder.plan(full), P)

        fr, walled = wall(fr, cost_of, self.budget)
        self._fr[t] = fr[0]
        self._any_clipped |= clipped
        self._any_walled |= walled
        self._t += 1
        if self._t < self.num_groups:
            self._last_render = f"item {self._item.id}: group {t} set to {np.round(fr[0], 3).tolist()}"
            info = {"group": t, "action_clipped": clipped, "wall_clipped": walled}
            return self._layer_obs(), 0.0, False, False, info
        r, info = self._finish(self._fr, {"action_clipped": self._any_clipped, "wall_clipped": self._any_walled})
        self._t = self.num_groups - 1  # the terminal observation describes the last group
        obs = self._layer_obs()
        return obs, r, True, False, info
