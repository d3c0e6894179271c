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

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.harness import Benchmark, summarize, time_calls

BENCH = Benchmark("experiments.bench.controller", __doc__, threads=True)
TITLE = "Standalone controller"
MODEL = "smollm2-135m"  # the embedded model
PROBE = {"num_groups": 3, "probe_layers": 2, "probe_dim": 32}
WARMUP = 20  # untimed decisions before the timed ones


def environments(model: str, threads: int | None) -> dict[str, dict[str, Any]]:
    """The PerInput environments the controllers are exported for: their spaces and descriptions.

    The measured-cost variants: they need no calibration file, and no decision depends on the cost
    source.

    Args:
        model: The model the environments run.
        threads: Torch intra-op threads (``None`` leaves the setting alone).

    Returns:
        Under ``"box"`` and ``"discrete"``: ``observation_space``, ``action_space``, ``config``
        (``env.unwrapped.config()``, what an export records) and ``slm`` (the environment's model).
    """
    import envs

    out = {}
    for kind, discrete in (("box", False), ("discrete", True)):
        env = envs.make_env(
            envs.env_id("PerInput", discrete=discrete, measured=True), model=model, n_items=8, threads=threads, **PROBE
        )
        u = env.unwrapped
        out[kind] = {
            "observation_space": env.observation_space,
            "action_space": env.action_space,
            "config": u.config(),
            "slm": u.slm,
        }
        env.close()
    return out


def build_exports(slm: Any, folder: Path, spaces: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Export a PPO (Box), a DQN (Discrete) and a LinUCB controller with random weights into ``folder``.

    Args:
        slm: The model the environments run (the exports are checked against its weights hash).
        folder: Where the controller folders go (``ppo``, ``dqn``, ``linucb``).
        spaces: :func:`environments`.
    """
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    from agents.bandit import BanditController
    from agents.export import export_bandit, export_rllib_module

    out = {}
    for name, cfg_cls, kind in (("ppo", PPOConfig, "box"), ("dqn", DQNConfig, "discrete")):
        env = spaces[kind]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = cfg_cls().environment(observation_space=env["observation_space"], action_space=env["action_space"])
            module = (
                cfg.rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[256, 256])).get_rl_module_spec().build()
            )
        out[name] = export_rllib_module(module, folder / name, algo=name, env_config=env["config"], slm=slm)
    discrete = spaces["discrete"]
    dim = int(np.prod(discrete["observation_space"].shape))
    arms = int(discrete["action_space"].n)
    rng = np.random.default_rng(0)
    bandit = BanditController(arms, dim)
    bandit.fit(rng.standard_normal((256, dim)), rng.integers(0, arms, 256), rng.standard_normal(256))
    out["linucb"] = export_bandit(bandit, folder / "linucb", env_config=discrete["config"], slm=slm)
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the BENCHMARKS.md section."""
    p = BENCH.parser()
    p.add_argument("--calls", type=int, default=5000, help="decisions timed per controller")
    p.add_argument("--forwards", type=int, default=15, help="dense forwards and probe runs timed")
    p.add_argument("--tokens", type=int, default=256, help="prompt length")
    args = BENCH.parse(p, argv)
    if min(args.calls, args.forwards, args.tokens) < 1:
        p.error("--calls, --forwards and --tokens must be >= 1")

    from agents.controller import Controller
    from envs.observation import Probe
    from experiments.report import markdown_table

    spaces = environments(MODEL, args.threads)
    slm = spaces["box"]["slm"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_exports(slm, Path(tmp), spaces)
        ctls = {name: Controller.from_pretrained(path, slm) for name, path in paths.items()}
        obs = rng.standard_normal(ctls["ppo"].observation_size).astype(np.float32)
        rows = []
        for name, ctl in ctls.items():
            t = summarize(time_calls(lambda ctl=ctl: ctl.select_action(obs), args.calls, warmup=WARMUP))
            rows.append(
                [
                    name,
                    ctl.action_kind,
                    f"{t.p50 * 1e3:.4f}",
                    f"{t.p95 * 1e3:.4f}",
                    "yes" if t.p50 <= 5e-5 else "no",
                ]
            )
        table1 = markdown_table(["controller", "action", "median ms", "p95 ms", "<= 0.05 ms"], rows)

        ids = torch.randint(0, slm.spec.vocab_size, (1, args.tokens))
        ctl = ctls["ppo"]
        probes = {k: Probe(slm, k, PROBE["probe_dim"]) for k in (0, 1, 2)}
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
                ctl.select_plan(res.features, slm, prompt_len=args.tokens)
                decide_t.append(time.perf_counter() - t0)
    dense = summarize(dense_t).p50
    dec = summarize(decide_t).p50
    rows2 = [["dense forward (logits at the last position)", f"{dense * 1e3:.1f}", "100%", "", ""]]
    for k in probes:
        pm, lm = summarize(probe_t[k]).p50, summarize(layer_t[k]).p50
        rows2.append(
            [
                f"probe k={k} + decision",
                f"{(pm + dec) * 1e3:.2f}",
                f"{(pm + dec) / dense:.2%}",
                f"{max(pm - lm, 0.0) * 1e3 + dec * 1e3:.2f}",
                f"{(max(pm - lm, 0.0) + dec) / dense:.2%}",
            ]
        )
    frac = (summarize(probe_t[2]).p50 + dec) / dense
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
        f"{ctls['ppo'].observation_size} probe features; onnxruntime, 1 intra-op thread; {args.calls} calls after "
        f"{WARMUP} warm-up). PPO and DQN have RLlib's default policy size (2 x 256 hidden units, random weights); the "
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
    BENCH.publish(args, TITLE, body)


if __name__ == "__main__":
    main()
