r"""Evaluate controllers on held-out inputs, and the Pareto study of adaptive vs static pruning.

Usage::

    python -m experiments.evaluate --controller dense --controller static:0.8,1,1 \\
        --controller outputs/main/<run>/controller            # an exported controller folder
    python -m experiments.evaluate --pareto --controller <folder> ...   # + static sweep, hull, oracle
    python -m experiments.evaluate --pareto --stop-rules --controller outputs/main/<run>/controllers/staged_dqn_lam0.5

The library behind it is :mod:`agents.evaluation` (running, the sweep, hull, oracle, headline);
the tables, files and plot come from :mod:`experiments.report`. An exported controller is
evaluated on the probe its card names, and decides with its own interface. An exported **staged**
controller (``PruneGym/Staged``) decides stage by stage in the staged environment its card
describes, and ``--stop-rules`` adds the CALM threshold, the cost-aware stop classifier and the
risk-controlled stop (fitted on the train split); all run in the sweep's staged pass, timed against
the dense plan in the same rounds (:class:`agents.staged.StagedPass`). The sweep shares the inputs
among ``--workers`` processes (one per timing thread's worth of cores by default), each input's runs
in one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.baselines import Dense, EntropyThreshold, PlanController, StaticImportance, StaticUniform
from agents.evaluation import (
    ExportedController,
    Run,
    default_candidates,
    entropy_rules,
    evaluation_env,
    headline,
    probe_kwargs,
    probe_observations,
    run_controller,
    sweep,
)
from agents.staged import RISK_DELTAS, RISK_EPSILON, STOP_FIT_ITEMS, check_risk_settings
from experiments.cli import add_timing_arguments, timing_arguments
from experiments.report import (
    headline_markdown,
    pareto_plot,
    per_task_table,
    risk_markdown,
    save_results,
    summary_table,
)


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
        name = str(ctrl.card.get("algo", path.name))
        return ExportedController(ctrl, env, name=f"{name} ({path.name})"), name
    raise ValueError(
        f"unknown controller {spec!r}: use dense, static:L,H,M (keep fractions), importance:BUDGET, "
        "entropy:THRESHOLD, or the folder of an exported controller (with card.json)"
    )


def staged_folder(spec: str) -> bool:
    """Whether ``spec`` is the folder of an exported staged controller (it decides stage by stage, not a plan)."""
    from agents.controller import read_card

    path = Path(spec)
    if not (path.is_dir() and (path / "card.json").is_file()):
        return False
    return read_card(path).get("interface", {}).get("kind") == "staged"


def staged_kwargs(args: argparse.Namespace, env: Any) -> dict[str, Any]:
    """The staged environment of the exit row and the stop rules: the evaluation's probe and data settings."""
    probe = {**probe_kwargs(env.interface.config()), "probe_prunable": False}
    data = {k: v for k, v in args.env_kwargs.items() if k in ("max_prompt_tokens", "data_seed")}
    return {**probe, "num_groups": args.staged_groups, "threads": args.threads, **data}


def staged_part(args: argparse.Namespace, env: Any, specs: Sequence[str], timing_threads: int) -> Any:
    """The staged pass of the sweep: the exit row (for the stop rules) and each exported staged controller."""
    from agents.controller import Controller
    from agents.staged import staged_pass

    kwargs = staged_kwargs(args, env)
    controllers = []
    for spec in specs:
        ctrl = Controller.from_pretrained(spec, slm=env.slm)
        name = f"{ctrl.card.get('algo', 'staged')} ({Path(spec).name})"
        controllers.append((ctrl, name, f"staged {ctrl.card.get('algo', 'controller')}"))

    def env_for(kw: dict[str, Any]) -> Any:
        return evaluation_env(
            model=args.model,
            task=args.task,
            split=args.split,
            n_items=args.n_items,
            env_kwargs=kw,
            timing_threads=timing_threads,
            env="Staged",
        )

    return staged_pass(env_for, kwargs, controllers)


def fit_rules(args: argparse.Namespace, env: Any) -> Any:
    """The stop rules, fitted on ``--fit-items`` train inputs of the staged environment (calibrated cost)."""
    from agents.staged import exit_table, fit_stop_rules

    train = evaluation_env(
        model=args.model,
        task=args.task,
        split="train",
        n_items=args.fit_items,
        env_kwargs={**staged_kwargs(args, env), "discrete": True, "calibrate_cost": True},
        cost="calibrated",
        env="Staged",
    )
    return fit_stop_rules(exit_table(train, desc="stop rules: train exit table"), args.deltas, args.epsilon)


def controller_probe(specs: Sequence[str]) -> dict[str, Any]:
    """The probe settings of the exported controllers among ``specs`` (they must agree), for the evaluation env.

    Raises:
        ValueError: Two controllers trained on different probes (evaluate them in separate runs).
    """
    from agents.controller import read_card

    found: dict[str, Any] | None = None
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and (path / "card.json").is_file():
            kw = probe_kwargs(read_card(path)["interface"])
            if found is not None and kw != found:
                raise ValueError(f"{spec} was trained on the probe {kw}, another controller on {found}: evaluate apart")
            found = kw
    return found or {}


def parser() -> argparse.ArgumentParser:
    """The command's arguments (the help text is the command's documentation)."""
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--controller",
        action="append",
        default=[],
        help="dense | static:L,H,M | importance:B | entropy:T | <exported controller folder> (a staged one decides "
        "stage by stage in the staged environment its card describes); repeat for several",
    )
    p.add_argument("--pareto", action="store_true", help="also sweep the static plans, hull and oracle, and plot")
    p.add_argument("--model", default="smollm2-135m", help="model name or folder")
    p.add_argument("--task", default="mc", help="task mix of the held-out inputs")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split")
    p.add_argument("--n-items", type=int, default=48, help="inputs to evaluate")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the LLM forward")
    add_timing_arguments(p, rounds_flag="--timing-rounds", when="with --pareto or staged entries: ")
    p.add_argument(
        "--env-kwargs",
        type=json.loads,
        default={},
        help="extra PerInput settings as JSON, e.g. '{\"probe_layers\": 1}'",
    )
    p.add_argument(
        "--stop-rules",
        action="store_true",
        help="also the staged stop rules: CALM margin thresholds, the cost-aware stop classifier and the "
        "risk-controlled stop, fitted on a train "
        "exit table (calibrated cost) and read off the test inputs' staged pass",
    )
    p.add_argument(
        "--staged-groups",
        type=int,
        default=None,
        help="layer groups of the stop rules' staged environment (default: PruneGym/Staged's own, 7)",
    )
    p.add_argument(
        "--fit-items",
        type=int,
        default=STOP_FIT_ITEMS,
        help=f"with --stop-rules: train inputs they are fitted on (default: {STOP_FIT_ITEMS}, the main job's)",
    )
    p.add_argument(
        "--deltas",
        type=float,
        nargs="+",
        default=list(RISK_DELTAS),
        help="with --stop-rules: risk-controlled stop, agreement with dense >= 1 - delta (default "
        + " ".join(f"{d:g}" for d in RISK_DELTAS)
        + ")",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=RISK_EPSILON,
        help=f"with --stop-rules: the risk control's failure rate (default {RISK_EPSILON:g})",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/evaluate/<time>)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Evaluate controllers on the held-out split (and optionally the Pareto study)."""
    p = parser()
    args = p.parse_args(argv)
    if not args.controller and not args.pareto and not args.stop_rules:
        p.error("name at least one --controller, or --pareto, or --stop-rules")
    if args.fit_items < 1:
        p.error("--fit-items must be >= 1")
    try:
        check_risk_settings(args.deltas, args.epsilon)
    except ValueError as exc:
        p.error(f"--deltas / --epsilon: {exc}")
    staged_specs = [spec for spec in args.controller if staged_folder(spec)]
    plain_specs = [spec for spec in args.controller if spec not in staged_specs]
    out = args.out or Path("outputs/evaluate") / time.strftime("%Y-%m-%d_%H-%M-%S")
    rounds, timing_threads, workers = timing_arguments(p, args)
    env = evaluation_env(
        model=args.model,
        task=args.task,
        split=args.split,
        n_items=args.n_items,
        env_kwargs={"threads": args.threads, **controller_probe(args.controller), **args.env_kwargs},
        timing_threads=timing_threads,
    )
    n = min(args.n_items, len(env.items))
    chosen = [parse_controller(spec, env) for spec in plain_specs]
    staged = stop_rules = None
    risk_md = ""
    if staged_specs or args.stop_rules:
        staged = staged_part(args, env, staged_specs, timing_threads)
    if args.stop_rules:
        stop_rules = fit_rules(args, env)
    md = [
        f"# Evaluation: {args.model}, task {args.task}, {args.split} split, {n} inputs, measured latency\n",
        f"Each run timed with {timing_threads} thread{'s' if timing_threads != 1 else ''}"
        + (
            f", best of {rounds} interleaved rounds per input"
            + (f", the inputs shared among {min(workers, n)} worker processes" if min(workers, n) > 1 else "")
            if args.pareto or staged is not None
            else ""
        )
        + "; latency fractions are over the dense plan's time on the same input.\n",
    ]
    rows = None
    families: dict[str, list[Run]] = {}
    if args.pareto:
        rules = entropy_rules(probe_observations(env, n), env.probe.feature_names)
        chosen += [(rule, "EntropyThreshold") for rule in rules]
        candidates = default_candidates()
        if staged is not None:  # every stop's static twin (a fixed exit depth) is in the static hull
            from agents.staged import exit_depths

            candidates += exit_depths(staged.env)
        static, runs, _ = sweep(env, candidates, n, chosen, rounds=rounds, staged=staged, workers=workers)
    elif staged is not None:  # staged parts are timed against the dense plan in the same rounds
        dense, runs, _ = sweep(env, [Dense()], n, chosen, rounds=rounds, staged=staged, workers=workers)
        static, runs = [], dense + runs
    else:
        static, runs = [], [run_controller(env, c, n, fam) for c, fam in chosen]
    if staged is not None:
        runs = runs + staged.runs
    if stop_rules is not None:
        assert staged is not None and staged.table is not None
        rule_runs, records = stop_rules.evaluate(staged.table)
        runs = runs + rule_runs
        risk_md = risk_markdown(records, stop_rules.train_items)
    for run in runs:
        families.setdefault(run.family, []).append(run)
    if args.pareto:
        fams = {k: v for k, v in families.items() if k not in ("static", "Dense")}
        rows = headline(static, fams)
        md.append(headline_markdown(rows))
        plot = pareto_plot(static, fams, out / "pareto.png")
        md.append(f"![Pareto]({plot.name})")
        runs = static + runs
    if risk_md:
        md.append(risk_md)
    md.append("## Every controller\n\n" + summary_table(runs))
    md.append("## Per task (dense-relative)\n\n" + per_task_table(runs))
    text = "\n\n".join(md) + "\n"
    save_results(out, runs, rows, text)
    print(text)
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
