"""Training benchmark: time and memory per iteration of every algorithm on PerInput, and PPO vs the best static plan.

``python -m experiments.bench.train`` (embedded SmolLM2-135M) or ``--quick`` (the tiny random model).

- For each algorithm (PPO, APPO, IMPALA, SAC on ``PerInput``; DQN and LinUCB on ``PerInputDiscrete``)
  and each cost source (calibrated, measured): wall time per training iteration (64 one-step episodes)
  as median and p95 over the iterations after the first (which includes building the algorithm), and
  the peak resident memory of this process plus its Ray workers while it trained (sampled every 50 ms).
- PPO against the best static plan: every preset plan of the discrete variant applied to every input
  is a static plan; the best one's mean reward over ``--static-episodes`` training-split episodes is
  the target. PPO trains (calibrated cost) for at most ``--ppo-time`` seconds; the table reports when
  its per-iteration training reward first reached the target, or that it did not.

Writes the ``Training`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.bench.harness import Benchmark, summarize
from experiments.report import markdown_table

BENCH = Benchmark("experiments.bench.train", __doc__)
TITLE = "Training"
ALGOS = (("ppo", ""), ("appo", ""), ("impala", ""), ("sac", ""), ("dqn", "Discrete"), ("linucb", "Discrete"))


class PeakRss:
    """Peak RSS of this process and its children (Ray workers), sampled in a thread."""

    def __init__(self, period: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - a worker that just exited
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.period)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _cfg(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from experiments.train import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=overrides)


def base_overrides(args: argparse.Namespace, cost: str, variant: str) -> list[str]:
    """Env overrides: the embedded model's PerInput, or the tiny config with --quick."""
    env = "tiny" if args.quick else "per_input"
    out = [f"env={env}", f"env.id=PruneGym/PerInput{variant}-v0", f"env.kwargs.cost={cost}"]
    if not args.quick:
        out.append("env.kwargs.calibrate_cost=true")  # fits the device's cost model once if it is missing
    return out


def time_algorithms(args: argparse.Namespace, root: Path) -> list[list[Any]]:
    """Per-iteration wall time and peak memory for each algorithm and cost source."""
    from experiments.train import train

    rows = []
    for cost in ("calibrated", "measured"):
        for algo, variant in ALGOS:
            run_dir = root / f"{algo}-{cost}"
            cfg = _cfg(
                [*base_overrides(args, cost, variant), f"algo={algo}", f"stop.iterations={args.iters}"]
                + ["checkpoint.every=0", "eval.episodes=4", f"run_dir={run_dir}"]
            )
            with PeakRss() as mem:
                t0 = time.perf_counter()
                train(cfg)
                total = time.perf_counter() - t0
            rows_ = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            times = summarize([r["iter_time_s"] for r in rows_[1:]] or [rows_[0]["iter_time_s"]])
            rows.append(
                [
                    algo,
                    f"PerInput{variant}",
                    cost,
                    times.n,
                    f"{times.p50:.2f}",
                    f"{times.p95:.2f}",
                    f"{rows_[0]['iter_time_s']:.2f}",
                    f"{mem.peak / 2**20:.0f}",
                    f"{total:.0f}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def best_static(args: argparse.Namespace) -> tuple[float, list[float], list[float]]:
    """Mean training-split reward of every preset plan applied to every input; returns (best, rewards, preset)."""
    from agents.rllib import make_env
    from experiments.train import env_settings

    env_id, kwargs = env_settings(_cfg(base_overrides(args, "calibrated", "Discrete")))
    env = make_env(env_id, {**kwargs, "split": "train"})
    means = []
    for k in range(int(env.action_space.n)):
        total = 0.0
        for ep in range(args.static_episodes):
            env.reset(seed=ep)
            total += float(env.step(k)[1])
        means.append(total / args.static_episodes)
    presets = env.unwrapped.presets.tolist()
    env.close()
    best = int(np.argmax(means))
    return means[best], means, presets[best]


def ppo_to_static(args: argparse.Namespace, root: Path, target: float) -> dict[str, Any]:
    """Train PPO until its per-iteration training reward reaches ``target`` or ``--ppo-time`` runs out."""
    from experiments.train import train

    run_dir = root / "ppo-vs-static"
    cfg = _cfg(
        [*base_overrides(args, "calibrated", ""), "algo=ppo", "stop.iterations=null", f"stop.time_s={args.ppo_time}"]
        + ["checkpoint.every=0", "eval.episodes=16", f"run_dir={run_dir}"]
    )
    final = train(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hit = next((r for r in rows if r["reward"] >= target), None)
    return {
        "reached": hit is not None,
        "time_s": hit["wall_s"] if hit else None,
        "env_steps": hit["env_steps"] if hit else None,
        "iterations": len(rows),
        "best_iter_reward": max(r["reward"] for r in rows),
        "last_iter_reward": rows[-1]["reward"],
        "eval_reward": final.get("eval/reward"),
        "total_steps": rows[-1]["env_steps"],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the BENCHMARKS.md section."""
    parser = BENCH.parser()
    parser.add_argument("--quick", action="store_true", help="the tiny random model (seconds per algorithm)")
    parser.add_argument("--iters", type=int, default=4, help="training iterations per algorithm and cost")
    parser.add_argument(
        "--static-episodes", type=int, default=64, help="training-split episodes per preset for the best static plan"
    )
    parser.add_argument("--ppo-time", type=float, default=120.0, help="seconds PPO may train to reach the target")
    args = BENCH.parse(parser, argv)
    import ray

    from agents.rllib import WORKER_ENV_VARS

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # One Ray for every run (train() reuses it), so Ray's start-up is not counted against any algorithm.
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV_VARS)})  # fmt: skip
    try:
        rows = time_algorithms(args, root)
        target, static_means, preset = best_static(args)
        ppo = ppo_to_static(args, root, target)
    finally:
        ray.shutdown()
    model = "tiny-llama (random weights)" if args.quick else "SmolLM2-135M (embedded)"
    headers = [
        "algorithm",
        "env",
        "cost",
        "iters timed",
        "s/iter p50",
        "s/iter p95",
        "first iter s",
        "peak RSS MiB",
        "run s",
    ]
    if ppo["reached"]:
        verdict = (
            f"PPO reached it after {ppo['time_s']:.0f} s ({int(ppo['env_steps'])} env steps, "
            f"{ppo['iterations']} iterations run)."
        )
    else:
        verdict = (
            f"PPO did **not** reach it within {args.ppo_time:.0f} s ({int(ppo['total_steps'])} env steps, "
            f"{ppo['iterations']} iterations): best per-iteration reward {ppo['best_iter_reward']:.4f}, "
            f"last {ppo['last_iter_reward']:.4f}."
        )
    body = (
        f"Model: {model}; PerInput with 64 one-step episodes per iteration, learner in the driver with one "
        "thread, env in the driver (`cluster.num_env_runners=0`). Iteration times are over the iterations after "
        "the first (the first includes building the algorithm's learner and connectors); peak RSS is the highest "
        "resident memory of this process and its Ray workers sampled during that run: the runs share one process "
        "(and one model copy), so it includes what earlier runs left allocated. Ray was started once beforehand.\n\n"
        f"{markdown_table(headers, rows)}\n\n"
        f"Best static plan (preset {preset} on every input): mean reward {target:.4f} over "
        f"{args.static_episodes} training-split inputs (all presets: {', '.join(f'{m:.3f}' for m in static_means)}). "
        f"{verdict} Greedy PPO on held-out inputs after training: reward {ppo['eval_reward']:.4f}.\n"
    )
    BENCH.publish(args, TITLE, body)


if __name__ == "__main__":
    main()
