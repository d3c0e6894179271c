"""Staged exits vs static pruning at equal measured latency: the model's own answer at each depth decides when to stop.

Usage: ``python -m experiments.bench.staged [--quick] [--task mc] [--test 240] [--train 720] [--model NAME]
[--timing-threads 1] [--rounds 2] [--workers 2]``.

Everything is fitted on the **train** split and evaluated on held-out **test** inputs:

- On ``--train`` train inputs, the staged environment (:class:`envs.staged.Staged`, measured
  latency, timed against the dense plan as on test) gives every input's exit table (the
  observation before each step, and the answer and cost of stopping there). Fitted on it: the
  CALM threshold (on the readout margin); the learnable ceiling (a cross-validated stop classifier
  on the same observations, stopping where its predicted risk of disagreeing is at most ``lambda``
  times the latency the stop saves, :func:`agents.staged.stop_ceiling`); and the risk-controlled
  stops (Learn-then-Test at each ``delta`` of :data:`agents.staged.RISK_DELTAS`, ``epsilon`` =
  :data:`agents.staged.RISK_EPSILON`), one on the margin and one on the classifier (fitted on
  half of the train inputs, certified on the other half).
- On ``--test`` test inputs, with **measured** latency: for each input, every static plan
  (:func:`agents.evaluation.default_candidates` plus every fixed exit depth, :class:`agents.baselines.StaticDepth`)
  and the staged pass that measures every stop depth run back to back in a shuffled order. The
  dense model is among the static plans, so it is timed in the same rounds as everything else. It
  is the evaluation's sweep (:func:`agents.evaluation.sweep`): each run timed with the evaluation's
  timing threads, its best of ``--rounds`` rounds over the dense plan's best round on the same
  input, the inputs shared among ``--workers`` processes.
- The static convex hull (best mixture of two static plans, dense-relative), the rules and the
  ceiling are compared at 70% and 85% of dense latency with paired-bootstrap 95% CIs
  (:func:`agents.evaluation.headline`), and at iso-quality (the latency each needs for 0.95
  dense-relative agreement).
- The readout-by-depth table: the agreement of the answer read after each group with the dense
  answer, and how well the readout's margin predicts that agreement (AUC).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import numpy as np

from agents.baselines import Dense
from agents.evaluation import (
    Run,
    default_candidates,
    evaluation_env,
    headline,
    hull_curve,
    sweep,
)
from agents.frontier import auc, interp_frontier, upper_hull
from agents.staged import (
    CALM_FAMILY,
    RISK_DELTAS,
    RISK_EPSILON,
    ExitTable,
    StagedPass,
    as_run,
    exit_depths,
    first_true,
    fit_for_latency,
    fit_stop_rules,
    stop_ceiling,
)
from envs.data.files import atomic_write_json
from experiments.bench.harness import Benchmark
from experiments.cli import add_timing_arguments, timing_arguments
from experiments.report import (
    REPO_ROOT,
    headline_markdown,
    markdown_table,
    pareto_plot,
    risk_table,
    summary_table,
)

BENCH = Benchmark("experiments.bench.staged", __doc__, threads=2)
TARGETS = (0.70, 0.85)
DEFAULT_MODEL = "smollm2-135m"
ISO = 0.95


def _envs(args: Any, split: str, n: int) -> tuple[Any, Any]:
    """The staged environment and the per-input one (for static plans) on the same items, both measured.

    Both are the evaluation's (:func:`agents.evaluation.evaluation_env`): each timed run uses the
    evaluation's timing threads, whatever the forward uses otherwise.
    """
    from envs.base import shared_lm
    from experiments.main import main_config, per_input_kwargs, staged_kwargs

    key = (split, n)
    if key not in _ENVS:
        common = {
            "model": args.model,
            "task": args.task,
            "split": split,
            "n_items": n,
            "timing_threads": args.timing_threads,
        }
        shared = {"data_seed": args.seed, "threads": args.threads, "exit_maps": args.exit_maps, "discrete": True}
        main = main_config()  # the main job's probe, prompt limit and groups (fewer on a model with fewer layers)
        staged_kw = {**staged_kwargs(main), **shared}
        if args.groups is not None:
            staged_kw["num_groups"] = args.groups
        staged = evaluation_env(**common, env="Staged", env_kwargs=staged_kw)
        pin_kw = {**per_input_kwargs(main), **shared}
        pin_kw["num_groups"] = min(pin_kw["num_groups"], shared_lm(args.model).spec.num_layers - pin_kw["probe_layers"])
        pin = evaluation_env(**common, env_kwargs=pin_kw)
        _ENVS[key] = (staged, pin)  # the sweep refuses a staged pass over other inputs (StagedPass.check_items)
    return _ENVS[key]


_ENVS: dict[tuple[str, int], tuple[Any, Any]] = {}


def interleaved(args: Any, split: str, n: int, candidates: list[Any]) -> tuple[list[Run], ExitTable]:
    """Every static plan and the staged pass on each input, back to back in a shuffled order, measured.

    The evaluation's own sweep (:func:`agents.evaluation.sweep` with a :class:`agents.staged.StagedPass`
    that runs only the exit row): ``args.rounds`` timing rounds per input, each run's best round over
    the dense plan's best round on the same input, the inputs shared among ``args.workers`` processes.
    ``candidates`` must hold :class:`agents.baselines.Dense`, the latency reference.
    """
    staged, pin = _envs(args, split, n)
    sp = StagedPass(staged)
    static, _, _ = sweep(pin, candidates, n, seed=args.seed, rounds=args.rounds, staged=sp, workers=args.workers)
    assert sp.table is not None
    return static, sp.table


def saved_run(task: str, tag: str) -> tuple[ExitTable, ExitTable, list[Run], str]:
    """An earlier run's train and test exit tables, static runs and command, as it saved them under reports/.

    Raises:
        SystemExit: A file is missing, or the saved static runs hold other inputs than the test table.
    """
    base = REPO_ROOT / "reports"
    paths = [base / f"staged_train_{task}{tag}.npz", base / f"staged_test_{task}{tag}.npz"]
    paths.append(base / f"bench_staged_{task}{tag}.json")
    for path in paths:
        if not path.exists():
            raise SystemExit(f"--from-reports: {path} is missing; run the benchmark without --from-reports first")
    train, test = ExitTable.load(paths[0]), ExitTable.load(paths[1])
    saved = json.loads(paths[2].read_text())
    n, m = len(test.item_ids), len(next(iter(saved["static_per_input"].values()))["rel"])
    if m != n:
        raise SystemExit(f"--from-reports: {paths[2]} holds {m} test inputs, the exit table {n}")
    static = [Run.from_saved(r, saved["static_per_input"][r["name"]], test.tasks) for r in saved["static"]]
    return train, test, static, str(saved["command"])


def stop_layers(table: ExitTable) -> tuple[int, list[int]]:
    """The probe's layers and the layer after each group, read off an exit table's ``depth`` feature."""
    depth = table.feature("depth")[0].astype(float)  # layers run before each step, over all layers
    k = int(table.meta["env"]["interface"]["observation"]["probe"]["layers"])
    layers = int(round(k / depth[0]))
    return k, [int(round(d * layers)) for d in depth[1:]] + [layers]


def iso_latency(runs: list[Run] | None, static: list[Run], level: float = ISO) -> float:
    """The smallest mean latency fraction at which a family's frontier (or the hull) reaches ``level``."""
    if runs is None:
        fx, fy = hull_curve(static, "dense_relative", np.arange(len(static[0].raw)))
    else:
        fx, fy = upper_hull(np.array([r.lat.mean() for r in runs]), np.array([r.rel.mean() for r in runs]))
    grid = np.linspace(min(fx), max(fx), 2001)
    y = interp_frontier(fx, fy, grid)
    ok = np.flatnonzero(np.nan_to_num(y, nan=-1) >= level)
    return float(grid[ok[0]]) if len(ok) else float("nan")


def readout_table(
    table: ExitTable, probe_layers: int, group_layers: list[int], agree_prob: np.ndarray | None = None
) -> str:
    """Agreement of the answer read after each group with dense, and how well the margin predicts it (AUC).

    ``agree_prob`` (``[n, G]``, the stop classifier's predicted agreement) adds its AUC beside the margin's.
    """
    rows = []
    margin = table.feature("margin")
    for t in range(table.groups + 1):
        depth = probe_layers if t == 0 else group_layers[t - 1]
        agree = table.rel[:, t]
        a = auc(margin[:, t], agree >= 1.0) if t < table.groups else float("nan")
        c = auc(agree_prob[:, t], agree >= 1.0) if agree_prob is not None and t < table.groups else float("nan")
        row = [
            t,
            depth,
            f"{agree.mean():.3f}",
            f"{table.raw[:, t].mean():.3f}",
            f"{table.lat[:, t].mean():.3f}",
            "—" if not math.isfinite(a) else f"{a:.2f}",
        ]
        rows.append(row + ([] if agree_prob is None else ["—" if not math.isfinite(c) else f"{c:.2f}"]))
    head = ["groups run", "layers", "agreement with dense", "raw accuracy", "latency ÷ dense", "margin AUC"]
    return markdown_table(head + ([] if agree_prob is None else ["stop classifier AUC"]), rows)


def main(argv: list[str] | None = None) -> None:
    """Fit on train, measure on test, print the tables, write BENCHMARKS.md, the plot and the results."""
    p = BENCH.parser()
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or prepared model (default: embedded)")
    p.add_argument("--task", default="mc", help="task mix (default: mc)")
    p.add_argument("--test", type=int, default=240, help="held-out test inputs, measured latency (default: 240)")
    p.add_argument(
        "--train", type=int, default=720, help="train inputs the rules and the ceiling are fitted on (default: 720)"
    )
    p.add_argument("--groups", type=int, default=None, help="layer groups of the staged env (default: the main job's)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default: 0)")
    p.add_argument(
        "--exit-maps",
        default=None,
        metavar="NAME",
        help="exit maps every exit and every plan that skips the last layer answers through, static plans included "
        "(python -m experiments.exit_maps; default: none, the logit lens)",
    )
    add_timing_arguments(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 16 train and 6 test inputs; writes nothing")
    p.add_argument(
        "--from-reports",
        action="store_true",
        help="measure nothing: re-fit the rules on the train and test exit tables and static runs an earlier run of "
        "the same --task, --model and --exit-maps saved under reports/ (its --train and --test), and report them",
    )
    args = BENCH.parse(p, argv)
    args.rounds, args.timing_threads, args.workers = timing_arguments(p, args)
    if args.quick:
        args.train, args.test = 16, 6
        args.no_write = args.no_write or args.output is None
    if args.test < 4 or args.train < 10:
        p.error("--test must be >= 4 and --train >= 10")
    t0 = time.perf_counter()
    # file names of the outputs: the model's name unless it is the embedded one, then the exit maps' name
    tag = "".join(f"_{x}" for x in (None if args.model == DEFAULT_MODEL else args.model, args.exit_maps) if x)

    source = None  # the command whose measurements are re-fitted (--from-reports)
    if args.from_reports:
        train, test, static, source = saved_run(args.task, tag)
        k, depths = stop_layers(test)
        test_s = 0.0
    else:
        train_env, _ = _envs(args, "train", args.train)
        k = train_env.probe.layers
        depths = [train_env.interface.stop_layer(t) for t in range(train_env.num_groups)]
        _, train = interleaved(args, "train", args.train, [Dense()])
        print(f"train exit table: {len(train.item_ids)} inputs in {time.perf_counter() - t0:.0f}s", flush=True)
        candidates = default_candidates() + exit_depths(train_env)
        t1 = time.perf_counter()
        static, test = interleaved(args, "test", args.test, candidates)
        test_s = time.perf_counter() - t1
    n = len(test.item_ids)

    # ---- rules and ceiling, fitted on train
    rules = fit_stop_rules(train, RISK_DELTAS, RISK_EPSILON, grid_size=30)
    rule_runs, risk_records = rules.evaluate(test)
    calm = [r for r in rule_runs if r.family == CALM_FAMILY]
    try:
        classifiers, cv_losses = stop_ceiling(train)
    except ValueError as exc:  # e.g. every train stop agrees (or none does): nothing to learn from
        classifiers, cv_losses = [], {"not fitted": str(exc)}
    ceiling = [as_run(test, c.exits(test), c.name, "ceiling") for c in classifiers]
    fitted = [fit_for_latency(train, t) for t in TARGETS]
    fitted_runs = [as_run(test, r.exits(test), r.label(), "fitted") for r in fitted]
    # The hindsight exit: each input stops at its earliest depth whose answer agrees with dense (the
    # stopping headroom; mixed with running everything it traces a line, like the static oracle).
    G = test.groups
    hindsight = first_true(test.rel[:, :G] >= 1.0)
    oracle_exit = [
        as_run(test, hindsight, "hindsight exit (oracle)", "oracle"),
        as_run(test, np.full(n, G), "x", "oracle"),
    ]
    families = {"CALM threshold (train-fitted grid)": calm}
    if ceiling:
        families["learnable ceiling (stop classifier)"] = ceiling
    rows_h = headline(static, {**families, "hindsight exit (oracle)": oracle_exit}, TARGETS)

    # ---- tables
    groups_layers = depths
    lines = []
    for name, runs in (("static hull", None), *families.items()):
        lines.append([name, f"{iso_latency(runs, static):.3f}"])
    iso = markdown_table(["", f"latency ÷ dense for {ISO:.2f} dense-relative agreement"], lines)
    fit_rows = [
        [
            r.name,
            f"{r.lat.mean():.3f}",
            f"{r.rel.mean():.3f}",
            f"{float(interp_frontier(*hull_curve(static, 'dense_relative', np.arange(n)), [r.lat.mean()])[0]):.3f}",
            f"{r.raw.mean():.3f}",
        ]
        for r in fitted_runs
    ]
    fit_tab = markdown_table(
        ["rule (threshold fitted on train)", "test latency ÷ dense", "agreement", "static hull there", "raw"], fit_rows
    )
    risk_tab = risk_table(risk_records)
    best = _verdict(rows_h)
    cv_round = {k_: round(v, 4) if isinstance(v, float) else v for k_, v in cv_losses.items()}
    body = (
        f"Model `{args.model}`, task mix `{args.task}`, {args.threads} threads, "
        + (
            f"exit maps `{args.exit_maps}` (every exit and static plan below the top reads through them). "
            if args.exit_maps
            else "no exit maps (the logit lens). "
        )
        + f"Rules and ceiling fitted on "
        f"{len(train.item_ids)} train inputs (measured latency); evaluated on {n} held-out test inputs with measured "
        f"latency, every static plan and the staged pass interleaved per input; "
        + (
            f"the measurements are those `{source}` saved under reports/ (re-fitted with `--from-reports`, nothing "
            f"timed again). "
            if source is not None
            else f"each run timed with "
            f"{args.timing_threads} thread{'s' if args.timing_threads != 1 else ''}, best of {args.rounds} rounds, and "
            f"latency ÷ dense is over the dense plan's best round on the same input"
            + (f" (the inputs shared among {args.workers} worker processes)" if args.workers > 1 else "")
            + ". "
        )
        + f"The staged env runs {test.groups} groups after a "
        f"{k}-layer probe and reads the answer after each (LM-head rows of the choices' tokens only). Fitted "
        f"in {time.perf_counter() - t0:.0f}s in all, {test_s:.0f}s of it on test.\n\n"
        f"{headline_markdown(rows_h)}\n\n{best}\n\n"
        f"**Iso-quality**\n\n{iso}\n\n"
        f"**Thresholds fitted on train for a target latency, applied to test**\n\n{fit_tab}\n\n"
        f"**Risk-controlled stop (Learn-then-Test, ε = {RISK_EPSILON}, calibrated on the train inputs; the stop "
        "classifier is fitted on half of them and certified on the other half)**\n\n"
        f"{risk_tab}\n\n"
        f"**The readout by depth (test inputs)**: the answer read after each group, against the dense answer\n\n"
        f"{readout_table(test, k, groups_layers, classifiers[0].agreement(test) if classifiers else None)}\n\n"
        f"Learnable ceiling: cross-validated log-loss of each candidate model (the lowest is used) "
        f"{json.dumps(cv_round)}.\n\n"
        f"**Every operating point**\n\n{summary_table(static + calm[::3] + ceiling[::3] + fitted_runs)}\n\n"
        + ("" if args.quick else f"![Pareto](reports/bench_staged_{args.task}{tag}.png)\n")
    )
    maps = f", exit maps {args.exit_maps}" if args.exit_maps else ""
    title = f"Staged exits vs static pruning ({args.model}, {args.task}{maps})"
    BENCH.publish(args, title, body)
    if not (args.quick or args.no_write):
        pareto_plot(
            static,
            {**families, "fitted": fitted_runs},
            REPO_ROOT / "reports" / f"bench_staged_{args.task}{tag}.png",
            title=f"Staged exits vs static pruning ({args.model}, {args.task}, {n} test inputs)",
        )
        if source is None:  # re-fitting leaves the measurements as they were
            train.save(REPO_ROOT / "reports" / f"staged_train_{args.task}{tag}.npz")
            test.save(REPO_ROOT / "reports" / f"staged_test_{args.task}{tag}.npz")
        atomic_write_json(
            REPO_ROOT / "reports" / f"bench_staged_{args.task}{tag}.json",
            {
                "command": BENCH.command(argv if argv is not None else sys.argv[1:]) if source is None else source,
                **({"refitted_by": BENCH.command(argv if argv is not None else sys.argv[1:])} if source else {}),
                "headline": rows_h,
                "static": [r.summary() for r in static],
                "static_per_input": {r.name: r.columns() for r in static},
                "risk": [
                    {"delta": d, **({"score": score, "refused": rc} if isinstance(rc, str) else rc.to_dict())}
                    for score, _, d, rc in rules.certifications()
                ],
            },
        )


def _verdict(rows: list[dict[str, Any]]) -> str:
    """The goal's check: best staged rule or ceiling ≥ hull + 0.05 with the CI above zero at both targets."""
    out = []
    for t in TARGETS:
        cands = [
            r
            for r in rows
            if r["scoring"] == "dense_relative"
            and r["target_latency"] == t
            and r["controller"] not in ("static hull (StaticMix)", "oracle (hindsight)", "hindsight exit (oracle)")
        ]
        good = [r for r in cands if np.isfinite(r["vs_hull"])]
        if not good:
            out.append(f"at {t:.0%}: no staged rule reaches it → **not met**")
            continue
        b = max(good, key=lambda r: r["vs_hull"])
        met = b["vs_hull"] >= 0.05 and b["vs_hull_ci95"][0] > 0
        ci = b["vs_hull_ci95"]
        out.append(
            f"at {t:.0%}: best is {b['controller']} at {b['vs_hull']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
            f"→ **{'met' if met else 'not met'}**"
        )
    return "Goal (best staged rule ≥ static hull + 0.05, CI above zero): " + "; ".join(out) + "."


if __name__ == "__main__":
    main()
