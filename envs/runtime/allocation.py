"""Per-layer keep allocation: how a mean MLP keep is best shared among the layers.

A uniform plan keeps the same share of every layer's MLP channels (and, under ``input_attn``, of
every attention projection's inputs). The layers do not suffer alike: on SmolLM2-135M under
``input_attn``, cutting layer 0 alone to keep 0.2 moves the next-token distribution (KL from dense)
more than cutting *every* layer to 0.4, and the last layer is the next most sensitive. TEAL
(Liu et al., 2024) allocates its sparsity per layer by a greedy search for this reason; here the
search is exact on a simpler model of the loss.

Fitting (:func:`layer_sensitivity`). On train-split text, for every layer ``i``, rule and keep
level, the mean KL divergence of the final next-token distribution from the dense model's when
layer ``i`` alone runs the rule at that keep and every other layer is dense (the masked form of the
rules, teacher-forced on the text). The layers below ``i`` run once per sequence and their output
is reused for every level of layer ``i``, so a fit costs about half of ``L × levels`` forwards per
rule.

Allocating (:meth:`LayerAllocation.keeps`). Each layer's KL curve is interpolated log-linearly
between the measured levels (and as a power of the distance to keep 1 above them); an exact dynamic
programme then picks a keep per layer, on a grid of 0.01, that minimises the summed KL with the
layers' mean keep equal to the requested one. Every decoder layer of the supported families has the
same shape, so equal mean keep means equal FLOPs (MLP and, under ``input_attn``, attention
projections alike). The summed single-layer KL is a model of the loss, not the loss: it is what
makes the search exact and cheap, and the activation benchmark judges the result at measured
latency on val text. That model misses how the errors of many cut layers add up (left alone, it
sends static's middle layers to keep 0.10, and the whole plan is worse than uniform), so no layer
may keep less than a floor times the mean: :func:`fit_allocation` tries floors 0, 0.5, 0.75, 0.9
and 1 (the uniform plan) per rule on whole plans at mean keeps 0.25, 0.4 and 0.6 and keeps the one
of least KL on the fit text (:func:`choose_floors`).

Files (:func:`save_allocation`, :func:`load_allocation`). A folder ``<cache_root>/allocations/<name>``
holds ``allocation.safetensors`` (``levels`` and one ``[L, levels]`` KL table per rule, float32; never
a pickle) and a self-hashed ``card.json`` naming the model (weights hash, spec), the rules, the
training text (every document's SHA-256 and split) and the settings (:mod:`envs.runtime.artifacts`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from envs.data.files import cache_root, versions_of
from envs.runtime.artifacts import ArtifactKind, load_artifact, save_artifact
from envs.runtime.plan import MLP_RULES, SparsityPlan, plan_from_fractions
from envs.runtime.predictor import PACKAGES, TRAIN_SPLIT, document_sequences, document_sha256

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import SparseLM

ALLOCATION_FORMAT = "prunegym-layer-allocation"
ALLOCATION_VERSION = 1
TENSORS_FILE = "allocation.safetensors"
COMMAND = "python -m experiments.allocate"
METHOD = (
    "per layer, rule and keep level: mean KL(dense || plan) of the next-token distribution on train text with "
    "that layer alone pruned; keeps per layer by an exact dynamic programme over the summed KL at equal mean keep, "
    "no layer below floor x mean, the floor chosen per rule by the whole plans' KL on the same text"
)
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.5, 0.7)
GRID = 100  # keeps are allocated in steps of 1 / GRID


def default_allocation_name(model: str) -> str:
    """The name an allocation of ``model`` (a name or folder) gets by default, and is looked up by."""
    return f"{Path(str(model).rstrip('/')).name}-alloc"


def _kl_sum(ref: torch.Tensor, logp: torch.Tensor) -> float:
    """KL(ref ‖ logp) summed over positions, from log-probabilities ``[..., V]``."""
    return float((ref.exp() * (ref - logp)).sum())


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """``levels`` as floats, refused unless at least two, strictly increasing, inside (0, 1)."""
    out = tuple(float(x) for x in levels)
    if len(out) < 2 or any(not 0.0 < x < 1.0 for x in out) or any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"levels must be at least two strictly increasing keeps inside (0, 1), got {list(levels)}")
    return out


def check_alloc_rules(rules: Sequence[str]) -> tuple[str, ...]:
    """``rules`` as a tuple, refused unless non-empty, without repeats, each one of :data:`MLP_RULES`."""
    out = tuple(rules)
    bad = [r for r in out if r not in MLP_RULES]
    if not out or bad or len(set(out)) != len(out):
        raise ValueError(f"rules must be distinct names from {list(MLP_RULES)}, got {list(rules)}")
    return out


def single_layer_plan(slm: SparseLM, layer: int, rule: str, keep: float) -> SparsityPlan:
    """The plan that runs ``rule`` at ``keep`` in ``layer`` alone; every other layer is dense."""
    keeps = [1.0] * slm.spec.num_layers
    keeps[layer] = keep
    return keeps_plan(slm, keeps, rule)


def keeps_plan(slm: Any, keeps: Sequence[float], rule: str, meta: dict[str, Any] | None = None) -> SparsityPlan:
    """The plan that keeps ``keeps[i]`` of layer ``i``'s MLP channels by ``rule`` (every head and layer runs).

    ``slm`` is anything with ``spec`` and ``importance`` (the static rule's channel order).
    """
    s = slm.spec
    if len(keeps) != s.num_layers:
        raise ValueError(f"need one keep per layer ({s.num_layers}), got {len(keeps)}")
    groups = [[i] for i in range(s.num_layers)]
    fractions = [[1.0, 1.0, float(k)] for k in keeps]
    return plan_from_fractions(s, slm.importance, fractions, groups, meta=meta, rules=[rule] * s.num_layers)


def layer_sensitivity(
    slm: SparseLM,
    sequences: Sequence[torch.Tensor],
    rules: Sequence[str],
    levels: Sequence[float] = DEFAULT_LEVELS,
    *,
    skip: int = 8,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean KL of the next-token distribution from dense with one layer at a time under each rule and level.

    Args:
        slm: The model (with a predictor set when ``rules`` include ``predicted``).
        sequences: Token-id tensors ``[T]`` of train-split text, all of one length (they run as a batch).
        rules: MLP rules (:data:`MLP_RULES`).
        levels: Keep levels (:func:`check_levels`).
        skip: Leading positions of each sequence left unscored (too little context to mean much).
        batch_size: Sequences per forward.
        progress: Show a tqdm bar.

    Returns:
        ``{rule: [L, len(levels)]}`` float32: mean over scored positions of KL(dense ‖ plan), in nats.

    Raises:
        ValueError: No sequences, sequences of different lengths or too short for ``skip``, bad
            rules or levels.
    """
    from tqdm import tqdm

    rules, levels = check_alloc_rules(rules), check_levels(levels)
    lengths = {int(s.numel()) for s in sequences}
    if not sequences or len(lengths) != 1 or min(lengths) <= skip:
        raise ValueError(f"need sequences of one length above skip={skip}, got lengths {sorted(lengths)}")
    if "predicted" in rules and slm.predictor is None:
        raise ValueError("rule 'predicted' needs a channel predictor: slm.set_predictor(load_predictor(...))")
    L = slm.spec.num_layers
    plans = {(r, i, j): single_layer_plan(slm, i, r, k) for r in rules for i in range(L) for j, k in enumerate(levels)}
    total = {r: torch.zeros(L, len(levels), dtype=torch.float64) for r in rules}
    dense = slm.dense_plan()
    n_pos = 0
    batches = [torch.stack(list(sequences[b : b + batch_size])) for b in range(0, len(sequences), batch_size)]
    bar = tqdm(total=len(batches) * L, desc="layer sensitivity", disable=not progress, unit="layer")
    with torch.no_grad():
        for ids in batches:
            state = slm.start(ids)
            inputs = []  # each layer's input on the dense path: the layers below run once per batch
            for i in range(L):
                inputs.append(state.hidden)
                slm.run_layers(state, dense, i, i + 1)
            ref = slm.finish(state, slice(skip, None)).logits.float().log_softmax(-1)
            for i in range(L):
                for r in rules:
                    for j in range(len(levels)):
                        st = replace(state, hidden=inputs[i], adapted=False, last_layer=-1)
                        slm.run_layers(st, plans[(r, i, j)], i)
                        lp = slm.finish(st, slice(skip, None)).logits.float().log_softmax(-1)
                        total[r][i, j] += _kl_sum(ref, lp)
                bar.update(1)
            n_pos += ref.shape[0] * ref.shape[1]
    bar.close()
    return {r: (t / n_pos).float() for r, t in total.items()}


class LayerAllocation:
    """Per-layer KL tables of some rules, and the keeps per layer they give a mean keep.

    Args:
        levels: The keep levels the tables were measured at.
        kl: ``{rule: [L, len(levels)]}`` mean KL with that layer alone at that level.
        card: What the tables were fitted on (``card.json``); ``{}`` for tables built in memory.
        floors: Per rule, the least keep of any layer as a share of the mean (:meth:`keeps`); 0 where
            not given. :func:`fit_allocation` chooses them on the fit text.
    """

    def __init__(
        self,
        levels: Sequence[float],
        kl: dict[str, torch.Tensor],
        card: dict[str, Any] | None = None,
        floors: dict[str, float] | None = None,
    ):
        self.levels = check_levels(levels)
        self.rules = check_alloc_rules(list(kl))
        shapes = {tuple(t.shape) for t in kl.values()}
        if len(shapes) != 1 or next(iter(shapes))[1:] != (len(self.levels),):
            raise ValueError(f"every KL table must be [layers, {len(self.levels)}], got {sorted(shapes)}")
        self.kl = {r: t.detach().float().cpu() for r, t in kl.items()}
        self.num_layers = next(iter(shapes))[0]
        self.card = dict(card or {})
        self.floors = {r: 0.0 for r in self.rules}
        for r, f in (floors or {}).items():
            if r not in self.kl or not 0.0 <= float(f) <= 1.0:
                raise ValueError(f"floors must map this allocation's rules {list(self.rules)} to [0, 1], got {floors}")
            self.floors[r] = float(f)
        self._keeps = functools.lru_cache(maxsize=256)(self._solve)

    @property
    def name(self) -> str | None:
        """The allocation's name (from its card), if it has one."""
        return self.card.get("name")

    def curves(self, rule: str) -> np.ndarray:
        """``[L, GRID]``: each layer's modelled KL at keeps ``1/GRID .. 1`` (0 at keep 1).

        Log-linear between the measured levels and beyond the lowest one (the first segment's
        slope, at least flat); above the highest level a power of the distance to keep 1 through
        the two highest levels (exponent clamped to [1, 4]), so that the curve is smooth and 0 at 1.
        """
        if rule not in self.kl:
            raise ValueError(f"no KL table for rule {rule!r}; this allocation has {list(self.rules)}")
        lv = np.array(self.levels)
        kl = np.maximum(self.kl[rule].double().numpy(), 1e-12)
        log = np.log(kl)
        grid = np.arange(1, GRID + 1) / GRID
        out = np.zeros((kl.shape[0], GRID))
        for i in range(kl.shape[0]):
            slope = min((log[i, 1] - log[i, 0]) / (lv[1] - lv[0]), 0.0)
            inside = np.exp(np.interp(grid, lv, log[i]))
            below = np.exp(log[i, 0] + slope * (grid - lv[0]))
            power = np.log(kl[i, -2] / kl[i, -1]) / np.log((1.0 - lv[-2]) / (1.0 - lv[-1]))
            above = kl[i, -1] * (np.maximum(1.0 - grid, 0.0) / (1.0 - lv[-1])) ** np.clip(power, 1.0, 4.0)
            out[i] = np.where(grid < lv[0], below, np.where(grid > lv[-1], above, inside))
        return out

    def keeps(self, rule: str, mean: float, floor: float | None = None) -> tuple[float, ...]:
        """Each layer's keep for ``rule`` at mean keep ``mean``: least summed modelled KL, keeps in steps of 0.01.

        No layer keeps less than ``floor × mean`` (default: the rule's :attr:`floors`; 1 gives the
        uniform plan), nor less than the lowest measured level unless ``mean`` itself is lower. The
        summed single-layer KL misses how the errors of many cut layers add up; the floor bounds
        how far the allocation may lean on that model.

        Raises:
            ValueError: ``mean`` outside ``[1/GRID, 1]``, ``floor`` outside [0, 1] or a rule without a table.
        """
        if not 1.0 / GRID <= float(mean) <= 1.0:
            raise ValueError(f"mean keep must be in [{1 / GRID}, 1], got {mean}")
        if rule not in self.kl:
            raise ValueError(f"no KL table for rule {rule!r}; this allocation has {list(self.rules)}")
        floor = self.floors[rule] if floor is None else float(floor)
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        return self._keeps(rule, round(float(mean) * GRID * self.num_layers), floor)

    def _solve(self, rule: str, units: int, floor: float) -> tuple[float, ...]:
        cost = self.curves(rule)  # cost[i, u - 1]: layer i at keep u / GRID
        L = cost.shape[0]
        best = np.full(units + 1, np.inf)
        best[0] = 0.0
        back = np.zeros((L, units + 1), dtype=np.int16)
        low = max(round(self.levels[0] * GRID), int(floor * units / L + 1e-9))  # measured levels, the floor
        low = min(low, units // L)  # ... unless the mean itself is lower
        for i in range(L):
            nb = np.full(units + 1, np.inf)
            for u in range(max(low, 1), GRID + 1):
                if u > units:
                    break
                cand = best[: units + 1 - u] + cost[i, u - 1]
                better = cand < nb[u:]
                nb[u:][better] = cand[better]
                back[i, u:][better] = u
            best = nb
        keeps, left = [], units
        for i in reversed(range(L)):
            u = int(back[i, left])
            keeps.append(u / GRID)
            left -= u
        return tuple(reversed(keeps))

    def plan(self, slm: Any, rule: str, mean: float) -> SparsityPlan:
        """The plan running ``rule`` at the keeps :meth:`keeps` gives ``mean`` (``slm``: ``spec``, ``importance``)."""
        if slm.spec.num_layers != self.num_layers:
            raise ValueError(f"this allocation is for {self.num_layers} layers, the model has {slm.spec.num_layers}")
        meta = {"kind": "allocated", "mlp_rule": rule, "mean_keep": float(mean), "allocation": self.name}
        meta["floor"] = self.floors[rule]
        return keeps_plan(slm, self.keeps(rule, mean), rule, meta=meta)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors file's contents: ``levels`` and one KL table per rule."""
        return {"levels": torch.tensor(self.levels, dtype=torch.float32), **self.kl}


FLOOR_CANDIDATES = (0.0, 0.5, 0.75, 0.9, 1.0)  # 1.0: the uniform plan, so the fit never does worse on its text
FLOOR_MEANS = (0.25, 0.4, 0.6)  # mean keeps the floor is chosen at


def plans_kl(
    slm: SparseLM,
    sequences: Sequence[torch.Tensor],
    plans: Sequence[SparsityPlan],
    *,
    skip: int = 8,
    batch_size: int = 8,
) -> list[float]:
    """Mean KL(dense ‖ plan) of the next-token distribution on ``sequences`` (one length), for each plan."""
    total = [0.0] * len(plans)
    n_pos = 0
    with torch.no_grad():
        for b in range(0, len(sequences), batch_size):
            ids = torch.stack(list(sequences[b : b + batch_size]))
            ref = slm(ids, None, logits=slice(skip, None)).logits.float().log_softmax(-1)
            for j, plan in enumerate(plans):
                lp = slm(ids, plan, logits=slice(skip, None)).logits.float().log_softmax(-1)
                total[j] += _kl_sum(ref, lp)
            n_pos += ref.shape[0] * ref.shape[1]
    return [t / n_pos for t in total]


def choose_floors(
    slm: SparseLM,
    alloc: LayerAllocation,
    sequences: Sequence[torch.Tensor],
    *,
    candidates: Sequence[float] = FLOOR_CANDIDATES,
    means: Sequence[float] = FLOOR_MEANS,
    skip: int = 8,
) -> dict[str, dict[str, Any]]:
    """Per rule, the floor (:meth:`LayerAllocation.keeps`) whose whole plans have the least KL on ``sequences``.

    Each candidate floor's plans at ``means`` run whole (every layer at its allocated keep), so the
    choice sees how the layers' errors add up, which the single-layer tables cannot.

    Returns:
        ``{rule: {"floor": chosen, "means": [...], "kl": {floor: [KL at each mean]}}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for rule in alloc.rules:
        plans = [keeps_plan(slm, alloc.keeps(rule, m, f), rule) for f in candidates for m in means]
        kl = plans_kl(slm, sequences, plans, skip=skip)
        table = {str(f): kl[c * len(means) : (c + 1) * len(means)] for c, f in enumerate(candidates)}
        best = min(candidates, key=lambda f: (float(np.mean(table[str(f)])), -f))
        out[rule] = {"floor": float(best), "means": list(means), "kl": table}
    return out


def fit_allocation(
    slm: SparseLM,
    docs: Sequence[str],
    rules: Sequence[str],
    levels: Sequence[float] = DEFAULT_LEVELS,
    *,
    seq_len: int = 80,
    max_docs: int = 20,
    skip: int = 8,
    progress: bool = True,
) -> LayerAllocation:
    """Fit the KL tables on train-split ``docs`` (the first ``max_docs`` with at least ``seq_len`` tokens).

    Raises:
        ValueError: A document outside the train split, no document long enough, or bad rules or levels.
    """
    from envs.data.corpus import split_of

    rules, levels = check_alloc_rules(rules), check_levels(levels)
    others = sorted({split_of(d) for d in docs} - {TRAIN_SPLIT})
    if others:
        raise ValueError(f"the allocation is fitted on train-split text only; got documents of {others}")
    long = [(q, d) for q, d in zip(*document_sequences(slm, docs, max_len=seq_len), strict=True) if len(q) == seq_len]
    seqs, used = [q for q, _ in long[:max_docs]], [d for _, d in long[:max_docs]]
    if not seqs:
        raise ValueError(f"no document has {seq_len} tokens: lower seq_len")
    t0 = time.perf_counter()
    kl = layer_sensitivity(slm, seqs, rules, levels, skip=skip, progress=progress)
    chosen = choose_floors(slm, LayerAllocation(levels, kl), seqs, skip=skip)
    floors = {r: c["floor"] for r, c in chosen.items()}
    card = {
        "model": {"name": slm.name, "weights_hash": slm.weights_hash, "spec": slm.spec.to_dict()},
        "allocation": {
            "rules": list(rules),
            "levels": list(levels),
            "grid": GRID,
            "method": METHOD,
            "floors": floors,
            "floor_selection": chosen,
        },
        "training": {
            "split": TRAIN_SPLIT,
            "documents": len(used),
            "documents_sha256": sorted(document_sha256(d) for d in used),
            "seq_len": seq_len,
            "skip": skip,
            "scored_positions": len(used) * (seq_len - skip),
            "predictor": None if slm.predictor is None else getattr(slm.predictor, "card", {}).get("name"),
            "torch_threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "packages": versions_of(PACKAGES),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return LayerAllocation(levels, kl, card, floors)


def allocation_folder(name: str) -> Path:
    """Where the allocation ``name`` lives: ``<cache_root>/allocations/<name>``."""
    return cache_root() / "allocations" / name


ALLOCATION_KIND = ArtifactKind(
    "layer allocation", ALLOCATION_FORMAT, ALLOCATION_VERSION, TENSORS_FILE, COMMAND, lambda n: allocation_folder(n)
)


def save_allocation(alloc: LayerAllocation, folder: str | Path, *, force: bool = False) -> Path:
    """Write ``alloc`` to ``folder`` atomically (tensors, then ``card.json``); ``alloc.card`` becomes what was written.

    Raises:
        FileExistsError: ``folder`` exists and ``force`` is off.
    """
    alloc.card = save_artifact(ALLOCATION_KIND, alloc.tensors(), alloc.card, folder, force=force)
    return Path(folder).resolve()


def load_allocation(name_or_folder: str | Path, slm: SparseLM) -> LayerAllocation:
    """Load a saved allocation for ``slm``, checking everything it was saved with.

    Raises:
        ValueError: One line naming the problem and the command that rebuilds the folder (a missing,
            edited or foreign card, a modified tensors file, another model's weights or shape, or
            tensors of the wrong names or shapes).
    """
    L = slm.spec.num_layers

    def want(card: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        meta = card.get("allocation") or {}
        n = len(meta.get("levels") or [])
        return {"levels": (n,), **{r: (L, n) for r in meta.get("rules") or []}}

    tensors, card = load_artifact(ALLOCATION_KIND, name_or_folder, slm, want)
    levels = list((card.get("allocation") or {}).get("levels") or [])
    stored = tensors.pop("levels")
    try:
        if not torch.allclose(stored.double(), torch.tensor(levels, dtype=torch.float64), atol=1e-6):
            raise ValueError(f"the tensors' levels {stored.tolist()} differ from the card's {levels}")
        rules = list((card.get("allocation") or {}).get("rules") or [])
        floors = (card.get("allocation") or {}).get("floors")
        return LayerAllocation(levels, {r: tensors[r] for r in rules}, card, floors)  # in the card's order
    except ValueError as exc:
        raise ValueError(f"{name_or_folder}: {exc}; rebuild it with `{COMMAND} force=true`") from None
