"""Replay benchmark: a replay twin's steps/s against the live env's, the cost of recording, the full comparison.

Usage::

    python -m experiments.bench.replay steps --dataset outputs/record/PerInput-smollm2-135m
    python -m experiments.bench.replay record --dataset outputs/record/PerInput-smollm2-135m
    python -m experiments.bench.replay comparison --dataset outputs/record/PerInput-smollm2-135m

``steps``: the replay twin (``PruneGym/PerInputDiscreteReplay-v0`` on the dataset's test split) and
the live environment it was recorded from (the same env id and settings, calibrated cost), each
stepping random actions (``reset`` + ``step``, one episode per step), timed in interleaved blocks so
that load from elsewhere hits both alike. One torch thread by default: the goal is steps/s on one core.

``record``: the recording's cost on this machine, two ways: a fresh recording of a few inputs (every
path, the card's repeats), timed per input with the model already loaded; and the whole dataset's
own figures (its card's recording time, inputs and shard bytes).

``comparison``: every algorithm × seeds on the dataset's replay twin at one equal env-step budget
(``experiment=replay``: 100k env steps, equal tuning trials), as one Hydra multirun, timed; then
``experiments.compare`` (IQM table with stratified-bootstrap CIs, references), and the best run
exported with its replay claims and re-validated live (``experiments.validate``'s check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.bench.harness import Benchmark, summarize
from experiments.report import markdown_table

BENCH = Benchmark(
    "experiments.bench.replay",
    __doc__,
    threads=1,
    threads_help="this process's; a live env takes the LLM threads its recording was made with",
)
ALGOS = ("ppo", "appo", "impala", "sac", "dqn", "linucb")
STEPS_GOAL = 20_000  # replay steps/s on one core (issue goal)
WALL_GOAL_MIN = 15.0  # the full comparison's wall time on 2 cores (issue goal)


def _split_folder(dataset: Path, split: str) -> Path:
    """The recording of ``split`` inside ``dataset`` (a folder of splits), or ``dataset`` itself."""
    return dataset / split if (dataset / split / "card.json").is_file() else dataset


def _step_block(env: Any, n: int, rng: np.random.Generator) -> list[float]:
    """Seconds of each of ``n`` one-step episodes (``reset`` + ``step`` of a random action, drawn beforehand).

    The env is seeded once, by the first block's first reset, as a training loop seeds it.
    """
    actions = rng.integers(env.action_space.n, size=n).tolist()
    out = []
    for a in actions:
        t0 = time.perf_counter()
        env.reset()
        env.step(a)
        out.append(time.perf_counter() - t0)
    return out


def run_steps(args: argparse.Namespace) -> None:
    """Replay vs live steps/s, interleaved blocks."""
    import gymnasium as gym
    import torch

    from envs import make_env, replay_id
    from envs.data.records import read_card

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = _split_folder(args.dataset, args.split)
    card = read_card(folder)
    twin = replay_id(card["env"]["env"])
    replay = gym.make(twin, dataset=str(folder), latency="median", disable_env_checker=True)
    live_kwargs = {**card["env_kwargs"], "cost": "calibrated"}  # as recorded, LLM threads included
    live = make_env(card["env_id"], **live_kwargs)
    replay.reset(seed=args.seed)
    live.reset(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    _step_block(replay, 100, rng)  # warm: first look-ups, lazy imports
    _step_block(live, 2, rng)
    times: dict[str, list[float]] = {"replay": [], "live": []}
    rates: dict[str, list[float]] = {"replay": [], "live": []}
    for _ in range(args.rounds):
        for name, env, n in (("replay", replay, args.replay_steps), ("live", live, args.live_steps)):
            block = _step_block(env, n, rng)
            times[name] += block
            rates[name].append(n / sum(block))
    replay.close()
    live.close()
    rows = []
    for name in ("replay", "live"):
        r, t = summarize(rates[name]), summarize(times[name])
        rows.append([name, t.n, f"{r.p50:,.1f}", f"{t.p50 * 1e6:,.1f}", f"{t.p95 * 1e6:,.1f}"])
    ratio = summarize([a / b for a, b in zip(rates["replay"], rates["live"], strict=True)])
    model = card["env"]["model"]["name"]
    goal = "met" if summarize(rates["replay"]).p50 >= STEPS_GOAL else "**not met**"
    body = (
        f"`{card['env_id']}` on `{model}` ({card['env_kwargs'].get('task')} mix, {card['env_kwargs'].get('split')} "
        f"split, {len(card['shards'])} shards) against its twin `{twin}` "
        f"(median latency). Each step is a one-step episode (`reset` + random `step`); {args.rounds} interleaved "
        f"rounds of {args.replay_steps} replay and {args.live_steps} live steps. The twin runs no torch (one "
        f"Python thread); the live env has the recording's settings (LLM threads {live_kwargs.get('threads')}).\n\n"
        + markdown_table(["env", "steps timed", "steps/s (median of rounds)", "p50 µs/step", "p95 µs/step"], rows)
        + f"\n\nReplay is **{ratio.p50:,.0f}×** the live env's steps/s (median over rounds, p95 {ratio.p95:,.0f}×). "
        f"Goal ≥ {STEPS_GOAL:,} replay steps/s on one core: {goal}."
    )
    BENCH.publish(args, "Replay: steps per second", body)


def run_record(args: argparse.Namespace) -> None:
    """A fresh recording of a few inputs, per input; and the dataset card's own figures."""
    from envs import make_env
    from envs.data.records import read_card
    from envs.record import check_recordable, record_input

    rows = []
    cards = []
    for split in args.splits:
        folder = _split_folder(args.dataset, split)
        if (folder / "card.json").is_file():
            cards.append((split, read_card(folder)))
    if not cards:
        raise SystemExit(f"no recording under {args.dataset} (looked for {', '.join(args.splits)})")
    split, card = cards[0]
    env = make_env(card["env_id"], **card["env_kwargs"])  # as recorded, LLM threads included
    try:
        paths = check_recordable(env.unwrapped)
        record_input(env.unwrapped, 0, repeats=1, seed=0)  # warm
        per_input = []
        for i in range(1, 1 + args.items):
            t0 = time.perf_counter()
            record_input(env.unwrapped, i, repeats=int(card["repeats"]), seed=0)
            per_input.append(time.perf_counter() - t0)
    finally:
        env.close()
    s = summarize(per_input)
    fresh = (
        f"Fresh recording here: {args.items} inputs of `{card['env_id']}` on `{card['env']['model']['name']}` "
        f"({paths} paths per input, {card['repeats']} timed repeats each, LLM threads "
        f"{card['env_kwargs'].get('threads')}, model loaded): "
        f"median {s.p50:.2f} s per input (p95 {s.p95:.2f} s), **{60.0 * paths / s.p50:,.1f} inputs × actions per "
        f"minute**."
    )
    for split, c in cards:
        inputs = sum(len(sh["inputs"]) for sh in c["shards"])
        size = sum(int(sh["bytes"]) for sh in c["shards"])
        elapsed, timed = c.get("elapsed_s"), c.get("elapsed_inputs")
        rate = f"{60.0 * timed * c['paths_per_input'] / elapsed:,.1f}" if elapsed and timed else "—"
        rows.append(
            [
                split,
                f"{inputs}/{c['inputs_planned']}",
                c["paths_per_input"],
                c["repeats"],
                f"{elapsed / 60:.1f} ({timed} inputs)" if elapsed and timed else "—",
                rate,
                f"{size / 1e6:.3f}",
                f"{size / max(inputs, 1) / 1e3:.2f}",
                ", ".join(c["machine"] if isinstance(c["machine"], list) else [str(c["machine"])]),
            ]
        )
    table = markdown_table(
        [
            "split",
            "inputs recorded/planned",
            "paths",
            "repeats",
            "recording min (inputs timed)",
            "inputs × actions / min",
            "MB on disk",
            "kB / input",
            "machine",
        ],
        rows,
    )
    body = (
        f"{fresh}\n\nThe dataset `{args.dataset}` as recorded (`experiments.record`; wall time from its card's "
        f"`elapsed_s` over the `elapsed_inputs` it covers, everything after the first environment was built; — "
        f"where the card does not time the recording; shards in Parquet):\n\n{table}"
    )
    BENCH.publish(args, "Replay: recording cost", body)


def run_comparison(args: argparse.Namespace) -> None:
    """The multirun, timed; the comparison; the best run exported with claims and validated live."""
    from agents.export import export_from_path
    from experiments.compare import compare
    from experiments.validate import validate_one

    sweep = (args.sweep_dir or Path("outputs") / "replay-comparison" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    seeds = ",".join(str(s) for s in range(args.seeds))
    overrides = [
        "experiment=replay",
        "env=per_input_replay",
        f"env.kwargs.dataset={args.dataset.resolve()}",
        f"algo={','.join(args.algos)}",
        f"seed={seeds}",
        f"stop.env_steps={args.env_steps}",
        f"hydra.sweep.dir={sweep}",
        *args.overrides,
    ]
    command = [sys.executable, "-m", "experiments.train", "-m", *overrides]
    print("running:", " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - t0
    summary = compare(sweep)
    per_algo = {}
    for key, entry in summary["algorithms"].items():
        walls = []
        for run in entry["per_run"]:
            final = json.loads((Path(run["run_dir"]) / "final.json").read_text())
            walls.append(float(final["train"]["wall_s"]))
        per_algo[key] = walls
    best = summary["best"]
    check = None
    if best is not None and not args.no_validate:
        out = sweep / "best-controller"
        export_from_path(best["run_dir"], out, force=True, claims_dataset=args.dataset, claims_split="test")
        check = validate_one(out, None, None, split="test", repeats=args.repeats, accuracy_tol=0.02, latency_tol=0.05)
        (sweep / "best-validation.json").write_text(json.dumps(check, indent=1))
    time_rows = [[k, len(w), f"{summarize(w).p50:.0f}", f"{sum(w) / 60:.1f}"] for k, w in sorted(per_algo.items())]
    goal = "met" if wall / 60 <= WALL_GOAL_MIN else "**not met**"
    lines = [
        f"{len(args.algos)} algorithms × {args.seeds} seeds at {args.env_steps:,} env steps each on the replay twin "
        f"of `{args.dataset}`, one Hydra multirun sharing one Ray (`experiment=replay`), OMP_NUM_THREADS=1. "
        f"Multirun written to `{sweep}`.",
        f"**Wall time {wall / 60:.1f} min** for the whole multirun (goal ≤ {WALL_GOAL_MIN:.0f} min on 2 cores: "
        f"{goal}). Training time per run (from each run's `final.json`, Ray start and evaluation excluded):",
        markdown_table(["algorithm", "runs", "median s / run", "total min"], time_rows),
        summary["markdown"].split("\n", 2)[2].replace("Learning curves", "Learning curves (in the multirun folder)"),
    ]
    if check is not None:
        a, lat = check["accuracy"], check["latency_fraction"]
        lines.append(
            f"Best run ({best['algorithm']}, seed {best['seed']}, held-out reward {best['reward']:.4f}) exported with "
            f"its replay claims and re-validated live on the {check['inputs']} recorded test inputs "
            f"({args.repeats} rounds each): accuracy claimed {a['claimed']:.3f} / live {a['measured']:.3f} "
            f"({a['difference']:+.3f}), latency fraction claimed {lat['claimed']:.3f} / live {lat['measured']:.3f} "
            f"({lat['relative_difference']:+.1%}): the claim **{'holds' if check['ok'] else 'does not hold'}** "
            "(accuracy within 0.02, latency within 5%)."
        )
    BENCH.publish(args, "Replay: algorithm comparison", "\n\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = BENCH.parser(subcommands=True)
    sub = parser.add_subparsers(dest="what", required=True)
    p = BENCH.subcommand(sub, "steps", help="replay twin vs live env steps/s, side by side")
    p.add_argument("--dataset", type=Path, required=True, help="a PerInput recording (a folder of splits or one)")
    p.add_argument("--split", default="test", help="the split stepped (default: test)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--replay-steps", type=int, default=20_000, help="replay steps per round")
    p.add_argument("--live-steps", type=int, default=10, help="live env steps per round")
    p.add_argument("--seed", type=int, default=0, help="seed of the actions and inputs")
    p.set_defaults(run=run_steps)
    p = BENCH.subcommand(sub, "record", help="inputs × actions recorded per minute, and the size on disk")
    p.add_argument("--dataset", type=Path, required=True, help="a recording (a folder of splits or one)")
    p.add_argument("--splits", nargs="+", default=["train", "test"], help="the splits reported")
    p.add_argument("--items", type=int, default=4, help="inputs recorded afresh and timed")
    p.set_defaults(run=run_record)
    p = BENCH.subcommand(sub, "comparison", help="every algorithm × seeds on the twin, timed, with live validation")
    p.add_argument("--dataset", type=Path, required=True, help="a folder with train/ and test/ recordings")
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS, help="algorithms compared")
    p.add_argument("--seeds", type=int, default=5, help="seeds per algorithm (0..N-1)")
    p.add_argument("--env-steps", type=int, default=100_000, help="env steps per run")
    p.add_argument("--sweep-dir", type=Path, help="the multirun folder (default: outputs/replay-comparison/<date>)")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per input in the live validation")
    p.add_argument("--no-validate", action="store_true", help="skip the export and live validation of the best run")
    p.add_argument("overrides", nargs="*", help="further Hydra overrides for the training jobs (key=value)")
    p.set_defaults(run=run_comparison)
    args = BENCH.parse(parser, argv)
    args.run(args)


if __name__ == "__main__":
    main()
