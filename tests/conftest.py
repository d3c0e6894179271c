"""Shared fixtures: offline settings, a private cache, tiny models and (when prepared) the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from envs.measure.cost_model import COST_MODEL_SCHEMA_VERSION, FEATURES, BucketFit, CostModel, _slm_identity
from envs.measure.meters import device_tag, package_versions, threads_in_use
from envs.runtime.models import tiny_model
from envs.runtime.sparse_lm import SparseLM

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")
MODEL = "tiny-llama"  # the tiny environments' model (envs.base.shared_lm)


def random_importance(spec, seed: int = 0):
    """A seeded random ordering, so tests exercise non-identity layouts."""
    from envs.runtime.importance import Importance

    g = torch.Generator().manual_seed(seed)

    def perm(n: int) -> list[int]:
        return torch.randperm(n, generator=g).tolist()

    L = spec.num_layers
    return Importance(
        layer_order=perm(L),
        head_order=[perm(spec.num_heads) for _ in range(L)],
        kv_order=[perm(spec.num_kv_heads) for _ in range(L)],
        mlp_order=[perm(spec.intermediate_size) for _ in range(L)],
        meta={"method": "random-test"},
    )


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_slm(family) -> SparseLM:
    model = tiny_model(family, seed=0)
    slm = SparseLM(model, name=f"tiny-{family}")
    slm.set_importance(random_importance(slm.spec, seed=1))
    return slm


@pytest.fixture
def tiny_llama() -> SparseLM:
    slm = SparseLM(tiny_model("llama", seed=0), name="tiny-llama")
    slm.set_importance(random_importance(slm.spec, seed=1))
    return slm


@pytest.fixture(scope="session")
def smollm() -> SparseLM:
    """The embedded SmolLM2-135M (converted and calibrated once into the cache)."""
    try:
        return SparseLM.from_pretrained()
    except FileNotFoundError as exc:
        if os.environ.get("CI"):  # CI installs it: a missing model there is a failure, not a skip
            raise
        pytest.skip(f"embedded model not available: {exc}")


# ---------------------------------------------------------------------------------------- tiny environments
def synthetic_cost_model(slm) -> CostModel:
    """A deterministic calibration for the tiny model: 0.1 ms fixed + 10 ms per GFLOP, energy 10x."""
    meta = {
        "schema_version": COST_MODEL_SCHEMA_VERSION,
        "device": device_tag("cpu"),
        "device_kind": "cpu",
        "threads": threads_in_use(),
        **_slm_identity(slm),  # model, weights, dtype, shape and engine code, as a real calibration records
        "packages": package_versions(),
        "energy_source": "estimated",
        "features": list(FEATURES),
        "seq_lens": [1, 128],
    }
    coef = [1e-4, 1e-5, 5e-6, 5e-6, 0.0, 1e-2, 1e-2, 1e-2]
    buckets = {t: BucketFit(t, coef, [10 * c for c in coef], 16, 0.0, 0.0, 0.0) for t in meta["seq_lens"]}
    return CostModel(meta, buckets, [])


@pytest.fixture(scope="session")
def one_thread():
    """Tiny matmuls on a shared 2-core machine run ~10x faster on one thread (no spinning pool)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cost_path(one_thread, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cost") / "tiny.json"
    from envs.base import shared_lm

    synthetic_cost_model(shared_lm(MODEL)).save(path)
    return str(path)


def tiny_kwargs(env_id: str, cost_path: str, **over) -> dict:
    kw = {"model": MODEL, "n_items": 6, "cost_model": cost_path}
    if "PerToken" in env_id:
        kw |= {"num_groups": 2, "max_new_tokens": 4}
    elif "LayerByLayer" in env_id:
        kw |= {"probe_layers": 1, "probe_dim": 4}
    else:
        kw |= {"probe_layers": 1, "probe_dim": 4, "num_groups": 2}
    return kw | over
