"""A contextual-bandit controller for ``PerInput`` (discrete variant): LinUCB or linear Thompson sampling.

RLlib 2.60 has no bandits, so the fitting is mabwiser's (``LearningPolicy.LinUCB`` / ``LinTS``): one
ridge regression per arm (preset plan), ``A = l2 * I + X^T X`` and ``b = X^T r``. The controller adds
what training needs around it:

- **Context scaling**: the probe's features have very different ranges (prompt length vs entropy), so
  contexts are standardised with a mean/std frozen after the first (uniformly random) batch, and a
  constant 1 is appended so each arm's regression has an intercept.
- **State without pickle**: :meth:`BanditController.save` writes JSON holding each arm's ``A`` and
  ``b`` (plus the scaler). mabwiser keeps its models in pickle-only objects, so :meth:`load` rebuilds
  them through mabwiser's *public* ``fit``: for each arm it feeds a synthetic design ``X`` with
  ``X^T X = A - l2 * I`` (an eigendecomposition) and targets ``y`` with ``X^T y = b``, which leaves that
  arm's regression exactly where it was (up to float rounding). Thompson sampling's random stream is
  not saved: a restored LinTS continues with a fresh stream from its seed.
- **Greedy action**: held-out evaluation takes ``argmax_a x . beta_a`` (no exploration bonus).

No Ray is involved: :class:`BanditTrainer` runs episodes in-process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

FORMAT = "prunegym-bandit-v1"
POLICIES = ("linucb", "lints")


class BanditController:
    """Per-arm linear regressions with optimism (LinUCB) or posterior sampling (LinTS), fitted by mabwiser.

    Args:
        num_arms: Number of discrete actions (the env's preset plans).
        num_features: Length of the (flattened) observation.
        policy: ``"linucb"`` or ``"lints"``.
        alpha: Exploration strength (UCB width, or posterior scale for LinTS).
        l2_lambda: Ridge regularisation.
        seed: Seed for mabwiser's random stream (ties, LinTS samples).
    """

    def __init__(
        self,
        num_arms: int,
        num_features: int,
        *,
        policy: str = "linucb",
        alpha: float = 1.0,
        l2_lambda: float = 1.0,
        seed: int = 0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown bandit policy {policy!r}: use one of {POLICIES} (algo.policy=...)")
        if num_arms < 2 or num_features < 1:
            raise ValueError(f"a bandit needs >= 2 arms and >= 1 feature, got {num_arms} arms, {num_features} features")
        self.num_arms = int(num_arms)
        self.num_features = int(num_features)
        self.policy = policy
        self.alpha = float(alpha)
        self.l2_lambda = float(l2_lambda)
        self.seed = int(seed)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.samples = 0
        self.mab = self._new_mab()

    def _new_mab(self) -> Any:
        from mabwiser.mab import MAB, LearningPolicy

        lp = (
            LearningPolicy.LinUCB(alpha=self.alpha, l2_lambda=self.l2_lambda)
            if self.policy == "linucb"
            else LearningPolicy.LinTS(alpha=self.alpha, l2_lambda=self.l2_lambda)
        )
        return MAB(arms=list(range(self.num_arms)), learning_policy=lp, seed=self.seed)

    @property
    def fitted(self) -> bool:
        """Whether any data has been fitted (before that, actions are uniformly random)."""
        return self.samples > 0

    def features(self, obs: np.ndarray) -> np.ndarray:
        """Standardised contexts with a bias column, shape ``(n, num_features + 1)``."""
        x = np.asarray(obs, dtype=np.float64).reshape(-1, self.num_features)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)

    def fit(self, obs: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        """Add a batch of (context, arm, reward); the first batch also freezes the context scaler."""
        obs = np.asarray(obs, dtype=np.float64).reshape(-1, self.num_features)
        arms = np.asarray(arms, dtype=np.int64).reshape(-1)
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if not (len(obs) == len(arms) == len(rewards)) or len(obs) == 0:
            raise ValueError(f"fit needs equal, non-empty batches; got {len(obs)}, {len(arms)}, {len(rewards)}")
        if not np.all(np.isfinite(rewards)):
            raise ValueError("rewards must be finite: check the env's reward (NaN/inf reached the bandit)")
        if self.mean is None:
            self.mean = obs.mean(axis=0)
            std = obs.std(axis=0)
            self.std = np.where(std > 1e-8, std, 1.0)
        x = self.features(obs)
        if self.fitted:
            self.mab.partial_fit(arms.tolist(), rewards, x)
        else:
            self.mab.fit(arms.tolist(), rewards, x)
        self.samples += len(obs)

    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None) -> int:
        """The exploring action: uniform before any fit, then mabwiser's LinUCB / LinTS choice."""
        if not self.fitted:
            rng = rng or np.random.default_rng(self.seed)
            return int(rng.integers(self.num_arms))
        return int(self.mab.predict(self.features(obs)))

    def greedy(self, obs: np.ndarray) -> int:
        """``argmax_a x . beta_a``: the best arm by expected reward, no exploration bonus."""
        if not self.fitted:
            return 0
        x = self.features(obs)[0]
        return int(np.argmax(self.betas() @ x))

    def arm_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Each arm's ``A`` (``(k, d, d)``) and ``b`` (``(k, d)``), read out of mabwiser's models."""
        d = self.num_features + 1
        A = np.stack([self.l2_lambda * np.eye(d)] * self.num_arms)
        b = np.zeros((self.num_arms, d))
        if self.fitted:
            models = self.mab._imp.arm_to_model  # mabwiser has no public accessor for the regressions
            for arm in range(self.num_arms):
                A[arm] = np.asarray(models[arm].A, dtype=np.float64)
                b[arm] = np.asarray(models[arm].Xty, dtype=np.float64)
        return A, b

    def betas(self) -> np.ndarray:
        """Each arm's ridge coefficients ``A^-1 b``, shape ``(k, d)``."""
        A, b = self.arm_arrays()
        return np.stack([np.linalg.solve(A[i], b[i]) for i in range(self.num_arms)])

    def state_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything needed to continue (no pickle)."""
        A, b = self.arm_arrays()
        return {
            "format": FORMAT,
            "policy": self.policy,
            "num_arms": self.num_arms,
            "num_features": self.num_features,
            "alpha": self.alpha,
            "l2_lambda": self.l2_lambda,
            "seed": self.seed,
            "samples": self.samples,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "A": A.tolist(),
            "b": b.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> BanditController:
        """Rebuild a controller from :meth:`state_dict`, refitting mabwiser through its public ``fit``."""
        if state.get("format") != FORMAT:
            raise ValueError(f"not a PruneGym bandit state (format {state.get('format')!r}, expected {FORMAT!r})")
        ctl = cls(
            int(state["num_arms"]),
            int(state["num_features"]),
            policy=str(state["policy"]),
            alpha=float(state["alpha"]),
            l2_lambda=float(state["l2_lambda"]),
            seed=int(state["seed"]),
        )
        if state.get("mean") is not None:
            ctl.mean = np.asarray(state["mean"], dtype=np.float64)
            ctl.std = np.asarray(state["std"], dtype=np.float64)
        samples = int(state.get("samples", 0))
        if samples:
            A = np.asarray(state["A"], dtype=np.float64)
            b = np.asarray(state["b"], dtype=np.float64)
            xs, ys, arms = [], [], []
            for arm in range(ctl.num_arms):
                X, y = _synthetic_design(A[arm] - ctl.l2_lambda * np.eye(A.shape[1]), b[arm])
                xs.append(X)
                ys.append(y)
                arms += [arm] * len(X)
            X_all = np.concatenate(xs)
            if len(X_all):
                ctl.mab.fit(arms, np.concatenate(ys), X_all)
            ctl.samples = samples
        return ctl

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` as JSON, atomically (a kill mid-write leaves the old file)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BanditController:
        """Read a controller written by :meth:`save`."""
        return cls.from_state_dict(json.loads(Path(path).read_text()))


def _synthetic_design(M: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``X`` and targets ``y`` with ``X^T X = M`` and ``X^T y = b`` (``M`` symmetric PSD).

    ``M = V diag(w) V^T`` gives ``X = diag(sqrt(w)) V^T``; ``b`` lies in the span of the real contexts,
    which is the span of ``M``, so ``y = diag(1/sqrt(w)) V^T b`` solves ``X^T y = b`` there.
    """
    w, V = np.linalg.eigh((M + M.T) / 2)
    keep = w > max(1e-12, 1e-12 * float(np.max(np.abs(w), initial=0.0)))
    if not np.any(keep):
        return np.zeros((0, M.shape[0])), np.zeros(0)
    sw = np.sqrt(w[keep])
    X = sw[:, None] * V[:, keep].T
    y = (V[:, keep].T @ b) / sw
    return X, y


class BanditTrainer:
    """Trains a :class:`BanditController` on a one-step discrete environment, an iteration at a time.

    Args:
        env: The environment (one-step episodes, Discrete actions, flat Box observations).
        algo_cfg: The ``algo`` group: ``policy``, ``alpha``, ``l2_lambda``, ``episodes_per_iteration``.
        seed: Seeds the env's first reset and the warm-up actions.
        info_keys: ``{"accuracy": <info key>, "cost": <info key>}``.
    """

    def __init__(self, env: gym.Env, algo_cfg: Mapping[str, Any], *, seed: int, info_keys: Mapping[str, str]) -> None:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"the bandit needs a Discrete action space, got {env.action_space}")
        self.env = env
        self.seed = int(seed)
        self.info_keys = dict(info_keys)
        self.episodes = int(algo_cfg.get("episodes_per_iteration", 32))
        n_features = int(np.prod(env.observation_space.shape))
        self.controller = BanditController(
            int(env.action_space.n),
            n_features,
            policy=str(algo_cfg.get("policy", "linucb")),
            alpha=float(algo_cfg.get("alpha", 1.0)),
            l2_lambda=float(algo_cfg.get("l2_lambda", 1.0)),
            seed=self.seed,
        )
        self.rng = np.random.default_rng(self.seed)
        self.env_steps = 0
        self._reset_seed: int | None = self.seed

    def _reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self._reset_seed)
        self._reset_seed = None
        return np.asarray(obs, dtype=np.float64).reshape(-1)

    def train_iteration(self) -> dict[str, float]:
        """Run ``episodes_per_iteration`` one-step episodes, then fit them; returns the iteration's means."""
        t0 = time.perf_counter()
        obs_l, arms, rewards, acc, cost = [], [], [], [], []
        for _ in range(self.episodes):
            obs = self._reset()
            arm = self.controller.act(obs, self.rng)
            _, reward, terminated, truncated, info = self.env.step(arm)
            if not (terminated or truncated):
                raise RuntimeError(
                    f"{self.env.spec.id if self.env.spec else self.env} did not end after one step: the bandit "
                    "needs one-step episodes (use env=per_input_discrete)"
                )
            obs_l.append(obs)
            arms.append(arm)
            rewards.append(float(reward))
            acc.append(_info_value(info, self.info_keys.get("accuracy")))
            cost.append(_info_value(info, self.info_keys.get("cost")))
        self.controller.fit(np.stack(obs_l), np.asarray(arms), np.asarray(rewards))
        self.env_steps += self.episodes
        return {
            "env_steps": float(self.env_steps),
            "episodes": float(self.episodes),
            "reward": float(np.mean(rewards)),
            "reward_smoothed": float(np.mean(rewards)),
            "accuracy": _nanmean(acc),
            "cost": _nanmean(cost),
            "iter_time_s": time.perf_counter() - t0,
        }

    def policy(self) -> Callable[[np.ndarray], int]:
        """The greedy policy for evaluation."""
        return self.controller.greedy

    def save(self, folder: str | Path) -> None:
        """Write the controller and the trainer counters as JSON into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.controller.save(folder / "bandit.json")
        (folder / "trainer.json").write_text(json.dumps({"env_steps": self.env_steps}))

    def restore(self, folder: str | Path) -> None:
        """Load what :meth:`save` wrote. The env's input stream restarts from a seed derived from the step count."""
        folder = Path(folder)
        self.controller = BanditController.load(folder / "bandit.json")
        self.env_steps = int(json.loads((folder / "trainer.json").read_text())["env_steps"])
        self.rng = np.random.default_rng([self.seed, self.env_steps])
        self._reset_seed = self.seed + 1_000_003 * (1 + self.env_steps)

    def stop(self) -> None:
        """Nothing to release (the env is closed by its owner)."""


def _info_value(info: Mapping[str, Any], key: str | None) -> float:
    if not key or key not in info:
        return float("nan")
    try:
        return float(info[key])
    except (TypeError, ValueError):
        return float("nan")


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.any(np.isfinite(arr)) else float("nan")
