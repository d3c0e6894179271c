"""Where PruneGym keeps things on disk, and how it writes them so that a kill never leaves half a file.

- :func:`cache_root`: the one folder for models, importance orderings, cost models and data.
- :func:`atomic_write_text` / :func:`atomic_write_json` / :func:`atomic_write_bytes`: a file is
  written beside its target and renamed over it, so readers see the old file or the new one.
- :func:`atomic_folder`: the same for a whole folder (an export, a prepared model).
- :class:`Checkpoints`: numbered checkpoint folders and a ``latest.json`` pointer that is replaced
  last, so a run killed at any point resumes from the newest complete checkpoint.

Temporary names carry the writer's process id; a leftover whose writer is dead is removed the next
time anything is written to the same target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

LATEST = "latest.json"


def cache_root() -> Path:
    """The folder PruneGym caches models, importance orderings and data in.

    ``PRUNEGYM_CACHE`` overrides the default ``~/.cache/prunegym``.
    """
    root = Path(os.environ.get("PRUNEGYM_CACHE", Path.home() / ".cache" / "prunegym"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON-ready containers (for cards and descriptions).

    Mappings and sequences recursively (OmegaConf nodes too); dataclasses as dicts; numpy arrays
    and scalars as lists and numbers; anything else (a cost-model object, a tokenizer) by its type
    name, ``"<TypeName>"``.
    """
    import dataclasses
    from collections.abc import Mapping, Sequence

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping) or hasattr(value, "items") and callable(value.items):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------------------- temp names
def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_leftovers(target: str | Path) -> list[Path]:
    """Tidy the temporary siblings of ``target`` (``.<name>.tmp-<pid>-…``, ``.old-…``) whose writer is dead.

    A writer killed between moving the old ``target`` aside and moving the new one in leaves no
    ``target`` but a complete ``.old-…``: that one is put back. Everything else is removed.

    Returns:
        The paths removed or put back.
    """
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for p in sorted(target.parent.glob(f".{target.name}.*-*-*")):
        kind, _, rest = p.name.removeprefix(f".{target.name}.").partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            os.replace(p, target)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary sibling renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = _temp_name(path, "tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 1, **kwargs: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``kwargs`` go to :func:`json.dumps`)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **kwargs))


# ---------------------------------------------------------------------------------------- folders
@contextlib.contextmanager
def atomic_folder(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary folder next to ``out`` that becomes ``out`` only when the block ends without error.

    With ``force``, an existing ``out`` stays in place until the new folder is complete. Leftovers
    of writers that died are removed first.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is off.
    """
    out = Path(out).resolve()
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} already exists: pass force=True (--force) to replace it, or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = _temp_name(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Numbered checkpoint folders under ``root`` and a pointer to the newest complete one.

    :meth:`save` writes ``<prefix><step>`` completely, then replaces ``latest.json``, then removes
    folders beyond ``keep``; a kill at any point leaves ``latest.json`` naming a complete folder (or
    no pointer at all, before the first save). Folders that no pointer names are never read.

    Args:
        root: The folder holding the checkpoints.
        prefix: Name prefix of each checkpoint folder.
        keep: How many complete checkpoints to keep (at least 1).
    """

    def __init__(self, root: str | Path, prefix: str = "iter_", keep: int = 2) -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.keep = max(1, int(keep))

    def latest(self) -> dict[str, Any] | None:
        """The pointer record of the newest complete checkpoint (``folder``, ``step`` and extras), or ``None``."""
        path = self.root / LATEST
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # cannot happen with atomic writes; a hand-edited file is treated as absent
        if not isinstance(record, dict) or not (self.root / str(record.get("folder"))).is_dir():
            return None
        return record

    def latest_folder(self) -> Path | None:
        """The folder of :meth:`latest`, or ``None``."""
        record = self.latest()
        return None if record is None else self.root / str(record["folder"])

    def save(self, step: int, write: Callable[[Path], None], **record: Any) -> Path:
        """Write checkpoint ``step`` with ``write(folder)`` and point ``latest.json`` at it.

        Args:
            step: The step (or iteration) the checkpoint holds.
            write: Fills the (empty, temporary) folder it is given.
            **record: Extra JSON fields for the pointer record.

        Returns:
            The checkpoint folder.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}{int(step):06d}"
        folder = self.root / name
        with atomic_folder(folder, force=True) as tmp:
            write(tmp)
        atomic_write_json(self.root / LATEST, {"folder": name, "step": int(step), "time": time.time(), **record})
        self._prune(name)
        return folder

    def _prune(self, newest: str) -> None:
        olds = sorted(p for p in self.root.glob(f"{self.prefix}*") if p.is_dir() and p.name != newest)
        for old in olds[: max(0, len(olds) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def card_digest(card: Mapping[str, Any]) -> str:
    """The sha256 a card records as ``card_sha256``: of its canonical JSON without that field.

    Controller cards (:mod:`agents.controller`) and channel-predictor cards
    (:mod:`envs.runtime.predictor`) are covered by it alike.
    """
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def versions_of(names: Sequence[str]) -> dict[str, str]:
    """Versions of the packages ``names`` and of Python (``"not-installed"`` for an absent package), for cards."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in names:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not-installed"
    return out


def card_digest_problem(card: Mapping[str, Any]) -> str | None:
    """What is wrong with a card's own hash (``card_sha256``), or ``None`` when it matches its content.

    Callers put the answer in their own error, with the command that rebuilds what they load.
    """
    try:
        digest = card_digest(card)
    except ValueError as exc:  # NaN or infinity: not JSON
        return f"holds values JSON cannot carry ({exc})"
    if digest != card.get("card_sha256"):
        return (
            f"was modified after it was written: its content hashes to {digest[:16]}..., the card records "
            f"{str(card.get('card_sha256'))[:16]}... (card_sha256 mismatch)"
        )
    return None
