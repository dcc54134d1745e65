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
transformers' own reverse conversion before new slices, named per stored expert tensor, are judged.

`expert_symmetry` asks the same kind of question of upcycled experts, per layer: are they distinct,
does the router get gradient, and do they separate after one step? Identical experts under a
renormalised router make the layer's output independent of the router, so its Jacobian there is
zero and every cotangent gives it zero gradient; they separate only if routing weighs them
differently per token, which a step on a random cotangent shows as a step on the true one does.
The gradient norms reported are a random cotangent's (their scale is not the loss's; zero is zero).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .lazy import generator
from .runner import QUIET, Progress, StreamedModel, TensorSource, disk_layout, model_source, streamable


def dead_units(grads: dict[str, torch.Tensor | None], slices, indices, prefix: str) -> dict[int, int]:
    """Per slice index, how many of its units got exactly zero gradient (a missing gradient: all)."""
    out = {}
    for i in indices:
        s = slices[i]
        g = grads.get(s.tensor[len(prefix):])
        if g is None:
            out[i] = len(s.index)
            continue
        g = g.index_select(s.axis, torch.tensor(s.index, device=g.device)).abs()
        other = [d for d in range(g.dim()) if d != s.axis]
        n = int(((g.amax(dim=other) if other else g) == 0).sum())
        if n:
            out[i] = n
    return out


def _local_gradients(module: nn.Module, run, seed_name: str) -> dict[str, torch.Tensor | None]:
    """Gradients of every parameter of `module` for a random cotangent at its output."""
    params = dict(module.named_parameters())
    with torch.enable_grad():
        for p in params.values():
            p.requires_grad_(True)
        try:
            out = run()
            y = out[0] if isinstance(out, tuple) else out
            g = torch.randn(y.shape, generator=generator("gradient_flow", seed_name), dtype=torch.float32).to(y.device, y.dtype)
            grads = torch.autograd.grad(y, list(params.values()), g, allow_unused=True)
        finally:
            for p in params.values():
                p.requires_grad_(False)
    return dict(zip(params, grads))


@contextlib.contextmanager
def one_sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None], lr: float):
    """`params` moved by one SGD step on `grads` for the duration of the block, restored bit for bit after. No
    reference to `grads` is kept once the step is taken: a caller that drops its own frees them before the
    next backward (a mixture-of-experts layer's gradient is as large as its experts)."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                if grads.get(n) is not None:
                    p -= lr * grads[n]
        del grads
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def once_per_forward(fn):
    """A forward pre-hook (with kwargs) that calls `fn(module, args, kwargs)`; `fn` may run the module itself,
    and that inner run does not call it again."""
    busy = False

    def pre(mod, args, kwargs):
        nonlocal busy
        if busy:
            return
        busy = True
        try:
            fn(mod, args, kwargs)
        finally:
            busy = False

    return pre


def _judge_module(module: nn.Module, run, prefix: str, slices, indices: list[int], lr: float, layout=None) -> dict[int, int]:
    """`layout` puts the module's gradients (named relative to it) under the checkpoint's names (fused experts)."""
    layout = layout or (lambda grads: grads)
    grads = _local_gradients(module, run, prefix)
    dead = dead_units(layout(grads), slices, indices, prefix)
    if not dead:
        return {}
    step = one_sgd_step(dict(module.named_parameters()), grads, lr)
    del grads
    with step:
        again = dead_units(layout(_local_gradients(module, run, prefix)), slices, list(dead), prefix)
    return {i: n for i, n in again.items() if i in dead}


def dead_slices(source: TensorSource | nn.Module, ids: torch.Tensor, slices, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, max_tokens: int = 128, lr: float = 1e-3,
                progress: Progress = QUIET) -> list[dict]:
    """New slices (from `ModelState.new_slices`) with units that get no gradient, as report rows.

    `source` is a tensor source, or a transformers model in memory (run the same way, layer by layer).
    """
    if not slices:
        return []
    config = source.config.to_dict() if isinstance(source, nn.Module) else source.config
    if not streamable(config):
        raise ValueError("a model that does not stream (T5): use verify.whole_model_dead_slices")
    attn = None
    if isinstance(source, nn.Module):
        p = next(source.parameters())
        device, dtype, attn = p.device, dtype or p.dtype, source.config._attn_implementation
        source = model_source(source)
    sm = StreamedModel(source, torch.device(device), dtype or torch.float32, attn)
    dead: dict[int, int] = {}
    placed: set[int] = set()

    def check(module: nn.Module, prefix: str) -> list:
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
            dead.update(_judge_module(mod, lambda: mod(*args, **kwargs), prefix, slices, mine, lr, layout))

        return [module.register_forward_pre_hook(once_per_forward(judge), with_kwargs=True)]

    sm.on_layer = lambda i, layer, prefix: check(layer, prefix)
    sm.on_module = check
    with progress.phase("gradient-flow check", total=len(sm.layers)) as (bar, summary):
        h = sm.hidden(ids[:, :max_tokens], bar)
        head = [i for i, s in enumerate(slices) if s.tensor.startswith(sm.head_prefix) and i not in placed]
        if head:  # lm_head: its own module, the logits of these few tokens fit in memory
            sm.fill(sm.head, sm.head_prefix)
            try:
                dead.update(_judge_module(sm.head, lambda: sm.head(h), sm.head_prefix, slices, head, lr))
            finally:
                sm.empty(sm.head)
            placed.update(head)
        for i in range(len(slices)):
            if i not in placed:  # a slice of no module the model has: nothing can reach it
                dead[i] = len(slices[i].index)
        summary.append(f"{len(slices)} new slice(s), {len(dead)} with dead units")
    return [{"tensor": slices[i].tensor, "op": slices[i].op, "dead": n, "of": len(slices[i].index)}
            for i, n in sorted(dead.items())]


def expert_symmetry(source: TensorSource, ids: torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    max_tokens: int = 128, lr: float = 1e-3, progress: Progress = QUIET) -> list[dict]:
    """Per mixture-of-experts layer: how many experts differ, and the router's gradient, before and after one SGD
    step of that layer on a random cotangent (module docstring); one layer in memory at a time."""
    from .arch import TensorRole as R, architecture_for

    arch = architecture_for(source.config.get("model_type"))
    if arch is None or not arch.is_moe:
        return []
    sm = StreamedModel(source, torch.device(device), dtype or torch.float32)
    rows: list[dict] = []

    def by_expert(tensors: dict[str, torch.Tensor]) -> tuple[dict[int, list], torch.Tensor | None]:
        experts, router = {}, None
        for name, t in sorted(tensors.items()):
            info = arch.classify(name)
            if info is None:
                continue
            if info.expert is not None:
                experts.setdefault(info.expert, []).append(t)
            elif info.role == R.MOE_ROUTER and info.kind == "weight":
                router = t
        return experts, router

    def distinct(experts: dict[int, list]) -> int:
        groups: list[list[torch.Tensor]] = []
        for e in sorted(experts):
            if not any(all(torch.equal(a, b) for a, b in zip(experts[e], g)) for g in groups):
                groups.append(experts[e])
        return len(groups)

    def on_layer(i: int, layer: nn.Module, prefix: str) -> list:
        def measure(mod, args, kwargs):
            """Counts and norms are taken at once (plain numbers), and each gradient is dropped before the next:
            at most the layer's parameters, one saved copy and one gradient are held."""
            params = dict(mod.named_parameters())
            run = lambda: mod(*args, **kwargs)  # noqa: E731

            def counted(tensors) -> tuple[int, int, float]:
                experts, router = by_expert(disk_layout(sm.model, {prefix + n: t for n, t in tensors.items() if t is not None}))
                return len(experts), distinct(experts), 0.0 if router is None else float(router.norm())

            n_experts, before, _ = counted({n: p.detach() for n, p in params.items()})
            grads = _local_gradients(mod, run, f"{prefix}symmetry")
            router_grad = counted(grads)[2]
            step = one_sgd_step(params, grads, lr)
            del grads
            with step:
                after = counted({n: p.detach() for n, p in params.items()})[1]
                router_after = counted(_local_gradients(mod, run, f"{prefix}symmetry"))[2]
            rows.append({"layer": i, "experts": n_experts, "distinct": before, "distinct_after_step": after,
                         "router_grad": router_grad, "router_grad_after_step": router_after})
        return [layer.register_forward_pre_hook(once_per_forward(measure), with_kwargs=True)]

    sm.on_layer = on_layer
    with progress.phase("expert symmetry", total=len(sm.layers)) as (bar, summary):
        sm.hidden(ids[:, :max_tokens], bar)
        summary.append(f"{len(rows)} layers")
    return rows
