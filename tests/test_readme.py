"""The README's commands and CI's table of their short forms (``.ci/readme_commands.py``) stay in step.

Fast: nothing here trains or loads a model. The table itself is run by ``make smoke`` (``.ci/run``).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _load_table():
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


rc = _load_table()
README_COMMANDS = rc.readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_readme_blocks_are_parsed():
    text = "\n".join(
        [
            "```bash",
            "make test   # fast tests",
            "python -m experiments.train  algo=ppo   # two spaces",
            "# a comment line",
            "",
            "make test        # the same command again",
            "```",
            "```python",
            "import envs  # not a shell block",
            "```",
            "```bash",
            "python -m experiments.prepare text=[news]",
            "```",
        ]
    )
    assert rc.readme_commands(text) == [
        "make test",
        "python -m experiments.train algo=ppo",
        "python -m experiments.prepare text=[news]",
    ]
    assert rc.starts_with("make test ARGS=x", "make test")
    assert not rc.starts_with("make test-all", "make test")  # word by word, not character by character


def test_every_readme_command_has_a_short_form():
    table = [e.readme for e in rc.TABLE]
    missing = [c for c in README_COMMANDS if c not in table]
    assert not missing, f"add a line to TABLE in .ci/readme_commands.py for each of: {missing}"
    stale = [c for c in table if c not in README_COMMANDS]
    assert not stale, f"these TABLE entries are no longer README commands (update or remove them): {stale}"
    assert len(table) == len(set(table)), "a README command has two entries in TABLE"


def test_short_forms_start_with_their_readme_command():
    for entry in rc.TABLE:
        if isinstance(entry, rc.Run):
            assert rc.starts_with(entry.short(), entry.readme), entry
            assert not re.search(r"<[a-z ]+>", entry.command()), f"a README placeholder is left unfilled: {entry}"
            assert entry.cwd in ("repo", "scratch"), entry


def test_skipped_commands_name_a_reason_and_an_existing_test():
    skips = [e for e in rc.TABLE if isinstance(e, rc.Skip)]
    assert skips  # the second machine of "Beyond one machine", and `make smoke` itself
    for entry in skips:
        assert len(entry.reason) > 20, entry
        path, _, name = entry.covered_by.partition("::")
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, entry.covered_by


def test_commands_name_modules_and_targets_that_exist():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    for entry in rc.TABLE:
        words = entry.readme.split()
        if words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]} ({entry.readme})"
        elif words[0] == "make":
            assert words[1] in targets, f"no Makefile target {words[1]} ({entry.readme})"


def test_smoke_runs_the_readme_commands():
    """``.ci/run`` calls ``make smoke``, which runs this table (so every README command runs in CI)."""
    assert re.search(r"^make smoke$", (REPO / ".ci" / "run").read_text(encoding="utf-8"), flags=re.M)
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    smoke = re.search(r"^smoke:(.*)$", makefile, flags=re.M).group(1).split()
    recipe = re.search(r"^readme:.*\n\t(.*)$", makefile, flags=re.M).group(1)
    assert "readme" in smoke and ".ci/readme_commands.py" in recipe


def test_runner_stops_at_the_first_failure_and_names_it(tmp_path, capfd):
    out = tmp_path / "out.txt"
    table = [
        rc.Run("echo <run>", f"> {out}", fill={"<run>": "$TAG"}),
        rc.Skip("ray start --address=<head ip>:6379", "needs a second machine to join", "tests/x.py::y"),
        rc.Run("false", "--an-argument"),
        rc.Run("touch", str(tmp_path / "never")),
    ]
    assert rc.run_table(table) == 1
    err = capfd.readouterr().err
    assert "README command failed: `false`" in err and "false --an-argument" in err
    assert out.read_text().startswith("readme-")  # the placeholder became the runner's $TAG
    assert not (tmp_path / "never").exists()  # nothing runs after the failure
    assert rc.run_table(table[:2]) == 0


def test_bench_lists_and_runs_benchmarks():
    res = subprocess.run([PY, "-m", "experiments.bench"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:-1]}
    assert "SparseLM benchmark" in lines["sparse_lm"] and "meters" in lines and "__main__" not in lines
    res = subprocess.run([PY, "-m", "experiments.bench", "--quick"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "name the benchmark before its options" in res.stderr


def test_bench_lists_only_modules_that_run(tmp_path):
    from experiments.bench.__main__ import benchmarks

    (tmp_path / "helper.py").write_text('"""Shared code."""\n')
    (tmp_path / "fast.py").write_text(
        '"""Fast benchmark: one line.\n\nMore."""\nif __name__ == "__main__":\n    pass\n'
    )
    (tmp_path / "_private.py").write_text('"""Private."""\nif __name__ == "__main__":\n    pass\n')
    assert benchmarks(tmp_path) == {"fast": "Fast benchmark: one line."}


@pytest.mark.parametrize(("name", "option"), [("sparse_lm", "--lengths"), ("meters", "--n-plans")])
def test_bench_runs_one_by_name(name, option):
    res = subprocess.run(
        [PY, "-m", "experiments.bench", name, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert option in res.stdout  # the benchmark's own --help, not the lister's
