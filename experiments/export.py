"""Export a trained controller: ``python -m experiments.export <run dir or checkpoint> --out <folder>``.

Reads the run's ``env_config.json`` (the training environment's own description: what the policy
observes and how its actions become plans), ``run_config.json`` (the algorithm), its latest
checkpoint (an RLlib checkpoint or the bandit's ``bandit.json``), ``final.json`` / ``metrics.jsonl``
(metrics) and a ``pareto*.png`` if present, loads the model the environment ran, and writes
``model.onnx``, ``model.safetensors``, ``card.json`` and ``README.md`` atomically (see
:mod:`agents.export`). Load the result with ``agents.controller.Controller.from_pretrained``.
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
    p.add_argument("source", help="a training run directory (uses checkpoints/latest.json) or a checkpoint folder")
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
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; prints the folder and the controller's summary."""
    args = parse_args(argv)
    from agents.controller import Controller
    from agents.export import export_from_path

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
