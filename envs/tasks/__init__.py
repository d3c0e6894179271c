"""Tasks and scoring: the reward's accuracy side.

Items come from BIG-bench task files, gensim's texts, seeded generators, a user's JSONL file or a
Hugging Face dataset (:mod:`envs.tasks.sources`); workloads mix them (:mod:`envs.tasks.mixes`);
:class:`Scorer` scores an item under a plan, raw and relative to the dense model
(:mod:`envs.tasks.scoring`); :mod:`agents.frontier` holds the frontier maths of the headroom study.
"""

from envs.tasks.items import Item, TaskFormatError, make_item
from envs.tasks.mixes import MIXES, load_mix, mix_spec
from envs.tasks.scoring import ItemScore, Scorer, score_items
from envs.tasks.sources import (
    BIGBENCH_LICENCE,
    BIGBENCH_TASKS,
    GENERATED_LICENCE,
    load_task,
    polarity_sentences,
    prepare_bigbench,
    read_jsonl_task,
    register_task,
)

__all__ = [
    "BIGBENCH_LICENCE",
    "BIGBENCH_TASKS",
    "GENERATED_LICENCE",
    "MIXES",
    "Item",
    "ItemScore",
    "Scorer",
    "TaskFormatError",
    "load_mix",
    "load_task",
    "make_item",
    "mix_spec",
    "polarity_sentences",
    "prepare_bigbench",
    "read_jsonl_task",
    "register_task",
    "score_items",
]
