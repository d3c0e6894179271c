"""Killed training runs: no Ray left behind, checkpoints that survive a kill anywhere, random kill -9 then resume.

- SIGTERM / SIGINT during a PPO run: the run shuts its private Ray down and removes Ray's temp dir
  (no process whose command line names that dir remains).
- SIGKILL: the run cannot clean up; the next run stops what its Ray left and removes the temp dir, and
  leaves alone any Ray whose driver is alive, or that is not a training run's.
- A checkpoint save killed (``os._exit`` in a forked child, so no ``finally`` runs) before each of its
  file-system steps leaves ``latest.json`` naming a complete checkpoint, and the next save tidies up.
- LinUCB (fast) and PPO (slow) runs are killed with SIGKILL at seeded random points, resumed each time,
  and checked after every kill: nothing lost beyond one checkpoint interval, no half-written file that
  loads, ``metrics.jsonl`` and ``metrics.csv`` consistent, ``latest.json`` naming a complete checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from hydra import compose, initialize_config_dir

from agents.bandit import BanditController
from experiments.train import (
    CONF_DIR,
    DRIVER_MARKER,
    RAY_TMP_ROOT,
    clean_orphaned_ray,
    clean_run_leftovers,
    latest_checkpoint,
    save_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["env=tiny", "eval.episodes=2"]
DISCRETE = "env.id=PruneGym/PerInputDiscrete-v0"
EPISODES_PER_ITERATION = 64  # conf/algo/{ppo,linucb}.yaml


def cfg_for(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=list(overrides))


def _launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [PY, "-m", "experiments.train", *TINY, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a kill may cut the last one)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _naming(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``folder``."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(
                str(folder) in a for a in proc.info["cmdline"] or []
            ):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _ray_dir_of(pid: int, timeout: float) -> Path:
    """The private Ray temp dir the training driver ``pid`` started (found by its marker)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for marker in RAY_TMP_ROOT.glob(f"ray*/{DRIVER_MARKER}"):
            try:
                if json.loads(marker.read_text())["pid"] == pid:
                    return marker.parent
            except (OSError, json.JSONDecodeError, KeyError):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no Ray temp dir with a marker of pid {pid} within {timeout} s")


def _wait_for_rows(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float, since: float = 0.0) -> None:
    """Wait until ``proc`` has logged ``n`` iterations (in a metrics.jsonl it wrote after ``since``)."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and path.stat().st_mtime >= since and len(_rows(run_dir)) >= n:
            return
        time.sleep(0.05)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"the run did not reach {n} iterations (exit {proc.poll()}):\n{out[-3000:]}")


# ------------------------------------------------------------------------------------------ signals
def _signal_mid_run(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "algo=ppo", "stop.iterations=500", "checkpoint.every=0")
    try:
        ray_dir = _ray_dir_of(proc.pid, timeout=120)
        _wait_for_rows(proc, run_dir, 1, timeout=180)
        assert _naming(ray_dir), "the run's Ray (raylet, GCS) should be running"
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out[-3000:]
    assert f"{sig.name} received: shutting Ray down" in out
    assert _naming(ray_dir) == [], "Ray processes of the stopped run remain"
    assert not ray_dir.exists()


def test_sigterm_shuts_ray_down(tmp_path):
    _signal_mid_run(tmp_path, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_shuts_ray_down(tmp_path):
    _signal_mid_run(tmp_path, signal.SIGINT)


def test_next_run_removes_what_a_sigkilled_run_left(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "algo=ppo", "stop.iterations=500", "checkpoint.every=0")
    try:
        ray_dir = _ray_dir_of(proc.pid, timeout=120)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not _naming(ray_dir):
            time.sleep(0.05)  # killed as soon as its Ray runs: the leftovers are the same later on
        assert proc.poll() is None and _naming(ray_dir), "the run's Ray did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ray_dir.is_dir() and (ray_dir / DRIVER_MARKER).is_file()  # what a SIGKILL leaves
    train(cfg_for(*TINY, DISCRETE, "algo=linucb", "stop.iterations=1", f"run_dir={tmp_path / 'next'}"))
    assert not ray_dir.exists()
    assert _naming(ray_dir) == []


def _sleeper(folder: Path) -> subprocess.Popen:
    """A stand-in for a raylet: a process whose command line names ``folder``."""
    return subprocess.Popen([PY, "-c", "import time; time.sleep(300)", f"--temp-dir={folder}"])


def _marker(folder: Path, pid: int, create_time: float) -> None:
    folder.mkdir()
    (folder / DRIVER_MARKER).write_text(json.dumps({"pid": pid, "create_time": create_time}))


def test_orphan_cleanup_spares_live_and_foreign_sessions(tmp_path):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead_time = psutil.Process(dead.pid).create_time() if psutil.pid_exists(dead.pid) else time.time()
    dead.wait()
    me = psutil.Process()
    _marker(tmp_path / "ray_dead", dead.pid, dead_time)  # a driver that died
    _marker(tmp_path / "ray_reused", me.pid, me.create_time() - 1000)  # its pid now belongs to another process
    _marker(tmp_path / "ray_live", me.pid, me.create_time())  # a driver that runs
    (tmp_path / "ray_foreign").mkdir()  # `ray start`, a test fixture: no marker
    procs = {name: _sleeper(tmp_path / name) for name in ("ray_dead", "ray_reused", "ray_live", "ray_foreign")}
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not all(_naming(tmp_path / n) for n in procs):
            time.sleep(0.05)
        removed = clean_orphaned_ray(tmp_path)
        assert sorted(p.name for p in removed) == ["ray_dead", "ray_reused"]
        for name in ("ray_dead", "ray_reused"):
            assert procs[name].wait(15) is not None and not (tmp_path / name).exists()
        for name in ("ray_live", "ray_foreign"):
            assert procs[name].poll() is None and (tmp_path / name).is_dir()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ checkpoint save
class FakeTrainer:
    """Writes a checkpoint of two files, the larger first (a torn write of it is detectable)."""

    PAYLOAD = bytes(range(256)) * 64

    def __init__(self, iteration: int) -> None:
        self.env_steps = EPISODES_PER_ITERATION * iteration

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights.bin").write_bytes(self.PAYLOAD)
        (folder / "state.json").write_text(json.dumps({"env_steps": self.env_steps}))


def _complete(folder: Path, iteration: int) -> bool:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    weights = folder / "weights.bin"
    return (
        weights.is_file()
        and weights.read_bytes() == FakeTrainer.PAYLOAD
        and state["env_steps"] == EPISODES_PER_ITERATION * iteration
    )


KILLED = 77


def _save_killed_at(run_dir: Path, iteration: int, keep: int, kill_at: int) -> int:
    """Run ``save_checkpoint`` in a forked child that dies (``os._exit``) before its ``kill_at``-th step.

    A step is a call of ``Path.mkdir``, ``Path.write_bytes``, ``Path.write_text``, ``os.replace`` or
    ``shutil.rmtree``; a write that is killed leaves the first half of its data. ``kill_at=0`` never
    kills. Returns the child's exit status: ``KILLED``, or (no kill) the number of steps it took.
    """
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no finally, no atexit beyond this point
        try:
            count = [0]

            def step(name, real):
                def wrapped(*args, **kwargs):
                    count[0] += 1
                    if count[0] == kill_at:
                        if name in ("write_bytes", "write_text"):
                            path, data = Path(args[0]), args[1]
                            with open(path, "wb" if name == "write_bytes" else "w") as fh:
                                fh.write(data[: len(data) // 2])
                        os._exit(KILLED)
                    return real(*args, **kwargs)

                return wrapped

            for name in ("mkdir", "write_bytes", "write_text"):
                setattr(Path, name, step(name, getattr(Path, name)))
            os.replace = step("replace", os.replace)
            shutil.rmtree = step("rmtree", shutil.rmtree)
            save_checkpoint(FakeTrainer(iteration), run_dir, iteration, keep)
            os._exit(min(count[0], 250))
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+-[0-9a-f]+$")  # envs.data.files' temporary names


def _hidden(run_dir: Path) -> list[Path]:
    """Temporary files and folders of writers that were killed, anywhere in the run directory."""
    return sorted(p for p in run_dir.rglob(".*") if LEFTOVER.match(p.name))


@pytest.mark.parametrize("resave", [False, True], ids=["new-checkpoint", "checkpoint-saved-again"])
def test_checkpoint_save_survives_a_kill_at_every_step(tmp_path, resave):
    """``resave``: iteration 4 exists already (a resumed run saves it again), so the old one is moved aside."""

    def prepare(run_dir: Path) -> None:
        run_dir.mkdir()
        save_checkpoint(FakeTrainer(2), run_dir, 2, keep=2)
        if resave:
            save_checkpoint(FakeTrainer(4), run_dir, 4, keep=2)
            save_checkpoint(FakeTrainer(2), run_dir, 2, keep=2)  # latest -> 2, iter 4 still on disk

    probe = tmp_path / "probe"
    prepare(probe)
    steps = _save_killed_at(probe, 4, 1, kill_at=0)
    assert 5 <= steps < 250, steps
    assert latest_checkpoint(probe)["iteration"] == 4
    for kill_at in range(1, steps + 1):
        run_dir = tmp_path / f"kill{kill_at}"
        prepare(run_dir)
        assert _save_killed_at(run_dir, 4, 1, kill_at) == KILLED
        record = latest_checkpoint(run_dir)
        assert record is not None and record["iteration"] in (2, 4), (kill_at, record)
        assert _complete(run_dir / "checkpoints" / record["folder"], record["iteration"]), kill_at
        for folder in (run_dir / "checkpoints").glob("iter_*"):  # every folder a reader could pick is complete
            assert _complete(folder, int(folder.name.removeprefix("iter_"))), (kill_at, folder)
        # The resumed run saves again: it works, and the dead writer's leftovers go.
        save_checkpoint(FakeTrainer(4), run_dir, 4, keep=1)
        clean_run_leftovers(run_dir)
        assert latest_checkpoint(run_dir)["iteration"] == 4
        assert _complete(run_dir / "checkpoints" / "iter_000004", 4)
        assert _hidden(run_dir) == [], (kill_at, _hidden(run_dir))


# ------------------------------------------------------------------------------------------ random kill -9
def _check_after_kill(run_dir: Path, every: int, algo: str) -> tuple[int, int]:
    """The invariants a SIGKILL must not break; returns (iterations logged, iteration of the checkpoint)."""
    rows = _rows(run_dir)
    iters = [r["iteration"] for r in rows]
    assert iters == list(range(1, len(iters) + 1)), iters  # no gap, nothing twice
    with open(run_dir / "metrics.csv", newline="") as fh:
        csv_iters = [int(r["iteration"]) for r in csv.DictReader(fh)]
    assert csv_iters in (iters, iters[:-1]), (csv_iters, iters)  # the csv lags the jsonl by one row at most
    for path in run_dir.rglob("*.json"):  # no visible JSON file is half-written
        if not any(part.startswith(".") for part in path.relative_to(run_dir).parts):
            json.loads(path.read_text())
    record = latest_checkpoint(run_dir)
    if record is None:
        assert len(iters) <= every
        return len(iters), 0
    folder = run_dir / "checkpoints" / record["folder"]
    assert record["env_steps"] == EPISODES_PER_ITERATION * record["iteration"]
    if algo == "linucb":
        BanditController.load(folder / "bandit.json")
        assert json.loads((folder / "trainer.json").read_text())["env_steps"] == record["env_steps"]
    else:
        assert json.loads((folder / "prunegym_trainer.json").read_text())["env_steps"] == record["env_steps"]
    assert len(iters) - record["iteration"] <= every  # at most one checkpoint interval lost
    return len(iters), int(record["iteration"])


def _random_kills(tmp_path: Path, overrides: list[str], *, total: int, every: int, kills: int, seed: int) -> int:
    """Kill a run with SIGKILL ``kills`` times at seeded random points, resuming after each; returns the kills."""
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    algo = next(o.split("=", 1)[1] for o in overrides if o.startswith("algo="))
    budget = [f"stop.iterations={total}", f"checkpoint.every={every}"]
    saved, done, killed, points = 0, 0, 0, []
    while killed < kills:
        started = time.time()  # the old metrics.jsonl is older: wait for the one this process writes
        proc = _launch(run_dir, *overrides, *budget, *(["resume=true"] if killed else []))
        try:
            # Kill after a random number of iterations past the checkpoint the run resumed from (spread so that
            # every kill has room before the end), plus a random fraction of an iteration, so that kills land
            # mid-iteration and mid-checkpoint alike.
            high = min(total - 3, saved + max(1, (total - 3 - saved) // (kills - killed)))
            target = rng.randint(min(saved + 1, high), high)
            _wait_for_rows(proc, run_dir, target, timeout=300, since=started)
            rows = _rows(run_dir)
            time.sleep(rng.uniform(0.0, 1.2) * float(rows[-1]["iter_time_s"]))
            assert proc.poll() is None, f"the run ended before the kill:\n{proc.stdout.read()[-3000:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        killed += 1
        done, saved = _check_after_kill(run_dir, every, algo)
        points.append((target, done, saved))
        assert done < total
    proc = _launch(run_dir, *overrides, *budget, "resume=true")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    if saved:
        assert f"resumed from iter_{saved:06d}" in out
    rows = _rows(run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, total + 1))  # lost iterations re-run, none twice
    steps = [r["env_steps"] for r in rows]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    with open(run_dir / "metrics.csv", newline="") as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == list(range(1, total + 1))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["iterations"] == total and np.isfinite(final["eval"]["reward"])
    assert _hidden(run_dir) == []  # no temporary file of a killed writer is left
    print(f"{killed} kills (target iteration, iterations logged, checkpoint) = {points}")
    return killed


@pytest.mark.slow
def test_linucb_survives_random_kills(tmp_path):
    assert _random_kills(tmp_path, ["algo=linucb", DISCRETE], total=12, every=2, kills=3, seed=0) == 3


@pytest.mark.slow
def test_ppo_survives_random_kills(tmp_path):
    assert _random_kills(tmp_path, ["algo=ppo"], total=16, every=2, kills=2, seed=1) == 2
