from types import SimpleNamespace

import pytest
import torch

from envs.tasks import Item, Scorer, make_item, score_items

V = 96  # printable ASCII minus one, plus newline


class CharTok:
    """Character tokenizer: id = ord(c) - 32 for printable ASCII, 95 for newline."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [95 if c == "\n" else ord(c) - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join("\n" if i == 95 else chr(int(i) + 32) for i in ids)


class FakeLM:
    """Knows the full texts of the items: under plan "dense" it predicts their next characters
    (a perfect model), under plan "broken" the character after that (always wrong)."""

    def __init__(self, texts: list[str]):
        self.tokenizer = CharTok()
        self.truth = [self.tokenizer.encode(t + "\n") for t in texts]
        self.calls = 0

    def dense_plan(self):
        return "dense"

    def _next(self, prefix: list[int]) -> int | None:
        for t in self.truth:
            if len(t) > len(prefix) and t[: len(prefix)] == prefix:
                return t[len(prefix)]
        return None

    def forward(self, ids, plan, logits="all", **_):
        self.calls += 1
        ids = torch.as_tensor(ids)
        B, T = ids.shape
        out = torch.zeros(B, T, V)
        for b in range(B):
            row = ids[b].tolist()
            for t in range(T):
                nxt = self._next(row[: t + 1])
                if nxt is not None:
                    out[b, t, nxt if plan == "dense" else (nxt + 1) % V] = 8.0
        sel = out[:, logits] if isinstance(logits, slice) else out
        return SimpleNamespace(logits=sel)

    def generate(self, ids, plan, max_new_tokens=8, eos_token_id=None):
        seq = torch.as_tensor(ids)
        for _ in range(max_new_tokens):
            nxt = self.forward(seq, plan).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        return seq


def _mc_item():
    return make_item("t", "Q: capital of France?\nA:", "Paris", choices=["London", "Paris", "Berlin", "Rome"])


def test_mc_perfect_and_wrong_model():
    item = _mc_item()
    lm = FakeLM([item.prompt + " Paris"])
    sc = Scorer()
    dense = sc.dense_reference(lm, item)
    assert dense["pick"] == 1 and dense["correct"]
    good = sc.score(lm, item, "dense", dense)
    assert good.raw == 1.0 and good.dense_relative == 1.0 and good.details["pick"] == 1
    bad = sc.score(lm, item, "broken", dense)
    assert bad.raw == 0.0 and bad.dense_relative == 0.0 and bad.details["pick"] != 1
    graded = Scorer(mc_metric="prob").score(lm, item, "dense")
    assert graded.raw > 0.99
    assert Scorer(mc_metric="prob").score(lm, item, "broken").raw < 0.01
    # Length normalisation changes the scores but not the pick of a perfect model.
    assert Scorer(mc_norm="mean").score(lm, item, "dense").raw == 1.0


def test_dense_relative_gives_no_credit_for_luck():
    item = _mc_item()
    lm = FakeLM([item.prompt + " Rome"])  # the "dense" model is confidently wrong
    dense = Scorer().dense_reference(lm, item)
    assert dense["pick"] == 3 and not dense["correct"]
    same = Scorer().score(lm, item, "dense", dense)
    assert same.raw == 0.0 and same.dense_relative == 1.0  # agrees with dense
    both = Scorer(relative="both_right").score(lm, item, "dense", dense)
    assert both.dense_relative == 0.0


def test_exact_match_teacher_and_generate_agree():
    item = make_item("t", "Q: 2+3?\nA:", "5")
    other = make_item("t", "Q: 7+8?\nA:", "15")
    lm = FakeLM([item.prompt + " 5", other.prompt + " 15"])
    for method in ("teacher", "generate"):
        sc = Scorer(exact_method=method)
        for it in (item, other):
            dense = sc.dense_reference(lm, it)
            assert dense["correct"] and dense["text"] == it.answer
            good = sc.score(lm, it, "dense", dense)
            bad = sc.score(lm, it, "broken", dense)
            assert (good.raw, good.dense_relative) == (1.0, 1.0), method
            assert (bad.raw, bad.dense_relative) == (0.0, 0.0), method


def test_exact_match_requires_the_answer_to_stop():
    item = make_item("t", "Q: 6*2?\nA:", "1")
    lm = FakeLM([item.prompt + " 12"])  # the model says 12: "1" is a prefix of its answer, not the answer
    assert Scorer().score(lm, item, "dense").raw == 0.0
    assert Scorer(exact_method="generate").score(lm, item, "dense").raw == 0.0


def test_text_fidelity():
    item = make_item("news", "The cat sat on", "the mat today", kind="text")
    lm = FakeLM([item.prompt + " the mat today"])
    sc = Scorer()
    dense = sc.dense_reference(lm, item)
    same = sc.score(lm, item, "dense", dense)
    assert same.raw == same.dense_relative == 1.0 and same.details["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same.details["next_token_acc"] == 1.0
    bad = sc.score(lm, item, "broken", dense)
    assert bad.raw == 0.0 and bad.details["kl"] > 1.0


def test_score_items_uses_precomputed_dense():
    items = [_mc_item(), make_item("t", "Q: 2+3?\nA:", "5")]
    lm = FakeLM([items[0].prompt + " Paris", items[1].prompt + " 5"])
    sc = Scorer()
    dense = {it.id: sc.dense_reference(lm, it) for it in items}
    before = lm.calls
    scores = score_items(lm, items, "dense", sc, dense)
    assert [s.raw for s in scores] == [1.0, 1.0]
    assert lm.calls - before == 2  # one forward per item: no dense pass repeated
    with pytest.raises(ValueError, match="kind"):
        sc.score(lm, items[0], "dense", dense[items[1].id])


class RealTok(CharTok):
    """The char tokenizer folded into the tiny models' 96-token vocabulary."""


def test_prefix_sharing_matches_plain_batch(tiny_llama):
    """The KV-cache path (prompt once, choices batched on an expanded cache) gives the same log-likelihoods."""
    item = make_item("t", "Pick one: ", "bb", choices=["a", "bb", "ccc", "dddd"])
    plan = tiny_llama.uniform_plan(layers=0.75, heads=0.5, mlp=0.5)
    shared = Scorer(tokenizer=RealTok(), share_prefix=True)._mc(tiny_llama, item, plan)
    plain = Scorer(tokenizer=RealTok(), share_prefix=False)._mc(tiny_llama, item, plan)
    assert shared["loglik"] == pytest.approx(plain["loglik"], abs=1e-4)
    assert shared["pick"] == plain["pick"]
    # And against a direct token-by-token log-likelihood with token_nll.
    tok = RealTok()
    for choice, ll in zip(item.choices, plain["loglik"], strict=True):
        ids = torch.tensor(tok.encode(item.prompt) + tok.encode(" " + choice))
        nll = tiny_llama.token_nll(ids, plan, start=len(tok.encode(item.prompt)))
        assert float(-nll.sum()) == pytest.approx(ll, abs=1e-4)


def test_teacher_forced_agreement_matches_real_greedy_decoding(tiny_llama):
    """On a real (tiny) model the one-forward decision equals decoding with SparseLM.generate."""
    tok = RealTok()
    sc = Scorer(tokenizer=tok, max_new_tokens=5)
    outcomes = set()
    for prompt in ("Echo: xyz ->", "abc", "Q: 1+1?\nA:"):
        item = make_item("t", prompt, "q")
        dense = sc.dense_reference(tiny_llama, item)
        assert dense["tokens"]
        assert sc.score(tiny_llama, item, tiny_llama.dense_plan(), dense).dense_relative == 1.0
        ids = torch.tensor(tok.encode(prompt))
        for frac in (0.75, 0.5, 0.25):
            plan = tiny_llama.uniform_plan(layers=frac, mlp=frac)
            got = sc.score(tiny_llama, item, plan, dense).dense_relative
            gen = tiny_llama.generate(ids, plan, max_new_tokens=len(dense["tokens"]))[0, len(ids) :].tolist()
            assert got == float(gen == dense["tokens"])
            outcomes.add(got)
            # A reference that differs from this plan's greedy tokens in the last one must score 0.
            wrong = gen[:-1] + [(gen[-1] + 1) % V]
            ref = {**dense, "tokens": wrong}
            assert sc.score(tiny_llama, item, plan, ref).dense_relative == 0.0
            assert sc.score(tiny_llama, item, plan, {**dense, "tokens": gen}).dense_relative == 1.0
    assert 1.0 in outcomes


def test_scorer_rejects_bad_options():
    with pytest.raises(ValueError, match="mc_norm"):
        Scorer(mc_norm="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokenizer"):
        Scorer().encode(SimpleNamespace(tokenizer=None), "x")
    assert isinstance(_mc_item(), Item)
