"""A prompt and an item's answers run one layer group at a time, with the model's own answer read after each.

:class:`StagedRun` continues from a probe's state (:class:`envs.observation.ProbeResult`): each
:meth:`StagedRun.advance` runs the next layers of the prompt under a plan, extending the stored
hidden state and KV cache, so no layer is ever computed twice. For a multiple-choice item the
choices' tokens go through the same layers (sharing the prompt's cache, as the scorer does), so the
answer can be read at the current depth; when the episode ends, :meth:`StagedRun.prefill` hands
the scorer the prompt's state *and* the choices' hidden states, and the scorer's answer is the one
the plan that skips every later layer gives, bit for bit (the same operations on the same tensors).

The readout (:meth:`StagedRun.readout`) is the logit lens: the final norm and the LM head applied
to the current hidden state (through the model's exit map for that depth when it has them:
:meth:`envs.runtime.sparse_lm.SparseLM.output_norm`, the scorer's own path), restricted to what
the task scores, because on short prompts the head's rows cost what the weights cost to read (a
full-vocabulary lens is a fifth of a dense forward of the embedded model):

- multiple choice: the log-likelihood of every choice with the distribution at each position taken
  over the item's *answer vocabulary* (the distinct tokens of its choices), so only those rows of
  the head are read; the first position's normaliser is shared by the choices and cancels;
- other items: the next-token distribution at the last prompt position over the first
  ``lens_vocab`` token ids (the probe's lens).

Reported: the pick (choice index or token id), the margin between the two best scores
(log-likelihood difference in nats for choices, probability difference for tokens), the entropy
of the softmax over them (divided by its maximum), the top probability, and the FLOPs of the rows
read (:attr:`Readout.flops`), which the environments count as part of the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from envs.runtime.plan import SparsityPlan
from envs.runtime.sparse_lm import KVCache, Prefill, RunState, SparseLM


@dataclass(frozen=True)
class Readout:
    """The model's answer at the current depth.

    Attributes:
        pick: The best choice's index (multiple choice) or the most likely next token id.
        scores: Choice log-likelihoods ``[C]`` (multiple choice) or the two best log-probabilities.
        margin: Best minus second-best score (nats for choices; probabilities for tokens).
        entropy: Entropy of the softmax over the scores, over its maximum (in [0, 1]).
        top: Probability of the pick under that softmax.
        choice: Whether it is a choice readout.
        flops: Multiply-accumulate FLOPs (×2) of the LM-head rows read.
    """

    pick: int
    scores: torch.Tensor
    margin: float
    entropy: float
    top: float
    choice: bool
    flops: float


def _shared(lc: Any, n: int) -> Any:
    """A batch-``n`` view of one layer's batch-1 cache entry (no copy)."""
    if lc is None:
        return None
    return replace(lc, k=lc.k.expand(n, -1, -1, -1), v=lc.v.expand(n, -1, -1, -1))


class StagedRun:
    """One prompt (and, for multiple choice, its continuations) run in stages from a probe's state.

    Args:
        slm: The model.
        probe: A :class:`envs.observation.ProbeResult`; not modified (its cache is copied by reference).
        conts: The choices' token ids (as the scorer encodes them), or ``None`` for a next-token readout.
        mc_norm: ``"sum"`` or ``"mean"``: how choice log-likelihoods combine (the scorer's setting).
        lens_vocab: Rows of the next-token readout (the probe's lens).
    """

    def __init__(
        self,
        slm: SparseLM,
        probe: Any,
        conts: list[list[int]] | None = None,
        *,
        mc_norm: str = "sum",
        lens_vocab: int = 2048,
    ) -> None:
        self.slm, self.mc_norm = slm, mc_norm
        self.prompt = probe.ids[0].tolist()
        self.prompt_len = int(probe.prompt_len)
        self.depth = self._probe_depth(probe)
        self.cache = KVCache(probe.cache.num_layers, 0, list(probe.cache.layers))
        self.state = replace(probe.state, cache=self.cache)
        head = slm.lm_head
        self._bias = getattr(head, "bias", None)
        D = slm.spec.hidden_size
        self.conts = conts
        self._cont: RunState | None = None
        if conts is not None:
            if not conts or any(len(c) == 0 for c in conts):
                raise ValueError("every choice must have at least one token")
            vocab = sorted({t for c in conts for t in c})
            self._vocab = torch.tensor(vocab, device=slm.device)
            where = {t: j for j, t in enumerate(vocab)}
            self._w = head.weight.index_select(0, self._vocab)  # the answer vocabulary's rows (a small copy)
            self._b = None if self._bias is None else self._bias.index_select(0, self._vocab)
            self.feed = [len(c) - 1 for c in conts]
            width = max(self.feed)
            U = len(vocab)
            # Readout rows: the last prompt position (row 0), then the choices' fed positions, row-major [C, W].
            # Each choice's log-likelihood is a sum of entries of the flattened [1 + C*W, U] log-probabilities.
            flat: list[int] = []
            owner: list[int] = []
            for ci, c in enumerate(conts):
                flat.append(where[c[0]])
                owner.append(ci)
                for j in range(self.feed[ci]):
                    flat.append((1 + ci * width + j) * U + where[c[j + 1]])
                    owner.append(ci)
            self._flat = torch.tensor(flat, device=slm.device)
            self._owner = torch.tensor(owner, device=slm.device)
            if width > 0:
                x = torch.tensor([c[:f] + [0] * (width - f) for c, f in zip(conts, self.feed, strict=True)])
                cont_cache = KVCache(self.cache.num_layers, self.prompt_len, [None] * self.cache.num_layers)
                with torch.no_grad():
                    st = slm.start(x.to(slm.device), cont_cache)
                st.causal_fresh = False  # the prompt is in the cache: mask by positions
                self._cont = st
            self._positions = 1 + len(conts) * width  # positions read (padding included): the exit map's too
            self._rows = U * self._positions  # rows of the head read
        else:
            self._vocab = None
            self.lens_vocab = min(int(lens_vocab), head.weight.shape[0])
            self._w = head.weight[: self.lens_vocab]
            self._b = None if self._bias is None else self._bias[: self.lens_vocab]
            self._rows = self.lens_vocab
            self._positions = 1
        self._row_flops = 2.0 * D
        self.layer_runs = [0] * slm.spec.num_layers  # forwards per layer (prompt), for audits and tests
        self.first_layer = self.depth  # the probe's depth: stages start here
        # each layer's input (hidden state, adapted, last layer run), for rewind()
        self._before: dict[int, tuple[torch.Tensor, bool, int]] = {}
        self._cont_before: dict[int, tuple[torch.Tensor, bool, int]] = {}
        if self._cont is not None and self.depth:
            self._advance_conts(slm.dense_plan(), 0, self.depth)

    @staticmethod
    def _probe_depth(probe: Any) -> int:
        return sum(1 for lc in probe.cache.layers if lc is not None)

    # ------------------------------------------------------------------ running
    def _advance_conts(self, plan: SparsityPlan, start: int, stop: int) -> None:
        st = self._cont
        if st is None:
            return
        n = st.hidden.shape[0]
        assert st.cache is not None
        for i in range(start, stop):
            st.cache.layers[i] = _shared(self.cache.layers[i], n)
            self._cont_before[i] = (st.hidden, st.adapted, st.last_layer)
            self.slm.run_layers(st, plan, i, i + 1)

    def advance(self, plan: SparsityPlan, stop: int, *, conts: bool = True) -> None:
        """Run layers ``depth..stop-1`` of ``plan`` on the prompt (and the choices, unless ``conts=False``).

        With ``conts=False`` only the prompt runs; call :meth:`advance_conts` afterwards to bring
        the choices to the same depth (a meter times the prompt's part alone).
        """
        start = self.depth
        if not start <= stop <= self.slm.spec.num_layers:
            raise ValueError(f"stop must be in [{start}, {self.slm.spec.num_layers}], got {stop}")
        with torch.no_grad():
            for i in range(start, stop):  # layer by layer, keeping each layer's input for rewind()
                self._before[i] = (self.state.hidden, self.state.adapted, self.state.last_layer)
                self.slm.run_layers(self.state, plan, i, i + 1)
                self.layer_runs[i] += int(plan.layers[i].run)
        self.depth = stop
        self._pending = (plan, start, stop)
        if conts:
            self.advance_conts()

    def advance_conts(self) -> None:
        """Bring the choices to the prompt's depth (after :meth:`advance` with ``conts=False``)."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        self._pending = None
        with torch.no_grad():
            self._advance_conts(*pending)

    def rewind(self, layer: int) -> None:
        """Go back to the input of ``layer`` (``probe depth <= layer <= depth``): later layers are forgotten.

        What ran before ``layer`` is kept (hidden states and KV caches), so a denser plan that
        differs from here on reruns only layers ``layer..``: a cascade's escalation.
        """
        self.advance_conts()
        if not self.first_layer <= layer <= self.depth:
            raise ValueError(f"can rewind to layers {self.first_layer}..{self.depth} only, got {layer}")
        if layer == self.depth:
            return
        self.state.hidden, self.state.adapted, self.state.last_layer = self._before[layer]
        L = self.slm.spec.num_layers
        for i in range(layer, L):
            self.cache.layers[i] = None
        if self._cont is not None:
            assert self._cont.cache is not None
            self._cont.hidden, self._cont.adapted, self._cont.last_layer = self._cont_before[layer]
            for i in range(layer, L):
                self._cont.cache.layers[i] = None
        self.depth = layer

    def snapshot(self) -> tuple[Any, ...]:
        """State to return to with :meth:`restore` (a meter may run a stage more than once)."""
        cont = None
        if self._cont is not None:
            assert self._cont.cache is not None
            cont = (self._cont.hidden, self._cont.adapted, self._cont.last_layer, list(self._cont.cache.layers))
        st = self.state
        return (self.depth, st.hidden, st.adapted, st.last_layer, list(self.cache.layers), cont, list(self.layer_runs))

    def restore(self, snap: tuple[Any, ...]) -> None:
        """Return to a :meth:`snapshot`."""
        self.depth, self.state.hidden, self.state.adapted, self.state.last_layer, layers, cont, runs = snap
        self.cache.layers = list(layers)
        self.layer_runs = list(runs)
        self._pending = None
        if cont is not None and self._cont is not None:
            assert self._cont.cache is not None
            self._cont.hidden, self._cont.adapted, self._cont.last_layer, cl = cont
            self._cont.cache.layers = list(cl)

    # ------------------------------------------------------------------ reading
    def last_hidden(self) -> torch.Tensor:
        """The prompt's last-position hidden state, ``[D]`` (the saturation signal's input)."""
        return self.state.hidden[0, -1]

    @torch.no_grad()
    def readout(self) -> Readout:
        """The answer at the current depth (see the module docstring)."""
        slm = self.slm
        last = self.state.last_layer
        flops = self._rows * self._row_flops
        if slm.exits_mapped(last):  # the exit map runs at every position read
            flops += self._positions * slm.exit_maps.flops_per_position()
        if self.conts is None:
            x0 = slm.output_norm(self.state.hidden[:, -1:], last)[0, 0]
            logp = torch.log_softmax(torch.nn.functional.linear(x0, self._w, self._b).float(), -1)
            top2 = torch.topk(logp, 2)
            p = top2.values.exp()
            ent = float(-(logp.exp() * logp).sum()) / math.log(max(logp.shape[0], 2))
            return Readout(int(top2.indices[0]), top2.values, float(p[0] - p[1]), ent, float(p[0]), False, flops)
        h = self.state.hidden[0, -1:]
        if self._cont is not None:
            h = torch.cat([h, self._cont.hidden.reshape(-1, h.shape[-1])])
        lp = torch.log_softmax(torch.nn.functional.linear(slm.output_norm(h, last), self._w, self._b).float(), -1)
        C = len(self.conts)
        ll = torch.zeros(C).index_add_(0, self._owner, lp.reshape(-1).index_select(0, self._flat))
        if self.mc_norm == "mean":
            ll = ll / torch.tensor([f + 1 for f in self.feed], dtype=ll.dtype)
        srt = torch.topk(ll, min(C, 2)).values
        margin = float(srt[0] - srt[1]) if C > 1 else OBS_MARGIN_ONE
        q = torch.softmax(ll, 0)
        ent = float(-(q * torch.log(q.clamp_min(1e-30))).sum()) / math.log(max(C, 2))
        return Readout(int(ll.argmax()), ll, margin, ent, float(q.max()), True, flops)

    @torch.no_grad()
    def prefill(self, plan: SparsityPlan, first: torch.Tensor | None = None) -> Prefill:
        """The prompt (and choices) as run so far, for the scorer: its answer is ``plan``'s at this depth.

        ``plan`` must be the plan that ran (later layers off); ``first`` the LM head's logits at the
        last prompt position if already computed (``[1, 1, V]``). The choices' logits are computed
        by the scorer, once, from their stored hidden states (the full head: this is the answer itself).
        """
        self.advance_conts()
        if first is None:
            first = self.slm.finish(self.state, "last").logits
        self.cache.length = self.prompt_len
        rest = None
        if self._cont is not None:
            rest = self.slm.finish(self._cont, "none").hidden
        assert first is not None
        return Prefill(self.prompt, plan, self.cache, first[0, -1:], rest=rest, rest_conts=self.conts)


OBS_MARGIN_ONE = 10.0  # margin reported when an item has a single choice (nothing to be unsure between)


# ---------------------------------------------------------------------------------------- per-token exits
@dataclass(frozen=True)
class TokenExit:
    """CALM's per-token exit: read the next-token distribution after each exit layer, stop when sure.

    Attributes:
        exits: Layers after which the answer is read (ascending, each below the layer count).
        threshold: Stop when the top-1 minus top-2 probability of the readout reaches this.
        lens_vocab: Token ids ``0..lens_vocab-1`` the readout's distribution is taken over.
    """

    exits: tuple[int, ...]
    threshold: float
    lens_vocab: int = 2048

    def readout_flops(self, slm: SparseLM) -> float:
        """FLOPs of one readout (its LM-head rows, and the exit map when the model has them)."""
        maps = 0.0 if slm.exit_maps is None else slm.exit_maps.flops_per_position()
        return 2.0 * slm.spec.hidden_size * min(self.lens_vocab, slm.lm_head.weight.shape[0]) + maps


def exit_forward(
    slm: SparseLM,
    input_ids: torch.Tensor,
    plan: SparsityPlan,
    cache: KVCache,
    rule: TokenExit,
    observer: Any = None,
) -> tuple[Any, int, int]:
    """Decode one step under ``plan``, stopping after the first exit layer whose readout is sure enough.

    The layers after the exit do not run for this token, so their KV caches hold nothing for it
    (later tokens attend there to the tokens those layers saw, as :class:`KVCache` keeps for any
    skipped layer). On an exception the cache is rolled back.

    Returns:
        The :class:`~envs.runtime.sparse_lm.ForwardOutput` (logits at the last position from the exit
        depth), the depth reached, and the number of readouts made.
    """
    plan = slm.check_plan(plan)
    L = slm.spec.num_layers
    w = slm.lm_head.weight[: rule.lens_vocab]
    b = getattr(slm.lm_head, "bias", None)
    b = None if b is None else b[: rule.lens_vocab]
    snap = cache.snapshot()
    reads = 0
    try:
        with torch.no_grad():
            state = slm.start(input_ids, cache)
            depth = 0
            for stop in [*[e for e in rule.exits if 0 < e < L], L]:
                slm.run_layers(state, plan, depth, stop, observer=observer)
                depth = stop
                if stop == L:
                    break
                reads += 1
                x = slm.output_norm(state.hidden[0, -1], state.last_layer)
                p = torch.softmax(torch.nn.functional.linear(x, w, b).float(), -1)
                top = torch.topk(p, 2).values
                if float(top[0] - top[1]) >= rule.threshold:
                    break
            out = slm.finish(state, "last")
    except BaseException:
        cache.restore(snap)
        raise
    cache.length += state.positions.shape[0]
    return out, depth, reads


def truncated(plan: SparsityPlan, depth: int) -> SparsityPlan:
    """``plan`` with every layer from ``depth`` on skipped (what an exit at ``depth`` ran)."""
    from envs.runtime.plan import LayerPlan

    if depth >= plan.spec.num_layers:
        return plan
    off = LayerPlan(False, (), (), 0)
    return SparsityPlan(plan.spec, tuple(lp if i < depth else off for i, lp in enumerate(plan.layers)), dict(plan.meta))
