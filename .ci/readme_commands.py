"""Every command the README shows, run by CI in a short form: ``python .ci/readme_commands.py`` (``make readme``).

``TABLE`` maps each command of a ```bash block of README.md to what CI runs instead: the README command
itself followed by arguments that shorten it (``Run.extra``: Hydra overrides take the last value of a
key, argparse and click options too, so appending is enough), or, for a command that cannot run on one
CI machine, the reason and the test that covers it (``Skip``). ``tests/test_readme.py`` fails when a
README command has no entry or an entry's README command is no longer in the README; since an entry
holds only what is appended, its short form always starts with the README command. Adding a command to
the README means adding one line here.

Entries run in the table's order (an entry may use what an earlier one wrote, so the order is not the
README's), through ``bash -c`` with the virtualenv's ``bin`` first on ``PATH``, and stop at the first
non-zero exit, naming the README command that failed. Placeholders of the README (``<run>``, ``<date>``,
``<cores>``, ``<head ip>``) are filled per entry (``fill``, default ``FILL``); the short forms use shell
variables the runner sets:

- ``$SCRATCH``: a fresh folder, the working directory of every ``python`` command (what a README command
  writes relative to the working directory lands there), removed at the end unless ``--keep``;
- ``$TAG``: a name unique to this run, for what goes to shared places (prepared models in the cache,
  removed at the end);
- ``$MAIN_RUN``, ``$TRAIN_RUN``, ``$SWEEP_DATE``: the run folders the README calls ``<run>`` and ``<date>``;
- ``$RAY_PORT``, ``$RAY_TMP``: a free port and a private temp dir for the Ray head of "Beyond one machine"
  (stopped at the end by killing exactly the processes that name ``$RAY_TMP``, never ``ray stop``).

``make`` commands run in the repository. Files of the repository that a short form rewrites although it
should not (``PROTECTED``: a benchmark section of BENCHMARKS.md, a plot in reports/) are put back after
each entry, with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PROTECTED = ("BENCHMARKS.md", "reports")

# Short-form building blocks (Hydra overrides; the last value of a key wins).
TINY_TRAIN = "model=tiny_llama env.kwargs.num_groups=2 eval.episodes=2 stop.iterations=1"
TINY_PREP = "model=tiny_llama seq_len=32 eval_docs=1 eval_sequences=1 eval_seq_len=32 eval_plans=2 progress=false"
SMALL_PREP = "seq_len=32 eval_docs=1 eval_sequences=1 eval_seq_len=32 eval_plans=2 progress=false"
TINY_STAGED = f"{TINY_TRAIN} env.kwargs.task=generated env.kwargs.probe_layers=1 env.kwargs.probe_dim=8"
SMOKE_MAIN = "--config-name main_smoke"
TINY_RECORD = (
    "model=tiny_llama task=generated env.kwargs.num_groups=2 env.kwargs.probe_layers=1 env.kwargs.probe_dim=4 "
    "repeats=3 shard_size=4 hardware.env_threads=1"
)
FILL = {"<cores>": "2", "<head ip>": "127.0.0.1", "<date>": "$SWEEP_DATE"}


@dataclasses.dataclass(frozen=True)
class Run:
    """A README command and what CI appends to it to make it short."""

    readme: str
    extra: str = ""  # appended to the README command: overrides, flags, run folders
    fill: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: str = "scratch"  # "scratch" ($SCRATCH) or "repo"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    teardown: Callable[[dict[str, str]], None] | None = None  # run at the end, even after a failure
    timeout_s: float = 420.0

    def short(self) -> str:
        """The short form as written: the README command, then ``extra``."""
        return normalise(f"{self.readme} {self.extra}")

    def command(self) -> str:
        """The short form with the README's placeholders filled (shell variables stay for bash)."""
        text = self.short()
        for key, value in {**FILL, **self.fill}.items():
            text = text.replace(key, value)
        return text


@dataclasses.dataclass(frozen=True)
class Skip:
    """A README command that cannot run on one CI machine: why, and the test that covers it."""

    readme: str
    reason: str
    covered_by: str  # tests/<file>.py::<test>


def stop_ray_head(env: dict[str, str]) -> None:
    """Stop exactly the Ray head started from ``$RAY_TMP`` (the processes naming it) and remove the folder."""
    sys.path.insert(0, str(REPO))
    from experiments.train import stop_processes_naming

    pids = stop_processes_naming(env["RAY_TMP"])
    shutil.rmtree(env["RAY_TMP"], ignore_errors=True)
    print(f"stopped the Ray head of {env['RAY_TMP']} ({len(pids)} processes)")


RAY_LOCAL = {"RAY_AUTH_MODE": "disabled"}  # token auth off for the loopback head, on both sides

# fmt: off
TABLE: list[Run | Skip] = [
    # Top and Development
    Run("make test", "ARGS=tests/test_readme.py", cwd="repo"),
    Run("make test-all", "ARGS=tests/test_readme.py", cwd="repo"),
    Run("make lint", cwd="repo"),
    Run("make bench", "ARGS=--quick", cwd="repo"),
    Run("python -m experiments.bench"),  # lists the benchmarks (runs nothing)
    # Which channels: a tiny predictor, then the rules benchmark on it
    Run("python -m experiments.predictor", "model=tiny-llama rank=4 max_tokens=512 val_tokens=128 name=$TAG-r4"),
    Run("python -m experiments.allocate", "model=tiny-llama docs=2 seq_len=24 name=$TAG-alloc"),
    Run("python -m experiments.bench.activation",
        "--quick --model tiny-llama --predictor $TAG-r4 --allocation $TAG-alloc"),
    Run("python -m experiments.bench.kernels", "--quick --model tiny-llama --no-write"),
    Run("python -m experiments.main env.mlp_rules=[static,gate,input,predicted] env.predictor=smollm2-135m-r64",
        "env.predictor=$TAG-r4 hydra.run.dir=main_rules --config-name main_smoke"),
    # Decide after looking: the staged benchmark on the tiny model's generated mix
    Run("python -m experiments.bench.staged", "--quick --model tiny-llama --task generated"),
    Run("python -m experiments.bench.staged --task mc-known", "--quick"),
    # Exit maps on the tiny model, then the staged benchmark reading through them
    Run("python -m experiments.exit_maps",
        "model=tiny-llama mix=generated train_items=16 val_items=4 name=$TAG-exits progress=false"),
    Run("python -m experiments.bench.staged --exit-maps smollm2-135m-exits",
        "--quick --model tiny-llama --task generated --exit-maps $TAG-exits"),
    Run("python -m experiments.exit_maps name=smollm2-135m-exits-kl distill_steps=870",
        "model=tiny-llama mix=generated train_items=16 val_items=4 name=$TAG-exits-kl distill_steps=8 "
        "distill_batch=16 progress=false"),
    Run("python -m experiments.bench.staged --exit-maps smollm2-135m-exits-kl",
        "--quick --model tiny-llama --task generated --exit-maps $TAG-exits-kl"),
    Run("python -m experiments.bench.exits", "--quick"),
    # Exit maps for per-token exits, fitted on train news text (tiny model), then the decoding benchmark through them
    Run("python -m experiments.exit_maps name=smollm2-135m-exits-news train_items=0 news_docs=184 distill_steps=1200 "
        "distill_positions=96 val_items=0",
        "model=tiny-llama news_docs=4 max_len=32 name=$TAG-exits-news distill_steps=4 distill_batch=16 "
        "distill_positions=8 distill_holdout=8 progress=false"),
    Run("python -m experiments.bench.exits --exit-maps smollm2-135m-exits-news",
        "--quick --model tiny-llama --exit-maps $TAG-exits-news"),
    Run("python -m experiments.bench.latency", "--quick"),
    Skip("make smoke", "the target that runs this table (.ci/run calls it): running it here would recurse",
         "tests/test_readme.py::test_smoke_runs_the_readme_commands"),
    Run("make main", f"ARGS=\"{SMOKE_MAIN} hydra.run.dir=$SCRATCH/outputs/main/$MAIN_RUN 'ppo.lams=[0.25]'\"",
        cwd="repo"),
    Run("python -m experiments.main eval.n_items=48",
        f"eval.n_items=4 ppo.time_s=5 bandit.time_s=3 hydra.run.dir=main_48 {SMOKE_MAIN}"),
    # Training (before export and compare, which read its runs)
    Run("python -m experiments.train experiment=smoke", "hydra.run.dir=outputs/train/$TRAIN_RUN"),
    Run("python -m experiments.train algo=ppo env=per_input stop.iterations=50", f"{TINY_TRAIN} hydra.run.dir=t/ppo"),
    Run("python -m experiments.train algo=dqn env=per_input_discrete logger=wandb", f"{TINY_TRAIN} hydra.run.dir=t/q"),
    Run("python -m experiments.train algo=linucb env=per_input_discrete", f"{TINY_TRAIN} hydra.run.dir=t/linucb"),
    Run("python -m experiments.train algo=ppo env=staged", f"{TINY_STAGED} hydra.run.dir=t/staged-ppo"),
    Run("python -m experiments.train algo=dqn env=staged_discrete", f"{TINY_STAGED} hydra.run.dir=t/staged-dqn"),
    Run("python -m experiments.train -m algo=ppo,appo,sac,linucb env=per_input_discrete seed=0,1,2,3,4",
        f"seed=0 {TINY_TRAIN} hydra.sweep.dir=multirun/train/$SWEEP_DATE"),
    Run("python -m experiments.compare multirun/train/<date>"),
    # Evaluation, export and publishing
    Run("python -m experiments.evaluate --pareto --controller dense --controller outputs/main/<run>/controllers/ppo_lam0.25",  # noqa: E501
        "--model tiny-llama --task generated --n-items 4 --out evaluate", fill={"<run>": "$MAIN_RUN"}),
    Run("python -m experiments.evaluate --pareto --stop-rules --controller outputs/main/<run>/controllers/staged_dqn_lam0.5",  # noqa: E501
        "--model tiny-llama --task generated --n-items 4 --fit-items 30 --out evaluate-staged",
        fill={"<run>": "$MAIN_RUN"}),
    Run("python -m experiments.evaluate --pareto --controller outputs/main/<run>/controllers/stop_classifier_lat0.70",  # noqa: E501
        "--model tiny-llama --task generated --n-items 4 --out evaluate-stop", fill={"<run>": "$MAIN_RUN"}),
    Run("python -m experiments.export outputs/train/<run> --out my-controller", fill={"<run>": "$TRAIN_RUN"}),
    Run("python -m experiments.publish my-controller --repo-id me/prunegym-ppo --dry-run /tmp/upload",
        "--dry-run upload"),
    Run("python -m experiments.headroom",
        "--model tiny-llama --limit 4 --plans 3 --repeats 1 --probe-layers 1 --no-write --png headroom.png"),
    # Pruning-ready models: the embedded model for a few steps, then the tiny one
    Run("python -m experiments.prepare", f"name=$TAG-ready time_budget_min=0.05 {SMALL_PREP}"),
    Run("python -m experiments.prepare text=[news] time_budget_min=10 name=my-ready",
        f"{TINY_PREP} time_budget_min=0.05 checkpoint_every=4 name=$TAG-my-ready"),
    Run("python -m experiments.prepare name=my-ready resume=true",
        f"{TINY_PREP} time_budget_min=0.1 name=$TAG-my-ready"),
    Run("python -m experiments.prepare model=tiny-llama max_steps=3 name=tiny-ready",
        f"{SMALL_PREP} name=$TAG-tiny-ready"),
    Run("python -m experiments.prepare choice_mix=mc choice_weight=1 name=my-choice",
        f"{TINY_PREP} time_budget_min=0.05 choice_train_items=8 eval_choice_items=2 name=$TAG-my-choice"),
    Run("python -m experiments.main model=smollm2_135m_ready",
        f"model.name=$TAG-my-ready ppo.time_s=5 bandit.time_s=3 eval.n_items=4 hydra.run.dir=main_ready {SMOKE_MAIN}"),
    Run("python -m experiments.bench.staged --model smollm2-135m-ready",
        "--quick --model $TAG-my-ready --task generated"),
    Run("python -m experiments.bench.staged --model smollm2-135m-ready --from-reports", "--no-write", cwd="repo"),
    Run("python -m experiments.bench.prepare curves --prepared smollm2-135m-ready --tasks 200",
        "--prepared $TAG-ready --tasks 0 --docs 1 --sequences 1 --seq-len 32 --no-latency"),
    Run("python -m experiments.bench.prepare mixing --prepared smollm2-135m-ready",
        "--prepared $TAG-ready --docs 1 --sequences 1 --seq-len 32 --prefix 8"),
    Run("python -m experiments.headroom --model smollm2-135m-ready",
        "--model $TAG-ready --limit 4 --plans 3 --repeats 1 --no-write --png headroom_ready.png"),
    # Replay: record the tiny model, train on its twin, export with claims, validate live
    Run("python -m experiments.record env=per_input_discrete task=mc split=train n_items=256",
        f"{TINY_RECORD} n_items=8 out=rec/train"),
    Run("python -m experiments.record env=per_input_discrete task=mc split=test n_items=240",
        f"{TINY_RECORD} n_items=6 out=rec/test"),
    Run("python -m experiments.train env=per_input_replay env.kwargs.dataset=outputs/record/PerInput-smollm2-135m algo=dqn",  # noqa: E501
        "env.kwargs.dataset=rec stop.iterations=1 eval.episodes=2 hydra.run.dir=outputs/train/replay-run"),
    Run("python -m experiments.export outputs/train/<run> --out my-replay-controller --claims outputs/record/PerInput-smollm2-135m --claims-split test",  # noqa: E501
        "--claims rec", fill={"<run>": "replay-run"}),
    Run("python -m experiments.train -m experiment=replay env=per_input_replay env.kwargs.dataset=outputs/record/PerInput-smollm2-135m algo=ppo,appo,impala,sac,dqn,linucb seed=0,1,2,3,4 hydra.sweep.dir=multirun/replay",  # noqa: E501
        "env.kwargs.dataset=rec algo=linucb,dqn seed=0,1 stop.env_steps=256 eval.episodes=4 cluster.envs_per_runner=8"),
    Run("python -m experiments.compare multirun/replay"),
    Run("python -m experiments.bench.replay comparison --dataset outputs/record/PerInput-smollm2-135m",
        "--dataset rec --algos linucb --seeds 2 --env-steps 256 --repeats 1 --no-write eval.episodes=4"),
    Run("python -m experiments.bench.replay steps --dataset outputs/record/PerInput-smollm2-135m",
        "--dataset rec --rounds 1 --replay-steps 200 --live-steps 2 --no-write"),
    Run("python -m experiments.bench.replay record --dataset outputs/record/PerInput-smollm2-135m",
        "--dataset rec --items 1 --no-write"),
    # six recorded inputs of a tiny model: a wider latency bound than the leaderboard's (32 inputs, default bound)
    Run("python -m experiments.validate my-replay-controller", "--repeats 3 --latency-tol 0.5"),
    # the tiny model's latency is mostly per-call overhead, which swings with load on a shared CI machine more
    # than the 5% bound; CI checks its accuracy exactly and its latency loosely (tests/test_leaderboard.py, slow,
    # holds the embedded entries to 5%)
    Run("python -m experiments.validate --leaderboard leaderboard/results.csv --only tiny",
        "--repeats 9 --latency-tol 0.25", cwd="repo"),
    # Beyond one machine: a head on 127.0.0.1, then a run that joins it
    Run("ray start --head --port=6379 --num-cpus=<cores>",
        "--port=$RAY_PORT --node-ip-address=127.0.0.1 --temp-dir=$RAY_TMP --include-dashboard=false "
        "--disable-usage-stats", env=RAY_LOCAL, teardown=stop_ray_head),
    Skip("ray start --address=<head ip>:6379 --num-cpus=<cores>",
         "joins a second machine to the head; CI has one machine (the run below joins the head from this one)",
         "tests/test_train.py::test_joins_an_existing_cluster"),
    Run("python -m experiments.train cluster=remote cluster.num_env_runners=8 hardware.env_threads=2",
        "cluster.address=127.0.0.1:$RAY_PORT cluster.num_env_runners=1 hardware.env_threads=1 experiment=smoke "
        "stop.iterations=1 eval.episodes=2 hydra.run.dir=t/remote", env=RAY_LOCAL),
]
# fmt: on


# ------------------------------------------------------------------------------------------ README
_FENCE = re.compile(r"^```bash\s*$")


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, in order, without comments, each once."""
    out: list[str] = []
    block = False
    for line in text.splitlines():
        stripped = line.strip()
        if not block:
            block = bool(_FENCE.match(stripped))
            continue
        if stripped.startswith("```"):
            block = False
            continue
        command = normalise(re.sub(r"(^|\s)#.*$", "", stripped))
        if command and command not in out:
            out.append(command)
    return out


def normalise(command: str) -> str:
    """``command`` with runs of whitespace as single spaces."""
    return " ".join(command.split())


def starts_with(short: str, readme: str) -> bool:
    """Whether ``short`` is ``readme`` followed by nothing or by more arguments (word by word)."""
    short, readme = normalise(short), normalise(readme)
    return short == readme or short.startswith(readme + " ")


# ------------------------------------------------------------------------------------------ running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def variables(scratch: Path) -> dict[str, str]:
    """The shell variables the short forms use."""
    tag = f"readme-{os.getpid()}"
    return {
        "SCRATCH": str(scratch),
        "TAG": tag,
        "MAIN_RUN": "readme-main",
        "TRAIN_RUN": "readme-train",
        "SWEEP_DATE": time.strftime("%Y-%m-%d_%H-%M-%S"),
        "RAY_PORT": str(_free_port()),
        # Short on purpose: Ray's unix socket paths under it must stay under ~107 characters.
        "RAY_TMP": tempfile.mkdtemp(prefix="rayci", dir="/tmp"),
    }


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["WANDB_MODE"] = "offline"  # logger=wandb without the network
    env.update(extra)
    return env


def _snapshot() -> dict[Path, bytes]:
    files: dict[Path, bytes] = {}
    for name in PROTECTED:
        path = REPO / name
        for p in [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []:
            if p.is_file():
                files[p] = p.read_bytes()
    return files


def _restore(before: dict[Path, bytes], readme: str) -> None:
    after = _snapshot()
    for path, data in before.items():
        if after.get(path) != data:
            path.write_bytes(data)
            print(f"  note: put back {path.relative_to(REPO)}, which `{readme}` rewrote")
    for path in set(after) - set(before):
        path.unlink()
        print(f"  note: removed {path.relative_to(REPO)}, which `{readme}` wrote")


def _cleanup(vars_: dict[str, str], keep: bool) -> None:
    """Remove what the short forms left in shared places (prepared models, predictors, allocations...) and $SCRATCH."""
    cache = Path(os.environ.get("PRUNEGYM_CACHE", Path.home() / ".cache" / "prunegym"))
    for sub in ("prepared", "prepare-checkpoints", "predictors", "exit_maps", "allocations"):
        for path in sorted((cache / sub).glob(f"{vars_['TAG']}-*")):
            shutil.rmtree(path, ignore_errors=True)
    if keep:
        print(f"kept {vars_['SCRATCH']}")
    else:
        shutil.rmtree(vars_["SCRATCH"], ignore_errors=True)
    shutil.rmtree(vars_["RAY_TMP"], ignore_errors=True)


def run_table(entries: list[Run | Skip], *, keep: bool = False) -> int:
    """Run the short forms in order; 0 when all succeed, 1 at the first failure (named on stderr)."""
    scratch = Path(tempfile.mkdtemp(prefix="prunegym-readme-"))
    vars_ = variables(scratch)
    teardowns: list[tuple[Callable[[dict[str, str]], None], dict[str, str]]] = []
    t_all = time.perf_counter()
    times: list[tuple[float, str]] = []
    try:
        for i, entry in enumerate(entries, 1):
            head = f"[{i}/{len(entries)}] README: {entry.readme}"
            if isinstance(entry, Skip):
                print(f"{head}\n  not run here: {entry.reason}; covered by {entry.covered_by}", flush=True)
                continue
            command = entry.command()
            print(f"{head}\n  runs: {command}", flush=True)
            env = _environment({**vars_, **entry.env})
            if entry.teardown is not None:
                teardowns.append((entry.teardown, env))
            before = _snapshot()
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(
                    ["bash", "-c", command],
                    cwd=REPO if entry.cwd == "repo" else scratch,
                    env=env,
                    timeout=entry.timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            finally:
                _restore(before, entry.readme)
            seconds = time.perf_counter() - t0
            times.append((seconds, entry.readme))
            print(f"  exit {rc} after {seconds:.0f} s", flush=True)
            if rc != 0:
                print(
                    f"README command failed: `{entry.readme}`\n  short form: {command}\n  exit status {rc}"
                    + (f" (timed out after {entry.timeout_s:.0f} s)" if rc == 124 else ""),
                    file=sys.stderr,
                    flush=True,
                )
                return 1
    finally:
        for teardown, env in reversed(teardowns):
            teardown(env)
        _cleanup(vars_, keep)
        total = time.perf_counter() - t_all
        print(f"README commands: {len(times)} run in {total:.0f} s; slowest:")
        for seconds, readme in sorted(times, reverse=True)[:5]:
            print(f"  {seconds:6.0f} s  {readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: run the table (or a part of it), or print it."""
    p = argparse.ArgumentParser(prog="python .ci/readme_commands.py", description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print each README command and its short form, run nothing")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the entries whose README command contains TEXT (repeatable; mind what they depend on)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="TEXT",
        help="leave out the entries whose README command contains TEXT (repeatable; for debugging, never in CI)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder the commands ran in")
    args = p.parse_args(argv)
    entries = [
        e
        for e in TABLE
        if (not args.only or any(t in e.readme for t in args.only)) and not any(t in e.readme for t in args.skip)
    ]
    if not entries:
        p.error(f"no README command is selected by --only {args.only} --skip {args.skip}: see --list")
    if args.list:
        for e in entries:
            target = e.command() if isinstance(e, Run) else f"(not run: {e.reason}; covered by {e.covered_by})"
            print(f"{e.readme}\n    -> {target}")
        return 0
    missing = [c for c in readme_commands(README.read_text(encoding="utf-8")) if c not in {e.readme for e in TABLE}]
    if missing:
        print("README commands without a short form in .ci/readme_commands.py:", *missing, sep="\n  ", file=sys.stderr)
        return 1
    return run_table(entries, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
