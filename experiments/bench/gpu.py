"""GPU benchmark: 2:4 sparsity, layer skipping and MLP slicing, per linear and end to end, with energy.

Run on an NVIDIA GPU of compute capability >= 8.0 (``python -m experiments.bench.gpu --help``):

1. **Per linear**: the MLP linears (gate/up ``[I, D]``, down ``[D, I]``) and the whole MLP block of
   SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes, dense vs 2:4, at as many tokens as a prefill
   of batch 1, 8 and 32 rows of ``--seq`` tokens.
2. **End to end**: prefill (``logits="last"``) of randomly initialised models of those real
   configurations (built from ``LlamaConfig``; nothing is downloaded; speed does not depend on the
   weight values, accuracy is scored elsewhere, on the embedded model) under four plans: dense,
   2:4 MLPs in every layer, layer skipping and MLP slicing. The last two are sized to the *ideal*
   FLOPs of the 2:4 plan (MLP slicing to half the channels, layer skipping to the same decoder-FLOP
   fraction), so the table compares ways of removing the same work.

All timings go through :class:`envs.measure.meters.Meter` on ``cuda`` (CUDA events with synchronisation,
NVML energy windows of at least ``--energy-window`` seconds, ``torch.cuda.max_memory_allocated``).
Each configuration is measured ``--rounds`` times, the variants interleaved round-robin so that
clock and temperature drift hit them alike; latency p50/p95 pool the rounds' samples and the energy
CV is over the rounds' windows. Energy per query is a window's energy per call divided by the batch.

Results merge into ``--results`` (JSON), so the models can be run one command at a time, and the
``BENCHMARKS.md`` section is rendered from everything merged so far. Only torch, transformers,
numpy and (optionally) ``nvidia-ml-py`` are imported: no gymnasium, Ray or Hydra.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.bench.harness import Benchmark

SECTION = "GPU: 2:4 sparsity, layer skipping and MLP slicing"
BENCH = Benchmark("experiments.bench.gpu", __doc__, output_aliases=("--benchmarks",))
DEFAULT_RESULTS = Path("outputs") / "bench_gpu" / "results.json"

# Real configurations (public config.json values); the benchmark initialises them randomly.
CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """Device, driver and library versions (pynvml is optional)."""
    import transformers

    idx = torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    env: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(idx),
        "capability": f"{cap[0]}.{cap[1]}",
        "memory_gib": round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "driver": None,
        "nvml": None,
    }
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        env["cusparselt"] = cusparselt.version()
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        env["nvml"] = getattr(pynvml, "__version__", "present")
        handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        env["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
    except Exception as exc:  # missing package, no driver access: recorded, not fatal
        env["nvml_error"] = f"{type(exc).__name__}: {exc}"
    return env


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- measuring
def measure_round_robin(
    meter: Any, variants: dict[str, Callable[[], Any]], *, tokens: int, rounds: int
) -> dict[str, list[Any]]:
    """Measure every variant ``rounds`` times, interleaved; returns the Measurements per variant."""
    out: dict[str, list[Any]] = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in variants.items():
                out[name].append(meter.measure(fn, tokens=tokens))
    return out


def summarise(ms: Sequence[Any], queries: int) -> dict[str, Any]:
    """Pool a variant's rounds: latency over all samples, energy per query with its CV over rounds."""
    from envs.measure.meters import combine

    pooled = combine(ms)
    energies = [m.energy_j / queries for m in ms if m.energy_j is not None]
    mean_e = statistics.fmean(energies) if energies else None
    cv_e = statistics.stdev(energies) / mean_e if len(energies) > 1 and mean_e else None
    return {
        "p50_ms": pooled.latency_p50_s * 1e3,
        "p95_ms": pooled.latency_p95_s * 1e3,
        "latency_cv": pooled.latency_cv,
        "samples": pooled.repeats,
        "tokens_per_s": pooled.throughput_tok_s,
        "energy_j_per_query": mean_e,
        "energy_cv": cv_e,
        "energy_source": pooled.energy_source,
        "energy_meter": pooled.energy_meter,
        "energy_calls": pooled.energy_calls,
        "peak_mem_gib": None if pooled.peak_memory_bytes is None else pooled.peak_memory_bytes / 2**30,
        "device": pooled.device,
        "noisy": pooled.noisy,
    }


# ---------------------------------------------------------------------------------------- per linear
def bench_linears(
    model: str, dtype_name: str, token_counts: Sequence[int], meter: Any, rounds: int, backend: str | None
) -> list[dict[str, Any]]:
    """Dense vs 2:4 for the MLP linears of ``model``'s shape and for the whole MLP block."""
    import torch.nn.functional as F

    from envs.runtime.semistructured import default_backend, prune_2_4, to_sparse

    cfg = CONFIGS[model]
    D, inter = cfg["hidden_size"], cfg["intermediate_size"]
    dtype = DTYPES[dtype_name]
    backend = backend or default_backend()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {
        "gate": torch.randn(inter, D, device="cuda", dtype=dtype, generator=g) * 0.02,
        "up": torch.randn(inter, D, device="cuda", dtype=dtype, generator=g) * 0.02,
        "down": torch.randn(D, inter, device="cuda", dtype=dtype, generator=g) * 0.02,
    }
    sp = {k: to_sparse(prune_2_4(v), backend) for k, v in w.items()}
    rows = []
    for n in token_counts:
        x = torch.randn(n, D, device="cuda", dtype=dtype, generator=g)
        a = torch.randn(n, inter, device="cuda", dtype=dtype, generator=g)

        def mlp(ws: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
            return F.linear(F.silu(F.linear(x, ws["gate"])) * F.linear(x, ws["up"]), ws["down"])

        cases = {
            f"gate/up [{inter}x{D}]": (lambda x=x: F.linear(x, w["up"]), lambda x=x: F.linear(x, sp["up"])),
            f"down [{D}x{inter}]": (lambda a=a: F.linear(a, w["down"]), lambda a=a: F.linear(a, sp["down"])),
            "MLP block (3 linears)": (lambda: mlp(w), lambda: mlp(sp)),
        }
        for label, (dense_fn, sparse_fn) in cases.items():
            res = measure_round_robin(meter, {"dense": dense_fn, "2:4": sparse_fn}, tokens=n, rounds=rounds)
            d, s = summarise(res["dense"], n), summarise(res["2:4"], n)
            rows.append(
                {
                    "kind": "linear",
                    "model": model,
                    "dtype": dtype_name,
                    "tokens": n,
                    "linear": label,
                    "backend": backend,
                    "dense": d,
                    "two_four": s,
                    "speedup": d["p50_ms"] / s["p50_ms"],
                }
            )
            print(
                f"[linear] {model} {dtype_name} {n:>6} tok {label:<24} dense {d['p50_ms']:.4f} ms  "
                f"2:4 {s['p50_ms']:.4f} ms  x{rows[-1]['speedup']:.2f}",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------- end to end
def build_model(model: str, dtype: torch.dtype) -> Any:
    """A randomly initialised Llama of ``model``'s real configuration, on the GPU, wrapped in SparseLM."""
    import transformers as tf

    from envs.runtime.sparse_lm import SparseLM

    cfg = tf.LlamaConfig(**CONFIGS[model], max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return SparseLM(hf.eval(), name=f"{model}-random-init")


def e2e_plans(slm: Any) -> dict[str, Any]:
    """Dense, 2:4 MLPs everywhere, and layer skipping / MLP slicing sized to the 2:4 plan's ideal FLOPs."""
    from envs.runtime.semistructured import two_four_plan

    dense = slm.dense_plan()
    p24 = two_four_plan(dense)
    frac = p24.cost_fraction()
    return {
        "dense": dense,
        "2:4 MLP": p24,
        "layer skip": slm.uniform_plan(layers=frac),
        "MLP slice 50%": slm.uniform_plan(mlp=0.5),
    }


def bench_e2e(
    model: str,
    dtype_name: str,
    batches: Sequence[int],
    seq: int,
    meter: Any,
    rounds: int,
    backend: str | None,
    targets: Sequence[str],
) -> list[dict[str, Any]]:
    """Prefill latency, energy per query and memory of each plan at each batch size."""
    slm = build_model(model, DTYPES[dtype_name])
    t0 = time.perf_counter()
    semi = slm.enable_two_four(method="magnitude", backend=backend, targets=targets)
    prep_s = time.perf_counter() - t0
    plans = e2e_plans(slm)
    rows = []
    vocab = slm.spec.vocab_size
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        variants = {name: (lambda p=p, ids=ids: slm.forward(ids, p, logits="last")) for name, p in plans.items()}
        res = measure_round_robin(meter, variants, tokens=batch * seq, rounds=rounds)
        base = None
        for name, p in plans.items():
            s = summarise(res[name], batch)
            base = s if base is None else base
            row = {
                "kind": "e2e",
                "model": model,
                "dtype": dtype_name,
                "batch": batch,
                "seq": seq,
                "variant": name,
                "ideal_flops": p.cost_fraction(seq),
                "plan": p.describe(),
                "backend": semi.backend,
                "targets": list(semi.targets),
                "prepare_s": prep_s,
                "two_four_gib": semi.nbytes() / 2**30,
                **s,
                "speedup": base["p50_ms"] / s["p50_ms"],
                "energy_ratio": (
                    s["energy_j_per_query"] / base["energy_j_per_query"]
                    if s["energy_j_per_query"] and base["energy_j_per_query"]
                    else None
                ),
            }
            rows.append(row)
            print(
                f"[e2e] {model} {dtype_name} b{batch} {name:<14} p50 {s['p50_ms']:.2f} ms x{row['speedup']:.2f}  "
                f"E/query {_fmt(s['energy_j_per_query'], '.4f')} J (CV {_pct(s['energy_cv'])})",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------- report
def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def merge(path: Path, env: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``rows`` into the results file (same key: replaced), refusing results from another GPU."""
    data: dict[str, Any] = {"environment": env, "rows": []}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("environment", {}).get("gpu") not in (None, env["gpu"]):
            raise SystemExit(
                f"{path} holds results from {old['environment']['gpu']}, not {env['gpu']}; "
                "pass another --results file so that devices are not mixed"
            )
        data["rows"] = old.get("rows", [])

    def key(r: dict[str, Any]) -> tuple:
        return (r["kind"], r["model"], r["dtype"], r.get("tokens"), r.get("linear"), r.get("batch"), r.get("variant"))

    new = {key(r) for r in rows}
    data["rows"] = [r for r in data["rows"] if key(r) not in new] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def render(data: dict[str, Any], args: argparse.Namespace) -> str:
    """The BENCHMARKS.md section body."""
    from experiments.report import markdown_table

    env = data["environment"]
    rows = data["rows"]
    lines = [
        f"GPU: {env['gpu']} (compute capability {env['capability']}, {env['memory_gib']} GiB), driver "
        f"{env.get('driver') or 'n/a'}, CUDA {env['cuda']}, cuSPARSELt {env.get('cusparselt') or 'n/a'}, "
        f"torch {env['torch']}, transformers {env['transformers']}, nvidia-ml-py {env.get('nvml') or 'absent'}"
        + (f", power limit {env['power_limit_w']:.0f} W" if env.get("power_limit_w") else "")
        + ".",
        "",
        "Models are **randomly initialised** from the real configurations of SmolLM2-135M, Llama-3.2-1B and "
        "Llama-3.1-8B (`LlamaConfig`; no weights downloaded): speed does not depend on weight values. 2:4 masks "
        "are by magnitude here. Timings: CUDA events through `envs.measure.meters.Meter(device='cuda')`, variants "
        f"interleaved over {args.rounds} rounds of {args.repeats} timed calls after {args.warmup} warm-ups; "
        "p50/p95 pool the rounds. Energy: NVML counter windows of at least "
        f"{args.energy_window} s per round, per query (one prompt row); CV over the rounds; the 'energy source' "
        "column says 'estimated' where NVML was not available. Results merge over runs into the results JSON.",
    ]
    lin = [r for r in rows if r["kind"] == "linear"]
    if lin:
        lines += ["", "### 2:4 per MLP linear (dense vs 2:4, same inputs)", ""]
        table = [
            [
                r["model"],
                r["dtype"],
                r["tokens"],
                r["linear"],
                r["backend"],
                f"{r['dense']['p50_ms']:.4f}",
                f"{r['two_four']['p50_ms']:.4f}",
                f"{r['two_four']['p95_ms']:.4f}",
                f"{r['speedup']:.2f}x",
            ]
            for r in lin
        ]
        lines.append(
            markdown_table(
                [
                    "model shape",
                    "dtype",
                    "tokens",
                    "linear",
                    "backend",
                    "dense p50 ms",
                    "2:4 p50 ms",
                    "2:4 p95 ms",
                    "speedup",
                ],
                table,
            )
        )
    e2e = [r for r in rows if r["kind"] == "e2e"]
    if e2e:
        lines += ["", f"### End to end: prefill of {e2e[0]['seq']} tokens per row, logits of the last position", ""]
        table = [
            [
                r["model"],
                r["dtype"],
                r["batch"],
                r["variant"],
                f"{r['ideal_flops']:.2f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p95_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                _fmt(r["energy_j_per_query"], ".4f"),
                _pct(r["energy_cv"]),
                _fmt(r["energy_ratio"], ".2f"),
                r["energy_source"] or "off",
                _fmt(r["peak_mem_gib"], ".1f"),
            ]
            for r in e2e
        ]
        lines.append(
            markdown_table(
                [
                    "model (random init)",
                    "dtype",
                    "batch",
                    "plan",
                    "ideal FLOPs",
                    "p50 ms",
                    "p95 ms",
                    "speedup",
                    "J/query",
                    "energy CV",
                    "energy vs dense",
                    "energy source",
                    "peak GiB",
                ],
                table,
            )
        )
        prep = {(r["model"], r["dtype"]): r for r in e2e if r["variant"] == "2:4 MLP"}
        lines += [
            "",
            "2:4 preparation (prune + convert, once per model): "
            + "; ".join(
                f"{m} {d}: {r['prepare_s']:.1f} s, {r['two_four_gib']:.2f} GiB ({r['backend']})"
                for (m, d), r in prep.items()
            )
            + ".",
            "",
            "Layer skipping is sized to the 2:4 plan's ideal decoder FLOPs and MLP slicing keeps half the channels "
            "(the same ideal MLP FLOPs as 2:4), so the rows compare ways of removing the same work. Targets "
            "(issue 10): >= 1.3x on the MLP linears on an H100; energy per query within a CV of 3%.",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; ``args.command`` is the command line that made the run."""
    p = BENCH.parser()
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="model shapes")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="weight dtypes")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="prefill batch sizes")
    p.add_argument("--seq", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--parts", nargs="+", default=["linear", "e2e"], choices=["linear", "e2e"], help="what to run")
    p.add_argument("--rounds", type=int, default=5, help="measurements per variant (energy CV is over these)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per measurement")
    p.add_argument("--energy-window", type=float, default=0.2, help="minimum NVML window per measurement, seconds")
    p.add_argument("--backend", choices=["cusparselt", "cutlass"], default=None, help="2:4 kernel (default: auto)")
    p.add_argument("--attn", action="store_true", help="also convert the attention projections to 2:4")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON file the results merge into")
    return BENCH.parse(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (2 when there is no suitable GPU)."""
    args = parse_args(argv)
    from envs.runtime.semistructured import SemiStructuredUnsupported, check_semistructured_support

    try:
        check_semistructured_support("cuda", torch.float16)
    except SemiStructuredUnsupported as exc:
        print(f"experiments.bench.gpu: {exc}. Run it on a GPU machine.", file=sys.stderr)
        return 2
    from envs.measure.meters import Meter

    env = environment()
    print(json.dumps(env), flush=True)
    meter = Meter(
        device="cuda", warmup=args.warmup, repeats=args.repeats, energy="auto", energy_window_s=args.energy_window
    )
    # Energy is reported end to end; a single linear's energy window would mostly measure launch overhead.
    lin_meter = Meter(device="cuda", warmup=args.warmup, repeats=args.repeats, energy="off")
    print(f"meter: {meter.describe()}", flush=True)
    targets = ("mlp", "attn") if args.attn else ("mlp",)
    rows: list[dict[str, Any]] = []
    tokens = [b * args.seq for b in args.batches]
    for model in args.models:
        for dt in args.dtypes:
            if "linear" in args.parts:
                rows += bench_linears(model, dt, tokens, lin_meter, args.rounds, args.backend)
                _free()  # the function's tensors are gone once it returns; give the memory back
            if "e2e" in args.parts:
                rows += bench_e2e(model, dt, args.batches, args.seq, meter, args.rounds, args.backend, targets)
                _free()
    # --no-write: this run's rows alone; otherwise everything merged into the results file so far.
    data = {"environment": env, "rows": rows} if args.no_write else merge(args.results, env, rows)
    BENCH.publish(args, SECTION, render(data, args))
    if not args.no_write:
        print(f"merged the results into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
