"""Exported controllers: save -> load -> same actions, clear errors, no Ray at load time, atomic writes, tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.controller import CARD_FILE, ONNX_FILE, Controller, ControllerError, card_digest
from envs.runtime.models import tiny_model
from envs.runtime.sparse_lm import SparseLM
from tests.conftest import tiny_kwargs

ROOT = Path(__file__).resolve().parent.parent
PROBE = {"num_groups": 2, "probe_layers": 2, "probe_dim": 8}
OBS_DIM = 6 + 2 * 2 + 8
OBS = gym.spaces.Box(-10.0, 10.0, (OBS_DIM,), np.float32)
BOX = gym.spaces.Box(0.0, 1.0, (6,), np.float32)
DISCRETE = gym.spaces.Discrete(10)
PER_INPUT, PER_INPUT_D = "PruneGym/PerInput-v0", "PruneGym/PerInputDiscrete-v0"


@pytest.fixture(scope="module")
def slm(cost_path) -> SparseLM:
    from envs.base import shared_lm

    return shared_lm("tiny-llama")


_CONFIGS: dict[tuple, dict] = {}


def env_config(env_id: str, cost_path: str, **kw) -> dict:
    """The description a tiny environment gives of itself (what training writes to env_config.json)."""
    import envs  # noqa: F401

    key = (env_id, tuple(sorted(kw.items())))
    if key not in _CONFIGS:
        env = gym.make(env_id, **tiny_kwargs(env_id, cost_path, **kw))
        _CONFIGS[key] = json.loads(json.dumps(env.unwrapped.config()))
        env.close()
    return _CONFIGS[key]


def build_module(algo: str, action_space: gym.Space):
    """An RLlib RLModule with random weights, built locally (no Ray cluster)."""
    import importlib

    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    names = {"ppo": "PPOConfig", "appo": "APPOConfig", "impala": "IMPALAConfig", "sac": "SACConfig", "dqn": "DQNConfig"}
    cfg_cls = getattr(importlib.import_module(f"ray.rllib.algorithms.{algo}"), names[algo])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = (
            cfg_cls()
            .environment(observation_space=OBS, action_space=action_space)
            .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[32, 32]))
        )
        return config.get_rl_module_spec().build()


def reference_policy(module, action_space):
    """The training stack's own greedy policy (agents.rllib.greedy_policy) over the module."""
    from types import SimpleNamespace

    from agents.rllib import greedy_policy

    algo = SimpleNamespace(
        get_module=lambda: module, config=SimpleNamespace(normalize_actions=True, clip_actions=False)
    )
    return greedy_policy(algo, action_space)


def observations(n: int = 48, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, OBS_DIM)) * 3).astype(np.float32)


@pytest.mark.parametrize(
    ("algo", "space", "env_id"),
    [("ppo", BOX, PER_INPUT), ("sac", BOX, PER_INPUT), ("dqn", DISCRETE, PER_INPUT_D), ("ppo", DISCRETE, PER_INPUT_D)],
    ids=["ppo-box", "sac-box", "dqn-discrete", "ppo-discrete"],
)
def test_rllib_export_roundtrip(tmp_path, slm, cost_path, algo, space, env_id):
    from agents.export import export_rllib_module

    module = build_module(algo, space)
    cfg = env_config(env_id, cost_path, **PROBE)
    out = export_rllib_module(module, tmp_path / "ctl", algo=algo, env_config=cfg, slm=slm)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", CARD_FILE, ONNX_FILE, "model.safetensors"]
    ctl = Controller.from_pretrained(out, slm)
    ref = reference_policy(module, space)
    xs = observations()
    got = [ctl.select_action(x) for x in xs]
    want = [ref(x) for x in xs]
    if isinstance(space, gym.spaces.Box):
        np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5, rtol=0)
        assert np.ptp(np.stack(got), axis=0).max() > 1e-3  # the policy's action depends on the observation
        np.testing.assert_allclose(ctl.select_action(xs), np.stack(want), atol=1e-5, rtol=0)  # batch form
    else:
        assert got == [int(a) for a in want]
        assert all(isinstance(a, int) for a in got)
    card = json.loads((out / CARD_FILE).read_text())
    assert card["model"]["weights_hash"] == slm.weights_hash
    assert card["interface"]["observation"]["probe"]["proj_dim"] == 8
    assert card["env"] == {**card["env"], "id": env_id, "version": 0, "env": "PerInput"}
    assert card["interface"] == cfg["interface"]  # the environment's own description, copied
    plan = ctl.select_plan(xs[0], slm)
    assert all(plan.layers[i].run and plan.layers[i].mlp_channels == slm.spec.intermediate_size for i in range(2))


def test_safetensors_hold_the_policy_weights(tmp_path, slm, cost_path):
    from safetensors.torch import load_file

    from agents.export import export_rllib_module

    module = build_module("ppo", BOX)
    cfg = env_config(PER_INPUT, cost_path, **PROBE)
    out = export_rllib_module(module, tmp_path / "ctl", algo="ppo", env_config=cfg, slm=slm)
    saved = load_file(str(out / "model.safetensors"))
    state = module.state_dict()
    assert set(saved) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(saved[k], v)


@pytest.mark.parametrize("algo", ["appo", "impala"])
def test_appo_impala_share_ppo_export(tmp_path, slm, cost_path, algo):
    from agents.export import export_rllib_module

    module = build_module(algo, BOX)
    cfg = env_config(PER_INPUT, cost_path, **PROBE)
    out = export_rllib_module(module, tmp_path / algo, algo=algo, env_config=cfg, slm=slm)
    ctl, ref = Controller.from_pretrained(out, slm), reference_policy(module, BOX)
    for x in observations(8):
        np.testing.assert_allclose(ctl.select_action(x), ref(x), atol=1e-5, rtol=0)


def fitted_bandit(seed: int = 0):
    from agents.bandit import BanditController

    rng = np.random.default_rng(seed)
    ctl = BanditController(10, OBS_DIM, seed=seed)
    x = rng.standard_normal((200, OBS_DIM)) * 2 + 1
    arms = rng.integers(0, 10, 200)
    rewards = x[:, 0] * (arms - 4.5) / 5 + x[:, 1] * (arms % 3) + rng.standard_normal(200) * 0.1
    ctl.fit(x, arms, rewards)
    return ctl


def export_bandit_to(path, slm, cost_path, **kw):
    from agents.export import export_bandit

    cfg = env_config(PER_INPUT_D, cost_path, **PROBE)
    return export_bandit(fitted_bandit(), path, env_config=cfg, slm=slm, **kw)


def test_bandit_export_roundtrip(tmp_path, slm, cost_path):
    bandit = fitted_bandit()
    out = export_bandit_to(tmp_path / "bandit", slm, cost_path)
    ctl = Controller.from_pretrained(out, slm)
    xs = observations(64, seed=3)
    got = [ctl.select_action(x) for x in xs]
    assert got == [bandit.greedy(x) for x in xs]
    assert len(set(got)) > 1
    assert ctl.card["policy"]["normalization"]["mean"] == pytest.approx(bandit.mean.tolist())


def write_run(tmp_path: Path, slm, module, cost_path: str, *, with_env_config: bool = True) -> Path:
    """A training run directory as experiments.train leaves it, with an RLlib module checkpoint."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "iter_000002"
    module.save_to_path(str(ckpt / "learner_group" / "learner" / "rl_module" / "default_policy"))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"folder": "iter_000002", "iteration": 2}))
    kwargs = tiny_kwargs(PER_INPUT, cost_path, **PROBE, split="val")  # the env config's split: not what trains
    cfg = {"algo": {"name": "ppo"}, "env": {"id": PER_INPUT, "kwargs": kwargs}, "seed": 0, "train_split": "train"}
    (run / "run_config.json").write_text(json.dumps(cfg))
    if with_env_config:
        (run / "env_config.json").write_text(json.dumps(env_config(PER_INPUT, cost_path, **PROBE, split="train")))
    rows = [{"iteration": i, "env_steps": 32 * i, "reward": 0.1 * i, "accuracy": 0.9, "cost": 0.7} for i in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {
        "iterations": 2,
        "eval_split": "test",
        "eval": {"reward": 0.25, "accuracy": 0.875, "cost": 0.625, "episodes": 8},
    }
    (run / "final.json").write_text(json.dumps({**final, "train": rows[-1]}))
    return run


@pytest.mark.parametrize("with_env_config", [True, False], ids=["env_config.json", "rebuilt"])
def test_export_from_run_directory(tmp_path, slm, cost_path, with_env_config):
    from agents.export import export_from_path

    module = build_module("ppo", BOX)
    run = write_run(tmp_path, slm, module, cost_path, with_env_config=with_env_config)
    out = export_from_path(run, tmp_path / "ctl", slm=slm)
    ctl = Controller.from_pretrained(out, slm)
    assert ctl.card["metrics"]["held_out"]["accuracy"] == 0.875
    assert ctl.card["metrics"]["iterations"] == 2
    assert ctl.card["env"]["data"]["split"] == "train"  # the split it really trained on, not the config's "val"
    assert "Trained on the `train` split" in (out / "README.md").read_text()
    assert "| held-out | 0.2500 | 0.8750 | 0.6250 |" in (out / "README.md").read_text()
    ref = reference_policy(module, BOX)
    for x in observations(8):
        np.testing.assert_allclose(ctl.select_action(x), ref(x), atol=1e-5, rtol=0)


def test_export_refuses_a_policy_that_does_not_fit(tmp_path, slm, cost_path):
    from agents.export import export_bandit, export_rllib_module

    cfg = env_config(PER_INPUT, cost_path, **PROBE)
    with pytest.raises(ValueError, match="action is discrete, its environment's is box"):
        export_bandit(fitted_bandit(), tmp_path / "a", env_config=cfg, slm=slm)
    wide = gym.spaces.Box(0.0, 1.0, (9,), np.float32)
    with pytest.raises(ValueError, match="9 action values, its environment 6"):
        export_rllib_module(build_module("ppo", wide), tmp_path / "b", algo="ppo", env_config=cfg, slm=slm)
    other = SparseLM(tiny_model("llama", seed=3), name="tiny-other")
    with pytest.raises(ValueError, match="export with the model the policy was trained on"):
        export_rllib_module(build_module("ppo", BOX), tmp_path / "c", algo="ppo", env_config=cfg, slm=other)
    assert not any(tmp_path.iterdir())


def test_export_cli_help():
    from experiments.export import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def bandit_export(tmp_path_factory, slm, cost_path) -> Path:
    return export_bandit_to(tmp_path_factory.mktemp("exp") / "bandit", slm, cost_path)


def copy_export(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused(tmp_path, slm, bandit_export):
    folder = copy_export(bandit_export, tmp_path / "c")
    data = bytearray((folder / ONNX_FILE).read_bytes())
    data[-5] ^= 0xFF
    (folder / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ControllerError, match=r"model.onnx does not match card.json.*modified or is incomplete"):
        Controller.from_pretrained(folder)


def test_missing_file_and_bad_schema_are_refused(tmp_path, bandit_export):
    folder = copy_export(bandit_export, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ControllerError, match="model.safetensors is missing"):
        Controller.from_pretrained(folder)
    folder = copy_export(bandit_export, tmp_path / "d")
    card = json.loads((folder / CARD_FILE).read_text())
    card["schema_version"] = 99
    card["card_sha256"] = card_digest(card)
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ControllerError, match="schema_version 99"):
        Controller.from_pretrained(folder)
    with pytest.raises(ControllerError, match="no card.json"):
        Controller.from_pretrained(tmp_path)


def test_controller_for_another_model_is_refused(slm, bandit_export):
    other = SparseLM(tiny_model("llama", seed=1), name="tiny-llama-other")
    with pytest.raises(ControllerError) as exc:
        Controller.from_pretrained(bandit_export, other)
    msg = str(exc.value)
    assert slm.weights_hash in msg and other.weights_hash in msg and "tiny-llama-other" in msg
    ctl = Controller.from_pretrained(bandit_export)  # loads without a model; refuses it when planning
    with pytest.raises(ControllerError, match="weights hash"):
        ctl.select_plan(np.zeros(OBS_DIM, np.float32), other)
    with pytest.raises(ControllerError, match="weights hash"):
        ctl.observe(other, [1, 2, 3])


def test_wrong_observation_size_is_refused(bandit_export):
    ctl = Controller.from_pretrained(bandit_export)
    with pytest.raises(ValueError, match=f"observation has 5 values, but this controller expects {OBS_DIM}"):
        ctl.select_action(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=rf"shape \(batch, {OBS_DIM}\)"):
        ctl.select_action(np.zeros((2, OBS_DIM + 1), np.float32))


def test_controller_never_imports_ray(bandit_export):
    code = (
        "import sys, numpy as np\n"
        "from agents.controller import Controller\n"
        "from agents.adaptive import adaptive_generate\n"
        "from envs.runtime.sparse_lm import SparseLM\n"
        "slm = SparseLM.from_pretrained('tiny-llama')\n"
        f"c = Controller.from_pretrained({str(bandit_export)!r}, slm)\n"
        f"a = c.select_action(np.ones({OBS_DIM}, np.float32))\n"
        f"p = c.select_plan(np.ones({OBS_DIM}, np.float32), slm)\n"
        "out = adaptive_generate(slm, c, [5, 6, 7, 8, 9], max_new_tokens=3)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('ray', 'gymnasium') and sys.modules[m] is not None]\n"
        "assert not loaded, loaded[:5]\n"
        "print('ok', a, out.sequences.shape[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    blocked = "import sys\nfor m in ('ray', 'gymnasium'):\n    sys.modules[m] = None  # importing them fails\n"
    res = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", blocked + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")


# ------------------------------------------------------------------------------------------ atomic writes
def test_interrupted_export_leaves_no_folder(tmp_path, slm, cost_path, monkeypatch):
    import agents.export as export

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(export, "render_readme", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_bandit_to(tmp_path / "ctl", slm, cost_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    first = export_bandit_to(tmp_path / "ctl", slm, cost_path)
    card = (first / CARD_FILE).read_text()
    monkeypatch.setattr(export, "render_readme", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_bandit_to(tmp_path / "ctl", slm, cost_path, force=True)  # a failed replacement keeps the old export
    assert (first / CARD_FILE).read_text() == card
    assert [p.name for p in tmp_path.iterdir()] == ["ctl"]
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--force"):
        export_bandit_to(tmp_path / "ctl", slm, cost_path)


# ------------------------------------------------------------------------------------------ adaptive inference
def test_adaptive_generate_per_input_matches_generate_under_the_chosen_plan(slm, bandit_export):
    from agents.adaptive import adaptive_generate

    ctl = Controller.from_pretrained(bandit_export, slm)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    out = adaptive_generate(slm, ctl, ids, max_new_tokens=6)
    assert len(out.plans) == 1 and out.sequences.shape == (1, 16)
    np.testing.assert_array_equal(out.observations[0], ctl.observe(slm, ids).features)
    assert out.actions[0] == ctl.select_action(out.observations[0])
    torch.testing.assert_close(out.sequences, slm.generate(ids, out.plans[0], max_new_tokens=6))


def test_adaptive_generate_per_token(tmp_path, slm, cost_path):
    from agents.adaptive import adaptive_generate
    from agents.export import export_rllib_module
    from envs.observation import TOKEN_FEATURES

    obs = gym.spaces.Box(-10.0, 10.0, (len(TOKEN_FEATURES),), np.float32)
    from ray.rllib.algorithms.ppo import PPOConfig

    module = PPOConfig().environment(observation_space=obs, action_space=BOX).get_rl_module_spec().build()
    cfg = env_config("PruneGym/PerToken-v1", cost_path, num_groups=2, max_new_tokens=8)
    out_dir = export_rllib_module(module, tmp_path / "tok", algo="ppo", env_config=cfg, slm=slm)
    ctl = Controller.from_pretrained(out_dir, slm)
    assert ctl.env_kind == "per_token"
    out = adaptive_generate(slm, ctl, [4, 8, 15, 16, 23], max_new_tokens=5)
    assert out.sequences.shape == (1, 10) and len(out.plans) == 4
    assert [o[0] for o in out.observations] == pytest.approx([t / 8 for t in range(4)])
    for o, a in zip(out.observations, out.actions, strict=True):
        np.testing.assert_allclose(ctl.select_action(o), a)


# ------------------------------------------------------------------------------------------ tampering
def _leaves(node, path=()):
    """Every leaf of a JSON document as (path, value)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 0
    return ["x"]  # an empty list or dict


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def test_every_file_and_every_card_field_is_covered(tmp_path, bandit_export):
    """Tamper with each file and with each field of card.json in turn: every change is refused on load."""
    import shutil

    card = json.loads((bandit_export / CARD_FILE).read_text())
    leaves = list(_leaves(card))
    folder = tmp_path / "c"
    refused = 0
    for path, value in leaves:
        shutil.rmtree(folder, ignore_errors=True)
        copy_export(bandit_export, folder)
        edited = json.loads((folder / CARD_FILE).read_text())
        _set(edited, path, _changed(value))
        (folder / CARD_FILE).write_text(json.dumps(edited, indent=1))
        with pytest.raises(ControllerError):
            Controller.from_pretrained(folder)
        refused += 1
    files = sorted(p.name for p in bandit_export.iterdir())
    for name in files:
        for how in ("flip", "truncate", "append"):
            shutil.rmtree(folder, ignore_errors=True)
            copy_export(bandit_export, folder)
            data = bytearray((folder / name).read_bytes())
            if how == "flip":
                data[len(data) // 2] ^= 0x01
            elif how == "truncate":
                data = data[: len(data) // 2]
            else:
                data += b"x"
            (folder / name).write_bytes(bytes(data))
            with pytest.raises(ControllerError):
                Controller.from_pretrained(folder)
            refused += 1
    assert refused == len(leaves) + 3 * len(files) and len(leaves) > 100
    print(f"tamperings refused: {len(leaves)} card fields, {3 * len(files)} file edits")


@pytest.mark.parametrize("name", ["policy.pkl", "model.pt", ".hidden.bin", "sub/extra.onnx"])
def test_files_the_card_does_not_list_are_refused(tmp_path, bandit_export, name):
    import pickle

    folder = copy_export(bandit_export, tmp_path / "c")
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(ControllerError, match="does not list"):
        Controller.from_pretrained(folder)
    (folder / name).unlink()
    Controller.from_pretrained(folder)  # the same folder without it loads


def test_card_naming_files_outside_the_folder_is_refused(tmp_path, bandit_export):
    folder = copy_export(bandit_export, tmp_path / "c")
    card = json.loads((folder / CARD_FILE).read_text())
    card["files"]["../outside.onnx"] = {"sha256": "0" * 64, "bytes": 1}
    card["card_sha256"] = card_digest(card)
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ControllerError, match="not a file inside the folder"):
        Controller.from_pretrained(folder)


def test_leftover_temporary_export_folders_are_cleaned(tmp_path, slm, cost_path):
    """A killed export leaves `.ctl.tmp-<pid>-…`; the next export to the same place removes it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    left = tmp_path / f".ctl.tmp-{pid}-deadbeef"
    left.mkdir()
    (left / "model.onnx").write_bytes(b"half")
    mine = tmp_path / f".ctl.tmp-{os.getpid()}-cafecafe"  # a live writer's folder stays
    mine.mkdir()
    export_bandit_to(tmp_path / "ctl", slm, cost_path)
    assert not left.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ctl", mine.name])


# ------------------------------------------------------------------------------------------ kills
EXPORT_SCRIPT = """
import json, sys
import numpy as np
from agents.bandit import BanditController
from agents.export import export_bandit
from envs.base import shared_lm
cfg = json.load(open(sys.argv[1]))
rng = np.random.default_rng(0)
ctl = BanditController(10, {obs}, seed=0)
ctl.fit(rng.standard_normal((50, {obs})), rng.integers(0, 10, 50), rng.standard_normal(50))
slm = shared_lm("tiny-llama")
print("ready", flush=True)
export_bandit(ctl, sys.argv[2], env_config=cfg, slm=slm, force=True)
print("done", flush=True)
"""


def _export_then_kill(cfg_path: Path, out: Path, delay: float) -> bool:
    """Run an export in a subprocess and SIGKILL it ``delay`` s after it starts writing; whether it finished."""
    import signal
    import time

    code = EXPORT_SCRIPT.format(obs=OBS_DIM)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", code, str(cfg_path), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait(timeout=30)
    return "done" in rest


@pytest.mark.slow
def test_kill_minus_nine_during_export_never_leaves_a_loadable_half_export(tmp_path, slm, cost_path):
    """SIGKILL at random points of an export (seeded): the target is the old export, the new one, or absent."""
    rng = np.random.default_rng(7)
    cfg_path = tmp_path / "env_config.json"
    cfg_path.write_text(json.dumps(env_config(PER_INPUT_D, cost_path, **PROBE)))
    out = tmp_path / "ctl"
    kills = finished = 0
    for _ in range(8):
        done = _export_then_kill(cfg_path, out, float(rng.uniform(0.0, 1.5)))
        kills += not done
        finished += done
        if out.exists():
            Controller.from_pretrained(out, slm)  # whatever is there under the name is a whole export
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ctl.")]
        assert len(leftovers) <= 1  # at most the dead writer's own temporary folder, until the next export
    export_bandit_to(out, slm, cost_path, force=True)  # the next export cleans up after the dead ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctl", "env_config.json"]
    assert kills >= 3, f"only {kills} of 8 runs were killed before finishing; lower the delays"
    print(f"export kills: {kills} killed, {finished} finished")


def test_card_records_the_split_training_really_used(tmp_path, cost_path):
    """conf/env/tiny.yaml says split: val; training overrides it with train_split: the card says train."""
    from hydra import compose, initialize_config_dir

    from agents.export import export_from_path
    from experiments.train import CONF_DIR, train

    run = tmp_path / "run"
    overrides = ["env=tiny", "env.id=PruneGym/PerInputDiscrete-v0", "algo=linucb", "stop.iterations=1"]
    overrides += ["eval.episodes=2", f"run_dir={run}", f"+env.kwargs.cost_model={cost_path}"]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    assert cfg.env.kwargs.split == "val" and cfg.train_split == "train"
    train(cfg)
    described = json.loads((run / "env_config.json").read_text())
    assert described["data"]["split"] == "train"
    out = export_from_path(run, tmp_path / "ctl")
    card = json.loads((out / CARD_FILE).read_text())
    assert card["env"]["data"]["split"] == "train" and card["interface"] == described["interface"]
