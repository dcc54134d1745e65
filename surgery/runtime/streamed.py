"""A stock transformers model whose weights visit memory one decoder layer at a time (`StreamedModel`), or,
where that is not possible yet (an encoder-decoder), one run whole (`WholeModel`).

Streaming keeps memory flat in the model size and still lets stock transformers compute every number. The
family's own model class is built from the config with its parameters as placeholders on the `meta` device (no
memory; buffers such as rotary frequencies are computed as `from_config` computes them), and its own forward
runs on the calibration batch: it embeds, builds the causal / sliding-window masks and rotary embeddings, and
calls each stock decoder layer (built from the config by the model class itself, e.g.
`LlamaDecoderLayer(config, layer_idx)`). The layer list it iterates is replaced by a stream that loads one
layer's tensors into that layer just before it runs and drops them right after, so a family added to
`arch.py` needs no code here. The final projection (lm_head) is left to the caller, one vocabulary block at a
time (`logits`).

A family whose checkpoint tensors transformers converts while loading (mixture of experts: one tensor per
expert on disk, fused in memory) has each layer's tensors converted by transformers' own load-time converters
as the layer arrives (`build.LoadConversion`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import SurgeryError
from .build import LoadConversion, load_problems, model_from_tensors, skeleton
from .memory import return_freed_memory
from .sources import TensorSource


def _set(module: nn.Module, dotted: str, value: torch.Tensor | None) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    module._parameters[leaf] = value


class WholeModel:
    """A model run whole (an encoder-decoder: T5, which surgery only re-initialises); its logits are kept and
    served block by block as a streamed model's are."""

    head_prefix = "lm_head."

    def __init__(self, source: TensorSource, device: torch.device, dtype: torch.dtype,
                 attn_implementation: str | None = None):
        tensors = {n: source.load(n, device, dtype) for n in source.names()}
        self.model = model_from_tensors(source.config, tensors, dtype, device, attn_implementation)

    def head_weights(self):
        return None, None

    def logits(self, hidden, weight, bias, start, stop, transform=True):
        return hidden[:, start:stop]

    def logits_at(self, hidden, weight, bias, rows, cols):
        return hidden[rows, cols]


# streamed running ---------------------------------------------------------------------------

_LOGIT_TRANSFORMS: dict[str, Callable] = {
    # What some families' *ForCausalLM.forward does to the logits after lm_head; keyed by config field.
    "final_logit_softcapping": lambda logits, cap: torch.tanh(logits / cap) * cap,
}


class StreamedModel:
    """A stock transformers model whose weights live in a tensor source and visit memory one layer at a time."""

    def __init__(self, source: TensorSource, device: torch.device, dtype: torch.dtype,
                 attn_implementation: str | None = None):
        return_freed_memory()
        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.model = skeleton(source.config, dtype, self.device, attn_implementation, where=source.where)
        replaced = getattr(source, "buffers", None)
        for name, value in (replaced(self.model) if replaced else {}).items():
            module, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(module)
            module._buffers[leaf] = value.to(device=self.device, dtype=module._buffers[leaf].dtype)
        self.config = self.model.config
        self.base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        prefix = self._prefix_of(self.base)
        self.layer_prefix = f"{prefix}layers."
        self.layers = list(self.base.layers)
        self.base.layers = _LayerStream(self)
        self.head = self.model.get_output_embeddings()
        self.head_prefix = self._prefix_of(self.head)
        self.embed = self.base.get_input_embeddings()
        self.embed_prefix = self._prefix_of(self.embed)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.conversion = LoadConversion(self.model)
        self._check_keys()
        # Called with each module as its tensors arrive (a layer, or the embedding / final norm);
        # the hook handles they return are removed when the module leaves.
        self.on_layer: Callable[[int, nn.Module, str], list] | None = None
        self.on_module: Callable[[nn.Module, str], list] | None = None
        self._bar = None

    def _prefix_of(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}." if name else ""
        raise AssertionError("module not in the model")

    def _check_keys(self) -> None:
        """The source must hold exactly the model's parameters, as `from_pretrained` would refuse otherwise."""
        expected = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for i, layer in enumerate(self.layers):
            expected |= {f"{self.layer_prefix}{i}.{n}" for n, _ in layer.named_parameters()}
        # checkpoint names grouped by the parameter each loads into (several per fused expert tensor)
        self._stored_for, problems = load_problems(self.model, list(self.source.names()), expected)
        if problems:
            raise SurgeryError(f"does not load cleanly with transformers ({problems})", where=self.source.where)
        self._present = set(self._stored_for)

    def stored_names(self, prefix: str) -> list[str]:
        """The checkpoint's names of the tensors one layer loads from (per-expert tensors of fused parameters)."""
        return [s for full, stored in self._stored_for.items() if full.startswith(prefix) for s in stored]

    # loading one module's tensors --------------------------------------------------------
    def _load(self, full: str, placeholder: torch.Tensor) -> nn.Parameter:
        if full not in self._present and self.tied and full.startswith(self.head_prefix):
            full = self.embed_prefix + full[len(self.head_prefix):]  # tied: the head is the embedding
        t = self.source.load(full, self.device, self.dtype)
        if tuple(t.shape) != tuple(placeholder.shape):
            raise SurgeryError(f"tensor {full!r} has shape {list(t.shape)} but the config implies {list(placeholder.shape)}",
                               where=self.source.where)
        return nn.Parameter(t, requires_grad=False)

    def fill(self, module: nn.Module, prefix: str) -> None:
        """Every parameter of `module` (and its children) read from the source (converted as transformers
        converts them while loading: per-expert tensors fused)."""
        params = list(module.named_parameters())
        if not self.conversion:
            for n, p in params:
                _set(module, n, self._load(prefix + n, p))
            return
        stored = {s: self.source.load(s, self.device, self.dtype)
                  for n, _ in params for s in self._stored_for.get(prefix + n, [])}
        converted = self.conversion.convert(stored)
        del stored
        for n, p in params:
            full = prefix + n
            if full not in converted:
                _set(module, n, self._load(full, p))
                continue
            t = converted.pop(full).to(device=self.device, dtype=self.dtype)
            if tuple(t.shape) != tuple(p.shape):
                raise SurgeryError(f"tensors {self._stored_for[full][0]!r}... convert to {full!r} of shape {list(t.shape)} "
                                   f"but the config implies {list(p.shape)}", where=self.source.where)
            _set(module, n, nn.Parameter(t, requires_grad=False))

    def empty(self, module: nn.Module) -> None:
        for n, p in list(module.named_parameters()):
            _set(module, n, nn.Parameter(p.detach().to("meta"), requires_grad=False))

    def _globals(self) -> list[tuple[str, nn.Module]]:
        """Modules outside the layers and the head that own parameters (embedding, final norm, ...)."""
        return [(f"{name}." if name else "", m) for name, m in self.model.named_modules()
                if m is not self.head and any(p is not None for p in m._parameters.values())]

    # running -----------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, bar=None) -> torch.Tensor:
        """The final (normed) hidden states of the stock forward, shape (tokens, hidden)."""
        self._bar = bar
        glob = self._globals()
        hooks = []
        for prefix, m in glob:
            self.fill_direct(m, prefix)
            if self.on_module:
                hooks += self.on_module(m, prefix) or []
        try:
            out = self.base(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
            for _, m in glob:
                self.empty(m)
        return out[0]

    def fill_direct(self, module: nn.Module, prefix: str) -> None:
        """The parameters `module` owns itself (not its children's) read from the source."""
        for n, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[n] = self._load(prefix + n, p)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """lm_head's weight (the embedding's when tied) and bias, in the compute dtype."""
        def get(kind: str):
            if getattr(self.head, kind, None) is None:
                return None
            name = f"{self.head_prefix}{kind}"
            if name not in self._present and self.tied and kind == "weight":
                name = f"{self.embed_prefix}weight"
            shape = getattr(self.source, "rows", lambda n: None)(name) if kind == "weight" else None
            if shape is not None:
                return HeadRows(self.source, name, shape, self.device, self.dtype)
            return self.source.load(name, self.device, self.dtype)

        return get("weight"), get("bias")

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int,
               transform: bool = True) -> torch.Tensor:
        """Logits of vocabulary rows [start, stop), computed as the family's *ForCausalLM does."""
        z = torch.nn.functional.linear(hidden, weight[start:stop], None if bias is None else bias[start:stop])
        for field, fn in _LOGIT_TRANSFORMS.items() if transform else ():
            value = getattr(self.config, field, None)
            if value:
                z = fn(z, value)
        return z

    def logits_at(self, hidden, weight, bias, rows, cols) -> torch.Tensor:
        """The logit of vocabulary entry cols[i] for token rows[i]."""
        return self.logits(hidden[rows], weight[cols], None if bias is None else bias[cols], 0, len(cols)).diagonal()


class HeadRows:
    """lm_head's weight, read and converted a block of vocabulary rows at a time as logits are computed block by
    block: comparing a float32 and a float64 model holds one block of each head, not both heads whole."""

    def __init__(self, source, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.source, self.name, self.shape, self.device, self.dtype = source, name, torch.Size(shape), device, dtype

    def to(self, device) -> HeadRows:
        return HeadRows(self.source, self.name, self.shape, torch.device(device), self.dtype)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            assert step == 1, "a head is read in contiguous blocks of rows"
            return self.source.load_rows(self.name, start, max(start, stop), self.device, self.dtype)
        rows = torch.as_tensor(index).to("cpu").reshape(-1)  # a few rows (top tokens): each run of them read once
        wanted, where = rows.unique(return_inverse=True)
        parts, i = [], 0
        while i < len(wanted):
            j = i
            while j + 1 < len(wanted) and wanted[j + 1] - wanted[i] < 4096:
                j += 1
            block = self[int(wanted[i]):int(wanted[j]) + 1]
            parts.append(block[(wanted[i:j + 1] - wanted[i]).to(block.device)])
            i = j + 1
        out = torch.cat(parts) if parts else torch.empty((0, *self.shape[1:]), device=self.device, dtype=self.dtype)
        return out[where.to(out.device)]


class _LayerStream(nn.Module):
    """Stands in for the decoder's `layers` list: each layer is loaded when the forward reaches it."""

    def __init__(self, owner: StreamedModel):
        super().__init__()
        object.__setattr__(self, "owner", owner)

    def __len__(self):
        return len(self.owner.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _Slice(self, range(len(self))[index])
        raise TypeError("streamed layers are visited in order only")

    def __iter__(self):
        return iter(_Slice(self, range(len(self))))


class _Slice:
    def __init__(self, stream: _LayerStream, indices: range):
        self.stream, self.indices = stream, indices

    def __iter__(self):
        owner = self.stream.owner
        owner.empty(owner.embed)  # embedded already: the largest tensor leaves before layer 0 arrives
        for i in self.indices:
            layer = owner.layers[i]
            prefix = f"{owner.layer_prefix}{i}."
            owner.fill(layer, prefix)
            hooks = owner.on_layer(i, layer, prefix) if owner.on_layer else None
            try:
                yield layer
            finally:
                for h in hooks or ():
                    h.remove()
                owner.empty(layer)
                if owner._bar is not None:
                    owner._bar.update(1)
