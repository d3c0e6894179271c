"""Per-token channel rules (``gate``, ``input``, ``predicted``, ``input_attn``): what they compute, exactly.

The reference runs the transformers model itself, with each layer's MLP replaced by a function of
the model's own projection modules that zeroes exactly the unselected channels (or, for ``input``,
input entries, and for ``input_attn`` the attention projections' input entries too): no SparseLM code path
is involved.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from envs.runtime.models import tiny_model
from envs.runtime.plan import MLP_RULES, TOKEN_RULES, LayerPlan, SparsityPlan, attn_proj_flops, mlp_flops
from envs.runtime.sparse_lm import SparseLM

IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 11, 2, 33, 21, 8, 14]])


class RandomPredictor:
    """A stand-in channel predictor: a fixed random low-rank map per layer."""

    def __init__(self, spec, rank: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = [torch.randn(rank, spec.hidden_size, generator=g) for _ in range(spec.num_layers)]
        self.b = [torch.randn(spec.intermediate_size, rank, generator=g) for _ in range(spec.num_layers)]
        self.rank = rank

    @property
    def num_layers(self) -> int:
        return len(self.a)

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a[layer]), self.b[layer])

    def flops_per_token(self) -> float:
        return 2.0 * (self.a[0].numel() + self.b[0].numel())

    def to(self, device, dtype):
        return self


def _mask_top(t: torch.Tensor, k: int, by: torch.Tensor | None = None) -> torch.Tensor:
    idx = (t.abs() if by is None else by).topk(k, dim=-1).indices
    return torch.zeros_like(t).scatter(-1, idx, t.gather(-1, idx))


def _reference_logits(slm: SparseLM, rule: str, k: int, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward with every MLP replaced by the masked form of ``rule`` at ``k`` channels."""
    model = slm.model
    I, D = slm.spec.intermediate_size, slm.spec.hidden_size
    kd = max(1, round(k / I * D))
    layers = model.transformer.h if slm.family == "gpt2" else model.model.layers
    saved = []
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        gpt2 = slm.family == "gpt2"

        def fwd(x, mlp=mlp, i=i, gpt2=gpt2):
            def pre(z):
                if gpt2:
                    return mlp.act(mlp.c_fc(z)), None
                return mlp.act_fn(mlp.gate_proj(z)), mlp.up_proj(z)

            if rule in ("input", "input_attn"):
                first, up = pre(_mask_top(x, kd))
            else:
                first, up = pre(x)
            a = first if up is None else first * up
            if rule == "gate":
                a = _mask_top(a, k, by=first.abs())
            elif rule in ("input", "input_attn"):
                a = _mask_top(a, k)
            else:
                a = _mask_top(a, k, by=slm.predictor.scores(i, x))
            return mlp.c_proj(a) if gpt2 else mlp.down_proj(a)

        saved.append((mlp, mlp.forward))
        mlp.forward = fwd
    hooks = []
    if rule == "input_attn":  # every attention projection reads the same share of its input entries
        for layer in layers:
            attn = layer.attn if slm.family == "gpt2" else layer.self_attn
            ins = [attn.c_attn] if slm.family == "gpt2" else [attn.q_proj, attn.k_proj, attn.v_proj]
            for mod in [*ins, attn.c_proj if slm.family == "gpt2" else attn.o_proj]:
                hooks.append(
                    mod.register_forward_pre_hook(
                        lambda _m, args: (_mask_top(args[0], max(1, round(k / I * args[0].shape[-1]))),)
                    )
                )
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for mlp, f in saved:
            mlp.forward = f
        for hook in hooks:
            hook.remove()


def _rule_slm(family: str) -> SparseLM:
    slm = SparseLM(tiny_model(family, seed=2))
    slm.set_predictor(RandomPredictor(slm.spec))
    return slm


@pytest.mark.parametrize("rule", TOKEN_RULES)
def test_every_channel_is_dense(family, rule):
    slm = _rule_slm(family)
    plan = SparsityPlan.uniform(slm.spec, slm.importance, mlp=1.0, mlp_rule=rule)
    assert plan.is_dense
    with torch.no_grad():
        ref = slm.model(IDS).logits
    assert (slm(IDS, plan).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rule", TOKEN_RULES)
@pytest.mark.parametrize("frac", [0.75, 0.5, 0.25])
def test_rule_equals_masked_reference(family, rule, frac):
    slm = _rule_slm(family)
    plan = SparsityPlan.uniform(slm.spec, slm.importance, mlp=frac, mlp_rule=rule)
    k = plan.layers[0].mlp_channels
    assert plan.token_rules == {rule}
    ref = _reference_logits(slm, rule, k, IDS)
    masked = slm(IDS, plan).logits  # 12 tokens: the masked form
    assert (masked - ref).abs().max().item() <= 1e-4
    # Decoding token by token runs the sparse form; it must give the same logits.
    cache = slm.new_cache()
    steps = [slm(IDS[:, t : t + 1], plan, cache=cache).logits for t in range(IDS.shape[1])]
    assert (torch.cat(steps, dim=1) - ref).abs().max().item() <= 1e-4
    slm.rule_impl = "masked"
    cache = slm.new_cache()
    steps_m = [slm(IDS[:, t : t + 1], plan, cache=cache).logits for t in range(IDS.shape[1])]
    assert (torch.cat(steps_m, dim=1) - ref).abs().max().item() <= 1e-4


def test_the_set_depends_on_the_token_and_is_deterministic(tiny_llama):
    slm = tiny_llama
    slm.set_predictor(RandomPredictor(slm.spec))
    I = slm.spec.intermediate_size
    for rule in TOKEN_RULES:
        plan = SparsityPlan.uniform(slm.spec, slm.importance, mlp=0.5, mlp_rule=rule)
        sets = []
        for _ in range(2):
            seen: list[torch.Tensor] = []
            slm(
                IDS,
                plan,
                observer=lambda i, name, t, seen=seen: seen.append(t) if name == "mlp_act" and i == 1 else None,
            )
            sets.append(seen[0][0] != 0)
        assert torch.equal(sets[0], sets[1]), rule  # deterministic for one input
        kept = sets[0]
        assert (kept.sum(-1) <= I // 2).all()
        assert len({tuple(row.nonzero().flatten().tolist()) for row in kept}) > 1, rule  # per token


def test_plan_json_carries_the_rule_and_validation(tiny_llama):
    s = tiny_llama.spec
    plan = SparsityPlan.uniform(s, tiny_llama.importance, mlp=0.5, mlp_rule="gate")
    back = SparsityPlan.from_json(plan.to_json())
    assert back == plan and back.layers[0].mlp_rule == "gate"
    old = plan.to_dict()
    for lp in old["layers"]:
        del lp["mlp_rule"]
    assert SparsityPlan.from_dict(old).layers[0].mlp_rule == "static"  # plans written before rules load
    assert "mlp_rule" not in SparsityPlan.dense(s).to_dict()["layers"][0]  # static plans' JSON is as before
    with pytest.raises(ValueError, match="each one of"):
        SparsityPlan.uniform(s, tiny_llama.importance, mlp=0.5, mlp_rule="magic")
    lp = LayerPlan(True, tuple(range(s.num_heads)), tuple(range(s.num_kv_heads)), s.intermediate_size, True, "gate")
    with pytest.raises(ValueError, match="does not combine"):
        SparsityPlan(s, (lp,) * s.num_layers)
    # A rule on every channel or none is the static layer (same work whatever the rule).
    assert SparsityPlan.uniform(s, tiny_llama.importance, mlp=1.0, mlp_rule="input").token_rules == set()
    assert "per token by gate" in plan.describe()


def test_predicted_without_a_predictor_is_refused(tiny_llama):
    plan = SparsityPlan.uniform(tiny_llama.spec, tiny_llama.importance, mlp=0.5, mlp_rule="predicted")
    with pytest.raises(RuntimeError, match="no channel predictor"):
        tiny_llama(IDS, plan)


def test_rule_flops(tiny_llama):
    s = tiny_llama.spec
    D, I = s.hidden_size, s.intermediate_size
    k = I // 2
    full = (True, tuple(range(s.num_heads)), tuple(range(s.num_kv_heads)))
    f = {r: mlp_flops(s, LayerPlan(*full, k, mlp_rule=r), 1, predictor_flops=100.0) for r in MLP_RULES}
    assert f["static"] == 2 * 3 * D * k
    assert f["gate"] == 2 * D * I + 2 * 2 * D * k + I  # the whole gate, then up and down for k
    assert f["predicted"] == 2 * 3 * D * k + 100.0 + I
    assert f["static"] < f["predicted"] < f["gate"]
    assert f["input_attn"] == f["input"]  # the same MLP; its attention is counted with the attention
    a = {r: attn_proj_flops(s, LayerPlan(*full, k, mlp_rule=r), 1) for r in MLP_RULES}
    d, h, kv = s.head_dim, s.num_heads, s.num_kv_heads
    assert all(a[r] == 2 * D * d * (2 * h + 2 * kv) for r in MLP_RULES if r != "input_attn")
    kd, ko = round(D / 2), round(h * d / 2)
    assert a["input_attn"] == 2 * kd * d * (h + 2 * kv) + 2 * ko * D + D + h * d
    plans = {r: SparsityPlan.uniform(s, tiny_llama.importance, mlp=0.5, mlp_rule=r) for r in ("input", "input_attn")}
    fl = {r: p.flops(1) for r, p in plans.items()}
    assert fl["input_attn"]["mlp"] == fl["input"]["mlp"]
    assert fl["input_attn"]["attention"] < 0.7 * fl["input"]["attention"]


def test_input_attn_sparsifies_the_attention_projections(tiny_llama, monkeypatch):
    """``input_attn`` is ``input`` plus sparse attention inputs; decoding reads transposed q/k/v and o copies."""
    slm = tiny_llama
    plans = {r: SparsityPlan.uniform(slm.spec, slm.importance, mlp=0.5, mlp_rule=r) for r in ("input", "input_attn")}
    logits = {r: slm(IDS, p).logits for r, p in plans.items()}
    assert (logits["input"] - logits["input_attn"]).abs().max().item() > 1e-3
    kinds: list[str] = []
    real = SparseLM._rule_weight
    monkeypatch.setattr(SparseLM, "_rule_weight", lambda self, i, kind: kinds.append(kind) or real(self, i, kind))
    _decode(slm, plans["input_attn"], n=2)
    L = slm.spec.num_layers
    assert kinds.count("qkv_t") == kinds.count("o_t") == 2 * L
    # With heads pruned as well, the kept heads' projections run in the masked form; still the same numbers.
    s = slm.spec
    lp = LayerPlan(True, tuple(range(s.num_heads - 1)), tuple(range(s.num_kv_heads)), s.intermediate_size // 2)
    pruned = SparsityPlan(s, (replace(lp, mlp_rule="input_attn"),) * L)
    kinds.clear()
    sparse = _decode(slm, pruned)
    assert "qkv_t" not in kinds and "o_t" not in kinds
    slm.rule_impl = "masked"
    assert (sparse - _decode(slm, pruned)).abs().max().item() <= 1e-5
    slm.rule_impl = "sparse"


def test_fused_attention_reads_transposed_copies_and_equals_the_matmuls(family, monkeypatch):
    """``fused_attention`` decodes full-head layers through the copies ``input_attn`` reads, with the same numbers."""
    slm = _rule_slm(family)
    kinds: list[str] = []
    real = SparseLM._rule_weight
    monkeypatch.setattr(SparseLM, "_rule_weight", lambda self, i, kind: kinds.append(kind) or real(self, i, kind))
    for plan in (slm.dense_plan(), SparsityPlan.uniform(slm.spec, slm.importance, mlp=0.5, mlp_rule="gate")):
        ref = _decode(slm, plan)
        assert "qkv_t" not in kinds  # off by default
        slm.fused_attention = True
        try:
            assert (_decode(slm, plan) - ref).abs().max().item() <= 1e-4
        finally:
            slm.fused_attention = False
        assert kinds.count("qkv_t") == kinds.count("o_t") == 6 * slm.spec.num_layers
        kinds.clear()
    # Heads dropped by importance (a prefix of the ordered copy): a transposed copy per kept-head count.
    plan = SparsityPlan.uniform(slm.spec, slm.importance, heads=0.5, mlp=0.5)
    ref = _decode(slm, plan)
    slm.fused_attention = True
    try:
        assert (_decode(slm, plan) - ref).abs().max().item() <= 1e-4
    finally:
        slm.fused_attention = False
    assert {len(key) for key in slm._rule_w} >= {4}


def test_fused_head_equals_the_lm_head(family):
    """``fused_head`` decodes through a transposed copy of the LM head with the same logits; prompts do not."""
    slm = _rule_slm(family)
    ref = _decode(slm, slm.dense_plan())
    slm.fused_head = True
    try:
        assert (_decode(slm, slm.dense_plan()) - ref).abs().max().item() <= 1e-4
        assert (-1, "head_t") in slm._rule_w
        slm._rule_w.clear()
        slm(IDS, None)  # 12 tokens: the module itself
        assert (-1, "head_t") not in slm._rule_w
    finally:
        slm.fused_head = False


# ---------------------------------------------------------------------------------------- environments
ENV_RULES = ["static", "gate", "input"]


@pytest.mark.parametrize(
    "env_id",
    ["PruneGym/PerInput-v0", "PruneGym/PerInputDiscrete-v0", "PruneGym/PerToken-v1", "PruneGym/PerTokenDiscrete-v1"],
)
def test_envs_let_the_agent_choose_the_rule(env_id, cost_path, one_thread):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    from envs.interface import Interface
    from tests.conftest import tiny_kwargs

    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path, mlp_rules=ENV_RULES))
    check_env(env.unwrapped)
    acts = env.unwrapped.interface.actions
    G = len(acts.groups)
    if "Discrete" in env_id:
        assert env.action_space.n == len(acts.presets) * len(ENV_RULES)
        action = 1 * len(ENV_RULES) + 2  # preset 1 (MLP 0.75), rule "input"
        want = {"input"}
    else:
        assert env.action_space.shape == (4 * G,)
        action = np.array([1.0, 1.0, 0.5, 0.5] * G, dtype=np.float32)  # rule value 0.5 -> "gate"
        want = {"gate"}
    plan, *_ = acts.decide(action, 8)
    assert plan.token_rules == want
    env.reset(seed=0)
    env.step(action)
    assert env.unwrapped.last_plan.token_rules == want
    # What is deployed is what was trained: the interface rebuilt from its config decides the same plan.
    twin = Interface.from_config(env.unwrapped.interface.config(), env.unwrapped.slm)
    assert twin.actions.decide(action, 8)[0] == plan
    env.close()


@pytest.mark.parametrize("env_id", ["PruneGym/PerInputDiscrete-v0", "PruneGym/PerTokenDiscrete-v1"])
def test_envs_run_input_attn(env_id, cost_path, one_thread):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    from tests.conftest import tiny_kwargs

    env = gym.make(env_id, **tiny_kwargs(env_id, cost_path, mlp_rules=["static", "input_attn"]))
    check_env(env.unwrapped)
    env.reset(seed=0)
    env.step(1 * 2 + 1)  # preset 1 (MLP 0.75), rule "input_attn"
    plan = env.unwrapped.last_plan
    assert plan.token_rules == {"input_attn"}
    assert plan.flops(1)["attention"] < SparsityPlan.dense(plan.spec).flops(1)["attention"]
    env.close()


def test_env_rule_settings_are_checked(cost_path, one_thread):
    import gymnasium as gym

    from tests.conftest import tiny_kwargs

    with pytest.raises(ValueError, match="mlp_rules must be distinct rules"):
        gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PruneGym/PerInput-v0", cost_path, mlp_rules=["static", "foo"]))
    with pytest.raises(ValueError, match="no channel predictor"):
        gym.make("PruneGym/PerInput-v0", **tiny_kwargs("PruneGym/PerInput-v0", cost_path, mlp_rules=["predicted"]))
    with pytest.raises(ValueError, match="runs one MLP rule"):
        gym.make("PruneGym/LayerByLayer-v0", **tiny_kwargs("PruneGym/LayerByLayer-v0", cost_path, mlp_rules=ENV_RULES))
    env = gym.make("PruneGym/LayerByLayer-v0", **tiny_kwargs("PruneGym/LayerByLayer-v0", cost_path, mlp_rules=["gate"]))
    env.reset(seed=0)
    done = False
    while not done:
        *_, term, trunc, _ = env.step(np.array([1.0, 1.0, 0.5], dtype=np.float32))
        done = term or trunc
    assert env.unwrapped.last_plan.token_rules == {"gate"}
    env.close()


def test_preparation_samples_the_rules(tiny_llama):
    from envs.distill.config import PlanDistribution
    from envs.distill.sampler import PlanSampler

    one = PlanDistribution.from_dict({"families": ["mlp"]})
    assert "mlp_rules" not in one.to_dict()  # the default hashes as before rules existed
    dist = PlanDistribution.from_dict({"families": ["mlp"], "mlp_rules": ["static", "gate", "input"]})
    sampler = PlanSampler(tiny_llama, dist)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        plan = sampler.sample(rng)
        seen |= plan.token_rules or {"static"}
    assert seen == {"static", "gate", "input"}
    # Gradients reach the weights through a per-token rule (the masked form runs under grad).
    plan = SparsityPlan.uniform(tiny_llama.spec, tiny_llama.importance, mlp=0.5, mlp_rule="gate")
    out = tiny_llama(IDS, plan, grad=True).logits
    out.sum().backward()
    assert tiny_llama.blocks[0].up_w.grad is not None and tiny_llama.blocks[0].up_w.grad.abs().sum() > 0
    # input_attn too, into the attention weights it sparsifies.
    plan = SparsityPlan.uniform(tiny_llama.spec, tiny_llama.importance, mlp=0.5, mlp_rule="input_attn")
    assert PlanSampler(tiny_llama, PlanDistribution.from_dict({"mlp_rules": ["input_attn"]})).sample(rng).token_rules
    tiny_llama(IDS, plan, grad=True).logits.sum().backward()
    assert tiny_llama.blocks[0].q_w.grad is not None and tiny_llama.blocks[0].q_w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="distinct rules"):
        PlanDistribution.from_dict({"mlp_rules": ["sometimes"]})
    with pytest.raises(ValueError, match="no channel predictor"):
        PlanSampler(tiny_llama, PlanDistribution.from_dict({"mlp_rules": ["predicted"]}))


def test_predicted_rule_in_an_environment_with_a_saved_predictor(cost_path, one_thread, tmp_path):
    import gymnasium as gym

    from envs.base import shared_lm
    from envs.interface import Interface
    from envs.runtime.predictor import load_predictor, save_predictor, train_predictor
    from tests.conftest import MODEL, tiny_kwargs

    slm = shared_lm(MODEL)
    g = torch.Generator().manual_seed(0)
    pred = train_predictor(slm, [torch.randint(0, 96, (48,), generator=g) for _ in range(8)], rank=4, progress=False)
    folder = save_predictor(pred, tmp_path / "pred")
    env_id = "PruneGym/PerInputDiscrete-v0"
    try:
        env = gym.make(
            env_id, **tiny_kwargs(env_id, cost_path, mlp_rules=["static", "predicted"], predictor=str(folder))
        )
        assert env.unwrapped.config()["model"]["predictor"] == str(folder)
        action = 3 * 2 + 1  # preset 3 (heads 0.5, MLP 0.5) with the predicted rule
        env.reset(seed=0)
        env.step(action)
        plan = env.unwrapped.last_plan
        assert plan.token_rules == {"predicted"}
        # The predictor's cost is in the plan's FLOPs, so the action wall and the calibrated cost see it.
        acts = env.unwrapped.interface.actions
        assert acts.builder.predictor_flops == pred.flops_per_token() > 0
        static = acts.plan(acts.fractions(action)[0], ["static"] * len(acts.groups))
        assert acts.flops_fraction(plan, 8) > acts.flops_fraction(static, 8)
        twin = Interface.from_config(env.unwrapped.interface.config(), slm)
        assert twin.actions.decide(action, 8)[0] == plan
        # The loaded predictor scores exactly as the trained one.
        x = torch.randn(3, slm.spec.hidden_size)
        assert torch.equal(load_predictor(folder, slm).scores(1, x), pred.scores(1, x))
        env.close()
    finally:
        slm.set_predictor(None)


def test_exported_cards_name_the_predictor_and_loading_checks_it(tiny_llama):
    from agents.controller import ControllerError, check_model
    from agents.export import model_section

    assert "predictor" not in model_section(tiny_llama)  # cards without the rule are as before
    pred = RandomPredictor(tiny_llama.spec)
    pred.card = {"card_sha256": "ab" * 32}
    tiny_llama.set_predictor(pred, name="my-pred")
    card = {"model": model_section(tiny_llama)}
    assert card["model"]["predictor"] == {"name": "my-pred", "card_sha256": "ab" * 32}
    check_model(card, tiny_llama)
    other = RandomPredictor(tiny_llama.spec, seed=1)
    other.card = {"card_sha256": "cd" * 32}
    tiny_llama.set_predictor(other, name="other")
    with pytest.raises(ControllerError, match="another"):
        check_model(card, tiny_llama)
    tiny_llama.set_predictor(None)
    with pytest.raises(ControllerError, match="no channel predictor"):
        check_model(card, tiny_llama)


def test_kernels_agree_with_their_torch_forms():
    from envs.runtime import kernels

    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 2, 24, generator=g)
    x = torch.randn(3, 24, generator=g)
    idx = torch.stack([torch.randperm(40, generator=g)[:7] for _ in range(3)])
    want = torch.einsum("rkcd,rd->rkc", w[idx], x)
    with torch.no_grad():
        fast = kernels.rows_dot(w, x, idx)  # the compiled loop (numba), without gradients
    with torch.enable_grad():
        slow = kernels.rows_dot(w, x, idx)  # the copying torch form, which keeps gradients
    assert kernels.BACKEND == "numba"
    assert torch.allclose(fast, want, atol=1e-5) and torch.allclose(slow, want, atol=1e-5)
    wt = torch.randn(40, 5, generator=g)
    vals = torch.randn(3, 7, generator=g)
    assert torch.allclose(kernels.rows_sum(wt, idx, vals), (wt[idx] * vals[..., None]).sum(1), atol=1e-5)


@pytest.mark.parametrize("keep", [1, 8, 13, 40, 64])  # a block of eight, a remainder, every entry (and more)
def test_input_rows_reads_the_largest_entries(keep):
    from envs.runtime import kernels

    g = torch.Generator().manual_seed(1)
    x, wt = torch.randn(3, 40, generator=g), torch.randn(40, 24, generator=g)
    with torch.no_grad():
        got = kernels.input_rows(x, keep, wt)
    want = _mask_top(x, min(keep, 40)) @ wt
    assert got.shape == (3, 24) and (got - want).abs().max().item() <= 1e-5


def test_top_indices_are_ascending_and_exactly_k_with_ties():
    from envs.runtime.kernels import _top_idx_nb

    s = np.array([1.0, 3.0, 3.0, 3.0, 2.0, 0.5], dtype=np.float32)
    assert _top_idx_nb(s, 2).tolist() == [1, 2]  # two of the three tied 3s, first come
    assert _top_idx_nb(s, 4).tolist() == [1, 2, 3, 4]
    assert _top_idx_nb(s, 6).tolist() == list(range(6))
    r = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    assert _top_idx_nb(r, 77).tolist() == sorted(np.argsort(-r)[:77].tolist())


def _top_reference(s: np.ndarray, k: int) -> list[int]:
    """The k largest entries' indices by a stable sort: larger first, equal values by index."""
    return sorted(np.argsort(-s.astype(np.float64), kind="stable")[:k].tolist())


@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "heavy", "wide"])
def test_radix_selection_equals_a_sort(case):
    from envs.runtime.kernels import _top_idx_nb

    rng = np.random.default_rng(["normal", "ties", "zeros", "heavy", "wide"].index(case))
    for _ in range(150):
        n = int(rng.integers(1, 1600))
        s = rng.standard_normal(n).astype(np.float32)
        if case == "ties":  # few distinct values: the threshold is tied many times over
            s = np.round(s * 2).astype(np.float32)
        elif case == "zeros":  # +0.0 and -0.0 are one value
            s[rng.integers(0, n, n // 2)] = 0.0
            s[rng.integers(0, n, n // 4)] = -0.0
        elif case == "heavy":
            s = (rng.standard_t(2, n) ** 3).astype(np.float32)
        elif case == "wide":  # values across every exponent
            s = (s * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
        k = int(rng.integers(1, n + 1))
        assert _top_idx_nb(s, k).tolist() == _top_reference(s, k)
        assert _top_idx_nb(s, k, True).tolist() == _top_reference(np.abs(s), k)


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_kernels_equal_the_masked_mlp(act, gated, bias):
    from envs.runtime import kernels

    g = torch.Generator().manual_seed(1)
    I, D, R, k = 48, 20, 3, 11
    gate, up, down = (torch.randn(I, D, generator=g) for _ in range(3))
    gb, ub = (torch.randn(I, generator=g) if bias else None for _ in range(2))
    x = torch.randn(R, D, generator=g)
    scores = torch.randn(R, I, generator=g)
    kind = kernels.act_kind(act)
    assert kind is not None and kernels.fused_available(x) is False  # gradients on: the torch forms run

    def lin(w, b):
        return F.linear(x, w, b)

    u = lin(up, ub)
    a = act(lin(gate, gb)) * u if gated else act(u)
    want = _mask_top(a, k, by=scores) @ down  # down [I, D]: the transposed projection, a row per channel
    rows = [gate, up, down] if gated else [up, down]
    with torch.no_grad():
        assert kernels.fused_available(x)
        got = kernels.topk_glu(scores, k, x, torch.stack(rows, 1).contiguous(), kind, gb if gated else None, ub)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        # topk_down: the gate rule (activated gate times up, picked by |gate|) and the input rule (picked by |a|).
        ga = act(lin(gate, gb))
        want_gate = _mask_top(ga * u, k, by=ga.abs()) @ down
        got_gate = kernels.topk_down(ga, k, x, torch.stack([up, down], 1).contiguous(), ub)
        assert torch.allclose(got_gate, want_gate, atol=1e-4)
        got_in = kernels.topk_down(a, k, x, down[:, None].contiguous())
        assert torch.allclose(got_in, _mask_top(a, k) @ down, atol=1e-4)
        # input_glu: the input rule's whole MLP (gate/up read the kd largest inputs, then the k largest |a|).
        for kd in (7, 9, D, D + 3):  # a remainder, a full block plus one, every entry, more than every entry
            xm = _mask_top(x, min(kd, D))
            um = F.linear(xm, up, ub)
            am = act(F.linear(xm, gate, gb)) * um if gated else act(um)
            gu_t = torch.cat([gate, up] if gated else [up], 0).t().contiguous()
            got_glu = kernels.input_glu(x, kd, gu_t, k, down[:, None].contiguous(), kind, gb if gated else None, ub)
            assert torch.allclose(got_glu, _mask_top(am, k) @ down, atol=1e-4), kd
    assert kernels.act_kind(torch.nn.ReLU()) is None  # not computed by the kernels: the torch forms run


def _count_calls(monkeypatch, module, *names: str) -> dict[str, int]:
    """Wrap ``module``'s functions ``names`` to count their calls; returns the live counts by name."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(module, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_decoding_runs_the_fused_kernels(tiny_llama, monkeypatch):
    """The sparse decode path takes one fused call per layer and rule (the equality test above covers its numbers)."""
    from envs.runtime import sparse_lm

    slm = tiny_llama
    slm.set_predictor(RandomPredictor(slm.spec))
    calls = _count_calls(monkeypatch, sparse_lm, "topk_glu", "topk_down", "input_glu")
    L = slm.spec.num_layers
    pairs = (("predicted", "topk_glu"), ("gate", "topk_down"), ("input", "input_glu"), ("input_attn", "input_glu"))
    for rule, fn in pairs:
        plan = SparsityPlan.uniform(slm.spec, slm.importance, mlp=0.5, mlp_rule=rule)
        before = dict(calls)
        cache = slm.new_cache()
        for t in range(3):
            slm(IDS[:, t : t + 1], plan, cache=cache)
        assert calls[fn] - before[fn] == 3 * L, rule
        slm(IDS[:, :8], plan)  # 8 tokens: the masked form, no fused call
        assert calls[fn] - before[fn] == 3 * L, rule
        assert sum(calls.values()) - sum(before.values()) == 3 * L, rule  # and no other fused MLP call


def _decode(slm: SparseLM, plan: SparsityPlan, n: int = 6) -> torch.Tensor:
    cache = slm.new_cache()
    return torch.cat([slm(IDS[:, t : t + 1], plan, cache=cache).logits for t in range(n)], dim=1)


def test_static_decoding_runs_the_prefix_kernel_and_equals_the_matmul_form(family, monkeypatch):
    """Pruned static layers decode through the fused kernel (as the rules do) and give the matmul form's logits."""
    from envs.runtime import sparse_lm

    slm = _rule_slm(family)
    calls = []
    real = sparse_lm.prefix_glu
    monkeypatch.setattr(sparse_lm, "prefix_glu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for frac in (0.75, 0.25):
        plan = SparsityPlan.uniform(slm.spec, slm.importance, mlp=frac)
        fused = _decode(slm, plan)
        slm.rule_impl = "masked"  # the matmul form over the importance-ordered views
        ref = _decode(slm, plan)
        slm.rule_impl = "sparse"
        assert (fused - ref).abs().max().item() <= 1e-4
    assert len(calls) == 2 * 6 * slm.spec.num_layers
    calls.clear()
    dense = _decode(slm, slm.dense_plan())
    assert calls == []  # the dense plan runs the untouched model
    slm.fused_full_mlp = True  # unless asked to run its MLPs through the kernel too
    assert (_decode(slm, slm.dense_plan()) - dense).abs().max().item() <= 1e-4
    assert len(calls) == 6 * slm.spec.num_layers


@pytest.mark.parametrize("rule", ["static", *TOKEN_RULES])
def test_sparse_decoding_reads_the_adapted_weights(tiny_llama, rule):
    """With a pruning-ready (adapted) weight set, the sparse and fused forms read it, as the masked form does."""
    slm = tiny_llama
    slm.set_predictor(RandomPredictor(slm.spec))
    g = torch.Generator().manual_seed(3)
    slm.set_adapted(
        {
            f"{i}.{w}": getattr(b, w) + 0.05 * torch.randn(getattr(b, w).shape, generator=g)
            for i, b in enumerate(slm.blocks)
            for w in ("q_w", "o_w", "gate_w", "up_w", "down_w")  # attention too, for input_attn
        }
    )
    plan = SparsityPlan.uniform(slm.spec, slm.importance, mlp=0.5, mlp_rule=rule)
    sparse = _decode(slm, plan)
    slm.rule_impl = "masked"
    masked = _decode(slm, plan)
    assert (sparse - masked).abs().max().item() <= 1e-4
    slm.set_adapted(None)
    slm.rule_impl = "sparse"
    assert (_decode(slm, plan) - sparse).abs().max().item() > 1e-3  # the adapted weights made a difference


@pytest.mark.parametrize("family_name", ["llama", "mistral", "qwen2"])
def test_rms_norm_kernel_equals_the_norm_module(family_name):
    from envs.runtime import kernels

    slm = SparseLM(tiny_model(family_name, seed=3))
    norm = slm.blocks[0].attn_norm
    with torch.no_grad():
        norm.weight.normal_()
        x = torch.randn(3, 1, slm.spec.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
        got = kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        assert got.shape == x.shape and torch.allclose(got, norm(x), rtol=1e-6, atol=1e-6)


def test_rope_kernel_equals_the_torch_operations_bit_for_bit():
    from envs.runtime import kernels
    from envs.runtime.sparse_lm import _apply_rope

    g = torch.Generator().manual_seed(0)
    B, T, H, KV, d = 2, 3, 4, 2, 8
    qkv = torch.randn(B, T, (H + KV) * d, generator=g)  # q and k as views of one projection output
    q, k = qkv[..., : H * d].view(B, T, H, d), qkv[..., H * d :].view(B, T, KV, d)
    cos, sin = torch.randn(1, T, d, generator=g), torch.randn(1, T, d, generator=g)
    want_q, want_k = _apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    with torch.no_grad():
        got_q = kernels.rope(q, cos.expand(B, T, d), sin.expand(B, T, d)).transpose(1, 2)
        got_k = kernels.rope(k, cos.expand(B, T, d), sin.expand(B, T, d)).transpose(1, 2)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_decoding_runs_the_norm_and_rope_kernels(family, monkeypatch):
    """Decode calls take the compiled norm (Llama-style RMSNorms only) and rotary kernels; the logits are unchanged."""
    from envs.runtime import sparse_lm

    slm = _rule_slm(family)
    calls = _count_calls(monkeypatch, sparse_lm, "rms_norm", "rope")
    plan, L = slm.dense_plan(), slm.spec.num_layers
    with torch.no_grad():
        full = slm(IDS[:, :6], plan).logits  # 6 tokens: the modules, no kernel
        assert calls == {"rms_norm": 0, "rope": 0}
        cache = slm.new_cache()
        steps = torch.cat([slm(IDS[:, t : t + 1], plan, cache=cache).logits for t in range(6)], dim=1)
    llama_norm = family in ("llama", "mistral", "qwen2")
    assert calls["rms_norm"] == (6 * 2 * L if llama_norm else 0)
    assert calls["rope"] == (0 if family == "gpt2" else 6 * 2 * L)
    assert torch.allclose(steps, full, atol=1e-4)


def test_a_hooked_norm_module_is_called_in_decoding(tiny_llama, monkeypatch):
    """Hooks on a norm (how input_norms collects the projections' inputs) see decode calls too."""
    from envs.runtime import sparse_lm

    slm = tiny_llama
    calls = _count_calls(monkeypatch, sparse_lm, "rms_norm")
    seen = []
    hook = slm.blocks[0].attn_norm.register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            slm(IDS[:, :1], slm.dense_plan())
    finally:
        hook.remove()
    assert seen == [torch.Size([1, 1, slm.spec.hidden_size])]
    assert calls["rms_norm"] == 2 * slm.spec.num_layers - 1  # every other norm still takes the kernel
