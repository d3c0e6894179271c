"""Drawing the plans a preparation trains under, as a pure function of ``(seed, step, stream)``.

:class:`PlanSampler` turns a :class:`~envs.distill.config.PlanDistribution` into plans for one
model. It decides *how much* each layer keeps (whether it runs, how many KV groups, how many MLP
channels) and hands those counts to :func:`envs.runtime.plan.plan_from_counts`, the one way
PruneGym turns counts into a plan, so a sampled plan keeps the same heads and channels as an
agent's or a static plan with the same counts. :func:`step_rng` makes every draw a function of the
step, which is what lets a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.distill.config import PlanDistribution
from envs.runtime.kernels import missing_predictor
from envs.runtime.plan import LayerPlan, SparsityPlan, layer_plan, plan_from_counts
from envs.runtime.sparse_lm import SparseLM

EVAL_STREAM = 104729  # the seed stream of the held-out plans: no training step ever draws from it
SUMMARY_STREAM = 7919  # the seed stream of the card's plan statistics


class PlanSampler:
    """Draws plans from a :class:`PlanDistribution` for one model.

    Each draw fixes per layer whether it runs, the query heads it keeps (whole KV groups:
    ``groups * group_size``) and its MLP channel count; :func:`envs.runtime.plan.plan_from_counts`
    with one group per layer then picks the heads by the model's importance orderings (whole
    groups first, see :func:`envs.runtime.plan.select_heads`) and SparseLM keeps the most
    important channels.

    Args:
        slm: The model (its spec and importance orderings).
        dist: The distribution.
    """

    def __init__(self, slm: SparseLM, dist: PlanDistribution) -> None:
        if "predicted" in dist.mlp_rules and getattr(slm, "predictor", None) is None:
            raise ValueError(missing_predictor("plan.mlp_rules"))
        self.spec = slm.spec
        self.importance = slm.importance
        self.dist = dist
        L = self.spec.num_layers
        self.layer_rates = np.array([dist.layer_rate_max * i / max(L - 1, 1) for i in range(L)])
        self.groups = [[i] for i in range(L)]  # one group per layer: counts are per layer
        self._layers: dict[tuple[int, bool, int, int, str], LayerPlan] = {}

    def _layer(self, i: int, run: bool, n_heads: int, n_channels: int, rule: str = "static") -> LayerPlan:
        """The memoised :func:`envs.runtime.plan.layer_plan` (a few hundred distinct layers at most)."""
        key = (i, run, n_heads, n_channels, rule) if run else (i, False, 0, 0, "static")
        lp = self._layers.get(key)
        if lp is None:
            lp = self._layers[key] = layer_plan(self.spec, self.importance, i, run, n_heads, n_channels, rule)
        return lp

    def _plan(self, counts: list[int], families: list[str], rule: str = "static") -> SparsityPlan:
        meta: dict[str, Any] = {"kind": "prepare", "families": families}
        if rule != "static":
            meta["mlp_rule"] = rule
        rules = None if rule == "static" else [rule] * len(self.groups)
        return plan_from_counts(
            self.spec, self.importance, self.groups, counts, meta=meta, layer=self._layer, rules=rules
        )

    def sample(self, rng: np.random.Generator) -> SparsityPlan:
        """One plan (the dense plan with probability ``dense_prob``).

        The draws from ``rng`` come in a fixed order (dense or not, families, layers, MLP levels,
        KV groups layer by layer), so a given generator state always gives the same plan.
        """
        s, d = self.spec, self.dist
        if not d.families or rng.random() < d.dense_prob:
            return self._plan([1, s.num_heads, s.intermediate_size] * s.num_layers, [])
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
        rule = d.mlp_rules[0]
        if "mlp" in active:
            if len(d.mlp_rules) > 1:  # drawn only then, so a one-rule distribution draws as before
                rule = d.mlp_rules[int(rng.integers(len(d.mlp_rules)))]
            if rng.random() < d.mlp_shared_prob:
                mlp[:] = round(float(rng.choice(d.mlp_levels)) * s.intermediate_size)
            else:
                mlp = np.array([round(float(v) * s.intermediate_size) for v in rng.choice(d.mlp_levels, s.num_layers)])
        shared_groups: int | None = None
        if "kv" in active and s.num_kv_heads > 1 and rng.random() < d.kv_shared_prob:
            shared_groups = int(rng.integers(1, s.num_kv_heads))
        counts: list[int] = []
        for i in range(s.num_layers):
            if not run[i]:
                counts += [0, 0, 0]
                continue
            groups = shared_groups
            if groups is None and "kv" in active and s.num_kv_heads > 1 and rng.random() < d.kv_drop_prob:
                groups = int(rng.integers(1, s.num_kv_heads))
            heads = s.num_heads if groups is None else groups * s.group_size
            counts += [1, heads, int(mlp[i])]
        return self._plan(counts, active, rule)

    def summary(self, n: int = 200, seed: int = 0) -> dict[str, Any]:
        """Empirical statistics of ``n`` draws (for the card)."""
        rng = np.random.default_rng([seed, SUMMARY_STREAM])
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


def eval_plan_set(slm: SparseLM, dist: PlanDistribution, n: int, seed: int) -> list[SparsityPlan]:
    """``n`` fixed pruned plans (never dense) from ``dist`` with a held-out seed stream, for before/after KL."""
    sampler = PlanSampler(slm, PlanDistribution.from_dict({**dist.to_dict(), "dense_prob": 0.0}))
    rng = step_rng(seed, 0, stream=EVAL_STREAM)
    plans: list[SparsityPlan] = []
    for _ in range(100 * n if dist.families else 0):  # a draw can prune nothing (no layer hit): skip it
        if len(plans) == n:
            break
        plan = sampler.sample(rng)
        if not plan.is_dense:
            plans.append(plan)
    return plans
