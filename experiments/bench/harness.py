"""What every benchmark shares: its command line, its section of ``BENCHMARKS.md`` and its statistics.

A benchmark module makes one :class:`Benchmark` and builds its parser from it, so that every
benchmark takes the same ``--no-write``, ``--output`` and (where it runs torch on the CPU)
``--threads`` options, records the exact command that made the run, and prints and writes its
section the same way (:func:`experiments.report.write_section`, which adds the machine line). The
statistics helpers are here too, so that every table computes its medians and p95s alike::

    BENCH = Benchmark("experiments.bench.example", __doc__, threads=2)

    def main(argv=None):
        parser = BENCH.parser()
        parser.add_argument("--repeats", type=int, default=7, help="timed calls")
        args = BENCH.parse(parser, argv)
        s = summarize(time_calls(work, args.repeats))
        BENCH.publish(args, "Example", f"p50 {s.p50 * 1e3:.1f} ms, p95 {s.p95 * 1e3:.1f} ms")

A benchmark with subcommands (``prepare curves ...``) passes ``subcommands=True`` to
:meth:`Benchmark.parser` and makes each subcommand with :meth:`Benchmark.subcommand`, which gives
it the shared options (they follow the subcommand on the command line, with its own options).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from envs.measure.meters import latency_stats
from experiments.report import machine_line, section_text, time_round_robin, write_section

__all__ = [
    "Benchmark",
    "Summary",
    "machine_line",
    "summarize",
    "time_calls",
    "time_round_robin",
]


@dataclass(frozen=True)
class Summary:
    """Median, 95th percentile, mean, coefficient of variation and size of a sample.

    Attributes:
        p50: Median.
        p95: 95th percentile (``numpy.percentile``, linear interpolation).
        mean: Arithmetic mean.
        cv: Standard deviation (ddof 1) over the mean; 0 for a single value.
        n: Number of values.
    """

    p50: float
    p95: float
    mean: float
    cv: float
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """The :class:`Summary` of non-negative values (timings, ratios, errors), as the meters compute it.

    It is :func:`envs.measure.meters.latency_stats`, so a benchmark's p50 and p95 are the same
    estimators as a :class:`~envs.measure.meters.Meter`'s.

    Raises:
        ValueError: No values, or a negative or non-finite one.
    """
    s = latency_stats(values)
    return Summary(p50=s["p50"], p95=s["p95"], mean=s["mean"], cv=s["cv"], n=len(values))


def time_calls(fn: Callable[[], object], n: int, warmup: int = 0) -> list[float]:
    """Wall-clock seconds of each of ``n`` calls of ``fn``, after ``warmup`` untimed calls.

    For one workload on its own; to compare workloads, :func:`time_round_robin` interleaves them so
    that load from elsewhere hits them alike.
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class Benchmark:
    """A benchmark's command line and its section of ``BENCHMARKS.md``.

    Args:
        module: The module run as ``python -m <module>`` (e.g. ``"experiments.bench.meters"``); it is
            the parser's ``prog`` and the start of the recorded command.
        doc: The module's docstring; its first line is the parser's description.
        threads: ``--threads``: ``False`` for a benchmark that sets no torch threads, ``True`` for
            the option with torch's own setting as default (``None``), or the default count.
        threads_help: Why that default (appended to the option's help).
        output_aliases: Other names of ``--output`` that the benchmark has always accepted.
    """

    def __init__(
        self,
        module: str,
        doc: str | None,
        *,
        threads: int | bool = False,
        threads_help: str = "",
        output_aliases: Sequence[str] = (),
    ) -> None:
        if not isinstance(threads, bool) and threads < 1:
            raise ValueError(f"the default thread count must be >= 1, got {threads}")
        self.module = module
        self.prog = f"python -m {module}"
        lines = (doc or "").strip().splitlines()
        self.description = lines[0].strip() if lines else ""
        self.threads = threads
        self.threads_help = threads_help
        self.output_aliases = tuple(output_aliases)

    # ------------------------------------------------------------------ parser
    def parser(self, *, subcommands: bool = False) -> argparse.ArgumentParser:
        """A new parser with the benchmark's ``prog`` and description.

        Args:
            subcommands: The benchmark has subcommands: the shared options go to each of them
                (:meth:`subcommand`) rather than to this parser.
        """
        p = argparse.ArgumentParser(prog=self.prog, description=self.description)
        if not subcommands:
            self._add_shared(p)
        return p

    def subcommand(self, subparsers: argparse._SubParsersAction, name: str, *, help: str) -> argparse.ArgumentParser:
        """Add subcommand ``name`` (with ``help`` as its help and description) and the shared options to it."""
        p = subparsers.add_parser(name, help=help, description=help)
        self._add_shared(p)
        return p

    def _add_shared(self, p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group()
        where.add_argument(
            "--no-write",
            action="store_true",
            help="print the section only; write nothing (no BENCHMARKS.md section, plot or results file)",
        )
        where.add_argument(
            "--output",
            *self.output_aliases,
            dest="output",
            type=Path,
            default=None,
            metavar="FILE",
            help="write the section to FILE (replacing a section of the same title) instead of BENCHMARKS.md",
        )
        if self.threads is False:
            return
        default = None if self.threads is True else self.threads
        told = "torch's own setting" if default is None else str(default)
        why = f"; {self.threads_help}" if self.threads_help else ""
        p.add_argument(
            "--threads", type=int, default=default, metavar="N", help=f"torch intra-op threads (default: {told}{why})"
        )

    def parse(self, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse ``argv`` (default ``sys.argv[1:]``); ``args.command`` is the command line that made the run."""
        given = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(given)
        if getattr(args, "threads", None) is not None and args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        args.command = self.command(given)
        return args

    def command(self, argv: Sequence[str]) -> str:
        """``python -m <module> <argv>``, each argument shell-quoted, so the line can be pasted back."""
        return shlex.join(["python", "-m", self.module, *argv])

    # ------------------------------------------------------------------ report
    def publish(self, args: argparse.Namespace, title: str, body: str) -> Path | None:
        """Print the ``## title`` section; unless ``--no-write``, write it to ``--output`` or BENCHMARKS.md.

        Writing replaces the section of the same title in place and leaves the others alone.

        Returns:
            The file written, or ``None`` with ``--no-write``.
        """
        print(section_text(title, args.command, body), flush=True)
        if args.no_write:
            return None
        path = write_section(title, args.command, body, args.output)
        print(f"wrote section '{title}' of {path}", flush=True)
        return path
