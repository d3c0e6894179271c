"""Machinery shared by the PruneGym environments: the model, the items, actions, plans, costs and scoring.

- One :class:`~envs.runtime.sparse_lm.SparseLM` per process and model (:func:`shared_lm`), so vector
  environments and several environments in one process never load copies.
- Dense references (what the dense model says about an item, and in measured mode its measured
  latency) are computed once per item and process, at the first reset that draws the item.
- Actions become plans through :func:`plan_from_fractions`, which caches plans by their integer
  counts (the same counts give the same plan object, so :class:`SparseLM`'s per-layer weight views
  are reused too).
- :class:`StagedScorer` is the task :class:`~envs.tasks.scoring.Scorer` with one change: when the
  environment has already run the prompt under the plan (continuing from the probe's state), the
  scorer reuses that run instead of starting again, so scoring adds only the short continuation
  forward the scorer needs anyway.

Bad actions (the same for every environment): a continuous action is converted to float64; the
wrong shape or any NaN raises :class:`ValueError` naming the expected shape; ``+-inf`` and values
outside [0, 1] are clipped into [0, 1] (``info["action_clipped"]`` says so). A discrete action must be
an integer in range, else :class:`ValueError`. Nothing is left pruned: plans are values passed to a
functional model, and no environment keeps a plan between calls.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from envs.rewards import RewardConfig
from envs.runtime.plan import LayerPlan, SparsityPlan, select_heads
from envs.tasks.items import Item
from envs.tasks.scoring import Scorer, _expand_cache

if TYPE_CHECKING:
    from envs.measure.cost_model import Cost, CostSource
    from envs.runtime.sparse_lm import KVCache, SparseLM

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


# ---------------------------------------------------------------------------------------- plans
class PlanBuilder:
    """Builds plans from keep fractions per layer group, with the probe layers held dense.

    Args:
        slm: The model (its spec and importance orderings).
        groups: Layer groups the fractions apply to (lists of layer indices).
        fixed_dense: Layers that always run densely (the probe's, unless they are prunable).
    """

    def __init__(self, slm: SparseLM, groups: Sequence[Sequence[int]], fixed_dense: Sequence[int] = ()) -> None:
        self.slm, self.spec, self.imp = slm, slm.spec, slm.importance
        self.groups = [list(g) for g in groups]
        self.fixed = set(fixed_dense)
        rank = {layer: r for r, layer in enumerate(self.imp.layer_order)}
        self._by_importance = [sorted(g, key=rank.__getitem__) for g in self.groups]
        s = self.spec
        self._dense_layer = LayerPlan(
            True, tuple(range(s.num_heads)), tuple(range(s.num_kv_heads)), s.intermediate_size
        )
        self._off = LayerPlan(False, (), (), 0)
        self._layer_cache: dict[tuple[int, int, int], LayerPlan] = {}
        self._plans: dict[tuple[int, ...], SparsityPlan] = {}
        self._dense_flops: dict[int, float] = {}

    def counts(self, fractions: np.ndarray) -> tuple[int, ...]:
        """Integer counts (layers run, heads, MLP channels) per group that ``fractions`` (``[G, 3]``) mean."""
        s = self.spec
        out: list[int] = []
        for g, (fl, fh, fm) in enumerate(np.asarray(fractions, dtype=np.float64).reshape(-1, 3)):
            out += [round(fl * len(self.groups[g])), round(fh * s.num_heads), round(fm * s.intermediate_size)]
        return tuple(out)

    def _layer(self, i: int, nh: int, nc: int) -> LayerPlan:
        key = (i, nh, nc)
        lp = self._layer_cache.get(key)
        if lp is None:
            hp = select_heads(self.spec, self.imp.head_order[i], self.imp.kv_order[i], nh)
            lp = LayerPlan(True, hp.heads if hp else (), hp.kv_heads if hp else (), nc)
            self._layer_cache[key] = lp
        return lp

    def plan(self, fractions: np.ndarray) -> SparsityPlan:
        """The plan for ``fractions`` (``[G, 3]`` or ``3 * G`` numbers in [0, 1])."""
        key = self.counts(fractions)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        layers = [self._dense_layer] * self.spec.num_layers
        for g, members in enumerate(self._by_importance):
            n_run, nh, nc = key[3 * g : 3 * g + 3]
            running = set(members[:n_run])
            for i in members:
                if i in self.fixed:
                    continue
                layers[i] = self._layer(i, nh, nc) if i in running else self._off
        plan = SparsityPlan(self.spec, tuple(layers), {"kind": "env", "counts": list(key)})
        if len(self._plans) > 20_000:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def flops_fraction(self, plan: SparsityPlan, seq_len: int, past_len: int = 0) -> float:
        """Decoder FLOPs of ``plan`` relative to the dense plan."""
        key = (seq_len, past_len)
        dense = self._dense_flops.get(key)  # type: ignore[call-overload]
        if dense is None:
            dense = SparsityPlan.dense(self.spec).flops(seq_len, past_len)["total"]
            self._dense_flops[key] = dense  # type: ignore[index]
        return plan.flops(seq_len, past_len)["total"] / dense


def wall(
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


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class Prefill:
    """The prompt already run under ``plan``: the scorer continues from here.

    Attributes:
        prompt: Prompt token ids.
        plan: The plan it ran under (identity-compared with the plan the scorer is given).
        cache: KV cache after the prompt (length advanced).
        first: Logits at the last prompt position, ``[1, V]``.
    """

    prompt: list[int]
    plan: SparsityPlan
    cache: KVCache
    first: torch.Tensor


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
        rest = None
        with torch.no_grad():
            if width > 0:
                x = torch.tensor([c[:f] + [0] * (width - f) for c, f in zip(conts, feed, strict=True)])
                cache = _expand_cache(pre.cache, len(conts))  # a new cache object: the prefill stays reusable
                rest = slm.forward(x.to(slm.device), plan, cache=cache, logits="all").logits
            rows = [pre.first if f == 0 else torch.cat([pre.first, rest[i, :f]]) for i, f in enumerate(feed)]  # type: ignore[index]
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
        num_groups: int = 3,
        discrete: bool = False,
        presets: Sequence[Sequence[float]] | None = None,
        budget: float | None = None,
        cost: str = "calibrated",
        cost_model: Any = None,
        calibrate_cost: bool = False,
        force_calibration: bool = False,
        meter: Mapping[str, Any] | None = None,
        reward: RewardConfig | Mapping[str, Any] | None = None,
        scorer: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if budget is not None and not (isinstance(budget, int | float) and 0.0 < budget <= 1.0):
            raise ValueError(f"budget must be a cost fraction in (0, 1] or None, got {budget!r}")
        if cost not in ("measured", "calibrated"):
            raise ValueError(f"cost must be 'measured' or 'calibrated', got {cost!r}")
        self.render_mode = render_mode
        self.model_name, self.dtype_name = model, dtype
        self.slm = shared_lm(model, dtype, threads)
        self.spec_ = self.slm.spec
        self.discrete, self.budget, self.cost_kind = bool(discrete), budget, cost
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
        self.presets = self._check_presets(presets, num_groups)
        self.meter_cfg = {"warmup": 0, "repeats": 1, "energy": "off", "memory": False, **dict(meter or {})}
        self.cost_source = self._make_cost_source(cost_model, calibrate_cost, force_calibration)
        sc = self.scorer
        self._dense_key = (model, dtype, self.cost_kind, sc.mc_norm, sc.mc_metric, sc.exact_method, sc.max_new_tokens)
        self._last_render = ""

    # ------------------------------------------------------------------ setup helpers
    def _check_presets(self, presets: Sequence[Sequence[float]] | None, num_groups: int) -> np.ndarray:
        """Preset fraction triples as ``[n, 3]``."""
        p = np.asarray(PRESETS if presets is None else presets, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3 or len(p) < 2 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
            raise ValueError(
                "presets must be a list of at least two [layers, heads, mlp] keep-fraction triples in [0, 1], "
                f"got {presets!r}"
            )
        return p

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
            meter = Meter(str(slm.device), warmup=1, repeats=3, energy="off", memory=False)
            CostModel.fit(slm, meter=meter, **QUICK_CALIBRATION).save(path)  # type: ignore[arg-type]
        return make_cost_source("calibrated", slm=slm, path=path, force=force)

    def _meter(self) -> Any:
        return getattr(self.cost_source, "meter", None)

    # ------------------------------------------------------------------ actions
    def _fractions(self, action: Any, n_groups: int) -> tuple[np.ndarray, bool]:
        """Validate an action and return keep fractions ``[n_groups, 3]`` and whether it was clipped."""
        if self.discrete:
            a = np.asarray(action)
            whole = a.size == 1 and (
                np.issubdtype(a.dtype, np.integer)
                or (np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and float(a.reshape(())).is_integer())
            )
            if not whole:
                raise ValueError(
                    f"a discrete action must be one integer in [0, {len(self.presets) - 1}], got {action!r}"
                )
            k = int(a.reshape(()))
            if not 0 <= k < len(self.presets):
                raise ValueError(f"discrete action must be in [0, {len(self.presets) - 1}], got {k}")
            return np.tile(self.presets[k], (n_groups, 1)), False
        shape = self.action_space.shape
        try:
            a = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"action must be numbers of shape {shape}, got {action!r}") from None
        if a.shape != shape:
            raise ValueError(
                f"action must have shape {shape} (keep fractions [layers, heads, mlp] per layer group), "
                f"got shape {a.shape}"
            )
        if np.isnan(a).any():
            raise ValueError(f"action contains NaN at {np.flatnonzero(np.isnan(a)).tolist()}; actions must be numbers")
        clipped = bool(((a < 0) | (a > 1)).any())
        return np.clip(a, 0.0, 1.0).reshape(n_groups, 3), clipped

    def _action_space(self, n_groups: int) -> gym.Space:
        if self.discrete:
            return gym.spaces.Discrete(len(self.presets))
        return gym.spaces.Box(0.0, 1.0, shape=(3 * n_groups,), dtype=np.float32)

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

    def config(self) -> dict[str, Any]:
        """The settings a controller needs to see the same observations and actions (JSON-ready)."""
        return {
            "env": type(self).__name__,
            "model": self.model_name,
            "dtype": self.dtype_name,
            "weights_hash": self.slm.weights_hash,
            "discrete": self.discrete,
            "presets": self.presets.tolist(),
            "budget": self.budget,
            "cost": self.cost_kind,
            "reward": self.reward_cfg.to_dict(),
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


def run_rest(slm: SparseLM, probe: Any, plan: SparsityPlan, start: int, logits: Any = "last") -> Prefill:
    """Finish the prompt under ``plan`` from the probe's state (layers ``start..L-1``), without touching the probe.

    Returns a :class:`Prefill` the scorer continues from. Idempotent (the probe's state is copied),
    so a meter may run it several times.
    """
    from envs.runtime.sparse_lm import KVCache

    with torch.no_grad():
        cache = KVCache(probe.cache.num_layers, 0, list(probe.cache.layers))
        state = dataclasses.replace(probe.state, cache=cache)
        slm.run_layers(state, plan, start)
        out = slm.finish(state, logits)
        cache.length = probe.prompt_len
    return Prefill(probe.ids[0].tolist(), plan, cache, out.logits[0, -1:])


def run_full(slm: SparseLM, ids: torch.Tensor, plan: SparsityPlan) -> Prefill:
    """Run the prompt under ``plan`` from scratch (when the plan prunes the probe's layers)."""
    with torch.no_grad():
        cache = slm.new_cache()
        out = slm.forward(ids, plan, cache=cache, logits="last")
    return Prefill(ids[0].tolist(), plan, cache, out.logits[0, -1:])


def finite(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` when it is missing or not finite."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)
