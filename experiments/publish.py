"""Publish an exported controller: ``python -m experiments.publish <folder> --repo-id user/name``.

Pushes the folder to the Hugging Face Hub with ``huggingface_hub.HfApi.upload_folder`` (needs network
and a token: ``HF_TOKEN`` or ``huggingface-cli login``). ``--dry-run OUTDIR`` uploads nothing: it
writes ``upload.json`` (repo id, commit message, every file with its size and sha256) and copies the
files that would be uploaded into ``OUTDIR``.

Before anything is pushed, the folder is checked: its card and file hashes must verify
(:func:`agents.controller.read_card` / :func:`~agents.controller.verify_files`), and no file may be
a pickle (``.pkl``/``.pickle``/``.pt``/``.pth``/``.bin``/``.ckpt`` with pickle or zip-pickle
content, or any file starting with a pickle protocol header).
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

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")


class PublishError(ValueError):
    """The folder cannot be published as it is; the message says why."""


def is_pickle(path: Path) -> bool:
    """Whether ``path`` holds a pickle: a pickle protocol header, or a torch zip archive with ``data.pkl``."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if head[:1] in (b"(", b"}", b"]", b"c"):  # protocol 0/1 opcodes
            return True
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(".pkl") for n in zf.namelist())
    return False


def check_folder(folder: str | Path) -> list[dict[str, Any]]:
    """Validate an export folder for publishing; returns the file list (path, bytes, sha256).

    Raises:
        PublishError: Not an export, a file that fails its hash, or a pickle anywhere in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: pass the folder written by `python -m experiments.export`")
    try:
        card = read_card(folder)
        verify_files(folder, card)
    except ValueError as exc:
        raise PublishError(f"refusing to publish {folder}: {exc}") from None
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    pickles = [str(p.relative_to(folder)) for p in files if is_pickle(p)]
    if pickles:
        raise PublishError(
            f"refusing to publish {folder}: {pickles} are pickles, which run code when loaded. Publish only what "
            "`python -m experiments.export` writes (ONNX, safetensors, JSON, Markdown)"
        )
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
