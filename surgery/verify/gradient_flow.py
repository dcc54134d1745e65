"""The gradient-flow check: every new unit made trainable must receive gradient, checked layer by layer.

Why one layer at a time is enough. A parameter θ of module M (a decoder layer, the embedding, the
final norm, lm_head) gets the gradient ∂L/∂θ = J_θᵀ g, where J_θ is the Jacobian of M's output
with respect to θ at M's actual input, and g = ∂L/∂(M's output) is whatever the rest of the model
sends back. Deadness of a new slice is structural: a unit whose J_θ restricted to it is zero (its
input activations are zero, or every path from it to M's output passes through a zero weight)
gets zero gradient *whatever* g is, for every loss. So the check runs M alone on the input the
streamed forward gives it and back-propagates a random Gaussian cotangent g: J_θᵀ g is zero with
probability one only where J_θ is zero. The converse case, J_θ non-zero but the true g orthogonal
to it forever, needs residual directions that nothing downstream ever reads; growth ops record
slices only under `init: trainable`, which draws every reader of a new direction from the source
tensor's statistics, so the true g is generic there (with tied embeddings the last writers of new
residual dims see zero true g for one step, until the embedding's new columns move: a random g
judges them alive at once, which is the verdict two global steps reach).

The two-step judgement is kept where it adds something, inside a module: a unit with zero
gradient is judged again after one small SGD step of that module's parameters (some units are one
step from the signal, e.g. behind a norm weight that starts at zero). Zero on both passes means zero
on both sides of a product: a saddle it never leaves.

Cost: one streamed forward on `max_tokens` tokens, plus one backward of each module that holds a
new slice, one module in memory at a time; never a whole-model backward.

Mixture-of-experts layers hold their experts fused (transformers 5 converts the per-expert checkpoint
tensors while loading); a layer's gradients are put back into the checkpoint's layout by
transformers' own reverse conversion before new slices, named per stored expert tensor, are judged; an
expert no token of the batch is routed to is judged as other data would judge it (`experts.judge_moe_layer`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import TensorRole as R, architecture_for
from ..report import DeadSlice
from ..runtime.build import disk_layout, streamable
from ..runtime.progress import QUIET, Progress
from ..runtime.sources import TensorSource, model_source
from ..runtime.streamed import StreamedModel
from .experts import judge_moe_layer
from .local_gradients import dead_units, judge_module, once_per_forward, one_sgd_step


def dead_slices(source: TensorSource | nn.Module, ids: torch.Tensor, slices, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, max_tokens: int = 128, lr: float = 1e-3,
                progress: Progress = QUIET) -> list[DeadSlice]:
    """New slices (from `ModelState.new_slices`) with units that get no gradient, as report rows.

    `source` is a tensor source, or a transformers model in memory (run the same way, layer by layer).
    """
    if not slices:
        return []
    config = source.config.to_dict() if isinstance(source, nn.Module) else source.config
    if not streamable(config):
        raise ValueError("a model that does not stream (T5): use whole_model_dead_slices")
    attn = None
    if isinstance(source, nn.Module):
        p = next(source.parameters())
        device, dtype, attn = p.device, dtype or p.dtype, source.config._attn_implementation
        source = model_source(source)
    sm = StreamedModel(source, torch.device(device), dtype or torch.float32, attn)
    dead: dict[int, int] = {}
    placed: set[int] = set()
    notes: dict[str, int] = {}
    arch = architecture_for(config.get("model_type"))
    moe = arch is not None and arch.is_moe
    expert_of = {i: info.expert for i, s in enumerate(slices)
                 if moe and (info := arch.classify(s.tensor)) is not None and info.expert is not None}

    def router_of(layer: nn.Module, i: int, prefix: str) -> nn.Module | None:
        """The layer's router module, found from the family's table through transformers' load-time renaming."""
        if not moe or R.MOE_ROUTER not in arch.names:
            return None
        name = arch.parameter_name(R.MOE_ROUTER, "weight", i)
        name = sm.conversion.target(name)[0] if sm.conversion else name
        if not name.startswith(prefix):
            return None
        try:
            return layer.get_submodule(name[len(prefix):].rsplit(".", 1)[0])
        except AttributeError:
            return None

    def check(module: nn.Module, prefix: str, router: nn.Module | None = None) -> list:
        names = {n for n, _ in module.named_parameters()}
        converted = bool(sm.conversion) and module in sm.layers  # fused experts: judged per stored expert tensor
        if converted:
            names = names | {n[len(prefix):] for n in sm.stored_names(prefix)}

        def layout(grads):
            if not converted:
                return grads
            full = disk_layout(sm.model, {prefix + n: g for n, g in grads.items() if g is not None})
            return {n[len(prefix):]: g for n, g in full.items()}
        mine = [i for i, s in enumerate(slices) if s.tensor.startswith(prefix) and s.tensor[len(prefix):] in names]
        if not mine:
            return []
        placed.update(mine)

        def judge(mod, args, kwargs):
            run = lambda: mod(*args, **kwargs)  # noqa: E731
            if router is not None and any(i in expert_of for i in mine):
                dead.update(judge_moe_layer(mod, run, router, prefix, slices, mine, expert_of, lr, layout, notes))
            else:
                dead.update(judge_module(mod, run, prefix, slices, mine, lr, layout if converted else None))

        return [module.register_forward_pre_hook(once_per_forward(judge), with_kwargs=True)]

    sm.on_layer = lambda i, layer, prefix: check(layer, prefix, router_of(layer, i, prefix))
    sm.on_module = check
    with progress.phase("gradient-flow check", total=len(sm.layers)) as (bar, summary):
        h = sm.hidden(ids[:, :max_tokens], bar)
        head = [i for i, s in enumerate(slices) if s.tensor.startswith(sm.head_prefix) and i not in placed]
        if head:  # lm_head: its own module, the logits of these few tokens fit in memory
            sm.fill(sm.head, sm.head_prefix)
            try:
                dead.update(judge_module(sm.head, lambda: sm.head(h), sm.head_prefix, slices, head, lr))
            finally:
                sm.empty(sm.head)
            placed.update(head)
        for i in range(len(slices)):
            if i not in placed:  # a slice of no module the model has: nothing can reach it
                dead[i] = len(slices[i].index)
        line = f"{len(slices)} new slice(s), {len(dead)} with dead units"
        if notes:
            line += "; experts no token was routed to: " + ", ".join(f"{n} {what}" for what, n in notes.items() if n)
        summary.append(line)
    return [DeadSlice(slices[i].tensor, slices[i].op, n, len(slices[i].index)) for i, n in sorted(dead.items())]


def whole_model_dead_slices(model, ids: torch.Tensor, slices, max_tokens: int = 128, lr: float = 1e-3) -> list[DeadSlice]:
    """Every new unit made trainable must receive gradient: one it never gets is dead.

    A unit (one index of a new slice) is judged on the first backward pass, and, where it got
    exactly zero, again after one small SGD step: some units are only one step from the signal
    (with tied embeddings the last writer of the new residual dims waits for the embedding's new
    columns to move). Zero gradient on both passes means zero on both sides: a saddle it never leaves.
    """
    if not slices:
        return []
    params = dict(model.named_parameters())
    x = ids[:, :max_tokens].to(next(model.parameters()).device)

    def dead() -> dict[int, int]:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(input_ids=x, labels=x).loss.backward()
        grads = disk_layout(model, {n: p.grad for n, p in params.items() if p.grad is not None})
        return dead_units(grads, slices, range(len(slices)), "")

    found = dead()
    if found:
        with one_sgd_step(params, {n: p.grad for n, p in params.items()}, lr):
            found = {i: n for i, n in dead().items() if i in found}
    model.zero_grad(set_to_none=True)
    return [DeadSlice(slices[i].tensor, slices[i].op, n, len(slices[i].index)) for i, n in found.items()]
