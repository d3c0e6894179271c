"""Fit exit maps: ``python -m experiments.exit_maps model=smollm2-135m name=<name>``.

Fits one affine map per layer from that layer's output to the last layer's
(:mod:`envs.runtime.exit_maps`) on train-split items of a task mix (each prompt followed by each of
its choices, as the scorer feeds them) and, optionally, train-split news text; then measures on
val items of the same mix how often the answer of a plan that stops after ``d`` layers agrees with
the full model's, with and without the maps, at the staged environment's exit depths. Writes
``<cache_root>/exit_maps/<name>/`` (or ``out=``) atomically and prints that table. Settings in
``conf/exit_maps.yaml``; bad settings end the run with one line before the model loads.

``fit_and_save(cfg)`` is the plain function behind the entry point; tests call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments import cli

# Every setting and its default (conf/exit_maps.yaml holds the same, commented).
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "name": None,
    "out": None,
    "force": False,
    "mix": "mc",
    "train_items": 300,
    "news_docs": 0,
    "max_len": 256,
    "ridge": 1e-4,
    "distill_steps": 0,
    "distill_lr": 3e-4,
    "distill_batch": 256,
    "distill_positions": 16,
    "distill_holdout": 1024,
    "val_items": 120,
    "every": 4,
    "first": 2,
    "seed": 0,
    "threads": 2,
    "progress": True,
}
BASE = ("mix", "train_items", "news_docs", "max_len", "ridge", "seed")  # the settings of every fit
SAVED_SETTINGS = (*BASE, "distill_steps", "distill_lr", "distill_batch", "distill_positions", "distill_holdout")
INT_SETTINGS = {
    "distill_steps": 0,
    "distill_batch": 1,
    "distill_positions": 1,
    "distill_holdout": 0,
    "train_items": 0,
    "news_docs": 0,
    "max_len": 2,
    "val_items": 0,
    "every": 1,
    "first": 1,
    "seed": 0,
    "threads": 1,
}


def check_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings, checked before anything loads; defaults fill keys ``cfg`` lacks.

    Raises:
        ValueError: An unknown key or a value out of range; the message names the setting and what it takes.
    """
    from experiments.prepare import model_name

    run = cli.checked_settings(cfg, SETTINGS, INT_SETTINGS, "exit-maps")
    run["model"] = model_name(run["model"], "exit maps")
    ridge = run["ridge"]
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge >= 0:
        raise ValueError(f"ridge={ridge!r} is out of range: set ridge=<number >= 0>")
    lr = run["distill_lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"distill_lr={lr!r} is out of range: set distill_lr=<number > 0>")
    if run["train_items"] == 0 and run["news_docs"] == 0:
        raise ValueError("train_items=0 and news_docs=0 leave nothing to fit on: set one of them > 0")
    for key in ("force", "progress"):
        if not isinstance(run[key], bool):
            raise ValueError(f"{key}={run[key]!r} must be true or false")
    if not isinstance(run["mix"], str) or not run["mix"]:
        raise ValueError(f"mix={run['mix']!r} must name a task mix (mc, mc-known, a YAML file)")
    if run["name"] is None:
        run["name"] = f"{Path(run['model'].rstrip('/')).name}-exits"
    cli.plain_name(run["name"])
    return run


def output_folder(run: Mapping[str, Any]) -> Path:
    """Where the maps go: ``out``, or ``<cache_root>/exit_maps/<name>``."""
    from envs.runtime.exit_maps import exit_maps_folder

    return Path(str(run["out"])).expanduser() if run["out"] else exit_maps_folder(str(run["name"]))


def item_sequences(slm: Any, items: Sequence[Any], scorer: Any) -> list[Any]:
    """Token ids of each prompt followed by each of its choices (or its answer), as the scorer feeds them."""
    import torch

    seqs = []
    for it in items:
        prompt = scorer.encode(slm, it.prompt)
        for c in it.choices if it.choices else [it.answer]:
            seqs.append(torch.tensor(prompt + scorer.encode(slm, " " + c)))
    return seqs


def dense_picks(slm: Any, items: Sequence[Any]) -> list[Any]:
    """The full model's pick of each multiple-choice item (exit maps never touch it)."""
    from envs.tasks.scoring import Scorer

    scorer, dense = Scorer(), slm.dense_plan()
    return [scorer.score(slm, it, dense).details.get("pick") for it in items]


def agreement_by_depth(
    slm: Any, items: Sequence[Any], full: Sequence[Any], depths: Sequence[int], bar: Any = None
) -> list[float]:
    """Share of multiple-choice ``items`` whose pick after ``d`` layers is ``full`` (:func:`dense_picks`), per depth.

    The pick is the scorer's under :func:`envs.runtime.staged.truncated` of the dense plan, so it goes through
    whatever exit maps ``slm`` has, exactly as an environment scores an exit.
    """
    from envs.runtime.staged import truncated
    from envs.tasks.scoring import Scorer

    scorer, dense = Scorer(), slm.dense_plan()
    out = []
    for d in depths:
        plan = truncated(dense, d)
        hits = 0
        for it, ref in zip(items, full, strict=True):
            hits += int(scorer.score(slm, it, plan).details.get("pick") == ref)
            if bar is not None:
                bar.update(1)
        out.append(hits / max(len(items), 1))
    return out


def fit_and_save(cfg: DictConfig | Mapping[str, Any], *, slm: Any = None) -> dict[str, Any]:
    """Fit exit maps as ``cfg`` says, save them, print the agreement table; return the card plus ``folder``.

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
    import torch
    from tqdm.auto import tqdm

    from envs.data.corpus import natural_text
    from envs.data.files import versions_of
    from envs.runtime.exit_maps import (
        DISTILLED,
        METHOD,
        ExitMaps,
        PositionSample,
        distill_exit_maps,
        fit_exit_maps,
        save_exit_maps,
    )
    from envs.tasks import load_mix
    from envs.tasks.items import split_key
    from envs.tasks.scoring import Scorer

    train_items = load_mix(run["mix"], "train", n=run["train_items"], seed=run["seed"]) if run["train_items"] else []
    val_items = load_mix(run["mix"], "val", n=run["val_items"], seed=run["seed"]) if run["val_items"] else []
    val_items = [it for it in val_items if it.kind == "mc"]  # agreement is of the scorer's pick
    news = natural_text("train")[: run["news_docs"]] if run["news_docs"] else []
    if slm is None:
        from experiments.prepare import load_base

        slm = load_base(run["model"], run["threads"])
    scorer = Scorer()
    seqs = item_sequences(slm, train_items, scorer)
    for doc in news:
        seqs.append(torch.tensor(scorer.encode(slm, doc)[: run["max_len"]]))
    seqs = [s[: run["max_len"]] for s in seqs if len(s) > 0]
    t0 = time.perf_counter()
    distilling = run["distill_steps"] > 0
    sample = PositionSample(run["distill_positions"], run["seed"]) if distilling else None
    bar = tqdm(total=len(seqs), desc="dense pass", disable=not run["progress"])
    maps = fit_exit_maps(slm, seqs, ridge=float(run["ridge"]), bar=bar, sample=sample)
    bar.close()
    seconds = time.perf_counter() - t0
    L = slm.spec.num_layers
    depths = list(range(run["first"], L, run["every"]))
    ridge_maps, distilled = maps, None
    if sample is not None:
        t1 = time.perf_counter()
        positions = sample.tensor()
        n_positions = int(positions.shape[0])
        del sample
        bar = tqdm(total=run["distill_steps"], desc="early-exit distillation", disable=not run["progress"])
        result = distill_exit_maps(
            slm,
            ridge_maps,
            positions,
            steps=run["distill_steps"],
            lr=float(run["distill_lr"]),
            batch=run["distill_batch"],
            holdout=run["distill_holdout"],
            seed=run["seed"],
            bar=bar,
        )
        bar.close()
        del positions
        maps, losses = result.maps, result.losses
        sweep = max(1, min(L - 1, len(losses) // 2))  # one sweep visits every depth once
        distilled = {
            "steps": run["distill_steps"],
            "positions": n_positions,
            "seconds": round(time.perf_counter() - t1, 2),
            "train_kl_first_sweep": round(sum(losses[:sweep]) / sweep, 4),
            "train_kl_last_sweep": round(sum(losses[-sweep:]) / sweep, 4),
            "trained_layers_kept": [i for i, k in enumerate(result.trained) if k],
            "holdout_kl_ridge": [round(x, 4) for x in result.holdout_start],
            "holdout_kl_trained": [round(x, 4) for x in result.holdout_trained],
        }
        if val_items:
            distilled["val_kl"] = held_out_kl(
                slm, item_sequences(slm, val_items, scorer), depths, {"ridge": ridge_maps, "distilled": maps}, run
            )
    card: dict[str, Any] = {
        "name": run["name"],
        "model": {"name": slm.name, "weights_hash": slm.weights_hash, "spec": slm.spec.to_dict()},
        "method": METHOD + (DISTILLED if distilled else ""),
        "settings": {k: run[k] for k in SAVED_SETTINGS},
        "training": {
            "split": "train",
            "items": [split_key(it.prompt, it.answer) for it in train_items],
            "item_splits": sorted({it.meta.get("split") for it in train_items}),
            "news_documents": len(news),
            "sequences": len(seqs),
            "tokens": int(sum(len(s) for s in seqs)),
            "seconds": round(seconds, 2),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": versions_of(("torch", "transformers", "safetensors", "prunegym")),
        "command": " ".join(
            [f"python -m experiments.exit_maps model={run['model']} name={run['name']}"]
            + [f"{k}={run[k]}" for k in SAVED_SETTINGS if k != "max_len" and (k in BASE or distilled)]
        ),
    }
    if distilled:
        card["distillation"] = distilled
    em = ExitMaps(maps, card)
    folder = save_exit_maps(em, folder, force=bool(run["force"]))  # saved before the long measurement
    if val_items:
        columns = {"logit_lens": None, **({"ridge": ExitMaps(ridge_maps)} if distilled else {}), "exit_maps": em}
        bar = tqdm(total=len(columns) * len(val_items) * len(depths), desc="val agreement", disable=not run["progress"])
        previous = (slm.exit_maps, slm.exit_maps_name)
        table: dict[str, list[float]] = {}
        try:
            slm.set_exit_maps(None)
            full = dense_picks(slm, val_items)  # once: the dense path is the same with or without maps
            for key, m in columns.items():
                slm.set_exit_maps(m, name=None if m is None else f"{run['name']}:{key}")
                table[key] = agreement_by_depth(slm, val_items, full, depths, bar)
        finally:
            slm.set_exit_maps(*previous)
        bar.close()
        card["agreement"] = {
            "split": "val",
            "items": len(val_items),
            "depths": depths,
            **{k: [round(x, 4) for x in v] for k, v in table.items()},
        }
        em.card = card
        folder = save_exit_maps(em, folder, force=True)  # the same maps, the card now with its agreement
    print(summary(em.card, folder, em.flops_per_position(), slm))
    return {**em.card, "folder": str(folder)}


def held_out_kl(
    slm: Any, sequences: Sequence[Any], depths: Sequence[int], maps: Mapping[str, Any], run: Mapping[str, Any]
) -> dict[str, Any]:
    """Mean KL(full model || exit) at each exit depth on held-out sequences, for the logit lens and each of ``maps``.

    ``maps`` maps a column name to ``L - 1`` tensors; at most 4 positions of each sequence and 1024 in
    all are read (the figure is a check that distillation generalises, not a benchmark).
    """
    import torch

    from envs.runtime.exit_maps import PositionSample, exit_kl, full_logp, layer_outputs

    sample = PositionSample(4, int(run["seed"]) + 1)
    for ids in sequences[:256]:
        sample.add(layer_outputs(slm, ids[: int(run["max_len"])]))
    x = sample.tensor()[:1024]
    L, D = slm.spec.num_layers, slm.spec.hidden_size
    eye = torch.cat([torch.eye(D), torch.zeros(1, D)])
    columns = {"logit_lens": [eye] * (L - 1), **maps}
    out: dict[str, Any] = {"positions": int(x.shape[0]), "depths": list(depths)}
    with torch.no_grad():
        teacher = full_logp(slm, x[:, L - 1])
        for key, m in columns.items():
            out[key] = [round(float(exit_kl(slm, m, d - 1, x[:, d - 1], teacher)), 4) for d in depths]
    return out


def summary(card: Mapping[str, Any], folder: Path, flops: float, slm: Any) -> str:
    """The table printed after fitting: agreement with the full model by exit depth, before and after."""
    from envs.runtime.plan import SparsityPlan

    tr = card["training"]
    layer = SparsityPlan.dense(slm.spec).flops(1)["total"] / slm.spec.num_layers
    lines = [f"exit maps {card.get('name')} for {card['model']['name']}: {folder}"]
    ag = card.get("agreement")
    if ag:
        cols = [k for k in ("logit_lens", "ridge", "exit_maps") if k in ag]
        names = {"logit_lens": "logit lens", "ridge": "ridge maps", "exit_maps": "exit maps"}
        if "ridge" in ag:
            names["exit_maps"] = "distilled"
        lines.append(f"  answer after d layers = full model's answer, {ag['items']} {ag['split']} items:")
        lines.append("    layers run   " + "   ".join(f"{names[k]:<10s}" for k in cols).rstrip())
        for i, d in enumerate(ag["depths"]):
            lines.append(f"    {d:<10d}   " + "   ".join(f"{ag[k][i]:<10.3f}" for k in cols).rstrip())
    else:
        lines.append("  agreement not measured (val_items=0, or no multiple-choice item among them)")
    dist = card.get("distillation")
    if dist:
        lines.append(
            f"  early-exit distillation: {dist['steps']} steps in {dist['seconds']:.0f} s, train KL "
            f"{dist['train_kl_first_sweep']:.3f} -> {dist['train_kl_last_sweep']:.3f} (first and last sweep of the "
            f"depths); trained maps kept for {len(dist['trained_layers_kept'])} of {len(dist['holdout_kl_ridge'])} "
            "layers (a layer keeps its ridge map when training did worse on held-back train positions)"
        )
        vk = dist.get("val_kl")
        if vk:
            lines.append(f"  held-out KL(full || exit), {vk['positions']} val positions:")
            lines.append("    layers run   logit lens   ridge maps   distilled")
            for i, d in enumerate(vk["depths"]):
                lines.append(
                    f"    {d:<10d}   {vk['logit_lens'][i]:<10.3f}   {vk['ridge'][i]:<10.3f}   {vk['distilled'][i]:.3f}"
                )
    lines.append(f"  cost: {flops:,.0f} FLOPs per position read = {100 * flops / layer:.1f}% of one dense layer's")
    lines.append(
        f"  fitted on {tr['tokens']} positions of {tr['sequences']} train-split sequences in {tr['seconds']:.0f} s "
        f"({tr['torch_threads']} threads)"
    )
    return "\n".join(lines)


@cli.hydra_main(config_name="exit_maps")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: bad settings and unknown models end the run with one line."""
    fit_and_save(cfg)


def main() -> None:
    """``python -m experiments.exit_maps``: :func:`hydra_main` after rewriting ``model=<name>`` for Hydra."""
    from experiments.prepare import run_with_model_names

    run_with_model_names(hydra_main)


if __name__ == "__main__":
    main()
