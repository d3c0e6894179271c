"""The training data of a preparation: token sequences, the batch of each step, multiple-choice items.

Which examples a step trains on is a pure function of ``(seed, step)`` (:func:`indices_for_step`),
like the plans it runs (:mod:`envs.distill.sampler`), so a resumed run reads the same batches as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def text_sequences(tokenizer: Any, docs: Sequence[str], seq_len: int) -> list[torch.Tensor]:
    """Tokenise documents, join them with the EOS token and cut the stream into ``seq_len`` chunks.

    Args:
        tokenizer: A Hugging Face tokenizer.
        docs: Documents (natural text).
        seq_len: Tokens per chunk; a shorter tail is dropped.

    Raises:
        ValueError: The text is shorter than one chunk.
    """
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: load the model with one, or pass token sequences instead")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{len(stream)} tokens of text make no sequence of seq_len={seq_len}; lower seq_len")
    t = torch.tensor(stream[: n * seq_len], dtype=torch.long)
    return list(t.view(n, seq_len))


def indices_for_step(n: int, seed: int, step: int, count: int, stream: int = 1) -> list[int]:
    """Which of ``n`` examples step ``step`` trains on: epochs of seeded permutations, a pure function of the step."""
    out = []
    for j in range(count):
        epoch, pos = divmod(step * count + j, n)
        out.append(int(np.random.default_rng([int(seed), int(epoch), int(stream)]).permutation(n)[pos]))
    return out


def batch_for_step(sequences: Sequence[torch.Tensor], seed: int, step: int, batch_size: int) -> torch.Tensor:
    """The training batch of step ``step`` (see :func:`indices_for_step`)."""
    idx = indices_for_step(len(sequences), seed, step, batch_size)
    return torch.stack([torch.as_tensor(sequences[i]).reshape(-1) for i in idx])


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item as token ids: the prompt and each choice's continuation.

    Attributes:
        prompt: Prompt tokens (with its few-shot prefix, as the scorer sees it).
        choices: Per choice, the tokens of ``" " + choice`` (what the scorer appends).
    """

    prompt: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.prompt or len(self.choices) < 2 or any(not c for c in self.choices):
            raise ValueError("a choice item needs a non-empty prompt and at least two non-empty choices")


def choice_items(items: Sequence[Any], tokenizer: Any) -> list[ChoiceItem]:
    """Token ids of the multiple-choice items among ``items`` (:class:`envs.tasks.Item`), as the scorer reads them."""
    from envs.tasks import Scorer

    sc = Scorer(tokenizer=tokenizer)
    return [
        ChoiceItem(tuple(sc.encode(None, it.prompt)), tuple(tuple(sc.encode(None, " " + c)) for c in it.choices))
        for it in items
        if it.kind == "mc"
    ]


def check_sequences(name: str, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``seqs`` as flat long tensors, checked to be non-empty and of one length (batches have no padding).

    Raises:
        ValueError: No sequence, or sequences of different lengths or shorter than 2 tokens.
    """
    out = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    if not out:
        raise ValueError(f"{name} is empty: give at least one token sequence")
    lens = {int(s.numel()) for s in out}
    if len(lens) != 1 or min(lens) < 2:
        raise ValueError(
            f"{name} must hold sequences of one length >= 2 (batches have no padding), got lengths {sorted(lens)}"
        )
    return out
