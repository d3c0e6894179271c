"""Validate a controller's claims live: ``python -m experiments.validate <controller folder> [--dataset DIR]``.

Re-runs an exported controller on the live environment, with measured latency, on the inputs of the
replay dataset its claims were made on (:func:`agents.validation.validate_live`), and checks the
claimed figures: mean dense-relative accuracy within ``--accuracy-tol`` (default 0.02) and mean
latency fraction within ``--latency-tol`` (default 5%, relative; judged only on the machine kind the
recording was made on, where a latency fraction means the same thing). The claims are the card's
(``metrics.claims``, written by ``python -m experiments.export --claims DATASET``) or a leaderboard
entry's (``--leaderboard leaderboard/results.csv`` validates every entry, or those ``--only`` names).

Exit status: 0 when every claim holds, 1 when one does not, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.report import markdown_table

REPO = Path(__file__).resolve().parent.parent


def leaderboard_rows(path: str | Path) -> list[dict[str, str]]:
    """The entries of a leaderboard CSV."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _resolve(value: str, base: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def validate_one(
    controller_dir: Path,
    dataset: Path | None,
    claims: dict[str, Any] | None,
    *,
    split: str | None,
    repeats: int,
    accuracy_tol: float,
    latency_tol: float,
) -> dict[str, Any]:
    """Validate one controller; returns the check (``ok``, claimed vs measured)."""
    from agents.controller import Controller
    from agents.validation import check_claims, validate_live
    from envs.base import shared_lm
    from envs.measure.meters import device_description

    ctl = Controller.from_pretrained(controller_dir)
    claims = claims or (ctl.card.get("metrics") or {}).get("claims")
    if not claims:
        raise ValueError(
            f"{controller_dir} states no claims (card metrics.claims): export it with --claims DATASET, or pass "
            "--leaderboard with its entry"
        )
    if dataset is None:
        if not claims.get("dataset_path"):
            raise ValueError("the claims name no dataset folder: pass --dataset DIR")
        given = Path(str(claims["dataset_path"]))  # as the export was given it: from there, else from the repository
        dataset = given if given.is_absolute() or given.exists() else REPO / given
    slm = shared_lm(ctl.model_id)
    ctl.interface(slm)  # refuses a model of other weights
    measured = validate_live(ctl, dataset, split=split or claims.get("split"), repeats=repeats)
    recorded_on = (claims.get("dataset") or measured["dataset"]).get("machine")
    here = device_description()
    comparable = recorded_on in (None, here)
    check = check_claims(
        claims, measured, accuracy_tol=accuracy_tol, latency_tol=latency_tol, latency_comparable=comparable
    )
    check["machines"] = {"claimed_on": recorded_on, "validated_on": here}
    return {"controller": str(controller_dir), "dataset": str(dataset), "inputs": measured["inputs"], **check}


def render(results: Sequence[dict[str, Any]]) -> str:
    """The checks as a Markdown table."""
    rows = []
    for r in results:
        a, lat = r["accuracy"], r["latency_fraction"]
        rows.append(
            [
                r.get("name") or Path(r["controller"]).name,
                r["inputs"],
                f"{a['claimed']:.3f} / {a['measured']:.3f} ({a['difference']:+.3f})",
                f"{lat['claimed']:.3f} / {lat['measured']:.3f} ({lat['relative_difference']:+.1%})"
                + ("" if r.get("latency_comparable", True) else " — another machine kind: not judged"),
                "holds" if r["ok"] else "**does not hold**",
            ]
        )
    headers = ["controller", "inputs", "accuracy claimed / live", "latency fraction claimed / live", "claim"]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m experiments.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("controller", nargs="?", help="an exported controller folder (its card's claims are checked)")
    p.add_argument("--dataset", type=Path, help="the replay dataset the claims were made on (default: the claims')")
    p.add_argument("--split", help="the split's recording inside --dataset, for a folder of several")
    p.add_argument("--leaderboard", type=Path, help="validate the entries of this leaderboard CSV instead")
    p.add_argument("--only", action="append", default=[], help="with --leaderboard: entries whose name has this")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per input (dense timed in each round)")
    p.add_argument("--accuracy-tol", type=float, default=0.02, help="allowed |accuracy difference| (absolute)")
    p.add_argument("--latency-tol", type=float, default=0.05, help="allowed |latency fraction difference| (relative)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if (args.controller is None) == (args.leaderboard is None):
        p.error("pass a controller folder or --leaderboard CSV (one of them)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    common = dict(repeats=args.repeats, accuracy_tol=args.accuracy_tol, latency_tol=args.latency_tol)
    results = []
    try:
        if args.leaderboard is not None:
            base = args.leaderboard.resolve().parent.parent  # paths in the CSV are relative to the repository
            rows = [
                r for r in leaderboard_rows(args.leaderboard) if not args.only or any(o in r["name"] for o in args.only)
            ]
            if not rows:
                p.error(f"no leaderboard entry matches {args.only}")
            for row in rows:
                claims = {k: float(row[k]) for k in ("accuracy", "latency_fraction")}
                res = validate_one(
                    _resolve(row["controller"], base),
                    _resolve(row["dataset"], base),
                    claims,
                    split=row.get("split"),
                    **common,
                )
                results.append({"name": row["name"], **res})
        else:
            results.append(validate_one(Path(args.controller), args.dataset, None, split=args.split, **common))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))
    failed = [r for r in results if not r["ok"]]
    if failed:
        print(f"{len(failed)} of {len(results)} claims do not hold", file=sys.stderr)
        return 1
    print(f"{len(results)} claim(s) hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
