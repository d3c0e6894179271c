"""Train a pruning controller: ``python -m experiments.train algo=ppo env=per_input seed=0``.

A thin ``@hydra.main`` over :func:`train`, which tests call directly with a composed config. One run:

1. builds one environment locally (the held-out split) and checks that the algorithm can take its
   action space, *before* Ray starts (:func:`agents.rllib.check_compatible`);
2. starts Ray (or joins ``cluster.address``), trains iteration by iteration until the budget
   (``stop.*``) is spent, writing ``metrics.jsonl`` / ``metrics.csv`` (and W&B with ``logger=wandb``)
   and a checkpoint every ``checkpoint.every`` iterations into the run directory;
3. evaluates the greedy policy on the held-out split and writes ``final.json``.

``resume=true`` with the run directory of a killed run (``hydra.run.dir=<dir>`` or ``run_dir=<dir>``)
continues from its latest checkpoint; iterations after that checkpoint are run again (at most one
checkpoint interval is lost). ``algo=linucb`` trains the mabwiser contextual bandit with no Ray at all.

Multirun (``-m algo=ppo,appo,sac,linucb seed=0,1,2``) uses Hydra's basic launcher: jobs run one after
another in this process, each starting and shutting down its own Ray.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.rllib import WORKER_ENV_VARS, check_compatible, env_catalog, make_env

log = logging.getLogger("prunegym.train")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


# ------------------------------------------------------------------------------------------ settings
def env_settings(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The env id and its kwargs: ``env.kwargs`` with the ``model`` / ``task`` / ``hardware`` overrides.

    ``model=<name>`` (conf/model) and ``task=<name>`` (conf/task), when selected, replace the env's own
    ``model`` / ``task`` kwargs; ``hardware.env_threads`` becomes the env's ``threads`` (torch intra-op
    threads of the LLM forward in whichever process holds the env).
    """
    if cfg.get("env") is None or not cfg.env.get("id"):
        raise ValueError("no environment selected: pass env=<name> (see conf/env/) or env.id=<gymnasium id>")
    kwargs: dict[str, Any] = _container(cfg.env.get("kwargs"))
    model = cfg.get("model")
    if model is not None and model.get("name"):
        kwargs["model"] = str(model.name)
    task = cfg.get("task")
    if task is not None and task.get("name"):
        kwargs["task"] = task.name if isinstance(task.name, str) else OmegaConf.to_container(task.name)
    hw = cfg.get("hardware") or {}
    if hw.get("env_threads") is not None:
        kwargs["threads"] = int(hw.env_threads)
    kwargs.update(_container(hw.get("env_kwargs")))
    return str(cfg.env.id), kwargs


def _container(node: Any) -> dict[str, Any]:
    """A config mapping (or ``None``) as a plain dict."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    return dict(node)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir`` if set, else Hydra's output directory for this job."""
    if cfg.get("run_dir"):
        path = Path(str(cfg.run_dir))
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:
            raise ValueError(
                "train(cfg) outside Hydra needs cfg.run_dir=<folder> for metrics and checkpoints"
            ) from None
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ logging
class RunLogger:
    """Per-iteration metrics into ``metrics.jsonl`` and ``metrics.csv`` (always) and W&B (``logger=wandb``).

    On resume the local files are cut back to the checkpoint's iteration, so re-run iterations are not
    counted twice.
    """

    def __init__(self, run_dir: Path, logger_cfg: Mapping[str, Any] | None, config: dict[str, Any], start_iter: int):
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if start_iter > 0 and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if int(row.get("iteration", 0)) <= start_iter:
                    self.rows.append(row)
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()
        self.wandb = _start_wandb(run_dir, logger_cfg, config) if logger_cfg else None

    def _write_csv(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv)

    def log(self, row: dict[str, Any]) -> None:
        """Append one iteration's row everywhere."""
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items() if _finite(v)}, step=int(row["iteration"]))

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final (held-out) figures into the W&B summary."""
        if self.wandb is not None:
            for k, v in values.items():
                if _finite(v):
                    self.wandb.summary[k] = v

    def close(self) -> None:
        """Finish the W&B run (offline runs stay in ``<run_dir>/wandb`` for ``wandb sync``)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _start_wandb(run_dir: Path, logger_cfg: Mapping[str, Any], config: dict[str, Any]) -> Any:
    """A W&B run, offline unless ``WANDB_MODE`` (or ``logger.mode``) says otherwise; resumable by id."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or str(logger_cfg.get("mode") or "offline")
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=str(logger_cfg.get("project") or "prunegym"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group"),
        name=logger_cfg.get("run_name") or f"{config.get('algo', {}).get('name')}-s{config.get('seed')}",
        tags=list(logger_cfg.get("tags") or []),
        dir=str(run_dir),
        mode=mode,
        id=run_id,
        resume="allow",
        config=config,
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )


def progress_line(row: Mapping[str, Any], total: int | None) -> str:
    """One line per iteration: steps, reward, accuracy, cost and time."""
    of = f"/{total}" if total else ""
    return (
        f"iter {row['iteration']}{of} | steps {int(row['env_steps'])} | reward {row['reward']:.4f} | "
        f"acc {row['accuracy']:.3f} | cost {row['cost']:.3f} | {row['iter_time_s']:.2f} s"
    )


# ------------------------------------------------------------------------------------------ Ray
@contextlib.contextmanager
def ray_session(cluster: Mapping[str, Any], run_dir: Path) -> Iterator[bool]:
    """Start Ray (or join ``cluster.address``) unless it is already running; shut it down if we started it.

    Workers get ``OMP_NUM_THREADS=1`` (and friends) through ``runtime_env``. The temp dir is a short
    ``/tmp/rayXXXX`` folder by default: Ray's unix sockets live under it and their paths must stay
    under ~107 characters, which a run directory under the repository easily exceeds.
    """
    import ray

    if ray.is_initialized():  # someone else (a test fixture, a notebook) owns the session
        yield False
        return
    runtime_env = dict(cluster.get("runtime_env") or {})
    runtime_env["env_vars"] = {**WORKER_ENV_VARS, **dict(runtime_env.get("env_vars") or {})}
    address = cluster.get("address")
    own_tmp: str | None = None
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": bool(cluster.get("log_to_driver", False))}
    if address:
        kwargs["address"] = str(address)
    else:
        tmp = cluster.get("temp_dir")
        if not tmp:
            tmp = own_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        kwargs.update(num_cpus=int(cluster.get("num_cpus") or 2), include_dashboard=False, _temp_dir=str(tmp))
    ray.init(**kwargs)
    try:
        yield True
    finally:
        ray.shutdown()
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The record of the newest complete checkpoint (``checkpoints/latest.json``), or ``None``."""
    path = run_dir / CHECKPOINTS / LATEST
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if (run_dir / CHECKPOINTS / record["folder"]).is_dir() else None


def save_checkpoint(trainer: Any, run_dir: Path, iteration: int, keep: int) -> Path:
    """Save into ``checkpoints/iter_NNNNNN`` then point ``latest.json`` at it (atomically); prune old ones."""
    root = run_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    name = f"iter_{iteration:06d}"
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)
    trainer.save(folder)
    record = {"folder": name, "iteration": iteration, "env_steps": trainer.env_steps, "time": time.time()}
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, root / LATEST)
    olds = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name != name)
    for old in olds[: max(0, len(olds) - max(0, keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _check_resume_config(run_dir: Path, config: dict[str, Any]) -> None:
    path = run_dir / "run_config.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in ("algo", "env", "seed", "model", "task"):
        if old.get(key) != config.get(key):
            raise ValueError(
                f"resume=true in {run_dir}, but {key} differs from the run being resumed "
                f"({old.get(key)!r} there, {config.get(key)!r} now): resume with the same settings, "
                "or start a new run directory"
            )


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(env: Any, policy: Any, episodes: int, seed: int, info_keys: Mapping[str, str]) -> dict[str, float]:
    """Mean return, accuracy and cost of ``policy`` (greedy) over ``episodes`` seeded episodes of ``env``."""
    returns, acc, cost = [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done, info = 0.0, False, {}
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        acc.append(_get(info, info_keys.get("accuracy")))
        cost.append(_get(info, info_keys.get("cost")))
    return {"reward": float(np.mean(returns)), "accuracy": _nanmean(acc), "cost": _nanmean(cost), "episodes": episodes}


def _get(info: Mapping[str, Any], key: str | None) -> float:
    try:
        return float(info[key]) if key and info.get(key) is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


# ------------------------------------------------------------------------------------------ train
def _make_trainer(cfg: DictConfig, env_id: str, kwargs: dict[str, Any], probe_env: Any, info_keys: dict[str, str]):
    algo = str(cfg.algo.name)
    if algo == "linucb":
        from agents.bandit import BanditTrainer

        train_env = make_env(env_id, {**kwargs, "split": cfg.train_split})
        return BanditTrainer(
            train_env, OmegaConf.to_container(cfg.algo, resolve=True), seed=int(cfg.seed), info_keys=info_keys
        )  # type: ignore[arg-type]
    from agents.rllib import RLlibTrainer

    return RLlibTrainer(
        OmegaConf.to_container(cfg.algo, resolve=True),  # type: ignore[arg-type]
        env_id,
        {**kwargs, "split": cfg.train_split},
        probe_env.action_space,
        seed=int(cfg.seed),
        num_env_runners=int(cfg.cluster.num_env_runners),
        envs_per_runner=int(cfg.cluster.get("envs_per_runner") or 1),
        info_keys=info_keys,
    )


def _loop(
    cfg: DictConfig,
    trainer: Any,
    logger: RunLogger,
    run_dir: Path,
    start_iter: int,
    limits: tuple[int | None, int | None, float | None],
) -> int:
    """Train until a budget in ``limits`` (iterations, env steps, seconds) is spent; returns the last iteration."""
    max_iters, max_steps, max_time = limits
    iteration, t_start = start_iter, time.perf_counter()
    every = int(cfg.checkpoint.every)
    last_saved = start_iter
    while True:
        if max_iters is not None and iteration >= max_iters:
            break
        if max_steps is not None and trainer.env_steps >= max_steps:
            break
        if max_time is not None and time.perf_counter() - t_start >= max_time:
            break
        row = trainer.train_iteration()
        iteration += 1
        row = {"iteration": iteration, **row, "wall_s": time.perf_counter() - t_start}
        logger.log(row)
        log.info(progress_line(row, max_iters))
        if every > 0 and iteration % every == 0:
            save_checkpoint(trainer, run_dir, iteration, int(cfg.checkpoint.keep))
            last_saved = iteration
    if every > 0 and last_saved != iteration:
        save_checkpoint(trainer, run_dir, iteration, int(cfg.checkpoint.keep))
    return iteration


def train(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.algo`` on ``cfg.env``; returns the final metrics (last iteration and held-out evaluation).

    Raises:
        agents.rllib.IncompatibleEnvError: The algorithm cannot take the env's action space (before Ray starts).
    """
    import torch

    run_dir = resolve_run_dir(cfg)
    env_id, kwargs = env_settings(cfg)
    info_keys = {k: str(v) for k, v in (cfg.get("info_keys") or {"accuracy": "accuracy", "cost": "cost"}).items()}
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config["env"] = {"id": env_id, "kwargs": kwargs}

    # Threads of this process (driver, local learner): OMP for libraries that read it at start, torch explicitly.
    threads_before = torch.get_num_threads()
    for k, v in WORKER_ENV_VARS.items():
        os.environ.setdefault(k, v)
    learner_threads = int((cfg.get("hardware") or {}).get("learner_threads") or 1)

    eval_env = make_env(env_id, {**kwargs, "split": cfg.eval.split})  # one local env: the action-space check
    trainer = None
    logger: RunLogger | None = None
    try:
        check_compatible(str(cfg.algo.name), env_id, eval_env.action_space, env_catalog(CONF_DIR))
        torch.set_num_threads(learner_threads)
        record = latest_checkpoint(run_dir) if cfg.resume else None
        if cfg.resume:
            _check_resume_config(run_dir, config)
            if record is None:
                log.warning("resume=true but %s has no checkpoint yet: starting from scratch", run_dir)
        (run_dir / "run_config.json").write_text(json.dumps(config, indent=1, default=str))
        start_iter = int(record["iteration"]) if record else 0
        stop = cfg.stop
        max_iters = int(stop.iterations) if stop.get("iterations") else None
        max_steps = int(stop.env_steps) if stop.get("env_steps") else None
        max_time = float(stop.time_s) if stop.get("time_s") else None
        if max_iters is None and max_steps is None and max_time is None:
            raise ValueError("set a budget: stop.iterations, stop.env_steps or stop.time_s")

        needs_ray = str(cfg.algo.name) != "linucb"
        session = ray_session(cfg.cluster, run_dir) if needs_ray else contextlib.nullcontext()
        with session:
            trainer = _make_trainer(cfg, env_id, kwargs, eval_env, info_keys)
            try:
                if record:
                    trainer.restore(run_dir / CHECKPOINTS / record["folder"])
                    log.info(
                        "resumed from %s (iteration %d, %d env steps)", record["folder"], start_iter, trainer.env_steps
                    )
                logger = RunLogger(run_dir, cfg.get("logger"), config, start_iter)
                iteration = _loop(cfg, trainer, logger, run_dir, start_iter, (max_iters, max_steps, max_time))
                held_out = evaluate(eval_env, trainer.policy(), int(cfg.eval.episodes), int(cfg.eval.seed), info_keys)
                last = logger.rows[-1] if logger.rows else {}
            finally:
                trainer.stop()
        final = {
            "algo": str(cfg.algo.name),
            "env_id": env_id,
            "seed": int(cfg.seed),
            "iterations": iteration,
            "env_steps": float(trainer.env_steps),
            "budget": {"iterations": max_iters, "env_steps": max_steps, "time_s": max_time},
            "tuning_trials": int(cfg.algo.get("tuning_trials") or 1),
            "eval_split": str(cfg.eval.split),
            "eval": held_out,
            "train": {k: v for k, v in last.items() if k != "iteration"},
        }
        (run_dir / "final.json").write_text(json.dumps(final, indent=1))
        metrics = {f"train/{k}": float(v) for k, v in final["train"].items() if _finite(v)}
        metrics.update({f"eval/{k}": float(v) for k, v in held_out.items() if _finite(v)})
        metrics["iterations"] = float(iteration)
        metrics["env_steps"] = float(trainer.env_steps)
        logger.summary(metrics)
        log.info(
            "held-out (%s, %d episodes): reward %.4f | acc %.3f | cost %.3f",
            cfg.eval.split,
            held_out["episodes"],
            held_out["reward"],
            held_out["accuracy"],
            held_out["cost"],
        )
        return metrics
    finally:
        if logger is not None:
            logger.close()
        eval_env.close()
        torch.set_num_threads(threads_before)


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the held-out reward (for sweepers that optimise it)."""
    metrics = train(cfg)
    return float(metrics.get("eval/reward", float("nan")))


if __name__ == "__main__":
    main()
