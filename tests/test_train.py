"""Training through Hydra: every algorithm on the tiny PerInput env, refusals, resume, multirun, a Ray cluster.

Fast set: PPO (Box) and LinUCB (Discrete) train, the invalid combinations are refused before Ray starts,
and a LinUCB run killed with SIGKILL resumes. The other algorithm x env pairs, the PPO resume, the
multirun and the cluster test are ``slow``.

Ray's temp dir is a short ``/tmp/rayXXXX`` (tempfile.mkdtemp), not under ``tmp_path``: Ray puts unix
sockets there and their paths must stay under ~107 characters, which pytest's tmp paths plus Ray's
session folder names exceed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from agents.rllib import WORKER_ENV_VARS, IncompatibleEnvError, check_compatible, env_catalog, variant_ids
from experiments.train import CONF_DIR, train

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["env=tiny", "eval.episodes=4", "checkpoint.every=1"]
DISCRETE = "env.id=PruneGym/PerInputDiscrete-v0"
STAGED_TINY = [  # conf/env/staged*.yaml on the tiny model
    "env.kwargs.model=tiny-llama",
    "env.kwargs.task=generated",
    "env.kwargs.n_items=8",
    "env.kwargs.probe_layers=1",
    "env.kwargs.probe_dim=8",
    "env.kwargs.calibrate_cost=true",
    "eval.episodes=4",
]


def cfg_for(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="session")
def ray_cluster():
    """One private Ray for the in-process tests; always shut down (train() leaves a running Ray alone)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tmp,
        log_to_driver=False,
        runtime_env={"env_vars": dict(WORKER_ENV_VARS)},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _check_run(run_dir: Path, metrics: dict, iterations: int) -> None:
    assert metrics["iterations"] == iterations
    assert metrics["env_steps"] > 0
    for key in ("eval/reward", "eval/accuracy", "eval/cost", "train/reward"):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith("iteration,")
    final = json.loads((run_dir / "final.json").read_text())
    assert final["eval_split"] == "test" and final["eval"]["episodes"] == 4
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["iteration"] == iterations


# ------------------------------------------------------------------------------------------ refusals (no Ray)
def test_configs_compose():
    for algo in ("ppo", "appo", "impala", "sac", "dqn", "linucb"):
        cfg = cfg_for(f"algo={algo}", "experiment=smoke", "logger=wandb", "cluster=remote")
        assert cfg.algo.name == algo and cfg.model.name == "tiny-llama" and cfg.stop.iterations == 3
        assert cfg.logger.mode == "offline" and cfg.cluster.address == "auto"
    main = cfg_for("experiment=main")
    assert main.stop.env_steps > 0 and main.model.name == "smollm2-135m"


@pytest.mark.parametrize(
    ("algo", "space", "env_id", "needle"),
    [
        ("dqn", gym.spaces.Box(0, 1, (6,)), "PruneGym/PerInput-v0", "env=per_input_discrete"),
        ("linucb", gym.spaces.Box(0, 1, (6,)), "PruneGym/PerInput-v0", "env=per_input_discrete"),
        ("sac", gym.spaces.MultiDiscrete([3, 3]), "PruneGym/LayerByLayerDiscrete-v0", "env=layer_by_layer "),
        ("dqn", gym.spaces.Box(0, 1, (6,)), "PruneGym/PerInputMeasured-v0", "PerInputDiscreteMeasured-v0"),
        ("linucb", gym.spaces.Discrete(4), "PruneGym/LayerByLayerDiscrete-v0", "one-step"),
    ],
)
def test_incompatible_pairs_are_refused(algo, space, env_id, needle):
    with pytest.raises(IncompatibleEnvError) as err:
        check_compatible(algo, env_id, space, env_catalog(CONF_DIR))
    assert needle in str(err.value) and algo.upper() in str(err.value)


def test_compatible_pairs_pass():
    for algo in ("ppo", "appo", "impala", "sac"):
        check_compatible(algo, "PruneGym/PerInput-v0", gym.spaces.Box(0, 1, (6,)))
    for algo in ("ppo", "appo", "impala", "sac", "dqn", "linucb"):
        check_compatible(algo, "PruneGym/PerInputDiscrete-v0", gym.spaces.Discrete(10))
    with pytest.raises(ValueError, match="unknown algorithm"):
        check_compatible("a3c", "PruneGym/PerInput-v0", gym.spaces.Discrete(2))
    assert variant_ids("PruneGym/PerInputDiscrete-v0", "box") == ["PruneGym/PerInput-v0"]


def test_refused_before_ray_starts(tmp_path):
    import ray

    assert not ray.is_initialized()
    cfg = cfg_for(*TINY, "algo=dqn", f"run_dir={tmp_path}")
    with pytest.raises(IncompatibleEnvError, match=r"DQN needs a discrete action space.*env=per_input_discrete"):
        train(cfg)
    assert not ray.is_initialized()
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ training
def test_linucb_trains_one_iteration(tmp_path):
    metrics = train(cfg_for(*TINY, DISCRETE, "algo=linucb", "stop.iterations=1", f"run_dir={tmp_path}"))
    _check_run(tmp_path, metrics, 1)
    state = json.loads((tmp_path / "checkpoints" / "iter_000001" / "bandit.json").read_text())
    assert state["format"] == "prunegym-bandit-v1" and len(state["A"]) == 10


def test_ppo_trains_one_iteration(tmp_path, ray_cluster):
    metrics = train(cfg_for(*TINY, "algo=ppo", "stop.iterations=1", f"run_dir={tmp_path}"))
    _check_run(tmp_path, metrics, 1)
    assert metrics["train/episodes"] == 64  # one-step episodes, 64 per iteration
    assert ray_cluster.is_initialized()  # a Ray train() did not start is left running


def test_smoke_experiment_trains(tmp_path, ray_cluster):
    """The README's ``experiment=smoke``: the tiny env as a whole (its num_groups fit the tiny model)."""
    metrics = train(cfg_for("experiment=smoke", "stop.iterations=1", "eval.episodes=4", f"run_dir={tmp_path}"))
    _check_run(tmp_path, metrics, 1)
    assert json.loads((tmp_path / "run_config.json").read_text())["env"]["kwargs"]["model"] == "tiny-llama"


SLOW_PAIRS = [
    ("ppo", "PruneGym/PerInputDiscrete-v0"),
    ("appo", "PruneGym/PerInput-v0"),
    ("appo", "PruneGym/PerInputDiscrete-v0"),
    ("impala", "PruneGym/PerInput-v0"),
    ("impala", "PruneGym/PerInputDiscrete-v0"),
    ("sac", "PruneGym/PerInput-v0"),
    ("sac", "PruneGym/PerInputDiscrete-v0"),
    ("dqn", "PruneGym/PerInputDiscrete-v0"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "env_id"), SLOW_PAIRS)
def test_every_algorithm_trains_one_iteration(algo, env_id, tmp_path, ray_cluster):
    metrics = train(cfg_for(*TINY, f"algo={algo}", f"env.id={env_id}", "stop.iterations=1", f"run_dir={tmp_path}"))
    _check_run(tmp_path, metrics, 1)


def test_wandb_offline_logging(tmp_path):
    os.environ.pop("WANDB_MODE", None)
    cfg = cfg_for(*TINY, DISCRETE, "algo=linucb", "stop.iterations=2", "logger=wandb", f"run_dir={tmp_path}")
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


# ------------------------------------------------------------------------------------------ resume
def _launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [PY, "-m", "experiments.train", *TINY, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_then_resume(tmp_path: Path, overrides: list[str], total: int, every: int, kill_after: int, timeout: float):
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest.json"
    proc = _launch(run_dir, *overrides, f"stop.iterations={total}", f"checkpoint.every={every}")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and json.loads(latest.read_text())["iteration"] >= kill_after:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()}"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up or checkpoint
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    done_before_kill = max(r["iteration"] for r in rows)
    saved = json.loads(latest.read_text())["iteration"]
    assert done_before_kill < total
    assert done_before_kill - saved <= every  # at most one checkpoint interval lost

    resumed = _launch(run_dir, *overrides, f"stop.iterations={total}", f"checkpoint.every={every}", "resume=true")
    out, _ = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, out
    assert f"resumed from iter_{saved:06d}" in out
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, total + 1))  # lost iterations re-run, none counted twice
    steps = [r["env_steps"] for r in rows]
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["iterations"] == total and np.isfinite(final["eval"]["reward"])


def test_linucb_resumes_after_sigkill(tmp_path):
    _kill_then_resume(tmp_path, ["algo=linucb", DISCRETE], total=12, every=2, kill_after=3, timeout=120)


@pytest.mark.slow
def test_ppo_resumes_after_sigkill(tmp_path):
    _kill_then_resume(tmp_path, ["algo=ppo"], total=30, every=2, kill_after=3, timeout=300)


def test_resume_refuses_other_settings(tmp_path):
    train(cfg_for(*TINY, DISCRETE, "algo=linucb", "stop.iterations=1", f"run_dir={tmp_path}"))
    with pytest.raises(ValueError, match="seed differs"):
        train(
            cfg_for(*TINY, DISCRETE, "algo=linucb", "stop.iterations=2", "seed=5", "resume=true", f"run_dir={tmp_path}")
        )


# ------------------------------------------------------------------------------------------ multirun
@pytest.mark.slow
def test_multirun_two_jobs_then_compare(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [PY, "-m", "experiments.train", "-m", *TINY, DISCRETE, "algo=ppo,linucb", "stop.iterations=2"]
    cmd.append(f"hydra.sweep.dir={sweep}")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    finals = sorted(sweep.rglob("final.json"))
    assert len(finals) == 2
    assert {json.loads(p.read_text())["algo"] for p in finals} == {"ppo", "linucb"}
    res = subprocess.run([PY, "-m", "experiments.compare", str(sweep)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    table = (sweep / "compare.md").read_text()
    assert "| ppo |" in table and "| linucb |" in table and "Equal budget" in table
    assert (sweep / "compare.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ Ray cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_head(temp_dir: str) -> None:
    """Kill exactly the head's processes: those whose command line names this head's own temp dir.

    Not `ray stop`: it stops every Ray process on the host, other tests' included.
    """
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.mark.slow
def test_joins_an_existing_cluster(tmp_path, monkeypatch):
    """A head on 127.0.0.1 started here; train() joins it with cluster.address and a remote env runner."""
    import ray

    # Token auth off for this private loopback head, on both sides (the head would otherwise issue its own token).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process (run this test on its own: -m slow -k cluster)")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    ray_bin = str(Path(PY).with_name("ray"))
    env = {**os.environ, **WORKER_ENV_VARS}
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        res = subprocess.run(start, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        cfg = cfg_for(
            *TINY,
            "algo=ppo",
            "stop.iterations=1",
            "cluster=remote",
            f"cluster.address=127.0.0.1:{port}",
            "cluster.num_env_runners=1",
            f"run_dir={tmp_path}",
        )
        metrics = train(cfg)
        _check_run(tmp_path, metrics, 1)
        assert not ray.is_initialized()  # train() disconnected from the cluster it joined
    finally:
        _kill_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ppo_starts_at_the_dense_plan(ray_cluster):
    import numpy as np

    from agents.rllib import RLlibTrainer, greedy_policy, make_env
    from experiments.train import env_settings

    cfg = cfg_for(*TINY, "algo=ppo")
    env_id, kwargs = env_settings(cfg)
    env = make_env(env_id, kwargs)
    from omegaconf import OmegaConf

    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True)
    trainer = RLlibTrainer(algo_cfg, env_id, kwargs, env.action_space, seed=0)
    try:
        act = greedy_policy(trainer.algo, env.action_space)
        obs, _ = env.reset(seed=0)
        assert np.allclose(act(obs), 1.0, atol=1e-3)  # every keep fraction at 1: the dense plan
        algo_cfg.pop("init_policy")
        plain = RLlibTrainer(algo_cfg, env_id, kwargs, env.action_space, seed=0)
        try:
            assert not np.allclose(greedy_policy(plain.algo, env.action_space)(obs), 1.0, atol=0.05)
        finally:
            plain.stop()
    finally:
        trainer.stop()


def test_staged_ppo_starts_running_on_with_the_groups_dense(ray_cluster):
    """The staged env's policy start: stop entry below the threshold (runs on), keep fractions at 1."""
    import numpy as np
    from omegaconf import OmegaConf

    from agents.rllib import RLlibTrainer, greedy_policy, make_env
    from envs.staged import STOP_START
    from experiments.train import env_settings

    cfg = cfg_for("algo=ppo", "env=staged", *STAGED_TINY)
    env_id, kwargs = env_settings(cfg)
    env = make_env(env_id, kwargs)
    algo_cfg = OmegaConf.to_container(cfg.algo, resolve=True)
    trainer = RLlibTrainer(algo_cfg, env_id, kwargs, env.action_space, seed=0, policy_start=env.unwrapped.policy_start)
    try:
        obs, _ = env.reset(seed=0)
        start = greedy_policy(trainer.algo, env.action_space)(obs)
        assert np.allclose(start, [STOP_START, 1.0, 1.0, 1.0], atol=0.01)
        _, _, done, _, _ = env.step(start)
        assert not done  # it ran the first group instead of stopping after the probe
    finally:
        trainer.stop()
