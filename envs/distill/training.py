"""Self-distil a model under sampled plans (:func:`prepare_model`) and write its folder (:func:`write_prepared`).

See :mod:`envs.distill` for what a preparation does and why; this module runs the training loop
(bounded in steps and time, checkpointed through :mod:`envs.distill.checkpoints`, resumable
exactly) and writes the folder that :func:`envs.runtime.models.load_model` loads by name. The
folder is written under a temporary name and renamed into place only when complete, so a kill
never leaves a half-written model under its name.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.distill.checkpoints import load_checkpoint, save_checkpoint, trainable_state
from envs.distill.config import PrepareConfig
from envs.distill.data import ChoiceItem, batch_for_step, check_sequences, indices_for_step
from envs.distill.evaluation import held_out_figures, teacher_logprobs
from envs.distill.lora import LORA_TARGETS, LowRankDeltas
from envs.distill.losses import choice_kl, choice_scores, kl_teacher_student, lm_loss
from envs.distill.sampler import PlanSampler, eval_plan_set, step_rng
from envs.runtime.sparse_lm import SparseLM


@dataclass
class PrepareResult:
    """What :func:`prepare_model` did.

    Attributes:
        steps: Steps completed in total (including those before a resume).
        start_step: The step training started (or resumed) at.
        stopped_by: ``"max_steps"`` or ``"time_budget"``.
        train_seconds: Wall time spent in training steps in this run (excluding evaluation).
        train_seconds_total: The same, including the runs before a resume.
        before: Held-out figures of the original model.
        after: The same figures after training.
        losses: ``(step, loss, dense_step)`` per step of this run (the loss averaged over the step's
            plans; ``dense_step`` when all of them were dense).
        plan_summary: Statistics of the plan distribution.
    """

    steps: int
    start_step: int
    stopped_by: str
    train_seconds: float
    train_seconds_total: float
    before: dict[str, Any]
    after: dict[str, Any]
    losses: list[tuple[int, float, bool]]
    plan_summary: dict[str, Any]


def prepare_model(
    slm: SparseLM,
    train_sequences: Sequence[torch.Tensor],
    eval_sequences: Sequence[torch.Tensor],
    cfg: PrepareConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    choice_items: Sequence[ChoiceItem] = (),
    eval_choice_items: Sequence[ChoiceItem] = (),
) -> PrepareResult:
    """Self-distil ``slm`` under plans drawn from ``cfg.plan``.

    Args:
        slm: The model to adapt; its importance orderings choose what plans keep and stay fixed.
            With ``dense_weights="original"`` its weights stay as they are and it receives the
            adapted set (:meth:`~envs.runtime.sparse_lm.SparseLM.set_adapted`); with ``"adapted"`` its weights
            are modified in place. The teacher is the original dense model: the student's own dense
            plan with ``"original"``, a frozen copy with ``"adapted"``.
        train_sequences: Token sequences of one length (training text: the train split only).
        eval_sequences: Held-out token sequences for the before/after figures.
        cfg: Hyper-parameters.
        checkpoint_dir: Where checkpoints go (``None``: none): numbered folders and a ``latest.json``
            pointer (:mod:`envs.distill.checkpoints`), every ``cfg.checkpoint_every`` steps and at the end.
        resume: Continue from the newest complete checkpoint in ``checkpoint_dir``.
        progress: Show a tqdm progress bar.
        log: Called with one-line messages.
        choice_items: Multiple-choice items of the train split for the choice loss (``cfg.choice_weight``).
        eval_choice_items: Held-out multiple-choice items for the before/after choice figures.

    Raises:
        ValueError: Bad sequences, ``choice_weight > 0`` without ``choice_items``, or a checkpoint
            written with a different training configuration.
        FileNotFoundError: ``resume`` with no complete checkpoint in ``checkpoint_dir``.
    """
    from tqdm.auto import tqdm

    log = log or (lambda _msg: None)
    train = check_sequences("train_sequences", train_sequences)
    held = check_sequences("eval_sequences", eval_sequences)
    if cfg.choice_weight > 0 and not choice_items:
        raise ValueError(
            "choice_weight > 0 needs multiple-choice training items: set choice_mix (experiments.prepare) "
            "or pass choice_items, or set choice_weight=0"
        )
    torch.manual_seed(cfg.seed)
    keep_dense = cfg.dense_weights == "original"
    # Training needs strategy="gather": "views" slices an importance-ordered copy that is no parameter.
    student = (
        slm
        if slm.strategy == "gather" and slm.adapted is None
        else SparseLM(slm.model, slm.tokenizer, slm.importance, name=slm.name, strategy="gather")
    )
    if keep_dense:
        # The deltas go into a second weight set, a copy of the original to start with; the
        # student's dense plan never touches it, so the student itself is the frozen teacher.
        student.set_adapted({f"{i}.{n}": getattr(b, n) for i, b in enumerate(student.blocks) for n in LORA_TARGETS})
        teacher = student
    else:  # the teacher is a frozen copy of the original weights; "views" is its fastest dense path
        teacher = SparseLM(copy.deepcopy(slm.model), importance=slm.importance, name=f"{slm.name}-teacher")
        for p in teacher.model.parameters():
            p.requires_grad_(False)
    sampler = PlanSampler(student, cfg.plan)
    eval_plans = eval_plan_set(student, cfg.plan, cfg.eval_plans, cfg.seed)
    reference = [teacher_logprobs(teacher, s.reshape(1, -1)) for s in held]
    choice_ref = choice_scores(teacher, eval_choice_items)

    def figures() -> dict[str, Any]:
        return held_out_figures(student, eval_plans, held, reference, eval_choice_items, choice_ref)

    model = student.model
    deltas: LowRankDeltas | None = None
    embed_ids = {id(student.embed_tokens.weight), id(student.lm_head.weight)}
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "lora":
        deltas = LowRankDeltas(student.adapted or student, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        params = list(deltas.parameters())
    elif keep_dense:  # full fine-tuning of the adapted set's matrices (copies; the original stays)
        params = list(student.adapted_tensors().values())
        for p in params:
            p.requires_grad_(True)
    else:
        params = []
        for p in model.parameters():
            if cfg.train_embeddings or id(p) not in embed_ids:
                p.requires_grad_(True)
                params.append(p)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start = 0
    elapsed_before = 0.0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    before = figures()
    log(f"before: dense NLL {before['dense_nll']:.4f}, pruned KL {before['pruned_kl']:.4f}")
    if resume:
        if ckpt is None:
            raise ValueError("resume=true needs a checkpoint_dir")
        saved, opt_sd, state = load_checkpoint(ckpt)
        if state.get("training_hash") != cfg.training_hash():
            raise ValueError(
                f"the checkpoint in {ckpt} was written with a different training configuration "
                f"({state.get('config')}); resume with the same settings or start fresh with resume=false"
            )
        current = trainable_state(student, deltas)
        if set(saved) != set(current):
            raise ValueError(f"the checkpoint in {ckpt} holds other tensors than this model trains; start fresh")
        with torch.no_grad():
            for k, v in saved.items():
                current[k].copy_(v)
        optimizer.load_state_dict(opt_sd)
        start = int(state["step"])
        elapsed_before = float(state.get("train_seconds", 0.0))
        before = state.get("before", before)
        log(f"resumed at step {start} from {ckpt}")

    def lr_at(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

    def checkpoint(step: int, seconds: float) -> None:
        if ckpt is None:
            return
        save_checkpoint(
            ckpt,
            step=step,
            params=trainable_state(student, deltas),
            optimizer=optimizer,
            state={
                "seed": cfg.seed,
                "training_hash": cfg.training_hash(),
                "config": cfg.to_dict(),
                "train_seconds": seconds,
                "before": before,
                "rng": "every random choice is a function of (seed, step): see envs.distill.sampler.step_rng",
            },
        )

    losses: list[tuple[int, float, bool]] = []
    budget_s = cfg.time_budget_min * 60.0
    t0 = time.perf_counter()
    stopped_by = "max_steps"
    step = start

    # Either bound may end the run: the bar shows the share of whichever is nearer, so its ETA is real.
    def done_pct() -> int:
        by_steps = step / cfg.max_steps if cfg.max_steps else 1.0
        by_time = (elapsed_before + time.perf_counter() - t0) / budget_s if budget_s > 0 else 1.0
        return min(100, int(100 * max(by_steps, by_time)))

    bar = tqdm(total=100, unit="%", disable=not progress, desc="prepare", dynamic_ncols=True)
    try:
        while step < cfg.max_steps:
            if elapsed_before + time.perf_counter() - t0 >= budget_s:
                stopped_by = "time_budget"
                break
            ids = batch_for_step(train, cfg.seed, step, cfg.batch_size)
            # Plan j of a step comes from stream j; stream 0 is the single-plan run's plan.
            plans = [sampler.sample(step_rng(cfg.seed, step, stream=j)) for j in range(cfg.plans_per_step)]
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
            text = cfg.kl_weight > 0 or cfg.lm_weight > 0
            t_logp = teacher_logprobs(teacher, ids) if cfg.kl_weight > 0 else None
            step_items: list[ChoiceItem] = []
            if cfg.choice_weight > 0:
                idx = indices_for_step(len(choice_items), cfg.seed, step, cfg.choice_items_per_step, stream=2)
                step_items = [choice_items[i] for i in idx]
                t_choice = choice_scores(teacher, step_items)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with deltas.applied() if deltas is not None else nullcontext():
                for j, plan in enumerate(plans):  # a backward per plan: one plan's activations alive at a time
                    if keep_dense and plan.is_dense:  # the original weights: nothing to learn
                        continue
                    loss = torch.zeros(())
                    if text:
                        logits = student.forward(ids, plan, logits="all", grad=True).logits
                        if t_logp is not None:
                            loss = loss + cfg.kl_weight * kl_teacher_student(logits, t_logp)
                        if cfg.lm_weight:
                            loss = loss + cfg.lm_weight * lm_loss(logits, ids)
                        del logits
                    if step_items:
                        s_choice = choice_scores(student, step_items, plan, grad=True)
                        c_loss = sum(choice_kl(a, b) for a, b in zip(s_choice, t_choice, strict=True))
                        loss = loss + cfg.choice_weight / len(step_items) * c_loss
                    # The deltas' graph (W + BA) is shared by the plans: keep it until the last backward.
                    (loss / len(plans)).backward(retain_graph=deltas is not None and j < len(plans) - 1)
                    total += float(loss.detach()) / len(plans)
                    del loss
            optimizer.step()
            step += 1
            losses.append((step, total, all(p.is_dense for p in plans)))
            bar.update(done_pct() - bar.n)
            cost = float(np.mean([p.cost_fraction() for p in plans]))
            bar.set_postfix(step=step, loss=f"{total:.4f}", cost=f"{cost:.2f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                checkpoint(step, elapsed_before + time.perf_counter() - t0)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    if step > start:
        checkpoint(step, elapsed_before + train_s)
    for p in [*model.parameters(), *student.adapted_tensors().values()]:
        p.requires_grad_(False)
    if deltas is not None:
        deltas.merge()
    slm.weights_changed()
    student.weights_changed()
    if keep_dense:
        slm.set_adapted(student.adapted_tensors())
    elif slm is not student:
        slm.set_importance(slm.importance)  # rebuild the importance-ordered copy from the new weights
    after = figures()
    log(f"after {step} steps: dense NLL {after['dense_nll']:.4f}, pruned KL {after['pruned_kl']:.4f}")
    return PrepareResult(
        steps=step,
        start_step=start,
        stopped_by=stopped_by,
        train_seconds=train_s,
        train_seconds_total=elapsed_before + train_s,
        before=before,
        after=after,
        losses=losses,
        plan_summary=sampler.summary(seed=cfg.seed),
    )


def write_prepared(folder: str | Path, slm: SparseLM, card: dict[str, Any], *, importance: Any | None = None) -> Path:
    """Write a prepared model folder that :func:`envs.runtime.models.load_model` loads by name, atomically.

    The folder holds ``config.json`` and ``model.safetensors`` (``save_pretrained``), the adapted
    weight set of pruned layers as ``adapted.safetensors`` (with ``dense_weights="original"``), the
    tokenizer files, ``card.json``, and ``importance-<weights hash>.json`` with the orderings used during
    preparation, so that :meth:`SparseLM.from_pretrained` keeps exactly those orderings.

    Everything is written into a temporary sibling that replaces ``folder`` only once complete
    (:func:`envs.data.files.atomic_folder`): a run killed while writing leaves the previous folder
    (or none) under the name, never a half-written one that would load.
    """
    from envs.data.files import atomic_folder
    from envs.runtime.models import ADAPTED_FILE, PREPARED_CARD

    folder = Path(folder)
    new_hash = slm.weights_hash
    imp = copy.deepcopy(importance if importance is not None else slm.importance)
    imp.meta = {**imp.meta, "weights": new_hash, "note": "orderings of the base model, used during preparation"}
    with atomic_folder(folder, force=True) as tmp:
        slm.model.save_pretrained(str(tmp), safe_serialization=True)
        if slm.adapted is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in slm.adapted_tensors().items()}, str(tmp / ADAPTED_FILE))
        if slm.tokenizer is not None:
            slm.tokenizer.save_pretrained(str(tmp))
        imp.save(tmp / f"importance-{new_hash}.json")
        (tmp / PREPARED_CARD).write_text(json.dumps({**card, "weights_hash": new_hash}, indent=1))
    return folder
