"""The learnable ceiling: the best a controller could learn from an environment's observations.

On a replay dataset every input's outcome under every action path is known: each input's best path
in hindsight is a label, and every path's reward a regression target. A supervised model from the
first observation to a path, trained with all of that, is the strongest policy these observations
support that a learner could reasonably find. It is chosen by K-fold cross-validation on the
training recording among a few standard models (logistic regression at several strengths and
k-nearest neighbours classifying the best path; ridge regression predicting every path's reward,
the greedy policy of a linear bandit that saw every reward; the best static path itself), scored by
the reward its choices earn (not by label accuracy: two paths may be nearly as good), refitted on
every training input and evaluated on the held-out recording. It is an estimate: a learner can
exceed it on a given held-out draw, and the more training inputs the recording has, the tighter it is.

When a trained controller falls short of the ceiling, the learning is at fault; when the ceiling
itself sits at the best static choice, the observations carry no usable signal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Ceiling:
    """Reference figures on the held-out recording (mean per-input reward) and how they were found.

    Attributes:
        learnable: Mean reward of the cross-validated classifier's choices on held-out inputs.
        best_static: The best single path for every input (for a linear reward no mixture of static
            choices does better in expectation).
        oracle: Every input's best path in hindsight.
        model: The classifier chosen by cross-validation.
        cv_reward: Its mean cross-validated reward on the training inputs.
        candidates: Cross-validated reward of every candidate model.
    """

    learnable: float
    best_static: float
    oracle: float
    model: str
    cv_reward: float
    candidates: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return dict(self.__dict__)


Chooser = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""Fits on ``(observations, rewards [n, paths])`` and returns a path index for each new observation."""


def _classifier(make: Callable[[], Any]) -> Chooser:
    """A chooser that classifies an observation into its best path (the hindsight label)."""

    def choose(x: np.ndarray, rewards: np.ndarray, x_new: np.ndarray) -> np.ndarray:
        y = rewards.argmax(axis=1)
        classes = np.unique(y)
        if len(classes) == 1:
            return np.full(len(x_new), classes[0])
        model = make()
        last = model.steps[-1][1]
        if hasattr(last, "n_neighbors"):
            last.n_neighbors = min(last.n_neighbors, len(x))
        model.fit(x, y)
        return np.asarray(model.predict(x_new), dtype=np.int64)

    return choose


def _regressor(alpha: float, *, standardize: bool) -> Chooser:
    """A chooser that predicts every path's reward (ridge regression, one output per path) and takes the best.

    The greedy policy of a linear contextual bandit (LinUCB) with every reward observed. On the raw
    observation (as the bandit sees it) or standardised: standardising inflates features that barely
    vary, which on some recordings helps and on others drowns the signal, so both compete.
    """

    def choose(x: np.ndarray, rewards: np.ndarray, x_new: np.ndarray) -> np.ndarray:
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)) if standardize else Ridge(alpha=alpha)
        model.fit(x, rewards)
        return np.asarray(model.predict(x_new), dtype=np.float64).reshape(len(x_new), -1).argmax(axis=1)

    return choose


def _static(x: np.ndarray, rewards: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """The path with the best mean reward on the fitted inputs, for every new one (ignores the observation)."""
    return np.full(len(x_new), int(rewards.mean(axis=0).argmax()), dtype=np.int64)


def _candidates(seed: int) -> dict[str, Chooser]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: dict[str, Chooser] = {"static (best mean on the fitted inputs)": _static}
    for c in (0.01, 0.1, 1.0, 10.0):
        out[f"logistic(C={c:g})"] = _classifier(
            lambda c=c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        )
    for k in (5, 15, 45):
        out[f"knn(k={k})"] = _classifier(
            lambda k=k: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))
        )
    for alpha in (0.1, 1.0, 10.0, 100.0):
        out[f"ridge reward regression(alpha={alpha:g})"] = _regressor(alpha, standardize=False)
        out[f"ridge reward regression(standardised, alpha={alpha:g})"] = _regressor(alpha, standardize=True)
    return out


def learnable_ceiling(
    train_obs: np.ndarray,
    train_rewards: np.ndarray,
    test_obs: np.ndarray,
    test_rewards: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
) -> Ceiling:
    """The learnable ceiling of observations ``*_obs`` (``[n, d]``) for rewards ``*_rewards`` (``[n, paths]``).

    Raises:
        ValueError: Shapes that do not fit, or fewer training inputs than folds.
    """
    train_obs, test_obs = np.asarray(train_obs, np.float64), np.asarray(test_obs, np.float64)
    train_rewards, test_rewards = np.asarray(train_rewards, np.float64), np.asarray(test_rewards, np.float64)
    if train_rewards.shape[1] != test_rewards.shape[1] or train_obs.shape[1] != test_obs.shape[1]:
        raise ValueError("training and held-out recordings must have the same observations and action paths")
    n = len(train_obs)
    if n < folds:
        raise ValueError(f"{n} training inputs are fewer than the {folds} cross-validation folds")
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n) % folds
    scores: dict[str, float] = {}
    for name, choose in _candidates(seed).items():
        got = np.empty(n)
        for f in range(folds):
            fit, held = fold_of != f, fold_of == f
            pred = choose(train_obs[fit], train_rewards[fit], train_obs[held])
            got[held] = train_rewards[np.flatnonzero(held), pred]
        scores[name] = float(got.mean())
    best = max(scores, key=scores.__getitem__)
    pred = _candidates(seed)[best](train_obs, train_rewards, test_obs)
    return Ceiling(
        learnable=float(test_rewards[np.arange(len(test_obs)), pred].mean()),
        best_static=float(test_rewards[:, int(train_rewards.mean(axis=0).argmax())].mean()),
        oracle=float(test_rewards.max(axis=1).mean()),
        model=best,
        cv_reward=scores[best],
        candidates=scores,
    )


def replay_rewards(data: Any, reward_cfg: Any, latency: str = "calibrated") -> np.ndarray:
    """Every recorded input's reward under every path (``[inputs, paths]``), as the replay twin pays it.

    ``latency="sample"`` is replaced by the median: a ceiling is an expectation, not a draw.
    """
    from envs.rewards import reward

    acc = data.rel if reward_cfg.accuracy == "dense_relative" else data.raw
    if latency == "calibrated":
        lat = data.latency
    else:
        lat = data.median_latency
    out = np.empty(acc.shape)
    for i in range(acc.shape[0]):
        for p in range(acc.shape[1]):
            en = data.energy[i, p]
            out[i, p] = reward(float(acc[i, p]), float(lat[i, p]), None if np.isnan(en) else float(en), reward_cfg)
    return out
