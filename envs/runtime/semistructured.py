"""2:4 semi-structured sparsity: a per-layer action on NVIDIA GPUs (compute capability 8.0 and newer).

In every group of 4 consecutive *input* weights of a linear layer, 2 are kept and 2 are zeroed;
sparse tensor cores (Ampere, Ada, Hopper) then skip the zeros, through cuSPARSELt or CUTLASS
(``torch.sparse.to_sparse_semi_structured``). Which 2 are kept is decided by a score per weight:

- ``"magnitude"``: ``|W_ij|``, needs nothing but the weights (the fallback);
- ``"wanda"``: ``|W_ij| * ||X_j||_2`` (Sun et al., 2023), where ``||X_j||`` is the norm of input
  feature ``j`` over calibration tokens, so that a small weight on a loud input survives.

The conversion is done **once per layer** by :class:`SemiStructured` and installed with
:meth:`envs.runtime.sparse_lm.SparseLM.enable_two_four`; a plan then turns 2:4 on per layer with
``LayerPlan.two_four`` and switching it between calls is a dictionary look-up, not a conversion.
The model's dense weights are untouched, so dense and 2:4 plans run side by side (the price is the
compressed copy: about 56% of the dense bytes of the converted linears in fp16).

What is converted (``targets``): ``("mlp",)`` by default, the gate/up/down projections, which
hold two thirds of a decoder layer's weights; ``("mlp", "attn")`` adds q/k/v/o. 2:4 applies only to
*full* blocks: a plan with ``two_four=True`` must keep all MLP channels (the plan refuses partial
ones), and 2:4 attention weights are used only when the layer also keeps all heads (with pruned
heads the sliced dense projections run). ``SparsityPlan.flops`` counts a 2:4 MLP at half its FLOPs
(the ideal count) and knows nothing about the attention option.

Only fp16 and bf16 weights are supported (the kernels' types we use); the refusal on a CPU or an
older GPU says what is needed. ``emulate=True`` builds the same pruned weights as dense tensors with
zeros, on any device and dtype: same outputs as the sparse kernels up to rounding, **no speedup**.
It exists to score the accuracy of 2:4 plans on a CPU and to test the wiring without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from envs.runtime.plan import SparsityPlan
    from envs.runtime.sparse_lm import SparseLM

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
MLP_WEIGHTS = ("gate_w", "up_w", "down_w")
ATTN_WEIGHTS = ("q_w", "k_w", "v_w", "o_w")
# Which calibration statistic is each weight's input (see input_norms).
INPUT_OF = {
    "gate_w": "mlp_in",
    "up_w": "mlp_in",
    "down_w": "mlp_act",
    "q_w": "attn_in",
    "k_w": "attn_in",
    "v_w": "attn_in",
    "o_w": "attn_heads",
}
# Minimum (and multiple of) rows/columns of a weight each backend accepts for fp16/bf16, from
# torch.sparse.semi_structured's _DTYPE_SHAPE_CONSTRAINTS; checked up front for a clearer error.
SHAPE_MULTIPLE = {"cusparselt": (16, 16), "cutlass": (32, 64)}

Method = Literal["auto", "magnitude", "wanda"]
Backend = Literal["cusparselt", "cutlass"]


class SemiStructuredUnsupported(RuntimeError):
    """This device cannot run 2:4 semi-structured kernels."""


# ---------------------------------------------------------------------------------------- support
def check_semistructured_support(device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Check that ``device`` (and ``dtype``) can run 2:4 semi-structured matmuls.

    Args:
        device: Where the weights live.
        dtype: Their dtype; ``None`` skips the dtype check.

    Raises:
        SemiStructuredUnsupported: Not a CUDA device, CUDA not available, a ROCm build, or compute
            capability below 8.0; the message says what is needed.
        ValueError: ``dtype`` is not fp16 or bf16.
    """
    dev = torch.device(device)
    need = (
        "2:4 semi-structured sparsity needs an NVIDIA GPU of compute capability >= 8.0 (Ampere, Ada or "
        "Hopper: A100, A10, L4, L40, H100, H200, RTX 30xx/40xx) with fp16 or bf16 weights"
    )
    if dev.type != "cuda":
        raise SemiStructuredUnsupported(
            f"{need}; the model is on {str(dev)!r}. Move it with slm.model.to('cuda', torch.float16) "
            "(or load it with dtype=torch.float16 on a GPU machine), or leave two_four off. To score the "
            "accuracy of 2:4 plans on a CPU, use SemiStructured.from_model(slm, emulate=True) (no speedup)."
        )
    if not torch.cuda.is_available():
        raise SemiStructuredUnsupported(f"{need}; this PyTorch build or machine has no usable CUDA device")
    if getattr(torch.version, "hip", None):
        raise SemiStructuredUnsupported(f"{need}; this is a ROCm build of PyTorch ({torch.version.hip})")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        raise SemiStructuredUnsupported(
            f"{need}; {torch.cuda.get_device_name(index)} has compute capability {cap[0]}.{cap[1]}"
        )
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{need}; the weights are {dtype}. Convert the model with slm.model.to(torch.float16) or torch.bfloat16"
        )


def default_backend() -> Backend:
    """The backend to use: cuSPARSELt when this PyTorch build has it, else CUTLASS."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def check_shape(name: str, shape: Sequence[int], backend: Backend) -> None:
    """Check that a weight of ``shape`` can be converted by ``backend``.

    Raises:
        ValueError: Naming the weight, its shape and the multiples needed.
    """
    rows, cols = SHAPE_MULTIPLE[backend]
    m, n = shape
    if m < rows or m % rows or n < cols or n % cols:
        raise ValueError(
            f"{name} of shape {tuple(shape)} cannot be converted to 2:4 with {backend}: rows must be a multiple "
            f"of {rows} and columns a multiple of {cols}; leave this layer's two_four off or use a model with "
            "such shapes"
        )


# ---------------------------------------------------------------------------------------- masks
def mask_2_4(scores: torch.Tensor) -> torch.Tensor:
    """Keep the 2 highest scores in every group of 4 consecutive entries along the last dimension.

    Ties go to the lower index (a stable sort), so the mask is deterministic.

    Args:
        scores: ``[..., n]`` with ``n`` a multiple of 4 (for a weight ``[out, in]``: along the input dim).

    Returns:
        Bool mask of ``scores``' shape with exactly 2 ``True`` in every group of 4.

    Raises:
        ValueError: The last dimension is not a multiple of 4, or a score is NaN.
    """
    if scores.dim() == 0 or scores.shape[-1] % 4:
        raise ValueError(
            f"2:4 groups run along the last dimension, which must be a multiple of 4; got {tuple(scores.shape)}"
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError("2:4 scores contain NaN; check the weights and the calibration activations")
    groups = scores.reshape(*scores.shape[:-1], -1, 4)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda scores ``|W_ij| * ||X_j||`` of a weight ``[out, in]`` given its input norms ``[in]``."""
    if input_norm.shape != weight.shape[-1:]:
        raise ValueError(
            f"input_norm must have shape [{weight.shape[-1]}] for a weight {tuple(weight.shape)}, "
            f"got {tuple(input_norm.shape)}"
        )
    return weight.abs().float() * input_norm.to(weight.device, torch.float32)[None, :]


def prune_2_4(weight: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of ``weight`` with the 2 lowest-scoring entries of every group of 4 inputs set to zero.

    Args:
        weight: ``[out, in]``; ``in`` a multiple of 4.
        scores: Same shape; ``None`` means magnitude (``|weight|``).

    Returns:
        A new contiguous tensor of ``weight``'s dtype and device.
    """
    if scores is None:
        scores = weight.abs()
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    return weight.masked_fill(~mask_2_4(scores.to(weight.device)), 0).contiguous()


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries along the last dimension has at most 2 non-zeros."""
    if weight.shape[-1] % 4:
        return False
    return bool(((weight.reshape(*weight.shape[:-1], -1, 4) != 0).sum(-1) <= 2).all())


# ---------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def input_norms(
    slm: SparseLM, sequences: Iterable[torch.Tensor], layers: Sequence[int] | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """Per-feature L2 norms of the inputs of each linear, over ``sequences`` run densely.

    ``attn_in`` and ``mlp_in`` come from forward hooks on the two norms of each layer (the inputs of
    q/k/v and gate/up); ``attn_heads`` and ``mlp_act`` from SparseLM's observer (the inputs of o and down).

    Args:
        slm: The model (any device).
        sequences: Token-id tensors, ``[T]`` or ``[B, T]``; natural text not used for evaluation.
        layers: Layers to collect; all when ``None``.

    Returns:
        ``{layer: {"attn_in", "attn_heads", "mlp_in", "mlp_act": float32 [features]}}``.
    """
    wanted = set(range(slm.spec.num_layers) if layers is None else layers)
    sq: dict[int, dict[str, torch.Tensor]] = {i: {} for i in wanted}

    def add(i: int, name: str, t: torch.Tensor) -> None:
        if i in wanted:
            s = t.detach().reshape(-1, t.shape[-1]).float().pow(2).sum(0)
            sq[i][name] = sq[i][name] + s if name in sq[i] else s

    def observe(i: int, name: str, t: torch.Tensor) -> None:
        if name in ("attn_heads", "mlp_act"):
            add(i, name, t)

    hooks = []
    for i in wanted:
        b = slm.blocks[i]
        hooks.append(b.attn_norm.register_forward_hook(lambda _m, _a, out, i=i: add(i, "attn_in", out)))
        hooks.append(b.mlp_norm.register_forward_hook(lambda _m, _a, out, i=i: add(i, "mlp_in", out)))
    n_seq = 0
    try:
        for ids in sequences:
            slm.forward(torch.as_tensor(ids).to(slm.device), None, logits="none", observer=observe)
            n_seq += 1
    finally:
        for h in hooks:
            h.remove()
    if n_seq == 0:
        raise ValueError("input_norms needs at least one calibration sequence")
    return {i: {k: v.sqrt() for k, v in d.items()} for i, d in sq.items()}


def pruned_weights(
    slm: SparseLM,
    *,
    targets: Sequence[str] = ("mlp",),
    layers: Sequence[int] | None = None,
    norms: dict[int, dict[str, torch.Tensor]] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Dense 2:4-pruned copies of the targeted weights of ``slm`` (on its device and dtype).

    Args:
        slm: The model; its weights are not modified.
        targets: ``"mlp"`` (gate/up/down) and/or ``"attn"`` (q/k/v/o).
        layers: Layers to prune; all when ``None``.
        norms: Output of :func:`input_norms` for Wanda scores; magnitude when ``None``.

    Returns:
        ``{layer: {"gate_w": ..., "up_w": ..., "down_w": ..., ...}}`` (no ``gate_w`` for ungated MLPs).
    """
    names = _weight_names(targets)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(slm.spec.num_layers) if layers is None else layers:
        if not 0 <= i < slm.spec.num_layers:
            raise ValueError(f"layer {i} is out of range [0, {slm.spec.num_layers - 1}]")
        b = slm.blocks[i]
        out[i] = {}
        for name in names:
            w = getattr(b, name)
            if w is None:  # GPT-2 style MLPs have no gate
                continue
            if w.shape[-1] % 4:
                raise ValueError(f"layer {i} {name} has {w.shape[-1]} inputs, not a multiple of 4; 2:4 cannot apply")
            scores = None
            if norms is not None:
                if i not in norms or INPUT_OF[name] not in norms[i]:
                    raise ValueError(
                        f"norms lack {INPUT_OF[name]!r} of layer {i}; compute them with input_norms(slm, ...)"
                    )
                scores = wanda_scores(w, norms[i][INPUT_OF[name]])
            with torch.no_grad():
                out[i][name] = prune_2_4(w.detach(), scores)
    return out


def _weight_names(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    bad = [t for t in targets if t not in ("mlp", "attn")]
    if bad or not targets:
        raise ValueError(f"targets must be a non-empty subset of ('mlp', 'attn'), got {tuple(targets)}")
    return (MLP_WEIGHTS if "mlp" in targets else ()) + (ATTN_WEIGHTS if "attn" in targets else ())


def to_sparse(w: torch.Tensor, backend: Backend) -> torch.Tensor:
    """Compress one pruned weight with ``backend`` (cuSPARSELt through the public entry point)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    if backend == "cutlass":
        return SparseSemiStructuredTensorCUTLASS.from_dense(w)
    return to_sparse_semi_structured(w)


def _nbytes(t: torch.Tensor) -> int:
    parts = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t")]
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    if parts:
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------- precompute
@dataclass
class SemiStructured:
    """Per-layer 2:4 weights of one model, converted once.

    Attributes:
        weights: ``{layer: {"gate_w", "up_w", "down_w"[, "q_w", "k_w", "v_w", "o_w"]: tensor}}``;
            ``SparseSemiStructuredTensor`` on a GPU, dense tensors with zeros when ``emulated``.
        method: ``"magnitude"`` or ``"wanda"``.
        targets: ``("mlp",)`` or ``("mlp", "attn")``.
        backend: ``"cusparselt"``, ``"cutlass"``, or ``"emulated"``.
        spec: The model shape it was built for.
        device: Where the weights live.
        dtype: Their dtype.
        meta: Provenance: calibration tokens, seconds to build, bytes.
    """

    weights: dict[int, dict[str, torch.Tensor]]
    method: str
    targets: tuple[str, ...]
    backend: str
    spec: Any
    device: torch.device
    dtype: torch.dtype
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def emulated(self) -> bool:
        """Dense weights with zeros (no speedup), for CPU accuracy runs and tests."""
        return self.backend == "emulated"

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers that have 2:4 weights."""
        return tuple(sorted(self.weights))

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s weights by :class:`envs.runtime.sparse_lm._Block` field name.

        Raises:
            RuntimeError: Layer ``i`` was not prepared.
        """
        try:
            return self.weights[i]
        except KeyError:
            raise RuntimeError(
                f"layer {i} has no 2:4 weights (prepared: {list(self.layers)}); prepare it with "
                "slm.enable_two_four(layers=None) or set two_four=False for that layer"
            ) from None

    def nbytes(self) -> int:
        """Bytes held by the 2:4 weights (values and metadata)."""
        return sum(_nbytes(t) for d in self.weights.values() for t in d.values())

    def check_fits(self, slm: SparseLM) -> None:
        """Check that these weights were built for ``slm``'s shape, device and dtype.

        Raises:
            ValueError: Naming what differs.
        """
        if self.spec != slm.spec:
            raise ValueError(f"these 2:4 weights are for a model of shape {self.spec}, not {slm.spec}")
        w = slm.blocks[0].up_w
        if torch.device(self.device) != w.device or self.dtype != w.dtype:
            raise ValueError(
                f"these 2:4 weights are {self.dtype} on {self.device}, but the model is {w.dtype} on {w.device}; "
                "rebuild them with SemiStructured.from_model(slm) after moving the model"
            )

    @classmethod
    def from_model(
        cls,
        slm: SparseLM,
        *,
        method: Method = "auto",
        sequences: Iterable[torch.Tensor] | None = None,
        targets: Sequence[str] = ("mlp",),
        layers: Sequence[int] | None = None,
        backend: Backend | None = None,
        emulate: bool = False,
    ) -> SemiStructured:
        """Prune ``slm``'s targeted linears to 2:4 and convert them once.

        Args:
            slm: The model, on a CUDA device of compute capability >= 8.0 in fp16/bf16 (unless ``emulate``).
            method: ``"wanda"`` (needs ``sequences``, or a tokenizer and the news corpus for
                :func:`envs.runtime.importance.calibration_sequences`), ``"magnitude"``, or ``"auto"``
                (Wanda when ``sequences`` are given, else magnitude).
            sequences: Calibration token ids for Wanda.
            targets: ``("mlp",)`` (default) or ``("mlp", "attn")``.
            layers: Layers to prepare; all when ``None``.
            backend: ``"cusparselt"`` or ``"cutlass"``; ``None`` picks cuSPARSELt when available.
            emulate: Keep dense pruned weights instead of converting (any device; no speedup).

        Raises:
            SemiStructuredUnsupported: No suitable GPU (and not ``emulate``).
            ValueError: Unsupported dtype, method, targets or weight shapes.
        """
        t0 = time.perf_counter()
        w0 = slm.blocks[0].up_w
        if not emulate:
            check_semistructured_support(w0.device, w0.dtype)
            backend = backend or default_backend()
            if backend not in SHAPE_MULTIPLE:
                raise ValueError(f"backend must be 'cusparselt', 'cutlass' or None, got {backend!r}")
        names = _weight_names(targets)
        if method not in ("auto", "magnitude", "wanda"):
            raise ValueError(f"method must be 'auto', 'magnitude' or 'wanda', got {method!r}")
        if method == "auto":
            method = "wanda" if sequences is not None else "magnitude"
        norms = None
        meta: dict[str, Any] = {}
        if method == "wanda":
            if sequences is None:
                from envs.runtime.importance import calibration_sequences

                sequences, meta["calibration"] = calibration_sequences(slm)
            sequences = list(sequences)
            meta["calibration_tokens"] = int(sum(torch.as_tensor(s).numel() for s in sequences))
            norms = input_norms(slm, sequences, layers)
        if not emulate:
            for i in range(slm.spec.num_layers) if layers is None else layers:
                for name in names:
                    w = getattr(slm.blocks[i], name)
                    if w is not None:
                        check_shape(f"layer {i} {name}", tuple(w.shape), backend)
        pruned = pruned_weights(slm, targets=targets, layers=layers, norms=norms)
        if emulate:
            weights = pruned
        else:
            weights = {i: {k: to_sparse(w, backend) for k, w in d.items()} for i, d in pruned.items()}
            torch.cuda.synchronize(w0.device)
        semi = cls(
            weights=weights,
            method=method,
            targets=tuple(t for t in ("mlp", "attn") if t in targets),
            backend="emulated" if emulate else str(backend),
            spec=slm.spec,
            device=w0.device,
            dtype=w0.dtype,
            meta=meta,
        )
        semi.meta.update(seconds=time.perf_counter() - t0, bytes=semi.nbytes())
        return semi


# ---------------------------------------------------------------------------------------- plans
def two_four_plan(plan: SparsityPlan, layers: Iterable[int] | None = None) -> SparsityPlan:
    """``plan`` with 2:4 MLPs switched on.

    Args:
        plan: Any plan.
        layers: Layers to switch on (each must keep its full MLP). ``None``: every running layer
            that keeps its full MLP; the others are left as they are.

    Returns:
        A new plan; ``meta["two_four"]`` lists the layers with 2:4 on.
    """
    from envs.runtime.plan import SparsityPlan

    full = plan.spec.intermediate_size
    chosen = (
        {i for i, lp in enumerate(plan.layers) if lp.run and lp.mlp_channels == full} if layers is None else set(layers)
    )
    new = tuple(replace(lp, two_four=lp.two_four or i in chosen) for i, lp in enumerate(plan.layers))
    on = [i for i, lp in enumerate(new) if lp.two_four]
    return SparsityPlan(plan.spec, new, {**plan.meta, "two_four": on})
