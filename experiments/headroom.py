"""The oracle headroom study: how much could per-input plans gain over static pruning?

For a grid of static plans from dense to about half the dense latency, every input of a mix's val
split is scored under every plan (raw and dense-relative credit), each plan's latency is measured
relative to dense, and the accuracy/cost curves of (a) every static plan, (b) the best static plan
at each cost, (c) the static convex hull (best random mixture of two plans), (d) the per-input
hindsight oracle and (e) a cross-validated two-level rule on a probe feature (entropy of the
next-token distribution after the first ``k`` dense layers) are reported as a Markdown table, a
PNG plot and a section of BENCHMARKS.md.

Usage: ``python -m experiments.headroom [--mix mc] [--n 120] [--limit 20] [--no-write]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.frontier import (
    auc,
    best_static,
    cv_two_level_rule,
    interp_frontier,
    oracle_frontier,
    static_hull,
)
from envs.data.files import cache_root
from envs.tasks import Scorer, load_mix
from experiments.bench.harness import Benchmark
from experiments.report import REPO_ROOT, markdown_table

TITLE = "Oracle headroom (embedded model)"
BENCH = Benchmark("experiments.headroom", __doc__, threads=1, threads_help="more threads thrash on a shared machine")
# (layers, heads, mlp) keep fractions; heads 2/3 drops one of the three KV groups of SmolLM2-135M.
GRID: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0), (1.0, 1.0, 0.75), (1.0, 1.0, 0.5), (1.0, 2 / 3, 1.0), (1.0, 2 / 3, 0.75), (1.0, 2 / 3, 0.5),
    (0.9, 1.0, 1.0), (0.9, 1.0, 0.75), (0.9, 1.0, 0.5), (0.9, 2 / 3, 1.0), (0.9, 2 / 3, 0.75),
    (0.8, 1.0, 1.0), (0.8, 1.0, 0.75), (0.8, 1.0, 0.5), (0.8, 2 / 3, 1.0), (0.8, 2 / 3, 0.75),
    (0.7, 1.0, 1.0), (0.7, 1.0, 0.75), (0.7, 2 / 3, 1.0),
    (0.6, 1.0, 1.0), (0.6, 1.0, 0.75), (0.5, 1.0, 1.0),
)  # fmt: skip


def plan_name(f: tuple[float, float, float]) -> str:
    """Short label of a (layers, heads, mlp) grid point."""
    return f"L{f[0]:.2f} H{f[1]:.2f} M{f[2]:.2f}"


def measure_costs(slm: Any, plans: list[Any], tokens: int, repeats: int) -> tuple[np.ndarray, str]:
    """Latency of each plan relative to ``plans[0]`` (dense) on a ``tokens``-long input, and how it was measured.

    On a shared machine the load drifts over minutes, so plans are not timed one after another:
    each of ``repeats`` rounds times every plan (shuffled order) together with dense, and a
    plan's cost is the median over rounds of its p50 divided by that round's dense p50.
    """
    from envs.measure.meters import Meter

    meter = Meter(device="cpu", warmup=1, repeats=3, energy="estimate", memory=False)
    ids = torch.randint(0, slm.spec.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    ratios = np.zeros((repeats, len(plans)))
    dense_ms = []
    with torch.no_grad():
        for r in range(repeats):
            lat = np.zeros(len(plans))
            for p in rng.permutation(len(plans)):
                plan = plans[p]
                lat[p] = meter.measure(
                    lambda plan=plan: slm.forward(ids, plan, logits="last"), tokens=tokens
                ).latency_p50_s
            ratios[r] = lat / lat[0]
            dense_ms.append(lat[0] * 1e3)
    cost = np.median(ratios, axis=0)
    note = (
        f"envs.measure.meters.Meter p50 (3 repeats, 1 warm-up) of one {tokens}-token forward, each plan divided by "
        "dense "
        f"timed in the same round, median over {repeats} interleaved rounds; dense p50 per round "
        f"{min(dense_ms):.0f}–{max(dense_ms):.0f} ms"
    )
    return cost, note


def probe_entropy(slm: Any, ids: list[int], k: int) -> float:
    """Entropy (nats) of the next-token distribution read out after the first ``k`` dense layers."""
    with torch.no_grad():
        state = slm.start(torch.tensor([ids]))
        slm.run_layers(state, slm.dense_plan(), 0, k)
        logits = slm.finish(state, "last").logits[0, -1].float()
    p = torch.softmax(logits, -1)
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score the grid, compute the frontiers, write the table, the plot and the BENCHMARKS section."""
    from envs.runtime.plan import LayerPlan, SparsityPlan
    from envs.runtime.sparse_lm import SparseLM

    t_start = time.perf_counter()
    slm = SparseLM.from_pretrained(args.model, threads=args.threads)
    items = load_mix(args.mix, args.split, n=args.limit or args.n, seed=args.seed)
    grid = GRID[: args.plans] if args.plans else GRID
    plans = [slm.uniform_plan(layers=f[0], heads=f[1], mlp=f[2]) for f in grid]
    names = [plan_name(f) for f in grid]
    scorer = Scorer()
    prompt_lens = [len(scorer.encode(slm, it.prompt)) for it in items]
    tokens = int(np.median(prompt_lens))
    cost, cost_note = measure_costs(slm, plans, tokens, args.repeats)
    # The probe's own cost: the first k dense layers and nothing else, measured like a plan.
    off = LayerPlan(False, (), (), 0)
    probe = SparsityPlan(slm.spec, tuple(lp if i < args.probe_layers else off for i, lp in enumerate(plans[0].layers)))
    probe_cost, _ = measure_costs(slm, [plans[0], probe], tokens, args.repeats)

    key = hashlib.sha256(
        json.dumps([slm.weights_hash, [it.id for it in items], names, args.probe_layers]).encode()
    ).hexdigest()[:16]
    store = cache_root() / "headroom" / f"scores-{key}.npz"
    if store.is_file() and not args.rescore:
        with np.load(store, allow_pickle=False) as z:
            raw, rel, feat = z["raw"], z["rel"], z["feat"]
        print(f"scores reused from {store} (--rescore to recompute)")
    else:
        raw, rel, feat = _score_grid(slm, items, plans, scorer, args.probe_layers)
        store.parent.mkdir(parents=True, exist_ok=True)
        np.savez(store, raw=raw, rel=rel, feat=feat)
    return _report(args, items, plans, names, cost, cost_note, probe_cost, raw, rel, feat, tokens, t_start)


def _score_grid(slm: Any, items: list[Any], plans: list[Any], scorer: Any, k: int) -> tuple[np.ndarray, ...]:
    """Dense references and probe features once per item, then every item under every plan."""
    from tqdm.auto import tqdm

    dense = []
    feat = np.zeros(len(items))
    for j, it in enumerate(tqdm(items, desc="dense + probe")):
        dense.append(scorer.dense_reference(slm, it))
        feat[j] = probe_entropy(slm, scorer.encode(slm, it.prompt), k)
    raw = np.zeros((len(items), len(plans)))
    rel = np.zeros_like(raw)
    bar = tqdm(total=len(items) * len(plans), desc="plans x items")
    for p, plan in enumerate(plans):
        for j, it in enumerate(items):
            s = scorer.score(slm, it, plan, dense[j])
            raw[j, p], rel[j, p] = s.raw, s.dense_relative
            bar.update()
    bar.close()
    return raw, rel, feat


def _report(
    args: argparse.Namespace,
    items: list[Any],
    plans: list[Any],
    names: list[str],
    cost: np.ndarray,
    cost_note: str,
    probe_cost: np.ndarray,
    raw: np.ndarray,
    rel: np.ndarray,
    feat: np.ndarray,
    tokens: int,
    t_start: float,
) -> dict[str, Any]:
    budgets = np.round(np.arange(1.0, 0.449, -0.05), 2)
    rows = []
    curves: dict[str, dict[str, np.ndarray]] = {}
    for label, acc in (("raw", raw), ("dense-relative", rel)):
        hx, hy = static_hull(acc, cost)
        ox, oy = oracle_frontier(acc, cost)
        rc, ra = cv_two_level_rule(feat, acc, cost, budgets, folds=5, seed=args.seed, extra_cost=float(probe_cost[1]))
        curves[label] = {"hx": hx, "hy": hy, "ox": ox, "oy": oy, "rc": rc, "ra": ra}
        bs = best_static(acc, cost, budgets)
        hull = interp_frontier(hx, hy, budgets)
        orc = interp_frontier(ox, oy, budgets)
        for b, s_, h_, o_, c_, a_ in zip(budgets, bs, hull, orc, rc, ra, strict=True):
            rows.append([label, f"{b:.2f}", _f(s_), _f(h_), _f(o_), _f(o_ - h_), _f(a_), _f(c_), _f(a_ - h_)])
    table = markdown_table(
        ["credit", "budget", "best static", "static hull", "oracle", "oracle − hull", "rule (CV)", "rule cost",
         "rule − hull"],
        rows,
    )  # fmt: skip
    plan_rows = [
        [names[p], f"{cost[p]:.3f}", f"{plans[p].cost_fraction(tokens):.3f}", f"{raw[:, p].mean():.3f}",
         f"{rel[:, p].mean():.3f}"]
        for p in np.argsort(-cost)
    ]  # fmt: skip
    plan_table = markdown_table(["plan", "latency vs dense", "FLOPs vs dense", "raw", "dense-relative"], plan_rows)
    task_table = _task_table(items, raw, rel, cost)
    chance = np.mean([1 / len(it.choices) if it.choices else 0.0 for it in items])
    tol = rel[:, cost <= 0.75].mean(1) if (cost <= 0.75).any() else rel.mean(1)
    easy = tol >= 0.999
    probe_auc = auc(-feat, easy)

    stem = "headroom" if args.model == "smollm2-135m" else f"headroom_{Path(args.model).name}"
    png = Path(args.png) if args.png else REPO_ROOT / "reports" / f"{stem}.png"
    if not args.no_write:
        png.parent.mkdir(parents=True, exist_ok=True)
        _plot(png, cost, raw, rel, curves)
    minutes = (time.perf_counter() - t_start) / 60
    body = (
        f"Mix `{args.mix}`, {args.split} split, {len(items)} items ({_count_tasks(items)}); {len(plans)} static plans "
        f"(uniform layer / KV-group / MLP-channel keep fractions by importance). Dense accuracy {raw[:, 0].mean():.3f} "
        f"(chance {chance:.3f}). Cost: {cost_note}. Probe: entropy after the first {args.probe_layers} dense layers, "
        f"its own latency {probe_cost[1]:.3f} of dense is added to the rule's cost. Oracle: per-input hindsight "
        f"choice maximising total credit under the mean-cost budget (Lagrangian envelope, i.e. randomised at one "
        f"input). Rule: 5-fold CV on the same split, threshold and two plans chosen on the training folds. "
        f"Run time {minutes:.1f} min.\n\n"
        f"![headroom]({png.relative_to(REPO_ROOT) if png.is_relative_to(REPO_ROOT) else png})\n\n"
        f"{table}\n\nStatic plans:\n\n{plan_table}\n\nWhich tasks tolerate pruning (dense-relative credit):\n\n"
        f"{task_table}\n\nInputs that keep full dense-relative credit under every plan at ≤ 0.75 cost: "
        f"{easy.sum()} of {len(items)}; probe entropy (low = confident) predicts them with AUC {probe_auc:.2f}.\n"
    )
    BENCH.publish(args, TITLE if args.model == "smollm2-135m" else f"Oracle headroom ({args.model})", body)
    return {"cost": cost, "raw": raw, "rel": rel, "feature": feat, "curves": curves}


def _f(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _count_tasks(items: list[Any]) -> str:
    counts: dict[str, int] = {}
    for it in items:
        counts[it.task] = counts.get(it.task, 0) + 1
    return ", ".join(f"{t} {c}" for t, c in sorted(counts.items()))


def _task_table(items: list[Any], raw: np.ndarray, rel: np.ndarray, cost: np.ndarray) -> str:
    rows = []
    tasks = sorted({it.task for it in items})
    for t in tasks:
        m = np.array([it.task == t for it in items])
        per_plan = rel[m].mean(0)
        ok = cost[per_plan >= 0.9]
        rows.append(
            [t, int(m.sum()), f"{raw[m, 0].mean():.2f}", f"{per_plan[np.argmin(cost)]:.2f}",
             f"{per_plan.mean():.2f}", f"{ok.min():.2f}" if len(ok) else "–"]
        )  # fmt: skip
    return markdown_table(
        ["task", "items", "dense raw", "rel. at cheapest plan", "rel. mean over plans", "cheapest cost with rel ≥ 0.9"],
        rows,
    )


def _plot(path: Path, cost: np.ndarray, raw: np.ndarray, rel: np.ndarray, curves: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (label, acc) in zip(axes, (("raw", raw), ("dense-relative", rel)), strict=True):
        c = curves[label]
        mean = acc.mean(0)
        ax.scatter(cost, mean, s=14, color="grey", label="static plans", zorder=3)
        order = np.argsort(cost)
        ax.step(cost[order], np.maximum.accumulate(mean[order]), where="post", color="black", lw=1, label="best static")
        # Frontiers stay flat beyond their last breakpoint (extra budget buys nothing).
        hi = max(1.0, float(cost.max()))
        ax.plot(np.r_[c["hx"], hi], np.r_[c["hy"], c["hy"][-1]], color="tab:blue", lw=2, label="static hull (mixture)")
        ax.plot(np.r_[c["ox"], hi], np.r_[c["oy"], c["oy"][-1]], color="tab:red", lw=2, label="per-input oracle")
        ok = ~np.isnan(c["rc"])
        ax.plot(c["rc"][ok], c["ra"][ok], "o--", color="tab:green", ms=4, label="two-level rule (CV)")
        ax.set_title(f"{label} credit")
        ax.set_xlabel("latency relative to dense")
        ax.set_ylabel("accuracy")
        ax.set_xlim(min(cost.min(), 0.45) - 0.02, max(1.0, float(cost.max())) + 0.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = BENCH.parser()
    parser.add_argument(
        "--model", default="smollm2-135m", help="model name or folder, e.g. a prepared smollm2-135m-ready"
    )
    parser.add_argument("--mix", default="mc", help="workload mix name or YAML file (default: mc)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"), help="split to score")
    parser.add_argument("--n", type=int, default=80, help="items drawn from the mix (default: 80)")
    parser.add_argument("--limit", type=int, default=None, help="quick run: only this many items (overrides --n)")
    parser.add_argument("--plans", type=int, default=None, help=f"use only the first N of the {len(GRID)} grid plans")
    parser.add_argument("--probe-layers", type=int, default=4, help="dense layers run before the probe (default: 4)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per plan for the cost (default: 7)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mix sampling and the CV folds")
    parser.add_argument(
        "--png",
        default=None,
        help="where the plot goes (default reports/headroom.png, or headroom_<model>.png; none with --no-write)",
    )
    parser.add_argument(
        "--rescore", action="store_true", help="recompute the score matrix even if one is cached for these inputs"
    )
    run(BENCH.parse(parser, argv))


if __name__ == "__main__":
    main()
