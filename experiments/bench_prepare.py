"""Benchmarks of pruning-ready models (``envs.prepare``), written to ``BENCHMARKS.md``.

Two modes:

- ``python -m experiments.bench_prepare curves --prepared NAME``: static curves of the base model
  and the prepared one side by side: NLL on val news text, top-1 agreement with the *original*
  dense model and KL to it, against FLOP cost (``SparsityPlan.cost_fraction``) and, where
  ``envs.meters`` exists, measured latency. Summarises the static loss at 70% of dense cost
  (linear interpolation along each family's curve; the best family at that cost) and the dense
  model's change. Section "Pruning-ready models".
- ``python -m experiments.bench_prepare methods --minutes M``: full fine-tuning vs LoRA, each run
  for the same wall-clock budget from the same start, measuring the held-out pruned-plan KL drop
  per training minute. Section "Pruning-ready models: full fine-tuning vs LoRA".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.plan import SparsityPlan
from envs.prepare import evaluate_plans, teacher_logprobs, text_sequences
from envs.sparse_lm import SparseLM
from experiments.report import markdown_table, write_section

THREADS = 2  # the reference machine has 2 cores; set deliberately so timings are comparable
LEVELS = (0.9, 0.8, 0.7, 0.6)


def static_plans(slm: SparseLM, base: SparseLM) -> list[tuple[str, float, SparsityPlan]]:
    """Static plan families at several keep levels, built with the *base* model's orderings.

    Families: ``layers`` (skip the least important layers), ``mlp`` (keep a fraction of MLP
    channels everywhere), ``heads`` (drop KV groups everywhere) and ``mixed`` (layers and MLP
    together at the same level).
    """
    out = []
    imp = base.importance
    for lv in LEVELS:
        out.append(("layers", lv, SparsityPlan.uniform(slm.spec, imp, layers=lv)))
        out.append(("mlp", lv, SparsityPlan.uniform(slm.spec, imp, mlp=lv)))
        out.append(("mixed", lv, SparsityPlan.uniform(slm.spec, imp, layers=(1 + lv) / 2, mlp=(1 + lv) / 2)))
    for groups in range(slm.spec.num_kv_heads - 1, 0, -1):
        f = groups / slm.spec.num_kv_heads
        out.append(("heads", f, SparsityPlan.uniform(slm.spec, imp, heads=f)))
    return out


def _interp_at(costs: list[float], values: list[float], target: float) -> float | None:
    """Linear interpolation of ``values`` at cost ``target`` (``None`` outside the measured range)."""
    order = np.argsort(costs)
    c, v = np.asarray(costs)[order], np.asarray(values)[order]
    if not c[0] <= target <= c[-1]:
        return None
    return float(np.interp(target, c, v))


def _latency(slm: SparseLM, plan: SparsityPlan, ids: torch.Tensor) -> float | None:
    if importlib.util.find_spec("envs.meters") is None:
        return None
    from envs.meters import Meter

    def fn() -> None:
        slm.forward(ids, plan, logits="last")

    # Latency depends on the plan, not on the weights: one measurement per plan serves both models.
    meter = Meter(device="cpu", warmup=1, repeats=5, energy="off", memory=False)
    return float(meter.measure(fn, tokens=int(ids.numel())).latency_p50_s)


def curves(args: argparse.Namespace) -> None:
    """Static curves before and after preparation (see the module docstring)."""
    from envs.corpus import natural_text
    from envs.models import EMBEDDED_MODEL

    torch.set_num_threads(args.threads)
    base = SparseLM.from_pretrained(EMBEDDED_MODEL)
    ready = SparseLM.from_pretrained(args.prepared)
    card_path = Path(ready.cache_dir) / "card.json" if ready.cache_dir else None
    card = json.loads(card_path.read_text()) if card_path and card_path.is_file() else {}
    if card.get("base_weights_hash") and card["base_weights_hash"] != base.weights_hash:
        print(
            f"warning: {args.prepared} was prepared from weights {card['base_weights_hash']}, "
            f"base is {base.weights_hash}"
        )
    docs = natural_text("val")[args.skip_docs : args.skip_docs + args.docs]
    seqs = text_sequences(base.tokenizer, docs, args.seq_len)[: args.sequences]
    reference = [teacher_logprobs(base, s.reshape(1, -1)) for s in seqs]
    plans = static_plans(base, base)
    have_meter = args.latency and importlib.util.find_spec("envs.meters") is not None
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for tag, slm in (("original", base), ("prepared", ready)):
        dense = evaluate_plans(slm, [slm.dense_plan()], seqs, reference=reference)[0]
        measure = have_meter and tag == "original"
        dense_lat = _latency(slm, slm.dense_plan(), seqs[0].reshape(1, -1)) if measure else None
        rows.append({"model": tag, "family": "dense", "level": 1.0, **dense, "dnll": 0.0, "lat": dense_lat})
        res = evaluate_plans(slm, [p for _, _, p in plans], seqs, reference=reference)
        for (fam, lv, plan), r in zip(plans, res, strict=True):
            lat = _latency(slm, plan, seqs[0].reshape(1, -1)) if measure else None
            rows.append({"model": tag, "family": fam, "level": lv, **r, "dnll": r["nll"] - dense["nll"], "lat": lat})
        print(f"{tag}: {len(plans) + 1} plans in {time.perf_counter() - t0:.0f} s", flush=True)

    table = []
    for fam in ("dense", "layers", "mlp", "heads", "mixed"):
        fam_rows = [r for r in rows if r["family"] == fam]
        for lv in sorted({r["level"] for r in fam_rows}, reverse=True):
            o = next(r for r in fam_rows if r["model"] == "original" and r["level"] == lv)
            p = next(r for r in fam_rows if r["model"] == "prepared" and r["level"] == lv)
            row = [
                fam,
                f"{lv:.2f}",
                f"{o['cost']:.3f}",
                f"{o['nll']:.3f}",
                f"{p['nll']:.3f}",
                f"{o['dnll']:+.3f}",
                f"{p['dnll']:+.3f}",
                f"{o['agree']:.3f}",
                f"{p['agree']:.3f}",
                f"{o['kl']:.3f}",
                f"{p['kl']:.3f}",
            ]
            if have_meter:
                row += [f"{1e3 * o['lat']:.0f}"]
            table.append(row)
    headers = [
        "family",
        "keep",
        "FLOP cost",
        "NLL orig",
        "NLL prep",
        "ΔNLL orig",
        "ΔNLL prep",
        "agree orig",
        "agree prep",
        "KL orig",
        "KL prep",
    ]
    if have_meter:
        headers += ["p50 ms (256 tok)"]

    # At 70% of dense cost: interpolate each family's dense-relative loss, take the best family.
    summary = []
    best: dict[str, tuple[float, str] | None] = {}
    for tag in ("original", "prepared"):
        cands = []
        for fam in ("layers", "mlp", "heads", "mixed"):
            fr = [r for r in rows if r["model"] == tag and r["family"] in (fam, "dense")]
            v = _interp_at([r["cost"] for r in fr], [r["dnll"] for r in fr], args.target)
            a = _interp_at([r["cost"] for r in fr], [1 - r["agree"] for r in fr], args.target)
            if v is not None:
                cands.append((v, fam, a))
                summary.append([tag, fam, f"{v:+.3f}", f"{a:.3f}"])
        best[tag] = min(cands) if cands else None
    d_o = next(r for r in rows if r["model"] == "original" and r["family"] == "dense")
    d_p = next(r for r in rows if r["model"] == "prepared" and r["family"] == "dense")
    dense_change = (d_p["nll"] - d_o["nll"]) / d_o["nll"]
    lines = []
    if best["original"] and best["prepared"]:
        (vo, fo, ao), (vp, fp, ap) = best["original"], best["prepared"]
        ratio = vp / vo if vo > 0 else float("nan")
        lines.append(
            f"At {args.target:.0%} of dense FLOPs the best static family loses ΔNLL {vo:+.3f} ({fo}) on the original "
            f"model and {vp:+.3f} ({fp}) on the prepared one: ratio {ratio:.2f} (goal ≤ 0.50: "
            f"{'met' if ratio <= 0.5 else 'not met'}). Top-1 disagreement with the original dense model: "
            f"{ao:.3f} → {ap:.3f}."
        )
    lines.append(
        f"Dense model: NLL {d_o['nll']:.4f} → {d_p['nll']:.4f} ({100 * dense_change:+.2f}%, goal within ±2%: "
        f"{'met' if abs(dense_change) <= 0.02 else 'not met'}); top-1 agreement of the prepared dense model with "
        f"the original {d_p['agree']:.3f}, KL {d_p['kl']:.4f}."
    )
    if have_meter:
        lines.append(
            "Latency: `envs.meters.Meter` p50 of a 256-token forward (1 warm-up, 5 repeats), measured once per plan "
            "(it depends on the plan, not on the weights), on a shared, loaded machine: indicative only."
        )
    else:
        lines.append("Latency: not measured (`--no-latency` or no `envs/meters.py`); cost is FLOPs only.")
    task_table = _task_accuracy(args, base, ready, plans) if args.tasks else None
    if task_table is None:
        lines.append(
            "Task accuracy: not measured in this run (`--tasks 0` or no `envs/tasks`); NLL and agreement only."
        )
    lines.append(
        "Headroom study (static hull, oracle) on the prepared model: not run here; `experiments.headroom` "
        "evaluates the embedded model only (it has no model switch yet)."
    )
    prep = ""
    mean_cost = card.get("plan_distribution", {}).get("cost_fraction", {}).get("mean", 0.0)
    if card:
        prep = (
            f"Prepared model `{args.prepared}`: {card.get('method')} fine-tuning, {card.get('steps')} steps "
            f"({card.get('stopped_by')}), {card.get('tokens_seen')} training tokens (news train split), "
            f"{card.get('train_seconds_this_run')} s of training, torch threads {card.get('torch_threads')}; "
            f"plan distribution {json.dumps(card.get('config', {}).get('plan'))}; "
            f"sampled plans' mean FLOP cost {mean_cost:.3f}."
        )
    n_tok = sum(int(s.numel()) for s in seqs)
    body = (
        f"{prep}\n\nEvaluation: {len(seqs)} sequences × {args.seq_len} tokens ({n_tok} tokens) of val-split news "
        "text (never trained on). ΔNLL is dense-relative (the plan's NLL minus the same model's dense NLL); "
        "agreement and KL are against the original dense model. Plans are static (one plan for every input), "
        "built with the base model's importance orderings.\n\n"
        + "\n\n".join(lines)
        + "\n\n"
        + markdown_table(headers, table)
        + f"\n\nDense-relative ΔNLL and top-1 disagreement at {args.target:.0%} cost (interpolated per family):\n\n"
        + markdown_table(["model", "family", "ΔNLL", "disagreement"], summary)
        + (f"\n\n{task_table}" if task_table else "")
    )
    print(body)
    cmd = "python -m experiments.bench_prepare " + " ".join(sys.argv[1:])
    write_section("Pruning-ready models", cmd, body)


def _task_accuracy(
    args: argparse.Namespace, base: SparseLM, ready: SparseLM, plans: list[tuple[str, float, SparsityPlan]]
) -> str | None:
    """Task accuracy of both models, dense and under each family's plan nearest the target cost."""
    if importlib.util.find_spec("envs.tasks") is None:
        return None
    from envs.tasks import Scorer, load_mix

    items = load_mix(args.mix, "val", n=args.tasks, seed=0)
    scorer = Scorer()
    chosen: list[tuple[str, SparsityPlan]] = [("dense", base.dense_plan())]
    for fam in ("layers", "mlp", "mixed"):
        fam_plans = [(abs(p.cost_fraction() - args.target), lv, p) for f, lv, p in plans if f == fam]
        _, lv, plan = min(fam_plans, key=lambda t: t[0])
        chosen.append((f"{fam} {lv:.2f} (cost {plan.cost_fraction():.2f})", plan))
    out = []
    for label, plan in chosen:
        accs = [float(np.mean([scorer.score(slm, it, plan).raw for it in items])) for slm in (base, ready)]
        out.append([label, f"{accs[0]:.3f}", f"{accs[1]:.3f}", f"{100 * (accs[1] - accs[0]):+.1f}"])
        print(out[-1], flush=True)
    return (
        f"Task accuracy on {len(items)} val items of the `{args.mix}` mix (raw credit against the labels):\n\n"
        + markdown_table(["plan", "original", "prepared", "Δ points"], out)
    )


def methods(args: argparse.Namespace) -> None:
    """Full fine-tuning vs LoRA for the same wall-clock budget (see the module docstring)."""
    from experiments.prepare import prepare

    torch.set_num_threads(args.threads)
    rows = []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, lr in (("full", args.lr_full), ("lora", args.lr_lora)):
            cfg = {
                "method": method,
                "lr": lr,
                "time_budget_min": args.minutes,
                "name": f"bench-{method}",
                "out_root": str(Path(tmp) / "out"),
                "checkpoint_dir": str(Path(tmp) / f"ckpt-{method}"),
                "checkpoint_every": 0,
                "progress": False,
                "threads": args.threads,
                "eval_sequences": args.sequences,
                "eval_plans": args.plans,
            }
            t0 = time.perf_counter()
            card = prepare(cfg)
            wall = time.perf_counter() - t0
            b, a = card["before"], card["after"]
            minutes = card["train_seconds_this_run"] / 60
            drop = b["pruned_kl"] - a["pruned_kl"]
            results[method] = drop / minutes
            rows.append(
                [
                    method,
                    f"{lr:g}",
                    card["steps"],
                    f"{60 * card['steps'] / card['train_seconds_this_run']:.1f}",
                    f"{b['pruned_kl']:.4f}",
                    f"{a['pruned_kl']:.4f}",
                    f"{drop / minutes:.4f}",
                    f"{b['dense_nll']:.4f}",
                    f"{a['dense_nll']:.4f}",
                    f"{wall:.0f}",
                ]
            )
            print(rows[-1], flush=True)
    winner = max(results, key=results.__getitem__)
    body = (
        f"Both runs start from the embedded model with the default plan distribution, seed 0, seq_len 256, batch 1, "
        f"{args.minutes} min of training each, torch threads {args.threads}, "
        "run one after the other on the same machine. "
        f"Held-out pruned KL: mean KL(original dense ‖ plan) over {args.plans} fixed sampled plans on "
        f"{args.sequences} × 256 val-split tokens. LoRA here is rank-16 deltas added to the extracted weights "
        "(`envs.prepare.LowRankDeltas`), since SparseLM slices the weight tensors and would not see a peft wrapper.\n\n"
        + markdown_table(
            [
                "method",
                "lr",
                "steps",
                "steps/min",
                "pruned KL before",
                "pruned KL after",
                "KL drop per train-min",
                "dense NLL before",
                "dense NLL after",
                "wall s",
            ],
            rows,
        )
        + f"\n\nMore KL reduction per CPU-minute: **{winner}** (the default `method` in `conf/prepare.yaml`)."
    )
    print(body)
    cmd = "python -m experiments.bench_prepare " + " ".join(sys.argv[1:])
    write_section("Pruning-ready models: full fine-tuning vs LoRA", cmd, body)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_prepare", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("curves", help="static curves of the original and a prepared model")
    c.add_argument("--prepared", default="smollm2-135m-ready", help="name of the prepared model")
    c.add_argument("--docs", type=int, default=20, help="val-split documents to read")
    c.add_argument("--skip-docs", type=int, default=12, help="val documents skipped (the ones prepare evaluates on)")
    c.add_argument("--sequences", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--tasks", type=int, default=0, help="task items for accuracy (0: skip)")
    c.add_argument("--mix", default="mc", help="task mix for --tasks")
    c.add_argument("--no-latency", dest="latency", action="store_false", help="FLOP cost only")
    c.add_argument("--target", type=float, default=0.7, help="cost fraction of the summary")
    m = sub.add_parser("methods", help="full fine-tuning vs LoRA for the same time")
    m.add_argument("--minutes", type=float, default=3.0)
    m.add_argument("--lr-full", type=float, default=5e-5)
    m.add_argument("--lr-lora", type=float, default=5e-4)
    m.add_argument("--sequences", type=int, default=4)
    m.add_argument("--plans", type=int, default=6)
    for p in (c, m):
        p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads (1 on a loaded machine)")
    args = ap.parse_args(argv)
    curves(args) if args.mode == "curves" else methods(args)


if __name__ == "__main__":
    main()
