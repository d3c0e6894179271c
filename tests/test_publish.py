"""Publishing exported controllers: the dry run writes exactly what would be uploaded; pickles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from agents.controller import CARD_FILE, sha256_file
from experiments.publish import PublishError, is_pickle, main, publish
from tests.test_export import export_bandit_to


@pytest.fixture(scope="module")
def export(tmp_path_factory, cost_path) -> Path:
    from envs.base import shared_lm

    return export_bandit_to(tmp_path_factory.mktemp("pub") / "ctl", shared_lm("tiny-llama"), cost_path)


def test_dry_run_writes_what_would_be_uploaded(tmp_path, export, capsys):
    out = tmp_path / "dry"
    assert main([str(export), "--repo-id", "someone/prunegym-linucb", "--dry-run", str(out)]) == 0
    record = json.loads((out / "upload.json").read_text())
    assert record["repo_id"] == "someone/prunegym-linucb" and record["dry_run"] is True
    assert "linucb" in record["commit_message"] and "PruneGym/PerInputDiscrete-v0" in record["commit_message"]
    names = sorted(f["path"] for f in record["files"])
    assert names == sorted(p.name for p in export.iterdir())
    for f in record["files"]:
        copy = out / "files" / f["path"]
        assert copy.stat().st_size == f["bytes"] and sha256_file(copy) == f["sha256"] == sha256_file(export / f["path"])
    assert "someone/prunegym-linucb: 4 files" in capsys.readouterr().out


def test_pickles_are_refused(tmp_path, export):
    folder = tmp_path / "ctl"
    shutil.copytree(export, folder)
    torch.save({"w": torch.zeros(2)}, folder / "extra.pt")
    assert is_pickle(folder / "extra.pt")
    assert not any(is_pickle(p) for p in export.iterdir())
    with pytest.raises(PublishError, match=r"extra.pt.*pickles"):
        publish(folder, "someone/x", dry_run=tmp_path / "dry")
    (folder / "extra.pt").unlink()
    (folder / "notes.bin").write_bytes(b"\x80\x04\x95" + b"\x00" * 16)
    with pytest.raises(PublishError, match="notes.bin"):
        publish(folder, "someone/x", dry_run=tmp_path / "dry2")
    assert not (tmp_path / "dry").exists() and not (tmp_path / "dry2").exists()


def test_tampered_or_invalid_folder_is_refused(tmp_path, export):
    folder = tmp_path / "ctl"
    shutil.copytree(export, folder)
    (folder / "README.md").write_text("changed")
    with pytest.raises(PublishError, match="README.md does not match"):
        publish(folder, "someone/x", dry_run=tmp_path / "dry")
    with pytest.raises(PublishError, match="user/name"):
        publish(export, "no-slash", dry_run=tmp_path / "dry3")
    card = json.loads((export / CARD_FILE).read_text())
    assert card["files"]  # the export lists its files with hashes


def test_no_token_gives_a_clear_error(export, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub must not be contacted without a token")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    with pytest.raises(PublishError, match="no Hugging Face token.*HF_TOKEN"):
        publish(export, "someone/x")


def test_pickles_are_recognised_by_content_in_every_protocol(tmp_path):
    import bz2
    import gzip
    import lzma
    import pickle
    import tarfile
    import zipfile

    payload = {"weights": [1.0, 2.0], "name": "x"}
    found = []
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(payload, protocol=proto)
        for i, wrap in enumerate((lambda d: d, gzip.compress, bz2.compress, lzma.compress)):
            path = tmp_path / f"notes-{proto}-{i}.txt"  # an innocent name: content decides
            path.write_bytes(wrap(data))
            found.append(is_pickle(path))
        with zipfile.ZipFile(tmp_path / f"bundle-{proto}.safetensors", "w") as zf:
            zf.writestr("archive/data.bin", data)
        found.append(is_pickle(tmp_path / f"bundle-{proto}.safetensors"))
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        tf.add(tmp_path / "notes-0-0.txt", arcname="inner")
    found.append(is_pickle(tmp_path / "t.tar"))
    assert all(found) and len(found) == 6 * 5 + 1
    for text, name in ((b'{"a": 1}', "c.json"), (b"# title\n\nbody.\n", "r.md"), (b"(not a pickle", "n.txt")):
        (tmp_path / name).write_bytes(text)
        assert not is_pickle(tmp_path / name)
