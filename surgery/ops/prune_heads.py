"""prune_heads: fewer attention heads in every layer, head_dim kept (Minitron's head pruning), GQA kept.

transformers maps query head j to kv head j // (num_heads / num_kv_heads). Fewer kv heads drop whole kv
groups (a group's importance is the sum of its query heads'); fewer query heads drop the least important
ones within every kept group, the same number per group, so each kept query head still reads its own kv
head. A head writes through its own o_proj columns: removing its q rows and o_proj columns (and, with its
group, the k/v rows) removes exactly its contribution.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from ..arch import Axis
from ..errors import SurgeryError
from ..importance import Importance, choose_heads
from ..state import ModelState
from .base import Exactness, OpContext, Promise, SizeValue, resolve_size
from .prune import PruneOp, Pruning, keep_axis, refuse_growth


def pruned_layout(h: int, k: int, num_heads, num_kv_heads) -> tuple[int, int]:
    """(new num_heads, new num_kv_heads), checked: a standard GQA layout with fewer heads."""
    new_k = resolve_size(num_kv_heads, k, "num_kv_heads") if num_kv_heads is not None else None
    if num_heads is not None:
        new_h = resolve_size(num_heads, h, "num_heads")
    else:
        new_h = new_k * (h // k)
    if new_k is None:
        new_k = new_h if k == h else k
    refuse_growth(new_h, h, "num_heads", "grow_heads", unchanged_too=False)
    refuse_growth(new_k, k, "num_kv_heads", "grow_heads", unchanged_too=False)
    if (new_h, new_k) == (h, k):
        raise SurgeryError(f"num_heads is already {h} ({k} kv): nothing to prune", loc=("num_heads",))
    if new_h % new_k:
        loc = "num_heads" if num_heads is not None else "num_kv_heads"
        raise SurgeryError(f"{new_k} kv heads do not divide {new_h} query heads: every kv group keeps the same number "
                           f"of query heads (use a multiple of {new_k})", loc=(loc,))
    rep, new_rep = h // k, new_h // new_k
    if new_rep > rep:
        raise SurgeryError(f"{new_h} query heads over {new_k} kv heads is {new_rep} per group, more than the source's {rep}: "
                           f"pruning cannot add query heads to a group (keep at most {new_k * rep} query heads, or more kv heads)",
                           loc=("num_heads" if num_heads is not None else "num_kv_heads",))
    return new_h, new_k


class PruneHeads(PruneOp):
    unit_noun: ClassVar[str] = "head"
    op: Literal["prune_heads"]
    num_heads: Optional[SizeValue] = None
    num_kv_heads: Optional[SizeValue] = None
    importance: Literal["activation", "magnitude", "random"] = "activation"

    reads = ("num_attention_heads", "num_key_value_heads", "head_dim", "attn", "mlp", "layers", "norms", "residual")
    writes = ("num_attention_heads", "num_key_value_heads", "attn")
    summary = "remove attention heads (whole kv groups, or query heads within every group), the least important first"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec, arch = state.spec, state.spec.arch
        if self.num_heads is None and self.num_kv_heads is None:
            raise SurgeryError("set num_heads, num_kv_heads or both", loc=("num_heads",))
        if arch.head_dim_field is None:
            raise SurgeryError(f"{arch.name} derives head_dim from hidden_size / num_heads: fewer heads would change every "
                               "head's width; prune_heads is refused for this family", loc=("op",))
        h, k, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        new_h, new_k = pruned_layout(h, k, self.num_heads, self.num_kv_heads)
        importance = Importance(self.importance)
        m = self.measured(state, "head", ctx, importance)
        chosen = None if m is None else [choose_heads(m.scores[layer], h, k, new_h, new_k) for layer in range(spec.num_layers)]
        label = f"prune_heads: {h}/{k} -> {new_h}/{new_k} heads"

        def elements(heads: list[int]) -> list[int]:
            return [x * hd + i for x in heads for i in range(hd)]

        spec.pin_head_dim()
        for name, info, node in list(state.items()):
            for axis, ax in enumerate(info.axes):
                if ax not in (Axis.Q, Axis.KV):
                    continue
                size = (new_h if ax == Axis.Q else new_k) * hd
                keep = None if chosen is None else elements(chosen[info.layer][0 if ax == Axis.Q else 1])
                keep_axis(state, name, axis, keep, size, label)
        spec.set_heads(new_h, new_k)
        dropped = None if chosen is None else [sorted(set(range(h)) - set(q)) for q, _ in chosen]
        pruning = Pruning("head", importance, dropped, new_h, h, m, self.random_baseline())
        what = f"{h - new_h} of {h} query heads" + (f" ({k - new_k} of {k} kv groups)" if new_k < k else "")
        return Promise(Exactness.PRUNED, f"{what} per layer removed (by {importance.value}); head_dim {hd} kept",
                       pruning.describe(), pruning)
