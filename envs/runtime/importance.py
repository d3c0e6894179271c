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
        from envs.data.files import atomic_write_json

        atomic_write_json(path, {"version": IMPORTANCE_VERSION, **asdict(self)}, indent=None)

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


CALIBRATION_DOCS, CALIBRATION_LEN = 64, 256


def calibration_text(max_docs: int = CALIBRATION_DOCS, max_len: int = CALIBRATION_LEN) -> tuple[list[str], str]:
    """The calibration documents (train split of the natural-text corpus) and an id naming them exactly."""
    from envs.data.corpus import natural_text

    docs = natural_text("train")[:max_docs]
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:12]
    return docs, f"news-train:{len(docs)}docs:{max_len}tok:{digest}"


def calibration_sequences(
    slm: SparseLM, *, max_docs: int = CALIBRATION_DOCS, max_len: int = CALIBRATION_LEN
) -> tuple[list[torch.Tensor], str]:
    """Token sequences of :func:`calibration_text` for ``slm``, and the text's id."""
    if slm.tokenizer is None:
        raise ValueError("calibration from text needs a tokenizer; pass token sequences to calibrate() instead")
    docs, text_id = calibration_text(max_docs, max_len)
    seqs = [torch.tensor(slm.tokenizer(doc)["input_ids"][:max_len]) for doc in docs]
    return [x for x in seqs if x.numel() > 1], text_id


def _checked(imp: Importance, slm: SparseLM) -> Importance:
    imp.check(slm.spec)
    return imp


def importance_files(slm: SparseLM, text_id: str) -> tuple[Path | None, list[Path]]:
    """Where the orderings of ``slm`` are looked for: ``(pinned, cached)``.

    ``pinned`` is ``importance-<weights hash>.json`` in the model's own folder (a prepared model
    writes the orderings it was trained with there; they take precedence). ``cached`` are the
    calibration caches keyed by the weights hash *and* the calibration text, in the model's cache
    folder and then under :func:`~envs.data.files.cache_root` (used when the model folder is
    read-only).
    """
    from envs.data.files import cache_root

    digest = hashlib.sha256(text_id.encode()).hexdigest()[:12]
    name = f"importance-{slm.weights_hash}-{digest}.json"
    folder = Path(slm.cache_dir) if slm.cache_dir is not None else None
    pinned = folder / f"importance-{slm.weights_hash}.json" if folder is not None else None
    cached = ([folder / name] if folder is not None else []) + [cache_root() / "importance" / name]
    return pinned, cached


def load_or_calibrate(slm: SparseLM) -> Importance:
    """The orderings for this model's weights and calibration text, calibrating (and caching) if absent.

    A pinned file in the model's folder wins (see :func:`importance_files`); otherwise the cache is
    keyed by the weights hash and the calibration text, so a change to either recalibrates. A cache
    written under the PruneGym root because the model folder was read-only is found there again.
    """
    folder = Path(slm.cache_dir) if slm.cache_dir is not None else None
    pinned = folder / f"importance-{slm.weights_hash}.json" if folder is not None else None
    if pinned is not None and pinned.is_file():  # before reading any calibration text: a prepared model needs none
        return _checked(Importance.load(pinned), slm)
    _, text_id = calibration_text()
    _, cached = importance_files(slm, text_id)
    for path in cached:
        if path.is_file():
            return _checked(Importance.load(path), slm)
    seqs, _ = calibration_sequences(slm)
    imp = calibrate(slm, seqs, text_id=text_id)
    for path in cached:
        try:
            imp.save(path)
            break
        except OSError:  # a read-only model folder: cache under the PruneGym root instead
            continue
    return imp
