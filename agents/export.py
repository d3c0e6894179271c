"""Export a trained policy (an RLlib module, the LinUCB bandit or any torch policy) as a standalone controller folder.

The folder (see :mod:`agents.controller`) holds ``model.onnx``, ``model.safetensors``, ``card.json``
and ``README.md``, optionally ``pareto.png``. It is written into a temporary folder next to the target
and renamed into place at the end (:func:`envs.data.files.atomic_folder`), so an interrupted export
leaves no half folder (and, with ``force``, the previous export stays until the new one is complete);
temporary folders of exports that were killed are removed by the next export to the same place.

The card's ``interface`` is the training environment's own description (``env.config()``), copied,
never rebuilt from settings: the controller computes its observations and plans from exactly what
the environment used. The export refuses a policy whose observation or action does not fit it.

What the ONNX graph computes is the *environment* action the training stack evaluates with
(:func:`agents.rllib.greedy_policy`): the module's deterministic inference (RLlib's
``to_deterministic()``: the Gaussian's mean, the arg-max of the logits, DQN's arg-max Q), and for Box
actions RLlib's action normalisation undone (clipped to [-1, 1], rescaled to the Box bounds). RLlib
2.60's squashed Gaussian (SAC) returns its *unsquashed* mean as the deterministic action; the
export follows RLlib, so the exported controller acts exactly as the policy was evaluated.
The bandit is a linear scorer and an arg-max: ``argmax_a beta_a . [(x - mean) / std, 1]`` in
float64, its greedy action.

Nothing written is a pickle: ONNX (protobuf), safetensors, JSON and Markdown.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.controller import (
    CARD_FILE,
    CARD_FORMAT,
    CARD_SCHEMA_VERSION,
    ONNX_FILE,
    README_FILE,
    WEIGHTS_FILE,
    card_digest,
    importance_hash,
)
from envs.data.files import atomic_folder, jsonable, sha256_file
from envs.measure.meters import device_description, package_versions

if TYPE_CHECKING:
    from agents.bandit import BanditController
    from agents.staged import ExitTable, RiskControlled, StopClassifier
    from envs.runtime.sparse_lm import SparseLM

ONNX_OPSET = 17
PARETO_FILE = "pareto.png"
ENV_CONFIG = "env_config.json"  # a training run's description of its environment (experiments.train)
PACKAGES = (
    "prunegym",
    "torch",
    "onnx",
    "onnxruntime",
    "ray",
    "gymnasium",
    "transformers",
    "numpy",
    "safetensors",
    "mabwiser",
)


# ---------------------------------------------------------------------------------------- policies
class RLlibPolicy(torch.nn.Module):
    """``obs -> env action`` around an RLlib RLModule's deterministic inference (what ONNX exports).

    Args:
        module: The RLModule (torch).
        kind: ``"box"`` or ``"discrete"``.
        low: Box lower bounds (ignored for discrete).
        high: Box upper bounds.
        normalize_actions: RLlib's ``normalize_actions`` (default on): the module acts in [-1, 1].
        clip_actions: RLlib's ``clip_actions`` (used when not normalising).
    """

    def __init__(
        self,
        module: Any,
        kind: str,
        low: np.ndarray | None = None,
        high: np.ndarray | None = None,
        *,
        normalize_actions: bool = True,
        clip_actions: bool = False,
    ) -> None:
        super().__init__()
        self.module = module
        self.kind = kind
        self.dist_cls = module.get_inference_action_dist_cls()
        self.normalize_actions = bool(normalize_actions)
        self.clip_actions = bool(clip_actions)
        if kind == "box":
            self.register_buffer("low", torch.as_tensor(np.asarray(low, dtype=np.float32)))
            self.register_buffer("high", torch.as_tensor(np.asarray(high, dtype=np.float32)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The deterministic environment action for a batch of observations."""
        out = self.module.forward_inference({"obs": obs})
        if "actions" in out:  # DQN: arg-max Q
            action = out["actions"]
        else:
            action = self.dist_cls.from_logits(out["action_dist_inputs"]).to_deterministic().sample()
        if self.kind == "box":
            if self.normalize_actions:
                action = self.low + (torch.clamp(action, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)
            elif self.clip_actions:
                action = torch.maximum(torch.minimum(action, self.high), self.low)
        return action


class LinearArgmax(torch.nn.Module):
    """The bandit's greedy action: ``argmax_a beta_a . [(x - mean) / std, 1]`` in float64."""

    def __init__(self, betas: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        betas = np.asarray(betas, dtype=np.float64)
        self.register_buffer("weight", torch.as_tensor(betas[:, :-1].copy()))
        self.register_buffer("bias", torch.as_tensor(betas[:, -1].copy()))
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float64)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float64)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Arm indices (int64) for a batch of observations."""
        x = (obs.to(torch.float64) - self.mean) / self.std
        return torch.argmax(x @ self.weight.t() + self.bias, dim=-1)


class StopPolicy(torch.nn.Module):
    """A stop classifier's operating point as a staged policy: stop (0) where ``P(agree) >= bar[step]``, else go on.

    ``P(agree)`` is :func:`agents.staged.stop_model_arrays`' model (boosted trees or logistic
    regression) evaluated in float64 as scikit-learn does; the step is read off the observation's
    ``step`` entry (``t / steps``), so the policy needs nothing but the observation.

    Args:
        arrays: :func:`agents.staged.stop_model_arrays` of the fitted model.
        bars: ``[steps]``: the bar each step's predicted agreement must reach to stop.
        step_index: Position of the ``step`` entry in the observation.
        go_on: The action that runs the next group (the one the exit table was built with).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], bars: np.ndarray, step_index: int, go_on: int) -> None:
        super().__init__()
        bars = np.asarray(bars, dtype=np.float64)
        if bars.ndim != 1 or len(bars) < 1 or np.isnan(bars).any():
            raise ValueError(f"bars must be one number per step, got {bars!r}")
        self.trees = "feature" in arrays
        for k, v in arrays.items():
            self.register_buffer(k, torch.as_tensor(np.ascontiguousarray(v)))
        self.register_buffer("bars", torch.as_tensor(bars))
        self.step_index, self.go_on = int(step_index), int(go_on)
        self.depth = 0
        if self.trees:  # levels to walk: to the deepest leaf (a leaf is its own child, so extra levels stay put)
            left, right = np.asarray(arrays["left"]), np.asarray(arrays["right"])
            reach = {(t, 0) for t in range(len(left))}
            while any(left[t, n] != n for t, n in reach):
                reach = {(t, int(c)) for t, n in reach for c in (left[t, n], right[t, n])}
                self.depth += 1
                if self.depth > left.shape[1]:
                    raise ValueError("the trees' children form a cycle")

    def probability(self, obs: torch.Tensor) -> torch.Tensor:
        """``[batch]``: the predicted probability that stopping now agrees with the dense model."""
        x = obs.to(torch.float64)
        if not self.trees:
            return torch.sigmoid(((x - self.mean) / self.scale) @ self.coef + self.intercept)
        T, M = self.feature.shape
        offset = torch.arange(T, device=x.device).unsqueeze(0) * M  # [1, T]: each tree's first node, flattened
        node = torch.zeros(x.shape[0], T, dtype=torch.int64, device=x.device)
        for _ in range(self.depth):
            at = node + offset
            xv = torch.gather(x, 1, self.feature.reshape(-1)[at])
            nan = torch.isnan(xv)  # (a boolean Where has no onnxruntime kernel: logic instead)
            left = (nan & (self.missing_left.reshape(-1)[at] > 0)) | (~nan & (xv <= self.threshold.reshape(-1)[at]))
            node = torch.where(left, self.left.reshape(-1)[at], self.right.reshape(-1)[at])
        return torch.sigmoid(self.baseline + self.value.reshape(-1)[node + offset].sum(dim=1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Actions (int64): 0 stops, :attr:`go_on` runs the next group."""
        steps = self.bars.shape[0]
        step = torch.round(obs[:, self.step_index].to(torch.float64) * steps).to(torch.int64).clamp(0, steps - 1)
        stop = self.probability(obs) >= self.bars[step]
        return torch.where(stop, torch.zeros_like(step), torch.full_like(step, self.go_on))


def _nanmean_symbolic(g: Any, x: Any, dim: Any, keepdim: Any, dtype: Any) -> Any:
    """ONNX for ``aten::nanmean`` (DQN's dueling head centres advantages with it): sum over non-NaN / count."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(dim, "is", "dim")
    keep = int(sh._get_const(keepdim, "i", "keepdim"))
    axes = g.op("Constant", value_t=torch.tensor(list(dims), dtype=torch.int64))
    isnan = g.op("IsNaN", x)
    zero = g.op("Constant", value_t=torch.tensor(0.0, dtype=torch.float32))
    filled = g.op("Where", isnan, zero, x)
    count = g.op("Cast", g.op("Not", isnan), to_i=1)  # 1 = FLOAT
    total = g.op("ReduceSum", filled, axes, keepdims_i=keep)
    n = g.op("ReduceSum", count, axes, keepdims_i=keep)
    return g.op("Div", total, n)


def export_onnx(policy: torch.nn.Module, obs_dim: int, path: str | Path) -> dict[str, Any]:
    """Export ``policy`` (``obs [batch, obs_dim] float32 -> action``) to ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra package, and the RLlib
    modules' control flow is static for a given module, so tracing captures it exactly.

    Returns:
        The card's ``onnx`` section.
    """
    torch.onnx.register_custom_op_symbolic("aten::nanmean", _nanmean_symbolic, ONNX_OPSET)
    policy = policy.eval()
    example = torch.zeros(2, obs_dim, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            policy,
            (example,),
            str(path),
            dynamo=False,
            input_names=["obs"],
            output_names=["action"],
            dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return {
        "file": ONNX_FILE,
        "input": "obs",
        "output": "action",
        "opset": ONNX_OPSET,
        "exporter": "torch.onnx.export(dynamo=False)",
    }


# ---------------------------------------------------------------------------------------- cards
def env_section(env_config: Mapping[str, Any]) -> dict[str, Any]:
    """The card's ``env`` section: the training environment's description, less its interface.

    Raises:
        ValueError: ``env_config`` is not an environment's :meth:`~envs.base.PruneEnv.config`.
    """
    missing = [k for k in ("id", "env", "version", "interface", "model", "data") if k not in env_config]
    if missing:
        raise ValueError(
            f"not an environment description (missing {missing}): pass env.unwrapped.config() of the environment "
            "the policy was trained in (a training run writes it to env_config.json)"
        )
    return {k: jsonable(v) for k, v in env_config.items() if k != "interface"}


def check_spaces(interface: Mapping[str, Any], obs_dim: int, action_kind: str, action_size: int) -> None:
    """Refuse a policy whose observation or action does not fit the environment's interface.

    Raises:
        ValueError: Naming both sizes.
    """
    want_obs = int(np.prod(interface["observation"]["shape"]))
    act = interface["action"]
    if obs_dim != want_obs:
        raise ValueError(
            f"the policy observes {obs_dim} values but its environment gives {want_obs} "
            f"({interface['observation']['features'][:4]}...): export it with the environment it was trained in"
        )
    if action_kind != act["kind"]:
        raise ValueError(f"the policy's action is {action_kind}, its environment's is {act['kind']}")
    size = int(act["n"]) if act["kind"] == "discrete" else int(np.prod(act["shape"]))
    if action_size != size:
        raise ValueError(
            f"the policy has {action_size} {'actions' if action_kind == 'discrete' else 'action values'}, its "
            f"environment {size}: export it with the environment it was trained in"
        )


def model_section(slm: SparseLM, model_id: str | None = None) -> dict[str, Any]:
    """The card's ``model`` section: id, weights hash, shape, importance ordering hash (and attachments).

    Attachments (:data:`envs.runtime.sparse_lm.MODEL_ATTACHMENTS`) are what the plans need beside the weights: the
    ``predicted`` rule's channel predictor, the exit maps early answers go through.
    """
    out = {
        "id": model_id or slm.name,
        "weights_hash": slm.weights_hash,
        "spec": slm.spec.to_dict(),
        "importance_hash": importance_hash(slm.importance),
        "importance_meta": jsonable(getattr(slm.importance, "meta", {})),
        "dtype": str(next(iter(slm.model.parameters())).dtype).removeprefix("torch."),
    }
    from envs.runtime.sparse_lm import MODEL_ATTACHMENTS

    for key in MODEL_ATTACHMENTS:  # the channel predictor, the exit maps: named by their cards' hashes
        att = getattr(slm, key, None)
        if att is not None:
            out[key] = {"name": getattr(slm, f"{key}_name", None), "card_sha256": att.card.get("card_sha256")}
    return out


def run_metrics(run_dir: str | Path | None) -> dict[str, Any]:
    """Training and held-out metrics of a training run directory (``final.json``, ``metrics.jsonl``)."""
    out: dict[str, Any] = {"train": None, "held_out": None, "iterations": None, "source": None}
    if run_dir is None:
        return out
    run_dir = Path(run_dir)
    final = run_dir / "final.json"
    if final.is_file():
        data = json.loads(final.read_text())
        out.update(
            train=data.get("train"),
            held_out={**dict(data.get("eval") or {}), "split": data.get("eval_split")},
            iterations=data.get("iterations"),
            env_steps=data.get("env_steps"),
            source="final.json",
        )
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        rows = []
        for line in jsonl.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        if rows:
            if out["train"] is None:
                out["train"] = {k: v for k, v in rows[-1].items() if k != "iteration"}
                out["iterations"] = rows[-1].get("iteration")
            out["train_curve"] = [
                {k: r.get(k) for k in ("iteration", "env_steps", "reward", "accuracy", "cost")} for r in rows
            ]
            out["source"] = ", ".join(x for x in (out["source"], "metrics.jsonl") if x)
    return out


# ---------------------------------------------------------------------------------------- README
def render_readme(card: Mapping[str, Any], has_pareto: bool) -> str:
    """The model card (Markdown) for people: what it is, its metrics, how to use it."""
    env, model, iface = card["env"], card["model"], card["interface"]
    act, obs = iface["action"], iface["observation"]
    m = card.get("metrics") or {}
    kind = iface["kind"]
    probe = obs.get("probe")
    sees = f"probe of the prompt's first {probe['layers']} layers" if probe else "features of each decoding step"
    acts = {
        "per_input": "on each input.",
        "layer_by_layer": "layer group by layer group.",
        "per_token": "per token.",
        "staged": "layer group by layer group, reading the model's own answer after each, and when to stop.",
    }
    data = env.get("data") or {}
    lines = [
        "---",
        "library_name: prunegym",
        "tags: [prunegym, adaptive-pruning, reinforcement-learning, onnx]",
        "---",
        "",
        f"# PruneGym controller: {str(card.get('algo', '?')).upper()} on {env['id']}",
        "",
        f"A pruning controller for `{model['id']}` (weights hash `{model['weights_hash']}`): from the {sees} "
        f"it chooses how much of the model runs {acts.get(kind, '.')}",
        "",
        f"Trained on the `{data.get('split')}` split of `{data.get('task')}` ({data.get('items')} items).",
        "",
    ]
    pol = card.get("policy") or {}
    if pol.get("type") == "stop-classifier":  # fitted, not trained: the stop rule and its train figures
        lines += _stop_rule_lines(pol)
    else:
        lines += ["## Metrics", "", *_metrics_lines(m)]
    if has_pareto:
        lines += [f"![accuracy against cost]({PARETO_FILE})", ""]
    if act["kind"] == "box":
        action = f"Box {act['shape']} keep fractions [layers, heads, mlp] for {len(act['groups'])} layer groups"
    elif kind == "staged":
        action = f"one of {act['n']}: {act.get('stop')} (presets in `card.json`, `interface.action.presets`)"
    else:
        action = f"one of {act['n']} preset plans (keep fractions in `card.json`, `interface.action.presets`)"
    lines += [
        "## Details",
        "",
        f"- Environment: `{env['id']}` (version {env['version']}), described in `card.json` (`env`, `interface`).",
        f"- Observation: {int(np.prod(obs['shape']))} float32 values ({kind.replace('_', '-')} features).",
        f"- Action: {action}" + (", one group per step." if act.get("per_group") else "."),
        f"- Trained and measured on: {card['device']['trained_on']}.",
        f"- Files: `{ONNX_FILE}` (onnxruntime), `{WEIGHTS_FILE}` (policy weights), `{CARD_FILE}` (covered by its own "
        "`card_sha256`); no pickle.",
        "",
        "## How to use",
        "",
        "```python",
        "from agents.controller import Controller",
    ]
    if kind == "staged":  # it decides stage by stage inside the environment its card describes
        lines += [
            "from agents.evaluation import evaluation_env",
            "from agents.staged import StagedController, episode, staged_env_kwargs",
            "",
            'controller = Controller.from_pretrained("path/to/this/folder")  # checks hashes, no Ray',
            f'env = evaluation_env(model="{model["id"]}", task="{data.get("task")}", split="test", '
            'env_kwargs=staged_env_kwargs(controller.card), env="Staged")',
            "info, decide_s = episode(env, 0, StagedController(controller, env))  # one held-out input",
            'print(info["groups_run"], info["accuracy_dense_relative"], info["latency_fraction"])',
            "```",
            "",
            "Or measured beside static pruning: `python -m experiments.evaluate --pareto --controller "
            f"path/to/this/folder --task {data.get('task')}`.",
            "",
        ]
    else:
        lines += [
            "from agents.adaptive import adaptive_generate",
            "from envs.runtime.sparse_lm import SparseLM",
            "",
            f'slm = SparseLM.from_pretrained("{model["id"]}")',
            'controller = Controller.from_pretrained("path/to/this/folder", slm)  # checks hashes, no Ray',
            'ids = slm.tokenizer("The capital of France is", return_tensors="pt").input_ids',
            "out = adaptive_generate(slm, controller, ids, max_new_tokens=32)",
            "print(slm.tokenizer.decode(out.sequences[0]), out.plans[0].describe())",
            "```",
            "",
            "Or decide only: `controller.select_action(observation)` / `controller.select_plan(observation, slm)`.",
            "",
        ]
    return "\n".join(lines)


def _metrics_lines(m: Mapping[str, Any]) -> list[str]:
    """The model card's metrics of a trained policy: training and held-out reward, accuracy and cost."""
    rows = []
    for split, values in (("training (last iteration)", m.get("train")), ("held-out", m.get("held_out"))):
        if values:
            cells = [_fmt(values.get(k)) for k in ("reward", "accuracy", "cost")]
            rows.append(f"| {split} | " + " | ".join(cells) + " |")
    if not rows:
        return ["No metrics were recorded with this export.", ""]
    lines = ["| split | reward | accuracy | cost |", "|---|---|---|---|", *rows, ""]
    if m.get("source"):
        lines += [f"From the training run's {m['source']}.", ""]
    return lines


def _stop_rule_lines(pol: Mapping[str, Any]) -> list[str]:
    """The model card's section on a stop classifier: its model, trade-off, train figures and certificate."""
    train = pol.get("train_table") or {}
    lam = pol.get("lambda")
    lines = [
        "## Stop rule",
        "",
        f"After each layer group a {pol.get('model')} model predicts, from the observation, the probability that "
        "answering now agrees with the dense model; the controller stops at the first step where it reaches that "
        "step's bar (`card.json`, `policy.bars`)"
        + (f", set by the trade-off λ = {lam:g} between the risk and the latency a stop saves." if lam else "."),
        "",
        f"On its {train.get('inputs')} train inputs ({train.get('cost')} cost, in sample): agreement with dense "
        f"{_fmt(train.get('agreement'))} at {_fmt(train.get('latency_fraction'))} of dense latency.",
        "",
    ]
    cert = pol.get("certificate")
    if cert:
        lines += [
            f"**Certified** (Learn-then-Test on {cert.get('n')} calibration inputs the model never saw, "
            f"{cert.get('errors')} disagreements): {cert.get('guarantee')}.",
            "",
        ]
    return lines


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "n/a"


# ---------------------------------------------------------------------------------------- writing
def write_export(
    out: str | Path,
    *,
    policy: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    card: dict[str, Any],
    obs_dim: int,
    pareto: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write an export folder atomically: ONNX, safetensors, optional Pareto plot, README and card (last).

    The card lists every other file with its sha256 and is itself covered by ``card_sha256``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    with atomic_folder(out, force=force) as tmp:
        card["onnx"] = export_onnx(policy, obs_dim, tmp / ONNX_FILE)
        save_file(
            {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
            str(tmp / WEIGHTS_FILE),
            metadata={"format": CARD_FORMAT, "algo": str(card.get("algo"))},
        )
        if pareto is not None:
            shutil.copyfile(pareto, tmp / PARETO_FILE)
        (tmp / README_FILE).write_text(render_readme(card, pareto is not None))
        card["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        card["card_sha256"] = card_digest(card)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=1))
    return Path(out).resolve()


def export_policy(
    policy: torch.nn.Module,
    out: str | Path,
    *,
    algo: str,
    env_config: Mapping[str, Any],
    slm: SparseLM,
    tensors: Mapping[str, torch.Tensor],
    policy_card: dict[str, Any],
    action_kind: str,
    action_size: int,
    model_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    trained_on: str | None = None,
    pareto: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Export a torch policy ``obs [batch, n] float32 -> env action`` trained where ``env_config`` describes.

    Args:
        policy: The module ONNX exports (it must return the environment's action: keep fractions in
            the action's bounds, or preset indices).
        out: Target folder (must not exist unless ``force``).
        algo: Algorithm name for the card.
        env_config: The training environment's ``env.unwrapped.config()``.
        slm: The model it drives (its weights hash must be the one ``env_config`` names).
        tensors: The policy's weights for ``model.safetensors``.
        policy_card: The card's ``policy`` section.
        action_kind: ``"box"`` or ``"discrete"`` (checked against the interface).
        action_size: Number of action values (Box) or of actions (discrete).
        model_id: Name for the card (default ``slm.name``).
        metrics: The card's metrics (:func:`run_metrics`).
        trained_on: Device description of the training run (default: this machine).
        pareto: A Pareto plot to include.
        force: Replace an existing folder.

    Raises:
        ValueError: The policy does not fit the environment, or ``slm`` is not the environment's model.
    """
    iface = jsonable(env_config["interface"])
    obs_dim = int(np.prod(iface["observation"]["shape"]))
    check_spaces(iface, obs_dim, action_kind, action_size)
    env = env_section(env_config)
    if env["model"].get("weights_hash") != slm.weights_hash:
        raise ValueError(
            f"the environment ran model weights {env['model'].get('weights_hash')}, the model given has "
            f"{slm.weights_hash}: export with the model the policy was trained on"
        )
    here = device_description()
    card = {
        "format": CARD_FORMAT,
        "schema_version": CARD_SCHEMA_VERSION,
        "algo": algo,
        "env": env,
        "interface": iface,
        "model": model_section(slm, model_id),
        "policy": policy_card,
        "device": {
            "trained_on": trained_on or here,
            "measured_on": trained_on or here,
            "cost": env.get("cost"),
            "exported_on": here,
        },
        "metrics": jsonable(metrics or {}),
        "packages": package_versions(PACKAGES),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return write_export(out, policy=policy, tensors=tensors, card=card, obs_dim=obs_dim, pareto=pareto, force=force)


def export_rllib_module(
    module: Any,
    out: str | Path,
    *,
    algo: str,
    env_config: Mapping[str, Any],
    slm: SparseLM,
    normalize_actions: bool = True,
    clip_actions: bool = False,
    **kwargs: Any,
) -> Path:
    """Export an RLlib RLModule (PPO, APPO, IMPALA, SAC, DQN) as a controller folder.

    Args:
        module: The RLModule (e.g. ``RLModule.from_checkpoint(...)`` or ``algo.get_module()``).
        out: Target folder (must not exist unless ``force``).
        algo: Algorithm name for the card.
        env_config: The training environment's ``env.unwrapped.config()``.
        slm: The model it drives.
        normalize_actions: RLlib's ``normalize_actions`` of the training config.
        clip_actions: RLlib's ``clip_actions``.
        **kwargs: ``model_id``, ``metrics``, ``trained_on``, ``pareto``, ``force`` (see :func:`export_policy`).
    """
    import gymnasium as gym

    obs_space, act_space = module.observation_space, module.action_space
    kind = "box" if isinstance(act_space, gym.spaces.Box) else "discrete"
    if not isinstance(act_space, gym.spaces.Box | gym.spaces.Discrete):
        raise ValueError(f"only Box and Discrete actions export, got {act_space}")
    size = int(act_space.n) if kind == "discrete" else int(np.prod(act_space.shape))
    if int(np.prod(obs_space.shape)) != int(np.prod(env_config["interface"]["observation"]["shape"])):
        raise ValueError(
            f"the module observes {obs_space.shape}, its environment gives "
            f"{env_config['interface']['observation']['shape']}: export it with the environment it was trained in"
        )
    policy = RLlibPolicy(
        module,
        kind,
        getattr(act_space, "low", None),
        getattr(act_space, "high", None),
        normalize_actions=normalize_actions,
        clip_actions=clip_actions,
    )
    deterministic = (
        "RLlib to_deterministic() (Gaussian mean, unsquashed for SAC), clipped to [-1, 1], rescaled to [low, high]"
        if kind == "box" and normalize_actions
        else "RLlib to_deterministic() (arg-max)"
        if kind == "discrete"
        else "RLlib to_deterministic()"
    )
    policy_card = {
        "type": "rllib",
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "model_config": jsonable(getattr(module, "model_config", None)),
        "normalize_actions": bool(normalize_actions),
        "clip_actions": bool(clip_actions),
        "deterministic": deterministic,
        "weights": f"{WEIGHTS_FILE}: the RLModule's state_dict",
    }
    module.eval()
    return export_policy(
        policy,
        out,
        algo=algo,
        env_config=env_config,
        slm=slm,
        tensors=dict(module.state_dict()),
        policy_card=policy_card,
        action_kind=kind,
        action_size=size,
        **kwargs,
    )


STOP_ALGO = "stop classifier"


def export_stop_classifier(
    classifier: StopClassifier,
    table: ExitTable,
    out: str | Path,
    *,
    slm: SparseLM,
    certified: RiskControlled | None = None,
    **kwargs: Any,
) -> Path:
    """Export one operating point of a fitted stop classifier as a staged controller folder.

    The controller decides each step of the staged environment the classifier's train exit table
    came from (``table.meta``: its description, the action that ran each group): it stops where the
    predicted agreement reaches the step's bar (:class:`StopPolicy`), else runs the next group as the
    table did. The card's ``policy`` section records the model, its bars and trade-off, what the
    operating point gave on ``table``, and, for a Learn-then-Test operating point, the certificate.

    Args:
        classifier: The operating point (its ``model`` one :data:`agents.staged.STOP_MODELS` makes).
        table: The train exit table it was fitted on (for a certified one, the whole table whose one
            part fitted it and the other certified it).
        out: Target folder (must not exist unless ``force``).
        slm: The model the table ran (checked by weights hash).
        certified: The Learn-then-Test record when ``classifier`` is its certified rule.
        **kwargs: ``model_id``, ``trained_on``, ``pareto``, ``force`` (see :func:`export_policy`).

    Raises:
        ValueError: The table is not a discrete staged environment's, its groups ran another action
            than one index, or the classifier has bars for another number of steps.
    """
    from agents.staged import DENSE_GROUP, stop_model_arrays

    env_config = table.meta.get("env") or {}
    iface = env_config.get("interface") or {}
    if iface.get("kind") != "staged" or iface.get("action", {}).get("kind") != "discrete":
        raise ValueError("a stop classifier exports from the exit table of a discrete staged environment")
    go_on = table.meta.get("group_action", DENSE_GROUP)  # tables saved before it was recorded ran the dense group
    if isinstance(go_on, list | dict) or go_on is None:
        raise ValueError(f"the exit table's groups ran {go_on!r}, not one discrete action")
    if len(classifier.bars) != table.groups:
        raise ValueError(f"the classifier has bars for {len(classifier.bars)} steps, its table {table.groups}")
    if certified is not None and certified.rule is not classifier:
        raise ValueError("the certificate is another rule's: pass the certified RiskControlled's own rule")
    arrays = stop_model_arrays(classifier.model)
    bars = np.asarray(classifier.bars, dtype=np.float64)
    got = table.take(classifier.exits(table))
    lam = classifier.lam
    policy_card = {
        "type": "stop-classifier",
        "model": classifier.kind,
        "name": classifier.name,
        "lambda": lam if math.isfinite(lam) else None,
        "bars": [b if math.isfinite(b) else None for b in bars.tolist()],  # null: that step never stops
        "go_on": int(go_on),
        "step_feature": "step",
        "deterministic": "stop (action 0) at the first step whose predicted agreement with the dense model reaches "
        f"that step's bar, else action {int(go_on)} (what the exit table ran); float64, as scikit-learn predicts",
        "weights": f"{WEIGHTS_FILE}: "
        + (
            "trees [trees, nodes]: feature, threshold, left, right, missing_left, value; baseline"
            if "feature" in arrays
            else "mean, scale, coef, intercept"
        )
        + "; bars",
        "train_table": {
            "inputs": len(table.item_ids),
            "cost": table.meta.get("cost"),
            "agreement": float(got["rel"].mean()),
            "latency_fraction": float(got["lat"].mean()),
            "in_sample": True,
        },
        "certificate": None
        if certified is None
        else {
            **certified.to_dict(),
            "guarantee": f"agreement with the dense model >= {1 - certified.choice.delta:g} on new inputs of the "
            f"same distribution, with probability >= {1 - certified.choice.epsilon:g} (Learn-then-Test, binomial "
            "tail bound on the calibration part of the train table)",
        },
    }
    policy = StopPolicy(arrays, bars, list(iface["observation"]["features"]).index("step"), int(go_on))
    tensors = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in arrays.items()} | {"bars": torch.as_tensor(bars)}
    return export_policy(
        policy,
        out,
        algo=STOP_ALGO,
        env_config=env_config,
        slm=slm,
        tensors=tensors,
        policy_card=policy_card,
        action_kind="discrete",
        action_size=int(iface["action"]["n"]),
        **kwargs,
    )


def export_bandit(
    controller: BanditController,
    out: str | Path,
    *,
    env_config: Mapping[str, Any],
    slm: SparseLM,
    **kwargs: Any,
) -> Path:
    """Export the LinUCB/LinTS bandit's greedy policy (a linear scorer and an arg-max) as a controller folder."""
    d = controller.num_features
    betas = controller.betas()
    mean = controller.mean if controller.mean is not None else np.zeros(d)
    std = controller.std if controller.std is not None else np.ones(d)
    policy_card = {
        "type": "linear-bandit",
        "policy": controller.policy,
        "alpha": controller.alpha,
        "l2_lambda": controller.l2_lambda,
        "samples": controller.samples,
        "deterministic": "greedy: argmax_a beta_a . [(x - mean) / std, 1] (no exploration bonus)",
        "normalization": {
            "kind": "standardise (inside model.onnx), then a bias column",
            "mean": np.asarray(mean, dtype=np.float64).tolist(),
            "std": np.asarray(std, dtype=np.float64).tolist(),
        },
        "weights": f"{WEIGHTS_FILE}: betas [arms, features + 1] (last column: intercept), mean, std",
    }
    return export_policy(
        LinearArgmax(betas, mean, std),
        out,
        algo=controller.policy,
        env_config=env_config,
        slm=slm,
        tensors={"betas": torch.as_tensor(betas), "mean": torch.as_tensor(mean), "std": torch.as_tensor(std)},
        policy_card=policy_card,
        action_kind="discrete",
        action_size=controller.num_arms,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------- from a run
def find_module_checkpoint(path: str | Path) -> Path:
    """The RLModule folder inside an RLlib checkpoint (algorithm, learner group or module level).

    Raises:
        FileNotFoundError: Saying which layouts were tried.
    """
    path = Path(path)
    candidates = [
        path / "learner_group" / "learner" / "rl_module" / "default_policy",
        path / "learner" / "rl_module" / "default_policy",
        path / "rl_module" / "default_policy",
        path / "default_policy",
        path,
    ]
    for c in candidates:
        if (c / "class_and_ctor_args.pkl").is_file() or any(c.glob("module_state*")):
            return c
    raise FileNotFoundError(
        f"no RLlib module checkpoint under {path} (tried {', '.join(str(c) for c in candidates)}); pass a "
        "checkpoint written by algo.save_to_path (e.g. <run>/checkpoints/iter_000010) or a run directory"
    )


def load_rllib_module(path: str | Path) -> Any:
    """``RLModule.from_checkpoint`` of the module inside an RLlib checkpoint (our own training output)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    return RLModule.from_checkpoint(str(find_module_checkpoint(path)))


def resolve_source(source: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint folder, run directory or None)`` for a run directory or a checkpoint folder."""
    source = Path(source).resolve()
    latest = source / "checkpoints" / "latest.json"
    if latest.is_file():
        record = json.loads(latest.read_text())
        return source / "checkpoints" / record["folder"], source
    for parent in (source, *source.parents[:3]):
        if (parent / "run_config.json").is_file():
            return source, parent
    return source, None


def run_env_config(
    run_dir: Path, run_cfg: Mapping[str, Any], loader: Callable[..., Any] | None = None
) -> dict[str, Any]:
    """The description of a run's training environment: its ``env_config.json``, else the environment rebuilt.

    ``experiments.train`` writes ``env_config.json`` from the environment it trained in. For a run
    without one, the environment is built again from ``run_config.json`` (its id, kwargs and train split).
    """
    path = run_dir / ENV_CONFIG
    if path.is_file():
        return json.loads(path.read_text())
    env = run_cfg.get("env") or {}
    if not env.get("id"):
        raise ValueError(f"{run_dir} has neither {ENV_CONFIG} nor an env id in run_config.json: pass --env-id")
    from envs import make_env

    kwargs = {**dict(env.get("kwargs") or {}), "split": run_cfg.get("train_split", "train")}
    made = (loader or make_env)(env["id"], **kwargs)
    try:
        return made.unwrapped.config()
    finally:
        made.close()


def export_from_path(
    source: str | Path,
    out: str | Path,
    *,
    slm: SparseLM | None = None,
    algo: str | None = None,
    env_config: Mapping[str, Any] | None = None,
    pareto: str | Path | None = None,
    trained_on: str | None = None,
    force: bool = False,
    claims_dataset: str | Path | None = None,
    claims_split: str | None = None,
) -> Path:
    """Export a training run's latest checkpoint (or a given checkpoint) as a controller folder.

    The run's ``env_config.json`` describes the environment (see :func:`run_env_config`);
    ``run_config.json`` supplies the algorithm; ``final.json`` / ``metrics.jsonl`` the metrics; a
    ``pareto*.png`` in the run directory the plot.

    Args:
        source: A run directory (``checkpoints/latest.json``) or a checkpoint folder (RLlib, or the
            bandit's ``bandit.json``) inside one.
        out: The export folder.
        slm: The model; loaded by name from the environment's description when ``None``.
        algo: Algorithm name, overriding the run's.
        env_config: The environment's description, overriding the run's.
        pareto: A Pareto plot to include.
        trained_on: Device description of the training machine (default: the run's hardware).
        force: Replace an existing folder.
        claims_dataset: A replay dataset: the card then states, as ``metrics.claims``, what the
            controller reaches on its recorded inputs (:func:`agents.validation.claims_for`), for
            ``python -m experiments.validate`` to check live.
        claims_split: The split's recording inside ``claims_dataset`` (a folder of several).
    """
    ckpt, run_dir = resolve_source(source)
    run_cfg: dict[str, Any] = {}
    if run_dir is not None:
        run_cfg = json.loads((run_dir / "run_config.json").read_text())
    algo = algo or (run_cfg.get("algo") or {}).get("name")
    if (ckpt / "bandit.json").is_file():
        algo = algo or "linucb"
    if env_config is None:
        if run_dir is None:
            raise ValueError(
                f"cannot tell which environment {source} was trained in: it is not inside a training run directory "
                "(run_config.json); pass the environment's description (env_config)"
            )
        env_config = run_env_config(run_dir, run_cfg)
    if not algo:
        raise ValueError(f"cannot tell the algorithm of {source}: its run has no run_config.json; pass --algo")
    if slm is None:
        from envs.base import shared_lm

        model = env_config["model"]
        slm = shared_lm(str(model["name"]), str(model.get("dtype", "float32")))
    if pareto is None and run_dir is not None:
        found = sorted(run_dir.glob("pareto*.png"))
        pareto = found[0] if found else None
    hw = run_cfg.get("hardware") or {}
    trained_on = trained_on or hw.get("description") or hw.get("name")
    metrics = run_metrics(run_dir)
    common: dict[str, Any] = dict(env_config=env_config, slm=slm, metrics=metrics, trained_on=trained_on, pareto=pareto)
    algo_cfg = run_cfg.get("algo") or {}

    def write(target: Path, replace: bool) -> Path:
        if (ckpt / "bandit.json").is_file():
            from agents.bandit import BanditController

            return export_bandit(BanditController.load(ckpt / "bandit.json"), target, force=replace, **common)
        return export_rllib_module(
            load_rllib_module(ckpt),
            target,
            algo=str(algo),
            normalize_actions=bool(algo_cfg.get("normalize_actions", True)),
            clip_actions=bool(algo_cfg.get("clip_actions", False)),
            force=replace,
            **common,
        )

    if claims_dataset is not None:
        import tempfile

        from agents.controller import Controller
        from agents.validation import claims_for

        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent) as scratch:
            ctl = Controller.from_pretrained(write(Path(scratch) / "controller", False), slm)
            claims = claims_for(ctl, claims_dataset, split=claims_split)
        metrics["claims"] = {**claims, "dataset_path": str(claims_dataset), "split": claims_split}
    return write(Path(out), force)
