"""The main job: train adaptive controllers and test them against static pruning at equal measured latency.

``python -m experiments.main`` (Hydra; settings in ``conf/main.yaml``):

1. loads the model (embedded SmolLM2-135M by default) and makes sure this device has a calibrated
   cost model (fits a quick one if not);
2. trains PPO controllers on ``PruneGym/PerInput-v0`` (calibrated cost, train split), one per reward
   weight, each for a bounded time, and the LinUCB bandit on the discrete variant;
3. exports every controller (ONNX + card) and loads it back without Ray;
4. evaluates them, the static sweep, the static convex hull, the hindsight oracle and the entropy
   heuristic on held-out inputs with *measured* latency (:mod:`agents.evaluation`);
5. prints the headline table, saves the Pareto plot, and writes everything to the run directory.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments import cli

log = logging.getLogger("prunegym.main")


def _train_cfg(cfg: DictConfig, algo: str, lam: float, run_dir: Path, time_s: float) -> DictConfig:
    """A training config (conf/train.yaml) for one controller of the main job."""
    from hydra import compose

    env = "per_input" if algo != "linucb" else "per_input_discrete"
    e = cfg.env
    overrides = [
        f"algo={algo}",
        f"env={env}",
        f"seed={cfg.seed}",
        f"run_dir={run_dir}",
        f"env.kwargs.model={cfg.model.name}",
        f"env.kwargs.task={cfg.task.name}",
        f"env.kwargs.n_items={e.n_items}",
        f"+env.kwargs.max_prompt_tokens={e.max_prompt_tokens}",
        f"env.kwargs.num_groups={e.num_groups}",
        f"env.kwargs.probe_layers={e.probe_layers}",
        f"env.kwargs.probe_dim={e.probe_dim}",
        f"+env.kwargs.mlp_rules=[{','.join(e.mlp_rules)}]",
        *([f"+env.kwargs.predictor={e.predictor}"] if e.predictor else []),
        f"env.kwargs.reward.lam={lam}",
        "env.kwargs.calibrate_cost=true",
        f"hardware.env_threads={cfg.threads}",
        "stop.iterations=null",
        f"stop.time_s={time_s}",
        "checkpoint.every=5",
        "eval.split=val",
        "eval.episodes=16",
    ]
    return compose(config_name="train", overrides=overrides)


def run_main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Run the main job into ``out``; returns the headline rows and summaries."""
    from agents import evaluation as ev
    from agents.controller import Controller
    from agents.export import export_from_path
    from envs.base import shared_lm
    from experiments import report
    from experiments.train import train

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    slm = shared_lm(str(cfg.model.name), "float32", int(cfg.threads))
    log.info("model %s loaded (%d layers); threads %d", cfg.model.name, slm.spec.num_layers, cfg.threads)

    # ---- train and export
    exported: list[tuple[str, str, Path]] = []
    plan = [("ppo", float(lam), float(cfg.ppo.time_s)) for lam in cfg.ppo.lams]
    plan += [("linucb", float(lam), float(cfg.bandit.time_s)) for lam in cfg.bandit.lams]
    training: dict[str, Any] = {}
    for algo, lam, budget in plan:
        name = f"{algo}_lam{lam:g}"
        run_dir = out / "train" / name
        log.info("training %s for %.0fs (reward = accuracy - %g x latency fraction)", name, budget, lam)
        metrics = train(_train_cfg(cfg, algo, lam, run_dir, budget))
        training[name] = metrics
        folder = export_from_path(run_dir, out / "controllers" / name, slm=slm, force=True)
        exported.append((algo, name, folder))
    t_train = time.perf_counter() - t_start

    # ---- evaluate on held-out inputs with measured latency
    rounds, timing_threads = ev.timing_settings(cfg.eval.get("timing_rounds"), cfg.eval.get("timing_threads"))
    env = ev.evaluation_env(
        model=str(cfg.model.name),
        task=str(cfg.task.name),
        split=str(cfg.eval.split),
        n_items=int(cfg.eval.n_items),
        env_kwargs={
            "num_groups": int(cfg.env.num_groups),
            "probe_layers": int(cfg.env.probe_layers),
            "probe_dim": int(cfg.env.probe_dim),
            "max_prompt_tokens": int(cfg.env.max_prompt_tokens),
            "threads": int(cfg.threads),
            "mlp_rules": list(cfg.env.mlp_rules),
            "predictor": cfg.env.predictor,
        },
        timing_threads=timing_threads,
    )
    n = min(int(cfg.eval.n_items), len(env.items))
    trained = []
    for algo, name, folder in exported:
        ctrl = Controller.from_pretrained(folder, slm=slm)
        trained.append(
            (ev.ExportedController(ctrl, env, name), "PPO (adaptive)" if algo == "ppo" else "LinUCB bandit (adaptive)")
        )
    # The entropy heuristic's thresholds are quantiles of the probe's entropy (no labels involved).
    rules = ev.entropy_rules(ev.probe_observations(env, n), env.probe.feature_names)
    trained += [(rule, "EntropyThreshold") for rule in rules]
    # Static plans and controllers run back to back on each input (interleaved measurement).
    candidates = ev.default_candidates(mlp_rules=list(cfg.env.mlp_rules))
    static, ctrl_runs, _ = ev.sweep(env, candidates, n, trained, seed=int(cfg.seed), rounds=rounds)
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
        f"the dense plan's time on the same input). Training {t_train / 60:.1f} min, "
        f"total {t_total / 60:.1f} min.",
        head,
        f"![Pareto]({plot.name})",
        "## Every controller\n\n" + report.summary_table(all_runs),
        "## Per task (dense-relative)\n\n" + report.per_task_table(all_runs),
    ]
    text = "\n\n".join(md) + "\n"
    report.save_results(out, all_runs, rows, text)
    (out / "training.json").write_text(json.dumps(training, indent=1, default=float))
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
