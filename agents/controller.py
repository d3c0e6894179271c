"""The standalone controller: a trained pruning policy loaded from an exported folder, with no Ray at all.

An export (``python -m experiments.export``) is a folder of

- ``model.onnx``: the policy's deterministic inference, observation in, environment action out (the
  keep fractions of a Box action already rescaled to the action space, or the index of a discrete
  preset); run here with onnxruntime on one thread;
- ``model.safetensors``: the same policy's weights, for users who rebuild it in torch;
- ``card.json``: what the policy sees and does (:data:`CARD_SCHEMA_VERSION`): the training
  environment's own description (``interface``: its observation and its action → plan mapping,
  :meth:`envs.base.PruneEnv.config`), the environment, data and reward it was trained with, the
  LLM's id and weights hash, the device, metrics, versions, the sha256 of every other file, and
  ``card_sha256``, the hash of the card itself;
- ``README.md``: the model card for people.

:class:`Controller` checks all of it on load: the card's schema and its own hash (an edited card is
refused), every file's sha256 (a tampered or truncated file is refused), that the folder holds no
file the card does not list (a stray pickle is refused), and, when given the
:class:`~envs.runtime.sparse_lm.SparseLM` it will drive, the model's weights hash (a controller
trained for another model is refused). It rebuilds observations and plans only from the card's
``interface`` (:meth:`envs.interface.Interface.from_config`), the same code the environment ran.

This module imports numpy, onnxruntime and (lazily) the runtime and :mod:`envs.interface`; never
Ray, gymnasium or torch at import time.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from envs.data.files import card_digest, card_digest_problem, sha256_file

if TYPE_CHECKING:
    from envs.interface import Interface
    from envs.observation import ProbeResult
    from envs.runtime.plan import SparsityPlan
    from envs.runtime.sparse_lm import SparseLM

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "CARD_SCHEMA_VERSION",
    "Controller",
    "ControllerError",
    "card_digest",
    "check_model",
    "importance_hash",
    "read_card",
    "sha256_file",
    "verify_files",
]

CARD_SCHEMA_VERSION = 2
CARD_FORMAT = "prunegym-controller"
CARD_FILE = "card.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"
CARD_SECTIONS = ("env", "interface", "model", "policy", "onnx", "files", "card_sha256")
# Bookkeeping that hub clients add to a downloaded folder; never read.
IGNORED = (".gitattributes", ".cache/huggingface/")


class ControllerError(ValueError):
    """An exported controller that cannot be used as it is: the message says what is wrong and how to fix it."""


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
        ControllerError: Missing file, not JSON, another format or schema version, a missing
            section, or a card whose content does not match its ``card_sha256`` (it was edited).
    """
    path = Path(path)
    card_path = path / CARD_FILE if path.is_dir() else path
    if not card_path.is_file():
        raise ControllerError(
            f"no {CARD_FILE} at {card_path}: pass the folder written by `python -m experiments.export`"
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
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
    missing = [k for k in CARD_SECTIONS if k not in card]
    if missing:
        raise ControllerError(f"{card_path} lacks {missing}; re-export the controller")
    problem = card_digest_problem(card)
    if problem is not None:
        raise ControllerError(f"{card_path} {problem}. Re-download or re-export the controller; do not edit the card")
    if not isinstance(card["files"], dict) or not card["files"]:
        raise ControllerError(f"{card_path} lists no files; re-export the controller")
    return card


def _listed_path(folder: Path, name: Any) -> Path:
    """``folder / name`` for a file the card lists, refusing names that leave the folder."""
    rel = Path(str(name))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or str(name) == CARD_FILE:
        raise ControllerError(f"{CARD_FILE} lists the file {name!r}, which is not a file inside the folder")
    return folder / rel


def verify_files(folder: str | Path, card: Mapping[str, Any]) -> None:
    """Check every file the card lists against its sha256 and size, and that nothing else is in the folder.

    Raises:
        ControllerError: A listed file is missing or differs from what was exported, or the folder
            holds a file the card does not list (a stray file could be loaded in the policy's place).
    """
    folder = Path(folder)
    listed = set()
    for name, meta in dict(card["files"]).items():
        path = _listed_path(folder, name)
        listed.add(path.relative_to(folder).as_posix())
        if not path.is_file():
            raise ControllerError(f"{path} is missing; the export lists it in {CARD_FILE}. Re-download or re-export it")
        digest = sha256_file(path)
        if not isinstance(meta, Mapping) or digest != meta.get("sha256"):
            want = meta.get("sha256") if isinstance(meta, Mapping) else meta
            raise ControllerError(
                f"{path} does not match {CARD_FILE}: sha256 {digest[:16]}..., expected {str(want)[:16]}... "
                f"({path.stat().st_size} bytes). The file was modified or is incomplete: re-download or re-export "
                "the controller"
            )
    extra = sorted(
        rel
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink())
        and (rel := p.relative_to(folder).as_posix()) not in listed
        and rel != CARD_FILE
        and not any(rel == ign or rel.startswith(ign) for ign in IGNORED)
    )
    if extra:
        raise ControllerError(
            f"{folder} holds files its {CARD_FILE} does not list: {extra}. A controller folder holds only what "
            "`python -m experiments.export` wrote; remove them (or re-download the folder)"
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
    from envs.runtime.sparse_lm import MODEL_ATTACHMENTS

    for key, (what, setter, loader) in MODEL_ATTACHMENTS.items():
        want_att = (card["model"].get(key) or {}).get("card_sha256")
        if not want_att:
            continue
        got_att = getattr(getattr(slm, key, None), "card", {}).get("card_sha256")
        if got_att != want_att:
            name = card["model"][key].get("name")
            has = f"no {what}" if got_att is None else f"another ({got_att[:12]})"
            raise ControllerError(
                f"this controller's plans run with the {what} {name!r} (card {want_att[:12]}), but the model has "
                f"{has}: load it with slm.{setter}({loader}({name!r}, slm), name={name!r})"
            )
    want_imp = card["model"].get("importance_hash")
    if want_imp and want_imp != importance_hash(slm.importance):
        warnings.warn(
            f"the model's importance ordering ({importance_hash(slm.importance)}) differs from the one the "
            f"controller was trained with ({want_imp}): plans will keep other heads/channels than in training. "
            "Load the model with SparseLM.from_pretrained (cached calibration) to match",
            stacklevel=3,
        )


class Controller:
    """A pruning policy from an exported folder: observation -> action -> :class:`~envs.runtime.plan.SparsityPlan`.

    Build it with :meth:`from_pretrained`. Deterministic: the same observation gives the same action
    (the policy's mean action, or its arg-max). Observations and plans come from
    :meth:`interface`, rebuilt from the card's description of the training environment.

    Args:
        card: The validated card.
        session: An onnxruntime ``InferenceSession`` of ``model.onnx``.
        folder: Where it was loaded from.
    """

    def __init__(self, card: dict[str, Any], session: Any, folder: Path | None = None) -> None:
        self.card = card
        self.session = session
        self.folder = folder
        obs = card["interface"]["observation"]
        self.observation_size = int(np.prod(obs["shape"]))
        self.action_card: dict[str, Any] = card["interface"]["action"]
        self.action_kind: str = self.action_card["kind"]
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self._interfaces: dict[int, Interface] = {}

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
            verify: Check the files' sha256 against the card and refuse unlisted files (leave on
                unless a benchmark reloads in a loop); the card's own hash is always checked.

        Raises:
            ControllerError: Bad schema, an edited card, tampered or unlisted files, or a controller
                for another model.
        """
        folder = Path(path)
        card = read_card(folder)
        if verify:
            verify_files(folder, card)
        onnx_name = str(card["onnx"].get("file", ONNX_FILE))
        if onnx_name not in card["files"]:
            raise ControllerError(f"{CARD_FILE} names {onnx_name!r} as the policy but does not list it in 'files'")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(_listed_path(folder, onnx_name)), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ControllerError(f"{folder / onnx_name} is not a loadable ONNX model ({exc}); re-export") from None
        ctl = cls(card, session, folder)
        if slm is not None:
            ctl.interface(slm)
        return ctl

    # ------------------------------------------------------------------ properties
    @property
    def env_id(self) -> str:
        """The Gymnasium id the controller was trained on."""
        return str(self.card["env"]["id"])

    @property
    def env_kind(self) -> str:
        """``"per_input"``, ``"per_token"`` or ``"layer_by_layer"``: when the controller decides."""
        return str(self.card["interface"]["kind"])

    @property
    def model_id(self) -> str:
        """The LLM the controller was trained for."""
        return str(self.card["model"]["id"])

    @property
    def weights_hash(self) -> str:
        """The weights hash of that LLM."""
        return str(self.card["model"]["weights_hash"])

    def interface(self, slm: SparseLM) -> Interface:
        """The training environment's interface, rebuilt from the card for ``slm`` (checked by weights hash).

        Raises:
            ControllerError: ``slm`` is not the model the controller was trained for, or the card's
                description does not rebuild.
        """
        key = id(slm)
        iface = self._interfaces.get(key)
        if iface is None:
            check_model(self.card, slm)
            from envs.interface import Interface

            try:
                iface = Interface.from_config(self.card["interface"], slm)
            except (KeyError, TypeError, ValueError) as exc:
                raise ControllerError(f"the card's interface does not rebuild for this model: {exc}") from None
            if iface.observation_size != self.observation_size:
                raise ControllerError(
                    f"the card's interface yields {iface.observation_size} features, the policy expects "
                    f"{self.observation_size}: re-export the controller"
                )
            self._interfaces = {key: iface}  # one model at a time; the interface holds a reference to it
        return iface

    # ------------------------------------------------------------------ decisions
    def _check_obs(self, observation: Any) -> np.ndarray:
        x = np.asarray(observation, dtype=np.float32)
        n = self.observation_size
        if x.ndim <= 1:
            if x.size != n:
                raise ValueError(
                    f"observation has {x.size} values, but this controller expects {n} "
                    f"({self.env_kind} observation of {self.env_id}; see card.json 'interface')"
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
        out = np.asarray(out, dtype=np.float32).reshape(x.shape[0], *self.action_card["shape"])
        return out[0] if single else out

    def observe(self, slm: SparseLM, input_ids: Any) -> ProbeResult:
        """The probe of a prompt, as the training environment computed it (per-input and per-layer controllers).

        Raises:
            ControllerError: A per-token controller (it observes decoding, not the prompt).
        """
        iface = self.interface(slm)
        if not hasattr(iface, "observe"):
            raise ControllerError(f"{self.env_id} controllers observe decoding, not a probe of the prompt")
        return iface.observe(input_ids)  # type: ignore[attr-defined]

    def select_plan(
        self, observation: Any, slm: SparseLM, *, prompt_len: int | None = None, past_len: int = 0
    ) -> SparsityPlan:
        """The plan for one observation, built for ``slm`` exactly as the training environment built it.

        Per-input controllers: ``observation`` is the probe's features; the action becomes a plan
        through the environment's action map (action wall included when it had a budget).
        Layer-by-layer controllers: ``observation`` is the probe's features; the controller decides
        every layer group in turn, each step seeing what it decided before, as in an episode.
        Per-token controllers: ``observation`` is the token features; the plan is for one token
        after ``past_len`` cached ones.

        Args:
            observation: One observation (see above).
            slm: The model; its weights hash must match the card's.
            prompt_len: Prompt tokens (per-input and per-layer controllers; the FLOPs the action wall
                and the per-layer features count). Needed for per-layer controllers and with a budget.
            past_len: Tokens already in the KV cache (per-token controllers).

        Raises:
            ControllerError: ``slm`` is not the model the controller was trained for, or a staged
                controller (it decides stage by stage, in its environment).
            ValueError: The observation has the wrong size, or ``prompt_len`` is needed and missing.
        """
        if self.env_kind == "staged":
            raise ControllerError(
                f"{self.env_id} controllers decide stage by stage after reading the model's answer, not a whole "
                "plan up front: run them in the staged environment their card describes "
                "(agents.staged.StagedController)"
            )
        iface = self.interface(slm)
        if self.env_kind == "per_token":
            return iface.decide(self.select_action(observation), past_len)[0]  # type: ignore[attr-defined]
        if prompt_len is None:
            if self.env_kind == "layer_by_layer" or self.action_card.get("budget") is not None:
                raise ValueError(f"this {self.env_kind} controller needs prompt_len (the prompt's tokens)")
            prompt_len = 1
        if self.env_kind == "layer_by_layer":
            features = np.asarray(observation, dtype=np.float32).reshape(-1)
            return iface.decide_all(self.select_action, features, prompt_len)[0]  # type: ignore[attr-defined]
        return iface.decide(self.select_action(observation), prompt_len)[0]  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        act = self.action_card
        shape = act.get("shape") if self.action_kind == "box" else f"Discrete({act.get('n')})"
        return (
            f"Controller({self.card.get('algo')}, env={self.env_id}, model={self.model_id}, "
            f"obs={self.observation_size}, action={shape})"
        )
