"""Gradients of one module for a random cotangent at its output, one SGD step of it, and which units of a new
slice get none: the primitives the gradient-flow check (`gradient_flow`) and the expert checks (`experts`) share."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..lazy import generator


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


def local_gradients(module: nn.Module, run, seed_name: str, only: set[str] | None = None) -> dict[str, torch.Tensor | None]:
    """Gradients of every parameter of `module` (or of those named in `only`: no other weight's gradient is
    computed) for a random cotangent at its output."""
    params = {n: p for n, p in module.named_parameters() if only is None or n in only}
    with torch.enable_grad():
        for p in params.values():
            p.requires_grad_(True)
        try:
            out = run()
            y = out[0] if isinstance(out, tuple) else out
            g = torch.randn(y.shape, generator=generator("gradient_flow", seed_name), dtype=torch.float32).to(y.device, y.dtype)
            if not y.requires_grad:  # none of them reaches the output
                return dict.fromkeys(params)
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


def judge_module(module: nn.Module, run, prefix: str, slices, indices: list[int], lr: float, layout=None) -> dict[int, int]:
    """`layout` puts the module's gradients (named relative to it) under the checkpoint's names (fused experts).
    Without one, the first backward computes only the new slices' tensors' gradients; the step, on a miss, all."""
    only = None if layout is not None else {slices[i].tensor[len(prefix):] for i in indices}
    layout = layout or (lambda grads: grads)
    grads = local_gradients(module, run, prefix, only)
    dead = dead_units(layout(grads), slices, indices, prefix)
    if not dead:
        return {}
    if only is not None:
        grads = local_gradients(module, run, prefix)
    step = one_sgd_step(dict(module.named_parameters()), grads, lr)
    del grads
    with step:
        again = dead_units(layout(local_gradients(module, run, prefix)), slices, list(dead), prefix)
    return {i: n for i, n in again.items() if i in dead}
