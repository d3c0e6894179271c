"""Exit maps: the dense path never changes, an exit reads through its layer's map everywhere, files are checked."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the ids)
from envs.runtime.exit_maps import (
    EXIT_MAPS_FORMAT,
    ExitMaps,
    NormalEquations,
    PositionSample,
    distill_exit_maps,
    exit_kl,
    fit_exit_maps,
    layer_outputs,
    load_exit_maps,
    save_exit_maps,
)
from envs.runtime.staged import truncated
from envs.tasks.scoring import Scorer
from tests.conftest import MODEL, tiny_kwargs


def _seqs(seed: int, n: int, length: int = 24, vocab: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def _maps(slm, seed: int = 0) -> ExitMaps:
    card = {"name": "t", "model": {"name": slm.name, "weights_hash": slm.weights_hash, "spec": slm.spec.to_dict()}}
    return ExitMaps(fit_exit_maps(slm, _seqs(seed, 12), ridge=1e-3), card)


@pytest.fixture
def with_maps(tiny_llama):
    maps = _maps(tiny_llama)
    tiny_llama.set_exit_maps(maps, name="t")
    yield tiny_llama, maps
    tiny_llama.set_exit_maps(None)


@torch.no_grad()
def test_dense_path_is_bit_identical_and_an_exit_reads_through_its_map(with_maps):
    slm, maps = with_maps
    ids = _seqs(5, 1)[0][None]
    dense = slm.forward(ids, slm.dense_plan()).logits
    slm.set_exit_maps(None)
    plain = slm.forward(ids, slm.dense_plan()).logits
    assert torch.equal(dense, plain), "a plan that runs the last layer never uses a map"
    slm.set_exit_maps(maps, name="t")
    L = slm.spec.num_layers
    for d in range(1, L):
        plan = truncated(slm.dense_plan(), d)
        got = slm.forward(ids, plan).logits
        h = layer_outputs(slm, ids[0])[d - 1]  # layer d-1's output: the last one the plan runs
        want = slm.lm_head(slm.final_norm(h @ maps.weight[d - 1] + maps.bias[d - 1]))
        assert torch.allclose(got[0], want, atol=1e-5)
        slm.set_exit_maps(None)
        lens = slm.forward(ids, plan).logits
        slm.set_exit_maps(maps, name="t")
        assert not torch.allclose(got, lens, atol=1e-3), "the map changes an exit's answer"
    # A plan that skips a middle layer but runs the last one is not an exit.
    mid = slm.uniform_plan(layers=0.75)
    if mid.layers[-1].run:
        got = slm.forward(ids, mid).logits
        slm.set_exit_maps(None)
        assert torch.equal(got, slm.forward(ids, mid).logits)
        slm.set_exit_maps(maps, name="t")


@torch.no_grad()
def test_fitted_maps_beat_the_logit_lens_on_held_out_text_and_shrink_to_it(tiny_llama):
    slm = tiny_llama
    maps = _maps(slm)
    held = _seqs(99, 6)
    for d in range(slm.spec.num_layers - 1):
        err_map = err_lens = 0.0
        for ids in held:
            hs = layer_outputs(slm, ids)
            err_map += float(((maps.apply(hs[d], d) - hs[-1]) ** 2).sum())
            err_lens += float(((hs[d] - hs[-1]) ** 2).sum())
        assert err_map < err_lens, f"layer {d}: the fitted map must be closer to the last layer than the identity"
    eq = NormalEquations(slm.spec.num_layers, slm.spec.hidden_size)
    for ids in _seqs(0, 4):
        eq.add(layer_outputs(slm, ids))
    huge = eq.solve(1e9)
    D = slm.spec.hidden_size
    assert all(torch.allclose(m[:D], torch.eye(D), atol=1e-4) and m[D].abs().max() < 1e-4 for m in huge)
    with pytest.raises(ValueError, match="ridge"):
        fit_exit_maps(slm, held, ridge=-1.0)
    with pytest.raises(ValueError, match="at least one sequence"):
        fit_exit_maps(slm, [])


def test_files_round_trip_and_refuse_tampering_and_other_models(tiny_llama, tmp_path):
    maps = _maps(tiny_llama)
    folder = save_exit_maps(maps, tmp_path / "m")
    back = load_exit_maps(folder, tiny_llama)
    assert all(torch.equal(a, b) for a, b in zip(back.weight, maps.weight, strict=True))
    assert back.card["format"] == EXIT_MAPS_FORMAT and back.card["card_sha256"] == maps.card["card_sha256"]
    card = json.loads((folder / "card.json").read_text())
    card["settings"] = {"ridge": 0.5}
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"card_sha256.*python -m experiments\.exit_maps"):
        load_exit_maps(folder, tiny_llama)
    save_exit_maps(maps, folder, force=True)
    (folder / "exit_maps.safetensors").write_bytes((folder / "exit_maps.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="does not match its card"):
        load_exit_maps(folder, tiny_llama)
    save_exit_maps(maps, folder, force=True)
    from envs.runtime.models import tiny_model
    from envs.runtime.sparse_lm import SparseLM

    other = SparseLM(tiny_model("llama", seed=7), name="other")
    with pytest.raises(ValueError, match="weights hash"):
        load_exit_maps(folder, other)
    with pytest.raises(ValueError, match="no exit maps at"):
        load_exit_maps(tmp_path / "never", tiny_llama)
    with pytest.raises(FileExistsError):
        save_exit_maps(maps, folder)


def _staged(cost_path, maps_folder, **over):
    kw = tiny_kwargs("Staged", cost_path, task="generated", n_items=12, exit_maps=maps_folder) | over
    return gym.make("PruneGym/StagedDiscrete-v0", **kw).unwrapped


@pytest.fixture(scope="module")
def maps_folder(tmp_path_factory):
    from envs.base import shared_lm

    slm = shared_lm(MODEL)
    return str(save_exit_maps(_maps(slm, seed=3), tmp_path_factory.mktemp("maps") / "tiny-exits"))


@torch.no_grad()
def test_staged_stop_and_readout_go_through_the_map_as_the_scorer_does(one_thread, cost_path, maps_folder):
    env = _staged(cost_path, maps_folder)
    slm = env.slm
    assert slm.exit_maps is not None and env.config()["model"]["exit_maps"] == maps_folder
    maps = slm.exit_maps
    mc = [i for i, it in enumerate(env.items) if it.kind == "mc"]
    assert mc
    for i in mc[:3]:
        env.reset(options={"item": i})
        _, _, done, _, _ = env.step(2)  # a pruned group, then read
        assert not done
        rd = env._readouts[-1]
        plan = env.interface.plan_until(env._fr, 1)
        item = env.items[i]
        prompt = env.scorer.encode(slm, item.prompt)
        conts = [env.scorer.encode(slm, " " + c) for c in item.choices]
        vocab = sorted({t for c in conts for t in c})
        where = {t: j for j, t in enumerate(vocab)}
        last = max(j for j, lp in enumerate(plan.layers) if lp.run)
        want = []
        for c in conts:  # by hand: run the plan's layers, map, norm, head rows of the answer vocabulary
            st = slm.start(torch.tensor([prompt + c[:-1]]))
            slm.run_layers(st, plan)
            h = slm.final_norm(maps.apply(st.hidden[0, len(prompt) - 1 :], last))
            lp = torch.log_softmax(slm.lm_head(h)[:, vocab].float(), -1)
            want.append(float(sum(lp[j, where[t]] for j, t in enumerate(c))))
        assert torch.allclose(rd.scores.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)
        width = max(len(c) - 1 for c in conts)
        assert rd.flops == pytest.approx(
            2.0 * slm.spec.hidden_size * len(vocab) * (1 + len(conts) * width)
            + (1 + len(conts) * width) * maps.flops_per_position()
        )
        _, _, done, _, info = env.step(0)  # stop: the answer is the truncated plan's, through the map
        ref = Scorer().score(slm, item, env.last_plan, env._dense_ref)
        assert info["stopped"] and info["accuracy_dense_relative"] == ref.dense_relative
        assert info["readout_pick"] == int(np.argmax(want))
    # An environment made without exit maps takes them off the shared model.
    plain = gym.make("PruneGym/StagedDiscrete-v0", **tiny_kwargs("Staged", cost_path, task="generated")).unwrapped
    assert plain.slm.exit_maps is None and "exit_maps" not in plain.config()["model"]


def test_controller_card_names_the_maps_and_refuses_a_model_without_them(tiny_llama, tmp_path):
    from agents.controller import ControllerError, check_model
    from agents.export import model_section

    maps = _maps(tiny_llama)
    save_exit_maps(maps, tmp_path / "m")
    tiny_llama.set_exit_maps(maps, name="m")
    try:
        card = {"model": model_section(tiny_llama)}
        assert card["model"]["exit_maps"] == {"name": "m", "card_sha256": maps.card["card_sha256"]}
        check_model(card, tiny_llama)
    finally:
        tiny_llama.set_exit_maps(None)
    with pytest.raises(ControllerError, match=r"no exit maps.*load_exit_maps\('m', slm\)"):
        check_model(card, tiny_llama)


def test_command_settings_and_training_split(tmp_path, monkeypatch):
    from experiments.exit_maps import check_settings, fit_and_save

    for bad, msg in (
        ({"ridge": -1}, "ridge"),
        ({"train_items": 0, "news_docs": 0}, "nothing to fit"),
        ({"every": 0}, "every"),
        ({"name": "a/b"}, "plain folder name"),
        ({"colour": 1}, "unknown exit-maps settings"),
        ({"distill_lr": 0}, "distill_lr"),
        ({"distill_batch": 0}, "distill_batch"),
    ):
        with pytest.raises(ValueError, match=msg):
            check_settings({"model": MODEL, **bad})
    from envs.base import shared_lm
    from envs.tasks import load_mix
    from envs.tasks.items import split_key

    slm = shared_lm(MODEL)  # loaded before the cache moves (its importance orderings need the data cache)
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path / "cache"))
    cfg = {"model": MODEL, "mix": "generated", "train_items": 16, "val_items": 6, "out": str(tmp_path / "o")}
    card = fit_and_save({**cfg, "progress": False}, slm=slm)
    assert card["training"]["item_splits"] == ["train"]
    held = {split_key(it.prompt, it.answer) for s in ("val", "test") for it in load_mix("generated", s)}
    assert held and not held & set(card["training"]["items"]), "no val or test item is fitted on"
    assert len(card["agreement"]["logit_lens"]) == len(card["agreement"]["exit_maps"]) >= 1
    assert slm.exit_maps is None, "measuring the agreement leaves the model as it was"
    with pytest.raises(FileExistsError, match="force=true"):
        fit_and_save({**cfg, "progress": False}, slm=slm)


def _held_kl(slm, maps, sample):
    L = slm.spec.num_layers
    with torch.no_grad():
        teacher = torch.log_softmax(slm.lm_head(slm.final_norm(sample[:, L - 1])).float(), -1)
        return [float(exit_kl(slm, maps, d, sample[:, d], teacher)) for d in range(L - 1)]


class _Head:
    """A model whose last layer is a known linear function of each earlier layer's output (the truth is known)."""

    def __init__(self, D: int = 16, V: int = 40, L: int = 3, seed: int = 0) -> None:
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.lm_head = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            self.model.lm_head.weight.copy_(torch.randn(V, D, generator=g))
        self.lm_head = self.model.lm_head
        self.final_norm = torch.nn.LayerNorm(D, elementwise_affine=False)
        self.spec = SimpleNamespace(num_layers=L, hidden_size=D)
        self.to_last = [torch.eye(D) + 0.8 * torch.randn(D, D, generator=g) / D**0.5 for _ in range(L - 1)]
        self.gen = g

    def sample(self, n: int) -> torch.Tensor:
        last = torch.randn(n, self.spec.hidden_size, generator=self.gen)
        outs = [last @ torch.linalg.inv(a) for a in self.to_last]  # layer d's output, so that out_d @ a_d = last
        return torch.stack([*outs, last], 1)


def test_early_exit_distillation_lowers_held_out_kl_where_the_truth_is_known():
    fake = _Head()
    L, D = fake.spec.num_layers, fake.spec.hidden_size
    train, held = fake.sample(2048), fake.sample(512)
    lens = [torch.cat([torch.eye(D), torch.zeros(1, D)])] * (L - 1)  # the logit lens
    res = distill_exit_maps(fake, lens, train, steps=200, lr=1e-2, batch=128)
    maps, losses = res.maps, res.losses
    assert len(losses) == 200 and np.mean(losses[-20:]) < np.mean(losses[:20])
    kl_lens, kl_distilled = _held_kl(fake, lens, held), _held_kl(fake, maps, held)
    assert all(b < 0.3 * a for a, b in zip(kl_lens, kl_distilled, strict=True)), (kl_lens, kl_distilled)
    assert all(res.trained) and all(b < a for a, b in zip(res.holdout_start, res.holdout_trained, strict=True))
    # From the true maps, training can only overfit: every layer keeps its starting map.
    D1 = torch.zeros(1, D)
    truth = [torch.cat([a, D1]) for a in fake.to_last]
    worse = distill_exit_maps(fake, truth, fake.sample(64), steps=20, lr=0.5, batch=4, holdout=32)
    assert not any(worse.trained) and all(torch.equal(a, b) for a, b in zip(worse.maps, truth, strict=True))
    assert all(p.requires_grad for p in fake.model.parameters()), "the model's own flags are restored"
    assert fake.lm_head.weight.grad is None, "the model is never trained"
    same = distill_exit_maps(fake, lens, train, steps=0)
    assert not same.losses and all(torch.equal(a, b) for a, b in zip(same.maps, lens, strict=True))
    again = distill_exit_maps(fake, lens, train, steps=5, batch=8, seed=3, holdout=0).maps
    twice = distill_exit_maps(fake, lens, train, steps=5, batch=8, seed=3, holdout=0).maps
    assert all(torch.equal(a, b) for a, b in zip(again, twice, strict=True)), "seeded: the same maps"
    with pytest.raises(ValueError, match="sample must be"):
        distill_exit_maps(fake, lens, train[:, :2], steps=1)
    with pytest.raises(ValueError, match="lr"):
        distill_exit_maps(fake, lens, train, steps=1, lr=0)


def test_distillation_leaves_a_real_model_and_its_dense_path_alone(tiny_llama):
    slm = tiny_llama
    train = PositionSample(8, seed=0)
    ridge = fit_exit_maps(slm, _seqs(0, 4), ridge=1e-3, sample=train)
    x = train.tensor()
    assert x.shape == (4 * 8, slm.spec.num_layers, slm.spec.hidden_size)
    ids = _seqs(5, 1)[0][None]
    before_hash, before_logits = slm.weights_hash, slm.forward(ids, slm.dense_plan()).logits
    grads = [p.requires_grad for p in slm.model.parameters()]
    maps = distill_exit_maps(slm, ridge, x, steps=2, batch=8, holdout=0).maps
    assert not all(torch.equal(a, b) for a, b in zip(maps, ridge, strict=True)), "the maps did learn"
    assert slm.weights_hash == before_hash and [p.requires_grad for p in slm.model.parameters()] == grads
    assert torch.equal(slm.forward(ids, slm.dense_plan()).logits, before_logits)


def test_position_sample_is_seeded_per_sequence():
    outs = [torch.arange(30.0).reshape(10, 3) + i for i in range(3)]
    a, b = PositionSample(4, seed=2), PositionSample(4, seed=2)
    a.add(outs)
    b.add(outs)
    assert torch.equal(a.tensor(), b.tensor()) and a.tensor().shape == (4, 3, 3)
    short = PositionSample(50)
    short.add(outs)
    assert short.tensor().shape[0] == 10, "a shorter sequence gives all its positions"
    with pytest.raises(ValueError, match="per_sequence"):
        PositionSample(0)
    with pytest.raises(ValueError, match="no positions"):
        PositionSample(2).tensor()


def test_command_distills_and_reports_the_three_readouts(tmp_path, monkeypatch):
    from envs.base import shared_lm
    from experiments.exit_maps import fit_and_save

    slm = shared_lm(MODEL)  # loaded before the cache moves (its importance orderings need the data cache)
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path / "cache"))
    cfg = {
        "model": MODEL,
        "mix": "generated",
        "train_items": 12,
        "val_items": 6,
        "out": str(tmp_path / "o"),
        "distill_steps": 20,
        "distill_batch": 16,
        "progress": False,
    }
    card = fit_and_save(cfg, slm=slm)
    dist = card["distillation"]
    assert dist["steps"] == 20 and "early-exit loss" in card["method"]
    L = slm.spec.num_layers
    assert len(dist["holdout_kl_ridge"]) == len(dist["holdout_kl_trained"]) == L - 1
    kept = set(dist["trained_layers_kept"])
    assert kept == {i for i in range(L - 1) if dist["holdout_kl_trained"][i] < dist["holdout_kl_ridge"][i]}
    vk = dist["val_kl"]
    assert len(vk["logit_lens"]) == len(vk["ridge"]) == len(vk["distilled"]) == len(vk["depths"])
    ag = card["agreement"]
    assert len(ag["logit_lens"]) == len(ag["ridge"]) == len(ag["exit_maps"]) == len(ag["depths"])
    assert "distill_steps=20" in card["command"]
    loaded = load_exit_maps(cfg["out"], slm)
    assert loaded.card["distillation"] == dist
    assert slm.exit_maps is None
