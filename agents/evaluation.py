"""Evaluating controllers on held-out inputs: runs, the static sweep, the hull, the oracle and the headline.

Every controller runs live on every input of a ``PruneGym/PerInput`` environment (``cost="measured"``
for the headline): the probe, the decision and the rest of the model are timed on this machine, and
the item is scored against its dense reference. The static sweep is a table of every candidate plan
on every input; the static convex hull (the best random mixture of two static plans) and the
per-input hindsight oracle come from that table.

The headline compares, at fixed fractions of dense latency, each controller family's accuracy with
the static hull's, matched in measured latency: a controller family (e.g. a policy trained at
several reward weights) reaches a latency by mixing its two nearest operating points, exactly as
the hull mixes static plans. A point is "matched" when a real operating point lies within ±2% of
the target; otherwise the interpolated value is marked. Confidence intervals (95%) are paired
bootstraps over inputs.

An exported controller is evaluated through :class:`ExportedController`, which decides with the
controller's own interface (rebuilt from its card) and refuses an environment whose observation
differs from the one the controller was trained on. ``python -m experiments.evaluate`` is the
command line over this module.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.baselines import (
    Context,
    Dense,
    EntropyThreshold,
    PlanController,
    StaticImportance,
    StaticUniform,
)
from agents.frontier import interp_frontier, oracle_frontier, static_hull, upper_hull

SCORINGS = ("dense_relative", "raw")
DEFAULT_TARGETS = (0.70, 0.85)
MATCH_TOL = 0.02
TIMING_ROUNDS = 2  # timing rounds per input in a measured sweep: each plan's best round counts
TIMING_THREADS = 1  # PyTorch threads of each timed run in a measured evaluation (fewer than the cores)


# ---------------------------------------------------------------------------------------- running
def evaluation_env(
    *,
    model: str = "smollm2-135m",
    task: str = "mc",
    split: str = "test",
    n_items: int | None = 48,
    env_kwargs: Mapping[str, Any] | None = None,
    cost: str = "measured",
    timing_threads: int | None = TIMING_THREADS,
    env: str = "PerInput",
) -> Any:
    """A ``PerInput`` environment over a held-out split (unwrapped); measured cost unless told otherwise.

    ``env`` names another environment of :data:`envs.ENVS` (``"Staged"`` for a
    :class:`agents.staged.StagedPass`); ``env_kwargs`` may then say ``discrete``.

    ``cost="calibrated"`` makes an evaluation exactly reproducible (for tests and audits); the
    headline figures use ``"measured"``. Measured runs are timed with ``timing_threads`` PyTorch
    threads (``None``: the process's), whatever the forward uses otherwise: on a machine that other
    processes share, a timed forward with a thread per core waits on whichever thread was
    descheduled, and its latency fractions move with their load (``python -m experiments.bench.latency``).
    """
    from envs import env_id, make_env

    kwargs: dict[str, Any] = {
        "model": model,
        "task": task,
        "split": split,
        "n_items": n_items,
        **dict(env_kwargs or {}),
        "cost": cost,
    }
    if cost == "measured" and timing_threads is not None:
        kwargs["meter"] = {"threads": int(timing_threads), **dict(kwargs.get("meter") or {})}
    discrete = bool(kwargs.pop("discrete", False))
    return make_env(env_id(env, discrete=discrete), **kwargs).unwrapped


def timing_settings(rounds: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """A measured evaluation's timing rounds and timing threads: the given ones, else the defaults.

    One place for the defaults (:data:`TIMING_ROUNDS`, :data:`TIMING_THREADS`), read by the main
    job, ``experiments.evaluate`` and the latency benchmark alike.
    """
    r = TIMING_ROUNDS if rounds is None else int(rounds)
    t = TIMING_THREADS if threads is None else int(threads)
    if r < 1 or t < 1:
        raise ValueError(f"timing rounds and threads must be >= 1, got rounds={r}, threads={t}")
    return r, t


def context(env: Any, item_index: int = -1, prompt_len: int = 0) -> Context:
    """The controller context of ``env`` for input ``item_index`` (a prompt of ``prompt_len`` tokens)."""
    return Context(env.interface, item_index=item_index, prompt_len=prompt_len)


def probe_kwargs(interface: Mapping[str, Any]) -> dict[str, Any]:
    """``PerInput`` arguments that give the probe an interface description names (to evaluate its controller)."""
    obs = interface["observation"]
    probe = obs.get("probe")
    if probe is None:
        raise ValueError(
            f"a {interface.get('kind')} controller observes decoding, not a probe of the prompt: it is evaluated "
            "while generating (agents.adaptive.adaptive_generate), not on PerInput"
        )
    return {
        "probe_layers": int(probe["layers"]),
        "probe_dim": int(probe["proj_dim"]),
        "probe_seed": int(probe["proj_seed"]),
        "ll_positions": int(probe["ll_positions"]),
        "lens_vocab": probe["lens_vocab"],
        "probe_prunable": bool(obs.get("probe_prunable", False)),
    }


@dataclass
class ExportedController:
    """An exported :class:`~agents.controller.Controller` as a plan controller of the evaluation.

    It decides with its own interface (rebuilt from its card: its action map, and for
    ``LayerByLayer`` controllers the per-group decisions), from the evaluation environment's probe
    observation, which must be the probe it was trained on.

    Args:
        controller: The loaded controller.
        env: The evaluation environment (``PerInput``, unwrapped).
        name: Display name.

    Raises:
        ValueError: A per-token controller, or an environment whose probe differs from the controller's.
    """

    controller: Any
    env: Any
    name: str = ""

    def __post_init__(self) -> None:
        mine = self.controller.interface(self.env.slm)
        if self.controller.env_kind not in ("per_input", "layer_by_layer"):
            probe_kwargs(mine.config())  # raises with the explanation
        theirs = self.env.interface.observation_config()
        if mine.observation_config() != theirs:
            raise ValueError(
                f"{self.controller} observes the probe {mine.observation_config()}, the evaluation environment "
                f"computes {theirs}: build the environment with probe_kwargs(card['interface'])"
            )
        self.name = self.name or str(self.controller.card.get("algo"))

    def __call__(self, obs: np.ndarray, ctx: Context) -> Any:
        """The controller's plan for this input."""
        return self.controller.select_plan(obs, ctx.slm, prompt_len=ctx.prompt_len)


RUN_COLUMNS = ("raw", "rel", "lat", "latency_s", "flops")  # a Run's per-input figures, in its field order


@dataclass
class Run:
    """One controller's per-input results.

    Attributes:
        name: Controller name.
        family: Group of operating points that may be mixed (a policy at several reward weights).
        raw: Raw task score per input.
        rel: Dense-relative score per input.
        lat: Latency relative to the dense model on the same input (a measured sweep: over the dense
            plan's mean seconds in the same rounds).
        latency_s: Measured latency in seconds (probe + decision + rest).
        flops: Decoder FLOPs fraction.
        tasks: Task of each input.
        decision_s: Time the controller took to decide, per input.
        extra: Anything else (energy, source).
    """

    name: str
    family: str
    raw: np.ndarray
    rel: np.ndarray
    lat: np.ndarray
    latency_s: np.ndarray
    flops: np.ndarray
    tasks: list[str]
    decision_s: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, list[float]]:
        """The per-input columns :meth:`from_saved` reads back (JSON-ready)."""
        return {k: getattr(self, k).tolist() for k in RUN_COLUMNS}

    @classmethod
    def from_saved(
        cls, summary: Mapping[str, Any], columns: Mapping[str, Sequence[float]], tasks: Sequence[str]
    ) -> Run:
        """The run a saved :meth:`summary` and :meth:`columns` describe (the decision time is its median).

        Raises:
            ValueError: A column whose length is not the number of tasks.
        """
        n = len(tasks)
        cols = [np.asarray(columns[k], float) for k in RUN_COLUMNS]
        if any(len(c) != n for c in cols):
            raise ValueError(f"run {summary['name']!r} holds {len(cols[0])} inputs, not {n}")
        run = cls(summary["name"], summary["family"], *cols, list(tasks), np.full(n, summary["decision_ms"] / 1e3))
        own = run.summary()  # what summary() computes from the columns; the rest of it was the run's extra
        run.extra = {k: v for k, v in summary.items() if k not in own}
        return run

    def summary(self) -> dict[str, Any]:
        """Means and latency percentiles."""
        return {
            "name": self.name,
            "family": self.family,
            "n": len(self.raw),
            "accuracy_raw": float(self.raw.mean()),
            "accuracy_dense_relative": float(self.rel.mean()),
            "latency_fraction": float(self.lat.mean()),
            "latency_p50_ms": float(np.median(self.latency_s) * 1e3),
            "latency_p95_ms": float(np.percentile(self.latency_s, 95) * 1e3),
            "flops_fraction": float(self.flops.mean()),
            "decision_ms": float(np.median(self.decision_s) * 1e3),
            **self.extra,
        }


def run_controller(env: Any, controller: PlanController, n: int, family: str | None = None, desc: str = "") -> Run:
    """Run ``controller`` live on the first ``n`` inputs of ``env``."""
    cols = result_columns()
    for i in tqdm(range(n), desc=desc or controller.name, leave=False):
        obs, info = env.reset(options={"item": i})
        t0 = time.perf_counter()
        plan = controller(obs, context(env, i, info["prompt_tokens"]))
        dec = time.perf_counter() - t0
        _, _, _, _, info = env.step_plan(plan)
        collect(cols, info, dec)
    return run_of(controller.name, family or controller.name, cols)


def result_columns() -> dict[str, list[Any]]:
    """Empty per-input columns of one controller's results (filled by :func:`collect`, read by :func:`run_of`)."""
    return {k: [] for k in ("raw", "rel", "lat", "lat_s", "flops", "task", "dec", "en", "tok", "shared")}


def collect(cols: dict[str, list[Any]], info: Mapping[str, Any], dec: float, shared: bool = False) -> None:
    """Append one input's result (an episode's last info, and the seconds its decisions took) to ``cols``.

    ``shared``: the run's plan on this input was another part's of the same sweep, run and timed once for both.
    """
    cols["raw"].append(info["accuracy_raw"])
    cols["rel"].append(info["accuracy_dense_relative"])
    cols["lat"].append(info["latency_fraction"])
    cols["lat_s"].append(info["latency_s"] + dec)
    cols["flops"].append(info["flops_fraction"])
    cols["task"].append(info["task"])
    cols["dec"].append(dec)
    cols["en"].append(info.get("energy_source"))
    cols["tok"].append(info.get("prompt_tokens", 0))
    cols["shared"].append(bool(shared))


def run_of(name: str, family: str, cols: dict[str, list[Any]]) -> Run:
    """The :class:`Run` of columns :func:`collect` filled."""
    lat_s = np.array(cols["lat_s"], dtype=np.float64)
    return Run(
        name,
        family,
        np.array(cols["raw"], dtype=np.float64),
        np.array(cols["rel"], dtype=np.float64),
        np.array(cols["lat"], dtype=np.float64),
        lat_s,
        np.array(cols["flops"], dtype=np.float64),
        list(cols["task"]),
        np.array(cols["dec"], dtype=np.float64),
        {
            "throughput_tok_s": float(np.sum(cols["tok"]) / max(lat_s.sum(), 1e-12)),
            "energy_source": sorted({str(e) for e in cols["en"]}),
            **({"inputs_timed_with_another_part": int(sum(cols["shared"]))} if any(cols.get("shared", ())) else {}),
        },
    )


def sweep(
    env: Any,
    candidates: Sequence[PlanController],
    n: int,
    controllers: Sequence[tuple[PlanController, str]] = (),
    seed: int = 0,
    rounds: int = TIMING_ROUNDS,
    staged: Any = None,
    workers: int = 1,
) -> tuple[list[Run], list[Run], np.ndarray]:
    """Static candidates and controllers on every input, interleaved, sharing one probe per input.

    For each input, every static plan and every controller runs back to back, in an order shuffled
    per input, so slow drifts of the machine (other load, clocks) hit them alike instead of
    favouring whichever was measured in a quieter phase. With measured latency, each input is timed
    in ``rounds`` such rounds (the first also scores, the others only time, each in a fresh order)
    and a plan's seconds on the input are its best round: the time the plan needs when nothing else
    interferes, as ``timeit`` reports, so a burst of another process's load in one round does not
    decide it. With :class:`~agents.baselines.Dense` among the candidates, every latency fraction is
    then taken against it on the same input (:func:`same_round_latency`); calibrated costs are
    deterministic, so they take one round and keep the environment's per-input fractions.

    A plan that several parts choose on the same input (a controller choosing the dense plan, a
    heuristic choosing one of the static plans) is the same computation: it runs, is scored and is
    timed once per round, and each of those parts adds its own decision time to it (the runs count
    such inputs in ``extra["inputs_timed_with_another_part"]``).

    ``workers`` > 1 shares the inputs among that many worker processes (forked from this one, so
    the model, environments and controllers need no rebuilding), each running one PyTorch thread;
    every input's plans still run back to back in one worker, so each latency fraction stays a
    ratio of timings taken side by side. A worker on each core is what a second process on the
    machine is to the timings, which the same-round fractions absorb (``python -m
    experiments.bench.latency``); :func:`workers_for` gives the default. The shuffled order of an
    input depends on ``seed`` and the input only, so the results do not depend on ``workers``
    beyond timing noise (with calibrated cost, not at all).

    Before timing, the sweep checks that the timed forwards' threads have a free core each and
    warns when another process holds them (the fractions then follow that process's load).

    ``staged`` (an :class:`agents.staged.StagedPass` over the same inputs) adds the staged
    environment's parts (its exit row and its controllers' episodes) to every input's shuffled order
    and every round; its exit table and runs are on the pass afterwards (``staged.table``,
    ``staged.runs``), their latency fractions over the same dense timings. A staged sweep needs
    :class:`~agents.baselines.Dense` among the candidates when measured.

    Returns:
        The static runs, the controller runs (in the order given) and the observations.

    Raises:
        ValueError: ``rounds`` or ``workers`` below 1; a measured staged sweep without ``Dense``.
        RuntimeError: A worker failed (its traceback in the message) or died.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    base = getattr(env, "unwrapped", env)
    measured = getattr(base, "cost_kind", None) == "measured"
    rounds = rounds if measured else 1
    workers = max(1, min(int(workers), n))
    if measured:
        check_free_cores(base, workers=workers)
    everyone: list[tuple[PlanController, str]] = [(c, "static") for c in candidates] + list(controllers)
    dense_at = [j for j, (c, _) in enumerate(everyone) if isinstance(c, Dense)]
    if staged is not None:
        staged.check_items([it.id for it in base.items[:n]])
        if measured and not dense_at:
            raise ValueError("a measured staged sweep needs Dense among the candidates: it is the latency reference")
    desc = "static sweep and controllers" + (f" ({rounds} timing rounds)" if rounds > 1 else "")
    shard = _Shard(env, everyone, staged, rounds, seed)
    if workers == 1:
        with tqdm(total=n, desc=desc) as bar:
            results = [shard(list(range(n)), lambda: bar.update(1))]
    else:
        results = in_workers(
            shard, [list(range(n))[w::workers] for w in range(workers)], desc=f"{desc}, {workers} workers"
        )
    order = np.argsort(np.concatenate([r["items"] for r in results]), kind="stable")
    cols = [_merged([r["cols"][j] for r in results], order) for j in range(len(everyone))]
    obs_all = [o for r in results for o in r["obs"]]
    if staged is not None:
        rows = [row for r in results for row in r["staged_rows"]]
        staged.rows = [rows[k] for k in order]
        staged.set_columns(
            [_merged([r["staged_cols"][j] for r in results], order) for j in range(len(staged.controllers))]
        )
    runs = [run_of(c.name, fam, col) for (c, fam), col in zip(everyone, cols, strict=True)]
    if measured:
        runs = [replace(r, extra={**r.extra, "timing_rounds": rounds, "timing_workers": workers}) for r in runs]
    dense = [runs[j] for j in dense_at]
    if dense and measured:
        runs = same_round_latency(runs, dense[0])
    if staged is not None:
        staged.finish(dense[0].latency_s if measured else None)
        if measured:
            staged.runs = [
                replace(r, extra={**r.extra, "timing_rounds": rounds, "timing_workers": workers}) for r in staged.runs
            ]
    return runs[: len(candidates)], runs[len(candidates) :], np.array([obs_all[k] for k in order])


@dataclass
class _Shard:
    """The sweep over some of the inputs: what one worker (or the sweep itself) runs."""

    env: Any
    everyone: list[tuple[PlanController, str]]
    staged: Any
    rounds: int
    seed: int

    def __call__(self, items: list[int], tick: Any) -> dict[str, Any]:
        env, everyone, staged = self.env, self.everyone, self.staged
        parts = len(everyone) + (staged.parts if staged is not None else 0)  # staged parts come after the plans
        cols = [result_columns() for _ in everyone]
        if staged is not None:
            staged.rows = []
            staged.set_columns([result_columns() for _ in staged.controllers])
        obs_all = []
        for i in items:
            rng = np.random.default_rng([self.seed, i])  # the input's order, whichever worker runs it
            obs, info = env.reset(options={"item": i})
            obs_all.append(obs)
            ctx = context(env, i, info["prompt_tokens"])
            plans: list[Any] = [None] * len(everyone)
            owner = list(range(len(everyone)))  # the part whose run of the same plan stands for this one's
            ran: dict[Any, int] = {}  # each plan run on this input, by the part that ran it
            infos: dict[int, Any] = {}
            best = [0.0] * len(everyone)  # each run's seconds on this input, decision aside: its best round
            for r in range(self.rounds):
                for j in rng.permutation(parts):
                    if j >= len(everyone):  # the staged env keeps its own episode: the plans' stays open
                        staged.run(j - len(everyone), i, first=r == 0)
                    elif r == 0:
                        t0 = time.perf_counter()
                        plans[j] = everyone[j][0](obs, ctx)
                        dec = time.perf_counter() - t0
                        owner[j] = ran.setdefault(plans[j], j)
                        if owner[j] == j:
                            _, _, _, _, infos[j] = env.step_plan(plans[j], keep_open=True)
                            best[j] = infos[j]["latency_s"]
                        collect(cols[j], infos[owner[j]], dec, shared=owner[j] != j)
                    elif owner[j] == j:
                        best[j] = min(best[j], env.retime(plans[j]))
            if self.rounds > 1:  # a part's seconds: its plan's best round (the first round's are in already)
                for j in range(len(everyone)):
                    cols[j]["lat_s"][-1] = best[owner[j]] + cols[j]["dec"][-1]
            env.close_episode()
            tick()
        out: dict[str, Any] = {"items": list(items), "cols": cols, "obs": obs_all}
        if staged is not None:
            out |= {"staged_rows": staged.rows, "staged_cols": staged.columns()}
        return out


def _merged(parts: Sequence[dict[str, list[Any]]], order: np.ndarray) -> dict[str, list[Any]]:
    """Result columns of several shards, concatenated, in input order (``order`` sorts the concatenation)."""
    out = {}
    for k in parts[0]:
        flat = [v for p in parts for v in p[k]]
        out[k] = [flat[o] for o in order]
    return out


def workers_for(timing_threads: int, workers: int | None = None) -> int:
    """A measured evaluation's worker processes: ``workers``, else one per ``timing_threads`` usable cores.

    One place for the default, read by the main job, ``experiments.evaluate`` and the benchmarks alike.
    Workers are forked (:func:`in_workers`): where the platform cannot fork, the default is 1.

    Raises:
        ValueError: ``workers`` below 1, or above 1 where the platform cannot fork.
    """
    import multiprocessing as mp

    from envs.measure.meters import usable_cores

    forks = "fork" in mp.get_all_start_methods()
    if workers is not None:
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if int(workers) > 1 and not forks:
            raise ValueError(f"workers={workers} needs forked processes, which this platform lacks: use workers=1")
        return int(workers)
    return max(1, usable_cores() // max(1, int(timing_threads))) if forks else 1


STOP_GRACE_S = 10.0  # seconds a worker gets to stop on its own before it is terminated (see in_workers)


def in_workers(fn: Any, shards: Sequence[list[int]], desc: str = "", role: str = "evaluation") -> list[dict[str, Any]]:
    """``fn(shard, tick)`` for each shard in its own forked process with one PyTorch thread; the results in order.

    Forking shares the loaded model and every built object with the workers (nothing is pickled on
    the way in, only the results on the way back). ``tick()`` advances one progress bar over all
    shards. A worker's exception is raised here with its traceback, and the other workers are
    stopped (after :data:`STOP_GRACE_S` seconds to stop on their own: a Ctrl-C reaches every worker,
    and one cleaning up, e.g. shutting its Ray down, is not interrupted); a worker that dies without
    a word (killed, out of memory) is reported by exit code.
    ``role`` names the workers in those messages (the main job's training shares its jobs this way too).

    Raises:
        RuntimeError: A worker failed or died.
    """
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_work, args=(fn, shard, q, w), daemon=True) for w, shard in enumerate(shards)]
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        with tqdm(total=sum(len(s) for s in shards), desc=desc) as bar:
            while len(results) < len(procs):
                try:
                    kind, w, payload = q.get(timeout=2.0)
                except queue_mod.Empty:
                    dead = [(w, p.exitcode) for w, p in enumerate(procs) if w not in results and p.exitcode is not None]
                    if dead and q.empty():
                        w, code = dead[0]
                        raise RuntimeError(
                            f"{role} worker {w} died (exit code {code}) before returning its results"
                        ) from None
                    continue
                if kind == "tick":
                    bar.update(1)
                elif kind == "error":
                    raise RuntimeError(f"{role} worker {w} failed:\n{payload}")
                else:
                    results[w] = payload
    finally:
        for p in procs:
            if p.is_alive() and len(results) < len(procs):
                p.join(STOP_GRACE_S)  # one stopping already (the same Ctrl-C) finishes its cleanup first
                if p.is_alive():
                    p.terminate()
            p.join()
    return [results[w] for w in range(len(procs))]


def _work(fn: Any, shard: list[int], q: Any, w: int) -> None:
    """A worker's body (see :func:`in_workers`)."""
    import traceback

    import torch

    torch.set_num_threads(1)
    try:
        q.put(("done", w, fn(shard, lambda: q.put(("tick", w, None)))))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which raises it
        q.put(("error", w, traceback.format_exc()))


def check_free_cores(env: Any, interval_s: float = 0.5, workers: int = 1) -> float:
    """Warn when the cores the measured forwards' threads need are held by other processes; returns their load.

    ``env`` is a measured environment: its meter's ``threads`` (else the process's PyTorch threads,
    one in a worker) are the threads each timed run uses, in each of ``workers`` processes at once.
    """
    import warnings

    import torch

    from envs.measure.meters import busy_cores_elsewhere, usable_cores

    meter = getattr(getattr(env, "cost_source", None), "meter", None)
    threads = getattr(meter, "threads", None) or (1 if workers > 1 else torch.get_num_threads())
    cores = usable_cores()
    others = busy_cores_elsewhere(interval_s)
    if threads * workers > cores - others + 0.5:
        who = f"{workers} workers each time with {threads}" if workers > 1 else f"each timed run uses {threads}"
        warnings.warn(
            f"other processes keep about {others:.1f} of this machine's {cores} cores busy, and {who} "
            f"thread{'s' if threads != 1 else ''}: the measured latency fractions will follow their load. Time with "
            f"fewer threads or workers (the evaluation's timing threads, {TIMING_THREADS} by default, and one worker "
            "per free core) or on a quieter machine.",
            RuntimeWarning,
            stacklevel=3,
        )
    return others


def same_round_latency(runs: Sequence[Run], dense: Run) -> list[Run]:
    """``runs`` with latency fractions over the dense plan's seconds on the same input, timed in the same rounds.

    A run's fraction on an input becomes its seconds (decision included) over the dense plan's on
    that input, both the best of the same interleaved rounds, so a slow phase of a shared machine
    moves numerator and denominator alike. Two older estimators stay in ``extra`` for comparison:
    ``latency_fraction_ratio_of_means`` (the run's seconds over the dense plan's mean seconds) and
    ``latency_fraction_single_dense`` (against one dense timing per input taken when the input was
    first drawn).
    """
    ref = np.maximum(dense.latency_s, 1e-12)
    out = []
    for r in runs:
        extra = {
            **r.extra,
            "latency_fraction_single_dense": float(r.lat.mean()),
            "latency_fraction_ratio_of_means": float(r.latency_s.mean() / max(float(ref.mean()), 1e-12)),
        }
        out.append(replace(r, lat=r.latency_s / ref, extra=extra))
    return out


def static_table(env: Any, candidates: Sequence[PlanController], n: int) -> tuple[list[Run], np.ndarray]:
    """Every candidate on every input, sharing one probe per input; returns runs and observations."""
    static, _, obs = sweep(env, candidates, n)
    return static, obs


def default_candidates(
    budgets: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5), mlp_rules: Sequence[str] = ("static",)
) -> list[PlanController]:
    """The static sweep: uniform fractions of each kind and ShortGPT-style plans at FLOPs budgets.

    Each per-token rule in ``mlp_rules`` (:data:`envs.runtime.plan.MLP_RULES`) adds its MLP-only
    plans and one mixed plan, so the static hull is rebuilt with the rules the controllers may use.
    """
    out: list[PlanController] = [Dense()]
    for rule in mlp_rules:
        if rule != "static":
            out += [StaticUniform(mlp=f, mlp_rule=rule) for f in (0.75, 0.5, 0.25)]
            out.append(StaticUniform(layers=0.8, mlp=0.5, mlp_rule=rule))
    for f in (0.9, 0.8, 0.7, 0.6, 0.5):
        out.append(StaticUniform(layers=f))
    for f in (0.75, 0.5):
        out.append(StaticUniform(mlp=f))
    out.append(StaticUniform(heads=2 / 3))
    out.append(StaticUniform(heads=2 / 3, mlp=0.75))
    for f in (0.9, 0.8):
        out.append(StaticUniform(layers=f, mlp=0.75))
    for b in budgets:
        out.append(StaticImportance(budget=b))
    return out


# ---------------------------------------------------------------------------------------- study
def run_scores(run: Run, scoring: str) -> np.ndarray:
    """A run's per-input accuracy under ``scoring`` (``"dense_relative"`` or ``"raw"``)."""
    return run.rel if scoring == "dense_relative" else run.raw


def family_frontier(runs: Sequence[Run], scoring: str, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Upper hull of a family's operating points (mean latency fraction, mean accuracy)."""
    idx = np.arange(len(runs[0].raw)) if idx is None else idx
    x = np.array([r.lat[idx].mean() for r in runs])
    y = np.array([run_scores(r, scoring)[idx].mean() for r in runs])
    return upper_hull(x, y)


def oracle_curve(static: Sequence[Run], scoring: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-input hindsight oracle's frontier over the static runs, on inputs ``idx``."""
    acc = np.stack([run_scores(r, scoring)[idx] for r in static], axis=1)
    cost = np.array([r.lat[idx].mean() for r in static])
    return oracle_frontier(acc, cost)


def hull_curve(static: Sequence[Run], scoring: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The static convex hull (best mixture of two static plans) over the static runs, on inputs ``idx``."""
    acc = np.stack([run_scores(r, scoring)[idx] for r in static], axis=1)
    cost = np.array([r.lat[idx].mean() for r in static])
    return static_hull(acc, cost)


def headline(
    static: Sequence[Run],
    families: Mapping[str, Sequence[Run]],
    targets: Sequence[float] = DEFAULT_TARGETS,
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Accuracy at each target latency: static hull, oracle and every controller family, with 95% CIs.

    Returns one row per (scoring, target, family) with the point estimate, CI, the difference to
    the hull (paired bootstrap CI), the share of the hull-to-oracle gap closed, and whether a real
    operating point of the family lies within ±2% of the target latency.
    """
    n = len(static[0].raw)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, n, n) for _ in range(n_boot)]
    full = np.arange(n)
    rows = []
    for scoring in SCORINGS:
        for t in targets:

            def at(
                fam: Sequence[Run] | None, idx: np.ndarray, what: str, scoring: str = scoring, t: float = t
            ) -> float:
                if what == "hull":
                    fx, fy = hull_curve(static, scoring, idx)
                elif what == "oracle":
                    fx, fy = oracle_curve(static, scoring, idx)
                else:
                    fx, fy = family_frontier(fam, scoring, idx)  # type: ignore[arg-type]
                return float(interp_frontier(fx, fy, [t])[0])

            hull_pt = at(None, full, "hull")
            oracle_pt = at(None, full, "oracle")
            hull_b = np.array([at(None, b, "hull") for b in boots])
            oracle_b = np.array([at(None, b, "oracle") for b in boots])
            entries: list[tuple[str, float, np.ndarray, bool]] = [
                ("static hull (StaticMix)", hull_pt, hull_b, _matched(static, t)),
                ("oracle (hindsight)", oracle_pt, oracle_b, True),
            ]
            for name, fam in families.items():
                pt = at(fam, full, "family")
                fb = np.array([at(fam, b, "family") for b in boots])
                entries.append((name, pt, fb, _matched(fam, t)))
            for name, pt, pb, matched in entries:
                diff = pb - hull_b
                gap = oracle_pt - hull_pt
                rows.append(
                    {
                        "scoring": scoring,
                        "target_latency": t,
                        "controller": name,
                        "accuracy": pt,
                        "ci95": _ci(pb),
                        "vs_hull": pt - hull_pt,
                        "vs_hull_ci95": _ci(diff),
                        "gap_closed": (pt - hull_pt) / gap if np.isfinite(pt) and gap > 1e-9 else float("nan"),
                        "matched": matched,
                    }
                )
    return rows


def _matched(runs: Sequence[Run], t: float) -> bool:
    return any(abs(r.lat.mean() - t) <= MATCH_TOL for r in runs)


def _ci(values: np.ndarray) -> list[float]:
    v = values[np.isfinite(values)]
    if len(v) < 10:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def probe_observations(env: Any, n: int) -> np.ndarray:
    """The probe's features of each of the first ``n`` inputs (a PerInput episode's observation; nothing timed)."""
    env = getattr(env, "unwrapped", env)
    return np.array([env.probe_features_of(i) for i in range(n)])


def entropy_rules(obs: np.ndarray, feature_names: Sequence[str]) -> list[PlanController]:
    """EntropyThreshold heuristics: dense for uncertain inputs, a cheaper static plan for confident ones.

    The thresholds are quantiles of the entropy feature, a hand-set rule (not fitted on scores).
    """
    names = list(feature_names)
    if "entropy" not in names:
        return []
    ent = obs[:, names.index("entropy")]
    cheap = StaticUniform(layers=0.6)
    return [EntropyThreshold(float(np.quantile(ent, q)), cheap, Dense()) for q in (0.25, 0.5, 0.75)]
