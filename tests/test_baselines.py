import numpy as np
import pytest

from agents.baselines import (
    Context,
    Dense,
    EntropyThreshold,
    Oracle,
    PolicyController,
    RandomPlan,
    StaticImportance,
    StaticMix,
    StaticUniform,
)
from envs.base import PRESETS, PlanBuilder
from envs.runtime.models import tiny_model
from envs.runtime.plan import SparsityPlan, layer_groups
from envs.runtime.sparse_lm import SparseLM
from tests.conftest import random_importance


@pytest.fixture(scope="module")
def ctx() -> Context:
    slm = SparseLM(tiny_model("llama", num_layers=10), name="tiny-10")
    slm.set_importance(random_importance(slm.spec, seed=2))
    groups = [[2 + i for i in g] for g in layer_groups(8, 2)]
    builder = PlanBuilder(slm, groups, fixed_dense=range(2))
    return Context(builder, slm, feature_names=("log_len", "entropy"), discrete_presets=np.asarray(PRESETS))


OBS = np.zeros(2, dtype=np.float32)


def test_dense_and_uniform(ctx):
    assert Dense()(OBS, ctx).is_dense
    plan = StaticUniform(layers=0.5, mlp=0.5)(OBS, ctx)
    assert plan == ctx.builder.plan(np.tile([0.5, 1.0, 0.5], (2, 1)))
    assert all(plan.layers[i].run and plan.layers[i].mlp_channels == 64 for i in (0, 1))  # probe layers dense
    with pytest.raises(ValueError, match=r"StaticUniform.mlp must be in \[0, 1\]"):
        StaticUniform(mlp=1.5)


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.6, 0.45])
def test_static_importance_meets_budget(ctx, budget):
    ctrl = StaticImportance(budget=budget, seq_len=16)
    plan = ctrl(OBS, ctx)
    frac = plan.cost_fraction(16)
    assert frac <= budget + 1e-9
    assert frac >= budget - 0.08  # lands near the budget, not far below it
    assert all(plan.layers[i].run and plan.layers[i] == SparsityPlan.dense(plan.spec).layers[i] for i in (0, 1))
    removed = [i for i, lp in enumerate(plan.layers) if not lp.run]
    order = ctx.slm.importance.layer_order
    kept_rank = [order.index(i) for i, lp in enumerate(plan.layers) if lp.run and i > 1]
    assert all(order.index(i) > max(kept_rank, default=-1) or i < 2 for i in removed)  # least important go first


def test_static_importance_rejects_bad_budget():
    with pytest.raises(ValueError, match="budget must be in"):
        StaticImportance(budget=0.0)


def test_static_mix_is_seeded_and_mixes(ctx):
    a, b = StaticUniform(layers=1.0), StaticUniform(layers=0.5)
    picks = [StaticMix(a, b, p=0.3, seed=1)(OBS, ctx).layers_run for _ in range(1)]
    mix = StaticMix(a, b, p=0.3, seed=1)
    draws = [mix(OBS, ctx).layers_run for _ in range(400)]
    again = StaticMix(a, b, p=0.3, seed=1)
    assert draws == [again(OBS, ctx).layers_run for _ in range(400)]
    share_b = np.mean([d < 10 for d in draws])
    assert 0.24 < share_b < 0.36
    assert picks[0] == draws[0]


def test_random_plan_uses_candidates(ctx):
    cands = [StaticUniform(layers=1.0), StaticUniform(layers=0.5)]
    seen = {RandomPlan(cands, seed=s)(OBS, ctx).layers_run for s in range(20)}
    assert seen == {10, 6}
    with pytest.raises(ValueError, match="at least one candidate"):
        RandomPlan([])


def test_entropy_threshold(ctx):
    rule = EntropyThreshold(0.5, StaticUniform(layers=0.5), Dense())
    assert rule(np.array([0.0, 0.2], np.float32), ctx).layers_run == 6
    assert rule(np.array([0.0, 0.9], np.float32), ctx).is_dense
    with pytest.raises(ValueError, match="no feature 'margin'"):
        EntropyThreshold(0.5, Dense(), Dense(), feature="margin")(OBS, ctx)


def test_oracle_follows_choices(ctx):
    cands = [Dense(), StaticUniform(layers=0.5)]
    oracle = Oracle(cands, np.array([1, 0]))
    ctx1 = Context(ctx.builder, ctx.slm, item_index=0)
    assert oracle(OBS, ctx1).layers_run == 6
    with pytest.raises(ValueError, match="choices for 2 items"):
        oracle(OBS, Context(ctx.builder, ctx.slm, item_index=5))


def test_policy_controller(ctx):
    cont = PolicyController(lambda obs: np.array([0.5, 1, 1, 1, 1, 1]), name="p")
    assert cont(OBS, ctx).layers_run == 8
    disc = PolicyController(lambda obs: 9, name="d", discrete=True)
    assert disc(OBS, ctx) == ctx.builder.plan(np.tile(PRESETS[9], (2, 1)))
