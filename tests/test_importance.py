"""The importance cache: keyed by the weights and the calibration text, found again from a read-only model folder."""

from __future__ import annotations

import pytest

import envs.runtime.importance as importance
from envs.runtime.models import CharTokenizer, tiny_model
from envs.runtime.sparse_lm import SparseLM


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Calibrations run, counted; the importance cache root under tmp_path (the data cache stays where it is)."""
    import envs.data.corpus  # noqa: F401  (binds the real cache root for the data before the patch)
    import envs.data.files as files

    monkeypatch.setattr(files, "cache_root", lambda: tmp_path / "cache")
    calls = {"n": 0}
    real = importance.calibrate

    def calibrate(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(importance, "calibrate", calibrate)
    text = importance.calibration_text
    monkeypatch.setattr(importance, "calibration_text", lambda *a, **k: text(4, 32))  # a short calibration
    return calls


def tiny(cache_dir) -> SparseLM:
    return SparseLM(tiny_model("llama", seed=0), tokenizer=CharTokenizer(), name="tiny-llama", cache_dir=cache_dir)


def test_cache_is_keyed_by_weights_and_calibration_text(counted, tmp_path, monkeypatch):
    slm = tiny(tmp_path / "model")
    first = importance.load_or_calibrate(slm)
    again = importance.load_or_calibrate(tiny(tmp_path / "model"))
    assert counted["n"] == 1 and again.layer_order == first.layer_order  # found, not recalibrated
    docs, text_id = importance.calibration_text()
    monkeypatch.setattr(importance, "calibration_text", lambda *a, **k: (docs[:8], text_id + "-other"))
    importance.load_or_calibrate(tiny(tmp_path / "model"))
    assert counted["n"] == 2  # other calibration text: another cache entry
    other = SparseLM(
        tiny_model("llama", seed=1), tokenizer=CharTokenizer(), name="tiny-llama", cache_dir=tmp_path / "m"
    )
    importance.load_or_calibrate(other)
    assert counted["n"] == 3  # other weights too
    assert len(list((tmp_path / "model").glob("importance-*.json"))) == 2


def test_read_only_model_folder_is_cached_under_the_root_and_found_again(counted, tmp_path):
    blocker = tmp_path / "readonly"
    blocker.write_text("a file where the model folder would be: nothing can be written below it")
    importance.load_or_calibrate(tiny(blocker))
    importance.load_or_calibrate(tiny(blocker))
    assert counted["n"] == 1
    assert len(list((tmp_path / "cache" / "importance").glob("importance-*.json"))) == 1


def test_pinned_orderings_of_a_prepared_model_win(counted, tmp_path):
    slm = tiny(tmp_path / "model")
    imp = importance.Importance.identity(slm.spec)
    imp.layer_order = list(reversed(imp.layer_order))
    imp.save(tmp_path / "model" / f"importance-{slm.weights_hash}.json")
    assert importance.load_or_calibrate(slm).layer_order == imp.layer_order
    assert counted["n"] == 0
