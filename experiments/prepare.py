"""Make a model pruning-ready: ``python -m experiments.prepare [key=value ...]`` (Hydra, ``conf/prepare.yaml``).

Self-distils the model under plans sampled from PruneGym's plan space (see :mod:`envs.distill`),
on text of the train split only (``text``, see :func:`training_text`), and writes
``<cache_root>/prepared/<name>/``: the weights (safetensors; by default the original weights for the
dense plan plus ``adapted.safetensors`` for pruned layers), tokenizer, ``card.json`` and the
importance orderings used in training. Every environment then selects it with ``model=<name>``.

``model=`` takes a model name (``tiny-llama``, ``smollm2-135m``, a folder, a prepared name, a hub
id) or an option of the ``conf/model`` group (``tiny_llama``, ``smollm2_135m_ready``): the group is
in ``conf/prepare.yaml``'s defaults list, and :func:`main` rewrites ``model=<name>`` that is no
option into ``model.name=<name>`` before Hydra parses the command line (:func:`model_overrides`).

``prepare(cfg)`` is the plain function behind the entry point; tests call it with a tiny model
and token sequences (``slm=``, ``train_sequences=``, ``eval_sequences=``).
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from envs.distill.config import PrepareConfig
from envs.distill.data import ChoiceItem, choice_items, text_sequences
from envs.distill.training import prepare_model, write_prepared
from envs.runtime.sparse_lm import SparseLM
from experiments import cli

MODEL_GROUP = Path(__file__).resolve().parents[1] / "conf" / "model"  # the conf/model config group

# Keys of the run itself; everything else is a training hyper-parameter (envs.distill.config.PrepareConfig).
RUN_KEYS = {
    "model": "smollm2-135m",
    "name": None,
    "out_root": None,
    "checkpoint_dir": None,
    "resume": False,
    "threads": 2,
    "progress": True,
    "train_docs": None,
    "text": ["news", "polarity", "pydoc"],
    "choice_mix": None,
    "choice_train_items": 1500,
    "eval_choice_items": 32,
    "eval_docs": 12,
    "eval_seq_len": 256,
    "eval_sequences": 8,
}


def model_options() -> dict[str, str]:
    """The ``conf/model`` group: each option (file stem, e.g. ``tiny_llama``) and the model name it selects."""
    out: dict[str, str] = {}
    for path in sorted(MODEL_GROUP.glob("*.yaml")):
        name = OmegaConf.load(path).get("name")
        if isinstance(name, str) and name:
            out[path.stem] = name
    return out


def model_name(value: Any, where: str = "prepare") -> str:
    """The model name that ``<where>.model`` means (``where``: the entry point, for the message).

    ``value`` is what the config holds: the ``conf/model`` group's mapping (``{"name": ...}``) or,
    from Python callers, a plain string. A string that is an option of the group (``tiny_llama``)
    means that option's name (``tiny-llama``); any other string is the name itself (``tiny-llama``,
    ``smollm2-135m``, a folder, a prepared name, a hub id), resolved later by
    :func:`envs.runtime.models.load_model`.

    Raises:
        ValueError: Neither a non-empty string nor a mapping with just ``name``.
    """
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {"name"})
        if extra:
            raise ValueError(f"{where}.model takes only a name, got the keys {extra}; set model=<name>")
        value = value.get("name")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{where}.model must name a model: model=tiny-llama, smollm2-135m, a folder, a prepared name, "
            f"or a conf/model option ({', '.join(model_options())}); got {value!r}"
        )
    return model_options().get(value, value)


_SWEEP = re.compile(r"[()\[\]{}*?]")  # Hydra sweep or glob syntax: left for Hydra to parse


def model_overrides(args: Sequence[str]) -> list[str]:
    """Rewrite the command line's ``model=<name>`` so that Hydra accepts any model name.

    ``model`` is a config group (``conf/model``) in ``conf/prepare.yaml``'s defaults list, so
    Hydra takes ``model=X`` as the choice of an option and fails for anything else (``tiny-llama``,
    a folder). An ``X`` that is an option is left alone; otherwise the argument becomes
    ``model.name=X``, each comma-separated option in it (a multirun) replaced by its name. Every
    other argument is returned unchanged.
    """
    options = model_options()
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if key != "model" or not eq or value in options or _SWEEP.search(value):
            out.append(arg)
            continue
        names = [options.get(v, v) for v in value.split(",")]
        out.append("model.name=" + ",".join(names))
    return out


def run_with_model_names(entry: Any) -> None:
    """Call a Hydra ``entry`` after rewriting ``model=<name>`` on the command line (:func:`model_overrides`)."""
    sys.argv[1:] = model_overrides(sys.argv[1:])
    entry()


def load_base(name: str, threads: int) -> SparseLM:
    """The base model ``name`` with its importance orderings (calibrated and cached on first use).

    Raises:
        envs.runtime.models.UnknownModelError: No loader knows ``name``; the message lists what ``model=`` takes.
    """
    from envs.data.files import cache_root
    from envs.runtime.models import UnknownModelError

    try:
        return SparseLM.from_pretrained(name, threads=threads)
    except UnknownModelError:
        raise UnknownModelError(
            f"unknown model {name!r}: model= takes tiny-<family> (e.g. tiny-llama), smollm2-135m, a conf/model "
            f"option ({', '.join(model_options())}), a folder holding config.json, the name of a prepared model "
            f"in {cache_root() / 'prepared'}, or a hub id cached locally"
        ) from None


TEXT_SOURCES = ("news", "polarity", "pydoc", "tasks")
POLARITY_DOC_SENTENCES = 20  # sentences joined per pseudo-document (the stream is cut into seq_len chunks anyway)
TASK_DOC_ITEMS = 8  # solved train items per pseudo-document, in the layout of a few-shot prompt
TASK_MIX = "mc"  # the main job's workload (conf/task/mc.yaml)


def training_text(sources: list[str] | str, news_docs: int | None = None) -> tuple[list[str], str]:
    """The natural training text of the named sources, train split only, and a description for the card.

    ``news``: the train-split Lee news documents (the first ``news_docs`` of them, if given).
    ``polarity``: the Pang & Lee review sentences whose ``gensim/polarity`` task item is in the
    train split (so no val or test item's text is ever trained on), joined into documents of
    ``POLARITY_DOC_SENTENCES`` sentences, labels dropped.
    ``pydoc``: the topics of the Python language reference shipped with CPython
    (``pydoc_data.topics``: English technical prose, local, about 110k tokens), split by the hash
    of each topic's text like every other source.
    ``tasks``: the train-split items of the workload mix ``TASK_MIX``, each followed by its answer
    and grouped ``TASK_DOC_ITEMS`` to a document of one task, exactly as solved items appear as
    shots in a few-shot prompt. Only inputs are distilled (the loss is KL to the dense teacher), and
    no val or test item is ever included.

    Raises:
        ValueError: An unknown or empty list of sources.
    """
    from envs.data.corpus import natural_text

    names = [sources] if isinstance(sources, str) else list(sources)
    bad = [n for n in names if n not in TEXT_SOURCES]
    if bad or not names:
        raise ValueError(f"prepare.text must name some of {list(TEXT_SOURCES)}, got {names!r}")
    docs: list[str] = []
    parts = []
    if "news" in names:
        news = natural_text("train")
        news = news[:news_docs] if news_docs else news
        docs += news
        parts.append(f"news train split ({len(news)} docs)")
    if "polarity" in names:
        from envs.tasks import load_task

        sents = [it.meta["text"] for it in load_task("gensim/polarity", "train")]
        n = POLARITY_DOC_SENTENCES
        docs += [" ".join(sents[i : i + n]) for i in range(0, len(sents), n)]
        parts.append(f"polarity review sentences of the task's train split ({len(sents)} sentences, no labels)")
    if "pydoc" in names:
        from pydoc_data.topics import topics

        from envs.data.corpus import split_of

        ref = [t.strip() for _, t in sorted(topics.items()) if split_of(t.strip()) == "train"]
        docs += ref
        parts.append(f"Python reference topics of the train split ({len(ref)} topics, pydoc_data)")
    if "tasks" in names:
        from envs.tasks import MIXES, load_task

        n_items = 0
        for task in MIXES[TASK_MIX]:
            base = ":".join(o for o in task.split(":") if not o.endswith("shot"))  # shots would repeat items
            solved = [f"{it.prompt} {it.answer}" for it in load_task(base, "train")]
            n_items += len(solved)
            docs += ["\n\n".join(solved[i : i + TASK_DOC_ITEMS]) for i in range(0, len(solved), TASK_DOC_ITEMS)]
        parts.append(f"solved train-split items of the {TASK_MIX!r} workload ({n_items} items, few-shot layout)")
    return docs, "; ".join(parts)


def output_name(name: Any, base_model: str) -> str:
    """The prepared folder's name: ``name``, or ``<base model>-ready`` (the last part of a folder or hub id).

    Raises:
        ValueError: ``name`` is no plain folder name (it is looked up by name under ``<cache_root>/prepared``).
    """
    if name is None:
        name = f"{Path(base_model.rstrip('/')).name}-ready"
    if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name.startswith((".", "~")):
        raise ValueError(f"prepare.name must be a plain folder name (no '/', not starting with '.'), got {name!r}")
    return name


def split_config(cfg: DictConfig | dict[str, Any]) -> tuple[dict[str, Any], PrepareConfig]:
    """Separate run settings from training hyper-parameters and validate both.

    Raises:
        ValueError: An unknown key or a bad value; the message names the field.
    """
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    run = {k: data.pop(k, v) for k, v in RUN_KEYS.items()}
    run["model"] = model_name(run["model"])
    if run["name"] is not None:
        output_name(run["name"], run["model"])
    for k in ("threads", "eval_docs", "eval_seq_len", "eval_sequences", "eval_choice_items", "choice_train_items"):
        if k == "choice_train_items" and run[k] is None:
            continue
        if isinstance(run[k], bool) or not isinstance(run[k], int) or run[k] < 1:
            raise ValueError(f"prepare.{k} must be an integer >= 1, got {run[k]!r}")
    tcfg = PrepareConfig.from_dict(data)
    if tcfg.choice_weight > 0 and not run["choice_mix"]:
        raise ValueError(
            "prepare.choice_weight > 0 needs prepare.choice_mix (e.g. choice_mix=mc), the mix whose "
            "train-split multiple-choice items the choice loss distils"
        )
    return run, tcfg


def choice_data(
    mix: str, tokenizer: Any, n_train: int | None, n_eval: int
) -> tuple[list[ChoiceItem], list[ChoiceItem], str]:
    """Train-split multiple-choice items of ``mix`` for the choice loss, val items for its before/after figure.

    ``n_train`` items are drawn in the mix's weights (``None``: every item, weights ignored), so a
    task with thousands of items does not crowd out the small ones. The val items are only
    measured, never trained on, and are drawn with another seed than the ``bench_prepare curves``
    sample.

    Raises:
        ValueError: The mix has no multiple-choice items.
    """
    from envs.tasks import load_mix

    train = choice_items(load_mix(mix, "train", n=n_train, seed=0), tokenizer)
    held = choice_items(load_mix(mix, "val", n=n_eval, seed=1), tokenizer)  # mc items only: may be fewer
    if not train or not held:
        raise ValueError(f"mix {mix!r} has no multiple-choice items for the choice loss; use a mix of mc tasks")
    return (
        train,
        held,
        f"{len(train)} multiple-choice train-split items of the {mix!r} mix ({len(held)} val items measured)",
    )


def prepare(
    cfg: DictConfig | dict[str, Any],
    *,
    slm: SparseLM | None = None,
    train_sequences: list[torch.Tensor] | None = None,
    eval_sequences: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Prepare a model and write its folder; return the card.

    Args:
        cfg: The configuration (``conf/prepare.yaml`` keys).
        slm: A model to prepare instead of loading ``cfg.model`` (tests pass tiny models).
        train_sequences: Token sequences to train on instead of the train split of the news text.
        eval_sequences: Held-out token sequences instead of the val split.

    Returns:
        The card written to ``card.json`` plus ``folder`` (the output path).
    """
    run, tcfg = split_config(cfg)
    # Two intra-op threads: the reference machine has 2 cores; more threads than cores only thrash.
    torch.set_num_threads(run["threads"])
    base_name = run["model"] if slm is None else slm.name
    name = output_name(run["name"], base_name)
    from envs.data.files import cache_root

    out_root = Path(run["out_root"]) if run["out_root"] else cache_root() / "prepared"
    ckpt = Path(run["checkpoint_dir"]) if run["checkpoint_dir"] else cache_root() / "prepare-checkpoints" / name
    if slm is None:
        slm = load_base(run["model"], run["threads"])
    base_hash = slm.weights_hash
    data: dict[str, Any]
    if train_sequences is None or eval_sequences is None:
        from envs.data.corpus import natural_text

        train_docs, described = training_text(run["text"], run["train_docs"])
        val_docs = natural_text("val")[: run["eval_docs"]]
        if train_sequences is None:
            train_sequences = text_sequences(slm.tokenizer, train_docs, tcfg.seq_len)
        if eval_sequences is None:
            eval_sequences = text_sequences(slm.tokenizer, val_docs, run["eval_seq_len"])[: run["eval_sequences"]]
        data = {
            "train": described,
            "train_sha256": hashlib.sha256(chr(0).join(train_docs).encode()).hexdigest()[:12],
            "eval": f"news val split (first {len(val_docs)} docs)",
        }
    else:
        data = {"train": "token sequences given by the caller", "eval": "token sequences given by the caller"}
    data["train_sequences"] = len(train_sequences)
    data["train_tokens"] = sum(int(torch.as_tensor(s).numel()) for s in train_sequences)
    data["eval_tokens"] = sum(int(torch.as_tensor(s).numel()) for s in eval_sequences)
    train_choices: list[ChoiceItem] = []
    held_choices: list[ChoiceItem] = []
    if run["choice_mix"]:
        train_choices, held_choices, data["choice"] = choice_data(
            run["choice_mix"], slm.tokenizer, run["choice_train_items"], run["eval_choice_items"]
        )
    importance = slm.importance
    result = prepare_model(
        slm,
        train_sequences,
        eval_sequences,
        tcfg,
        checkpoint_dir=ckpt,
        resume=bool(run["resume"]),
        progress=bool(run["progress"]),
        log=print,
        choice_items=train_choices,
        eval_choice_items=held_choices,
    )
    b, a = result.before, result.after
    card = {
        "kind": "prunegym-prepared-model",
        "name": name,
        "base_model": base_name,
        "base_weights_hash": base_hash,
        "method": tcfg.method,
        "dense_weights": tcfg.dense_weights,
        "steps": result.steps,
        "start_step": result.start_step,
        "stopped_by": result.stopped_by,
        "train_seconds_this_run": round(result.train_seconds, 1),
        "train_seconds": round(result.train_seconds_total, 1),
        # Text is read only where a token loss needs it (kl_weight=0, lm_weight=0: choice items only).
        "tokens_seen": result.steps * tcfg.batch_size * tcfg.seq_len if tcfg.kl_weight or tcfg.lm_weight else 0,
        "plan_forwards": result.steps * tcfg.plans_per_step,
        "torch_threads": torch.get_num_threads(),
        "data": data,
        "config": tcfg.to_dict(),
        "plan_distribution": result.plan_summary,
        "before": b,
        "after": a,
        "dense_nll_change": (a["dense_nll"] - b["dense_nll"]) / b["dense_nll"],
        "pruned_kl_ratio": (a["pruned_kl"] / b["pruned_kl"]) if b["pruned_kl"] > 0 else None,
        "importance": importance.meta,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python -m experiments.prepare",
    }
    folder = write_prepared(out_root / name, slm, card, importance=importance)
    print(
        f"wrote {folder}: {result.steps} steps ({result.stopped_by}); dense NLL {b['dense_nll']:.4f} -> "
        f"{a['dense_nll']:.4f}; pruned KL {b['pruned_kl']:.4f} -> {a['pruned_kl']:.4f}"
    )
    return {**card, "weights_hash": slm.weights_hash, "folder": str(folder)}


@cli.hydra_main(config_name="prepare")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: a bad setting or an unknown model ends the run with one line, before any training.

    The settings and the base model are checked first; :func:`experiments.cli.hydra_main` turns their
    errors (and any later configuration error) into ``error: <message>`` and exit status 2.
    """
    run, _ = split_config(cfg)
    slm = load_base(run["model"], run["threads"])
    prepare(cfg, slm=slm)


def main() -> None:
    """``python -m experiments.prepare``: :func:`hydra_main` after :func:`model_overrides` on the command line."""
    sys.argv[1:] = model_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
