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
from envs.action import PRESETS
from envs.interface import PerInputInterface
from envs.runtime.models import tiny_model
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import SparseLM
from tests.conftest import random_importance


@pytest.fixture(scope="module")
def ctx() -> Context:
    slm = SparseLM(tiny_model("llama", num_layers=10), name="tiny-10")
    slm.set_importance(random_importance(slm.spec, seed=2))
    iface = PerInputInterface.build(slm, num_groups=2, probe_layers=2, probe_dim=0)
    return Context(iface, prompt_len=16)


OBS = np.zeros(10, dtype=np.float32)
ENTROPY = 1  # index of the probe's entropy feature


def test_dense_and_uniform(ctx):
    assert Dense()(OBS, ctx).is_dense
    plan = StaticUniform(layers=0.5, mlp=0.5)(OBS, ctx)
    assert plan == ctx.interface.actions.plan(np.tile([0.5, 1.0, 0.5], (2, 1)))
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
    assert rule(np.where(np.arange(10) == ENTROPY, 0.2, 0.0).astype(np.float32), ctx).layers_run == 6
    assert rule(np.where(np.arange(10) == ENTROPY, 0.9, 0.0).astype(np.float32), ctx).is_dense
    with pytest.raises(ValueError, match="no feature 'margin'"):
        EntropyThreshold(0.5, Dense(), Dense(), feature="margin")(OBS, ctx)


def test_oracle_follows_choices(ctx):
    cands = [Dense(), StaticUniform(layers=0.5)]
    oracle = Oracle(cands, np.array([1, 0]))
    ctx1 = Context(ctx.interface, item_index=0)
    assert oracle(OBS, ctx1).layers_run == 6
    with pytest.raises(ValueError, match="choices for 2 items"):
        oracle(OBS, Context(ctx.interface, item_index=5))


def test_policy_controller(ctx):
    cont = PolicyController(lambda obs: np.array([0.5, 1, 1, 1, 1, 1]), name="p")
    assert cont(OBS, ctx).layers_run == 8
    discrete = PerInputInterface.build(ctx.slm, num_groups=2, probe_layers=2, probe_dim=0, discrete=True)
    disc = PolicyController(lambda obs: 9, name="d")
    dctx = Context(discrete, prompt_len=16)
    assert disc(OBS, dctx) == discrete.actions.plan(np.tile(PRESETS[9], (2, 1)))
    with pytest.raises(ValueError, match=r"action must have shape \(6,\)"):
        disc(OBS, ctx)  # a preset index is not a Box action: refused as the environment refuses it
