import math

import pytest

from envs.rewards import RewardConfig, blended_cost, hinge, linear, reward, reward_range, savings


def test_linear_with_plain_numbers():
    assert linear(1.0, 0.4, 0.5) == pytest.approx(0.8)
    assert reward(1.0, 0.4, cfg=RewardConfig(form="linear", lam=0.5)) == pytest.approx(0.8)
    assert reward(0.5, 1.0, cfg=RewardConfig(form="linear", lam=0.25)) == pytest.approx(0.25)
    # Cheaper is better at equal accuracy; more accurate is better at equal cost.
    assert reward(0.9, 0.3) > reward(0.9, 0.6)
    assert reward(0.9, 0.3) > reward(0.8, 0.3)


def test_hinge_is_free_below_budget():
    cfg = RewardConfig(form="hinge", budget=0.5, penalty=2.0)
    assert reward(0.7, 0.5, cfg=cfg) == pytest.approx(0.7)
    assert reward(0.7, 0.2, cfg=cfg) == pytest.approx(0.7)
    assert reward(0.7, 0.8, cfg=cfg) == pytest.approx(0.7 - 2.0 * 0.3)
    assert hinge(1.0, 1.0, 0.25, 4.0) == pytest.approx(-2.0)


def test_savings_needs_good_accuracy():
    cfg = RewardConfig(form="savings", lam=1.0, min_accuracy=0.5)
    assert reward(1.0, 0.25, cfg=cfg) == pytest.approx(1.75)
    assert reward(0.4, 0.25, cfg=cfg) == pytest.approx(-0.6)
    assert savings(0.5, 1.0, 1.0, 0.5) == pytest.approx(0.5)


def test_energy_blend():
    cfg = RewardConfig(latency_weight=1.0, energy_weight=3.0, lam=1.0)
    assert blended_cost(0.4, 0.8, cfg) == pytest.approx(0.7)
    assert reward(1.0, 0.4, 0.8, cfg) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="energy"):
        reward(1.0, 0.4, None, cfg)
    # Energy is ignored when its weight is zero, even if present.
    assert reward(1.0, 0.4, 5.0, RewardConfig(lam=1.0)) == pytest.approx(0.6)


@pytest.mark.parametrize("acc", [-0.1, 1.1, math.nan])
def test_bad_accuracy(acc):
    with pytest.raises(ValueError, match="accuracy"):
        reward(acc, 0.5)


@pytest.mark.parametrize("frac", [-0.1, math.inf, math.nan])
def test_bad_cost(frac):
    with pytest.raises(ValueError, match="latency_fraction"):
        reward(0.5, frac)


def test_config_validation_and_from_any():
    with pytest.raises(ValueError, match="form"):
        RewardConfig(form="square")
    with pytest.raises(ValueError, match="lam"):
        RewardConfig(lam=-1)
    with pytest.raises(ValueError, match="latency_weight"):
        RewardConfig(latency_weight=0, energy_weight=0)
    with pytest.raises(ValueError, match="valid keys"):
        RewardConfig.from_any({"lamda": 0.3})
    cfg = RewardConfig.from_any({"form": "hinge", "budget": 0.3})
    assert cfg.form == "hinge" and cfg.budget == 0.3
    assert RewardConfig.from_any(None) == RewardConfig()
    assert RewardConfig.from_any(cfg.to_dict()) == cfg


def test_reward_range_bounds_the_reward():
    for cfg in (RewardConfig(), RewardConfig(form="hinge"), RewardConfig(form="savings")):
        lo, hi = reward_range(cfg, max_cost=2.0)
        for acc in (0.0, 0.5, 1.0):
            for cost in (0.0, 0.5, 1.0, 2.0):
                assert lo - 1e-9 <= reward(acc, cost, cfg=cfg) <= hi + 1e-9
