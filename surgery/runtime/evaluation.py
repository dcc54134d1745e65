"""Evaluation and comparison: a model's loss on the calibration tokens, and how far its logits lie from a
reference's, accumulated over vocabulary blocks so full-vocabulary logits never exist at once."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .build import streamable
from .progress import QUIET, Progress
from .sources import CheckpointSource, TensorSource
from .streamed import StreamedModel, WholeModel

CHUNK_BYTES = 32 * 2**20  # one float64 block of logits at a time
KEPT_BYTES = 512 * 2**20  # an evaluation's whole float64 logits are kept up to this size (256 tokens x 128k vocab: 263 MB)


@dataclass
class Evaluation:
    """What one model said about the calibration tokens, without its full logits.

    `hidden` and the head it was projected by (`streamed`) give any block of logits again.
    """

    loss: float
    hidden: torch.Tensor  # (tokens, hidden), final normed (a whole encoder-decoder: its logits)
    lse: torch.Tensor  # (tokens,) float64 log-sum-exp over the whole vocabulary
    top1: torch.Tensor  # (tokens,) argmax over the whole vocabulary
    top_logit: torch.Tensor  # (tokens,) float64 logit of that argmax
    vocab: int
    streamed: "StreamedModel | WholeModel"
    compared: list = field(default_factory=list)  # `evaluate(against=...)`: its comparisons, as `compare` gives them
    # (start, stop) -> float64 logits of those vocabulary rows, kept where all of them fit in KEPT_BYTES: a later
    # comparison against this evaluation reads them instead of reading its head again and recomputing them
    kept: dict = field(default_factory=dict, repr=False)


@dataclass
class Comparison:
    """How far one evaluation lies from a reference on the same tokens: what judging reads.

    Logits are compared over the reference's vocabulary (a grown vocab on its first V tokens), in
    float64. Every field is a sum or a max over tokens, so it is accumulated chunk by chunk.
    """
    loss: float  # the candidate's mean next-token loss
    rel_change: float  # (loss - reference loss) / |reference loss|
    max_logit_diff: float  # max over tokens and vocab of |logit difference|
    mean_logit_diff: float  # mean over tokens and vocab of |logit difference|
    top1_agreement: float  # share of tokens whose argmax (greedy next token) agrees
    kl_divergence: float  # KL(reference || other) of next-token distributions, mean over tokens
    compared_vocab: int
    reference_loss: float = math.nan  # the approximate rule bounds KL relative to it: fill it
    # Where the greedy tokens disagree, how far apart the reference put the two tokens (its logit of
    # its own top token minus its logit of the candidate's): max over disagreeing tokens, 0 if none.
    # A flip at a reference gap <= 2B is what logits moved by at most B can do (a near-tie).
    max_flip_gap: float = math.inf
    # A grown vocabulary (the candidate has rows the reference lacks): the relative loss change the new
    # rows' share of the candidate's own normaliser accounts for, that share (mean over predicted
    # positions), and the float32 rounding a loss computed by transformers may carry (sqrt(T) x eps).
    expected_rel_change: float | None = None
    new_rows_mass: float = 0.0
    loss_rounding: float = 0.0


def _chunk(tokens: int) -> int:
    return max(1, CHUNK_BYTES // (8 * max(tokens, 1)))


def evaluate(source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
             progress: Progress = QUIET, desc: str = "evaluating", attn_implementation: str | None = None,
             against: tuple[Evaluation, ...] = (), keep: bool = False) -> Evaluation:
    """Loss (mean next-token cross-entropy, as transformers' loss) of `source` on `ids`, streamed. Each reference in
    `against` is compared with it inside its own head loop (`Evaluation.compared`, in that order): its head blocks
    are read once, and the comparison equals `compare(ref, ev)` bit for bit. `keep`: the evaluation keeps its logits
    where they fit in KEPT_BYTES (`Evaluation.kept`), for a later comparison to read instead of recomputing them."""
    with progress.phase(desc, total=None) as (bar, summary):
        ev = _evaluate(source, ids, device, dtype, bar, attn_implementation, against, keep)
        layers = getattr(ev.streamed, "layers", None)
        summary.append(f"loss {ev.loss:.6f}, " + (f"{len(layers)} layers, " if layers is not None else "whole model, ")
                       + f"{ids.shape[1]} tokens")
    return ev


def _evaluate(source, ids, device, dtype, bar, attn_implementation, against=(), keep=False) -> Evaluation:
    if not streamable(source.config):
        wm = WholeModel(source, device, dtype, attn_implementation)
        with torch.no_grad():
            out = wm.model(input_ids=ids.to(device), labels=ids.to(device))
        z = out.logits[0]
        best, top1 = z.double().max(-1)
        ev = Evaluation(float(out.loss), z, torch.logsumexp(z.double(), -1), top1, best, z.shape[-1], wm)
        ev.compared = [compare(ref, ev) for ref in against]
        return ev
    sm = StreamedModel(source, device, dtype, attn_implementation)
    if bar is not None:
        bar.reset(total=len(sm.layers))
    h = sm.hidden(ids, bar)
    w, b = sm.head_weights()
    T, V = h.shape[0], w.shape[0]
    fused = [_Against(ref, sm) for ref in against if ref.vocab <= V]
    labels = ids[0, 1:].to(h.device)
    lse = torch.full((T,), -math.inf, dtype=torch.float64, device=h.device)
    best = torch.full((T,), -math.inf, dtype=torch.float64, device=h.device)
    top1 = torch.zeros(T, dtype=torch.long, device=h.device)
    target = torch.zeros(T - 1, dtype=torch.float64, device=h.device)
    step = _chunk(T)
    kept = {} if keep and T * V * 8 <= KEPT_BYTES else None
    for start in range(0, V, step):
        stop = min(V, start + step)
        block = _Block(w, b, start, stop)
        z = sm.logits(h, block.weight, block.bias, start, stop).double()
        if kept is not None:
            kept[(start, stop)] = z
        for acc in fused:
            if start < acc.vocab:
                part = z if stop <= acc.vocab else sm.logits(h, block.weight, block.bias, start, acc.vocab).double()
                acc.feed(start, min(stop, acc.vocab), part, block)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        m, j = z.max(-1)
        better = m > best
        best, top1 = torch.where(better, m, best), torch.where(better, j + start, top1)
        inside = (labels >= start) & (labels < stop)
        if inside.any():
            rows = inside.nonzero().flatten()
            target[rows] = z[rows, labels[rows] - start]
        del z, block
    del w, b
    loss = float((lse[:-1] - target).mean())
    ev = Evaluation(loss, h, lse, top1, best, V, sm, kept=kept or {})
    done = {id(acc.ref): acc for acc in fused}
    ev.compared = [done[id(ref)].result(ev) if id(ref) in done else compare(ref, ev) for ref in against]
    return ev


class _Block:
    """One block of vocabulary rows of a head, read once, served to `StreamedModel.logits` as the whole head's
    rows [start, stop) are; `converted(dtype)`: the same rows in another dtype (for a reference that shares them)."""

    def __init__(self, w, b, start: int, stop: int):
        self.start, self.stop = start, stop
        self.weight = _Rows(w[start:stop], start)
        self.bias = None if b is None else _Rows(b[start:stop], start)

    def converted(self, dtype: torch.dtype) -> _Block:
        out = object.__new__(_Block)
        out.start, out.stop = self.start, self.stop
        out.weight = _Rows(self.weight.rows.to(dtype), self.start)
        out.bias = None if self.bias is None else _Rows(self.bias.rows.to(dtype), self.start)
        return out


class _Rows:
    """Rows [offset, offset + len) of a tensor, indexed as the whole tensor is."""

    def __init__(self, rows: torch.Tensor, offset: int):
        self.rows, self.offset = rows, offset

    def __getitem__(self, index: slice) -> torch.Tensor:
        if index.start == self.offset and index.stop == self.offset + self.rows.shape[0]:
            return self.rows
        return self.rows[index.start - self.offset:index.stop - self.offset]


def _same_rows(ref: Evaluation, sm) -> bool:
    """The reference's head is the candidate's read in a narrower float dtype (the source and its float64 noise
    floor): converting the candidate's block gives exactly what reading it again would."""
    rs = getattr(ref.streamed, "source", None)
    return (type(rs) is CheckpointSource and rs is sm.source and ref.streamed.dtype.is_floating_point
            and torch.finfo(ref.streamed.dtype).bits < torch.finfo(sm.dtype).bits)


class _Against:
    """A comparison with `ref` accumulated block by block over the reference's vocabulary, fed the candidate's
    logits: `compare` feeds it recomputed blocks, `evaluate(against=...)` the blocks of its own head loop."""

    def __init__(self, ref: Evaluation, candidate=None):
        self.ref, self.vocab = ref, ref.vocab
        self.share = candidate is not None and _same_rows(ref, candidate)
        self.wr, self.br = (None, None) if self.share or ref.kept else ref.streamed.head_weights()
        self.dev = dev = ref.hidden.device
        T = self.T = ref.hidden.shape[0]
        self.max_diff, self.sum_diff = 0.0, 0.0
        self.lse_o = torch.full((T,), -math.inf, dtype=torch.float64, device=dev)
        self.best = torch.full((T,), -math.inf, dtype=torch.float64, device=dev)
        self.top1 = torch.zeros(T, dtype=torch.long, device=dev)
        self.cross = torch.zeros(T, dtype=torch.float64, device=dev)  # sum_v p_ref (z_ref - z_other)

    def feed(self, start: int, stop: int, b: torch.Tensor, block: _Block | None = None) -> None:
        """The candidate's float64 logits of vocabulary rows [start, stop)."""
        ref = self.ref
        if (start, stop) in ref.kept:  # the same blocks, computed in its own pass: the same bits
            a = ref.kept[start, stop]
        elif self.share:
            rows = block.converted(ref.streamed.dtype)
            a = ref.streamed.logits(ref.hidden, rows.weight, rows.bias, start, stop).double()
        else:
            if self.wr is None:
                self.wr, self.br = ref.streamed.head_weights()
            a = ref.streamed.logits(ref.hidden, self.wr, self.br, start, stop).double()
        b = b.to(self.dev)
        d = a - b
        self.max_diff = max(self.max_diff, float(d.abs().max()))
        self.sum_diff += float(d.abs().sum())
        self.lse_o = torch.logaddexp(self.lse_o, torch.logsumexp(b, -1))
        self.cross += ((a - ref.lse[:, None]).exp() * d).sum(-1)
        m, j = b.max(-1)
        better = m > self.best
        self.best, self.top1 = torch.where(better, m, self.best), torch.where(better, j + start, self.top1)

    def result(self, other: Evaluation) -> Comparison:
        ref, v, T, dev, top1, lse_o = self.ref, self.vocab, self.T, self.dev, self.top1, self.lse_o
        kl = (self.cross - ref.lse + lse_o).mean()
        flips = (ref.top1 != top1).nonzero().flatten()
        gap = 0.0
        if flips.numel():  # the reference's logits at the candidate's top tokens
            wr, br = (self.wr, self.br) if self.wr is not None else ref.streamed.head_weights()
            at = ref.streamed.logits_at(ref.hidden, wr, br, flips, top1[flips])
            gap = float((ref.top_logit[flips] - at.double()).max())
        grown = {}
        if other.vocab > v:  # each predicted position's loss = its loss over the old vocabulary + log(lse_all - lse_old)
            shift = (other.lse.to(dev)[:-1] - lse_o[:-1])
            grown = dict(expected_rel_change=float(shift.mean()) / abs(ref.loss) if ref.loss else math.inf,
                         new_rows_mass=float((1 - (-shift).exp()).mean()),
                         loss_rounding=torch.finfo(torch.float32).eps * (T - 1) ** 0.5)
        return Comparison(
            **grown,
            loss=other.loss,
            rel_change=(other.loss - ref.loss) / abs(ref.loss) if ref.loss else math.inf,
            max_logit_diff=self.max_diff,
            mean_logit_diff=self.sum_diff / (T * v),
            top1_agreement=float((ref.top1 == top1).double().mean()),
            kl_divergence=max(float(kl), 0.0),
            compared_vocab=v,
            reference_loss=ref.loss,
            max_flip_gap=gap,
        )


def compare(ref: Evaluation, other: Evaluation) -> Comparison:
    """Over the reference's vocabulary (a grown vocab is compared on its first V tokens), block by block in float64."""
    acc = _Against(ref)
    wo, bo = other.streamed.head_weights()
    wo, bo = (None if wo is None else wo.to(acc.dev)), (None if bo is None else bo.to(acc.dev))
    ho = other.hidden.to(acc.dev)
    step = _chunk(acc.T)
    for start in range(0, acc.vocab, step):
        stop = min(acc.vocab, start + step)
        acc.feed(start, stop, other.streamed.logits(ho, wo, bo, start, stop).double())
    return acc.result(other)
