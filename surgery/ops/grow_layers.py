"""grow_layers: more decoder blocks, each new one the identity (LLaMA Pro), or a plain copy (SOLAR).

A pre-norm block adds `o_proj(attn(...))` and `down_proj(mlp(...))` to the residual; with both
writers (and their biases) zero it adds nothing, whatever its readers hold, so the function is kept
in stock code for every family. `from: copy` takes the readers and norms of the old layer the new
block follows (LLaMA Pro, Wu et al. 2024); `from: fresh` draws the readers from the statistics of
that layer's tensors and copies its norms. Under `init: trainable` the zero writers are recorded
as new slices: the readers are non-zero, so they get gradient from the first step.

`identity: false` keeps the copied writers: the copies then change the function (SOLAR's depth
up-scaling, Kim et al. 2023, duplicates the stack with an overlap and recovers by pre-training).

Existing layers are renumbered by name from the architecture table, per-head q/k norms included,
and per-layer config lists (Qwen2 `layer_types`) follow their layers; a new block takes the entry
of the layer it was made from.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field

from ..arch import WRITERS
from ..arch import TensorRole as R
from ..errors import SurgeryError
from ..lazy import full
from ..state import ModelState, NewSlice
from .base import Exactness, Init, Op, OpContext, Promise, SizeValue, checked_indices, resolve_size
from .slices import Fill

_HEAD_NORMS = (R.ATTN_Q_NORM, R.ATTN_K_NORM)
SOURCE_LAYER = "layer {value} is not a layer of the source (0..{last})"


def spread_positions(old: int, count: int) -> list[int]:
    """LLaMA Pro's layout: `count` groups of old layers, each followed by one new block.

    Group g ends after old layer ceil((g+1) * old / count) - 1 (equal groups when count divides
    old); the i-th new block then sits at output index (that layer + 1 + i).
    """
    after = [-(-(g + 1) * old // count) - 1 for g in range(count)]
    return [a + 1 + i for i, a in enumerate(after)]


def layout(old: int, new: int, positions: list[int], from_layers: list[int] | None) -> list[tuple[bool, int]]:
    """For each output layer: (is_new, old layer it is or is made from)."""
    # from_layers pairs with positions in the order listed
    made_from = dict(zip(positions, from_layers)) if from_layers is not None else {}
    out: list[tuple[bool, int]] = []
    nxt = 0
    taken = set(positions)
    for p in range(new):
        if p in taken:
            # the old layer just before the new block; before layer 0, layer 0 itself
            out.append((True, made_from.get(p, max(nxt - 1, 0))))
        else:
            out.append((False, nxt))
            nxt += 1
    assert nxt == old, (old, new, positions)
    return out


class GrowLayers(Op):
    model_config = ConfigDict(serialize_by_alias=True)

    op: Literal["grow_layers"]
    num_layers: SizeValue
    positions: Optional[list[int]] = None
    from_: Literal["copy", "fresh"] = Field("copy", alias="from")
    from_layers: Optional[list[int]] = None
    init: Init = Init.TRAINABLE
    identity: bool = True

    reads = ("num_hidden_layers", "layer_types", "attn", "mlp", "norms")
    writes = ("num_hidden_layers", "layer_types", "layers")
    summary = "add decoder blocks (LLaMA Pro): zero o_proj/down_proj make each new block the identity"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec, arch = state.spec, state.spec.arch
        old = spec.num_layers
        new = resolve_size(self.num_layers, old, "num_layers")
        if new <= old:
            what = "is already" if new == old else f"would shrink from {old} to"
            raise SurgeryError(f"num_layers {what} {new}; only growth is supported", loc=("num_layers",))
        count = new - old
        positions = self._positions(old, new, count)
        from_layers = self._from_layers(old, count)
        if not self.identity and self.from_ != "copy":
            raise SurgeryError("identity: false keeps the writers of copied blocks; it needs from: copy", loc=("identity",))
        plan = layout(old, new, positions, from_layers)
        trainable = self.init == Init.TRAINABLE
        label = f"grow_layers: {old} -> {new} layers"

        by_layer: dict[int, list[tuple[str, object, object]]] = {}
        for name, info, node in state.items():
            if info.layer is not None:
                by_layer.setdefault(info.layer, []).append((name, info, node))
        old_to_new = {j: p for p, (is_new, j) in enumerate(plan) if not is_new}
        rename = {
            name: arch.parameter_name(info.role, info.kind, old_to_new[info.layer], info.head, info.expert)
            for items in by_layer.values()
            for name, info, _ in items
        }
        slices_of: dict[str, list[NewSlice]] = {}
        for s in state.new_slices:
            slices_of.setdefault(s.tensor, []).append(s)
        state.rename(rename)

        for p, (is_new, j) in enumerate(plan):
            if not is_new:
                continue
            for name, info, node in by_layer.get(j, []):
                target = arch.parameter_name(info.role, info.kind, p, info.head, info.expert)
                writer = info.role in WRITERS
                if writer and self.identity:
                    state.tensors[target] = full(node.shape, node.dtype, 0.0, f"{label}: zero writer")
                    if trainable:
                        state.new_slices.append(NewSlice(target, 0, list(range(node.shape[0])), "grow_layers"))
                elif self.from_ == "copy" or writer or info.role.is_norm or info.role in _HEAD_NORMS:
                    state.tensors[target] = node.map(lambda t: t.clone(), label=f"{label}: copy of layer {j}", kind="move")
                    for s in slices_of.get(name, []):  # zero slices an earlier op left in what we copy
                        state.new_slices.append(NewSlice(target, s.axis, list(s.index), s.op))
                elif trainable:
                    fill = Fill("random", ctx.seed_parts(target, "layer"))
                    state.tensors[target] = node.map(lambda t, f=fill: f.values(t, 0, t.shape[0]),
                                                     label=f"{label}: drawn like layer {j}", kind=fill.lazy_kind)
                else:
                    state.tensors[target] = full(node.shape, node.dtype, 0.0, f"{label}: zeros")
        spec.set_num_layers(new, origin=[j for _, j in plan])

        where = ", ".join(f"{p} ({'copy' if self.from_ == 'copy' else 'drawn like'} {j})" for p, (n, j) in enumerate(plan) if n)
        notes = [f"new blocks at output layers {where}"]
        if not self.identity:
            return Promise(
                Exactness.APPROXIMATE,
                "identity: false: copied blocks keep their o_proj/down_proj and add to the residual, so the function "
                "changes (SOLAR-style depth up-scaling; continued pre-training recovers it)",
                notes,
            )
        if self.from_ == "fresh" and not trainable:
            notes.append("from: fresh with init: zeros leaves the new blocks dead (readers and writers zero)")
        return Promise(Exactness.EXACT, "each new block writes through zero o_proj and down_proj: it is the identity", notes)

    def _positions(self, old: int, new: int, count: int) -> list[int]:
        if self.positions is None:
            return spread_positions(old, count)
        if len(self.positions) != count:
            raise SurgeryError(
                f"{len(self.positions)} position(s) for {count} new layer(s) ({old} -> {new}); list one output index per new layer",
                loc=("positions",),
            )
        return checked_indices(self.positions, new, "positions", "position {value} is outside the output model's layers 0..{last}",
                               noun="position")

    def _from_layers(self, old: int, count: int) -> list[int] | None:
        if self.from_layers is None:
            return None
        if len(self.from_layers) != count:
            raise SurgeryError(f"{len(self.from_layers)} layer(s) for {count} new layer(s); list one source layer per new layer",
                               loc=("from_layers",))
        return checked_indices(self.from_layers, old, "from_layers", SOURCE_LAYER)
