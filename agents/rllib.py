"""RLlib (new API stack) algorithm building for PruneGym environments, and the action-space checks.

Everything here is plain Python over a config mapping, so it is usable without Hydra:

- :data:`ALGORITHMS` says which action spaces each algorithm takes; :func:`check_compatible` refuses
  a mismatch with one message naming the environment variant that fits, *before* Ray starts.
- :func:`env_creator` builds the environment inside an env runner (each runner holds its own model).
- :func:`build_config` turns the ``algo`` / ``cluster`` / ``hardware`` config groups into an RLlib
  ``AlgorithmConfig`` on the new API stack (RLModule / Learner / EnvRunner).
- :func:`_callbacks_class` records each episode's task accuracy and cost from the env's ``info``.
- :func:`greedy_policy` turns a trained algorithm into ``obs -> action`` with exploration off, for the
  held-out evaluation.

Threads: learners run single-threaded (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``): on
the 2-core reference machine a small MLP learner with 2 threads was about 10x slower, because the
threads fight the env's LLM forward for the same cores. The env's forward gets its own thread count
through the env kwargs (``hardware.env_kwargs``), so the LLM keeps the cores it needs.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

# Environment variables every Ray worker starts with (runtime_env) and the driver sets for itself.
WORKER_ENV_VARS = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


class IncompatibleEnvError(ValueError):
    """The algorithm cannot take the environment's action space; the message names one that fits."""


@dataclass(frozen=True)
class AlgoSpec:
    """What an algorithm is and which action spaces it takes.

    Attributes:
        name: The ``algo=`` name.
        config_class: ``module:Class`` of its RLlib ``AlgorithmConfig`` (``None`` for non-RLlib controllers).
        spaces: Action space kinds it takes: ``"box"``, ``"discrete"``, ``"multidiscrete"``.
        one_step: Whether it only handles one-step (contextual bandit) episodes.
    """

    name: str
    config_class: str | None
    spaces: tuple[str, ...]
    one_step: bool = False


ALGORITHMS: dict[str, AlgoSpec] = {
    "ppo": AlgoSpec("ppo", "ray.rllib.algorithms.ppo:PPOConfig", ("box", "discrete", "multidiscrete")),
    "appo": AlgoSpec("appo", "ray.rllib.algorithms.appo:APPOConfig", ("box", "discrete", "multidiscrete")),
    "impala": AlgoSpec("impala", "ray.rllib.algorithms.impala:IMPALAConfig", ("box", "discrete", "multidiscrete")),
    # RLlib 2.60's new-stack SAC learner has a discrete loss as well as the continuous one, but no MultiDiscrete.
    "sac": AlgoSpec("sac", "ray.rllib.algorithms.sac:SACConfig", ("box", "discrete")),
    "dqn": AlgoSpec("dqn", "ray.rllib.algorithms.dqn:DQNConfig", ("discrete",)),
    "linucb": AlgoSpec("linucb", None, ("discrete",), one_step=True),
}

# Ids of environments whose episodes last more than one step (a contextual bandit cannot train on them).
MULTI_STEP_ENVS = ("LayerByLayer", "PerToken")

_SPACE_WORDS = {
    "box": "a continuous (Box) action space",
    "discrete": "a discrete action space",
    "multidiscrete": "a MultiDiscrete action space",
}


def space_kind(space: gym.Space) -> str:
    """``"box"``, ``"discrete"``, ``"multidiscrete"`` or the space's class name for anything else."""
    if isinstance(space, gym.spaces.Box):
        return "box"
    if isinstance(space, gym.spaces.Discrete):
        return "discrete"
    if isinstance(space, gym.spaces.MultiDiscrete):
        return "multidiscrete"
    return type(space).__name__


def env_catalog(conf_dir: str | Path) -> dict[str, str]:
    """Map each env id to the name of the ``conf/env/<name>.yaml`` that selects it (first by name)."""
    from omegaconf import OmegaConf

    catalog: dict[str, str] = {}
    folder = Path(conf_dir) / "env"
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            env_id = OmegaConf.load(path).get("id")
        except Exception:  # noqa: BLE001 - an unreadable file just does not help with suggestions
            continue
        if isinstance(env_id, str):
            catalog.setdefault(env_id, path.stem)
    return catalog


def variant_ids(env_id: str, kind: str) -> list[str]:
    """The id of the variant of ``env_id`` with an action space of ``kind``, by PruneGym's naming convention.

    ``PruneGym/PerInput-v0`` <-> ``PruneGym/PerInputDiscrete-v0``, and the same with a ``Measured`` suffix
    (``PruneGym/PerInputDiscreteMeasured-v0``).
    """
    base, sep, version = env_id.rpartition("-")
    if not sep:
        base, version = env_id, ""
    suffix = f"-{version}" if version else ""
    measured = base.endswith("Measured")
    plain = base.removesuffix("Measured").removesuffix("Discrete")
    tail = "Measured" if measured else ""
    if kind in ("discrete", "multidiscrete"):
        return [f"{plain}Discrete{tail}{suffix}"]
    return [f"{plain}{tail}{suffix}"]


def _suggest(env_id: str, kinds: tuple[str, ...], catalog: Mapping[str, str]) -> str:
    for kind in kinds:
        for candidate in variant_ids(env_id, kind):
            if candidate == env_id:
                continue
            name = catalog.get(candidate)
            if name:
                return f"use env={name} ({candidate})"
            if candidate in gym.registry:
                return f"use env.id={candidate}"
    return "pick an environment variant with a fitting action space (see conf/env/)"


def check_compatible(algo: str, env_id: str, action_space: gym.Space, catalog: Mapping[str, str] | None = None) -> None:
    """Refuse an algorithm / environment pair that cannot train, with one message that says what fits.

    Args:
        algo: The ``algo=`` name (a key of :data:`ALGORITHMS`).
        env_id: The Gymnasium id of the environment.
        action_space: The environment's action space.
        catalog: Env id -> config name (:func:`env_catalog`), for the suggestion.

    Raises:
        IncompatibleEnvError: The algorithm cannot take this action space or episode shape.
        ValueError: The algorithm is unknown.
    """
    spec = ALGORITHMS.get(algo)
    if spec is None:
        raise ValueError(f"unknown algorithm {algo!r}: choose one of {sorted(ALGORITHMS)} (algo=<name>)")
    catalog = catalog or {}
    kind = space_kind(action_space)
    if kind not in spec.spaces:
        need = " or ".join(_SPACE_WORDS[k] for k in spec.spaces)
        raise IncompatibleEnvError(
            f"{algo.upper()} needs {need}, but {env_id} has {action_space}; {_suggest(env_id, spec.spaces, catalog)}"
        )
    if spec.one_step and any(word in env_id for word in MULTI_STEP_ENVS):
        fit = "PruneGym/PerInputDiscrete-v0"
        name = catalog.get(fit)
        hint = f"use env={name} ({fit})" if name else f"use env.id={fit}"
        raise IncompatibleEnvError(
            f"{algo.upper()} is a contextual bandit for one-step episodes, but {env_id} has multi-step episodes; {hint}"
        )


def import_envs() -> None:
    """Import the package that registers the ``PruneGym/*`` ids (needed in every Ray worker)."""
    importlib.import_module("envs")


def make_env(env_id: str, kwargs: Mapping[str, Any] | None = None) -> gym.Env:
    """``gymnasium.make(env_id, **kwargs)`` after registering PruneGym's ids."""
    import_envs()
    return gym.make(env_id, **dict(kwargs or {}))


def env_creator(env_id: str, kwargs: Mapping[str, Any]) -> Callable[[Any], gym.Env]:
    """A picklable creator for ``ray.tune.register_env``: every env runner builds (and holds) its own env.

    ``env_config`` from RLlib (a mapping) is merged over ``kwargs``, so a runner-specific override works.
    """
    base = dict(kwargs)

    def create(env_config: Any = None) -> gym.Env:
        merged = dict(base)
        if env_config:
            merged.update({k: v for k, v in dict(env_config).items()})
        return make_env(env_id, merged)

    return create


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _plain(value: Any) -> Any:
    """An OmegaConf node (or anything) as plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def build_config(
    algo_cfg: Mapping[str, Any],
    env_name: str,
    *,
    seed: int,
    num_env_runners: int = 0,
    envs_per_runner: int = 1,
    info_keys: Mapping[str, str] | None = None,
) -> Any:
    """An RLlib ``AlgorithmConfig`` (new API stack) from the ``algo`` config group.

    Args:
        algo_cfg: The ``algo`` group: ``name``, and keyword groups passed straight to the RLlib config
            methods of the same name (``training``, ``env_runners``, ``reporting``, ``learners``), plus
            ``model`` (a ``DefaultModelConfig``: ``fcnet_hiddens`` etc.).
        env_name: The name the env creator was registered under (``ray.tune.register_env``).
        seed: Seed for RLlib (env runners seed their envs from it).
        num_env_runners: Remote env runners (0: sample in the driver, cheapest on 2 cores).
        envs_per_runner: Vectorised envs per runner (each holds its own model).
        info_keys: ``{"accuracy": <info key>, "cost": <info key>}`` read by the episode callbacks.

    Returns:
        The config; call ``.build_algo()`` on it after ``ray.init``.
    """
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    algo_cfg = _plain(algo_cfg)
    spec = ALGORITHMS[algo_cfg["name"]]
    if spec.config_class is None:
        raise ValueError(f"{spec.name} is not an RLlib algorithm; train it with agents.bandit")
    config = _import(spec.config_class)()
    config = config.api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
    config = config.framework("torch").environment(env_name)
    runners = dict(algo_cfg.get("env_runners") or {})
    runners.setdefault("num_env_runners", num_env_runners)
    runners.setdefault("num_envs_per_env_runner", envs_per_runner)
    config = config.env_runners(**runners)
    config = config.learners(**dict(algo_cfg.get("learners") or {"num_learners": 0}))
    training = dict(algo_cfg.get("training") or {})
    config = config.training(**training)
    if algo_cfg.get("reporting"):
        config = config.reporting(**dict(algo_cfg["reporting"]))
    config = config.rl_module(model_config=DefaultModelConfig(**dict(algo_cfg.get("model") or {})))
    keys = dict(info_keys or {"accuracy": "accuracy", "cost": "cost"})
    config = config.callbacks(_callbacks_class(keys))
    config = config.debugging(seed=int(seed))
    return config


def _callbacks_class(info_keys: Mapping[str, str]) -> type:
    """An RLlib callbacks class recording per-iteration reward, accuracy and cost (RLlib takes a class).

    Built on demand so that importing this module does not import RLlib (seconds), which keeps the
    refusals and the bandit free of Ray.
    """
    from ray.rllib.callbacks.callbacks import RLlibCallback

    keys = dict(info_keys)

    class PruneGymCallbacks(RLlibCallback):
        """Logs each finished episode's return, task accuracy and cost as per-iteration sums and a count.

        Sums (reduced per iteration) divided by the episode count give plain per-iteration means, where
        RLlib's own ``episode_return_mean`` is smoothed over recent episodes.
        """

        INFO_KEYS = keys

        def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
            """Record the episode's return and the accuracy/cost of its last step's ``info``."""
            if metrics_logger is None:
                return
            info = episode.get_infos(-1) or {}
            metrics_logger.log_value(("prunegym", "episodes"), 1, reduce="sum")
            metrics_logger.log_value(("prunegym", "reward_sum"), float(episode.get_return()), reduce="sum")
            for name, key in self.INFO_KEYS.items():
                value = _scalar(info.get(key))
                if value is not None:
                    metrics_logger.log_value(("prunegym", f"{name}_sum"), value, reduce="sum")
                    metrics_logger.log_value(("prunegym", f"{name}_count"), 1, reduce="sum")

    return PruneGymCallbacks


def _scalar(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def iteration_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Per-iteration means (reward, accuracy, cost) and counters out of an RLlib ``train()`` result."""
    runners = result.get("env_runners") or {}
    pg = runners.get("prunegym") or {}
    episodes = float(pg.get("episodes") or 0.0)
    out: dict[str, float] = {
        "env_steps": float(
            result.get("num_env_steps_sampled_lifetime") or runners.get("num_env_steps_sampled_lifetime") or 0
        ),
        "episodes": episodes,
        "reward": float(pg["reward_sum"]) / episodes if episodes else float("nan"),
        "reward_smoothed": float(runners.get("episode_return_mean", float("nan"))),
    }
    for name in ("accuracy", "cost"):
        count = float(pg.get(f"{name}_count") or 0.0)
        out[name] = float(pg[f"{name}_sum"]) / count if count else float("nan")
    return out


def greedy_policy(algo: Any, action_space: gym.Space) -> Callable[[np.ndarray], Any]:
    """``obs -> action`` from a trained RLlib algorithm, with exploration off.

    RLlib normalises Box actions by default (the module acts in [-1, 1], rescaled to the env's bounds on
    the way out); the same rescaling is applied here so the greedy action is the one the policy means.
    """
    import torch

    module = algo.get_module()
    dist_cls = module.get_inference_action_dist_cls()
    normalize = bool(getattr(algo.config, "normalize_actions", True))
    clip = bool(getattr(algo.config, "clip_actions", False))

    def act(obs: np.ndarray) -> Any:
        batch = {"obs": torch.as_tensor(np.asarray(obs, dtype=np.float32))[None]}
        with torch.no_grad():
            out = module.forward_inference(batch)
        if "actions" in out:
            action = out["actions"][0]
        else:
            dist = dist_cls.from_logits(out["action_dist_inputs"])
            action = dist.to_deterministic().sample()[0]
        action = action.cpu().numpy()
        if isinstance(action_space, gym.spaces.Box):
            action = action.astype(action_space.dtype)
            if normalize:
                low, high = action_space.low, action_space.high
                action = low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (high - low)
            elif clip:
                action = np.clip(action, action_space.low, action_space.high)
            return action.astype(action_space.dtype)
        if isinstance(action_space, gym.spaces.Discrete):
            return int(action)
        return action.astype(np.int64)

    return act


def start_policy_at(algo: Any, action_space: gym.Space, keep: float | Sequence[float], log_std: float) -> bool:
    """Start a Gaussian policy with every keep fraction at ``keep`` and a given exploration width.

    ``keep`` may give each action entry its own start (an environment's ``policy_start``).

    RLlib's default head starts at the middle of the (normalised) action box, i.e. keep fractions of
    0.5 everywhere, which on a small LLM is far into the region where accuracy collapses: the first
    iterations then only see near-chance accuracy and little reward gradient towards the plans that
    work. Starting at the dense end (``keep=1``) and exploring downwards is the prior AMC-style
    pruning agents use. The last layer of the policy head is shrunk (so the start is the same for
    every observation) and its bias set; the learner's weights are then pushed to the env runners.

    Returns:
        Whether the policy was changed (only Box actions with a Gaussian head are).
    """
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID

    if not isinstance(action_space, gym.spaces.Box):
        return False
    d = int(np.prod(action_space.shape))
    low, high = action_space.low.reshape(-1), action_space.high.reshape(-1)
    keep = np.broadcast_to(np.asarray(keep, np.float64).reshape(-1), (d,))
    mean = 2.0 * (np.clip(keep, low, high) - low) / np.maximum(high - low, 1e-12) - 1.0  # normalised actions

    def set_head(learner: Any) -> bool:
        head = getattr(learner.module[DEFAULT_MODULE_ID], "pi", None)
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if head is not None else []
        if not linears or linears[-1].out_features != 2 * d:
            return False
        last = linears[-1]
        with torch.no_grad():
            last.weight.mul_(0.01)
            last.bias[:d] = torch.as_tensor(mean, dtype=last.bias.dtype)
            last.bias[d:] = log_std
        return True

    # The learner holds the weights that train; env runners get them from it (not the other way round).
    if not all(algo.learner_group.foreach_learner(set_head)):
        return False
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group)
    return True


class RLlibTrainer:
    """An RLlib algorithm behind the small interface :mod:`experiments.train` drives (also the bandit's).

    Call after ``ray.init``. ``env_steps`` counts sampled env steps (the equal budget across algorithms).

    Args:
        algo_cfg: The ``algo`` config group (see :func:`build_config`).
        env_id: Gymnasium id of the environment.
        env_kwargs: Its kwargs (every env runner builds its own env, and model, from them).
        action_space: The env's action space (for the greedy policy's rescaling).
        seed: RLlib seed.
        num_env_runners: Remote env runners (0: sample in the driver process).
        envs_per_runner: Envs per runner.
        info_keys: Info keys of accuracy and cost.
        policy_start: The environment's ``policy_start`` (where each action entry starts for a given
            ``init_policy.keep``); ``None``: every entry at ``keep``.
    """

    def __init__(
        self,
        algo_cfg: Mapping[str, Any],
        env_id: str,
        env_kwargs: Mapping[str, Any],
        action_space: gym.Space,
        *,
        seed: int,
        num_env_runners: int = 0,
        envs_per_runner: int = 1,
        info_keys: Mapping[str, str] | None = None,
        policy_start: Callable[[float], Any] | None = None,
    ) -> None:
        import time

        from ray.tune.registry import register_env

        name = f"prunegym-{env_id.replace('/', '-')}-{int(time.time() * 1e6)}"
        register_env(name, env_creator(env_id, env_kwargs))
        self.action_space = action_space
        config = build_config(
            algo_cfg,
            name,
            seed=seed,
            num_env_runners=num_env_runners,
            envs_per_runner=envs_per_runner,
            info_keys=info_keys,
        )
        self.algo = config.build_algo()
        self.env_steps = 0
        init = algo_cfg.get("init_policy")
        if init:
            keep: Any = float(init["keep"])
            if policy_start is not None and isinstance(action_space, gym.spaces.Box):
                keep = policy_start(keep)
            start_policy_at(self.algo, action_space, keep, float(init["log_std"]))

    def train_iteration(self) -> dict[str, float]:
        """One ``algo.train()``; returns per-iteration means and counters."""
        import time

        t0 = time.perf_counter()
        result = self.algo.train()
        out = iteration_metrics(result)
        # Count steps ourselves: RLlib's lifetime counter need not survive a restore.
        sampled = (result.get("env_runners") or {}).get("num_env_steps_sampled")
        self.env_steps += int(sampled) if sampled is not None else max(0, int(out["env_steps"]) - self.env_steps)
        out["env_steps"] = float(self.env_steps)
        out["iter_time_s"] = time.perf_counter() - t0
        return out

    def policy(self) -> Callable[[np.ndarray], Any]:
        """The greedy policy (exploration off) for held-out evaluation."""
        return greedy_policy(self.algo, self.action_space)

    def save(self, folder: str | Path) -> None:
        """``algo.save_to_path(folder)`` (RLlib's checkpoint layout)."""
        folder = Path(folder).resolve()
        self.algo.save_to_path(str(folder))
        (folder / "prunegym_trainer.json").write_text(json.dumps({"env_steps": self.env_steps}))

    def restore(self, folder: str | Path) -> None:
        """``algo.restore_from_path(folder)``; the env-step counter continues from the checkpoint."""
        folder = Path(folder).resolve()
        self.algo.restore_from_path(str(folder))
        self.env_steps = int(json.loads((folder / "prunegym_trainer.json").read_text())["env_steps"])

    def stop(self) -> None:
        """Release the algorithm's actors."""
        self.algo.stop()
