"""The leaderboard and the shipped controllers: every entry is consistent, loads, and (slow) holds live."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from agents.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
ROWS = list(csv.DictReader(open(ROOT / "leaderboard" / "results.csv", newline="")))


def test_every_shipped_controller_loads_and_verifies():
    folders = sorted(p for p in (ROOT / "controllers").iterdir() if p.is_dir())
    assert folders
    for folder in folders:
        ctl = Controller.from_pretrained(folder)  # card hash, file hashes, no stray file
        assert ctl.card["metrics"].get("claims"), f"{folder.name} ships without claims"


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_entry_matches_its_controller_and_recording(row):
    ctl = Controller.from_pretrained(ROOT / row["controller"])
    claims = ctl.card["metrics"]["claims"]
    for key in ("accuracy", "accuracy_raw", "latency_fraction", "flops_fraction"):
        assert float(row[key]) == pytest.approx(claims[key], abs=5e-5), key
    assert int(row["inputs"]) == claims["inputs"] and row["split"] == claims["split"]
    recording = ROOT / row["dataset"] / row["split"] / "card.json"
    if not recording.is_file():
        recording = ROOT / row["dataset"] / "card.json"
    card = json.loads(recording.read_text())
    assert card["env"]["model"]["weights_hash"] == ctl.weights_hash
    assert card["env"]["interface"] == ctl.card["interface"]
    assert (ROOT / "leaderboard" / "entries" / f"{row['name']}.md").is_file()
    assert row["env"] == ctl.env_id and row["model"] == ctl.model_id


@pytest.mark.slow
@pytest.mark.parametrize("row", [r for r in ROWS if r["model"] != "tiny-llama"], ids=lambda r: r["name"])
def test_embedded_entries_hold_live(row):
    from envs.data.corpus import data_root
    from experiments.validate import main

    bigbench = (data_root() / "bigbench" / "metadata.json").is_file()  # written once the task files are extracted
    if "mc-bigbench" in (ROOT / row["controller"] / "card.json").read_text() and not bigbench:
        pytest.skip("recorded on mc-bigbench, whose BIG-bench task files this data cache lacks (README: data)")
    assert main(["--leaderboard", str(ROOT / "leaderboard" / "results.csv"), "--only", row["name"]]) == 0


def test_controllers_readme_lists_every_folder_with_its_claims():
    text = (ROOT / "controllers" / "README.md").read_text()
    for folder in sorted(p for p in (ROOT / "controllers").iterdir() if p.is_dir()):
        claims = Controller.from_pretrained(folder).card["metrics"]["claims"]
        row = next((line for line in text.splitlines() if line.startswith(f"| `{folder.name}` |")), None)
        assert row is not None, f"controllers/README.md does not list {folder.name}"
        assert f"{claims['accuracy']:.3f} / {claims['latency_fraction']:.3f} on {claims['inputs']} " in row
