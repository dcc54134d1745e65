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

A mixture-of-experts layer routes each token to k of its experts, so an expert no token of the batch is
routed to gets no gradient on that batch: the data's doing, not a dead unit's, if other data can reach it.
Such an expert's units are judged as the data would judge them (`_judge_moe_layer`): once routed to (the
layer run again with every token sent to every expert, the same two passes), and by whether anything can
route to it: an input in the span of the router's inputs on this batch that the stock router puts the expert
in the top k of, by more than rounding (`reaching_inputs`), or, failing that, a router row that receives
gradient, so the routing moves after a step (`learning_rows`). A row receives gradient only if it is linear
in the cotangent: renormalised top-k weights do not depend on the logits of experts they did not pick, and
the softmax's cancellation leaves a rounding residue on those rows that is not. An expert whose units are
zero on both passes when routed to, or that nothing routes to and whose row never learns, is dead.

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

from .arch import TensorRole as R, architecture_for
from .lazy import generator
from .report import DeadSlice, ExpertSymmetry
from .runtime.build import disk_layout, streamable
from .runtime.progress import QUIET, Progress
from .runtime.sources import TensorSource, model_source
from .runtime.streamed import StreamedModel


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


# A witness input must put its expert ahead of every expert the router did not pick by more than this share of
# its largest |logit|: 2^-16 is 256 float32 unit roundoffs, so rounding alone never makes a witness.
WITNESS_MARGIN = 2.0 ** -16
# A router row's gradient for the cotangents g1 + g2 must equal the sum of those for g1 and g2 to within this
# share of its norm: float32 rounding of a gradient is ~1e-6 of it, a rounding residue misses by ~1x itself.
LINEARITY = 1 / 8


class RouterWatch:
    """What a mixture-of-experts router reads and picks while a layer runs (its first call), and, inside
    `everywhere()`, a router that sends every token to every expert with equal weights.

    transformers 5's routers (Mixtral, Qwen2-MoE, Qwen3-MoE) return (logits, top-k weights, top-k indices);
    a router that does not is not watched (`ok` is False) and its experts keep the plain verdict."""

    def __init__(self, router: nn.Module):
        self.router, self.inputs, self.picked, self.ok, self._all = router, None, None, True, False
        self._hooks = [router.register_forward_pre_hook(self._pre), router.register_forward_hook(self._post)]

    def _pre(self, mod, args):
        if self.inputs is None:
            x = args[0].detach()
            self.inputs = x.reshape(-1, x.shape[-1])

    def _post(self, mod, args, out):
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], torch.Tensor)
                and not out[2].is_floating_point() and out[2].dim() == 2):
            self.ok = False
            return None
        if self.picked is None:
            self.picked = out[2].detach()
        if not self._all:
            return None
        logits, scores, idx = out
        n, e = idx.shape[0], self.router.weight.shape[0]
        return (logits, scores.new_full((n, e), 1.0 / e),
                torch.arange(e, device=idx.device).expand(n, e).contiguous())

    @contextlib.contextmanager
    def everywhere(self):
        self._all = True
        try:
            yield
        finally:
            self._all = False

    def routed(self) -> set[int]:
        return set(self.picked.unique().tolist()) if self.picked is not None else set()

    def remove(self):
        for h in self._hooks:
            h.remove()


def _nearest_hull_point(d: torch.Tensor, iters: int = 500) -> torch.Tensor:
    """A point p of the convex hull of the rows of `d`, moved toward the one nearest the origin (Gilbert's
    algorithm) until every row has d_j . p > 0, i.e. p separates the hull from the origin, or no step helps."""
    p = d[int(d.norm(dim=1).argmin())].clone()
    for _ in range(iters):
        s = d @ p
        j = int(s.argmin())
        if s[j] > 0:
            break
        q = d[j] - p
        qq = float(q @ q)
        t = min(1.0, max(0.0, -float(p @ q) / qq)) if qq > 0 else 0.0
        if t == 0.0:
            break
        p = p + t * q
    return p


def _leads(logits: torch.Tensor, e: int, k: int) -> bool:
    """Whether fewer than k other `logits` come within WITNESS_MARGIN of the largest |logit| of expert e's, or above."""
    others = torch.cat([logits[:e], logits[e + 1:]])
    beaten_by = int((others >= logits[e] - WITNESS_MARGIN * float(logits.abs().max())).sum())
    return float(logits.abs().max()) > 0 and beaten_by < k


def reaching_inputs(router: nn.Module, inputs: torch.Tensor, experts: set[int], k: int) -> set[int]:
    """Of `experts`, those the stock router puts in its top k, ahead of every expert it does not pick by more
    than WITNESS_MARGIN of its largest |logit|, for some input in the span of `inputs` (the router's inputs on
    the batch). Candidates per expert e, from the router's rows projected on that span (float64): least squares
    toward logits that are the e-th unit vector (exact when the rows are independent), else the direction to the
    hull of {w_e - w_j} from the origin (exact for top-1), then for top-k the same with the k - 1 experts that
    beat e most there left out, one at a time (a witness found is one; none found for k > 1 is not a proof).
    Each candidate is judged by the router itself."""
    if not experts:
        return set()
    x = inputs.detach().to("cpu", torch.float64)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    basis = vh[sv > sv[0] * 1e-10] if len(sv) and sv[0] > 0 else vh[:0]
    if not len(basis):
        return set()
    v = router.weight.detach().to("cpu", torch.float64) @ basis.T
    pinv = torch.linalg.pinv(v)
    cands, owner = [], []
    for e in sorted(experts):
        zs = [pinv[:, e]]
        if not _leads(v @ zs[0], e, 1):
            active = [j for j in range(v.shape[0]) if j != e]
            for _ in range(k):
                d = v[e] - v[active]
                zs.append(_nearest_hull_point(d))
                if _leads(v @ zs[-1], e, 1) or len(active) == 1:
                    break
                active.pop(int((d @ zs[-1]).argmin()))
        for z in zs:
            u = basis.T @ z
            if float(u.norm()) > 0:
                cands.append(u / u.norm())
                owner.append(e)
    if not cands:
        return set()
    p = next(router.parameters())
    scale = float(x.norm(dim=1).mean())
    with torch.no_grad():
        logits, _, picked = router((torch.stack(cands) * scale).to(device=p.device, dtype=p.dtype))
    logits, picked = logits.to("cpu", torch.float64), picked.cpu()
    return {e for row, e in enumerate(owner) if e in picked[row].tolist() and _leads(logits[row], e, k)}


def learning_rows(module: nn.Module, run, weight: nn.Parameter, seed_name: str) -> torch.Tensor:
    """Which rows of a router weight receive gradient from a random cotangent at the module's output: non-zero,
    and linear in the cotangent (LINEARITY), which a rounding residue is not (module docstring)."""
    with torch.enable_grad():
        weight.requires_grad_(True)
        try:
            out = run()
            y = out[0] if isinstance(out, tuple) else out
            g1, g2 = (torch.randn(y.shape, generator=generator("router rows", seed_name, i), dtype=torch.float32)
                      .to(y.device, y.dtype) for i in (1, 2))
            a, b, c = (torch.autograd.grad(y, [weight], g, retain_graph=True)[0].double() for g in (g1, g2, g1 + g2))
        finally:
            weight.requires_grad_(False)
    size = c.norm(dim=1)
    return (size > 0) & ((a + b - c).norm(dim=1) <= LINEARITY * size)


def _judge_moe_layer(module: nn.Module, run, router: nn.Module, prefix: str, slices, indices: list[int],
                     expert_of: dict[int, int], lr: float, layout, notes: dict[str, int]) -> dict[int, int]:
    """`_judge_module` for a mixture-of-experts layer: a slice of an expert that no token of the batch was routed
    to is judged once routed to, and the expert by whether anything routes to it (module docstring); `notes`
    counts such experts by verdict."""
    watch = RouterWatch(router)
    try:
        dead = _judge_module(module, run, prefix, slices, indices, lr, layout)
        unreached = {i for i in dead if i in expert_of and expert_of[i] not in watch.routed()}
        if not unreached or not watch.ok or watch.inputs is None:
            return dead
        experts = {expert_of[i] for i in unreached}
        reached = reaching_inputs(router, watch.inputs, experts, watch.picked.shape[1])
        learning = set()
        if experts - reached:
            rows = learning_rows(module, run, router.weight, prefix)
            learning = {e for e in experts - reached if bool(rows[e])}
        reachable = reached | learning
        when_routed = {}
        if reachable:
            with watch.everywhere():
                when_routed = _judge_module(module, run, prefix, slices,
                                            sorted(i for i in unreached if expert_of[i] in reachable), lr, layout)
    finally:
        watch.remove()
    out = {i: n for i, n in dead.items() if i not in unreached}
    for i in unreached:
        if expert_of[i] not in reachable:
            out[i] = dead[i]
        elif i in when_routed:
            out[i] = when_routed[i]
    for what, es in (("reached by an input", reached), ("router row learns", learning),
                     ("nothing routes to", experts - reachable)):
        notes[what] = notes.get(what, 0) + len(es)
    return out


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
        raise ValueError("a model that does not stream (T5): use verify.whole_model_dead_slices")
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
                dead.update(_judge_moe_layer(mod, run, router, prefix, slices, mine, expert_of, lr, layout, notes))
            else:
                dead.update(_judge_module(mod, run, prefix, slices, mine, lr, layout))

        return [module.register_forward_pre_hook(once_per_forward(judge), with_kwargs=True)]

    sm.on_layer = lambda i, layer, prefix: check(layer, prefix, router_of(layer, i, prefix))
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
        line = f"{len(slices)} new slice(s), {len(dead)} with dead units"
        if notes:
            line += "; experts no token was routed to: " + ", ".join(f"{n} {what}" for what, n in notes.items() if n)
        summary.append(line)
    return [DeadSlice(slices[i].tensor, slices[i].op, n, len(slices[i].index)) for i, n in sorted(dead.items())]


def expert_symmetry(source: TensorSource, ids: torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    max_tokens: int = 128, lr: float = 1e-3, progress: Progress = QUIET) -> list[ExpertSymmetry]:
    """Per mixture-of-experts layer: how many experts differ, and the router's gradient, before and after one SGD
    step of that layer on a random cotangent (module docstring); one layer in memory at a time."""
    arch = architecture_for(source.config.get("model_type"))
    if arch is None or not arch.is_moe:
        return []
    sm = StreamedModel(source, torch.device(device), dtype or torch.float32)
    rows: list[ExpertSymmetry] = []

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
            rows.append(ExpertSymmetry(layer=i, experts=n_experts, distinct=before, distinct_after_step=after,
                                       router_grad=router_grad, router_grad_after_step=router_after))
        return [layer.register_forward_pre_hook(once_per_forward(measure), with_kwargs=True)]

    sm.on_layer = on_layer
    with progress.phase("expert symmetry", total=len(sm.layers)) as (bar, summary):
        sm.hidden(ids[:, :max_tokens], bar)
        summary.append(f"{len(rows)} layers")
    return rows
