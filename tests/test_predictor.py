"""The low-rank MLP channel predictor (envs.runtime.predictor) and its entry point (experiments.predictor)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from envs.runtime.models import CharTokenizer, tiny_model
from envs.runtime.predictor import (
    PREDICTOR_FORMAT,
    PREDICTOR_VERSION,
    ChannelPredictor,
    document_sha256,
    load_predictor,
    predictor_folder,
    recall,
    save_predictor,
    train_predictor,
)
from envs.runtime.sparse_lm import SparseLM

REAL_DATA = Path(os.environ.get("PRUNEGYM_CACHE", Path.home() / ".cache" / "prunegym")) / "data"


def _tokens(seed: int, n: int, length: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (length,), generator=g) for _ in range(n)]


@pytest.fixture
def trained(tiny_llama, one_thread) -> ChannelPredictor:
    return train_predictor(tiny_llama, _tokens(0, 16), rank=8, progress=False, max_tokens=1024)


@pytest.fixture
def news():
    """The natural-text corpus (train, val, test); skipped where the data cache is not built, except on CI."""
    from envs.data.corpus import natural_text

    try:
        return {s: natural_text(s) for s in ("train", "val", "test")}
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"natural-text cache not built: {exc}")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache root that shares the real data cache (the text the entry point trains on)."""
    root = tmp_path / "cache"
    root.mkdir()
    if REAL_DATA.is_dir():
        (root / "data").symlink_to(REAL_DATA.resolve(), target_is_directory=True)
    monkeypatch.setenv("PRUNEGYM_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------------- training and recall
def test_trained_predictor_beats_a_random_ranking_on_held_out_tokens(tiny_llama, trained):
    s = tiny_llama.spec
    assert trained.num_layers == s.num_layers and trained.rank == 8
    assert all(tuple(a.shape) == (8, s.hidden_size) for a in trained.a)
    assert all(tuple(b.shape) == (s.intermediate_size, 8) for b in trained.b)
    x = torch.randn(2, 3, s.hidden_size)
    assert tuple(trained.scores(1, x).shape) == (2, 3, s.intermediate_size)
    assert trained.flops_per_token() == 2 * (s.hidden_size * 8 + 8 * s.intermediate_size)

    held_out = _tokens(1, 6)  # other random text than the training tokens
    got = recall(trained, tiny_llama, held_out)
    assert set(got) == {0.75, 0.5, 0.25}
    assert got[0.5] > 0.5 + 0.05, got
    assert got[0.75] > 0.75 + 0.02 and got[0.25] > 0.25 + 0.08, got
    # The recall measure itself: random maps score about the keep fraction.
    g = torch.Generator().manual_seed(3)
    rand = ChannelPredictor(
        [torch.randn(a.shape, generator=g) for a in trained.a], [torch.randn(b.shape, generator=g) for b in trained.b]
    )
    base = recall(rand, tiny_llama, held_out)
    assert all(abs(base[f] - f) < 0.05 for f in base), base


def test_training_is_deterministic_given_the_seed(tiny_llama, trained):
    again = train_predictor(tiny_llama, _tokens(0, 16), rank=8, progress=False, max_tokens=1024)
    assert all(torch.equal(x, y) for x, y in zip(trained.a + trained.b, again.a + again.b, strict=True))
    card = trained.card
    assert card["format"] == PREDICTOR_FORMAT and card["version"] == PREDICTOR_VERSION
    assert card["model"] == {
        "name": "tiny-llama",
        "family": "llama",
        "weights_hash": tiny_llama.weights_hash,
        "spec": tiny_llama.spec.to_dict(),
    }
    assert card["training"]["tokens"] == 1024 and card["training"]["seed"] == 0
    assert card["training"]["documents_sha256"] is None  # token sequences: no documents to list


def test_bad_settings_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="rank=0"):
        train_predictor(tiny_llama, _tokens(0, 2), rank=0, progress=False)
    with pytest.raises(ValueError, match="exceeds min"):
        train_predictor(tiny_llama, _tokens(0, 2), rank=33, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        train_predictor(tiny_llama, _tokens(0, 2), rank=4, max_tokens=-1, progress=False)


# ---------------------------------------------------------------------------------------- files
def test_save_load_round_trip_and_refusals(tiny_llama, trained, cache):
    folder = save_predictor(trained, predictor_folder("tiny-r8"))
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "predictor.safetensors"]
    assert not list(folder.parent.glob(".*"))  # written atomically: no temporary left
    card = json.loads((folder / "card.json").read_text())
    assert card["card_sha256"] and card["files"]["predictor.safetensors"]["sha256"]

    x = torch.randn(5, tiny_llama.spec.hidden_size)
    for ref in ("tiny-r8", folder, str(folder)):  # by name, by Path, by path string
        back = load_predictor(ref, tiny_llama)
        assert all(torch.equal(back.scores(i, x), trained.scores(i, x)) for i in range(back.num_layers))
    assert back.card == card

    with pytest.raises(FileExistsError):
        save_predictor(trained, folder)

    def broken(tag: str) -> Path:
        copy = folder.parent / tag
        shutil.copytree(folder, copy)
        return copy

    bad = broken("tensors")
    data = bytearray((bad / "predictor.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "predictor.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"predictor\.safetensors does not match its card.*sha256"):
        load_predictor(bad, tiny_llama)

    bad = broken("card")
    edited = json.loads((bad / "card.json").read_text())
    edited["training"]["tokens"] = 10**6
    (bad / "card.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"modified after it was written.*card_sha256"):
        load_predictor(bad, tiny_llama)

    bad = broken("stray")
    (bad / "extra.pkl").write_bytes(b"x")
    with pytest.raises(ValueError, match="does not list"):
        load_predictor(bad, tiny_llama)

    other = SparseLM(tiny_model("llama", seed=1), name="tiny-llama")
    with pytest.raises(
        ValueError, match=r"weights hash.*python -m experiments\.predictor model=tiny-llama name=tiny-r8"
    ):
        load_predictor("tiny-r8", other)

    with pytest.raises(ValueError, match=r"no channel predictor at .*python -m experiments\.predictor"):
        load_predictor("never-built", tiny_llama)
    (cache / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no card.json"):
        load_predictor(cache / "empty", tiny_llama)


def test_wrong_version_shape_and_tensors_are_refused(tiny_llama, trained, tmp_path):
    from safetensors.torch import save_file

    from envs.data.files import card_digest, sha256_file

    def variant(tag: str, card_edit=None, tensors=None) -> Path:
        folder = save_predictor(trained, tmp_path / tag)
        card = json.loads((folder / "card.json").read_text())
        if tensors is not None:
            save_file(tensors, str(folder / "predictor.safetensors"))
            card["files"]["predictor.safetensors"]["sha256"] = sha256_file(folder / "predictor.safetensors")
        if card_edit is not None:
            card_edit(card)
        card["card_sha256"] = card_digest(card)  # a card that verifies: only its content is wrong
        (folder / "card.json").write_text(json.dumps(card))
        return folder

    with pytest.raises(ValueError, match="format version 99"):
        load_predictor(variant("version", lambda c: c.update(version=99)), tiny_llama)
    with pytest.raises(ValueError, match="not a channel predictor card"):
        load_predictor(variant("format", lambda c: c.update(format="prunegym-controller")), tiny_llama)
    with pytest.raises(ValueError, match="model shape"):
        load_predictor(variant("spec", lambda c: c["model"]["spec"].update(num_layers=9)), tiny_llama)
    tensors = trained.tensors()
    tensors["2.b"] = tensors["2.b"][:, :4].contiguous()
    with pytest.raises(ValueError, match=r"tensor '2\.b'"):
        load_predictor(variant("shape", tensors=tensors), tiny_llama)
    del tensors["3.a"]
    with pytest.raises(ValueError, match=r"lacks tensors \['3\.a'\]"):
        load_predictor(variant("missing", tensors=tensors), tiny_llama)


# ---------------------------------------------------------------------------------------- training text
def test_card_lists_train_split_documents_only(news, one_thread):
    from envs.data.corpus import split_of

    slm = SparseLM(tiny_model("llama", seed=0), CharTokenizer(), name="tiny-llama")
    pred = train_predictor(
        slm,
        news["train"],
        rank=4,
        epochs=1,
        progress=False,
        max_tokens=1024,
        max_len=128,
        val_sequences=news["val"][:2],
    )
    tr = pred.card["training"]
    hashes = tr["documents_sha256"]
    assert tr["split"] == "train" and tr["documents"] == len(hashes) == 8 and hashes == sorted(hashes)
    train = {document_sha256(d) for d in news["train"]}
    held = {document_sha256(d) for d in news["val"] + news["test"]}
    assert set(hashes) <= train and not set(hashes) & held
    by_hash = {document_sha256(d): d for docs in news.values() for d in docs}
    assert all(split_of(by_hash[h]) == "train" for h in hashes)
    assert pred.card["recall"]["splits"] == ["val"]
    # A val or test document among the training text is refused, never trained on.
    for split in ("val", "test"):
        with pytest.raises(ValueError, match=f"in the {split} split"):
            train_predictor(slm, news["train"][:2] + news[split][:1], rank=4, progress=False, max_tokens=10**6)


# ---------------------------------------------------------------------------------------- entry point
def _no_model_load(monkeypatch):
    import experiments.prepare

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(experiments.prepare, "load_base", refuse)
    monkeypatch.setattr(SparseLM, "from_pretrained", refuse)


def test_entry_point_refuses_bad_settings_before_loading(monkeypatch, tmp_path, cache):
    from experiments.predictor import train_and_save

    _no_model_load(monkeypatch)
    base = {"model": "tiny-llama", "out": str(tmp_path / "p")}
    for over, key in (
        ({"rank": 0}, "rank=0"),
        ({"max_tokens": -8}, "max_tokens=-8"),
        ({"val_tokens": -1}, "val_tokens=-1"),
        ({"epochs": -1}, "epochs=-1"),
        ({"lr": 0}, "lr=0"),
        ({"rank": "big"}, "rank='big'"),
        ({"ranks": 4}, "unknown predictor settings"),
        ({"name": "a/b", "out": None}, "plain folder name"),
        ({"model": ""}, "must name a model"),
    ):
        with pytest.raises(ValueError, match=key):
            train_and_save({**base, **over})
    (tmp_path / "p").mkdir()
    with pytest.raises(FileExistsError, match="force=true"):
        train_and_save(base)


def test_config_file_matches_the_defaults():
    from hydra import compose, initialize_config_dir

    from experiments.predictor import SETTINGS, check_settings
    from experiments.prepare import model_overrides
    from experiments.report import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose("predictor")
        tiny = compose("predictor", overrides=model_overrides(["model=tiny-llama", "rank=8"]))
    assert check_settings(cfg) == {**SETTINGS, "name": "smollm2-135m-r64"}
    run = check_settings(tiny)
    assert run["model"] == "tiny-llama" and run["name"] == "tiny-llama-r8"


def test_entry_point_trains_and_saves_a_tiny_model(news, cache, tmp_path, capsys):
    from experiments.predictor import train_and_save

    out = tmp_path / "pred"
    card = train_and_save(
        {
            "model": "tiny_llama",  # a conf/model option, as Hydra passes it from model=tiny_llama
            "rank": 4,
            "max_tokens": 1024,
            "max_len": 128,
            "val_tokens": 256,
            "epochs": 1,
            "threads": 1,
            "progress": False,
            "out": str(out),
        }
    )
    assert card["folder"] == str(out.resolve()) and card["name"] == "tiny-llama-r4"
    printed = capsys.readouterr().out
    assert "keep fraction" in printed and "of one dense layer's decode FLOPs" in printed
    rec = card["recall"]
    assert rec["splits"] == ["val"] and rec["tokens"] == 256
    assert all(r > float(f) for f, r in rec["fractions"].items()), rec
    slm = SparseLM.from_pretrained("tiny-llama")
    back = load_predictor(out, slm)
    assert back.rank == 4 and back.card["training"]["split"] == "train"
    assert set(back.card["training"]["documents_sha256"]) <= {document_sha256(d) for d in news["train"]}
