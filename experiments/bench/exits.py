"""Per-token exits in decoding (CALM): decode latency saved at a token agreement with dense greedy decoding.

Usage: ``python -m experiments.bench.exits [--quick] [--prompts 24] [--tokens 32] [--model NAME]``.

After each of ``--prompts`` val news prompts the dense model's greedy continuation of ``--tokens``
tokens is decoded teacher-forced (every configuration sees the same context) by the dense model
and by CALM's per-token exit (:func:`envs.runtime.staged.exit_forward`: after every
``--every`` layers the next-token distribution over the lens vocabulary is read, and the token
stops once its top-1 minus top-2 probability reaches the threshold) at a sweep of thresholds.
Every decode step runs every configuration once, in a shuffled order; a configuration's latency
is its decode time over the dense one's in the same steps (median over prompts), readouts included.
Agreement is the share of steps whose argmax is the dense greedy token. The readout table gives,
for each exit depth, how often the lens's argmax there is already the final dense token. With
``--exit-maps`` every readout and exit answers through the model's exit maps
(:mod:`envs.runtime.exit_maps`).
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from tqdm import tqdm

from envs.runtime.sparse_lm import KVCache, SparseLM
from envs.runtime.staged import TokenExit, exit_forward
from experiments.bench.activation import prompts
from experiments.bench.harness import Benchmark
from experiments.report import markdown_table

BENCH = Benchmark("experiments.bench.exits", __doc__, threads=1)
TITLE = "Per-token exits in decoding (CALM)"
THRESHOLDS = (0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
AGREE = 0.95


def _lens_by_depth(slm: SparseLM, ids: list[int], dense: list[int], exits: tuple[int, ...]) -> np.ndarray:
    """Per exit depth, how many teacher-forced steps' full-head argmax there equals the final dense token."""
    hits = np.zeros(len(exits))
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int, name: str, t: torch.Tensor) -> None:
        if name == "layer_out" and i + 1 in exits:
            seen[i + 1] = t[0, -1]

    cache = slm.new_cache()
    slm(torch.tensor([ids]), None, cache=cache, logits="none")
    for j in range(len(dense) - 1):
        seen.clear()
        slm(torch.tensor([[dense[j]]]), None, cache=cache, logits="none", observer=keep)
        for k, e in enumerate(exits):
            hits[k] += int(slm.lm_head(slm.output_norm(seen[e], e - 1)).argmax()) == dense[j + 1]
    return hits


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, print the tables, write BENCHMARKS.md."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model name or prepared model (default: embedded)")
    p.add_argument("--prompts", type=int, default=24, help="val news prompts (default: 24)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per prompt (default: 32)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="tokens of each news prompt (default: 48)")
    p.add_argument("--every", type=int, default=4, help="layers between readouts (default: 4)")
    p.add_argument(
        "--exit-maps",
        default=None,
        metavar="NAME",
        help="exit maps the readouts and exits answer through (python -m experiments.exit_maps; default: none)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 6 tokens; writes nothing")
    args = BENCH.parse(p, argv)
    if args.quick:
        args.prompts, args.tokens = 2, 6
        args.no_write = args.no_write or args.output is None
    if args.prompts < 1 or args.tokens < 2 or args.every < 1:
        p.error("prompts must be >= 1, tokens >= 2, every >= 1")
    slm = SparseLM.from_pretrained(args.model, threads=args.threads)
    if args.exit_maps:
        from envs.runtime.exit_maps import load_exit_maps

        slm.set_exit_maps(load_exit_maps(args.exit_maps, slm), name=args.exit_maps)
    L = slm.spec.num_layers
    exits = tuple(range(args.every, L, args.every))
    rules = {f"exit at margin ≥ {t:g}": TokenExit(exits, t) for t in THRESHOLDS}
    names = ["dense", *rules]
    todo = prompts(slm, args.prompts, 0, args.prompt_tokens)
    rng = random.Random(0)
    lat = np.zeros((len(todo), len(names)))
    agree = np.zeros(len(names))
    depth = np.zeros(len(names))
    lens = np.zeros(len(exits))
    steps = 0
    dense_plan = slm.dense_plan()
    with torch.no_grad():
        for pi, (_, ids) in enumerate(tqdm(todo, desc="prompts")):
            prompt = torch.tensor([ids])
            dense = slm.generate(prompt, dense_plan, max_new_tokens=args.tokens)[0, len(ids) :].tolist()
            lens += _lens_by_depth(slm, ids, dense, exits)
            base = slm.new_cache()
            slm(prompt, dense_plan, cache=base, logits="none")
            caches = {n: KVCache(L, base.length, list(base.layers)) for n in names}
            secs = dict.fromkeys(names, 0.0)
            order = list(names)
            for j in range(len(dense) - 1):
                tok = torch.tensor([[dense[j]]])
                rng.shuffle(order)
                for n in order:
                    t0 = time.perf_counter()
                    if n == "dense":
                        out, d = slm(tok, dense_plan, cache=caches[n], logits="last"), L
                    else:
                        out, d, _ = exit_forward(slm, tok, dense_plan, caches[n], rules[n])
                    secs[n] += time.perf_counter() - t0
                    k = names.index(n)
                    agree[k] += int(out.logits[0, -1].argmax()) == dense[j + 1]
                    depth[k] += d
                steps += 1
            lat[pi] = [secs[n] / secs["dense"] for n in names]
    rows = []
    for k, n in enumerate(names):
        rows.append([n, f"{np.median(lat[:, k]):.3f}", f"{agree[k] / steps:.3f}", f"{depth[k] / steps:.1f}"])
    table = markdown_table(["configuration", "decode latency ÷ dense (median)", "agreement", "mean exit layer"], rows)
    ok = [k for k in range(1, len(names)) if agree[k] / steps >= AGREE]
    best = min(ok, key=lambda k: np.median(lat[:, k])) if ok else None
    saved = 0.0 if best is None else 1 - float(np.median(lat[:, best]))
    lens_row = ["lens argmax = final dense token", *[f"{h / steps:.2f}" for h in lens]]
    lens_tab = markdown_table(["exit after layer", *[str(e) for e in exits]], [lens_row])
    verdict = (
        f"At ≥ {AGREE:.0%} agreement the best threshold is "
        + ("none (no threshold keeps it)" if best is None else f"`{names[best]}`")
        + f": **{saved:.1%} of decode latency saved** (goal on an early-exit-trained model: ≥ 25%)."
    )
    body = (
        f"Model `{args.model}`, fp32, {args.threads} thread(s), batch 1, KV cache. {len(todo)} val news prompts of "
        f"≤{args.prompt_tokens} tokens, {args.tokens} teacher-forced decode steps each ({steps} scored tokens per "
        f"configuration); readouts after every {args.every} layers over the first 2048 token ids"
        + (f", through the exit maps `{args.exit_maps}`" if args.exit_maps else "")
        + f".\n\n{table}\n\n{verdict}\n\nHow good the readout is, per token:\n\n{lens_tab}\n"
    )
    BENCH.publish(args, TITLE + (f" with exit maps {args.exit_maps}" if args.exit_maps else ""), body)


if __name__ == "__main__":
    main()
