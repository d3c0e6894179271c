"""Scorers: how right a model running one plan is on one item, raw and relative to the dense model.

Three kinds of item, three scorers behind one :class:`Scorer`:

- ``"mc"``: log-likelihood of each choice after the prompt (summed, or length-normalised per
  token); the pick is the most likely choice. ``raw`` is 1 if the pick is right (or, with
  ``mc_metric="prob"``, the probability mass on the right choice among the choices: graded).
- ``"exact"``: greedy decoding must produce the answer and then stop. By default this is decided
  teacher-forced in one forward (greedy decoding yields the answer exactly when the argmax at every
  answer position is the answer's next token, which one forward over prompt + answer shows); with
  ``exact_method="generate"`` it really decodes with :meth:`SparseLM.generate` and compares
  strings (slower; catches answers produced with a different tokenisation).
- ``"text"``: fidelity to the dense model over the continuation tokens: top-1 agreement (``raw``)
  and KL(dense || plan) per token (``details["kl"]``).

``dense_relative`` scores agreement with the dense model's answer (same pick, same greedy
tokens, same top-1), so a plan gets no credit for being right by luck where the dense model is
wrong; with ``relative="both_right"`` credit is given only where both are right.

Speed: multiple-choice items share the prompt through the KV cache (one forward of the prompt,
one batched forward of every choice); logits are computed only at scored positions. The dense
pass is done once per item with :meth:`Scorer.dense_reference` and passed back in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from envs.tasks.items import Item


@dataclass
class ItemScore:
    """Score of one item under one plan.

    Attributes:
        raw: Credit against the item's label (or, for text, against the dense model), in [0, 1].
        dense_relative: Credit for agreeing with the dense model, in [0, 1].
        details: Per-kind extras (pick, log-likelihoods, probability, KL ...).
    """

    raw: float
    dense_relative: float
    details: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """Scores items of every kind under a plan.

    Args:
        mc_norm: ``"sum"`` (total log-likelihood of a choice) or ``"mean"`` (per token).
        mc_metric: ``"acc"`` (1 if the pick is right) or ``"prob"`` (mass on the right choice).
        exact_method: ``"teacher"`` (one forward) or ``"generate"`` (real greedy decoding).
        max_new_tokens: Decoding budget for ``"generate"`` and for the dense reference of exact items
            (default: answer tokens + 4).
        relative: ``"agree"`` (same answer as the dense model) or ``"both_right"``.
        share_prefix: Reuse the prompt's KV cache across the choices of an item.
        tokenizer: Overrides ``slm.tokenizer`` (tiny test models have none).
    """

    def __init__(
        self,
        *,
        mc_norm: Literal["sum", "mean"] = "sum",
        mc_metric: Literal["acc", "prob"] = "acc",
        exact_method: Literal["teacher", "generate"] = "teacher",
        max_new_tokens: int | None = None,
        relative: Literal["agree", "both_right"] = "agree",
        share_prefix: bool = True,
        tokenizer: Any = None,
    ) -> None:
        checks = {
            "mc_norm": (mc_norm, ("sum", "mean")),
            "mc_metric": (mc_metric, ("acc", "prob")),
            "exact_method": (exact_method, ("teacher", "generate")),
            "relative": (relative, ("agree", "both_right")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"Scorer {name} must be one of {allowed}, got {value!r}")
        self.mc_norm, self.mc_metric, self.exact_method = mc_norm, mc_metric, exact_method
        self.max_new_tokens, self.relative, self.share_prefix = max_new_tokens, relative, share_prefix
        self.tokenizer = tokenizer
        self._enc_cache: dict[tuple[int, str], list[int]] = {}

    def config(self) -> dict[str, Any]:
        """The scoring settings (JSON-ready; the tokenizer override is named by its class only)."""
        return {
            "mc_norm": self.mc_norm,
            "mc_metric": self.mc_metric,
            "exact_method": self.exact_method,
            "max_new_tokens": self.max_new_tokens,
            "relative": self.relative,
            "share_prefix": self.share_prefix,
            "tokenizer": None if self.tokenizer is None else type(self.tokenizer).__name__,
        }

    # ------------------------------------------------------------------ tokens
    def tokenizer_of(self, slm: Any) -> Any:
        """The tokenizer items are encoded with: the override, else the model's.

        Raises:
            ValueError: Neither has one.
        """
        tok = self.tokenizer if self.tokenizer is not None else getattr(slm, "tokenizer", None)
        if tok is None:
            raise ValueError("this model has no tokenizer: pass Scorer(tokenizer=...)")
        return tok

    def encode(self, slm: Any, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (memoised)."""
        tok = self.tokenizer_of(slm)
        key = (id(tok), text)
        ids = self._enc_cache.get(key)
        if ids is None:
            ids = list(tok(text, add_special_tokens=False)["input_ids"]) if callable(tok) else list(tok.encode(text))
            if len(self._enc_cache) > 200_000:
                self._enc_cache.clear()
            self._enc_cache[key] = ids
        return ids

    def _decode(self, slm: Any, ids: Sequence[int]) -> str:
        return self.tokenizer_of(slm).decode(list(ids))

    def _eos(self, slm: Any) -> int | None:
        return getattr(self.tokenizer_of(slm), "eos_token_id", None)

    def _prompt(self, slm: Any, item: Item) -> list[int]:
        ids = self.encode(slm, item.prompt)
        if not ids:
            raise ValueError(f"item {item.id!r} has an empty prompt")
        return ids

    # ------------------------------------------------------------------ public API
    def dense_reference(self, slm: Any, item: Item) -> dict[str, Any]:
        """What the dense model says about ``item`` (computed once, passed to :meth:`score`)."""
        plan = slm.dense_plan()
        if item.kind == "mc":
            d = self._mc(slm, item, plan)
            return {"kind": "mc", "pick": d["pick"], "correct": d["correct"], "prob": d["prob"]}
        if item.kind == "exact":
            prompt = self._prompt(slm, item)
            budget = self._budget(slm, item)
            seq = slm.generate(torch.tensor([prompt]), plan, max_new_tokens=budget, eos_token_id=self._eos(slm))
            new = [int(t) for t in seq[0, len(prompt) :]]
            tokens = self._cut_at_stop(slm, new)
            text = self._clean(slm, new, item)
            correct = self._exact(slm, item, plan)["correct"] if self.exact_method == "teacher" else text == item.answer
            return {"kind": "exact", "tokens": tokens, "text": text, "correct": bool(correct)}
        lp = self._cont_logprobs(slm, self._prompt(slm, item), [self.encode(slm, " " + item.answer)], plan, False)[0]
        return {"kind": "text", "logprobs": lp, "top1": lp.argmax(-1)}

    def score(self, slm: Any, item: Item, plan: Any, dense: Mapping[str, Any] | None = None) -> ItemScore:
        """Score ``item`` under ``plan``; ``dense`` is :meth:`dense_reference`'s output (computed if ``None``)."""
        if dense is None:
            dense = self.dense_reference(slm, item)
        if dense.get("kind") != item.kind:
            raise ValueError(f"dense reference of kind {dense.get('kind')!r} does not match item kind {item.kind!r}")
        if item.kind == "mc":
            d = self._mc(slm, item, plan)
            raw = float(d["correct"]) if self.mc_metric == "acc" else d["prob"]
            agree = d["pick"] == dense["pick"]
            rel = float(agree) if self.relative == "agree" else float(d["correct"] and dense["correct"])
            return ItemScore(raw, rel, {**d, "agree": agree, "dense_correct": dense["correct"]})
        if item.kind == "exact":
            if self.exact_method == "teacher":
                d = self._exact(slm, item, plan, dense["tokens"])
            else:
                d = self._exact_generate(slm, item, plan, dense["text"])
            rel = float(d["agree"]) if self.relative == "agree" else float(d["correct"] and dense["correct"])
            return ItemScore(float(d["correct"]), rel, {**d, "dense_correct": dense["correct"]})
        d = self._text(slm, item, plan, dense)
        return ItemScore(d["agree"], d["agree"], d)

    # ------------------------------------------------------------------ kinds
    def _mc(self, slm: Any, item: Item, plan: Any) -> dict[str, Any]:
        assert item.choices is not None
        conts = [self.encode(slm, " " + c) for c in item.choices]
        ll = summed_logliks(self._cont_logprobs(slm, self._prompt(slm, item), conts, plan, False), conts)
        scores = ll / torch.tensor([len(c) for c in conts], dtype=ll.dtype) if self.mc_norm == "mean" else ll
        pick = int(scores.argmax())
        prob = float(torch.softmax(scores, 0)[item.label])
        return {"pick": pick, "correct": pick == item.label, "prob": prob, "loglik": ll.tolist()}

    def _budget(self, slm: Any, item: Item) -> int:
        return self.max_new_tokens or len(self.encode(slm, " " + item.answer)) + 4

    def _is_stop(self, slm: Any, token: int) -> bool:
        """Whether greedy decoding would end the answer at ``token`` (EOS, whitespace, punctuation)."""
        if token == self._eos(slm):
            return True
        text = self._decode(slm, [token])
        return not text or not text[0].isalnum()

    def _cut_at_stop(self, slm: Any, new: list[int]) -> list[int]:
        """The generated tokens up to and including the first one after which the answer has ended."""
        for j, t in enumerate(new):
            if j > 0 and self._is_stop(slm, t):
                return new[: j + 1]
        return new

    def _clean(self, slm: Any, new: list[int], item: Item) -> str:
        import re

        text = self._decode(slm, new).strip().split("\n")[0].strip()
        regex = item.meta.get("output_regex")
        if regex:
            m = re.search(regex, text)
            text = m.group(0) if m else text
        return text

    def _exact(self, slm: Any, item: Item, plan: Any, dense_tokens: list[int] | None = None) -> dict[str, Any]:
        ans = self.encode(slm, " " + item.answer)
        conts = [ans] if dense_tokens is None or not dense_tokens else [ans, dense_tokens]
        lps = self._cont_logprobs(slm, self._prompt(slm, item), conts, plan, True)
        top = lps[0].argmax(-1)
        hits = top[: len(ans)] == torch.tensor(ans)
        correct = bool(hits.all()) and self._is_stop(slm, int(top[len(ans)]))
        nll = float(-lps[0][: len(ans)].gather(-1, torch.tensor(ans)[:, None]).mean())
        out: dict[str, Any] = {"correct": correct, "token_acc": float(hits.float().mean()), "answer_nll": nll}
        if len(conts) == 2:
            assert dense_tokens is not None
            out["agree"] = bool((lps[1][: len(dense_tokens)].argmax(-1) == torch.tensor(dense_tokens)).all())
        else:
            out["agree"] = dense_tokens is not None  # the dense model produced nothing: nothing to disagree with
        return out

    def _exact_generate(self, slm: Any, item: Item, plan: Any, dense_text: str) -> dict[str, Any]:
        prompt = self._prompt(slm, item)
        seq = slm.generate(
            torch.tensor([prompt]), plan, max_new_tokens=self._budget(slm, item), eos_token_id=self._eos(slm)
        )
        text = self._clean(slm, [int(t) for t in seq[0, len(prompt) :]], item)
        return {"correct": text == item.answer, "agree": text == dense_text, "text": text}

    def _text(self, slm: Any, item: Item, plan: Any, dense: Mapping[str, Any]) -> dict[str, Any]:
        cont = self.encode(slm, " " + item.answer)
        lp = self._cont_logprobs(slm, self._prompt(slm, item), [cont], plan, False)[0]
        dlp = dense["logprobs"]
        kl = (dlp.exp() * (dlp - lp)).sum(-1)
        nll = -lp.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)
        return {
            "agree": float((lp.argmax(-1) == dense["top1"]).float().mean()),
            "kl": float(kl.mean()),
            "nll": float(nll.mean()),
            "next_token_acc": float((lp.argmax(-1) == torch.tensor(cont)).float().mean()),
        }

    # ------------------------------------------------------------------ the forward
    def _cont_logprobs(
        self, slm: Any, prompt: list[int], conts: list[list[int]], plan: Any, tail: bool
    ) -> list[torch.Tensor]:
        """Log-probabilities predicting each continuation's tokens (see :func:`continuation_logprobs`)."""
        return continuation_logprobs(slm, prompt, conts, plan, tail=tail, share_prefix=self.share_prefix)


def continuation_logprobs(
    slm: Any,
    prompt: list[int],
    conts: list[list[int]],
    plan: Any,
    *,
    tail: bool = False,
    share_prefix: bool = True,
    grad: bool = False,
) -> list[torch.Tensor]:
    """Log-probabilities at the positions that predict each continuation's tokens after ``prompt``.

    Row ``j`` of the ``i``-th result predicts ``conts[i][j]``; with ``tail`` one more row predicts
    the token after the continuation. Continuations are right-padded into one batch (causal
    attention: padding after a token never changes its logits). With ``share_prefix`` the prompt
    runs once and its KV cache is shared by every continuation. ``grad`` tracks gradients (the
    shared cache is part of the graph), so training can distil exactly what the scorer reads.
    """
    if any(len(c) == 0 for c in conts):
        raise ValueError("a continuation tokenised to nothing; check the item's answer/choices")
    feed = [len(c) - 1 + int(tail) for c in conts]  # continuation tokens that must be fed
    width = max(feed)
    P = len(prompt)
    with torch.set_grad_enabled(grad):
        if share_prefix and len(conts) > 1 and hasattr(slm, "new_cache"):
            cache = slm.new_cache()
            first = slm.forward(torch.tensor([prompt]), plan, cache=cache, logits="last", grad=grad).logits[0, -1:]
            rest: list[torch.Tensor] = []
            if width > 0:
                x = torch.tensor([c[:f] + [0] * (width - f) for c, f in zip(conts, feed, strict=True)])
                h = slm.forward(x, plan, cache=cache.expanded(len(conts)), logits="none", grad=grad).hidden
                rest = fed_logits(slm, h, feed)
            rows = [first if f == 0 else torch.cat([first, rest[i]]) for i, f in enumerate(feed)]
        else:
            x = torch.tensor([prompt + c[:f] + [0] * (width - f) for c, f in zip(conts, feed, strict=True)])
            logits = slm.forward(x, plan, logits=slice(P - 1, P + width), grad=grad).logits
            rows = [logits[i, : f + 1] for i, f in enumerate(feed)]
        return [torch.log_softmax(r.float(), dim=-1) for r in rows]


def fed_logits(slm: Any, hidden: torch.Tensor, feed: Sequence[int]) -> list[torch.Tensor]:
    """LM-head logits of the first ``feed[i]`` positions of each row of ``hidden`` (``[C, W, D]``, final-normed).

    Only those rows go through the head (padding does not), and every caller that scores
    continuations computes them here, so a staged run and a one-shot run give the same bits.
    """
    C, W, D = hidden.shape
    idx = torch.tensor([i * W + j for i, f in enumerate(feed) for j in range(f)], dtype=torch.long)
    out = slm.lm_head(hidden.reshape(C * W, D).index_select(0, idx.to(hidden.device)))
    return list(torch.split(out, list(feed)))


def choice_logliks(
    slm: Any, prompt: list[int], conts: list[list[int]], plan: Any, *, share_prefix: bool = True, grad: bool = False
) -> torch.Tensor:
    """Summed log-likelihood of each continuation after ``prompt``, ``[len(conts)]``: what the mc scorer ranks."""
    return summed_logliks(continuation_logprobs(slm, prompt, conts, plan, share_prefix=share_prefix, grad=grad), conts)


def summed_logliks(lps: Sequence[torch.Tensor], conts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each continuation's summed log-likelihood from its rows of :func:`continuation_logprobs`, ``[len(conts)]``."""
    return torch.stack([lp.gather(-1, torch.tensor(list(c))[:, None]).sum() for lp, c in zip(lps, conts, strict=True)])


def score_items(
    slm: Any,
    items: Sequence[Item],
    plan: Any,
    scorer: Scorer | None = None,
    dense: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]] | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """Score a batch of items under one plan.

    Args:
        slm: The model (a :class:`~envs.runtime.sparse_lm.SparseLM` or anything with its forward API).
        items: Items to score.
        plan: The plan.
        scorer: Defaults to ``Scorer()``.
        dense: Dense references, by item id or aligned with ``items`` (computed where missing).
        progress: Show a tqdm bar.
    """
    scorer = scorer or Scorer()
    it: Any = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc="score", leave=False)
    out = []
    for j, item in enumerate(it):
        ref = None
        if isinstance(dense, Mapping):
            ref = dense.get(item.id)
        elif dense is not None:
            ref = dense[j]
        out.append(scorer.score(slm, item, plan, ref))
    return out
