"""Configuration checks of the training entry points: budgets, the smoke experiment, one-line errors.

Budgets are refused before Ray starts and before any environment or model is built (``make_env`` and
``ray_session`` are replaced by functions that fail the test). The one-line errors are checked on the
real commands (``python -m experiments.train | main | prepare``) in subprocesses; each stops at its
config error within seconds, before any training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import experiments.train as train_mod
from agents.rllib import make_env
from experiments.cli import one_line
from experiments.train import CONF_DIR, check_budgets, env_settings, train

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def cfg_for(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=list(overrides))


# ------------------------------------------------------------------------------------------ budgets
BAD_BUDGETS = [
    ("stop.iterations=0", "stop.iterations"),
    ("stop.iterations=-3", "stop.iterations"),
    ("stop.env_steps=-64", "stop.env_steps"),
    ("stop.time_s=0", "stop.time_s"),
    ("stop.time_s=-1.5", "stop.time_s"),
    ("stop.iterations=2.5", "stop.iterations"),
    ("stop.iterations=many", "stop.iterations"),
    ("eval.episodes=0", "eval.episodes"),
    ("eval.episodes=-1", "eval.episodes"),
    ("checkpoint.every=-1", "checkpoint.every"),
    ("checkpoint.keep=0", "checkpoint.keep"),
]


@pytest.mark.parametrize(("override", "key"), BAD_BUDGETS)
def test_bad_budgets_are_refused_before_anything_is_built(override, key, tmp_path, monkeypatch):
    import ray

    def must_not_run(*args, **kwargs):
        raise AssertionError("an environment or Ray was started before the budgets were checked")

    monkeypatch.setattr(train_mod, "make_env", must_not_run)
    monkeypatch.setattr(train_mod, "ray_session", must_not_run)
    ray_before = ray.is_initialized()  # another test module's Ray fixture may hold a session in this process
    cfg = cfg_for("env=tiny", "algo=ppo", override, f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"{key}=") and f"set {key}=" in message  # names the key and the fix
    assert ray.is_initialized() == ray_before
    assert not (tmp_path / "run").exists()  # not even the run directory


def test_no_budget_at_all_is_refused():
    cfg = cfg_for("env=tiny", "stop.iterations=null")
    with pytest.raises(ValueError, match=r"no training budget: set stop.iterations=<n>, stop.env_steps"):
        check_budgets(cfg)


def test_good_budgets_pass():
    assert check_budgets(cfg_for("env=tiny", "stop.iterations=3")) == (3, None, None)
    cfg = cfg_for("env=tiny", "stop.iterations=null", "stop.env_steps=128", "stop.time_s=2", "checkpoint.every=0")
    assert check_budgets(cfg) == (None, 128, 2.0)


# ------------------------------------------------------------------------------------------ smoke experiment
def test_smoke_experiment_is_a_consistent_tiny_run():
    """experiment=smoke selects the tiny env as a whole: its kwargs fit the tiny model, so the env builds."""
    cfg = cfg_for("experiment=smoke")
    env_id, kwargs = env_settings(cfg)
    assert kwargs["model"] == "tiny-llama" and cfg.model.name == "tiny-llama"
    assert cfg.stop.iterations <= 3 and cfg.eval.episodes <= 8
    env = make_env(env_id, {**kwargs, "split": cfg.eval.split})
    try:
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
    finally:
        env.close()
    # A command-line env still wins over the experiment's (Hydra's rule for group overrides).
    assert env_settings(cfg_for("experiment=smoke", "env=per_input_discrete"))[0] == "PruneGym/PerInputDiscrete-v0"


# ------------------------------------------------------------------------------------------ one-line errors
def _run(module: str, *args: str, full: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [PY, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "HYDRA_FULL_ERROR=1 for a complete" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["stop.iterations=-1"], "stop.iterations=-1 is out of range"),
        (["no_such_key=1"], "Could not override 'no_such_key'. To append to your config use +no_such_key=1"),
        (["env=no_such_env"], "Could not find 'env/no_such_env'; Available options in 'env': layer_by_layer"),
        pytest.param(["algo=dqn", "env=tiny"], "DQN needs a discrete action space", marks=pytest.mark.slow),
    ],
)
def test_train_config_errors_are_one_line(args, needle, tmp_path):
    line = _one_error_line(_run("experiments.train", *args, f"hydra.run.dir={tmp_path / 'run'}"))
    assert needle in line


def test_full_error_shows_the_traceback(tmp_path):
    res = _run("experiments.train", "stop.iterations=-1", f"hydra.run.dir={tmp_path}", full=True)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "ValueError: stop.iterations=-1 is out of range" in res.stderr


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("experiments.main", ["no_such_key=1"], "Could not override 'no_such_key'"),
        ("experiments.main", ["model.name=no-such-model"], "unknown model 'no-such-model'"),
        ("experiments.main", ["staged.deltas=[0.05,1.5]"], "staged.deltas must be a non-empty list in (0, 1)"),
        ("experiments.main", ["train_workers=0"], "train_workers / threads: workers must be >= 1, got 0"),
        ("experiments.prepare", ["no_such_key=1"], "Could not override 'no_such_key'"),
        ("experiments.prepare", ["model=no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_main_and_prepare_config_errors_are_one_line(module, args, needle, tmp_path):
    line = _one_error_line(_run(module, *args, f"hydra.run.dir={tmp_path / 'run'}"))
    assert needle in line


def test_one_line_keeps_the_key_of_omegaconf_errors():
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create({"stop": {"iterations": 1}})
    OmegaConf.set_struct(cfg, True)
    with pytest.raises(OmegaConfBaseException) as err:
        cfg.stop.iteratons  # noqa: B018 (the typo is the point)
    assert one_line(err.value) == "Key 'iteratons' is not in struct (key stop.iteratons)"
    assert one_line(ValueError("first\n  second\n\nthird.")) == "first; second; third."


def test_an_unreachable_cluster_address_is_refused_at_once():
    import socket

    from experiments.train import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")  # something listens: left to Ray
        check_reachable(f"ray://127.0.0.1:{port}")
    with pytest.raises(ValueError, match=rf"cluster.address=127.0.0.1:{port}: no Ray head answers there.*ray start"):
        check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto")  # Ray finds the cluster itself


def test_the_risk_controlled_stop_has_one_set_of_defaults():
    """The main job (deltas null), experiments.evaluate and fit_stop_rules read the same deltas and epsilon."""
    import inspect

    from agents.staged import RISK_DELTAS, RISK_EPSILON, fit_stop_rules
    from experiments.evaluate import parser
    from experiments.main import risk_settings

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        default = compose("main")
        chosen = compose("main", overrides=["staged.deltas=[0.2]", "staged.epsilon=0.1"])
    assert risk_settings(default) == (RISK_DELTAS, RISK_EPSILON)
    assert risk_settings(chosen) == ((0.2,), 0.1)
    args = parser().parse_args(["--stop-rules"])
    assert (tuple(args.deltas), args.epsilon) == (RISK_DELTAS, RISK_EPSILON)
    sig = inspect.signature(fit_stop_rules).parameters
    assert (sig["deltas"].default, sig["epsilon"].default) == (RISK_DELTAS, RISK_EPSILON)


def test_the_stop_rules_fit_on_one_default_count():
    """The main job (fit_items null) and experiments.evaluate fit the stop rules on the same train inputs."""
    from agents.staged import STOP_FIT_ITEMS
    from experiments.evaluate import parser
    from experiments.main import fit_items

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        default = compose("main")
        chosen = compose("main", overrides=["staged.fit_items=64"])
        bad = compose("main", overrides=["staged.fit_items=0"])
    assert fit_items(default) == STOP_FIT_ITEMS == parser().parse_args(["--stop-rules"]).fit_items
    assert fit_items(chosen) == 64
    with pytest.raises(ValueError, match="staged.fit_items must be >= 1"):
        fit_items(bad)


def test_the_main_job_shares_its_training_among_processes_by_budget(monkeypatch):
    """One process per thread of the model's (at most the cores); longest budgets first; the fit where least is left."""
    import envs.measure.meters as meters
    from experiments.main import _log_prefix, balanced_queues, training_jobs, training_workers

    monkeypatch.setattr(meters, "usable_cores", lambda: 2)
    assert training_workers(2, 8) == (2, 1)
    assert training_workers(4, 8) == (2, 2)  # no more processes than cores
    assert training_workers(2, 8, 1) == (1, 2)
    assert training_workers(2, 1) == (1, 2)  # one job: one process with every thread
    assert training_workers(4, 8, 4) == (4, 1)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        training_workers(2, 8, 0)

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("main")
    jobs = training_jobs(cfg)
    assert [j[0] for j in jobs] == ["ppo"] * 2 + ["linucb"] * 3 + ["staged_ppo", "staged_dqn"]
    budgets: list[float | None] = [b for _, _, b in jobs] + [None]
    queues = balanced_queues(budgets, 2)
    assert sorted(i for q in queues for i in q) == list(range(len(budgets)))
    assert all(q == sorted(q) for q in queues)
    loads = [sum(budgets[i] or 0.0 for i in q) for q in queues]
    assert abs(loads[0] - loads[1]) <= max(b for b in budgets if b is not None)
    fit_queue = next(k for k, q in enumerate(queues) if len(budgets) - 1 in q)
    assert loads[fit_queue] == min(loads)  # the untimed fit joins the queue with the least budget
    assert balanced_queues([5.0, None], 3) == [[0], [1]]  # no empty queues

    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("prunegym.test_prefix")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    with _log_prefix("ppo_lam1"):
        logger.info("iter %d", 1)
    logger.info("after")
    assert records == ["[ppo_lam1] iter 1", "after"]
