"""The benchmark harness: recorded command lines, where sections go, statistics, and every benchmark's parser."""

from __future__ import annotations

import importlib
import pkgutil
import shlex
import sys

import numpy as np
import pytest

import experiments.bench
import experiments.report
from experiments.bench import harness
from experiments.bench.harness import Benchmark, summarize, time_calls

MACHINE = "Test CPU, 2 cores"
BENCH_MODULES = sorted(
    f"experiments.bench.{m.name}"
    for m in pkgutil.iter_modules(experiments.bench.__path__)
    if m.name != "harness" and not m.name.startswith("_")
)


@pytest.fixture
def benchmarks_md(tmp_path, monkeypatch):
    """BENCHMARKS.md redirected into ``tmp_path`` (and a fixed machine line), so no test can touch the real one."""
    path = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(experiments.report, "BENCHMARKS", path)
    monkeypatch.setattr(experiments.report, "machine_line", lambda: MACHINE)
    return path


def demo(**kw):
    bench = Benchmark("experiments.bench.demo", "Demo benchmark: one line.\n\nMore words.", **kw)
    p = bench.parser()
    p.add_argument("--label", default="x", help="a label")
    p.add_argument("--n", type=int, default=1, help="a count")
    return bench, p


# ---------------------------------------------------------------------------------------- the command line
def test_parser_has_the_module_as_prog_and_the_docstring_first_line_as_description():
    bench, p = demo()
    assert p.prog == "python -m experiments.bench.demo"
    assert p.description == "Demo benchmark: one line."
    help_text = p.format_help()
    assert "--no-write" in help_text and "--output FILE" in help_text and "--threads" not in help_text


def test_command_is_the_one_given_with_shell_quoting():
    bench, p = demo()
    argv = ["--label", "two words", "--n", "3", "--output", "it's.md"]
    args = bench.parse(p, argv)
    assert args.command == "python -m experiments.bench.demo --label 'two words' --n 3 --output 'it'\"'\"'s.md'"
    assert shlex.split(args.command) == ["python", "-m", "experiments.bench.demo", *argv]
    assert bench.parse(p, []).command == "python -m experiments.bench.demo"


def test_command_defaults_to_sys_argv(monkeypatch):
    bench, p = demo()
    monkeypatch.setattr(sys, "argv", ["python -m experiments.bench.demo", "--n", "2"])
    assert bench.parse(p).command == "python -m experiments.bench.demo --n 2"


def test_threads_option_default_and_validation(capsys):
    bench, p = demo(threads=2, threads_help="the reference machine's cores")
    assert bench.parse(p, []).threads == 2
    assert bench.parse(p, ["--threads", "1"]).threads == 1
    assert "default: 2; the reference machine's cores" in " ".join(p.format_help().split())
    with pytest.raises(SystemExit) as exc:
        bench.parse(p, ["--threads", "0"])
    assert exc.value.code == 2 and "--threads must be >= 1" in capsys.readouterr().err
    bench, p = demo(threads=True)
    assert bench.parse(p, []).threads is None and "torch's own setting" in " ".join(p.format_help().split())
    with pytest.raises(ValueError, match=">= 1"):
        Benchmark("experiments.bench.demo", "Doc.", threads=0)


def test_no_write_and_output_exclude_each_other(capsys):
    bench, p = demo()
    with pytest.raises(SystemExit) as exc:
        bench.parse(p, ["--no-write", "--output", "x.md"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_subcommands_carry_the_shared_options_and_the_whole_command():
    bench = Benchmark("experiments.bench.demo", "Demo.", threads=2)
    p = bench.parser(subcommands=True)
    sub = p.add_subparsers(dest="mode", required=True)
    run = bench.subcommand(sub, "run", help="run it")
    run.add_argument("--n", type=int, default=1, help="a count")
    args = bench.parse(p, ["run", "--n", "4", "--no-write", "--threads", "1"])
    assert (args.mode, args.n, args.no_write, args.threads, args.output) == ("run", 4, True, 1, None)
    assert args.command == "python -m experiments.bench.demo run --n 4 --no-write --threads 1"
    assert run.description == "run it" and "--output FILE" in run.format_help()


# ---------------------------------------------------------------------------------------- where the section goes
def test_no_write_prints_the_section_and_writes_nothing(benchmarks_md, tmp_path, capsys):
    bench, p = demo()
    args = bench.parse(p, ["--no-write", "--n", "2"])
    assert bench.publish(args, "Demo", "| a | b |\n|---|---|") is None
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert out.startswith("## Demo\n\nCommand: `python -m experiments.bench.demo --no-write --n 2`\n")
    assert f"Machine: {MACHINE}" in out and "| a | b |" in out and "wrote" not in out


def test_default_destination_is_benchmarks_md(benchmarks_md):
    bench, p = demo()
    assert bench.publish(bench.parse(p, []), "Demo", "body") == benchmarks_md
    assert "## Demo\n\nCommand: `python -m experiments.bench.demo`\n" in benchmarks_md.read_text()


def test_output_writes_there_and_a_rerun_replaces_the_section_in_place(benchmarks_md, tmp_path):
    out = tmp_path / "sections.md"
    bench, p = demo()
    first = bench.parse(p, ["--output", str(out), "--n", "1"])
    assert bench.publish(first, "Demo", "first body") == out
    bench.publish(bench.parse(p, ["--output", str(out), "--label", "other"]), "Other", "other body")
    bench.publish(bench.parse(p, ["--output", str(out), "--n", "2"]), "Demo", "second body")
    assert not benchmarks_md.exists()
    text = out.read_text()
    assert text.startswith(experiments.report.HEADER)
    assert text.count("## Demo") == 1 and text.count("## Other") == 1
    assert text.index("## Demo") < text.index("## Other")  # replaced where it was, not appended
    assert "second body" in text and "first body" not in text and "other body" in text
    assert f"Command: `python -m experiments.bench.demo --output {out} --n 2`" in text
    assert f"Command: `python -m experiments.bench.demo --output {out} --label other`" in text
    assert text.count(f"Machine: {MACHINE}") == 2


# ---------------------------------------------------------------------------------------- statistics
def test_summarize_is_the_meters_estimator():
    values = [0.004, 0.001, 0.003, 0.002, 0.1]
    s = summarize(values)
    assert s.n == 5 and s.p50 == pytest.approx(0.003) and s.mean == pytest.approx(np.mean(values))
    assert s.p95 == pytest.approx(np.percentile(values, 95))
    assert s.cv == pytest.approx(np.std(values, ddof=1) / np.mean(values))
    assert summarize([2.0]).cv == 0.0
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, -1.0])


def test_time_calls_runs_warmups_untimed():
    calls = []
    times = time_calls(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_round_robin_timer_is_the_reports():
    assert harness.time_round_robin is experiments.report.time_round_robin
    t = harness.time_round_robin({"a": lambda: None, "b": lambda: None}, warmup=1, repeats=4)
    assert sorted(t) == ["a", "b"] and all(len(v) == 4 for v in t.values())


# ---------------------------------------------------------------------------------------- every benchmark
@pytest.mark.parametrize("name", [*BENCH_MODULES, "experiments.headroom"])
def test_every_benchmark_builds_its_parser_through_the_harness(name, monkeypatch, capsys):
    mod = importlib.import_module(name)
    assert isinstance(mod.BENCH, Benchmark) and mod.BENCH.module == name
    built = []
    real = Benchmark.parser

    def spy(self, **kw):
        built.append(self)
        return real(self, **kw)

    monkeypatch.setattr(Benchmark, "parser", spy)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert built == [mod.BENCH]
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {name}")
    assert mod.BENCH.description and mod.BENCH.description in " ".join(out.split())
    if name not in SUBCOMMANDS:  # their shared options follow a subcommand (tested below)
        assert "--no-write" in out and "--output FILE" in out


def test_benchmark_modules_are_found():
    assert {"experiments.bench.sparse_lm", "experiments.bench.prepare", "experiments.bench.gpu"} <= set(BENCH_MODULES)


SUBCOMMANDS = {
    "experiments.bench.prepare": ["curves", "compare", "methods", "mixing"],
    "experiments.bench.replay": ["steps", "record", "comparison"],
}


@pytest.mark.parametrize("name,mode", [(n, m) for n, modes in SUBCOMMANDS.items() for m in modes])
def test_subcommands_take_the_shared_options(name, mode, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as exc:
        mod.main([mode, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {name} {mode}")
    assert "--no-write" in out and "--output FILE" in out and "--threads N" in out
