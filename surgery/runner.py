"""Running a model: whole (a transformers model in memory) or streamed, one decoder layer at a time.

Streamed evaluation keeps memory flat in the model size and still lets stock transformers compute
every number. The family's own model class is built from the config with its parameters as
placeholders on the `meta` device (no memory; buffers such as rotary frequencies are computed as
`from_config` computes them), and its own forward runs on the calibration batch: it embeds, builds
the causal / sliding-window masks and rotary embeddings, and calls each stock decoder layer (built
from the config by the model class itself, e.g. `LlamaDecoderLayer(config, layer_idx)`). The layer
list it iterates is replaced by a stream that loads one layer's tensors into that layer just
before it runs and drops them right after, so a family added to `arch.py` needs no code here.
The final projection (lm_head) runs in vocabulary chunks, and the loss, logit differences, KL and
top-1 agreement are accumulated chunk by chunk: full-vocabulary logits never exist at once.

A family whose checkpoint tensors transformers converts while loading (mixture of experts: one tensor
per expert on disk, fused in memory) has each layer's tensors converted by transformers' own load-time
converters as the layer arrives (`LoadConversion`).

Weights come from a tensor source: a checkpoint directory (safetensors, pickles or Mistral's
native layout, one tensor read when needed), or a `ModelState` of lazy tensors (each tensor
computed from the source when its layer runs), so a per-op step needs no materialised model.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from .errors import SurgeryError

CHUNK_BYTES = 32 * 2**20  # one float64 block of logits at a time


# tensor sources -----------------------------------------------------------------------------

class TensorSource(Protocol):
    """Named tensors in transformers layout plus the config they belong to. A source may also have
    `buffers(model) -> {name: tensor}`: buffers of the built model to replace (`verify.WrittenRope`)."""

    where: str
    config: dict

    def names(self) -> Iterable[str]: ...

    def load(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...


class CheckpointSource:
    """A checkpoint reader (`Checkpoint`, `NativeCheckpoint`, `InMemoryCheckpoint`): one tensor read at a time."""

    def __init__(self, reader, where: str | None = None):
        self.reader = reader
        self.config = reader.config
        self.where = where or str(getattr(reader, "path", "checkpoint"))

    def names(self):
        return self.reader.tensors.keys()

    def load(self, name, device, dtype):
        t = self.reader.load(name)
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


class StateSource:
    """A `ModelState`: each tensor computed from its lazy graph when its layer runs."""

    def __init__(self, state, reader, where: str = "state"):
        self.tensors = state.output()  # as a checkpoint stores them (fused parts joined)
        self.reader, self.where = reader, where
        self.config = state.spec.config

    def names(self):
        return self.tensors.keys()

    def load(self, name, device, dtype):
        from .lazy import evaluate

        return evaluate(self.tensors[name], self.reader, device, dtype)


def open_source(path: Path) -> CheckpointSource:
    """A checkpoint directory (transformers or Mistral native layout) as a tensor source."""
    from .io.resolve import open_checkpoint

    return CheckpointSource(open_checkpoint(Path(path)), str(path))


def model_source(model) -> CheckpointSource:
    """A transformers model in memory as a tensor source (notebooks, tests)."""
    from .io.checkpoint import InMemoryCheckpoint

    return CheckpointSource(InMemoryCheckpoint(model.config.to_dict(), disk_layout(model, dict(model.state_dict()))), "<memory>")


# the family's model class --------------------------------------------------------------------

def model_class(config):
    """The stock class for a config, or surgery's patched one (`surgery.modeling`)."""
    from .modeling import model_class as cls

    return cls(config)


def config_object(config: dict, where: str = "config.json"):
    """The transformers config object for a config dict (surgery's patched class where patched)."""
    from .modeling import config_from_dict
    from .spec import config_errors

    try:
        return config_from_dict(config)
    except (ValueError, TypeError, KeyError, *config_errors()) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"transformers cannot read the config: {msg}", where=where) from None


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside become placeholders on `meta`; buffers stay real.

    What accelerate's `init_empty_weights(include_buffers=False)` does, without needing it: the
    skeleton of a 70B model costs nothing, and its rotary buffers are the ones `from_config` computes.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config: dict, dtype: torch.dtype, device: torch.device, attn_implementation: str | None = None,
             where: str = "config.json"):
    """The family's stock model for `config`, parameters on `meta`, buffers on `device`."""
    cfg = config_object(config, where)
    cls = model_class(cfg)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    try:
        with _parameters_on_meta():
            model = build(cfg, dtype=dtype, attn_implementation=attn_implementation, **experts_kwargs(cfg, dtype))
    except SurgeryError:
        raise
    except Exception as e:  # transformers raises many types for a config it cannot build
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"transformers cannot build the model from its config: {first}", where=where) from None
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval()


def _set(module: nn.Module, dotted: str, value: torch.Tensor | None) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    module._parameters[leaf] = value


# whole models (notebooks, api.transform) -----------------------------------------------------

def model_from_tensors(config_dict: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                       attn_implementation: str | None = None):
    """A transformers model holding exactly these tensors."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    cfg = config_object(config_dict)
    cls = model_class(cfg)
    if get_checkpoint_conversion_mapping(cfg.model_type):
        # on-disk names (per-expert tensors) that transformers converts while loading, as from a file
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)].from_pretrained(
            None, config=cfg, state_dict={k: v.to(dtype) for k, v in tensors.items()}, dtype=dtype,
            attn_implementation=attn_implementation, output_loading_info=True, **experts_kwargs(cfg, dtype))
        bad = {k: sorted(v)[:3] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise AssertionError(f"state does not fit {type(model).__name__}: {bad}")
        return model.to(device).eval()
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    model = build(cfg, dtype=dtype, attn_implementation=attn_implementation)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # T5's encoder/decoder embed_tokens are shared
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")
               and not (m != "lm_head.weight" and tied.get(m) in tensors)]
    if missing or unexpected:
        raise AssertionError(f"state does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


def load_model(path: Path, dtype: torch.dtype, device: torch.device):
    """A whole stock transformers model for a checkpoint directory (Mistral's native layout converted in memory)."""
    ck = open_source(path).reader
    return model_from_tensors(ck.config, {n: ck.load(n) for n in ck.tensors}, dtype, device)


def experts_kwargs(config, dtype: torch.dtype) -> dict:
    """transformers 5 runs experts through torch's grouped_mm by default, which has no float64 kernel:
    float64 mixture-of-experts models run the eager per-expert loop."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if dtype == torch.float64 and get_checkpoint_conversion_mapping(config.model_type):
        return {"experts_implementation": "eager"}
    return {}


def decoder_only(config: dict) -> bool:
    return not getattr(config_object(config), "is_encoder_decoder", False)


def streamable(config: dict) -> bool:
    """Whether a model runs layer by layer here. Not yet: an encoder-decoder (T5, re-initialised only)
    runs whole (`WholeModel`)."""
    return decoder_only(config)


def disk_layout(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters (or their gradients), named in full, under the names and shapes a checkpoint holds on disk:
    transformers 5 fuses Mixtral's and Qwen-MoE's experts in memory, checkpoints store them per expert."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if not get_checkpoint_conversion_mapping(model.config.model_type):
        return tensors
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


class LoadConversion:
    """transformers' load-time weight conversion (`conversion_mapping.py`), applied to one layer's tensors.

    Mixture-of-experts checkpoints store one tensor per expert (`experts.{E}.w1.weight`) while
    transformers 5 holds them fused (`experts.gate_up_proj`); its renamings and converters, found for
    the model as `from_pretrained` finds them, turn a layer's checkpoint tensors into its parameters.
    """

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        mapping = get_model_conversion_mapping(model)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    def __bool__(self):
        return bool(self.renamings or self.converters)

    def target(self, name: str) -> tuple[str, str | None]:
        """The parameter a checkpoint tensor loads into, and the converter pattern it matched."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(name, self.renamings, self.converters)

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (named as stored) as the parameters they load into (named as in memory)."""
        from copy import deepcopy

        from transformers.core_model_loading import dot_natural_key

        out, pending = {}, {}
        for name in sorted(tensors, key=dot_natural_key):  # experts in index order, as from_pretrained stacks them
            target, pattern = self.target(name)
            if pattern is None:
                out[target] = tensors[name]
                continue
            conv = pending.setdefault(target, deepcopy(self.by_pattern[pattern]))
            conv.add_tensor(target, name, pattern, tensors[name])
        for target, conv in pending.items():
            for k, v in conv.convert(target, model=self.model, config=self.model.config).items():
                out[k] = v[0] if isinstance(v, list) else v
        return out


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


class Progress:
    """`layer i of n` bars on a terminal and one summary line per phase, on stderr; silent when off."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    @contextlib.contextmanager
    def phase(self, desc: str, total: int | None = None):
        from tqdm import tqdm

        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=desc, unit="layer", leave=False, file=sys.stderr,
                   disable=not (self.enabled and sys.stderr.isatty()))
        summary: list[str] = []
        try:
            yield bar, summary
        finally:
            bar.close()
        if self.enabled:
            extra = f": {summary[0]}" if summary else ""
            print(f"{desc}{extra} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)


QUIET = Progress(False)


def return_freed_memory() -> None:
    """Make glibc give freed blocks above 1 MiB back to the system.

    glibc serves blocks below a threshold from its heap, and raises that threshold (up to 32 MiB)
    each time a larger block is freed: a layer's weights and activations then come from a heap that
    fragments and never shrinks, and resident memory grew by ~25 MB per layer streamed (1.5 GB after
    24 layers of a 1 GB model). A fixed threshold keeps it flat. Elsewhere (macOS, musl) a no-op.
    """
    global _RETURNING
    if _RETURNING:
        return
    _RETURNING = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, which also stops its dynamic growth
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: free heap tops above 1 MiB go back too
    except (OSError, AttributeError):
        pass


_RETURNING = False


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
        stored = list(self.source.names())
        # checkpoint names grouped by the parameter each loads into (several per fused expert tensor)
        self._stored_for: dict[str, list[str]] = {}
        for n in stored:
            self._stored_for.setdefault(self.conversion.target(n)[0] if self.conversion else n, []).append(n)
        names = set(self._stored_for)
        expected = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for i, layer in enumerate(self.layers):
            expected |= {f"{self.layer_prefix}{i}.{n}" for n, _ in layer.named_parameters()}
        head = {f"{self.head_prefix}{n}" for n, _ in self.head.named_parameters()}
        optional = head if self.tied else set()
        ignore = [re.compile(p) for p in (getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        ignore.append(re.compile(r".*rotary_emb\.inv_freq$"))  # older checkpoints persisted it; transformers drops it
        missing = sorted(expected - names - optional)
        unexpected = sorted(n for n in names - expected if not any(p.search(n) for p in ignore))
        if missing or unexpected:
            parts = [f"{what}: {', '.join(v[:3])}" + (f" and {len(v) - 3} more" if len(v) > 3 else "")
                     for what, v in (("missing keys", missing), ("unexpected keys", unexpected)) if v]
            raise SurgeryError(f"does not load cleanly with transformers ({'; '.join(parts)})", where=self.source.where)
        self._present = names

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


# evaluation and comparison ------------------------------------------------------------------

@dataclass
class Evaluation:
    """What one model said about the calibration tokens, without its full logits.

    `hidden` and the head it was projected by (`streamed`) give any block of logits again.
    """

    loss: float
    hidden: torch.Tensor  # (tokens, hidden), final normed (a whole encoder-decoder: its logits)
    lse: torch.Tensor  # (tokens,) float64 log-sum-exp over the whole vocabulary
    top1: torch.Tensor  # (tokens,) argmax over the whole vocabulary
    top_logit: torch.Tensor  # (tokens,) float64 logit of that argmax
    vocab: int
    streamed: "StreamedModel | WholeModel"


@dataclass
class Comparison:
    """How far one evaluation lies from a reference on the same tokens: what judging reads.

    Logits are compared over the reference's vocabulary (a grown vocab on its first V tokens), in
    float64. Every field is a sum or a max over tokens, so it is accumulated chunk by chunk.
    """
    loss: float  # the candidate's mean next-token loss
    rel_change: float  # (loss - reference loss) / |reference loss|
    max_logit_diff: float  # max over tokens and vocab of |logit difference|
    mean_logit_diff: float  # mean over tokens and vocab of |logit difference|
    top1_agreement: float  # share of tokens whose argmax (greedy next token) agrees
    kl_divergence: float  # KL(reference || other) of next-token distributions, mean over tokens
    compared_vocab: int
    reference_loss: float = math.nan  # the approximate rule bounds KL relative to it: fill it
    # Where the greedy tokens disagree, how far apart the reference put the two tokens (its logit of
    # its own top token minus its logit of the candidate's): max over disagreeing tokens, 0 if none.
    # A flip at a reference gap <= 2B is what logits moved by at most B can do (a near-tie).
    max_flip_gap: float = math.inf
    # A grown vocabulary (the candidate has rows the reference lacks): the relative loss change the new
    # rows' share of the candidate's own normaliser accounts for, that share (mean over predicted
    # positions), and the float32 rounding a loss computed by transformers may carry (sqrt(T) x eps).
    expected_rel_change: float | None = None
    new_rows_mass: float = 0.0
    loss_rounding: float = 0.0


def _chunk(tokens: int) -> int:
    return max(1, CHUNK_BYTES // (8 * max(tokens, 1)))


def evaluate(source: TensorSource, ids: torch.Tensor, device: torch.device, dtype: torch.dtype,
             progress: Progress = QUIET, desc: str = "evaluating", attn_implementation: str | None = None) -> Evaluation:
    """Loss (mean next-token cross-entropy, as transformers' loss) of `source` on `ids`, streamed."""
    with progress.phase(desc, total=None) as (bar, summary):
        ev = _evaluate(source, ids, device, dtype, bar, attn_implementation)
        layers = getattr(ev.streamed, "layers", None)
        summary.append(f"loss {ev.loss:.6f}, " + (f"{len(layers)} layers, " if layers is not None else "whole model, ")
                       + f"{ids.shape[1]} tokens")
    return ev


def _evaluate(source, ids, device, dtype, bar, attn_implementation) -> Evaluation:
    if not streamable(source.config):
        wm = WholeModel(source, device, dtype, attn_implementation)
        with torch.no_grad():
            out = wm.model(input_ids=ids.to(device), labels=ids.to(device))
        z = out.logits[0]
        best, top1 = z.double().max(-1)
        return Evaluation(float(out.loss), z, torch.logsumexp(z.double(), -1), top1, best, z.shape[-1], wm)
    sm = StreamedModel(source, device, dtype, attn_implementation)
    if bar is not None:
        bar.reset(total=len(sm.layers))
    h = sm.hidden(ids, bar)
    w, b = sm.head_weights()
    T, V = h.shape[0], w.shape[0]
    labels = ids[0, 1:].to(h.device)
    lse = torch.full((T,), -math.inf, dtype=torch.float64, device=h.device)
    best = torch.full((T,), -math.inf, dtype=torch.float64, device=h.device)
    top1 = torch.zeros(T, dtype=torch.long, device=h.device)
    target = torch.zeros(T - 1, dtype=torch.float64, device=h.device)
    step = _chunk(T)
    for start in range(0, V, step):
        stop = min(V, start + step)
        z = sm.logits(h, w, b, start, stop).double()
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        m, j = z.max(-1)
        better = m > best
        best, top1 = torch.where(better, m, best), torch.where(better, j + start, top1)
        inside = (labels >= start) & (labels < stop)
        if inside.any():
            rows = inside.nonzero().flatten()
            target[rows] = z[rows, labels[rows] - start]
        del z
    del w, b
    loss = float((lse[:-1] - target).mean())
    return Evaluation(loss, h, lse, top1, best, V, sm)


def compare(ref: Evaluation, other: Evaluation) -> Comparison:
    """Over the reference's vocabulary (a grown vocab is compared on its first V tokens), block by block in float64."""
    v = ref.vocab
    wr, br = ref.streamed.head_weights()
    wo, bo = other.streamed.head_weights()
    wo, bo = (None if wo is None else wo.to(ref.hidden.device)), (None if bo is None else bo.to(ref.hidden.device))
    T = ref.hidden.shape[0]
    dev = ref.hidden.device
    hr, ho = ref.hidden, other.hidden.to(dev)
    max_diff, sum_diff = 0.0, 0.0
    lse_o = torch.full((T,), -math.inf, dtype=torch.float64, device=dev)
    best = torch.full((T,), -math.inf, dtype=torch.float64, device=dev)
    top1 = torch.zeros(T, dtype=torch.long, device=dev)
    cross = torch.zeros(T, dtype=torch.float64, device=dev)  # sum_v p_ref (z_ref - z_other)
    step = _chunk(T)
    for start in range(0, v, step):
        stop = min(v, start + step)
        a = ref.streamed.logits(hr, wr, br, start, stop).double()
        b = other.streamed.logits(ho, wo, bo, start, stop).double()
        d = a - b
        max_diff = max(max_diff, float(d.abs().max()))
        sum_diff += float(d.abs().sum())
        lse_o = torch.logaddexp(lse_o, torch.logsumexp(b, -1))
        cross += ((a - ref.lse[:, None]).exp() * d).sum(-1)
        m, j = b.max(-1)
        better = m > best
        best, top1 = torch.where(better, m, best), torch.where(better, j + start, top1)
        del a, b, d
    kl = (cross - ref.lse + lse_o).mean()
    flips = (ref.top1 != top1).nonzero().flatten()
    gap = 0.0
    if flips.numel():  # the reference's logits at the candidate's top tokens
        at = ref.streamed.logits_at(hr, wr, br, flips, top1[flips])
        gap = float((ref.top_logit[flips] - at.double()).max())
    grown = {}
    if other.vocab > v:  # each predicted position's loss = its loss over the old vocabulary + log(lse_all - lse_old)
        shift = (other.lse.to(dev)[:-1] - lse_o[:-1])
        grown = dict(expected_rel_change=float(shift.mean()) / abs(ref.loss) if ref.loss else math.inf,
                     new_rows_mass=float((1 - (-shift).exp()).mean()),
                     loss_rounding=torch.finfo(torch.float32).eps * (T - 1) ** 0.5)
    return Comparison(
        **grown,
        loss=other.loss,
        rel_change=(other.loss - ref.loss) / abs(ref.loss) if ref.loss else math.inf,
        max_logit_diff=max_diff,
        mean_logit_diff=sum_diff / (T * v),
        top1_agreement=float((ref.top1 == top1).double().mean()),
        kl_divergence=max(float(kl), 0.0),
        compared_vocab=v,
        reference_loss=ref.loss,
        max_flip_gap=gap,
    )
