"""Workload mixes: named mixtures of tasks, interleaved into one stream of uneven difficulty.

Adaptive pruning pays only when inputs differ, so a workload is a *mixture*: easy and hard items
of several tasks, shuffled together as a stream of queries would arrive. A mix maps task names
(with options, see :func:`envs.tasks.load_task`) to weights; :func:`load_mix` draws items in
those proportions. Mixes live in :data:`MIXES`, in YAML files (``conf/task/*.yaml``, with a
``tasks:`` mapping), or are passed directly as a mapping.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from envs.tasks.items import Item
from envs.tasks.sources import load_task

_ARITH = "gen/{op}-{n}"
_BB_ARITH = "bigbench/arithmetic/{n}_digit_{op}"

MIXES: dict[str, dict[str, float]] = {
    # Everything generated: needs no data cache (tests, smoke runs).
    "generated": {
        "gen/copy-4": 1.0,
        "gen/copy-12": 1.0,
        "gen/kv-2": 1.0,
        "gen/kv-6": 1.0,
        "gen/add-1:mc": 1.0,
        "gen/add-3:mc": 1.0,
    },
    # Multiple choice scored by log-likelihood, of uneven difficulty: easy (1-digit) to hard (5-digit)
    # arithmetic interleaved with facts, odd-one-out, sentiment and key-value recall. Everything
    # comes from the gensim wheel or a seeded generator, so it builds on any machine.
    "mc": {
        **{_ARITH.format(n=n, op=op) + ":mc": 0.5 for n in (1, 2, 3, 4, 5) for op in ("add", "sub")},
        "gensim/facts:2shot": 1.5,
        "gensim/odd-one-out": 1.0,
        "gensim/polarity:2shot": 1.5,
        "gen/kv-3:mc": 1.0,
    },
    # The `mc` mix as it was made from BIG-bench task files (BENCHMARKS.md sections before the data
    # change used it). Needs the bigbench sdist in the data cache (`python -m experiments.data`),
    # which the package registry may no longer serve.
    "mc-bigbench": {
        **{_BB_ARITH.format(n=n, op=op): 0.5 for n in (1, 2, 3, 4, 5) for op in ("addition", "subtraction")},
        "bigbench/general_knowledge:2shot": 1.5,
        "bigbench/odd_one_out": 1.0,
        "bigbench/emoji_movie": 1.0,
        "gensim/polarity:2shot": 1.5,
        "gen/kv-3:mc": 1.0,
    },
    # Multiple choice where the dense 135M model is well above chance on every task, unlike `mc`,
    # much of which is multi-digit arithmetic at chance.
    "mc-known": {
        "gen/kv-3:mc": 1.0,
        "gen/kv-4:mc": 1.0,
        "gen/kv-5:mc": 1.0,
        "gen/kv-6:mc": 1.0,
        "gen/add-1:mc": 1.0,
        "gensim/facts:2shot": 1.0,
    },
    # A chat-like stream: short questions, recall, arithmetic of every size, and plain text.
    "chat": {
        "gensim/facts:2shot": 1.0,
        "gensim/polarity:2shot": 1.0,
        "gensim/news": 1.0,
        **{_ARITH.format(n=n, op="add") + ":exact:2shot": 0.4 for n in (1, 2, 3, 4, 5)},
        "gen/copy-6": 1.0,
        "gen/kv-4": 1.0,
    },
    # Exact-match answers only (greedy decoding): brittle under pruning, for contrast.
    "exact": {
        **{_ARITH.format(n=n, op="add") + ":exact:2shot": 1.0 for n in (1, 2, 3)},
        "gen/copy-6": 1.0,
        "gen/kv-4": 1.0,
    },
    # Unlabelled news text scored by fidelity to the dense model.
    "text": {"gensim/news": 1.0},
}


def mix_spec(mix: str | Mapping[str, float] | Path) -> dict[str, float]:
    """The ``{task: weight}`` mapping of a mix given by name, YAML path or mapping."""
    if isinstance(mix, Mapping):
        spec = dict(mix)
    elif str(mix) in MIXES:
        spec = MIXES[str(mix)]
    elif str(mix).endswith((".yaml", ".yml")) or Path(str(mix)).is_file():
        spec = _yaml_spec(Path(mix))
    else:
        raise KeyError(f"unknown mix {mix!r}: use one of {sorted(MIXES)}, a YAML file with a tasks: mapping, or a dict")
    bad = {k: v for k, v in spec.items() if not isinstance(v, int | float) or v <= 0}
    if not spec or bad:
        raise ValueError(f"a mix maps task names to positive weights; got {spec!r}")
    return {str(k): float(v) for k, v in spec.items()}


def _yaml_spec(path: Path) -> dict[str, float]:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"mix file {path} does not exist")
    cfg: Any = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a mix file must be a mapping with a 'tasks' (or 'name') field")
    tasks = cfg.get("tasks", cfg.get("name"))  # the conf/task files pass the mix as load_mix's name
    if isinstance(tasks, str):
        return mix_spec(tasks)
    if not isinstance(tasks, dict):
        raise ValueError(f"{path}: field 'tasks' must map task names to weights (or give 'name' of a built-in mix)")
    return tasks


def load_mix(
    name: str | Mapping[str, float] | Path, split: str | None = "val", n: int | None = None, seed: int = 0
) -> list[Item]:
    """Items of a mix, interleaved in a seeded random order.

    Args:
        name: A name in :data:`MIXES`, a YAML file with a ``tasks:`` mapping, or a ``{task: weight}`` dict.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None``.
        n: Total items; each task contributes in proportion to its weight (capped by what it has,
            the shortfall spread over the others). ``None``: every item of every task, weights ignored.
        seed: Seed of the sampling and the interleaving.
    """
    spec = mix_spec(name)
    rng = random.Random(seed)
    pools = {}
    for task in spec:
        items = load_task(task, split)
        rng.shuffle(items)
        pools[task] = items
    if n is None:
        chosen = [it for items in pools.values() for it in items]
    else:
        quota = _quotas(spec, {t: len(v) for t, v in pools.items()}, n)
        chosen = [it for t, items in pools.items() for it in items[: quota[t]]]
    rng.shuffle(chosen)
    return chosen


def _quotas(weights: dict[str, float], avail: dict[str, int], n: int) -> dict[str, int]:
    """Largest-remainder allocation of ``n`` items by weight, capped by availability."""
    quota = dict.fromkeys(weights, 0)
    left = min(n, sum(avail.values()))
    while left > 0:
        open_ = {t: w for t, w in weights.items() if quota[t] < avail[t]}
        total = sum(open_.values())
        share = {t: left * w / total for t, w in open_.items()}
        give = {t: min(int(s), avail[t] - quota[t]) for t, s in share.items()}
        if sum(give.values()) == 0:  # hand out the remainder one by one, largest fraction first
            for t in sorted(open_, key=lambda t: share[t] - int(share[t]), reverse=True)[:left]:
                give[t] = 1
        for t, g in give.items():
            quota[t] += g
        left -= sum(give.values())
    return quota
