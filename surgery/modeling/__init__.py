"""Model code surgery ships with outputs that stock transformers cannot compute (patch_layernorm).

A patched output's config names a model_type of its own (`surgery_stablelm`), with the patched
config and model classes behind `auto_map`: stock `AutoModelForCausalLM.from_pretrained` refuses
it without `trust_remote_code=True` rather than loading the stock class, which computes something
else. Surgery itself loads the same classes from this package, never from the output folder.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

MODELING_FILE = "modeling_surgery.py"
# shipped model_type -> the stock family it patches
PATCHED_MODEL_TYPES = {"surgery_stablelm": "stablelm"}
_CLASSES = {"stablelm": ("SurgeryStableLmConfig", "SurgeryStableLmForCausalLM")}


def patched_output_config(config: dict) -> dict:
    """The config written beside a patched model: its own model_type, classes behind auto_map."""
    family = config["model_type"]
    cfg_cls, model_cls = _CLASSES[family]
    module = MODELING_FILE[:-3]
    out = dict(config)
    out["model_type"] = next(k for k, v in PATCHED_MODEL_TYPES.items() if v == family)
    out["architectures"] = [model_cls]
    out["auto_map"] = {"AutoConfig": f"{module}.{cfg_cls}", "AutoModelForCausalLM": f"{module}.{model_cls}"}
    return out


def _module():
    from . import modeling_surgery

    return modeling_surgery


def config_from_dict(config: dict):
    """A transformers config object (the patched class for patched configs), from a deep copy of the dict."""
    from transformers import AutoConfig

    cfg = copy.deepcopy({k: v for k, v in config.items() if k != "auto_map"})
    family = PATCHED_MODEL_TYPES.get(cfg.get("model_type"))
    if family is None and cfg.get("surgery_live_width"):
        family = cfg["model_type"]
    if family is not None:
        cfg.pop("model_type", None)
        return getattr(_module(), _CLASSES[family][0])(**cfg)
    return AutoConfig.for_model(**cfg)


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def config_from_pretrained(path: Path):
    """A checkpoint's config as `AutoConfig.from_pretrained` reads it; patched ones with surgery's own classes."""
    from transformers import AutoConfig

    family = PATCHED_MODEL_TYPES.get(_model_type(path))
    if family is not None:
        return getattr(_module(), _CLASSES[family][0]).from_pretrained(str(path))
    return AutoConfig.from_pretrained(str(path))


def load_tokenizer(path: Path):
    """`AutoTokenizer.from_pretrained`, handed the config where it is a patched one.

    AutoTokenizer reads the model config first; a patched config would otherwise make it ask
    whether to run the shipped code (and wait for an answer) just to find the tokenizer.
    """
    from transformers import AutoTokenizer

    extra = {"config": config_from_pretrained(path)} if _model_type(path) in PATCHED_MODEL_TYPES else {}
    return AutoTokenizer.from_pretrained(str(path), **extra)


def model_class(config):
    """The class to build a model for this config: the patched one where the LayerNorm is patched."""
    if getattr(config, "surgery_live_width", None):
        family = PATCHED_MODEL_TYPES.get(config.model_type, config.model_type)
        return getattr(_module(), _CLASSES[family][1])
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
