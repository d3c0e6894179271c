"""The unit of work of every task: an :class:`Item`, and the error raised for malformed task data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from envs.data.corpus import split_of

Kind = Literal["mc", "exact", "text"]
KINDS: tuple[str, ...] = ("mc", "exact", "text")


class TaskFormatError(ValueError):
    """A task file or line is malformed; the message names the file, the line and the field."""

    def __init__(self, path: str, line: int | None, field_name: str, problem: str) -> None:
        where = f"{path}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: field {field_name!r} {problem}")
        self.path, self.line, self.field = path, line, field_name


@dataclass(frozen=True)
class Item:
    """One scored input.

    Attributes:
        id: Stable identifier (task name + hash of the content), the same on every machine.
        task: Name of the task the item comes from.
        prompt: Text the model reads.
        answer: For ``"mc"`` the correct choice, for ``"exact"`` the expected short answer, for
            ``"text"`` the continuation whose tokens are scored (fidelity to the dense model).
        choices: The candidate continuations of a multiple-choice item, else ``None``.
        kind: ``"mc"`` (log-likelihood over ``choices``), ``"exact"`` (greedy exact match) or
            ``"text"`` (fidelity of the continuation's next-token predictions).
        meta: Free-form extras (difficulty, source, answer regex ...).
    """

    id: str
    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    kind: Kind = "exact"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Item.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "mc":
            if not self.choices or len(self.choices) < 2:
                raise ValueError(f"multiple-choice item {self.id!r} needs at least two choices")
            if self.answer not in self.choices:
                raise ValueError(f"item {self.id!r}: answer {self.answer!r} is not one of its choices")
        elif self.choices is not None:
            raise ValueError(f"item {self.id!r} of kind {self.kind!r} must have choices=None")

    @property
    def label(self) -> int:
        """Index of the correct choice (multiple choice only)."""
        if self.choices is None:
            raise ValueError(f"item {self.id!r} is not multiple choice")
        return self.choices.index(self.answer)

    @property
    def split(self) -> str:
        """``train``/``val``/``test`` by the hash of the item's content (see :func:`split_key`).

        Loaders record the split in ``meta["split"]`` before adding few-shot prefixes; without it,
        the split is hashed from the prompt and answer as they are.
        """
        return self.meta.get("split") or split_of(split_key(self.prompt, self.answer))


def split_key(prompt: str, answer: str) -> str:
    """The text an item's split is hashed from: what the model reads and what it must produce.

    Few-shot prefixes are not part of it (they are added after splitting), so the same question
    lands in the same split whatever the number of shots.
    """
    return prompt + "\x1f" + answer


def make_item(
    task: str,
    prompt: str,
    answer: str,
    *,
    choices: list[str] | tuple[str, ...] | None = None,
    kind: Kind | None = None,
    meta: dict[str, Any] | None = None,
) -> Item:
    """Build an item with a content-derived id (``kind`` defaults to ``"mc"`` if choices are given)."""
    kind = kind or ("mc" if choices else "exact")
    digest = hashlib.sha256(split_key(prompt, answer).encode("utf-8")).hexdigest()[:12]
    return Item(
        id=f"{task}#{digest}",
        task=task,
        prompt=prompt,
        answer=answer,
        choices=tuple(choices) if choices is not None else None,
        kind=kind,
        meta=dict(meta or {}),
    )
