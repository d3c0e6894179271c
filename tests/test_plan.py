import json
import math

import numpy as np
import pytest

from envs.runtime.importance import Importance
from envs.runtime.plan import LayerPlan, ModelSpec, SparsityPlan, layer_groups, select_heads

SPEC = ModelSpec(num_layers=6, num_heads=6, num_kv_heads=2, head_dim=4, hidden_size=24, intermediate_size=40)


@pytest.fixture
def imp():
    imp = Importance.identity(SPEC)
    imp.layer_order = [0, 5, 1, 4, 2, 3]  # layer 3 least important
    imp.kv_order = [[1, 0]] * SPEC.num_layers  # KV group 1 first
    imp.head_order = [[4, 3, 5, 0, 1, 2]] * SPEC.num_layers
    return imp


def test_dense_plan_is_dense():
    plan = SparsityPlan.dense(SPEC)
    assert plan.is_dense
    assert plan.layers_run == 6
    assert plan.cost_fraction() == pytest.approx(1.0)


def test_uniform_skips_least_important_layers(imp):
    plan = SparsityPlan.uniform(SPEC, imp, layers=4 / 6)
    assert [i for i, lp in enumerate(plan.layers) if not lp.run] == [2, 3]
    assert not plan.is_dense
    assert plan.cost_fraction() == pytest.approx(4 / 6)


def test_heads_fill_most_important_group_first(imp):
    plan = SparsityPlan.uniform(SPEC, imp, heads=0.5)
    lp = plan.layers[0]
    assert lp.kv_heads == (1,)
    assert lp.heads == (3, 4, 5)
    lp2 = SparsityPlan.uniform(SPEC, imp, heads=4 / 6).layers[0]
    assert lp2.kv_heads == (0, 1)
    assert lp2.heads == (0, 3, 4, 5)  # head 0 is group 0's most important


def test_select_heads_zero_is_none(imp):
    assert select_heads(SPEC, imp.head_order[0], imp.kv_order[0], 0) is None


def test_mlp_fraction_rounds_channels(imp):
    plan = SparsityPlan.uniform(SPEC, imp, mlp=0.25)
    assert {lp.mlp_channels for lp in plan.layers} == {10}


def test_from_action_groups(imp):
    action = [1.0, 1.0, 1.0, 0.0, 1.0, 0.5]
    plan = SparsityPlan.from_action(SPEC, imp, action, num_groups=2)
    assert [lp.run for lp in plan.layers] == [True, True, True, False, False, False]
    dense_half = SparsityPlan.from_action(SPEC, imp, [1.0, 1.0, 0.5, 1.0, 1.0, 0.5], num_groups=2)
    assert {lp.mlp_channels for lp in dense_half.layers} == {20}
    assert layer_groups(30, 3) == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]


@pytest.mark.parametrize("bad", [math.nan, -0.1, 1.5, math.inf])
def test_from_action_rejects_bad_values(imp, bad):
    with pytest.raises(ValueError, match=r"action\[1\] \(heads of group 0\).*\[0, 1\]"):
        SparsityPlan.from_action(SPEC, imp, [1.0, bad, 1.0])


def test_from_action_rejects_wrong_length(imp):
    with pytest.raises(ValueError, match="3 \\* num_groups = 6"):
        SparsityPlan.from_action(SPEC, imp, np.ones(5), num_groups=2)


@pytest.mark.parametrize("name", ["layers", "heads", "mlp"])
def test_uniform_rejects_nan(imp, name):
    with pytest.raises(ValueError, match=f"{name} must be a fraction in \\[0, 1\\]"):
        SparsityPlan.uniform(SPEC, imp, **{name: float("nan")})


def test_json_round_trip(imp):
    plan = SparsityPlan.from_action(SPEC, imp, [0.5, 0.5, 0.3, 1, 0.84, 0.7], num_groups=2)
    again = SparsityPlan.from_json(plan.to_json())
    assert again == plan
    assert hash(again) == hash(plan)
    assert again.meta["kind"] == "action"


def test_wrong_layer_count():
    dense = SparsityPlan.dense(SPEC)
    with pytest.raises(ValueError, match="layers has 5 entries; the model has 6"):
        SparsityPlan(SPEC, dense.layers[:5])


def test_query_head_without_kv_head():
    layers = list(SparsityPlan.dense(SPEC).layers)
    layers[2] = LayerPlan(run=True, heads=(0, 4), kv_heads=(0,), mlp_channels=40)
    with pytest.raises(ValueError, match=r"layers\[2\]\.kv_heads must include.*query heads \[4\] read KV heads \[1\]"):
        SparsityPlan(SPEC, tuple(layers))


def test_unused_kv_head_rejected():
    layers = list(SparsityPlan.dense(SPEC).layers)
    layers[0] = LayerPlan(run=True, heads=(0,), kv_heads=(0, 1), mlp_channels=40)
    with pytest.raises(ValueError, match=r"layers\[0\]\.kv_heads \[1\] serve no kept query head"):
        SparsityPlan(SPEC, tuple(layers))


@pytest.mark.parametrize(
    ("layer", "pattern"),
    [
        (LayerPlan(True, (0, 9), (0, 1), 40), r"heads entries must be integers in \[0, 5\]"),
        (LayerPlan(True, (1, 0), (0,), 40), r"heads must be sorted and unique"),
        (LayerPlan(True, (0,), (0,), 41), r"mlp_channels must be an integer in \[0, 40\]"),
        (LayerPlan(True, (0,), (0,), -1), r"mlp_channels must be an integer in \[0, 40\]"),
        (LayerPlan(1, (0,), (0,), 4), r"run must be a bool"),
    ],
)
def test_field_validation(layer, pattern):
    layers = list(SparsityPlan.dense(SPEC).layers)
    layers[1] = layer
    with pytest.raises(ValueError, match=pattern):
        SparsityPlan(SPEC, tuple(layers))


def test_from_json_errors():
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsityPlan.from_json("{")
    data = SparsityPlan.dense(SPEC).to_dict()
    data["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version must be 1"):
        SparsityPlan.from_dict(data)
    data = SparsityPlan.dense(SPEC).to_dict()
    del data["layers"][0]["mlp_channels"]
    with pytest.raises(ValueError, match="missing the field 'mlp_channels'"):
        SparsityPlan.from_json(json.dumps(data))


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelSpec(2, 6, 4, 4, 24, 40)
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        ModelSpec(0, 6, 2, 4, 24, 40)


def test_flops_account_for_kv_drop(imp):
    dense = SparsityPlan.dense(SPEC).flops(16)
    kv_half = SparsityPlan.uniform(SPEC, imp, heads=0.5).flops(16)
    assert kv_half["mlp"] == dense["mlp"]
    assert kv_half["attention"] == pytest.approx(dense["attention"] / 2)
