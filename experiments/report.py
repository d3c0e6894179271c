"""Reports: Markdown tables, the sections of ``BENCHMARKS.md``, and the evaluation's tables, files and plot.

Every benchmark writes its own section, headed ``## <title>``, with the command that made it.
Re-running a benchmark replaces its section and leaves the others alone.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import platform
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.evaluation import DEFAULT_TARGETS, SCORINGS, family_frontier, hull_curve, oracle_curve, run_scores

if TYPE_CHECKING:
    from agents.evaluation import Run

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "BENCHMARKS.md"
HEADER = (
    "# PruneGym benchmarks\n\n"
    "Each section is written by the command shown in it; re-running the command replaces the section.\n"
    "Timings are medians over repeats on the machine named in the section; ratios are measured side by "
    "side in one run.\n"
)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed as given (format them first)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line naming the machine and library versions a figure was measured with."""
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover
        tf = "n/a"
    from envs.measure.meters import cpu_name

    cpu = cpu_name()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {tf}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def section_text(title: str, command: str, body: str) -> str:
    """The ``## title`` section as written to BENCHMARKS.md: the command that made it, the machine, the body."""
    return f"## {title}\n\nCommand: `{command}`\n\nMachine: {machine_line()}\n\n{body.strip()}\n"


def write_section(title: str, command: str, body: str, path: Path | None = None) -> Path:
    """Replace (or append) the ``## title`` section of ``path`` (default BENCHMARKS.md), under a file lock."""
    path = path or BENCHMARKS
    section = section_text(title, command, body)
    path.touch(exist_ok=True)
    with open(path, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read() or HEADER
        pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        fh.seek(0)
        fh.truncate()
        fh.write(text.rstrip("\n") + "\n")
        fcntl.flock(fh, fcntl.LOCK_UN)
    return path


def time_round_robin(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, seed: int | random.Random = 0
) -> dict[str, list[float]]:
    """Seconds per call of each fn: ``warmup`` untimed rounds, then ``repeats`` rounds in shuffled order.

    Every round runs every fn once, so a burst of load from elsewhere on a shared machine hits all
    of them alike and ratios between them stay fair.
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------- evaluation reports
def headline_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The headline rows as Markdown tables, one per scoring."""
    out = []
    for scoring in SCORINGS:
        body = []
        for r in rows:
            if r["scoring"] != scoring:
                continue
            acc = r["accuracy"]
            mark = "" if r["matched"] else " †"
            body.append(
                [
                    f"{r['target_latency']:.0%}",
                    r["controller"],
                    "not reached" if not np.isfinite(acc) else f"{acc:.3f}{mark}",
                    "—" if not np.isfinite(acc) else _fmt_ci(r["ci95"]),  # resamples that reach it are not a CI
                    "—" if not np.isfinite(r["vs_hull"]) else f"{r['vs_hull']:+.3f} {_fmt_ci(r['vs_hull_ci95'])}",
                    "—" if not np.isfinite(r["gap_closed"]) else f"{r['gap_closed']:.0%}",
                ]
            )
        title = "dense-relative" if scoring == "dense_relative" else "raw"
        out.append(
            f"**Accuracy ({title} scoring) at equal measured latency**\n\n"
            + markdown_table(
                [
                    "latency (of dense)",
                    "controller",
                    "accuracy",
                    "95% CI",
                    "vs static hull (95% CI)",
                    "hull→oracle gap closed",
                ],
                body,
            )
        )
    out.append(
        "† no operating point within ±2% of the target latency: the value mixes the two nearest points "
        "(as the static hull does)."
    )
    return "\n\n".join(out)


def _fmt_ci(ci: Sequence[float]) -> str:
    return "—" if not all(np.isfinite(ci)) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def risk_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The risk-controlled stops' records (:meth:`agents.staged.StopRules.evaluate`): requested vs achieved."""
    rows = []
    for r in records:
        head = [f"{r['delta']:g}", f"{r['requested']:.2f}", r.get("score", "margin")]
        if "refused" in r:
            rows.append([*head, "refused", r["refused"], "—", "—"])
            continue
        rows.append(
            [
                *head,
                r["certified"],
                f"{r['agreement']:.3f}",
                f"{r['latency_saved']:.1%}",
                f"{r['stopped_early']:.0%}",
            ]
        )
    return markdown_table(
        ["δ", "requested agreement", "stops on", "certified", "test agreement", "latency saved", "stopped early"],
        rows,
    )


def risk_markdown(records: Sequence[Mapping[str, Any]], train_items: int) -> str:
    """The risk-controlled stops' section: :func:`risk_table` under a heading that says what certified them."""
    eps = records[0]["epsilon"] if records else float("nan")
    return (
        f"## Risk-controlled stop (Learn-then-Test, ε = {eps:g}, certified on {train_items} train inputs; the "
        f"classifier is fitted on half of them and certified on the other half)\n\n{risk_table(records)}"
    )


def per_task_table(runs: Sequence[Run]) -> str:
    """Dense-relative accuracy per task for each run."""
    tasks = sorted(set(runs[0].tasks))
    rows = []
    for r in runs:
        t = np.array(r.tasks)
        rows.append([r.name] + [f"{r.rel[t == k].mean():.2f}" for k in tasks])
    return markdown_table(["controller"] + tasks, rows)


def summary_table(runs: Sequence[Run]) -> str:
    """One row per run: accuracy, latency, throughput, energy source."""
    rows = []
    for r in runs:
        s = r.summary()
        rows.append(
            [
                s["name"],
                f"{s['accuracy_dense_relative']:.3f}",
                f"{s['accuracy_raw']:.3f}",
                f"{s['latency_fraction']:.3f}",
                f"{s['latency_p50_ms']:.1f}",
                f"{s['latency_p95_ms']:.1f}",
                f"{s['flops_fraction']:.2f}",
                f"{s['throughput_tok_s']:.0f}",
                f"{s['decision_ms']:.3f}",
            ]
        )
    return markdown_table(
        [
            "controller",
            "acc (dense-rel.)",
            "acc (raw)",
            "latency ÷ dense",
            "p50 ms",
            "p95 ms",
            "FLOPs ÷ dense",
            "prompt tok/s",
            "decision ms",
        ],
        rows,
    )


def save_results(out: Path, runs: Sequence[Run], rows: Sequence[Mapping[str, Any]] | None, markdown: str) -> None:
    """Write results as Markdown, JSON and CSV (per input) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(
        json.dumps({"runs": [r.summary() for r in runs], "headline": list(rows or [])}, indent=1, default=float)
    )
    with open(out / "per_input.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "controller",
                "family",
                "input",
                "task",
                "acc_raw",
                "acc_dense_relative",
                "latency_fraction",
                "latency_s",
                "flops_fraction",
            ]
        )
        for r in runs:
            for i in range(len(r.raw)):
                w.writerow([r.name, r.family, i, r.tasks[i], r.raw[i], r.rel[i], r.lat[i], r.latency_s[i], r.flops[i]])


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders made; 120 dpi, as every PruneGym plot) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_plot(static: Sequence[Run], families: Mapping[str, Sequence[Run]], path: Path, title: str = "") -> Path:
    """Accuracy vs measured latency: static plans, hull, oracle and controllers; raw and dense-relative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(static[0].raw)
    idx = np.arange(n)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, scoring in zip(axes, ("dense_relative", "raw"), strict=True):
        x = [r.lat.mean() for r in static]
        y = [run_scores(r, scoring).mean() for r in static]
        ax.scatter(x, y, color="#888888", s=22, label="static plans", zorder=3)
        right = max(x)  # frontiers stay flat beyond their last breakpoint: draw them out to the dense cost
        hx, hy = hull_curve(static, scoring, idx)
        ax.plot([*hx, right], [*hy, hy[-1]], color="black", lw=1.8, label="static convex hull (StaticMix)")
        ox, oy = oracle_curve(static, scoring, idx)
        ax.plot([*ox, right], [*oy, oy[-1]], color="#c53030", lw=1.4, ls="--", label="oracle (hindsight)")
        for k, (name, fam) in enumerate(families.items()):
            c = colors[k % len(colors)]
            fx = [r.lat.mean() for r in fam]
            fy = [run_scores(r, scoring).mean() for r in fam]
            ax.scatter(fx, fy, color=c, s=46, marker="D", label=name, zorder=4)
            if len(fam) > 1:
                ux, uy = family_frontier(fam, scoring)
                ax.plot(ux, uy, color=c, lw=1.2)
        for t in DEFAULT_TARGETS:
            ax.axvline(t, color="#999999", lw=0.8, ls=":")
        ax.set_xlabel("measured latency ÷ dense (the same inputs)")
        ax.set_ylabel("accuracy, " + ("dense-relative" if scoring == "dense_relative" else "raw") + " scoring")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "Adaptive vs static pruning at equal measured latency (held-out inputs)")
    return save_figure(fig, path)
