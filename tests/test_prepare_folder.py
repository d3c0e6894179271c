"""The prepared folder: written atomically, loaded by name with its tokenizer, leftovers of killed writers tidied."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from envs.runtime.importance import Importance
from envs.runtime.models import CHAR_TOKENIZER_FILE, CharTokenizer, UnknownModelError, load_model, tiny_model
from envs.runtime.sparse_lm import SparseLM
from experiments.prepare import prepare
from tests.test_prepare import BASE, _peaked_tiny, _tokens


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path))
    return tmp_path


def _prepare(name: str, slm: SparseLM | None = None, steps: int = 2) -> dict:
    cfg = {**BASE, "max_steps": steps, "name": name, "checkpoint_every": 0, "eval_plans": 1}
    return prepare(cfg, slm=slm or _peaked_tiny(), train_sequences=_tokens(8, 0), eval_sequences=_tokens(2, 9))


def _dead_pid() -> int:
    """The id of a process that has exited (a writer killed mid-write)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_char_tokenizer_saves_and_loads_back(tmp_path):
    tok = CharTokenizer()
    written = tok.save_pretrained(tmp_path)
    assert written == (str(tmp_path / CHAR_TOKENIZER_FILE),)
    back = CharTokenizer.from_pretrained(tmp_path)
    text = "Q: 2 + 3 =\nA: 5 ~ é"
    assert back.encode(text) == tok.encode(text) and back.decode(back.encode("ab\ncd")) == "ab\ncd"
    assert (back.eos_token_id, back.pad_token_id, back.vocab_size) == (95, 95, 96)
    (tmp_path / CHAR_TOKENIZER_FILE).write_text(json.dumps({**tok.to_dict(), "vocab_size": 120}))
    with pytest.raises(ValueError, match="prepare the model again"):
        CharTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="character tokenizer"):
        CharTokenizer.from_pretrained(tmp_path / "elsewhere")


def test_a_prepared_tiny_model_loads_by_name_with_its_tokenizer_and_logits(cache):
    slm = SparseLM(tiny_model("llama", seed=0), CharTokenizer(), name="tiny-llama")
    slm.set_importance(_peaked_tiny().importance)
    card = _prepare("tiny-tok", slm=slm)
    loaded = load_model("tiny-tok")
    assert isinstance(loaded.tokenizer, CharTokenizer)
    again = SparseLM.from_pretrained("tiny-tok")
    assert again.weights_hash == card["weights_hash"] and again.importance.head_order == slm.importance.head_order
    ids = torch.tensor([again.tokenizer.encode("The cat sat on the mat.\n")])
    for plan in (None, slm.uniform_plan(mlp=0.5, heads=0.5)):
        assert torch.allclose(again.forward(ids, plan).logits, slm.forward(ids, plan).logits, atol=1e-6)


def test_a_failure_while_writing_leaves_no_folder_under_the_name_and_a_rerun_succeeds(cache, monkeypatch):
    real_save = Importance.save

    def disk_full(self, path):  # after config.json and the weights are written
        assert (path.parent / "config.json").is_file() and (path.parent / "model.safetensors").is_file()
        raise OSError("No space left on device")

    monkeypatch.setattr(Importance, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _prepare("half")
    with pytest.raises(UnknownModelError):
        load_model("half")
    assert not [p.name for p in (cache / "prepared").iterdir() if "half" in p.name]  # not even a temporary
    monkeypatch.setattr(Importance, "save", real_save)
    card = _prepare("half")
    assert SparseLM.from_pretrained("half").weights_hash == card["weights_hash"]

    # A failed rewrite keeps the complete previous folder under the name.
    monkeypatch.setattr(Importance, "save", disk_full)
    with pytest.raises(OSError):
        _prepare("half", steps=4)
    assert SparseLM.from_pretrained("half").weights_hash == card["weights_hash"]
    assert [p.name for p in (cache / "prepared").iterdir()] == ["half"]


def test_loading_by_name_tidies_what_a_killed_writer_left(cache):
    card = _prepare("kept")
    prepared = cache / "prepared"
    pid = _dead_pid()
    # Killed while writing "new": its temporary folder, with a truncated config.json, never loads.
    half = prepared / f".new.tmp-{pid}-0badc0de"
    half.mkdir()
    (half / "config.json").write_text('{"architectures": ["Llama')
    with pytest.raises(UnknownModelError):
        load_model("new")
    assert not half.exists()
    # Killed between moving "kept" aside and moving its replacement in: the complete old one is put back.
    moved = prepared / f".kept.old-{pid}-0badc0de"
    (prepared / "kept").rename(moved)
    assert SparseLM.from_pretrained("kept").weights_hash == card["weights_hash"]
    assert not moved.exists() and (prepared / "kept" / "card.json").is_file()


def test_a_half_written_folder_from_before_atomic_writes_is_refused(cache):
    _prepare("legacy")
    folder = cache / "prepared" / "legacy"
    (folder / "card.json").unlink()  # the old writer wrote card.json last
    (folder / "config.json").write_text('{"model_type": "lla')
    with pytest.raises(FileNotFoundError, match=r"incomplete.*experiments.prepare name=legacy"):
        load_model("legacy")
    shutil.rmtree(folder)
    with pytest.raises(UnknownModelError):
        load_model("legacy")
