"""ModelState: a spec plus a lazy tensor for every parameter the output checkpoint will hold."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .arch import Axis, TensorInfo, TensorRole
from .errors import SurgeryError
from .lazy import LazyTensor, deferred, read
from .spec import ModelSpec

# Buffers older checkpoints persisted and transformers recomputes from the config, ignoring the
# stored copy (its `_keys_to_ignore_on_load_unexpected` for rotary_emb.inv_freq): read, not written.
DROPPED_BUFFERS = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


def read_ties(spec: ModelSpec, checkpoint) -> None:
    """Ties as transformers makes them on load, where the config and the stored tensors disagree.

    transformers ties a stored copy to the embedding only when the two hold equal values; where they differ it loads
    them apart and warns. A tied config with a different stored lm_head is read untied (the output's config then says
    so: its function is the one transformers gives the source); a different stored copy the architecture cannot
    hold apart (T5's encoder and decoder embeddings) is refused.
    """
    stored = checkpoint.tensors
    embed = spec.arch.parameter_name(TensorRole.EMBED, "weight")
    if embed not in stored:
        return
    for alias in spec.arch.tied_aliases:
        if alias in stored and not _equal_values(checkpoint, alias, embed):
            raise SurgeryError(f"{alias!r} holds other values than {embed!r}, which transformers loads apart and the "
                               f"{spec.arch.name} table ties to it; not supported", where=str(checkpoint.path))
    head = spec.arch.parameter_name(TensorRole.LM_HEAD, "weight")
    if spec.tied and head in stored and not _equal_values(checkpoint, head, embed):
        spec.config["tie_word_embeddings"] = False
        spec.meta.standardised.append(f"tie_word_embeddings: true -> false: {head} is stored with other values than "
                                      f"{embed}, and transformers loads the two apart")


def _equal_values(checkpoint, a: str, b: str) -> bool:
    """Whether two stored tensors hold equal values (`torch.equal`, as transformers decides a tie), read in row blocks."""
    import torch

    from .rowwise import block_rows, has_rows

    ma, mb = checkpoint.tensors[a], checkpoint.tensors[b]
    if tuple(ma.shape) != tuple(mb.shape):
        return False
    if not ma.shape or not has_rows(checkpoint):
        return torch.equal(checkpoint.load(a).double(), checkpoint.load(b).double())
    step = block_rows(ma.shape)
    for start in range(0, ma.shape[0], step):
        stop = min(start + step, ma.shape[0])
        if not torch.equal(checkpoint.load_rows(a, start, stop).double(), checkpoint.load_rows(b, start, stop).double()):
            return False
    return True


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
            if name in spec.arch.tied_aliases:
                continue  # transformers ties it to the embedding on load
            fused = spec.arch.fused_parts(name)
            if fused is not None:
                tensors.update(_split(spec, name, m, *fused, where))
                continue
            if DROPPED_BUFFERS.fullmatch(name):
                dropped.append(name)
                continue
            if spec.arch.classify(name) is None:
                unknown.append(name)
            elif not m.dtype.is_floating_point:  # transformers casts it into a float parameter: garbage, run as if fine
                raise SurgeryError(f"tensor {name!r} is stored as {str(m.dtype)[6:]}, but a model's weights are floating point",
                                   where=where)
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

    def output(self) -> dict[str, LazyTensor]:
        """The tensors as the checkpoint stores them: parts of a fused tensor (Phi-3's qkv_proj) joined again."""
        import torch
        arch = self.spec.arch
        if not arch.fused:
            return dict(self.tensors)
        out: dict[str, LazyTensor] = {}
        groups: dict[str, list[LazyTensor]] = {}
        for name, node in self.tensors.items():
            info = self.info(name)
            fused = arch.fused_name(info.role, info.kind, info.layer)
            if fused is None:
                out[name] = node
                continue
            if fused not in groups:
                groups[fused] = []
                out[fused] = None  # keeps the first part's place in the order
            groups[fused].append((arch.fused[_prefix(arch, fused)].index(info.role), node))
        for fused, parts in groups.items():
            nodes = [n for _, n in sorted(parts, key=lambda p: p[0])]
            shape = (sum(n.shape[0] for n in nodes), *nodes[0].shape[1:])
            out[fused] = LazyTensor(shape, nodes[0].dtype, lambda *ts: torch.cat(ts, 0), tuple(nodes), f"join {fused}",
                                    kind="move")
        return out

    def output_slices(self) -> list[NewSlice]:
        """New slices named and indexed as in `output` (a part's rows sit at its offset in the fused tensor)."""
        arch = self.spec.arch
        if not arch.fused:
            return self.new_slices
        out = []
        for s in self.new_slices:
            info = self.info(s.tensor)
            fused = arch.fused_name(info.role, info.kind, info.layer)
            if fused is None:
                out.append(s)
                continue
            offset = 0
            for role in arch.fused[_prefix(arch, fused)][: arch.fused[_prefix(arch, fused)].index(info.role)]:
                offset += self.tensors[arch.parameter_name(role, info.kind, info.layer)].shape[0]
            index = [i + offset for i in s.index] if s.axis == 0 else list(s.index)
            out.append(NewSlice(fused, s.axis, index, s.op))
        return out

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
        s = self.spec
        sizes = {
            Axis.VOCAB: s.vocab_size,
            Axis.RESID: s.hidden_size,
            Axis.Q: s.num_heads * s.head_dim,
            Axis.KV: s.num_kv_heads * s.head_dim,
            Axis.INTER: s.intermediate_size,
            Axis.HEAD_DIM: s.head_dim,
            Axis.ONE: 1,
            Axis.HEADS: s.num_heads,
            Axis.REL_BUCKETS: s.config.get("relative_attention_num_buckets", 32),
        }
        for axis, field in s.arch.axis_fields.items():
            sizes[axis] = s.config[s.key(field)]
        return tuple(sizes[a] for a in info.axes)

    def check_shapes(self, where: str = "source") -> None:
        """Config and tensors must agree, or every later op would compute garbage."""
        s = self.spec
        for name, t in self.tensors.items():
            info = self.info(name)
            if info.layer is not None and info.layer >= s.num_layers:
                raise SurgeryError(f"tensor {name!r} is beyond num_hidden_layers={s.num_layers}", where=where)
            if info.expert is not None and info.expert >= s.num_experts:
                raise SurgeryError(f"tensor {name!r} is beyond the config's {s.num_experts} experts", where=where)
            want = self.expected_shape(info)
            if tuple(t.shape) != want:
                raise SurgeryError(f"tensor {name!r} has shape {list(t.shape)} but config.json implies {list(want)}", where=where)
        emb = s.arch.parameter_name(TensorRole.EMBED, "weight")
        if emb not in self.tensors:
            raise SurgeryError(f"missing tensor {emb!r}", where=where)
        head = s.arch.parameter_name(TensorRole.LM_HEAD, "weight")
        if not s.tied and head not in self.tensors:
            raise SurgeryError(f"missing tensor {head!r} (and tie_word_embeddings is false)", where=where)
        # Every family here has a gated MLP and the norms its table names; a parallel-residual StableLM has no
        # post_attention_layernorm, per-head q/k norms follow a config flag. Biases depend on config flags: only
        # their consistency is checked.
        per_layer = list(s.arch.required_per_layer) if s.arch.required_per_layer is not None else [
                     role for role in s.arch.names if "{L}" in s.arch.prefixes(role)[0] and "{H}" not in s.arch.prefixes(role)[0]
                     and not (role == TensorRole.NORM_MLP and s.config.get("use_parallel_residual"))
                     and not (role in (TensorRole.ATTN_Q_NORM, TensorRole.ATTN_K_NORM) and not s.qk_norm)]
        final = s.arch.parameter_name(TensorRole.NORM_FINAL, "weight")
        if final not in self.tensors:
            raise SurgeryError(f"missing tensor {final!r}", where=where)
        for layer in range(s.num_layers):
            for role in per_layer:
                # a role with several prefixes (T5's stacks, its wi or wi_1) needs one of them; experts all
                for e in (range(s.num_experts) if "{E}" in s.arch.prefixes(role)[0] else [None]):
                    options = [f"{p.replace('{L}', str(layer)).replace('{E}', str(e))}.weight" for p in s.arch.prefixes(role)]
                    if not any(n in self.tensors for n in options):
                        raise SurgeryError(f"missing tensor {options[0]!r}", where=where)
        # What one layer has (a bias, a per-head norm), every layer has.
        layers_with: dict[tuple, set[int]] = {}
        for name in self.tensors:
            info = self.info(name)
            if info.layer is not None:
                layers_with.setdefault((info.role, info.kind, info.head, info.expert), set()).add(info.layer)
        for (role, kind, head, expert), have in layers_with.items():
            if role == TensorRole.ATTN_REL_BIAS:
                continue  # T5: the first block holds it for the whole stack
            lacking = sorted(set(range(s.num_layers)) - have)
            if lacking:
                n = s.arch.parameter_name(role, kind, lacking[0], head, expert)
                raise SurgeryError(f"missing tensor {n!r} (layer {min(have)} has one)", where=where)

    def rename(self, mapping: dict[str, str]) -> None:
        """Rename tensors (new layer or head indices), keeping recorded new slices attached."""
        self.tensors = {mapping.get(n, n): t for n, t in self.tensors.items()}
        for s in self.new_slices:
            s.tensor = mapping.get(s.tensor, s.tensor)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def active_parameters(self) -> int:
        """Parameters one token uses: of the routed experts, only top-k of E per layer."""
        s = self.spec
        routed = sum(t.numel for name, info, t in self.items() if info.expert is not None)
        return self.num_parameters - routed + routed * s.experts_per_token // s.num_experts


def _prefix(arch, fused_name: str) -> str:
    layer, kind, roles = arch.fused_parts(fused_name)
    return next(p for p, r in arch.fused.items() if r == roles)


def _split(spec: ModelSpec, name: str, meta, layer: int | None, kind: str, roles: tuple, where: str) -> dict[str, LazyTensor]:
    """A fused tensor as one lazy part per role, each a row range of one shared read."""
    whole = read(name, meta.shape, meta.dtype)
    probe = ModelState(spec, {})
    sizes = [probe.expected_shape(TensorInfo(r, kind, layer, None, spec.arch.axes.get((r, kind))))[0] for r in roles]
    if sum(sizes) != meta.shape[0]:
        raise SurgeryError(f"tensor {name!r} has {meta.shape[0]} rows but config.json implies {' + '.join(map(str, sizes))}",
                           where=where)
    parts, offset = {}, 0
    for role, size in zip(roles, sizes):
        shape = (size, *meta.shape[1:])
        parts[spec.arch.parameter_name(role, kind, layer)] = whole.map(
            lambda t, o=offset, n=size: t.narrow(0, o, n).clone(), shape, f"{role.value} rows of {name}", kind="move")
        offset += size
    return parts


def keep_layers(state: ModelState, kept: list[int], label: str, chosen: bool = True) -> None:
    """The model with only the `kept` layers, in order: tensors renumbered, config lists with their layers."""
    renumber(state, kept, label, chosen)
    state.spec.set_num_layers(len(kept), origin=kept)


def renumber(state: ModelState, kept: list[int], label: str, chosen: bool = True) -> None:
    """Only the `kept` layers remain, renumbered in order (per-head and per-expert tensors with them); with
    `chosen` false the choice is made when the run starts, and no layer's tensor can be computed yet."""
    arch = state.spec.arch
    position = {j: p for p, j in enumerate(kept)}
    rename, removed = {}, []
    for name, info, node in list(state.items()):
        if info.layer is None:
            continue
        if info.layer in position:
            rename[name] = arch.parameter_name(info.role, info.kind, position[info.layer], info.head, info.expert)
        else:
            removed.append(name)
    for name in removed:
        del state.tensors[name]
    state.new_slices = [s for s in state.new_slices if s.tensor not in removed]
    state.rename(rename)
    if not chosen:
        for name in rename.values():
            state.tensors[name] = deferred(state.tensors[name], state.tensors[name].shape, label)
