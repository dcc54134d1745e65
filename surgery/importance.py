"""Importance: how much each MLP neuron, attention head and decoder layer does, measured to choose what a prune drops.

- activation (Minitron, Muralidharan et al. 2024): a unit's mean contribution to the residual stream on the
  calibration tokens. A neuron: mean |activation| (what down_proj reads) times its down_proj column norm, the
  mean norm of what it writes. A head: the mean norm of what it writes through its own o_proj columns. Where a
  norm sits between the block's output and the residual (OLMo 2's and Gemma's post-norms), what is written is
  the output over its RMS, times the norm's gain: each token's activation is divided by that RMS and each
  column weighted by the gain.
- block_influence (ShortGPT, Men et al. 2024): 1 - the mean cosine similarity, over tokens, of the hidden
  states entering a layer (or a block of layers) and leaving it.
- angular (Gromov et al. 2024): the mean angle between those states, over pi (their paper uses the last token;
  here every token counts).
- magnitude: weights only, no data. A neuron: |gate_i| |up_i| |down_:,i|; a head: |W_o^h|_F |W_v^g(h)|_F (its
  output-value circuit); a layer: sqrt(|W_o|_F^2 + |W_down|_F^2), what it can write.
- loss: layers and blocks only: the calibration loss of the model with the candidate removed (a layer, or a
  window of n consecutive layers), measured on the very model the prune leaves, one streamed forward pass per
  candidate (L of them, or L - n + 1 windows). The cheapest is dropped, so one layer or one block chosen this
  way never loses to any other choice of its shape on the calibration data, a random one included; n separate
  layers are the n whose removal alone costs least (their interaction is not searched).
- random: seeded uniform draws, the baseline every other importance is measured against.

Higher is more important everywhere. Scores come from the model *before* the prune (a lazy `ModelState`), run
by the streamed runner one decoder layer at a time, so a 70B model is scored in the memory of one layer (plus,
for a block of n layers, the n + 1 hidden states at its ends).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .arch import TensorRole as R
from .errors import SurgeryError

if TYPE_CHECKING:
    import torch


class Importance(str, enum.Enum):
    ACTIVATION = "activation"
    BLOCK_INFLUENCE = "block_influence"
    ANGULAR = "angular"
    MAGNITUDE = "magnitude"
    LOSS = "loss"
    RANDOM = "random"


@dataclass
class Measurement:
    """Scores of one prune, as the report shows them: `scores[l]` per layer (neurons, heads), or one row over
    layers (`layer`) or over block starts (`block`)."""

    unit: str  # "neuron" | "head" | "layer" | "block"
    importance: Importance
    scores: torch.Tensor  # float64: (layers, units) or (positions,)
    tokens: int = 0  # calibration tokens it was measured on (0: no data)


def measure(state, unit: str, importance: Importance, ctx, block: int = 1) -> Measurement:
    """Score every unit of `state` (the model before the prune)."""
    import torch

    spec = state.spec
    L = spec.num_layers
    sizes = {"neuron": spec.intermediate_size, "head": spec.num_heads}
    if importance == Importance.RANDOM:
        shape = (L, sizes[unit]) if unit in sizes else (L - block + 1,) if unit == "block" else (L,)
        from .lazy import generator

        g = generator(*ctx.seed_parts("prune", unit, "random"))
        return Measurement(unit, importance, torch.rand(shape, generator=g, dtype=torch.float64))
    calib = ctx.calibration
    if calib is None:
        raise AssertionError("measuring importance needs the calibration (reader, tokens)")
    if importance == Importance.MAGNITUDE:
        return Measurement(unit, importance, _magnitude(state, unit, calib, block))
    try:
        ids = calib.ids()
    except SurgeryError as e:
        raise SurgeryError(f"importance {importance.value} runs the model on calibration tokens, and {e.message.split(';')[0]}; "
                           "set verify.data (a text file, a dataset, or random), or use importance: magnitude or random",
                           loc=("importance",)) from None
    if importance == Importance.LOSS:
        assert unit in ("layer", "block"), unit
        return Measurement(unit, importance, _removal_losses(state, calib, ids, block), int(ids.shape[1]))
    return Measurement(unit, importance, _streamed(state, unit, importance, calib, ids, block), int(ids.shape[1]))


# weights only --------------------------------------------------------------------------------

def _norms(state, calib, role: R, layer: int, dim=None) -> torch.Tensor | None:
    """Euclidean norms of `role`'s weight in `layer` along `dim` (None: the whole tensor), accumulated in float64
    from the tensor evaluated in float32: one weight in memory at a time, never a float64 copy of it."""
    import torch

    from .lazy import evaluate

    node = state.tensors.get(state.spec.arch.parameter_name(role, "weight", layer))
    if node is None:
        return None
    w = evaluate(node, calib.reader, torch.device("cpu"), torch.float32)
    return torch.linalg.vector_norm(w, dim=dim, dtype=torch.float64)


def _writers_norm(state, calib, layer: int) -> torch.Tensor:
    """sqrt of the summed squares of every writer of a layer: o_proj and each expert's down_proj (and a shared one)."""
    import torch

    from .lazy import evaluate

    total = torch.zeros((), dtype=torch.float64)
    for name, info, node in state.items(R.ATTN_O, R.MLP_DOWN, R.SHARED_DOWN):
        if info.layer == layer and info.kind == "weight":
            w = evaluate(node, calib.reader, torch.device("cpu"), torch.float32)
            total += torch.linalg.vector_norm(w, dtype=torch.float64) ** 2
    return total.sqrt()


def _magnitude(state, unit: str, calib, block: int) -> torch.Tensor:
    import torch

    spec = state.spec
    rows = []
    for layer in range(spec.num_layers):
        if unit == "neuron":
            s = _norms(state, calib, R.MLP_DOWN, layer, dim=0)
            for role in (R.MLP_GATE, R.MLP_UP):
                n = _norms(state, calib, role, layer, dim=1)
                if n is not None:
                    s = s * n
        elif unit == "head":
            hd, h, k = spec.head_dim, spec.num_heads, spec.num_kv_heads
            o = _norms(state, calib, R.ATTN_O, layer, dim=0).reshape(h, hd).square().sum(dim=1).sqrt()
            v = _norms(state, calib, R.ATTN_V, layer, dim=1).reshape(k, hd).square().sum(dim=1).sqrt()
            s = o * v.repeat_interleave(h // k)
        else:
            s = _writers_norm(state, calib, layer)
        rows.append(s)
    out = torch.stack(rows)
    if unit == "block":  # what the block can write: its layers' together
        out = torch.stack([out[i:i + block].square().sum().sqrt() for i in range(len(rows) - block + 1)])
    return out


# measured on data ----------------------------------------------------------------------------

def _module(layer: torch.nn.Module, prefix: str, arch, role: R, index: int):
    name = arch.parameter_name(role, "weight", index)
    assert name.startswith(prefix) and name.endswith(".weight"), (name, prefix)
    return layer.get_submodule(name[len(prefix):-len(".weight")])


def _streamed(state, unit: str, importance: Importance, calib, ids: torch.Tensor, block: int) -> torch.Tensor:
    import torch

    from .execute import compute_dtype_for
    from .runtime.sources import StateSource
    from .runtime.streamed import StreamedModel

    spec = state.spec
    arch = spec.arch
    dtype = compute_dtype_for(state)
    sm = StreamedModel(StateSource(state, calib.reader, "the model before the prune"), calib.device, dtype)
    L = spec.num_layers
    if unit == "neuron":
        acc = torch.zeros(L, spec.intermediate_size, dtype=torch.float64)
    elif unit == "head":
        acc = torch.zeros(L, spec.num_heads, dtype=torch.float64)
    else:
        acc = torch.zeros(L - block + 1, dtype=torch.float64)
    bounds: dict[int, torch.Tensor] = {}  # hidden states at layer boundaries still needed by a block distance

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1).flatten()
        if importance == Importance.ANGULAR:
            return float(torch.arccos(cos).mean() / math.pi)
        return float(1 - cos.mean())

    def on_layer(i: int, layer: torch.nn.Module, prefix: str) -> list:
        if unit == "neuron":
            down = _module(layer, prefix, arch, R.MLP_DOWN, i)
            post = _post_norm(layer, prefix, arch, R.NORM_MLP_OUT, i)
            w = down.weight.double() * (1 if post is None else post[0][:, None])
            col = w.norm(dim=0).cpu()

            def neuron_hook(m, args, out):
                a = args[0].reshape(-1, args[0].shape[-1]).double()
                if post is not None:  # what reaches the residual is the output over its RMS: weigh each token so
                    a = a / _rms(out.reshape(a.shape[0], -1).double(), post[1])[:, None]
                acc[i] += a.abs().mean(dim=0).cpu() * col
            return [down.register_forward_hook(neuron_hook)]
        if unit == "head":
            o = _module(layer, prefix, arch, R.ATTN_O, i)
            post = _post_norm(layer, prefix, arch, R.NORM_ATTN_OUT, i)
            h, hd = spec.num_heads, spec.head_dim

            def head_hook(m, args, out):
                a = args[0].reshape(-1, h, hd).double()
                w = m.weight.double().reshape(m.weight.shape[0], h, hd)
                scale = 1.0
                if post is not None:  # as for neurons: the written output over its RMS, times the norm's gain
                    w = w * post[0][:, None, None]
                    scale = 1 / _rms(out.reshape(a.shape[0], -1).double(), post[1])
                for j in range(h):
                    acc[i, j] += float((torch.nn.functional.linear(a[:, j], w[:, j]).norm(dim=-1) * scale).mean())
            return [o.register_forward_hook(head_hook)]

        def layer_hook(m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            bounds.setdefault(i, x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32))
            bounds[i + 1] = y.detach().reshape(-1, y.shape[-1]).to("cpu", torch.float32)
            start = i + 1 - block
            if start >= 0:
                acc[start] = distance(bounds.pop(start), bounds[i + 1])
        return [layer.register_forward_hook(layer_hook, with_kwargs=True)]

    sm.on_layer = on_layer
    with calib.progress.phase(f"measuring {importance.value} importance ({unit}s)", total=L) as (bar, summary):
        sm.hidden(ids, bar)
        summary.append(f"{L} layers, {ids.shape[1]} tokens")
    bounds.clear()
    return acc


def _removal_losses(state, calib, ids: torch.Tensor, block: int) -> torch.Tensor:
    """The loss of the model without layers [s, s + block), for every start s: each candidate is the state the
    prune would leave (`state.keep_layers`), run by the streamed runner as verification runs the output."""
    import torch

    from .execute import compute_dtype_for
    from .runtime.evaluation import evaluate
    from .runtime.sources import StateSource
    from .state import keep_layers

    L = state.spec.num_layers
    dtype = compute_dtype_for(state)
    out = torch.zeros(L - block + 1, dtype=torch.float64)
    what = "layer" if block == 1 else f"block of {block} layers"
    with calib.progress.phase(f"measuring loss importance: the loss without each {what}", total=len(out)) as (bar, summary):
        for start in range(len(out)):
            gone = range(start, start + block)
            candidate = state.copy()
            keep_layers(candidate, [j for j in range(L) if j not in gone], "loss importance")
            source = StateSource(candidate, calib.reader, f"the model before the prune without layers {list(gone)}")
            out[start] = evaluate(source, ids, calib.device, dtype).loss
            bar.update(1)
        summary.append(f"{len(out)} candidates of {L - block} layers each, {ids.shape[1]} tokens")
    return out


def _post_norm(layer, prefix: str, arch, role: R, index: int) -> tuple[torch.Tensor, float] | None:
    """(gain, eps) of a norm over a block's output before the residual add (OLMo 2, Gemma), or None."""
    if role not in arch.names:
        return None
    norm = _module(layer, prefix, arch, role, index)
    eps = next(getattr(norm, a) for a in ("variance_epsilon", "eps", "epsilon") if hasattr(norm, a))
    return arch.gain(norm.weight.double()), float(eps)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.square().mean(dim=-1) + eps).sqrt()


# choosing ------------------------------------------------------------------------------------

def top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring positions, ascending (ties: the lower index wins, so choices are reproducible)."""
    import torch

    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(int(i) for i in order)


def choose_heads(scores: torch.Tensor, h: int, k: int, new_h: int, new_k: int) -> tuple[list[int], list[int]]:
    """(query heads kept, kv groups kept) in one layer: whole kv groups by the sum of their query heads'
    scores, then the best query heads within each kept group, the same number in every group (GQA kept)."""
    rep, new_rep = h // k, new_h // new_k
    groups = top(scores.reshape(k, rep).sum(dim=1), new_k)
    heads = [g * rep + j for g in groups for j in top(scores[g * rep:(g + 1) * rep], new_rep)]
    return heads, groups
