"""Train an MLP channel predictor: ``python -m experiments.predictor model=smollm2-135m name=<name> rank=64``.

Fits a Deja Vu-style low-rank predictor of each token's largest MLP channels
(:mod:`envs.runtime.predictor`) on the train split of the news corpus, measures its top-k recall on
the val split, writes ``<cache_root>/predictors/<name>/`` (or ``out=``) atomically and prints a short
table: recall at keep fractions 0.75/0.5/0.25 against a random ranking's, and what the predictor
costs as a share of one dense layer's decode FLOPs. Settings in ``conf/predictor.yaml``.

``model=`` takes what ``experiments.prepare`` takes: a ``conf/model`` option (``tiny_llama``) or any
name :func:`envs.runtime.models.load_model` knows (``tiny-llama``, ``smollm2-135m``, a folder, a
prepared name); :func:`main` rewrites a plain name into ``model.name=<name>`` before Hydra reads it.
Bad settings end the run with one line (``error: ...``) before the model loads.

``train_and_save(cfg)`` is the plain function behind the entry point; tests call it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments import cli

# Every setting and its default (conf/predictor.yaml holds the same, commented).
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "name": None,
    "out": None,
    "force": False,
    "rank": 64,
    "max_tokens": 8192,
    "max_len": 256,
    "val_tokens": 4096,
    "epochs": 2,
    "lr": 3e-4,
    "batch_size": 512,
    "ridge": 1e-3,
    "seed": 0,
    "threads": 2,
    "progress": True,
}
# Integer settings and their lowest allowed value.
INT_SETTINGS = {
    "rank": 1,
    "max_tokens": 1,
    "max_len": 2,
    "val_tokens": 0,
    "epochs": 0,
    "batch_size": 1,
    "seed": 0,
    "threads": 1,
}


def check_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings, checked before anything loads; defaults fill keys ``cfg`` lacks.

    Returns:
        The settings as plain values, with ``model`` a name and ``name`` filled in (``<model>-r<rank>``).

    Raises:
        ValueError: An unknown key or a value out of range; the message names the setting and what it takes.
    """
    from experiments.prepare import model_name

    run = cli.checked_settings(cfg, SETTINGS, INT_SETTINGS, "predictor")
    run["model"] = model_name(run["model"], "predictor")
    for key in ("lr", "ridge"):
        value = run[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not (value > 0 if key == "lr" else value >= 0):
            raise ValueError(f"{key}={value!r} is out of range: set {key}=<number {'> 0' if key == 'lr' else '>= 0'}>")
    for key in ("force", "progress"):
        if not isinstance(run[key], bool):
            raise ValueError(f"{key}={run[key]!r} must be true or false")
    if run["name"] is None:
        run["name"] = f"{Path(run['model'].rstrip('/')).name}-r{run['rank']}"
    cli.plain_name(run["name"])
    return run


def output_folder(run: Mapping[str, Any]) -> Path:
    """Where the predictor goes: ``out``, or ``<cache_root>/predictors/<name>``."""
    from envs.runtime.predictor import predictor_folder

    return Path(str(run["out"])).expanduser() if run["out"] else predictor_folder(str(run["name"]))


def train_and_save(cfg: DictConfig | Mapping[str, Any], *, slm: Any = None) -> dict[str, Any]:
    """Train a predictor as ``cfg`` says, save it, print its table; return the card written plus ``folder``.

    The settings and the output folder are checked before the model loads (an existing folder needs
    ``force=true``). Training text is the news corpus's train split; recall is measured on its val split.

    Args:
        cfg: The settings (``conf/predictor.yaml`` keys; missing keys take their defaults).
        slm: A loaded model to use instead of loading ``cfg.model`` (its name is recorded).

    Raises:
        ValueError: A bad setting (before anything loads) or a rank the model's shape does not allow.
        FileExistsError: The output folder exists and ``force`` is off.
    """
    run = check_settings(cfg)
    folder = output_folder(run)
    if folder.exists() and not run["force"]:
        raise FileExistsError(
            f"{folder} already exists: pass force=true to replace it, or choose another name= or out="
        )
    from envs.data.corpus import natural_text
    from envs.runtime.plan import SparsityPlan
    from envs.runtime.predictor import check_rank, document_sequences, save_predictor, train_predictor

    train_docs = natural_text("train")  # before the model: a missing data cache is one line, not a wasted load
    val_docs = natural_text("val")
    if slm is None:
        from experiments.prepare import load_base

        slm = load_base(run["model"], run["threads"])
    check_rank(run["rank"], slm)
    val, val_used = None, []
    if run["val_tokens"] > 0:
        val, val_used = document_sequences(slm, val_docs, max_tokens=run["val_tokens"], max_len=run["max_len"])
    pred = train_predictor(
        slm,
        train_docs,
        rank=run["rank"],
        epochs=run["epochs"],
        lr=float(run["lr"]),
        batch_size=run["batch_size"],
        ridge=float(run["ridge"]),
        seed=run["seed"],
        progress=run["progress"],
        max_tokens=run["max_tokens"],
        max_len=run["max_len"],
        val_sequences=val,
    )
    if pred.card.get("recall") is not None:
        pred.card["recall"].update(splits=["val"], documents=len(val_used))
    pred.card["name"] = run["name"]
    pred.card["command"] = " ".join(
        [f"python -m experiments.predictor model={run['model']} name={run['name']}"]
        + [f"{k}={run[k]}" for k in ("rank", "max_tokens", "max_len", "epochs", "lr", "seed")]
    )
    folder = save_predictor(pred, folder, force=bool(run["force"]))
    spec = slm.spec
    layer_flops = SparsityPlan.dense(spec).flops(1)["total"] / spec.num_layers
    print(summary(pred.card, folder, pred.flops_per_token(), layer_flops))
    return {**pred.card, "folder": str(folder)}


def summary(card: Mapping[str, Any], folder: Path, flops: float, layer_flops: float) -> str:
    """The table printed after training: recall per keep fraction (vs random), cost, data, time."""
    tr = card["training"]
    model, rank = card["model"]["name"], card["predictor"]["rank"]
    lines = [f"channel predictor {card.get('name')} for {model} (rank {rank}): {folder}"]
    rec = card.get("recall")
    if rec:
        lines.append(f"  top-k recall on {rec['tokens']} val tokens ({rec.get('documents')} documents):")
        lines.append("    keep fraction   recall   random")
        for f, r in rec["fractions"].items():
            lines.append(f"    {float(f):<13.2f}   {r:.3f}    {float(f):.3f}")
    else:
        lines.append("  recall not measured (val_tokens=0)")
    lines.append(
        f"  cost: {flops:,.0f} FLOPs per token per layer = {100 * flops / layer_flops:.1f}% of one dense layer's "
        f"decode FLOPs ({layer_flops:,.0f})"
    )
    lines.append(
        f"  trained on {tr['tokens']} tokens of {tr['documents']} {tr['split']}-split documents "
        f"in {tr['seconds']:.0f} s ({tr['torch_threads']} threads)"
    )
    return "\n".join(lines)


@cli.hydra_main(config_name="predictor")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: bad settings and unknown models end the run with one line."""
    train_and_save(cfg)


def main() -> None:
    """``python -m experiments.predictor``: :func:`hydra_main` after rewriting ``model=<name>`` for Hydra."""
    from experiments.prepare import run_with_model_names

    run_with_model_names(hydra_main)


if __name__ == "__main__":
    main()
