"""Why a re-initialised model starts far above ln(vocab): the linear layer that amplifies its input most."""
from __future__ import annotations

import math

import torch

from ..runtime.build import streamable
from ..runtime.sources import TensorSource
from ..runtime.streamed import StreamedModel, WholeModel


def variance_culprit(source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
                     max_tokens: int = 256) -> tuple[str, float]:
    """The linear layer whose output std is largest relative to its input's: the usual reason a
    re-initialised model starts far above ln(vocab) (an lm_head drawn with std 1, seed 004).
    Streamed: each layer's linears are watched while that layer is in memory; lm_head's output is
    the logits, whose std is accumulated block by block."""
    gains: dict[str, float] = {}

    def watch(module: torch.nn.Module, prefix: str):
        hooks = []
        for name, mod in module.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(m, inp, out, name=prefix + name):
                    i = float(inp[0].float().std())
                    gains[name] = max(gains.get(name, 0.0), float(out.float().std()) / i if i > 0 else 0.0)
                hooks.append(mod.register_forward_hook(hook))
        return hooks

    if not streamable(source.config):  # T5: run whole, every linear watched
        model = WholeModel(source, device, dtype).model
        hooks = watch(model, "")
        try:
            x = ids[:, :max_tokens].to(device)
            with torch.no_grad():
                model(input_ids=x, labels=x)  # labels: the decoder needs its inputs
        finally:
            for h in hooks:
                h.remove()
        name = max(gains, key=gains.get)
        return name, gains[name]
    sm = StreamedModel(source, device, dtype)
    sm.on_layer = lambda i, layer, prefix: watch(layer, prefix)
    h = sm.hidden(ids[:, :max_tokens])
    w, b = sm.head_weights()
    n, s1, s2 = 0, 0.0, 0.0
    step = max(1, (32 * 2**20) // (8 * h.shape[0]))
    for start in range(0, w.shape[0], step):
        z = sm.logits(h, w, b, start, min(w.shape[0], start + step), transform=False).double()
        n, s1, s2 = n + z.numel(), s1 + float(z.sum()), s2 + float((z * z).sum())
    i = float(h.float().std())
    out = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / max(n - 1, 1))
    gains[sm.head_prefix.rstrip(".")] = out / i if i > 0 else 0.0
    name = max(gains, key=gains.get)
    return name, gains[name]
