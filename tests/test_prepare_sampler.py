"""PlanSampler builds its plans with envs.runtime.plan.plan_from_counts and draws exactly the plans it drew before."""

from __future__ import annotations

import numpy as np
import pytest

from envs.distill.config import PlanDistribution
from envs.distill.sampler import PlanSampler, eval_plan_set, step_rng
from envs.runtime.models import tiny_model
from envs.runtime.plan import LayerPlan, SparsityPlan, select_heads
from envs.runtime.sparse_lm import SparseLM
from tests.conftest import random_importance


def _frozen_sample(sampler: PlanSampler, rng: np.random.Generator) -> SparsityPlan:
    """The sampler's draw as it was written before it used plan_from_counts (LayerPlans built by hand)."""
    s, d = sampler.spec, sampler.dist
    if not d.families or rng.random() < d.dense_prob:
        return SparsityPlan(s, SparsityPlan.dense(s).layers, {"kind": "prepare", "families": []})
    while True:
        active = [f for f in d.families if rng.random() < d.family_prob]
        if active:
            break
    run = np.ones(s.num_layers, dtype=bool)
    if "layers" in active:
        drop = rng.random(s.num_layers) < sampler.layer_rates
        how = d.layer_choice if d.layer_choice != "mixed" else ("depth", "importance")[int(rng.integers(2))]
        if how == "importance":
            k = int(drop.sum())
            drop[:] = False
            if k:
                drop[sampler.importance.layer_order[s.num_layers - k :]] = True
        if drop.all():
            drop[int(sampler.importance.layer_order[0])] = False
        run = ~drop
    mlp = np.full(s.num_layers, s.intermediate_size)
    if "mlp" in active:
        if rng.random() < d.mlp_shared_prob:
            mlp[:] = round(float(rng.choice(d.mlp_levels)) * s.intermediate_size)
        else:
            mlp = np.array([round(float(v) * s.intermediate_size) for v in rng.choice(d.mlp_levels, s.num_layers)])
    shared_groups = None
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
            hp = select_heads(
                s, sampler.importance.head_order[i], sampler.importance.kv_order[i], groups * s.group_size
            )
            assert hp is not None
            heads, kv = hp.heads, hp.kv_heads
        layers.append(LayerPlan(True, heads, kv, int(mlp[i])))
    return SparsityPlan(s, tuple(layers), {"kind": "prepare", "families": active})


def _slm(family: str, num_layers: int, seed: int) -> SparseLM:
    slm = SparseLM(tiny_model(family, seed=0, num_layers=num_layers), name=f"tiny-{family}")
    slm.set_importance(random_importance(slm.spec, seed=seed))
    return slm


DISTRIBUTIONS = [
    {},
    {"dense_prob": 0.33},
    {"families": ["layers"], "layer_choice": "depth", "family_prob": 1.0, "layer_rate_max": 0.9},
    {"families": ["layers", "kv"], "layer_choice": "mixed", "kv_shared_prob": 0.0, "kv_drop_prob": 0.7},
    {"families": ["mlp", "kv"], "mlp_shared_prob": 0.0, "kv_shared_prob": 1.0, "family_prob": 1.0},
    {"families": [], "dense_prob": 1.0},
]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize(("family", "num_layers"), [("llama", 8), ("gpt2", 5)])
def test_sampled_plans_equal_the_hand_built_ones_draw_for_draw(dist, family, num_layers):
    # GQA (llama: 2 KV groups of 2 heads) and plain attention (gpt2: 4 groups of 1 head).
    slm = _slm(family, num_layers, seed=3)
    sampler = PlanSampler(slm, PlanDistribution.from_dict(dist))
    new_rng, old_rng = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(300):
        new, old = sampler.sample(new_rng), _frozen_sample(sampler, old_rng)
        assert new == old and new.meta == old.meta
        assert all(type(h) is int for lp in new.layers for h in (*lp.heads, *lp.kv_heads))
    # The same numbers were drawn: the generators are in the same state afterwards.
    assert new_rng.bit_generator.state == old_rng.bit_generator.state


def test_step_plans_and_held_out_plans_are_unchanged():
    # What training and the before/after figures actually draw: streams of (seed, step) and the held-out stream.
    slm = _slm("llama", 6, seed=5)
    dist = PlanDistribution.from_dict({"dense_prob": 0.2})
    sampler = PlanSampler(slm, dist)
    for step in range(40):
        for j in range(3):
            assert sampler.sample(step_rng(7, step, j)) == _frozen_sample(sampler, step_rng(7, step, j))
    held = eval_plan_set(slm, dist, 8, seed=7)
    frozen_sampler = PlanSampler(slm, PlanDistribution.from_dict({**dist.to_dict(), "dense_prob": 0.0}))
    rng, frozen = step_rng(7, 0, stream=104729), []
    while len(frozen) < 8:
        plan = _frozen_sample(frozen_sampler, rng)
        if not plan.is_dense:
            frozen.append(plan)
    assert held == frozen
