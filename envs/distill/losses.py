"""The losses of a preparation: token KL to the dense teacher, choice KL, the language-model loss.

:func:`kl_teacher_student` matches the pruned student's next-token distribution to the original
dense model's; :func:`choice_kl` over :func:`choice_scores` matches its softmax over the summed
log-likelihoods of a multiple-choice item's choices, exactly what the task scorer ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from envs.distill.data import ChoiceItem
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import SparseLM


def kl_teacher_student(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher || student)``.

    The forward KL (teacher first) makes the pruned student cover the teacher's whole distribution,
    the usual choice for logit distillation.

    Args:
        student_logits: ``[B, T, V]`` raw logits.
        teacher_logp: ``[B, T, V]`` teacher log-probabilities (no gradient).
    """
    logp_s = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - logp_s)).sum(-1)
    return kl.mean()


def choice_kl(student_ll: torch.Tensor, teacher_ll: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` between the softmaxes of two choice-score vectors.

    The mc scorer picks the choice with the highest summed log-likelihood; matching the dense
    model's distribution over the choices keeps that pick, and spends no capacity on the rest of
    the vocabulary.

    Args:
        student_ll: ``[k]`` summed log-likelihoods of the choices under the pruned student.
        teacher_ll: ``[k]`` the same under the dense teacher (no gradient).
    """
    t = torch.log_softmax(teacher_ll.float(), -1)
    return (t.exp() * (t - torch.log_softmax(student_ll.float(), -1))).sum()


def choice_scores(
    slm: SparseLM, items: Sequence[ChoiceItem], plan: SparsityPlan | None = None, *, grad: bool = False
) -> list[torch.Tensor]:
    """Per item, the summed log-likelihood of each choice after its prompt.

    Every (prompt + choice) is a row, right-padded (causal attention: padding never changes an
    earlier position), and the LM head runs only at the positions that predict choice tokens.
    Items of similar width share one forward (a short arithmetic item is mostly per-forward
    overhead, while padding it to a few-shot prompt's width would multiply its tokens). The
    values equal :func:`envs.tasks.scoring.choice_logliks` up to float rounding.
    """
    width = [len(it.prompt) + max(len(c) for c in it.choices) for it in items]
    groups: list[list[int]] = []
    for n in sorted(range(len(items)), key=width.__getitem__):
        if groups and width[n] <= 1.5 * width[groups[-1][0]]:
            groups[-1].append(n)
        else:
            groups.append([n])
    out: dict[int, torch.Tensor] = {}
    for group in groups:
        out.update(zip(group, _choice_scores_one_forward(slm, [items[n] for n in group], plan, grad), strict=True))
    return [out[n] for n in range(len(items))]


def _choice_scores_one_forward(
    slm: SparseLM, items: Sequence[ChoiceItem], plan: SparsityPlan | None, grad: bool
) -> list[torch.Tensor]:
    rows = [(it.prompt, c) for it in items for c in it.choices]
    owner = torch.tensor([n for n, it in enumerate(items) for _ in it.choices])
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.tensor([[*p, *c] + [0] * (width - len(p) - len(c)) for p, c in rows])
    r_idx = torch.tensor([r for r, (_, c) in enumerate(rows) for _ in c])
    pos = torch.tensor([len(p) - 1 + j for p, c in rows for j in range(len(c))])
    target = torch.tensor([t for _, c in rows for t in c])
    with torch.set_grad_enabled(grad):
        h = slm.forward(ids, plan, logits="none", grad=grad).hidden[r_idx, pos]
        logp = torch.log_softmax(slm.lm_head(h).float(), -1).gather(-1, target[:, None])[:, 0]
        per_row = torch.zeros(len(rows), dtype=logp.dtype).index_add(0, r_idx, logp)
    return [per_row[owner == n] for n in range(len(items))]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` (``[B, T, V]``) on ``ids`` (``[B, T]``)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
