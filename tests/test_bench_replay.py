"""experiments.bench.replay on the tiny model's recordings: each section is made from what it measured."""

from __future__ import annotations

import json
import re

import pytest

from experiments.bench import replay as bench
from experiments.report import REPO_ROOT

TINY = "leaderboard/data/tiny-per-input"


def test_steps_section_times_replay_and_live_side_by_side(tmp_path):
    out = tmp_path / "B.md"
    bench.main(
        [
            "steps",
            "--dataset",
            TINY,
            "--rounds",
            "2",
            "--replay-steps",
            "300",
            "--live-steps",
            "2",
            "--output",
            str(out),
        ]
    )
    text = out.read_text()
    assert "## Replay: steps per second" in text and "--replay-steps 300" in text
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| (replay|live) \| (\d+) \| ([\d,.]+) \|", text, re.M)}
    assert rows["replay"][0] == "600" and rows["live"][0] == "4"  # steps timed: rounds x steps per round
    replay_rate, live_rate = (float(rows[k][1].replace(",", "")) for k in ("replay", "live"))
    assert replay_rate > live_rate > 0
    assert re.search(r"Replay is \*\*[\d,]+×\*\*", text)


def test_record_section_reports_a_fresh_recording_and_the_cards(tmp_path):
    out = tmp_path / "B.md"
    bench.main(["record", "--dataset", TINY, "--items", "1", "--output", str(out)])
    text = out.read_text()
    assert "inputs × actions per minute" in text
    cards = {s: json.loads((REPO_ROOT / TINY / s / "card.json").read_text()) for s in ("train", "test")}
    for split, card in cards.items():
        inputs = sum(len(s["inputs"]) for s in card["shards"])
        mb = sum(s["bytes"] for s in card["shards"]) / 1e6
        assert f"| {split} | {inputs}/{card['inputs_planned']} | {card['paths_per_input']} |" in text
        assert f"{mb:.3f}" in text


def test_record_refuses_a_folder_without_recordings(tmp_path):
    with pytest.raises(SystemExit, match="no recording"):
        bench.main(["record", "--dataset", str(tmp_path), "--no-write"])


@pytest.mark.slow
def test_comparison_runs_the_multirun_compares_and_validates(tmp_path):
    out = tmp_path / "B.md"
    sweep = tmp_path / "sweep"
    bench.main(
        [
            "comparison",
            "--dataset",
            TINY,
            "--algos",
            "linucb",
            "dqn",
            "--seeds",
            "2",
            "--env-steps",
            "2048",
            "--sweep-dir",
            str(sweep),
            "--repeats",
            "3",
            "--output",
            str(out),
            "eval.episodes=32",
        ]
    )
    text = out.read_text()
    assert "**Wall time" in text and "| dqn |" in text and "reference: best static preset" in text
    check = json.loads((sweep / "best-validation.json").read_text())
    assert check["inputs"] == 32 and "re-validated live" in text
