"""Recorded outcomes: a replay dataset of every discrete action path on every input of a split.

A dataset is a folder written by ``python -m experiments.record``:

- ``card.json``: what was recorded (:data:`FORMAT`, :data:`VERSION`): the environment's own
  description (``env.config()``: id, version, interface, model and weights hash, data, reward), the
  latency repeats, the machine and library versions, the date, and the shards with their sha256;
- ``shard-NNNNN.parquet``: one row per (input, action path), :data:`COLUMNS`.

A *path* is the sequence of discrete actions of one episode: one preset for ``PerInput``, one per
layer group for ``LayerByLayer``. Rows of an input are ordered by path, lexicographically, so the
row of a path is its number in base ``n_actions``. Each row holds the observation before every step
of its path, the item's raw and dense-relative score under the assembled plan, its decoder FLOPs
fraction, the calibrated latency (and energy) fraction the live calibrated environment computes,
and ``repeats`` measured latencies of the plan and of the dense model, timed in the same rounds
(the machine is named per shard; latencies are comparable only within one machine kind).

:class:`ReplayData` loads a dataset into dense numpy arrays for the replay twins; it refuses a
dataset whose model, weights hash, environment version or split is not the one asked for, naming
the mismatch and the command that rebuilds it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.data.files import atomic_write_bytes, atomic_write_json, sha256_file

FORMAT = "prunegym-replay"
VERSION = 1
CARD = "card.json"
RECORD_COMMAND = "python -m experiments.record"
COLUMNS = (
    "item_index",  # index of the input in the recorded environment's items
    "item_id",
    "task",
    "prompt_tokens",
    "path",  # list<int>: the discrete action of each step
    "obs",  # list<list<float32>>: the observation before each step of the path
    "accuracy_raw",
    "accuracy_dense_relative",
    "flops_fraction",
    "latency_fraction",  # calibrated (the cost model of the recording machine), exactly as the live env
    "energy_fraction",  # calibrated, or null
    "latency_s",  # list<float64>: measured repeats of probe + rest under the plan
    "dense_latency_s",  # list<float64>: the dense prompt, timed in the same rounds
    "machine",
)


class ReplayDataError(ValueError):
    """A dataset that cannot serve the request: the message names the mismatch and the command that rebuilds it."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{int(index):05d}.parquet"


def write_shard(folder: str | Path, index: int, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write one shard atomically; returns its card entry (file, rows, inputs, sha256, machine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not rows:
        raise ValueError("a shard needs at least one row")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"rows lack the columns {missing}")
    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    path = atomic_write_bytes(folder / shard_name(index), sink.getvalue().to_pybytes())
    return {
        "file": path.name,
        "index": int(index),
        "rows": len(rows),
        "inputs": sorted({int(r["item_index"]) for r in rows}),
        "machine": sorted({str(r["machine"]) for r in rows}),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }


def write_card(folder: str | Path, card: Mapping[str, Any]) -> Path:
    """Write ``card.json`` atomically (the shards it lists are read through it)."""
    return atomic_write_json(Path(folder) / CARD, dict(card), indent=1, default=str)


def read_card(folder: str | Path) -> dict[str, Any]:
    """The dataset's card.

    Raises:
        ReplayDataError: No card, another format or version.
    """
    path = Path(folder) / CARD
    if not path.is_file():
        raise ReplayDataError(f"no replay dataset at {folder} ({CARD} missing): record one with `{RECORD_COMMAND}`")
    card = json.loads(path.read_text())
    if card.get("format") != FORMAT or card.get("version") != VERSION:
        raise ReplayDataError(
            f"{path} is {card.get('format')!r} version {card.get('version')!r}, this PruneGym reads {FORMAT!r} "
            f"version {VERSION}: record it again with `{RECORD_COMMAND}`"
        )
    return card


@dataclass
class ReplayData:
    """A dataset's outcomes as dense arrays, indexed by (input, path number).

    Attributes:
        card: The dataset's card.
        n_actions: Discrete actions per step.
        steps: Steps of an episode (path length).
        item_ids: Recorded inputs' ids, in order.
        tasks: Their tasks.
        obs: ``[inputs, paths, steps, dim]`` float32: the observation before each step.
        raw, rel, flops, latency, energy: ``[inputs, paths]`` float64 (energy NaN where not recorded).
        latency_s, dense_latency_s: ``[inputs, paths, repeats]`` measured seconds.
        machines: The machine kinds of the shards loaded.
    """

    card: dict[str, Any]
    n_actions: int
    steps: int
    item_ids: list[str]
    tasks: list[str]
    obs: np.ndarray
    raw: np.ndarray
    rel: np.ndarray
    flops: np.ndarray
    latency: np.ndarray
    energy: np.ndarray
    latency_s: np.ndarray
    dense_latency_s: np.ndarray
    machines: list[str]

    @property
    def n_inputs(self) -> int:
        """Recorded inputs."""
        return len(self.item_ids)

    @property
    def n_paths(self) -> int:
        """Action paths per input."""
        return self.n_actions**self.steps

    @functools.cached_property
    def median_latency(self) -> np.ndarray:
        """``[inputs, paths]``: median measured latency over the dense prompt's median, from the same rounds."""
        return np.median(self.latency_s, axis=2) / np.median(self.dense_latency_s, axis=2)

    def path(self, number: int) -> list[int]:
        """The actions of path ``number``, first step first (the inverse of :meth:`path_index`)."""
        out = []
        for _ in range(self.steps):
            number, a = divmod(int(number), self.n_actions)
            out.append(a)
        return out[::-1]

    def path_index(self, path: Iterable[int]) -> int:
        """The row number of a (possibly partial) path; missing steps count as action 0."""
        p = list(path) + [0] * (self.steps - len(list(path)))
        idx = 0
        for a in p[: self.steps]:
            idx = idx * self.n_actions + int(a)
        return idx

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        allow_mixed_machines: bool = False,
    ) -> ReplayData:
        """Load every shard the card lists (each checked against its sha256).

        Args:
            folder: The dataset folder.
            expect: What the caller needs, any of ``model``, ``weights_hash``, ``env`` (class name),
                ``version``, ``split``, ``task``: a dataset that differs is refused.
            allow_mixed_machines: Accept shards recorded on different machine kinds (their
                latencies are not comparable; refused by default).

        Raises:
            ReplayDataError: A mismatch with ``expect``, a shard that fails its hash, mixed machines,
                or missing inputs; the message names it and the command that rebuilds the dataset.
        """
        import pyarrow.parquet as pq

        folder = Path(folder)
        card = read_card(folder)
        _check_expected(card, expect or {})
        shards = card.get("shards") or []
        if not shards:
            raise ReplayDataError(f"{folder} lists no shards: finish the recording with `{card.get('command')}`")
        tables = []
        for s in shards:
            path = folder / s["file"]
            if not path.is_file() or sha256_file(path) != s["sha256"]:
                raise ReplayDataError(f"{path} is missing or differs from {CARD}: record it again (resume=true)")
            tables.append(pq.read_table(path))
        machines = sorted({m for s in shards for m in s["machine"]})
        if len(machines) > 1 and not allow_mixed_machines:
            raise ReplayDataError(
                f"{folder} mixes shards recorded on {machines}: their latencies are not comparable. Record on one "
                "machine kind, or pass allow_mixed_machines=True to replay them anyway"
            )
        return cls._from_tables(card, tables, machines)

    @classmethod
    def _from_tables(cls, card: dict[str, Any], tables: list[Any], machines: list[str]) -> ReplayData:
        import pyarrow as pa

        t = pa.concat_tables(tables).to_pydict()
        n_actions, steps = int(card["n_actions"]), int(card["steps"])
        P = n_actions**steps
        order = sorted(
            range(len(t["item_index"])), key=lambda r: (t["item_index"][r], _number(t["path"][r], n_actions))
        )
        inputs = sorted(set(t["item_index"]))
        if len(order) != len(inputs) * P:
            raise ReplayDataError(
                f"the dataset has {len(order)} rows for {len(inputs)} inputs, expected {P} paths each"
            )
        n = len(inputs)
        reps = len(t["latency_s"][order[0]])
        dim = len(t["obs"][order[0]][0])

        def grid(col: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            vals = [np.nan if t[col][r] is None else t[col][r] for r in order]
            return np.asarray(vals, dtype=dtype).reshape(shape)

        return cls(
            card=card,
            n_actions=n_actions,
            steps=steps,
            item_ids=[t["item_id"][order[i * P]] for i in range(n)],
            tasks=[t["task"][order[i * P]] for i in range(n)],
            obs=np.asarray([t["obs"][r] for r in order], dtype=np.float32).reshape(n, P, steps, dim),
            raw=grid("accuracy_raw", np.float64, (n, P)),
            rel=grid("accuracy_dense_relative", np.float64, (n, P)),
            flops=grid("flops_fraction", np.float64, (n, P)),
            latency=grid("latency_fraction", np.float64, (n, P)),
            energy=grid("energy_fraction", np.float64, (n, P)),
            latency_s=np.asarray([t["latency_s"][r] for r in order], dtype=np.float64).reshape(n, P, reps),
            dense_latency_s=np.asarray([t["dense_latency_s"][r] for r in order], dtype=np.float64).reshape(n, P, reps),
            machines=machines,
        )


def _number(path: Sequence[int], n: int) -> int:
    idx = 0
    for a in path:
        idx = idx * n + int(a)
    return idx


def _check_expected(card: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    env = card.get("env") or {}
    have = {
        "model": (env.get("model") or {}).get("name"),
        "weights_hash": (env.get("model") or {}).get("weights_hash"),
        "env": env.get("env"),
        "version": env.get("version"),
        "split": (env.get("data") or {}).get("split"),
        "task": (env.get("data") or {}).get("task"),
    }
    for key, want in expect.items():
        if key not in have:
            raise ValueError(f"unknown dataset property {key!r}; known: {sorted(have)}")
        if want is not None and have[key] != want:
            raise ReplayDataError(
                f"the replay dataset was recorded with {key}={have[key]!r}, but {want!r} is asked for. Record one "
                f"for it: `{card.get('command') or RECORD_COMMAND}` with {key} set accordingly"
            )
