"""Pruning-ready models: self-distil an LLM under randomly sampled sparsity plans.

A small model tolerates little pruning as trained: skipping one of SmolLM2-135M's 30 layers already
changes a fifth of its next-token predictions. The methods that report large input-adaptive savings
(LayerSkip, D-LLM, Router-Tuning, FlexiDepth) first adapt the model to the sub-networks it will
run. This module does the same for PruneGym's own plan space:

- :class:`PlanDistribution` / :class:`PlanSampler` draw plans the agent can choose: layer dropout
  whose rate rises with depth (LayerSkip), optionally aimed at the least important layers (the ones
  static and action plans skip); MLP-channel keep levels; whole-KV-group drops. With a single
  weight set (``dense_weights="adapted"``) a share of steps runs the dense plan so that the dense
  path stays anchored to the original model.
- Each step runs the sampled plan *with gradients* through :class:`~envs.runtime.sparse_lm.SparseLM` built
  with ``strategy="gather"`` (its kept rows are gathered from the real parameters, so gradients
  reach them) and minimises ``KL(teacher || student)`` over the logits, where the teacher is the
  original dense model; an optional language-model loss is added.
- Choice distillation (``choice_weight``): on multiple-choice items of the train split, the pruned
  student matches the dense model's softmax over the summed log-likelihoods of the choices, which
  is exactly what the task scorer ranks (:func:`choice_kl`, :func:`choice_scores`). It can run
  beside the token KL or alone (``kl_weight=0``).
- ``method="full"`` fine-tunes the decoder layers; ``method="lora"`` trains low-rank deltas that
  are added to the extracted weights on the fly (:class:`LowRankDeltas`) and merged at the end.
- ``dense_weights="original"`` (the default) keeps the original weights for the dense
  plan and trains the deltas into a second weight set that pruned layers run with
  (:meth:`~envs.runtime.sparse_lm.SparseLM.set_adapted`): from the first layer a plan prunes, the adapted
  weights take over, in training as at run time. The dense model is then exactly the original
  one, whatever the training text. ``"adapted"`` merges the deltas into the one weight set that
  every plan runs, and relies on the dense share of the steps to keep the dense path close.
- Training is bounded in time and steps, checkpointed (safetensors + JSON, no pickle) and resumable;
  everything random is a function of ``(seed, step)``, so a resumed run equals an uninterrupted one.

Nothing here knows about Hydra: ``experiments.prepare`` is the entry point.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from envs.runtime.plan import LayerPlan, SparsityPlan, select_heads
from envs.runtime.sparse_lm import ADAPTABLE, SparseLM

PLAN_FAMILIES = ("layers", "mlp", "kv")
LAYER_CHOICES = ("depth", "importance", "mixed")
METHODS = ("full", "lora")
DENSE_WEIGHTS = ("original", "adapted")
CHECKPOINT_VERSION = 1
LORA_TARGETS = ADAPTABLE  # every decoder matrix a plan slices


# ---------------------------------------------------------------------------------------- config
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
        return cls(families=fam, layer_choice=choice, mlp_levels=levels, **rates)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON."""
        d = asdict(self)
        d["families"], d["mlp_levels"] = list(self.families), list(self.mlp_levels)
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
            (0: off; needs ``choice_items`` in :func:`prepare_model`).
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


# ---------------------------------------------------------------------------------------- plans
class PlanSampler:
    """Draws plans from a :class:`PlanDistribution` for one model.

    Plans use the model's importance orderings through :func:`envs.runtime.plan.select_heads` and the MLP
    channel count (SparseLM keeps the most important channels), so a sampled plan means the same
    thing as an agent's or a static plan with the same keep counts.

    Args:
        slm: The model (its spec and importance orderings).
        dist: The distribution.
    """

    def __init__(self, slm: SparseLM, dist: PlanDistribution) -> None:
        self.spec = slm.spec
        self.importance = slm.importance
        self.dist = dist
        L = self.spec.num_layers
        self.layer_rates = np.array([dist.layer_rate_max * i / max(L - 1, 1) for i in range(L)])

    def sample(self, rng: np.random.Generator) -> SparsityPlan:
        """One plan (the dense plan with probability ``dense_prob``)."""
        s, d = self.spec, self.dist
        if not d.families or rng.random() < d.dense_prob:
            return SparsityPlan(s, SparsityPlan.dense(s).layers, {"kind": "prepare", "families": []})
        while True:
            active = [f for f in d.families if rng.random() < d.family_prob]
            if active:
                break
        run = np.ones(s.num_layers, dtype=bool)
        if "layers" in active:
            drop = rng.random(s.num_layers) < self.layer_rates
            how = d.layer_choice if d.layer_choice != "mixed" else ("depth", "importance")[int(rng.integers(2))]
            if how == "importance":  # as many layers as the depth rates drop, but the least important ones
                k = int(drop.sum())
                drop[:] = False
                if k:
                    drop[self.importance.layer_order[s.num_layers - k :]] = True
            if drop.all():  # keep at least one layer: a model with no layers is not a plan anyone runs
                drop[int(self.importance.layer_order[0])] = False
            run = ~drop
        mlp = np.full(s.num_layers, s.intermediate_size)
        if "mlp" in active:
            if rng.random() < d.mlp_shared_prob:
                mlp[:] = round(float(rng.choice(d.mlp_levels)) * s.intermediate_size)
            else:
                mlp = np.array([round(float(v) * s.intermediate_size) for v in rng.choice(d.mlp_levels, s.num_layers)])
        shared_groups: int | None = None
        if "kv" in active and s.num_kv_heads > 1 and rng.random() < d.kv_shared_prob:
            shared_groups = int(rng.integers(1, s.num_kv_heads))
        layers = []
        for i in range(s.num_layers):
            if not run[i]:
                layers.append(LayerPlan(False, (), (), 0))
                continue
            heads, kv = tuple(range(s.num_heads)), tuple(range(s.num_kv_heads))
            groups = shared_groups
            if groups is None and "kv" in active and s.num_kv_heads > 1 and rng.random() < d.kv_drop_prob:
                groups = int(rng.integers(1, s.num_kv_heads))
            if groups is not None:
                hp = select_heads(s, self.importance.head_order[i], self.importance.kv_order[i], groups * s.group_size)
                assert hp is not None
                heads, kv = hp.heads, hp.kv_heads
            layers.append(LayerPlan(True, heads, kv, int(mlp[i])))
        return SparsityPlan(s, tuple(layers), {"kind": "prepare", "families": active})

    def summary(self, n: int = 200, seed: int = 0) -> dict[str, Any]:
        """Empirical statistics of ``n`` draws (for the card)."""
        rng = np.random.default_rng([seed, 7919])
        plans = [self.sample(rng) for _ in range(n)]
        costs = np.array([p.cost_fraction() for p in plans])
        fr = [p.keep_fractions() for p in plans]
        return {
            "draws": n,
            "dense_share": float(np.mean([p.is_dense for p in plans])),
            "cost_fraction": {
                "mean": float(costs.mean()),
                "p10": float(np.quantile(costs, 0.1)),
                "p50": float(np.median(costs)),
                "p90": float(np.quantile(costs, 0.9)),
            },
            "keep_mean": {k: float(np.mean([f[k] for f in fr])) for k in ("layers", "heads", "kv_heads", "mlp")},
            "layer_rates": [round(float(r), 4) for r in self.layer_rates],
        }


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of one step: a pure function of ``(seed, step, stream)``, so resume is exact."""
    return np.random.default_rng([int(seed), int(step), int(stream)])


# ---------------------------------------------------------------------------------------- data
def text_sequences(tokenizer: Any, docs: Sequence[str], seq_len: int) -> list[torch.Tensor]:
    """Tokenise documents, join them with the EOS token and cut the stream into ``seq_len`` chunks.

    Args:
        tokenizer: A Hugging Face tokenizer.
        docs: Documents (natural text).
        seq_len: Tokens per chunk; a shorter tail is dropped.

    Raises:
        ValueError: The text is shorter than one chunk.
    """
    if tokenizer is None:
        raise ValueError("text needs a tokenizer; pass token sequences instead (tiny test models have none)")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{len(stream)} tokens of text make no sequence of seq_len={seq_len}; lower seq_len")
    t = torch.tensor(stream[: n * seq_len], dtype=torch.long)
    return list(t.view(n, seq_len))


def indices_for_step(n: int, seed: int, step: int, count: int, stream: int = 1) -> list[int]:
    """Which of ``n`` examples step ``step`` trains on: epochs of seeded permutations, a pure function of the step."""
    out = []
    for j in range(count):
        epoch, pos = divmod(step * count + j, n)
        out.append(int(np.random.default_rng([int(seed), int(epoch), int(stream)]).permutation(n)[pos]))
    return out


def batch_for_step(sequences: Sequence[torch.Tensor], seed: int, step: int, batch_size: int) -> torch.Tensor:
    """The training batch of step ``step`` (see :func:`indices_for_step`)."""
    idx = indices_for_step(len(sequences), seed, step, batch_size)
    return torch.stack([torch.as_tensor(sequences[i]).reshape(-1) for i in idx])


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item as token ids: the prompt and each choice's continuation.

    Attributes:
        prompt: Prompt tokens (with its few-shot prefix, as the scorer sees it).
        choices: Per choice, the tokens of ``" " + choice`` (what the scorer appends).
    """

    prompt: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.prompt or len(self.choices) < 2 or any(not c for c in self.choices):
            raise ValueError("a choice item needs a non-empty prompt and at least two non-empty choices")


def choice_items(items: Sequence[Any], tokenizer: Any) -> list[ChoiceItem]:
    """Token ids of the multiple-choice items among ``items`` (:class:`envs.tasks.Item`), as the scorer reads them."""
    from envs.tasks import Scorer

    sc = Scorer(tokenizer=tokenizer)
    return [
        ChoiceItem(tuple(sc.encode(None, it.prompt)), tuple(tuple(sc.encode(None, " " + c)) for c in it.choices))
        for it in items
        if it.kind == "mc"
    ]


def _check_sequences(name: str, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    if not out:
        raise ValueError(f"{name} is empty: give at least one token sequence")
    lens = {int(s.numel()) for s in out}
    if len(lens) != 1 or min(lens) < 2:
        raise ValueError(
            f"{name} must hold sequences of one length >= 2 (batches have no padding), got lengths {sorted(lens)}"
        )
    return out


# ---------------------------------------------------------------------------------------- losses
def kl_teacher_student(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher || student)``.

    The forward KL (teacher first) makes the pruned student cover the teacher's whole distribution,
    the usual choice for logit distillation.

    Args:
        student_logits: ``[B, T, V]`` raw logits.
        teacher_logp: ``[B, T, V]`` teacher log-probabilities (no gradient).
    """
    logp_s = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - logp_s)).sum(-1)
    return kl.mean()


def choice_kl(student_ll: torch.Tensor, teacher_ll: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` between the softmaxes of two choice-score vectors.

    The mc scorer picks the choice with the highest summed log-likelihood; matching the dense
    model's distribution over the choices keeps that pick, and spends no capacity on the rest of
    the vocabulary.

    Args:
        student_ll: ``[k]`` summed log-likelihoods of the choices under the pruned student.
        teacher_ll: ``[k]`` the same under the dense teacher (no gradient).
    """
    t = torch.log_softmax(teacher_ll.float(), -1)
    return (t.exp() * (t - torch.log_softmax(student_ll.float(), -1))).sum()


def choice_scores(
    slm: SparseLM, items: Sequence[ChoiceItem], plan: SparsityPlan | None = None, *, grad: bool = False
) -> list[torch.Tensor]:
    """Per item, the summed log-likelihood of each choice after its prompt.

    Every (prompt + choice) is a row, right-padded (causal attention: padding never changes an
    earlier position), and the LM head runs only at the positions that predict choice tokens.
    Items of similar width share one forward (a short arithmetic item is mostly per-forward
    overhead, while padding it to a few-shot prompt's width would multiply its tokens). The
    values equal :func:`envs.tasks.scoring.choice_logliks` up to float rounding.
    """
    width = [len(it.prompt) + max(len(c) for c in it.choices) for it in items]
    groups: list[list[int]] = []
    for n in sorted(range(len(items)), key=width.__getitem__):
        if groups and width[n] <= 1.5 * width[groups[-1][0]]:
            groups[-1].append(n)
        else:
            groups.append([n])
    out: dict[int, torch.Tensor] = {}
    for group in groups:
        out.update(zip(group, _choice_scores_one_forward(slm, [items[n] for n in group], plan, grad), strict=True))
    return [out[n] for n in range(len(items))]


def _choice_scores_one_forward(
    slm: SparseLM, items: Sequence[ChoiceItem], plan: SparsityPlan | None, grad: bool
) -> list[torch.Tensor]:
    rows = [(it.prompt, c) for it in items for c in it.choices]
    owner = torch.tensor([n for n, it in enumerate(items) for _ in it.choices])
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.tensor([[*p, *c] + [0] * (width - len(p) - len(c)) for p, c in rows])
    r_idx = torch.tensor([r for r, (_, c) in enumerate(rows) for _ in c])
    pos = torch.tensor([len(p) - 1 + j for p, c in rows for j in range(len(c))])
    target = torch.tensor([t for _, c in rows for t in c])
    with torch.set_grad_enabled(grad):
        h = slm.forward(ids, plan, logits="none", grad=grad).hidden[r_idx, pos]
        logp = torch.log_softmax(slm.lm_head(h).float(), -1).gather(-1, target[:, None])[:, 0]
        per_row = torch.zeros(len(rows), dtype=logp.dtype).index_add(0, r_idx, logp)
    return [per_row[owner == n] for n in range(len(items))]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` (``[B, T, V]``) on ``ids`` (``[B, T]``)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------- low-rank deltas
class LowRankDeltas(torch.nn.Module):
    """LoRA-style deltas ``W + (alpha / r) B A`` on SparseLM's extracted decoder weights.

    Why not ``peft``: peft wraps the ``nn.Linear`` modules, but SparseLM slices the weight tensors
    it extracted at construction and never calls those modules, so a peft adapter would be
    invisible to pruned forwards. Adding the delta to the extracted tensors for the duration of a
    forward (:meth:`applied`) makes every gathered slice see the adapted weights, and
    :meth:`merge` folds them into the real parameters at the end, so the published model is a
    plain checkpoint. ``B`` starts at zero, so an untrained delta changes nothing.

    Args:
        slm: The model whose ``blocks`` are adapted.
        rank: Rank ``r``.
        alpha: Scaling numerator.
        seed: Seed of ``A``'s initialisation.
    """

    def __init__(self, slm: SparseLM, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.slm = [slm]  # a list keeps the model out of this module's parameters
        self.scale = alpha / rank
        g = torch.Generator().manual_seed(int(seed))
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for i, blk in enumerate(slm.blocks):
            for name in LORA_TARGETS:
                w = getattr(blk, name)
                if w is None:
                    continue
                key = f"{i}_{name}"
                a = torch.randn(rank, w.shape[1], generator=g, dtype=w.dtype) / math.sqrt(w.shape[1])
                self.a[key] = torch.nn.Parameter(a)
                self.b[key] = torch.nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block, the model's blocks hold ``W + delta`` (differentiable in ``A`` and ``B``)."""
        slm = self.slm[0]
        saved: list[tuple[Any, str, torch.Tensor]] = []
        try:
            for key in self.a.keys():
                i, name = key.split("_", 1)
                blk = slm.blocks[int(i)]
                w = getattr(blk, name)
                saved.append((blk, name, w))
                setattr(blk, name, w + self.scale * (self.b[key] @ self.a[key]))
            yield
        finally:
            for blk, name, w in saved:
                setattr(blk, name, w)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into the model's parameters and zero ``B``."""
        slm = self.slm[0]
        for key in self.a.keys():
            i, name = key.split("_", 1)
            getattr(slm.blocks[int(i)], name).add_(self.scale * (self.b[key] @ self.a[key]))
            self.b[key].zero_()
        slm._weights_hash = None


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def teacher_logprobs(teacher: SparseLM, ids: torch.Tensor) -> torch.Tensor:
    """Dense log-probabilities of the frozen teacher, ``[B, T, V]``."""
    return torch.log_softmax(teacher.forward(ids, None, logits="all").logits.float(), dim=-1)


@torch.no_grad()
def evaluate_plans(
    slm: SparseLM,
    plans: Sequence[SparsityPlan],
    sequences: Sequence[torch.Tensor],
    *,
    reference: Sequence[torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Per plan: NLL of the text, KL to and top-1 agreement with a reference distribution.

    Args:
        slm: The model to evaluate.
        plans: Plans to run.
        sequences: Held-out token sequences (``[T]`` each).
        reference: Per sequence, reference log-probabilities ``[1, T, V]`` (the original dense model);
            ``None`` uses this model's own dense plan.

    Returns:
        One dict per plan: ``nll`` (mean per token), ``kl`` (mean ``KL(reference || plan)``),
        ``agree`` (share of positions whose top-1 token matches the reference), ``cost`` (FLOP fraction).
    """
    seqs = [torch.as_tensor(s).reshape(1, -1) for s in sequences]
    if reference is None:
        reference = [teacher_logprobs(slm, s) for s in seqs]
    out = []
    for plan in plans:
        nll = kl = agree = 0.0
        n = 0
        for s, ref in zip(seqs, reference, strict=True):
            logp = torch.log_softmax(slm.forward(s, plan, logits="all").logits.float(), dim=-1)
            T = s.shape[1]
            nll += float(-logp[0, :-1].gather(-1, s[0, 1:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum(-1)[0, :-1].sum())
            agree += float((logp[0, :-1].argmax(-1) == ref[0, :-1].argmax(-1)).sum())
            n += T - 1
        out.append({"nll": nll / n, "kl": kl / n, "agree": agree / n, "cost": plan.cost_fraction()})
    return out


@torch.no_grad()
def evaluate_choices(
    slm: SparseLM, plans: Sequence[SparsityPlan], items: Sequence[ChoiceItem], reference: Sequence[torch.Tensor]
) -> list[dict[str, float]]:
    """Per plan: mean :func:`choice_kl` to the reference choice scores and the share of items whose pick it keeps.

    Args:
        slm: The model to evaluate.
        plans: Plans to run.
        items: Held-out multiple-choice items.
        reference: Per item, the original dense model's summed choice log-likelihoods.
    """
    from envs.tasks.scoring import choice_logliks

    out = []
    for plan in plans:
        kl = agree = 0.0
        for it, ref in zip(items, reference, strict=True):
            ll = choice_logliks(slm, list(it.prompt), [list(c) for c in it.choices], plan)
            kl += float(choice_kl(ll, ref))
            agree += float(int(ll.argmax()) == int(ref.argmax()))
        out.append({"choice_kl": kl / len(items), "pick_agree": agree / len(items)})
    return out


# ---------------------------------------------------------------------------------------- checkpoints
def _trainable_state(slm: SparseLM, deltas: LowRankDeltas | None) -> dict[str, torch.Tensor]:
    if deltas is not None:
        return {f"lora.{k}": v.detach() for k, v in deltas.state_dict().items()}
    if slm.adapted is not None:
        return {f"adapted.{k}": v.detach() for k, v in slm.adapted_tensors().items()}
    return {n: p.detach() for n, p in slm.model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: str | Path,
    *,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write ``params.safetensors``, ``optimizer.safetensors`` and ``state.json`` (atomically, no pickle).

    Args:
        folder: Checkpoint folder (replaced).
        step: Steps completed.
        params: Trainable tensors by name.
        optimizer: The optimiser; its per-parameter tensors go to safetensors, its hyper-parameters to JSON.
        state: Extra JSON state (seed, config hash, elapsed time, losses).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in params.items()}, str(tmp / "params.safetensors"))
    sd = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                opt_tensors[f"{pid}.{k}"] = v.contiguous().clone()
            else:
                opt_scalars[f"{pid}.{k}"] = v
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "param_groups": sd["param_groups"],
        "optimizer_scalars": opt_scalars,
        **state,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(folder)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(params, optimizer_state_dict, state)``.

    Raises:
        FileNotFoundError: No checkpoint there.
        ValueError: Another checkpoint version.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint in {folder} (state.json missing); run without resume=true to start fresh"
        )
    state = json.loads((folder / "state.json").read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{folder}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    params = load_file(str(folder / "params.safetensors"))
    opt_t = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in list(opt_t.items()) + list(state.pop("optimizer_scalars").items()):
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    groups = state.pop("param_groups")
    for g in groups:  # JSON has no tuples; torch's optimisers keep betas as one
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt_sd = {"state": opt_state, "param_groups": groups}
    return params, opt_sd, state


# ---------------------------------------------------------------------------------------- training
@dataclass
class PrepareResult:
    """What :func:`prepare_model` did.

    Attributes:
        steps: Steps completed in total (including those before a resume).
        start_step: The step training started (or resumed) at.
        stopped_by: ``"max_steps"`` or ``"time_budget"``.
        train_seconds: Wall time spent in training steps in this run (excluding evaluation).
        train_seconds_total: The same, including the runs before a resume.
        before: Held-out figures of the original model.
        after: The same figures after training.
        losses: ``(step, loss, dense_step)`` per step of this run (the loss averaged over the step's
            plans; ``dense_step`` when all of them were dense).
        plan_summary: Statistics of the plan distribution.
    """

    steps: int
    start_step: int
    stopped_by: str
    train_seconds: float
    train_seconds_total: float
    before: dict[str, Any]
    after: dict[str, Any]
    losses: list[tuple[int, float, bool]]
    plan_summary: dict[str, Any]


def eval_plan_set(slm: SparseLM, dist: PlanDistribution, n: int, seed: int) -> list[SparsityPlan]:
    """``n`` fixed pruned plans (never dense) from ``dist`` with a held-out seed stream, for before/after KL."""
    sampler = PlanSampler(slm, PlanDistribution.from_dict({**dist.to_dict(), "dense_prob": 0.0}))
    rng = step_rng(seed, 0, stream=104729)
    plans: list[SparsityPlan] = []
    for _ in range(100 * n if dist.families else 0):  # a draw can prune nothing (no layer hit): skip it
        if len(plans) == n:
            break
        plan = sampler.sample(rng)
        if not plan.is_dense:
            plans.append(plan)
    return plans


def held_out_figures(
    slm: SparseLM,
    plans: Sequence[SparsityPlan],
    sequences: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    choices: Sequence[ChoiceItem] = (),
    choice_reference: Sequence[torch.Tensor] = (),
) -> dict[str, Any]:
    """Dense NLL / KL and the mean KL / agreement of ``plans``, all against the original dense model.

    With held-out ``choices`` (and the original dense model's scores of them) it adds the pruned
    plans' mean choice KL and the share of picks they keep: the task-level figure.
    """
    dense = evaluate_plans(slm, [slm.dense_plan()], sequences, reference=reference)[0]
    pruned = evaluate_plans(slm, plans, sequences, reference=reference) if plans else []
    extra: dict[str, float] = {}
    if choices and plans:
        per = evaluate_choices(slm, plans, choices, choice_reference)
        extra = {k: float(np.mean([r[k] for r in per])) for k in ("choice_kl", "pick_agree")}
        for r, c in zip(pruned, per, strict=True):
            r.update(c)
    return {
        **{f"pruned_{k}": v for k, v in extra.items()},
        "dense_nll": dense["nll"],
        "dense_kl": dense["kl"],
        "pruned_kl": float(np.mean([r["kl"] for r in pruned])) if pruned else 0.0,
        "pruned_agree": float(np.mean([r["agree"] for r in pruned])) if pruned else 1.0,
        "pruned_nll": float(np.mean([r["nll"] for r in pruned])) if pruned else dense["nll"],
        "per_plan": [{**r, "plan": p.describe()} for r, p in zip(pruned, plans, strict=True)],
    }


def prepare_model(
    slm: SparseLM,
    train_sequences: Sequence[torch.Tensor],
    eval_sequences: Sequence[torch.Tensor],
    cfg: PrepareConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    choice_items: Sequence[ChoiceItem] = (),
    eval_choice_items: Sequence[ChoiceItem] = (),
) -> PrepareResult:
    """Self-distil ``slm`` under plans drawn from ``cfg.plan``.

    Args:
        slm: The model to adapt; its importance orderings choose what plans keep and stay fixed.
            With ``dense_weights="original"`` its weights stay as they are and it receives the
            adapted set (:meth:`~envs.runtime.sparse_lm.SparseLM.set_adapted`); with ``"adapted"`` its weights
            are modified in place. The teacher is the original dense model: the student's own dense
            plan with ``"original"``, a frozen copy with ``"adapted"``.
        train_sequences: Token sequences of one length (training text: the train split only).
        eval_sequences: Held-out token sequences for the before/after figures.
        cfg: Hyper-parameters.
        checkpoint_dir: Where checkpoints go (``None``: no checkpoints).
        resume: Continue from the checkpoint in ``checkpoint_dir``.
        progress: Show a tqdm progress bar.
        log: Called with one-line messages.
        choice_items: Multiple-choice items of the train split for the choice loss (``cfg.choice_weight``).
        eval_choice_items: Held-out multiple-choice items for the before/after choice figures.

    Raises:
        ValueError: Bad sequences, ``choice_weight > 0`` without ``choice_items``, or a checkpoint
            written with a different training configuration.
    """
    from tqdm.auto import tqdm

    log = log or (lambda _msg: None)
    train = _check_sequences("train_sequences", train_sequences)
    held = _check_sequences("eval_sequences", eval_sequences)
    if cfg.choice_weight > 0 and not choice_items:
        raise ValueError(
            "choice_weight > 0 needs multiple-choice training items: set choice_mix (experiments.prepare) "
            "or pass choice_items, or set choice_weight=0"
        )
    torch.manual_seed(cfg.seed)
    keep_dense = cfg.dense_weights == "original"
    # Training needs strategy="gather": "views" slices an importance-ordered copy that is no parameter.
    student = (
        slm
        if slm.strategy == "gather" and slm.adapted is None
        else SparseLM(slm.model, slm.tokenizer, slm.importance, name=slm.name, strategy="gather")
    )
    if keep_dense:
        # The deltas go into a second weight set, a copy of the original to start with; the
        # student's dense plan never touches it, so the student itself is the frozen teacher.
        student.set_adapted({f"{i}.{n}": getattr(b, n) for i, b in enumerate(student.blocks) for n in LORA_TARGETS})
        teacher = student
    else:  # the teacher is a frozen copy of the original weights; "views" is its fastest dense path
        teacher = SparseLM(copy.deepcopy(slm.model), importance=slm.importance, name=f"{slm.name}-teacher")
        for p in teacher.model.parameters():
            p.requires_grad_(False)
    sampler = PlanSampler(student, cfg.plan)
    eval_plans = eval_plan_set(student, cfg.plan, cfg.eval_plans, cfg.seed)
    reference = [teacher_logprobs(teacher, s.reshape(1, -1)) for s in held]
    choice_ref = choice_scores(teacher, eval_choice_items)

    def figures() -> dict[str, Any]:
        return held_out_figures(student, eval_plans, held, reference, eval_choice_items, choice_ref)

    model = student.model
    deltas: LowRankDeltas | None = None
    embed_ids = {id(student.embed_tokens.weight), id(student.lm_head.weight)}
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "lora":
        deltas = LowRankDeltas(student.adapted or student, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        params = list(deltas.parameters())
    elif keep_dense:  # full fine-tuning of the adapted set's matrices (copies; the original stays)
        params = list(student.adapted_tensors().values())
        for p in params:
            p.requires_grad_(True)
    else:
        params = []
        for p in model.parameters():
            if cfg.train_embeddings or id(p) not in embed_ids:
                p.requires_grad_(True)
                params.append(p)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start = 0
    elapsed_before = 0.0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    before = figures()
    log(f"before: dense NLL {before['dense_nll']:.4f}, pruned KL {before['pruned_kl']:.4f}")
    if resume:
        if ckpt is None:
            raise ValueError("resume=true needs a checkpoint_dir")
        saved, opt_sd, state = load_checkpoint(ckpt)
        if state.get("training_hash") != cfg.training_hash():
            raise ValueError(
                f"the checkpoint in {ckpt} was written with a different training configuration "
                f"({state.get('config')}); resume with the same settings or start fresh with resume=false"
            )
        current = _trainable_state(student, deltas)
        if set(saved) != set(current):
            raise ValueError(f"the checkpoint in {ckpt} holds other tensors than this model trains; start fresh")
        with torch.no_grad():
            for k, v in saved.items():
                current[k].copy_(v)
        optimizer.load_state_dict(opt_sd)
        start = int(state["step"])
        elapsed_before = float(state.get("train_seconds", 0.0))
        before = state.get("before", before)
        log(f"resumed at step {start} from {ckpt}")

    def lr_at(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    def checkpoint(step: int, seconds: float) -> None:
        if ckpt is None:
            return
        save_checkpoint(
            ckpt,
            step=step,
            params=_trainable_state(student, deltas),
            optimizer=optimizer,
            state={
                "seed": cfg.seed,
                "training_hash": cfg.training_hash(),
                "config": cfg.to_dict(),
                "train_seconds": seconds,
                "before": before,
                "rng": "every random choice is a function of (seed, step): see envs.distill.training.step_rng",
            },
        )

    losses: list[tuple[int, float, bool]] = []
    budget_s = cfg.time_budget_min * 60.0
    t0 = time.perf_counter()
    stopped_by = "max_steps"
    step = start

    # Either bound may end the run: the bar shows the share of whichever is nearer, so its ETA is real.
    def done_pct() -> int:
        by_steps = step / cfg.max_steps if cfg.max_steps else 1.0
        by_time = (elapsed_before + time.perf_counter() - t0) / budget_s if budget_s > 0 else 1.0
        return min(100, int(100 * max(by_steps, by_time)))

    bar = tqdm(total=100, unit="%", disable=not progress, desc="prepare", dynamic_ncols=True)
    try:
        while step < cfg.max_steps:
            if elapsed_before + time.perf_counter() - t0 >= budget_s:
                stopped_by = "time_budget"
                break
            ids = batch_for_step(train, cfg.seed, step, cfg.batch_size)
            # Plan j of a step comes from stream j; stream 0 is the single-plan run's plan.
            plans = [sampler.sample(step_rng(cfg.seed, step, stream=j)) for j in range(cfg.plans_per_step)]
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            text = cfg.kl_weight > 0 or cfg.lm_weight > 0
            t_logp = teacher_logprobs(teacher, ids) if cfg.kl_weight > 0 else None
            step_items: list[ChoiceItem] = []
            if cfg.choice_weight > 0:
                idx = indices_for_step(len(choice_items), cfg.seed, step, cfg.choice_items_per_step, stream=2)
                step_items = [choice_items[i] for i in idx]
                t_choice = choice_scores(teacher, step_items)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with deltas.applied() if deltas is not None else _nullcontext():
                for j, plan in enumerate(plans):  # a backward per plan: one plan's activations alive at a time
                    if keep_dense and plan.is_dense:  # the original weights: nothing to learn
                        continue
                    loss = torch.zeros(())
                    if text:
                        logits = student.forward(ids, plan, logits="all", grad=True).logits
                        if t_logp is not None:
                            loss = loss + cfg.kl_weight * kl_teacher_student(logits, t_logp)
                        if cfg.lm_weight:
                            loss = loss + cfg.lm_weight * lm_loss(logits, ids)
                        del logits
                    if step_items:
                        s_choice = choice_scores(student, step_items, plan, grad=True)
                        c_loss = sum(choice_kl(a, b) for a, b in zip(s_choice, t_choice, strict=True))
                        loss = loss + cfg.choice_weight / len(step_items) * c_loss
                    # The deltas' graph (W + BA) is shared by the plans: keep it until the last backward.
                    (loss / len(plans)).backward(retain_graph=deltas is not None and j < len(plans) - 1)
                    total += float(loss.detach()) / len(plans)
                    del loss
            optimizer.step()
            step += 1
            losses.append((step, total, all(p.is_dense for p in plans)))
            bar.update(done_pct() - bar.n)
            cost = float(np.mean([p.cost_fraction() for p in plans]))
            bar.set_postfix(step=step, loss=f"{total:.4f}", cost=f"{cost:.2f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                checkpoint(step, elapsed_before + time.perf_counter() - t0)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    if step > start:
        checkpoint(step, elapsed_before + train_s)
    for p in [*model.parameters(), *student.adapted_tensors().values()]:
        p.requires_grad_(False)
    if deltas is not None:
        deltas.merge()
    slm._weights_hash = None
    student._weights_hash = None
    if keep_dense:
        slm.set_adapted(student.adapted_tensors())
    elif slm is not student:
        slm.set_importance(slm.importance)  # rebuild the importance-ordered copy from the new weights
    after = figures()
    log(f"after {step} steps: dense NLL {after['dense_nll']:.4f}, pruned KL {after['pruned_kl']:.4f}")
    return PrepareResult(
        steps=step,
        start_step=start,
        stopped_by=stopped_by,
        train_seconds=train_s,
        train_seconds_total=elapsed_before + train_s,
        before=before,
        after=after,
        losses=losses,
        plan_summary=sampler.summary(seed=cfg.seed),
    )


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------------------- output
def write_prepared(folder: str | Path, slm: SparseLM, card: dict[str, Any], *, importance: Any | None = None) -> Path:
    """Write a prepared model folder that :func:`envs.runtime.models.load_model` loads by name.

    The folder holds ``config.json`` and ``model.safetensors`` (``save_pretrained``), the adapted
    weight set of pruned layers as ``adapted.safetensors`` (with ``dense_weights="original"``), the
    tokenizer files, ``card.json``, and ``importance-<weights hash>.json`` with the orderings used during
    preparation, so that :meth:`SparseLM.from_pretrained` keeps exactly those orderings.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slm.model.save_pretrained(str(folder), safe_serialization=True)
    from envs.runtime.models import ADAPTED_FILE

    if slm.adapted is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in slm.adapted_tensors().items()}, str(folder / ADAPTED_FILE))
    elif (folder / ADAPTED_FILE).exists():
        (folder / ADAPTED_FILE).unlink()
    if slm.tokenizer is not None:
        slm.tokenizer.save_pretrained(str(folder))
    new_hash = slm.weights_hash
    imp = importance if importance is not None else slm.importance
    imp = copy.deepcopy(imp)
    imp.meta = {**imp.meta, "weights": new_hash, "note": "orderings of the base model, used during preparation"}
    imp.save(folder / f"importance-{new_hash}.json")
    (folder / "card.json").write_text(json.dumps({**card, "weights_hash": new_hash}, indent=1))
    return folder
