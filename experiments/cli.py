"""Command-line plumbing shared by the Hydra entry points (``experiments.train``, ``main``, ``prepare``).

:func:`hydra_main` replaces ``@hydra.main``: a configuration error (a bad override, an unknown config
group option, a value the code refuses with :class:`ValueError`, a missing file) prints one line,
``error: <message>``, on stderr and exits with status 2, instead of Hydra's traceback and hint. The
message says what to fix; ``HYDRA_FULL_ERROR=1`` brings the full traceback back. Other exceptions
(bugs) keep their traceback.

Two layers make that work. Inside the job, a guard around the task function reports the error
before Hydra records the job as failed (Hydra would print an extra ``Error executing job ...`` line).
Around Hydra itself, a second guard reports errors raised while the config is composed (bad
overrides, missing options), which happen before any job runs, and failed multirun jobs, which
Hydra raises once every job of the sweep has run.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

#: Exceptions that mean "the configuration (or a path in it) is wrong", not "the code is wrong".
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes agents.rllib.IncompatibleEnvError
    FileNotFoundError,  # includes envs.runtime.models.UnknownModelError
    FileExistsError,
    OmegaConfBaseException,
    HydraException,
)
EXIT_CONFIG_ERROR = 2
FULL_ERROR = "HYDRA_FULL_ERROR"
# The user's HYDRA_FULL_ERROR while an entry point runs (it sets the variable itself for Hydra's sake).
_user_full_error: bool | None = None


def full_error() -> bool:
    """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get(FULL_ERROR, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of ``err`` (and of an OmegaConf cause Hydra wraps) on one line.

    OmegaConf messages carry ``full_key:`` / ``object_type=`` lines; only the key is kept. Hydra's
    "Available options" lists are joined with commas.
    """
    text = _flatten(_message(err))
    cause = err.__cause__
    if isinstance(err, HydraException) and isinstance(cause, OmegaConfBaseException):
        text = f"{text.rstrip('.')}: {_flatten(_message(cause))}"
    return text or type(err).__name__


def _message(err: BaseException) -> str:
    if isinstance(err, OmegaConfBaseException):
        first = str(err).split("\n", 1)[0].strip()
        key = getattr(err, "full_key", None)
        return f"{first} (key {key})" if key and str(key) not in first else first
    if isinstance(err, KeyError) and len(err.args) == 1:  # KeyError's str() adds quotes
        return str(err.args[0])
    return str(err)


def _flatten(text: str) -> str:
    """Lines joined into one: after a ``:`` or ``.`` with a space, indented list items with commas.

    Hydra's "Config search path" listing, which follows its "Available options", is dropped.
    """
    out = ""
    listing = False
    for raw in text.split("\nConfig search path", 1)[0].splitlines():
        line = raw.strip()
        if not line:
            continue
        if not out:
            out = line
        elif out.endswith(":"):
            out += " " + line
            listing = raw[:1].isspace()
        elif listing and raw[:1].isspace():
            out += ", " + line
        else:
            out += (" " if out.endswith(".") else "; ") + line
            listing = False
    return out


def report(err: BaseException) -> None:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    sys.stdout.flush()
    print(f"error: {one_line(err)} (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG_ERROR)


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra job
        return False


def hydra_main(config_name: str, config_path: str = "../conf") -> Callable[[Callable[[DictConfig], Any]], Callable]:
    """``@hydra.main(config_path, config_name, version_base=None)`` with one-line configuration errors.

    Args:
        config_name: The primary config (``conf/<config_name>.yaml``).
        config_path: The config folder, relative to the file of the decorated function.

    Returns:
        A decorator for the task function; the decorated function is the command's entry point
        (call it with no arguments; called with a config it runs the task directly, as with Hydra).
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable:
        @functools.wraps(task)  # Hydra unwraps it to find the config folder next to the task's file
        def guarded(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except CONFIG_ERRORS as err:
                user_full = full_error() if _user_full_error is None else _user_full_error
                if user_full or _multirun():  # multirun: let Hydra run the other jobs, reported below
                    raise
                report(err)

        job = hydra.main(config_path=config_path, config_name=config_name, version_base=None)(guarded)

        @functools.wraps(task)
        def entry(cfg_passthrough: DictConfig | None = None) -> Any:
            global _user_full_error
            if cfg_passthrough is not None:
                return task(cfg_passthrough)
            user_full = full_error()
            before = os.environ.get(FULL_ERROR)
            _user_full_error = user_full
            os.environ[FULL_ERROR] = "1"  # Hydra then re-raises instead of printing its own report
            try:
                return job()
            except CONFIG_ERRORS as err:
                if user_full:
                    raise
                report(err)
            finally:
                _user_full_error = None
                if before is None:
                    os.environ.pop(FULL_ERROR, None)
                else:
                    os.environ[FULL_ERROR] = before

        return entry

    return decorate


def checked_settings(cfg: Any, defaults: dict[str, Any], ints: dict[str, int], what: str) -> dict[str, Any]:
    """A run's settings as plain values: ``defaults`` filled in, unknown keys and out-of-range integers refused.

    Args:
        cfg: A Hydra config or a mapping (its ``hydra`` key is dropped).
        defaults: Every setting and its default.
        ints: Integer settings and their lowest allowed value.
        what: The settings' name in messages (``"predictor"``).

    Raises:
        ValueError: One line naming the setting and what it takes.
    """
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; the settings are {sorted(defaults)}")
    run = {**defaults, **data}
    for key, low in ints.items():
        value = run[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key}={value!r} is out of range: set {key}=<integer >= {low}>")
    return run


def plain_name(name: Any) -> str:
    """``name`` if it can name a folder under the cache (no ``/``, not starting with ``.`` or ``~``).

    Raises:
        ValueError: Otherwise, pointing at ``out=`` for a path.
    """
    if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name.startswith((".", "~")):
        raise ValueError(
            f"name={name!r} must be a plain folder name (no '/', not starting with '.'); use out= for a path"
        )
    return name


def add_timing_arguments(p: Any, *, rounds_flag: str = "--rounds", when: str = "", workers_note: str = "") -> None:
    """Add a measured sweep's timing options to the argparse parser ``p``: one wording and default everywhere.

    ``--timing-threads``, ``rounds_flag`` (timing rounds per input) and ``--workers``, all defaulting to
    :func:`agents.evaluation.timing_settings` and :func:`agents.evaluation.workers_for`; read them back
    with :func:`timing_arguments`. ``when`` prefixes the rounds and workers help ("with --pareto: ").
    """
    from agents.evaluation import TIMING_ROUNDS, TIMING_THREADS

    p.add_argument(
        "--timing-threads",
        type=int,
        default=None,
        help=f"torch threads of each timed run (default {TIMING_THREADS}: fewer than the cores, so other processes "
        "on the machine do not move the latency fractions)",
    )
    p.add_argument(
        rounds_flag,
        dest="timing_rounds",
        type=int,
        default=None,
        help=f"{when}timing rounds per input, each run's best counts (default {TIMING_ROUNDS})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"{when}processes sharing the inputs{workers_note}, each input's runs side by side in one of them "
        "(default: one per --timing-threads cores; 1: all in this process)",
    )


def timing_arguments(p: Any, args: Any) -> tuple[int, int, int]:
    """The timing rounds, timing threads and workers of ``args`` (parsed by ``p`` with :func:`add_timing_arguments`).

    A value below 1 exits through ``p.error`` with the reason.
    """
    from agents.evaluation import timing_settings, workers_for

    try:
        rounds, threads = timing_settings(args.timing_rounds, args.timing_threads)
        return rounds, threads, workers_for(threads, args.workers)
    except ValueError as e:
        p.error(str(e))
        raise  # p.error exits; this line is for type checkers
