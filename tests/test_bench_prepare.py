"""The summary maths and plot of ``experiments.bench.prepare`` (no model needed)."""

from __future__ import annotations

import pytest

from experiments.bench.prepare import plot_curves, task_loss_at


def test_task_loss_interpolates_from_the_dense_point_and_takes_the_best_family() -> None:
    points = {"layers": [(0.8, 0.2), (0.6, 0.4)], "mlp": [(0.9, 0.1), (0.6, 0.2)]}
    loss, fam = task_loss_at(points, 0.7)
    assert fam == "mlp"
    assert loss == pytest.approx(0.1 + (0.9 - 0.7) / (0.9 - 0.6) * 0.1)
    # Between dense (cost 1, loss 0) and the first plan the dense point is used.
    assert task_loss_at({"mlp": [(0.8, 0.4)]}, 0.9) == (pytest.approx(0.2), "mlp")


def test_task_loss_is_none_where_no_curve_reaches_the_target() -> None:
    assert task_loss_at({"mlp": [(0.9, 0.1), (0.75, 0.2)]}, 0.7) is None
    assert task_loss_at({}, 0.7) is None


def test_plot_curves_writes_a_png(tmp_path) -> None:
    rows = []
    for model in ("original", "prepared"):
        rows.append({"model": model, "family": "dense", "cost": 1.0, "dnll": 0.0, "agree": 1.0})
        for fam in ("layers", "mlp"):
            for cost in (0.9, 0.7):
                rows.append({"model": model, "family": fam, "cost": cost, "dnll": 1 - cost, "agree": cost})
    curves = {m: {"layers": [(0.9, 0.1), (0.7, 0.3)], "mlp": [(0.9, 0.2)]} for m in ("original", "prepared")}
    path = tmp_path / "sub" / "curves.png"
    plot_curves(rows, curves, 0.7, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curves(rows, None, 0.7, tmp_path / "no_tasks.png", "test")
    assert (tmp_path / "no_tasks.png").stat().st_size > 0


def test_per_token_decoding_on_a_two_set_model() -> None:
    """Dense decoding is the original's; decoding one plan token by token equals its whole-sequence forward."""
    import copy

    import torch

    from envs.runtime.sparse_lm import SparseLM
    from experiments.bench.prepare import _decode_logprobs
    from tests.test_prepare import _peaked_tiny, _tokens

    slm = _peaked_tiny()
    g = torch.Generator().manual_seed(3)
    dual = SparseLM(copy.deepcopy(slm.model), importance=slm.importance)
    dual.set_adapted(
        {
            f"{i}.{n}": getattr(b, n) + 0.05 * torch.randn(getattr(b, n).shape, generator=g)
            for i, b in enumerate(slm.blocks)
            for n in ("k_w", "v_w", "up_w")
        }
    )
    ids, prefix = _tokens(1, 5)[0], 8
    dense, plan = slm.dense_plan(), slm.uniform_plan(mlp=0.5)
    n = len(ids) - prefix
    original = _decode_logprobs(slm, ids, prefix, [dense] * n)
    assert torch.equal(_decode_logprobs(dual, ids, prefix, [dense] * n), original)
    # Every decoded token pruned: the same as one forward whose prefix ran densely on the original weights.
    cache = dual.new_cache()
    dual.forward(ids[:prefix], dense, cache=cache, logits="none")
    whole = torch.log_softmax(dual.forward(ids[prefix:], plan, cache=cache).logits[0].float(), -1)
    assert torch.allclose(_decode_logprobs(dual, ids, prefix, [plan] * n), whole, atol=1e-4)
    # Mixed: a dense token after a pruned one attends to the keys and values that token wrote.
    mixed = [plan if t % 2 == 0 else dense for t in range(n)]
    lp = _decode_logprobs(dual, ids, prefix, mixed)
    assert torch.allclose(lp[0], whole[0], atol=1e-4)
    assert not torch.allclose(lp[1], original[1], atol=1e-3)


def test_losses_and_text_are_described_from_the_card() -> None:
    from experiments.bench.prepare import _losses_described, _text_described

    old = {"steps": 10, "config": {"batch_size": 2, "seq_len": 8}, "data": {"train": "news"}}
    assert _losses_described(old) == "losses: token KL × 1; "  # cards from before choice distillation
    assert _text_described(old) == "160 training tokens (news)"
    card = {
        "steps": 10,
        "config": {"kl_weight": 0.0, "choice_weight": 1.0, "choice_items_per_step": 4},
        "data": {"choice": "10 items"},
    }
    assert _losses_described(card) == "losses: no token KL, choice KL × 1 on 40 draws of 10 items; "
    assert _text_described(card) == "no training text (no token loss)"
