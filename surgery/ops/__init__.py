"""The op registry: every op config class, and the discriminated union recipes validate against."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .base import RESETS, Exactness, Init, Op, OpContext, Promise, RotaryPairs
from .clone_width import CloneWidth
from .grow_head_dim import GrowHeadDim
from .grow_heads import GrowHeads
from .grow_layers import GrowLayers
from .grow_mlp import GrowMlp
from .grow_vocab import GrowVocab
from .patch_layernorm import PatchLayerNorm
from .prune_heads import PruneHeads
from .prune_layers import PruneLayers
from .prune_mlp import PruneMlp
from .rescale_norm import RescaleNorm
from .reinit import Reinit
from .upcycle_moe import UpcycleMoe

OPS: list[type[Op]] = [GrowHeads, GrowHeadDim, CloneWidth, RescaleNorm, PatchLayerNorm, GrowMlp, GrowLayers, GrowVocab, Reinit, UpcycleMoe,
                         PruneHeads, PruneMlp, PruneLayers]

AnyOp = Annotated[Union[tuple(OPS)], Field(discriminator="op")]


def op_names() -> list[str]:
    return [cls.model_fields["op"].annotation.__args__[0] for cls in OPS]


__all__ = ["RESETS", "AnyOp", "Exactness", "Init", "OPS", "Op", "OpContext", "Promise", "RotaryPairs", "op_names"]
