"""Export a trained controller: ``python -m experiments.export <run dir or checkpoint> --out <folder>``.

Reads the run's ``env_config.json`` (the training environment's own description: what the policy
observes and how its actions become plans), ``run_config.json`` (the algorithm), its latest
checkpoint (an RLlib checkpoint or the bandit's ``bandit.json``), ``final.json`` / ``metrics.jsonl``
(metrics) and a ``pareto*.png`` if present, loads the model the environment ran, and writes
``model.onnx``, ``model.safetensors``, ``card.json`` and ``README.md`` atomically (see
:mod:`agents.export`). Load the result with ``agents.controller.Controller.from_pretrained``.

With an exit table (``.npz``, :meth:`agents.staged.ExitTable.save`: ``experiments.bench.staged``
saves its train table under ``reports/``) as the source, it fits the stop classifier on it
and exports one operating point of the stop classifier: the one Learn-then-Test certifies for
``--delta``, or the one whose mean latency on the table is ``--latency``, as the main job
publishes them (:func:`agents.staged.stop_exports`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.export",
        description="Export a trained PruneGym policy (RLlib checkpoint or bandit state) as a standalone controller "
        "folder: model.onnx, model.safetensors, card.json, README.md. No pickle is written.",
    )
    p.add_argument(
        "source",
        help="a training run directory (uses checkpoints/latest.json), a checkpoint folder, or a train exit table "
        "(.npz) to fit and export the stop classifier from",
    )
    p.add_argument("--out", required=True, help="the export folder to create (must not exist unless --force)")
    p.add_argument("--algo", help="algorithm name, when the source has no run_config.json (ppo, sac, dqn, linucb...)")
    p.add_argument(
        "--env-config",
        help="the training environment's description (a JSON file of env.unwrapped.config()), when the source is "
        "not inside a training run directory",
    )
    p.add_argument("--pareto", help="a Pareto plot (PNG) to include in the model card")
    p.add_argument("--trained-on", help="description of the device the policy was trained and measured on")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument(
        "--claims",
        metavar="DATASET",
        help="a replay dataset (python -m experiments.record): the card states what the controller reaches on its "
        "recorded inputs, for python -m experiments.validate to check live",
    )
    p.add_argument("--claims-split", help="the split's recording inside --claims, for a folder of several")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument(
        "--delta",
        type=float,
        help="exit table source: the stop classifier Learn-then-Test certifies for agreement with dense >= 1 - delta",
    )
    stop.add_argument(
        "--latency",
        type=float,
        help="exit table source: the stop classifier's operating point whose mean latency on the table is nearest",
    )
    p.add_argument(
        "--epsilon", type=float, default=None, help="exit table source, with --delta: the certificate's failure rate"
    )
    args = p.parse_args(argv)
    table = str(args.source).endswith(".npz")
    if table and (args.delta is None) == (args.latency is None):
        p.error("an exit table source needs --delta or --latency: which operating point to export")
    if not table and (args.delta is not None or args.latency is not None or args.epsilon is not None):
        p.error("--delta, --latency and --epsilon apply to an exit table source (.npz) only")
    if args.latency is not None and not 0.0 < args.latency <= 1.5:
        p.error(f"--latency is a fraction of dense latency, got {args.latency}")
    return args


def export_stop(args: argparse.Namespace) -> Path:
    """Fit the stop classifier on the exit table ``args.source`` and export the operating point asked for.

    ``--latency``: the cost-aware classifier moved to that train latency (:func:`agents.staged.at_latency`);
    ``--delta``: Learn-then-Test's certified classifier (:func:`agents.staged.risk_controlled_classifiers`),
    the points the main job publishes (:func:`agents.staged.stop_exports`).

    Raises:
        SystemExit: The table is missing, or the operating point cannot be fitted or certified (with why).
    """
    from agents.export import export_stop_classifier
    from agents.staged import RISK_EPSILON, ExitTable, at_latency, fit_stop_classifiers, risk_controlled_classifiers
    from envs.base import shared_lm

    path = Path(args.source)
    if not path.is_file():
        raise SystemExit(f"no exit table at {path}")
    table = ExitTable.load(path)
    print(
        f"fitting the stop classifier on the {len(table.item_ids)} inputs of {path} (a minute or two)...",
        file=sys.stderr,
    )
    cert = None
    if args.delta is not None:
        epsilon = RISK_EPSILON if args.epsilon is None else args.epsilon
        try:
            (cert,) = risk_controlled_classifiers(table, [args.delta], epsilon)
        except ValueError as exc:
            raise SystemExit(f"--delta / --epsilon: {exc}") from None
        if isinstance(cert, str):
            raise SystemExit(f"delta={args.delta:g} cannot be certified on {path}: {cert}")
        clf = cert.rule
    else:
        fitted = fit_stop_classifiers(table)
        if isinstance(fitted, str):
            raise SystemExit(f"the stop classifier cannot be fitted on {path}: {fitted}")
        clf = at_latency(fitted[-1], table, args.latency)
    model = table.meta["env"]["model"]
    slm = shared_lm(str(model["name"]), str(model.get("dtype", "float32")))
    print(f"{clf.name}, {clf.kind}", file=sys.stderr)
    return export_stop_classifier(
        clf, table, args.out, slm=slm, certified=cert, trained_on=args.trained_on, force=args.force
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; prints the folder and the controller's summary."""
    args = parse_args(argv)
    from agents.controller import Controller
    from agents.export import export_from_path

    if str(args.source).endswith(".npz"):
        out = export_stop(args)
        print(f"exported {Controller.from_pretrained(out)} to {out}")
        return 0
    env_config = json.loads(Path(args.env_config).read_text()) if args.env_config else None
    out = export_from_path(
        args.source,
        args.out,
        algo=args.algo,
        env_config=env_config,
        pareto=args.pareto,
        trained_on=args.trained_on,
        force=args.force,
        claims_dataset=args.claims,
        claims_split=args.claims_split,
    )
    ctl = Controller.from_pretrained(out)
    print(f"exported {ctl} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
