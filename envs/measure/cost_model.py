"""Calibrated cost model: predict a plan's latency and energy from its shape, fitted on this device.

Measuring every plan the agent picks costs real time and is noisy; a calibrated model answers in
microseconds and deterministically. :meth:`CostModel.fit` measures a sample of plans (a few
anchors plus random ones from :func:`random_plans`) with a :class:`~envs.measure.meters.Meter`, at each
sequence length in ``seq_lens`` (one *bucket* per length), and fits, per bucket, a weighted linear
least-squares model of latency and energy in the plan's features (:data:`FEATURES`):

- an intercept (embedding, final norm, LM head, Python overhead),
- decoder layers run, attention blocks run, MLP blocks run (per-block fixed costs: norms, residual
  adds, kernel launches),
- attention blocks with uneven KV groups (they gather K/V per query head),
- attention projection FLOPs, attention score FLOPs (scores and mixing), MLP FLOPs.

Rows are weighted by ``1 / latency`` so the fit minimises *relative* error, which is what the MAPE
of the drift check measures. Between buckets the two neighbouring models are interpolated
linearly in the sequence length, each evaluated on the features at the requested length; outside
the calibrated range the nearest bucket is used and the estimate is flagged ``extrapolated``.

The model is saved as JSON tagged with the device, thread count, model name, weights hash, dtype
and package versions. :meth:`CostModel.load` refuses a file made on another device or for another
model (naming what differs) unless ``force=True``.

Environments take ``cost: measured | calibrated``; both are a :class:`CostSource`
(:class:`MeasuredCost` times the real run, :class:`CalibratedCost` predicts without running), built
by :func:`make_cost_source`.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from envs.measure.meters import Meter, MixedSourceError, device_tag, package_versions, runtime_code_hash, threads_in_use
from envs.runtime.plan import ModelSpec, SparsityPlan, attn_proj_flops, mlp_flops

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import SparseLM

COST_MODEL_SCHEMA_VERSION = 1
FEATURES = (
    "intercept",
    "layers_run",
    "attn_blocks",
    "mlp_blocks",
    "attn_gather_blocks",
    "attn_proj_gflops",
    "attn_score_gflops",
    "mlp_gflops",
)


class CalibrationMismatchError(ValueError):
    """A calibration file was made on another device or for another model."""


# ---------------------------------------------------------------------------------------- features
def plan_features(plan: SparsityPlan, seq_len: int, past_len: int = 0, predictor_flops: float = 0.0) -> np.ndarray:
    """The cost features of ``plan`` for ``seq_len`` new tokens (see :data:`FEATURES`).

    FLOPs follow :meth:`SparsityPlan.flops`, split into projections and scores
    (``attn_proj + attn_score == flops()["attention"]``), in GFLOPs; the MLP's are
    :func:`envs.runtime.plan.mlp_flops`, per-token rules' selection (and ``predictor_flops`` per
    token and ``predicted`` layer) included. The fit has no separate term for a rule's gather
    overhead: the calibration sample has only static plans, so a rule's calibrated cost is its
    FLOPs at the static rate (the measured cost times the real run).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    s = plan.spec
    d = s.head_dim
    ctx = past_len + (seq_len + 1) / 2
    layers = attn = mlp_b = gather = 0
    proj = score = mlp = 0.0
    for lp in plan.layers:
        if not lp.run:
            continue
        layers += 1
        h = len(lp.heads)
        if h:
            attn += 1
            per_group = [sum(1 for q in lp.heads if s.kv_of(q) == g) for g in lp.kv_heads]
            gather += len(set(per_group)) > 1
        if lp.mlp_channels:
            mlp_b += 1
        proj += attn_proj_flops(s, lp, seq_len)
        score += 2 * 2 * seq_len * ctx * d * h
        mlp += mlp_flops(s, lp, seq_len, predictor_flops)
    return np.array([1.0, layers, attn, mlp_b, gather, proj / 1e9, score / 1e9, mlp / 1e9], dtype=np.float64)


def random_plans(
    spec: ModelSpec,
    importance: Any,
    n: int,
    *,
    seed: int = 0,
    num_groups: Sequence[int] = (1, 2, 3),
    low: float = 0.0,
) -> list[SparsityPlan]:
    """``n`` random plans: keep fractions drawn uniformly from ``[low, 1]`` per layer group.

    Each plan picks a group count from ``num_groups`` (those that fit the model) and decodes a random
    action with :meth:`SparsityPlan.from_action`, so plans look like an agent's.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= low <= 1.0:
        raise ValueError(f"low must be in [0, 1], got {low}")
    groups = [g for g in num_groups if 1 <= g <= spec.num_layers] or [1]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = int(rng.choice(groups))
        action = rng.uniform(low, 1.0, size=3 * g)
        out.append(SparsityPlan.from_action(spec, importance, action, num_groups=g))
    return out


def anchor_plans(spec: ModelSpec, importance: Any) -> list[SparsityPlan]:
    """Plans at the corners of the space (dense, empty, attention-only, MLP-only, half, uneven GQA).

    They make every feature vary independently in the calibration sample, so the fit is well posed.
    """
    U = SparsityPlan.uniform
    uneven = (spec.group_size + 1) / spec.num_heads if spec.num_kv_heads > 1 else 0.5
    return [
        SparsityPlan.dense(spec),
        U(spec, importance, layers=0.0),
        U(spec, importance, mlp=0.0),
        U(spec, importance, heads=0.0),
        U(spec, importance, layers=0.5, heads=0.5, mlp=0.5),
        U(spec, importance, heads=min(uneven, 1.0), mlp=0.25),
    ]


# ---------------------------------------------------------------------------------------- identity
def _device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def _slm_identity(slm: SparseLM) -> dict[str, Any]:
    return {
        "model": slm.name,
        "weights_hash": slm.weights_hash,
        "dtype": str(slm.blocks[0].q_w.dtype).replace("torch.", ""),
        "spec": slm.spec.to_dict(),
        "runtime": runtime_code_hash(),
    }


def default_path(slm: SparseLM, device: str = "cpu") -> Path:
    """Where the calibration of ``slm`` on ``device`` (at the current thread count) lives by default.

    Under the model's cache folder (``slm.cache_dir``), else ``cache_root()/cost_models/<name>``; the
    name carries the engine's code hash (:func:`~envs.measure.meters.runtime_code_hash`), so a changed
    engine is calibrated afresh.
    """
    from envs.data.files import cache_root

    folder = Path(slm.cache_dir) if slm.cache_dir else cache_root() / "cost_models" / slm.name.replace("/", "--")
    tag = hashlib.sha256(device_tag(device).encode()).hexdigest()[:8]
    ident = _slm_identity(slm)
    name = (
        f"cost_model-{_device_kind(device)}-{tag}-{threads_in_use()}t-{ident['dtype']}-{ident['weights_hash']}"
        f"-r{ident['runtime'][:8]}.json"
    )
    return folder / name


# ---------------------------------------------------------------------------------------- fitting
def _solve_wls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of relative error: rows weighted by 1/y, columns scaled for conditioning.

    Every feature is an amount of work (a count or FLOPs), so its price cannot be negative. An
    unconstrained fit on a few noisy measurements can trade a negative price on one feature against
    another and then predict near-zero or negative latencies for plans outside the sample (seen on
    a loaded machine: a predicted dense latency of 8 ms at 64 tokens, so pruned plans cost "100×
    dense"); non-negative prices keep every prediction monotone in the work a plan does.
    """
    from scipy.optimize import nnls

    w = 1.0 / np.maximum(y, 1e-12)
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls((X / scale) * w[:, None], y * w)
    return coef / scale


def _fit_wls(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """Weighted least squares, refitted once without outliers; returns the coefficients and the outlier count.

    On a shared machine a measurement can be slowed by other processes (a one-sided error). Points
    whose relative residual lies more than 4 robust standard deviations (1.4826 MAD) from the median
    residual, and more than 2 % off, are left out of a second fit, when enough points remain.
    """
    coef = _solve_wls(X, y)
    r = (X @ coef - y) / np.maximum(y, 1e-12)
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med)))
    keep = np.abs(r - med) <= max(4.0 * mad, 0.02)
    if keep.all() or keep.sum() < X.shape[1] + 2:
        return coef, 0
    return _solve_wls(X[keep], y[keep]), int((~keep).sum())


def _mape(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true) / np.maximum(np.abs(true), 1e-12)) * 100.0)


@dataclass
class BucketFit:
    """The fitted model of one sequence-length bucket.

    Attributes:
        seq_len: Tokens per row the bucket was measured at.
        latency_coef: Seconds per unit of each feature (:data:`FEATURES` order).
        energy_coef: Joules per unit of each feature, or ``None`` without energy.
        n_plans: Plans measured.
        fit_mape: In-sample MAPE (%) of latency.
        energy_fit_mape: In-sample MAPE (%) of energy, or ``None``.
        noisy_fraction: Share of the calibration measurements flagged noisy (after re-measuring).
        n_outliers: Latency points left out of the fit as outliers (see :func:`_fit_wls`).
    """

    seq_len: int
    latency_coef: list[float]
    energy_coef: list[float] | None
    n_plans: int
    fit_mape: float
    energy_fit_mape: float | None
    noisy_fraction: float
    n_outliers: int = 0


@dataclass(frozen=True)
class CostEstimate:
    """A calibrated prediction.

    Attributes:
        latency_s: Predicted latency of one forward, seconds.
        energy_j: Predicted energy, joules, or ``None`` if the calibration had no energy.
        source: Always ``"calibrated"``.
        energy_source: ``"calibrated"`` when fitted on measured energy, ``"estimated"`` when fitted
            on estimates (a fit of estimates is still an estimate), ``None`` without energy.
        device: Hardware tag of the calibration.
        seq_len: The sequence length asked for.
        buckets: The bucket lengths the prediction came from.
        extrapolated: ``seq_len`` lies outside the calibrated range.
        clipped: The linear prediction fell below 1 µs and was raised to it.
    """

    latency_s: float
    energy_j: float | None
    source: str
    energy_source: str | None
    device: str
    seq_len: int
    buckets: tuple[int, ...]
    extrapolated: bool = False
    clipped: bool = False


_MIN_LATENCY_S = 1e-6


class CostModel:
    """Per-bucket linear model of latency and energy, tagged with where and for what it was fitted.

    Build with :meth:`fit` or :meth:`load`; use :meth:`predict`; check it with :meth:`drift`.
    """

    def __init__(self, meta: dict[str, Any], buckets: dict[int, BucketFit], samples: list[dict[str, Any]]) -> None:
        if not buckets:
            raise ValueError("a CostModel needs at least one fitted bucket")
        self.meta = meta
        self.buckets = dict(sorted(buckets.items()))
        self.samples = samples
        self.spec = ModelSpec(**meta["spec"])

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        slm: SparseLM,
        *,
        seq_lens: Sequence[int] = (64, 256),
        n_plans: int = 32,
        meter: Any = None,
        seed: int = 0,
        logits: str = "last",
        batch_size: int = 1,
        num_groups: Sequence[int] = (1, 2, 3),
        max_attempts: int = 2,
        callback: Callable[[int, int], None] | None = None,
    ) -> CostModel:
        """Measure ``n_plans`` plans per sequence length on this device and fit the model.

        Args:
            slm: The model, on the device to calibrate.
            seq_lens: One bucket per length (tokens per row).
            n_plans: Plans per bucket: the :func:`anchor_plans` plus random ones.
            meter: A :class:`~envs.measure.meters.Meter` (or anything with its ``measure``); default
                ``Meter(device, warmup=1, repeats=5)``.
            seed: Seed for the random plans and token ids.
            logits: The forward's ``logits`` argument (the LM head's cost lands in the intercept).
            batch_size: Rows per forward.
            num_groups: Layer-group counts the random plans use.
            max_attempts: Re-measure a noisy plan up to this many times (``Meter.measure_stable``).
            callback: Called with ``(done, total)`` after each measured plan (progress bars).

        Raises:
            ValueError: Too few plans to fit the features, or bad lengths.
        """
        import torch

        anchors = anchor_plans(slm.spec, slm.importance)
        need = max(len(FEATURES) + 2, len(anchors))
        if n_plans < need:
            raise ValueError(f"n_plans must be >= {need} to fit {len(FEATURES)} features, got {n_plans}")
        lens = sorted({int(t) for t in seq_lens})
        if not lens or lens[0] < 1:
            raise ValueError(f"seq_lens must be positive token counts, got {list(seq_lens)}")
        device = str(slm.device)
        meter = meter if meter is not None else Meter(device, warmup=1, repeats=5)
        gen = torch.Generator().manual_seed(seed)
        total, done = n_plans * len(lens), 0
        buckets: dict[int, BucketFit] = {}
        samples: list[dict[str, Any]] = []
        rng = np.random.default_rng(seed)
        for b, T in enumerate(lens):
            plans = anchors + random_plans(
                slm.spec, slm.importance, n_plans - len(anchors), seed=seed * 1000 + b, num_groups=num_groups
            )
            order = rng.permutation(len(plans))  # anchors spread through time, not all first
            ids = torch.randint(slm.spec.vocab_size or 2, (batch_size, T), generator=gen).to(slm.device)
            rows, lat, en, noisy = [], [], [], []
            for j in order:
                plan = plans[j]
                m = _measure(meter, _run_fn(slm, ids, plan, logits), batch_size * T, max_attempts)
                x = plan_features(plan, T)
                rows.append(x)
                lat.append(m.latency_p50_s)
                en.append(m.energy_j)
                noisy.append(bool(m.noisy))
                samples.append(
                    {
                        "seq_len": T,
                        "features": x.tolist(),
                        "latency_s": m.latency_p50_s,
                        "latency_cv": m.latency_cv,
                        "energy_j": m.energy_j,
                        "noisy": bool(m.noisy),
                        "keep": plan.keep_fractions(),
                    }
                )
                done += 1
                if callback is not None:
                    callback(done, total)
            X, y = np.stack(rows), np.asarray(lat)
            coef, n_out = _fit_wls(X, y)
            e_coef = e_mape = None
            if all(e is not None for e in en):
                ye = np.asarray(en, dtype=np.float64)
                e_coef, _ = _fit_wls(X, ye)
                e_mape = _mape(X @ e_coef, ye)
            buckets[T] = BucketFit(
                seq_len=T,
                latency_coef=coef.tolist(),
                energy_coef=None if e_coef is None else e_coef.tolist(),
                n_plans=len(plans),
                fit_mape=_mape(X @ coef, y),
                energy_fit_mape=e_mape,
                noisy_fraction=float(np.mean(noisy)),
                n_outliers=n_out,
            )
        tag = getattr(meter, "tag", None) or device_tag(device)
        meter_info = meter.describe() if hasattr(meter, "describe") else {"device": tag}
        has_energy = all(b.energy_coef is not None for b in buckets.values())
        energy_source = meter_info.get("energy_source") if has_energy else None
        meta = {
            "schema_version": COST_MODEL_SCHEMA_VERSION,
            "device": tag,
            "device_kind": _device_kind(device),
            "threads": threads_in_use(),
            **_slm_identity(slm),
            "packages": package_versions(),
            "logits": logits,
            "batch_size": batch_size,
            "seq_lens": lens,
            "n_plans": n_plans,
            "seed": seed,
            "meter": meter_info,
            "energy_source": energy_source,
            "features": list(FEATURES),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return cls(meta, buckets, samples)

    # ------------------------------------------------------------------ predict
    def predict(self, plan: SparsityPlan, seq_len: int, predictor_flops: float = 0.0) -> CostEstimate:
        """Predicted latency and energy of one forward of ``plan`` over ``seq_len`` tokens per row.

        ``predictor_flops`` is one token's channel-predictor FLOPs per ``predicted`` layer (see
        :func:`plan_features`).

        Raises:
            ValueError: The plan is for a model of another shape.
        """
        if plan.spec != self.spec:
            raise ValueError(
                f"plan is for a model of shape {plan.spec}, but this cost model was calibrated for {self.spec} "
                f"({self.meta['model']}); calibrate this model with `python -m experiments.calibrate_cost`"
            )
        lens = list(self.buckets)
        x = plan_features(plan, seq_len, predictor_flops=predictor_flops)
        extrapolated = not lens[0] <= seq_len <= lens[-1]
        if seq_len <= lens[0]:
            use, weights = [lens[0]], [1.0]
        elif seq_len >= lens[-1]:
            use, weights = [lens[-1]], [1.0]
        elif seq_len in self.buckets:
            use, weights = [seq_len], [1.0]
        else:  # between two buckets: interpolate their predictions linearly in seq_len
            hi = next(t for t in lens if t > seq_len)
            lo = lens[lens.index(hi) - 1]
            a = (seq_len - lo) / (hi - lo)
            use, weights = [lo, hi], [1.0 - a, a]
        lat = sum(w * float(x @ np.asarray(self.buckets[t].latency_coef)) for t, w in zip(use, weights, strict=True))
        energy = None
        if all(self.buckets[t].energy_coef is not None for t in use):
            energy = sum(
                w * float(x @ np.asarray(self.buckets[t].energy_coef)) for t, w in zip(use, weights, strict=True)
            )
            energy = max(energy, 0.0)
        clipped = lat < _MIN_LATENCY_S
        es = self.meta.get("energy_source")
        return CostEstimate(
            latency_s=max(lat, _MIN_LATENCY_S),
            energy_j=energy,
            source="calibrated",
            energy_source=None if energy is None else ("calibrated" if es == "measured" else "estimated"),
            device=self.meta["device"],
            seq_len=int(seq_len),
            buckets=tuple(use),
            extrapolated=extrapolated,
            clipped=clipped,
        )

    # ------------------------------------------------------------------ drift
    def drift(
        self,
        slm: SparseLM,
        n_plans: int = 16,
        seq_len: int = 256,
        *,
        meter: Any = None,
        seed: int = 12345,
        max_attempts: int = 2,
        callback: Callable[[int, int], None] | None = None,
        verbose: bool = False,
    ) -> dict[str, Any]:
        """Measure ``n_plans`` fresh random plans and compare with the predictions.

        Noisy measurements are re-measured up to ``max_attempts`` times, as in :meth:`fit`.

        Returns:
            ``{"mape", "bias", "median_ape", "p95_ape", "max_ape", "energy_mape", "n", "seq_len",
            "noisy_fraction", "rows"}``; errors in percent (``bias`` is the mean signed error: a large
            bias with a small spread means the machine's speed moved since calibration), ``rows`` as
            (predicted, measured) seconds.

        Raises:
            CalibrationMismatchError: ``slm`` is not the calibrated model.
        """
        self.check(slm=slm)
        import torch

        meter = meter if meter is not None else Meter(str(slm.device), warmup=1, repeats=5)
        gen = torch.Generator().manual_seed(seed)
        bs = int(self.meta.get("batch_size", 1))
        ids = torch.randint(slm.spec.vocab_size or 2, (bs, seq_len), generator=gen).to(slm.device)
        plans = random_plans(slm.spec, slm.importance, n_plans, seed=seed)
        pred, meas, e_pred, e_meas, noisy = [], [], [], [], []
        for k, plan in enumerate(plans):
            run = _run_fn(slm, ids, plan, self.meta.get("logits", "last"))
            m = _measure(meter, run, bs * seq_len, max_attempts)
            est = self.predict(plan, seq_len)
            pred.append(est.latency_s)
            meas.append(m.latency_p50_s)
            noisy.append(bool(m.noisy))
            if est.energy_j is not None and m.energy_j is not None:
                e_pred.append(est.energy_j)
                e_meas.append(m.energy_j)
            if callback is not None:
                callback(k + 1, n_plans)
        p, t = np.asarray(pred), np.asarray(meas)
        signed = (p - t) / t * 100.0
        ape = np.abs(signed)
        out = {
            "mape": float(ape.mean()),
            "bias": float(signed.mean()),
            "median_ape": float(np.median(ape)),
            "p95_ape": float(np.percentile(ape, 95)),
            "max_ape": float(ape.max()),
            "energy_mape": _mape(np.asarray(e_pred), np.asarray(e_meas)) if e_pred else None,
            "n": n_plans,
            "seq_len": seq_len,
            "noisy_fraction": float(np.mean(noisy)),
            "rows": list(zip(pred, meas, strict=True)),
        }
        if verbose:
            print(
                f"drift at {seq_len} tokens over {n_plans} fresh plans: latency MAPE {out['mape']:.1f}% "
                f"(median {out['median_ape']:.1f}%, p95 {out['p95_ape']:.1f}%, bias {out['bias']:+.1f}%)"
                + (f", energy MAPE {out['energy_mape']:.1f}%" if out["energy_mape"] is not None else "")
            )
        return out

    # ------------------------------------------------------------------ identity
    def check(self, *, slm: SparseLM | None = None, device: str | None = None, force: bool = False) -> None:
        """Refuse to be used on another device or model.

        Args:
            slm: The model it will predict for (checks name, weights hash, dtype, shape).
            device: The device it will predict for; ``None`` means the file's device kind on this machine.
            force: Warn instead of raising.

        Raises:
            CalibrationMismatchError: Naming each field that differs, the file's value and this one's.
        """
        meta = self.meta
        diffs: list[str] = []
        kind = _device_kind(device) if device is not None else meta.get("device_kind", "cpu")
        if device is not None and kind != meta.get("device_kind"):
            diffs.append(f"device kind: file has {meta.get('device_kind')!r}, requested {kind!r}")
        try:
            here = device_tag(device if device is not None else kind)
        except Exception as exc:  # no CUDA here for a CUDA file
            here = f"unavailable ({exc})"
        if here != meta.get("device"):
            diffs.append(f"device: file has {meta.get('device')!r}, this machine has {here!r}")
        if kind == "cpu" and meta.get("threads") != threads_in_use():
            diffs.append(f"threads: file has {meta.get('threads')}, this process uses {threads_in_use()}")
        if slm is not None:
            ident = _slm_identity(slm)
            for key in ("model", "weights_hash", "dtype", "spec"):
                if ident[key] != meta.get(key):
                    diffs.append(f"{key}: file has {meta.get(key)!r}, this model has {ident[key]!r}")
        if slm is not None and meta.get("runtime") != runtime_code_hash():
            warnings.warn(
                f"cost model calibrated under other engine code (runtime {meta.get('runtime')!r}, now "
                f"{runtime_code_hash()!r}): the kernels it timed have changed; recalibrate with "
                f"`python -m experiments.calibrate_cost --model {meta.get('model')}`",
                stacklevel=3,
            )
        current = package_versions()
        pkg = [
            f"{k} {meta.get('packages', {}).get(k)} -> {v}"
            for k, v in current.items()
            if meta.get("packages", {}).get(k) != v
        ]
        if pkg:
            warnings.warn(
                "cost model calibrated with other package versions (" + ", ".join(pkg) + "); "
                "timings may have drifted: run its drift check",
                stacklevel=3,
            )
        if diffs:
            msg = (
                "this cost model was calibrated elsewhere: " + "; ".join(diffs) + ". Recalibrate here with "
                f"`python -m experiments.calibrate_cost --model {meta.get('model')}` (and the same --threads), "
                "or pass force=True to use it anyway."
            )
            if not force:
                raise CalibrationMismatchError(msg)
            warnings.warn(msg, stacklevel=3)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (see :meth:`from_dict`)."""
        return {
            "meta": self.meta,
            "buckets": [asdict(b) for b in self.buckets.values()],
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        """Rebuild from :meth:`to_dict` output (no identity check; see :meth:`load`).

        Raises:
            ValueError: Wrong schema version or missing fields.
        """
        try:
            meta = data["meta"]
            version = meta.get("schema_version")
            if version != COST_MODEL_SCHEMA_VERSION:
                raise ValueError(
                    f"cost model schema_version must be {COST_MODEL_SCHEMA_VERSION}, got {version!r}: recalibrate"
                )
            if list(meta["features"]) != list(FEATURES):
                raise ValueError(f"cost model features {meta['features']} differ from {list(FEATURES)}: recalibrate")
            buckets = {int(b["seq_len"]): BucketFit(**b) for b in data["buckets"]}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed cost model JSON ({type(exc).__name__}: {exc}); recalibrate") from None
        return cls(meta, buckets, list(data.get("samples", [])))

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, slm: SparseLM | None = None, device: str | None = None, force: bool = False
    ) -> CostModel:
        """Read a saved model and check it fits this device (and ``slm``, when given).

        Raises:
            FileNotFoundError: No file; says how to make one.
            CalibrationMismatchError: Made on another device or for another model (unless ``force``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no cost model at {path}; make one with `python -m experiments.calibrate_cost --output {path}`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); recalibrate") from None
        model = cls.from_dict(data)
        model.check(slm=slm, device=device, force=force)
        return model


# ---------------------------------------------------------------------------------------- cost sources
def _measure(meter: Any, fn: Callable[[], Any], tokens: int, max_attempts: int) -> Any:
    if max_attempts > 1 and hasattr(meter, "measure_stable"):
        return meter.measure_stable(fn, tokens=tokens, max_attempts=max_attempts)
    return meter.measure(fn, tokens=tokens)


def _run_fn(slm: SparseLM, ids: Any, plan: SparsityPlan, logits: str) -> Callable[[], Any]:
    def run() -> Any:
        return slm.forward(ids, plan, logits=logits)

    return run


@dataclass(frozen=True)
class Cost:
    """The cost of running a plan, as a reward sees it.

    Attributes:
        latency_s: Latency of one run (the median for measured costs), seconds.
        energy_j: Energy of one run, joules, or ``None``.
        source: ``"measured"`` or ``"calibrated"``.
        energy_source: ``"measured"``, ``"estimated"``, ``"calibrated"`` or ``None``.
        device: Hardware tag.
        noisy: The measurement's spread exceeded the meter's bound (always ``False`` when calibrated).
        raw: The full measurement or estimate, for logging.
    """

    latency_s: float
    energy_j: float | None
    source: str
    energy_source: str | None
    device: str
    noisy: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def __add__(self, other: Cost) -> Cost:
        """Sum of two costs (e.g. the steps of one episode); refuses to mix sources or devices."""
        if not isinstance(other, Cost):
            return NotImplemented
        for attr in ("source", "energy_source", "device"):
            if getattr(self, attr) != getattr(other, attr):
                raise MixedSourceError(
                    f"cannot add costs with different {attr}: {getattr(self, attr)!r} and {getattr(other, attr)!r}; "
                    "use one cost source for a whole episode"
                )
        energy = None if self.energy_j is None or other.energy_j is None else self.energy_j + other.energy_j
        return Cost(
            self.latency_s + other.latency_s,
            energy,
            self.source,
            self.energy_source,
            self.device,
            self.noisy or other.noisy,
            {"parts": [self.raw, other.raw]},
        )


class CostSource(ABC):
    """One interface for measured and calibrated costs; environments call :meth:`cost`."""

    kind: str

    @abstractmethod
    def cost(self, plan: SparsityPlan, run_fn: Callable[[], Any] | None, seq_len: int) -> Cost:
        """The cost of ``plan`` over ``seq_len`` tokens; ``run_fn`` runs it (measured sources call it)."""

    def describe(self) -> dict[str, Any]:
        """What the costs come from (JSON-ready), for an environment's description."""
        return {"kind": self.kind}


class MeasuredCost(CostSource):
    """Times the real run with a :class:`~envs.measure.meters.Meter` (platform-dependent, noisy).

    Args:
        meter: The meter.
        max_attempts: Re-measure a noisy result up to this many times (1: never).
    """

    kind = "measured"

    def __init__(self, meter: Meter, *, max_attempts: int = 1) -> None:
        self.meter = meter
        self.max_attempts = max_attempts

    def cost(self, plan: SparsityPlan, run_fn: Callable[[], Any] | None, seq_len: int) -> Cost:
        """Measure ``run_fn`` (which must run ``plan``)."""
        if run_fn is None:
            raise ValueError("MeasuredCost needs run_fn, the callable that runs the plan; pass it or use 'calibrated'")
        m = self.meter.measure_stable(run_fn, tokens=seq_len, max_attempts=self.max_attempts)
        return Cost(m.latency_p50_s, m.energy_j, "measured", m.energy_source, m.device, m.noisy, m.to_dict())


class CalibratedCost(CostSource):
    """Predicts from a :class:`CostModel`; never runs or times anything, so it is deterministic."""

    kind = "calibrated"

    def __init__(self, cost_model: CostModel, predictor_flops: float = 0.0) -> None:
        self.cost_model = cost_model
        self.predictor_flops = float(predictor_flops)

    def describe(self) -> dict[str, Any]:
        """The cost model's identity: its device, model, weights hash, engine code and fit date."""
        meta = self.cost_model.meta
        keep = ("device", "device_kind", "model", "weights_hash", "runtime", "threads", "created")
        return {"kind": self.kind, **{k: meta[k] for k in keep if k in meta}}

    def cost(self, plan: SparsityPlan, run_fn: Callable[[], Any] | None, seq_len: int) -> Cost:
        """Predict the cost of ``plan``; ``run_fn`` is ignored."""
        est = self.cost_model.predict(plan, seq_len, self.predictor_flops)
        return Cost(est.latency_s, est.energy_j, "calibrated", est.energy_source, est.device, False, asdict(est))


def make_cost_source(
    kind: str,
    *,
    slm: SparseLM | None = None,
    meter: Meter | None = None,
    cost_model: CostModel | None = None,
    path: str | Path | None = None,
    force: bool = False,
) -> CostSource:
    """Build the cost source an environment's ``cost: measured | calibrated`` names.

    Args:
        kind: ``"measured"`` or ``"calibrated"``.
        slm: The model (for its device, and to find and check its calibration).
        meter: Meter for ``"measured"`` (default: a :class:`Meter` on the model's device).
        cost_model: A fitted model for ``"calibrated"``; else loaded from ``path`` or
            :func:`default_path`.
        path: Calibration file.
        force: Use a calibration from another device/model anyway.

    Raises:
        ValueError: Unknown kind, or nothing to build it from.
        FileNotFoundError: No calibration file; says how to make one.
    """
    if kind == "measured":
        if meter is None:
            meter = Meter(str(slm.device) if slm is not None else "cpu")
        return MeasuredCost(meter)
    if kind == "calibrated":
        if cost_model is None:
            if path is None:
                if slm is None:
                    raise ValueError("cost='calibrated' needs a cost_model, a path, or the slm to find its calibration")
                path = default_path(slm, str(slm.device))
            cost_model = CostModel.load(path, slm=slm, force=force)
        elif slm is not None:
            cost_model.check(slm=slm, force=force)
        predictor = getattr(slm, "predictor", None)
        return CalibratedCost(cost_model, 0.0 if predictor is None else predictor.flops_per_token())
    raise ValueError(f"cost must be 'measured' or 'calibrated', got {kind!r}")
