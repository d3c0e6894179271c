"""Export a trained policy (an RLlib module or the LinUCB bandit) as a standalone controller folder.

The folder (see :mod:`agents.controller`) holds ``model.onnx``, ``model.safetensors``, ``card.json``
and ``README.md``, optionally ``pareto.png``. It is written into a temporary folder next to the target
and renamed into place at the end, so an interrupted export leaves no half folder (and, with
``force``, the previous export stays until the new one is complete).

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
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
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
    importance_hash,
    sha256_file,
)

if TYPE_CHECKING:
    import gymnasium as gym

    from agents.bandit import BanditController
    from envs.runtime.sparse_lm import SparseLM

ONNX_OPSET = 17
PARETO_FILE = "pareto.png"
ENV_KINDS = {"PerInput": "per_input", "PerToken": "per_token", "LayerByLayer": "layer_by_layer"}
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
def env_sections(
    env_id: str,
    env_kwargs: Mapping[str, Any],
    slm: SparseLM,
    observation_space: gym.Space,
    action_space: gym.Space,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The card's ``env``, ``observation`` and ``action`` sections for a PruneGym environment.

    Mirrors how the environments build their observation (the probe for ``PerInput``) and their
    plans (:class:`envs.base.PlanBuilder` over the action's layer groups), from the env's kwargs and
    the model, without building the environment (which would need its items and cost model).

    Raises:
        ValueError: An id that is not a PruneGym environment, or spaces that disagree with the settings.
    """
    import gymnasium as gym

    from envs.base import PRESETS, PlanBuilder
    from envs.observation import Probe
    from envs.runtime.plan import layer_groups

    kw = dict(env_kwargs)
    name, _, version = env_id.removeprefix("PruneGym/").rpartition("-v")
    base = name.removesuffix("Measured").removesuffix("Discrete")
    if base not in ENV_KINDS or not version.isdigit():
        raise ValueError(
            f"{env_id!r} is not a PruneGym environment id (PruneGym/<Name>-vN with Name in {sorted(ENV_KINDS)})"
        )
    kind = ENV_KINDS[base]
    L = slm.spec.num_layers
    num_groups = int(kw.get("num_groups", 3))
    presets = np.asarray(kw.get("presets") or PRESETS, dtype=np.float64).tolist()
    probe_cfg = None
    fixed: list[int] = []
    if kind == "per_input":
        probe = Probe(
            slm,
            int(kw.get("probe_layers", 2)),
            int(kw.get("probe_dim", 32)),
            int(kw.get("probe_seed", 0)),
            int(kw.get("ll_positions", 16)),
        )
        probe_cfg = probe.config()
        first = 0 if kw.get("probe_prunable", False) else probe.layers
        fixed = list(range(first))
        groups = [[first + i for i in g] for g in layer_groups(L - first, num_groups)]
        features: list[str] | None = list(probe.feature_names)
        description = f"probe features of the first {probe.layers} layers (envs.observation)"
    elif kind == "per_token":
        from envs.per_token import TOKEN_FEATURES

        groups = layer_groups(L, num_groups)
        features = list(TOKEN_FEATURES)
        description = "per-token decoding features (envs.per_token.TOKEN_FEATURES)"
    else:
        groups = layer_groups(L, num_groups)
        features = None
        description = "per-layer features (envs.layer_by_layer)"
    obs_shape = [int(x) for x in observation_space.shape]
    if features is not None and int(np.prod(obs_shape)) != len(features):
        raise ValueError(
            f"the policy observes {obs_shape} values but {env_id} with these settings gives {len(features)} "
            f"({features[:4]}...): pass the env kwargs the policy was trained with"
        )
    env = {
        "id": env_id,
        "name": name,
        "version": int(version),
        "kind": kind,
        "measured": "Measured" in name or kw.get("cost") == "measured",
        "kwargs": _jsonable(kw),
    }
    if kind == "per_token":
        env["max_new_tokens"] = int(kw.get("max_new_tokens", 16))
        env["feed"] = str(kw.get("feed", "dense"))
    observation = {
        "shape": obs_shape,
        "dtype": "float32",
        "low": float(np.min(observation_space.low)),
        "high": float(np.max(observation_space.high)),
        "features": features,
        "description": description,
        "probe": probe_cfg,
        # The probe's features are fixed transforms (no fitted statistics); a policy that standardises
        # its input carries that inside model.onnx (the bandit's mean/std).
        "normalization": {"kind": "none (fixed transforms, clipped)", "clip": probe_cfg["clip"] if probe_cfg else None},
    }
    action: dict[str, Any] = {
        "num_groups": num_groups,
        "groups": groups,
        "fixed_dense": fixed,
        "presets": presets,
        "budget": kw.get("budget"),
        "fractions": "[layers, heads, mlp] keep fractions per group (envs.base.PlanBuilder)",
    }
    if isinstance(action_space, gym.spaces.Box):
        if int(np.prod(action_space.shape)) != 3 * num_groups:
            raise ValueError(
                f"the policy's Box action has shape {action_space.shape}, but num_groups={num_groups} means "
                f"{3 * num_groups} fractions: pass the env kwargs it was trained with"
            )
        action.update(
            kind="box",
            shape=[int(x) for x in action_space.shape],
            low=np.asarray(action_space.low, dtype=np.float64).tolist(),
            high=np.asarray(action_space.high, dtype=np.float64).tolist(),
        )
    elif isinstance(action_space, gym.spaces.Discrete):
        if int(action_space.n) != len(presets):
            raise ValueError(
                f"the policy has {action_space.n} discrete actions, but the env has {len(presets)} presets: pass "
                "the env kwargs (presets) it was trained with"
            )
        action.update(kind="discrete", n=int(action_space.n))
        if action.get("budget") is None:  # a preset's plan does not depend on the prompt: store it
            builder = PlanBuilder(slm, groups, fixed)
            action["preset_plans"] = [builder.plan(np.tile(p, (num_groups, 1))).to_dict() for p in presets]
    else:
        raise ValueError(f"only Box and Discrete actions export, got {action_space}")
    return env, observation, action


def model_section(slm: SparseLM, model_id: str | None = None) -> dict[str, Any]:
    """The card's ``model`` section: id, weights hash, shape and importance ordering hash."""
    return {
        "id": model_id or slm.name,
        "weights_hash": slm.weights_hash,
        "spec": slm.spec.to_dict(),
        "importance_hash": importance_hash(slm.importance),
        "importance_meta": _jsonable(getattr(slm.importance, "meta", {})),
        "dtype": str(next(iter(slm.model.parameters())).dtype).removeprefix("torch."),
    }


def device_description() -> str:
    """The machine a figure was measured on: CPU model and cores, or the CUDA device."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def package_versions() -> dict[str, str]:
    """Versions of the packages that made the export (absent ones are left out)."""
    out: dict[str, str] = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
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


def _jsonable(value: Any) -> Any:
    """Plain JSON-ready containers (dataclasses, numpy, OmegaConf nodes, tuples)."""
    with contextlib.suppress(ImportError):
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------------- README
def render_readme(card: Mapping[str, Any], has_pareto: bool) -> str:
    """The model card (Markdown) for people: what it is, its metrics, how to use it."""
    env, model, act, obs = card["env"], card["model"], card["action"], card["observation"]
    m = card.get("metrics") or {}
    lines = [
        "---",
        "library_name: prunegym",
        "tags: [prunegym, adaptive-pruning, reinforcement-learning, onnx]",
        "---",
        "",
        f"# PruneGym controller: {card.get('algo', '?').upper()} on {env['id']}",
        "",
        f"A pruning controller for `{model['id']}` (weights hash `{model['weights_hash']}`): from the "
        + (
            f"probe of the prompt's first {obs['probe']['layers']} layers"
            if obs.get("probe")
            else f"{env['kind'].replace('_', '-')} observations"
        )
        + " it chooses how much of the model runs "
        + ("on each input." if env["kind"] == "per_input" else "at each decision."),
        "",
        "## Metrics",
        "",
    ]
    rows = []
    for split, values in (("training (last iteration)", m.get("train")), ("held-out", m.get("held_out"))):
        if values:
            cells = [_fmt(values.get(k)) for k in ("reward", "accuracy", "cost")]
            rows.append(f"| {split} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["| split | reward | accuracy | cost |", "|---|---|---|---|", *rows, ""]
        if m.get("source"):
            lines += [f"From the training run's {m['source']}.", ""]
    else:
        lines += ["No metrics were recorded with this export.", ""]
    if has_pareto:
        lines += [f"![accuracy against cost]({PARETO_FILE})", ""]
    lines += [
        "## Details",
        "",
        f"- Environment: `{env['id']}` (version {env['version']}), settings in `card.json` (`env.kwargs`).",
        f"- Observation: {int(np.prod(obs['shape']))} float32 values, {obs['description']}.",
        "- Action: "
        + (
            f"Box {act['shape']} keep fractions [layers, heads, mlp] for {act['num_groups']} layer groups."
            if act["kind"] == "box"
            else f"one of {act['n']} preset plans (keep fractions in `card.json`, `action.presets`)."
        ),
        f"- Trained and measured on: {card['device']['trained_on']}.",
        f"- Files: `{ONNX_FILE}` (onnxruntime), `{WEIGHTS_FILE}` (policy weights), `{CARD_FILE}`; no pickle.",
        "",
        "## How to use",
        "",
        "```python",
        "from agents.controller import Controller",
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


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "n/a"


# ---------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_folder(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """A temporary folder next to ``out`` that becomes ``out`` only when the block ends without error.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is off.
    """
    out = Path(out).resolve()
    if out.exists() and not force:
        raise FileExistsError(
            f"{out} already exists: pass force=True (--force) to replace it, or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=1))
    return Path(out).resolve()


def _base_card(
    algo: str, env: dict, observation: dict, action: dict, model: dict, metrics: dict | None, trained_on: str | None
) -> dict[str, Any]:
    here = device_description()
    return {
        "format": CARD_FORMAT,
        "schema_version": CARD_SCHEMA_VERSION,
        "algo": algo,
        "env": env,
        "observation": observation,
        "action": action,
        "model": model,
        "device": {
            "trained_on": trained_on or here,
            "measured_on": trained_on or here,
            "cost": "measured" if env.get("measured") else "calibrated (cost model of the training device)",
            "exported_on": here,
        },
        "metrics": metrics or {},
        "packages": package_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def export_rllib_module(
    module: Any,
    out: str | Path,
    *,
    algo: str,
    env_id: str,
    env_kwargs: Mapping[str, Any],
    slm: SparseLM,
    model_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    trained_on: str | None = None,
    normalize_actions: bool = True,
    clip_actions: bool = False,
    pareto: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Export an RLlib RLModule (PPO, APPO, IMPALA, SAC, DQN) as a controller folder.

    Args:
        module: The RLModule (e.g. ``RLModule.from_checkpoint(...)`` or ``algo.get_module()``).
        out: Target folder (must not exist unless ``force``).
        algo: Algorithm name for the card.
        env_id: The env id it was trained on.
        env_kwargs: The env's kwargs (as in the run's ``run_config.json``).
        slm: The model it drives (weights hash, shape, probe).
        model_id: Name for the card (default ``slm.name``).
        metrics: The card's metrics (:func:`run_metrics`).
        trained_on: Device description of the training run (default: this machine).
        normalize_actions: RLlib's ``normalize_actions`` of the training config.
        clip_actions: RLlib's ``clip_actions``.
        pareto: A Pareto plot to include.
        force: Replace an existing folder.
    """
    import gymnasium as gym

    obs_space, act_space = module.observation_space, module.action_space
    env, observation, action = env_sections(env_id, env_kwargs, slm, obs_space, act_space)
    kind = "box" if isinstance(act_space, gym.spaces.Box) else "discrete"
    action.update(
        normalize_actions=bool(normalize_actions),
        clip_actions=bool(clip_actions),
        deterministic=(
            "RLlib to_deterministic() (Gaussian mean, unsquashed for SAC), clipped to [-1, 1], rescaled to [low, high]"
            if kind == "box" and normalize_actions
            else "RLlib to_deterministic() (arg-max)"
            if kind == "discrete"
            else "RLlib to_deterministic()"
        ),
    )
    policy = RLlibPolicy(
        module,
        kind,
        getattr(act_space, "low", None),
        getattr(act_space, "high", None),
        normalize_actions=normalize_actions,
        clip_actions=clip_actions,
    )
    model_config = getattr(module, "model_config", None)
    card = _base_card(algo, env, observation, action, model_section(slm, model_id), metrics, trained_on)
    card["policy"] = {
        "type": "rllib",
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "model_config": _jsonable(model_config),
        "weights": f"{WEIGHTS_FILE}: the RLModule's state_dict",
    }
    module.eval()
    return write_export(
        out,
        policy=policy,
        tensors=dict(module.state_dict()),
        card=card,
        obs_dim=int(np.prod(obs_space.shape)),
        pareto=pareto,
        force=force,
    )


def export_bandit(
    controller: BanditController,
    out: str | Path,
    *,
    env_id: str,
    env_kwargs: Mapping[str, Any],
    slm: SparseLM,
    model_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    trained_on: str | None = None,
    pareto: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Export the LinUCB/LinTS bandit's greedy policy (a linear scorer and an arg-max) as a controller folder."""
    import gymnasium as gym

    from envs.observation import OBS_CLIP

    d = controller.num_features
    betas = controller.betas()
    mean = controller.mean if controller.mean is not None else np.zeros(d)
    std = controller.std if controller.std is not None else np.ones(d)
    obs_space = gym.spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(d,), dtype=np.float32)
    act_space = gym.spaces.Discrete(controller.num_arms)
    env, observation, action = env_sections(env_id, env_kwargs, slm, obs_space, act_space)
    action["deterministic"] = "greedy: argmax_a beta_a . [(x - mean) / std, 1] (no exploration bonus)"
    observation["normalization"] = {
        "kind": "standardise (inside model.onnx), then a bias column",
        "mean": np.asarray(mean).tolist(),
        "std": np.asarray(std).tolist(),
    }
    card = _base_card(controller.policy, env, observation, action, model_section(slm, model_id), metrics, trained_on)
    card["policy"] = {
        "type": "linear-bandit",
        "policy": controller.policy,
        "alpha": controller.alpha,
        "l2_lambda": controller.l2_lambda,
        "samples": controller.samples,
        "weights": f"{WEIGHTS_FILE}: betas [arms, features + 1] (last column: intercept), mean, std",
    }
    scorer = LinearArgmax(betas, mean, std)
    return write_export(
        out,
        policy=scorer,
        tensors={"betas": torch.as_tensor(betas), "mean": torch.as_tensor(mean), "std": torch.as_tensor(std)},
        card=card,
        obs_dim=d,
        pareto=pareto,
        force=force,
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


def export_from_path(
    source: str | Path,
    out: str | Path,
    *,
    slm: SparseLM | None = None,
    algo: str | None = None,
    env_id: str | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    pareto: str | Path | None = None,
    trained_on: str | None = None,
    force: bool = False,
    loader: Callable[[str, str], SparseLM] | None = None,
) -> Path:
    """Export a training run's latest checkpoint (or a given checkpoint) as a controller folder.

    The run's ``run_config.json`` supplies the algorithm, env id and kwargs (arguments override it);
    ``final.json`` / ``metrics.jsonl`` the metrics; a ``pareto*.png`` in the run directory the plot.

    Args:
        source: A run directory (``checkpoints/latest.json``) or a checkpoint folder (RLlib, or the
            bandit's ``bandit.json``).
        out: The export folder.
        slm: The model; loaded by name from the env kwargs (``model``, ``dtype``) when ``None``.
        algo: Algorithm name, overriding the run's (needed without a run_config.json).
        env_id: Env id, overriding the run's.
        env_kwargs: Env kwargs, replacing the run's.
        pareto: A Pareto plot to include.
        trained_on: Device description of the training machine (default: this machine).
        force: Replace an existing folder.
        loader: ``(model, dtype) -> SparseLM`` (default :func:`envs.base.shared_lm`).
    """
    ckpt, run_dir = resolve_source(source)
    run_cfg: dict[str, Any] = {}
    if run_dir is not None:
        run_cfg = json.loads((run_dir / "run_config.json").read_text())
    algo = algo or (run_cfg.get("algo") or {}).get("name")
    env_id = env_id or (run_cfg.get("env") or {}).get("id")
    kwargs = dict(env_kwargs if env_kwargs is not None else (run_cfg.get("env") or {}).get("kwargs") or {})
    if (ckpt / "bandit.json").is_file():
        algo = algo or "linucb"
    if not algo or not env_id:
        raise ValueError(
            f"cannot tell the algorithm and environment of {source}: it has no run_config.json; pass --algo and "
            "--env-id (and --env-kwargs as JSON)"
        )
    if slm is None:
        from envs.base import shared_lm

        slm = (loader or shared_lm)(str(kwargs.get("model", "smollm2-135m")), str(kwargs.get("dtype", "float32")))
    if pareto is None and run_dir is not None:
        found = sorted(run_dir.glob("pareto*.png"))
        pareto = found[0] if found else None
    hw = run_cfg.get("hardware") or {}
    trained_on = trained_on or hw.get("description") or hw.get("name")
    metrics = run_metrics(run_dir)
    common = dict(
        env_id=env_id, env_kwargs=kwargs, slm=slm, metrics=metrics, trained_on=trained_on, pareto=pareto, force=force
    )
    if (ckpt / "bandit.json").is_file():
        from agents.bandit import BanditController

        return export_bandit(BanditController.load(ckpt / "bandit.json"), out, **common)  # type: ignore[arg-type]
    algo_cfg = run_cfg.get("algo") or {}
    module = load_rllib_module(ckpt)
    return export_rllib_module(
        module,
        out,
        algo=str(algo),
        normalize_actions=bool(algo_cfg.get("normalize_actions", True)),
        clip_actions=bool(algo_cfg.get("clip_actions", False)),
        **common,  # type: ignore[arg-type]
    )
