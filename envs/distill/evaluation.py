"""Held-out figures of a preparation: NLL, KL and agreement of plans against the original dense model.

The same figures are taken before and after training (:func:`held_out_figures`), always against
the original model's log-probabilities and choice scores, so "after" says how close the adapted
plans come to the model the agent would otherwise run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from envs.distill.data import ChoiceItem
from envs.distill.losses import choice_kl
from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import SparseLM


@torch.no_grad()
def teacher_logprobs(teacher: SparseLM, ids: torch.Tensor) -> torch.Tensor:
    """Dense log-probabilities of the frozen teacher, ``[B, T, V]``."""
    return torch.log_softmax(teacher.forward(ids, None, logits="all").logits.float(), dim=-1)


@torch.no_grad()
def evaluate_plans(
    slm: SparseLM,
    plans: Sequence[SparsityPlan],
    sequences: Sequence[torch.Tensor],
    *,
    reference: Sequence[torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Per plan: NLL of the text, KL to and top-1 agreement with a reference distribution.

    Args:
        slm: The model to evaluate.
        plans: Plans to run.
        sequences: Held-out token sequences (``[T]`` each).
        reference: Per sequence, reference log-probabilities ``[1, T, V]`` (the original dense model);
            ``None`` uses this model's own dense plan.

    Returns:
        One dict per plan: ``nll`` (mean per token), ``kl`` (mean ``KL(reference || plan)``),
        ``agree`` (share of positions whose top-1 token matches the reference), ``cost`` (FLOP fraction).
    """
    seqs = [torch.as_tensor(s).reshape(1, -1) for s in sequences]
    if reference is None:
        reference = [teacher_logprobs(slm, s) for s in seqs]
    out = []
    for plan in plans:
        nll = kl = agree = 0.0
        n = 0
        for s, ref in zip(seqs, reference, strict=True):
            logp = torch.log_softmax(slm.forward(s, plan, logits="all").logits.float(), dim=-1)
            T = s.shape[1]
            nll += float(-logp[0, :-1].gather(-1, s[0, 1:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum(-1)[0, :-1].sum())
            agree += float((logp[0, :-1].argmax(-1) == ref[0, :-1].argmax(-1)).sum())
            n += T - 1
        out.append({"nll": nll / n, "kl": kl / n, "agree": agree / n, "cost": plan.cost_fraction()})
    return out


@torch.no_grad()
def evaluate_choices(
    slm: SparseLM, plans: Sequence[SparsityPlan], items: Sequence[ChoiceItem], reference: Sequence[torch.Tensor]
) -> list[dict[str, float]]:
    """Per plan: the mean choice KL to the reference scores and the share of items whose pick it keeps.

    The KL is :func:`envs.distill.losses.choice_kl`; the scores are the scorer's own
    (:func:`envs.tasks.scoring.choice_logliks`), so the figure is what task accuracy sees.

    Args:
        slm: The model to evaluate.
        plans: Plans to run.
        items: Held-out multiple-choice items.
        reference: Per item, the original dense model's summed choice log-likelihoods.
    """
    from envs.tasks.scoring import choice_logliks

    out = []
    for plan in plans:
        kl = agree = 0.0
        for it, ref in zip(items, reference, strict=True):
            ll = choice_logliks(slm, list(it.prompt), [list(c) for c in it.choices], plan)
            kl += float(choice_kl(ll, ref))
            agree += float(int(ll.argmax()) == int(ref.argmax()))
        out.append({"choice_kl": kl / len(items), "pick_agree": agree / len(items)})
    return out


def held_out_figures(
    slm: SparseLM,
    plans: Sequence[SparsityPlan],
    sequences: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    choices: Sequence[ChoiceItem] = (),
    choice_reference: Sequence[torch.Tensor] = (),
) -> dict[str, Any]:
    """Dense NLL / KL and the mean KL / agreement of ``plans``, all against the original dense model.

    With held-out ``choices`` (and the original dense model's scores of them) it adds the pruned
    plans' mean choice KL and the share of picks they keep: the task-level figure.
    """
    dense = evaluate_plans(slm, [slm.dense_plan()], sequences, reference=reference)[0]
    pruned = evaluate_plans(slm, plans, sequences, reference=reference) if plans else []
    extra: dict[str, float] = {}
    if choices and plans:
        per = evaluate_choices(slm, plans, choices, choice_reference)
        extra = {k: float(np.mean([r[k] for r in per])) for k in ("choice_kl", "pick_agree")}
        for r, c in zip(pruned, per, strict=True):
            r.update(c)
    return {
        **{f"pruned_{k}": v for k, v in extra.items()},
        "dense_nll": dense["nll"],
        "dense_kl": dense["kl"],
        "pruned_kl": float(np.mean([r["kl"] for r in pruned])) if pruned else 0.0,
        "pruned_agree": float(np.mean([r["agree"] for r in pruned])) if pruned else 1.0,
        "pruned_nll": float(np.mean([r["nll"] for r in pruned])) if pruned else dense["nll"],
        "per_plan": [{**r, "plan": p.describe()} for r, p in zip(pruned, plans, strict=True)],
    }
