"""Publish an exported controller: ``python -m experiments.publish <folder> --repo-id user/name``.

Pushes the folder to the Hugging Face Hub with ``huggingface_hub.HfApi.upload_folder`` (needs network
and a token: ``HF_TOKEN`` or ``huggingface-cli login``). ``--dry-run OUTDIR`` uploads nothing: it
writes ``upload.json`` (repo id, commit message, every file with its size and sha256) and copies the
files that would be uploaded into ``OUTDIR``.

Before anything is pushed, the folder is checked: its card and file hashes must verify
(:func:`agents.controller.read_card` / :func:`~agents.controller.verify_files`), and no file may be
a pickle, whatever its name: a stream of any pickle protocol (0 to 5), or a zip, tar, gzip, bz2 or
xz container holding one (``torch.save``, joblib). The card must verify and list every file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.controller import read_card, sha256_file, verify_files

MAX_NESTING = 3  # archives inside compressed files inside archives: deeper than any real checkpoint format


class PublishError(ValueError):
    """The folder cannot be published as it is; the message says why."""


def _parses_as_pickle(data: bytes) -> bool:
    """Whether ``data`` is a complete pickle stream of any protocol (0-5), by walking its opcodes.

    Nothing is unpickled: :func:`pickletools.genops` only reads the opcodes. A stream counts when
    it parses to its STOP opcode; text and binary formats that are not pickles stop at the first
    byte that is no opcode.
    """
    import io
    import pickletools

    if not data:
        return False
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 - any parse failure means: not a pickle
        return False
    return False


def _holds_pickle(data: bytes, depth: int = 0) -> bool:
    """Whether ``data`` is a pickle, or a zip / gzip / bz2 / xz / tar container holding one (torch.save, joblib)."""
    import bz2
    import gzip
    import io
    import lzma
    import tarfile

    if _parses_as_pickle(data):
        return True
    if depth >= MAX_NESTING:
        return False
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return any(_holds_pickle(zf.read(n), depth + 1) for n in zf.namelist() if not n.endswith("/"))
        except (zipfile.BadZipFile, OSError, RuntimeError):
            return False
    for magic, opener in ((b"\x1f\x8b", gzip.decompress), (b"BZh", bz2.decompress), (b"\xfd7zXZ", lzma.decompress)):
        if data.startswith(magic):
            try:
                return _holds_pickle(opener(data), depth + 1)
            except (OSError, EOFError, ValueError, lzma.LZMAError):
                return False
    if len(data) > 262 and data[257:262] == b"ustar":
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                for m in tf.getmembers():
                    f = tf.extractfile(m) if m.isfile() else None
                    if f is not None and _holds_pickle(f.read(), depth + 1):
                        return True
        except tarfile.TarError:
            return False
    return False


def is_pickle(path: Path) -> bool:
    """Whether ``path`` holds a pickle, judged by content, not name: any protocol, bare or inside an archive."""
    return _holds_pickle(Path(path).read_bytes())


def check_folder(folder: str | Path) -> list[dict[str, Any]]:
    """Validate an export folder for publishing; returns the file list (path, bytes, sha256).

    Raises:
        PublishError: Not an export, a file that fails its hash, or a pickle anywhere in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: pass the folder written by `python -m experiments.export`")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    pickles = [str(p.relative_to(folder)) for p in files if is_pickle(p)]
    if pickles:
        raise PublishError(
            f"refusing to publish {folder}: {pickles} are pickles, which run code when loaded. Publish only what "
            "`python -m experiments.export` writes (ONNX, safetensors, JSON, Markdown)"
        )
    try:
        card = read_card(folder)
        verify_files(folder, card)  # refuses files the card does not list
    except ValueError as exc:
        raise PublishError(f"refusing to publish {folder}: {exc}") from None
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]


def commit_message(folder: Path) -> str:
    """A commit message naming the controller."""
    card = read_card(folder)
    return f"Upload PruneGym controller ({card.get('algo')}, {card['env']['id']}, {card['model']['id']})"


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    dry_run: str | Path | None = None,
    private: bool = False,
    message: str | None = None,
) -> dict[str, Any]:
    """Check and push ``folder`` to ``repo_id`` (or, with ``dry_run``, write what would be pushed there).

    Returns:
        The upload record (repo id, commit message, files; and the commit URL when pushed).

    Raises:
        PublishError: See :func:`check_folder`; no token when pushing.
    """
    folder = Path(folder)
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PublishError(f"--repo-id must look like user/name, got {repo_id!r}")
    files = check_folder(folder)
    record: dict[str, Any] = {
        "repo_id": repo_id,
        "repo_type": "model",
        "private": private,
        "commit_message": message or commit_message(folder),
        "files": files,
    }
    if dry_run is not None:
        out = Path(dry_run)
        if out.exists() and any(out.iterdir()):
            raise PublishError(f"dry-run folder {out} is not empty: choose a new or empty folder")
        (out / "files").mkdir(parents=True, exist_ok=True)
        for f in files:
            dst = out / "files" / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / f["path"], dst)
        record["dry_run"] = True
        (out / "upload.json").write_text(json.dumps(record, indent=1))
        return record
    from huggingface_hub import HfApi, get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` (a token with write access), "
            "or use --dry-run OUTDIR to see what would be uploaded"
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=record["commit_message"],
        allow_patterns=[f["path"] for f in files],
    )
    record["commit_url"] = str(getattr(info, "commit_url", info))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.publish",
        description="Push an exported PruneGym controller folder to the Hugging Face Hub "
        "(checks hashes; refuses pickles).",
    )
    p.add_argument("folder", help="the export folder (python -m experiments.export)")
    p.add_argument("--repo-id", required=True, help="the Hub model repository, user/name")
    p.add_argument("--dry-run", metavar="OUTDIR", help="upload nothing; write upload.json and the files to OUTDIR")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", help="commit message (default names the controller)")
    args = p.parse_args(argv)
    try:
        record = publish(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private, message=args.message)
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(f["bytes"] for f in record["files"])
    where = f"dry run written to {args.dry_run}" if args.dry_run else record.get("commit_url")
    print(f"{record['repo_id']}: {len(record['files'])} files, {total} bytes; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
