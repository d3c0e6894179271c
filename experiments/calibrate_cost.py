"""Calibrate the cost model of a model on this device and check its drift.

Measures a sample of sparsity plans per sequence-length bucket, fits the per-bucket latency/energy
model (:class:`envs.measure.cost_model.CostModel`), saves it as JSON (by default next to the model's other
caches, where ``cost: calibrated`` environments look for it), then measures fresh random plans and
prints the model's error (MAPE).

Example::

    python -m experiments.calibrate_cost --model smollm2-135m --seq-lens 64 256 --n-plans 32 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.calibrate_cost",
        description=(
            "Fit the calibrated cost model (latency and energy of a sparsity plan, per sequence-length bucket) "
            "on this device, save it as JSON and report its drift MAPE on fresh random plans."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name, folder or hub id (see envs.runtime.models.load_model); 'tiny-<family>' builds a tiny random "
        "model for smoke tests",
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[64, 256], help="one bucket per sequence length")
    p.add_argument("--n-plans", type=int, default=32, help="plans measured per bucket (anchors + random)")
    p.add_argument("--drift-plans", type=int, default=16, help="fresh random plans for the drift check (0: skip)")
    p.add_argument("--drift-seq-len", type=int, default=None, help="drift check length (default: largest bucket)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: under the model's cache folder)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (latency depends on it)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per plan")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per plan (median is used)")
    p.add_argument(
        "--energy", default="auto", choices=["auto", "nvml", "rapl", "estimate", "off"], help="energy counter"
    )
    p.add_argument("--cpu-power-w", type=float, default=10.0, help="watts per busy core for the CPU-time estimate")
    p.add_argument("--logits", default="last", choices=["all", "last", "none"], help="LM-head positions per forward")
    p.add_argument("--seed", type=int, default=0, help="seed for plans and token ids")
    return p


def load_slm(name: str, device: str, threads: int) -> Any:
    """The model to calibrate: by name, or a tiny random one for ``tiny-<family>``."""
    from envs.runtime.models import tiny_model
    from envs.runtime.sparse_lm import SparseLM

    if name.startswith("tiny-"):
        slm = SparseLM(tiny_model(name.removeprefix("tiny-"), seed=0), name=name, threads=threads)
    else:
        slm = SparseLM.from_pretrained(name, threads=threads)
    if device != "cpu":
        slm.model.to(device)
        slm = SparseLM(slm.model, slm.tokenizer, slm.importance, name=slm.name, cache_dir=slm.cache_dir)
    return slm


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the calibration; returns the path, fit and drift figures."""
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from envs.measure.cost_model import CostModel, default_path
    from envs.measure.meters import Meter

    slm = load_slm(args.model, args.device, args.threads)
    meter = Meter(
        args.device, warmup=args.warmup, repeats=args.repeats, energy=args.energy, cpu_power_w=args.cpu_power_w
    )
    info = meter.describe()
    print(
        f"calibrating {slm.name} on {info['device']} ({args.threads} threads), buckets {args.seq_lens}, "
        f"{args.n_plans} plans each; energy: {info['energy_meter']} ({info['energy_source']})"
    )
    t0 = time.perf_counter()
    with tqdm(total=args.n_plans * len(set(args.seq_lens)), desc="calibrate", unit="plan") as bar:
        cm = CostModel.fit(
            slm,
            seq_lens=args.seq_lens,
            n_plans=args.n_plans,
            meter=meter,
            seed=args.seed,
            logits=args.logits,
            callback=lambda done, total: bar.update(done - bar.n),
        )
    fit_s = time.perf_counter() - t0
    path = cm.save(args.output or default_path(slm, args.device))
    for T, b in cm.buckets.items():
        energy = f", energy {b.energy_fit_mape:.1f}%" if b.energy_fit_mape is not None else ""
        print(f"bucket {T:>5} tokens: in-sample latency MAPE {b.fit_mape:.1f}%{energy}, noisy {b.noisy_fraction:.0%}")
    print(f"calibration took {fit_s:.1f} s; saved {path}")
    drift = None
    if args.drift_plans > 0:
        T = args.drift_seq_len or max(args.seq_lens)
        with tqdm(total=args.drift_plans, desc="drift", unit="plan") as bar:
            drift = cm.drift(
                slm,
                args.drift_plans,
                T,
                meter=meter,
                seed=args.seed + 10_000,
                callback=lambda done, total: bar.update(done - bar.n),
            )
        energy = f", energy MAPE {drift['energy_mape']:.1f}%" if drift["energy_mape"] is not None else ""
        print(
            f"drift at {T} tokens over {args.drift_plans} fresh plans: latency MAPE {drift['mape']:.1f}% "
            f"(median {drift['median_ape']:.1f}%, p95 {drift['p95_ape']:.1f}%, bias {drift['bias']:+.1f}%){energy}"
        )
    return {"path": path, "fit_seconds": fit_s, "cost_model": cm, "drift": drift}


if __name__ == "__main__":
    main()
