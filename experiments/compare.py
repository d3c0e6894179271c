"""Compare algorithms across seeds: ``python -m experiments.compare <multirun dir>``.

Reads every run under the folder (each run directory holds ``final.json`` and ``metrics.jsonl``, as
written by :mod:`experiments.train`), groups runs by algorithm (and env, when several), and writes:

- ``compare.md``: per algorithm, the held-out reward, accuracy and cost as the interquartile mean
  (IQM) over seeds with a 95% bootstrap confidence interval over seeds (rliable's IQM), and the budget each
  algorithm got: env steps per run, runs, and hyperparameter settings tried (``tuning_trials``). When
  the budgets differ the table says so instead of claiming a fair comparison;
- ``compare.json``: the same figures, plus every run's values and the learning curves;
- ``compare.png``: learning curves (training reward per iteration against env steps, mean over seeds
  with the min-max band).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.report import markdown_table

METRICS = ("reward", "accuracy", "cost")


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under ``root`` (those holding a ``final.json``), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the multirun directory (multirun/train/<date>)")
    return sorted(p.parent for p in root.rglob("final.json"))


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's final figures and its learning curve (env steps, training reward)."""
    final = json.loads((run_dir / "final.json").read_text())
    curve: list[tuple[float, float]] = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            curve.append((float(row.get("env_steps", 0.0)), float(row.get("reward", float("nan")))))
    final["curve"] = curve
    final["run_dir"] = str(run_dir)
    return final


def iqm_with_ci(values: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of ``values`` (one per seed) and its 95% percentile-bootstrap CI over seeds.

    The IQM is rliable's ``metrics.aggregate_iqm``. The bootstrap is rliable's stratified bootstrap
    for a single task (resample runs with replacement, percentile interval), done here with NumPy:
    ``rliable.library`` imports ``arch``, whose 7.2 release fails to import under pandas 3.
    """
    from rliable import metrics

    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(metrics.aggregate_iqm(arr[:, None]))
    if arr.size == 1:  # one seed: nothing to resample
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(reps, arr.size))
    boot = np.array([metrics.aggregate_iqm(arr[i][:, None]) for i in idx])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs keyed by algorithm (``algo @ env`` when the runs cover several envs)."""
    envs = {r.get("env_id") for r in runs}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        key = str(r["algo"]) if len(envs) == 1 else f"{r['algo']} @ {r.get('env_id')}"
        groups[key].append(r)
    return dict(sorted(groups.items()))


def mean_curve(runs: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean, min and max training reward across seeds, per iteration (curves cut to the shortest run)."""
    curves = [r["curve"] for r in runs if r["curve"]]
    if not curves:
        return {"env_steps": [], "mean": [], "min": [], "max": []}
    n = min(len(c) for c in curves)
    steps = np.asarray([[c[i][0] for i in range(n)] for c in curves]).mean(axis=0)
    rewards = np.asarray([[c[i][1] for i in range(n)] for c in curves])
    return {
        "env_steps": steps.tolist(),
        "mean": np.nanmean(rewards, axis=0).tolist(),
        "min": np.nanmin(rewards, axis=0).tolist(),
        "max": np.nanmax(rewards, axis=0).tolist(),
    }


def compare(root: str | Path, out: str | Path | None = None, reps: int = 2000) -> dict[str, Any]:
    """Build the comparison of the runs under ``root``; writes ``compare.{md,json,png}`` into ``out`` (default root)."""
    runs = [load_run(p) for p in find_runs(root)]
    if not runs:
        raise FileNotFoundError(f"no finished run (final.json) under {root}: did the training jobs complete?")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    summary: dict[str, Any] = {"root": str(root), "algorithms": {}}
    for key, rs in groups.items():
        entry: dict[str, Any] = {
            "runs": len(rs),
            "seeds": sorted(int(r["seed"]) for r in rs),
            "env_steps_per_run": sorted({int(r["env_steps"]) for r in rs}),
            "tuning_trials": sorted({int(r.get("tuning_trials", 1)) for r in rs}),
            "eval_split": sorted({str(r.get("eval_split")) for r in rs}),
            "per_run": [{"seed": r["seed"], **{m: r["eval"].get(m) for m in METRICS}} for r in rs],
            "curve": mean_curve(rs),
        }
        for m in METRICS:
            point, lo, hi = iqm_with_ci([float(r["eval"].get(m, float("nan"))) for r in rs], reps=reps)
            entry[m] = {"iqm": point, "ci95": [lo, hi]}
        summary["algorithms"][key] = entry
    budgets = {(tuple(e["env_steps_per_run"]), tuple(e["tuning_trials"])) for e in summary["algorithms"].values()}
    summary["equal_budget"] = len(budgets) == 1
    markdown = render_markdown(summary)
    (out / "compare.md").write_text(markdown)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    plot_curves(summary, out / "compare.png")
    summary["markdown"] = markdown
    return summary


def _fmt(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci95"]
    if not math.isfinite(cell["iqm"]):
        return "n/a"
    return f"{cell['iqm']:.4f} [{lo:.4f}, {hi:.4f}]"


def render_markdown(summary: dict[str, Any]) -> str:
    """The comparison table, with the budget statement."""
    rows = []
    for key, e in summary["algorithms"].items():
        steps = "/".join(str(s) for s in e["env_steps_per_run"])
        trials = "/".join(str(t) for t in e["tuning_trials"])
        rows.append([key, e["runs"], steps, trials, _fmt(e["reward"]), _fmt(e["accuracy"]), _fmt(e["cost"])])
    headers = ["algorithm", "runs (seeds)", "env steps / run", "tuning trials", "reward", "accuracy", "cost"]
    splits = sorted({s for e in summary["algorithms"].values() for s in e["eval_split"]})
    budget = (
        "Equal budget: every algorithm trained for the same env steps per run with the same number of "
        "hyperparameter settings tried (tuning trials)."
        if summary["equal_budget"]
        else "**Budgets differ between algorithms** (env steps per run or tuning trials): the comparison is not "
        "at equal budget."
    )
    return (
        f"# Algorithm comparison\n\nRuns under `{summary['root']}`. Held-out ({', '.join(splits)} split) figures of "
        "the greedy policy after training: IQM over seeds (rliable) [95% bootstrap CI]. "
        "Cost is the latency fraction of the dense model.\n\n"
        f"{budget}\n\n{markdown_table(headers, rows)}\n\nLearning curves: `compare.png`.\n"
    )


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    """Training reward against env steps, one line (mean over seeds) and min-max band per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, e in summary["algorithms"].items():
        c = e["curve"]
        if not c["env_steps"]:
            continue
        ax.plot(c["env_steps"], c["mean"], label=f"{key} (n={e['runs']})")
        ax.fill_between(c["env_steps"], c["min"], c["max"], alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("training reward (per-iteration mean)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print the table, write compare.md/json/png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="multirun directory (or any folder holding run directories)")
    parser.add_argument("--out", default=None, help="where to write compare.{md,json,png} (default: root)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    summary = compare(args.root, args.out, args.reps)
    print(summary["markdown"])
    print(f"wrote {Path(args.out or args.root) / 'compare.md'}, compare.json, compare.png")


if __name__ == "__main__":
    main()
