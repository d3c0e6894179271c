"""Pruning-ready preparation (envs.distill, experiments.prepare) on tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from envs.distill.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from envs.distill.config import PlanDistribution, PrepareConfig
from envs.distill.lora import LowRankDeltas
from envs.distill.sampler import PlanSampler, step_rng
from envs.distill.training import prepare_model
from envs.runtime.models import load_model, tiny_model
from envs.runtime.sparse_lm import SparseLM
from experiments.prepare import prepare
from tests.conftest import random_importance

SEQ = 32


def _peaked_tiny(seed: int = 0) -> SparseLM:
    """A tiny llama whose weights are scaled up, so that its logits are peaked and pruning hurts.

    A freshly initialised tiny model predicts an almost uniform distribution, which leaves nothing
    for distillation to recover.
    """
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    slm = SparseLM(model, name="tiny-llama")
    slm.set_importance(random_importance(slm.spec, seed=1))
    return slm


def _tokens(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 96, (n, SEQ), generator=g))


def _state(slm: SparseLM) -> dict[str, torch.Tensor]:
    """Every weight a forward may use: the model's and, if any, the adapted set of pruned layers."""
    out = {k: v.detach().clone() for k, v in slm.model.state_dict().items()}
    return out | {f"adapted.{k}": v.detach().clone() for k, v in slm.adapted_tensors().items()}


# One weight set for every plan (dense_weights="original" has tests of its own below).
BASE = {
    "method": "full",
    "dense_weights": "adapted",
    "seq_len": SEQ,
    "threads": 1,
    "progress": False,
    "eval_plans": 4,
    "warmup_steps": 0,
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path))
    return tmp_path


def test_preparation_lowers_pruned_kl_on_held_out_tokens(cache):
    slm = _peaked_tiny()
    cfg = {
        **BASE,
        "max_steps": 40,
        "batch_size": 4,
        "lr": 1e-3,
        "plan": {"families": ["mlp"], "mlp_levels": [0.5], "dense_prob": 0.2},
    }
    card = prepare(cfg, slm=slm, train_sequences=_tokens(64, 0), eval_sequences=_tokens(8, 99))
    before, after = card["before"]["pruned_kl"], card["after"]["pruned_kl"]
    assert before > 0.1  # the pruned plans really differ from the dense model
    assert after < 0.9 * before, (before, after)
    assert card["steps"] == 40 and card["stopped_by"] == "max_steps"
    # The dense path stays anchored: dense NLL on the held-out tokens moves little.
    assert abs(card["after"]["dense_nll"] - card["before"]["dense_nll"]) / card["before"]["dense_nll"] < 0.03


def test_lora_deltas_start_at_zero_and_train(cache):
    slm = _peaked_tiny()
    student = SparseLM(slm.model, importance=slm.importance, strategy="gather")
    ids = _tokens(1, 5)[0][None]
    plan = student.uniform_plan(mlp=0.5, heads=0.5)
    ref = student.forward(ids, plan).logits
    deltas = LowRankDeltas(student, rank=4, alpha=8.0, seed=0)
    with deltas.applied():
        assert torch.equal(student.forward(ids, plan).logits, ref)  # B = 0: no change
    cfg = {
        **BASE,
        "method": "lora",
        "max_steps": 20,
        "batch_size": 4,
        "lr": 3e-3,
        "plan": {"families": ["mlp"], "mlp_levels": [0.5]},
    }
    before = _state(slm)
    card = prepare(cfg, slm=slm, train_sequences=_tokens(64, 0), eval_sequences=_tokens(8, 99))
    after = _state(slm)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # deltas were merged into the weights
    assert card["after"]["pruned_kl"] < card["before"]["pruned_kl"]


def test_zero_steps_leaves_weights_bit_identical_and_folder_loads_by_name(cache):
    slm = _peaked_tiny()
    before = _state(slm)
    card = prepare(
        {**BASE, "max_steps": 0, "name": "tiny-ready"},
        slm=slm,
        train_sequences=_tokens(8, 0),
        eval_sequences=_tokens(2, 9),
    )
    after = _state(slm)
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert card["steps"] == 0 and card["weights_hash"] == card["base_weights_hash"]
    folder = cache / "prepared" / "tiny-ready"
    assert (folder / "card.json").is_file() and (folder / f"importance-{card['weights_hash']}.json").is_file()
    loaded = load_model("tiny-ready").model.state_dict()
    assert all(torch.equal(loaded[k], after[k]) for k in after)
    # A tiny model has no tokenizer, so calibration would fail: loading proves the saved orderings are used.
    again = SparseLM.from_pretrained("tiny-ready")
    assert again.importance.mlp_order == slm.importance.mlp_order
    assert again.importance.layer_order == slm.importance.layer_order


def test_checkpoint_round_trip(tmp_path):
    slm = _peaked_tiny()
    params = {n: p.detach().clone() for n, p in slm.model.named_parameters()}
    opt = torch.optim.AdamW([p for p in slm.model.parameters()], lr=1e-3)
    slm.model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", step=7, params=params, optimizer=opt, state={"seed": 3})
    got, opt_sd, state = load_checkpoint(tmp_path / "ck")
    assert state["step"] == 7 and state["seed"] == 3
    assert set(got) == set(params) and all(torch.equal(got[k], params[k]) for k in params)
    ref = opt.state_dict()
    assert opt_sd["param_groups"] == ref["param_groups"]
    for pid, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(opt_sd["state"][pid][k]), torch.as_tensor(v))
    with pytest.raises(FileNotFoundError, match="resume"):
        load_checkpoint(tmp_path / "nothing")


def _resume_and_straight(cfg, first_steps, total, train, held, ck, ck2):
    """Train ``first_steps`` into ``ck``, resume to ``total``; also train ``total`` straight into ``ck2``.

    Each run starts from a fresh copy of the base model (the teacher is the original weights).
    Returns ``(resumed, straight, resumed_card, straight_card)``.
    """
    prepare(
        {**cfg, "max_steps": first_steps, "checkpoint_dir": str(ck), "name": "a"},
        slm=_peaked_tiny(),
        train_sequences=train,
        eval_sequences=held,
    )
    resumed, straight = _peaked_tiny(), _peaked_tiny()
    card = prepare(
        {**cfg, "max_steps": total, "checkpoint_dir": str(ck), "resume": True, "name": "a"},
        slm=resumed,
        train_sequences=train,
        eval_sequences=held,
    )
    again = prepare(
        {**cfg, "max_steps": total, "checkpoint_dir": str(ck2), "name": "b"},
        slm=straight,
        train_sequences=train,
        eval_sequences=held,
    )
    return resumed, straight, card, again


def test_resume_continues_at_saved_step_and_matches_an_uninterrupted_run(cache, tmp_path):
    train, held = _tokens(32, 0), _tokens(2, 9)
    cfg = {**BASE, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "eval_plans": 1}
    ck = str(tmp_path / "ck")

    resumed, straight, card, _ = _resume_and_straight(cfg, 4, 6, train, held, ck, tmp_path / "ck2")
    assert card["steps"] == 6
    a, b = _state(resumed), _state(straight)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    # A resume with other training settings is refused.
    with pytest.raises(ValueError, match="different training configuration"):
        prepare(
            {**cfg, "lr": 5e-4, "max_steps": 8, "checkpoint_dir": ck, "resume": True, "name": "a"},
            slm=_peaked_tiny(),
            train_sequences=train,
            eval_sequences=held,
        )


def test_time_budget_counts_the_training_before_a_resume(cache, tmp_path):
    import json

    train, held = _tokens(8, 0), _tokens(2, 9)
    cfg = {**BASE, "checkpoint_every": 1, "eval_plans": 1, "checkpoint_dir": str(tmp_path / "ck"), "name": "a"}
    prepare({**cfg, "max_steps": 2}, slm=_peaked_tiny(), train_sequences=train, eval_sequences=held)
    state_file = latest_checkpoint(tmp_path / "ck") / "state.json"
    state = json.loads(state_file.read_text())
    assert state["step"] == 2
    # Trained for the whole budget before the interruption: the resumed run adds no step.
    # With budget left it continues to max_steps.
    for seconds_before, max_steps, expected in ((61.0, 10, (2, "time_budget")), (1.0, 4, (4, "max_steps"))):
        state_file.write_text(json.dumps({**state, "train_seconds": seconds_before}))
        card = prepare(
            {**cfg, "max_steps": max_steps, "time_budget_min": 1.0, "resume": True},
            slm=_peaked_tiny(),
            train_sequences=train,
            eval_sequences=held,
        )
        assert (card["steps"], card["stopped_by"]) == expected


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"plan": {"families": ["layers", "attention-sinks"]}}, "families"),
        ({"plan": {"layer_rate_max": 1.5}}, "layer_rate_max"),
        ({"plan": {"dense_prob": -0.1}}, "dense_prob"),
        ({"plan": {"kv_drop_prob": float("nan")}}, "kv_drop_prob"),
        ({"plan": {"kv_shared_prob": 2}}, "kv_shared_prob"),
        ({"plans_per_step": 0}, "plans_per_step"),
        ({"plan": {"mlp_levels": [0.5, 1.2]}}, r"mlp_levels\[1\]"),
        ({"plan": {"layer_choice": "random"}}, "layer_choice"),
        ({"method": "qlora"}, "method"),
        ({"max_steps": -1}, "max_steps"),
        ({"learning_rate": 1e-4}, "learning_rate"),
    ],
)
def test_bad_config_is_a_clear_error(override, field):
    with pytest.raises(ValueError, match=field):
        prepare({**BASE, **override}, slm=_peaked_tiny(), train_sequences=_tokens(4, 0), eval_sequences=_tokens(1, 1))


def test_sampler_draws_valid_plans_with_depth_rising_layer_dropout():
    slm = SparseLM(tiny_model("llama", seed=0, num_layers=8), name="tiny")
    slm.set_importance(random_importance(slm.spec, seed=2))
    dist = PlanDistribution.from_dict(
        {"families": ["layers"], "layer_choice": "depth", "dense_prob": 0.0, "family_prob": 1.0, "layer_rate_max": 0.8}
    )
    sampler = PlanSampler(slm, dist)
    plans = [sampler.sample(step_rng(0, s)) for s in range(400)]
    dropped = np.array([[not lp.run for lp in p.layers] for p in plans]).mean(0)
    assert dropped[0] == 0.0 and dropped[-1] > 0.6 and dropped[-1] > dropped[3] > dropped[1]
    assert all(p.layers_run >= 1 for p in plans)
    # Same (seed, step): same plan; the default distribution mixes all families and the dense plan.
    full = PlanSampler(slm, PlanDistribution.from_dict({"dense_prob": 0.33}))
    assert full.sample(step_rng(1, 5)) == full.sample(step_rng(1, 5))
    mix = [full.sample(step_rng(0, s)) for s in range(300)]
    assert 0.1 < np.mean([p.is_dense for p in mix]) < 0.45
    assert any(len(lp.kv_heads) < slm.spec.num_kv_heads for p in mix for lp in p.layers if lp.run)
    assert any(lp.mlp_channels < slm.spec.intermediate_size for p in mix for lp in p.layers if lp.run)
    for p in mix:
        p.validate()


def test_shared_kv_draws_keep_one_group_count_in_every_running_layer():
    slm = SparseLM(tiny_model("llama", seed=0, num_layers=6), name="tiny")
    slm.set_importance(random_importance(slm.spec, seed=2))
    dist = PlanDistribution.from_dict(
        {"families": ["kv"], "dense_prob": 0.0, "family_prob": 1.0, "kv_shared_prob": 1.0}
    )
    plans = [PlanSampler(slm, dist).sample(step_rng(0, s)) for s in range(50)]
    counts = [{len(lp.kv_heads) for lp in p.layers if lp.run} for p in plans]
    assert all(len(c) == 1 and 1 <= next(iter(c)) < slm.spec.num_kv_heads for c in counts)
    # Without sharing, layers draw their own counts (and some keep every group).
    free = PlanDistribution.from_dict({"families": ["kv"], "dense_prob": 0.0, "family_prob": 1.0, "kv_drop_prob": 0.5})
    mixed = [PlanSampler(slm, free).sample(step_rng(0, s)) for s in range(50)]
    assert any(len({len(lp.kv_heads) for lp in p.layers if lp.run}) > 1 for p in mixed)


@pytest.mark.parametrize("dense_weights", ["adapted", "original"])
def test_several_plans_per_step_with_lora_train_and_resume_exactly(cache, tmp_path, dense_weights):
    # The deltas' graph is shared by the step's plans; resume must still equal a straight run.
    train, held = _tokens(32, 0), _tokens(2, 9)
    cfg = {
        **BASE,
        "method": "lora",
        "dense_weights": dense_weights,
        "lr": 3e-3,
        "batch_size": 2,
        "plans_per_step": 3,
        "checkpoint_every": 2,
        "eval_plans": 2,
        "plan": {"families": ["mlp", "kv"], "mlp_levels": [0.5], "dense_prob": 0.0},
    }
    ck = str(tmp_path / "ck")
    resumed, straight, card, again = _resume_and_straight(cfg, 2, 4, train, held, ck, tmp_path / "ck2")
    a, b = _state(resumed), _state(straight)
    assert set(a) == set(b) and any(k.startswith("adapted.") for k in a) == (dense_weights == "original")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    base = _state(_peaked_tiny())
    assert card["steps"] == again["steps"] == 4
    # The averaged gradients moved the weights: the model's, or only the adapted set's.
    moved = [k for k in b if k not in base or not torch.equal(base[k], b[k])]
    assert moved and all(k.startswith("adapted.") for k in moved) == (dense_weights == "original")


def test_training_moves_weights_only_through_gathered_slices():
    # strategy="gather" is what lets a pruned forward's gradient reach the parameters.
    slm = _peaked_tiny()
    teacher = copy.deepcopy(slm.model)
    cfg = PrepareConfig.from_dict(
        {
            "max_steps": 3,
            "seq_len": SEQ,
            "warmup_steps": 0,
            "lr": 1e-3,
            "eval_plans": 0,
            "dense_weights": "adapted",
            "plan": {"families": ["mlp"], "mlp_levels": [0.5], "dense_prob": 0.0},
        }
    )
    prepare_model(slm, _tokens(8, 0), _tokens(1, 1), cfg, progress=False)
    changed = [
        n for (n, p), q in zip(slm.model.named_parameters(), teacher.parameters(), strict=True) if not torch.equal(p, q)
    ]
    assert any("mlp.down_proj" in n for n in changed)
    assert not any("embed_tokens" in n for n in changed)  # embeddings are frozen by default


def test_hydra_config_composes_and_validates():
    from hydra import compose, initialize_config_dir

    from experiments.prepare import split_config
    from experiments.report import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose("prepare", overrides=["max_steps=3", "plan.layer_rate_max=0.5", "resume=true"])
    run, tcfg = split_config(cfg)
    assert run["resume"] is True and run["model"] == "smollm2-135m"
    assert tcfg.max_steps == 3 and tcfg.plan.layer_rate_max == 0.5 and tcfg.method in ("full", "lora")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        bad = compose("prepare", overrides=["plan.families=[layers,depth]"])
    with pytest.raises(ValueError, match="families"):
        split_config(bad)


def test_training_text_refuses_unknown_sources():
    from experiments.prepare import training_text

    with pytest.raises(ValueError, match="wikipedia"):
        training_text(["news", "wikipedia"])
    with pytest.raises(ValueError, match="prepare.text"):
        training_text([])


def test_training_text_is_train_split_only():
    from envs.data.corpus import natural_text
    from envs.tasks import load_task
    from experiments.prepare import training_text

    docs, desc = training_text(["news", "polarity", "pydoc", "tasks"])
    assert "news" in desc and "polarity" in desc and "Python" in desc and "workload" in desc
    text = "\n".join(docs)
    held_news = natural_text("val") + natural_text("test")
    assert held_news and not any(d in text for d in held_news)
    held_reviews = [it.meta["text"] for s in ("val", "test") for it in load_task("gensim/polarity", s)]
    assert held_reviews and not any(r in text for r in held_reviews)
    # Task documents are solved items separated by blank lines: none of them is a val or test item.
    solved = {part.strip() for d in docs for part in d.split("\n\n")}
    held_items = {
        f"{it.prompt} {it.answer}".strip()
        for task in ("gensim/facts", "gensim/odd-one-out", "gen/sub-2:mc", "gen/kv-3:mc")
        for s in ("val", "test")
        for it in load_task(task, s)
    }
    train_items = {f"{it.prompt} {it.answer}".strip() for it in load_task("gen/kv-3:mc", "train")}
    assert held_items and train_items <= solved and not held_items & solved


def test_config_file_and_dataclass_defaults_agree():
    # Benchmarks and library callers get PrepareConfig()'s defaults; the command line gets the file's.
    from hydra import compose, initialize_config_dir

    from experiments.prepare import split_config
    from experiments.report import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        _, tcfg = split_config(compose("prepare"))
    assert tcfg == PrepareConfig()


@pytest.mark.parametrize(("method", "lr"), [("lora", 3e-3), ("full", 1e-3)])
def test_original_dense_weights_keep_the_dense_model_exact(cache, method, lr):
    slm = _peaked_tiny()
    before = _state(slm)
    ids = _tokens(1, 5)[0][None]
    dense_ref = slm.forward(ids).logits
    cfg = {
        **BASE,
        "method": method,
        "dense_weights": "original",
        "max_steps": 20,
        "batch_size": 4,
        "lr": lr,
        "name": "tiny-dual",
        "plan": {"families": ["mlp"], "mlp_levels": [0.5]},
    }
    card = prepare(cfg, slm=slm, train_sequences=_tokens(64, 0), eval_sequences=_tokens(8, 99))
    after = {k: v for k, v in _state(slm).items() if not k.startswith("adapted.")}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model's own weights are untouched
    assert torch.equal(slm.forward(ids).logits, dense_ref)
    assert card["after"]["dense_nll"] == card["before"]["dense_nll"]
    assert card["after"]["pruned_kl"] < 0.9 * card["before"]["pruned_kl"], (card["before"], card["after"])
    assert card["weights_hash"] != card["base_weights_hash"]
    plan = slm.uniform_plan(mlp=0.5)
    pruned = slm.forward(ids, plan).logits
    assert not torch.allclose(pruned, SparseLM(copy.deepcopy(slm.model), importance=slm.importance)(ids, plan).logits)
    again = SparseLM.from_pretrained("tiny-dual")  # the folder holds both sets and loads by name
    assert again.adapted is not None and again.weights_hash == card["weights_hash"]
    assert torch.equal(again.forward(ids).logits, dense_ref)
    assert torch.allclose(again.forward(ids, plan).logits, pruned, atol=1e-5)


def test_adapted_weights_take_over_from_the_first_pruned_layer():
    from envs.runtime.plan import SparsityPlan

    slm = _peaked_tiny()
    g = torch.Generator().manual_seed(3)
    adapted = {
        f"{i}.{n}": getattr(b, n) + 0.05 * torch.randn(getattr(b, n).shape, generator=g)
        for i, b in enumerate(slm.blocks)
        for n in ("q_w", "up_w", "down_w")
    }
    dual = SparseLM(copy.deepcopy(slm.model), importance=slm.importance)
    dual.set_adapted(adapted)
    ids = _tokens(1, 7)[0][None]
    assert torch.equal(dual.forward(ids).logits, slm.forward(ids).logits)
    # A plan that prunes from layer 2 on: layers 0-1 run the original weights, layers 2-3 the adapted.
    dense = slm.dense_plan()
    plan = SparsityPlan(slm.spec, [*dense.layers[:2], *slm.uniform_plan(mlp=0.5, heads=0.5).layers[2:]])
    ref = SparseLM(copy.deepcopy(slm.model))
    with torch.no_grad():
        for key, t in adapted.items():
            i, n = key.split(".")
            if int(i) >= 2:
                getattr(ref.blocks[int(i)], n).copy_(t)
    ref.set_importance(slm.importance)
    want = ref.forward(ids, plan).logits
    assert torch.allclose(dual.forward(ids, plan).logits, want, atol=1e-5)
    assert not torch.allclose(slm.forward(ids, plan).logits, want, atol=1e-3)  # the switch is real
    # Run in stages (dense layers first, as a probe does): the switch happens at the same layer.
    state = dual.start(ids)
    dual.run_layers(state, dense, 0, 2)
    dual.run_layers(state, plan, 2)
    assert torch.allclose(dual.finish(state).logits, want, atol=1e-5)


def test_set_adapted_refuses_foreign_weights():
    slm = _peaked_tiny()
    with pytest.raises(ValueError, match="layer < 4"):
        slm.set_adapted({"9.q_w": slm.blocks[0].q_w})
    with pytest.raises(ValueError, match="name in"):
        slm.set_adapted({"0.attn_norm": slm.blocks[0].q_w})
    with pytest.raises(ValueError, match="shape"):
        slm.set_adapted({"0.q_w": torch.zeros(3, 3)})
    slm.set_adapted({"0.q_w": slm.blocks[0].q_w * 2})
    with pytest.raises(ValueError, match="2:4"):
        slm.enable_two_four()
    slm.set_adapted(None)
    assert slm.adapted is None and slm.adapted_tensors() == {}


# ---------------------------------------------------------------------------------------- choice distillation
def _choice_items(n: int, seed: int):
    """Multiple-choice items of random prompts of uneven length whose choices come from one pool.

    Shared choices (as "positive" / "negative" are for every polarity item) give held-out items
    something in common with the training items.
    """
    from envs.distill.data import ChoiceItem

    rng = np.random.default_rng(seed)
    pool = [(5,), (17, 3), (40, 41, 42), (77,), (60, 8)]
    out = []
    for _ in range(n):
        prompt = tuple(int(t) for t in rng.integers(0, 96, int(rng.choice([6, 9, 24]))))
        picks = rng.choice(len(pool), int(rng.integers(2, 5)), replace=False)
        out.append(ChoiceItem(prompt, tuple(pool[int(i)] for i in picks)))
    return out


def test_choice_scores_equal_the_scorer_for_items_of_uneven_width():
    from envs.distill.losses import choice_scores
    from envs.tasks.scoring import choice_logliks

    slm = _peaked_tiny()
    items = _choice_items(7, 3)
    plan = slm.uniform_plan(mlp=0.5)
    got = choice_scores(slm, items, plan)
    assert [g.shape[0] for g in got] == [len(it.choices) for it in items]
    for it, g in zip(items, got, strict=True):
        ref = choice_logliks(slm, list(it.prompt), [list(c) for c in it.choices], plan)
        assert torch.allclose(g, ref, atol=1e-4), (g, ref)
    with pytest.raises(ValueError, match="two non-empty choices"):
        type(items[0])((1, 2), ((3,),))


def test_choice_kl_is_zero_only_for_equal_softmaxes():
    from envs.distill.losses import choice_kl

    t = torch.tensor([-1.0, -2.0, -4.0])
    assert float(choice_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    assert float(choice_kl(t + 3.0, t)) == pytest.approx(0.0, abs=1e-6)  # a shift keeps every softmax
    assert float(choice_kl(torch.tensor([-4.0, -2.0, -1.0]), t)) > 0.5


def _choice_run(kl_weight: float, train_items, held_items):
    cfg = {
        "method": "lora",
        "dense_weights": "original",
        "seq_len": SEQ,
        "warmup_steps": 0,
        "max_steps": 40,
        "batch_size": 4,
        "lr": 1e-3,
        "eval_plans": 1,
        "choice_weight": 1.0,
        "kl_weight": kl_weight,
        "choice_items_per_step": 8,
        "plan": {"families": ["mlp"], "mlp_levels": [0.5], "mlp_shared_prob": 1.0, "family_prob": 1.0},
    }
    slm = _peaked_tiny()
    base = _state(slm)
    result = prepare_model(
        slm,
        _tokens(64, 0),
        _tokens(2, 9),
        PrepareConfig.from_dict(cfg),
        progress=False,
        choice_items=train_items,
        eval_choice_items=held_items,
    )
    # The dense model is the original exactly; only the adapted set moved.
    after = _state(slm)
    assert all(torch.equal(base[k], after[k]) for k in base if not k.startswith("adapted."))
    assert any(k.startswith("adapted.") for k in after)
    assert result.after["dense_kl"] == 0.0
    return result


def test_choice_distillation_with_the_token_kl_lowers_the_held_out_choice_kl(cache):
    result = _choice_run(1.0, _choice_items(512, 0), _choice_items(32, 1))
    before, after = result.before["pruned_choice_kl"], result.after["pruned_choice_kl"]
    assert before > 0.03  # the pruned plan really moves the choice scores
    assert after < 0.7 * before, (before, after)
    assert 0.0 <= result.after["pruned_pick_agree"] <= 1.0


def test_choice_distillation_alone_fits_its_items_without_the_text(cache):
    # kl_weight=0: only the choice loss trains (no text forward at all); measured on the training items.
    items = _choice_items(64, 0)
    result = _choice_run(0.0, items, items)
    before, after = result.before["pruned_choice_kl"], result.after["pruned_choice_kl"]
    assert after < 0.5 * before, (before, after)
    assert result.after["pruned_pick_agree"] >= result.before["pruned_pick_agree"]


def test_choice_loss_needs_items_and_some_loss_needs_a_weight():
    slm, seqs = _peaked_tiny(), _tokens(4, 0)
    cfg = PrepareConfig.from_dict({"seq_len": SEQ, "choice_weight": 1.0, "max_steps": 1, "eval_plans": 0})
    with pytest.raises(ValueError, match="choice_mix"):
        prepare_model(slm, seqs, seqs[:1], cfg, progress=False)
    with pytest.raises(ValueError, match="nothing is trained"):
        PrepareConfig.from_dict({"kl_weight": 0.0})
    with pytest.raises(ValueError, match="choice_items_per_step"):
        PrepareConfig.from_dict({"choice_items_per_step": 0})
    with pytest.raises(ValueError, match="choice_mix"):
        prepare({**BASE, "choice_weight": 1.0}, slm=slm, train_sequences=seqs, eval_sequences=seqs[:1])


class _CharTokenizer:
    """Characters as token ids: decodes back exactly, so a test can read what was trained on."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_choice_items_are_train_split_questions_only():
    from envs.tasks import load_mix
    from experiments.prepare import choice_data

    train, held, desc = choice_data("mc", _CharTokenizer(), 300, 16)
    assert len(train) == 300 and len(held) == 16 and "300" in desc

    def question(prompt) -> str:  # the item's own question, after its few-shot prefix
        return "".join(map(chr, prompt)).split("\n\n")[-1]

    trained = {question(it.prompt) for it in train}
    held_q = {it.prompt.split("\n\n")[-1] for s in ("val", "test") for it in load_mix("mc", s)}
    assert held_q and not trained & held_q
    assert {question(it.prompt) for it in held} <= held_q  # the measured items are val items
    # Drawn in the mix's weights (load_mix with n), so thousands of arithmetic items do not crowd out the rest.
    weighted = load_mix("mc", "train", n=300, seed=0)
    assert ["".join(map(chr, it.prompt)) for it in train] == [it.prompt for it in weighted]
    assert sum("digit" not in it.task for it in weighted) > 100
