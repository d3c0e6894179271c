"""The standalone controller: a trained pruning policy loaded from an exported folder, with no Ray at all.

An export (``python -m experiments.export``) is a folder of

- ``model.onnx``: the policy's deterministic inference, observation in, environment action out (the
  keep fractions of a Box action already rescaled to the action space, or the index of a discrete
  preset); run here with onnxruntime on one thread;
- ``model.safetensors``: the same policy's weights, for users who rebuild it in torch;
- ``card.json``: what the policy sees and does (:data:`CARD_SCHEMA_VERSION`): the environment id and
  version, the observation (the probe's configuration), the action and how it becomes a
  :class:`~envs.runtime.plan.SparsityPlan`, the LLM's id and weights hash, the device, metrics, versions and
  the sha256 of each file;
- ``README.md``: the model card for people.

:class:`Controller` checks all of it on load: the card's schema, every file's sha256 (a tampered
or truncated file is refused), and, when given the :class:`~envs.runtime.sparse_lm.SparseLM` it will drive,
the model's weights hash (a controller trained for another model is refused). Observations of the
wrong size are refused with the size the controller expects.

This module imports numpy, onnxruntime and (lazily, for plans) ``envs``; never Ray or torch at
import time, so a deployment needs neither the training stack nor its start-up cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from envs.runtime.plan import SparsityPlan
    from envs.runtime.sparse_lm import SparseLM

CARD_SCHEMA_VERSION = 1
CARD_FORMAT = "prunegym-controller"
CARD_FILE = "card.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"


class ControllerError(ValueError):
    """An exported controller that cannot be used as it is: the message says what is wrong and how to fix it."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def importance_hash(importance: Any) -> str:
    """A short hash of an :class:`~envs.runtime.importance.Importance` ordering (what goes first)."""
    data = {
        "layer_order": list(importance.layer_order),
        "head_order": [list(x) for x in importance.head_order],
        "kv_order": [list(x) for x in importance.kv_order],
        "mlp_order": [list(x) for x in importance.mlp_order],
    }
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()[:16]


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate ``card.json`` of an exported folder (or the file itself).

    Raises:
        ControllerError: Missing file, not JSON, another format or an unsupported schema version.
    """
    path = Path(path)
    card_path = path / CARD_FILE if path.is_dir() else path
    if not card_path.is_file():
        raise ControllerError(
            f"no {CARD_FILE} at {card_path}: pass the folder written by `python -m experiments.export`"
        )
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControllerError(f"{card_path} is not valid JSON ({exc}); re-export the controller") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise ControllerError(
            f"{card_path} is not a PruneGym controller card (format "
            f"{card.get('format') if isinstance(card, dict) else None!r}, expected {CARD_FORMAT!r})"
        )
    version = card.get("schema_version")
    if version != CARD_SCHEMA_VERSION:
        raise ControllerError(
            f"{card_path} has card schema_version {version!r}; this PruneGym reads version {CARD_SCHEMA_VERSION}. "
            "Re-export the controller with this version (python -m experiments.export) or install the matching PruneGym"
        )
    for key in ("env", "observation", "action", "model", "files"):
        if key not in card:
            raise ControllerError(f"{card_path} lacks the {key!r} section; re-export the controller")
    return card


def verify_files(folder: str | Path, card: Mapping[str, Any]) -> None:
    """Check every file the card lists against its recorded sha256 and size.

    Raises:
        ControllerError: A listed file is missing or differs from what was exported.
    """
    folder = Path(folder)
    for name, meta in dict(card["files"]).items():
        path = folder / name
        if not path.is_file():
            raise ControllerError(f"{path} is missing; the export lists it in {CARD_FILE}. Re-download or re-export it")
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            raise ControllerError(
                f"{path} does not match {CARD_FILE}: sha256 {digest[:16]}..., "
                f"expected {str(meta.get('sha256'))[:16]}... "
                f"({path.stat().st_size} bytes, expected {meta.get('bytes')}). The file was modified or is incomplete: "
                "re-download or re-export the controller"
            )


class Controller:
    """A pruning policy from an exported folder: observation -> action -> :class:`~envs.runtime.plan.SparsityPlan`.

    Build it with :meth:`from_pretrained`. Deterministic: the same observation gives the same action
    (the policy's mean action, or its arg-max).

    Args:
        card: The validated card.
        session: An onnxruntime ``InferenceSession`` of ``model.onnx``.
        folder: Where it was loaded from.
    """

    def __init__(self, card: dict[str, Any], session: Any, folder: Path | None = None) -> None:
        self.card = card
        self.session = session
        self.folder = folder
        obs = card["observation"]
        self.observation_size = int(np.prod(obs["shape"]))
        act = card["action"]
        self.action_kind: str = act["kind"]
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self._builders: dict[int, Any] = {}
        self._probes: dict[int, Any] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        slm: SparseLM | None = None,
        *,
        threads: int = 1,
        verify: bool = True,
    ) -> Controller:
        """Load an exported controller folder.

        Args:
            path: The folder written by ``python -m experiments.export`` (or downloaded from the Hub).
            slm: The model the controller will drive; when given, its weights hash must be the one the
                controller was trained for.
            threads: onnxruntime intra-op threads (1: a decision is a few small matmuls; more threads
                only add hand-off latency and compete with the LLM for cores).
            verify: Check the files' sha256 against the card (leave on unless a benchmark reloads in a loop).

        Raises:
            ControllerError: Bad schema, tampered files, or a controller for another model.
        """
        folder = Path(path)
        card = read_card(folder)
        if verify:
            verify_files(folder, card)
        if slm is not None:
            check_model(card, slm)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        onnx_path = folder / card.get("onnx", {}).get("file", ONNX_FILE)
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        return cls(card, session, folder)

    # ------------------------------------------------------------------ properties
    @property
    def env_id(self) -> str:
        """The Gymnasium id the controller was trained on."""
        return str(self.card["env"]["id"])

    @property
    def env_kind(self) -> str:
        """``"per_input"``, ``"per_token"`` or ``"layer_by_layer"``: when the controller decides."""
        return str(self.card["env"]["kind"])

    @property
    def model_id(self) -> str:
        """The LLM the controller was trained for."""
        return str(self.card["model"]["id"])

    @property
    def weights_hash(self) -> str:
        """The weights hash of that LLM."""
        return str(self.card["model"]["weights_hash"])

    # ------------------------------------------------------------------ decisions
    def _check_obs(self, observation: Any) -> np.ndarray:
        x = np.asarray(observation, dtype=np.float32)
        n = self.observation_size
        if x.ndim <= 1:
            if x.size != n:
                raise ValueError(
                    f"observation has {x.size} values, but this controller expects {n} "
                    f"({self.card['observation'].get('description', 'see card.json')}); "
                    f"it was trained on {self.env_id} with the probe settings in card.json"
                )
            return x.reshape(1, n)
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"a batch of observations must have shape (batch, {n}), got {x.shape}")
        return np.ascontiguousarray(x)

    def select_action(self, observation: Any) -> np.ndarray | int:
        """The deterministic action for one observation (or a ``(batch, n)`` array of them).

        Returns:
            Box actions: ``float32`` keep fractions of the action's shape (``(batch, ...)`` for a batch).
            Discrete actions: an ``int`` (an ``int64`` array for a batch).

        Raises:
            ValueError: The observation has the wrong size (the message gives the expected one).
        """
        x = self._check_obs(observation)
        out = self.session.run([self._output], {self._input: x})[0]
        single = np.asarray(observation).ndim <= 1
        if self.action_kind == "discrete":
            out = np.asarray(out, dtype=np.int64).reshape(-1)
            return int(out[0]) if single else out
        out = np.asarray(out, dtype=np.float32).reshape(x.shape[0], *self.card["action"]["shape"])
        return out[0] if single else out

    def action_fractions(self, action: np.ndarray | int) -> np.ndarray:
        """Keep fractions ``[num_groups, 3]`` an action means, as the environment reads it (clipped to [0, 1])."""
        act = self.card["action"]
        g = int(act["num_groups"])
        if self.action_kind == "discrete":
            presets = np.asarray(act["presets"], dtype=np.float64)
            k = int(action)
            if not 0 <= k < len(presets):
                raise ValueError(f"discrete action must be in [0, {len(presets) - 1}], got {k}")
            return np.tile(presets[k], (g, 1))
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.size != 3 * g:
            raise ValueError(f"action must have {3 * g} keep fractions ([layers, heads, mlp] per group), got {a.size}")
        return np.clip(a, 0.0, 1.0).reshape(g, 3)

    def select_plan(
        self,
        observation: Any,
        slm: SparseLM,
        *,
        seq_len: int | None = None,
        past_len: int = 0,
    ) -> SparsityPlan:
        """The plan for one observation, built for ``slm`` exactly as the training environment built it.

        Layers outside the action's groups (the probe's, for ``PerInput``) run densely. With a
        ``budget`` in the card, the action wall of the environment scales the fractions down until
        the plan's decoder FLOPs for ``seq_len`` new tokens after ``past_len`` are within it.

        Args:
            observation: One observation.
            slm: The model; its weights hash must match the card's.
            seq_len: Tokens the plan will run (the prompt for per-input controllers, 1 per token);
                only needed when the card has a budget.
            past_len: Tokens already in the KV cache.

        Raises:
            ControllerError: ``slm`` is not the model the controller was trained for.
            ValueError: The observation has the wrong size.
        """
        action = self.select_action(observation)
        return self.plan_for_action(action, slm, seq_len=seq_len, past_len=past_len)

    def plan_for_action(
        self, action: np.ndarray | int, slm: SparseLM, *, seq_len: int | None = None, past_len: int = 0
    ) -> SparsityPlan:
        """The plan an action means for ``slm`` (see :meth:`select_plan`)."""
        builder = self._builder(slm)
        fr = self.action_fractions(action)
        budget = self.card["action"].get("budget")
        if budget is not None:
            from envs.base import wall

            if seq_len is None:
                raise ValueError("this controller has a FLOPs budget: pass seq_len (tokens the plan will run)")
            fr, _ = wall(fr, lambda f: builder.flops_fraction(builder.plan(f), seq_len, past_len), float(budget))
        return builder.plan(fr)

    def _builder(self, slm: SparseLM) -> Any:
        key = id(slm)
        builder = self._builders.get(key)
        if builder is None:
            check_model(self.card, slm)
            from envs.base import PlanBuilder

            act = self.card["action"]
            builder = PlanBuilder(slm, act["groups"], act.get("fixed_dense", []))
            self._builders = {key: builder}  # one model at a time; the builder holds a reference to it
        return builder

    def probe(self, slm: SparseLM) -> Any:
        """The observation probe of a per-input controller, configured from the card, for ``slm``."""
        cfg = self.card["observation"].get("probe")
        if not cfg:
            raise ControllerError(f"{self.env_id} controllers observe no probe; see card.json 'observation'")
        key = id(slm)
        probe = self._probes.get(key)
        if probe is None:
            check_model(self.card, slm)
            from envs.observation import PROBE_VERSION, Probe

            if int(cfg.get("version", PROBE_VERSION)) != PROBE_VERSION:
                raise ControllerError(
                    f"the controller's probe is version {cfg.get('version')}, this PruneGym computes version "
                    f"{PROBE_VERSION}: install the PruneGym version it was exported with"
                )
            probe = Probe(
                slm, int(cfg["layers"]), int(cfg["proj_dim"]), int(cfg["proj_seed"]), int(cfg["ll_positions"])
            )
            if probe.dim != self.observation_size:
                raise ControllerError(
                    f"the probe configured from card.json yields {probe.dim} features, the controller expects "
                    f"{self.observation_size}: the card is inconsistent; re-export the controller"
                )
            self._probes = {key: probe}
        return probe

    def __repr__(self) -> str:
        act = self.card["action"]
        shape = act.get("shape") if self.action_kind == "box" else f"Discrete({act.get('n')})"
        return (
            f"Controller({self.card.get('algo')}, env={self.env_id}, model={self.model_id}, "
            f"obs={self.observation_size}, action={shape})"
        )


def check_model(card: Mapping[str, Any], slm: SparseLM) -> None:
    """Refuse a model whose weights are not those the controller was trained for.

    Raises:
        ControllerError: Naming both hashes and both models.
    """
    want = str(card["model"]["weights_hash"])
    got = slm.weights_hash
    if got != want:
        raise ControllerError(
            f"this controller was trained for model {card['model'].get('id')!r} (weights hash {want}), "
            f"but the model given is {getattr(slm, 'name', '?')!r} with weights hash {got}. Load the model it was "
            "trained for, or train/export a controller for this one"
        )
    spec = card["model"].get("spec")
    if spec is not None and dict(spec) != slm.spec.to_dict():
        raise ControllerError(f"the card's model shape {spec} differs from the model's {slm.spec.to_dict()}")
    want_imp = card["model"].get("importance_hash")
    if want_imp and want_imp != importance_hash(slm.importance):
        warnings.warn(
            f"the model's importance ordering ({importance_hash(slm.importance)}) differs from the one the "
            f"controller was trained with ({want_imp}): plans will keep other heads/channels than in training. "
            "Load the model with SparseLM.from_pretrained (cached calibration) to match",
            stacklevel=3,
        )


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Median and p95 of a list of timings (seconds), for benchmarks and cards."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"median": math.nan, "p95": math.nan}
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95))}
