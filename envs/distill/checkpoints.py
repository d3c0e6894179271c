"""Checkpoints of a preparation that survive a kill at any point of their writing (safetensors + JSON, no pickle).

A checkpoint folder holds the trained tensors (``params.safetensors``), the optimiser's tensors
(``optimizer.safetensors``) and everything else as JSON (``state.json``: the step, the optimiser's
hyper-parameters and scalars, the seed, the training hash, the elapsed training time). The folders
are numbered by step under the checkpoint directory and managed by
:class:`envs.data.files.Checkpoints`: each is written completely under a temporary name and renamed
into place, and only then does ``latest.json`` (itself replaced atomically) point at it. Whatever
instant a run is killed at, ``latest.json`` names a complete checkpoint (or there is none yet), so
a resume loses at most one checkpoint interval; the previous checkpoint is kept until a newer one
is complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from envs.data.files import Checkpoints, clean_leftovers
from envs.distill.lora import LowRankDeltas
from envs.runtime.sparse_lm import SparseLM

CHECKPOINT_VERSION = 1  # of the files inside a checkpoint folder
PREFIX = "step_"  # checkpoint folders are step_000050, step_000100, ...
KEEP = 2  # complete checkpoints kept: the newest and the one before it
STATE_FILE = "state.json"
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(tmp|old)-\d+-[0-9a-f]+$")


def trainable_state(slm: SparseLM, deltas: LowRankDeltas | None) -> dict[str, torch.Tensor]:
    """The tensors a preparation trains, by name: the LoRA factors, the adapted set, or the trainable parameters."""
    if deltas is not None:
        return {f"lora.{k}": v.detach() for k, v in deltas.state_dict().items()}
    if slm.adapted is not None:
        return {f"adapted.{k}": v.detach() for k, v in slm.adapted_tensors().items()}
    return {n: p.detach() for n, p in slm.model.named_parameters() if p.requires_grad}


def tidy(folder: str | Path) -> list[Path]:
    """Remove (or put back) the temporary siblings that killed writers left in a checkpoint directory.

    Returns:
        The paths removed or put back (see :func:`envs.data.files.clean_leftovers`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = {m["target"] for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))}
    return [p for t in sorted(targets) for p in clean_leftovers(folder / t)]


def save_checkpoint(
    folder: str | Path,
    *,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = KEEP,
) -> Path:
    """Write checkpoint ``step`` under ``folder`` and point ``latest.json`` at it once it is complete.

    Args:
        folder: The checkpoint directory (``step_<step>`` folders and ``latest.json``).
        step: Steps completed.
        params: Trainable tensors by name.
        optimizer: The optimiser; its per-parameter tensors go to safetensors, its hyper-parameters to JSON.
        state: Extra JSON state (seed, config hash, elapsed time, before figures).
        keep: Complete checkpoints to keep (older ones are removed after the pointer moved on).

    Returns:
        The checkpoint's own folder.
    """
    sd = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                opt_tensors[f"{pid}.{k}"] = v.contiguous().clone()
            else:
                opt_scalars[f"{pid}.{k}"] = v
    meta = {
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "param_groups": sd["param_groups"],
        "optimizer_scalars": opt_scalars,
        **state,
    }
    tensors = {k: v.contiguous().clone() for k, v in params.items()}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "params.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))

    tidy(folder)
    return Checkpoints(folder, prefix=PREFIX, keep=keep).save(step, write, version=CHECKPOINT_VERSION)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The folder of the newest complete checkpoint under ``folder``, or ``None``.

    A directory written before numbered checkpoints (``state.json`` directly in it) is its own
    checkpoint, so a run started with an older PruneGym still resumes.
    """
    folder = Path(folder)
    found = Checkpoints(folder, prefix=PREFIX).latest_folder()
    if found is None and (folder / STATE_FILE).is_file():
        return folder
    return found


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read the newest complete checkpoint written by :func:`save_checkpoint` under ``folder``.

    Returns:
        ``(params, optimizer_state_dict, state)``.

    Raises:
        FileNotFoundError: No complete checkpoint there.
        ValueError: Another checkpoint version.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    tidy(folder)
    ck = latest_checkpoint(folder)
    if ck is None:
        raise FileNotFoundError(
            f"no checkpoint in {folder} (no latest.json naming a complete checkpoint); "
            "run without resume=true to start fresh"
        )
    state = json.loads((ck / STATE_FILE).read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{ck}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}; "
            "run without resume=true to start fresh"
        )
    params = load_file(str(ck / "params.safetensors"))
    opt_t = load_file(str(ck / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in list(opt_t.items()) + list(state.pop("optimizer_scalars").items()):
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    groups = state.pop("param_groups")
    for g in groups:  # JSON has no tuples; torch's optimisers keep betas as one
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt_sd = {"state": opt_state, "param_groups": groups}
    return params, opt_sd, state
