"""Experts of a mixture-of-experts layer: reachable by routing, and separating after one step.

A mixture-of-experts layer routes each token to k of its experts, so an expert no token of the batch is
routed to gets no gradient on that batch: the data's doing, not a dead unit's, if other data can reach it.
Such an expert's units are judged as the data would judge them (`judge_moe_layer`): once routed to (the
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

from ..arch import TensorRole as R, architecture_for
from ..lazy import generator
from ..report import ExpertSymmetry
from ..runtime.build import disk_layout
from ..runtime.progress import QUIET, Progress
from ..runtime.sources import TensorSource
from ..runtime.streamed import StreamedModel
from .local_gradients import judge_module, local_gradients, once_per_forward, one_sgd_step

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


def judge_moe_layer(module: nn.Module, run, router: nn.Module, prefix: str, slices, indices: list[int],
                     expert_of: dict[int, int], lr: float, layout, notes: dict[str, int]) -> dict[int, int]:
    """`judge_module` for a mixture-of-experts layer: a slice of an expert that no token of the batch was routed
    to is judged once routed to, and the expert by whether anything routes to it (module docstring); `notes`
    counts such experts by verdict."""
    watch = RouterWatch(router)
    try:
        dead = judge_module(module, run, prefix, slices, indices, lr, layout)
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
                when_routed = judge_module(module, run, prefix, slices,
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
            grads = local_gradients(mod, run, f"{prefix}symmetry")
            router_grad = counted(grads)[2]
            step = one_sgd_step(params, grads, lr)
            del grads
            with step:
                after = counted({n: p.detach() for n, p in params.items()})[1]
                router_after = counted(local_gradients(mod, run, f"{prefix}symmetry"))[2]
            rows.append(ExpertSymmetry(layer=i, experts=n_experts, distinct=before, distinct_after_step=after,
                                       router_grad=router_grad, router_grad_after_step=router_after))
        return [layer.register_forward_pre_hook(once_per_forward(measure), with_kwargs=True)]

    sm.on_layer = on_layer
    with progress.phase("expert symmetry", total=len(sm.layers)) as (bar, summary):
        sm.hidden(ids[:, :max_tokens], bar)
        summary.append(f"{len(rows)} layers")
    return rows
