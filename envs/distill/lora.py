"""Low-rank deltas on SparseLM's extracted decoder weights (``method="lora"``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from envs.runtime.sparse_lm import ADAPTABLE, SparseLM

LORA_TARGETS = ADAPTABLE  # every decoder matrix a plan slices


class LowRankDeltas(torch.nn.Module):
    """LoRA-style deltas ``W + (alpha / r) B A`` on SparseLM's extracted decoder weights.

    Why not ``peft``: peft wraps the ``nn.Linear`` modules, but SparseLM slices the weight tensors
    it extracted at construction and never calls those modules, so a peft adapter would be
    invisible to pruned forwards. Adding the delta to the extracted tensors for the duration of a
    forward (:meth:`applied`) makes every gathered slice see the adapted weights, and
    :meth:`merge` folds them into the real parameters at the end, so the published model is a
    plain checkpoint. ``B`` starts at zero, so an untrained delta changes nothing.

    Args:
        slm: The model whose ``blocks`` are adapted.
        rank: Rank ``r``.
        alpha: Scaling numerator.
        seed: Seed of ``A``'s initialisation.
    """

    def __init__(self, slm: SparseLM, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.slm = [slm]  # a list keeps the model out of this module's parameters
        self.scale = alpha / rank
        g = torch.Generator().manual_seed(int(seed))
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for i, blk in enumerate(slm.blocks):
            for name in LORA_TARGETS:
                w = getattr(blk, name)
                if w is None:
                    continue
                key = f"{i}_{name}"
                a = torch.randn(rank, w.shape[1], generator=g, dtype=w.dtype) / math.sqrt(w.shape[1])
                self.a[key] = torch.nn.Parameter(a)
                self.b[key] = torch.nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block, the model's blocks hold ``W + delta`` (differentiable in ``A`` and ``B``)."""
        slm = self.slm[0]
        saved: list[tuple[Any, str, torch.Tensor]] = []
        try:
            for key in self.a.keys():
                i, name = key.split("_", 1)
                blk = slm.blocks[int(i)]
                w = getattr(blk, name)
                saved.append((blk, name, w))
                setattr(blk, name, w + self.scale * (self.b[key] @ self.a[key]))
            yield
        finally:
            for blk, name, w in saved:
                setattr(blk, name, w)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into the model's parameters and zero ``B``."""
        slm = self.slm[0]
        for key in self.a.keys():
            i, name = key.split("_", 1)
            getattr(slm.blocks[int(i)], name).add_(self.scale * (self.b[key] @ self.a[key]))
            self.b[key].zero_()
        slm.weights_changed()
