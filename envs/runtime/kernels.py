"""CPU kernels for per-token MLP channel selection: dot products with gathered weight rows.

A per-token rule (:data:`envs.runtime.plan.MLP_RULES`) runs the gate and up projections for a
different set of channels in every token. PyTorch can only do that by copying the selected rows
(``index_select``) and then multiplying, which reads and writes each selected row twice more than
the multiply needs; on a memory-bound CPU decode step that costs about as much as the channels it
skips (``experiments.bench.activation`` measures it). :func:`rows_dot` reads each selected row once,
with a numba-compiled loop; the down projection needs no kernel of ours, because a weighted sum of
selected rows of its transposed weight is exactly :func:`torch.nn.functional.embedding_bag`.

numba is a dependency; should it fail to import, :func:`rows_dot` falls back to the copying
PyTorch form, which computes the same numbers (slower), and :data:`BACKEND` says which one runs.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # pragma: no cover - the import is environment-dependent
    from numba import njit

    @njit(fastmath=True, nogil=True, cache=True)
    def _rows_dot_nb(w: np.ndarray, x: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
        # w is [I, C * D]: one flat row per channel, so the inner loop runs over contiguous 1-D slices
        # (about 3x faster than indexing a [I, C, D] array in the loop).
        rows, k = idx.shape
        c_n, d_n = out.shape[2], x.shape[1]
        for r in range(rows):
            xr = x[r]
            for j in range(k):
                wr = w[idx[r, j]]
                for c in range(c_n):
                    s = np.float32(0.0)
                    o = c * d_n
                    for d in range(d_n):
                        s += wr[o + d] * xr[d]
                    out[r, j, c] = s

    BACKEND = "numba"
except ImportError:  # pragma: no cover
    _rows_dot_nb = None
    BACKEND = "torch"


def missing_predictor(what: str) -> str:
    """The message for ``what`` (a plan, a rule list) that needs the ``predicted`` rule's channel predictor."""
    return (
        f"{what} uses mlp_rule 'predicted', but the model has no channel predictor: train one with "
        "`python -m experiments.predictor model=<model>` and load it (predictor=<name> in an environment, "
        "or slm.set_predictor(envs.runtime.predictor.load_predictor(<name>, slm)))"
    )


def rows_dot(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[r, j, c] = w[idx[r, j], c] · x[r]``: the selected rows' projections, per token.

    Args:
        w: ``[I, C, D]`` weights, ``C`` projections interleaved per channel (gate and up: ``C = 2``),
            contiguous.
        x: ``[R, D]`` inputs, one row per token.
        idx: ``[R, k]`` int64 channel indices per token.

    Returns:
        ``[R, k, C]`` in ``x``'s dtype.
    """
    R, k = idx.shape
    C = w.shape[1]
    use_numba = (
        _rows_dot_nb is not None
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
    )
    if not use_numba:
        rows = w.reshape(w.shape[0], -1).index_select(0, idx.reshape(-1)).view(R, k, C, w.shape[2])
        return torch.einsum("rkcd,rd->rkc", rows, x)
    out = np.empty((R, k, C), dtype=np.float32)
    flat = w.detach().reshape(w.shape[0], -1)  # a view for contiguous weights
    _rows_dot_nb(flat.numpy(), x.detach().contiguous().numpy(), idx.contiguous().numpy(), out)
    return torch.from_numpy(out)


def rows_sum(wt: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_j weights[r, j] * wt[idx[r, j]]``: a projection whose input is zero outside ``idx``.

    Args:
        wt: ``[N, D_out]`` transposed weights (a row per input feature), contiguous.
        idx: ``[R, k]`` int64 input features kept per token.
        weights: ``[R, k]`` their values.

    Returns:
        ``[R, D_out]``.
    """
    return torch.nn.functional.embedding_bag(idx, wt, per_sample_weights=weights, mode="sum")
