"""The family's stock model built from a config: a skeleton with parameters on `meta` (for streaming), a whole
model holding given tensors, and transformers' load-time conversion of checkpoint tensors (fused experts)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..errors import SurgeryError
from ..io.resolve import open_checkpoint
from ..modeling import config_from_dict, model_class
from ..spec import config_errors


def config_object(config: dict, where: str = "config.json"):
    """The transformers config object for a config dict (surgery's patched class where patched)."""
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
    ck = open_checkpoint(Path(path))
    return model_from_tensors(ck.config, {n: ck.load(n) for n in ck.tensors}, dtype, device)


def experts_kwargs(config, dtype: torch.dtype) -> dict:
    """transformers 5 runs experts through torch's grouped_mm by default, which has no float64 kernel and needs
    rows of a multiple of 16 bytes: such mixture-of-experts models run the eager per-expert loop (the same sums)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if get_checkpoint_conversion_mapping(config.model_type) and (dtype == torch.float64 or not grouped_mm_fits(config, dtype)):
        return {"experts_implementation": "eager"}
    return {}


def grouped_mm_fits(config, dtype: torch.dtype) -> bool:
    """Whether torch's grouped_mm takes the experts' rows in `dtype`: hidden and expert widths of a multiple of 16
    bytes (a grown or upcycled width such as 51 float32 values fails there with 'strides should be multiple of 16')."""
    size = torch.empty((), dtype=dtype).element_size()
    field = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    widths = [field(k) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    return all(w * size % 16 == 0 for w in widths if isinstance(w, int))


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


def load_problems(model, stored, expected: set[str] | None = None) -> tuple[dict[str, list[str]], str | None]:
    """Loading checkpoint tensors named `stored` into `model` (a skeleton): ({parameter: the stored names that load
    into it}, what `from_pretrained` would report as missing or unexpected keys, or None). `expected`: the
    parameters' names where the model no longer lists them all itself (a streamed model's layers)."""
    import re

    conversion = LoadConversion(model)
    stored_for: dict[str, list[str]] = {}
    for n in stored:
        stored_for.setdefault(conversion.target(n)[0] if conversion else n, []).append(n)
    if expected is None:
        expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    head = model.get_output_embeddings()
    head_prefix = next((f"{k}." for k, m in model.named_modules() if m is head), "")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    optional = {f"{head_prefix}{n}" for n, _ in head.named_parameters()} if tied and head is not None else set()
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore.append(re.compile(r".*rotary_emb\.inv_freq$"))  # older checkpoints persisted it; transformers drops it
    missing = sorted(expected - set(stored_for) - optional)
    unexpected = sorted(n for n in set(stored_for) - expected if not any(p.search(n) for p in ignore))
    parts = [f"{what}: {', '.join(v[:3])}" + (f" and {len(v) - 3} more" if len(v) > 3 else "")
             for what, v in (("missing keys", missing), ("unexpected keys", unexpected)) if v]
    return stored_for, "; ".join(parts) or None


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
