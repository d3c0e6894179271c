"""SparseLM benchmark: latency of sliced plans vs dense, realised vs ideal speedup, NLL, switching cost.

Usage: ``python -m experiments.bench.sparse_lm [--quick] [--lengths 64 256 1024] [--repeats 7]``.

Plans are timed round-robin (every repeat runs every plan once, in a shuffled order), so a burst
of load from elsewhere on a shared machine hits all plans alike and the ratios stay fair.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from envs.data.corpus import natural_text
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import SparseLM
from experiments.bench.harness import Benchmark, summarize, time_round_robin
from experiments.report import REPO_ROOT, markdown_table, save_figure

BENCH = Benchmark("experiments.bench.sparse_lm", __doc__, threads=2)
TITLE = "SparseLM: sliced execution"


def bench_plans(slm: SparseLM) -> dict[str, SparsityPlan]:
    """The plans of the benchmark, by name."""
    u = slm.uniform_plan
    return {
        "dense": slm.dense_plan(),
        "skip 25% layers": u(layers=0.75),
        "skip 50% layers": u(layers=0.5),
        "drop 1/3 KV groups": u(heads=2 / 3),
        "drop 2/3 KV groups": u(heads=1 / 3),
        "MLP 75%": u(mlp=0.75),
        "MLP 50%": u(mlp=0.5),
        "MLP 25%": u(mlp=0.25),
        "mixed A (L80 H67 M75)": u(layers=0.8, heads=2 / 3, mlp=0.75),
        "mixed B (L70 H67 M50)": u(layers=0.7, heads=2 / 3, mlp=0.5),
    }


def ideal_speedup(plan: SparsityPlan, seq_len: int, past: int = 0) -> float:
    """Dense decoder FLOPs over the plan's: the speedup if time followed FLOPs exactly."""
    dense = SparsityPlan.dense(plan.spec).flops(seq_len, past)["total"]
    return dense / max(plan.flops(seq_len, past)["total"], 1.0)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables, write BENCHMARKS.md and a plot."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model name, folder or hub id (default: embedded)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], help="prefill lengths to time")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per plan (median and p95 over these)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--nll-docs", type=int, default=24, help="val news documents for the NLL column")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 tokens, 2 repeats, 4 docs; writes no plot, and no section unless --output is given",
    )
    args = BENCH.parse(p, argv)
    if args.quick:
        args.lengths, args.repeats, args.warmup, args.nll_docs = [64], 2, 1, 4
        args.no_write = args.no_write or args.output is None
    if any(n < 2 for n in args.lengths) or args.repeats < 1:
        p.error("lengths must be >= 2 and repeats >= 1")

    t0 = time.perf_counter()
    slm = SparseLM.from_pretrained(args.model, threads=args.threads)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads", flush=True)
    plans = bench_plans(slm)
    torch.manual_seed(0)
    vocab = slm.spec.vocab_size
    rows = []
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for n in tqdm(args.lengths, desc="prefill lengths"):
        ids = torch.randint(100, vocab, (1, n))
        fns = {name: (lambda pl=pl, ids=ids: slm(ids, pl, logits="last")) for name, pl in plans.items()}
        times = time_round_robin(fns, args.warmup, args.repeats)
        for name, ts in times.items():
            s = summarize(ts)
            results[(name, n)] = (s.p50, s.p95)
    # One decode step after a 256-token prompt (cache prepared outside the timing).
    prompt = torch.randint(100, vocab, (1, 256))
    nxt = torch.randint(100, vocab, (1, 1))
    caches = {name: slm.new_cache() for name in plans}
    for name, pl in plans.items():
        slm(prompt, pl, cache=caches[name], logits="none")
    snaps = {name: c.snapshot() for name, c in caches.items()}

    def decode(name: str, pl: SparsityPlan) -> None:
        caches[name].restore(snaps[name])
        slm(nxt, pl, cache=caches[name], logits="last")

    dec = time_round_robin(
        {n: (lambda n=n, pl=pl: decode(n, pl)) for n, pl in plans.items()}, args.warmup, args.repeats * 5
    )
    for name, ts in dec.items():
        s = summarize(ts)
        results[(name, 0)] = (s.p50, s.p95)

    # NLL on val news text (the calibration used the train split).
    docs = natural_text("val")[: args.nll_docs]
    seqs = [torch.tensor(slm.tokenizer(d)["input_ids"][:256]) for d in docs]
    nll = {}
    for name, pl in tqdm(plans.items(), desc="NLL"):
        tot = cnt = 0.0
        for s in seqs:
            v = slm.token_nll(s, pl)
            tot += v.sum().item()
            cnt += v.numel()
        nll[name] = tot / cnt

    # Plan switching: building the slices of a never-seen plan, and switching between known plans.
    rng = random.Random(1)
    fresh = [
        SparsityPlan.from_action(slm.spec, slm.importance, [rng.random() for _ in range(9)], num_groups=3)
        for _ in range(20)
    ]
    t_cold = []
    for pl in fresh:
        t = time.perf_counter()
        for i, lp in enumerate(pl.layers):
            if lp.run:
                slm.select_weights(i, lp)
        t_cold.append(time.perf_counter() - t)
    t_warm = []
    for pl in fresh * 5:
        t = time.perf_counter()
        for i, lp in enumerate(pl.layers):
            if lp.run:
                slm.select_weights(i, lp)
        t_warm.append(time.perf_counter() - t)

    # Views (importance-ordered copy) vs gathering from the original weights per call.
    gather = SparseLM(slm.model, slm.tokenizer, slm.importance, strategy="gather")
    ids256 = torch.randint(100, vocab, (1, 256))
    strat_plans = {k: plans[k] for k in ("drop 1/3 KV groups", "MLP 50%", "mixed B (L70 H67 M50)")}
    strat_fns = {}
    for k, pl in strat_plans.items():
        strat_fns[f"views|{k}"] = lambda pl=pl: slm(ids256, pl, logits="last")
        strat_fns[f"gather|{k}"] = lambda pl=pl: gather(ids256, pl, logits="last")
    st = time_round_robin(strat_fns, args.warmup, args.repeats)

    # ---------------------------------------------------------------- report
    headers = ["plan", "cost (FLOPs)"]
    for n in args.lengths:
        headers += [f"{n} tok p50 ms", "p95 ms", "speedup", "÷ ideal"]
    headers += ["decode p50 ms", "decode speedup", "val NLL"]
    for name, pl in plans.items():
        row = [name, f"{pl.cost_fraction(256):.2f}"]
        for n in args.lengths:
            p50, p95 = results[(name, n)]
            sp = results[("dense", n)][0] / p50
            row += [
                f"{p50 * 1e3:.1f}",
                f"{p95 * 1e3:.1f}",
                f"{sp:.2f}×",
                "—" if name == "dense" else f"{sp / ideal_speedup(pl, n):.0%}",
            ]
        d50 = results[(name, 0)][0]
        row += [f"{d50 * 1e3:.2f}", f"{results[('dense', 0)][0] / d50:.2f}×", f"{nll[name]:.3f}"]
        rows.append(row)
    table = markdown_table(headers, rows)
    dense256 = results[("dense", 256)][0] if 256 in args.lengths else results[("dense", args.lengths[-1])][0]
    sw = markdown_table(
        ["switching", "median ms", "p95 ms", "% of a dense forward"],
        [
            [label, f"{s.p50 * 1e3:.3f}", f"{s.p95 * 1e3:.3f}", f"{s.p50 / dense256:.2%}"]
            for label, s in (
                ("new plan (build slices for all layers)", summarize(t_cold)),
                ("known plan (cached slices)", summarize(t_warm)),
            )
        ],
    )
    strat_rows = []
    for k in strat_plans:
        v, g = summarize(st[f"views|{k}"]).p50, summarize(st[f"gather|{k}"]).p50
        strat_rows.append([k, f"{v * 1e3:.1f}", f"{g * 1e3:.1f}", f"{g / v:.2f}×"])
    strat = markdown_table(["plan (256 tokens)", "views p50 ms", "gather p50 ms", "gather ÷ views"], strat_rows)
    ref_len = 256 if 256 in args.lengths else args.lengths[-1]
    body = (
        f"Model `{args.model}` ({slm.spec.num_layers} layers, {slm.spec.num_heads} heads / {slm.spec.num_kv_heads} KV "
        f"heads, MLP {slm.spec.intermediate_size}), fp32, {args.threads} threads, batch 1, logits for the last "
        f"position only; {args.repeats} timed rounds after {args.warmup} warm-up (decode: {args.repeats * 5}), "
        "plans interleaved. Speedup = dense p50 ÷ plan p50; ÷ ideal = speedup ÷ (dense decoder FLOPs ÷ plan "
        "decoder FLOPs). Decode: one token after a 256-token prompt with a KV cache. NLL: "
        f"{len(seqs)} val news documents (≤256 tokens each; the importance calibration used train documents).\n\n"
        f"{table}\n\nPlan switching (measured against a dense {ref_len}-token forward):\n\n{sw}\n\n"
        f"Slicing strategy, importance-ordered copy with prefix views vs gathering rows from the original "
        f"weights on every call:\n\n{strat}\n\n![realised vs ideal speedup](reports/bench_sparse_lm.png)\n"
    )
    BENCH.publish(args, TITLE, body)
    if not (args.quick or args.no_write):
        _plot(plans, results, args.lengths, REPO_ROOT / "reports" / "bench_sparse_lm.png")


def _plot(plans: dict[str, SparsityPlan], results: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in plans if n != "dense"]
    n = 256 if 256 in lengths else lengths[-1]
    realised = [results[("dense", n)][0] / results[(k, n)][0] for k in names]
    ideal = [ideal_speedup(plans[k], n) for k in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], ideal, width=0.4, label="ideal (FLOPs)", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], realised, width=0.4, label="realised (p50)", color="#2b6cb0")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel(f"speedup over dense, {n}-token prefill")
    ax.set_title("SparseLM: realised vs ideal speedup")
    ax.legend()
    print(f"plot: {save_figure(fig, path)}")


if __name__ == "__main__":
    main()
