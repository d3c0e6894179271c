"""Benchmarks of pruning-ready models (``envs.distill``), written to ``BENCHMARKS.md``.

Two modes:

- ``python -m experiments.bench.prepare curves --prepared NAME``: static curves of the base model
  and the prepared one side by side: NLL on val news text, top-1 agreement with the *original*
  dense model and KL to it, against FLOP cost (``SparsityPlan.cost_fraction``) and, where
  ``envs.measure.meters`` exists, measured latency. Summarises the static loss at 70% of dense cost
  (linear interpolation along each family's curve; the best family at that cost) and the dense
  model's change. With ``--tasks N`` it also scores N val task items under every plan of the
  ``--task-families``: task accuracy along the same curves, summarised the same way. Section
  "Pruning-ready models" (or "Pruning-ready models (NAME)"); plot ``reports/prepare_curves[_NAME].png``.
- ``python -m experiments.bench.prepare methods --minutes M``: full fine-tuning vs LoRA, each run
  for the same wall-clock budget from the same start, measuring the held-out pruned-plan KL drop
  per training minute. Section "Pruning-ready models: full fine-tuning vs LoRA".
- ``python -m experiments.bench.prepare compare --prepared A B ...``: prepared models (other
  recipes, data, budgets) side by side: the goal's own figure (the best static family's
  dense-relative ΔNLL at 70% of dense cost, as a share of the original model's) and the dense
  model's drift on natural text and on task answers. Section "Pruning-ready models: recipes compared".
- ``python -m experiments.bench.prepare mixing --prepared NAME``: per-token decoding where each
  token runs either the dense plan or a pruned one. On a two-set model (``dense_weights=original``)
  dense tokens write keys and values with the original weights and pruned tokens read them with
  the adapted ones, a mix preparation never trains; this measures what it costs. Section
  "Pruning-ready models: per-token plan mixing".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.distill.config import PrepareConfig
from envs.distill.data import text_sequences
from envs.distill.evaluation import evaluate_plans, teacher_logprobs
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import SparseLM
from experiments.bench.harness import Benchmark
from experiments.report import REPO_ROOT, markdown_table, save_figure

THREADS = 2  # the reference machine has 2 cores; set deliberately so timings are comparable
BENCH = Benchmark("experiments.bench.prepare", __doc__, threads=THREADS, threads_help="1 on a loaded machine")
LEVELS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
TASK_FAMILIES = ("layers", "mlp", "mixed")  # the families whose curves reach 70% of dense cost
DEFAULT_PREPARED = "smollm2-135m-ready"  # what `python -m experiments.prepare` writes
FAMILIES = ("layers", "mlp", "heads", "mixed")


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
    if importlib.util.find_spec("envs.measure.meters") is None:
        return None
    from envs.measure.meters import Meter

    def fn() -> None:
        slm.forward(ids, plan, logits="last")

    # Latency depends on the plan, not on the weights: one measurement per plan serves both models.
    meter = Meter(device="cpu", warmup=1, repeats=5, energy="off", memory=False)
    return float(meter.measure(fn, tokens=int(ids.numel())).latency_p50_s)


def _val_sequences(args: argparse.Namespace, base: SparseLM) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Held-out val news sequences (past the documents preparation evaluates on) and the original's log-probs."""
    from envs.data.corpus import natural_text

    docs = natural_text("val")[args.skip_docs : args.skip_docs + args.docs]
    seqs = text_sequences(base.tokenizer, docs, args.seq_len)[: args.sequences]
    return seqs, [teacher_logprobs(base, s.reshape(1, -1)) for s in seqs]


def best_static_loss(
    slm: SparseLM, base: SparseLM, seqs: list[torch.Tensor], reference: list[torch.Tensor], target: float
) -> tuple[float, str, dict[str, float]]:
    """The best static family's dense-relative ΔNLL at ``target`` FLOP cost, its name, and the dense figures."""
    dense = evaluate_plans(slm, [slm.dense_plan()], seqs, reference=reference)[0]
    plans = static_plans(slm, base)
    res = evaluate_plans(slm, [p for _, _, p in plans], seqs, reference=reference)
    cands = []
    for fam in FAMILIES:
        pts = [(1.0, 0.0)] + [
            (r["cost"], r["nll"] - dense["nll"]) for (f, _, _), r in zip(plans, res, strict=True) if f == fam
        ]
        v = _interp_at([c for c, _ in pts], [d for _, d in pts], target)
        if v is not None:
            cands.append((v, fam))
    if not cands:
        raise ValueError(f"no static family reaches cost {target}; lower --target")
    v, fam = min(cands)
    return v, fam, dense


def _config_changes(config: dict[str, Any], ref: dict[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` for every training setting of a card that differs from ``ref`` (the current defaults)."""
    out = []
    for k, v in config.items():
        if isinstance(v, dict):
            out += _config_changes(v, ref.get(k, {}), f"{prefix}{k}.")
        elif k not in ("max_steps", "time_budget_min", "checkpoint_every", "eval_plans") and ref.get(k) != v:
            out.append(f"{prefix}{k}={json.dumps(v, separators=(',', ':'))}")
    return out


def compare(args: argparse.Namespace) -> None:
    """Prepared models side by side: static loss on natural text, dense drift on tasks (module docstring)."""
    from tqdm.auto import tqdm

    from envs.runtime.models import EMBEDDED_MODEL
    from envs.tasks import Scorer, load_mix

    torch.set_num_threads(args.threads)
    base = SparseLM.from_pretrained(EMBEDDED_MODEL)
    seqs, reference = _val_sequences(args, base)
    v0, f0, d0 = best_static_loss(base, base, seqs, reference, args.target)
    items = load_mix(args.mix, "val", n=args.tasks, seed=0)
    arith = np.array(["arithmetic" in it.task for it in items])
    scorer = Scorer()

    def dense_answers(slm: SparseLM) -> list[dict[str, Any]]:
        return [scorer.dense_reference(slm, it) for it in tqdm(items, desc=f"{slm.name} dense", leave=False)]

    ref_answers = dense_answers(base)
    ref_ok = np.array([r["correct"] for r in ref_answers], dtype=float)
    defaults = PrepareConfig().to_dict()

    rows = [
        [
            "original",
            "—",
            "—",
            f"{v0:+.3f} ({f0})",
            "1.00",
            "+0.00%",
            "1.000",
            f"{ref_ok.mean():.3f}",
            "1.000",
            f"{ref_ok[~arith].mean():.3f}",
            "1.000",
        ]
    ]
    for name in args.prepared:
        ready = SparseLM.from_pretrained(name)
        card_path = Path(ready.cache_dir) / "card.json" if ready.cache_dir else None
        card = json.loads(card_path.read_text()) if card_path and card_path.is_file() else {}
        v, fam, dense = best_static_loss(ready, base, seqs, reference, args.target)
        ans = dense_answers(ready)
        ok = np.array([r["correct"] for r in ans], dtype=float)
        same = np.array([a["pick"] == b["pick"] for a, b in zip(ans, ref_answers, strict=True)], dtype=float)
        text = card.get("data", {}).get("train", "?")
        config = card.get("config", {})
        # Settings added later had these values before they existed.
        config = {"plans_per_step": 1, **config, "plan": {"kv_shared_prob": 0.0, **config.get("plan", {})}}
        changes = _config_changes(config, defaults)
        if "Python reference" not in text:  # cards name their text sources; older ones read the news alone
            changes.append("text=[news]" if "polarity" not in text else "text=[news,polarity]")
        how = (
            f"{card.get('steps')} steps, {card.get('train_seconds', card.get('train_seconds_this_run'))} s, "
            f"threads {card.get('torch_threads')}"
        )
        rows.append(
            [
                f"`{name}`",
                how,
                ", ".join(f"`{c}`" for c in changes) or "the defaults",
                f"{v:+.3f} ({fam})",
                f"{v / v0:.2f}",
                f"{100 * (dense['nll'] - d0['nll']) / d0['nll']:+.2f}%",
                f"{dense['agree']:.3f}",
                f"{ok.mean():.3f}",
                f"{same.mean():.3f}",
                f"{ok[~arith].mean():.3f}",
                f"{same[~arith].mean():.3f}",
            ]
        )
        print(rows[-1], flush=True)
    n_tok = sum(int(s.numel()) for s in seqs)
    body = (
        f"Prepared models of the embedded model, side by side. Static loss: the best static family's dense-relative "
        f"ΔNLL at {args.target:.0%} of dense FLOPs (interpolated; families {', '.join(FAMILIES)}, built with the "
        f"base model's orderings) on {len(seqs)} × {args.seq_len} val-split news tokens ({n_tok}); "
        "÷ original is the goal's ratio (≤ 0.50). Dense drift: the prepared dense model's NLL change and top-1 "
        f"agreement with the original on that text, and its answers on {len(items)} val items of the `{args.mix}` "
        f"mix ({int((~arith).sum())} of them not BIG-bench arithmetic, where the original is far above chance): "
        "raw accuracy and the share of items where it picks the original's answer. Settings are the differences "
        "from the current `conf/prepare.yaml`, read from each model's card.\n\n"
        + markdown_table(
            [
                "model",
                "training",
                "settings",
                f"static ΔNLL at {args.target:.0%}",
                "÷ original",
                "dense NLL",
                "dense top-1 agree",
                "task acc",
                "same answer",
                "task acc (non-arith.)",
                "same answer (non-arith.)",
            ],
            rows,
        )
    )
    BENCH.publish(args, "Pruning-ready models: recipes compared", body)


def curves(args: argparse.Namespace) -> None:
    """Static curves before and after preparation (see the module docstring)."""
    from envs.runtime.models import EMBEDDED_MODEL

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
    seqs, reference = _val_sequences(args, base)
    plans = static_plans(base, base)
    have_meter = args.latency and importlib.util.find_spec("envs.measure.meters") is not None
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
            "Latency: `envs.measure.meters.Meter` p50 of a 256-token forward (1 warm-up, 5 repeats), measured once per "
            "plan "
            "(it depends on the plan, not on the weights), on a shared, loaded machine: indicative only."
        )
    else:
        lines.append("Latency: not measured (`--no-latency` or no `envs/meters.py`); cost is FLOPs only.")
    tasks = _task_accuracy(args, base, ready, plans) if args.tasks else None
    task_table, task_curves = tasks if tasks else (None, None)
    if task_table is None:
        lines.append(
            "Task accuracy: not measured in this run (`--tasks 0` or no `envs/tasks`); NLL and agreement only."
        )
    lines.append(
        "Headroom study (static hull, oracle, measured latency): `python -m experiments.headroom --model "
        f'{args.prepared}` writes section "Oracle headroom ({args.prepared})"; the embedded model\'s is '
        '"Oracle headroom (embedded model)".'
    )
    prep = ""
    mean_cost = card.get("plan_distribution", {}).get("cost_fraction", {}).get("mean", 0.0)
    if card:
        prep = (
            f"Prepared model `{args.prepared}`: {card.get('method')} fine-tuning, {card.get('steps')} steps "
            f"({card.get('stopped_by')}), {_text_described(card)}, "
            f"{card.get('train_seconds', card.get('train_seconds_this_run'))} s of training "
            f"({card.get('plan_forwards', card.get('steps'))} pruned-or-dense student forwards), torch threads "
            f"{card.get('torch_threads')} (the last run's); "
            + _losses_described(card)
            + f"plan distribution {json.dumps(card.get('config', {}).get('plan'))}; "
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
    # The default preparation owns the main section and plot; other prepared models get one each.
    suffix = "" if args.prepared == DEFAULT_PREPARED else f"_{args.prepared}"
    plot = Path("reports") / f"prepare_curves{suffix}.png"
    body += f"\n\n![static curves before and after preparation]({plot.as_posix()})"
    title = "Pruning-ready models" + ("" if args.prepared == DEFAULT_PREPARED else f" ({args.prepared})")
    BENCH.publish(args, title, body)
    if not args.no_write:
        plot_curves(rows, task_curves, args.target, REPO_ROOT / plot, f"Static curves of `{args.prepared}`")
        print(f"wrote {plot}")


def _text_described(card: dict[str, Any]) -> str:
    """The training text a card's run read, in words (none where no token loss needed it)."""
    cfg = card.get("config", {})
    if not (cfg.get("kl_weight", 1.0) or cfg.get("lm_weight", 0.0)):
        return "no training text (no token loss)"
    tokens = card.get("steps", 0) * cfg.get("batch_size", 1) * cfg.get("seq_len", 0)
    return f"{tokens} training tokens ({card.get('data', {}).get('train', 'news train split')})"


def _losses_described(card: dict[str, Any]) -> str:
    """The card's training losses in words (cards written before choice distillation trained the token KL only)."""
    cfg = card.get("config", {})
    kl, lm, ch = cfg.get("kl_weight", 1.0), cfg.get("lm_weight", 0.0), cfg.get("choice_weight", 0.0)
    parts = [f"token KL × {kl:g}" if kl else "no token KL"]
    if lm:
        parts.append(f"LM loss × {lm:g}")
    if ch:
        draws = card.get("steps", 0) * cfg.get("choice_items_per_step", 0)
        choice = card.get("data", {}).get("choice", "multiple-choice items")
        parts.append(f"choice KL × {ch:g} on {draws} draws of {choice}")
    return "losses: " + ", ".join(parts) + "; "


def task_loss_at(points: dict[str, list[tuple[float, float]]], target: float) -> tuple[float, str] | None:
    """The best family's static accuracy loss at ``target`` cost, interpolated along its curve.

    Args:
        points: Per family, ``(cost, loss)`` pairs of its static plans; the dense plan (cost 1,
            loss 0 by definition of dense-relative credit) is added to every family.
        target: Cost fraction.

    Returns:
        ``(loss, family)`` of the family with the lowest interpolated loss, or ``None`` where no
        family's curve reaches ``target``.
    """
    cands = []
    for fam, pts in points.items():
        full = [(1.0, 0.0), *pts]
        v = _interp_at([c for c, _ in full], [loss for _, loss in full], target)
        if v is not None:
            cands.append((v, fam))
    return min(cands) if cands else None


def _task_accuracy(
    args: argparse.Namespace, base: SparseLM, ready: SparseLM, plans: list[tuple[str, float, SparsityPlan]]
) -> tuple[str, dict[str, Any]] | None:
    """Task accuracy of both models along the static curves: dense and every plan of three families.

    Raw credit is against the labels; dense-relative credit is agreement with the *same* model's
    dense answer (the suite's headline scoring), so ``1 - dense-relative`` is the static plan's
    accuracy loss. The goal's figure is that loss at ``args.target`` cost, interpolated along each
    family's curve like the ΔNLL summary (the best family per model). The dense models are also
    compared with each other: how often the prepared dense model picks what the original does,
    and the raw accuracy difference with a paired bootstrap interval.

    Returns:
        The markdown of the section's task part and the curves for the plot, or ``None`` without
        ``envs.tasks``.
    """
    if importlib.util.find_spec("envs.tasks") is None:
        return None
    from tqdm.auto import tqdm

    from envs.tasks import Scorer, load_mix

    items = load_mix(args.mix, "val", n=args.tasks, seed=0)
    scorer = Scorer()
    families = tuple(f for f in TASK_FAMILIES if f in args.task_families)
    chosen = [(fam, lv, plan) for fam, lv, plan in plans if fam in families]
    raw: dict[tuple[str, str, float], np.ndarray] = {}
    rel: dict[tuple[str, str, float], np.ndarray] = {}
    picks: dict[str, list[Any]] = {}
    bar = tqdm(total=2 * len(items) * (len(chosen) + 1), desc="task items", dynamic_ncols=True)
    for tag, slm in (("original", base), ("prepared", ready)):
        refs = [scorer.dense_reference(slm, it) for it in items]
        picks[tag] = [r.get("pick", r.get("text")) for r in refs]
        for fam, lv, plan in [("dense", 1.0, slm.dense_plan()), *chosen]:
            sc = []
            for it, ref in zip(items, refs, strict=True):
                sc.append(scorer.score(slm, it, plan, ref))
                bar.update(1)
            raw[tag, fam, lv] = np.array([x.raw for x in sc])
            rel[tag, fam, lv] = np.array([x.dense_relative for x in sc])
    bar.close()

    def curve(tag: str, mask: np.ndarray | None = None) -> dict[str, list[tuple[float, float]]]:
        return {
            fam: [
                (plan.cost_fraction(), float(1 - rel[tag, fam, lv][mask if mask is not None else slice(None)].mean()))
                for f, lv, plan in chosen
                if f == fam
            ]
            for fam in families
        }

    table = [["dense", "1.00", "1.000", *_task_cells(raw, rel, "dense", 1.0)]]
    for fam, lv, plan in chosen:
        table.append([fam, f"{lv:.2f}", f"{plan.cost_fraction():.3f}", *_task_cells(raw, rel, fam, lv)])
    diff = raw["prepared", "dense", 1.0] - raw["original", "dense", 1.0]
    rng = np.random.default_rng(0)
    boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    same = float(np.mean([a == b for a, b in zip(picks["original"], picks["prepared"], strict=True)]))
    curves = {tag: curve(tag) for tag in ("original", "prepared")}
    best = {tag: task_loss_at(curves[tag], args.target) for tag in curves}
    dense_ok = diff.mean() >= -0.01  # "must not get worse": a gain is fine
    lines = [
        f"Task items: {len(items)} val items of the `{args.mix}` mix, scored under the dense plan and every "
        f"{'/'.join(families)} plan above. Raw credit is against the labels; dense-relative credit is "
        "agreement with the same model's dense answer, and the static accuracy loss is 1 − that credit.",
        f"Dense task accuracy: {raw['original', 'dense', 1.0].mean():.3f} → {raw['prepared', 'dense', 1.0].mean():.3f} "
        f"({100 * diff.mean():+.1f} points, paired bootstrap 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; goal: "
        f"not worse by more than 1 point: {'met' if dense_ok else 'not met'}). The prepared dense model picks "
        f"the original's answer on {same:.3f} of the items.",
    ]
    per_task: list[list[str]] = []
    per_task_heading = ""
    if best["original"] and best["prepared"]:
        (lo_o, fo), (lo_p, fp) = best["original"], best["prepared"]
        ratio = lo_p / lo_o if lo_o > 0 else float("nan")
        lines.append(
            f"Static accuracy loss of the best family at {args.target:.0%} of dense FLOPs (interpolated along each "
            f"family's curve): {lo_o:.3f} ({fo}) on the original model, {lo_p:.3f} ({fp}) on the prepared one: "
            f"ratio {ratio:.2f} (goal ≤ 0.50: {'met' if ratio <= 0.5 else 'not met'})."
        )
        c_m, f_m, l_m = max((plan.cost_fraction(), fam, lv) for fam, lv, plan in chosen)
        m_o, m_p = 1 - rel["original", f_m, l_m].mean(), 1 - rel["prepared", f_m, l_m].mean()
        lines.append(
            f"For scale: the mildest plan measured ({f_m} {l_m:.2f}, {c_m:.1%} of dense FLOPs) loses {m_o:.3f} on the "
            f"original model and {m_p:.3f} on the prepared one. The goal asks for at most {lo_o / 2:.3f} at "
            f"{args.target:.0%} cost"
            + (", less than the original loses at that mildest plan." if lo_o / 2 < m_o else ".")
        )
        # Where the loss sits: per task, each model's best family, interpolated the same way.
        per_task_heading = (
            f"Static accuracy loss per task at {args.target:.0%} cost ({fo} on the original, "
            f"{fp} on the prepared model):"
        )
        tasks = np.array([it.task for it in items])
        for task in sorted(set(tasks.tolist())):
            m = tasks == task
            t_o = task_loss_at({fo: curve("original", m)[fo]}, args.target)
            t_p = task_loss_at({fp: curve("prepared", m)[fp]}, args.target)
            per_task.append(
                [
                    task,
                    str(int(m.sum())),
                    f"{raw['original', 'dense', 1.0][m].mean():.2f}",
                    f"{t_o[0]:.2f}" if t_o else "—",
                    f"{t_p[0]:.2f}" if t_p else "—",
                ]
            )
    else:
        lines.append(f"No task family's curve reaches {args.target:.0%} of dense FLOPs; lower --target.")
    print("\n".join(lines), flush=True)
    md = (
        "\n\n".join(lines)
        + "\n\n"
        + markdown_table(
            ["plan", "keep", "FLOP cost", "raw original", "raw prepared", "loss original", "loss prepared"], table
        )
    )
    if per_task:
        md += f"\n\n{per_task_heading}\n\n" + markdown_table(
            ["task", "items", "dense raw (original)", "loss original", "loss prepared"], per_task
        )
    return md, curves


def _task_cells(
    raw: dict[tuple[str, str, float], np.ndarray], rel: dict[tuple[str, str, float], np.ndarray], fam: str, lv: float
) -> list[str]:
    """Raw accuracy and static accuracy loss of one plan on both models, as table cells."""
    return [
        f"{raw['original', fam, lv].mean():.3f}",
        f"{raw['prepared', fam, lv].mean():.3f}",
        f"{1 - rel['original', fam, lv].mean():.3f}",
        f"{1 - rel['prepared', fam, lv].mean():.3f}",
    ]


def plot_curves(
    rows: list[dict[str, Any]], task_curves: dict[str, Any] | None, target: float, path: Path, title: str
) -> None:
    """Static curves of both models against FLOP cost: ΔNLL, top-1 disagreement and task accuracy loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, Any]] = [("ΔNLL on val news (dense-relative)", "dnll"), ("top-1 disagreement", "agree")]
    if task_curves:
        panels.append(("task accuracy loss (dense-relative)", "task"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    colours = {"layers": "tab:blue", "mlp": "tab:orange", "heads": "tab:green", "mixed": "tab:red"}
    for ax, (label, key) in zip(axes[0], panels, strict=True):
        for tag, style in (("original", "--"), ("prepared", "-")):
            for fam, colour in colours.items():
                if key == "task" and task_curves:
                    if fam not in task_curves[tag]:
                        continue
                    pts = sorted([(1.0, 0.0), *task_curves[tag][fam]])
                else:
                    fr = [r for r in rows if r["model"] == tag and r["family"] in (fam, "dense")]
                    val = (lambda r: r["dnll"]) if key == "dnll" else (lambda r: 1 - r["agree"])
                    pts = sorted((r["cost"], val(r)) for r in fr)
                ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, color=colour, label=f"{fam} ({tag})")
        ax.axvline(target, color="grey", lw=0.8)
        reached = task_loss_at(task_curves["original"], target) if key == "task" and task_curves else None
        if reached:  # the goal: half the original's loss at the target cost
            ax.axhline(reached[0] / 2, color="black", ls=":", lw=0.8)
            ax.annotate("goal", (target, reached[0] / 2), fontsize=7, va="bottom", ha="right")
        ax.set_xlabel("FLOP cost (of dense)")
        ax.set_title(label, fontsize=10)
        ax.invert_xaxis()
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: original (dashed) vs prepared (solid)", fontsize=10)
    save_figure(fig, path)


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
        f"Both runs start from the embedded model with the plan distribution of `conf/prepare.yaml` "
        f"({json.dumps(PrepareConfig().plan.to_dict(), separators=(',', ':'))}, {PrepareConfig().plans_per_step} "
        "plan(s) per step), seed 0, seq_len 256, batch 1, "
        f"{args.minutes} min of training each, torch threads {args.threads}, "
        "run one after the other on the same machine. "
        f"Held-out pruned KL: mean KL(original dense ‖ plan) over {args.plans} fixed sampled plans on "
        f"{args.sequences} × 256 val-split tokens. LoRA here is rank-16 deltas added to the extracted weights "
        "(`envs.distill.lora.LowRankDeltas`), since SparseLM slices the weight tensors and would not see a peft "
        "wrapper.\n\n"
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
    BENCH.publish(args, "Pruning-ready models: full fine-tuning vs LoRA", body)


def _decode_logprobs(slm: SparseLM, ids: torch.Tensor, prefix: int, plans: list[SparsityPlan]) -> torch.Tensor:
    """Log-probs of each token after a dense prefill of ``prefix`` tokens, token ``t`` run under ``plans[t]``."""
    cache = slm.new_cache()
    slm.forward(ids[:prefix], slm.dense_plan(), cache=cache, logits="none")
    out = []
    for t in range(prefix, len(ids)):
        o = slm.forward(ids[t : t + 1], plans[t - prefix], cache=cache, logits="all")
        out.append(torch.log_softmax(o.logits[0, -1].float(), -1))
    return torch.stack(out)


def mixing(args: argparse.Namespace) -> None:
    """Per-token plan mixing on both models: KL to the original dense model (module docstring)."""
    from tqdm.auto import tqdm

    from envs.runtime.models import EMBEDDED_MODEL

    torch.set_num_threads(args.threads)
    base = SparseLM.from_pretrained(EMBEDDED_MODEL)
    ready = SparseLM.from_pretrained(args.prepared)
    seqs, _ = _val_sequences(args, base)
    named = [(f, lv, p) for f, lv, p in static_plans(base, base) if f == args.family]
    plan = next((p for _, lv, p in named if abs(lv - args.level) < 0.01), None)
    if plan is None:
        levels = ", ".join(f"{lv:.2f}" for _, lv, _ in named)
        raise SystemExit(f"no static plan {args.family} {args.level}; its levels are {levels}")
    dense = base.dense_plan()
    rng = np.random.default_rng(args.seed)
    runs = ("mixed", "all pruned")
    kl: dict[tuple[str, str, str], list[float]] = {}
    n = args.seq_len - args.prefix
    for ids in tqdm(seqs, desc="sequences", dynamic_ncols=True):
        ref = _decode_logprobs(base, ids, args.prefix, [dense] * n)
        pruned = {"mixed": rng.random(n) < args.share, "all pruned": np.ones(n, dtype=bool)}
        for tag, slm in (("original", base), ("prepared", ready)):
            for run in runs:
                which = pruned[run]
                lp = _decode_logprobs(slm, ids, args.prefix, [plan if w else dense for w in which])
                per_tok = (ref.exp() * (ref - lp)).sum(-1)
                mask = torch.from_numpy(which)
                kl.setdefault((tag, run, "pruned"), []).extend(per_tok[mask].tolist())
                kl.setdefault((tag, run, "dense"), []).extend(per_tok[~mask].tolist())

    def mean(key: tuple[str, str, str]) -> float:
        return float(np.mean(kl[key])) if kl.get(key) else float("nan")

    rows = []
    for run in runs:
        for kind in ("pruned", "dense"):
            o, p = mean(("original", run, kind)), mean(("prepared", run, kind))
            if np.isnan(o):
                continue
            count = str(len(kl[("original", run, kind)]))
            rows.append([run, f"{kind} tokens", count, f"{o:.3f}", f"{p:.3f}", f"{p / o:.2f}"])
    r_mixed = mean(("prepared", "mixed", "pruned")) / mean(("original", "mixed", "pruned"))
    r_all = mean(("prepared", "all pruned", "pruned")) / mean(("original", "all pruned", "pruned"))
    n_tok = sum(int(s.numel()) for s in seqs)
    body = (
        f"Per-token decoding of {len(seqs)} val-split news sequences ({n_tok} tokens; never trained on): a dense "
        f"prefill of {args.prefix} tokens, then one token per forward with a KV cache, each token running "
        f"either the dense plan or `{args.family} {args.level}` ({plan.cost_fraction():.3f} of dense FLOPs). "
        f"In the mixed run each token is pruned with probability {args.share} (seed {args.seed}, the same tokens "
        "on both models). KL is to the original dense model's next-token distribution, per token, averaged over "
        f"the tokens of each kind. On `{args.prepared}`"
        + (
            " (two weight sets) dense tokens write keys and values with the original weights and pruned tokens "
            "read them with the adapted ones"
            if ready.adapted is not None
            else " (one weight set) every token runs the same weights"
        )
        + f".\n\nPruned tokens' KL, prepared ÷ original: {r_mixed:.2f} when mixed with dense tokens, "
        f"{r_all:.2f} when every token is pruned.\n\n"
        + markdown_table(["run", "tokens", "count", "KL original", "KL prepared", "÷ original"], rows)
    )
    BENCH.publish(args, "Pruning-ready models: per-token plan mixing", body)


def main(argv: list[str] | None = None) -> None:
    """Command line: one subcommand per section (see the module docstring)."""
    ap = BENCH.parser(subcommands=True)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = BENCH.subcommand(sub, "curves", help="static curves of the original and a prepared model")
    c.add_argument("--prepared", default=DEFAULT_PREPARED, help="name of the prepared model")
    c.add_argument("--tasks", type=int, default=0, help="task items for accuracy (0: skip)")
    c.add_argument("--mix", default="mc", help="task mix for --tasks")
    c.add_argument(
        "--task-families",
        nargs="+",
        default=list(TASK_FAMILIES),
        choices=TASK_FAMILIES,
        help="families scored on the task items (each plan costs a pass over them on both models)",
    )
    c.add_argument("--no-latency", dest="latency", action="store_false", help="FLOP cost only")
    r = BENCH.subcommand(sub, "compare", help="prepared models side by side: static loss and dense drift")
    r.add_argument("--prepared", nargs="+", required=True, help="names of prepared models")
    r.add_argument("--tasks", type=int, default=400, help="task items for the dense drift")
    r.add_argument("--mix", default="mc", help="task mix")
    x = BENCH.subcommand(sub, "mixing", help="per-token decoding mixing dense and pruned tokens, on both models")
    x.add_argument("--prepared", default=DEFAULT_PREPARED, help="name of the prepared model")
    x.add_argument("--family", default="mlp", choices=FAMILIES, help="static family of the pruned tokens' plan")
    x.add_argument("--level", type=float, default=0.6, help=f"its keep level ({LEVELS}; heads: 0.33, 0.67)")
    x.add_argument("--share", type=float, default=0.5, help="probability that a token of the mixed run is pruned")
    x.add_argument("--prefix", type=int, default=32, help="tokens prefilled densely before decoding")
    x.add_argument("--seed", type=int, default=0, help="seed of which tokens the mixed run prunes")
    m = BENCH.subcommand(sub, "methods", help="full fine-tuning vs LoRA for the same time")
    m.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget of each method")
    m.add_argument("--lr-full", type=float, default=5e-5, help="learning rate of full fine-tuning")
    m.add_argument("--lr-lora", type=float, default=5e-4, help="learning rate of LoRA")
    m.add_argument("--sequences", type=int, default=4, help="held-out sequences of the pruned-plan KL")
    m.add_argument("--plans", type=int, default=6, help="fixed sampled plans of the pruned-plan KL")
    for p in (c, r, x):
        p.add_argument("--docs", type=int, default=20, help="val-split documents to read")
        p.add_argument(
            "--skip-docs", type=int, default=12, help="val documents skipped (the ones prepare evaluates on)"
        )
        p.add_argument("--sequences", type=int, default=4, help="val sequences evaluated (at most)")
        p.add_argument("--seq-len", type=int, default=256, help="tokens per val sequence")
    for p in (c, r):
        p.add_argument("--target", type=float, default=0.7, help="cost fraction of the summary")
    args = BENCH.parse(ap, argv)
    if args.mode == "mixing" and not (0.0 < args.share < 1.0 and 0 < args.prefix < args.seq_len):
        ap.error("mixing needs 0 < --share < 1 and 0 < --prefix < --seq-len")
    {"curves": curves, "methods": methods, "compare": compare, "mixing": mixing}[args.mode](args)


if __name__ == "__main__":
    main()
