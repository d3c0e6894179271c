"""``PruneGym/<Name>DiscreteReplay-v0``: a recorded environment, replayed by table look-up.

Algorithm comparisons need many seeds at meaningful budgets, which the live environments (an LLM
forward per step) cannot give on a CPU. A replay twin serves the outcomes ``python -m
experiments.record`` recorded for every discrete action path on every input of a split
(:mod:`envs.data.records`), thousands of times faster, with the live environment's spaces, its
observations and the same pure reward function, so what is learnt on the twin transfers to the
live environment (``python -m experiments.validate`` checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from envs.action import discrete_action
from envs.data.records import ReplayData, ReplayDataError
from envs.observation import OBS_CLIP
from envs.rewards import RewardConfig, reward, reward_range

LATENCIES = ("calibrated", "median", "sample")


class Replay(gym.Env):
    """A discrete ``PerInput`` or ``LayerByLayer`` environment replayed from a recorded dataset.

    At reset the twin draws one of the recorded inputs (``np_random``, or ``options["item"]``: an
    index into the recorded inputs or an item id); each step looks its outcome up. Nothing runs a
    model, so a step costs microseconds.

    ## Action Space

    ``Discrete(n)`` over the recorded environment's presets, validated as the live environment
    validates a discrete action (:func:`envs.action.discrete_action`). Discrete only: the twin can
    only answer what was recorded, and a continuous action between recorded presets has no recorded
    outcome (mapping it to the nearest preset would silently change the task the agent learns).

    ## Observation Space

    The recorded environment's, ``Box(-10, 10, (n,), float32)``: the observation it gave before
    each step of the path taken so far (recorded through its own interface).

    ## Rewards

    :func:`envs.rewards.reward` of the recorded accuracy (``reward["accuracy"]``: dense-relative or
    raw) and the latency (and energy) fraction, on the last step of a path (0 before, as in
    ``LayerByLayer``). ``latency`` picks the fraction: ``"calibrated"`` (default) the cost model's
    figure the live calibrated environment computes, so the twin's rewards equal the live ones;
    ``"median"`` the median of the measured repeats of the plan over the median of the dense
    model's, timed in the same rounds; ``"sample"`` one recorded round, drawn from ``np_random``
    (realistic noise, still reproducible under a seed).

    ## Episode End

    Terminates after the recorded environment's number of steps (1 for ``PerInput``, its layer
    groups for ``LayerByLayer``). Never truncates.

    ## Arguments

    - ``dataset``: the dataset folder, or a folder holding one recording per split (``<dataset>/<split>``).
    - ``split``: which split's recording (``None``: the one ``dataset`` is); a recording of another
      split is refused, so training and held-out evaluation cannot silently share inputs.
    - ``latency``: ``"calibrated"``, ``"median"`` or ``"sample"``.
    - ``reward``: :class:`~envs.rewards.RewardConfig` fields (any weighting: the recorded figures
      do not depend on it).
    - ``expect``: what the dataset must have been recorded with (``model``, ``weights_hash``,
      ``env``, ``version``, ``split``, ``task``); a mismatch raises naming it and the command that
      rebuilds the dataset.
    - ``allow_mixed_machines``: replay shards recorded on different machine kinds.
    - ``kind``: the recorded environment the caller expects (``"PerInput"`` or ``"LayerByLayer"``).
    - ``render_mode``: ``"ansi"`` or ``None``.
    - ``threads``: accepted and unused (no model runs), so the training layer's settings apply unchanged.

    ## Version History

    - v0: first version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        *,
        dataset: str | Path,
        split: str | None = None,
        latency: str = "calibrated",
        reward: RewardConfig | Mapping[str, Any] | None = None,
        expect: Mapping[str, Any] | None = None,
        allow_mixed_machines: bool = False,
        kind: str | None = None,
        render_mode: str | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        del threads  # no model runs here; accepted so that training settings apply to a twin unchanged
        if latency not in LATENCIES:
            raise ValueError(f"latency must be one of {LATENCIES}, got {latency!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        folder = Path(dataset)
        if split is not None and (folder / split / "card.json").is_file():
            folder = folder / split  # a folder of recordings, one per split (experiments.record's default layout)
        self.data = ReplayData.load(
            folder,
            expect={**dict(expect or {}), "env": kind, "split": split},
            allow_mixed_machines=allow_mixed_machines,
        )
        if latency == "calibrated" and np.isnan(self.data.latency).any():
            raise ReplayDataError(f"{dataset} has no calibrated latencies; use latency='median' or 'sample'")
        self.latency, self.render_mode = latency, render_mode
        self.reward_cfg = RewardConfig.from_any(reward)
        self.reward_range = reward_range(self.reward_cfg)
        iface = self.data.card["env"]["interface"]
        self.action_space = gym.spaces.Discrete(self.data.n_actions)
        dim = int(np.prod(iface["observation"]["shape"]))
        self.observation_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(dim,), dtype=np.float32)
        self._accuracy = self.data.rel if self.reward_cfg.accuracy == "dense_relative" else self.data.raw
        self._median = self.data.median_latency
        self._ids = {item: i for i, item in enumerate(self.data.item_ids)}
        self._n = self.data.n_actions
        self._item = -1
        self._row = 0  # the path number so far (a prefix padded with action 0)
        self._t = 0
        self._done = True
        self._last: tuple[int, dict[str, Any] | None, float] | None = None  # what render() shows, built on demand

    def config(self) -> dict[str, Any]:
        """The twin's description: the recorded environment's (``interface`` included) and the replay settings."""
        return {
            **self.data.card["env"],
            "replay": {"latency": self.latency, "machines": self.data.machines, "inputs": self.data.n_inputs},
            "reward": self.reward_cfg.to_dict(),
        }

    @property
    def n_inputs(self) -> int:
        """Recorded inputs."""
        return self.data.n_inputs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw a recorded input; the observation is the recorded environment's first."""
        super().reset(seed=seed)
        if options and "item" in options:
            sel = options["item"]
            if isinstance(sel, str):
                if sel not in self._ids:
                    raise ValueError(f"no recorded input with id {sel!r}")
                self._item = self._ids[sel]
            else:
                self._item = int(sel) % self.n_inputs
        else:
            self._item = int(self.np_random.integers(self.n_inputs))
        self._row, self._t, self._done = 0, 0, False
        i = self._item
        self._last = (i, None, 0.0)
        return self.data.obs[i, 0, 0].copy(), {"item_id": self.data.item_ids[i], "task": self.data.tasks[i]}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Look the step's outcome up; the last step of a path pays the reward."""
        if self._done:
            raise RuntimeError("the episode is over: call reset() before step()")
        a = discrete_action(action, self._n)
        steps = self.data.steps
        t = self._t
        row = self._row + a * self._n ** (steps - 1 - t)
        i = self._item
        if t + 1 < steps:
            self._row, self._t = row, t + 1
            return self.data.obs[i, row, t + 1].copy(), 0.0, False, False, {"group": t}
        self._row, self._done = row, True
        if self.latency == "calibrated":
            lat = float(self.data.latency[i, row])
        elif self.latency == "median":
            lat = float(self._median[i, row])
        else:
            j = int(self.np_random.integers(self.data.latency_s.shape[2]))
            lat = float(self.data.latency_s[i, row, j] / self.data.dense_latency_s[i, row, j])
        en = float(self.data.energy[i, row])
        en_f = None if np.isnan(en) else en
        acc = float(self._accuracy[i, row])
        r = reward(acc, lat, en_f, self.reward_cfg)
        info = {
            "item_id": self.data.item_ids[i],
            "task": self.data.tasks[i],
            "accuracy": acc,
            "accuracy_raw": float(self.data.raw[i, row]),
            "accuracy_dense_relative": float(self.data.rel[i, row]),
            "flops_fraction": float(self.data.flops[i, row]),
            "latency_fraction": lat,
            "energy_fraction": en_f,
            "latency_source": self.latency,
            "path": self.data.path(row),
            "reward_form": self.reward_cfg.form,
        }
        self._last = (i, info, float(r))
        return self.data.obs[i, row, steps - 1].copy(), float(r), True, False, info

    def render(self) -> str | None:
        """The last step as text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi":
            return None
        if self._last is None:
            return ""
        i, info, r = self._last
        text = f"recorded input {self.data.item_ids[i]} ({self.data.tasks[i]})"
        if info is not None:
            text += (
                f": path {info['path']}, accuracy {info['accuracy']:.2f}, latency {info['latency_fraction']:.0%}, "
                f"reward {r:+.3f}"
            )
        return text
