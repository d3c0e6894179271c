"""Checkpoints of a preparation survive a kill at any point: a resume then equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import envs.distill.training as training
from envs.distill.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from envs.distill.config import PrepareConfig
from envs.runtime.models import load_model
from experiments.prepare import prepare
from experiments.report import REPO_ROOT
from tests.test_prepare import BASE, SEQ, _peaked_tiny, _state, _tokens


class Killed(BaseException):
    """The process died here (a BaseException, so that no ``except Exception`` can swallow it)."""


class Crash:
    """Counts the file-system effects of one checkpoint save and, when asked, dies at the ``kill_at``-th.

    After the death every hooked effect is skipped, including the clean-up that exception handlers
    would run, so the disk is left as a ``kill -9`` at that instant would leave it.
    """

    HOOKS = (
        (os, "replace"),
        (os, "rename"),
        (shutil, "rmtree"),
        (safetensors.torch, "save_file"),
        *((Path, m) for m in ("mkdir", "write_text", "write_bytes", "rename", "replace", "unlink", "rmdir")),
    )

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target_step: int) -> None:
        self.target_step, self.kill_at = target_step, None
        self.armed = self.dead = False
        self.calls = 0
        for owner, name in self.HOOKS:
            monkeypatch.setattr(owner, name, self._hook(getattr(owner, name)))
        real_save = training.save_checkpoint

        def save(folder, *, step, **kwargs):
            self.armed = step == self.target_step
            try:
                return real_save(folder, step=step, **kwargs)
            finally:
                self.armed = False

        monkeypatch.setattr(training, "save_checkpoint", save)

    def _hook(self, real):
        def hooked(*args, **kwargs):
            if not self.armed:
                return real(*args, **kwargs)
            if self.dead:
                return None
            self.calls += 1
            if self.calls == self.kill_at:
                self.dead = True
                raise Killed
            return real(*args, **kwargs)

        return hooked

    def reset(self, kill_at: int | None) -> None:
        self.kill_at, self.calls, self.dead = kill_at, 0, False


CFG = PrepareConfig.from_dict(
    {
        "method": "lora",
        "seq_len": SEQ,
        "batch_size": 2,
        "lr": 3e-3,
        "warmup_steps": 0,
        "max_steps": 4,
        "checkpoint_every": 1,
        "eval_plans": 1,
        "plan": {"families": ["mlp", "kv"], "mlp_levels": [0.5]},
    }
)
TRAIN, HELD = _tokens(16, 0), _tokens(2, 9)


def _run(ck: Path, resume: bool = False):
    slm = _peaked_tiny()
    result = training.prepare_model(slm, TRAIN, HELD, CFG, checkpoint_dir=ck, resume=resume, progress=False)
    return slm, result


@pytest.fixture
def one_thread():
    """One intra-op thread, as the preparations under test use (``threads=1``): tiny forwards only lose from more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_an_interruption_at_every_point_of_a_save_resumes_from_a_complete_checkpoint(tmp_path, monkeypatch, one_thread):
    crash = Crash(monkeypatch, target_step=3)  # step 1 and 2 are saved; saving 3 also prunes step 1
    crash.reset(None)
    straight, _ = _run(tmp_path / "straight")
    effects = crash.calls
    assert effects >= 6  # three files, the folder's rename, the pointer's write and rename, the pruning
    want = _state(straight)
    starts = set()
    for k in range(1, effects + 1):
        ck = tmp_path / f"ck{k}"
        crash.reset(k)
        with pytest.raises(Killed):
            _run(ck)
        crash.reset(None)
        found = latest_checkpoint(ck)
        assert found is not None and json.loads((found / "state.json").read_text())["step"] in (2, 3), k
        resumed, result = _run(ck, resume=True)
        starts.add(result.start_step)
        assert result.start_step in (2, 3) and result.steps == 4, k
        got = _state(resumed)
        assert set(got) == set(want) and all(torch.allclose(got[n], want[n], rtol=0, atol=1e-6) for n in want), k
    assert starts == {2, 3}  # killed before the pointer moved, and after


def test_the_newest_complete_checkpoints_are_kept_and_read(tmp_path):
    slm = _peaked_tiny()
    opt = torch.optim.AdamW(list(slm.model.parameters()), lr=1e-3)
    params = {"w": torch.arange(4.0)}
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step=step, params={"w": params["w"] * step}, optimizer=opt, state={"seed": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_000004", "step_000006"]
    got, _, state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and torch.equal(got["w"], params["w"] * 6)
    # A checkpoint folder that no pointer names (a save killed before the pointer moved) is never read.
    shutil.copytree(tmp_path / "step_000006", tmp_path / "step_000008")
    assert load_checkpoint(tmp_path)[2]["step"] == 6


def test_leftovers_of_dead_writers_are_tidied_and_the_flat_layout_still_loads(tmp_path):
    slm = _peaked_tiny()
    opt = torch.optim.AdamW(list(slm.model.parameters()), lr=1e-3)
    save_checkpoint(tmp_path / "ck", step=5, params={"w": torch.ones(3)}, optimizer=opt, state={"seed": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = tmp_path / "ck" / f".step_000006.tmp-{dead.pid}-0badc0de"
    half.mkdir()
    (half / "state.json").write_text('{"step": 6, "ver')
    pointer = tmp_path / "ck" / f".latest.json.tmp-{dead.pid}-0badc0de"
    pointer.write_text('{"folder": "step_00')
    assert load_checkpoint(tmp_path / "ck")[2]["step"] == 5
    assert not half.exists() and not pointer.exists()
    # A directory of the layout before numbered checkpoints (files directly in it) resumes as well.
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "ck" / "step_000005", flat)
    assert load_checkpoint(flat)[2]["step"] == 5


# ---------------------------------------------------------------------------------------- a real kill -9
DRIVER = """
import json, sys
import envs.distill.training as training
import experiments.prepare as entry
from tests.test_prepare import _peaked_tiny, _tokens

real_batch, real_write = training.batch_for_step, entry.write_prepared

def batch(sequences, seed, step, batch_size):
    print(f"step {step}", flush=True)  # step `step` starts: `step` steps are done
    return real_batch(sequences, seed, step, batch_size)

def write(*args, **kwargs):
    print("writing", flush=True)
    return real_write(*args, **kwargs)

training.batch_for_step, entry.write_prepared = batch, write
entry.prepare(json.loads(sys.argv[1]), slm=_peaked_tiny(), train_sequences=_tokens(16, 0), eval_sequences=_tokens(2, 9))
print("done", flush=True)
"""
KILL_CFG = {
    **BASE,
    "method": "lora",
    "dense_weights": "original",
    "batch_size": 2,
    "lr": 3e-3,
    "max_steps": 12,
    "checkpoint_every": 2,
    "eval_plans": 1,
    "plan": {"families": ["mlp", "kv"], "mlp_levels": [0.5]},
}


def _killed_run(cfg: dict, cache: Path, trigger: str, delay: float) -> int:
    """Run a preparation in a subprocess and ``kill -9`` it ``delay`` s after it printed ``trigger``.

    Returns:
        The last step it reported starting (that many steps were done, or one more).
    """
    env = {**os.environ, "PRUNEGYM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    errors = cache.parent / f"{cfg['name']}.stderr"
    with open(errors, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(cfg)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    last: int | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
            if line.strip() == trigger:
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                break
        rest = proc.stdout.read()  # what it printed before the kill landed
        for line in rest.splitlines():
            if line.startswith("step "):
                last = int(line.split()[1])
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert last is not None, f"the run never trained: {errors.read_text()[-2000:]}"
    return last


@pytest.mark.slow
def test_a_kill_9_at_a_random_point_loses_at_most_one_checkpoint_interval(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNEGYM_CACHE", str(cache))
    straight = _peaked_tiny()
    card = prepare(
        {**KILL_CFG, "name": "straight", "checkpoint_dir": str(tmp_path / "ck-straight")},
        slm=straight,
        train_sequences=_tokens(16, 0),
        eval_sequences=_tokens(2, 9),
    )
    want, every, total = _state(straight), KILL_CFG["checkpoint_every"], KILL_CFG["max_steps"]
    rng = np.random.default_rng(2024)
    # After a step starts, a delay of up to a few steps (training or saving); after writing starts, a few ms.
    kills = [(f"step {int(rng.integers(every, total - 2))}", float(rng.uniform(0.0, 0.2))) for _ in range(2)]
    kills.append(("writing", float(rng.uniform(0.0, 0.03))))
    for n, (trigger, delay) in enumerate(kills):
        name, ck = f"killed{n}", tmp_path / f"ck{n}"
        cfg = {**KILL_CFG, "name": name, "checkpoint_dir": str(ck)}
        last = _killed_run(cfg, cache, trigger, delay)
        assert last >= every, trigger
        # Under its name there is nothing, or the complete result: never a half-written folder that loads.
        folder = cache / "prepared" / name
        if folder.exists():
            loaded = load_model(name).model.state_dict()
            assert json.loads((folder / "card.json").read_text())["weights_hash"] == card["weights_hash"]
            assert all(torch.equal(loaded[k], want[k]) for k in loaded)
        resumed = _peaked_tiny()
        again = prepare(
            {**cfg, "resume": True}, slm=resumed, train_sequences=_tokens(16, 0), eval_sequences=_tokens(2, 9)
        )
        done_at_kill = total if trigger == "writing" else last + 1  # at most
        assert again["start_step"] >= done_at_kill - every, (trigger, last, again["start_step"])
        assert again["steps"] == total and again["weights_hash"] == card["weights_hash"]
        got = _state(resumed)
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), trigger
        assert [p.name for p in (cache / "prepared").iterdir() if name in p.name] == [name]  # leftovers tidied
