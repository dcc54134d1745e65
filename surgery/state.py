"""ModelState: a spec plus a lazy tensor for every parameter the output checkpoint will hold."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .arch import TensorInfo, TensorRole
from .errors import SurgeryError
from .lazy import LazyTensor, read
from .spec import ModelSpec

# Buffers older checkpoints persisted and transformers recomputes from the config, ignoring the
# stored copy (its `_keys_to_ignore_on_load_unexpected` for rotary_emb.inv_freq): read, not written.
DROPPED_BUFFERS = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


@dataclass
class NewSlice:
    """Part of a tensor created by a growth op, for the gradient-flow check."""

    tensor: str
    axis: int
    index: list[int]
    op: str


@dataclass
class ModelState:
    spec: ModelSpec
    tensors: dict[str, LazyTensor]
    new_slices: list[NewSlice] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # source tensors not carried over (DROPPED_BUFFERS)

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, metas: dict, where: str = "source") -> "ModelState":
        tensors: dict[str, LazyTensor] = {}
        unknown, dropped = [], []
        for name, m in metas.items():
            if DROPPED_BUFFERS.fullmatch(name):
                dropped.append(name)
                continue
            if spec.arch.classify(name) is None:
                unknown.append(name)
            tensors[name] = read(name, m.shape, m.dtype)
        if unknown:
            raise SurgeryError(
                f"{len(unknown)} tensor(s) the {spec.arch.name} table does not know, e.g. {unknown[0]!r}", where=where
            )
        head = spec.arch.parameter_name(TensorRole.LM_HEAD, "weight")
        if spec.tied:
            tensors.pop(head, None)  # transformers ties it to the embedding on load
        state = cls(spec, tensors, dropped=sorted(dropped))
        state.check_shapes(where)
        return state

    def copy(self) -> "ModelState":
        slices = [NewSlice(s.tensor, s.axis, list(s.index), s.op) for s in self.new_slices]
        return ModelState(self.spec.copy(), dict(self.tensors), slices, list(self.dropped))

    def info(self, name: str) -> TensorInfo:
        info = self.spec.arch.classify(name)
        assert info is not None, name
        return info

    def items(self, *roles: TensorRole):
        for name, t in self.tensors.items():
            info = self.info(name)
            if not roles or info.role in roles:
                yield name, info, t

    def expected_shape(self, info: TensorInfo) -> tuple[int, ...]:
        from .arch import Axis

        s = self.spec
        sizes = {
            Axis.VOCAB: s.vocab_size,
            Axis.RESID: s.hidden_size,
            Axis.Q: s.num_heads * s.head_dim,
            Axis.KV: s.num_kv_heads * s.head_dim,
            Axis.INTER: s.intermediate_size,
            Axis.HEAD_DIM: s.head_dim,
        }
        return tuple(sizes[a] for a in info.axes)

    def check_shapes(self, where: str = "source") -> None:
        """Config and tensors must agree, or every later op would compute garbage."""
        s = self.spec
        for name, t in self.tensors.items():
            info = self.info(name)
            if info.layer is not None and info.layer >= s.num_layers:
                raise SurgeryError(f"tensor {name!r} is beyond num_hidden_layers={s.num_layers}", where=where)
            want = self.expected_shape(info)
            if tuple(t.shape) != want:
                raise SurgeryError(f"tensor {name!r} has shape {list(t.shape)} but config.json implies {list(want)}", where=where)
        emb = s.arch.parameter_name(TensorRole.EMBED, "weight")
        if emb not in self.tensors:
            raise SurgeryError(f"missing tensor {emb!r}", where=where)
        head = s.arch.parameter_name(TensorRole.LM_HEAD, "weight")
        if not s.tied and head not in self.tensors:
            raise SurgeryError(f"missing tensor {head!r} (and tie_word_embeddings is false)", where=where)
        # Every family here has a gated MLP and pre-norms; a parallel-residual StableLM has no
        # post_attention_layernorm. Biases depend on config flags: only their consistency is checked.
        per_layer = [TensorRole.ATTN_Q, TensorRole.ATTN_K, TensorRole.ATTN_V, TensorRole.ATTN_O,
                     TensorRole.MLP_GATE, TensorRole.MLP_UP, TensorRole.MLP_DOWN, TensorRole.NORM_ATTN]
        if not s.config.get("use_parallel_residual"):
            per_layer.append(TensorRole.NORM_MLP)
        final = s.arch.parameter_name(TensorRole.NORM_FINAL, "weight")
        if final not in self.tensors:
            raise SurgeryError(f"missing tensor {final!r}", where=where)
        for layer in range(s.num_layers):
            for role in per_layer:
                n = s.arch.parameter_name(role, "weight", layer)
                if n not in self.tensors:
                    raise SurgeryError(f"missing tensor {n!r}", where=where)
        # What one layer has (a bias, a per-head norm), every layer has.
        layers_with: dict[tuple, set[int]] = {}
        for name in self.tensors:
            info = self.info(name)
            if info.layer is not None:
                layers_with.setdefault((info.role, info.kind, info.head), set()).add(info.layer)
        for (role, kind, head), have in layers_with.items():
            lacking = sorted(set(range(s.num_layers)) - have)
            if lacking:
                n = s.arch.parameter_name(role, kind, lacking[0], head)
                raise SurgeryError(f"missing tensor {n!r} (layer {min(have)} has one)", where=where)

    def rename(self, mapping: dict[str, str]) -> None:
        """Rename tensors (new layer or head indices), keeping recorded new slices attached."""
        self.tensors = {mapping.get(n, n): t for n, t in self.tensors.items()}
        for s in self.new_slices:
            s.tensor = mapping.get(s.tensor, s.tensor)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())
