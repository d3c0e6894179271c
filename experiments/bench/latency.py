"""Latency fractions that hold on a shared machine: the static sweep, quiet and beside a second CPU-bound process.

Usage: ``python -m experiments.bench.latency [--quick] [--inputs 40] [--task mc]``.

The evaluation's static sweep (:func:`agents.evaluation.sweep`, every plan of
:func:`agents.evaluation.default_candidates` on every input, interleaved in a shuffled order) runs
twice on the same held-out inputs: once on a quiet machine, once while a second process keeps a
core busy (a Python busy loop, started before the sweep and stopped after it). Each run's latency
fractions are read with two estimators:

- **same round** (what the evaluation reports): a plan's mean seconds over the dense plan's mean
  seconds *in the same interleaved rounds*;
- **single dense timing** (what it reported before): the mean over inputs of a plan's seconds over
  one dense timing per input, taken when the input was first drawn.

The table gives both estimators' fractions in both conditions and how far each moved; the goal is
that the same-round fractions move by at most 3% when the second process runs. ``--threads``
decides whether the forward oversubscribes the cores once the second process runs (each
``--threads`` value writes its own section).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np

from agents.evaluation import default_candidates, sweep
from experiments.bench.harness import Benchmark
from experiments.report import markdown_table

BENCH = Benchmark("experiments.bench.latency", __doc__, threads=2)
TITLE = "Latency fractions on a shared machine"
GOAL = 0.03


def _sweep(args: Any) -> tuple[list[Any], float]:
    import gymnasium as gym

    import envs  # noqa: F401
    from envs import base

    with base._LOCK:  # a fresh dense timing per input in each condition, as a fresh evaluation takes
        base._DENSE.clear()
    env = gym.make(
        "PruneGym/PerInputDiscreteMeasured-v0",
        model=args.model,
        task=args.task,
        split="test",
        n_items=args.inputs,
        threads=args.threads,
    ).unwrapped
    t0 = time.perf_counter()
    static, _, _ = sweep(env, default_candidates(), len(env.items), seed=0)
    return static, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    """Sweep quiet, sweep loaded, print and write the comparison."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model (default: embedded)")
    p.add_argument("--task", default="mc", help="task mix (default: mc)")
    p.add_argument("--inputs", type=int, default=40, help="held-out test inputs per condition (default: 40)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 inputs; writes nothing")
    args = BENCH.parse(p, argv)
    if args.quick:
        args.inputs = 3
        args.no_write = args.no_write or args.output is None
    if args.inputs < 2:
        p.error("--inputs must be >= 2")
    quiet, quiet_s = _sweep(args)
    burner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    try:
        time.sleep(1.0)
        loaded, loaded_s = _sweep(args)
    finally:
        burner.kill()
        burner.wait()
    rows, moved = [], {"same round": [], "single dense timing": []}
    for q, lo in zip(quiet, loaded, strict=True):
        same_q, same_l = q.lat.mean(), lo.lat.mean()
        one_q, one_l = q.extra["latency_fraction_single_dense"], lo.extra["latency_fraction_single_dense"]
        moved["same round"].append(same_l / same_q - 1)
        moved["single dense timing"].append(one_l / one_q - 1)
        rows.append(
            [
                q.name,
                f"{np.median(q.latency_s) * 1e3:.1f} / {np.median(lo.latency_s) * 1e3:.1f}",
                f"{same_q:.3f} / {same_l:.3f} ({same_l / same_q - 1:+.1%})",
                f"{one_q:.3f} / {one_l:.3f} ({one_l / one_q - 1:+.1%})",
            ]
        )
    table = markdown_table(
        ["plan", "p50 ms (quiet / loaded)", "same round: quiet / loaded", "single dense timing: quiet / loaded"], rows
    )
    worst = {k: float(np.max(np.abs(v))) for k, v in moved.items()}
    verdict = "met" if worst["same round"] <= GOAL else "not met"
    body = (
        f"Model `{args.model}`, task mix `{args.task}`, {len(quiet[0].raw)} test inputs, {args.threads} threads; "
        f"{len(quiet)} static plans interleaved per input. Quiet sweep {quiet_s:.0f}s; loaded sweep {loaded_s:.0f}s "
        "(a second process running a Python busy loop on the same 2 cores throughout).\n\n"
        f"{table}\n\n"
        f"Largest move of a plan's latency fraction under load: same round {worst['same round']:.1%}, single dense "
        f"timing {worst['single dense timing']:.1%}. Goal (same round ≤ {GOAL:.0%}): **{verdict}**.\n"
    )
    BENCH.publish(args, f"{TITLE} ({args.threads} thread{'s' if args.threads != 1 else ''})", body)


if __name__ == "__main__":
    main()
