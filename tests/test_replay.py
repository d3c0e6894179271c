"""Recording and replay: the twin gives the live calibrated environment's observations and rewards exactly."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hydra import compose, initialize_config_dir

import envs
from envs.data.records import ReplayData, ReplayDataError
from experiments.record import recording
from experiments.train import CONF_DIR

LBL_GROUPS = 2  # LayerByLayer recorded with 2 groups of 7 presets: 49 paths per input


def record_cfg(out: Path, env: str, cost_path: str, *extra: str):
    overrides = [f"env={env}", f"out={out}", "n_items=6", "shard_size=4", "split=val", "repeats=2"]
    overrides += [f"+env.kwargs.cost_model={cost_path}", *extra]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("record", overrides=overrides)


@pytest.fixture(scope="module")
def per_input_data(tmp_path_factory, cost_path) -> Path:
    out = tmp_path_factory.mktemp("rec") / "per_input"
    return recording(record_cfg(out, "tiny_discrete", cost_path))


@pytest.fixture(scope="module")
def lbl_data(tmp_path_factory, cost_path) -> Path:
    out = tmp_path_factory.mktemp("rec") / "lbl"
    extra = ["env.id=PruneGym/LayerByLayerDiscrete-v0", f"env.kwargs.num_groups={LBL_GROUPS}"]
    return recording(record_cfg(out, "tiny_discrete", cost_path, *extra))


def live_env(data: Path):
    card = json.loads((data / "card.json").read_text())
    return gym.make(card["env_id"], **card["env_kwargs"]).unwrapped


def same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("which", ["per_input", "lbl"])
def test_replay_equals_live_for_every_recorded_input_and_path(which, per_input_data, lbl_data):
    data = per_input_data if which == "per_input" else lbl_data
    live = live_env(data)
    twin = gym.make(envs.replay_id("PerInput" if which == "per_input" else "LayerByLayer"), dataset=str(data))
    twin = twin.unwrapped
    assert twin.observation_space == live.observation_space and twin.action_space == live.action_space
    steps = LBL_GROUPS if which == "lbl" else 1
    compared = 0
    for i in range(twin.n_inputs):
        for path in itertools.product(range(live.action_space.n), repeat=steps):
            lo, _ = live.reset(options={"item": i})
            ro, _ = twin.reset(options={"item": i})
            assert same(lo, ro)
            for a in path:
                lo, lr, ld, _, linfo = live.step(a)
                ro, rr, rd, _, rinfo = twin.step(a)
                assert same(lo, ro) and lr == rr and ld == rd
            assert rinfo["accuracy"] == linfo["accuracy"] and rinfo["latency_fraction"] == linfo["latency_fraction"]
            assert rinfo["flops_fraction"] == linfo["flops_fraction"]
            compared += 1
    assert compared == 6 * live.action_space.n**steps


@pytest.mark.parametrize("name", ["PerInput", "LayerByLayer"])
def test_replay_ids_pass_the_env_checker(name, per_input_data, lbl_data):
    data = per_input_data if name == "PerInput" else lbl_data
    env = gym.make(envs.replay_id(name), dataset=str(data))
    check_env(env.unwrapped)
    assert not gym.spec(envs.replay_id(name)).nondeterministic


def test_latency_modes_and_other_reward_weights(per_input_data):
    rec = ReplayData.load(per_input_data)
    for latency in ("median", "sample"):
        a = gym.make(envs.replay_id("PerInput"), dataset=str(per_input_data), latency=latency).unwrapped
        b = gym.make(envs.replay_id("PerInput"), dataset=str(per_input_data), latency=latency).unwrapped
        ra, rb = [], []
        for env, out in ((a, ra), (b, rb)):
            env.reset(seed=3)
            for _ in range(40):
                _, r, _, _, info = env.step(int(env.np_random.integers(10)))
                out.append((r, info["latency_fraction"]))
                env.reset()
        assert ra == rb  # reproducible under a seed
        lats = {x[1] for x in ra}
        assert all(lat > 0 for lat in lats) and len(lats) > 5
    med = gym.make(envs.replay_id("PerInput"), dataset=str(per_input_data), latency="median").unwrapped
    med.reset(options={"item": 2})
    _, _, _, _, info = med.step(3)
    want = np.median(rec.latency_s[2, 3]) / np.median(rec.dense_latency_s[2, 3])
    assert info["latency_fraction"] == pytest.approx(want)
    heavy = gym.make(envs.replay_id("PerInput"), dataset=str(per_input_data), reward={"lam": 2.0}).unwrapped
    heavy.reset(options={"item": 2})
    _, r, _, _, info = heavy.step(3)
    assert r == pytest.approx(info["accuracy"] - 2.0 * info["latency_fraction"])


def test_bad_actions_are_refused_as_live(per_input_data):
    twin = gym.make(envs.replay_id("PerInput"), dataset=str(per_input_data)).unwrapped
    twin.reset(seed=0)
    for bad in (10, -1, 1.5, True, "2", None, [1, 2]):
        with pytest.raises(ValueError):
            twin.step(bad)
    twin.step(np.int64(2))
    with pytest.raises(RuntimeError, match="reset"):
        twin.step(0)


def test_a_dataset_for_something_else_is_refused(per_input_data, tmp_path):
    with pytest.raises(ReplayDataError, match=r"model='tiny-llama'.*'smollm2-135m'.*experiments.record"):
        gym.make(envs.replay_id("PerInput"), dataset=str(per_input_data), expect={"model": "smollm2-135m"})
    for key, value in (("weights_hash", "0" * 16), ("split", "train"), ("version", 3)):
        with pytest.raises(ReplayDataError, match=f"{key}="):
            ReplayData.load(per_input_data, expect={key: value})
    with pytest.raises(ReplayDataError, match="env='PerInput'"):
        gym.make(envs.replay_id("LayerByLayer"), dataset=str(per_input_data))
    copy = tmp_path / "copy"
    shutil.copytree(per_input_data, copy)
    shard = next(copy.glob("shard-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ReplayDataError, match="differs from card.json"):
        ReplayData.load(copy)
    with pytest.raises(ReplayDataError, match="no replay dataset"):
        ReplayData.load(tmp_path / "nothing")


def test_mixed_machines_are_refused_unless_allowed(per_input_data, tmp_path):
    copy = tmp_path / "mixed"
    shutil.copytree(per_input_data, copy)
    card = json.loads((copy / "card.json").read_text())
    card["shards"][1]["machine"] = ["cpu:another machine"]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(ReplayDataError, match="mixes shards recorded on"):
        ReplayData.load(copy)
    assert ReplayData.load(copy, allow_mixed_machines=True).n_inputs == 6


def test_resume_after_an_interrupted_recording_completes_the_same_dataset(
    per_input_data, tmp_path, cost_path, monkeypatch
):
    import experiments.record as rec

    out = tmp_path / "resumed"
    real = rec.record_shard
    calls = {"n": 0}

    def dies_on_the_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill after the first shard was written
        return real(*args)

    monkeypatch.setattr(rec, "record_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        recording(record_cfg(out, "tiny_discrete", cost_path))
    assert [s["index"] for s in json.loads((out / "card.json").read_text())["shards"]] == [0]
    with pytest.raises(FileExistsError, match="resume=true"):
        recording(record_cfg(out, "tiny_discrete", cost_path))
    monkeypatch.setattr(rec, "record_shard", real)
    recording(record_cfg(out, "tiny_discrete", cost_path, "resume=true"))
    a, b = ReplayData.load(out), ReplayData.load(per_input_data)
    assert a.item_ids == b.item_ids and np.array_equal(a.rel, b.rel) and np.array_equal(a.latency, b.latency)
    assert np.array_equal(a.obs, b.obs)
    card = json.loads((out / "card.json").read_text())
    assert card["elapsed_inputs"] == a.n_inputs and card["elapsed_s"] > 0  # both runs' time, every input counted
    with pytest.raises(ValueError, match="differ from the dataset"):
        recording(record_cfg(out, "tiny_discrete", cost_path, "resume=true", "repeats=3"))


def test_budget_records_what_fits(tmp_path, cost_path):
    out = recording(record_cfg(tmp_path / "b", "tiny_discrete", cost_path, "budget_min=0.0001"))
    card = json.loads((out / "card.json").read_text())
    assert len(card["shards"]) == 1  # the first shard starts in time; none after the budget


def test_bad_settings_are_refused_before_anything_is_built(tmp_path, cost_path):
    for bad, needle in (("repeats=0", "repeats=0"), ("shard_size=-1", "shard_size"), ("budget_min=0", "budget_min")):
        with pytest.raises(ValueError, match=needle):
            recording(record_cfg(tmp_path / "x", "tiny_discrete", cost_path, bad))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="discrete variant"):
        recording(record_cfg(tmp_path / "y", "tiny", cost_path))


@pytest.mark.slow
def test_shards_fan_out_over_ray_workers(per_input_data, tmp_path, cost_path):
    out = recording(record_cfg(tmp_path / "ray", "tiny_discrete", cost_path, "workers=2", "cluster.num_cpus=2"))
    a, b = ReplayData.load(out), ReplayData.load(per_input_data)
    assert a.item_ids == b.item_ids and np.array_equal(a.rel, b.rel) and np.array_equal(a.obs, b.obs)


def test_the_replay_env_config_builds_with_a_dataset(per_input_data):
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["env=per_input_replay", f"env.kwargs.dataset={per_input_data}"])
    env = envs.make_env(OmegaConf.to_container(cfg.env, resolve=True))
    env.reset(seed=0)
    _, r, done, _, _ = env.step(env.action_space.sample())
    assert done and np.isfinite(r)
