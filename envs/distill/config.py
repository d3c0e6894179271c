"""What a preparation trains under: the plan distribution and the training hyper-parameters.

:class:`PlanDistribution` describes the plans a preparation samples (:mod:`envs.distill.sampler`
draws them); :class:`PrepareConfig` holds everything else that shapes a run but the model and the
data. Both validate on construction from plain mappings, so a bad command line fails with the
field's name before any model is loaded, and both round-trip through JSON for the card and the
checkpoint (:meth:`PrepareConfig.training_hash` refuses a resume under other settings).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PLAN_FAMILIES = ("layers", "mlp", "kv")
LAYER_CHOICES = ("depth", "importance", "mixed")
METHODS = ("full", "lora")
DENSE_WEIGHTS = ("original", "adapted")


def _fraction(where: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}") from None
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {value!r}")
    return v


@dataclass(frozen=True)
class PlanDistribution:
    """The distribution of plans a preparation trains under.

    Attributes:
        families: Which kinds of pruning are sampled: ``"layers"`` (layer dropout), ``"mlp"``
            (MLP-channel keep levels), ``"kv"`` (whole KV-group drops).
        dense_prob: Probability that a plan is the dense plan. It anchors the dense path to the
            teacher when ``dense_weights="adapted"`` (about 0.33 works); with the default
            ``"original"`` the dense plan is the teacher and such draws are skipped, so keep it 0.
        family_prob: For a pruned step, the probability that each family is applied (at least one is).
        layer_rate_max: Layer dropout rate of the last layer; layer ``i`` of ``L`` is dropped with
            probability ``layer_rate_max * i / (L - 1)`` (LayerSkip's depth-rising rate).
        layer_choice: ``"depth"``: drop the layers the depth-rising rates pick; ``"importance"``:
            drop as many layers as those rates pick, but the least important ones (what static and
            action plans skip); ``"mixed"``: either, with equal probability.
        mlp_levels: MLP keep fractions to draw from.
        mlp_shared_prob: Probability that all layers share one MLP level (a static-like plan);
            otherwise each layer draws its own.
        kv_drop_prob: Per running layer, probability of dropping KV groups; the number of groups
            kept is then uniform in ``[1, num_kv_heads - 1]`` (the most important ones are kept).
        kv_shared_prob: Probability that, when the ``"kv"`` family is active, every running layer
            keeps the same number of KV groups (a static-like plan, as a head keep fraction in an
            action builds); otherwise each layer draws with ``kv_drop_prob``.
        mlp_rules: Which channels a pruned MLP keeps (:data:`envs.runtime.plan.MLP_RULES`); with
            several, each plan draws one for all its layers, so a prepared model is trained for the
            rules it will run. ``predicted`` needs a channel predictor on the model.
    """

    families: tuple[str, ...] = PLAN_FAMILIES
    dense_prob: float = 0.0
    family_prob: float = 0.6
    layer_rate_max: float = 0.5
    layer_choice: str = "importance"
    mlp_levels: tuple[float, ...] = (0.375, 0.5, 0.625, 0.75, 0.875)
    mlp_shared_prob: float = 0.8
    kv_drop_prob: float = 0.3
    kv_shared_prob: float = 0.5
    mlp_rules: tuple[str, ...] = ("static",)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "plan") -> PlanDistribution:
        """Build and validate from a plain mapping.

        Raises:
            ValueError: Unknown key, unknown family or layer choice, or a rate outside [0, 1]; the
                message names the field.
        """
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        fam = data.get("families", PLAN_FAMILIES)
        if isinstance(fam, str):
            fam = (fam,)
        fam = tuple(str(f) for f in fam)
        bad = [f for f in fam if f not in PLAN_FAMILIES]
        if bad:
            raise ValueError(f"{where}.families: unknown plan family {bad}; choose from {list(PLAN_FAMILIES)}")
        if not fam and float(data.get("dense_prob", cls.dense_prob)) < 1.0:
            raise ValueError(
                f"{where}.families is empty: name at least one of {list(PLAN_FAMILIES)} or set dense_prob=1"
            )
        choice = str(data.get("layer_choice", cls.layer_choice))
        if choice not in LAYER_CHOICES:
            raise ValueError(f"{where}.layer_choice must be one of {list(LAYER_CHOICES)}, got {choice!r}")
        levels = data.get("mlp_levels", cls.mlp_levels)
        if isinstance(levels, int | float):
            levels = (levels,)
        levels = tuple(_fraction(f"{where}.mlp_levels[{i}]", v) for i, v in enumerate(levels))
        if "mlp" in fam and not levels:
            raise ValueError(f"{where}.mlp_levels is empty but the 'mlp' family is sampled: give keep fractions")
        rates = {
            k: _fraction(f"{where}.{k}", data.get(k, getattr(cls, k)))
            for k in (
                "dense_prob",
                "family_prob",
                "layer_rate_max",
                "mlp_shared_prob",
                "kv_drop_prob",
                "kv_shared_prob",
            )
        }
        if fam and rates["family_prob"] == 0.0:
            raise ValueError(f"{where}.family_prob must be > 0 when families are sampled")
        from envs.runtime.plan import MLP_RULES

        rules = data.get("mlp_rules", cls.mlp_rules)
        rules = (rules,) if isinstance(rules, str) else tuple(str(r) for r in rules)
        if not rules or len(set(rules)) != len(rules) or any(r not in MLP_RULES for r in rules):
            raise ValueError(f"{where}.mlp_rules must be distinct rules from {list(MLP_RULES)}, got {list(rules)}")
        return cls(families=fam, layer_choice=choice, mlp_levels=levels, mlp_rules=rules, **rates)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON."""
        d = asdict(self)
        d["families"], d["mlp_levels"] = list(self.families), list(self.mlp_levels)
        if self.mlp_rules == ("static",):  # the default is left out, so older cards and checkpoints hash alike
            del d["mlp_rules"]
        else:
            d["mlp_rules"] = list(self.mlp_rules)
        return d


@dataclass(frozen=True)
class PrepareConfig:
    """Hyper-parameters of one preparation (everything but the model and the data).

    Attributes:
        method: ``"lora"`` (low-rank deltas, merged at the end; the default: on the embedded model it cut
            the held-out pruned KL about five times faster per CPU-minute than full fine-tuning, see
            BENCHMARKS.md) or ``"full"`` (fine-tune the decoder layers; use ``lr`` around 5e-5).
        max_steps: Upper bound on optimiser steps (0 writes the untouched model).
        time_budget_min: Wall-clock bound on training, in minutes (checked after each step), counted
            across resumes: a resumed run trains for what the interrupted one had left.
        seq_len: Tokens per training sequence.
        batch_size: Sequences per step.
        plans_per_step: Plans run on each batch, their gradients averaged into one optimiser step.
            The teacher's forward (about a quarter of a one-plan step on the embedded model) is
            shared, and the step's gradient mixes several sub-networks.
        lr: Peak learning rate (AdamW), reached after ``warmup_steps`` and then held (a run is bounded
            by time, so its length is not known in advance to schedule a decay).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        kl_weight: Weight of the token-level ``KL(teacher || student)`` on the training text (0 with
            ``lm_weight=0`` skips the text entirely: choice distillation only).
        lm_weight: Weight of the language-model loss added to the KL.
        choice_weight: Weight of the choice-distillation loss added to the KL: on multiple-choice
            items of the train split, ``KL`` between the dense and the pruned model's softmax over
            the summed log-likelihoods of the choices, which is exactly what the task scorer ranks
            (0: off; needs ``choice_items`` in :func:`envs.distill.training.prepare_model`).
        choice_items_per_step: Multiple-choice items per step when ``choice_weight > 0``.
        lora_rank: Rank of the low-rank deltas (``method="lora"``).
        lora_alpha: LoRA scaling numerator (delta scale is ``lora_alpha / lora_rank``).
        train_embeddings: Also train the (usually tied) embedding / LM head; off by default: it is the
            largest matrix of a small model and the plans do not touch it.
        seed: Seed of every random choice (data order, plans, LoRA init).
        checkpoint_every: Steps between checkpoints (0: only at the end).
        eval_plans: Number of fixed held-out plans the before/after KL is measured on.
        dense_weights: ``"original"``: the dense plan keeps the original weights and pruned layers
            run an adapted second set of the decoder matrices (the dense model cannot get worse;
            with ``method="full"`` the norms stay shared and untrained); ``"adapted"``: one weight
            set for every plan.
        plan: The plan distribution.
    """

    method: str = "lora"
    max_steps: int = 100000
    time_budget_min: float = 28.0
    seq_len: int = 256
    batch_size: int = 1
    plans_per_step: int = 2
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    choice_weight: float = 0.0
    choice_items_per_step: int = 2
    lora_rank: int = 16
    lora_alpha: float = 32.0
    train_embeddings: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    eval_plans: int = 8
    dense_weights: str = "original"
    plan: PlanDistribution = field(default_factory=PlanDistribution)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "prepare") -> PrepareConfig:
        """Build and validate from a plain mapping (unknown keys are an error).

        Raises:
            ValueError: Naming the field and the valid values.
        """
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        plan = PlanDistribution.from_dict(data.pop("plan", None), where=f"{where}.plan")
        cfg = cls(plan=plan, **data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "prepare") -> None:
        """Check ranges.

        Raises:
            ValueError: Naming the field and the valid range.
        """
        if self.method not in METHODS:
            raise ValueError(f"{where}.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.dense_weights not in DENSE_WEIGHTS:
            raise ValueError(f"{where}.dense_weights must be one of {list(DENSE_WEIGHTS)}, got {self.dense_weights!r}")
        for name, lo in (
            ("max_steps", 0),
            ("seq_len", 2),
            ("batch_size", 1),
            ("plans_per_step", 1),
            ("choice_items_per_step", 1),
            ("warmup_steps", 0),
            ("lora_rank", 1),
            ("checkpoint_every", 0),
            ("eval_plans", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{where}.{name} must be an integer >= {lo}, got {v!r}")
        for name in ("time_budget_min", "lr", "weight_decay", "kl_weight", "lm_weight", "choice_weight", "lora_alpha"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or math.isnan(v) or v < 0:
                raise ValueError(f"{where}.{name} must be a number >= 0, got {v!r}")
        if self.kl_weight + self.lm_weight + self.choice_weight == 0:
            raise ValueError(f"{where}: kl_weight, lm_weight and choice_weight are all 0, so nothing is trained")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON (the card and the checkpoint)."""
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d

    def training_hash(self) -> str:
        """Hash of everything that changes the trajectory (not the bounds), to refuse a mismatched resume."""
        d = self.to_dict()
        for k in ("max_steps", "time_budget_min", "checkpoint_every", "eval_plans"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
