"""SparseLM: run a causal LM under a :class:`~envs.runtime.plan.SparsityPlan`, doing really less work.

Skipped layers are not run; dropped attention heads, KV groups and MLP channels are sliced out of
the q/k/v/o and gate/up/down matmuls, so the FLOPs saved are FLOPs not spent. Nothing is masked
and the model's weights are never modified: a plan is applied functionally per call, so a failing
call cannot leave the model pruned.

Weight layout. For every layer SparseLM keeps an *importance-ordered* copy of the attention and
MLP weights: KV groups sorted by importance, query heads within a group by importance, MLP
channels by importance. The plans built from fractions keep a prefix of that order, so the kept
weights are plain slicing views (no copy on the hot path; ``torch.nn.functional.linear`` takes a
view with a leading-dimension stride directly). A hand-written plan whose kept set is not a prefix
falls back to ``index_select`` on that copy. The alternative, gathering rows from the original
weights on every call (``strategy="gather"``), is measured against it in ``experiments.bench.sparse_lm``;
the views won, so they are the default. Dense sub-blocks use the original weights, so the dense
plan reproduces the untouched model exactly. The price is one extra copy of the decoder weights
in memory (about 0.4 GiB for the embedded 135M model in fp32). Decoding (calls of up to
:attr:`SparseLM.sparse_rows` tokens) runs a pruned static layer's MLP through a fused kernel over one
more, interleaved copy of that layer's MLP in importance order (built on first use, 0.3 GiB for all
layers of the embedded model): the same code as the per-token rules below, and about 1.6x as fast
as the matmuls on the views.

Adapted weights. A pruning-ready model (``experiments.prepare`` with ``dense_weights=original``)
carries a second set of decoder weights, tuned to run under pruning (:meth:`SparseLM.set_adapted`).
Within one forward, layers run with the original weights up to the first layer the plan prunes
(skips, or runs with fewer heads, KV groups or channels) and with the adapted weights from there
on. The dense plan therefore stays exactly the original model, and a layer-by-layer or probe-then-
plan forward switches at the same point as a whole-plan forward.

Per-token channel rules. A layer plan's ``mlp_rule`` (:data:`envs.runtime.plan.MLP_RULES`) can
choose the MLP channels per token from the token's own activations (``gate``, ``input``) or from a
channel predictor (``predicted``, :meth:`SparseLM.set_predictor`). For up to
:attr:`SparseLM.sparse_rows` tokens per call (decoding, the shortest prompts) only the selected
rows and columns are read, from per-layer copies built on first use that hold each channel's gate
row, up row and down column in one contiguous stretch: one fused compiled call per layer selects
the channels and runs them (:func:`envs.runtime.kernels.topk_glu`, :func:`~envs.runtime.kernels.topk_down`);
``input``'s call (:func:`~envs.runtime.kernels.input_glu`) first sums the kept input features' rows
of a transposed gate/up copy. ``input_attn`` reads its attention projections' kept inputs the same
way (:func:`~envs.runtime.kernels.input_rows`), from transposed q/k/v and o copies (layers that
keep every head; other layers take the masked form). Decode calls also run Llama-style RMSNorms and
the rotary embedding as one compiled call each (:func:`~envs.runtime.kernels.rms_norm`,
:func:`~envs.runtime.kernels.rope`), for every plan.
An activation the kernels lack, or an observer (which wants every activation), takes the same
sparse reads as separate PyTorch calls (:func:`~envs.runtime.kernels.rows_dot`,
:func:`~envs.runtime.kernels.rows_sum`). Longer calls, and calls with gradients,
compute the same channels in the masked form (the dense activations with the unselected channels
zeroed), which is also ``rule_impl="masked"``, the reference the sparse form is tested against.

Threads. A forward's matmuls run on PyTorch's intra-op pool; ``SparseLM(threads=N)`` sets it
(``torch.set_num_threads``, process-wide) because the default differs between launchers and
RLlib workers must stay at one thread. ``None`` leaves the current setting alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from envs.runtime.kernels import (
    act_kind,
    fused_available,
    input_glu,
    input_rows,
    missing_predictor,
    prefix_glu,
    rms_norm,
    rope,
    rows_dot,
    rows_sum,
    topk_down,
    topk_glu,
)
from envs.runtime.models import EMBEDDED_MODEL, LoadedModel, load_model, tensors_hash, weights_hash
from envs.runtime.plan import LayerPlan, ModelSpec, SparsityPlan, input_keep

ADAPTABLE = ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w")  # weights an adapted set may replace
Observer = Callable[[int, str, torch.Tensor], None]
LogitsSpec = Literal["all", "last", "none"] | int | slice | torch.Tensor


# Norm modules computing ``weight * x * rsqrt(mean(x^2) + variance_epsilon)`` (Gemma's adds 1 to its weight:
# not among them), which decode calls run as one compiled call (SparseLM._norm).
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})


# ---------------------------------------------------------------------------------------- rotary
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ---------------------------------------------------------------------------------------- weights
@dataclass
class _QKV:
    """Query, key and value projections of one layer: weights and (optional) biases."""

    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None


@dataclass
class _Block(_QKV):
    """One decoder layer's weights in a family-independent form (views of the model's tensors)."""

    attn_norm: torch.nn.Module
    mlp_norm: torch.nn.Module
    o_w: torch.Tensor  # [D, H*d]
    o_b: torch.Tensor | None
    gate_w: torch.Tensor | None  # [I, D]; None for non-gated MLPs (GPT-2)
    gate_b: torch.Tensor | None
    up_w: torch.Tensor  # [I, D]
    up_b: torch.Tensor | None
    down_w: torch.Tensor  # [D, I]
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


@dataclass
class _Sel(_QKV):
    """The weights one layer plan runs with (views or gathered copies)."""

    n_heads: int
    n_kv: int
    o_w: torch.Tensor
    kv_ids: torch.Tensor  # kept KV heads, model numbering, in the order the projection emits them
    head_kv: torch.Tensor | None  # per kept query head, index into the kept KV heads; None = uniform GQA
    n_ch: int
    gate_w: torch.Tensor | None
    gate_b: torch.Tensor | None
    up_w: torch.Tensor | None
    up_b: torch.Tensor | None
    down_w: torch.Tensor | None
    kv_identity: bool = False  # every KV head kept, in model order: the cache needs no scatter or mask
    mlp_rule: str = "static"  # a per-token rule: the weights are the full MLP's, n_ch channels run per token
    heads_prefix: bool = False  # some heads dropped, the kept ones a prefix of the importance-ordered copy


def _rows(w: torch.Tensor, n_groups: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder ``w``'s rows in ``n_groups`` equal blocks by ``perm`` (contiguous copy)."""
    return w.reshape(n_groups, -1, *w.shape[1:])[perm].reshape(w.shape).contiguous()


def _cols(w: torch.Tensor, n_groups: int, perm: torch.Tensor) -> torch.Tensor:
    return _rows(w.t().contiguous(), n_groups, perm).t().contiguous()


# ---------------------------------------------------------------------------------------- cache
@dataclass
class _LayerCache:
    k: torch.Tensor  # [B, KVH, S, d], all KV heads; dropped ones hold zeros
    v: torch.Tensor
    pos: torch.Tensor  # [S] absolute positions of the cached entries
    valid: torch.Tensor | None  # [KVH, S] bool, or None when every entry is valid


@dataclass
class KVCache:
    """Key/value cache that stays consistent when plans change between calls.

    Each layer caches only the positions it actually ran, with their absolute positions (RoPE is
    applied before caching, so a gap costs nothing). A token that skipped layer ``i`` is simply
    absent from layer ``i``'s cache: later tokens at that layer attend to the tokens that layer
    saw, as in early-exit and layer-skip decoding. A KV head dropped for some tokens stores zeros
    for them with a validity mask, so later tokens never attend to keys that were not computed.

    Attributes:
        length: Tokens consumed so far (the next token's position).
    """

    num_layers: int
    length: int = 0
    layers: list[_LayerCache | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    def snapshot(self) -> tuple[int, list[_LayerCache | None]]:
        """State to roll back to if a forward fails half-way."""
        return self.length, list(self.layers)

    def restore(self, snap: tuple[int, list[_LayerCache | None]]) -> None:
        """Roll back to a :meth:`snapshot`."""
        self.length, self.layers = snap[0], list(snap[1])

    def expanded(self, n: int) -> KVCache:
        """A batch-``n`` view of this batch-1 cache (no copy), so ``n`` continuations share one prompt."""
        layers = [
            None if lc is None else replace(lc, k=lc.k.expand(n, -1, -1, -1), v=lc.v.expand(n, -1, -1, -1))
            for lc in self.layers
        ]
        return KVCache(self.num_layers, self.length, layers)

    def layer_tokens(self, layer: int) -> int:
        """How many tokens layer ``layer`` has cached."""
        c = self.layers[layer]
        return 0 if c is None else int(c.pos.shape[0])


@dataclass
class RunState:
    """Activations between layers of one forward; lets callers run a model in stages (probe, then rest)."""

    hidden: torch.Tensor
    positions: torch.Tensor  # [T]
    rope: tuple[torch.Tensor, torch.Tensor] | None
    cache: KVCache | None
    causal_fresh: bool  # no earlier tokens: plain causal attention
    adapted: bool = False  # a pruned layer has run: later layers use the adapted weights (if any)
    last_layer: int = -1  # the last layer that ran (-1: none); readouts below the top use its exit map


@dataclass
class ForwardOutput:
    """What :meth:`SparseLM.forward` returns.

    Attributes:
        logits: ``[B, n, V]`` at the requested positions, or ``None``.
        hidden: Final hidden states after the last norm, ``[B, T, D]``.
        cache: The KV cache, when one was passed or ``use_cache`` was set.
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor
    cache: KVCache | None


#: What a model may carry beside its weights that plans run with, by the :class:`SparseLM` attribute
#: holding it (its name in ``<attribute>_name``): what it is called, the method that installs it, and
#: its loader. Environment configs, exported cards and :class:`agents.controller.Controller` read this.
MODEL_ATTACHMENTS: dict[str, tuple[str, str, str]] = {
    "predictor": ("channel predictor", "set_predictor", "envs.runtime.predictor.load_predictor"),
    "exit_maps": ("exit maps", "set_exit_maps", "envs.runtime.exit_maps.load_exit_maps"),
}


# ---------------------------------------------------------------------------------------- SparseLM
class SparseLM:
    """A causal LM that runs any :class:`SparsityPlan` with real savings.

    Args:
        model: A transformers causal LM of a supported family (Llama, Mistral, Qwen2, Gemma, GPT-2).
        tokenizer: Its tokenizer (optional; tiny test models have none).
        importance: Orderings used for plans built from fractions and for the weight layout. If
            ``None``, an identity ordering is used until :meth:`set_importance` is called.
        name: Name for caches and cards.
        threads: PyTorch intra-op threads for forwards (process-wide); ``None`` leaves it.
        strategy: ``"views"`` (importance-ordered copy, prefix views) or ``"gather"`` (index the
            original weights per call).

    Attributes:
        predictor: The channel predictor ``predicted`` layers use (:meth:`set_predictor`), or ``None``.
        rule_impl: ``"sparse"`` (read only the selected channels where :attr:`sparse_rows` allows) or
            ``"masked"`` (always the masked form; for tests and audits).
        sparse_rows: Most tokens per call that per-token rules run in the sparse form.
        fused_full_mlp: Run unpruned MLP layers of such short calls through the fused kernel too
            (the MLPs about 1.6x as fast as PyTorch's matmuls on a CPU decode step, the whole step
            1.2x on the embedded model; equal to the untouched model up to float rounding). Off by
            default, so that the dense plan reproduces the model exactly; the activation benchmark
            times the dense model both ways.
        fused_attention: Run the attention projections of such short calls, in layers that keep
            every head, as sums of the rows of transposed q/k/v and o copies: the form ``input_attn``
            reads its kept entries in, here with every entry (about 2x as fast as PyTorch's matmuls
            on the embedded model's decode step; equal up to float rounding). Off by default, for
            the same reason; the activation benchmark turns it on for every plan but the untouched
            dense model, so that ``input_attn`` saves only what it skips.
        fused_head: Run the LM head of such short calls the same way, from a transposed copy of its
            weights (one more copy of the head; on the embedded model's decode step about 2.3x as
            fast as PyTorch's matmul, which reads the 49k x 576 head at well under the memory bus's
            speed). Off by default for the same reason; the activation benchmark turns it on with
            :attr:`fused_attention`, since every plan pays the head alike.
    """

    sparse_rows = 4
    fused_full_mlp = False
    fused_attention = False
    fused_head = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        importance: Any = None,
        *,
        name: str = "model",
        threads: int | None = None,
        strategy: Literal["views", "gather"] = "views",
        cache_dir: Any = None,
    ) -> None:
        if strategy not in ("views", "gather"):
            raise ValueError(f"strategy must be 'views' or 'gather', got {strategy!r}")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.strategy = strategy
        self.cache_dir = cache_dir
        self.family = model.config.model_type
        self._extract()
        self._weights_hash: str | None = None
        self._sel_cache: dict[tuple[int, LayerPlan], _Sel] = {}
        self._rule_w: dict[tuple[Any, ...], torch.Tensor] = {}  # rules' weight copies, built on use
        self.predictor: Any = None  # envs.runtime.predictor.ChannelPredictor, set by set_predictor
        self.predictor_name: str | None = None
        self.exit_maps: Any = None  # envs.runtime.exit_maps.ExitMaps, set by set_exit_maps
        self.exit_maps_name: str | None = None
        self.rule_impl: Literal["sparse", "masked"] = "sparse"
        self.semistructured: Any = None  # envs.runtime.semistructured.SemiStructured, set by enable_two_four
        self.adapted: SparseLM | None = None  # the pruned layers' weight set, see set_adapted
        from envs.runtime.importance import Importance

        self.set_importance(importance if importance is not None else Importance.identity(self.spec))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name: str = EMBEDDED_MODEL,
        *,
        dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        calibrate: bool = True,
        strategy: Literal["views", "gather"] = "views",
    ) -> SparseLM:
        """Load a model by name (see :func:`envs.runtime.models.load_model`) with cached importance orderings.

        The orderings come from a calibration pass over natural text (the train split of the news
        corpus) and are cached next to the model, keyed by its weights hash.

        Args:
            name: Model name, folder or hub id.
            dtype: Weight dtype.
            threads: Intra-op threads (see the class docstring).
            calibrate: Compute importance orderings if none are cached (needs the text corpus).
            strategy: Slicing strategy.
        """
        loaded: LoadedModel = load_model(name, dtype=dtype)
        slm = cls(
            loaded.model,
            loaded.tokenizer,
            name=loaded.name,
            threads=threads,
            strategy=strategy,
            cache_dir=loaded.cache_dir,
        )
        if loaded.adapted is not None:
            slm.set_adapted(loaded.adapted)
        if calibrate:
            from envs.runtime.importance import load_or_calibrate

            slm.set_importance(load_or_calibrate(slm))
        return slm

    def _extract(self) -> None:
        m = self.model
        cfg = m.config
        self.lm_head = m.lm_head
        if self.family == "gpt2":
            tr = m.transformer
            self.embed_tokens, self.pos_embed, self.final_norm, self.rotary = tr.wte, tr.wpe, tr.ln_f, None
            H, D = cfg.n_head, cfg.n_embd
            d = D // H
            blocks = []
            for layer in tr.h:
                wq, wk, wv = layer.attn.c_attn.weight.t().split(D, dim=0)  # views, [D, D] each
                bq, bk, bv = layer.attn.c_attn.bias.split(D)
                blocks.append(
                    _Block(
                        attn_norm=layer.ln_1,
                        mlp_norm=layer.ln_2,
                        q_w=wq,
                        q_b=bq,
                        k_w=wk,
                        k_b=bk,
                        v_w=wv,
                        v_b=bv,
                        o_w=layer.attn.c_proj.weight.t(),
                        o_b=layer.attn.c_proj.bias,
                        gate_w=None,
                        gate_b=None,
                        up_w=layer.mlp.c_fc.weight.t(),
                        up_b=layer.mlp.c_fc.bias,
                        down_w=layer.mlp.c_proj.weight.t(),
                        down_b=layer.mlp.c_proj.bias,
                        act=layer.mlp.act,
                        scaling=1.0 / math.sqrt(d),
                    )
                )
            I = blocks[0].up_w.shape[0]
            self.spec = ModelSpec(len(blocks), H, H, d, D, I, cfg.vocab_size)
        else:
            inner = m.model
            self.embed_tokens, self.pos_embed, self.final_norm = inner.embed_tokens, None, inner.norm
            self.rotary = inner.rotary_emb
            blocks = []
            for layer in inner.layers:
                a, p = layer.self_attn, layer.mlp
                blocks.append(
                    _Block(
                        attn_norm=layer.input_layernorm,
                        mlp_norm=layer.post_attention_layernorm,
                        q_w=a.q_proj.weight,
                        q_b=a.q_proj.bias,
                        k_w=a.k_proj.weight,
                        k_b=a.k_proj.bias,
                        v_w=a.v_proj.weight,
                        v_b=a.v_proj.bias,
                        o_w=a.o_proj.weight,
                        o_b=a.o_proj.bias,
                        gate_w=p.gate_proj.weight,
                        gate_b=p.gate_proj.bias,
                        up_w=p.up_proj.weight,
                        up_b=p.up_proj.bias,
                        down_w=p.down_proj.weight,
                        down_b=p.down_proj.bias,
                        act=p.act_fn,
                        scaling=a.scaling,
                    )
                )
            d = blocks[0].q_w.shape[0] // cfg.num_attention_heads
            self.spec = ModelSpec(
                len(blocks),
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                d,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.vocab_size,
            )
        self.blocks = blocks

    def set_adapted(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Install (or with ``None`` remove) the weight set that pruned layers run with.

        Args:
            tensors: ``"<layer>.<name>"`` -> weight in this class's ``[out, in]`` layout, for names
                in ``ADAPTABLE`` (``q_w``, ``k_w``, ``v_w``, ``o_w``, ``gate_w``, ``up_w``,
                ``down_w``); a weight not given stays shared with the original set. The tensors
                are copied, so the caller's may change later without effect.

        Raises:
            ValueError: An unknown key or a shape that does not match the model.
        """
        self._weights_hash = None
        self._sel_cache.clear()
        if tensors is None:
            self.adapted = None
            return
        if self.semistructured is not None:
            raise ValueError("adapted weights and 2:4 weights cannot be combined; call disable_two_four() first")
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in self.blocks]
        for key, t in tensors.items():
            layer, _, wname = key.partition(".")
            if not layer.isdigit() or int(layer) >= len(self.blocks) or wname not in ADAPTABLE:
                raise ValueError(
                    f"adapted weight {key!r}: expected '<layer>.<name>' with layer < {len(self.blocks)} "
                    f"and name in {ADAPTABLE}"
                )
            ref = getattr(self.blocks[int(layer)], wname)
            if ref is None or tuple(t.shape) != tuple(ref.shape):
                shape = None if ref is None else tuple(ref.shape)
                raise ValueError(f"adapted weight {key!r} has shape {tuple(t.shape)}, the model's is {shape}")
            per_layer[int(layer)][wname] = t.detach().to(ref.device, ref.dtype).clone()
        twin = SparseLM.__new__(SparseLM)
        twin.__dict__.update(self.__dict__)
        twin.blocks = [replace(b, **ws) for b, ws in zip(self.blocks, per_layer, strict=True)]
        twin._sel_cache = {}
        twin._rule_w = {}
        twin.adapted = None
        twin.set_importance(self.importance)
        self.adapted = twin

    def adapted_tensors(self) -> dict[str, torch.Tensor]:
        """The adapted weight set in :meth:`set_adapted`'s form (empty without one)."""
        if self.adapted is None:
            return {}
        out = {}
        for i, (b, a) in enumerate(zip(self.blocks, self.adapted.blocks, strict=True)):
            for wname in ADAPTABLE:
                w = getattr(a, wname)
                if w is not None and w is not getattr(b, wname):
                    out[f"{i}.{wname}"] = w
        return out

    def set_importance(self, importance: Any) -> None:
        """Install importance orderings and rebuild the importance-ordered weight copy."""
        importance.check(self.spec)
        self.importance = importance
        self._sel_cache.clear()
        self._rule_w = {}  # the static layers' fused copy is in importance order
        if getattr(self, "adapted", None) is not None:
            self.adapted.set_importance(importance)
        s = self.spec
        self._perm: list[dict[str, Any]] = []
        if self.strategy != "views":
            return
        with torch.no_grad():
            for i, b in enumerate(self.blocks):
                kv_perm = torch.tensor(importance.kv_order[i])
                head_perm = torch.tensor(_grouped_head_order(s, importance.head_order[i], importance.kv_order[i]))
                ch = torch.tensor(importance.mlp_order[i])
                self._perm.append(
                    {
                        "kv_rank": {g: r for r, g in enumerate(importance.kv_order[i])},
                        "head_rank": {h: r for r, h in enumerate(head_perm.tolist())},
                        "kv_perm": kv_perm,
                        "head_perm": head_perm,
                        "q_w": _rows(b.q_w, s.num_heads, head_perm),
                        "q_b": None if b.q_b is None else _rows(b.q_b, s.num_heads, head_perm),
                        "k_w": _rows(b.k_w, s.num_kv_heads, kv_perm),
                        "k_b": None if b.k_b is None else _rows(b.k_b, s.num_kv_heads, kv_perm),
                        "v_w": _rows(b.v_w, s.num_kv_heads, kv_perm),
                        "v_b": None if b.v_b is None else _rows(b.v_b, s.num_kv_heads, kv_perm),
                        "o_w": _cols(b.o_w, s.num_heads, head_perm),
                        "gate_w": None if b.gate_w is None else b.gate_w[ch].contiguous(),
                        "gate_b": None if b.gate_b is None else b.gate_b[ch].contiguous(),
                        "up_w": b.up_w[ch].contiguous(),
                        "up_b": None if b.up_b is None else b.up_b[ch].contiguous(),
                        "down_w": b.down_w[:, ch].contiguous(),
                    }
                )

    @property
    def weights_hash(self) -> str:
        """Hash of the model's weights (see :func:`envs.runtime.models.weights_hash`), computed once.

        With an adapted weight set the hash covers both sets, so caches of pruned results never mix
        a prepared model with its base.
        """
        if self._weights_hash is None:
            h = weights_hash(self.model)
            self._weights_hash = h if self.adapted is None else tensors_hash(self.adapted_tensors(), prefix=h)
        return self._weights_hash

    def weights_changed(self) -> None:
        """Say that the weights were changed in place (training): :attr:`weights_hash` is computed again."""
        self._weights_hash = None
        self._rule_w.clear()
        if self.adapted is not None:
            self.adapted._rule_w.clear()

    def set_predictor(self, predictor: Any, name: str | None = None) -> None:
        """Install (or with ``None`` remove) the channel predictor that ``predicted`` layers run with.

        ``name`` is what it was loaded by (:attr:`predictor_name`, recorded in environment configs).

        Raises:
            ValueError: A predictor for another model shape.
        """
        if predictor is not None:
            n_layers, rank_shape = predictor.num_layers, predictor.scores(0, torch.zeros(1, self.spec.hidden_size))
            if n_layers != self.spec.num_layers or rank_shape.shape[-1] != self.spec.intermediate_size:
                raise ValueError(
                    f"the channel predictor is for {n_layers} layers of {rank_shape.shape[-1]} channels; this model "
                    f"has {self.spec.num_layers} layers of {self.spec.intermediate_size}"
                )
            predictor = predictor.to(self.device, self.blocks[0].up_w.dtype)
        self.predictor = predictor
        self.predictor_name = None if predictor is None else name
        if self.adapted is not None:
            self.adapted.predictor = predictor
            self.adapted.predictor_name = self.predictor_name

    def set_exit_maps(self, maps: Any, name: str | None = None) -> None:
        """Install (or with ``None`` remove) the exit maps readouts below the last layer go through.

        ``name`` is what they were loaded by (:attr:`exit_maps_name`, recorded in environment configs).
        See :mod:`envs.runtime.exit_maps` and :meth:`output_norm`.

        Raises:
            ValueError: Maps for another model shape.
        """
        if maps is not None and (maps.num_layers, maps.hidden_size) != (self.spec.num_layers, self.spec.hidden_size):
            raise ValueError(
                f"the exit maps are for {maps.num_layers} layers of width {maps.hidden_size}; this model has "
                f"{self.spec.num_layers} of {self.spec.hidden_size}"
            )
        if maps is not None:
            maps = maps.to(self.device, self.blocks[0].q_w.dtype)  # once, not at every readout
        self.exit_maps = maps
        self.exit_maps_name = None if maps is None else name
        if self.adapted is not None:
            self.adapted.exit_maps, self.adapted.exit_maps_name = maps, self.exit_maps_name

    def exits_mapped(self, last_layer: int) -> bool:
        """Whether an answer read after ``last_layer`` goes through an exit map (it is below the top)."""
        return self.exit_maps is not None and 0 <= last_layer < self.spec.num_layers - 1

    def output_norm(self, hidden: torch.Tensor, last_layer: int) -> torch.Tensor:
        """The final norm of ``hidden``, the output of layer ``last_layer``: what the LM head reads.

        With exit maps installed and ``last_layer`` below the last layer, ``hidden`` is first mapped
        to the last layer's (:mod:`envs.runtime.exit_maps`); otherwise this is the final norm alone,
        so the dense path never changes. Every readout (the scorer's, the staged ones, per-token
        exits) goes through here.
        """
        if self.exits_mapped(last_layer):
            hidden = self.exit_maps.apply(hidden, last_layer)
        return self.final_norm(hidden)

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.blocks[0].q_w.device

    def dense_plan(self) -> SparsityPlan:
        """The plan that runs everything."""
        return SparsityPlan.dense(self.spec)

    def uniform_plan(self, *, layers: float = 1.0, heads: float = 1.0, mlp: float = 1.0) -> SparsityPlan:
        """Shortcut for :meth:`SparsityPlan.uniform` with this model's importance orderings."""
        return SparsityPlan.uniform(self.spec, self.importance, layers=layers, heads=heads, mlp=mlp)

    def enable_two_four(self, semi: Any = None, **kwargs: Any) -> Any:
        """Prepare 2:4 semi-structured weights so that plans with ``two_four=True`` layers can run.

        Needs CUDA on compute capability >= 8.0 and fp16/bf16 weights; refused elsewhere (see
        :func:`envs.runtime.semistructured.check_semistructured_support`). The sparse weights are built once
        here, so switching 2:4 on or off per call costs nothing but a dictionary look-up.

        Args:
            semi: A prepared :class:`envs.runtime.semistructured.SemiStructured`; built from this model when ``None``.
            **kwargs: Passed to :meth:`envs.runtime.semistructured.SemiStructured.from_model` (``method``,
                ``sequences``, ``targets``, ``layers``, ``backend``).

        Returns:
            The installed :class:`~envs.runtime.semistructured.SemiStructured`.
        """
        from envs.runtime.semistructured import SemiStructured

        if self.adapted is not None:
            raise ValueError(
                f"{self.name} carries adapted weights for pruned layers; 2:4 weights are built from one weight "
                "set, so prepare the model with dense_weights=adapted to combine it with 2:4"
            )
        semi = SemiStructured.from_model(self, **kwargs) if semi is None else semi
        semi.check_fits(self)
        self.semistructured = semi
        self._sel_cache.clear()
        return semi

    def disable_two_four(self) -> None:
        """Drop the 2:4 weights (plans with ``two_four=True`` are refused again)."""
        self.semistructured = None
        self._sel_cache.clear()

    # ------------------------------------------------------------------ selection
    def select_weights(self, i: int, layer_plan: LayerPlan) -> _Sel:
        """The weights layer ``i`` runs with under ``layer_plan``: the kept heads' projections and MLP channels.

        With ``strategy="views"`` they are prefix views of the importance-ordered copy, built once
        per (layer, layer plan) and cached, so switching back to a plan seen before costs a dict
        lookup; with ``"gather"`` they are gathered from the original weights on every call. Where the
        layer plan asks for 2:4 (:meth:`enable_two_four`), the prepared 2:4 weights take their place. This
        choice is what running a different plan adds before the matmuls start, so
        ``experiments.bench.sparse_lm`` times it as the plan-switching cost.
        """
        key = (i, layer_plan)
        sel = self._sel_cache.get(key)
        if sel is not None:
            return sel
        sel = self._build_sel(i, layer_plan)
        if self.strategy == "views":  # views cost no memory; gathered copies are rebuilt per call
            if len(self._sel_cache) > 4096:
                self._sel_cache.clear()
            self._sel_cache[key] = sel
        return sel

    def _build_sel(self, i: int, lp: LayerPlan) -> _Sel:
        s, b = self.spec, self.blocks[i]
        d = s.head_dim
        nh, nkv, nc = len(lp.heads), len(lp.kv_heads), lp.mlp_channels
        full_attn = nh == s.num_heads and nkv == s.num_kv_heads
        full_mlp = nc == s.intermediate_size
        sparse24 = self._two_four_weights(i) if lp.two_four and nc > 0 else {}
        if full_attn and "q_w" in sparse24:  # 2:4 attention projections, when prepared (full heads only)
            attn = dict(
                q_w=sparse24["q_w"],
                q_b=b.q_b,
                k_w=sparse24["k_w"],
                k_b=b.k_b,
                v_w=sparse24["v_w"],
                v_b=b.v_b,
                o_w=sparse24["o_w"],
                kv_ids=torch.arange(s.num_kv_heads),
                head_kv=None,
            )
        elif full_attn:
            attn = dict(
                q_w=b.q_w,
                q_b=b.q_b,
                k_w=b.k_w,
                k_b=b.k_b,
                v_w=b.v_w,
                v_b=b.v_b,
                o_w=b.o_w,
                kv_ids=torch.arange(s.num_kv_heads),
                head_kv=None,
            )
        elif nh == 0:
            attn = dict(
                q_w=b.q_w[:0],
                q_b=None,
                k_w=b.k_w[:0],
                k_b=None,
                v_w=b.v_w[:0],
                v_b=None,
                o_w=b.o_w[:, :0],
                kv_ids=torch.zeros(0, dtype=torch.long),
                head_kv=None,
            )
        elif self.strategy == "views":
            pm = self._perm[i]
            # Position of each kept head / KV head in the importance-ordered copy.
            kv_pos = sorted(pm["kv_rank"][g] for g in lp.kv_heads)
            h_pos = sorted(pm["head_rank"][h] for h in lp.heads)
            kv_ids = pm["kv_perm"][kv_pos]
            heads_model = pm["head_perm"][h_pos]
            attn = dict(
                q_w=_take_rows(pm["q_w"], h_pos, d),
                q_b=_take_rows(pm["q_b"], h_pos, d),
                k_w=_take_rows(pm["k_w"], kv_pos, d),
                k_b=_take_rows(pm["k_b"], kv_pos, d),
                v_w=_take_rows(pm["v_w"], kv_pos, d),
                v_b=_take_rows(pm["v_b"], kv_pos, d),
                o_w=_take_cols(pm["o_w"], h_pos, d),
                kv_ids=kv_ids,
                head_kv=_head_kv(s, heads_model, kv_ids),
                heads_prefix=_is_prefix(h_pos) and _is_prefix(kv_pos),
            )
        else:
            heads_t = torch.tensor(lp.heads)
            kv_ids = torch.tensor(lp.kv_heads)
            attn = dict(
                q_w=_take_rows(b.q_w, list(lp.heads), d),
                q_b=_take_rows(b.q_b, list(lp.heads), d),
                k_w=_take_rows(b.k_w, list(lp.kv_heads), d),
                k_b=_take_rows(b.k_b, list(lp.kv_heads), d),
                v_w=_take_rows(b.v_w, list(lp.kv_heads), d),
                v_b=_take_rows(b.v_b, list(lp.kv_heads), d),
                o_w=_take_cols(b.o_w, list(lp.heads), d),
                kv_ids=kv_ids,
                head_kv=_head_kv(s, heads_t, kv_ids),
            )
        if lp.token_rule(s):
            if lp.mlp_rule == "predicted" and self.predictor is None:
                raise RuntimeError(missing_predictor(f"the plan's layer {i}"))
            mlp = dict(gate_w=b.gate_w, gate_b=b.gate_b, up_w=b.up_w, up_b=b.up_b, down_w=b.down_w)
        elif full_mlp and sparse24:
            mlp = dict(
                gate_w=sparse24.get("gate_w"),
                gate_b=b.gate_b,
                up_w=sparse24["up_w"],
                up_b=b.up_b,
                down_w=sparse24["down_w"],
            )
        elif full_mlp:
            mlp = dict(gate_w=b.gate_w, gate_b=b.gate_b, up_w=b.up_w, up_b=b.up_b, down_w=b.down_w)
        elif nc == 0:
            mlp = dict(gate_w=None, gate_b=None, up_w=None, up_b=None, down_w=None)
        elif self.strategy == "views":
            pm = self._perm[i]
            mlp = dict(
                gate_w=None if pm["gate_w"] is None else pm["gate_w"][:nc],
                gate_b=None if pm["gate_b"] is None else pm["gate_b"][:nc],
                up_w=pm["up_w"][:nc],
                up_b=None if pm["up_b"] is None else pm["up_b"][:nc],
                down_w=pm["down_w"][:, :nc],
            )
        else:
            idx = torch.tensor(self.importance.mlp_order[i][:nc])
            mlp = dict(
                gate_w=None if b.gate_w is None else b.gate_w.index_select(0, idx),
                gate_b=None if b.gate_b is None else b.gate_b.index_select(0, idx),
                up_w=b.up_w.index_select(0, idx),
                up_b=None if b.up_b is None else b.up_b.index_select(0, idx),
                down_w=b.down_w.index_select(1, idx),
            )
        kv_ids = attn["kv_ids"]
        kv_identity = nkv == s.num_kv_heads and bool((kv_ids == torch.arange(s.num_kv_heads)).all())
        rule = lp.mlp_rule if lp.token_rule(s) else "static"
        return _Sel(n_heads=nh, n_kv=nkv, n_ch=nc, **attn, **mlp, kv_identity=kv_identity, mlp_rule=rule)

    def _two_four_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s prepared 2:4 weights (``gate_w``, ``up_w``, ``down_w``, maybe ``q_w``...)."""
        if self.semistructured is None:
            raise RuntimeError(
                f"the plan runs layer {i} with two_four=True, but this model has no 2:4 weights prepared: call "
                "slm.enable_two_four() first (NVIDIA GPU, compute capability >= 8.0, fp16/bf16 weights), "
                "or set two_four=False"
            )
        return self.semistructured.layer(i)

    # ------------------------------------------------------------------ execution
    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding."""
        return KVCache(self.spec.num_layers)

    def start(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> RunState:
        """Embed ``input_ids`` (``[B, T]`` or ``[T]``) and prepare positions; no layer runs yet."""
        ids = _as_batch(input_ids)
        past = 0 if cache is None else cache.length
        T = ids.shape[1]
        positions = torch.arange(past, past + T, device=ids.device)
        h = self.embed_tokens(ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)[None]
        rope = None if self.rotary is None else self.rotary(h, positions[None])
        fresh = cache is None or all(c is None for c in cache.layers)
        return RunState(h, positions, rope, cache, fresh)

    def run_layers(
        self,
        state: RunState,
        plan: SparsityPlan,
        start: int = 0,
        stop: int | None = None,
        observer: Observer | None = None,
    ) -> RunState:
        """Run decoder layers ``start..stop-1`` of ``plan`` on ``state`` (in place) and return it."""
        stop = self.spec.num_layers if stop is None else stop
        h = state.hidden
        for i in range(start, stop):
            lp = plan.layers[i]
            if self.adapted is not None and not state.adapted:
                state.adapted = not lp.is_full(self.spec)
            if not lp.run:
                continue
            state.last_layer = i
            if observer is not None:
                observer(i, "layer_in", h)
            eng = self.adapted if state.adapted and self.adapted is not None else self
            sel = eng.select_weights(i, lp)
            b = eng.blocks[i]
            if sel.n_heads:
                h = h + self._attention(i, b, sel, self._norm(b.attn_norm, h), state, observer, eng)
            if sel.n_ch:
                h = h + self._mlp(i, b, sel, self._norm(b.mlp_norm, h), observer, eng)
            if observer is not None:
                observer(i, "layer_out", h)
        state.hidden = h
        return state

    def _attention(
        self,
        i: int,
        b: _Block,
        sel: _Sel,
        x: torch.Tensor,
        st: RunState,
        observer: Observer | None,
        eng: SparseLM,
    ) -> torch.Tensor:
        """Layer ``i``'s attention under ``sel``, with ``eng``'s weight copies (this model's or its adapted set)."""
        B, T, _ = x.shape
        d = self.spec.head_dim
        teal = sel.mlp_rule == "input_attn"
        rows = self._rows_attention(x, sel)
        if teal or rows:
            keep = self._attn_keep(sel, x.shape[-1])
            weights, biases = (sel.q_w, sel.k_w, sel.v_w), (sel.q_b, sel.k_b, sel.v_b)
            q, k, v = self._input_proj(x, keep, rows, lambda: eng._attn_rows(i, sel, "qkv_t"), weights, biases)
        else:
            q, k, v = F.linear(x, sel.q_w, sel.q_b), F.linear(x, sel.k_w, sel.k_b), F.linear(x, sel.v_w, sel.v_b)
        q, k, v = q.view(B, T, sel.n_heads, d), k.view(B, T, sel.n_kv, d), v.view(B, T, sel.n_kv, d)
        fast_rope = st.rope is not None and B * T <= self.sparse_rows and fused_available(q, k, *st.rope)
        if fast_rope:  # decoding: one compiled call per tensor instead of ten PyTorch calls, the same numbers
            cos, sin = (c.expand(B, T, d) for c in st.rope)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if st.rope is not None and not fast_rope:
            q, k = _apply_rope(q, k, *st.rope)
        mask = None
        causal = T > 1
        if st.cache is not None:
            k, v, mask = self._cache_update(i, st, sel, k, v)
            causal = causal and mask is None and st.causal_fresh
            if mask is None and T > 1 and not st.causal_fresh:
                mask = _causal_mask(st.positions, st.cache.layers[i].pos)[None, None]
        if sel.head_kv is not None:  # non-uniform grouping: give each query head its own K/V
            k, v = k.index_select(1, sel.head_kv), v.index_select(1, sel.head_kv)
            if mask is not None and mask.shape[1] > 1:
                mask = mask.index_select(1, sel.head_kv)
        elif mask is not None and mask.shape[1] > 1:
            mask = mask.repeat_interleave(sel.n_heads // sel.n_kv, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=b.scaling,
            enable_gqa=sel.head_kv is None and sel.n_heads != k.shape[1],
        )
        out = out.transpose(1, 2).reshape(B, T, sel.n_heads * d)
        if observer is not None:
            observer(i, "attn_heads", out)
        if teal or rows:
            keep = self._attn_keep(sel, out.shape[-1])
            return self._input_proj(out, keep, rows, lambda: eng._attn_rows(i, sel, "o_t"), (sel.o_w,), (b.o_b,))[0]
        return F.linear(out, sel.o_w, b.o_b)

    def _norm(self, norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``norm(h)``; a decode call of a Llama-style RMSNorm as one compiled call (:func:`.kernels.rms_norm`).

        Every plan's decode step takes it, the untouched dense one included: it trims the per-step
        overhead all plans share (two norms per layer, about 13 µs each through the module). A module
        with hooks (``semistructured.input_norms`` collects its outputs by one) is always called.
        """
        if (
            type(norm).__name__ in _RMS_NORMS
            and not (norm._forward_hooks or norm._forward_pre_hooks)
            and h.numel() // h.shape[-1] <= self.sparse_rows
            and fused_available(h, norm.weight)
        ):
            return rms_norm(h, norm.weight, norm.variance_epsilon)
        return norm(h)

    def _rows_attention(self, x: torch.Tensor, sel: _Sel) -> bool:
        """Whether this call's attention projections sum rows of transposed copies (:meth:`_input_proj`).

        Short calls without gradients on CPU float32 (where the compiled kernel runs; elsewhere, and
        for 2:4 weights, the matmuls are the fast form) do, in layers that keep every head under
        ``input_attn`` or with :attr:`fused_attention`, and in layers that keep an importance prefix
        of the heads with :attr:`fused_attention` (a copy per kept-head count: only when asked for,
        to bound memory).
        """
        s = self.spec
        full = sel.n_heads == s.num_heads and sel.n_kv == s.num_kv_heads
        wanted = (full and sel.mlp_rule == "input_attn") or (self.fused_attention and (full or sel.heads_prefix))
        return wanted and self._sparse(x) and fused_available(x)

    def _attn_rows(self, i: int, sel: _Sel, kind: str) -> torch.Tensor:
        """The transposed attention copy (``qkv_t`` or ``o_t``, :meth:`_rule_weight`) that ``sel``'s heads read."""
        s = self.spec
        if sel.n_heads == s.num_heads and sel.n_kv == s.num_kv_heads:
            return self._rule_weight(i, kind)
        key = (i, kind, sel.n_heads, sel.n_kv)  # an importance prefix of the heads (sel.heads_prefix)
        w = self._rule_w.get(key)
        if w is None:
            with torch.no_grad():
                mat = torch.cat([sel.q_w, sel.k_w, sel.v_w], dim=0) if kind == "qkv_t" else sel.o_w
                w = self._rule_w[key] = mat.t().contiguous()
        return w

    def _attn_keep(self, sel: _Sel, n: int) -> int:
        """Entries of an ``n``-entry input an attention projection reads: all, or ``input_attn``'s share."""
        if sel.mlp_rule != "input_attn":
            return n
        return input_keep(n, sel.n_ch, self.spec.intermediate_size)

    @staticmethod
    def _input_proj(
        x: torch.Tensor,
        keep: int,
        rows: bool,
        transposed: Callable[[], torch.Tensor],
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """Projections of ``x`` by ``weights`` that read only its ``keep`` largest-magnitude entries per token.

        With ``rows``, one compiled call (:func:`~envs.runtime.kernels.input_rows`) selects them and
        sums their rows of ``transposed()`` (the weights side by side, transposed: a row per input
        entry); otherwise the other entries are zeroed and the weights multiply (the masked form, the
        reference).
        """
        shape = x.shape
        xr = x.reshape(-1, shape[-1])
        if rows:
            parts = input_rows(xr, keep, transposed()).split([w.shape[0] for w in weights], dim=-1)
            outs = [p if bias is None else p + bias for p, bias in zip(parts, biases, strict=True)]
        else:
            if keep < shape[-1]:
                idx = xr.abs().topk(keep, dim=-1, sorted=False).indices
                xr = torch.zeros_like(xr).scatter(-1, idx, xr.gather(-1, idx))
            outs = [F.linear(xr, w, bias) for w, bias in zip(weights, biases, strict=True)]
        return [o.view(*shape[:-1], -1) for o in outs]

    def _cache_update(
        self, i: int, st: RunState, sel: _Sel, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cache = st.cache
        assert cache is not None
        s = self.spec
        B, _, T, d = k.shape
        full = sel.kv_identity
        if full:
            k_new, v_new, valid_new = k, v, None
        else:
            k_new = k.new_zeros(B, s.num_kv_heads, T, d)
            v_new = v.new_zeros(B, s.num_kv_heads, T, d)
            k_new[:, sel.kv_ids] = k
            v_new[:, sel.kv_ids] = v
            valid_new = torch.zeros(s.num_kv_heads, T, dtype=torch.bool, device=k.device)
            valid_new[sel.kv_ids] = True
        old = cache.layers[i]
        if old is None:
            lc = _LayerCache(k_new, v_new, st.positions.clone(), valid_new)
        else:
            valid = None
            if old.valid is not None or valid_new is not None:
                ov = (
                    old.valid
                    if old.valid is not None
                    else torch.ones(s.num_kv_heads, old.pos.shape[0], dtype=torch.bool)
                )
                nv = valid_new if valid_new is not None else torch.ones(s.num_kv_heads, T, dtype=torch.bool)
                valid = torch.cat([ov, nv], dim=1)
            lc = _LayerCache(
                torch.cat([old.k, k_new], dim=2),
                torch.cat([old.v, v_new], dim=2),
                torch.cat([old.pos, st.positions]),
                valid,
            )
        cache.layers[i] = lc
        k_all, v_all = lc.k, lc.v
        if not full:
            k_all, v_all = k_all.index_select(1, sel.kv_ids), v_all.index_select(1, sel.kv_ids)
        mask = None
        if lc.valid is not None:
            valid = lc.valid if full else lc.valid.index_select(0, sel.kv_ids)  # [nkv, S]
            if not bool(valid.all()):
                mask = valid[None, :, None, :] & _causal_mask(st.positions, lc.pos)[None, None]
        return k_all, v_all, mask

    def _mlp(
        self, i: int, b: _Block, sel: _Sel, x: torch.Tensor, observer: Observer | None, eng: SparseLM
    ) -> torch.Tensor:
        """Layer ``i``'s MLP under ``sel``, with ``eng``'s weights (this model's or its adapted set)."""
        if observer is not None:
            observer(i, "mlp_in", x)
        if sel.mlp_rule != "static":
            return self._token_rule_mlp(i, b, sel, x, observer, eng)
        pruned = sel.n_ch < self.spec.intermediate_size
        kind = self._fused_act(x, b) if (pruned or self.fused_full_mlp) and observer is None else None
        if kind is not None:
            # A static layer in decoding: its importance prefix, by the same fused kernel the per-token
            # rules run, so that rules and static plans are timed on equal terms.
            pm = eng._perm[i]
            xr = x.reshape(-1, x.shape[-1])
            w = eng._rule_weight(i, "prefix")
            out = prefix_glu(sel.n_ch, xr, w, kind, pm["gate_b"], pm["up_b"])
            return self._down_bias(out, b, x.shape)
        if sel.gate_w is not None:
            a = b.act(F.linear(x, sel.gate_w, sel.gate_b)) * F.linear(x, sel.up_w, sel.up_b)
        else:
            a = b.act(F.linear(x, sel.up_w, sel.up_b))
        if observer is not None:
            observer(i, "mlp_act", a)
        return F.linear(a, sel.down_w, b.down_b)

    def _sparse(self, x: torch.Tensor) -> bool:
        """Whether an MLP call on ``x`` reads only its selected channels (short calls without gradients)."""
        return (  # "gather" (training) reads the blocks as they are now, so it keeps no weight copies
            self.rule_impl == "sparse"
            and self.strategy == "views"
            and x.numel() // x.shape[-1] <= self.sparse_rows
            and not torch.is_grad_enabled()
        )

    def _fused_act(self, x: torch.Tensor, b: _Block, sparse: bool | None = None) -> int | None:
        """The activation's kernel code if the fused kernels run this call, else None.

        They run sparse calls (``sparse``: :meth:`_sparse` of ``x``, when the caller knows it) on CPU
        float32 with an activation they compute; the code is looked up once per call.
        """
        if not (self._sparse(x) if sparse is None else sparse) or not fused_available(x):
            return None
        return act_kind(b.act)

    def _rule_weight(self, i: int, kind: str) -> torch.Tensor:
        """Layer ``i``'s weight copy for the fused and row-sum forms, built from this engine's weights once.

        One row per channel, contiguous: ``gu`` ``[I, C, D]`` (gate and up; up alone without a gate),
        ``gud`` ``[I, C + 1, D]`` (those and the down column), ``prefix`` (``gud`` in importance
        order, for static layers), ``ud`` ``[I, 2, D]`` (up and down columns) and ``d`` ``[I, 1, D]``
        (down columns); ``gu_t`` ``[D, C * I]``, a row per input feature; and for ``input_attn`` the
        attention's ``qkv_t`` ``[D, (H + 2 KV) d]`` and ``o_t`` ``[H d, D]``, likewise.
        """
        key = (i, kind)
        w = self._rule_w.get(key)
        if w is None and kind in ("qkv_t", "o_t"):
            b = self.blocks[i]
            with torch.no_grad():
                mat = torch.cat([b.q_w, b.k_w, b.v_w], dim=0) if kind == "qkv_t" else b.o_w
                w = self._rule_w[key] = mat.t().contiguous()
        if w is None:
            b = self.blocks[i]
            gate_w, up_w, down_w = b.gate_w, b.up_w, b.down_w
            if kind == "prefix":
                pm = self._perm[i]
                gate_w, up_w, down_w = pm["gate_w"], pm["up_w"], pm["down_w"]
            mats = [up_w] if gate_w is None else [gate_w, up_w]
            with torch.no_grad():
                if kind == "gu_t":
                    w = torch.cat(mats, dim=0).t().contiguous()
                else:
                    rows = {"gu": mats, "ud": [up_w, down_w.t()], "d": [down_w.t()]}.get(kind, [*mats, down_w.t()])
                    w = torch.stack(rows, dim=1).contiguous()
            self._rule_w[key] = w
        return w

    def _token_rule_mlp(
        self, i: int, b: _Block, sel: _Sel, x: torch.Tensor, observer: Observer | None, eng: SparseLM
    ) -> torch.Tensor:
        """The MLP under a per-token rule: ``sel.n_ch`` channels per token, chosen by ``sel.mlp_rule``."""
        shape = x.shape
        xr = x.reshape(-1, shape[-1])
        R, I, k, rule = xr.shape[0], self.spec.intermediate_size, sel.n_ch, sel.mlp_rule
        gated = b.gate_w is not None
        sparse = self._sparse(xr)
        # One compiled call for the selection, the selected rows and the down sum (no observer: it
        # wants every activation).
        kind = None if observer is not None else self._fused_act(xr, b, sparse)
        fused = kind is not None
        if rule in ("input", "input_attn"):
            kd = input_keep(shape[-1], k, I)
            if sparse and fused:  # one compiled call: the input entries, gate/up rows, activations, down sum
                wt, wd = eng._rule_weight(i, "gu_t"), eng._rule_weight(i, "d")
                return self._down_bias(input_glu(xr, kd, wt, k, wd, kind, b.gate_b, b.up_b), b, shape)
            xi = xr.abs().topk(kd, dim=-1, sorted=False).indices
            if sparse:
                h = rows_sum(eng._rule_weight(i, "gu_t"), xi, xr.gather(-1, xi))
                g_u = h.split(I, dim=-1) if gated else (h,)
                g = g_u[0] + b.gate_b if gated and b.gate_b is not None else g_u[0]
                u = g_u[-1] + b.up_b if b.up_b is not None else g_u[-1]
            else:
                xm = torch.zeros_like(xr).scatter(-1, xi, xr.gather(-1, xi))
                g = F.linear(xm, b.gate_w, b.gate_b) if gated else None
                u = F.linear(xm, b.up_w, b.up_b)
            a = b.act(g) * u if gated else b.act(u)
            idx = a.abs().topk(k, dim=-1, sorted=False).indices
            act = a.gather(-1, idx)
        elif rule == "gate":
            first = F.linear(xr, b.gate_w, b.gate_b) if gated else F.linear(xr, b.up_w, b.up_b)
            ga = b.act(first)
            if fused:
                w = eng._rule_weight(i, "ud" if gated else "d")
                return self._down_bias(topk_down(ga, k, xr, w, b.up_b if gated else None), b, shape)
            idx = ga.abs().topk(k, dim=-1, sorted=False).indices
            if not gated:
                act = ga.gather(-1, idx)
            elif sparse:
                u = rows_dot(b.up_w.unsqueeze(1), xr, idx)[..., 0]
                if b.up_b is not None:
                    u = u + b.up_b[idx]
                act = ga.gather(-1, idx) * u
            else:
                act = ga.gather(-1, idx) * F.linear(xr, b.up_w, b.up_b).gather(-1, idx)
        else:  # predicted
            scores = self.predictor.scores(i, xr)
            if fused:
                out = topk_glu(scores, k, xr, eng._rule_weight(i, "gud"), kind, b.gate_b, b.up_b)
                return self._down_bias(out, b, shape)
            idx = scores.topk(k, dim=-1, sorted=False).indices
            if sparse:
                h = rows_dot(eng._rule_weight(i, "gu"), xr, idx)
                u = h[..., -1] + b.up_b[idx] if b.up_b is not None else h[..., -1]
                if gated:
                    g = h[..., 0] + b.gate_b[idx] if b.gate_b is not None else h[..., 0]
                    act = b.act(g) * u
                else:
                    act = b.act(u)
            else:
                u = F.linear(xr, b.up_w, b.up_b)
                a = b.act(F.linear(xr, b.gate_w, b.gate_b)) * u if gated else b.act(u)
                act = a.gather(-1, idx)
        a_full = None
        if observer is not None or not sparse:  # the activations with the unselected channels zeroed
            a_full = torch.zeros(R, I, dtype=act.dtype, device=act.device).scatter(-1, idx, act)
        if observer is not None:
            observer(i, "mlp_act", a_full.view(*shape[:-1], I))
        if sparse:
            return self._down_bias(rows_sum(eng._rule_weight(i, "d")[:, 0], idx, act), b, shape)
        return F.linear(a_full, b.down_w, b.down_b).view(*shape[:-1], -1)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on ``h``; with :attr:`fused_head`, short calls sum the rows of a transposed copy."""
        head = self.lm_head
        if not (self.fused_head and h.numel() // h.shape[-1] <= self.sparse_rows and fused_available(h)):
            return head(h)
        key = (-1, "head_t")
        wt = self._rule_w.get(key)
        if wt is None:
            with torch.no_grad():
                wt = self._rule_w[key] = head.weight.t().contiguous()
        out = input_rows(h.reshape(-1, h.shape[-1]), h.shape[-1], wt)
        if getattr(head, "bias", None) is not None:
            out = out + head.bias
        return out.view(*h.shape[:-1], -1)

    @staticmethod
    def _down_bias(out: torch.Tensor, b: _Block, shape: torch.Size) -> torch.Tensor:
        """A sparse down sum ``[R, D]`` with the down bias added, in the MLP input's shape."""
        if b.down_b is not None:
            out = out + b.down_b
        return out.view(*shape[:-1], -1)

    def finish(self, state: RunState, logits: LogitsSpec = "all") -> ForwardOutput:
        """Apply the final norm (through the exit map of a state below the top, :meth:`output_norm`) and the head."""
        h = self.output_norm(state.hidden, state.last_layer)
        out = None
        if isinstance(logits, str):
            if logits == "all":
                out = self._head(h)
            elif logits == "last":
                out = self._head(h[:, -1:])
            elif logits != "none":
                raise ValueError(f"logits must be 'all', 'last', 'none', an index, a slice or a tensor, got {logits!r}")
        elif isinstance(logits, int):
            out = self._head(h[:, logits : logits + 1] if logits != -1 else h[:, -1:])
        elif isinstance(logits, slice):
            out = self._head(h[:, logits])
        else:
            out = self._head(h.index_select(1, torch.as_tensor(logits, device=h.device)))
        return ForwardOutput(out, h, state.cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        plan: SparsityPlan | None = None,
        *,
        cache: KVCache | None = None,
        use_cache: bool = False,
        logits: LogitsSpec = "all",
        observer: Observer | None = None,
        grad: bool = False,
    ) -> ForwardOutput:
        """Run ``plan`` (dense if ``None``) on ``input_ids``.

        Args:
            input_ids: ``[B, T]`` or ``[T]`` token ids (a batch of equal-length rows; no padding).
            plan: The sparsity plan; must fit this model.
            cache: A KV cache from :meth:`new_cache`, extended in place. On an exception it is
                rolled back, so the caller can retry.
            use_cache: Create a fresh cache when ``cache`` is ``None``.
            logits: Which positions get LM-head logits: ``"all"``, ``"last"``, ``"none"``, an index,
                a slice, or an index tensor. The head is the largest single matmul of a small
                model, so ask only for what you score.
            observer: Called with ``(layer, name, tensor)`` at ``layer_in``, ``attn_heads``,
                ``mlp_in`` (the MLP block's normed input), ``mlp_act`` and ``layer_out``; used by
                calibration, probes and channel predictors.
            grad: Track gradients (for fine-tuning under plans). Gradients reach the model's own
                parameters only through dense sub-blocks or with ``strategy="gather"``; the
                importance-ordered copy used by ``"views"`` is not a parameter.
        """
        plan = self.check_plan(plan)
        if cache is None and use_cache:
            cache = self.new_cache()
        snap = cache.snapshot() if cache is not None else None
        try:
            with torch.set_grad_enabled(grad):
                state = self.start(input_ids, cache)
                self.run_layers(state, plan, observer=observer)
                out = self.finish(state, logits)
        except BaseException:
            if cache is not None and snap is not None:
                cache.restore(snap)
            raise
        if cache is not None:
            cache.length += state.positions.shape[0]
        return out

    __call__ = forward

    def check_plan(self, plan: SparsityPlan | None) -> SparsityPlan:
        """``plan`` (the dense plan for ``None``), refused when it is not a plan for this model's shape.

        Raises:
            TypeError: Not a :class:`SparsityPlan`.
            ValueError: A plan for another model shape.
        """
        if plan is None:
            return self.dense_plan()
        if not isinstance(plan, SparsityPlan):
            raise TypeError(f"plan must be a SparsityPlan, got {type(plan).__name__}")
        if plan.spec != self.spec:
            raise ValueError(f"plan is for a model of shape {plan.spec}, but this model is {self.spec}")
        return plan

    @torch.no_grad()
    def token_nll(self, input_ids: torch.Tensor, plan: SparsityPlan | None = None, *, start: int = 1) -> torch.Tensor:
        """Negative log-likelihood of tokens ``start..T-1`` of each row, ``[B, T-start]``."""
        ids = _as_batch(input_ids)
        if not 1 <= start < ids.shape[1]:
            raise ValueError(f"start must be in [1, {ids.shape[1] - 1}], got {start}")
        out = self.forward(ids, plan, logits=slice(start - 1, ids.shape[1] - 1))
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        return -logp.gather(-1, ids[:, start:, None]).squeeze(-1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        plan: SparsityPlan | None = None,
        *,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
        plan_fn: Callable[[int, torch.Tensor], SparsityPlan] | None = None,
    ) -> torch.Tensor:
        """Greedy generation with a KV cache, under a fixed plan or a plan chosen per token.

        Args:
            input_ids: Prompt, ``[B, T]`` or ``[T]``.
            plan: Plan for the prompt and (without ``plan_fn``) every new token.
            max_new_tokens: Tokens to generate.
            eos_token_id: Stop when every row produced it.
            plan_fn: ``(step, last_logits) -> plan`` for per-token plans.

        Returns:
            ``[B, T + n]`` ids, prompt included.
        """
        ids = _as_batch(input_ids)
        cache = self.new_cache()
        out = self.forward(ids, plan, cache=cache, logits="last")
        seq = ids
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            if step == max_new_tokens - 1:
                break
            p = plan_fn(step, out.logits[:, -1]) if plan_fn is not None else plan
            out = self.forward(nxt, p, cache=cache, logits="last")
        return seq

    # ------------------------------------------------------------------ verification
    def masked_reference(self, plan: SparsityPlan) -> torch.nn.Module:
        """A deep copy of the untouched model with the plan applied as zeroed weights.

        Dropped heads have their output-projection columns zeroed, dropped MLP channels their
        down-projection columns, and skipped layers both output projections and their biases, so
        the copy computes what the plan means with the model's own forward. For tests and audits:
        it costs a full weight copy.
        """
        import copy

        plan = self.check_plan(plan)
        ref = copy.deepcopy(self.model)
        twin = SparseLM.__new__(SparseLM)
        twin.model, twin.family = ref, self.family
        twin._extract()
        d = self.spec.head_dim
        with torch.no_grad():
            for i, (lp, b) in enumerate(zip(plan.layers, twin.blocks, strict=True)):
                keep_h = set(lp.heads) if lp.run else set()
                for h in range(self.spec.num_heads):
                    if h not in keep_h:
                        b.o_w[:, h * d : (h + 1) * d] = 0
                if not keep_h and b.o_b is not None:
                    b.o_b.zero_()
                n = lp.mlp_channels if lp.run else 0
                drop = self.importance.mlp_order[i][n:]
                if drop:
                    b.down_w[:, torch.tensor(drop)] = 0
                if n == 0 and b.down_b is not None:
                    b.down_b.zero_()
        return ref


# ---------------------------------------------------------------------------------------- helpers
def _as_batch(ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] or [T] with T >= 1, got shape {tuple(ids.shape)}")
    return ids


def _grouped_head_order(spec: ModelSpec, head_order: Sequence[int], kv_order: Sequence[int]) -> list[int]:
    """Query heads grouped by KV head (groups by importance), within a group by importance."""
    rank = {h: r for r, h in enumerate(head_order)}
    out: list[int] = []
    for g in kv_order:
        out.extend(sorted(range(g * spec.group_size, (g + 1) * spec.group_size), key=rank.__getitem__))
    return out


def _is_prefix(pos: Sequence[int]) -> bool:
    return list(pos) == list(range(len(pos)))


def _take_rows(w: torch.Tensor | None, pos: Sequence[int], d: int) -> torch.Tensor | None:
    """Rows of heads ``pos`` (``d`` rows each): a view for a prefix, else a gathered copy."""
    if w is None:
        return None
    if _is_prefix(pos):
        return w[: len(pos) * d]
    idx = (torch.tensor(pos)[:, None] * d + torch.arange(d)[None]).reshape(-1)
    return w.index_select(0, idx.to(w.device))


def _take_cols(w: torch.Tensor, pos: Sequence[int], d: int) -> torch.Tensor:
    if _is_prefix(pos):
        return w[:, : len(pos) * d]
    idx = (torch.tensor(pos)[:, None] * d + torch.arange(d)[None]).reshape(-1)
    return w.index_select(1, idx.to(w.device))


def _head_kv(spec: ModelSpec, heads_model: torch.Tensor, kv_ids: torch.Tensor) -> torch.Tensor | None:
    """Map each kept query head to its KV head's slot; ``None`` when SDPA's uniform GQA applies."""
    slot = {int(g): j for j, g in enumerate(kv_ids.tolist())}
    mapping = [slot[int(h) // spec.group_size] for h in heads_model.tolist()]
    n_rep = len(mapping) // max(len(slot), 1)
    if len(mapping) == n_rep * len(slot) and mapping == [j for j in range(len(slot)) for _ in range(n_rep)]:
        return None
    return torch.tensor(mapping)


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``[T, S]`` bool: query at ``q_pos[t]`` may see the key at ``k_pos[s]``."""
    return k_pos[None, :] <= q_pos[:, None]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set PyTorch's intra-op threads (``None``: leave as is)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------- staged prompts
@dataclass
class Prefill:
    """A prompt already run under ``plan``: scoring or decoding continues from here.

    Attributes:
        prompt: Prompt token ids.
        plan: The plan it ran under (identity-compared with the plan the scorer is given).
        cache: KV cache after the prompt (length advanced).
        first: Logits at the last prompt position, ``[1, V]``.
        rest: Final-normed hidden states of a batch of continuations already run under the same plan
            (``[C, W, D]``), or ``None``.
        rest_conts: The continuations ``rest`` belongs to (their tokens before the last were fed).
    """

    prompt: list[int]
    plan: SparsityPlan
    cache: KVCache
    first: torch.Tensor
    rest: torch.Tensor | None = None
    rest_conts: list[list[int]] | None = None


def run_rest(slm: SparseLM, probe: Any, plan: SparsityPlan, start: int, logits: LogitsSpec = "last") -> Prefill:
    """Finish the prompt under ``plan`` from the probe's state (layers ``start..L-1``), without touching the probe.

    ``probe`` is a :class:`envs.observation.ProbeResult` (its ``ids``, ``state``, ``cache`` and
    ``prompt_len``). Returns a :class:`Prefill` the scorer or a decoder continues from. Idempotent
    (the probe's state is copied), so a meter may run it several times.
    """
    with torch.no_grad():
        cache = KVCache(probe.cache.num_layers, 0, list(probe.cache.layers))
        state = replace(probe.state, cache=cache)
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
