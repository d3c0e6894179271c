"""Recording an environment's outcomes: every discrete action path on an input, scored and timed.

:func:`record_input` is the one place that runs the paths; ``python -m experiments.record`` fans
inputs out over shards (and Ray workers) and writes the dataset (:mod:`envs.data.records`) that the
replay twins (:mod:`envs.replay`) read.

For each input of a discrete ``PerInput`` or ``LayerByLayer`` environment with the calibrated cost:

- the observations come from the environment itself (its reset) and, for the steps after the
  first, from its interface (:meth:`envs.interface.LayerByLayerInterface.step_observation`), the
  code its ``step`` runs;
- each path's plan is scored by :meth:`envs.per_input.PerInput.step_plan` with the episode kept
  open, so accuracy, FLOPs and the calibrated latency and energy fractions are the figures the
  live calibrated environment reports for that path;
- the measured latency is ``repeats`` rounds in which the dense prompt and every path's plan (its
  probe plus the rest of the prompt, as the measured environment times them) run once each, in an
  order shuffled per round, so load from elsewhere hits them alike.

``PerToken`` is not recorded: a token's outcome depends on the plans of every token before it (the
KV cache they left), so its paths grow as ``presets ** tokens`` and no per-step table replays it exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from envs.measure.meters import Meter, device_tag
from envs.runtime.sparse_lm import run_full, run_rest

RECORDABLE = ("PerInput", "LayerByLayer")


def check_recordable(env: Any, max_paths: int = 5000) -> int:
    """The number of action paths per input of ``env`` (unwrapped), refusing what cannot be recorded.

    Raises:
        ValueError: Not a discrete PerInput/LayerByLayer env with the calibrated cost, or too many paths.
    """
    name = type(env).__name__
    if name not in RECORDABLE:
        raise ValueError(
            f"{name} cannot be recorded: only {RECORDABLE} (a PerToken outcome depends on every earlier token's plan)"
        )
    if not env.discrete:
        raise ValueError(f"record the discrete variant ({name}Discrete): a replay twin looks up preset paths")
    if env.cost_kind != "calibrated":
        raise ValueError("record with cost='calibrated': the measured latencies are timed by the recorder itself")
    steps = env.num_groups if name == "LayerByLayer" else 1
    paths = len(env.presets) ** steps
    if paths > max_paths:
        raise ValueError(
            f"{name} with {len(env.presets)} presets and {steps} steps has {paths} paths per input (more than "
            f"{max_paths}); record it with fewer layer groups (env num_groups=3 gives {len(env.presets) ** 3})"
        )
    return paths


def _observations(env: Any, obs0: np.ndarray, path: tuple[int, ...], prompt_len: int) -> tuple[list[np.ndarray], Any]:
    """Observations before each step of ``path`` and its plan, as the environment's steps compute them."""
    iface = env.interface
    if type(env).__name__ == "PerInput":
        return [obs0], iface.decide(path[0], prompt_len)[0]
    probe_features = env.probe_features
    fr = np.zeros((env.num_groups, 3))
    observations = []
    for t, a in enumerate(path):
        observations.append(iface.step_observation(probe_features, t, fr, prompt_len))
        fr[t], _, _ = iface.step_fractions(a, t, fr, prompt_len)
    return observations, iface.actions.plan(fr)


def record_input(env: Any, index: int, *, repeats: int = 3, seed: int = 0, meter: Meter | None = None) -> list[dict]:
    """Every action path of input ``index`` of ``env`` (unwrapped, discrete, calibrated): one row each.

    Args:
        env: A discrete ``PerInput`` or ``LayerByLayer`` environment with ``cost="calibrated"``.
        index: The input (``options={"item": index}``).
        repeats: Measured latency rounds.
        seed: Seed of the per-round order.
        meter: Times each run (default: one call, no warm-up, on the model's device).

    Returns:
        Rows with the columns of :data:`envs.data.records.COLUMNS`.
    """
    check_recordable(env)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    slm = env.slm
    meter = meter or Meter(str(slm.device), warmup=0, repeats=1, energy="off", memory=False)
    machine = device_tag(str(slm.device))
    obs0, info = env.reset(options={"item": index})
    item = env.items[index]
    ids = torch.tensor([env.scorer.encode(slm, item.prompt)], device=slm.device)
    P = int(ids.shape[1])
    steps = env.num_groups if type(env).__name__ == "LayerByLayer" else 1
    paths = list(itertools.product(range(len(env.presets)), repeat=steps))
    rows, plans = [], []
    for path in paths:
        observations, plan = _observations(env, obs0, path, P)
        _, _, _, _, out = env.step_plan(plan, keep_open=True)
        plans.append(plan)
        rows.append(
            {
                "item_index": int(index),
                "item_id": item.id,
                "task": item.task,
                "prompt_tokens": P,
                "path": [int(a) for a in path],
                "obs": [np.asarray(o, dtype=np.float32).tolist() for o in observations],
                "accuracy_raw": float(out["accuracy_raw"]),
                "accuracy_dense_relative": float(out["accuracy_dense_relative"]),
                "flops_fraction": float(out["flops_fraction"]),
                "latency_fraction": float(out["latency_fraction"]),
                "energy_fraction": None if out["energy_fraction"] is None else float(out["energy_fraction"]),
                "latency_s": [],
                "dense_latency_s": [],
                "machine": machine,
            }
        )
    env.close_episode()
    dense_s, plan_s = time_paths(env, ids, plans, repeats, np.random.default_rng([seed, index]), meter)
    for row, times in zip(rows, plan_s, strict=True):
        row["latency_s"], row["dense_latency_s"] = times, dense_s
    return rows


def time_paths(
    env: Any, ids: torch.Tensor, plans: list[Any], repeats: int, rng: np.random.Generator, meter: Meter
) -> tuple[list[float], list[list[float]]]:
    """``repeats`` rounds of the dense prompt and of each plan (probe + rest), in a shuffled order per round.

    Returns:
        The dense prompt's seconds per round, and each plan's seconds per round.
    """
    slm, iface = env.slm, env.interface
    dense = slm.dense_plan()
    k = iface.probe.layers

    def pipeline(plan: Any) -> Callable[[], Any]:
        if iface.reuses_probe(plan):
            return lambda: run_rest(slm, iface.observe(ids), plan, k)
        return lambda: (iface.observe(ids), run_full(slm, ids, plan))

    runs = [lambda: slm.forward(ids, dense, logits="last")] + [pipeline(p) for p in plans]
    seconds: list[list[float]] = [[] for _ in runs]
    with torch.no_grad():
        for _ in range(repeats):
            for j in rng.permutation(len(runs)):
                seconds[j].append(float(meter.measure(runs[j], tokens=int(ids.shape[1])).latency_p50_s))
    return seconds[0], seconds[1:]
