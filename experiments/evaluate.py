r"""Evaluate controllers on held-out inputs, and the Pareto study of adaptive vs static pruning.

Usage::

    python -m experiments.evaluate --controller dense --controller static:0.8,1,1 \\
        --controller outputs/main/<run>/controller            # an exported controller folder
    python -m experiments.evaluate --pareto --controller <folder> ...   # + static sweep, hull, oracle

Every controller runs live on every test input in ``PruneGym/PerInput`` with ``cost="measured"``:
the probe, the decision and the rest of the model are timed on this machine, and the item is
scored against its dense reference. The static sweep is a table of every candidate plan on every
input; the static convex hull (the best random mixture of two static plans) and the per-input
hindsight oracle come from that table.

The headline compares, at fixed fractions of dense latency, each controller family's accuracy with
the static hull's, matched in measured latency: a controller family (e.g. a policy trained at
several reward weights) reaches a latency by mixing its two nearest operating points, exactly as
the hull mixes static plans. A point is "matched" when a real operating point lies within ±2% of
the target; otherwise the interpolated value is marked. Confidence intervals (95%) are paired
bootstraps over inputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.baselines import (
    Context,
    Dense,
    EntropyThreshold,
    PlanController,
    PolicyController,
    StaticImportance,
    StaticUniform,
)
from agents.frontier import interp_frontier, oracle_frontier, static_hull, upper_hull
from experiments.report import markdown_table

SCORINGS = ("dense_relative", "raw")
DEFAULT_TARGETS = (0.70, 0.85)
MATCH_TOL = 0.02


# ---------------------------------------------------------------------------------------- running
def evaluation_env(
    *,
    model: str = "smollm2-135m",
    task: str = "mc",
    split: str = "test",
    n_items: int | None = 48,
    env_kwargs: Mapping[str, Any] | None = None,
    cost: str = "measured",
) -> Any:
    """A ``PerInput`` environment over a held-out split (unwrapped); measured cost unless told otherwise.

    ``cost="calibrated"`` makes an evaluation exactly reproducible (for tests and audits); the
    headline figures use ``"measured"``.
    """
    import envs  # noqa: F401  (registers the ids)
    from envs import make_env

    kwargs = {
        "model": model,
        "task": task,
        "split": split,
        "n_items": n_items,
        **dict(env_kwargs or {}),
        "cost": cost,
    }
    return make_env("PruneGym/PerInput-v0", **kwargs).unwrapped


def context(env: Any, item_index: int = -1) -> Context:
    """The controller context of ``env`` for input ``item_index``."""
    return Context(
        builder=env.builder,
        slm=env.slm,
        item_index=item_index,
        feature_names=env.probe.feature_names,
        discrete_presets=env.presets,
    )


@dataclass
class Run:
    """One controller's per-input results.

    Attributes:
        name: Controller name.
        family: Group of operating points that may be mixed (a policy at several reward weights).
        raw: Raw task score per input.
        rel: Dense-relative score per input.
        lat: Measured latency relative to the dense model on the same input.
        latency_s: Measured latency in seconds (probe + decision + rest).
        flops: Decoder FLOPs fraction.
        tasks: Task of each input.
        decision_s: Time the controller took to decide, per input.
        extra: Anything else (energy, source).
    """

    name: str
    family: str
    raw: np.ndarray
    rel: np.ndarray
    lat: np.ndarray
    latency_s: np.ndarray
    flops: np.ndarray
    tasks: list[str]
    decision_s: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Means and latency percentiles."""
        return {
            "name": self.name,
            "family": self.family,
            "n": len(self.raw),
            "accuracy_raw": float(self.raw.mean()),
            "accuracy_dense_relative": float(self.rel.mean()),
            "latency_fraction": float(self.lat.mean()),
            "latency_p50_ms": float(np.median(self.latency_s) * 1e3),
            "latency_p95_ms": float(np.percentile(self.latency_s, 95) * 1e3),
            "flops_fraction": float(self.flops.mean()),
            "decision_ms": float(np.median(self.decision_s) * 1e3),
            **self.extra,
        }


def run_controller(env: Any, controller: PlanController, n: int, family: str | None = None, desc: str = "") -> Run:
    """Run ``controller`` live on the first ``n`` inputs of ``env``."""
    cols: dict[str, list[Any]] = {k: [] for k in ("raw", "rel", "lat", "lat_s", "flops", "task", "dec", "en", "tok")}
    for i in tqdm(range(n), desc=desc or controller.name, leave=False):
        obs, _ = env.reset(options={"item": i})
        t0 = time.perf_counter()
        plan = controller(obs, context(env, i))
        dec = time.perf_counter() - t0
        _, _, _, _, info = env.step_plan(plan)
        _collect(cols, info, dec)
    return _run(controller.name, family or controller.name, cols)


def _collect(cols: dict[str, list[Any]], info: Mapping[str, Any], dec: float) -> None:
    cols["raw"].append(info["accuracy_raw"])
    cols["rel"].append(info["accuracy_dense_relative"])
    cols["lat"].append(info["latency_fraction"])
    cols["lat_s"].append(info["latency_s"] + dec)
    cols["flops"].append(info["flops_fraction"])
    cols["task"].append(info["task"])
    cols["dec"].append(dec)
    cols["en"].append(info.get("energy_source"))
    cols["tok"].append(info.get("prompt_tokens", 0))


def _run(name: str, family: str, cols: dict[str, list[Any]]) -> Run:
    lat_s = np.array(cols["lat_s"], dtype=np.float64)
    return Run(
        name,
        family,
        np.array(cols["raw"], dtype=np.float64),
        np.array(cols["rel"], dtype=np.float64),
        np.array(cols["lat"], dtype=np.float64),
        lat_s,
        np.array(cols["flops"], dtype=np.float64),
        list(cols["task"]),
        np.array(cols["dec"], dtype=np.float64),
        {
            "throughput_tok_s": float(np.sum(cols["tok"]) / max(lat_s.sum(), 1e-12)),
            "energy_source": sorted({str(e) for e in cols["en"]}),
        },
    )


def sweep(
    env: Any,
    candidates: Sequence[PlanController],
    n: int,
    controllers: Sequence[tuple[PlanController, str]] = (),
    seed: int = 0,
) -> tuple[list[Run], list[Run], np.ndarray]:
    """Static candidates and controllers on every input, interleaved, sharing one probe per input.

    For each input, every static plan and every controller runs back to back, in an order shuffled
    per input, so slow drifts of the machine (other load, clocks) hit them alike instead of
    favouring whichever was measured in a quieter phase.

    Returns:
        The static runs, the controller runs (in the order given) and the observations.
    """
    everyone: list[tuple[PlanController, str]] = [(c, "static") for c in candidates] + list(controllers)
    cols = [{k: [] for k in ("raw", "rel", "lat", "lat_s", "flops", "task", "dec", "en", "tok")} for _ in everyone]
    rng = np.random.default_rng(seed)
    obs_all = []
    for i in tqdm(range(n), desc="static sweep and controllers"):
        obs, _ = env.reset(options={"item": i})
        obs_all.append(obs)
        ctx = context(env, i)
        for j in rng.permutation(len(everyone)):
            t0 = time.perf_counter()
            plan = everyone[j][0](obs, ctx)
            dec = time.perf_counter() - t0
            _, _, _, _, info = env.step_plan(plan, keep_open=True)
            _collect(cols[j], info, dec)
        env._done = True
    runs = [_run(c.name, fam, col) for (c, fam), col in zip(everyone, cols, strict=True)]
    return runs[: len(candidates)], runs[len(candidates) :], np.array(obs_all)


def static_table(env: Any, candidates: Sequence[PlanController], n: int) -> tuple[list[Run], np.ndarray]:
    """Every candidate on every input, sharing one probe per input; returns runs and observations."""
    static, _, obs = sweep(env, candidates, n)
    return static, obs


def default_candidates(budgets: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5)) -> list[PlanController]:
    """The static sweep: uniform fractions of each kind and ShortGPT-style plans at FLOPs budgets."""
    out: list[PlanController] = [Dense()]
    for f in (0.9, 0.8, 0.7, 0.6, 0.5):
        out.append(StaticUniform(layers=f))
    for f in (0.75, 0.5):
        out.append(StaticUniform(mlp=f))
    out.append(StaticUniform(heads=2 / 3))
    out.append(StaticUniform(heads=2 / 3, mlp=0.75))
    for f in (0.9, 0.8):
        out.append(StaticUniform(layers=f, mlp=0.75))
    for b in budgets:
        out.append(StaticImportance(budget=b))
    return out


# ---------------------------------------------------------------------------------------- study
def _score(run: Run, scoring: str) -> np.ndarray:
    return run.rel if scoring == "dense_relative" else run.raw


def family_frontier(runs: Sequence[Run], scoring: str, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Upper hull of a family's operating points (mean latency fraction, mean accuracy)."""
    idx = np.arange(len(runs[0].raw)) if idx is None else idx
    x = np.array([r.lat[idx].mean() for r in runs])
    y = np.array([_score(r, scoring)[idx].mean() for r in runs])
    return upper_hull(x, y)


def _oracle(static: Sequence[Run], scoring: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acc = np.stack([_score(r, scoring)[idx] for r in static], axis=1)
    cost = np.array([r.lat[idx].mean() for r in static])
    return oracle_frontier(acc, cost)


def _hull(static: Sequence[Run], scoring: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acc = np.stack([_score(r, scoring)[idx] for r in static], axis=1)
    cost = np.array([r.lat[idx].mean() for r in static])
    return static_hull(acc, cost)


def headline(
    static: Sequence[Run],
    families: Mapping[str, Sequence[Run]],
    targets: Sequence[float] = DEFAULT_TARGETS,
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy at each target latency: static hull, oracle and every controller family, with 95% CIs.

    Returns one row per (scoring, target, family) with the point estimate, CI, the difference to
    the hull (paired bootstrap CI), the share of the hull-to-oracle gap closed, and whether a real
    operating point of the family lies within ±2% of the target latency.
    """
    n = len(static[0].raw)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, n, n) for _ in range(n_boot)]
    full = np.arange(n)
    rows = []
    for scoring in SCORINGS:
        for t in targets:

            def at(
                fam: Sequence[Run] | None, idx: np.ndarray, what: str, scoring: str = scoring, t: float = t
            ) -> float:
                if what == "hull":
                    fx, fy = _hull(static, scoring, idx)
                elif what == "oracle":
                    fx, fy = _oracle(static, scoring, idx)
                else:
                    fx, fy = family_frontier(fam, scoring, idx)  # type: ignore[arg-type]
                return float(interp_frontier(fx, fy, [t])[0])

            hull_pt = at(None, full, "hull")
            oracle_pt = at(None, full, "oracle")
            hull_b = np.array([at(None, b, "hull") for b in boots])
            oracle_b = np.array([at(None, b, "oracle") for b in boots])
            entries: list[tuple[str, float, np.ndarray, bool]] = [
                ("static hull (StaticMix)", hull_pt, hull_b, _matched(static, t)),
                ("oracle (hindsight)", oracle_pt, oracle_b, True),
            ]
            for name, fam in families.items():
                pt = at(fam, full, "family")
                fb = np.array([at(fam, b, "family") for b in boots])
                entries.append((name, pt, fb, _matched(fam, t)))
            for name, pt, pb, matched in entries:
                diff = pb - hull_b
                gap = oracle_pt - hull_pt
                rows.append(
                    {
                        "scoring": scoring,
                        "target_latency": t,
                        "controller": name,
                        "accuracy": pt,
                        "ci95": _ci(pb),
                        "vs_hull": pt - hull_pt,
                        "vs_hull_ci95": _ci(diff),
                        "gap_closed": (pt - hull_pt) / gap if np.isfinite(pt) and gap > 1e-9 else float("nan"),
                        "matched": matched,
                    }
                )
    return rows


def _matched(runs: Sequence[Run], t: float) -> bool:
    return any(abs(r.lat.mean() - t) <= MATCH_TOL for r in runs)


def _ci(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


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
                    _fmt_ci(r["ci95"]),
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
        y = [_score(r, scoring).mean() for r in static]
        ax.scatter(x, y, color="#888888", s=22, label="static plans", zorder=3)
        right = max(x)  # frontiers stay flat beyond their last breakpoint: draw them out to the dense cost
        hx, hy = _hull(static, scoring, idx)
        ax.plot([*hx, right], [*hy, hy[-1]], color="black", lw=1.8, label="static convex hull (StaticMix)")
        ox, oy = _oracle(static, scoring, idx)
        ax.plot([*ox, right], [*oy, oy[-1]], color="#c53030", lw=1.4, ls="--", label="oracle (hindsight)")
        for k, (name, fam) in enumerate(families.items()):
            c = colors[k % len(colors)]
            fx = [r.lat.mean() for r in fam]
            fy = [_score(r, scoring).mean() for r in fam]
            ax.scatter(fx, fy, color=c, s=46, marker="D", label=name, zorder=4)
            if len(fam) > 1:
                ux, uy = family_frontier(fam, scoring)
                ax.plot(ux, uy, color=c, lw=1.2)
        for t in DEFAULT_TARGETS:
            ax.axvline(t, color="#999999", lw=0.8, ls=":")
        ax.set_xlabel("measured latency ÷ dense (same input)")
        ax.set_ylabel("accuracy, " + ("dense-relative" if scoring == "dense_relative" else "raw") + " scoring")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "Adaptive vs static pruning at equal measured latency (held-out inputs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def probe_observations(env: Any, n: int) -> np.ndarray:
    """The probe's observation of each of the first ``n`` inputs (no plan runs, nothing is scored)."""
    out = []
    for i in range(n):
        obs, _ = env.reset(options={"item": i})
        out.append(obs)
        env._done = True
    return np.array(out)


def entropy_rules(obs: np.ndarray, feature_names: Sequence[str]) -> list[PlanController]:
    """EntropyThreshold heuristics: dense for uncertain inputs, a cheaper static plan for confident ones.

    The thresholds are quantiles of the entropy feature, a hand-set rule (not fitted on scores).
    """
    names = list(feature_names)
    if "entropy" not in names:
        return []
    ent = obs[:, names.index("entropy")]
    cheap = StaticUniform(layers=0.6)
    return [EntropyThreshold(float(np.quantile(ent, q)), cheap, Dense()) for q in (0.25, 0.5, 0.75)]


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


# ---------------------------------------------------------------------------------------- CLI
def parse_controller(spec: str, env: Any) -> tuple[PlanController, str]:
    """A controller from a command-line spec (see ``--help``); returns it and its family."""
    if spec == "dense":
        return Dense(), "Dense"
    kind, _, arg = spec.partition(":")
    try:
        if kind == "static":
            fl, fh, fm = (float(x) for x in arg.split(","))
            return StaticUniform(fl, fh, fm), "static"
        if kind == "importance":
            return StaticImportance(budget=float(arg)), "static"
        if kind == "entropy":
            return EntropyThreshold(float(arg), StaticUniform(layers=0.6), Dense()), "EntropyThreshold"
    except ValueError as exc:
        raise ValueError(f"bad controller spec {spec!r}: {exc}") from None
    path = Path(spec)
    if path.is_dir() and (path / "card.json").is_file():
        from agents.controller import Controller

        ctrl = Controller.from_pretrained(path, slm=env.slm)
        discrete = ctrl.card["action"]["kind"] == "discrete"
        name = ctrl.card.get("algo", path.name)
        return PolicyController(ctrl.select_action, name=f"{name} ({path.name})", discrete=discrete), str(name)
    raise ValueError(
        f"unknown controller {spec!r}: use dense, static:L,H,M (keep fractions), importance:BUDGET, "
        "entropy:THRESHOLD, or the folder of an exported controller (with card.json)"
    )


def main(argv: list[str] | None = None) -> None:
    """Evaluate controllers on the held-out split (and optionally the Pareto study)."""
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--controller",
        action="append",
        default=[],
        help="dense | static:L,H,M | importance:B | entropy:T | <exported controller folder>; repeat for several",
    )
    p.add_argument("--pareto", action="store_true", help="also sweep the static plans, hull and oracle, and plot")
    p.add_argument("--model", default="smollm2-135m", help="model name or folder")
    p.add_argument("--task", default="mc", help="task mix of the held-out inputs")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split")
    p.add_argument("--n-items", type=int, default=48, help="inputs to evaluate")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the LLM forward")
    p.add_argument(
        "--env-kwargs",
        type=json.loads,
        default={},
        help="extra PerInput settings as JSON, e.g. '{\"probe_layers\": 1}'",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/evaluate/<time>)")
    args = p.parse_args(argv)
    if not args.controller and not args.pareto:
        p.error("name at least one --controller, or --pareto")
    out = args.out or Path("outputs/evaluate") / time.strftime("%Y-%m-%d_%H-%M-%S")
    env = evaluation_env(
        model=args.model,
        task=args.task,
        split=args.split,
        n_items=args.n_items,
        env_kwargs={"threads": args.threads, **args.env_kwargs},
    )
    n = min(args.n_items, len(env.items))
    chosen = [parse_controller(spec, env) for spec in args.controller]
    md = [f"# Evaluation: {args.model}, task {args.task}, {args.split} split, {n} inputs, measured latency\n"]
    rows = None
    families: dict[str, list[Run]] = {}
    if args.pareto:
        rules = entropy_rules(probe_observations(env, n), env.probe.feature_names)
        chosen += [(rule, "EntropyThreshold") for rule in rules]
        static, runs, _ = sweep(env, default_candidates(), n, chosen)
    else:
        static, runs = [], [run_controller(env, c, n, fam) for c, fam in chosen]
    for run in runs:
        families.setdefault(run.family, []).append(run)
    if args.pareto:
        fams = {k: v for k, v in families.items() if k not in ("static", "Dense")}
        rows = headline(static, fams)
        md.append(headline_markdown(rows))
        plot = pareto_plot(static, fams, out / "pareto.png")
        md.append(f"![Pareto]({plot.name})")
        runs = static + runs
    md.append("## Every controller\n\n" + summary_table(runs))
    md.append("## Per task (dense-relative)\n\n" + per_task_table(runs))
    text = "\n\n".join(md) + "\n"
    save_results(out, runs, rows, text)
    print(text)
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
