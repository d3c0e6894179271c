"""Compare algorithms across seeds: ``python -m experiments.compare <multirun dir>``.

Reads every run under the folder (each run directory holds ``final.json``, ``metrics.jsonl`` and
``run_config.json``, as written by :mod:`experiments.train`), groups runs by algorithm (and env, when
several), and writes:

- ``compare.md``: per algorithm, the held-out reward, accuracy and cost as the interquartile mean
  (IQM) over seeds (rliable's IQM) with a 95% stratified-bootstrap confidence interval, and the
  budget each algorithm got: env steps per run, runs, and hyperparameter settings tried
  (``tuning_trials``). When the budgets differ the table says so instead of claiming a fair comparison;
- ``compare.json``: the same figures, plus every run's values, the learning curves and the references;
- ``compare.png``: learning curves (training reward per iteration against env steps, mean over seeds
  with the min-max band).

When the runs trained on a replay twin (``env=per_input_replay``), the recordings also give reference
lines, rows of the table marked as references and horizontal lines on the plot (:func:`replay_references`):
the best static preset, the learnable ceiling (:func:`agents.ceiling.learnable_ceiling`, fitted on the
training recording) and the hindsight oracle, each on the held-out recording as the runs' evaluation
drew it, with the runs' reward and latency settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

from experiments.report import REPO_ROOT, markdown_table, save_figure

METRICS = ("reward", "accuracy", "cost")


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under ``root`` (those holding a ``final.json``), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the multirun directory (multirun/train/<date>)")
    return sorted(p.parent for p in root.rglob("final.json"))


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's final figures, its learning curve (env steps, training reward) and its config (``config``, or None)."""
    final = json.loads((run_dir / "final.json").read_text())
    config_path = run_dir / "run_config.json"
    final["config"] = json.loads(config_path.read_text()) if config_path.is_file() else None
    curve: list[tuple[float, float]] = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            curve.append((float(row.get("env_steps", 0.0)), float(row.get("reward", float("nan")))))
    final["curve"] = curve
    final["run_dir"] = str(run_dir)
    return final


def iqm_with_ci(values: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of ``values`` (one per run) and its 95% stratified-bootstrap CI (:func:`stratified_bootstrap_ci`).

    Non-finite values (a run whose evaluation gave no figure) are left out.
    """
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    return stratified_bootstrap_ci(arr[:, None], reps=reps, seed=seed)


def stratified_bootstrap_ci(
    scores: np.ndarray, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """IQM of a ``[runs, tasks]`` score matrix and its percentile interval under rliable's stratified bootstrap.

    The IQM is rliable's ``metrics.aggregate_iqm``. Each resample draws, for every task separately
    (the strata), as many runs with replacement as that task has, and takes the IQM of the
    resampled matrix; the interval is the ``level`` percentile interval of those IQMs. This is
    rliable's ``StratifiedBootstrap`` done with NumPy (``rliable.library`` imports ``arch``, whose
    7.2 release fails to import under pandas 3). A comparison here has one task, the recorded
    environment, so a resample draws runs (seeds) with replacement within the algorithm.

    Returns:
        ``(iqm, low, high)``; with one run all three are its score.
    """
    from rliable import metrics

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [runs, tasks] matrix, got shape {scores.shape}")
    point = float(metrics.aggregate_iqm(scores))
    runs, tasks = scores.shape
    if runs == 1:  # one run per task: nothing to resample
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(reps, runs, tasks))  # per task (column), runs drawn independently
    boot = np.array([metrics.aggregate_iqm(np.take_along_axis(scores, i, axis=0)) for i in idx])
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(boot, [tail, 100.0 - tail])
    return point, float(lo), float(hi)


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs keyed by algorithm (``algo @ env`` when the runs cover several envs)."""
    envs = {r.get("env_id") for r in runs}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        key = str(r["algo"]) if len(envs) == 1 else f"{r['algo']} @ {r.get('env_id')}"
        groups[key].append(r)
    return dict(sorted(groups.items()))


def mean_curve(runs: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean, min and max training reward across seeds, per iteration (curves cut to the shortest run)."""
    curves = [r["curve"] for r in runs if r["curve"]]
    if not curves:
        return {"env_steps": [], "mean": [], "min": [], "max": []}
    n = min(len(c) for c in curves)
    steps = np.asarray([[c[i][0] for i in range(n)] for c in curves]).mean(axis=0)
    rewards = np.asarray([[c[i][1] for i in range(n)] for c in curves])
    return {
        "env_steps": steps.tolist(),
        "mean": np.nanmean(rewards, axis=0).tolist(),
        "min": np.nanmin(rewards, axis=0).tolist(),
        "max": np.nanmax(rewards, axis=0).tolist(),
    }


REFERENCES = (
    ("best_static", "best static preset"),
    ("learnable", "learnable ceiling"),
    ("oracle", "hindsight oracle"),
)


def replay_setting(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a run trained and was evaluated on, when that was a replay twin; ``None`` for a live environment.

    Read from the run's ``run_config.json``: the dataset folder, the training and held-out splits,
    the latency source and reward of the twin, and the held-out evaluation's episodes and seed.
    """
    config = run.get("config") or {}
    env = config.get("env") or {}
    import envs

    if str(env.get("id")) not in envs.replay_ids():
        return None
    kwargs = env.get("kwargs") or {}
    evaluation = config.get("eval") or {}
    return {
        "env_id": str(env["id"]),
        "dataset": str(kwargs["dataset"]),
        "train_split": str(config.get("train_split") or "train"),
        "eval_split": str(evaluation.get("split") or "test"),
        "latency": str(kwargs.get("latency") or "calibrated"),
        "reward": dict(kwargs.get("reward") or {}),
        "eval_episodes": int(evaluation.get("episodes") or 0),
        "eval_seed": int(evaluation.get("seed") or 0),
    }


def _dataset_folder(dataset: str, base: Path | None) -> str:
    """``dataset`` as given if it exists from here, else relative to ``base`` (the repository)."""
    path = Path(dataset)
    if path.is_absolute() or path.exists() or base is None or not (base / path).exists():
        return str(path)
    return str(base / path)


def replay_references(setting: Mapping[str, Any], *, base: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """The reference lines of a replay setting (:func:`replay_setting`), computed from its recordings.

    Every recorded input's reward under every preset is what the twin pays
    (:func:`agents.ceiling.replay_rewards`, same reward and latency settings as the runs). On the
    held-out recording, *as the runs' evaluation drew it* (``eval_episodes`` resets seeded
    ``eval_seed + episode``, so inputs drawn twice count twice, exactly as in the runs' mean):

    - ``best_static``: the single preset with the highest mean reward there. A mixture of presets
      earns the mixture of their mean rewards, so no static choice, randomised or not, does better;
      for the linear reward this is also the static hull in reward (the hull's accuracy and cost
      combine linearly). It is chosen in hindsight on the held-out draws: ``best_static_train_chosen``
      is the preset best on the training recording, the static choice a learner could make;
    - ``learnable``: the learnable ceiling, a classifier from the first observation to the best
      path, chosen by cross-validation on the training recording and evaluated on the draws;
    - ``oracle``: every drawn input's best path in hindsight.

    The same figures over every held-out input once are under ``uniform``.

    Returns:
        ``{"setting", "draws", "inputs", "best_static": {...}, "learnable": {...}, "oracle": {...},
        "best_static_train_chosen": {...}, "uniform": {...}, "statement"}``.
    """
    from agents.ceiling import learnable_ceiling, replay_rewards
    from envs.replay import Replay

    dataset = _dataset_folder(str(setting["dataset"]), base)
    common = {"dataset": dataset, "latency": setting["latency"], "reward": dict(setting["reward"])}
    train = Replay(split=setting["train_split"], **common)
    test = Replay(split=setting["eval_split"], **common)
    r_train = replay_rewards(train.data, train.reward_cfg, train.latency)
    r_test = replay_rewards(test.data, test.reward_cfg, test.latency)
    acc = test.data.rel if test.reward_cfg.accuracy == "dense_relative" else test.data.raw
    if test.latency == "calibrated":
        cost = test.data.latency
    else:  # the ceiling's expectation: "sample" draws one round, its mean over rounds is near the median's
        cost = test.data.median_latency
    index = {item: i for i, item in enumerate(test.data.item_ids)}
    episodes = int(setting.get("eval_episodes") or 0)
    draws = np.asarray(
        [index[test.reset(seed=int(setting["eval_seed"]) + ep)[1]["item_id"]] for ep in range(episodes)]
        if episodes
        else np.arange(test.n_inputs),
        dtype=np.int64,
    )
    obs_train, obs_test = train.data.obs[:, 0, 0], test.data.obs[:, 0, 0]

    def figures(rows: np.ndarray) -> dict[str, Any]:
        c = learnable_ceiling(obs_train, r_train, obs_test[rows], r_test[rows], seed=seed)
        means = r_test[rows].mean(axis=0)
        best = int(means.argmax())
        chosen = int(r_train.mean(axis=0).argmax())
        hindsight = r_test[rows].argmax(axis=1)

        def pick(paths: np.ndarray) -> dict[str, float]:
            return {
                "reward": float(r_test[rows, paths].mean()),
                "accuracy": float(acc[rows, paths].mean()),
                "cost": float(cost[rows, paths].mean()),
            }

        return {
            "best_static": {**pick(np.full(len(rows), best)), "path": test.data.path(best)},
            "best_static_train_chosen": {
                **pick(np.full(len(rows), chosen)),
                "path": test.data.path(chosen),
            },
            "learnable": {"reward": c.learnable, "model": c.model, "cv_reward": c.cv_reward},
            "oracle": pick(hindsight),
            "candidates": c.candidates,
        }

    out = {
        "setting": dict(setting),
        "dataset": dataset,
        "draws": int(len(draws)),
        "inputs": {"train": int(train.n_inputs), "test": int(test.n_inputs), "drawn": int(len(set(draws.tolist())))},
        **figures(draws),
        "uniform": figures(np.arange(test.n_inputs)),
    }
    out["statement"] = reference_statement(out)
    return out


def reference_statement(ref: Mapping[str, Any]) -> str:
    """What the reference rows are, in words (for compare.md)."""
    s = ref["setting"]
    form = str(s["reward"].get("form", "linear"))
    hull = (
        "for this linear reward it is also the static hull in reward, since a mixture of presets earns the mixture "
        "of their mean rewards"
        if form == "linear"
        else f"a mixture of presets earns the mixture of their mean rewards, so no static choice does better under "
        f"this {form} reward"
    )
    static, chosen = ref["best_static"], ref["best_static_train_chosen"]
    train_note = (
        "it is also the preset best on the training recording"
        if static["path"] == chosen["path"]
        else f"the preset best on the training recording, {chosen['path']}, earns {chosen['reward']:.4f} there"
    )
    inputs = ref["inputs"]
    return (
        f"References (not trained; from the recordings in `{ref['dataset']}`, {inputs['train']} training and "
        f"{inputs['test']} held-out inputs), on the held-out recording as the runs' evaluation drew it "
        f"({ref['draws']} seeded draws of {inputs['drawn']} distinct inputs), with the runs' reward "
        f"({form}, {_reward_words(s['reward'])}) and latency (`{s['latency']}`). "
        f"*Best static preset*: the single preset {static['path']} with the highest mean reward on those draws "
        f"(chosen in hindsight; {train_note}); {hull}. *Learnable ceiling*: `agents.ceiling.learnable_ceiling`, "
        f"the classifier from an input's first observation to its best preset chosen by 5-fold cross-validation "
        f"on the training recording ({ref['learnable']['model']}), evaluated on the draws. *Hindsight oracle*: every "
        "drawn input's best preset."
    )


def _reward_words(reward: Mapping[str, Any]) -> str:
    keys = [k for k in ("lam", "budget", "penalty", "min_accuracy", "accuracy") if k in reward]
    return ", ".join(f"{k} {reward[k]}" for k in keys) or "defaults"


def references_for(runs: Sequence[dict[str, Any]], *, base: Path | None = None) -> list[dict[str, Any]]:
    """The reference lines of every distinct replay setting among ``runs`` (none when they trained live)."""
    settings: list[dict[str, Any]] = []
    for run in runs:
        setting = replay_setting(run)
        if setting is not None and setting not in settings:
            settings.append(setting)
    return [replay_references(s, base=base) for s in settings]


def compare(
    root: str | Path, out: str | Path | None = None, reps: int = 2000, references: bool = True
) -> dict[str, Any]:
    """Build the comparison of the runs under ``root``; writes ``compare.{md,json,png}`` into ``out`` (default root).

    Args:
        root: The multirun directory (any folder holding run directories).
        out: Where to write (default: ``root``).
        reps: Bootstrap resamples.
        references: Add the reference lines of runs trained on a replay twin (:func:`replay_references`).
    """
    runs = [load_run(p) for p in find_runs(root)]
    if not runs:
        raise FileNotFoundError(f"no finished run (final.json) under {root}: did the training jobs complete?")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    summary: dict[str, Any] = {"root": str(root), "algorithms": {}}
    for key, rs in groups.items():
        entry: dict[str, Any] = {
            "runs": len(rs),
            "seeds": sorted(int(r["seed"]) for r in rs),
            "env_steps_per_run": sorted({int(r["env_steps"]) for r in rs}),
            # the budget asked for (stop.env_steps); runs overshoot it by up to one iteration's steps
            "env_step_budget": sorted({int((r.get("budget") or {}).get("env_steps") or r["env_steps"]) for r in rs}),
            "tuning_trials": sorted({int(r.get("tuning_trials", 1)) for r in rs}),
            "eval_split": sorted({str(r.get("eval_split")) for r in rs}),
            "per_run": [
                {"seed": r["seed"], "run_dir": r["run_dir"], **{m: r["eval"].get(m) for m in METRICS}} for r in rs
            ],
            "curve": mean_curve(rs),
        }
        for m in METRICS:
            point, lo, hi = iqm_with_ci([float(r["eval"].get(m, float("nan"))) for r in rs], reps=reps)
            entry[m] = {"iqm": point, "ci95": [lo, hi]}
        summary["algorithms"][key] = entry
    budgets = {(tuple(e["env_step_budget"]), tuple(e["tuning_trials"])) for e in summary["algorithms"].values()}
    summary["equal_budget"] = len(budgets) == 1
    summary["best"] = best_run(summary["algorithms"])
    summary["references"] = references_for(runs, base=REPO_ROOT) if references else []
    markdown = render_markdown(summary)
    (out / "compare.md").write_text(markdown)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    plot_curves(summary, out / "compare.png")
    summary["markdown"] = markdown
    return summary


def best_run(algorithms: Mapping[str, Any]) -> dict[str, Any] | None:
    """The algorithm with the highest held-out reward IQM and its best run (seed) by held-out reward."""
    scored = {k: e for k, e in algorithms.items() if math.isfinite(e["reward"]["iqm"])}
    if not scored:
        return None
    key = max(scored, key=lambda k: scored[k]["reward"]["iqm"])
    runs = [r for r in scored[key]["per_run"] if r.get("reward") is not None and math.isfinite(float(r["reward"]))]
    run = max(runs, key=lambda r: float(r["reward"]))
    return {"algorithm": key, "reward_iqm": scored[key]["reward"]["iqm"], **run}


def _fmt(cell: dict[str, Any]) -> str:
    lo, hi = cell["ci95"]
    if not math.isfinite(cell["iqm"]):
        return "n/a"
    return f"{cell['iqm']:.4f} [{lo:.4f}, {hi:.4f}]"


def render_markdown(summary: dict[str, Any]) -> str:
    """The comparison table, with the budget statement."""
    rows = []
    for key, e in summary["algorithms"].items():
        steps = "/".join(str(s) for s in e["env_steps_per_run"])
        trials = "/".join(str(t) for t in e["tuning_trials"])
        rows.append([key, e["runs"], steps, trials, _fmt(e["reward"]), _fmt(e["accuracy"]), _fmt(e["cost"])])
    refs = summary.get("references") or []
    for k, ref in enumerate(refs):
        tag = f" ({k + 1})" if len(refs) > 1 else ""
        for key, label in REFERENCES:
            cell = ref[key]
            what = f"{label} {cell['path']}" if "path" in cell else label
            rows.append(
                [
                    f"*reference{tag}: {what}*",
                    "—",
                    "—",
                    "—",
                    f"{cell['reward']:.4f}",
                    f"{cell['accuracy']:.4f}" if "accuracy" in cell else "—",
                    f"{cell['cost']:.4f}" if "cost" in cell else "—",
                ]
            )
    headers = ["algorithm", "runs (seeds)", "env steps / run", "tuning trials", "reward", "accuracy", "cost"]
    splits = sorted({s for e in summary["algorithms"].values() for s in e["eval_split"]})
    budget = (
        "Equal budget: every algorithm had the same env-step budget per run (`stop.env_steps`; a run stops "
        "at the first iteration past it, so the steps reached differ by at most one iteration) with the same "
        "number of hyperparameter settings tried (tuning trials)."
        if summary["equal_budget"]
        else "**Budgets differ between algorithms** (env steps per run or tuning trials): the comparison is not "
        "at equal budget."
    )
    notes = "".join(f"\n\n{f'({k + 1}) ' if len(refs) > 1 else ''}{ref['statement']}" for k, ref in enumerate(refs))
    lines = " with the references as horizontal lines" if refs else ""
    return (
        f"# Algorithm comparison\n\nRuns under `{summary['root']}`. Held-out ({', '.join(splits)} split) figures of "
        "the greedy policy after training: IQM over seeds (rliable) [95% stratified-bootstrap CI: one task, so each "
        "resample draws the algorithm's runs with replacement]. Cost is the latency fraction of the dense model.\n\n"
        f"{budget}\n\n{markdown_table(headers, rows)}{notes}\n\nLearning curves{lines}: `compare.png`.\n"
    )


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    """Training reward against env steps, one line (mean over seeds) and min-max band per algorithm.

    The references of replay runs (held-out figures) are horizontal lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, e in summary["algorithms"].items():
        c = e["curve"]
        if not c["env_steps"]:
            continue
        ax.plot(c["env_steps"], c["mean"], label=f"{key} (n={e['runs']})")
        ax.fill_between(c["env_steps"], c["min"], c["max"], alpha=0.2)
    refs = summary.get("references") or []
    styles = {"best_static": ":", "learnable": "--", "oracle": "-."}
    for k, ref in enumerate(refs):
        tag = f" ({k + 1})" if len(refs) > 1 else ""
        for key, label in REFERENCES:
            ax.axhline(
                ref[key]["reward"],
                color="0.35",
                linestyle=styles[key],
                linewidth=1.2,
                label=f"{label}{tag} (held-out): {ref[key]['reward']:.3f}",
            )
    ax.set_xlabel("env steps")
    ax.set_ylabel("training reward (per-iteration mean)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


class SharedRay(Callback):
    """A Hydra callback that gives every job of a multirun one private Ray, started once (``experiment=replay``).

    On a replay twin a job trains in seconds, while starting and shutting down a private Ray costs
    several: this starts one (:func:`experiments.train.ray_session`, with the sweep's ``cluster``
    settings and its driver marker, so that a killed multirun's Ray is cleaned up by the next run)
    when the multirun starts and shuts it down when it ends. Each job's
    :func:`experiments.train.train` finds Ray running and leaves it alone. Single runs are unaffected.
    """

    def __init__(self) -> None:
        super().__init__()
        self._session: contextlib.ExitStack | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """Start the shared Ray."""
        from experiments.train import ray_session

        sweep = Path(str(config.hydra.sweep.dir))
        sweep.mkdir(parents=True, exist_ok=True)
        self._session = contextlib.ExitStack()
        self._session.enter_context(ray_session(config.cluster, sweep))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Shut the shared Ray down."""
        if self._session is not None:
            self._session.close()
            self._session = None


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print the table, write compare.md/json/png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="multirun directory (or any folder holding run directories)")
    parser.add_argument("--out", default=None, help="where to write compare.{md,json,png} (default: root)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument(
        "--no-references",
        action="store_true",
        help="leave out the reference lines (best static preset, learnable ceiling, oracle) of replay runs",
    )
    args = parser.parse_args(argv)
    summary = compare(args.root, args.out, args.reps, references=not args.no_references)
    print(summary["markdown"])
    print(f"wrote {Path(args.out or args.root) / 'compare.md'}, compare.json, compare.png")


if __name__ == "__main__":
    main()
