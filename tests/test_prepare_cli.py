"""``python -m experiments.prepare``: ``model=`` selects the base model, and a tiny model is prepared end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.prepare import model_name, model_options, model_overrides, output_name, split_config
from experiments.report import REPO_ROOT

REAL_DATA = Path(os.environ.get("PRUNEGYM_CACHE", Path.home() / ".cache" / "prunegym")) / "data"


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose("prepare", overrides=list(overrides))


def _cli(args: list[str], cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNEGYM_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.prepare", *args, f"hydra.run.dir={cache / 'hydra'}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cache(tmp_path) -> Path:
    """A private cache that shares the real data cache (the train split the tiny model trains on)."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "data").symlink_to(REAL_DATA, target_is_directory=True)
    return root


def test_model_group_options_and_names_both_select_the_base_model():
    assert model_options() == {
        "smollm2_135m": "smollm2-135m",
        "smollm2_135m_ready": "smollm2-135m-ready",
        "tiny_llama": "tiny-llama",
    }
    # The group option (Hydra composes conf/model/<option>.yaml) and the plain name give the same model.
    assert split_config(_compose("model=tiny_llama"))[0]["model"] == "tiny-llama"
    assert split_config(_compose(*model_overrides(["model=tiny-llama"])))[0]["model"] == "tiny-llama"
    assert split_config(_compose())[0]["model"] == "smollm2-135m"
    assert split_config(_compose(*model_overrides(["model=/data/my-model"])))[0]["model"] == "/data/my-model"
    # Python callers pass plain strings, names or options alike.
    assert model_name("tiny_llama") == "tiny-llama" and model_name("my-ready") == "my-ready"
    assert model_name({"name": "smollm2-135m"}) == "smollm2-135m"
    with pytest.raises(ValueError, match="prepare.model must name a model"):
        model_name(None)
    with pytest.raises(ValueError, match="only a name"):
        model_name({"name": "tiny-llama", "dtype": "bf16"})


def test_model_overrides_rewrite_only_names_that_are_no_option():
    args = ["model=tiny-llama", "max_steps=3", "model.name=x", "+model=y", "name=model=z"]
    assert model_overrides(args) == ["model.name=tiny-llama", "max_steps=3", "model.name=x", "+model=y", "name=model=z"]
    assert model_overrides(["model=tiny_llama"]) == ["model=tiny_llama"]  # left to Hydra's config group
    assert model_overrides(["model=tiny-llama,smollm2_135m"]) == ["model.name=tiny-llama,smollm2-135m"]  # multirun
    assert model_overrides(["model=choice(a,b)"]) == ["model=choice(a,b)"]


def test_the_default_output_name_is_a_plain_folder_name_for_any_base_model():
    assert output_name(None, "tiny-llama") == "tiny-llama-ready"
    assert output_name(None, "/data/my-model/") == "my-model-ready"
    assert output_name(None, "HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M-ready"
    assert output_name("mine", "/data/my-model") == "mine"
    for bad in ("a/b", ".hidden", "", 3):
        with pytest.raises(ValueError, match="plain folder name"):
            output_name(bad, "tiny-llama")
    with pytest.raises(ValueError, match="prepare.name"):  # refused before any model is loaded
        split_config(_compose("name=../elsewhere"))


def test_an_unknown_model_is_one_clear_line(tmp_path):
    done = _cli(["model=tiny-lama", "max_steps=1"], tmp_path)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "unknown model 'tiny-lama'" in lines[0] and "tiny_llama" in lines[0] and "tiny-llama" in lines[0]


def test_a_tiny_model_is_prepared_end_to_end_through_the_entry_point(cache, monkeypatch):
    from safetensors.torch import load_file

    from envs.runtime.models import CharTokenizer, load_model, tiny_model
    from envs.runtime.sparse_lm import SparseLM

    args = ["model=tiny-llama", "max_steps=3", "time_budget_min=1", "eval_docs=2", "eval_sequences=2"]
    done = _cli([*args, "name=tiny-e2e", "threads=1", "progress=false", "checkpoint_every=2"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = cache / "prepared" / "tiny-e2e"
    card = json.loads((folder / "card.json").read_text())
    assert card["base_model"] == "tiny-llama" and card["steps"] == 3 and card["stopped_by"] == "max_steps"
    assert "news train split" in card["data"]["train"] and card["data"]["train_tokens"] > 0  # natural text, train split
    assert (cache / "prepare-checkpoints" / "tiny-e2e" / "latest.json").is_file()

    monkeypatch.setenv("PRUNEGYM_CACHE", str(cache))  # load by name from that cache
    assert isinstance(load_model("tiny-e2e").tokenizer, CharTokenizer)
    slm = SparseLM.from_pretrained("tiny-e2e")
    assert slm.weights_hash == card["weights_hash"] and slm.adapted is not None
    # The same logits as the weights written: the model's own (dense plan) and the adapted set (pruned plans).
    ref = tiny_model("llama")
    missing, unexpected = ref.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the head is tied to the embedding
    ref.tie_weights()
    written = SparseLM(ref, CharTokenizer(), slm.importance)
    written.set_adapted(load_file(str(folder / "adapted.safetensors")))
    ids = torch.tensor([slm.tokenizer.encode("A tiny model reads natural text.\n")])
    for plan in (None, slm.uniform_plan(mlp=0.5, heads=0.5), slm.uniform_plan(layers=0.75)):
        assert torch.equal(slm.forward(ids, plan).logits, written.forward(ids, plan).logits)
