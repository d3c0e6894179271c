"""The main job: train adaptive controllers and test them against static pruning at equal measured latency.

``python -m experiments.main`` (Hydra; settings in ``conf/main.yaml``):

1. loads the model (embedded SmolLM2-135M by default) and makes sure this device has a calibrated
   cost model at the training's thread count (fits a quick one if not);
2. trains PPO controllers on ``PruneGym/PerInput-v0`` (calibrated cost, train split), one per reward
   weight, each for a bounded time, and the LinUCB bandit on the discrete variant; with ``staged.enabled``,
   also PPO on ``PruneGym/Staged-v0`` and DQN on ``PruneGym/StagedDiscrete-v0`` (stop after reading the
   model's answer, or run the next group), and fits the CALM margin threshold, the stop classifier
   and the risk-controlled stops on a train-split exit table; the trainings share the cores, several
   at once in forked processes (``train_workers``, :func:`training_workers`);
3. exports every controller (ONNX + card) and loads it back without Ray, the stop classifier's
   published operating points too (:func:`agents.staged.stop_exports`; each checked, after the
   evaluation, to stop where its fitted rule stops on every test input);
4. evaluates them, the static sweep, the static convex hull, the hindsight oracle and the entropy
   heuristic on held-out inputs with *measured* latency (:mod:`agents.evaluation`), the staged
   controllers and rules interleaved with them (:class:`agents.staged.StagedPass`);
5. prints the headline table, saves the Pareto plot, and writes everything to the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments import cli

log = logging.getLogger("prunegym.main")


# Which environment config (conf/env) each trainer of the main job uses.
ENV_OF = {"ppo": "per_input", "linucb": "per_input_discrete", "staged_ppo": "staged", "staged_dqn": "staged_discrete"}


def _train_cfg(cfg: DictConfig, algo: str, lam: float, run_dir: Path, time_s: float, threads: int) -> DictConfig:
    """A training config (conf/train.yaml) for one controller of the main job (``algo``: a key of :data:`ENV_OF`).

    ``threads``: torch threads of the env's forward (the main job's ``threads``, or its share in a training worker).
    """
    from hydra import compose

    env = ENV_OF[algo]
    # The environment the evaluation rebuilds (per_input_kwargs / staged_kwargs), its threads the worker's share.
    kwargs = staged_kwargs(cfg) if env.startswith("staged") else per_input_kwargs(cfg)
    del kwargs["threads"]
    overrides = [
        f"algo={algo.removeprefix('staged_')}",
        f"env={env}",
        f"seed={cfg.seed}",
        f"run_dir={run_dir}",
        f"env.kwargs.model={cfg.model.name}",
        f"env.kwargs.task={cfg.task.name}",
        f"env.kwargs.n_items={cfg.env.n_items}",
        *(f"++env.kwargs.{k}={_override_value(v)}" for k, v in kwargs.items()),
        f"env.kwargs.reward.lam={lam}",
        "env.kwargs.calibrate_cost=true",
        f"hardware.env_threads={threads}",
        "stop.iterations=null",
        f"stop.time_s={time_s}",
        "checkpoint.every=5",
        "eval.split=val",
        "eval.episodes=16",
    ]
    return compose(config_name="train", overrides=overrides)


def _override_value(value: Any) -> str:
    """``value`` as a Hydra command-line override writes it (``None`` is ``null``, a list ``[a,b]``)."""
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def main_config() -> DictConfig:
    """``conf/main.yaml`` as written: the main job's settings, for tools that run its environments (bench.staged)."""
    from experiments.train import CONF_DIR

    return OmegaConf.load(CONF_DIR / "main.yaml")


def per_input_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The PerInput environment the main job trains and evaluates (``env`` block, ``threads``)."""
    e = cfg.env
    return {
        "num_groups": int(e.num_groups),
        "probe_layers": int(e.probe_layers),
        "probe_dim": int(e.probe_dim),
        "max_prompt_tokens": int(e.max_prompt_tokens),
        "threads": int(cfg.threads),
        "mlp_rules": list(e.mlp_rules),
        "predictor": e.predictor,
    }


def job_name(algo: str, lam: float) -> str:
    """The run folder and controller name of one training job (``ppo_lam0.25``)."""
    return f"{algo}_lam{lam:g}"


def training_jobs(cfg: DictConfig) -> list[tuple[str, float, float]]:
    """The controllers the main job trains: ``(algo, reward weight, budget in seconds)``, in the config's order."""
    jobs = [("ppo", float(lam), float(cfg.ppo.time_s)) for lam in cfg.ppo.lams]
    jobs += [("linucb", float(lam), float(cfg.bandit.time_s)) for lam in cfg.bandit.lams]
    if cfg.staged.enabled:
        jobs += [("staged_ppo", float(lam), float(cfg.staged.ppo.time_s)) for lam in cfg.staged.ppo.lams]
        jobs += [("staged_dqn", float(lam), float(cfg.staged.dqn.time_s)) for lam in cfg.staged.dqn.lams]
    return jobs


def training_workers(threads: int, jobs: int, workers: int | None = None) -> tuple[int, int]:
    """Processes that train at once and the torch threads of each: ``workers``, else one per thread of ``threads``.

    The main job's ``threads`` are the cores it gives the model; training splits them among
    processes (at most one per job), each training its controllers one after another with
    ``threads // workers`` threads. On two cores a one-thread training beside another got 73 to 80% of
    the steps a two-thread training alone got in the same budget: two at once do about 1.5 times the
    work, in half the wall time.

    Raises:
        ValueError: ``workers`` below 1, or above 1 where the platform cannot fork.
    """
    from agents import evaluation as ev

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    # one per thread of the model's (at most the usable cores, 1 where the platform cannot fork), else as told
    procs = min(threads, ev.workers_for(1)) if workers is None else ev.workers_for(1, workers)
    procs = max(1, min(procs, jobs))
    return procs, max(1, threads // procs)


def balanced_queues(budgets: list[float | None], workers: int) -> list[list[int]]:
    """Jobs (by index) shared among ``workers`` queues, the longest budget first to the least loaded queue.

    A job without a budget (``None``: the stop rules' exit table) goes last, to the queue with the
    least left to do then. Each queue keeps the config's order.
    """
    load = [0.0] * workers
    queues: list[list[int]] = [[] for _ in range(workers)]
    timed = sorted((i for i, b in enumerate(budgets) if b is not None), key=lambda i: (-float(budgets[i]), i))
    for i in timed + [i for i, b in enumerate(budgets) if b is None]:
        q = min(range(workers), key=lambda k: (load[k], k))
        queues[q].append(i)
        load[q] += float(budgets[i] or 0.0)
    return [sorted(q) for q in queues if q]


@dataclass
class _Trainer:
    """Trains some of the main job's controllers, one after another, in this process or a training worker.

    Job ``i < len(jobs)`` trains ``jobs[i]`` into ``<out>/train/<name>``; job ``len(jobs)`` (with
    ``staged.enabled``) runs the train exit table the stop rules are fitted on. Each process's log
    lines name the job they come from.
    """

    cfg: DictConfig
    out: Path
    jobs: list[tuple[str, float, float]]
    threads: int

    def __call__(self, indices: list[int], tick: Any) -> dict[str, Any]:
        from experiments.train import train

        done: dict[str, Any] = {"metrics": {}, "fit_table": None, "fit_s": 0.0}
        for i in indices:
            if i == len(self.jobs):
                with _log_prefix("stop rules"):
                    t0 = time.perf_counter()
                    done["fit_table"] = _fit_table(self.cfg, self.threads)
                    done["fit_s"] = time.perf_counter() - t0
            else:
                algo, lam, budget = self.jobs[i]
                name = job_name(algo, lam)
                with _log_prefix(name):
                    log.info("training %s for %.0fs (reward = accuracy - %g x latency fraction)", name, budget, lam)
                    run_cfg = _train_cfg(self.cfg, algo, lam, self.out / "train" / name, budget, self.threads)
                    done["metrics"][name] = train(run_cfg)
            tick()
        return done


def _joined(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The training workers' results as one (the exit table from whichever ran it)."""
    fit = next((p for p in parts if p["fit_table"] is not None), parts[0])
    metrics = {k: v for p in parts for k, v in p["metrics"].items()}
    return {"metrics": metrics, "fit_table": fit["fit_table"], "fit_s": fit["fit_s"]}


@contextlib.contextmanager
def _log_prefix(name: str) -> Iterator[None]:
    """Log records of this process start with ``[name]`` while the block runs (parallel trainings interleave)."""
    factory = logging.getLogRecordFactory()

    def prefixed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.msg = f"[{name}] {record.msg}"
        return record

    logging.setLogRecordFactory(prefixed)
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)


def _training_text(jobs: int, procs: int, threads: int, t_train: float, t_fit: float | None) -> str:
    """How the controllers were trained (and the stop rules fitted), for the results' first paragraph."""
    what = f"Training {jobs} controllers" + (" and fitting the stop rules" if t_fit is not None else "")
    notes = [f"{procs} processes at once, {threads} thread{'s' if threads != 1 else ''} each"] if procs > 1 else []
    notes += [f"the fit {t_fit / 60:.1f} min of it"] if t_fit is not None else []
    return f"{what} {t_train / 60:.1f} min" + (f" ({'; '.join(notes)})" if notes else "")


def run_main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Run the main job into ``out``; returns the headline rows and summaries."""
    from agents import evaluation as ev
    from agents.baselines import StaticDepth
    from agents.controller import Controller
    from agents.export import export_from_path
    from envs.base import ensure_cost_model, shared_lm
    from envs.runtime.sparse_lm import torch_threads
    from experiments import report

    t_start = time.perf_counter()
    if cfg.staged.enabled:
        risk_settings(cfg)  # a bad setting stops here, not after the training
        fit_items(cfg)
    rounds, timing_threads = ev.timing_settings(cfg.eval.get("timing_rounds"), cfg.eval.get("timing_threads"))
    workers = ev.workers_for(timing_threads, cfg.eval.get("workers"))
    jobs = training_jobs(cfg)
    budgets: list[float | None] = [b for _, _, b in jobs] + ([None] if cfg.staged.enabled else [])  # None: the fit
    try:
        procs, threads_each = training_workers(int(cfg.threads), len(budgets), cfg.get("train_workers"))
    except ValueError as exc:
        raise ValueError(f"train_workers / threads: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    slm = shared_lm(str(cfg.model.name), "float32", int(cfg.threads))
    log.info("model %s loaded (%d layers); threads %d", cfg.model.name, slm.spec.num_layers, cfg.threads)

    # ---- train (and fit the stop rules), then export
    with torch_threads(threads_each):  # the training envs' cost model, at their threads: fitted alone if missing
        ensure_cost_model(slm)
    trainer = _Trainer(cfg, out, jobs, threads_each)
    if procs == 1:
        done = trainer(list(range(len(budgets))), lambda: None)
    else:
        log.info("training in %d processes at once, %d torch thread(s) each", procs, threads_each)
        queues = balanced_queues(budgets, procs)
        done = _joined(ev.in_workers(trainer, queues, desc="training", role="training"))
    training: dict[str, Any] = {job_name(a, lam): done["metrics"][job_name(a, lam)] for a, lam, _ in jobs}
    exported: list[tuple[str, str, Path]] = []
    for algo, lam, _ in jobs:
        name = job_name(algo, lam)
        folder = export_from_path(out / "train" / name, out / "controllers" / name, slm=slm, force=True)
        exported.append((algo, name, folder))
    t_train = time.perf_counter() - t_start

    # ---- evaluate on held-out inputs with measured latency
    env = ev.evaluation_env(
        model=str(cfg.model.name),
        task=str(cfg.task.name),
        split=str(cfg.eval.split),
        n_items=int(cfg.eval.n_items),
        env_kwargs=per_input_kwargs(cfg),
        timing_threads=timing_threads,
    )
    n = min(int(cfg.eval.n_items), len(env.items))
    trained = []
    staged_ctrls = []
    for algo, name, folder in exported:
        ctrl = Controller.from_pretrained(folder, slm=slm)
        if algo.startswith("staged"):
            staged_ctrls.append((algo, name, ctrl))
            continue
        trained.append(
            (ev.ExportedController(ctrl, env, name), "PPO (adaptive)" if algo == "ppo" else "LinUCB bandit (adaptive)")
        )
    staged = _staged_pass(cfg, staged_ctrls, timing_threads) if cfg.staged.enabled else None
    rules = _stop_rules(cfg, done["fit_table"]) if staged is not None else None
    stop_exported = (
        _export_stop_rules(cfg, rules, done["fit_table"], out / "controllers", slm) if rules is not None else []
    )
    t_fit = done["fit_s"]
    # The entropy heuristic's thresholds are quantiles of the probe's entropy (no labels involved).
    entropy = ev.entropy_rules(ev.probe_observations(env, n), env.probe.feature_names)
    trained += [(rule, "EntropyThreshold") for rule in entropy]
    # Static plans, controllers and the staged parts run back to back on each input (interleaved measurement).
    candidates = ev.default_candidates(mlp_rules=list(cfg.env.mlp_rules))
    if staged is not None:  # every stop's static twin (a fixed exit depth) is in the static hull
        from agents.staged import exit_depths

        candidates += exit_depths(staged.env)
    static, ctrl_runs, _ = ev.sweep(
        env, candidates, n, trained, seed=int(cfg.seed), rounds=rounds, staged=staged, workers=workers
    )
    staged_md = ""
    records: list[dict[str, Any]] = []
    if staged is not None:
        assert rules is not None
        rule_runs, records = rules.evaluate(staged.table)
        staged_md = report.risk_markdown(records, rules.train_items)
        if stop_exported:
            staged_md += "\n\n" + _check_stop_exports(stop_exported, staged.table, slm)
        ctrl_runs = ctrl_runs + staged.runs + rule_runs
    families: dict[str, list[ev.Run]] = {}
    for run in ctrl_runs:
        families.setdefault(run.family, []).append(run)
    rows = ev.headline(static, families, tuple(cfg.eval.targets), n_boot=int(cfg.eval.bootstrap), seed=int(cfg.seed))
    plot = report.pareto_plot(static, families, out / "pareto.png")
    t_total = time.perf_counter() - t_start

    # ---- report
    all_runs = static + [r for fam in families.values() for r in fam]
    head = report.headline_markdown(rows)
    md = [
        f"# Main job: adaptive vs static pruning on {cfg.model.name}",
        f"Task mix `{cfg.task.name}`; controllers trained on the train split with calibrated cost, evaluated on "
        f"{n} {cfg.eval.split} inputs with measured latency on this machine (each run timed with {timing_threads} "
        f"thread{'s' if timing_threads != 1 else ''}, best of {rounds} interleaved rounds per input, as a fraction of "
        f"the dense plan's time on the same input; {_workers_text(min(workers, n))})"
        + (
            f"; the static sweep holds every staged stop's static twin (fixed exits after "
            f"{', '.join(str(c.layers) for c in candidates if isinstance(c, StaticDepth))} layers), and the stop "
            f"rules were fitted on {rules.train_items} train inputs"
            if staged is not None and rules is not None
            else ""
        )
        + f". {_training_text(len(jobs), procs, threads_each, t_train, t_fit if staged is not None else None)}"
        + f", total {t_total / 60:.1f} min.",
        head,
        f"![Pareto]({plot.name})",
        *([staged_md] if staged_md else []),
        "## Every controller\n\n" + report.summary_table(all_runs),
        "## Per task (dense-relative)\n\n" + report.per_task_table(all_runs),
    ]
    text = "\n\n".join(md) + "\n"
    report.save_results(out, all_runs, rows, text)
    (out / "training.json").write_text(json.dumps(training, indent=1, default=float))
    if staged is not None:  # the test exit table and the risk records, for audits and re-analysis
        staged.table.save(out / "staged_test_exits.npz")
        grid = [g if g < float("inf") else None for g in rules.grid.tolist()]
        clf = rules.classifiers
        clf_rec = (
            clf if isinstance(clf, str) else [{"name": c.name, "model": c.kind, "bars": c.bars.tolist()} for c in clf]
        )
        exported_rec = [str(folder.name) for _, folder in stop_exported]
        (out / "stop_rules.json").write_text(
            json.dumps({"risk": records, "grid": grid, "classifier": clf_rec, "exported": exported_rec}, indent=1)
        )
    if cfg.get("benchmarks"):
        command = shlex.join(["python", "-m", "experiments.main", *sys.argv[1:]])
        if list(cfg.env.mlp_rules) == ["static"]:
            write_benchmark_section(out, command)
        else:  # its own section: the headline stays the static-order main job's
            write_benchmark_section(
                out, command, "Main job with per-token MLP rules (in the static hull and the actions)"
            )
    best = _best_ppo(static, families.get("PPO (adaptive)", []))
    if best is not None:
        shutil.copytree(out / "controllers" / best, out / "controller", dirs_exist_ok=True)
    print("\n" + head + "\n")
    print(f"Pareto plot: {plot}\nresults: {out / 'results.md'}\nexported controllers: {out / 'controllers'}")
    return {"headline": rows, "runs": [r.summary() for r in all_runs], "minutes": t_total / 60, "out": str(out)}


def _workers_text(workers: int) -> str:
    """How the evaluation shared its inputs, for the results' first paragraph."""
    if workers == 1:
        return "all inputs in one process"
    return f"the inputs shared among {workers} worker processes timing at once, each input's runs in one of them"


STAGED_FAMILIES = {"staged_ppo": "Staged PPO (adaptive)", "staged_dqn": "Staged DQN (adaptive)"}


def staged_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The staged environment the main job trains and evaluates (the PerInput probe, ``staged.num_groups`` groups)."""
    groups = cfg.staged.get("num_groups")
    return {
        "num_groups": None if groups is None else int(groups),
        "probe_layers": int(cfg.env.probe_layers),
        "probe_dim": int(cfg.env.probe_dim),
        "max_prompt_tokens": int(cfg.env.max_prompt_tokens),
        "threads": int(cfg.threads),
    }


def _staged_pass(cfg: DictConfig, ctrls: list[tuple[str, str, Any]], timing_threads: int) -> Any:
    """The staged part of the evaluation sweep: the exit row and every staged controller, on the test inputs."""
    from functools import partial

    from agents import evaluation as ev
    from agents.staged import staged_pass

    env_for = partial(
        ev.evaluation_env,
        model=str(cfg.model.name),
        task=str(cfg.task.name),
        split=str(cfg.eval.split),
        n_items=int(cfg.eval.n_items),
        timing_threads=timing_threads,
        env="Staged",
    )
    controllers = [(ctrl, name, STAGED_FAMILIES[algo]) for algo, name, ctrl in ctrls]
    return staged_pass(lambda kw: env_for(env_kwargs=kw), staged_kwargs(cfg), controllers)


def fit_items(cfg: DictConfig) -> int:
    """Train inputs the stop rules are fitted on: ``staged.fit_items``, else :data:`agents.staged.STOP_FIT_ITEMS`.

    Raises:
        ValueError: A count below 1.
    """
    from agents.staged import STOP_FIT_ITEMS

    n = cfg.staged.get("fit_items")
    n = STOP_FIT_ITEMS if n is None else int(n)
    if n < 1:
        raise ValueError(f"staged.fit_items must be >= 1 (null: {STOP_FIT_ITEMS}), got {n}")
    return n


def risk_settings(cfg: DictConfig) -> tuple[tuple[float, ...], float]:
    """The risk-controlled stop's deltas and epsilon: ``staged.deltas`` / ``staged.epsilon``, else the defaults.

    ``null`` in the config means :data:`agents.staged.RISK_DELTAS` / :data:`~agents.staged.RISK_EPSILON`,
    the defaults ``experiments.evaluate`` and ``experiments.bench.staged`` use too.
    """
    from agents.staged import RISK_DELTAS, RISK_EPSILON, check_risk_settings

    deltas, epsilon = cfg.staged.get("deltas"), cfg.staged.get("epsilon")
    try:
        return check_risk_settings(
            RISK_DELTAS if deltas is None else list(deltas), RISK_EPSILON if epsilon is None else epsilon
        )
    except ValueError as exc:
        raise ValueError(
            f"staged.deltas must be a non-empty list in (0, 1) and staged.epsilon in (0, 1) (null: the defaults, "
            f"{list(RISK_DELTAS)} and {RISK_EPSILON}): {exc}"
        ) from None


def _fit_table(cfg: DictConfig, threads: int) -> Any:
    """The train-split exit table (calibrated cost) the stop rules are fitted on, run with ``threads`` torch threads."""
    from agents import evaluation as ev
    from agents.staged import exit_table

    env = ev.evaluation_env(
        model=str(cfg.model.name),
        task=str(cfg.task.name),
        split="train",
        n_items=fit_items(cfg),
        env_kwargs={**staged_kwargs(cfg), "threads": int(threads), "discrete": True, "calibrate_cost": True},
        cost="calibrated",
        env="Staged",
    )
    return exit_table(env, desc="stop rules: train exit table")


def _stop_rules(cfg: DictConfig, table: Any) -> Any:
    """The CALM thresholds, the cost-aware stop classifier and the risk-controlled stops, fitted on ``table``.

    ``table`` is the train-split exit table; a rule the table cannot fit is logged and left out.
    """
    from agents.staged import fit_stop_rules

    rules = fit_stop_rules(table, *risk_settings(cfg))
    for score, _, delta, rc in rules.certifications():
        if isinstance(rc, str):
            log.warning("risk-controlled stop (%s) at delta=%g refused: %s", score, delta, rc)
    if isinstance(rules.classifiers, str):
        log.warning("stop classifier not fitted: %s", rules.classifiers)
    elif rules.classifiers:
        log.info("stop classifier: %s, chosen by cross-validation on the train table", rules.classifiers[0].kind)
    return rules


def _export_stop_rules(cfg: DictConfig, rules: Any, table: Any, folder: Path, slm: Any) -> list[tuple[Any, Path]]:
    """Export the stop classifier's published operating points (:func:`agents.staged.stop_exports`) as controllers.

    Returns:
        ``(classifier, folder)`` of each.
    """
    from agents.export import export_stop_classifier
    from agents.staged import stop_exports

    done = []
    for name, clf, cert in stop_exports(rules, table, [float(t) for t in cfg.eval.targets]):
        done.append((clf, export_stop_classifier(clf, table, folder / name, slm=slm, certified=cert, force=True)))
        log.info("exported %s: %s", name, clf.name)
    return done


def _check_stop_exports(exported: list[tuple[Any, Path]], table: Any, slm: Any) -> str:
    """Load each exported stop controller back and check it stops where its fitted rule stops on the test inputs.

    Returns:
        A paragraph for the results.

    Raises:
        RuntimeError: An exported controller decides otherwise than the rule it was exported from.
    """
    from agents.controller import Controller
    from agents.staged import controller_exits

    rows = []
    for clf, folder in exported:
        got = controller_exits(Controller.from_pretrained(folder, slm=slm), table)
        wrong = int((got != clf.exits(table)).sum())
        if wrong:
            raise RuntimeError(f"the exported {folder.name} stops elsewhere than its rule on {wrong} test inputs")
        on = table.take(got)
        rows.append(
            f"| `controllers/{folder.name}` | {clf.name} | {on['rel'].mean():.3f} | {on['raw'].mean():.3f} | "
            f"{on['lat'].mean():.3f} | {(got < table.groups).mean():.2f} |"
        )
    return "\n".join(
        [
            "**Exported stop classifiers**, each loaded back from its folder: it stops where its fitted rule stops on "
            f"all {len(table.item_ids)} test inputs, with these figures there (the staged pass's measurements).",
            "",
            "| folder | operating point | agreement with dense | raw accuracy | latency (of dense) | stopped early |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def write_benchmark_section(
    out: Path, command: str, title: str = "Main job: adaptive vs static pruning at equal measured latency"
) -> Path:
    """Copy a finished run's headline and controller table into the BENCHMARKS.md section of the main job."""
    from experiments.report import write_section

    plot = "pareto_main.png" if title.startswith("Main job: adaptive") else f"pareto_{out.name}.png"
    text = (out / "results.md").read_text()
    body = text.split("\n", 1)[1].replace("![Pareto](pareto.png)", f"![Pareto](reports/{plot})")
    body = body.split("## Per task")[0].strip().replace("\n## ", "\n### ")
    reports = Path(__file__).resolve().parent.parent / "reports"
    reports.mkdir(exist_ok=True)
    shutil.copyfile(out / "pareto.png", reports / plot)
    return write_section(title, command, body)


def _best_ppo(static: list[Any], runs: list[Any]) -> str | None:
    """The PPO controller furthest above the static hull at its own measured latency (dense-relative)."""
    from agents import evaluation as ev
    from agents.frontier import interp_frontier

    if not runs:
        return None
    import numpy as np

    hx, hy = ev.hull_curve(static, "dense_relative", np.arange(len(static[0].raw)))

    def margin(r: Any) -> float:
        h = interp_frontier(hx, hy, [r.lat.mean()])[0]
        return float(r.rel.mean() - (h if np.isfinite(h) else 0.0))

    return max(runs, key=margin).name


@cli.hydra_main(config_name="main")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    log.info("main job settings:\n%s", OmegaConf.to_yaml(cfg))
    run_main(cfg, out)


if __name__ == "__main__":
    main()
