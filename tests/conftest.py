"""Shared fixtures: offline settings, a private cache, tiny models and (when prepared) the embedded model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from envs.runtime.models import tiny_model
from envs.runtime.sparse_lm import SparseLM

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")


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
