"""CPU kernels for MLP layers that run some of their channels: the chosen channels' weights, read once.

A per-token rule (:data:`envs.runtime.plan.MLP_RULES`) runs the gate, up and down projections for a
different set of channels in every token. PyTorch can only do that by copying the selected rows
(``index_select``) and then multiplying, which reads and writes each selected row twice more than
the multiply needs, and a chain of small PyTorch calls per layer adds its own overhead; on a
memory-bound CPU decode step that cost about as much as the channels a rule skipped.

Four fused, numba-compiled kernels run a decode token's whole MLP in one call per layer (and a
fifth, :func:`input_rows`, the attention projections of ``input_attn`` and the other row-sum forms):

- :func:`topk_glu` (``predicted``): from a score per channel, keep the ``k`` best, compute their gate
  and up dot products, the activation, and add the channel's down column weighted by it.
- :func:`prefix_glu` (pruned ``static`` layers): the same for channels ``0..k-1`` of an
  importance-ordered copy, so that static plans and rules are timed with the same code.
- :func:`topk_down` (``gate``): the gate's activations are known already; keep the ``k`` largest in
  magnitude, finish them (times up) and sum their down columns.
- :func:`input_glu` (``input``, ``input_attn``): gate and up from the rows of the input's largest
  entries, the activations, then the down columns of the ``k`` largest: one call instead of two and
  the PyTorch calls between them.

Two layout choices carry the speed (measured on the embedded model's shapes, 30 layers' weights
cycled so that every read comes from memory, one thread). Each channel's gate row, up row and down
column sit side by side in one contiguous stretch of a per-layer copy, which made a channel 15-20%
cheaper than two separate copies. Eight channels are streamed at once, with the row length a
compile-time constant, which keeps enough reads in flight to use the memory bus: at 384 of 1,536
channels 0.15 ms against 0.32 ms for PyTorch's matmuls on the sliced weights, about 2.4x slower
when the row length is read at run time, 2x slower one channel at a time. While a block is summed,
the first lines of the next block's rows are prefetched (:func:`_prefetch_next`): scattered rows
otherwise each start with a cache miss the hardware prefetcher cannot foresee.

Choosing the ``k`` largest is a radix select (:func:`_top_keys_nb`): a histogram of the values' top
bits, a partition of the one bin that holds the threshold, and a pass that collects the indices, all
without data-dependent branches. A partition by comparisons mispredicts about every other branch on
real activations: on varied inputs it took 23 us for 1,536 channels and 9 us for 576 entries against
5 and 2.5 us (``python -m experiments.bench.kernels``, on the model's own activations), and
``input_attn`` selects four times per layer (q/k/v, o, gate/up, down), so the selection had cost
about a twentieth of a dense decode step.

The kernels choose the same channels as ``torch.topk`` on the same numbers (the set of the ``k``
largest is unique unless values tie exactly; ties go to the lower index), so the masked form is
their reference. The pieces they fuse remain for the other cases (an activation the kernels lack,
an observer that wants every activation): :func:`rows_dot` (gathered dot products) and
:func:`rows_sum` (weighted row sums, which is :func:`torch.nn.functional.embedding_bag`).

numba is a dependency; should it fail to import, :func:`fused_available` is false and every layer
takes its PyTorch form, which computes the same numbers (slower); :data:`BACKEND` says which runs.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

ACT_SILU, ACT_GELU_TANH = 0, 1
BLOCK = 8  # channels the fused kernels stream at once
_ACT_KINDS = {  # activation modules the fused kernels compute, by class name
    "SiLU": ACT_SILU,
    "SiLUActivation": ACT_SILU,
    "NewGELUActivation": ACT_GELU_TANH,
    "GELUTanh": ACT_GELU_TANH,
    "PytorchGELUTanh": ACT_GELU_TANH,
    "GELUPytorchTanh": ACT_GELU_TANH,
}

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

    _FM = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; no assumptions about inf or nan

    from llvmlite import binding as _llvm_binding
    from llvmlite import ir as _ir
    from numba import types as _nb_types
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    # LLVM's prefetch intrinsic is named by its pointer type: opaque pointers (LLVM 15 on) or i8*.
    _PREFETCH = "llvm.prefetch.p0" if _llvm_binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"

    @_intrinsic
    def _prefetch(typingctx, arr, idx):  # noqa: ANN001, ANN202, ARG001
        # A read prefetch of arr[idx] into every cache level: a hint, no effect on the results.
        sig = _nb_types.void(arr, idx)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = _cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
            i8p = builder.bitcast(ptr, _ir.IntType(8).as_pointer())
            i32 = _ir.IntType(32)
            fnty = _ir.FunctionType(_ir.VoidType(), [i8p.type, i32, i32, i32])
            fn = _cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
            builder.call(fn, [i8p, _ir.Constant(i32, 0), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    PREFETCH_LINES = 8  # 64-byte lines asked for at the start of each of the next block's rows

    @njit(nogil=True, cache=True, inline="always")
    def _prefetch_next(w, js, t, m) -> None:  # noqa: ANN001
        # Ask for the first lines of the rows of the block after the one at t (rows js[t + 8 ..]): the
        # hardware prefetcher follows a row once it is read, but not the jump to the next scattered
        # row, so each block would otherwise start with eight demand misses (10-15% of a short row's
        # time at 40% of rows kept, in a microbenchmark of cold weights).
        nt = t + BLOCK
        if nt < m:
            lines = min(PREFETCH_LINES, w.shape[1] // 16)
            for q in range(min(BLOCK, m - nt)):
                wr = w[js[nt + q]]
                for line in range(lines):
                    _prefetch(wr, line * 16)

    @njit(fastmath=_FM, nogil=True, cache=True, inline="always")
    def _act_nb(v: float, kind: int) -> float:
        if kind == ACT_SILU:
            return v / (1.0 + np.exp(-v))
        return 0.5 * v * (1.0 + np.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))

    SELECT_BINS = 2048  # first-pass bins of the selection: the top 11 bits of a 32-bit (31 for |x|) key

    @njit(nogil=True, cache=True)
    def _top_keys_nb(keys: np.ndarray, shift: int, k: int) -> np.ndarray:
        # The indices of the k largest int64 keys (below 2 ** (shift + 11)), ascending, ties taken first
        # come. A radix select: a histogram of the keys' top 11 bits finds the bin that holds the k-th
        # largest, a partition of that bin's few keys finds it, and a last pass collects the indices. Each
        # pass is branch-free: a comparison-based partition of real activations mispredicts about every
        # other comparison (23 us for 1,536 channels against 5 us here, on varied inputs).
        n = keys.shape[0]
        if k >= n:
            return np.arange(n)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        hist = np.zeros(SELECT_BINS, dtype=np.int32)
        top = 0
        for j in range(n):
            b = keys[j] >> shift
            hist[b] += 1
            top = max(top, b)
        above = 0  # keys in the bins above bin b
        b = top
        while above + hist[b] < k:
            above += hist[b]
            b -= 1
        cnt = hist[b]
        cand = np.empty(cnt + 1, dtype=np.int64)
        c = 0
        for j in range(n):  # bin b's keys, compacted without a branch
            key = keys[j]
            cand[c] = key
            c += (key >> shift) == b
        r = k - above  # the threshold is the r-th largest key of bin b
        thr = np.partition(cand[:cnt], cnt - r)[cnt - r]
        ties = r  # keys equal to the threshold still to take, first come
        for q in range(cnt):
            ties -= cand[q] > thr
        out = np.empty(n + 1, dtype=np.int64)
        c = 0
        for j in range(n):
            key = keys[j]
            eq = key == thr
            take = (key > thr) | (eq & (ties > 0))
            out[c] = j
            c += take
            ties -= eq & take
        return out[:k]

    @njit(nogil=True, cache=True)
    def _top_idx_nb(s: np.ndarray, k: int, by_abs: bool = False) -> np.ndarray:
        # The indices of the k largest entries of finite float32 s (of |s| with by_abs), ascending (the
        # rows are then read in memory order), ties taken first come: the same set as a stable sort
        # gives. The keys are s's bits mapped to integers in the floats' order (-0.0 read as 0.0); for
        # |s| the bits without the sign, so |s| is never built.
        bits = s.view(np.uint32)
        n = s.shape[0]
        keys = np.empty(n, dtype=np.int64)
        for j in range(n):
            b = np.int64(bits[j])
            if by_abs:
                keys[j] = b & 0x7FFFFFFF
            else:
                b = 0 if b == 0x80000000 else b
                keys[j] = (0xFFFFFFFF - b) if b & 0x80000000 else (b | 0x80000000)
        return _top_keys_nb(keys, 20 if by_abs else 21, k)

    @functools.cache
    def _fused_for(D: int) -> tuple[Any, Any, Any, Any]:  # noqa: C901, N803
        """The fused kernels compiled for hidden size ``D``: ``(topk_glu, prefix_glu, topk_down, down_rows)``.

        ``D`` is a compile-time constant in them: with the row length known, LLVM vectorises the
        eight interleaved row streams about twice as well as with a length read at run time.
        They are compiled once per hidden size and process (about 5 s for the three on a 2-core CPU;
        a timed run warms up first), and not cached on disk: numba keys a closure's cache by its free
        variables, which here include the other kernels.
        """

        @njit(fastmath=_FM, nogil=True, inline="always")
        def _dot8(w, js, t, at, x, s):  # noqa: ANN001, ANN202
            # s[q] = x · w[js[t + q], at : at + len(x)] for q < 8: eight rows streamed at once keep more
            # memory reads in flight than one row at a time (about 2x on a decode step's cold weights).
            w0, w1, w2, w3 = w[js[t]], w[js[t + 1]], w[js[t + 2]], w[js[t + 3]]
            w4, w5, w6, w7 = w[js[t + 4]], w[js[t + 5]], w[js[t + 6]], w[js[t + 7]]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for d in range(D):
                xd = x[d]
                e = at + d
                s0 += w0[e] * xd
                s1 += w1[e] * xd
                s2 += w2[e] * xd
                s3 += w3[e] * xd
                s4 += w4[e] * xd
                s5 += w5[e] * xd
                s6 += w6[e] * xd
                s7 += w7[e] * xd
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7] = s0, s1, s2, s3, s4, s5, s6, s7

        @njit(fastmath=_FM, nogil=True, inline="always")
        def _dot8x2(w, js, t, x, g, u):  # noqa: ANN001, ANN202
            # g[q], u[q] = x · (gate, up) row of channel js[t + q] for q < 8, from one pass over both.
            n = D
            w0, w1, w2, w3 = w[js[t]], w[js[t + 1]], w[js[t + 2]], w[js[t + 3]]
            w4, w5, w6, w7 = w[js[t + 4]], w[js[t + 5]], w[js[t + 6]], w[js[t + 7]]
            g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = np.float32(0.0)
            u0 = u1 = u2 = u3 = u4 = u5 = u6 = u7 = np.float32(0.0)
            for d in range(n):
                xd = x[d]
                e = n + d
                g0 += w0[d] * xd
                u0 += w0[e] * xd
                g1 += w1[d] * xd
                u1 += w1[e] * xd
                g2 += w2[d] * xd
                u2 += w2[e] * xd
                g3 += w3[d] * xd
                u3 += w3[e] * xd
                g4 += w4[d] * xd
                u4 += w4[e] * xd
                g5 += w5[d] * xd
                u5 += w5[e] * xd
                g6 += w6[d] * xd
                u6 += w6[e] * xd
                g7 += w7[d] * xd
                u7 += w7[e] * xd
            g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7] = g0, g1, g2, g3, g4, g5, g6, g7
            u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7] = u0, u1, u2, u3, u4, u5, u6, u7

        @njit(fastmath=_FM, nogil=True, inline="always")
        def _axpy8(o, w, js, t, at, a) -> None:  # noqa: ANN001
            # o += sum_q a[q] * w[js[t + q], at : at + len(o)] for q < 8.
            w0, w1, w2, w3 = w[js[t]], w[js[t + 1]], w[js[t + 2]], w[js[t + 3]]
            w4, w5, w6, w7 = w[js[t + 4]], w[js[t + 5]], w[js[t + 6]], w[js[t + 7]]
            a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
            for d in range(D):
                e = at + d
                o[d] += (
                    a0 * w0[e]
                    + a1 * w1[e]
                    + a2 * w2[e]
                    + a3 * w3[e]
                    + a4 * w4[e]
                    + a5 * w5[e]
                    + a6 * w6[e]
                    + a7 * w7[e]
                )

        @njit(fastmath=_FM, nogil=True, inline="always")
        def _dot1(wr, at, x) -> float:  # noqa: ANN001
            s = np.float32(0.0)
            for d in range(D):
                s += wr[at + d] * x[d]
            return s

        @njit(fastmath=_FM, nogil=True)
        def _glu_rows_nb(js, x, w, gated, gate_b, up_b, act, o, g, u) -> None:  # noqa: ANN001
            # o += sum over channels js of act(gate · x) * (up · x) * down; w is [I, C * D], one row per
            # channel: gate (if gated), up, down (transposed). g and u are scratch of BLOCK floats.
            d_n = D
            up_at = d_n if gated else 0
            down_at = up_at + d_n
            m = js.shape[0]
            for t in range(0, m, BLOCK):
                n = min(BLOCK, m - t)
                _prefetch_next(w, js, t, m)
                if n == BLOCK and gated:
                    _dot8x2(w, js, t, x, g, u)
                elif n == BLOCK:
                    _dot8(w, js, t, up_at, x, u)
                else:
                    for q in range(n):
                        u[q] = _dot1(w[js[t + q]], up_at, x)
                        if gated:
                            g[q] = _dot1(w[js[t + q]], 0, x)
                for q in range(n):
                    j = js[t + q]
                    uq = u[q] + up_b[j] if up_b.shape[0] else u[q]
                    if gated:
                        gq = g[q] + gate_b[j] if gate_b.shape[0] else g[q]
                        u[q] = _act_nb(gq, act) * uq
                    else:
                        u[q] = _act_nb(uq, act)
                if n == BLOCK:
                    _axpy8(o, w, js, t, down_at, u)
                else:
                    for q in range(n):
                        wr = w[js[t + q]]
                        for d in range(d_n):
                            o[d] += u[q] * wr[down_at + d]

        @njit(fastmath=_FM, nogil=True)
        def _down_rows_nb(js, vals, x, w, with_up, up_b, o, a) -> None:  # noqa: ANN001
            # o += sum over channels js of vals[j] (* (up · x)) * down; w is [I, C * D]: up (with_up), down.
            d_n = D
            down_at = d_n if with_up else 0
            m = js.shape[0]
            for t in range(0, m, BLOCK):
                n = min(BLOCK, m - t)
                _prefetch_next(w, js, t, m)
                if with_up and n == BLOCK:
                    _dot8(w, js, t, 0, x, a)
                elif with_up:
                    for q in range(n):
                        a[q] = _dot1(w[js[t + q]], 0, x)
                for q in range(n):
                    j = js[t + q]
                    if with_up:
                        a[q] = vals[j] * (a[q] + up_b[j] if up_b.shape[0] else a[q])
                    else:
                        a[q] = vals[j]
                if n == BLOCK:
                    _axpy8(o, w, js, t, down_at, a)
                else:
                    for q in range(n):
                        wr = w[js[t + q]]
                        for d in range(d_n):
                            o[d] += a[q] * wr[down_at + d]

        @njit(fastmath=_FM, nogil=True)
        def _topk_glu_nb(scores, k, x, w, gated, gate_b, up_b, act, out) -> None:  # noqa: ANN001
            g, u = np.empty(BLOCK, dtype=np.float32), np.empty(BLOCK, dtype=np.float32)
            for r in range(x.shape[0]):
                _glu_rows_nb(_top_idx_nb(scores[r], k), x[r], w, gated, gate_b, up_b, act, out[r], g, u)

        @njit(fastmath=_FM, nogil=True)
        def _prefix_glu_nb(k, x, w, gated, gate_b, up_b, act, out) -> None:  # noqa: ANN001
            g, u = np.empty(BLOCK, dtype=np.float32), np.empty(BLOCK, dtype=np.float32)
            js = np.arange(k)
            for r in range(x.shape[0]):
                _glu_rows_nb(js, x[r], w, gated, gate_b, up_b, act, out[r], g, u)

        @njit(fastmath=_FM, nogil=True)
        def _topk_down_nb(vals, k, x, w, with_up, up_b, out) -> None:  # noqa: ANN001
            a = np.empty(BLOCK, dtype=np.float32)
            for r in range(x.shape[0]):
                _down_rows_nb(_top_idx_nb(vals[r], k, True), vals[r], x[r], w, with_up, up_b, out[r], a)

        return _topk_glu_nb, _prefix_glu_nb, _topk_down_nb, _down_rows_nb

    @functools.cache
    def _rows_for(W: int) -> tuple[Any, Any]:  # noqa: N803
        """:func:`input_rows`' kernel compiled for output width ``W`` (a compile-time constant, as ``D`` above).

        Returns ``(input_rows, rows_sum)``: the whole call, and its row sum for a given index set (for
        kernels that fuse it with more work, :func:`_input_glu_for`).
        """

        @njit(fastmath=_FM, nogil=True, inline="always")
        def _axpy8w(o, w, js, t, a) -> None:  # noqa: ANN001
            # o += sum_q a[q] * w[js[t + q]] for q < 8, eight rows streamed at once.
            w0, w1, w2, w3 = w[js[t]], w[js[t + 1]], w[js[t + 2]], w[js[t + 3]]
            w4, w5, w6, w7 = w[js[t + 4]], w[js[t + 5]], w[js[t + 6]], w[js[t + 7]]
            a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
            for d in range(W):
                o[d] += (
                    a0 * w0[d]
                    + a1 * w1[d]
                    + a2 * w2[d]
                    + a3 * w3[d]
                    + a4 * w4[d]
                    + a5 * w5[d]
                    + a6 * w6[d]
                    + a7 * w7[d]
                )

        @njit(fastmath=_FM, nogil=True)
        def _rows_sum_nb(xr, js, w, o, a) -> None:  # noqa: ANN001
            # o += sum over entries js of xr[j] * w[j]; a is scratch of BLOCK floats.
            m = js.shape[0]
            for t in range(0, m, BLOCK):
                c = min(BLOCK, m - t)
                _prefetch_next(w, js, t, m)
                for q in range(c):
                    a[q] = xr[js[t + q]]
                if c == BLOCK:
                    _axpy8w(o, w, js, t, a)
                else:
                    for q in range(c):
                        wr = w[js[t + q]]
                        for d in range(W):
                            o[d] += a[q] * wr[d]

        @njit(fastmath=_FM, nogil=True)
        def _input_rows_nb(x, keep, w, out) -> None:  # noqa: ANN001
            a = np.empty(BLOCK, dtype=np.float32)
            n = x.shape[1]
            every = np.arange(n)
            for r in range(x.shape[0]):
                xr = x[r]
                _rows_sum_nb(xr, every if keep >= n else _top_idx_nb(xr, keep, True), w, out[r], a)

        return _input_rows_nb, _rows_sum_nb

    @functools.cache
    def _input_glu_for(D: int, W: int) -> Any:  # noqa: N803
        """:func:`input_glu`'s kernel for hidden size ``D`` and gate/up width ``W`` (compile-time constants)."""
        rows_sum = _rows_for(W)[1]
        down_rows = _fused_for(D)[3]

        @njit(fastmath=_FM, nogil=True)
        def _input_glu_nb(x, keep_in, wt, gated, gate_b, up_b, act, k, wd, out) -> None:  # noqa: ANN001
            a = np.empty(BLOCK, dtype=np.float32)
            h = np.empty(W, dtype=np.float32)
            n_ch = W // 2 if gated else W
            v = np.empty(n_ch, dtype=np.float32)
            n = x.shape[1]
            for r in range(x.shape[0]):
                xr = x[r]
                h[:] = 0.0
                rows_sum(xr, np.arange(n) if keep_in >= n else _top_idx_nb(xr, keep_in, True), wt, h, a)
                for c in range(n_ch):
                    u = h[n_ch + c] if gated else h[c]
                    if up_b.shape[0]:
                        u += up_b[c]
                    if gated:
                        g = h[c] + gate_b[c] if gate_b.shape[0] else h[c]
                        v[c] = _act_nb(g, act) * u
                    else:
                        v[c] = _act_nb(u, act)
                down_rows(_top_idx_nb(v, k, True), v, xr, wd, False, up_b, out[r], a)

        return _input_glu_nb

    @njit(nogil=True, cache=True)
    def _rms_norm_nb(x, w, eps, out) -> None:  # noqa: ANN001
        # out = w * (x / sqrt(mean(x^2) + eps)) per row, each product rounded to float32 as the module does.
        n = x.shape[1]
        for r in range(x.shape[0]):
            s = 0.0
            for d in range(n):
                s += np.float64(x[r, d]) * np.float64(x[r, d])
            inv = np.float32(1.0) / np.sqrt(np.float32(s / n) + np.float32(eps))
            for d in range(n):
                out[r, d] = w[d] * (x[r, d] * inv)

    @njit(nogil=True, cache=True)
    def _rope_nb(x, cos, sin, out) -> None:  # noqa: ANN001
        # x [P, H, d]: per position p its heads; out = x * cos[p] + rotate_half(x) * sin[p], with each
        # product and the sum rounded separately (no fused multiply-add), as PyTorch's ops compute it.
        half = x.shape[2] // 2
        for p in range(x.shape[0]):
            c, s = cos[p], sin[p]
            for h in range(x.shape[1]):
                xr, o = x[p, h], out[p, h]
                for j in range(half):
                    x1, x2 = xr[j], xr[j + half]
                    o[j] = x1 * c[j] + (-x2) * s[j]
                    o[j + half] = x2 * c[j + half] + x1 * s[j + half]

    BACKEND = "numba"
except ImportError:  # pragma: no cover
    _rows_dot_nb = _fused_for = _rows_for = _input_glu_for = _rms_norm_nb = _rope_nb = None
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


def act_kind(act: object) -> int | None:
    """The fused kernels' code for activation module ``act`` (SiLU or tanh-GELU), or None if they lack it."""
    if type(act).__name__ == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return ACT_GELU_TANH
    return _ACT_KINDS.get(type(act).__name__)


def fused_available(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``tensors``: numba present, CPU float32, no gradients wanted."""
    return (
        _fused_for is not None
        and not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    )


_EMPTY = np.zeros(0, dtype=np.float32)


def _np(t: torch.Tensor | None) -> np.ndarray:
    return _EMPTY if t is None else t.detach().contiguous().numpy()


def topk_glu(
    scores: torch.Tensor,
    k: int,
    x: torch.Tensor,
    w: torch.Tensor,
    act: int,
    gate_b: torch.Tensor | None = None,
    up_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """An MLP that runs, per token, only the ``k`` channels with the highest ``scores``.

    ``out[r] = sum_{j in top_k(scores[r])} act(gate_j · x[r] + gate_b[j]) * (up_j · x[r] + up_b[j]) * down_j``
    (``act(up_j · x[r] + up_b[j]) * down_j`` without a gate), without the down projection's bias.

    Args:
        scores: ``[R, I]`` a score per channel and token (the channel predictor's).
        k: Channels per token, ``1 <= k <= I``.
        x: ``[R, D]`` the MLP inputs.
        w: ``[I, C, D]`` per channel its gate row, up row and down column, in that order (``C = 3``), or
            up and down without a gate (``C = 2``); contiguous, so each channel is one stretch of memory
            (two stretches, gate/up and down, cost about 20% more at keep 0.25 on the embedded model).
        act: :func:`act_kind` of the activation.
        gate_b: Gate bias ``[I]``, if any.
        up_b: Up bias ``[I]``, if any.

    Returns:
        ``[R, D]`` float32.
    """
    out = np.zeros((x.shape[0], x.shape[1]), dtype=np.float32)
    flat = w.detach().reshape(w.shape[0], -1)
    kern = _fused_for(int(x.shape[1]))[0]
    kern(_np(scores), k, _np(x), _np(flat), w.shape[1] == 3, _np(gate_b), _np(up_b), act, out)
    return torch.from_numpy(out)


def prefix_glu(
    k: int,
    x: torch.Tensor,
    w: torch.Tensor,
    act: int,
    gate_b: torch.Tensor | None = None,
    up_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """An MLP that runs channels ``0..k-1`` of ``w`` for every token: a static layer's importance prefix.

    :func:`topk_glu` with the same ``k`` channels for every token, read as one contiguous stretch.

    Args:
        k: Channels, ``1 <= k <= I``.
        x: ``[R, D]`` the MLP inputs.
        w: ``[I, C, D]`` as for :func:`topk_glu`, channels in importance order.
        act: :func:`act_kind` of the activation.
        gate_b: Gate bias of (at least) the first ``k`` channels, if any.
        up_b: Up bias of (at least) the first ``k`` channels, if any.

    Returns:
        ``[R, D]`` float32, without the down projection's bias.
    """
    out = np.zeros((x.shape[0], x.shape[1]), dtype=np.float32)
    flat = w.detach().reshape(w.shape[0], -1)
    kern = _fused_for(int(x.shape[1]))[1]
    kern(k, _np(x), _np(flat), w.shape[1] == 3, _np(gate_b), _np(up_b), act, out)
    return torch.from_numpy(out)


def topk_down(
    vals: torch.Tensor, k: int, x: torch.Tensor, w: torch.Tensor, up_b: torch.Tensor | None = None
) -> torch.Tensor:
    """The down projection of the ``k`` largest-magnitude ``vals`` per token (times up's output when ``w`` has it).

    ``out[r] = sum_{j in top_k(|vals[r]|)} vals[r, j] * (up_j · x[r] + up_b[j]) * down_j``, the factor in
    brackets being 1 when ``w`` holds only down; no down bias.

    Args:
        vals: ``[R, I]`` the activated gate (``gate``; with an ungated MLP, the activations).
        k: Channels per token, ``1 <= k <= I``.
        x: ``[R, D]`` the MLP inputs (read only when ``w`` has up rows).
        w: ``[I, C, D]`` per channel its up row and down column (``C = 2``), or its down column alone
            (``C = 1``), contiguous.
        up_b: Up bias ``[I]``, if any (read only with up rows).

    Returns:
        ``[R, D]`` float32.
    """
    out = np.zeros((vals.shape[0], w.shape[2]), dtype=np.float32)
    flat = w.detach().reshape(w.shape[0], -1)
    kern = _fused_for(int(w.shape[2]))[2]
    kern(_np(vals), k, _np(x), _np(flat), w.shape[1] == 2, _np(up_b), out)
    return torch.from_numpy(out)


def input_rows(x: torch.Tensor, keep: int, wt: torch.Tensor) -> torch.Tensor:
    """Projections that read only the ``keep`` largest-magnitude entries of each input (TEAL), in one call.

    ``out[r] = sum_{j in top_keep(|x[r]|)} x[r, j] * wt[j]``: the kept entries' rows of the transposed
    weights, eight streamed at once; with ``keep >= n`` every row (a dense projection in the same form).
    Equal to :func:`rows_sum` over ``torch.topk``'s entries, without its separate selection calls.

    Args:
        x: ``[R, n]`` the inputs, float32 on CPU (:func:`fused_available`).
        keep: Entries read per input, ``1 <= keep``.
        wt: ``[n, W]`` the weights transposed (a row per input entry, several projections side by
            side), contiguous.

    Returns:
        ``[R, W]`` float32, without biases.
    """
    out = np.zeros((x.shape[0], wt.shape[1]), dtype=np.float32)
    _rows_for(int(wt.shape[1]))[0](_np(x), keep, _np(wt), out)
    return torch.from_numpy(out)


def input_glu(
    x: torch.Tensor,
    keep_in: int,
    wt: torch.Tensor,
    k: int,
    wd: torch.Tensor,
    act: int,
    gate_b: torch.Tensor | None = None,
    up_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``input`` rule's whole MLP for decode tokens, in one call (TEAL on gate/up, then the top ``k`` channels).

    Per token: gate and up read only the ``keep_in`` largest-magnitude entries of the input
    (:func:`input_rows`), the activations follow, and the down projection sums the columns of the
    ``k`` largest-magnitude ones (:func:`topk_down`). The same numbers as those two calls with the
    activation between them, without the PyTorch calls and the copies between them.

    Args:
        x: ``[R, D]`` the MLP inputs, float32 on CPU.
        keep_in: Input entries gate and up read per token, ``>= 1``.
        wt: ``[D, C * I]`` gate and up side by side, transposed (a row per input entry); up alone
            without a gate (``C = 1``), contiguous.
        k: Channels per token, ``1 <= k <= I``.
        wd: ``[I, 1, D]`` the down columns, contiguous.
        act: :func:`act_kind` of the activation.
        gate_b: Gate bias ``[I]``, if any.
        up_b: Up bias ``[I]``, if any.

    Returns:
        ``[R, D]`` float32, without the down projection's bias.
    """
    out = np.zeros((x.shape[0], wd.shape[2]), dtype=np.float32)
    gated = wt.shape[1] == 2 * wd.shape[0]
    kern = _input_glu_for(int(wd.shape[2]), int(wt.shape[1]))
    flat = wd.detach().reshape(wd.shape[0], -1)
    kern(_np(x), keep_in, _np(wt), gated, _np(gate_b), _np(up_b), act, k, _np(flat), out)
    return torch.from_numpy(out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension: a decode token's RMSNorm in one call.

    The Llama-style norm module takes seven PyTorch calls for it; a decode step runs two per layer.
    Equal to the module up to the rounding of the mean (summed here in float64).

    Args:
        x: ``[..., D]`` float32 on CPU (:func:`fused_available`).
        weight: ``[D]``.
        eps: Added to the mean square.

    Returns:
        ``x``'s shape, float32.
    """
    xr = x.detach().reshape(-1, x.shape[-1])
    out = torch.empty(xr.shape, dtype=torch.float32)
    _rms_norm_nb(xr.numpy(), weight.detach().numpy(), float(eps), out.numpy())
    return out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[B, T, H, d]`` with ``cos``, ``sin`` ``[B, T, d]``, in one call.

    ``x * cos + rotate_half(x) * sin``, the same float32 numbers as those PyTorch operations (each
    product and sum rounded on its own), without their ten calls per layer on a decode token.

    Returns:
        ``[B, T, H, d]`` float32, contiguous.
    """
    B, T, H, d = x.shape
    out = torch.empty((B * T, H, d), dtype=torch.float32)
    xs, cs, sn = x.detach().reshape(B * T, H, d), cos.reshape(B * T, d), sin.reshape(B * T, d)
    _rope_nb(xs.numpy(), cs.numpy(), sn.numpy(), out.numpy())
    return out.view(B, T, H, d)
