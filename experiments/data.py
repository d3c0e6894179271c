"""Build the local data cache from packages on PyPI (run once; everything else reads the cache).

Usage: ``python -m experiments.data [--force]``.
"""

from __future__ import annotations

import argparse

from envs.corpus import data_root, prepare_gensim


def main(argv: list[str] | None = None) -> None:
    """Fetch and extract the corpora PruneGym uses into ``$PRUNEGYM_CACHE/data``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.data",
        description="Build PruneGym's local data cache from packages on PyPI (pip download --no-deps).",
    )
    parser.add_argument("--force", action="store_true", help="re-fetch and re-extract even if the cache exists")
    args = parser.parse_args(argv)
    path = prepare_gensim(force=args.force)
    print(f"news text and polarity sentences: {path}")
    print(f"data cache: {data_root()}")


if __name__ == "__main__":
    main()
