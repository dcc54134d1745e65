"""clone_width: every width replicated k times (HyperCloning, Apple 2024; Net2Net's wider net).

The residual becomes [x, x, ..., x]. Writers repeat their output rows (the embedding its columns),
readers take [W/k, ..., W/k] on their input side, so every copy computes what the source computed.
Attention heads are replicated as whole blocks: query head c*h + j is a copy of head j and, with
the same n_rep, falls in kv group c*g + j // n_rep, the copy of its old group, so GQA stays right.
The MLP's neurons are replicated the same way. [x, x] has the mean and the variance of x, so stock
LayerNorm and RMSNorm stay exact with their weights (and biases) repeated and eps unchanged; head_dim
and rotary are untouched, and per-head q/k norms are copied with their heads (a norm shared by all
heads is kept, one over the whole projection, OLMo 2's, is repeated like the projection). Where the
embedding is multiplied by sqrt(hidden_size) (Gemma) it is divided by sqrt(k).

lm_head divides its input by k. With tied embeddings lm_head is the (repeated) embedding, so the
final norm's weight and bias are divided by k instead.

`noise` breaks the symmetry between copies without changing the function: each reader's input
blocks get perturbations that sum to zero over the k blocks (+n and -n for k = 2), drawn with std
`noise` times the tensor's own std (times sqrt(1 - 1/k), as z - mean(z) over k normals: `_noisy_copies`). Writers stay noise-free, so the copies of the residual stay equal.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..arch import Axis, TensorRole as R
from ..errors import SurgeryError
from ..rowwise import ROW_LOCAL, RowRule, draw_rows, randn_rows
from ..state import ModelState, NewSlice
from . import moments
from .base import Exactness, Op, OpContext, Promise
from .residual import rescale_embedding
from .slices import scale_gain

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch

TILED = (Axis.RESID, Axis.Q, Axis.KV, Axis.INTER, Axis.SHARED_INTER)


def _clone_rows(t: torch.Tensor, start: int, out_shape: tuple[int, ...], tiled: list[int], input_axis: int | None, k: int,
                noise: float, seed: tuple, extra_scale: float, std: float) -> torch.Tensor:
    """Output rows from `start` of the clone, given the input rows they copy (`t`: along a tiled axis 0, output
    row i copies input row i mod the input's rows); `std`: the whole input's, for the noise."""
    if input_axis is not None:
        t = t / k  # before tiling: k times fewer divisions, the same values
    if input_axis is not None and noise and std > 0:
        t = _noisy_copies(t, start, out_shape, k, noise * std, seed)
    else:
        t = t.repeat([k if i in tiled and i > 0 else 1 for i in range(t.dim())])  # made here: the arithmetic below touches no input
    if extra_scale != 1.0:
        t.mul_(extra_scale)
    return t


def helmert(k: int) -> list[list[float]]:
    """An orthonormal basis of the vectors of k entries that sum to zero, as k rows of k - 1 coefficients."""
    rows = [[0.0] * (k - 1) for _ in range(k)]
    for i in range(1, k):
        c = 1.0 / math.sqrt(i * (i + 1))
        for j in range(i):
            rows[j][i - 1] = c
        rows[i][i - 1] = -i * c
    return rows


def _noisy_copies(t: torch.Tensor, start: int, out_shape: tuple[int, ...], k: int, scale: float, seed: tuple) -> torch.Tensor:
    """k copies side by side of a reader's rows `t` (already divided by k) along axis 1, plus noise of std `scale`
    that sums to zero over the copies: k - 1 standard normals per entry on the Helmert basis (`helmert`), an
    isotropic normal in the zero-sum subspace, the distribution of z - mean(z) over k normals from k - 1 draws.
    For k = 2 the copies get +w and -w exactly."""
    import torch

    rows, n = t.shape
    out = t.new_empty((rows, k, n))
    w = randn_rows((out_shape[0], k - 1, n), seed, start, start + rows).to(device=t.device, dtype=t.dtype)
    if k == 2:
        w = w[:, 0].mul_(scale / math.sqrt(2))
        torch.add(t, w, out=out[:, 0])
        torch.sub(t, w, out=out[:, 1])
    else:
        w.mul_(scale)
        basis = helmert(k)
        for j in range(k):
            z = None
            for i, c in enumerate(basis[j]):
                if c:
                    z = w[:, i] * c if z is None else z.add_(w[:, i] * c)
            torch.add(t, z, out=out[:, j])
    return out.view(rows, k * n)


def _noise_std(noise: float, input_axis: int | None, n: int, blocks) -> float:
    return moments.std_mean_of(blocks, n)[0] if noise and input_axis is not None and n > 1 else 0.0


def _clone_tensor(t: torch.Tensor, tiled: list[int], input_axis: int | None, k: int, noise: float, seed: tuple,
                  extra_scale: float) -> torch.Tensor:
    out_shape = tuple(s * k if i in tiled else s for i, s in enumerate(t.shape))
    std = _noise_std(noise, input_axis, t.numel(), lambda: (t,))
    rows = t.repeat([k] + [1] * (t.dim() - 1)) if 0 in tiled else t
    return _clone_rows(rows, 0, out_shape, tiled, input_axis, k, noise, seed, extra_scale, std)


class CloneRows(RowRule):
    """Output rows of a clone from the input rows they copy (`_clone_rows`), the input's std computed first."""

    def __init__(self, tiled: list[int], input_axis: int | None, k: int, noise: float, seed: tuple, extra_scale: float):
        self.args = (tiled, input_axis, k, noise, seed, extra_scale)

    def align(self, node):
        tiled, input_axis, k, noise, *_ = self.args
        if input_axis is None or not noise:
            return 1
        shape = node.shape
        return draw_rows((shape[0], k - 1, shape[1] // k))  # a block of the noise's rows

    def statistics(self, node, blocks):
        _, input_axis, _, noise, *_ = self.args
        return _noise_std(noise, input_axis, node.inputs[0].numel, lambda: blocks(0))

    def stored_statistics(self, node):
        return True

    def rows(self, node, start, stop, fetch, std):
        import torch
        tiled = self.args[0]
        size = node.inputs[0].shape[0]
        if 0 in tiled:  # output row i copies input row i mod size
            parts = [fetch(0, max(start, c * size) - c * size, min(stop, (c + 1) * size) - c * size)
                     for c in range(start // size, -(-stop // size))]
            t = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            t = fetch(0, start, stop)
        return _clone_rows(t, start, node.shape, *self.args, std)


class CloneWidth(Op):
    op: Literal["clone_width"]
    factor: int = Field(ge=2, le=64, description="how many copies of every width (hidden, heads, kv heads, MLP)")
    noise: float = Field(0.0, ge=0, allow_inf_nan=False,
                         description="symmetry-breaking noise on readers' input blocks, relative to each tensor's std")

    reads = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "tie_word_embeddings",
             "residual", "model_code")
    writes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "embed", "lm_head", "attn",
              "mlp", "norms", "residual")
    summary = "replicate hidden size, heads and MLP k times (HyperCloning); exact in stock code, noise optional"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        import torch
        spec = state.spec
        k = self.factor
        if spec.live_width:
            raise SurgeryError(
                "clone_width cannot follow patch_layernorm: the patched LayerNorm centres over the first "
                f"{spec.live_width} dims, and cloning scatters the original dims over {k} blocks; clone first, then grow and patch",
                loc=("op",),
            )
        if spec.meta.layernorm_zero_padded:
            raise SurgeryError(
                "the LayerNorm residual has zero-padded dims waiting for patch_layernorm, which centres over a prefix of "
                "dims that cloning would scatter; clone first, or grow with residual_fill: mean",
                loc=("op",),
            )
        h, g, d, m = spec.num_heads, spec.num_kv_heads, spec.hidden_size, spec.intermediate_size
        label = f"clone_width: x{k}"
        final_scale = 1.0 / k if spec.tied else 1.0
        copies: dict[str, str] = {}
        for name, info, node in list(state.items()):
            if info.role in (R.ATTN_Q_NORM, R.ATTN_K_NORM) and info.head is not None:  # one tensor per head
                count = h if info.role == R.ATTN_Q_NORM else g
                for c in range(1, k):
                    new_name = spec.arch.parameter_name(info.role, info.kind, info.layer, info.head + c * count)
                    state.tensors[new_name] = node.map(lambda t: t.clone(), label=f"{label}: copy of head {info.head}", kind="move",
                                                       rows=ROW_LOCAL)
                    copies[new_name] = name
                continue
            axes = info.axes
            tiled = [i for i, ax in enumerate(axes) if ax in TILED]
            if not tiled:
                continue
            input_axis = 1 if len(axes) == 2 and info.role != R.EMBED and axes[1] in TILED else None
            gain_scale = final_scale if info.role == R.NORM_FINAL and info.kind == "weight" else 1.0
            extra = final_scale if info.role == R.NORM_FINAL and info.kind == "bias" else 1.0
            shape = tuple(s * k if i in tiled else s for i, s in enumerate(node.shape))
            seed = ctx.seed_parts(name, "clone")
            state.tensors[name] = node.map(
                lambda t, tiled=tiled, ia=input_axis, seed=seed, extra=extra: _clone_tensor(t, tiled, ia, k, self.noise, seed, extra),
                shape, label, kind="move" if input_axis is None and extra == 1.0 else None,  # a tiling only: any dtype
                rows=CloneRows(tiled, input_axis, k, self.noise, seed, extra),
            )
            if gain_scale != 1.0:
                state.tensors[name] = scale_gain(state.tensors[name], gain_scale, spec.arch, label)
            for s in state.new_slices:
                if s.tensor == name and s.axis in tiled:
                    size = node.shape[s.axis]
                    s.index = [c * size + i for c in range(k) for i in s.index]
        for new_name, old in copies.items():
            for s in list(state.new_slices):
                if s.tensor == old:
                    state.new_slices.append(NewSlice(new_name, s.axis, list(s.index), s.op))

        pending = spec.norm_width != d
        spec.set_hidden_size(k * d)
        rescale_embedding(state, d, k * d, "clone_width")
        spec.set_heads(k * h, k * g)
        spec.set_intermediate_size(k * m)
        if Axis.SHARED_INTER in spec.arch.axis_fields:  # the shared expert's neurons are replicated like the experts'
            spec.config[spec.key(spec.arch.axis_fields[Axis.SHARED_INTER])] *= k
        spec.norm_width *= k  # [x, x] keeps each norm's statistics: no rescale needed, or the same one as before
        if "surgery_norm_width" in spec.config:
            spec.config["surgery_norm_width"] *= k
        spec.meta.signal_width = None  # the live dims are no longer a prefix (and all of them are live)
        if not pending:
            spec.residual_fill = "clone"
        notes = []
        if spec.tied:
            notes.append(f"tied embeddings: the final norm's weight and bias are divided by {k} instead of lm_head")
        if self.noise:
            notes.append(f"noise {self.noise:g} on readers' input blocks sums to zero over the copies: exact up to rounding")
        if self.noise or k & (k - 1):
            half = sorted({str(n.dtype)[6:] for n in state.tensors.values() if n.dtype in (torch.bfloat16, torch.float16)})
            if half:
                notes.append(f"readers' W/{k}{' +- noise' if self.noise else ''} is rounded when stored in {', '.join(half)}: "
                             "the copies then sum to W only up to that rounding (exact in float32 storage)")
        return Promise(
            Exactness.EXACT,
            f"every width replicated x{k}: [x]*{k} keeps each norm's mean and variance; readers divide their input by {k}",
            notes,
        )
