"""Shared report helpers: Markdown tables and the sections of ``BENCHMARKS.md``.

Every benchmark writes its own section, headed ``## <title>``, with the command that made it.
Re-running a benchmark replaces its section and leaves the others alone.
"""

from __future__ import annotations

import fcntl
import os
import platform
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "BENCHMARKS.md"
HEADER = (
    "# PruneGym benchmarks\n\n"
    "Each section is written by the command shown in it; re-running the command replaces the section.\n"
    "Timings are medians over repeats on the machine named in the section; ratios are measured side by "
    "side in one run.\n"
)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed as given (format them first)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """One line naming the machine and library versions a figure was measured with."""
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover
        tf = "n/a"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {tf}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def write_section(title: str, command: str, body: str, path: Path | None = None) -> Path:
    """Replace (or append) the ``## title`` section of BENCHMARKS.md, under a file lock."""
    path = path or BENCHMARKS
    section = f"## {title}\n\nCommand: `{command}`\n\nMachine: {machine_line()}\n\n{body.strip()}\n"
    path.touch(exist_ok=True)
    with open(path, "r+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        text = fh.read() or HEADER
        pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text)
        else:
            text = text.rstrip("\n") + "\n\n" + section
        fh.seek(0)
        fh.truncate()
        fh.write(text.rstrip("\n") + "\n")
        fcntl.flock(fh, fcntl.LOCK_UN)
    return path


def time_round_robin(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, seed: int | random.Random = 0
) -> dict[str, list[float]]:
    """Seconds per call of each fn: ``warmup`` untimed rounds, then ``repeats`` rounds in shuffled order.

    Every round runs every fn once, so a burst of load from elsewhere on a shared machine hits all
    of them alike and ratios between them stay fair.
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times
