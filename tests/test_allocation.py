"""Per-layer keep allocation (envs.runtime.allocation), its entry point (experiments.allocate) and its bench curves."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from envs.runtime.allocation import (
    GRID,
    LayerAllocation,
    choose_floors,
    fit_allocation,
    layer_sensitivity,
    load_allocation,
    plans_kl,
    save_allocation,
    single_layer_plan,
)
from envs.runtime.models import CharTokenizer, tiny_model
from envs.runtime.plan import SparsityPlan
from envs.runtime.predictor import document_sha256
from envs.runtime.sparse_lm import SparseLM


def _ids(seed: int, n: int, length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (length,), generator=g) for _ in range(n)]


def _kl(slm: SparseLM, ids: torch.Tensor, plan, skip: int) -> float:
    with torch.no_grad():
        ref = slm(ids, None).logits[:, skip:].float().log_softmax(-1)
        lp = slm(ids, plan).logits[:, skip:].float().log_softmax(-1)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def _table(L: int, levels=(0.2, 0.5), scale=None) -> dict[str, torch.Tensor]:
    """KL falling with keep, the same shape in every layer, times a per-layer ``scale``."""
    base = torch.tensor([1.0 / (k * k) for k in levels])
    s = torch.ones(L) if scale is None else torch.tensor(scale, dtype=torch.float32)
    return {"input_attn": s[:, None] * base[None]}


@pytest.fixture
def news():
    """The natural-text corpus; skipped where the data cache is not built, except on CI."""
    from envs.data.corpus import natural_text

    try:
        return {s: natural_text(s) for s in ("train", "val")}
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"natural-text cache not built: {exc}")


def test_sensitivity_equals_a_direct_forward_of_the_single_layer_plan(tiny_slm, one_thread):
    seqs = _ids(0, 3, 20)
    levels = (0.25, 0.5)
    rules = ["static", "input", "input_attn"]
    got = layer_sensitivity(tiny_slm, seqs, rules, levels, skip=4, batch_size=2, progress=False)
    ids = torch.stack(seqs)
    L = tiny_slm.spec.num_layers
    for rule in rules:
        assert got[rule].shape == (L, 2) and bool((got[rule] >= -1e-6).all())
        for i, j in ((0, 0), (L - 1, 1), (1, 0)):
            want = _kl(tiny_slm, ids, single_layer_plan(tiny_slm, i, rule, levels[j]), 4)
            assert got[rule][i, j].item() == pytest.approx(want, rel=1e-4, abs=1e-7), (rule, i, j)
    assert bool((got["input_attn"].sum(0) > 0).all())  # pruning moves the output


def test_sensitivity_refuses_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="one length"):
        layer_sensitivity(tiny_llama, [*_ids(0, 1, 12), *_ids(1, 1, 16)], ["static"], progress=False)
    with pytest.raises(ValueError, match="one length above skip"):
        layer_sensitivity(tiny_llama, _ids(0, 2, 8), ["static"], skip=8, progress=False)
    with pytest.raises(ValueError, match="needs a channel predictor"):
        layer_sensitivity(tiny_llama, _ids(0, 2, 16), ["predicted"], progress=False)
    for levels in ((0.5,), (0.5, 0.3), (0.0, 0.5), (0.5, 1.0)):
        with pytest.raises(ValueError, match="levels must be"):
            layer_sensitivity(tiny_llama, _ids(0, 2, 16), ["static"], levels, progress=False)
    with pytest.raises(ValueError, match="rules must be"):
        layer_sensitivity(tiny_llama, _ids(0, 2, 16), ["magic"], progress=False)


def test_equal_layers_get_equal_keeps_and_the_mean_is_kept():
    alloc = LayerAllocation((0.2, 0.5), _table(6))
    for mean in (0.25, 0.4, 0.73):
        keeps = alloc.keeps("input_attn", mean)
        assert len(keeps) == 6 and sum(keeps) == pytest.approx(round(mean * GRID * 6) / GRID)
        assert max(keeps) - min(keeps) <= 1.0 / GRID + 1e-9, keeps
    assert alloc.keeps("input_attn", 1.0) == (1.0,) * 6


def test_a_more_sensitive_layer_keeps_more():
    alloc = LayerAllocation((0.2, 0.5), _table(5, scale=[30.0, 1.0, 1.0, 1.0, 5.0]))
    keeps = alloc.keeps("input_attn", 0.4)
    assert keeps[0] > keeps[4] > max(keeps[1:4]), keeps
    assert sum(keeps) == pytest.approx(2.0)
    assert min(keeps) >= 0.2  # no keep below the lowest measured level when the mean allows
    low = alloc.keeps("input_attn", 0.1)  # a mean below the lowest level is still served
    assert sum(low) == pytest.approx(0.5)


def test_the_allocation_is_the_least_modelled_kl_of_all_allocations():
    alloc = LayerAllocation((0.1, 0.3, 0.6), {"static": torch.tensor([[4.0, 1.0, 0.2], [1.0, 0.6, 0.1], [9, 2, 1.0]])})
    cost = alloc.curves("static")
    for mean in (0.3, 0.45):
        units = round(mean * GRID * 3)
        keeps = alloc.keeps("static", mean)
        got = sum(cost[i, round(k * GRID) - 1] for i, k in enumerate(keeps))
        low = round(0.1 * GRID)
        best = min(
            cost[0, a - 1] + cost[1, b - 1] + cost[2, units - a - b - 1]
            for a in range(low, GRID + 1)
            for b in range(low, GRID + 1)
            if low <= units - a - b <= GRID
        )
        assert got == pytest.approx(best), (mean, keeps)


def test_the_curves_pass_through_the_measured_levels_and_reach_zero_at_keep_one():
    alloc = LayerAllocation((0.2, 0.5), {"gate": torch.tensor([[2.0, 0.5], [1.0, 0.1]])})
    c = alloc.curves("gate")
    assert c[:, 19].tolist() == pytest.approx([2.0, 1.0]) and c[:, 49].tolist() == pytest.approx([0.5, 0.1])
    assert c[:, -1].tolist() == [0.0, 0.0] and bool((np.diff(c, axis=1) <= 1e-12).all())


def test_bad_requests_are_refused():
    alloc = LayerAllocation((0.2, 0.5), _table(4))
    with pytest.raises(ValueError, match="mean keep"):
        alloc.keeps("input_attn", 0.0)
    with pytest.raises(ValueError, match="no KL table for rule 'static'"):
        alloc.keeps("static", 0.5)
    with pytest.raises(ValueError, match="every KL table"):
        LayerAllocation((0.2, 0.5, 0.7), _table(4))


def test_the_plan_keeps_what_the_allocation_says(tiny_llama):
    L, inter = tiny_llama.spec.num_layers, tiny_llama.spec.intermediate_size
    alloc = LayerAllocation((0.2, 0.5), _table(L, scale=[20.0] + [1.0] * (L - 1)), {"name": "a"})
    plan = alloc.plan(tiny_llama, "input_attn", 0.4)
    keeps = alloc.keeps("input_attn", 0.4)
    assert [lp.mlp_channels for lp in plan.layers] == [round(k * inter) for k in keeps]
    assert all(lp.mlp_rule == "input_attn" for lp in plan.layers if lp.mlp_channels < inter)
    want = {"kind": "allocated", "mlp_rule": "input_attn", "mean_keep": 0.4, "allocation": "a", "floor": 0.0}
    assert plan.meta == want
    with pytest.raises(ValueError, match="for 3 layers"):
        LayerAllocation((0.2, 0.5), _table(3)).plan(tiny_llama, "input_attn", 0.4)


def test_save_and_load_round_trip_and_refuse_what_does_not_match(tiny_llama, tmp_path):
    kl = layer_sensitivity(tiny_llama, _ids(0, 2, 16), ["static", "input_attn"], (0.2, 0.5), progress=False)
    slm = tiny_llama
    card = {"model": {"name": slm.name, "weights_hash": slm.weights_hash, "spec": slm.spec.to_dict()}}
    card["allocation"] = {"rules": ["static", "input_attn"], "levels": [0.2, 0.5], "floors": {"static": 0.75}}
    folder = save_allocation(LayerAllocation((0.2, 0.5), kl, card), tmp_path / "a")
    back = load_allocation(folder, tiny_llama)
    assert back.levels == (0.2, 0.5) and back.rules == ("static", "input_attn")
    assert back.floors == {"static": 0.75, "input_attn": 0.0}
    assert all(torch.equal(back.kl[r], kl[r]) for r in kl)
    assert back.keeps("static", 0.4) == LayerAllocation((0.2, 0.5), kl, floors={"static": 0.75}).keeps("static", 0.4)
    other = SparseLM(tiny_model("llama", seed=5), name="tiny-llama")
    with pytest.raises(ValueError, match="weights hash.*experiments.allocate"):
        load_allocation(folder, other)
    edited = json.loads((folder / "card.json").read_text())
    edited["allocation"]["levels"] = [0.3, 0.5]
    (folder / "card.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="card_sha256|edited"):
        load_allocation(folder, tiny_llama)
    with pytest.raises(ValueError, match="no layer allocation"):
        load_allocation(tmp_path / "missing", tiny_llama)


def test_fit_reads_train_text_only_and_lists_it(news, one_thread):
    from envs.data.corpus import split_of

    slm = SparseLM(tiny_model("llama", seed=0), CharTokenizer(), name="tiny-llama")
    with pytest.raises(ValueError, match="train-split text only"):
        fit_allocation(slm, news["train"][:2] + news["val"][:1], ["static"], progress=False)
    alloc = fit_allocation(slm, news["train"], ["static"], (0.2, 0.5), seq_len=24, max_docs=3, progress=False)
    tr = alloc.card["training"]
    assert tr["split"] == "train" and tr["documents"] == 3 and tr["scored_positions"] == 3 * 16
    train = {document_sha256(d) for d in news["train"] if split_of(d) == "train"}
    assert set(tr["documents_sha256"]) <= train
    assert not set(tr["documents_sha256"]) & {document_sha256(d) for d in news["val"]}


def test_entry_point_refuses_bad_settings_before_loading(monkeypatch, tmp_path):
    from experiments import prepare
    from experiments.allocate import fit_and_save

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(prepare, "load_base", no_load)
    base = {"model": "tiny-llama", "out": str(tmp_path / "a")}
    for over, key in (
        ({"levels": [0.5]}, "levels must be"),
        ({"levels": [0.2, "x"]}, "levels must be numbers"),
        ({"rules": ["magic"]}, "rules must be"),
        ({"rules": "static"}, "must be lists"),
        ({"rules": ["predicted"]}, "needs predictor="),
        ({"skip": 40, "seq_len": 32}, "skip=40 must be below"),
        ({"docs": 0}, "docs=0"),
        ({"rank": 4}, "unknown allocate settings"),
        ({"name": "a/b", "out": None}, "plain folder name"),
    ):
        with pytest.raises(ValueError, match=key):
            fit_and_save({**base, **over})
    (tmp_path / "a").mkdir()
    with pytest.raises(FileExistsError, match="force=true"):
        fit_and_save(base)


def test_config_file_matches_the_defaults():
    from hydra import compose, initialize_config_dir

    from experiments.allocate import SETTINGS, check_settings
    from experiments.prepare import model_overrides
    from experiments.report import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose("allocate")
        tiny = compose("allocate", overrides=model_overrides(["model=tiny-llama", "rules=[input_attn]"]))
    assert check_settings(cfg) == {**SETTINGS, "name": "smollm2-135m-alloc"}
    run = check_settings(tiny)
    assert run["model"] == "tiny-llama" and run["name"] == "tiny-llama-alloc" and run["rules"] == ["input_attn"]


def test_bench_adds_allocated_curves_and_judges_them_against_every_static_plan(tiny_llama):
    from experiments.bench.activation import ALLOC, bench_plans, curve_of, curve_rule

    L = tiny_llama.spec.num_layers
    alloc = LayerAllocation((0.2, 0.5), {**_table(L), "static": _table(L)["input_attn"]})
    plain = bench_plans(tiny_llama, ["static", "input_attn"])
    plans = bench_plans(tiny_llama, ["static", "input_attn"], alloc)
    extra = [n for n in plans if n not in plain]
    assert extra and all(ALLOC in n for n in extra)
    assert {curve_of(n) for n in extra} == {"static+alloc", "input_attn+alloc"}
    assert curve_rule("static+alloc") == "static" and curve_of("dense (fused kernel)") == "dense"
    assert plans["input_attn+alloc@0.4"] == alloc.plan(tiny_llama, "input_attn", 0.4)
    only_attn = bench_plans(tiny_llama, ["static", "input_attn"], LayerAllocation((0.2, 0.5), _table(L)))
    assert not any(n.startswith("static+alloc") for n in only_attn)


def test_a_floor_bounds_every_layer_and_a_floor_of_one_is_uniform():
    alloc = LayerAllocation((0.2, 0.5), _table(5, scale=[30.0, 1.0, 1.0, 1.0, 5.0]), floors={"input_attn": 0.75})
    keeps = alloc.keeps("input_attn", 0.4)
    assert min(keeps) >= 0.3 - 1e-9 and sum(keeps) == pytest.approx(2.0) and keeps[0] == max(keeps)
    assert alloc.keeps("input_attn", 0.4, floor=0.0) != keeps  # the default is the rule's floor
    assert alloc.keeps("input_attn", 0.4, floor=1.0) == (0.4,) * 5
    with pytest.raises(ValueError, match="floor must be"):
        alloc.keeps("input_attn", 0.4, floor=1.5)
    with pytest.raises(ValueError, match="floors must map"):
        LayerAllocation((0.2, 0.5), _table(5), floors={"static": 0.5})


def test_the_chosen_floor_has_the_least_kl_of_its_whole_plans(tiny_llama, one_thread):
    seqs = _ids(0, 3, 20)
    L = tiny_llama.spec.num_layers
    kl = layer_sensitivity(tiny_llama, seqs, ["input_attn"], (0.2, 0.5), skip=4, progress=False)
    alloc = LayerAllocation((0.2, 0.5), kl)
    got = choose_floors(tiny_llama, alloc, seqs, candidates=(0.0, 0.5, 1.0), means=(0.3, 0.6), skip=4)["input_attn"]
    means = {f: float(np.mean(v)) for f, v in got["kl"].items()}
    assert set(means) == {"0.0", "0.5", "1.0"} and means[str(got["floor"])] == min(means.values())
    ids = torch.stack(seqs)
    plan = alloc.plan(tiny_llama, "input_attn", 0.3)
    assert plans_kl(tiny_llama, seqs, [plan], skip=4)[0] == pytest.approx(_kl(tiny_llama, ids, plan, 4), rel=1e-4)
    uniform = SparsityPlan.uniform(tiny_llama.spec, tiny_llama.importance, mlp=0.3, mlp_rule="input_attn")
    assert got["kl"]["1.0"][0] == pytest.approx(_kl(tiny_llama, ids, uniform, 4), rel=1e-4)
    assert L == len(alloc.keeps("input_attn", 0.3))


def test_bench_names_the_command_for_a_missing_allocation(news, tmp_path, capsys):
    from experiments.bench import activation

    with pytest.raises(SystemExit) as exc:
        args = ["--quick", "--model", "tiny-llama", "--rules", "static", "--no-write"]
        activation.main([*args, "--allocation", str(tmp_path / "no")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no layer allocation" in err and "python -m experiments.allocate model=tiny-llama out=" in err
