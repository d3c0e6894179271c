"""Choosing the k largest: the kernels' radix select against a partition by comparisons, on real activations.

Usage: ``python -m experiments.bench.kernels [--quick] [--model NAME] [--tokens 48] [--repeats 7]``.

Every per-token rule picks, per token, the ``k`` largest entries of a vector before it reads any
weight: ``input_attn`` four times per layer (the q/k/v input and the o input, of the hidden size;
the gate/up input; the activations, of the MLP width), ``input`` twice, ``gate`` and ``predicted``
once. The vectors here are the model's own: the dense model runs the first ``--tokens`` tokens of
val news documents and every layer's MLP input and activation are kept. Each method selects, for
each vector, the ``k`` largest ``|x|`` at keeps 0.25 / 0.35 / 0.5 / 0.75, inside one compiled loop
over all vectors (no Python per call); the methods are timed round-robin, ``--repeats`` times, and
the table gives the median and p95 of the mean time per selection over the repeats.

- ``radix``: :func:`envs.runtime.kernels._top_idx_nb`, what the kernels run: a histogram of the
  top bits, a partition of the one bin that holds the threshold, branch-free passes.
- ``comparisons``: ``np.partition`` for the k-th value, then a pass that counts and collects, with
  branches: the form the kernels ran before. Its branches depend on the data, so it is as fast as
  the branch predictor is lucky: on real activations it mispredicts about every other comparison.
- ``comparisons, one vector repeated``: the same on one vector every time, which the predictor
  learns: what a microbenchmark of one input would have reported.

Both methods must pick the same indices for every vector; the benchmark counts any difference and
fails if there is one.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from envs.data.corpus import natural_text
from envs.runtime import kernels
from envs.runtime.sparse_lm import SparseLM
from experiments.bench.harness import Benchmark, summarize, time_round_robin
from experiments.report import markdown_table

BENCH = Benchmark("experiments.bench.kernels", __doc__, threads=1)
TITLE = "Channel selection: radix select vs comparisons"
KEEPS = (0.25, 0.35, 0.5, 0.75)

if kernels.BACKEND == "numba":
    from numba import njit

    @njit(nogil=True, cache=True)
    def _comparison_top_idx(s: np.ndarray, k: int) -> np.ndarray:
        # The k largest of s, ascending, ties first come: the k-th value by np.partition, then passes
        # whose branches follow the data.
        n = s.shape[0]
        if k >= n:
            return np.arange(n)
        thr = np.partition(s, n - k)[n - k]
        ties = k
        for j in range(n):
            if s[j] > thr:
                ties -= 1
        out = np.empty(k, dtype=np.int64)
        c = 0
        for j in range(n):
            v = s[j]
            if v > thr or (v == thr and ties > 0):
                if v == thr:
                    ties -= 1
                out[c] = j
                c += 1
        return out

    @njit(nogil=True, cache=True)
    def _loop_radix(vs: np.ndarray, k: int) -> int:
        acc = 0
        for i in range(vs.shape[0]):
            acc += kernels._top_idx_nb(vs[i], k, True)[0]
        return acc

    @njit(nogil=True, cache=True)
    def _loop_comparisons(vs: np.ndarray, k: int) -> int:
        acc = 0
        for i in range(vs.shape[0]):
            acc += _comparison_top_idx(np.abs(vs[i]), k)[0]
        return acc

    @njit(nogil=True, cache=True)
    def _loop_comparisons_one(vs: np.ndarray, k: int) -> int:
        acc = 0
        for _ in range(vs.shape[0]):
            acc += _comparison_top_idx(np.abs(vs[0]), k)[0]
        return acc

    @njit(nogil=True, cache=True)
    def _differences(vs: np.ndarray, k: int) -> int:
        bad = 0
        for i in range(vs.shape[0]):
            a = kernels._top_idx_nb(vs[i], k, True)
            b = _comparison_top_idx(np.abs(vs[i]), k)
            if a.shape[0] != b.shape[0] or np.any(a != b):
                bad += 1
        return bad


def activations(slm: SparseLM, n_docs: int, tokens: int) -> dict[str, np.ndarray]:
    """Every layer's MLP input and activation on the first ``tokens`` tokens of ``n_docs`` val news documents."""
    seen: dict[str, list[torch.Tensor]] = {"mlp_in": [], "mlp_act": []}

    def keep(_: int, name: str, t: torch.Tensor) -> None:
        if name in seen:
            seen[name].append(t.reshape(-1, t.shape[-1]).detach().float())

    for doc in natural_text("val")[:n_docs]:
        ids = slm.tokenizer(doc)["input_ids"][:tokens]
        with torch.no_grad():
            slm(torch.tensor([ids]), None, logits="none", observer=keep)
    return {name: np.ascontiguousarray(torch.cat(ts).numpy(), dtype=np.float32) for name, ts in seen.items()}


def main(argv: list[str] | None = None) -> None:
    """Time both selections on the model's activations, print the table, write BENCHMARKS.md."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model name, folder or hub id (default: embedded)")
    p.add_argument("--docs", type=int, default=8, help="val news documents the activations come from")
    p.add_argument("--tokens", type=int, default=48, help="tokens of each document")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (every method once per round)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 document, 8 tokens, 2 rounds; writes nothing")
    args = BENCH.parse(p, argv)
    if args.quick:
        args.docs, args.tokens, args.repeats = 1, 8, 2
        args.no_write = args.no_write or args.output is None  # a smoke run's figures are not the section's
    if args.docs < 1 or args.tokens < 1 or args.repeats < 1:
        p.error("docs, tokens and repeats must be >= 1")
    if kernels.BACKEND != "numba":
        sys.exit("python -m experiments.bench.kernels: numba is not importable, so the kernels run in PyTorch")

    slm = SparseLM.from_pretrained(args.model, threads=args.threads)
    acts = activations(slm, args.docs, args.tokens)
    what = {"mlp_in": "hidden (q/k/v, o, gate/up input)", "mlp_act": "MLP activation (down input)"}
    rows, worst = [], 0
    for name, vs in acts.items():
        n = vs.shape[1]
        for keep in tqdm(KEEPS, desc=f"{name} ({n})"):
            k = max(1, round(keep * n))
            bad = _differences(vs, k)
            worst = max(worst, bad)
            loops = {"radix": _loop_radix, "comparisons": _loop_comparisons, "one": _loop_comparisons_one}
            for fn in loops.values():  # compile and warm up outside the timing
                fn(vs[:2], k)
            calls = {m: (lambda fn=fn, vs=vs, k=k: fn(vs, k)) for m, fn in loops.items()}
            times = time_round_robin(calls, warmup=1, repeats=args.repeats)
            per = {m: summarize([t / len(vs) for t in ts]) for m, ts in times.items()}
            rows.append(
                [
                    what[name],
                    str(n),
                    f"{keep:g} ({k})",
                    f"{per['radix'].p50 * 1e6:.2f} / {per['radix'].p95 * 1e6:.2f}",
                    f"{per['comparisons'].p50 * 1e6:.2f} / {per['comparisons'].p95 * 1e6:.2f}",
                    f"{per['comparisons'].p50 / per['radix'].p50:.1f}×",
                    f"{per['one'].p50 * 1e6:.2f}",
                    str(bad),
                ]
            )
    table = markdown_table(
        [
            "vectors",
            "n",
            "keep (k)",
            "radix µs p50 / p95",
            "comparisons µs p50 / p95",
            "comparisons ÷ radix",
            "comparisons, one vector repeated, µs",
            "vectors whose sets differ",
        ],
        rows,
    )
    counts = " and ".join(f"{len(v)} {what[k].split(' (')[0]} vectors" for k, v in acts.items())
    body = (
        f"Model `{args.model}`, 1 thread; vectors from the dense model on {args.docs} val news documents "
        f"× {args.tokens} tokens, every layer ({counts}); selection by `|x|`, one compiled loop "
        f"over all vectors per timing, {args.repeats} round-robin rounds (time per selection: p50 and p95 "
        "over rounds).\n\n"
        f"{table}\n\n"
        "The last column but one is the comparison form on a single vector repeated: the branch predictor "
        "learns it, which is why a one-input microbenchmark understates what the comparisons cost on a "
        "decode step's ever-new activations."
    )
    BENCH.publish(args, TITLE, body)
    if worst:
        sys.exit(f"python -m experiments.bench.kernels: the two selections differ on up to {worst} vectors")


if __name__ == "__main__":
    main()
