"""List the benchmarks, or run one: ``python -m experiments.bench [NAME [ARGS...]]``.

``python -m experiments.bench`` prints every benchmark module of this package with the first line of
its docstring; ``python -m experiments.bench sparse_lm --quick`` runs ``experiments.bench.sparse_lm``
with ``--quick``, exactly as ``python -m experiments.bench.sparse_lm --quick`` would. Descriptions are
read from the source, so listing imports none of the benchmarks (nor torch).
"""

from __future__ import annotations

import argparse
import ast
import pkgutil
import runpy
import sys
from pathlib import Path

PACKAGE = "experiments.bench"
HERE = Path(__file__).resolve().parent


def benchmarks(folder: Path = HERE) -> dict[str, str]:
    """Each benchmark module in ``folder`` (by name) and the first line of its docstring.

    A benchmark is a module that runs as a command (it has an ``if __name__ == "__main__":`` block);
    shared helpers of the package are not listed.
    """
    out: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        tree = ast.parse((folder / f"{info.name}.py").read_text(encoding="utf-8"))
        if not any(_is_main_guard(node) for node in tree.body):
            continue
        doc = (ast.get_docstring(tree) or "").strip()
        out[info.name] = doc.splitlines()[0].strip() if doc else "(no description)"
    return out


def _is_main_guard(node: ast.stmt) -> bool:
    """Whether ``node`` is ``if __name__ == "__main__":``."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    left, ops, right = node.test.left, node.test.ops, node.test.comparators
    return (
        isinstance(left, ast.Name)
        and left.id == "__name__"
        and len(ops) == 1
        and isinstance(ops[0], ast.Eq)
        and isinstance(right[0], ast.Constant)
        and right[0].value == "__main__"
    )


def listing(names: dict[str, str]) -> str:
    """The benchmarks as aligned ``name  description`` lines, with how to run one."""
    width = max((len(n) for n in names), default=0)
    lines = [f"  {name.ljust(width)}  {desc}" for name, desc in names.items()]
    return "\n".join(
        [
            f"benchmarks (python -m {PACKAGE} NAME [ARGS...], or python -m {PACKAGE}.NAME [ARGS...]):",
            *lines,
            f"each takes --help, e.g. python -m {PACKAGE} {next(iter(names), 'NAME')} --help",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """List the benchmarks (no NAME) or run the one named, passing it the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = benchmarks()
    parser = argparse.ArgumentParser(
        prog=f"python -m {PACKAGE}",
        description="List the benchmarks, or run one by name.",
        epilog=listing(names),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="the benchmark to run (omit to list them)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    if not argv:
        print(listing(names))
        return 0
    if argv[0] in ("-h", "--help"):
        parser.parse_args(argv)  # prints the help and exits
    if argv[0].startswith("-"):
        parser.error(
            f"name the benchmark before its options: python -m {PACKAGE} NAME {' '.join(argv)} "
            f"(NAME: {', '.join(names)})"
        )
    if argv[0] not in names:
        parser.error(f"unknown benchmark {argv[0]!r}: name one of {', '.join(names)}")
    name, rest = argv[0], argv[1:]  # everything after the name belongs to the benchmark, --help included
    sys.argv = [f"python -m {PACKAGE}.{name}", *rest]
    runpy.run_module(f"{PACKAGE}.{name}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
