"""A Deja Vu-style low-rank predictor of each token's largest MLP channels.

Contextual sparsity (Liu et al., 2023, "Deja Vu") keeps, per token, only the MLP channels that will
matter for *that* token. Which ones matter is known only after the gate and up projections have run,
so a cheap predictor guesses them from the MLP block's input. Here the predictor of layer ``i`` is a
rank-``r`` linear map, ``scores = b[i] @ (a[i] @ x)``, from the normed MLP input ``x`` (SparseLM's
observer event ``"mlp_in"``) to one score per intermediate channel; a higher score means the channel
is more likely among the token's largest ``|act|``, where ``act`` is the observer's ``"mlp_act"``
(``silu(gate(x)) * up(x)``, or ``act(up(x))`` for non-gated MLPs). At rank 64 on SmolLM2-135M it
costs about 4% of one dense layer's decode FLOPs (:meth:`ChannelPredictor.flops_per_token`).

Training (:func:`train_predictor`). One dense pass over train-split text collects ``(mlp_in, rank
of |mlp_act|)`` per layer and token; the target of a token is the rank of each channel's ``|act|``
among that token's channels, standardised (mean 0, variance 1 per token). Only the order within a
token matters for top-k recall, and ranks make the fit ignore a few huge activations that would
dominate a regression on ``|act|``. The pair ``(a, b)`` starts from the closed-form optimum of the
squared error, reduced-rank ridge regression (the least-squares map projected onto the top-``r``
principal directions of its fitted values), and a few Adam epochs then maximise the per-token
correlation between scores and target, a loss blind to each token's offset and scale. Measured on
SmolLM2-135M (6k train tokens, 2k val tokens, layers 0/8/16/24/29), the closed form alone reaches
top-k recall 0.81/0.69/0.59 at keep fractions 0.75/0.5/0.25 (a random ranking: 0.75/0.5/0.25),
above a rank-64 SVD of the gate weights (0.74/0.53/0.41) and the full gate (0.73/0.51/0.53); regressing
``|act| / rms(act)`` instead gave 0.79/0.65/0.56 and a listwise softmax loss less. Adam adds about
0.002, so the default is two epochs. With the defaults (8192 train tokens, all 30 layers, 2 threads,
about 95 s of training) the recall on 4096 val tokens is 0.805/0.665/0.548. Rank matters more than
the loss (rank 128: +0.02 at 0.25; full rank: +0.05). Recall is bounded by the form: ``|act|``
depends on the sign of ``up(x)``, which no linear score can see.

Files (:func:`save_predictor`, :func:`load_predictor`). A predictor folder holds
``predictor.safetensors`` (keys ``"<layer>.a"``, ``"<layer>.b"``, float32; never a pickle) and
``card.json``: the model it was trained for (name, weights hash, spec), the rank, the training text
(the SHA-256 of every document and its split, so anyone can check that no val or test text was
seen), the settings, held-out recall, package versions and time, the SHA-256 of the tensors file and
``card_sha256`` over the card itself (the method of exported controllers,
:func:`envs.data.files.card_digest`). The folder is written atomically, and loading refuses, with a
one-line message naming the command that rebuilds it, anything that does not match: an edited card
or tensors file, another model's weights or shape, another format version.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from envs.data.files import cache_root, versions_of
from envs.runtime.artifacts import ArtifactKind, load_artifact, save_artifact

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import SparseLM

PREDICTOR_FORMAT = "prunegym-channel-predictor"
PREDICTOR_VERSION = 1
TENSORS_FILE = "predictor.safetensors"
CARD_FILE = "card.json"
COMMAND = "python -m experiments.predictor"
FRACTIONS = (0.75, 0.5, 0.25)
TRAIN_SPLIT = "train"
METHOD = (
    "reduced-rank ridge regression on per-token standardised ranks of |mlp_act|, then Adam on per-token correlation"
)
PACKAGES = ("torch", "transformers", "safetensors", "numpy", "prunegym")

Sequences = Sequence[torch.Tensor] | Sequence[str]


# ---------------------------------------------------------------------------------------- predictor
@dataclass
class ChannelPredictor:
    """Per-layer low-rank maps from the MLP input to a score per MLP channel.

    Attributes:
        a: Per decoder layer, ``[rank, hidden_size]`` (the down-projection of ``x``).
        b: Per decoder layer, ``[intermediate_size, rank]`` (the scores of the channels).
        card: JSON-ready description: model, training text and settings, recall (see the module docstring).
    """

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.a or len(self.a) != len(self.b):
            raise ValueError(f"a predictor needs one (a, b) pair per layer, got {len(self.a)} a and {len(self.b)} b")
        r, d = self.a[0].shape
        n = self.b[0].shape[0]
        for i, (a, b) in enumerate(zip(self.a, self.b, strict=True)):
            if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, d) or tuple(b.shape) != (n, r):
                raise ValueError(
                    f"layer {i}: a {tuple(a.shape)} and b {tuple(b.shape)} do not match layer 0's "
                    f"[rank, hidden] = {(r, d)} and [intermediate, rank] = {(n, r)}"
                )

    @property
    def rank(self) -> int:
        """The rank ``r`` of every layer's map."""
        return int(self.a[0].shape[0])

    @property
    def num_layers(self) -> int:
        """Decoder layers covered (all of the model's)."""
        return len(self.a)

    @property
    def hidden_size(self) -> int:
        """Width of the MLP input ``x``."""
        return int(self.a[0].shape[1])

    @property
    def intermediate_size(self) -> int:
        """MLP channels scored per layer."""
        return int(self.b[0].shape[0])

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A score per MLP channel of ``layer`` for each token: higher means more likely among its largest ``|act|``.

        Args:
            layer: Decoder layer.
            x: The MLP block's normed input (``"mlp_in"``), ``[..., hidden_size]``; cast to the
                predictor's dtype and device if they differ.

        Returns:
            ``[..., intermediate_size]``: ``F.linear(F.linear(x, a[layer]), b[layer])``.
        """
        a, b = self.a[layer], self.b[layer]
        if x.dtype != a.dtype or x.device != a.device:
            x = x.to(a.device, a.dtype)
        return F.linear(F.linear(x, a), b)

    def flops_per_token(self) -> float:
        """FLOPs of one token's scores at one layer (multiply-accumulates x2); every layer costs the same.

        ``2 * (hidden * rank + rank * intermediate)``: compare with one dense layer's FLOPs per token
        (``SparsityPlan.dense(spec).flops(1)["total"] / spec.num_layers``) to see what predicting costs.
        """
        return 2.0 * (self.hidden_size * self.rank + self.rank * self.intermediate_size)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ChannelPredictor:
        """A copy on ``device`` and/or in ``dtype`` (e.g. the model's, so scoring needs no cast); the card is shared."""
        return ChannelPredictor(
            [t.to(device=device, dtype=dtype) for t in self.a],
            [t.to(device=device, dtype=dtype) for t in self.b],
            self.card,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors form: ``"<layer>.a"`` and ``"<layer>.b"``, float32 on the CPU."""
        out = {}
        for i, (a, b) in enumerate(zip(self.a, self.b, strict=True)):
            out[f"{i}.a"] = a.detach().to("cpu", torch.float32).contiguous()
            out[f"{i}.b"] = b.detach().to("cpu", torch.float32).contiguous()
        return out


# ---------------------------------------------------------------------------------------- text
def document_sha256(text: str) -> str:
    """Hex SHA-256 of a document's UTF-8 text: what a card lists for each training document."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def document_sequences(
    slm: SparseLM, docs: Sequence[str], *, max_tokens: int | None = None, max_len: int = 256
) -> tuple[list[torch.Tensor], list[str]]:
    """Token sequences of ``docs`` (one per document, cut at ``max_len``) up to ``max_tokens`` in all.

    Args:
        slm: The model; its tokenizer is used.
        docs: Documents, in order.
        max_tokens: Stop once this many tokens are gathered (the last sequence is shortened to fit);
            ``None``: every document.
        max_len: Tokens kept of each document (the calibration pass cuts at the same length).

    Returns:
        The sequences and the documents they came from (the same length; a document that gives
        fewer than two tokens is skipped).

    Raises:
        ValueError: ``slm`` has no tokenizer.
    """
    if slm.tokenizer is None:
        raise ValueError(f"{slm.name} has no tokenizer: pass token sequences instead of documents")
    seqs: list[torch.Tensor] = []
    used: list[str] = []
    total = 0
    for doc in docs:
        if max_tokens is not None and total >= max_tokens:
            break
        ids = list(slm.tokenizer(doc)["input_ids"])[:max_len]
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if len(ids) < 2:
            continue
        seqs.append(torch.tensor(ids, dtype=torch.long))
        used.append(doc)
        total += len(ids)
    return seqs, used


def _token_sequences(
    slm: SparseLM, sequences: Sequences, max_tokens: int, max_len: int
) -> tuple[list[torch.Tensor], list[str] | None]:
    """``sequences`` as token tensors capped at ``max_tokens``, and the documents behind them (``None`` for tokens)."""
    items = list(sequences)
    if items and all(isinstance(s, str) for s in items):
        return document_sequences(slm, items, max_tokens=max_tokens, max_len=max_len)  # type: ignore[arg-type]
    if any(isinstance(s, str) for s in items):
        raise ValueError("sequences must be all documents (str) or all token-id tensors, not a mix")
    out: list[torch.Tensor] = []
    total = 0
    for s in items:
        ids = torch.as_tensor(s).reshape(-1)[: max_tokens - total]
        if ids.numel() == 0:
            continue
        out.append(ids)
        total += int(ids.numel())
        if total >= max_tokens:
            break
    return out, None


# ---------------------------------------------------------------------------------------- collection
def _rank_target(act: torch.Tensor) -> torch.Tensor:
    """Per row, each channel's rank of ``|act|``, standardised to mean 0 and variance 1 (float32)."""
    n = act.shape[-1]
    order = act.abs().argsort(-1)
    steps = (torch.arange(n, device=act.device, dtype=torch.float32) - (n - 1) / 2) / math.sqrt(max(n * n - 1, 1) / 12)
    return torch.empty(act.shape, device=act.device).scatter_(-1, order, steps.expand(act.shape))  # one sort, no second


@torch.no_grad()
def _collect(slm: SparseLM, seqs: Sequence[torch.Tensor], bar: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One dense pass: per layer, the MLP inputs ``[N, hidden]`` and rank targets ``[N, intermediate]``."""
    L = slm.spec.num_layers
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    ts: list[list[torch.Tensor]] = [[] for _ in range(L)]

    def observe(i: int, name: str, t: torch.Tensor) -> None:
        if name == "mlp_in":
            xs[i].append(t.reshape(-1, t.shape[-1]).float().clone())
        elif name == "mlp_act":
            ts[i].append(_rank_target(t.reshape(-1, t.shape[-1]).float()))

    for ids in seqs:
        slm.forward(ids.reshape(1, -1).to(slm.device), None, logits="none", observer=observe)
        bar.update(int(ids.numel()))
    missing = [i for i in range(L) if not xs[i] or len(xs[i]) != len(ts[i])]
    if missing:
        raise RuntimeError(
            f"{slm.name}: the dense forward reported no 'mlp_in'/'mlp_act' for layers {missing[:5]}; "
            "this SparseLM does not emit the observer events a channel predictor is trained on"
        )
    x_all, t_all = [], []
    for i in range(L):  # concatenated layer by layer, the pieces dropped as we go: peak memory stays ~1x
        x_all.append(torch.cat(xs[i]))
        t_all.append(torch.cat(ts[i]))
        xs[i] = ts[i] = []
    return x_all, t_all


# ---------------------------------------------------------------------------------------- fitting
def _reduced_rank_fit(x: torch.Tensor, t: torch.Tensor, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form rank-``rank`` minimiser of ``||x W - t||^2 + ridge``: ``W = W_ls V V^T``, as ``(a, b)``.

    ``W_ls`` is the ridge least-squares map; ``V`` holds the top right singular vectors of its
    fitted values ``x W_ls`` (taken through a Cholesky factor of ``x^T x``, so nothing ``N``-sized is
    decomposed). Each of the ``rank`` components is split evenly between ``a`` and ``b`` (equal norms),
    which suits the Adam steps that follow.
    """
    g = (x.T @ x).double()  # the N-sized products in float32 (fast), the small solves in float64
    g += (ridge * g.diagonal().mean().clamp_min(1e-12)) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    w = torch.linalg.solve(g, (x.T @ t).double())  # [D, I]
    chol = torch.linalg.cholesky(g)  # g = L L^T, so (x w)^T (x w) ~ (L^T w)^T (L^T w)
    _, _, vh = torch.linalg.svd(chol.T @ w, full_matrices=False)
    v = vh[:rank].T  # [I, r]
    a = (w @ v).T  # [r, D]
    scale = a.norm(dim=1).clamp_min(1e-12).sqrt()
    return (a / scale[:, None]).float(), (v * scale[None, :]).float()


def _correlation_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Minus the mean per-token Pearson correlation of scores ``s`` and standardised targets ``t``."""
    s = s - s.mean(-1, keepdim=True)
    s = s / s.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
    return -(s * t).mean()


def _adam(
    a: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``epochs`` of Adam on :func:`_correlation_loss`, batches in a seeded order."""
    if epochs == 0:
        return a, b
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            for s in range(0, x.shape[0], batch_size):
                idx = order[s : s + batch_size]
                loss = _correlation_loss(F.linear(F.linear(x[idx], a), b), t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return a.detach(), b.detach()


def check_rank(rank: Any, slm: SparseLM | None = None) -> int:
    """``rank`` as an int, refused when it is no integer >= 1 or (given ``slm``) above what the model's shape allows.

    A rank above ``min(hidden, intermediate)`` adds nothing the full-rank map lacks and costs more
    than the gate projection it stands in for.

    Raises:
        ValueError: Naming the setting and the range.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is out of range: set rank=<integer >= 1>")
    if slm is not None:
        top = min(slm.spec.hidden_size, slm.spec.intermediate_size)
        if rank > top:
            raise ValueError(
                f"rank={rank} exceeds min(hidden_size, intermediate_size)={top} of {slm.name}: set rank=<1..{top}>"
            )
    return rank


def train_predictor(
    slm: SparseLM,
    sequences: Sequences,
    *,
    rank: int = 64,
    epochs: int = 2,
    lr: float = 3e-4,
    batch_size: int = 512,
    ridge: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    max_tokens: int = 8192,
    max_len: int = 256,
    val_sequences: Sequences | None = None,
) -> ChannelPredictor:
    """Fit a channel predictor for every layer of ``slm`` from one dense pass over train-split text.

    Args:
        slm: The model (its dense plan is run; its weights are not changed).
        sequences: Training text: documents (``str``, tokenised with ``slm.tokenizer``, each cut at
            ``max_len``; every one must be in the corpus's train split, :func:`envs.data.corpus.split_of`,
            and its SHA-256 goes on the card), or token-id tensors (``[T]`` or ``[1, T]``) the caller
            vouches are train-split text (the card then lists no documents).
        rank: Rank of each layer's map (``1..min(hidden, intermediate)``).
        epochs: Adam epochs after the closed-form start (0: the closed form alone).
        lr: Adam learning rate.
        batch_size: Tokens per Adam step.
        ridge: Ridge strength relative to the mean input energy (keeps the closed form well posed).
        seed: Seed of the Adam batch order; the fit is deterministic given it (and the thread count).
        progress: Show tqdm bars (tokens collected, layers fitted).
        max_tokens: Cap on training tokens (the activations of every layer are held at once:
            ``4 * (hidden + intermediate) * layers`` bytes per token, ~2 GiB for SmolLM2-135M at 8192).
        max_len: Tokens kept of each document.
        val_sequences: Held-out text (documents or tokens) whose :func:`recall` goes on the card.

    Returns:
        The predictor (float32, on the CPU) with its card (not yet saved: see :func:`save_predictor`).

    Raises:
        ValueError: A bad setting, no tokens, or a document outside the train split.
    """
    from tqdm.auto import tqdm

    from envs.data.corpus import split_of

    check_rank(rank, slm)
    for key, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("max_tokens", max_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key}={value!r} is out of range: set {key}=<integer >= {low}>")
    if not lr > 0 or not ridge >= 0:
        raise ValueError(f"lr={lr!r} must be > 0 and ridge={ridge!r} >= 0")
    t0 = time.perf_counter()
    seqs, docs = _token_sequences(slm, sequences, max_tokens, max_len)
    if docs is not None:
        held = [(j, split) for j, split in enumerate(map(split_of, docs)) if split != TRAIN_SPLIT]
        if held:
            j, split = held[0]
            raise ValueError(
                f"training document {j} ({docs[j][:40]!r}...) is in the {split} split: a channel predictor "
                f"trains on {TRAIN_SPLIT}-split text only (envs.data.corpus.natural_text('{TRAIN_SPLIT}'))"
            )
    n_tok = sum(int(s.numel()) for s in seqs)
    if n_tok == 0:
        raise ValueError("train_predictor needs at least one sequence of two or more tokens")
    with tqdm(total=n_tok, desc=f"predictor {slm.name}: dense pass", unit="tok", disable=not progress) as bar:
        xs, ts = _collect(slm, seqs, bar)
    t_collect = time.perf_counter() - t0
    a_all, b_all = [], []
    for i in tqdm(range(slm.spec.num_layers), desc=f"predictor {slm.name}: fit r={rank}", disable=not progress):
        a, b = _reduced_rank_fit(xs[i], ts[i], rank, ridge)
        a, b = _adam(a, b, xs[i], ts[i], epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        a_all.append(a.cpu().contiguous())
        b_all.append(b.cpu().contiguous())
        xs[i] = ts[i] = torch.empty(0)  # free as we go
    pred = ChannelPredictor(a_all, b_all)
    pred.card = {
        "format": PREDICTOR_FORMAT,
        "version": PREDICTOR_VERSION,
        "model": {
            "name": slm.name,
            "family": slm.family,
            "weights_hash": slm.weights_hash,
            "spec": slm.spec.to_dict(),
        },
        "predictor": {
            "rank": rank,
            "num_layers": pred.num_layers,
            "input": "mlp_in (the MLP block's normed input)",
            "target": "channels with the largest |mlp_act| per token",
            "scores": "F.linear(F.linear(x, a[layer]), b[layer])",
            "flops_per_token_per_layer": pred.flops_per_token(),
        },
        "training": {
            "method": METHOD,
            "split": TRAIN_SPLIT if docs is not None else None,
            "text": "documents of the train split" if docs is not None else "token sequences given by the caller",
            "documents": len(docs) if docs is not None else None,
            "documents_sha256": sorted(document_sha256(d) for d in docs) if docs is not None else None,
            "sequences": len(seqs),
            "tokens": n_tok,
            "max_tokens": max_tokens,
            "max_len": max_len,
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "ridge": ridge,
            "torch_threads": torch.get_num_threads(),
            "collect_seconds": round(t_collect, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "recall": None,
        "packages": versions_of(PACKAGES),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if val_sequences is not None:
        t1 = time.perf_counter()
        vseqs, vdocs = _token_sequences(slm, val_sequences, 1 << 62, max_len)
        pred.card["recall"] = {
            "fractions": {str(f): r for f, r in recall(pred, slm, vseqs).items()},
            "tokens": sum(int(s.numel()) for s in vseqs),
            "documents": len(vdocs) if vdocs is not None else None,
            "splits": sorted({split_of(d) for d in vdocs}) if vdocs is not None else None,
            "seconds": round(time.perf_counter() - t1, 2),
        }
    return pred


# ---------------------------------------------------------------------------------------- recall
@torch.no_grad()
def recall(
    pred: ChannelPredictor, slm: SparseLM, sequences: Sequences, fractions: Sequence[float] = FRACTIONS
) -> dict[float, float]:
    """Top-k recall of ``pred`` on ``sequences``: how many of each token's largest channels it picks.

    For every layer and token, ``k = round(f * intermediate)`` channels are taken by predicted score
    and by true ``|mlp_act|`` from a dense run; the recall is ``|predicted ∩ true| / k``, averaged
    over layers and tokens alike. A random ranking scores ``f``.

    Args:
        pred: The predictor.
        slm: The model it was trained for.
        sequences: Held-out documents (tokenised with ``slm.tokenizer``, each cut at 256 tokens) or
            token-id tensors.
        fractions: Keep fractions ``f`` in ``(0, 1]``.

    Returns:
        ``{f: recall}``.

    Raises:
        ValueError: No tokens, a fraction out of range, or a predictor for another shape.
    """
    if not fractions or any(not 0 < float(f) <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    spec = slm.spec
    if (pred.num_layers, pred.hidden_size, pred.intermediate_size) != (
        spec.num_layers,
        spec.hidden_size,
        spec.intermediate_size,
    ):
        raise ValueError(
            f"the predictor is for {pred.num_layers} layers of {pred.hidden_size} -> {pred.intermediate_size}, "
            f"{slm.name} has {spec.num_layers} layers of {spec.hidden_size} -> {spec.intermediate_size}"
        )
    seqs, _ = _token_sequences(slm, sequences, 1 << 62, 256)
    ks = [max(1, round(float(f) * spec.intermediate_size)) for f in fractions]
    k_max = max(ks)
    hits = torch.zeros(len(ks), dtype=torch.float64)
    count = 0
    pending: dict[int, torch.Tensor] = {}

    def observe(i: int, name: str, t: torch.Tensor) -> None:
        nonlocal count
        if name == "mlp_in":
            pending[i] = t.reshape(-1, t.shape[-1])
        elif name == "mlp_act":
            mag = t.reshape(-1, t.shape[-1]).abs().float()
            s = pred.scores(i, pending.pop(i))
            true_idx = mag.topk(k_max, dim=1).indices  # sorted: every smaller top-k is a prefix
            picked_idx = s.topk(k_max, dim=1).indices.to(mag.device)
            for j, k in enumerate(ks):
                true = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, true_idx[:, :k], True)
                hits[j] += true.gather(1, picked_idx[:, :k]).sum().item() / k
            count += mag.shape[0]

    for ids in seqs:
        slm.forward(ids.reshape(1, -1).to(slm.device), None, logits="none", observer=observe)
    if count == 0:
        raise ValueError("recall needs at least one token")
    return {float(f): float(hits[j] / count) for j, f in enumerate(fractions)}


# ---------------------------------------------------------------------------------------- files
def predictor_folder(name: str) -> Path:
    """Where the predictor ``name`` lives: ``<cache_root>/predictors/<name>``."""
    return cache_root() / "predictors" / name


PREDICTOR_KIND = ArtifactKind(
    "channel predictor", PREDICTOR_FORMAT, PREDICTOR_VERSION, TENSORS_FILE, COMMAND, lambda n: predictor_folder(n)
)


def save_predictor(pred: ChannelPredictor, folder: str | Path, *, force: bool = False) -> Path:
    """Write ``pred`` to ``folder`` atomically: ``predictor.safetensors``, then ``card.json`` (last).

    The card gains ``files`` (the tensors file's SHA-256 and size) and ``card_sha256``; ``pred.card``
    is updated to what was written.

    Args:
        pred: The predictor.
        folder: Output folder (e.g. :func:`predictor_folder`).
        force: Replace an existing folder (it stays in place until the new one is complete).

    Returns:
        The folder.

    Raises:
        FileExistsError: ``folder`` exists and ``force`` is off.
    """
    meta = {"rank": str(pred.rank)}
    pred.card = save_artifact(PREDICTOR_KIND, pred.tensors(), pred.card, folder, metadata=meta, force=force)
    return Path(folder).resolve()


def load_predictor(name_or_folder: str | Path, slm: SparseLM) -> ChannelPredictor:
    """Load a saved predictor for ``slm``, checking everything it was saved with.

    Args:
        name_or_folder: A plain name (looked up under :func:`predictor_folder`) or a folder path
            (a :class:`~pathlib.Path`, or a string with a ``/`` or starting with ``.`` or ``~``).
        slm: The model it will score channels for.

    Returns:
        The predictor, float32 on the CPU (see :meth:`ChannelPredictor.to`).

    Raises:
        ValueError: One line naming the problem and the command that rebuilds the predictor: no
            folder or card, a card that is not JSON, edited (``card_sha256``) or of another format or
            version, a tensors file whose SHA-256 differs from the card's, a stray file, a model with
            other weights or another shape, or missing or misshapen tensors.
    """
    s = slm.spec

    def want(card: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        rank = (card.get("predictor") or {}).get("rank")
        return {
            f"{i}.{k}": shape
            for i in range(s.num_layers)
            for k, shape in (("a", (rank, s.hidden_size)), ("b", (s.intermediate_size, rank)))
        }

    tensors, card = load_artifact(PREDICTOR_KIND, name_or_folder, slm, want)
    return ChannelPredictor(
        [tensors[f"{i}.a"] for i in range(s.num_layers)], [tensors[f"{i}.b"] for i in range(s.num_layers)], card
    )
