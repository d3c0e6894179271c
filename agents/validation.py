"""Claims and their validation: what an exported controller says it reaches, checked live.

- :func:`replay_claims` plays a controller on a replay dataset (:mod:`envs.replay`): on every
  recorded input it takes the controller's own actions and reads the recorded outcomes. No model
  runs, so a claim costs milliseconds; it is what a leaderboard entry and an export's card state.
- :func:`validate_live` re-runs the controller on the *live* environment over the same recorded
  inputs: the probe, the controller's decision (its own interface) and the plan run for real, the
  item scored against its dense reference, and the latency measured as ``repeats`` rounds that time
  the dense prompt and the controller's pipeline (probe + rest) in a shuffled order, per input
  ``median(pipeline) / median(dense)``.
- :func:`claims_for` picks the first for discrete controllers and measures the second for
  continuous ones (their plans were never recorded).
- :func:`check_claims` compares the two: mean dense-relative accuracy within ``accuracy_tol``
  (absolute) and mean latency fraction within ``latency_tol`` (relative).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ACCURACY_TOL = 0.02
LATENCY_TOL = 0.05


def _replay_env(controller: Any, dataset: str | Path, split: str | None) -> Any:
    import gymnasium as gym

    import envs

    kind = controller.env_kind
    if kind not in ("per_input", "layer_by_layer"):
        raise ValueError(f"{controller} is a {kind} controller: only per-input and layer-by-layer ones are replayed")
    name = "PerInput" if kind == "per_input" else "LayerByLayer"
    expect = {"weights_hash": controller.weights_hash}
    env = gym.make(envs.replay_id(name), dataset=str(dataset), split=split, latency="median", expect=expect)
    recorded = env.unwrapped.data.card["env"]["interface"]
    if recorded != controller.card["interface"]:
        raise ValueError(
            f"the dataset {dataset} was recorded for another observation or action than {controller} was trained "
            "on: record the environment the controller's card describes"
        )
    return env.unwrapped


def replay_claims(controller: Any, dataset: str | Path, *, split: str | None = None) -> dict[str, Any]:
    """What ``controller`` reaches on the recorded inputs of ``dataset`` (median measured latency).

    Returns:
        ``{"dataset": identity, "inputs", "accuracy", "accuracy_raw", "latency_fraction",
        "flops_fraction", "scoring", "latency"}``: means over the recorded inputs.

    Raises:
        ValueError: A dataset recorded for another model, observation or action.
    """
    env = _replay_env(controller, dataset, split)
    rel, raw, lat, flops = [], [], [], []
    for i in range(env.n_inputs):
        obs, _ = env.reset(options={"item": i})
        done, info = False, {}
        while not done:
            obs, _, done, _, info = env.step(controller.select_action(obs))
        rel.append(info["accuracy_dense_relative"])
        raw.append(info["accuracy_raw"])
        lat.append(info["latency_fraction"])
        flops.append(info["flops_fraction"])
    card = env.data.card
    return {
        "dataset": dataset_identity(card),
        "inputs": env.n_inputs,
        "accuracy": float(np.mean(rel)),
        "accuracy_raw": float(np.mean(raw)),
        "latency_fraction": float(np.mean(lat)),
        "flops_fraction": float(np.mean(flops)),
        "scoring": "dense_relative",
        "latency": "median of measured rounds, dense timed in the same rounds",
    }


def claims_for(controller: Any, dataset: str | Path, *, split: str | None = None, repeats: int = 5) -> dict[str, Any]:
    """The claims of ``controller`` on ``dataset``: replayed when its actions are discrete presets, else live.

    A discrete controller's paths were all recorded, so its claims are looked up
    (:func:`replay_claims`). A continuous one chooses plans no recording holds: its claims are
    measured live on the recorded inputs (:func:`validate_live`), on this machine.
    """
    if controller.action_kind == "discrete":
        return {**replay_claims(controller, dataset, split=split), "source": "replay"}
    measured = validate_live(controller, dataset, split=split, repeats=repeats)
    measured.pop("per_input", None)
    return {**measured, "source": "live", "scoring": "dense_relative", "latency": "median of measured rounds"}


def dataset_identity(card: Mapping[str, Any]) -> dict[str, Any]:
    """What names a recording: environment, model, weights, data and the recorded inputs' machine."""
    env = card["env"]
    return {
        "env": env.get("id"),
        "model": env["model"].get("name"),
        "weights_hash": env["model"].get("weights_hash"),
        "data": env.get("data"),
        "machine": card.get("machine"),
    }


def validate_live(
    controller: Any, dataset: str | Path, *, split: str | None = None, repeats: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Re-run ``controller`` live, with measured latency, on the recorded inputs of ``dataset``.

    The live environment is ``PerInput`` on the dataset's model, task, split and inputs, with the
    probe the controller's card names; per-input and layer-by-layer controllers decide with their
    own interface from the probe's features.

    Returns:
        The same figures as :func:`replay_claims`, measured live, plus per-input lists.

    Raises:
        ValueError: The live environment's inputs are not the recorded ones.
    """
    import torch

    from agents.evaluation import evaluation_env, probe_kwargs
    from envs.data.records import read_card
    from envs.measure.meters import Meter
    from envs.record import time_paths

    folder = Path(dataset)
    if split is not None and (folder / split / "card.json").is_file():
        folder = folder / split
    card = read_card(folder)
    data = card["env"]["data"]
    kwargs = dict(card["env_kwargs"])
    env_kwargs = {
        **probe_kwargs(controller.card["interface"]),
        "data_seed": data["data_seed"],
        "max_prompt_tokens": data["max_prompt_tokens"],
        "calibrate_cost": True,
        **{k: kwargs[k] for k in ("cost_model", "threads", "scorer") if k in kwargs},
    }
    env = evaluation_env(
        model=card["env"]["model"]["name"],
        task=data["task"],
        split=data["split"],
        n_items=data["n_items"],
        env_kwargs=env_kwargs,
        cost="calibrated",  # scoring; latency is timed below, in rounds
    )
    indices = sorted({i for s in card["shards"] for i in s["inputs"]})
    replayed = _recorded_ids(folder)
    live_ids = [env.items[i].id for i in indices]
    if live_ids != replayed:  # checked before any timing: a changed mix or split fails at once
        raise ValueError(
            f"the live inputs are not the recorded ones ({live_ids[:3]}... vs {replayed[:3]}...): task "
            f"{data['task']!r} no longer gives the items it gave when the recording was made"
        )
    slm = env.slm
    meter = Meter(str(slm.device), warmup=0, repeats=1, energy="off", memory=False)
    rng = np.random.default_rng(seed)
    rel, raw, lat, flops = [], [], [], []
    for i in indices:
        obs, info = env.reset(options={"item": i})
        plan = controller.select_plan(obs, slm, prompt_len=info["prompt_tokens"])
        _, _, _, _, out = env.step_plan(plan)
        ids = torch.tensor([env.scorer.encode(slm, env.items[i].prompt)], device=slm.device)
        dense_s, plan_s = time_paths(env, ids, [plan], repeats, rng, meter)
        rel.append(out["accuracy_dense_relative"])
        raw.append(out["accuracy_raw"])
        flops.append(out["flops_fraction"])
        lat.append(float(np.median(plan_s[0]) / np.median(dense_s)))
    return {
        "dataset": dataset_identity(card),
        "inputs": len(indices),
        "accuracy": float(np.mean(rel)),
        "accuracy_raw": float(np.mean(raw)),
        "latency_fraction": float(np.mean(lat)),
        "flops_fraction": float(np.mean(flops)),
        "repeats": int(repeats),
        "per_input": {"accuracy": rel, "latency_fraction": lat},
    }


def _recorded_ids(folder: Path) -> list[str]:
    from envs.data.records import ReplayData

    return ReplayData.load(folder, allow_mixed_machines=True).item_ids


def check_claims(
    claims: Mapping[str, Any],
    measured: Mapping[str, Any],
    *,
    accuracy_tol: float = ACCURACY_TOL,
    latency_tol: float = LATENCY_TOL,
    latency_comparable: bool = True,
) -> dict[str, Any]:
    """Whether ``measured`` figures reach ``claims``: accuracy within ``accuracy_tol``, latency within ``latency_tol``.

    With ``latency_comparable=False`` (the claims were measured on another machine kind, where a
    latency fraction means something else) the latency is reported but does not decide.

    Returns:
        ``{"ok", "accuracy": {...}, "latency_fraction": {...}}`` with claimed, measured, difference, bound.
    """
    acc_diff = float(measured["accuracy"]) - float(claims["accuracy"])
    lat_rel = float(measured["latency_fraction"]) / float(claims["latency_fraction"]) - 1.0
    acc_ok, lat_ok = abs(acc_diff) <= accuracy_tol, abs(lat_rel) <= latency_tol
    return {
        "ok": bool(acc_ok and (lat_ok or not latency_comparable)),
        "latency_comparable": bool(latency_comparable),
        "accuracy": {
            "claimed": claims["accuracy"],
            "measured": measured["accuracy"],
            "difference": acc_diff,
            "bound": accuracy_tol,
            "ok": acc_ok,
        },
        "latency_fraction": {
            "claimed": claims["latency_fraction"],
            "measured": measured["latency_fraction"],
            "relative_difference": lat_rel,
            "bound": latency_tol,
            "ok": lat_ok,
        },
    }
