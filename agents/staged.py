"""Stop rules for the staged environment, their exit tables, and the learnable ceiling of its observations.

An :class:`ExitTable` holds, for each input, what a stop after ``t`` dense groups would give
(``t = 0..G``, ``G``: the whole model), read off one pass of :class:`envs.staged.Staged` per
input (:func:`exit_table`): the observation the controller would see before deciding step ``t``,
the answer's dense-relative and raw scores, and the cost. Every stage is run and measured once; a
stop at ``t`` costs the probe, the groups before it, the readouts made so far and the LM head at
the end, exactly what the environment charges an episode that stops there.

Rules that only stop (dense groups otherwise) are then evaluated by look-up:

- :class:`MarginThreshold` (CALM): stop at the first readout whose margin between the two best
  answers is at least a threshold, fitted on the **train** split (:func:`fit_for_latency`).
- :func:`risk_controlled` (CALM's Learn-then-Test calibration): the smallest threshold whose
  agreement with the dense model is at least ``1 - delta`` on new inputs with probability at least
  ``1 - epsilon``, certified on a calibration split by a binomial tail bound
  (:func:`agents.risk.ltt_select`).
- :func:`stop_ceiling`: the learnable ceiling, a cross-validated classifier from the same
  observations to "a stop here agrees with the dense model", stopping where the risk of
  disagreeing is small against the latency the stop saves.
- :func:`risk_controlled_classifier`: Learn-then-Test on that classifier's trade-off instead of
  the margin, the classifier fitted on one half of the train inputs and certified on the other.

The stop classifier's operating points export as staged controllers
(:func:`agents.export.export_stop_classifier`, the fitted model as plain arrays:
:func:`stop_model_arrays`); :func:`controller_exits` reads an exported one's stops off a table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm


# ---------------------------------------------------------------------------------------- the table
@dataclass
class ExitTable:
    """Per input and stop depth: the observation, the answer's scores and the cost.

    Attributes:
        item_ids: Item of each row.
        tasks: Task of each row.
        obs: ``[n, G, F]``: the observation before step ``t`` (after ``t`` groups).
        rel: ``[n, G + 1]``: dense-relative score of stopping after ``t`` groups (``G``: all ran).
        raw: ``[n, G + 1]``: raw score of the same.
        lat: ``[n, G + 1]``: latency over the dense model's, as the environment reports it.
        latency_s: ``[n, G + 1]``: latency in seconds.
        dense_s: ``[n]``: the dense model's latency on the input, seconds.
        flops: ``[n, G + 1]``: decoder FLOPs fraction.
        prompt_tokens: ``[n]``: prompt length.
        feature_names: Names of the observation's entries.
        meta: Where it came from (environment config, cost kind, the action that ran each group).
    """

    item_ids: list[str]
    tasks: list[str]
    obs: np.ndarray
    rel: np.ndarray
    raw: np.ndarray
    lat: np.ndarray
    latency_s: np.ndarray
    dense_s: np.ndarray
    flops: np.ndarray
    prompt_tokens: np.ndarray
    feature_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> int:
        """``G``: the decision steps of an episode."""
        return int(self.obs.shape[1])

    def feature(self, name: str) -> np.ndarray:
        """One observation entry at every step, ``[n, G]``."""
        if name not in self.feature_names:
            raise KeyError(f"no feature {name!r}; the observation has {self.feature_names}")
        return self.obs[:, :, self.feature_names.index(name)]

    def take(self, exits: np.ndarray) -> dict[str, np.ndarray]:
        """Per-input figures of stopping at ``exits`` (``[n]`` step indices in ``0..G``)."""
        rows = np.arange(len(exits))
        return {k: getattr(self, k)[rows, exits] for k in ("rel", "raw", "lat", "latency_s", "flops")}

    def subset(self, idx: np.ndarray) -> ExitTable:
        """The rows ``idx``."""
        return ExitTable(
            [self.item_ids[i] for i in idx],
            [self.tasks[i] for i in idx],
            self.obs[idx],
            self.rel[idx],
            self.raw[idx],
            self.lat[idx],
            self.latency_s[idx],
            self.dense_s[idx],
            self.flops[idx],
            self.prompt_tokens[idx],
            list(self.feature_names),
            dict(self.meta),
        )

    def save(self, path: str | Path) -> Path:
        """Write as ``.npz`` (arrays) with the names and metadata as JSON strings; no pickles."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            k: getattr(self, k) for k in ("obs", "rel", "raw", "lat", "latency_s", "dense_s", "flops", "prompt_tokens")
        }
        text = {"item_ids": self.item_ids, "tasks": self.tasks, "feature_names": self.feature_names, "meta": self.meta}
        np.savez(path, **arrays, text=np.array(json.dumps(text, default=str)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExitTable:
        """Read :meth:`save`'s file."""
        import json

        with np.load(path, allow_pickle=False) as z:
            text = json.loads(str(z["text"]))
            arrays = {k: z[k] for k in ("obs", "rel", "raw", "lat", "latency_s", "dense_s", "flops", "prompt_tokens")}
        return cls(text["item_ids"], text["tasks"], feature_names=text["feature_names"], meta=text["meta"], **arrays)


_COLUMNS = (
    ("rel", "accuracy_dense_relative"),
    ("raw", "accuracy_raw"),
    ("lat", "latency_fraction"),
    ("latency_s", "latency_s"),
    ("flops", "flops_fraction"),
)


DENSE_GROUP = 1  # the discrete staged action that runs a group densely: preset 0 (dense) behind the stop


def dense_group_action(env: Any) -> Any:
    """The action that runs a group densely: :data:`DENSE_GROUP` (discrete) or ``[0, 1, 1, ...]``."""
    env = getattr(env, "unwrapped", env)
    return DENSE_GROUP if env.discrete else np.array([0.0] + [1.0] * (env.interface.action_size - 1), np.float32)


def exit_row(env: Any, index: int, action: Any = None) -> dict[str, Any]:
    """One input's row of an exit table: one episode of ``env`` run to the end, then every stop's outcome.

    The episode runs (and, measured, is timed) exactly as an agent's would, with nothing in between
    its stages; only afterwards is each depth's answer scored, from a checkpoint taken there (scoring
    between timed stages would evict the weights from the caches and slow the next stage). A stop's
    LM head costs what the episode's final head cost: the same rows at every depth.

    Returns:
        ``obs`` (``[G, F]``), one ``[G + 1]`` array per column of :class:`ExitTable`, ``dense_s``,
        ``item_id``, ``task`` and ``tokens``.
    """
    env = getattr(env, "unwrapped", env)
    G = env.interface.steps
    action = dense_group_action(env) if action is None else action
    o, info = env.reset(options={"item": index})
    row: dict[str, Any] = {"obs": np.zeros((G, env.observation_space.shape[0]), np.float32)}
    row |= {k: np.zeros(G + 1) for k, _ in _COLUMNS}
    cps = []
    last: dict[str, Any] = {}
    for t in range(G):
        row["obs"][t] = o
        cps.append(env.checkpoint())
        o, _, done, _, last = env.step(action)
        if done != (t == G - 1):
            raise RuntimeError("the group action ended the episode before the last group")
    head = env.last_head_cost
    for t in range(G + 1):
        if t < G:
            env.return_to(cps[t])
            _, res = env.outcome(stopped=True, head_cost=head)
        else:
            res = last
        for k, key in _COLUMNS:
            row[k][t] = res[key]
    env.close_episode()
    row.update(dense_s=last["dense_latency_s"], item_id=info["item_id"], task=info["task"])
    row["group_action"] = np.asarray(action).tolist()  # what ran each group (an exported stop rule runs it too)
    row["tokens"] = info["prompt_tokens"]
    return row


def exit_table(env: Any, n: int | None = None, *, action: Any = None, desc: str = "exit table") -> ExitTable:
    """Every stop depth of the first ``n`` inputs of a :class:`envs.staged.Staged` environment.

    Args:
        env: The environment (its ``unwrapped`` form is used).
        n: Inputs (default: all of the environment's items).
        action: The action that runs a group (default: :func:`dense_group_action`).
        desc: Progress bar label.
    """
    env = getattr(env, "unwrapped", env)
    n = len(env.items) if n is None else min(int(n), len(env.items))
    if n < 1:
        raise ValueError("an exit table needs at least one input")
    rows = [exit_row(env, i, action) for i in tqdm(range(n), desc=desc, leave=False)]
    return table_of(rows, env)


def table_of(rows: Sequence[dict[str, Any]], env: Any) -> ExitTable:
    """An :class:`ExitTable` of :func:`exit_row` rows of ``env``."""
    env = getattr(env, "unwrapped", env)
    cols = {k: np.stack([r[k] for r in rows]) for k, _ in _COLUMNS}
    return ExitTable(
        [r["item_id"] for r in rows],
        [r["task"] for r in rows],
        np.stack([r["obs"] for r in rows]),
        dense_s=np.array([r["dense_s"] for r in rows]),
        prompt_tokens=np.array([r["tokens"] for r in rows]),
        feature_names=list(env.interface.feature_names),
        meta={"env": env.config(), "cost": env.cost_kind, "group_action": rows[0].get("group_action")},
        **cols,
    )


# ---------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class MarginThreshold:
    """CALM's rule: stop at the first readout whose margin is at least ``threshold`` (``inf``: never stop).

    Attributes:
        threshold: The margin to reach (nats between the two best choices; probability for tokens).
        name: Label in tables.
    """

    threshold: float
    name: str = ""

    def label(self) -> str:
        """``name`` or ``MarginThreshold(<threshold>)``."""
        return self.name or f"MarginThreshold({self.threshold:.3g})"

    def exits(self, table: ExitTable) -> np.ndarray:
        """Stop step per input of ``table`` (``G`` when no readout reaches the threshold)."""
        return first_true(table.feature("margin") >= self.threshold)

    def act(self, obs: np.ndarray, feature_names: Sequence[str], discrete: bool = True) -> Any:
        """The action in the live environment: stop (0) or the dense group (1 / ``[0, 1, 1, 1]``)."""
        stop = float(obs[list(feature_names).index("margin")]) >= self.threshold
        if discrete:
            return 0 if stop else 1
        return np.array([1.0 if stop else 0.0, 1.0, 1.0, 1.0], np.float32)


def first_true(mask: np.ndarray) -> np.ndarray:
    """Per row, the first column where ``mask`` holds, else the number of columns."""
    mask = np.asarray(mask, bool)
    any_ = mask.any(axis=1)
    return np.where(any_, mask.argmax(axis=1), mask.shape[1])


def margin_grid(table: ExitTable, k: int = 40) -> np.ndarray:
    """Candidate thresholds from the table's margins (quantiles), largest first, with ``inf`` (never stop) in front."""
    m = table.feature("margin").reshape(-1)
    qs = np.unique(np.quantile(m[np.isfinite(m)], np.linspace(0.0, 1.0, k)))
    return np.concatenate([[np.inf], qs[::-1]])


def fit_for_latency(train: ExitTable, target: float, grid: np.ndarray | None = None) -> MarginThreshold:
    """The smallest threshold whose mean latency fraction on ``train`` stays at or above ``target``.

    Fitted on the train split only; the threshold is then applied unchanged to new inputs.
    """
    grid = margin_grid(train) if grid is None else grid
    best = float(np.inf)
    for thr in grid:  # largest first: latency falls as the threshold falls
        lat = train.take(MarginThreshold(float(thr)).exits(train))["lat"].mean()
        if lat < target:
            break
        best = float(thr)
    return MarginThreshold(best, f"CALM threshold (train-fitted for {target:.0%})")


@dataclass(frozen=True)
class RiskControlled:
    """A stop rule certified to agree with dense on ``>= 1 - delta`` of new inputs (w.p. >= 1 - epsilon).

    Attributes:
        rule: The certified rule: a :class:`MarginThreshold` or a :class:`StopClassifier`.
        choice: The Learn-then-Test record (:class:`agents.risk.RiskChoice`).
        grid: The settings tested, safest first: margin thresholds, or the classifier's lambdas.
    """

    rule: Any
    choice: Any
    grid: tuple[float, ...]

    @property
    def score(self) -> str:
        """What the rule stops on: ``"margin"`` or ``"stop classifier"``."""
        return "stop classifier" if isinstance(self.rule, StopClassifier) else "margin"

    @property
    def setting_key(self) -> str:
        """The setting's name in records: ``"threshold"`` (margin) or ``"lambda"`` (classifier)."""
        return "lambda" if isinstance(self.rule, StopClassifier) else "threshold"

    @property
    def setting(self) -> float:
        """The certified margin threshold (``inf``: never stops) or the classifier's lambda (0: never stops)."""
        return float(self.rule.lam if isinstance(self.rule, StopClassifier) else self.rule.threshold)

    def setting_text(self) -> str:
        """The certified setting for tables."""
        x = self.setting
        if isinstance(self.rule, StopClassifier):
            return "λ = 0 (never stops)" if x == 0 else f"λ = {x:.3g}"
        return "∞ (never stops)" if not math.isfinite(x) else f"margin ≥ {x:.3g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        x = self.setting
        return {
            "score": self.score,
            self.setting_key: x if math.isfinite(x) else None,
            **self.choice.to_dict(),
            "grid": [g if math.isfinite(g) else None for g in self.grid],
        }


def risk_controlled(calibration: ExitTable, delta: float, epsilon: float = 0.05) -> RiskControlled:
    """The Learn-then-Test threshold for agreement ``>= 1 - delta`` with probability ``>= 1 - epsilon``.

    Candidates are the calibration table's margin quantiles, tested from the safest (never stop:
    the dense model itself, which always agrees) down; the loss is disagreement with dense.

    Raises:
        ValueError: Too few calibration inputs for ``delta`` and ``epsilon`` (the message gives the
            number needed), or scores that are not 0/1 agreement.
    """
    from agents.risk import ltt_select

    grid = margin_grid(calibration, k=60)
    losses = np.stack([1.0 - calibration.take(MarginThreshold(float(g)).exits(calibration))["rel"] for g in grid], 1)
    if not np.isin(losses, (0.0, 1.0)).all():
        raise ValueError("risk control needs 0/1 agreement per input (choice or exact items), not graded scores")
    choice = ltt_select(losses, delta, epsilon)
    thr = float(grid[choice.index])
    rule = MarginThreshold(thr, f"risk-controlled (delta={delta:g}, eps={epsilon:g})")
    return RiskControlled(rule, choice, tuple(float(g) for g in grid))


# ---------------------------------------------------------------------------------------- ceiling
@dataclass
class StopClassifier:
    """A fitted model of P(a stop here agrees with dense | observation), and the bar it stops at after each group.

    Attributes:
        model: The fitted classifier (observation row -> probability of agreement).
        bars: ``[G]``: the step's stop bar; the rule stops at the first step whose predicted
            agreement reaches its bar (:func:`stop_ceiling` makes them cost-aware).
        name: Operating point label.
        lam: The trade-off that set the bars (:func:`stop_ceiling`; ``nan`` when they were set otherwise).
        kind: The model's name in :data:`STOP_MODELS` (``""`` when it came from elsewhere).
    """

    model: Any
    bars: np.ndarray
    name: str = "learnable ceiling (stop classifier)"
    lam: float = math.nan
    kind: str = ""

    def label(self) -> str:
        """Its name in tables."""
        return self.name

    def agreement(self, table: ExitTable) -> np.ndarray:
        """``[n, G]``: the predicted probability that a stop at each step of ``table`` agrees with dense."""
        n, G, F = table.obs.shape
        return self.model.predict_proba(table.obs.reshape(-1, F).astype(np.float64))[:, 1].reshape(n, G)

    def exits(self, table: ExitTable) -> np.ndarray:
        """Stop step per input of ``table``."""
        if len(self.bars) != table.groups:
            raise ValueError(f"the classifier has bars for {len(self.bars)} steps, the table {table.groups}")
        return first_true(self.agreement(table) >= np.asarray(self.bars)[None, :])


CEILING_LAMBDAS = tuple(float(x) for x in np.round(np.linspace(0.02, 1.2, 30), 3))  # stop-cost trade-offs traced


def _logistic(C: float) -> Callable[[int], Any]:
    def make(seed: int) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, random_state=seed))

    return make


def _boosted(depth: int, rounds: int) -> Callable[[int], Any]:
    def make(seed: int) -> Any:
        from sklearn.ensemble import HistGradientBoostingClassifier

        # shallow trees, a slow rate and an L2 penalty: a few hundred inputs per depth are little to fit
        return HistGradientBoostingClassifier(
            max_depth=depth,
            max_iter=rounds,
            learning_rate=0.03,
            l2_regularization=1.0,
            early_stopping=False,
            random_state=seed,
        )

    return make


STOP_MODELS: dict[str, Callable[[int], Any]] = {
    **{f"logistic(C={C:g})": _logistic(C) for C in (0.01, 0.1, 1.0, 10.0)},
    "boosted trees(depth=2)": _boosted(2, 300),
    "boosted trees(depth=3)": _boosted(3, 200),
}
"""The stop classifier's candidate models (name -> factory of a seeded, unfitted model), chosen by
cross-validation in :func:`stop_ceiling`. Logistic regression ranks stops by a weighted sum of the
observation; boosted trees also find where a feature matters only at some depths, or only together
with another (on the embedded model's ``mc`` tables, with 720 train inputs, they fit the agreement
better out of fold: BENCHMARKS.md, "Staged exits vs static pruning")."""


def stop_model_arrays(model: Any) -> dict[str, np.ndarray]:
    """A fitted :data:`STOP_MODELS` model as plain arrays: what an exported stop controller evaluates.

    Boosted trees: ``[trees, nodes]`` arrays (padded) of each node's feature, threshold, children,
    the side a missing value takes and its value, a leaf being its own child, and the ``baseline``
    log-odds; ``P(agree) = sigmoid(baseline + sum of the leaves reached)``, a node sending ``x`` left
    when ``x[feature] <= threshold``. Logistic regression: the standardisation (``mean``, ``scale``),
    ``coef`` and ``intercept``; ``P(agree) = sigmoid(coef . (x - mean) / scale + intercept)``.
    Everything float64, as scikit-learn predicts.

    Raises:
        ValueError: A model that is not one :data:`STOP_MODELS` makes (or not fitted, or not binary).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if isinstance(model, HistGradientBoostingClassifier):
        if not hasattr(model, "_predictors") or model.n_trees_per_iteration_ != 1:
            raise ValueError("a stop model is a fitted binary classifier")
        trees = [p[0].nodes for p in model._predictors]
        if any(t["is_categorical"].any() for t in trees):
            raise ValueError("categorical splits do not export")
        T, M = len(trees), max(len(t) for t in trees)
        own = np.tile(np.arange(M), (T, 1))
        out = {
            "feature": np.zeros((T, M), np.int64),
            "threshold": np.zeros((T, M)),
            "left": own.copy(),
            "right": own.copy(),
            "missing_left": np.zeros((T, M), np.int64),
            "value": np.zeros((T, M)),
        }
        for i, nodes in enumerate(trees):
            m = len(nodes)
            inner = ~nodes["is_leaf"].astype(bool)
            out["feature"][i, :m] = np.where(inner, nodes["feature_idx"], 0)
            out["threshold"][i, :m] = np.where(inner, nodes["num_threshold"], np.inf)
            out["left"][i, :m] = np.where(inner, nodes["left"], np.arange(m))
            out["right"][i, :m] = np.where(inner, nodes["right"], np.arange(m))
            out["missing_left"][i, :m] = nodes["missing_go_to_left"]
            out["value"][i, :m] = np.where(inner, 0.0, nodes["value"])
        return out | {"baseline": np.asarray(model._baseline_prediction, np.float64).reshape(1)}
    if isinstance(model, Pipeline) and len(model.steps) == 2:
        scaler, lr = model.steps[0][1], model.steps[1][1]
        if isinstance(scaler, StandardScaler) and isinstance(lr, LogisticRegression) and hasattr(lr, "coef_"):
            if lr.coef_.shape[0] != 1:
                raise ValueError("a stop model is a fitted binary classifier")
            return {
                "mean": np.asarray(scaler.mean_, np.float64),
                "scale": np.asarray(scaler.scale_, np.float64),
                "coef": np.asarray(lr.coef_[0], np.float64),
                "intercept": np.asarray(lr.intercept_, np.float64).reshape(1),
            }
    raise ValueError(f"{type(model).__name__} is not a fitted stop model ({list(STOP_MODELS)})")


def _fit_stop(table: ExitTable, model: str, seed: int) -> Any:
    n, G, F = table.obs.shape
    x = table.obs.reshape(-1, F).astype(np.float64)
    y = (table.rel[:, :G] >= 1.0).reshape(-1).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("every stop agrees (or none does): nothing to learn a stop from")
    return STOP_MODELS[model](seed).fit(x, y)


def stop_ceiling(
    train: ExitTable,
    lambdas: Sequence[float] = CEILING_LAMBDAS,
    *,
    folds: int = 5,
    seed: int = 0,
    label: str = "learnable ceiling",
    models: Sequence[str] | None = None,
) -> tuple[list[StopClassifier], dict[str, float]]:
    """The learnable ceiling of the staged observations: a fitted stop classifier and a cost-aware stop per trade-off.

    The classifier predicts, from the observation before step ``t``, the probability ``p_t`` that
    stopping there agrees with the dense model. The model (:data:`STOP_MODELS`: logistic regression
    at four strengths, boosted trees at two depths) is chosen by ``folds``-fold cross-validation on
    ``train`` (by the log-loss of that prediction), then refitted on all of ``train``. With few train
    inputs the simplest model tends to win; with more, the trees.

    A stop after ``t`` groups risks a disagreement (``1 - p_t``) to save the latency of every later
    group (``1 - c_t``, with ``c_t`` the train inputs' mean latency over dense of stopping there).
    Each operating point stops at the first step where the risk is at most ``lambda`` times the
    saving, ``p_t >= 1 - lambda * (1 - c_t)``; the ``lambdas`` trace a latency-accuracy curve on new
    inputs. One bar for every depth would ask as much of an early stop, which saves most, as of a
    late one, which saves little: on the embedded model's ``mc`` exit tables that rule sat under
    the static hull where this one sits above it (BENCHMARKS.md, "Staged exits vs static pruning").

    Args:
        train: The train-split exit table.
        lambdas: The trade-offs traced, each ``>= 0`` (0: never stops early).
        folds: Cross-validation folds.
        seed: Fold assignment and solver seed.
        label: Operating points are named ``"<label> (λ=…)"``.
        models: Names in :data:`STOP_MODELS` to choose among (default: all).

    Returns:
        The classifiers (one per ``lambda``, sharing one fitted model) and the cross-validated
        log-loss of every model tried.

    Raises:
        ValueError: Fewer inputs than folds, a ``lambda`` that is negative or not finite, an
            unknown model, or a table whose stops all agree (or none does).
    """
    n, G, F = train.obs.shape
    if n < folds:
        raise ValueError(f"{n} training inputs are fewer than the {folds} cross-validation folds")
    lams = [float(x) for x in lambdas]
    if not lams or any(not math.isfinite(x) or x < 0 for x in lams):
        raise ValueError(f"lambdas must be finite and >= 0, got {list(lambdas)}")
    names = list(STOP_MODELS) if models is None else list(models)
    unknown = [m for m in names if m not in STOP_MODELS]
    if not names or unknown:
        raise ValueError(f"unknown stop models {unknown or names}: choose from {list(STOP_MODELS)}")
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    losses: dict[str, float] = {}
    for name in names:
        tot = 0.0
        for f in range(folds):
            fit, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            model = _fit_stop(train.subset(fit), name, seed)
            h = train.subset(held)
            p = model.predict_proba(h.obs.reshape(-1, F).astype(np.float64))[:, 1].clip(1e-6, 1 - 1e-6)
            y = (h.rel[:, :G] >= 1.0).reshape(-1)
            tot += float(-(y * np.log(p) + (~y) * np.log(1 - p)).sum())
        losses[name] = tot / (n * G)
    kind = min(losses, key=losses.__getitem__)
    model = _fit_stop(train, kind, seed)
    saving = 1.0 - train.lat[:, :G].mean(axis=0)
    # lambda = 0 never stops, even where a saturated model predicts agreement 1.0 exactly
    bars = [1.0 - lam * saving if lam > 0 else np.full(G, np.inf) for lam in lams]
    out = [StopClassifier(model, b, f"{label} (λ={lam:g})", lam, kind) for b, lam in zip(bars, lams, strict=True)]
    return out, losses


RISK_LAMBDAS = tuple(float(x) for x in np.round(np.linspace(0.0, 1.2, 121), 3))  # safest (0: never stops) first


def risk_controlled_classifier(
    train: ExitTable,
    delta: float,
    epsilon: float = 0.05,
    *,
    fit_share: float = 0.5,
    seed: int = 0,
    lambdas: Sequence[float] = RISK_LAMBDAS,
    models: Sequence[str] | None = None,
) -> RiskControlled:
    """Learn-then-Test on the cost-aware stop classifier: agreement ``>= 1 - delta`` w.p. ``>= 1 - epsilon``.

    The guarantee holds only on inputs the score never saw, so ``train`` is split: the classifier
    (:func:`stop_ceiling`) is fitted on ``fit_share`` of it, and its ``lambdas`` are tested on the
    rest, from the safest (``lambda = 0``: never stops, the dense model) up, as
    :func:`risk_controlled` tests margin thresholds. Where the readout's margin barely predicts
    agreement, the classifier still can, and the certified rule stops earlier. ``models`` are the
    :data:`STOP_MODELS` the fit part chooses among (default: all).

    Raises:
        ValueError: Too few inputs in the calibration part (the message gives the train inputs
            needed), a classifier the fit part cannot fit, or graded (not 0/1) scores.
    """
    (out,) = risk_controlled_classifiers(
        train, [delta], epsilon, fit_share=fit_share, seed=seed, lambdas=lambdas, models=models
    )
    if isinstance(out, str):
        raise ValueError(out)
    return out


def risk_controlled_classifiers(
    train: ExitTable,
    deltas: Sequence[float],
    epsilon: float = 0.05,
    *,
    fit_share: float = 0.5,
    seed: int = 0,
    lambdas: Sequence[float] = RISK_LAMBDAS,
    models: Sequence[str] | None = None,
) -> list[RiskControlled | str]:
    """:func:`risk_controlled_classifier` for every delta, from one classifier fitted on one split.

    A delta whose calibration part is too small is refused, with the reason, in its place; the
    classifier is fitted only if some delta can be certified.

    Raises:
        ValueError: A bad delta, epsilon, ``fit_share`` or ``lambdas``, a classifier the fit part
            cannot fit, or graded (not 0/1) scores.
    """
    from agents.risk import check_level, ltt_select, min_calibration

    deltas, epsilon = [check_level("delta", d) for d in deltas], check_level("epsilon", epsilon)
    if not 0.0 < fit_share < 1.0:
        raise ValueError(f"fit_share must be in (0, 1), got {fit_share}")
    lams = [float(x) for x in lambdas]
    if not lams or lams[0] != 0.0 or any(b <= a for a, b in zip(lams, lams[1:], strict=False)):
        raise ValueError("lambdas must rise from 0 (never stops), the safest candidate first")
    n = len(train.item_ids)
    k = int(round(n * fit_share))
    out: list[RiskControlled | str] = []
    for delta in deltas:
        needed = min_calibration(delta, epsilon)
        total = math.ceil(needed / (1.0 - fit_share))
        out.append(
            f"delta={delta} and epsilon={epsilon} need {needed} calibration inputs; with {1 - fit_share:.0%} of the "
            f"train table calibrating (the rest fits the classifier) that is about {total} train inputs, got {n}"
            if n - k < needed
            else ""
        )
    if all(out):
        return out
    perm = np.random.default_rng(seed).permutation(n)
    fit, cal = train.subset(perm[:k]), train.subset(perm[k:])
    rules, _ = stop_ceiling(fit, lams, seed=seed, label="stop classifier", models=models)
    losses = np.stack([1.0 - cal.take(r.exits(cal))["rel"] for r in rules], 1)
    if not np.isin(losses, (0.0, 1.0)).all():
        raise ValueError("risk control needs 0/1 agreement per input (choice or exact items), not graded scores")
    for i, delta in enumerate(deltas):
        if out[i]:
            continue
        choice = ltt_select(losses, delta, epsilon)
        rule = replace(rules[choice.index], name=f"risk-controlled classifier (delta={delta:g}, eps={epsilon:g})")
        out[i] = RiskControlled(rule, choice, tuple(lams))
    return out


# ---------------------------------------------------------------------------------------- as runs
def as_run(table: ExitTable, exits: np.ndarray, name: str, family: str) -> Any:
    """An :class:`agents.evaluation.Run` of stopping at ``exits`` (for the headline table and plots)."""
    from agents.evaluation import Run

    got = table.take(np.asarray(exits))
    return Run(
        name,
        family,
        got["raw"],
        got["rel"],
        got["lat"],
        got["latency_s"],
        got["flops"],
        list(table.tasks),
        np.zeros(len(exits)),
        {
            "mean_exit_step": float(np.mean(exits)),
            "stopped_early": float(np.mean(np.asarray(exits) < table.groups)),
            "throughput_tok_s": float(table.prompt_tokens.sum() / max(got["latency_s"].sum(), 1e-12)),
            "energy_source": [],
        },
    )


# ---------------------------------------------------------------------------------------- in a sweep
def episode(env: Any, index: int, act: Callable[[np.ndarray], Any]) -> tuple[dict[str, Any], float]:
    """One episode of a staged environment on input ``index``, every step decided by ``act``.

    Returns:
        The last step's info (the item's scores and cost) and the seconds ``act`` took in all.
    """
    env = getattr(env, "unwrapped", env)
    obs, _ = env.reset(options={"item": index})
    decided = 0.0
    for _ in range(env.interface.steps + 1):
        t0 = time.perf_counter()
        action = act(obs)
        decided += time.perf_counter() - t0
        obs, _, done, truncated, info = env.step(action)
        if done or truncated:
            return info, decided
    raise RuntimeError(f"a staged episode did not end after its {env.interface.steps} steps")


# Settings of a staged controller's training environment that do not shape what it sees and does:
# the evaluation chooses them (data, cost, reward, threads).
_NOT_INTERFACE = (
    "discrete",
    "cost",
    "model",
    "task",
    "split",
    "n_items",
    "data_seed",
    "calibrate_cost",
    "cost_model",
    "reward",
    "threads",
    "meter",
    "max_prompt_tokens",
)


def staged_env_kwargs(card: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Staged`` arguments that rebuild the environment an exported staged controller was trained in.

    Read from the card's ``env.kwargs`` (what the training environment was built with), less what
    the evaluation decides itself (data, cost, reward, threads). :class:`StagedController` then
    checks that the rebuilt environment's interface is the card's, so nothing is mirrored unchecked.

    Raises:
        ValueError: The card is not a staged controller's.
    """
    kind = card.get("interface", {}).get("kind")
    if kind != "staged":
        raise ValueError(f"not a staged controller (its environment is {kind!r})")
    kwargs = dict(card.get("env", {}).get("kwargs", {}))
    return {"discrete": bool(kwargs.get("discrete", False))} | {
        k: v for k, v in kwargs.items() if k not in _NOT_INTERFACE
    }


@dataclass
class StagedController:
    """An exported staged :class:`~agents.controller.Controller` deciding each step of a staged environment.

    Args:
        controller: The loaded controller (its card's interface kind is ``staged``).
        env: The staged environment it decides in (unwrapped), built with :func:`staged_env_kwargs`.
        name: Display name.

    Raises:
        ValueError: The environment's interface (observation, action map, ladder) differs from the card's.
    """

    controller: Any
    env: Any
    name: str = ""

    def __post_init__(self) -> None:
        self.env = getattr(self.env, "unwrapped", self.env)
        theirs = self.env.interface.config()
        mine = self.controller.card["interface"]
        if json.loads(json.dumps(theirs, default=str)) != json.loads(json.dumps(mine, default=str)):
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"{self.controller} was trained on another staged interface than this environment's (differs in "
                f"{diff}): build the environment with agents.staged.staged_env_kwargs(card)"
            )
        self.name = self.name or str(self.controller.card.get("algo"))

    def __call__(self, obs: np.ndarray) -> Any:
        """The controller's action for this step's observation."""
        return self.controller.select_action(obs)


class StagedPass:
    """The staged environment inside a measured sweep (:func:`agents.evaluation.sweep`'s ``staged``).

    Per input, the sweep runs this pass's parts back to back with the static plans, in its shuffled
    order: the **exit row** (every group dense to the end, each stop's outcome recorded:
    :func:`exit_row`), from which stop rules are evaluated by look-up, and one **episode per staged
    controller**. Each part is timed in every round; its seconds are its best round, as the static
    plans' are. :meth:`finish` then takes every latency fraction over the dense plan's seconds on the
    same input, so the staged runs sit on the same latency axis as the static hull.

    Args:
        env: A ``Staged`` environment (unwrapped or not) over the same inputs as the sweep's.
        controllers: ``(act, name, family)``: ``act`` maps an observation to an action; it decides in
            its own environment when it has one (``act.env``, as :class:`StagedController`), else in ``env``.
    """

    def __init__(self, env: Any, controllers: Sequence[tuple[Callable[[np.ndarray], Any], str, str]] = ()) -> None:
        self.env = getattr(env, "unwrapped", env)
        self.controllers = list(controllers)
        self.rows: list[dict[str, Any]] = []
        from agents.evaluation import result_columns

        self._cols = [result_columns() for _ in self.controllers]
        self.table: ExitTable | None = None
        self.runs: list[Any] = []

    def _env_of(self, act: Any) -> Any:
        """The environment a controller decides in: its own (``act.env``) or the pass's."""
        return getattr(getattr(act, "env", None), "unwrapped", None) or self.env

    @property
    def parts(self) -> int:
        """Parts run per input and round: the exit row, then one per controller."""
        return 1 + len(self.controllers)

    def check_items(self, item_ids: Sequence[str]) -> None:
        """Refuse a sweep over other inputs than this pass's environment draws.

        Raises:
            ValueError: Naming the first input that differs.
        """
        for env in [self.env, *(self._env_of(act) for act, _, _ in self.controllers)]:
            mine = [it.id for it in env.items[: len(item_ids)]]
            if mine != list(item_ids):
                first = next((i for i, (a, b) in enumerate(zip(mine, item_ids, strict=False)) if a != b), len(mine))
                raise ValueError(
                    f"a staged environment draws other inputs than the sweep's (input {first}): build them with the "
                    "same model, task, split, n_items, data_seed and max_prompt_tokens"
                )

    def columns(self) -> list[dict[str, list[Any]]]:
        """The staged controllers' per-input result columns so far (a sweep's worker hands them back)."""
        return self._cols

    def set_columns(self, cols: list[dict[str, list[Any]]]) -> None:
        """Replace the staged controllers' result columns (a sweep merging its workers' inputs)."""
        if len(cols) != len(self.controllers):
            raise ValueError(f"{len(cols)} result columns for {len(self.controllers)} staged controllers")
        self._cols = cols

    def run(self, part: int, index: int, first: bool) -> None:
        """Run part ``part`` on input ``index``; the first round keeps everything, later rounds only faster times."""
        if part == 0:
            row = exit_row(self.env, index)
            if first:
                self.rows.append(row)
            else:
                self.rows[-1]["latency_s"] = np.minimum(self.rows[-1]["latency_s"], row["latency_s"])
            return
        from agents.evaluation import collect

        act = self.controllers[part - 1][0]
        info, dec = episode(self._env_of(act), index, act)
        col = self._cols[part - 1]
        if first:
            collect(col, info, dec)
        else:
            col["lat_s"][-1] = min(col["lat_s"][-1], info["latency_s"] + dec)

    def finish(self, dense_latency_s: np.ndarray | None) -> None:
        """Build :attr:`table` (the exit table) and :attr:`runs` (the controllers').

        Args:
            dense_latency_s: The dense plan's seconds per input from the same rounds (measured); every
                latency fraction is then over it. ``None`` (calibrated cost) keeps the environment's fractions.
        """
        from agents.evaluation import run_of

        table = table_of(self.rows, self.env)
        runs = [run_of(name, family, col) for (_, name, family), col in zip(self.controllers, self._cols, strict=True)]
        if dense_latency_s is not None:
            ref = np.maximum(np.asarray(dense_latency_s, dtype=np.float64), 1e-12)
            table = replace(table, lat=table.latency_s / ref[:, None])
            runs = [replace(r, lat=r.latency_s / ref) for r in runs]
        self.table, self.runs = table, runs


# ---------------------------------------------------------------------------------------- rules in a sweep
def exit_depths(env: Any) -> list[Any]:
    """The static twin of every stop a staged environment offers: a fixed exit after the probe and after each group.

    A stop rule's operating points include "answer after the probe" and "after group ``t``" for
    every input; the same exits for every input are static plans
    (:class:`agents.baselines.StaticDepth`), and the static hull a staged rule is compared with must
    hold them, or a rule would beat static pruning with a plan static pruning was not offered.
    """
    from agents.baselines import StaticDepth

    env = getattr(env, "unwrapped", env)
    iface = env.interface
    depths = [env.probe.layers, *(iface.stop_layer(t) for t in range(iface.steps - 1))]
    return [StaticDepth(d) for d in dict.fromkeys(depths)]


CALM_FAMILY = "CALM threshold (staged, train-fitted)"
RISK_DELTAS = (0.02, 0.05, 0.10)  # risk-controlled stop: agreement with dense >= 1 - delta on new inputs ...
RISK_EPSILON = 0.05  # ... with probability >= 1 - epsilon (the main job, experiments.evaluate, bench.staged)
RISK_FAMILY = "risk-controlled stop (staged)"
STOP_FIT_ITEMS = 480
"""Train inputs the stop rules are fitted on unless told otherwise (the main job's ``staged.fit_items:
null``, ``experiments.evaluate --fit-items``). From about 300 on, cross-validation picks boosted trees
for the stop classifier on the ``mc`` tables, and Learn-then-Test on the classifier can certify
delta = 0.02 (its calibration half needs 149 inputs); with 160 the main job's classifier sat +0.044
over the static hull at 70% of dense latency, with 480 +0.051 (BENCHMARKS.md, "Main job")."""

RISK_CLASSIFIER_FAMILY = "risk-controlled stop classifier (staged)"
CLASSIFIER_FAMILY = "stop classifier (staged, train-fitted)"


@dataclass
class StopRules:
    """The stop rules fitted on a train-split exit table, to be read off a test table (:meth:`evaluate`).

    Attributes:
        grid: CALM thresholds (the train table's margin quantiles, ``inf`` first): one operating point each.
        risk: ``(delta, rule)`` per requested delta; ``rule`` is the :class:`RiskControlled` threshold,
            or the reason it was refused (too few calibration inputs).
        risk_classifier: The same on the stop classifier's score (:func:`risk_controlled_classifier`).
        epsilon: The risk control's allowed failure probability.
        train_items: Inputs of the table they were fitted on.
        classifiers: The cost-aware stop classifier's operating points (:func:`stop_ceiling`, the
            learnable ceiling fitted on the same table), or why it could not be fitted.
    """

    grid: np.ndarray
    risk: list[tuple[float, RiskControlled | str]]
    epsilon: float
    train_items: int
    classifiers: list[StopClassifier] | str = field(default_factory=list)
    risk_classifier: list[tuple[float, RiskControlled | str]] = field(default_factory=list)

    def certifications(self) -> list[tuple[str, str, float, RiskControlled | str]]:
        """Every risk-controlled stop: ``(what it stops on, its family, delta, the rule or why it was refused)``."""
        return [
            (score, family, delta, rc)
            for score, family, risk in (
                ("margin", RISK_FAMILY, self.risk),
                ("stop classifier", RISK_CLASSIFIER_FAMILY, self.risk_classifier),
            )
            for delta, rc in risk
        ]

    def evaluate(self, table: ExitTable) -> tuple[list[Any], list[dict[str, Any]]]:
        """The rules' runs on ``table`` (CALM grid, stop classifier, each certified risk rule) and the risk records."""
        runs = [
            as_run(table, MarginThreshold(float(g)).exits(table), f"CALM margin ≥ {g:.3g}", CALM_FAMILY)
            for g in self.grid
        ]
        if not isinstance(self.classifiers, str):
            runs += [as_run(table, c.exits(table), c.name, CLASSIFIER_FAMILY) for c in self.classifiers]
        records = []
        for score, family, delta, rc in self.certifications():
            rec: dict[str, Any] = {"delta": delta, "requested": 1.0 - delta, "epsilon": self.epsilon, "score": score}
            if isinstance(rc, str):
                records.append(rec | {"refused": rc})
                continue
            run = as_run(table, rc.rule.exits(table), rc.rule.label(), family)
            runs.append(run)
            x = rc.setting
            records.append(
                rec
                | {
                    rc.setting_key: x if math.isfinite(x) else None,
                    "certified": rc.setting_text(),
                    "agreement": float(run.rel.mean()),
                    "latency_saved": float(1.0 - run.lat.mean()),
                    "stopped_early": float(run.extra["stopped_early"]),
                }
            )
        return runs, records


def at_latency(classifier: StopClassifier, train: ExitTable, target: float) -> StopClassifier:
    """The operating point of ``classifier``'s model whose mean latency on ``train`` is ``target`` (or nearest).

    The bars are the cost-aware ones of :func:`stop_ceiling` (``1 - lambda * saving``, the same
    per-step savings), with the trade-off ``lambda`` found by bisection: a larger one stops earlier.
    In sample, and in the train table's cost.

    Raises:
        ValueError: ``classifier`` has no cost-aware trade-off (``lambda`` not finite and > 0).
    """
    lam0 = classifier.lam
    if not math.isfinite(lam0) or lam0 <= 0:
        raise ValueError(f"{classifier.name} has no cost-aware trade-off to move")
    saving = (1.0 - np.asarray(classifier.bars, np.float64)) / lam0
    p = classifier.agreement(train)

    def latency(lam: float) -> float:
        return float(train.take(first_true(p >= (1.0 - lam * saving)[None, :]))["lat"].mean())

    lo, hi = 0.0, max(CEILING_LAMBDAS)
    while latency(hi) > target and hi < 1e3:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if latency(mid) > target else (lo, mid)
    lam = hi if abs(latency(hi) - target) <= abs(latency(lo) - target) else lo
    name = f"stop classifier (λ={lam:.3g}, train latency {latency(lam):.3f})"
    return replace(classifier, bars=1.0 - lam * saving if lam > 0 else np.full(len(saving), np.inf), name=name, lam=lam)


def stop_exports(
    rules: StopRules, train: ExitTable, targets: Sequence[float] = ()
) -> list[tuple[str, StopClassifier, RiskControlled | None]]:
    """The stop classifier's operating points a run publishes: ``(folder name, classifier, certificate)``.

    Each certified Learn-then-Test classifier (``stop_classifier_delta<delta>``), and per latency
    target the cost-aware operating point whose mean latency on the train table is that target
    (``stop_classifier_lat<target>``, :func:`at_latency`). None when the classifier could not be fitted.
    """
    out: list[tuple[str, StopClassifier, RiskControlled | None]] = []
    for delta, rc in rules.risk_classifier:
        if not isinstance(rc, str):
            out.append((f"stop_classifier_delta{delta:g}", rc.rule, rc))
    if isinstance(rules.classifiers, str) or not rules.classifiers:
        return out
    for target in targets:
        out.append((f"stop_classifier_lat{float(target):.2f}", at_latency(rules.classifiers[-1], train, target), None))
    return out


def controller_exits(controller: Any, table: ExitTable) -> np.ndarray:
    """The stop step an exported stop controller takes on each input of ``table``, from its observations alone.

    ``controller`` (an :class:`agents.controller.Controller`) decides every step's observation at
    once; the exit is its first stop (action 0), ``G`` when it never stops. What the fitted rule
    gives on the same table (:meth:`StopClassifier.exits`) must be the same: the deployed rule is the
    trained one.
    """
    n, G, F = table.obs.shape
    acts = np.asarray(controller.select_action(table.obs.reshape(n * G, F))).reshape(n, G)
    return first_true(acts == 0)


def check_risk_settings(deltas: Sequence[float], epsilon: float) -> tuple[tuple[float, ...], float]:
    """The risk-controlled stop's deltas and epsilon as floats, each in (0, 1), at least one delta.

    Raises:
        ValueError: Naming the first bad value.
    """
    from agents.risk import check_level

    if len(deltas) == 0:
        raise ValueError("the risk-controlled stop needs at least one delta")
    return tuple(check_level("delta", d) for d in deltas), check_level("epsilon", epsilon)


def fit_stop_rules(
    train: ExitTable,
    deltas: Sequence[float] = RISK_DELTAS,
    epsilon: float = RISK_EPSILON,
    grid_size: int = 30,
) -> StopRules:
    """The CALM thresholds, the cost-aware stop classifier and both risk-controlled stops, fitted on ``train``.

    ``train`` is a train-split exit table; the risk-controlled stops certify a margin threshold
    and a classifier trade-off. A delta the table cannot certify (too few inputs) is kept
    with the reason, not raised: the other rules still stand; so is a stop classifier the table
    cannot fit (fewer inputs than folds, or every stop agrees). A delta or epsilon outside (0, 1) is
    an error, not a refusal.

    Raises:
        ValueError: A bad delta or epsilon (:func:`check_risk_settings`).
    """
    deltas, epsilon = check_risk_settings(deltas, epsilon)
    risk: list[tuple[float, RiskControlled | str]] = []
    for delta in deltas:
        try:
            risk.append((float(delta), risk_controlled(train, float(delta), float(epsilon))))
        except ValueError as exc:
            risk.append((float(delta), str(exc)))
    try:  # one classifier fitted on one half of the table, certified for every delta
        certified: list[RiskControlled | str] = risk_controlled_classifiers(train, deltas, epsilon)
    except ValueError as exc:
        certified = [str(exc)] * len(deltas)
    risk_clf = [(float(d), rc) for d, rc in zip(deltas, certified, strict=True)]
    classifiers = fit_stop_classifiers(train)
    return StopRules(margin_grid(train, grid_size), risk, float(epsilon), len(train.item_ids), classifiers, risk_clf)


def fit_stop_classifiers(train: ExitTable) -> list[StopClassifier] | str:
    """The cost-aware stop classifier's operating points fitted on ``train``, or why the table cannot fit one.

    :func:`stop_ceiling` at every other trade-off of :data:`CEILING_LAMBDAS`; a table with fewer inputs
    than folds, or whose stops all agree (or none does), gives the reason instead.
    """
    try:
        return stop_ceiling(train, CEILING_LAMBDAS[::2], label="stop classifier")[0]
    except ValueError as exc:
        return str(exc)


def staged_pass(
    env_for: Callable[[dict[str, Any]], Any],
    kwargs: Mapping[str, Any],
    controllers: Sequence[tuple[Any, str, str]] = (),
) -> StagedPass:
    """A :class:`StagedPass` over ``env_for(kwargs)`` (discrete), with exported staged controllers beside it.

    Args:
        env_for: Builds a staged evaluation environment from its arguments (the caller's data, cost and
            timing settings; e.g. :func:`agents.evaluation.evaluation_env` with ``env="Staged"``).
        kwargs: The exit row's environment (probe, groups, and data settings such as ``max_prompt_tokens``).
        controllers: ``(controller, name, family)``: loaded controllers
            (:class:`~agents.controller.Controller`) of staged environments; each decides in the
            environment its card describes (:func:`staged_env_kwargs`), with ``kwargs``' data settings.
    """
    made: dict[str, Any] = {}

    def env(kw: Mapping[str, Any]) -> Any:
        key = json.dumps(dict(kw), sort_keys=True, default=str)
        if key not in made:
            made[key] = env_for(dict(kw))
        return made[key]

    data = {k: v for k, v in kwargs.items() if k in _NOT_INTERFACE}
    main = env({**kwargs, "discrete": True})
    acts = []
    for ctrl, name, family in controllers:
        sc = StagedController(ctrl, env({**staged_env_kwargs(ctrl.card), **data}), name)
        acts.append((sc, name, family))
    return StagedPass(main, acts)
