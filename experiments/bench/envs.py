"""Environment benchmark: env overhead over the bare pruned run, steps/s, and the probe's cost.

Usage: ``python -m experiments.bench.envs [--items 6] [--repeats 3] [--steps 20] [--threads 1] [--model smollm2-135m]``.

One thread by default: on a shared 2-core machine a second PyTorch thread competes with every
other process and makes timings swing several-fold (a 64-token forward of the embedded model took
0.38 s on one thread and 1.7-4.8 s on two while the machine was loaded).

Three figures, on the embedded model and a mix of real and generated tasks:

1. **Env overhead.** For each item and plan, ``reset`` + ``step`` of ``PerInput`` (calibrated
   cost) against the bare work the same plan needs without an environment: the task scorer's
   :meth:`~envs.tasks.scoring.Scorer.score` from scratch (prompt forward + continuation forward),
   and against the bare prompt forward alone. Timed round-robin (env and bare alternate in a
   shuffled order each repeat), median per (item, plan), then the median and p95 of the ratios.
2. **Steps per second** of every environment with random actions, calibrated and measured cost.
3. **Probe cost**: the probe (its layers + features) against a dense prompt forward, per item.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.harness import Benchmark, summarize, time_round_robin
from experiments.report import markdown_table

BENCH = Benchmark(
    "experiments.bench.envs",
    __doc__,
    threads=1,
    threads_help="a second thread competes with every other process on a shared 2-core machine",
)
TITLE = "Environments"
MIX = {
    "gensim/polarity:2shot": 1.0,
    "gensim/news": 1.0,
    "gen/kv-4": 1.0,
    "gen/add-3:mc": 1.0,
    "gen/copy-6": 1.0,
}
ACTIONS = {
    "dense": [1.0] * 9,
    "uniform 0.75": [0.75] * 9,
    "skip late layers": [1, 1, 1, 1, 0.75, 0.75, 0.5, 0.75, 0.5],
}


def overhead(
    env: Any, n_items: int, repeats: int, rng: random.Random
) -> tuple[list[list[Any]], dict[str, list[float]]]:
    """Env reset+step vs the bare scorer and the bare prompt forward, per (item, plan)."""
    from envs.tasks.scoring import Scorer

    slm = env.slm
    scorer = Scorer()
    ratios: dict[str, list[float]] = {"scorer": [], "forward": [], "step_vs_scorer": []}
    per_plan: dict[str, dict[str, list[float]]] = {a: {"scorer": [], "forward": []} for a in ACTIONS}
    for i in range(min(n_items, len(env.items))):
        item = env.items[i]
        ids = torch.tensor([scorer.encode(slm, item.prompt)])
        dense_ref = scorer.dense_reference(slm, item)
        for name, a in ACTIONS.items():
            action = np.asarray(a, dtype=np.float32)
            plan = env.builder.plan(action.reshape(-1, 3))
            step_times: list[float] = []

            def env_run(action: np.ndarray = action, i: int = i, step_times: list[float] = step_times) -> None:
                env.reset(options={"item": i})
                t0 = time.perf_counter()
                env.step(action)
                step_times.append(time.perf_counter() - t0)

            fns = {
                "env": env_run,
                "scorer": lambda item=item, plan=plan, ref=dense_ref: scorer.score(slm, item, plan, ref),
                "forward": lambda ids=ids, plan=plan: slm.forward(ids, plan, logits="last"),
            }
            with torch.no_grad():
                t = time_round_robin(fns, 1, repeats, rng)
            env_med = summarize(t["env"]).p50
            for k in ("scorer", "forward"):
                r = env_med / summarize(t[k]).p50
                ratios[k].append(r)
                per_plan[name][k].append(r)
            ratios["step_vs_scorer"].append(summarize(step_times[1:]).p50 / summarize(t["scorer"]).p50)
    rows = [
        [name, f"{summarize(v['scorer']).p50:.3f}", f"{summarize(v['forward']).p50:.3f}"]
        for name, v in per_plan.items()
    ]
    return rows, ratios


def steps_per_second(make: Callable[[], Any], steps: int, seed: int = 0) -> tuple[float, float, float]:
    """Random-action steps/s and episodes/s over at least ``steps`` steps and two whole episodes, and p95 s/step.

    One warm-up reset per item first: dense references (once per item) are not part of the rate.
    """
    env = make()
    env.action_space.seed(seed)
    u = env.unwrapped
    for i in range(len(u.items)):
        env.reset(options={"item": i})
    env.reset(seed=seed)
    times: list[float] = []
    episodes = 0
    while len(times) < steps or episodes < 2:
        t0 = time.perf_counter()
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
            episodes += 1
        times.append(time.perf_counter() - t0)
    env.close()
    total = sum(times)
    return len(times) / total, episodes / total, summarize(times).p95


def probe_cost(env: Any, n_items: int, repeats: int, rng: random.Random) -> list[float]:
    """Probe time over a dense prompt forward, per item (median of round-robin repeats)."""
    slm, out = env.slm, []
    for i in range(min(n_items, len(env.items))):
        ids = torch.tensor([env.scorer.encode(slm, env.items[i].prompt)])
        with torch.no_grad():
            t = time_round_robin(
                {
                    "probe": lambda ids=ids: env.probe.run(ids),
                    "dense": lambda ids=ids: slm.forward(ids, None, logits="last"),
                },
                1,
                repeats,
                rng,
            )
        out.append(summarize(t["probe"]).p50 / summarize(t["dense"]).p50)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the BENCHMARKS.md section."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model name, folder or hub id (default: embedded)")
    p.add_argument("--items", type=int, default=6, help="items for the overhead and probe figures")
    p.add_argument("--repeats", type=int, default=3, help="round-robin repeats per (item, plan) and per probe item")
    p.add_argument("--steps", type=int, default=20, help="random steps per environment for steps/s")
    p.add_argument("--cost-model", default=None, help="calibration file (default: the device's, else a quick fit)")
    args = BENCH.parse(p, argv)

    import gymnasium as gym

    import envs  # registers the ids
    from envs.base import shared_lm
    from envs.measure.cost_model import default_path

    slm = shared_lm(args.model, threads=args.threads)
    path = Path(args.cost_model) if args.cost_model else default_path(slm, str(slm.device))
    note = f"calibration: `{path.name}`"
    if not path.is_file():
        path = Path(tempfile.mkdtemp()) / "quick_cost_model.json"
        note = "calibration: a quick fit made by the benchmark (`calibrate_cost=True`; no device file existed)"
    common = {
        "threads": args.threads,
        "model": args.model,
        "task": MIX,
        "n_items": 40,
        "cost_model": str(path),
        "calibrate_cost": True,
    }
    rng = random.Random(0)

    t0 = time.perf_counter()
    env = gym.make(envs.env_id("PerInput"), **common).unwrapped
    print(f"env ready in {time.perf_counter() - t0:.1f}s ({len(env.items)} items); {note}", flush=True)
    plan_rows, ratios = overhead(env, args.items, args.repeats, rng)
    probe = probe_cost(env, args.items, args.repeats, rng)
    print("overhead done", flush=True)

    rates = []
    for name, discrete in (
        ("PerInput", False),
        ("PerInput", True),
        ("LayerByLayer", False),
        ("LayerByLayer", True),
        ("PerToken", False),
        ("PerToken", True),
    ):
        row = [f"`{envs.env_id(name, discrete=discrete)}`"]
        for measured in (False, True):
            env_id = envs.env_id(name, discrete=discrete, measured=measured)
            kw = dict(common, n_items=8)
            rate, eps, p95 = steps_per_second(lambda env_id=env_id, kw=kw: gym.make(env_id, **kw), args.steps)
            row += [f"{rate:.1f}", f"{eps:.2f}", f"{p95 * 1e3:.0f}"]
            print(env_id, f"{rate:.2f} steps/s", flush=True)
        rates.append(row)

    summary = markdown_table(
        ["figure", "median", "p95", "n"],
        [
            [label, f"{s.p50:.3f}", f"{s.p95:.3f}", s.n]
            for label, s in (
                (
                    "PerInput reset+step / bare scorer (prompt + continuation forward, same plan)",
                    summarize(ratios["scorer"]),
                ),
                (
                    "PerInput reset+step / bare prompt forward alone (scoring needs a second, continuation forward)",
                    summarize(ratios["forward"]),
                ),
                ("PerInput step alone (the probe's layers reused) / bare scorer", summarize(ratios["step_vs_scorer"])),
                (f"probe ({env.probe.layers} layers + features) / dense prompt forward", summarize(probe)),
            )
        ],
    )
    per_plan = markdown_table(["plan (PerInput action)", "env / bare scorer", "env / bare forward"], plan_rows)
    rate_table = markdown_table(
        [
            "env",
            "calibrated steps/s",
            "episodes/s",
            "p95 ms/step",
            "measured steps/s",
            "episodes/s",
            "p95 ms/step",
        ],
        rates,
    )
    body = (
        f"Model `{args.model}`, {args.threads} PyTorch thread(s), task mix "
        f"{', '.join(f'`{t}`' for t in MIX)} (validation split); {note}. "
        f"Overhead: {args.items} items x {len(ACTIONS)} plans, {args.repeats} round-robin repeats each, median per "
        "pair; ratios of medians measured side by side. The bare scorer is the same scoring work without an "
        "environment (it runs the probe layers itself); target <= 1.05.\n\n"
        f"{summary}\n\nBy plan (median over items):\n\n{per_plan}\n\n"
        f"Random actions, at least {args.steps} steps and two whole episodes per environment, after one warm-up "
        "reset per item (LayerByLayer runs the model only at an episode's last step, so its episodes/s is the "
        "comparable figure); the measured variants time one run per step (default meter settings):\n\n"
        f"{rate_table}\n"
    )
    BENCH.publish(args, TITLE, body)


if __name__ == "__main__":
    main()
