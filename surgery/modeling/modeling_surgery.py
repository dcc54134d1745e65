"""Model code shipped with checkpoints made by `surgery` with `patch_layernorm`.

Self-contained on purpose: it is copied next to the weights and loaded by transformers with
`trust_remote_code=True`, so it may import only torch and transformers.

`LiveWidthLayerNorm` subtracts the mean of the first `live_width` dims (the model's original
width) and only from those dims; the variance is over all dims, like stock LayerNorm. A grown
model whose extra residual dims start at zero then computes what the original did, once the norm
weights and eps are rescaled by `rescale_norm`.

The config's model_type is `surgery_stablelm`, which stock transformers does not know: loading
without `trust_remote_code=True` fails instead of silently building a stock StableLM (whose
LayerNorm centres over the zero-padded dims: a different function).
"""
import torch
from torch import nn
from transformers import StableLmConfig, StableLmForCausalLM


class LiveWidthLayerNorm(nn.LayerNorm):
    def __init__(self, hidden_size, live_width, eps=1e-5, bias=True):
        super().__init__(hidden_size, eps=eps, bias=bias)
        self.live_width = live_width

    def forward(self, x):
        dtype = x.dtype
        h = x if dtype in (torch.float32, torch.float64) else x.float()
        live = h[..., : self.live_width]
        live = live - live.mean(-1, keepdim=True)
        centred = torch.cat([live, h[..., self.live_width :]], dim=-1)
        var = centred.pow(2).mean(-1, keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        y = y.to(dtype) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self):
        return super().extra_repr() + f", live_width={self.live_width}"


def _patched(norm, live_width):
    new = LiveWidthLayerNorm(norm.normalized_shape[0], live_width, eps=norm.eps, bias=norm.bias is not None)
    new.to(device=norm.weight.device, dtype=norm.weight.dtype)
    return new


class SurgeryStableLmConfig(StableLmConfig):
    """StableLM's config under a model_type of its own, so only this code loads it."""

    model_type = "surgery_stablelm"


class SurgeryStableLmForCausalLM(StableLmForCausalLM):
    """StableLM whose residual LayerNorms are `LiveWidthLayerNorm` (per-head q/k norms untouched)."""

    config_class = SurgeryStableLmConfig

    def __init__(self, config):
        super().__init__(config)
        lw = config.surgery_live_width
        for layer in self.model.layers:
            layer.input_layernorm = _patched(layer.input_layernorm, lw)
            if getattr(layer, "post_attention_layernorm", None) is not None:
                layer.post_attention_layernorm = _patched(layer.post_attention_layernorm, lw)
        self.model.norm = _patched(self.model.norm, lw)
