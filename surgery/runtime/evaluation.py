"""Evaluation and comparison: a model's loss on the calibration tokens, and how far its logits lie from a
reference's, accumulated over vocabulary blocks so full-vocabulary logits never exist at once."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .build import streamable
from .progress import QUIET, Progress
from .sources import TensorSource
from .streamed import StreamedModel, WholeModel

CHUNK_BYTES = 32 * 2**20  # one float64 block of logits at a time


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
             progress: Progress = QUIET, desc: str = "evaluating", attn_implementation: str | None = None) -> Evaluation:
    """Loss (mean next-token cross-entropy, as transformers' loss) of `source` on `ids`, streamed."""
    with progress.phase(desc, total=None) as (bar, summary):
        ev = _evaluate(source, ids, device, dtype, bar, attn_implementation)
        layers = getattr(ev.streamed, "layers", None)
        summary.append(f"loss {ev.loss:.6f}, " + (f"{len(layers)} layers, " if layers is not None else "whole model, ")
                       + f"{ids.shape[1]} tokens")
    return ev


def _evaluate(source, ids, device, dtype, bar, attn_implementation) -> Evaluation:
    if not streamable(source.config):
        wm = WholeModel(source, device, dtype, attn_implementation)
        with torch.no_grad():
            out = wm.model(input_ids=ids.to(device), labels=ids.to(device))
        z = out.logits[0]
        best, top1 = z.double().max(-1)
        return Evaluation(float(out.loss), z, torch.logsumexp(z.double(), -1), top1, best, z.shape[-1], wm)
    sm = StreamedModel(source, device, dtype, attn_implementation)
    if bar is not None:
        bar.reset(total=len(sm.layers))
    h = sm.hidden(ids, bar)
    w, b = sm.head_weights()
    T, V = h.shape[0], w.shape[0]
    labels = ids[0, 1:].to(h.device)
    lse = torch.full((T,), -math.inf, dtype=torch.float64, device=h.device)
    best = torch.full((T,), -math.inf, dtype=torch.float64, device=h.device)
    top1 = torch.zeros(T, dtype=torch.long, device=h.device)
    target = torch.zeros(T - 1, dtype=torch.float64, device=h.device)
    step = _chunk(T)
    for start in range(0, V, step):
        stop = min(V, start + step)
        z = sm.logits(h, w, b, start, stop).double()
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        m, j = z.max(-1)
        better = m > best
        best, top1 = torch.where(better, m, best), torch.where(better, j + start, top1)
        inside = (labels >= start) & (labels < stop)
        if inside.any():
            rows = inside.nonzero().flatten()
            target[rows] = z[rows, labels[rows] - start]
        del z
    del w, b
    loss = float((lse[:-1] - target).mean())
    return Evaluation(loss, h, lse, top1, best, V, sm)


def compare(ref: Evaluation, other: Evaluation) -> Comparison:
    """Over the reference's vocabulary (a grown vocab is compared on its first V tokens), block by block in float64."""
    v = ref.vocab
    wr, br = ref.streamed.head_weights()
    wo, bo = other.streamed.head_weights()
    wo, bo = (None if wo is None else wo.to(ref.hidden.device)), (None if bo is None else bo.to(ref.hidden.device))
    T = ref.hidden.shape[0]
    dev = ref.hidden.device
    hr, ho = ref.hidden, other.hidden.to(dev)
    max_diff, sum_diff = 0.0, 0.0
    lse_o = torch.full((T,), -math.inf, dtype=torch.float64, device=dev)
    best = torch.full((T,), -math.inf, dtype=torch.float64, device=dev)
    top1 = torch.zeros(T, dtype=torch.long, device=dev)
    cross = torch.zeros(T, dtype=torch.float64, device=dev)  # sum_v p_ref (z_ref - z_other)
    step = _chunk(T)
    for start in range(0, v, step):
        stop = min(v, start + step)
        a = ref.streamed.logits(hr, wr, br, start, stop).double()
        b = other.streamed.logits(ho, wo, bo, start, stop).double()
        d = a - b
        max_diff = max(max_diff, float(d.abs().max()))
        sum_diff += float(d.abs().sum())
        lse_o = torch.logaddexp(lse_o, torch.logsumexp(b, -1))
        cross += ((a - ref.lse[:, None]).exp() * d).sum(-1)
        m, j = b.max(-1)
        better = m > best
        best, top1 = torch.where(better, m, best), torch.where(better, j + start, top1)
        del a, b, d
    kl = (cross - ref.lse + lse_o).mean()
    flips = (ref.top1 != top1).nonzero().flatten()
    gap = 0.0
    if flips.numel():  # the reference's logits at the candidate's top tokens
        at = ref.streamed.logits_at(hr, wr, br, flips, top1[flips])
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
        max_logit_diff=max_diff,
        mean_logit_diff=sum_diff / (T * v),
        top1_agreement=float((ref.top1 == top1).double().mean()),
        kl_divergence=max(float(kl), 0.0),
        compared_vocab=v,
        reference_loss=ref.loss,
        max_flip_gap=gap,
    )
