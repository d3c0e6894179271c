"""Fit a per-layer keep allocation: ``python -m experiments.allocate model=smollm2-135m rules=[static,input_attn]``.

Measures, on train-split news text, how far each layer's pruning alone moves the next-token
distribution from dense, for every rule and keep level (:mod:`envs.runtime.allocation`), writes
``<cache_root>/allocations/<name>/`` (or ``out=``) atomically and prints, per rule, the most and least
sensitive layers, the floor chosen and the keeps per layer at mean keeps 0.25, 0.4 and 0.6.
Settings in ``conf/allocate.yaml``.

``model=`` takes what ``experiments.prepare`` takes; bad settings end the run with one line
(``error: ...``) before the model loads. ``fit_and_save(cfg)`` is the plain function behind the
entry point; tests call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments import cli

# Every setting and its default (conf/allocate.yaml holds the same, commented).
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "name": None,
    "out": None,
    "force": False,
    "rules": ["static", "input_attn"],
    "predictor": None,
    "levels": [0.1, 0.2, 0.3, 0.5, 0.7],
    "docs": 20,
    "seq_len": 80,
    "skip": 8,
    "threads": 2,
    "progress": True,
}
INT_SETTINGS = {"docs": 1, "seq_len": 2, "skip": 1, "threads": 1}
SHOW_MEANS = (0.25, 0.4, 0.6)


def check_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings, checked before anything loads; defaults fill keys ``cfg`` lacks.

    Returns:
        The settings as plain values, with ``model`` a name and ``name`` filled in (``<model>-alloc``).

    Raises:
        ValueError: An unknown key or a value out of range; the message names the setting and what it takes.
    """
    from envs.runtime.allocation import check_alloc_rules, check_levels, default_allocation_name
    from experiments.prepare import model_name

    run = cli.checked_settings(cfg, SETTINGS, INT_SETTINGS, "allocate")
    run["model"] = model_name(run["model"], "allocate")
    if not isinstance(run["rules"], list | tuple) or not isinstance(run["levels"], list | tuple):
        raise ValueError("rules and levels must be lists, e.g. rules=[static,input_attn] levels=[0.1,0.3,0.6]")
    run["rules"] = list(check_alloc_rules(run["rules"]))
    if any(isinstance(x, bool) or not isinstance(x, int | float) for x in run["levels"]):
        raise ValueError(f"levels must be numbers, got {run['levels']}")
    run["levels"] = list(check_levels(run["levels"]))
    if run["skip"] >= run["seq_len"]:
        raise ValueError(f"skip={run['skip']} must be below seq_len={run['seq_len']}")
    if "predicted" in run["rules"] and not run["predictor"]:
        raise ValueError("rules=[...,predicted] needs predictor=<name> (python -m experiments.predictor makes one)")
    for key in ("force", "progress"):
        if not isinstance(run[key], bool):
            raise ValueError(f"{key}={run[key]!r} must be true or false")
    if run["name"] is None:
        run["name"] = default_allocation_name(run["model"])
    cli.plain_name(run["name"])
    return run


def output_folder(run: Mapping[str, Any]) -> Path:
    """Where the allocation goes: ``out``, or ``<cache_root>/allocations/<name>``."""
    from envs.runtime.allocation import allocation_folder

    return Path(str(run["out"])).expanduser() if run["out"] else allocation_folder(str(run["name"]))


def fit_and_save(cfg: DictConfig | Mapping[str, Any], *, slm: Any = None) -> dict[str, Any]:
    """Fit an allocation as ``cfg`` says, save it, print its table; return the card written plus ``folder``.

    Args:
        cfg: The settings (``conf/allocate.yaml`` keys; missing keys take their defaults).
        slm: A loaded model to use instead of loading ``cfg.model``.

    Raises:
        ValueError: A bad setting (before anything loads).
        FileExistsError: The output folder exists and ``force`` is off.
    """
    run = check_settings(cfg)
    folder = output_folder(run)
    if folder.exists() and not run["force"]:
        raise FileExistsError(
            f"{folder} already exists: pass force=true to replace it, or choose another name= or out="
        )
    from envs.data.corpus import natural_text
    from envs.runtime.allocation import fit_allocation, save_allocation

    docs = natural_text("train")  # before the model: a missing data cache is one line, not a wasted load
    if slm is None:
        from experiments.prepare import load_base

        slm = load_base(run["model"], run["threads"])
    if run["predictor"]:
        from envs.runtime.predictor import load_predictor

        slm.set_predictor(load_predictor(run["predictor"], slm), run["predictor"])
    alloc = fit_allocation(
        slm,
        docs,
        run["rules"],
        run["levels"],
        seq_len=run["seq_len"],
        max_docs=run["docs"],
        skip=run["skip"],
        progress=run["progress"],
    )
    alloc.card["name"] = run["name"]
    alloc.card["command"] = " ".join(
        [f"python -m experiments.allocate model={run['model']} name={run['name']}"]
        + [f"{k}={run[k]}".replace(" ", "") for k in ("rules", "levels", "docs", "seq_len", "skip")]
    )
    folder = save_allocation(alloc, folder, force=bool(run["force"]))
    print(summary(alloc, folder))
    return {**alloc.card, "folder": str(folder)}


def summary(alloc: Any, folder: Path) -> str:
    """The table printed after fitting: per rule, the layers' sensitivity and the keeps at a few means."""
    tr = alloc.card["training"]
    lines = [
        f"layer allocation {alloc.name} for {alloc.card['model']['name']}: {folder}",
        f"  measured on {tr['scored_positions']} positions of {tr['documents']} {tr['split']}-split documents "
        f"in {tr['seconds']:.0f} s ({tr['torch_threads']} threads); levels {list(alloc.levels)}",
    ]
    for rule in alloc.rules:
        kl = alloc.kl[rule][:, 0]
        order = kl.argsort(descending=True).tolist()
        lines.append(
            f"  {rule}: KL at keep {alloc.levels[0]:g}, layer alone — most sensitive "
            + ", ".join(f"{i}: {kl[i]:.3g}" for i in order[:3])
            + "; least "
            + ", ".join(f"{i}: {kl[i]:.3g}" for i in order[-2:])
        )
        sel = (alloc.card.get("allocation") or {}).get("floor_selection", {}).get(rule)
        if sel:
            lines.append(
                f"    floor {alloc.floors[rule]:g} × mean (whole-plan KL at means {sel['means']}, by floor: "
                + "; ".join(f"{f}: " + " ".join(f"{x:.3g}" for x in v) for f, v in sel["kl"].items())
                + ")"
            )
        for m in SHOW_MEANS:
            lines.append(f"    mean keep {m:<4g} → " + " ".join(f"{k:.2f}" for k in alloc.keeps(rule, m)))
    return "\n".join(lines)


@cli.hydra_main(config_name="allocate")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: bad settings and unknown models end the run with one line."""
    fit_and_save(cfg)


def main() -> None:
    """``python -m experiments.allocate``: :func:`hydra_main` after rewriting ``model=<name>`` for Hydra."""
    from experiments.prepare import run_with_model_names

    run_with_model_names(hydra_main)


if __name__ == "__main__":
    main()
