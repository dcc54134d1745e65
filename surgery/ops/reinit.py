"""reinit: draw selected tensors afresh from a named initialisation scheme (see surgery.init_schemes).

Targets are role names (embed, lm_head, attn.q/k/v/o, mlp.gate/up/down, norm, ...) or fnmatch globs
over transformers parameter names; `layers` narrows them to some decoder layers (tensors outside
every layer, such as the embedding, then drop out). Each selected tensor becomes a constant lazy
node drawn on CPU from a generator seeded by (recipe seed, op index, tensor name): the same recipe
gives the same bits on any device and in any visiting order, and a tensor's draw does not depend on
which other tensors are selected. Unselected tensors keep their lazy node, so they are copied
bit for bit.

Tied embeddings: the checkpoint holds one tensor, `model.embed_tokens.weight`. Selecting `embed`,
`lm_head` or both re-draws that one tensor, so the other side changes with it (a note says so). It
is drawn by the lm_head's rule when lm_head is selected (OLMo-core and GPT-2 initialise the head
last), except under `hf`, which keeps the embedding's rule as transformers does (padding row zero).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Literal, Optional

from pydantic import Field

from ..arch import TensorInfo, TensorRole as R
from ..errors import SurgeryError
from ..init_schemes import DESCRIPTIONS, Draw, InitMethod, draw_for, tied_rule_role
from ..lazy import constant, generator
from ..state import ModelState
from .base import Exactness, Op, OpContext, Promise

# Role names a target may use, besides globs: every TensorRole value plus three groups.
GROUPS: dict[str, tuple[R, ...]] = {
    "norm": (R.NORM_ATTN, R.NORM_MLP, R.NORM_ATTN_OUT, R.NORM_MLP_OUT, R.NORM_FINAL, R.ATTN_Q_NORM, R.ATTN_K_NORM),
    "attn": (R.ATTN_Q, R.ATTN_K, R.ATTN_V, R.ATTN_O),
    "mlp": (R.MLP_GATE, R.MLP_UP, R.MLP_DOWN, R.SHARED_GATE, R.SHARED_UP, R.SHARED_DOWN),
    "moe": (R.MOE_ROUTER, R.SHARED_ROUTER),
}
ROLE_NAMES: dict[str, tuple[R, ...]] = {**{r.value: (r,) for r in R}, **GROUPS}
_LAYERS = re.compile(r"^\d+(-\d+)?$")


def parse_layers(text: str, num_layers: int, field: str = "layers") -> list[int]:
    """ "0-3", "5", "0-3,7" -> sorted layer indices, each checked against num_layers."""
    out: set[int] = set()
    parts = [p.strip() for p in str(text).split(",")]
    for p in parts:
        if not _LAYERS.match(p):
            raise SurgeryError(f"{text!r} is not a layer range: use '5', '0-3' or '0-3,7'", loc=(field,))
        lo, _, hi = p.partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a > b:
            raise SurgeryError(f"range {p!r} runs backwards; write {b}-{a}", loc=(field,))
        if b >= num_layers:
            raise SurgeryError(f"layer {b} does not exist: the model has layers 0-{num_layers - 1}", loc=(field,))
        out.update(range(a, b + 1))
    return sorted(out)


def select(state: ModelState, targets: list[str], layers: list[int] | None,
           field: str = "targets") -> tuple[dict[str, TensorInfo], bool]:
    """Names of the state's tensors that `targets` select (restricted to `layers`), and whether the
    lm_head was selected on a tied model (it then stands for the shared embedding tensor).

    Every target must select something, or it is reported: a typo should not pass silently.
    """
    spec, arch = state.spec, state.spec.arch
    head = arch.parameter_name(R.LM_HEAD, "weight")
    emb = arch.parameter_name(R.EMBED, "weight")
    # On a tied model the head is a name transformers knows but the checkpoint does not hold.
    names: dict[str, TensorInfo] = {n: state.info(n) for n in state.tensors}
    if spec.tied and head not in names:
        names[head] = TensorInfo(R.LM_HEAD, "weight")
    chosen: dict[str, TensorInfo] = {}
    for i, t in enumerate(targets):
        roles = ROLE_NAMES.get(t)
        hits = [n for n, info in names.items()
                if (info.role in roles if roles else fnmatch.fnmatchcase(n, t))
                and (layers is None or (info.layer is not None and info.layer in layers))]
        if not hits:
            what = "role" if roles else "glob"
            where = f" in layers {','.join(map(str, layers))}" if layers is not None else ""
            hint = "" if roles else f"; roles: {', '.join(ROLE_NAMES)}; names look like {emb!r}"
            raise SurgeryError(f"{what} {t!r} selects no tensor{where}{hint}", loc=(field, i))
        for n in hits:
            chosen[n] = names[n]
    head_on_tied = spec.tied and head in chosen and head not in state.tensors
    if head_on_tied:
        del chosen[head]
    return chosen, head_on_tied


class Reinit(Op):
    op: Literal["reinit"]
    method: InitMethod = Field(description="initialisation scheme: hf, normal, trunc_normal, olmo_*, scaled, "
                                           "lm_head_inv_sqrt_d, zeros, ones (see surgery/init_schemes.py)")
    targets: list[str] = Field(["*"], min_length=1, description="roles (embed, lm_head, attn.q/k/v/o, "
                               "mlp.gate/up/down, attn, mlp, norm, moe.router, moe, ...) or fnmatch globs over parameter names")
    layers: Optional[str] = Field(None, description="only these decoder layers, e.g. '5', '0-3' or '0-3,7'")
    std: Optional[float] = Field(None, gt=0, description="replaces the scheme's base std (initializer_range, "
                                 "or OLMo's 0.02)")

    reads = ("hidden_size", "num_hidden_layers", "intermediate_size", "initializer_range", "tie_word_embeddings")
    writes = ("embed", "lm_head", "attn", "mlp", "norms")
    summary = "re-initialise selected tensors from a named scheme (hf, olmo_*, scaled, ...)"

    def apply(self, state: ModelState, ctx: OpContext) -> Promise:
        spec, arch = state.spec, state.spec.arch
        layers = parse_layers(self.layers, spec.num_layers) if self.layers is not None else None
        chosen, head_on_tied = select(state, self.targets, layers)
        emb = arch.parameter_name(R.EMBED, "weight")
        notes: list[str] = []
        if spec.tied:
            emb_selected = emb in chosen
            if head_on_tied or emb_selected:
                rule = tied_rule_role(self.method, head_on_tied)
                chosen[emb] = TensorInfo(rule, "weight")
                if head_on_tied and not emb_selected:
                    notes.append(f"tied embeddings: lm_head is {emb}, so the input embedding is re-drawn too")
                elif emb_selected and not head_on_tied:
                    notes.append(f"tied embeddings: re-drawing {emb} re-draws the lm_head too")
                notes.append(f"tied embeddings: {emb} drawn by the {rule.value} rule")
        groups: dict[tuple, list[Draw]] = {}
        label = f"reinit {self.method.value}"
        for name in sorted(chosen, key=_natural):
            info = chosen[name]
            node = state.tensors[name]
            draw = draw_for(self.method, spec, info, node.shape, self.std)
            state.tensors[name] = constant(node.shape, node.dtype, _sampler(draw, ctx.seed_parts(name)),
                                           f"{label}: {draw.describe()}")
            key = info.role.value + (".bias" if info.kind == "bias" else "")
            groups.setdefault((list(R).index(info.role), key, draw.dist, draw.rule, draw.value), []).append(draw)
        for (_, key, dist, rule, value), draws in sorted(groups.items()):
            count = f"{len(draws)} tensor{'s' if len(draws) > 1 else ''}"
            if dist == "constant":
                notes.append(f"{key}: {value:g} ({count})")
                continue
            stds = sorted({d.std for d in draws})
            val = f"{stds[0]:.4g}" if len(stds) == 1 else f"{stds[0]:.4g}..{stds[-1]:.4g}"
            cut = f" cut at +-{draws[0].bound / draws[0].std:g} std" if draws[0].bound is not None else ""
            formula = rule if rule == val else f"{rule} = {val}"
            rows = f", row {','.join(map(str, draws[0].zero_rows))} zero (pad_token_id)" if draws[0].zero_rows else ""
            notes.append(f"{key}: {dist}{cut}, std {formula}{rows} ({count})")
        scope = f"layers {self.layers}" if self.layers is not None else "whole model" if self.targets == ["*"] else "selected"
        base = f", its base std (0.02, initializer_range) replaced by std {self.std:g}" if self.std is not None else ""
        reason = (f"{len(chosen)} tensor(s) re-drawn by {self.method.value} ({DESCRIPTIONS[self.method]}{base}), "
                  f"{scope}; the function is replaced on purpose")
        return Promise(Exactness.REINIT, reason, notes)


def _sampler(draw: Draw, seed: tuple):
    def fill(shape: tuple[int, ...]):
        return draw.sample(shape, generator(*seed))

    return fill


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
