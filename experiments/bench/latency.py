"""Latency fractions that hold on a shared machine: quiet, beside a second busy process, shared among workers.

Usage: ``python -m experiments.bench.latency [--quick] [--inputs 40] [--task mc] [--timing-threads 1] [--rounds 2]
[--workers 2]``.

The evaluation's static sweep (:func:`agents.evaluation.sweep`, every plan of
:func:`agents.evaluation.default_candidates` on every input, interleaved in a shuffled order) runs
on the same held-out inputs: once on a quiet machine in one process, once while a second process
keeps a core busy (a Python busy loop, started before the sweep and stopped after it), and once
with the inputs shared among ``--workers`` processes that time at once (the evaluation's default,
:func:`agents.evaluation.workers_for`: one per timing thread's worth of cores; skipped at 1). It runs with the
evaluation's timing settings (:func:`agents.evaluation.timing_settings`: each run timed with
``--timing-threads`` PyTorch threads, each plan's best of ``--rounds`` interleaved rounds per input)
unless told otherwise, and reads each run's latency fractions with three estimators:

- **paired best-of-rounds** (what the evaluation reports): per input, the plan's best round over
  the dense plan's best round on the same input, averaged over inputs;
- **ratio of means**: the plan's mean seconds over the dense plan's mean seconds;
- **single dense timing** (what the evaluation reported first): per input, the plan's first timing
  over one dense timing per input taken when the input was first drawn.

The table gives each estimator's fractions in the quiet and loaded conditions and how far they
moved, and the evaluation's fractions with the inputs shared among workers; the goal is that the
evaluation's fractions move by at most 3% when the second process runs, and when workers share the
inputs. Each setting of ``--timing-threads`` and ``--rounds`` writes its own section.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

from agents.evaluation import (
    default_candidates,
    evaluation_env,
    sweep,
)
from experiments.bench.harness import Benchmark
from experiments.cli import add_timing_arguments, timing_arguments
from experiments.report import markdown_table

BENCH = Benchmark("experiments.bench.latency", __doc__, threads=2)
TITLE = "Latency fractions on a shared machine"
GOAL = 0.03


def _sweep(args: Any, workers: int = 1) -> tuple[list[Any], float]:
    from envs import base

    with base._LOCK:  # a fresh dense timing per input in each condition, as a fresh evaluation takes
        base._DENSE.clear()
    env = evaluation_env(
        model=args.model,
        task=args.task,
        split="test",
        n_items=args.inputs,
        env_kwargs={"threads": args.threads},
        timing_threads=args.timing_threads,
    )
    t0 = time.perf_counter()
    static, _, _ = sweep(env, default_candidates(), len(env.items), seed=0, rounds=args.rounds, workers=workers)
    return static, time.perf_counter() - t0


ESTIMATORS = {
    "paired best-of-rounds": lambda r: float(r.lat.mean()),
    "ratio of means": lambda r: r.extra["latency_fraction_ratio_of_means"],
    "single dense timing": lambda r: r.extra["latency_fraction_single_dense"],
}


def main(argv: list[str] | None = None) -> None:
    """Sweep quiet, sweep loaded, print and write the comparison."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model (default: embedded)")
    p.add_argument("--task", default="mc", help="task mix (default: mc)")
    p.add_argument("--inputs", type=int, default=40, help="held-out test inputs per condition (default: 40)")
    add_timing_arguments(p, workers_note=" in the third condition (skipped at 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 inputs; writes nothing")
    args = BENCH.parse(p, argv)
    if args.quick:
        args.inputs = 3
        args.no_write = args.no_write or args.output is None
    if args.inputs < 2:
        p.error("--inputs must be >= 2")
    args.rounds, args.timing_threads, args.workers = timing_arguments(p, args)
    args.workers = min(args.workers, args.inputs)
    quiet, quiet_s = _sweep(args)
    burner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    try:
        time.sleep(1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded, loaded_s = _sweep(args)
    finally:
        burner.kill()
        burner.wait()
    sharded, sharded_s = _sweep(args, args.workers) if args.workers > 1 else (None, 0.0)
    shared = [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "cores busy" in str(w.message)
    ]
    rows, moved = [], {k: [] for k in ESTIMATORS}
    moved_sharded = []
    for i, (q, lo) in enumerate(zip(quiet, loaded, strict=True)):
        row = [q.name, f"{np.median(q.latency_s) * 1e3:.1f} / {np.median(lo.latency_s) * 1e3:.1f}"]
        for k, f in ESTIMATORS.items():
            a, b = f(q), f(lo)
            moved[k].append(b / a - 1)
            row.append(f"{a:.3f} / {b:.3f} ({b / a - 1:+.1%})")
        if sharded is not None:
            a, b = ESTIMATORS[next(iter(ESTIMATORS))](q), ESTIMATORS[next(iter(ESTIMATORS))](sharded[i])
            moved_sharded.append(b / a - 1)
            row.append(f"{a:.3f} / {b:.3f} ({b / a - 1:+.1%})")
        rows.append(row)
    first = next(iter(ESTIMATORS))
    heads = ["plan", "p50 ms, best round (quiet / loaded)", *(f"{k}: quiet / loaded" for k in ESTIMATORS)]
    if sharded is not None:
        heads.append(f"{first}: quiet / {args.workers} workers")
    table = markdown_table(heads, rows)
    worst = {k: float(np.max(np.abs(v))) for k, v in moved.items()}
    worst_sharded = float(np.max(np.abs(moved_sharded))) if moved_sharded else float("nan")
    ok = worst[first] <= GOAL and (sharded is None or worst_sharded <= GOAL)
    verdict = "met" if ok else "not met"
    tt = args.timing_threads
    body = (
        f"Model `{args.model}`, task mix `{args.task}`, {len(quiet[0].raw)} test inputs; {len(quiet)} static plans "
        f"interleaved per input; each run timed with {tt} thread{'s' if tt != 1 else ''} (the forward otherwise "
        f"{args.threads}), best of {args.rounds} round{'s' if args.rounds != 1 else ''} per input. Quiet sweep "
        f"{quiet_s:.0f}s; loaded sweep {loaded_s:.0f}s (a second process running a Python busy loop on the same "
        "machine throughout)"
        + (
            f"; sweep shared among {args.workers} worker processes {sharded_s:.0f}s (each timing its inputs at "
            "the same time as the others, nothing else running)"
            if sharded is not None
            else ""
        )
        + ". The sweep's free-core check "
        + (f"warned under load: _{shared[0]}_" if shared else "did not warn under load")
        + ".\n\n"
        f"{table}\n\n"
        "Largest move of a plan's latency fraction under load: "
        + ", ".join(f"{k} {v:.1%}" for k, v in worst.items())
        + (
            f"; with {args.workers} workers sharing the inputs ({first}): {worst_sharded:.1%}, mean "
            f"{float(np.mean(moved_sharded)):+.1%}"
            if sharded is not None
            else ""
        )
        + f". Goal ({first} ≤ {GOAL:.0%}"
        + (", under load and with workers" if sharded is not None else "")
        + f"): **{verdict}**.\n"
    )
    title = f"{TITLE} ({tt} timing thread{'s' if tt != 1 else ''}, best of {args.rounds})"
    BENCH.publish(args, title, body)


if __name__ == "__main__":
    main()
