"""Per-token MLP channel rules vs the static order: agreement with dense greedy decoding at equal decode latency.

Usage: ``python -m experiments.bench.activation [--quick] [--prompts 16] [--tokens 32] [--allocation NAME]``.

Every rule (``static``, ``gate``, ``input``, ``predicted``, ``input_attn``;
:data:`envs.runtime.plan.MLP_RULES`) runs every layer's MLP at keep 0.75 / 0.5 / 0.25 (static also
at 0.6, 0.4, 0.35 and 0.1, and with the least important third or two thirds of the attention heads
dropped, to draw its curve; the other rules also at 0.15, so that their curves can reach 70% of
dense decode latency, and ``input_attn``, whose attention projections read the same share of their
inputs, at 0.6, 0.45, 0.4, 0.35 and 0.3, around where its curve crosses 70% and 85%), decoding
``--tokens`` tokens after val news prompts and after the generation (exact-match) items of the val
split. Decoding is teacher-forced on the dense model's greedy tokens, so every
plan sees the same context and agreement is the share of steps whose argmax equals the dense
token. Every decode step runs every plan once, in a shuffled order, so load from elsewhere hits
all plans alike; a plan's latency fraction is its decode time over the dense model's, per prompt,
and the table reports the median of those and a bootstrap 95% CI over prompts. Pruned layers
decode through fused kernels (:mod:`envs.runtime.kernels`; static layers too, so that rules and
static plans are timed alike), and the dense model is timed both as the untouched model and with
its MLPs through the same kernel (``dense (fused kernel)``, :attr:`SparseLM.fused_full_mlp`); the
faster of the two is the reference, so no plan gains from a kernel the dense model was denied. For
the same reason every plan but the untouched ``dense`` runs its attention projections as the rows
of transposed copies (:attr:`SparseLM.fused_attention`; the static plans that drop heads too), the
form ``input_attn`` reads its kept entries in, about twice as fast as PyTorch's matmuls there, and
its LM head likewise (:attr:`SparseLM.fused_head`): every plan pays the head alike, and the faster
it runs, the larger the share of the step a plan can save.

With a layer allocation (``--allocation``, default ``<model>-alloc`` from ``python -m
experiments.allocate``; ``none`` to leave it out), every rule it has a table for also runs as
``rule+alloc@mean``: the mean keep shared among the layers at the least summed per-layer KL
(:mod:`envs.runtime.allocation`). The reference every rule is judged against is then the best of
the static curves, uniform and allocated, so that no rule wins by an allocation static lacked.

The curves are upper hulls (random mixtures of the points, dense included), compared at 70% and
85% of dense decode latency; "÷ ideal" is the realised decode speedup over the FLOPs speedup
(decoder + LM head for one token, selection and predictor included). The predictor's recall of the
true per-token top-k (by ``|act|``) is measured on val news tokens.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.frontier import interp_frontier, oracle_frontier, upper_hull
from envs.data.corpus import natural_text
from envs.data.files import atomic_write_json
from envs.runtime.allocation import LayerAllocation, default_allocation_name, load_allocation
from envs.runtime.plan import MLP_RULES, SparsityPlan
from envs.runtime.sparse_lm import SparseLM
from experiments.bench.harness import Benchmark, summarize
from experiments.report import REPO_ROOT, markdown_table, save_figure

BENCH = Benchmark("experiments.bench.activation", __doc__, threads=1)
TITLE = "Activation sparsity: which MLP channels, per token"
KEEPS = (0.75, 0.5, 0.25)
STATIC_EXTRA = (0.6, 0.4, 0.35, 0.1)  # more points on the curve every rule is judged against
STATIC_HEADS = ((2 / 3, (0.75, 0.5, 0.25)), (1 / 3, (0.5, 0.25)))  # static attention pruning: (heads, MLP keeps)
RULE_EXTRA = {"input_attn": (0.6, 0.45, 0.4, 0.35, 0.3, 0.15)}  # where a rule's curve crosses 70% and 85% of dense
RULE_EXTRA_DEFAULT = (0.15,)
TARGETS = (0.70, 0.85)
ALLOC = "+alloc"  # suffix of a curve whose mean keep is shared among the layers by a layer allocation
ALLOC_KEEPS = {"static": (0.6, 0.5, 0.4, 0.35, 0.3, 0.25)}  # mean keeps of the allocated plans, per rule
ALLOC_KEEPS_DEFAULT = (0.75, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25)


FUSED_DENSE = "dense (fused kernel)"  # the dense plan with SparseLM.fused_full_mlp: its MLPs by the rules' kernel


def bench_plans(slm: SparseLM, rules: list[str], allocation: LayerAllocation | None = None) -> dict[str, SparsityPlan]:
    """The plans of the benchmark by name: dense (two ways), then ``rule@keep`` for every rule and keep.

    With an ``allocation``, also ``rule+alloc@mean`` for every rule it has a table for: the mean
    keep shared among the layers as the allocation says (:meth:`LayerAllocation.plan`).
    """
    plans = {"dense": slm.dense_plan(), FUSED_DENSE: slm.dense_plan()}
    for rule in rules:
        extra = STATIC_EXTRA if rule == "static" else RULE_EXTRA.get(rule, RULE_EXTRA_DEFAULT)
        for k in sorted({*KEEPS, *extra}, reverse=True):
            plans[f"{rule}@{k:g}"] = SparsityPlan.uniform(slm.spec, slm.importance, mlp=k, mlp_rule=rule)
        if rule == "static":  # input_attn prunes attention's work too: static drops heads, by importance
            for heads, keeps in STATIC_HEADS:
                for k in keeps:
                    plan = SparsityPlan.uniform(slm.spec, slm.importance, heads=heads, mlp=k)
                    plans[f"static@{k:g} heads {heads:.2f}"] = plan
    for rule in rules:
        if allocation is not None and rule in allocation.rules:
            for k in ALLOC_KEEPS.get(rule, ALLOC_KEEPS_DEFAULT):
                plans[f"{rule}{ALLOC}@{k:g}"] = allocation.plan(slm, rule, k)
    return plans


def curve_of(name: str) -> str:
    """The curve a plan belongs to: ``dense``, a rule, or a rule with :data:`ALLOC`."""
    return "dense" if name in ("dense", FUSED_DENSE) else name.split("@")[0]


def curve_rule(curve: str) -> str:
    """The MLP rule of a curve (``static+alloc`` → ``static``)."""
    return curve.removesuffix(ALLOC)


def _value(v: float, ref: float | None = None, ci: tuple[float, float] | None = None) -> str:
    """A hull value for the comparison table, with its gap to ``ref`` and the gap's CI when given."""
    if np.isnan(v):
        return "not reached"
    if ref is None:
        return f"{v:.3f}"
    ci_txt = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return f"{v:.3f} ({v - ref:+.3f}{ci_txt})"


def prompts(slm: SparseLM, n_news: int, n_items: int, prompt_tokens: int) -> list[tuple[str, list[int]]]:
    """Val news prompts (their first ``prompt_tokens`` tokens) and the prompts of val exact-match items."""
    from envs.tasks.mixes import load_mix

    tok = slm.tokenizer
    out = [("news", tok(d)["input_ids"][:prompt_tokens]) for d in natural_text("val")[:n_news]]
    if n_items:
        items = [it for it in load_mix("exact", split="val", n=4 * n_items, seed=0) if it.kind == "exact"]
        out += [("item", tok(it.prompt)["input_ids"]) for it in items[:n_items]]
    return [(kind, ids) for kind, ids in out if len(ids) >= 2]


def head_flops(slm: SparseLM) -> float:
    """LM-head FLOPs for one token (every decode step pays it, whatever the plan)."""
    return 2.0 * slm.spec.hidden_size * slm.spec.vocab_size


def use_kernels(slm: SparseLM, name: str | None) -> None:
    """Set ``slm``'s decode forms for plan ``name`` (``None``: back to the defaults).

    Every plan but the untouched ``dense`` reads its attention projections and LM head from
    transposed copies and runs its whole MLPs (``FUSED_DENSE``'s, an allocated plan's dense
    layers) through the fused kernel.
    """
    slm.fused_full_mlp = name not in ("dense", None)  # FUSED_DENSE, and the whole layers of allocated plans
    slm.fused_attention = slm.fused_head = name not in ("dense", None)


def run_prompt(
    slm: SparseLM, plans: dict[str, SparsityPlan], ids: list[int], tokens: int, rng: random.Random
) -> tuple[dict[str, float], dict[str, int], int]:
    """Decode ``tokens`` teacher-forced steps after ``ids`` under every plan, interleaved step by step.

    Returns:
        Decode seconds per plan (the timed steps), agreeing steps per plan, and the number of steps.
    """
    prompt = torch.tensor([ids])
    dense = slm.generate(prompt, slm.dense_plan(), max_new_tokens=tokens)[0, len(ids) :].tolist()
    caches = {name: slm.new_cache() for name in plans}
    agree = dict.fromkeys(plans, 0)
    secs = dict.fromkeys(plans, 0.0)
    try:
        for name, plan in plans.items():  # prefill, untimed
            use_kernels(slm, name)
            out = slm(prompt, plan, cache=caches[name], logits="last")
            agree[name] += int(out.logits[0, -1].argmax()) == dense[0]
        order = list(plans)
        for j in range(len(dense) - 1):
            step = torch.tensor([[dense[j]]])
            rng.shuffle(order)
            for name in order:
                use_kernels(slm, name)
                t0 = time.perf_counter()
                out = slm(step, plans[name], cache=caches[name], logits="last")
                secs[name] += time.perf_counter() - t0
                agree[name] += int(out.logits[0, -1].argmax()) == dense[j + 1]
    finally:
        use_kernels(slm, None)
    return secs, agree, len(dense)


def bootstrap_ci(values: np.ndarray, stat=np.median, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of ``stat`` over the rows of ``values``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    boots = np.array([stat(values[i]) for i in idx])
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def predictor_figures(slm: SparseLM, n_docs: int, tokens: int, repeats: int) -> dict[str, object]:
    """Recall of the true per-token top-k on val news, and the predictor's cost as a share of one layer."""
    from envs.runtime.predictor import recall

    docs = natural_text("val")[:n_docs]
    seqs = [torch.tensor(slm.tokenizer(d)["input_ids"][:tokens]) for d in docs]
    rec = recall(slm.predictor, slm, seqs, fractions=KEEPS)
    s = slm.spec
    dense_layer = SparsityPlan.dense(s).flops(1, 64)["total"] / s.num_layers
    x = torch.randn(1, s.hidden_size)
    t_pred = summarize([_timed(lambda: slm.predictor.scores(0, x)) for _ in range(repeats)]).p50
    cache = slm.new_cache()
    slm(torch.randint(0, s.vocab_size, (1, 64)), None, cache=cache, logits="none")
    snap = cache.snapshot()

    def dense_step() -> None:
        cache.restore(snap)
        slm(torch.tensor([[1]]), None, cache=cache, logits="none")

    t_layer = summarize([_timed(dense_step) for _ in range(max(repeats // 20, 5))]).p50 / s.num_layers
    return {
        "recall": rec,
        "flops_share": slm.predictor.flops_per_token() / dense_layer,
        "time_share": t_pred / t_layer,
        "rank": slm.predictor.rank,
    }


def hull_gap_ci(
    lat: np.ndarray,
    agr: np.ndarray,
    w: np.ndarray,
    rule_cols: list[int],
    static_cols: list[int],
    targets: tuple[float, ...] = TARGETS,
    n: int = 2000,
    seed: int = 0,
) -> list[tuple[float, float] | None]:
    """Paired bootstrap over prompts of (rule's upper hull − static's) at each target latency.

    Each resample draws prompts with replacement and recomputes, from them alone, every plan's
    median latency fraction and weighted agreement, both hulls and their gap: the spread of the
    headline comparison that comes from which prompts were measured.

    Args:
        lat: ``[prompts, plans]`` latency ÷ dense.
        agr: ``[prompts, plans]`` agreement.
        w: Per-prompt weights (scored steps).
        rule_cols: Columns of the rule's plans and dense.
        static_cols: Columns of the static plans and dense.
        targets: Latency fractions.
        n: Resamples.
        seed: Random seed.

    Returns:
        Per target, the 2.5 and 97.5 percentiles of the gap, or None where over 5% of the resamples
        leave either hull short of the target.
    """
    rng = np.random.default_rng(seed)
    gaps = np.full((n, len(targets)), np.nan)
    t = np.array(targets)
    for b in range(n):
        idx = rng.integers(0, lat.shape[0], lat.shape[0])
        ml, wb = np.median(lat[idx], axis=0), w[idx] / w[idx].sum()
        ma = (agr[idx] * wb[:, None]).sum(0)
        vr = interp_frontier(*upper_hull(ml[rule_cols], ma[rule_cols]), t)
        vs = interp_frontier(*upper_hull(ml[static_cols], ma[static_cols]), t)
        gaps[b] = vr - vs
    out: list[tuple[float, float] | None] = []
    for j in range(len(targets)):
        g = gaps[:, j]
        ok = g[~np.isnan(g)]
        out.append(None if len(ok) < 0.95 * n else (float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables, write BENCHMARKS.md and a plot."""
    p = BENCH.parser()
    p.add_argument("--model", default="smollm2-135m", help="model name, folder or hub id (default: embedded)")
    p.add_argument("--predictor", default=None, help="channel predictor name or folder (default: <model>-r64)")
    p.add_argument(
        "--allocation",
        default=None,
        help="layer allocation name or folder for the rule+alloc curves (default: <model>-alloc, made by "
        "`python -m experiments.allocate`); 'none' leaves them out",
    )
    p.add_argument("--prompts", type=int, default=16, help="val news prompts")
    p.add_argument("--items", type=int, default=8, help="val generation (exact-match) items")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per prompt")
    p.add_argument("--prompt-tokens", type=int, default=48, help="tokens of each news prompt")
    p.add_argument("--rules", nargs="+", default=list(MLP_RULES), choices=MLP_RULES, help="rules to compare")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 1 item, 6 tokens; writes no plot")
    args = BENCH.parse(p, argv)
    if args.quick:
        args.prompts, args.items, args.tokens = 2, 1, 6
        args.no_write = args.no_write or args.output is None
    if args.prompts < 1 or args.items < 0 or args.tokens < 2 or args.prompt_tokens < 2:
        p.error("prompts must be >= 1, items >= 0, tokens and prompt-tokens >= 2")
    if "static" not in args.rules:
        p.error("--rules must include static: the other rules are compared against its curve")

    # A predictor other than the model's default gets a section, plot and raw file of its own.
    other = args.predictor not in (None, f"{args.model}-r64") and "predicted" in args.rules
    title = f"{TITLE} (predictor {Path(args.predictor).name})" if other else TITLE
    stem = f"bench_activation_{Path(args.predictor).name}" if other else "bench_activation"
    t0 = time.perf_counter()
    slm = SparseLM.from_pretrained(args.model, threads=args.threads)
    allocation = None
    try:  # a missing or foreign predictor or allocation is one line that names the command which makes it
        if "predicted" in args.rules:
            from envs.runtime.predictor import load_predictor

            slm.set_predictor(load_predictor(args.predictor or f"{args.model}-r64", slm))
        if args.allocation != "none":
            allocation = load_allocation(args.allocation or default_allocation_name(args.model), slm)
    except ValueError as exc:
        p.error(str(exc))
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads", flush=True)
    plans = bench_plans(slm, args.rules, allocation)
    rng = random.Random(0)
    todo = prompts(slm, args.prompts, args.items, args.prompt_tokens)
    names = list(plans)
    lat = np.zeros((len(todo), len(names)))
    agr = np.zeros((len(todo), len(names)))
    steps = np.zeros(len(todo))
    step_ms: dict[str, list[float]] = {n: [] for n in names}
    run_prompt(slm, plans, todo[0][1][:8], 3, random.Random(0))  # untimed: compiles kernels, builds weight copies
    for r, (_, ids) in enumerate(tqdm(todo, desc="prompts")):
        secs, agree, n = run_prompt(slm, plans, ids, args.tokens, rng)
        steps[r] = n
        base = min(secs["dense"], secs[FUSED_DENSE])  # the faster way to run the dense model
        for c, name in enumerate(names):
            lat[r, c] = secs[name] / base
            agr[r, c] = agree[name] / n
            step_ms[name].append(secs[name] / max(n - 1, 1) * 1e3)

    # ---------------------------------------------------------------- figures
    w = steps / steps.sum()
    mean_agree = (agr * w[:, None]).sum(0)
    med_lat = np.median(lat, axis=0)
    head = head_flops(slm)
    past = int(np.mean([len(ids) for _, ids in todo])) + args.tokens // 2
    dense_fl = SparsityPlan.dense(slm.spec).flops(1, past)["total"] + head
    pf = 0.0 if slm.predictor is None else slm.predictor.flops_per_token()
    dense_split = SparsityPlan.dense(slm.spec).flops(1, past)
    rows, pts = [], {}
    curves = list(dict.fromkeys(["static", *args.rules, *(curve_of(n) for n in names if ALLOC in n)]))
    cols: dict[str, list[int]] = {}  # each rule's plans (and the dense ones), as columns of lat and agr
    for c, name in enumerate(names):
        plan = plans[name]
        rule = curve_of(name)
        fl = plan.flops(1, past, predictor_flops=pf)
        ideal = dense_fl / (fl["total"] + head)
        realised = 1.0 / med_lat[c]
        lo, hi = bootstrap_ci(lat[:, c])
        alo, ahi = bootstrap_ci(agr[:, c], stat=np.mean)
        s = summarize(step_ms[name])
        rows.append(
            [
                name,
                f"{fl['mlp'] / dense_split['mlp']:.2f}",
                f"{fl['attention'] / dense_split['attention']:.2f}",
                f"{s.p50:.1f}",
                f"{med_lat[c]:.3f} [{lo:.3f}, {hi:.3f}]",
                f"{realised:.2f}× / {ideal:.2f}×",
                "—" if name == "dense" else f"{realised / ideal:.0%}" if ideal > 1 else "—",
                f"{mean_agree[c]:.3f} [{alo:.3f}, {ahi:.3f}]",
            ]
        )
        for r_ in curves:
            if rule in (r_, "dense"):
                pts.setdefault(r_, []).append((med_lat[c], mean_agree[c]))
                cols.setdefault(r_, []).append(c)
    table = markdown_table(
        [
            "plan (rule@MLP keep)",
            "MLP FLOPs",
            "attention FLOPs",
            "decode step p50 ms",
            "latency ÷ dense [95% CI]",
            "speedup realised / ideal",
            "÷ ideal",
            "agreement [95% CI]",
        ],
        rows,
    )
    hulls = {r_: upper_hull(*map(np.array, zip(*v, strict=True))) for r_, v in pts.items()}
    at = {r_: interp_frontier(hx, hy, np.array(TARGETS)) for r_, (hx, hy) in hulls.items()}
    # The reference: every static plan, uniform or allocated, so that no rule wins by an allocation static lacked.
    ref_cols = sorted({c for r_ in curves if curve_rule(r_) == "static" for c in cols[r_]})
    ref_at = interp_frontier(*upper_hull(med_lat[ref_cols], mean_agree[ref_cols]), np.array(TARGETS))
    cmp_rows = []
    for r_ in curves:
        if r_ == "static" and len(ref_cols) == len(cols["static"]):
            cmp_rows.append([r_, *[_value(v) for v in ref_at]])
            continue
        cis = hull_gap_ci(lat, agr, w, cols[r_], ref_cols) if curve_rule(r_) != "static" else [None] * len(TARGETS)
        cmp_rows.append([r_, *[_value(at[r_][j], ref_at[j], cis[j]) for j in range(len(TARGETS))]])
    if len(ref_cols) > len(cols["static"]):
        cmp_rows.append(["best static (hull of every static plan: the reference)", *[_value(v) for v in ref_at]])
    # Every rule's plans together: the best mixture of any of them, and the per-prompt hindsight choice.
    every = upper_hull(med_lat, mean_agree)
    ox, oy = oracle_frontier(agr, med_lat)
    for label, (hx, hy) in (
        ("any rule (mixture of every plan)", every),
        ("per-prompt choice of any plan (hindsight oracle)", (ox, oy)),
    ):
        v = interp_frontier(hx, hy, np.array(TARGETS))
        cmp_rows.append(
            [
                label,
                *[_value(x, ref_at[j]) for j, x in enumerate(v)],
            ]
        )
    cmp = markdown_table(
        ["rule", *[f"agreement at {t:.0%} of dense decode latency (vs static)" for t in TARGETS]], cmp_rows
    )
    best = max(
        (r_ for r_ in curves if curve_rule(r_) != "static"),
        key=lambda r_: np.nan_to_num(at[r_][0], nan=-1),
        default=None,
    )
    verdict = ""
    if best is not None:
        gain = at[best][0] - ref_at[0]
        met = bool(np.nan_to_num(gain, nan=-1.0) >= 0.10)
        head_ = "Goal (best rule ≥ best static + 0.10 at 70% of dense decode latency): "
        if np.isnan(ref_at[0]):
            verdict = head_ + "the static curve does not reach 70% of dense decode latency → **not met**.\n\n"
        elif np.isnan(gain):
            cheapest = min(p_[0] for r_ in curves if curve_rule(r_) != "static" for p_ in pts[r_])
            verdict = head_ + (
                f"no rule reaches 70% of dense decode latency (the cheapest rule plan runs at {cheapest:.3f}) "
                "→ **not met**.\n\n"
            )
        else:
            verdict = head_ + f"best is `{best}` at {gain:+.3f} → **{'met' if met else 'not met'}**.\n\n"
    pred_txt = ""
    if slm.predictor is not None:
        pf_ = predictor_figures(slm, 4 if args.quick else 16, 128, 50 if args.quick else 400)
        rec = ", ".join(f"{k:.0%} kept: {v:.3f}" for k, v in pf_["recall"].items())
        pred_txt = (
            f"Predictor (rank {pf_['rank']}): recall of the true per-token top-k on val news tokens — {rec}; "
            f"cost per token and layer {pf_['flops_share']:.1%} of a dense layer's decode FLOPs, "
            f"{pf_['time_share']:.1%} of its measured decode time.\n\n"
        )
    alloc_txt = ref_txt = ""
    if allocation is not None:
        tr = allocation.card.get("training") or {}
        alloc_txt = (
            f"`rule+alloc@mean`: the mean MLP keep shared among the layers by the layer allocation "
            f"`{allocation.name}` (per-layer KL from dense measured on {tr.get('scored_positions')} positions of "
            f"{tr.get('documents')} train news documents; `python -m experiments.allocate`). "
            + "; ".join(
                f"`{r}` (floor {allocation.floors[r]:g} × mean) at mean {k:g}: "
                + " ".join(f"{x:.2f}" for x in allocation.keeps(r, k))
                for r in allocation.rules
                if r in args.rules
                for k in (0.3,)
            )
            + " (keeps of layers 0 to L−1).\n\n"
        )
        ref_txt = "every gap is to the best static curve, the hull of every static plan, uniform and allocated; "
    body = (
        f"Model `{args.model}`, fp32, {args.threads} thread(s) (the fused decode kernels run in one "
        f"thread, so every plan gets one), batch 1, KV cache. {len(todo)} prompts "
        f"({sum(k == 'news' for k, _ in todo)} val news of ≤{args.prompt_tokens} tokens, "
        f"{sum(k == 'item' for k, _ in todo)} val exact-match items), {args.tokens} teacher-forced decode steps each "
        f"({int(steps.sum())} scored tokens per plan); every step runs every plan in a shuffled order. "
        "Latency ÷ dense: median over prompts of the plan's decode time over the dense model's in the same steps, "
        "the dense model run the faster of two ways: as the untouched model (PyTorch matmuls, `dense`) or with its "
        "MLPs through the fused kernel the pruned layers run (`dense (fused kernel)`), so that no plan gains from "
        "a kernel the dense model was denied; for the same reason every plan but `dense` runs its attention "
        "projections and its LM head as sums of the rows of transposed copies, the form `input_attn` reads its "
        "kept entries in. "
        "Agreement: share of steps whose argmax is the dense greedy token (CI: bootstrap over prompts). "
        "MLP and attention FLOPs: relative to dense, "
        "selection and predictor included (`input_attn` also sparsifies the inputs of the attention projections; "
        "`static@k heads 0.67` also drops the least important third of every layer's attention heads). "
        "The prompt runs under the plan too (untimed; prompts longer than "
        f"{SparseLM.sparse_rows} tokens run the rules in the masked form).\n\n"
        f"{alloc_txt}{table}\n\nAt equal measured decode latency (upper hulls: random mixtures of each rule's "
        f"points and dense; {ref_txt}in brackets the 95% CI of the gap to it, paired bootstrap over prompts):\n\n"
        f"{cmp}\n\n{verdict}{pred_txt}"
        + ("" if args.quick else f"![agreement vs decode latency](reports/{stem}.png)\n")
    )
    BENCH.publish(args, title, body)
    if not (args.quick or args.no_write):
        _plot(pts, hulls, REPO_ROOT / "reports" / f"{stem}.png")
        raw = {
            "command": BENCH.command(argv if argv is not None else sys.argv[1:]),
            "plans": names,
            "prompts": [kind for kind, _ in todo],
            "steps": steps.tolist(),
            "latency_fraction": lat.tolist(),
            "agreement": agr.tolist(),
            "step_ms": step_ms,
        }
        atomic_write_json(REPO_ROOT / "reports" / f"{stem}.json", raw)


def _plot(pts: dict, hulls: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rule, v in pts.items():
        x, y = zip(*v, strict=True)
        line = ax.plot(*hulls[rule], lw=1.5, label=rule)[0]
        ax.scatter(x, y, s=18, color=line.get_color())
    for t in TARGETS:
        ax.axvline(t, color="grey", lw=0.7, ls=":")
    ax.set_xlabel("decode latency ÷ dense (median over prompts)")
    ax.set_ylabel("agreement with dense greedy tokens")
    ax.set_title("Which channels, per token: agreement at equal decode latency")
    ax.legend()
    print(f"plot: {save_figure(fig, path)}")


if __name__ == "__main__":
    main()
