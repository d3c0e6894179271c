"""Benchmark of the standalone controller: ``python -m experiments.bench.controller``.

Measures, on this machine:

1. the decision time of exported controllers (onnxruntime, one intra-op thread): a PPO policy of
   RLlib's default size (two hidden layers of 256) with a Box action, a DQN policy, and the LinUCB
   bandit, each ``Controller.select_action`` on one observation (median and p95 over many calls);
2. probe + decision as a fraction of a dense forward of the embedded model on a 256-token prompt:
   :class:`envs.observation.Probe` (the first 2 layers densely plus the features) and one decision, against
   ``SparseLM.forward(ids, logits="last")`` with the dense plan, timed interleaved in one process.

Policies have random weights (the decision time does not depend on their values). Writes the
"Standalone controller" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def timings(fn: Callable[[], object], n: int, warmup: int = 20) -> list[float]:
    """Wall-clock seconds of ``n`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def p95(values: list[float]) -> float:
    """95th percentile."""
    return float(np.percentile(values, 95))


def build_exports(slm, folder: Path, probe_kwargs: dict) -> dict[str, Path]:
    """Export a PPO (Box), a DQN (Discrete) and a LinUCB controller for ``slm`` into ``folder``."""
    import gymnasium as gym
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from agents.bandit import BanditController
    from agents.export import export_bandit, export_rllib_module
    from envs.observation import Probe

    probe = Probe(slm, probe_kwargs["probe_layers"], probe_kwargs["probe_dim"])
    obs = gym.spaces.Box(-10.0, 10.0, (probe.dim,), np.float32)
    g = probe_kwargs["num_groups"]
    out = {}
    for name, cfg_cls, space, env_id in (
        ("ppo", PPOConfig, gym.spaces.Box(0.0, 1.0, (3 * g,), np.float32), "PruneGym/PerInput-v0"),
        ("dqn", DQNConfig, gym.spaces.Discrete(10), "PruneGym/PerInputDiscrete-v0"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = cfg_cls().environment(observation_space=obs, action_space=space)
            module = (
                cfg.rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[256, 256])).get_rl_module_spec().build()
            )
        out[name] = export_rllib_module(
            module, folder / name, algo=name, env_id=env_id, env_kwargs=probe_kwargs, slm=slm
        )
    rng = np.random.default_rng(0)
    bandit = BanditController(10, probe.dim)
    x = rng.standard_normal((256, probe.dim))
    bandit.fit(x, rng.integers(0, 10, 256), rng.standard_normal(256))
    out["linucb"] = export_bandit(
        bandit, folder / "linucb", env_id="PruneGym/PerInputDiscrete-v0", env_kwargs=probe_kwargs, slm=slm
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the BENCHMARKS.md section."""
    p = argparse.ArgumentParser(prog="python -m experiments.bench.controller", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5000, help="decisions timed per controller")
    p.add_argument("--forwards", type=int, default=15, help="dense forwards and probe runs timed")
    p.add_argument("--tokens", type=int, default=256, help="prompt length")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    from agents.controller import Controller
    from envs.observation import Probe
    from envs.runtime.sparse_lm import SparseLM
    from experiments.report import markdown_table, write_section

    slm = SparseLM.from_pretrained()
    probe_kwargs = {"model": "smollm2-135m", "num_groups": 3, "probe_layers": 2, "probe_dim": 32}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_exports(slm, Path(tmp), probe_kwargs)
        ctls = {name: Controller.from_pretrained(path, slm) for name, path in paths.items()}
        obs = rng.standard_normal(ctls["ppo"].observation_size).astype(np.float32)
        rows = []
        decision = {}
        for name, ctl in ctls.items():
            t = timings(lambda ctl=ctl: ctl.select_action(obs), args.calls)
            decision[name] = statistics.median(t)
            rows.append(
                [
                    name,
                    ctl.card["action"]["kind"],
                    f"{statistics.median(t) * 1e3:.4f}",
                    f"{p95(t) * 1e3:.4f}",
                    "yes" if statistics.median(t) <= 5e-5 else "no",
                ]
            )
        table1 = markdown_table(["controller", "action", "median ms", "p95 ms", "<= 0.05 ms"], rows)

        ids = torch.randint(0, slm.spec.vocab_size, (1, args.tokens))
        ctl = ctls["ppo"]
        probes = {k: Probe(slm, k, 32) for k in (0, 1, 2)}
        dense_plan = slm.dense_plan()

        def layers_only(k: int) -> None:
            state = slm.start(ids, slm.new_cache())
            if k:
                slm.run_layers(state, dense_plan, 0, k)

        dense_t: list[float] = []
        probe_t: dict[int, list[float]] = {k: [] for k in probes}
        layer_t: dict[int, list[float]] = {k: [] for k in probes}
        decide_t: list[float] = []
        with torch.no_grad():
            for _ in range(2):
                slm.forward(ids, logits="last")
            for _ in range(args.forwards):  # interleaved, so load drifts hit every figure alike
                t0 = time.perf_counter()
                slm.forward(ids, logits="last")
                dense_t.append(time.perf_counter() - t0)
                for k, probe in probes.items():
                    t0 = time.perf_counter()
                    res = probe.run(ids)
                    probe_t[k].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    layers_only(k)
                    layer_t[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ctl.select_plan(res.features, slm, seq_len=args.tokens)
                decide_t.append(time.perf_counter() - t0)
    dense = statistics.median(dense_t)
    dec = statistics.median(decide_t)
    rows2 = [["dense forward (logits at the last position)", f"{dense * 1e3:.1f}", "100%", "", ""]]
    for k in probes:
        pm, lm = statistics.median(probe_t[k]), statistics.median(layer_t[k])
        rows2.append(
            [
                f"probe k={k} + decision",
                f"{(pm + dec) * 1e3:.2f}",
                f"{(pm + dec) / dense:.2%}",
                f"{max(pm - lm, 0.0) * 1e3 + dec * 1e3:.2f}",
                f"{(max(pm - lm, 0.0) + dec) / dense:.2%}",
            ]
        )
    frac = (statistics.median(probe_t[2]) + dec) / dense
    table2 = markdown_table(
        [
            f"SmolLM2-135M, {args.tokens} tokens",
            "median ms",
            "of dense",
            "extra ms (probe layers reused)",
            "extra of dense",
        ],
        rows2,
    )
    body = (
        f"Decision time of exported controllers (`Controller.select_action` on one observation of "
        f"{ctls['ppo'].observation_size} probe features; onnxruntime, 1 intra-op thread; {args.calls} calls after 20 "
        "warm-up). PPO and DQN have RLlib's default policy size (2 x 256 hidden units, random weights); the "
        "bandit is a linear scorer over 10 presets. Target: <= 0.05 ms.\n\n"
        f"{table1}\n\n"
        f"Probe + decision as a fraction of a dense forward of the embedded SmolLM2-135M on a {args.tokens}-token "
        f"prompt (`envs.observation.Probe` with k dense layers and 32 projected dims, the env default is k=2; one PPO "
        f"`select_plan`, {dec * 1e3:.3f} ms; medians of {args.forwards} runs interleaved with the dense forwards; "
        f"torch {torch.get_num_threads()} threads). Target: <= 3%. 'of dense' is the probe's whole time; 'extra' "
        "subtracts the "
        "embedding and k layers, which the rest of the prompt continues from (they are not run again), leaving the "
        f"features and the decision. Probe k=2 + decision: {frac:.2%} of dense.\n\n"
        f"{table2}\n"
    )
    print(body)
    if not args.no_write:
        given = sys.argv[1:] if argv is None else argv
        cmd = " ".join(["python -m experiments.bench.controller", *given])
        write_section("Standalone controller", cmd, body)


if __name__ == "__main__":
    main()
