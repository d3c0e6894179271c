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

Budgets (``stop.*``, ``eval.episodes``, ``checkpoint.*``) are checked before anything is built. A run
stopped with SIGTERM or SIGINT shuts its Ray down and removes Ray's temp dir; one killed with SIGKILL
cannot, so every run first stops what the private Rays of dead runs left behind
(:func:`clean_orphaned_ray`), and never touches a Ray session whose driver is alive or not ours.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.export import ENV_CONFIG
from agents.rllib import WORKER_ENV_VARS, check_compatible, env_catalog, make_env
from envs.data.files import Checkpoints, atomic_write_json, atomic_write_text, clean_leftovers
from experiments.cli import hydra_main

log = logging.getLogger("prunegym.train")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
CHECKPOINT_PREFIX = "iter_"
RAY_TMP_ROOT = Path("/tmp")
RAY_TMP_PREFIX = "ray"
DRIVER_MARKER = "prunegym-driver.json"  # in a run's own Ray temp dir: which process started that Ray


# ------------------------------------------------------------------------------------------ budgets
# (key, type, smallest allowed value, whether null is allowed, what the key means)
BUDGETS: tuple[tuple[str, type, float, bool, str], ...] = (
    ("stop.iterations", int, 1, True, "training iterations"),
    ("stop.env_steps", int, 1, True, "sampled env steps"),
    ("stop.time_s", float, 0.0, True, "seconds of training"),
    ("eval.episodes", int, 1, False, "held-out episodes after training"),
    ("checkpoint.every", int, 0, False, "iterations between checkpoints (0: none)"),
    ("checkpoint.keep", int, 1, False, "checkpoints kept"),
)


def check_budgets(cfg: DictConfig) -> tuple[int | None, int | None, float | None]:
    """Refuse budgets that cannot be meant (zero or negative, not numbers) before anything is built.

    ``stop.*`` may be null (no limit of that kind) but at least one must be set; ``stop.time_s``
    must be above 0, every other budget at least its minimum (``checkpoint.every=0`` turns checkpoints off).

    Returns:
        ``(iterations, env_steps, time_s)``, each ``None`` where unlimited.

    Raises:
        ValueError: A budget is out of range or not a number; the message names the key and the fix.
    """
    values: dict[str, float | None] = {}
    for key, kind, low, nullable, meaning in BUDGETS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            if not nullable:
                raise ValueError(f"{key} is not set: give {key}=<{kind.__name__}> ({meaning})")
            values[key] = None
            continue
        number = _number(value, kind)
        if number is None:
            raise ValueError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}: set {key}=<n>")
        strict = key == "stop.time_s"
        if number < low or (strict and number <= low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            unset = f", or {key}=null for no limit of that kind" if nullable else ""
            raise ValueError(
                f"{key}={value!r} is out of range: {meaning} must be {bound}; set {key}=<n {bound}>{unset}"
            )
        values[key] = number
    limits = (values["stop.iterations"], values["stop.env_steps"], values["stop.time_s"])
    if all(v is None for v in limits):
        raise ValueError("no training budget: set stop.iterations=<n>, stop.env_steps=<n> or stop.time_s=<seconds>")
    iters, steps, secs = limits
    return (
        None if iters is None else int(iters),
        None if steps is None else int(steps),
        None if secs is None else float(secs),
    )


def _number(value: Any, kind: type) -> float | None:
    """``value`` as an int (``kind is int``, integral values only) or float; ``None`` if it is neither."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if kind is int:
        return int(number) if number.is_integer() else None
    return number


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
        # Atomic: a kill while the files are rewritten leaves the old ones, not an empty one.
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()
        self.wandb = _start_wandb(run_dir, logger_cfg, config) if logger_cfg else None

    def _write_csv(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv, buf.getvalue())

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
    under ~107 characters, which a run directory under the repository easily exceeds. That folder
    holds a marker naming this process, so that a later run can tell it was left by a dead driver
    (:func:`clean_orphaned_ray`); on the way out, whatever still runs from it is stopped and it is removed.

    While the session is open, SIGTERM and SIGINT end the run through the ``finally`` blocks (Ray shut
    down, temp dir removed) instead of killing the process where it stands (:func:`exit_on_signals`).
    """
    import ray

    if ray.is_initialized():  # someone else (a test fixture, a notebook) owns the session
        yield False
        return
    runtime_env = dict(cluster.get("runtime_env") or {})
    runtime_env["env_vars"] = {**WORKER_ENV_VARS, **dict(runtime_env.get("env_vars") or {})}
    address = cluster.get("address")
    own_tmp: Path | None = None
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": bool(cluster.get("log_to_driver", False))}
    with exit_on_signals() as rearm:
        try:
            if address:
                check_reachable(str(address))
                kwargs["address"] = str(address)
            else:
                tmp = cluster.get("temp_dir")
                if not tmp:
                    own_tmp = Path(tempfile.mkdtemp(prefix=RAY_TMP_PREFIX, dir=RAY_TMP_ROOT))
                    _write_driver_marker(own_tmp, run_dir)
                    tmp = str(own_tmp)
                kwargs.update(num_cpus=int(cluster.get("num_cpus") or 2), include_dashboard=False, _temp_dir=str(tmp))
            ray.init(**kwargs)
            rearm()  # ray.init installs its own SIGTERM handlers (one aborts the process); ours again
            yield True
        finally:
            ray.shutdown()
            if own_tmp is not None:
                stop_processes_naming(own_tmp)  # anything ray.shutdown missed (a kill during ray.init)
                shutil.rmtree(own_tmp, ignore_errors=True)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) address that nothing listens on, in seconds.

    Without this, ``ray.init`` retries an unreachable GCS for many minutes. ``auto`` and addresses
    without a port are left to Ray.

    Raises:
        ValueError: Nothing accepts a connection at ``address``; the message says how to start a head.
    """
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as err:
        raise ValueError(
            f"cluster.address={address}: no Ray head answers there ({err.strerror or err}); start one with "
            f"`ray start --head --port={port}` on {host}, or set cluster.address to a running head "
            "(cluster=local starts a private Ray instead)"
        ) from None


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM / SIGINT while a Ray session is open (exit status 128 + signal)."""


@contextlib.contextmanager
def exit_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[Any]:
    """Turn ``signals`` into :class:`Terminated` in the main thread, so that every ``finally`` runs.

    The first signal raises; a second one while cleaning up gets the default action (kill), which
    leaves what :func:`clean_orphaned_ray` tidies on the next run. The previous handlers come back
    on exit. Outside the main thread (signal handlers cannot be set there) this does nothing.

    Yields:
        A function that installs the handlers again (after a library replaced them).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum: int, frame: Any) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_DFL)
        log.warning("%s received: shutting Ray down", signal.Signals(signum).name)
        raise Terminated(128 + signum)

    def arm() -> None:
        for sig in signals:
            signal.signal(sig, handler)

    arm()
    try:
        yield arm
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _write_driver_marker(temp_dir: Path, run_dir: Path) -> None:
    import psutil

    me = psutil.Process()
    atomic_write_json(
        temp_dir / DRIVER_MARKER,
        {"pid": me.pid, "create_time": me.create_time(), "run_dir": str(run_dir), "uid": os.getuid()},
    )


def _driver_alive(record: Mapping[str, Any]) -> bool:
    """Whether the process a marker names still runs (the same process: pid and start time match)."""
    import psutil

    try:
        proc = psutil.Process(int(record["pid"]))
        return abs(proc.create_time() - float(record["create_time"])) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
    except psutil.AccessDenied:  # someone else's process: alive, and not ours to judge
        return True


def stop_processes_naming(folder: str | Path, timeout: float = 10.0) -> list[int]:
    """Stop (SIGTERM, then SIGKILL after ``timeout``) this user's processes whose command line names ``folder``.

    Ray's raylet, GCS server, agents and workers all carry their session's temp dir in their
    arguments, so this stops exactly one Ray instance, never another one (unlike ``ray stop``).

    Returns:
        The pids that were stopped.
    """
    import psutil

    needle = str(Path(folder))
    me, uid = os.getpid(), os.getuid()
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            cmdline = proc.info["cmdline"] or []
            uids = proc.info["uids"]
            if proc.pid != me and (uids is None or uids.real == uid) and any(needle in arg for arg in cmdline):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in procs]


def clean_orphaned_ray(root: str | Path = RAY_TMP_ROOT) -> list[Path]:
    """Stop the processes and remove the temp dirs of private Rays whose training driver died.

    Only folders ``<root>/ray*`` that hold this module's driver marker, belong to this user, and
    whose driver process is gone are touched: a live run's Ray, a test fixture's, ``ray start``'s or
    another user's are left alone. A driver killed with SIGKILL cannot clean up after itself; this
    is what the next run does instead.

    Returns:
        The folders removed.
    """
    removed = []
    for folder in sorted(Path(root).glob(f"{RAY_TMP_PREFIX}*")):
        marker = folder / DRIVER_MARKER
        try:
            if not marker.is_file() or folder.stat().st_uid != os.getuid():
                continue
            record = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(record, dict) or _driver_alive(record):
            continue
        pids = stop_processes_naming(folder)
        shutil.rmtree(folder, ignore_errors=True)
        log.info(
            "removed the Ray temp dir %s of a dead run (pid %s); stopped %d processes",
            folder,
            record.get("pid"),
            len(pids),
        )
        removed.append(folder)
    return removed


# ------------------------------------------------------------------------------------------ checkpoints
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?:tmp|old)-\d+-[0-9a-f]+$")


def checkpoints(run_dir: Path, keep: int = 2) -> Checkpoints:
    """The run's checkpoints: ``checkpoints/iter_NNNNNN`` folders and the ``latest.json`` pointer."""
    return Checkpoints(run_dir / CHECKPOINTS, prefix=CHECKPOINT_PREFIX, keep=keep)


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The record of the newest complete checkpoint (``checkpoints/latest.json``), or ``None``.

    The record holds ``folder``, ``iteration`` and ``env_steps``.
    """
    record = checkpoints(run_dir).latest()
    if record is None:
        return None
    if "iteration" not in record:  # a pointer written by Checkpoints alone
        record["iteration"] = int(record["step"])
    return record


def save_checkpoint(trainer: Any, run_dir: Path, iteration: int, keep: int) -> Path:
    """Save into ``checkpoints/iter_NNNNNN``, then point ``latest.json`` at it, then prune old ones.

    The folder is written under a temporary name and renamed when complete, and the pointer is
    replaced atomically after that (:class:`envs.data.files.Checkpoints`): a kill at any point
    leaves ``latest.json`` naming the previous complete checkpoint or this one.
    """
    return checkpoints(run_dir, keep).save(iteration, trainer.save, iteration=iteration, env_steps=trainer.env_steps)


def clean_run_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary files and folders that writers killed mid-write left in the run directory."""
    removed: list[Path] = []
    for folder in (run_dir, run_dir / CHECKPOINTS):
        if not folder.is_dir():
            continue
        targets = {m.group("target") for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))}
        for target in sorted(targets):
            removed += clean_leftovers(folder / target)
    return removed


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
def _make_trainer(
    cfg: DictConfig, env_id: str, kwargs: dict[str, Any], probe_env: Any, info_keys: dict[str, str], train_env: Any
):
    algo = str(cfg.algo.name)
    if algo == "linucb":
        from agents.bandit import BanditTrainer

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
        policy_start=getattr(probe_env.unwrapped, "policy_start", None),
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
        ValueError: A budget is out of range (before anything is built), or the run cannot resume.
        agents.rllib.IncompatibleEnvError: The algorithm cannot take the env's action space (before Ray starts).
    """
    import torch

    limits = check_budgets(cfg)  # before anything is built or started
    run_dir = resolve_run_dir(cfg)
    env_id, kwargs = env_settings(cfg)
    info_keys = {k: str(v) for k, v in (cfg.get("info_keys") or {"accuracy": "accuracy", "cost": "cost"}).items()}
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config["env"] = {"id": env_id, "kwargs": kwargs}
    clean_orphaned_ray()  # what the private Rays of runs killed with SIGKILL left behind

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
            clean_run_leftovers(run_dir)
            if record is None:
                log.warning("resume=true but %s has no checkpoint yet: starting from scratch", run_dir)
        atomic_write_json(run_dir / "run_config.json", config, default=str)
        # What the policy is trained in, as the environment describes itself: export copies it into the card.
        train_env = make_env(env_id, {**kwargs, "split": cfg.train_split})
        atomic_write_json(run_dir / ENV_CONFIG, train_env.unwrapped.config(), default=str)
        start_iter = int(record["iteration"]) if record else 0
        max_iters, max_steps, max_time = limits

        needs_ray = str(cfg.algo.name) != "linucb"
        session = ray_session(cfg.cluster, run_dir) if needs_ray else contextlib.nullcontext()
        with session:
            trainer = _make_trainer(cfg, env_id, kwargs, eval_env, info_keys, train_env)
            if str(cfg.algo.name) != "linucb":
                train_env.close()  # RLlib's env runners hold their own environments
            try:
                if record:
                    trainer.restore(run_dir / CHECKPOINTS / record["folder"])
                    log.info(
                        "resumed from %s (iteration %d, %d env steps)", record["folder"], start_iter, trainer.env_steps
                    )
                logger = RunLogger(run_dir, cfg.get("logger"), config, start_iter)
                iteration = _loop(cfg, trainer, logger, run_dir, start_iter, limits)
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
        atomic_write_json(run_dir / "final.json", final)
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


@hydra_main(config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the held-out reward (for sweepers that optimise it)."""
    metrics = train(cfg)
    return float(metrics.get("eval/reward", float("nan")))


if __name__ == "__main__":
    main()
