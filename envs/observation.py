"""What the agents see: the probe of an input, the per-token decoding features and the per-layer features.

Every observation is computed here, by the one code path the environments, exported controllers,
:func:`agents.adaptive.adaptive_generate` and the evaluation share; none of it needs gymnasium.

- :class:`Probe` (``PerInput``, ``LayerByLayer``): the first ``k`` layers of a prompt, described.
- :class:`TokenObserver` (``PerToken``): features of the forward that predicted the current token.
- :class:`LayerFeatures` (``LayerByLayer``): the layer group to decide next and what was decided so far.

## The probe

A controller must decide how much of the model to run *before* running it, so it looks at the
input through a cheap probe: the embedding and the first ``k`` layers (dense), whose state is then
*kept*: when the plan runs those layers densely too (the default), the rest of the model continues
from the probe's hidden state and KV cache, so the probe's layers are never computed twice. Its
cost is still counted in the episode's latency (no free lunch).

Features (all fixed transforms, no fitted statistics, so every process and every exported
controller computes the same numbers; the names are in :attr:`Probe.feature_names`):

- ``log_len``: ``log1p(prompt tokens) / 8`` (1.0 at about 3000 tokens).
- ``entropy``: entropy of the next-token distribution at the last prompt position, under the
  LM head applied to the probe's hidden state (final norm + LM head, the "logit lens"), divided by
  ``log(lens_vocab)`` so it lies in [0, 1]. The lens covers the first ``lens_vocab`` token ids
  (default 2048; byte-pair vocabularies put the frequent tokens first), not the whole vocabulary:
  on short prompts a forward is bound by reading the weights, and SmolLM2-135M's full head is a
  fifth of them, so a full-vocabulary lens made the probe cost a fifth of a dense forward whatever
  the number of rows (measured); 2048 rows are 4% of the head.
- ``top1``: the probability of the most likely next token there.
- ``nll_mean`` / ``nll_std``: mean and spread of the negative log-likelihood of the last
  ``ll_positions`` prompt tokens under the same lens (the token's own logit is added to the
  normaliser when it lies outside the lens vocabulary), divided by ``log(lens_vocab)``. Only
  those positions go through the lens (default 8).
- ``hidden_norm``: ``log1p`` of the RMS of the probe's hidden state (mean over positions).
- ``attn_norm_<i>`` for each probe layer: ``log1p`` of the mean norm of the attention heads' output.
- ``influence_<i>`` for each probe layer: block influence ``1 - cos(h_in, h_out)`` averaged over
  positions (how much the layer changed the residual stream).
- ``proj_<j>`` for ``j < proj_dim``: the probe's hidden state mean-pooled over positions,
  standardised (zero mean, unit variance over its ``hidden_size`` entries) and projected by a fixed
  Gaussian matrix drawn from ``proj_seed`` (entries ``N(0, 1/hidden_size)``), so each entry is
  roughly ``N(0, 1)``. Scalar confidence signals alone predict which inputs tolerate pruning little
  better than chance; a compact view of the hidden state is what hidden-state predictors (Deja Vu)
  work from. The matrix is regenerated from ``(proj_seed, hidden_size, proj_dim)``, which
  :meth:`Probe.config` records.

Every feature is clipped to ``[-OBS_CLIP, OBS_CLIP]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from envs.runtime.sparse_lm import KVCache, RunState, SparseLM

OBS_CLIP = 10.0
PROBE_VERSION = 1


@dataclass
class ProbeResult:
    """What one probe run leaves behind.

    Attributes:
        ids: The prompt's token ids, ``[1, P]``.
        state: Activations after the probe's layers (hidden state, positions, rotary tables).
        cache: KV cache holding the probe's layers (length not yet advanced: the prompt is half-run).
        features: The feature vector (float32, clipped).
        seconds: Wall-clock time of the probe run, features included.
    """

    ids: torch.Tensor
    state: RunState
    cache: KVCache
    features: np.ndarray
    seconds: float

    @property
    def prompt_len(self) -> int:
        """Prompt tokens."""
        return int(self.ids.shape[1])


class Probe:
    """Runs the first ``layers`` decoder layers densely and computes the features above.

    Args:
        slm: The model.
        layers: Probe depth ``k`` (0 probes the embeddings only); must be below the layer count.
        proj_dim: Dimensions of the projected hidden state (0 for none).
        proj_seed: Seed of the projection matrix.
        ll_positions: Prompt positions whose log-likelihood is computed (the last ones).
        lens_vocab: Token ids ``0..lens_vocab-1`` the lens's distribution is taken over (plus the
            scored token); ``None`` for the whole vocabulary.

    Raises:
        ValueError: A setting out of range; the message gives the range.
    """

    def __init__(
        self,
        slm: SparseLM,
        layers: int = 2,
        proj_dim: int = 32,
        proj_seed: int = 0,
        ll_positions: int = 8,
        lens_vocab: int | None = 2048,
    ) -> None:
        L = slm.spec.num_layers
        if not 0 <= layers < L:
            raise ValueError(f"probe layers must be in [0, {L - 1}] for this {L}-layer model, got {layers}")
        if lens_vocab is not None and lens_vocab < 2:
            raise ValueError(f"probe lens_vocab must be >= 2 or None (whole vocabulary), got {lens_vocab}")
        if proj_dim < 0 or ll_positions < 1:
            raise ValueError(f"probe proj_dim must be >= 0 and ll_positions >= 1, got {proj_dim}, {ll_positions}")
        self.slm, self.layers, self.proj_dim = slm, int(layers), int(proj_dim)
        self.proj_seed, self.ll_positions = int(proj_seed), int(ll_positions)
        D = slm.spec.hidden_size
        rng = np.random.default_rng(self.proj_seed)
        proj = rng.standard_normal((D, self.proj_dim)) / math.sqrt(D)
        self._proj = torch.as_tensor(proj, dtype=torch.float32)
        head = slm.lm_head
        V = head.weight.shape[0]
        self.lens_vocab = V if lens_vocab is None else min(int(lens_vocab), V)
        self._lens_w = head.weight[: self.lens_vocab]  # a view: the first rows, no copy
        self._lens_b = None if getattr(head, "bias", None) is None else head.bias[: self.lens_vocab]
        self._log_v = math.log(max(self.lens_vocab, 2))
        self._dense = slm.dense_plan()
        self.feature_names: list[str] = (
            ["log_len", "entropy", "top1", "nll_mean", "nll_std", "hidden_norm"]
            + [f"attn_norm_{i}" for i in range(self.layers)]
            + [f"influence_{i}" for i in range(self.layers)]
            + [f"proj_{j}" for j in range(self.proj_dim)]
        )

    @property
    def dim(self) -> int:
        """Length of the feature vector."""
        return len(self.feature_names)

    def config(self) -> dict[str, Any]:
        """Everything needed to recompute the same features elsewhere (saved with the env config)."""
        return {
            "version": PROBE_VERSION,
            "layers": self.layers,
            "proj_dim": self.proj_dim,
            "proj_seed": self.proj_seed,
            "ll_positions": self.ll_positions,
            "lens_vocab": self.lens_vocab,
            "projection": "gaussian N(0, 1/hidden_size), numpy default_rng(proj_seed).standard_normal((D, proj_dim))",
            "hidden_size": self.slm.spec.hidden_size,
            "feature_names": list(self.feature_names),
            "clip": OBS_CLIP,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], slm: SparseLM) -> Probe:
        """The probe :meth:`config` describes, for ``slm``.

        Raises:
            ValueError: Another probe version, or a description that does not rebuild the same features.
        """
        if int(cfg.get("version", -1)) != PROBE_VERSION:
            raise ValueError(
                f"the probe is version {cfg.get('version')!r}, this PruneGym computes version {PROBE_VERSION}: "
                "install the PruneGym version it was made with, or re-export"
            )
        probe = cls(
            slm,
            int(cfg["layers"]),
            int(cfg["proj_dim"]),
            int(cfg["proj_seed"]),
            int(cfg["ll_positions"]),
            None if cfg.get("lens_vocab") is None else int(cfg["lens_vocab"]),
        )
        if probe.config() != dict(cfg):
            diff = sorted(k for k in set(cfg) | set(probe.config()) if cfg.get(k) != probe.config().get(k))
            raise ValueError(f"the probe description differs from the probe it rebuilds for this model in {diff}")
        return probe

    @torch.no_grad()
    def run(self, ids: torch.Tensor | list[int]) -> ProbeResult:
        """Probe a prompt (``[P]``, ``[1, P]`` or a list of ids)."""
        t0 = time.perf_counter()
        slm = self.slm
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(slm.device)
        cache = slm.new_cache()
        state = slm.start(ids, cache)
        attn: list[float] = []
        infl: list[float] = []
        layer_in: dict[int, torch.Tensor] = {}

        def observe(i: int, name: str, t: torch.Tensor) -> None:
            if name == "attn_heads":
                attn.append(float(t.float().norm(dim=-1).mean()) / math.sqrt(slm.spec.num_heads))
            elif name == "layer_in":
                layer_in[i] = t
            elif name == "layer_out":
                cos = torch.nn.functional.cosine_similarity(layer_in.pop(i).float(), t.float(), dim=-1)
                infl.append(float((1 - cos).mean()))

        if self.layers:
            slm.run_layers(state, self._dense, 0, self.layers, observer=observe)
        features = self._features(ids, state.hidden, attn, infl)
        return ProbeResult(ids, state, cache, features, time.perf_counter() - t0)

    def _features(self, ids: torch.Tensor, h: torch.Tensor, attn: list[float], infl: list[float]) -> np.ndarray:
        slm, P = self.slm, ids.shape[1]
        m = min(self.ll_positions, P - 1)
        pos = torch.arange(P - 1 - m, P, device=h.device)  # m positions predicting the last m tokens, + the last
        x = slm.final_norm(h.index_select(1, pos))[0]
        logits = torch.nn.functional.linear(x, self._lens_w, self._lens_b).float()  # [m + 1, lens_vocab]
        logp = torch.log_softmax(logits, dim=-1)
        last = logp[-1]
        p_last = last.exp()
        entropy = float(-(p_last * last).sum()) / self._log_v
        top1 = float(p_last.max())
        if m > 0:
            # The scored token's own logit joins the normaliser when it lies outside the lens vocabulary.
            tgt = ids[0, P - m :]
            w_t = slm.lm_head.weight.index_select(0, tgt)
            own = (x[:-1] * w_t).sum(-1).float()
            if self._lens_b is not None:
                own = own + slm.lm_head.bias.index_select(0, tgt).float()
            outside = tgt >= self.lens_vocab
            norm = torch.logsumexp(logits[:-1], dim=-1)
            norm = torch.where(outside, torch.logaddexp(norm, own), norm)
            nll = (norm - own) / self._log_v
            nll_mean, nll_std = float(nll.mean()), float(nll.std()) if m > 1 else 0.0
        else:
            nll_mean = nll_std = 0.0
        hf = h[0].float()
        hidden_norm = math.log1p(float(hf.pow(2).mean(-1).sqrt().mean()))
        scal = [math.log1p(P) / 8.0, entropy, top1, nll_mean, nll_std, hidden_norm]
        scal += [math.log1p(a) for a in attn] + infl
        out = np.asarray(scal, dtype=np.float32)
        if self.proj_dim:
            pooled = hf.mean(0)
            pooled = (pooled - pooled.mean()) / (pooled.std() + 1e-6)
            out = np.concatenate([out, (pooled @ self._proj).numpy().astype(np.float32)])
        return clip_features(out)


# ---------------------------------------------------------------------------------------- per token
TOKEN_FEATURES = (
    "step",
    "entropy",
    "top1",
    "margin",
    "nll",
    "hidden_norm",
    "attn_norm",
    "prev_flops",
)
TOKEN_VERSION = 2  # 1 had "prev_agree", which a deployed controller cannot know


class TokenObserver:
    """The features of :data:`TOKEN_FEATURES` for one decoding sequence.

    Pass :meth:`hook` as the ``observer`` of every forward; :meth:`features` then describes the
    distribution the last forward predicted (the current token's), at decoding step ``step``:
    ``step / horizon``; entropy (over ``log(vocab)``), top-1 probability and top-1/top-2 margin;
    the negative log-likelihood of the current token (over ``log(vocab)``); ``log1p`` of the RMS of
    the last running layer's output at the last position and of the mean norm of its attention
    heads' output; the FLOPs fraction of the plan that made the forward (1 for the dense prefill).

    Args:
        spec: The model's shape.
        horizon: ``max_new_tokens`` of the environment (the step feature's scale).
    """

    def __init__(self, spec: Any, horizon: int) -> None:
        self.spec, self.horizon = spec, int(horizon)
        self._log_v = math.log(max(spec.vocab_size, 2))
        self._signals: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        """Length of the feature vector."""
        return len(TOKEN_FEATURES)

    def config(self) -> dict[str, Any]:
        """What rebuilds the same features (saved with the env's description)."""
        return {"version": TOKEN_VERSION, "features": list(TOKEN_FEATURES), "horizon": self.horizon, "clip": OBS_CLIP}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], spec: Any) -> TokenObserver:
        """The observer :meth:`config` describes.

        Raises:
            ValueError: Another feature version.
        """
        if int(cfg.get("version", -1)) != TOKEN_VERSION or list(cfg.get("features", [])) != list(TOKEN_FEATURES):
            raise ValueError(
                f"per-token features of version {cfg.get('version')!r} ({cfg.get('features')}); this PruneGym computes "
                f"version {TOKEN_VERSION} ({list(TOKEN_FEATURES)}): re-export the controller"
            )
        return cls(spec, int(cfg["horizon"]))

    def reset(self) -> None:
        """Forget the signals of the previous sequence."""
        self._signals = {}

    def hook(self, i: int, name: str, t: torch.Tensor) -> None:
        """The forward's observer: keeps the last running layer's outputs (a reference, no work per layer)."""
        if name in ("attn_heads", "layer_out"):
            self._signals[name] = t

    def features(self, logits: torch.Tensor, token: int, step: int, prev_flops: float) -> np.ndarray:
        """The observation after the forward that gave ``logits`` (``[V]``) and chose ``token``."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        top = torch.topk(p, 2).values
        a, h = self._signals.get("attn_heads"), self._signals.get("layer_out")
        attn = float(a.float().norm(dim=-1).mean()) / math.sqrt(self.spec.num_heads) if a is not None else 0.0
        hid = float(h[0, -1].float().pow(2).mean().sqrt()) if h is not None else 0.0
        feats = [
            step / self.horizon,
            float(-(p * logp).sum()) / self._log_v,
            float(top[0]),
            float(top[0] - top[1]),
            float(-logp[token]) / self._log_v,
            math.log1p(hid),
            math.log1p(attn),
            prev_flops,
        ]
        return clip_features(feats)


def clip_features(values: Any) -> np.ndarray:
    """float32, NaN as 0, clipped to ``[-OBS_CLIP, OBS_CLIP]``: the last transform of every observation."""
    out = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=OBS_CLIP, neginf=-OBS_CLIP)
    return np.clip(out, -OBS_CLIP, OBS_CLIP).astype(np.float32)


# ---------------------------------------------------------------------------------------- per layer
LAYER_FEATURES = (
    "step",
    "importance",
    "flops_share",
    "used",
    "remaining_share",
    "prev_layers",
    "prev_heads",
    "prev_mlp",
    "budget",
)


class LayerFeatures:
    """The features of :data:`LAYER_FEATURES`, followed by the probe's, for ``LayerByLayer``'s step ``t``.

    Step ``t / G``; the group's importance (its mean block influence from the model's importance
    calibration, over the largest layer's; the ordering's ranks when there are no scores); its share
    of the decoder's layers; the FLOPs fraction of the groups decided so far (probe layers included,
    later groups off); the share of the groups after it; the previous step's three fractions (ones
    at ``t = 0``); the budget (1 without one).

    Args:
        importance: The model's importance orderings (and scores).
        num_layers: Decoder layers of the model.
        groups: The layer groups, in decision order.
    """

    def __init__(self, importance: Any, num_layers: int, groups: list[list[int]]) -> None:
        L = num_layers
        scores = list(importance.layer_scores)
        if len(scores) != L:  # no calibration scores: fall back to the ordering's ranks
            rank = {layer: r for r, layer in enumerate(importance.layer_order)}
            scores = [1.0 - rank[i] / L for i in range(L)]
        top = max(max(scores), 1e-12)
        G = len(groups)
        self.groups = groups
        self.importance = np.array([np.mean([scores[i] / top for i in g]) for g in groups], dtype=np.float64)
        self.share = np.array([len(g) / L for g in groups], dtype=np.float64)
        self.after = np.array([self.share[t + 1 :].sum() for t in range(G)], dtype=np.float64)

    def features(
        self, t: int, fractions: np.ndarray, used: float, budget: float | None, probe_features: np.ndarray
    ) -> np.ndarray:
        """The observation before deciding group ``t``, given the fractions decided so far (``[G, 3]``)."""
        prev = fractions[t - 1] if t > 0 else np.ones(3)
        head = [
            t / len(self.groups),
            self.importance[t],
            self.share[t],
            used,
            self.after[t],
            *prev,
            1.0 if budget is None else budget,
        ]
        return np.clip(np.concatenate([np.asarray(head, np.float32), probe_features]), -OBS_CLIP, OBS_CLIP).astype(
            np.float32
        )


# ---------------------------------------------------------------------------------------- staged
STAGE_FEATURES = (
    "depth",
    "margin",
    "entropy",
    "top",
    "changed",
    "saturation",
    "choice",
    "budget_left",
)


def stage_features(
    layer_features: np.ndarray, readout: Any, *, depth: float, changed: bool, saturation: float, budget_left: float
) -> np.ndarray:
    """``Staged``'s observation: :data:`LAYER_FEATURES`, then :data:`STAGE_FEATURES`, then the probe's.

    ``layer_features`` is :meth:`LayerFeatures.features`'s vector (which ends with the probe's
    features); ``readout`` an :class:`envs.runtime.staged.Readout`. The readout entries are the
    margin between the two best answers (nats for choices, probability for tokens), the entropy
    over them (over its maximum), the top probability, whether the pick changed since the previous
    readout, the cosine similarity of the last prompt position's hidden state before and after the
    last group (CALM's saturation signal), and whether the readout is over choices.
    """
    n = len(LAYER_FEATURES)
    own = [
        depth,
        readout.margin,
        readout.entropy,
        readout.top,
        float(changed),
        saturation,
        float(readout.choice),
        budget_left,
    ]
    return clip_features(np.concatenate([layer_features[:n], np.asarray(own, np.float32), layer_features[n:]]))
