"""Sparsity plans: which decoder layers run, which attention heads and how many MLP channels each keeps.

A plan is a small immutable value. It says *what* runs, in the model's own numbering, and knows
nothing about how :class:`envs.runtime.sparse_lm.SparseLM` executes it. Plans built from fractions or
action vectors pick the most important layers, heads and channels from an
:class:`envs.runtime.importance.Importance` ordering, so that "keep 60% of the MLP channels of layer 7"
keeps the channels that matter most.

Heads are GQA-aware: query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``.
A layer plan lists both its kept query heads and its kept KV heads; keeping a query head without
its KV head is invalid, and a plan can drop whole KV groups (all query heads of a group plus the
group's key/value head).

MLP channels are a *count*, and a layer's ``mlp_rule`` says *which* ones run (:data:`MLP_RULES`):

- ``static``: the ``mlp_channels`` most important channels of that layer, the same for every token
  (by the importance ordering the plan is executed with);
- ``gate`` (CATS): every token computes the full gate projection and keeps its ``mlp_channels``
  channels of largest ``|act(gate)|``; up and down run for those only;
- ``input`` (TEAL): each MLP projection reads only the largest-magnitude entries of its own input:
  the same fraction ``mlp_channels / intermediate_size`` of the hidden entries for gate and up, and
  ``mlp_channels`` of the activations for down, so whole weight columns are skipped;
- ``predicted`` (Deja Vu): a low-rank predictor (:mod:`envs.runtime.predictor`) scores the channels
  from the MLP block's input before any of its matmuls run; gate, up and down run for the
  ``mlp_channels`` best-scored ones;
- ``input_attn`` (TEAL on every projection): ``input``, and the attention block's projections read
  the same fraction of their inputs too: q, k and v the largest-magnitude entries of the normed
  hidden state, o those of the kept heads' output. On a small model most of a decode step is outside
  the MLP, so input sparsity confined to the MLP cannot reach large savings however well it chooses.

The per-token rules choose a different set for every token, deterministically from its
activations. With every channel kept, each rule is the dense MLP (and ``input_attn`` the dense
layer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from envs.runtime.importance import Importance

PLAN_SCHEMA_VERSION = 1
MLP_RULES = ("static", "gate", "input", "predicted", "input_attn")
TOKEN_RULES = MLP_RULES[1:]  # the rules that choose channels per token from activations


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only model that a plan must fit.

    Attributes:
        num_layers: Number of decoder layers.
        num_heads: Query heads per layer.
        num_kv_heads: Key/value heads per layer (equal to ``num_heads`` without GQA).
        head_dim: Width of one head.
        hidden_size: Residual stream width.
        intermediate_size: MLP intermediate width (channels per layer).
        vocab_size: Vocabulary size, used for FLOP counts of the LM head.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def kv_of(self, head: int) -> int:
        """The KV head that query head ``head`` reads."""
        return head // self.group_size

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form for JSON."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer runs.

    Attributes:
        run: Whether the layer runs at all; a skipped layer passes the residual stream through.
        heads: Kept query heads (sorted, model numbering). Empty means the attention block is skipped.
        kv_heads: Kept key/value heads (sorted). Each kept query head's KV head must be here, and each
            KV head here must serve at least one kept query head.
        mlp_channels: Number of MLP intermediate channels kept (the most important ones). Zero skips
            the MLP block.
        two_four: Run the MLP linears with 2:4 semi-structured sparse weights (NVIDIA GPUs, see
            :mod:`envs.runtime.semistructured`). Only with the full MLP (``mlp_channels == intermediate_size``):
            the 2:4 weights are precomputed once for all channels, so they do not combine with slicing.
            Last and defaulted, so plans written before it existed still load (absent means ``False``).
        mlp_rule: Which ``mlp_channels`` channels run (:data:`MLP_RULES`, see the module docstring).
            Defaulted, so plans written before it existed still load (absent means ``"static"``).
    """

    run: bool
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp_channels: int
    two_four: bool = False
    mlp_rule: str = "static"

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON (``mlp_rule`` only when it is not ``static``, as before rules existed)."""
        out: dict[str, Any] = {
            "run": self.run,
            "heads": list(self.heads),
            "kv_heads": list(self.kv_heads),
            "mlp_channels": self.mlp_channels,
            "two_four": self.two_four,
        }
        if self.mlp_rule != "static":
            out["mlp_rule"] = self.mlp_rule
        return out

    def token_rule(self, spec: ModelSpec) -> bool:
        """Whether the MLP chooses its channels per token (a per-token rule on a partial MLP)."""
        return self.run and self.mlp_rule != "static" and 0 < self.mlp_channels < spec.intermediate_size

    def is_full(self, spec: ModelSpec) -> bool:
        """Whether the layer runs whole: every head, KV group and channel, with dense weights."""
        return (
            self.run
            and len(self.heads) == spec.num_heads
            and len(self.kv_heads) == spec.num_kv_heads
            and self.mlp_channels == spec.intermediate_size
            and not self.two_four
        )


def _dense_layer(spec: ModelSpec) -> LayerPlan:
    return LayerPlan(
        run=True,
        heads=tuple(range(spec.num_heads)),
        kv_heads=tuple(range(spec.num_kv_heads)),
        mlp_channels=spec.intermediate_size,
    )


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return value


def select_heads(spec: ModelSpec, head_order: Sequence[int], group_order: Sequence[int], n: int) -> LayerPlan | None:
    """Pick ``n`` query heads, filling the most important KV groups first.

    Whole groups are kept before a partial group, so that dropping heads also drops KV heads (the
    key/value projections and the cache shrink too). Within a group, heads are taken by importance.

    Args:
        spec: Model shape.
        head_order: Query heads of this layer, most important first.
        group_order: KV heads of this layer, most important first.
        n: How many query heads to keep (0 to ``num_heads``).

    Returns:
        A layer plan with only ``heads`` and ``kv_heads`` meaningful (``run=True``,
        ``mlp_channels=0``), or ``None`` for ``n == 0``.
    """
    if n <= 0:
        return None
    rank = {h: i for i, h in enumerate(head_order)}
    heads: list[int] = []
    for g in group_order:
        members = sorted(range(g * spec.group_size, (g + 1) * spec.group_size), key=rank.__getitem__)
        heads.extend(members[: n - len(heads)])
        if len(heads) >= n:
            break
    kv = sorted({spec.kv_of(h) for h in heads})
    return LayerPlan(run=True, heads=tuple(sorted(heads)), kv_heads=tuple(kv), mlp_channels=0)


@dataclass(frozen=True)
class SparsityPlan:
    """A whole-model plan: one :class:`LayerPlan` per decoder layer.

    Build one with :meth:`dense`, :meth:`uniform` or :meth:`from_action`; they validate. Plans
    are hashable, so executors can cache per-plan work, and round-trip through JSON.
    """

    spec: ModelSpec
    layers: tuple[LayerPlan, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def dense(cls, spec: ModelSpec) -> SparsityPlan:
        """The plan that runs everything."""
        return cls(spec, tuple(_dense_layer(spec) for _ in range(spec.num_layers)), {"kind": "dense"})

    @classmethod
    def uniform(
        cls,
        spec: ModelSpec,
        importance: Importance,
        *,
        layers: float = 1.0,
        heads: float = 1.0,
        mlp: float = 1.0,
        mlp_rule: str = "static",
    ) -> SparsityPlan:
        """The same keep fractions everywhere, choosing what to keep by importance.

        Args:
            spec: Model shape.
            importance: Orderings of layers, heads and MLP channels.
            layers: Fraction of decoder layers that run; the least important are skipped.
            heads: Fraction of query heads kept in each running layer (whole KV groups first).
            mlp: Fraction of MLP channels kept in each running layer.
            mlp_rule: Which channels (:data:`MLP_RULES`).

        Raises:
            ValueError: A fraction is NaN or outside [0, 1], or an unknown rule.
        """
        f = [_check_fraction("layers", layers), _check_fraction("heads", heads), _check_fraction("mlp", mlp)]
        meta: dict[str, Any] = {"kind": "uniform", "layers": f[0], "heads": f[1], "mlp": f[2]}
        if mlp_rule != "static":
            meta["mlp_rule"] = mlp_rule
        return plan_from_fractions(spec, importance, [f], meta=meta, rules=[mlp_rule])

    @classmethod
    def from_action(
        cls,
        spec: ModelSpec,
        importance: Importance,
        action: Sequence[float] | np.ndarray,
        *,
        num_groups: int = 1,
    ) -> SparsityPlan:
        """Decode an agent's action vector into a plan.

        The decoder layers are split into ``num_groups`` contiguous groups of near-equal size. The
        action holds three keep fractions per group, ``[layers_0, heads_0, mlp_0, layers_1, ...]``:
        the fraction of the group's layers that run (the least important are skipped), and the
        head and MLP-channel fractions of its running layers.

        Args:
            spec: Model shape.
            importance: Orderings of layers, heads and MLP channels.
            action: ``3 * num_groups`` numbers in [0, 1].
            num_groups: Number of layer groups.

        Raises:
            ValueError: Wrong length, NaN/inf, or a value outside [0, 1]; the message names the entry.
        """
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if not 1 <= num_groups <= spec.num_layers:
            raise ValueError(f"num_groups must be in [1, {spec.num_layers}], got {num_groups}")
        if a.shape[0] != 3 * num_groups:
            raise ValueError(
                f"action must have 3 * num_groups = {3 * num_groups} entries "
                f"([layers, heads, mlp] per group), got {a.shape[0]}"
            )
        names = ("layers", "heads", "mlp")
        for j, v in enumerate(a):
            _check_fraction(f"action[{j}] ({names[j % 3]} of group {j // 3})", v)
        meta = {"kind": "action", "action": [float(x) for x in a], "num_groups": num_groups}
        return plan_from_fractions(
            spec, importance, a.reshape(num_groups, 3), layer_groups(spec.num_layers, num_groups), meta=meta
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check the plan against its spec.

        Raises:
            ValueError: Naming the layer, the field and the valid range.
        """
        spec = self.spec
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"SparsityPlan.spec must be a ModelSpec, got {type(spec).__name__}")
        if len(self.layers) != spec.num_layers:
            raise ValueError(
                f"SparsityPlan.layers has {len(self.layers)} entries; the model has {spec.num_layers} layers"
            )
        for i, lp in enumerate(self.layers):
            where = f"layers[{i}]"
            if not isinstance(lp, LayerPlan):
                raise ValueError(f"{where} must be a LayerPlan, got {type(lp).__name__}")
            if not isinstance(lp.run, bool):
                raise ValueError(f"{where}.run must be a bool, got {lp.run!r}")
            for name, vals, bound in (
                ("heads", lp.heads, spec.num_heads),
                ("kv_heads", lp.kv_heads, spec.num_kv_heads),
            ):
                if list(vals) != sorted(set(vals)):
                    raise ValueError(f"{where}.{name} must be sorted and unique, got {list(vals)}")
                bad = [h for h in vals if not isinstance(h, int | np.integer) or not 0 <= h < bound]
                if bad:
                    raise ValueError(f"{where}.{name} entries must be integers in [0, {bound - 1}], got {bad}")
            mc = lp.mlp_channels
            if isinstance(mc, bool) or not isinstance(mc, int | np.integer) or not 0 <= mc <= spec.intermediate_size:
                raise ValueError(
                    f"{where}.mlp_channels must be an integer in [0, {spec.intermediate_size}], got {mc!r}"
                )
            if not isinstance(lp.two_four, bool):
                raise ValueError(f"{where}.two_four must be a bool, got {lp.two_four!r}")
            if lp.mlp_rule not in MLP_RULES:
                raise ValueError(f"{where}.mlp_rule must be one of {MLP_RULES}, got {lp.mlp_rule!r}")
            if lp.two_four and lp.mlp_rule != "static":
                raise ValueError(
                    f"{where}.two_four runs precomputed 2:4 weights for every channel; it does not combine with "
                    f"mlp_rule={lp.mlp_rule!r} (set mlp_rule='static' or two_four=False)"
                )
            if lp.two_four and lp.run and 0 < mc < spec.intermediate_size:
                raise ValueError(
                    f"{where}.two_four needs the full MLP (mlp_channels={spec.intermediate_size}), got "
                    f"mlp_channels={mc}: 2:4 weights are precomputed for all channels; keep every channel "
                    "or set two_four=False"
                )
            needed = {spec.kv_of(h) for h in lp.heads}
            missing = sorted(needed - set(lp.kv_heads))
            if missing:
                orphans = [h for h in lp.heads if spec.kv_of(h) in missing]
                raise ValueError(
                    f"{where}.kv_heads must include the KV head of every kept query head: query heads {orphans} "
                    f"read KV heads {missing}, which are not kept (valid KV heads: 0..{spec.num_kv_heads - 1})"
                )
            unused = sorted(set(lp.kv_heads) - needed)
            if unused:
                raise ValueError(
                    f"{where}.kv_heads {unused} serve no kept query head; drop them or keep one of their query heads"
                )

    # ------------------------------------------------------------------ queries
    @property
    def is_dense(self) -> bool:
        """Whether every layer, head and channel runs."""
        return all(lp.is_full(self.spec) for lp in self.layers)

    @property
    def layers_run(self) -> int:
        """Number of decoder layers that run."""
        return sum(lp.run for lp in self.layers)

    def keep_fractions(self) -> dict[str, float]:
        """Average keep fractions, for summaries and observations."""
        s = self.spec
        run = [lp for lp in self.layers if lp.run]
        if not run:
            return {"layers": 0.0, "heads": 0.0, "kv_heads": 0.0, "mlp": 0.0}
        return {
            "layers": len(run) / s.num_layers,
            "heads": float(np.mean([len(lp.heads) / s.num_heads for lp in run])),
            "kv_heads": float(np.mean([len(lp.kv_heads) / s.num_kv_heads for lp in run])),
            "mlp": float(np.mean([lp.mlp_channels / s.intermediate_size for lp in run])),
        }

    def flops(self, seq_len: int, past_len: int = 0, *, predictor_flops: float = 0.0) -> dict[str, float]:
        """Multiply-accumulate FLOPs (×2) of the decoder for ``seq_len`` new tokens.

        Counts the projections, the attention scores and mixing, and the MLP (:func:`mlp_flops`,
        per-token rules' selection work included); excludes the embedding, norms and LM head (the
        executor's ``logits`` argument decides the head's cost). A 2:4 MLP (``two_four``) counts half
        its dense FLOPs: the *ideal* count of the multiplies that are not skipped, not a speed
        prediction (the measured 2:4 speedup is below 2x).

        Args:
            seq_len: New tokens.
            past_len: Tokens already in the cache.
            predictor_flops: One token's channel-predictor FLOPs per layer
                (:meth:`envs.runtime.predictor.ChannelPredictor.flops_per_token`), for ``predicted`` layers.

        Returns:
            ``{"attention": ..., "mlp": ..., "total": ...}`` in FLOPs.
        """
        s = self.spec
        d = s.head_dim
        attn = mlp = 0.0
        ctx = past_len + (seq_len + 1) / 2  # mean causal context length
        for lp in self.layers:
            if not lp.run:
                continue
            attn += attn_proj_flops(s, lp, seq_len)
            attn += 2 * 2 * seq_len * ctx * d * len(lp.heads)  # scores and weighted sum
            mlp += mlp_flops(s, lp, seq_len, predictor_flops)
        return {"attention": attn, "mlp": mlp, "total": attn + mlp}

    @property
    def token_rules(self) -> set[str]:
        """The per-token MLP rules this plan's layers run."""
        return {lp.mlp_rule for lp in self.layers if lp.token_rule(self.spec)}

    def cost_fraction(self, seq_len: int = 256) -> float:
        """Decoder FLOPs of this plan relative to the dense plan at ``seq_len`` tokens."""
        return self.flops(seq_len)["total"] / SparsityPlan.dense(self.spec).flops(seq_len)["total"]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (see :meth:`from_dict`)."""
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "spec": self.spec.to_dict(),
            "layers": [lp.to_dict() for lp in self.layers],
            "meta": self.meta,
        }

    def to_json(self) -> str:
        """JSON text of the plan."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityPlan:
        """Rebuild a plan from :meth:`to_dict` output, validating it.

        Raises:
            ValueError: Missing fields, wrong schema version or an invalid plan.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan schema_version must be {PLAN_SCHEMA_VERSION}, got {version!r}")
        try:
            spec = ModelSpec(**data["spec"])
            layers = tuple(
                LayerPlan(
                    run=lp["run"],
                    heads=tuple(lp["heads"]),
                    kv_heads=tuple(lp["kv_heads"]),
                    mlp_channels=lp["mlp_channels"],
                    two_four=lp.get("two_four", False),
                    mlp_rule=lp.get("mlp_rule", "static"),
                )
                for lp in data["layers"]
            )
        except KeyError as exc:
            raise ValueError(f"plan JSON is missing the field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ValueError(f"plan JSON has a malformed field: {exc}") from None
        return cls(spec, layers, dict(data.get("meta", {})))

    @classmethod
    def from_json(cls, text: str) -> SparsityPlan:
        """Rebuild a plan from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """A one-line human summary."""
        f = self.keep_fractions()
        skipped = [i for i, lp in enumerate(self.layers) if not lp.run]
        two_four = sum(lp.run and lp.two_four for lp in self.layers)
        rules = sorted(self.token_rules)
        return (
            (
                f"layers {self.layers_run}/{self.spec.num_layers} (skip {skipped}), "
                f"heads {f['heads']:.0%}, kv {f['kv_heads']:.0%}, mlp {f['mlp']:.0%}"
            )
            + (f" per token by {'/'.join(rules)}" if rules else "")
            + (f", 2:4 mlp in {two_four} layers" if two_four else "")
        )


def mlp_flops(spec: ModelSpec, lp: LayerPlan, seq_len: int, predictor_flops: float = 0.0) -> float:
    """FLOPs of layer plan ``lp``'s MLP block for ``seq_len`` tokens: the one count plans and cost models use.

    ``static`` keeps ``k = mlp_channels`` channels of gate, up and down. ``gate`` computes the whole
    gate projection, then up and down for ``k`` channels. ``input`` reads ``k / I`` of the hidden
    entries in gate and up and ``k`` activations in down (``input_attn`` too: its attention projections
    are :func:`attn_proj_flops`'). ``predicted`` adds the predictor
    (``predictor_flops`` per token). Selecting the top ``k`` counts ``I`` per token (one comparison
    per channel), and the ``input`` rule's ranking of the hidden entries ``D``. Every MLP counts three
    projections, as the static count always has (GPT-2's two are counted as three alike).
    """
    if not lp.run or lp.mlp_channels == 0:
        return 0.0
    D, I, k = spec.hidden_size, spec.intermediate_size, lp.mlp_channels
    base = 2 * seq_len * D * k
    if not lp.token_rule(spec):
        return 3 * base * (0.5 if lp.two_four else 1.0)
    select = seq_len * I
    if lp.mlp_rule == "gate":
        return 2 * seq_len * D * I + 2 * base + select
    if lp.mlp_rule in ("input", "input_attn"):
        return 2 * 2 * seq_len * input_keep(D, k, I) * I + base + select + seq_len * D
    return 3 * base + seq_len * predictor_flops + select


def input_keep(n: int, k: int, total: int) -> int:
    """Entries an ``input``-rule projection keeps of an ``n``-entry input: the MLP's share ``k / total``, at least 1."""
    return max(1, round(k / total * n))


def attn_proj_flops(spec: ModelSpec, lp: LayerPlan, seq_len: int) -> float:
    """FLOPs of ``lp``'s q, k, v and o projections for ``seq_len`` tokens: the one count plans and cost models use.

    Each kept query head costs a q row block and an o column block, each kept KV head a k and a v
    row block. Under ``input_attn`` q, k and v read :func:`input_keep` of the ``D`` hidden entries
    and o of the kept heads' outputs, and ranking them counts one comparison per entry.
    """
    if not lp.run or not lp.heads:
        return 0.0
    d, D = spec.head_dim, spec.hidden_size
    h, kv = len(lp.heads), len(lp.kv_heads)
    if not (lp.mlp_rule == "input_attn" and lp.token_rule(spec)):
        return 2.0 * seq_len * D * d * (2 * h + 2 * kv)
    I, k = spec.intermediate_size, lp.mlp_channels
    qkv = 2.0 * seq_len * input_keep(D, k, I) * d * (h + 2 * kv)
    o = 2.0 * seq_len * input_keep(h * d, k, I) * D
    return qkv + o + seq_len * (D + h * d)


def layer_groups(num_layers: int, num_groups: int) -> list[list[int]]:
    """Split ``range(num_layers)`` into ``num_groups`` contiguous groups of near-equal size."""
    bounds = np.linspace(0, num_layers, num_groups + 1).round().astype(int)
    return [list(range(bounds[g], bounds[g + 1])) for g in range(num_groups)]


def layer_plan(
    spec: ModelSpec,
    importance: Importance,
    layer: int,
    run: bool,
    n_heads: int,
    n_channels: int,
    mlp_rule: str = "static",
) -> LayerPlan:
    """What layer ``layer`` runs with ``n_heads`` query heads and ``n_channels`` MLP channels, chosen by importance.

    The heads are :func:`select_heads`'s (whole KV groups first); the channels are a count, chosen
    by ``mlp_rule`` (:data:`MLP_RULES`). A rule on no channel or on every channel is ``static``: both
    mean the same work whatever the rule. ``run=False`` skips the layer.
    """
    if mlp_rule not in MLP_RULES:
        raise ValueError(f"mlp_rule must be one of {MLP_RULES}, got {mlp_rule!r}")
    if not run:
        return LayerPlan(run=False, heads=(), kv_heads=(), mlp_channels=0)
    hp = select_heads(spec, importance.head_order[layer], importance.kv_order[layer], n_heads)
    nc = int(n_channels)
    return LayerPlan(
        run=True,
        heads=hp.heads if hp else (),
        kv_heads=hp.kv_heads if hp else (),
        mlp_channels=nc,
        mlp_rule=mlp_rule if 0 < nc < spec.intermediate_size else "static",
    )


LayerFn = Callable[[int, bool, int, int, str], LayerPlan]


def check_rules(rules: Sequence[str] | None, n: int) -> tuple[str, ...]:
    """``n`` MLP rules (all ``static`` for ``None``), refused unless each is one of :data:`MLP_RULES`."""
    out = ("static",) * n if rules is None else tuple(rules)
    if len(out) != n or any(r not in MLP_RULES for r in out):
        raise ValueError(f"need {n} MLP rules, one per layer group, each one of {MLP_RULES}; got {rules!r}")
    return out


def fraction_counts(spec: ModelSpec, groups: Sequence[Sequence[int]], fractions: Any) -> tuple[int, ...]:
    """The integer counts ``(layers run, query heads, MLP channels)`` per group that keep ``fractions`` mean.

    ``fractions`` is ``[len(groups), 3]`` (or as many triples flattened); each fraction becomes a
    count by rounding: of the group's layers, of the model's query heads and of its MLP channels.
    """
    out: list[int] = []
    rows = np.asarray(fractions, dtype=np.float64).reshape(-1, 3)
    if len(rows) != len(groups):
        raise ValueError(f"need one [layers, heads, mlp] triple per layer group ({len(groups)}), got {len(rows)}")
    for g, (fl, fh, fm) in enumerate(rows):
        out += [round(fl * len(groups[g])), round(fh * spec.num_heads), round(fm * spec.intermediate_size)]
    return tuple(out)


def plan_from_counts(
    spec: ModelSpec,
    importance: Importance,
    groups: Sequence[Sequence[int]],
    counts: Sequence[int],
    *,
    fixed_dense: Iterable[int] = (),
    meta: dict[str, Any] | None = None,
    layer: LayerFn | None = None,
    rules: Sequence[str] | None = None,
) -> SparsityPlan:
    """The plan of integer counts per layer group: the one way PruneGym turns amounts into a plan.

    For group ``g``, ``counts[3g:3g+3]`` are the number of its layers that run (its most important
    ones, by ``importance.layer_order``), and the query heads and MLP channels each running layer
    keeps (:func:`layer_plan`). Layers in ``fixed_dense`` always run whole; layers in no group too.

    Args:
        spec: Model shape.
        importance: The orderings that decide which layers, heads and channels are kept.
        groups: Layer groups (lists of layer indices).
        counts: ``3 * len(groups)`` integers.
        fixed_dense: Layers that run whole whatever the counts say.
        meta: The plan's ``meta``.
        layer: A memoised :func:`layer_plan` ``(layer, run, n_heads, n_channels, rule) -> LayerPlan``
            (builders pass one so that equal counts give the same objects).
        rules: The MLP rule of each group (:data:`MLP_RULES`); ``static`` everywhere when ``None``.
    """
    if len(counts) != 3 * len(groups):
        raise ValueError(f"need 3 counts per layer group ({3 * len(groups)}), got {len(counts)}")
    rules = check_rules(rules, len(groups))
    make = layer or (lambda i, run, nh, nc, rule: layer_plan(spec, importance, i, run, nh, nc, rule))
    rank = {lay: r for r, lay in enumerate(importance.layer_order)}
    fixed = set(fixed_dense)
    out: list[LayerPlan] = [_dense_layer(spec)] * spec.num_layers
    for g, members in enumerate(groups):
        n_run, nh, nc = (int(c) for c in counts[3 * g : 3 * g + 3])
        running = set(sorted(members, key=rank.__getitem__)[:n_run])
        for i in members:
            if i not in fixed:
                out[i] = make(i, i in running, nh, nc, rules[g])
    return SparsityPlan(spec, tuple(out), dict(meta or {}))


def plan_from_fractions(
    spec: ModelSpec,
    importance: Importance,
    fractions: Any,
    groups: Sequence[Sequence[int]] | None = None,
    *,
    fixed_dense: Iterable[int] = (),
    meta: dict[str, Any] | None = None,
    rules: Sequence[str] | None = None,
) -> SparsityPlan:
    """The plan of keep fractions ``[layers, heads, mlp]`` per layer group (default: one group of every layer).

    Fractions become counts by :func:`fraction_counts`, counts a plan by :func:`plan_from_counts`;
    ``rules`` are the groups' MLP rules.
    """
    groups = [list(range(spec.num_layers))] if groups is None else groups
    return plan_from_counts(
        spec,
        importance,
        groups,
        fraction_counts(spec, groups, fractions),
        fixed_dense=fixed_dense,
        meta=meta,
        rules=rules,
    )


class PlanBuilder:
    """Keep fractions per layer group -> plan, for one model, with the layers in ``fixed_dense`` held whole.

    Caches plans by their integer counts, so the same counts give the same plan object and
    :class:`~envs.runtime.sparse_lm.SparseLM`'s per-layer weight views are reused too.

    Args:
        slm: The model (anything with ``spec`` and ``importance``).
        groups: Layer groups the fractions apply to (lists of layer indices).
        fixed_dense: Layers that always run whole (a probe's, unless it is prunable).
    """

    MAX_CACHED = 20_000

    def __init__(self, slm: Any, groups: Sequence[Sequence[int]], fixed_dense: Iterable[int] = ()) -> None:
        self.spec, self.importance = slm.spec, slm.importance
        predictor = getattr(slm, "predictor", None)
        self.predictor_flops = 0.0 if predictor is None else float(predictor.flops_per_token())
        self.groups = [list(g) for g in groups]
        self.fixed = sorted(set(fixed_dense))
        self._layers: dict[tuple[int, bool, int, int, str], LayerPlan] = {}
        self._plans: dict[tuple[Any, ...], SparsityPlan] = {}
        self._dense_flops: dict[tuple[int, int], float] = {}

    def _layer(self, i: int, run: bool, nh: int, nc: int, rule: str = "static") -> LayerPlan:
        key = (i, run, nh, nc, rule) if run else (i, False, 0, 0, "static")
        lp = self._layers.get(key)
        if lp is None:
            lp = self._layers[key] = layer_plan(self.spec, self.importance, i, run, nh, nc, rule)
        return lp

    def counts(self, fractions: Any) -> tuple[int, ...]:
        """Integer counts (layers run, heads, MLP channels) per group that ``fractions`` (``[G, 3]``) mean."""
        return fraction_counts(self.spec, self.groups, fractions)

    def plan(self, fractions: Any, rules: Sequence[str] | None = None) -> SparsityPlan:
        """The plan for ``fractions`` (``[G, 3]`` or ``3 * G`` numbers in [0, 1]) with the groups' MLP ``rules``."""
        counts = self.counts(fractions)
        key: tuple[Any, ...] = counts if rules is None else (*counts, *rules)
        plan = self._plans.get(key)
        if plan is None:
            meta: dict[str, Any] = {"kind": "env", "counts": list(counts)}
            if rules is not None:
                meta["mlp_rules"] = list(rules)
            plan = plan_from_counts(
                self.spec,
                self.importance,
                self.groups,
                counts,
                fixed_dense=self.fixed,
                meta=meta,
                layer=self._layer,
                rules=rules,
            )
            if len(self._plans) >= self.MAX_CACHED:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def flops_fraction(self, plan: SparsityPlan, seq_len: int, past_len: int = 0) -> float:
        """Decoder FLOPs of ``plan`` relative to the dense plan, for ``seq_len`` new tokens after ``past_len``."""
        key = (seq_len, past_len)
        dense = self._dense_flops.get(key)
        if dense is None:
            dense = self._dense_flops[key] = SparsityPlan.dense(self.spec).flops(seq_len, past_len)["total"]
        return plan.flops(seq_len, past_len, predictor_flops=self.predictor_flops)["total"] / dense
