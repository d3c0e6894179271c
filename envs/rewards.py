"""Reward functions: small pure functions of accuracy and cost relative to the dense model.

Every environment turns what it observed into three numbers, then calls :func:`reward`:

- ``accuracy`` in [0, 1]: the task score of the pruned model (by default the *dense-relative*
  score, agreement with the dense model, so that nothing wins by luck);
- ``latency_fraction``: the plan's latency divided by the dense model's latency on the same input
  (1.0 = no saving, 0.3 = 70% faster), probe included;
- ``energy_fraction``: the same for energy, or ``None`` when no energy figure exists.

The two cost fractions are blended into one *cost* with :attr:`RewardConfig.latency_weight` and
:attr:`RewardConfig.energy_weight` (normalised to sum to one), and the penalty form decides how
cost trades against accuracy:

- ``"linear"``: ``accuracy - lam * cost``. Every saving pays; ``lam`` is the exchange rate
  (``lam = 0.5``: halving the cost is worth a quarter of the accuracy).
- ``"hinge"``: ``accuracy - penalty * max(0, cost - budget)``. Cost below the budget is free,
  every point above it costs ``penalty``: the constrained form ("best accuracy at <= budget").
- ``"savings"``: ``accuracy * (1 + lam * (1 - cost))`` if ``accuracy >= min_accuracy`` else
  ``accuracy - 1``: savings count only when the answer is still good (multiplicative, as in
  AMC's FLOPs-weighted accuracy reward).

Nothing here touches a model or a clock, so the maths are unit-tested with plain numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

FORMS = ("linear", "hinge", "savings")


@dataclass(frozen=True)
class RewardConfig:
    """How accuracy and cost combine into a reward.

    Attributes:
        form: ``"linear"``, ``"hinge"`` or ``"savings"`` (see the module docstring).
        lam: Exchange rate of cost against accuracy (``linear``, ``savings``).
        latency_weight: Weight of the latency fraction in the blended cost.
        energy_weight: Weight of the energy fraction in the blended cost (0: ignore energy).
        budget: Cost fraction that is free under ``hinge``.
        penalty: Accuracy lost per unit of cost above ``budget`` under ``hinge``.
        min_accuracy: Accuracy below which ``savings`` pays nothing for cost.
        accuracy: Which score is the accuracy: ``"dense_relative"`` or ``"raw"``.
    """

    form: str = "linear"
    lam: float = 0.5
    latency_weight: float = 1.0
    energy_weight: float = 0.0
    budget: float = 0.5
    penalty: float = 2.0
    min_accuracy: float = 0.5
    accuracy: str = "dense_relative"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"reward form must be one of {FORMS}, got {self.form!r}")
        if self.accuracy not in ("dense_relative", "raw"):
            raise ValueError(f"reward accuracy must be 'dense_relative' or 'raw', got {self.accuracy!r}")
        for name in ("lam", "latency_weight", "energy_weight", "budget", "penalty", "min_accuracy"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or math.isnan(v) or v < 0:
                raise ValueError(f"reward {name} must be a non-negative number, got {v!r}")
        if self.latency_weight + self.energy_weight <= 0:
            raise ValueError("reward latency_weight + energy_weight must be > 0 (cost needs at least one of them)")

    @classmethod
    def from_any(cls, value: RewardConfig | dict[str, Any] | None) -> RewardConfig:
        """A config from a mapping (Hydra/YAML), an existing config, or ``None`` (defaults).

        Raises:
            ValueError: Unknown keys; the message lists the valid ones.
        """
        if value is None:
            return cls()
        if isinstance(value, RewardConfig):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown reward settings {unknown}; valid keys are {sorted(known)}")
        return cls(**dict(value))

    @property
    def uses_energy(self) -> bool:
        """Whether the reward needs an energy figure."""
        return self.energy_weight > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for logs and saved configs."""
        return asdict(self)


def blended_cost(latency_fraction: float, energy_fraction: float | None, cfg: RewardConfig) -> float:
    """Weighted mean of the latency and energy fractions.

    Raises:
        ValueError: ``energy_weight > 0`` but no energy figure, or a fraction is negative or not finite.
    """
    _check_fraction("latency_fraction", latency_fraction)
    if cfg.energy_weight > 0:
        if energy_fraction is None:
            raise ValueError(
                "the reward weighs energy (energy_weight > 0) but no energy figure is available: enable the "
                "meter's energy (meter={'energy': 'auto'}), calibrate with energy, or set energy_weight=0"
            )
        _check_fraction("energy_fraction", energy_fraction)
        total = cfg.latency_weight + cfg.energy_weight
        return (cfg.latency_weight * latency_fraction + cfg.energy_weight * energy_fraction) / total
    return float(latency_fraction)


def linear(accuracy: float, cost: float, lam: float) -> float:
    """``accuracy - lam * cost``."""
    return accuracy - lam * cost


def hinge(accuracy: float, cost: float, budget: float, penalty: float) -> float:
    """``accuracy - penalty * max(0, cost - budget)``."""
    return accuracy - penalty * max(0.0, cost - budget)


def savings(accuracy: float, cost: float, lam: float, min_accuracy: float) -> float:
    """``accuracy * (1 + lam * (1 - cost))`` when ``accuracy >= min_accuracy``, else ``accuracy - 1``."""
    if accuracy < min_accuracy:
        return accuracy - 1.0
    return accuracy * (1.0 + lam * (1.0 - cost))


def reward(
    accuracy: float,
    latency_fraction: float,
    energy_fraction: float | None = None,
    cfg: RewardConfig | None = None,
) -> float:
    """The reward of one decision.

    Args:
        accuracy: Score in [0, 1] (which score is the caller's choice, see :attr:`RewardConfig.accuracy`).
        latency_fraction: Latency relative to the dense model on the same input.
        energy_fraction: Energy relative to dense, or ``None``.
        cfg: The reward settings (defaults: linear, ``lam=0.5``, latency only).

    Raises:
        ValueError: Accuracy outside [0, 1], a bad fraction, or energy needed but missing.
    """
    cfg = cfg or RewardConfig()
    if not isinstance(accuracy, int | float) or math.isnan(accuracy) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy!r}")
    cost = blended_cost(latency_fraction, energy_fraction, cfg)
    if cfg.form == "linear":
        return float(linear(accuracy, cost, cfg.lam))
    if cfg.form == "hinge":
        return float(hinge(accuracy, cost, cfg.budget, cfg.penalty))
    return float(savings(accuracy, cost, cfg.lam, cfg.min_accuracy))


def reward_range(cfg: RewardConfig, max_cost: float = 2.0) -> tuple[float, float]:
    """Loose bounds of :func:`reward` for costs in ``[0, max_cost]`` (for ``Env.reward_range``)."""
    if cfg.form == "linear":
        return (-cfg.lam * max_cost, 1.0)
    if cfg.form == "hinge":
        return (-cfg.penalty * max(0.0, max_cost - cfg.budget), 1.0)
    return (-1.0, 1.0 + cfg.lam)


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number (cost relative to dense), got {value!r}")
