"""Machinery shared by the PruneGym environments: the model, the items, costs and scoring.

- One :class:`~envs.runtime.sparse_lm.SparseLM` per process and model (:func:`shared_lm`), so vector
  environments and several environments in one process never load copies.
- Dense references (what the dense model says about an item, and in measured mode its measured
  latency) are computed once per item and process, at the first reset that draws the item.
- What the agent sees and does is the environment's :class:`~envs.interface.Interface` (its
  observation and :class:`~envs.action.ActionMap`); the spaces are built from it, and
  :meth:`PruneEnv.config` describes it for export, evaluation and replay.
- :class:`StagedScorer` is the task :class:`~envs.tasks.scoring.Scorer` with one change: when the
  environment has already run the prompt under the plan (continuing from the probe's state), the
  scorer reuses that run instead of starting again, so scoring adds only the short continuation
  forward the scorer needs anyway (nothing, when the staged environment already ran the choices).

Bad actions are refused or clipped the same way in every environment (:mod:`envs.action`). Nothing
is left pruned: plans are values passed to a functional model, and no environment keeps a plan
between calls.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from envs.data.files import jsonable
from envs.observation import OBS_CLIP
from envs.rewards import RewardConfig
from envs.runtime.plan import PlanBuilder, SparsityPlan
from envs.runtime.sparse_lm import MODEL_ATTACHMENTS, Prefill
from envs.tasks.items import Item
from envs.tasks.scoring import Scorer, fed_logits

if TYPE_CHECKING:
    from envs.interface import Interface
    from envs.measure.cost_model import Cost, CostSource
    from envs.runtime.sparse_lm import SparseLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_CALIBRATION = {"seq_lens": (1, 32, 128, 384), "n_plans": 16}  # covers decode steps and prompts

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str], SparseLM] = {}
_ITEMS: dict[tuple[Any, ...], list[Item]] = {}
_DENSE: dict[tuple[Any, ...], Any] = {}


# ---------------------------------------------------------------------------------------- sharing
def shared_lm(model: str = "smollm2-135m", dtype: str = "float32", threads: int | None = None) -> SparseLM:
    """The process-wide :class:`SparseLM` for ``model`` and ``dtype`` (loaded on first use).

    Args:
        model: Any name :func:`envs.runtime.models.load_model` accepts.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        threads: PyTorch intra-op threads (process-wide; ``None`` leaves the setting alone).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    key = (model, dtype)
    with _LOCK:
        slm = _MODELS.get(key)
        if slm is None:
            from envs.runtime.sparse_lm import SparseLM

            slm = SparseLM.from_pretrained(model, dtype=DTYPES[dtype])
            _MODELS[key] = slm
    return slm


def ensure_cost_model(slm: SparseLM, path: str | Path | None = None) -> Path:
    """The calibrated cost model of ``slm`` at ``path`` (default: this device and thread count); a quick fit if missing.

    What ``calibrate_cost=True`` does in an environment. A caller about to start several processes
    that would each find it missing (the main job's parallel training) fits it here first, alone on
    the machine, so that its timings are not taken while the other processes run.
    """
    from envs.measure.cost_model import CostModel, default_path
    from envs.measure.meters import Meter

    path = Path(path) if path is not None else default_path(slm, str(slm.device))
    if not path.is_file():
        meter = Meter(str(slm.device), warmup=1, repeats=3, energy="off", memory=False)
        CostModel.fit(slm, meter=meter, **QUICK_CALIBRATION).save(path)  # type: ignore[arg-type]
    return path


def load_items(task: str | Mapping[str, float], split: str | None, n: int | None, seed: int) -> list[Item]:
    """Items of a mix (a name in ``MIXES``, a YAML file or a mapping) or of one task, cached per process."""
    from envs.tasks.mixes import MIXES, load_mix
    from envs.tasks.sources import load_task

    key = (repr(sorted(task.items())) if isinstance(task, Mapping) else str(task), split, n, seed)
    with _LOCK:
        if key in _ITEMS:
            return _ITEMS[key]
    if isinstance(task, Mapping) or str(task) in MIXES or str(task).endswith((".yaml", ".yml")):
        items = load_mix(task, split=split, n=n, seed=seed)
    else:
        items = load_task(str(task), split)
        rng = np.random.default_rng(seed)
        items = [items[i] for i in rng.permutation(len(items))][: n if n is not None else None]
    if not items:
        raise ValueError(f"task {task!r} has no items in split {split!r}; pick another split or task")
    with _LOCK:
        _ITEMS[key] = items
    return items


def clear_caches() -> None:
    """Forget the shared models, items and dense references (tests, memory pressure)."""
    with _LOCK:
        _MODELS.clear()
        _ITEMS.clear()
        _DENSE.clear()


# ---------------------------------------------------------------------------------------- scoring
class StagedScorer(Scorer):
    """A :class:`Scorer` that reuses a prompt already run by the environment (see :class:`Prefill`)."""

    prefill: Prefill | None = None

    def _cont_logprobs(
        self, slm: Any, prompt: list[int], conts: list[list[int]], plan: Any, tail: bool
    ) -> list[torch.Tensor]:
        pre = self.prefill
        if pre is None or pre.plan is not plan or pre.prompt != prompt:
            return super()._cont_logprobs(slm, prompt, conts, plan, tail)
        if any(len(c) == 0 for c in conts):
            raise ValueError("a continuation tokenised to nothing; check the item's answer/choices")
        feed = [len(c) - 1 + int(tail) for c in conts]
        width = max(feed)
        rest: list[torch.Tensor] = []
        with torch.no_grad():
            if pre.rest is not None and not tail and pre.rest_conts == conts:
                rest = fed_logits(slm, pre.rest, feed)  # the staged environment ran these continuations already
            elif width > 0:
                x = torch.tensor([c[:f] + [0] * (width - f) for c, f in zip(conts, feed, strict=True)])
                cache = pre.cache.expanded(len(conts))  # a new cache object: the prefill stays reusable
                rest = fed_logits(slm, slm.forward(x.to(slm.device), plan, cache=cache, logits="none").hidden, feed)
            rows = [pre.first if f == 0 else torch.cat([pre.first, rest[i]]) for i, f in enumerate(feed)]
        return [torch.log_softmax(r.float(), dim=-1) for r in rows]


# ---------------------------------------------------------------------------------------- the base env
class PruneEnv(gym.Env):
    """Settings, model, items, cost source and action handling shared by the three environments.

    Subclasses define the spaces, ``reset`` and ``step``; the constructor arguments are documented
    in each environment's docstring (section Arguments).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        *,
        model: str = "smollm2-135m",
        task: str | Mapping[str, float] = "generated",
        split: str | None = "val",
        n_items: int | None = 64,
        data_seed: int = 0,
        max_prompt_tokens: int = 512,
        cost: str = "calibrated",
        cost_model: Any = None,
        calibrate_cost: bool = False,
        force_calibration: bool = False,
        meter: Mapping[str, Any] | None = None,
        reward: RewardConfig | Mapping[str, Any] | None = None,
        scorer: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        predictor: str | None = None,
        exit_maps: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if cost not in ("measured", "calibrated"):
            raise ValueError(f"cost must be 'measured' or 'calibrated', got {cost!r}")
        self.render_mode = render_mode
        self.model_name, self.dtype_name = model, dtype
        self.slm = shared_lm(model, dtype, threads)
        if predictor is not None:
            with _LOCK:
                if self.slm.predictor_name != predictor:
                    from envs.runtime.predictor import load_predictor

                    self.slm.set_predictor(load_predictor(predictor, self.slm), name=predictor)
        with _LOCK:  # the model is shared: its exit maps are what the last environment made asked for
            if exit_maps is None:
                self.slm.set_exit_maps(None)
            elif self.slm.exit_maps_name != exit_maps:
                from envs.runtime.exit_maps import load_exit_maps

                self.slm.set_exit_maps(load_exit_maps(exit_maps, self.slm), name=exit_maps)
        self.spec_ = self.slm.spec
        self.cost_kind = cost
        self.reward_cfg = RewardConfig.from_any(reward)
        self.scorer = StagedScorer(**dict(scorer or {}))
        if self.scorer.tokenizer is None and self.slm.tokenizer is None:
            raise ValueError(f"model {model!r} has no tokenizer; pass scorer={{'tokenizer': ...}}")
        items = load_items(task, split, n_items, data_seed)
        self.items = [it for it in items if 0 < len(self.scorer.encode(self.slm, it.prompt)) <= max_prompt_tokens]
        if not self.items:
            raise ValueError(
                f"no item of task {task!r} has a prompt of 1..{max_prompt_tokens} tokens; raise max_prompt_tokens"
            )
        self.task_name = task if isinstance(task, str) else "custom-mix"
        self._data = {
            "task": task if isinstance(task, str) else dict(task),
            "split": split,
            "n_items": n_items,
            "data_seed": int(data_seed),
            "max_prompt_tokens": int(max_prompt_tokens),
            "items": len(self.items),
        }
        self.meter_cfg = {"warmup": 0, "repeats": 1, "energy": "off", "memory": False, **dict(meter or {})}
        self.cost_source = self._make_cost_source(cost_model, calibrate_cost, force_calibration)
        sc = self.scorer
        self._dense_key = (model, dtype, self.cost_kind, sc.mc_norm, sc.mc_metric, sc.exact_method, sc.max_new_tokens)
        self._last_render = ""

    # ------------------------------------------------------------------ setup helpers
    def _make_cost_source(self, cost_model: Any, calibrate: bool, force: bool) -> CostSource:
        from envs.measure.cost_model import CostModel, default_path, make_cost_source
        from envs.measure.meters import Meter

        slm = self.slm
        if self.cost_kind == "measured":
            return make_cost_source("measured", slm=slm, meter=Meter(str(slm.device), **self.meter_cfg))
        if isinstance(cost_model, CostModel):
            return make_cost_source("calibrated", slm=slm, cost_model=cost_model, force=force)
        path = Path(cost_model) if cost_model is not None else default_path(slm, str(slm.device))
        if not path.is_file():
            if not calibrate:
                raise FileNotFoundError(
                    f"cost='calibrated' needs a cost model for {slm.name!r} on this device at {path}, and there is "
                    "none. "
                    f"Make one with `python -m experiments.calibrate_cost --model {slm.name}` (same --threads as "
                    "this process), pass calibrate_cost=True to fit a quick one now (about a minute for the embedded "
                    "model), pass cost_model=<path>, or use cost='measured'."
                )
            ensure_cost_model(slm, path)
        return make_cost_source("calibrated", slm=slm, path=path, force=force)

    def _meter(self) -> Any:
        return getattr(self.cost_source, "meter", None)

    # ------------------------------------------------------------------ spaces
    def _set_spaces(self, interface: Interface) -> None:
        """The Gymnasium spaces of ``interface`` (the one description of observation and action)."""
        acts = interface.actions
        if acts.discrete:
            self.action_space = gym.spaces.Discrete(acts.n)
        else:
            self.action_space = gym.spaces.Box(0.0, 1.0, shape=acts.shape, dtype=np.float32)
        n = interface.observation_size
        self.observation_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(n,), dtype=np.float32)
        self.interface = interface

    # ------------------------------------------------------------------ items and references
    def _pick_item(self, options: dict[str, Any] | None) -> Item:
        """The item of this episode: ``options["item"]`` (index or id) or a draw from ``np_random``."""
        if options and "item" in options:
            sel = options["item"]
            if isinstance(sel, str):
                for it in self.items:
                    if it.id == sel:
                        return it
                raise ValueError(f"no item with id {sel!r} in this environment")
            return self.items[int(sel) % len(self.items)]
        return self.items[int(self.np_random.integers(len(self.items)))]

    def _dense_cached(self, kind: str, item: Item, fn: Callable[[], Any]) -> Any:
        key = (*self._dense_key, kind, item.id)
        value = _DENSE.get(key)
        if value is None:
            value = fn()
            with _LOCK:
                if len(_DENSE) > 100_000:
                    _DENSE.clear()
                _DENSE[key] = value
        return value

    def _prompt_ids(self, item: Item) -> list[int]:
        return self.scorer.encode(self.slm, item.prompt)

    def _dense_prefill_cost(self, item: Item, ids: torch.Tensor) -> Cost:
        """Cost of the dense model on the prompt (measured once per item, or predicted)."""
        dense = self.slm.dense_plan()
        if self.cost_kind == "calibrated":
            return self.cost_source.cost(dense, None, ids.shape[1])

        def run() -> Any:
            return self.slm.forward(ids, dense, logits="last")

        return self._dense_cached("prefill_cost", item, lambda: self.cost_source.cost(dense, run, ids.shape[1]))

    # ------------------------------------------------------------------ figures
    def _fractions_of(self, cost: Cost, dense: Cost) -> tuple[float, float | None]:
        lat = cost.latency_s / max(dense.latency_s, 1e-12)
        en = None
        if cost.energy_j is not None and dense.energy_j:
            en = cost.energy_j / dense.energy_j
        return lat, en

    @staticmethod
    def _cost_info(cost: Cost, dense: Cost, lat_frac: float, en_frac: float | None) -> dict[str, Any]:
        return {
            "latency_s": cost.latency_s,
            "dense_latency_s": dense.latency_s,
            "latency_fraction": lat_frac,
            "latency_source": cost.source,
            "energy_j": cost.energy_j,
            "dense_energy_j": dense.energy_j,
            "energy_fraction": en_frac,
            "energy_source": cost.energy_source,
            "cost_source": cost.source,
            "device": cost.device,
            "cost_noisy": bool(cost.noisy),
        }

    def render(self) -> str | None:
        """The plan of the last step as text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi":
            return None
        return self._last_render or "(no step yet)"

    # ------------------------------------------------------------------ description
    def policy_start(self, keep: float) -> np.ndarray:
        """Where a Gaussian policy starts (``agents.rllib.start_policy_at``): every keep fraction at ``keep``.

        Continuous actions only; environments whose action has entries other than keep fractions
        say where those start.
        """
        return np.full(self.action_space.shape, float(keep), np.float32)

    @property
    def discrete(self) -> bool:
        """Whether the action is a discrete preset."""
        return self.interface.actions.discrete

    @property
    def budget(self) -> float | None:
        """The action wall's FLOPs budget, or ``None``."""
        return self.interface.actions.budget

    @property
    def presets(self) -> np.ndarray:
        """The discrete presets (``[n, 3]`` keep fractions)."""
        return self.interface.actions.presets

    @property
    def builder(self) -> PlanBuilder:
        """Keep fractions -> plan (the interface's action map)."""
        return self.interface.actions.builder

    @property
    def groups(self) -> list[list[int]]:
        """The action's layer groups."""
        return self.interface.actions.groups

    @property
    def num_groups(self) -> int:
        """Number of layer groups."""
        return len(self.groups)

    def config(self) -> dict[str, Any]:
        """This environment, completely and JSON-ready: what it is, what its agent sees and does, on what.

        ``interface`` is the only thing an exported controller, ``adaptive_generate``, the evaluation
        and replay rebuild observations and plans from (:meth:`envs.interface.Interface.from_config`).
        """
        from envs import ENV_VERSIONS

        name = type(self).__name__
        return {
            "id": self.spec.id if self.spec is not None else None,
            "env": name,
            "kwargs": jsonable(dict(self.spec.kwargs) if self.spec is not None else {}),
            "version": ENV_VERSIONS.get(name),
            "interface": self.interface.config(),
            "model": {"name": self.model_name, "dtype": self.dtype_name, "weights_hash": self.slm.weights_hash}
            | {k: getattr(self.slm, f"{k}_name") for k in MODEL_ATTACHMENTS if getattr(self.slm, k) is not None},
            "data": dict(self._data),
            "cost": {"kind": self.cost_kind, "source": self.cost_source.describe()},
            "reward": self.reward_cfg.to_dict(),
            "scorer": self.scorer.config(),
        }


def plan_summary(plan: SparsityPlan) -> dict[str, Any]:
    """A compact JSON-ready summary of a plan for ``info``."""
    keep = plan.keep_fractions()
    return {
        "describe": plan.describe(),
        "layers_run": plan.layers_run,
        "keep_layers": keep["layers"],
        "keep_heads": keep["heads"],
        "keep_kv_heads": keep["kv_heads"],
        "keep_mlp": keep["mlp"],
        "counts": list(plan.meta.get("counts", [])),
    }


def finite(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` when it is missing or not finite."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)
