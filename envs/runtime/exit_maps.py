"""Exit maps: per-depth linear maps that let a model answer from an early layer.

A plan that skips the last layers answers from the last layer that ran. Read through the final
norm and the LM head as it is (the logit lens), that hidden state is a poor stand-in for the last
layer's on a small model: on SmolLM2-135M the answer read after 22 of 30 layers agrees with the
full model's on about half of multiple-choice items. An *exit map* for layer ``d`` is an affine
map fitted to carry layer ``d``'s output to the last layer's (before the final norm), so the
answer at depth ``d + 1`` is ``head(norm(h_d @ W_d + b_d))`` (linear short-cuts, Din et al. 2023,
"Jump to Conclusions"; a closed-form relative of the tuned lens, Belrose et al. 2023).

The model's weights are untouched, so the dense path is bit-identical: a plan that runs the last
layer never uses a map. :meth:`envs.runtime.sparse_lm.SparseLM.set_exit_maps` installs them; from
then on every readout of a state whose last layer did not run goes through
:meth:`~envs.runtime.sparse_lm.SparseLM.output_norm` (the scorer's answer, the staged readouts,
per-token exits alike), and the map's matmul is counted in the readouts' FLOPs.

Fitting (:func:`fit_exit_maps`): one dense pass over train-split sequences collects, per layer,
the normal equations of the least-squares map from its output (with a bias column) to the last
layer's output, at every position. Each map is the ridge solution shrunk towards the identity (at
an infinite ridge the map *is* the logit lens), with the ridge relative to the layer's mean input
energy. The fit is closed-form and deterministic: seconds after the dense pass.

Distillation (:func:`distill_exit_maps`, optional): the ridge maps minimise the squared error of
the hidden state, which weighs every direction alike, while an exit is judged by the answer the LM
head reads from it. Starting from the ridge solution, the maps are then trained by gradient
descent on LayerSkip's early-exit loss: the KL divergence from the full model's next-token
distribution to the exit's, at every exit depth in turn, on positions of the same train-split
sequences (the tuned lens's objective). Only the maps learn: the model's weights, and with them the
dense path, stay exactly as they are. (A pruning-ready model cannot carry this loss instead: its
adapted weights run only from the first pruned layer on, and an exit prunes nothing before it.)

Files: ``exit_maps.safetensors`` (keys ``"<layer>"``, float32 ``[D + 1, D]``: the weight rows,
then the bias row; layers ``0 .. L - 2``) and a self-hashed ``card.json`` naming the model, the
training sequences' SHA-256 and split, the settings and held-out agreement (:mod:`envs.runtime.artifacts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from envs.data.files import cache_root
from envs.runtime.artifacts import ArtifactKind, load_artifact, save_artifact

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import SparseLM

EXIT_MAPS_FORMAT = "prunegym-exit-maps"
EXIT_MAPS_VERSION = 1
TENSORS_FILE = "exit_maps.safetensors"
COMMAND = "python -m experiments.exit_maps"
METHOD = "ridge regression of the last layer's output on layer d's output (with bias), shrunk towards the identity"
DISTILLED = "; then trained on the early-exit loss (KL from the full model's next-token distribution), the model frozen"


def exit_maps_folder(name: str) -> Path:
    """Where the exit maps ``name`` live: ``<cache_root>/exit_maps/<name>``."""
    return cache_root() / "exit_maps" / name


EXIT_MAPS_KIND = ArtifactKind("exit maps", EXIT_MAPS_FORMAT, EXIT_MAPS_VERSION, TENSORS_FILE, COMMAND, exit_maps_folder)


class ExitMaps:
    """One affine map per layer but the last, from that layer's output to the last layer's.

    Args:
        maps: ``L - 1`` float32 tensors ``[D + 1, D]`` (weight rows, then the bias row).
        card: What they were fitted on (see the module docstring).
    """

    def __init__(self, maps: Sequence[torch.Tensor], card: dict[str, Any] | None = None) -> None:
        if not maps:
            raise ValueError("exit maps need at least one layer's map (a model of two or more layers)")
        D = maps[0].shape[1]
        bad = [i for i, m in enumerate(maps) if tuple(m.shape) != (D + 1, D)]
        if bad:
            raise ValueError(f"every exit map must be [D + 1, D] = [{D + 1}, {D}]; layers {bad[:4]} are not")
        self.weight = [m[:D] for m in maps]
        self.bias = [m[D] for m in maps]
        self.card: dict[str, Any] = dict(card or {})

    @property
    def num_layers(self) -> int:
        """Layers of the model they are for (one more than the maps)."""
        return len(self.weight) + 1

    @property
    def hidden_size(self) -> int:
        """The model's hidden size."""
        return int(self.weight[0].shape[0])

    def apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s output ``h`` (``[..., D]``) mapped to the last layer's.

        The maps must be on ``h``'s device and dtype (:meth:`SparseLM.set_exit_maps` moves them once).
        """
        return torch.addmm(self.bias[layer], h.reshape(-1, h.shape[-1]), self.weight[layer]).reshape(h.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ExitMaps:
        """The same maps on ``device`` in ``dtype`` (the card is shared); ``self`` when nothing changes."""
        w0 = self.weight[0]
        if (device is None or torch.device(device) == w0.device) and (dtype is None or dtype == w0.dtype):
            return self
        return ExitMaps([m.to(device, dtype) for m in self.tensors().values()], self.card)

    def flops_per_position(self) -> float:
        """Multiply-accumulate FLOPs (x2) of one map applied at one position."""
        D = self.hidden_size
        return 2.0 * D * D

    def tensors(self) -> dict[str, torch.Tensor]:
        """The maps as saved: ``{"<layer>": [D + 1, D]}``."""
        pairs = enumerate(zip(self.weight, self.bias, strict=True))
        return {str(i): torch.cat([w, b[None]]).contiguous() for i, (w, b) in pairs}


class NormalEquations:
    """Running sums of the least-squares problems of every layer's exit map, in float64."""

    def __init__(self, num_layers: int, hidden: int) -> None:
        self.xtx = torch.zeros(num_layers - 1, hidden + 1, hidden + 1, dtype=torch.float64)
        self.xty = torch.zeros(num_layers - 1, hidden + 1, hidden, dtype=torch.float64)
        self.tokens = 0

    def add(self, outputs: Sequence[torch.Tensor]) -> None:
        """Add the positions of one sequence: ``outputs[i]`` is layer ``i``'s output, ``[T, D]``."""
        y = outputs[-1].double()
        for i, h in enumerate(outputs[:-1]):
            x = torch.cat([h.double(), torch.ones(h.shape[0], 1, dtype=torch.float64)], 1)
            self.xtx[i] += x.T @ x
            self.xty[i] += x.T @ y
        self.tokens += int(y.shape[0])

    def solve(self, ridge: float) -> list[torch.Tensor]:
        """Each layer's map, shrunk towards the identity by ``ridge`` x the layer's mean input energy."""
        L1, D1, D = self.xty.shape
        if self.tokens == 0:
            raise ValueError("no training positions: the exit maps need at least one sequence")
        eye = torch.zeros(D1, D, dtype=torch.float64)
        eye[:D] = torch.eye(D, dtype=torch.float64)
        maps = []
        for i in range(L1):
            a = self.xtx[i].clone()
            lam = float(ridge) * float(a.diagonal()[:D].mean())
            a += lam * torch.eye(D1, dtype=torch.float64)  # the bias too: an infinite ridge is the logit lens
            maps.append(torch.linalg.solve(a, self.xty[i] + lam * eye).float())
        return maps


class PositionSample:
    """Every layer's dense output at a random subset of positions, kept for :func:`distill_exit_maps`.

    Args:
        per_sequence: Positions kept of each sequence (all of a shorter one).
        seed: Seed of the draws (a sequence's positions depend only on it and the sequence's index).
    """

    def __init__(self, per_sequence: int, seed: int = 0) -> None:
        if per_sequence < 1:
            raise ValueError(f"per_sequence must be >= 1, got {per_sequence}")
        self.per_sequence, self.seed = int(per_sequence), int(seed)
        self._parts: list[torch.Tensor] = []

    def add(self, outputs: Sequence[torch.Tensor]) -> None:
        """Keep some positions of one sequence: ``outputs[i]`` is layer ``i``'s output, ``[T, D]``."""
        T = int(outputs[0].shape[0])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._parts))
        idx = torch.randperm(T, generator=g)[: self.per_sequence]
        self._parts.append(torch.stack([h[idx].float() for h in outputs], 1))  # [k, L, D]

    def tensor(self) -> torch.Tensor:
        """The kept positions, ``[N, L, D]``."""
        if not self._parts:
            raise ValueError("no positions kept: add at least one sequence")
        return torch.cat(self._parts)


def full_logp(slm: SparseLM, last_hidden: torch.Tensor) -> torch.Tensor:
    """The full model's next-token log-probabilities from its last layer's output ``[N, D]`` (the target)."""
    return torch.log_softmax(slm.lm_head(slm.final_norm(last_hidden)).float(), -1)


def exit_kl(
    slm: SparseLM, maps: Sequence[torch.Tensor], layer: int, hidden: torch.Tensor, teacher_logp: torch.Tensor
) -> torch.Tensor:
    """Mean KL(full model || exit after ``layer``) over positions: the early-exit loss of one depth.

    Args:
        slm: The model (its final norm and LM head, which are not trained).
        maps: Every layer's ``[D + 1, D]`` map (only ``maps[layer]`` is read; gradients reach it).
        layer: The last layer that ran.
        hidden: That layer's output at the positions, ``[N, D]``.
        teacher_logp: The full model's next-token log-probabilities there, ``[N, V]`` (:func:`full_logp`).
    """
    from envs.distill.losses import kl_teacher_student

    h = ExitMaps(maps).apply(hidden, layer)
    return kl_teacher_student(slm.lm_head(slm.final_norm(h)), teacher_logp)


@dataclass
class Distillation:
    """What :func:`distill_exit_maps` did.

    Attributes:
        maps: The maps it returns: per layer the trained one, or the starting one where training
            did not lower the loss on the held-back positions.
        losses: The training loss of each step.
        trained: Per layer, whether its trained map was kept.
        holdout_start: Per layer, the held-back positions' early-exit loss with the starting map.
        holdout_trained: The same with the trained map.
    """

    maps: list[torch.Tensor]
    losses: list[float]
    trained: list[bool]
    holdout_start: list[float]
    holdout_trained: list[float]


def distill_exit_maps(
    slm: SparseLM,
    maps: Sequence[torch.Tensor],
    sample: torch.Tensor,
    *,
    steps: int,
    lr: float = 3e-4,
    batch: int = 256,
    holdout: int = 512,
    seed: int = 0,
    bar: Any = None,
) -> Distillation:
    """Train ``maps`` (from the ridge fit) on the early-exit loss, the model frozen (see the module docstring).

    ``holdout`` positions of ``sample`` (drawn by ``seed``) are held back from training; each step
    takes one exit depth (every depth in turn, in a shuffled order per sweep of the depths) and
    ``batch`` of the other positions, and takes an Adam step on that depth's :func:`exit_kl`. At the
    end, each layer keeps its trained map only if it lowers the held-back positions' loss, so a
    depth the starting map already serves well is not made worse by overfitting.

    Args:
        slm: The model.
        maps: ``L - 1`` float32 maps ``[D + 1, D]`` to start from (not modified).
        sample: Every layer's dense output at the training positions, ``[N, L, D]`` (:class:`PositionSample`).
        steps: Optimiser steps (0 returns copies of ``maps``).
        lr: Adam learning rate.
        batch: Positions per step.
        holdout: Positions held back to choose between the trained and the starting map (at most
            half of ``sample``; 0 keeps every trained map).
        seed: Seed of the held-back positions, the depth order and the batches.
        bar: Optional tqdm-like object with ``update(n)``.
    """
    if steps < 0 or batch < 1 or holdout < 0 or not lr > 0:
        raise ValueError(
            f"steps and holdout must be >= 0, batch >= 1 and lr > 0, got steps={steps}, holdout={holdout}, "
            f"batch={batch}, lr={lr}"
        )
    L = slm.spec.num_layers
    if sample.dim() != 3 or sample.shape[1] != L:
        raise ValueError(f"sample must be [positions, {L} layers, hidden], got {tuple(sample.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(sample.shape[0], generator=g)
    n_hold = min(int(holdout), sample.shape[0] // 2)
    held, train = sample[perm[:n_hold]], sample[perm[n_hold:]]
    start = [m.detach().clone().float() for m in maps]
    params = [torch.nn.Parameter(m.clone()) for m in start]
    opt = torch.optim.Adam(params, lr=float(lr))
    frozen = [p for p in slm.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    order: list[int] = []
    try:
        for _ in range(int(steps)):
            if not order:
                order = torch.randperm(L - 1, generator=g).tolist()
            d = order.pop()
            x = train[torch.randint(train.shape[0], (int(batch),), generator=g)]
            with torch.no_grad():
                teacher = full_logp(slm, x[:, L - 1])
            loss = exit_kl(slm, params, d, x[:, d], teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    done = [p.detach().clone() for p in params]
    if n_hold == 0 or steps == 0:
        nan = [float("nan")] * (L - 1)
        return Distillation(done, losses, [steps > 0] * (L - 1), nan, nan)
    with torch.no_grad():
        teacher = full_logp(slm, held[:, L - 1])
        before = [float(exit_kl(slm, start, d, held[:, d], teacher)) for d in range(L - 1)]
        after = [float(exit_kl(slm, done, d, held[:, d], teacher)) for d in range(L - 1)]
    kept = [a < b for a, b in zip(after, before, strict=True)]
    out = [t if k else s for t, s, k in zip(done, start, kept, strict=True)]
    return Distillation(out, losses, kept, before, after)


def layer_outputs(slm: SparseLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output of the dense model on one sequence ``[T]``: ``L`` tensors ``[T, D]``."""
    st = slm.start(ids[None] if ids.dim() == 1 else ids)
    plan = slm.dense_plan()
    out = []
    with torch.no_grad():
        for i in range(slm.spec.num_layers):
            slm.run_layers(st, plan, i, i + 1)
            out.append(st.hidden[0])
    return out


def fit_exit_maps(
    slm: SparseLM,
    sequences: Sequence[torch.Tensor],
    *,
    ridge: float = 1e-4,
    bar: Any = None,
    sample: PositionSample | None = None,
) -> list[torch.Tensor]:
    """Fit the exit maps of ``slm`` on ``sequences`` (token ids ``[T]``, train split only).

    Args:
        slm: The model (dense; the maps are fitted on its dense hidden states).
        sequences: Token id sequences; every position is a training example of every layer.
        ridge: Shrinkage towards the identity, relative to each layer's mean input energy.
        bar: Optional tqdm-like object with ``update(n)``.
        sample: Keeps positions of the same dense pass for :func:`distill_exit_maps`.

    Returns:
        ``L - 1`` float32 maps ``[D + 1, D]`` (see :class:`ExitMaps`).
    """
    if slm.spec.num_layers < 2:
        raise ValueError("exit maps need a model of two or more layers")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    eq = NormalEquations(slm.spec.num_layers, slm.spec.hidden_size)
    for ids in sequences:
        outs = layer_outputs(slm, ids)
        eq.add(outs)
        if sample is not None:
            sample.add(outs)
        if bar is not None:
            bar.update(1)
    return eq.solve(ridge)


def save_exit_maps(maps: ExitMaps, folder: str | Path, *, force: bool = False) -> Path:
    """Write ``maps`` to ``folder`` atomically (tensors, then the card); ``maps.card`` becomes what was written.

    Raises:
        FileExistsError: ``folder`` exists and ``force`` is off.
    """
    maps.card = save_artifact(EXIT_MAPS_KIND, maps.tensors(), maps.card, folder, force=force)
    return Path(folder).resolve()


def load_exit_maps(name_or_folder: str | Path, slm: SparseLM) -> ExitMaps:
    """Load exit maps fitted for ``slm`` by name (under :func:`exit_maps_folder`) or folder.

    Raises:
        ValueError: One line naming the problem and the command that rebuilds them (see
            :func:`envs.runtime.artifacts.load_artifact`).
    """
    L, D = slm.spec.num_layers, slm.spec.hidden_size
    tensors, card = load_artifact(
        EXIT_MAPS_KIND, name_or_folder, slm, lambda _card: {str(i): (D + 1, D) for i in range(L - 1)}
    )
    return ExitMaps([tensors[str(i)] for i in range(L - 1)], card)
