"""Importance orderings of layers, heads and MLP channels, from a calibration pass over natural text.

- Layers: block influence (ShortGPT), ``1 - cos(h_in, h_out)`` averaged over tokens: a layer that
  barely turns the residual stream matters least.
- Heads: the mean norm of each head's contribution to the residual stream (its output through its
  slice of the output projection). A KV group's importance is the sum of its query heads'.
- MLP channels: Wanda-style ``||x_c||_2 * sum_i |W_down[i, c]|`` — activation scale times the weight
  that carries it out.

Orderings are cached as JSON next to the model, keyed by the weights hash and the calibration
text, so a model is calibrated once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from envs.runtime.plan import ModelSpec

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import SparseLM

IMPORTANCE_VERSION = 1


@dataclass
class Importance:
    """Orderings, most important first, and the scores behind them.

    Attributes:
        layer_order: Decoder layers, most important first.
        head_order: Per layer, query heads, most important first.
        kv_order: Per layer, KV heads, most important first.
        mlp_order: Per layer, MLP channels, most important first.
        layer_scores: Block influence per layer.
        head_scores: Per layer, contribution norm per query head.
        meta: Method, token count, text hash, weights hash.
    """

    layer_order: list[int]
    head_order: list[list[int]]
    kv_order: list[list[int]]
    mlp_order: list[list[int]]
    layer_scores: list[float] = field(default_factory=list)
    head_scores: list[list[float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls, spec: ModelSpec) -> Importance:
        """Model order everywhere: a placeholder until a calibration is available."""
        L = spec.num_layers
        return cls(
            layer_order=list(range(L)),
            head_order=[list(range(spec.num_heads)) for _ in range(L)],
            kv_order=[list(range(spec.num_kv_heads)) for _ in range(L)],
            mlp_order=[list(range(spec.intermediate_size)) for _ in range(L)],
            meta={"method": "identity"},
        )

    def check(self, spec: ModelSpec) -> None:
        """Raise ``ValueError`` if the orderings do not fit ``spec``."""

        def perm(name: str, seq: Sequence[int], n: int) -> None:
            if sorted(seq) != list(range(n)):
                raise ValueError(f"Importance.{name} must be a permutation of 0..{n - 1}")

        perm("layer_order", self.layer_order, spec.num_layers)
        for key, n in (
            ("head_order", spec.num_heads),
            ("kv_order", spec.num_kv_heads),
            ("mlp_order", spec.intermediate_size),
        ):
            rows = getattr(self, key)
            if len(rows) != spec.num_layers:
                raise ValueError(f"Importance.{key} has {len(rows)} layers; the model has {spec.num_layers}")
            for i, row in enumerate(rows):
                perm(f"{key}[{i}]", row, n)

    def save(self, path: str | Path) -> None:
        """Write as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"version": IMPORTANCE_VERSION, **asdict(self)}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        """Read a file written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        if data.pop("version", None) != IMPORTANCE_VERSION:
            raise ValueError(f"{path}: importance file of another version; delete it to recalibrate")
        return cls(**data)


@torch.no_grad()
def calibrate(slm: SparseLM, sequences: Sequence[torch.Tensor], *, text_id: str = "") -> Importance:
    """Compute importance orderings by running the dense model over ``sequences``.

    Args:
        slm: The model.
        sequences: Token-id tensors (``[T]`` or ``[1, T]``), natural text not used for evaluation.
        text_id: Identifies the text, for the cache key and the card.
    """
    s = slm.spec
    L, d = s.num_layers, s.head_dim
    bi = torch.zeros(L, dtype=torch.float64)
    head = torch.zeros(L, s.num_heads, dtype=torch.float64)
    act_sq = torch.zeros(L, s.intermediate_size, dtype=torch.float64)
    n_tok = 0
    layer_in: dict[int, torch.Tensor] = {}
    o_w = [b.o_w for b in slm.blocks]

    def observe(i: int, name: str, t: torch.Tensor) -> None:
        if name == "layer_in":
            layer_in[i] = t
        elif name == "layer_out":
            cos = torch.nn.functional.cosine_similarity(layer_in.pop(i).double(), t.double(), dim=-1)
            bi[i] += (1 - cos).sum()
        elif name == "attn_heads":
            B, T, _ = t.shape
            per_head = t.reshape(B * T, s.num_heads, d)
            w = o_w[i].reshape(o_w[i].shape[0], s.num_heads, d)  # [D, H, d]
            contrib = torch.einsum("nhd,ehd->nhe", per_head, w)  # each head's residual contribution
            head[i] += contrib.norm(dim=-1).double().sum(0)
        elif name == "mlp_act":
            act_sq[i] += t.reshape(-1, t.shape[-1]).double().pow(2).sum(0)

    for ids in sequences:
        ids = torch.as_tensor(ids).reshape(1, -1)
        slm.forward(ids, None, logits="none", observer=observe)
        n_tok += ids.shape[1]
    if n_tok == 0:
        raise ValueError("calibrate needs at least one non-empty sequence")
    bi /= n_tok
    head /= n_tok
    mlp_scores = [(act_sq[i].sqrt() * b.down_w.abs().double().sum(0)).tolist() for i, b in enumerate(slm.blocks)]

    def order(scores: Sequence[float]) -> list[int]:
        return sorted(range(len(scores)), key=lambda j: (-scores[j], j))

    head_order = [order(head[i].tolist()) for i in range(L)]
    kv_scores = head.reshape(L, s.num_kv_heads, s.group_size).sum(-1)
    return Importance(
        layer_order=order(bi.tolist()),
        head_order=head_order,
        kv_order=[order(kv_scores[i].tolist()) for i in range(L)],
        mlp_order=[order(m) for m in mlp_scores],
        layer_scores=bi.tolist(),
        head_scores=head.tolist(),
        meta={
            "method": "block-influence/head-output-norm/wanda-channel",
            "tokens": n_tok,
            "text": text_id,
            "weights": slm.weights_hash,
        },
    )


def calibration_sequences(slm: SparseLM, *, max_docs: int = 64, max_len: int = 256) -> tuple[list[torch.Tensor], str]:
    """Token sequences from the train split of the natural-text corpus, and an id for them."""
    from envs.data.corpus import natural_text

    if slm.tokenizer is None:
        raise ValueError("calibration from text needs a tokenizer; pass token sequences to calibrate() instead")
    docs = natural_text("train")[:max_docs]
    seqs = [torch.tensor(slm.tokenizer(doc)["input_ids"][:max_len]) for doc in docs]
    seqs = [x for x in seqs if x.numel() > 1]
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:12]
    return seqs, f"news-train:{len(seqs)}x{max_len}:{digest}"


def load_or_calibrate(slm: SparseLM) -> Importance:
    """The cached orderings for this model's weights, calibrating (and caching) if absent."""
    from envs.data.files import cache_root

    folder = Path(slm.cache_dir) if slm.cache_dir is not None else cache_root() / "importance"
    path = folder / f"importance-{slm.weights_hash}.json"
    if path.is_file():
        imp = Importance.load(path)
        imp.check(slm.spec)
        return imp
    seqs, text_id = calibration_sequences(slm)
    imp = calibrate(slm, seqs, text_id=text_id)
    try:
        imp.save(path)
    except OSError:  # a read-only model folder: cache under the PruneGym root instead
        imp.save(cache_root() / "importance" / path.name)
    return imp
