"""The learnable ceiling: the best a controller could learn from an environment's observations.

On a replay dataset every input's outcome under every action path is known, so the best path of
each input in hindsight is a label, and a supervised classifier from the first observation to that
label is the strongest policy these observations support that any learner could reasonably find. It
is fitted on the training recording with K-fold cross-validation choosing among a few standard
models (logistic regression at several strengths, k-nearest neighbours), scored by the reward its
choices earn (not by label accuracy: two paths may be nearly as good), refitted on every training
input and evaluated on the held-out recording.

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


def _candidates(seed: int) -> dict[str, Callable[[], Any]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: dict[str, Callable[[], Any]] = {}
    for c in (0.01, 0.1, 1.0, 10.0):
        out[f"logistic(C={c:g})"] = lambda c=c: make_pipeline(
            StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
        )
    for k in (5, 15, 45):
        out[f"knn(k={k})"] = lambda k=k: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))
    return out


def _fit_predict(
    make: Callable[[], Any], x: np.ndarray, y: np.ndarray, x_new: np.ndarray, n_classes: int
) -> np.ndarray:
    classes = np.unique(y)
    if len(classes) == 1:
        return np.full(len(x_new), classes[0])
    model = make()
    if hasattr(model, "steps") and "kneighbors" in type(model.steps[-1][1]).__name__.lower():
        model.steps[-1][1].n_neighbors = min(model.steps[-1][1].n_neighbors, len(x))
    model.fit(x, y)
    return np.asarray(model.predict(x_new), dtype=np.int64)


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
    labels = train_rewards.argmax(axis=1)
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n) % folds
    scores: dict[str, float] = {}
    for name, make in _candidates(seed).items():
        got = np.empty(n)
        for f in range(folds):
            fit, held = fold_of != f, fold_of == f
            pred = _fit_predict(make, train_obs[fit], labels[fit], train_obs[held], train_rewards.shape[1])
            got[held] = train_rewards[np.flatnonzero(held), pred]
        scores[name] = float(got.mean())
    best = max(scores, key=scores.__getitem__)
    pred = _fit_predict(_candidates(seed)[best], train_obs, labels, test_obs, train_rewards.shape[1])
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
        lat = np.median(data.latency_s, axis=2) / np.median(data.dense_latency_s, axis=2)
    out = np.empty(acc.shape)
    for i in range(acc.shape[0]):
        for p in range(acc.shape[1]):
            en = data.energy[i, p]
            out[i, p] = reward(float(acc[i, p]), float(lat[i, p]), None if np.isnan(en) else float(en), reward_cfg)
    return out
