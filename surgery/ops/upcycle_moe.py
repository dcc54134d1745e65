"""upcycle_moe: a dense model becomes a mixture of experts (sparse upcycling, Komatsuzaki et al. 2023).

Every routed expert starts as the layer's dense MLP and a router is added per layer. What keeps the
function depends on how the output family weighs the chosen experts:

- Mixtral (from Llama or Mistral) renormalises the top-k softmax weights to sum 1: with identical
  experts the layer computes MLP(x) whatever the router says.
- Qwen2-MoE (from Qwen2) and Qwen3-MoE (from Qwen3) renormalise only with `norm_topk_prob: true`,
  which this op writes by default. With `norm_topk_prob: false` the k chosen weights sum to k/E
  under a zero router (uniform softmax), so the routed experts' down_proj is scaled by E/k; any other
  router makes that sum depend on x and the run approximate.
- Qwen2-MoE's shared expert is added as sigmoid(shared_expert_gate(x)) * shared(x); its gate starts at
  zero (sigmoid = 1/2). A share a of the dense MLP goes through it (down_proj x 2a) and 1 - a through
  the routed experts (down_proj x (1 - a)); the default a = 1/2 makes both factors powers of two, so
  bf16 storage rounds nothing.

Routers: `zeros` (with renormalised weights a fixed point: with identical experts the router's gradient is
zero and every token picks the same k experts, so training never separates them; with `norm_topk_prob:
false` every row gets gradient through the softmax normaliser), `random` (N(0, router_std)),
or `hidden`: the MLP inputs of the model before this op on the calibration data (`verify.data`)
clustered into E groups (spherical k-means on the centred states); row e is group e's centred
centroid, unit length, over the states' RMS, in the spirit of mergekit-moe's hidden gate mode.

Symmetry breaking, chosen knowingly (both make the run approximate): `expert_noise` adds
N(0, expert_noise * std) to each expert tensor (std of that tensor), and `reinit_ratio` re-draws that
share of each expert's neurons (gate/up rows and down columns) from N(mean, std) of the dense tensor,
a different random subset per expert (Drop-Upcycling, Nakamura et al. 2025).

Every expert tensor is a lazy node over the dense tensor (the same node when it is an exact copy),
so experts are written one tensor at a time and no expert is held twice.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field

from ..arch import ARCHITECTURES, MLP_ROLES, Architecture, Axis, TensorInfo, TensorRole as R
from ..errors import SurgeryError
from ..lazy import LazyTensor, constant, full, generator
from ..state import ModelState, NewSlice
from ..spec import config_key
from . import moments
from .base import Exactness, Op, OpContext, Promise

if TYPE_CHECKING:  # torch loads where data is touched: plans and `surgery validate` start without it
    import torch

# Output family -> source families it upcycles, with the config fields it writes.
INTO: dict[str, tuple[str, ...]] = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("qwen2",), "qwen3_moe": ("qwen3",)}
DEFAULT_INTO = {src: dst for dst, srcs in INTO.items() for src in srcs}
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# Source config fields the output family has no place for (a true bias flag is refused, see `_refuse`).
DROPPED = {
    "mixtral": ("attention_bias", "mlp_bias", "pretraining_tp", "auto_map", "architectures"),
    "qwen2_moe": ("auto_map", "architectures"),
    "qwen3_moe": ("layer_types", "max_window_layers", "auto_map", "architectures"),
}


class UpcycleMoe(Op):
    op: Literal["upcycle_moe"]
    num_experts: int = Field(8, ge=2, le=4096, description="routed experts per layer, each a copy of the dense MLP")
    top_k: int = Field(2, ge=1, description="experts each token is routed to (num_experts_per_tok)")
    into: Optional[Literal["mixtral", "qwen2_moe", "qwen3_moe"]] = Field(
        None, description="output family: mixtral (from llama, mistral), qwen2_moe (from qwen2), qwen3_moe (from qwen3)")
    router: Literal["zeros", "random", "hidden"] = Field(
        "random", description="zeros (a fixed point: experts never separate), random N(0, router_std), or hidden "
                              "(clusters of the calibration data's MLP inputs)")
    router_std: float = Field(0.02, gt=0, allow_inf_nan=False, description="std of the random router")
    norm_topk_prob: Optional[bool] = Field(
        None, description="Qwen MoE families: renormalise the top-k weights (default true, exact for any router); "
                          "false is exact only with router: zeros")
    shared_expert_share: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False,
        description="Qwen2-MoE: share of the dense MLP carried by the shared expert (the rest by the routed experts)")
    expert_noise: float = Field(0.0, ge=0, allow_inf_nan=False,
                                description="noise on every expert tensor, std relative to the tensor's std (approximate)")
    reinit_ratio: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                description="Drop-Upcycling: share of each expert's neurons re-drawn (approximate)")

    reads = ("model_type", "intermediate_size", "hidden_size", "mlp", "residual")
    writes = ("model_type", "num_experts", "mlp", "router")
    summary = "dense MLP -> mixture of experts: every expert a copy of the MLP, plus a router (sparse upcycling)"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec = state.spec
        src = spec.arch
        into = self.into or DEFAULT_INTO.get(src.name)
        if into is None or src.name not in INTO[into]:
            allowed = "; ".join(f"{dst} from {', '.join(s)}" for dst, s in INTO.items())
            what = f"into {into!r}" if into else "upcycle_moe"
            raise SurgeryError(f"{what} cannot start from a {src.name} model; allowed: {allowed}",
                               loc=("into",) if into else ("op",))
        if into not in ARCHITECTURES:
            raise SurgeryError(f"{into} is not a supported family in this version", loc=("into",))
        dst = ARCHITECTURES[into]
        E, k = self.num_experts, self.top_k
        if k > E:
            raise SurgeryError(f"top_k {k} exceeds num_experts {E}", loc=("top_k",))
        qwen = into != "mixtral"
        if not qwen and self.norm_topk_prob is not None:
            raise SurgeryError("Mixtral always renormalises the top-k weights; norm_topk_prob is for qwen2_moe/qwen3_moe",
                               loc=("norm_topk_prob",))
        shared = R.SHARED_DOWN in dst.names
        if not shared and "shared_expert_share" in self.model_fields_set:
            raise SurgeryError(f"{into} has no shared expert", loc=("shared_expert_share",))
        self._refuse(spec.config, dst)
        normalise = True if not qwen else (self.norm_topk_prob if self.norm_topk_prob is not None else True)
        share = self.shared_expert_share if shared else 0.0
        routed_scale = (1 - share) * (1.0 if normalise else E / k)

        pre = state.copy()  # what the hidden router is computed from
        I, d = spec.intermediate_size, spec.hidden_size
        label = f"upcycle_moe: {E} experts"
        old_slices = list(state.new_slices)
        state.new_slices = [s for s in old_slices if src.classify(s.tensor).role not in MLP_ROLES]
        tensors: dict[str, LazyTensor] = {}
        for name, info, node in state.items():
            if info.role not in MLP_ROLES:
                tensors[dst.parameter_name(info.role, info.kind, info.layer, info.head)] = node
                continue
            carried = [s for s in old_slices if s.tensor == name]
            for e in range(E):
                out = dst.parameter_name(info.role, info.kind, info.layer, expert=e)
                scale = routed_scale if info.role == R.MLP_DOWN else 1.0
                tensors[out] = self._expert(node, info, out, e, scale, I, ctx, label)
                state.new_slices += [NewSlice(out, s.axis, list(s.index), s.op) for s in carried]
            if shared:
                role = {R.MLP_GATE: R.SHARED_GATE, R.MLP_UP: R.SHARED_UP, R.MLP_DOWN: R.SHARED_DOWN}[info.role]
                out = dst.parameter_name(role, info.kind, info.layer)
                if info.role == R.MLP_DOWN:
                    node = node.map(lambda t: t * (2 * share), label=f"{label}: shared expert down_proj x{2 * share:g}")
                tensors[out] = node
                state.new_slices += [NewSlice(out, s.axis, list(s.index), s.op) for s in carried]
        dtype = state.tensors[src.parameter_name(R.EMBED, "weight")].dtype
        for layer in range(spec.num_layers):
            name = dst.parameter_name(R.MOE_ROUTER, "weight", layer)
            tensors[name] = self._router(name, layer, (E, d), dtype, pre, ctx, label)
            if self.router != "zeros":
                state.new_slices.append(NewSlice(name, 0, list(range(E)), "upcycle_moe"))
            if shared:
                tensors[dst.parameter_name(R.SHARED_ROUTER, "weight", layer)] = full(
                    (1, d), dtype, 0.0, f"{label}: shared expert gate 0 (sigmoid 1/2)")
        state.tensors = tensors
        spec.arch = dst
        spec.config = self._config(spec.config, into, I, share, normalise)
        spec.sync_max_window_layers()  # Qwen2 -> Qwen2-MoE: the same layer types, stated by the other rule
        return self._promise(into, E, k, normalise, share, routed_scale, state)

    # ------------------------------------------------------------------------------- pieces
    def _refuse(self, config: dict, dst: Architecture) -> None:
        loc = ("into",) if self.into else ("op",)
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag) and flag in DROPPED[dst.name]:
                raise SurgeryError(f"the source has {flag}: true, and {dst.name} has no such biases", loc=loc)
        if dst.name == "qwen3_moe" and config.get("use_sliding_window") and any(
                t != "full_attention" for t in config.get("layer_types") or ["sliding_attention"]):
            raise SurgeryError("the source has sliding-window layers, and qwen3_moe has no per-layer attention types",
                               loc=loc)

    def _config(self, config: dict, into: str, inter: int, share: float, normalise: bool) -> dict:
        out = {k: v for k, v in config.items() if k not in DROPPED[into]}
        out["model_type"] = into
        out["architectures"] = [CLASSES[into]]
        dst = ARCHITECTURES[into]
        out[config_key(dst, dst.axis_fields[Axis.EXPERT])] = self.num_experts
        out[config_key(dst, dst.experts_per_token_field)] = self.top_k
        out["output_router_logits"] = False
        if into == "mixtral":
            out["router_aux_loss_coef"] = 0.02  # Mixtral-8x7B's release
            out["router_jitter_noise"] = 0.0
        else:
            out["moe_intermediate_size"] = inter
            out["norm_topk_prob"] = normalise
            out["decoder_sparse_step"] = 1
            out["mlp_only_layers"] = []
            out["router_aux_loss_coef"] = 0.001
        if into == "qwen2_moe":
            out["shared_expert_intermediate_size"] = inter
            out["qkv_bias"] = True  # Qwen2's q/k/v always have biases
        return out

    def _expert(self, node: LazyTensor, info: TensorInfo, out: str, e: int, scale: float, inter: int, ctx: OpContext,
                label: str) -> LazyTensor:
        import torch
        noise, ratio = self.expert_noise, self.reinit_ratio
        if scale == 1.0 and not noise and not ratio:
            return node  # an exact copy: the same lazy node, read again for each expert as it is written
        axis = 1 if info.role == R.MLP_DOWN else 0  # the neuron axis
        drop_seed = ctx.seed_parts("drop", info.layer, e)  # one neuron subset per expert, shared by its three tensors
        noise_seed = ctx.seed_parts(out, "noise")
        n_drop = round(ratio * inter)

        def make(t: torch.Tensor) -> torch.Tensor:
            std, mean = moments.std_mean(t) if t.numel() > 1 else (0.0, moments.mean(t))
            y = t * scale  # a new tensor, in the compute dtype: copied neurons keep every bit
            if n_drop:
                idx = torch.randperm(inter, generator=generator(*drop_seed))[:n_drop].to(t.device)
                shape = list(t.shape)
                shape[axis] = n_drop
                fresh = torch.randn(shape, generator=generator(*drop_seed, info.role.value), dtype=torch.float32)
                y.index_copy_(axis, idx, ((fresh * std + mean) * scale).to(device=t.device, dtype=t.dtype))
            if noise and std > 0:
                z = torch.randn(t.shape, generator=generator(*noise_seed), dtype=torch.float32)
                y.add_((z * (noise * std * scale)).to(device=t.device, dtype=t.dtype))
            return y

        what = [f"x{scale:g}"] if scale != 1.0 else []
        what += [f"noise {noise:g} std"] if noise else []
        what += [f"{n_drop} of {inter} neurons re-drawn"] if n_drop else []
        return node.map(make, label=f"{label}: expert {e} ({', '.join(what)})")

    def _router(self, name: str, layer: int, shape: tuple[int, int], dtype: torch.dtype, pre: ModelState, ctx: OpContext,
                label: str) -> LazyTensor:
        import torch
        if self.router == "zeros":
            return full(shape, dtype, 0.0, f"{label}: router zeros")
        if self.router == "random":
            seed, std = ctx.seed_parts(name, "router"), self.router_std
            return constant(shape, dtype, lambda s: torch.randn(s, generator=generator(*seed)) * std,
                            f"{label}: router N(0, {std:g})")
        if ctx.calibration is None:
            raise SurgeryError("router: hidden needs calibration data (verify.data) and a source tokenizer", loc=("router",))
        calib, E, seed = ctx.calibration, shape[0], ctx.seed_parts("hidden-router")
        return constant(shape, dtype, lambda s: calib.router_rows(pre, ctx.index, layer, E, seed),
                        f"{label}: router from calibration hidden states")

    def _promise(self, into: str, E: int, k: int, normalise: bool, share: float, routed_scale: float,
                 state: ModelState) -> Promise:
        notes = [f"parameters {state.num_parameters:,}, active per token {state.active_parameters:,} "
                 f"(top-{k} of {E} experts)"]
        if E & (E - 1):
            notes.append(f"{E} experts is not a power of two: llama.cpp warns on such counts")
        if self.router == "zeros" and normalise:
            notes.append("router zeros: every token picks the same top-k experts and, with identical experts, the router "
                         "gets no gradient: training never separates the experts (use random or hidden)")
        elif self.router == "zeros":
            notes.append("router zeros: every token picks the same top-k experts at first; the chosen weights are softmax "
                         "probabilities (norm_topk_prob: false), so every router row gets gradient through the normaliser "
                         "and the routing moves after the first step")
        if self.router == "hidden":
            notes.append("router hidden: the model before this op runs once on the calibration data, one layer at a time, "
                         "when the first router is written")
        if into != "mixtral":
            notes.append("in bfloat16/float16 the routing weights are cast to the model dtype: exact to that rounding only")
        if into == "mixtral":
            reason = "every expert is the dense MLP and Mixtral renormalises the top-k weights to 1: MLP(x) for any router"
        elif normalise:
            reason = "every expert is the dense MLP and norm_topk_prob: true renormalises the top-k weights to 1"
        else:
            reason = (f"norm_topk_prob: false with a zero router: softmax is uniform, the {k} chosen weigh {k}/{E}, and the "
                      f"routed down_proj is scaled by {E}/{k}")
        if share:
            reason += (f"; the shared expert carries {share:g} of the MLP (down_proj x{2 * share:g} under its sigmoid gate "
                       f"at 0 = 1/2), the routed experts {1 - share:g} (down_proj x{1 - share:g})")
        elif into == "qwen2_moe":
            reason += "; the shared expert's down_proj is zero (shared_expert_share: 0)"
        approximate = []
        if into != "mixtral" and not normalise and self.router != "zeros":
            approximate.append(f"norm_topk_prob: false with a {self.router} router: the chosen weights sum to less than "
                               "1 and depend on the token")
        if self.expert_noise:
            approximate.append(f"expert_noise {self.expert_noise:g} perturbs every expert")
        if self.reinit_ratio:
            approximate.append(f"reinit_ratio {self.reinit_ratio:g} re-draws part of every expert (Drop-Upcycling)")
        if approximate:
            return Promise(Exactness.APPROXIMATE, "; ".join(approximate), notes)
        if routed_scale and math.frexp(routed_scale)[0] != 0.5:  # not a power of two
            notes.append(f"routed down_proj x{routed_scale:g} rounds in bfloat16/float16 storage")
        return Promise(Exactness.EXACT, reason, notes)
