"""Folders of tensors fitted to one model: a safetensors file and a self-hashed JSON card.

The channel predictor (:mod:`envs.runtime.predictor`) and the exit maps
(:mod:`envs.runtime.exit_maps`) are both stored this way. A folder holds exactly two files: the
tensors (never a pickle) and ``card.json``, which names the model the tensors were fitted for
(name, weights hash, spec), lists the tensors file's SHA-256 and carries ``card_sha256`` over
itself (:func:`envs.data.files.card_digest`). Writing is atomic; loading refuses, in one line that
names the command which rebuilds the folder, anything that does not match: a missing or edited
card, another format or version, a modified tensors file, a stray file, another model's weights or
shape, and tensors of the wrong names, shapes or dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from envs.data.files import (
    atomic_folder,
    atomic_write_json,
    card_digest,
    card_digest_problem,
    clean_leftovers,
    jsonable,
    sha256_file,
)

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import SparseLM

CARD_FILE = "card.json"


@dataclass(frozen=True)
class ArtifactKind:
    """What one kind of tensor folder is called and how it is rebuilt.

    Attributes:
        what: Its name in messages (``"channel predictor"``).
        format: The card's ``format`` field.
        version: The card's ``version`` field this PruneGym reads and writes.
        tensors_file: The safetensors file's name.
        command: The command that builds one (``python -m experiments.predictor``).
        folder_of: Where a plain name lives (under the cache root).
    """

    what: str
    format: str
    version: int
    tensors_file: str
    command: str
    folder_of: Callable[[str], Path]


def save_artifact(
    kind: ArtifactKind,
    tensors: Mapping[str, torch.Tensor],
    card: Mapping[str, Any],
    folder: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``tensors`` then ``card.json`` (last) to ``folder`` atomically; returns the card as written.

    The card gains ``format``, ``version``, ``files`` (the tensors file's SHA-256 and size) and
    ``card_sha256``.

    Raises:
        FileExistsError: ``folder`` exists and ``force`` is off.
    """
    from safetensors.torch import save_file

    out = dict(card)
    out.update(format=kind.format, version=kind.version)
    out.pop("card_sha256", None)
    with atomic_folder(folder, force=force) as tmp:
        path = tmp / kind.tensors_file
        meta = {"format": kind.format, "version": str(kind.version), **dict(metadata or {})}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        out["files"] = {kind.tensors_file: {"sha256": sha256_file(path), "bytes": path.stat().st_size}}
        out = jsonable(out)
        out["card_sha256"] = card_digest(out)
        atomic_write_json(tmp / CARD_FILE, out)
    return out


def is_name(value: str | Path) -> bool:
    """Whether ``value`` is a plain name (looked up under the cache) rather than a folder path."""
    s = str(value)
    return not isinstance(value, Path) and bool(s) and not any(c in s for c in "/\\") and not s.startswith((".", "~"))


def load_artifact(
    kind: ArtifactKind,
    name_or_folder: str | Path,
    slm: SparseLM,
    want: Callable[[dict[str, Any]], Mapping[str, tuple[int, ...]]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and check a folder of ``kind`` fitted for ``slm``.

    Args:
        kind: The folder's kind.
        name_or_folder: A plain name (under ``kind.folder_of``) or a folder path (a :class:`~pathlib.Path`,
            or a string with a ``/`` or starting with ``.`` or ``~``).
        slm: The model the tensors must have been fitted for.
        want: Maps the (checked) card to the float32 tensors the file must hold, ``{key: shape}``.

    Returns:
        ``(tensors, card)``.

    Raises:
        ValueError: One line naming the problem and the command that rebuilds the folder.
    """
    named = is_name(name_or_folder)
    folder = kind.folder_of(str(name_or_folder)) if named else Path(name_or_folder).expanduser()
    where = f"name={name_or_folder}" if named else f"out={folder}"
    rebuild = f"`{kind.command} model={slm.name} {where}"

    def fail(problem: str, *, exists: bool = True) -> ValueError:
        return ValueError(f"{problem}; rebuild it with {rebuild}{' force=true' if exists else ''}`")

    if folder.parent.is_dir():
        clean_leftovers(folder)
    if not folder.is_dir():
        raise fail(f"no {kind.what} at {folder}", exists=False)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise fail(f"{folder} holds no {CARD_FILE} (not a {kind.what} folder, or one written by hand)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"{card_path} is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != kind.format:
        fmt = card.get("format") if isinstance(card, dict) else None
        raise fail(f"{card_path} is not a {kind.what} card (format {fmt!r}, expected {kind.format!r})")
    if card.get("version") != kind.version:
        raise fail(
            f"{card_path} is {kind.what} format version {card.get('version')!r}; this PruneGym reads {kind.version}"
        )
    problem = card_digest_problem(card)
    if problem is not None:
        raise fail(f"{card_path} {problem}")
    files = card.get("files")
    entry = files.get(kind.tensors_file) if isinstance(files, dict) else None
    tensors_path = folder / kind.tensors_file
    if not isinstance(entry, dict) or not tensors_path.is_file():
        raise fail(f"{folder} lacks {kind.tensors_file} or the card does not list it")
    stray = sorted(p.name for p in folder.iterdir() if p.name not in (CARD_FILE, kind.tensors_file))
    if stray:
        raise fail(f"{folder} holds files its card does not list: {stray}")
    sha = sha256_file(tensors_path)
    if sha != entry.get("sha256"):
        raise fail(
            f"{tensors_path} does not match its card: sha256 {sha[:16]}..., the card records "
            f"{str(entry.get('sha256'))[:16]}... (the tensors file was modified or truncated)"
        )
    m = card.get("model") if isinstance(card.get("model"), dict) else {}
    if m.get("weights_hash") != slm.weights_hash:
        raise fail(
            f"the {kind.what} in {folder} was trained for model {m.get('name')!r} with weights hash "
            f"{m.get('weights_hash')!r}, but {slm.name} has weights hash {slm.weights_hash!r}"
        )
    if m.get("spec") != slm.spec.to_dict():
        raise fail(
            f"the {kind.what} in {folder} is for model shape {m.get('spec')}, but {slm.name} is {slm.spec.to_dict()}"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as exc:
        raise fail(f"{tensors_path} cannot be read as safetensors ({exc})") from None
    shapes = dict(want(card))

    def order(k: str) -> tuple[int, str]:
        head = k.split(".")[0]
        return (int(head) if head.isdigit() else -1, k)

    missing = sorted(set(shapes) - set(tensors), key=order)
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise fail(f"{tensors_path} lacks tensors {missing[:4]} or holds unexpected ones {extra[:4]}")
    for key, shape in shapes.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != torch.float32:
            raise fail(f"{tensors_path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected float32 {shape}")
    return tensors, card
