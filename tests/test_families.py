"""Qwen3, OLMo 2, Phi-3, Gemma 2 and Gemma 3: every growth the math allows keeps the logits in stock transformers.

Each property builds a float64 model from a config with a real release's fields (tests/factories.py
RELEASES: 4.x-style config.json, head_dim independent of hidden / heads where the family has the
field), with random norm weights, random biases and an off-centre embedding, grows it through
`api.transform` (which loads the result into the stock class and refuses missing or unexpected
keys) and compares logits and loss with the source on random ids.

Precision: every one of these families computes its RMSNorm statistics in float32 and its RoPE
frequencies in float32, whatever the model dtype, so exact growth agrees to float32 rounding:
asserted at 1e-5 relative on the logits and the loss, and 1e-3 on the largest logit difference.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factories import logits, loss, make_model, release_config
from surgery import api
from surgery.errors import SurgeryError
from surgery.ops import Exactness

NEW_FAMILIES = ("qwen3", "olmo2", "phi3")
HEAD_DIM_FIELD = {"qwen3": True, "olmo2": False, "phi3": False}  # whether head_dim is a config field (else hidden / heads)
VOCAB = 40
REL = 1e-5
MAX_LOGIT = 1e-3
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def family_models(draw, families=NEW_FAMILIES):
    family = draw(st.sampled_from(families))
    kv = draw(st.integers(1, 2))
    rep = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8]))
    extra = {}
    if HEAD_DIM_FIELD[family]:
        extra["hidden"] = draw(st.sampled_from([12, 20]))  # unrelated to heads x head_dim, as in Qwen3-0.6B
    # eps as large as 0.1: growth must keep what every norm's eps does, not just be small next to it
    extra["rms_norm_eps"] = draw(st.sampled_from([1e-6, 0.1]))
    cfg = release_config(family, heads=kv * rep, kv_heads=kv, head_dim=head_dim, layers=draw(st.integers(1, 2)),
                         intermediate=draw(st.sampled_from([12, 20])), vocab=VOCAB, tied=draw(st.booleans()), **extra)
    return family, make_model(cfg, seed=draw(st.integers(0, 1000)))


def ids(seed: int = 0, length: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def assert_same_function(model, grown, seed: int = 0):
    x = ids(seed)
    a, b = logits(model, x), logits(grown, x)
    assert float((a - b).abs().max()) <= MAX_LOGIT
    assert float((a - b).abs().max() / a.abs().max()) < REL
    la, lb = loss(model, x), loss(grown, x)
    assert abs(la - lb) / la < REL


def grow(model, ops):
    grown, plan = api.transform(model, ops)  # loads into the stock class; missing or unexpected keys raise
    assert type(grown) is type(model)
    assert grown.num_parameters() == plan.final.num_parameters
    return grown, plan


@PROPERTY
@given(case=family_models(), extra_q=st.integers(1, 2), more_kv=st.booleans(), keep=st.booleans())
def test_grow_heads_with_rescale_norm_keeps_logits(case, extra_q, more_kv, keep):
    family, model = case
    h, k = model.config.num_attention_heads, model.config.num_key_value_heads
    keep = keep and HEAD_DIM_FIELD[family]
    op = {"op": "grow_heads", "num_heads": h + k * extra_q}
    if more_kv:  # whole new groups
        op = {"op": "grow_heads", "num_heads": 2 * h, "num_kv_heads": 2 * k}
    ops = [op | {"residual": "keep"}] if keep else [op, {"op": "rescale_norm"}]
    grown, plan = grow(model, ops)
    assert plan.promise.exactness == Exactness.EXACT, plan.promise.reason
    assert_same_function(model, grown)


@PROPERTY
@given(case=family_models(), factor=st.sampled_from(["x1.5", "x2", "+2"]), init=st.sampled_from(["trainable", "zeros"]))
def test_grow_head_dim_keeps_logits(case, factor, init):
    family, model = case
    ops = [{"op": "grow_head_dim", "head_dim": factor, "init": init}]
    if not HEAD_DIM_FIELD[family]:
        ops.append({"op": "rescale_norm"})
    grown, plan = grow(model, ops)
    assert plan.promise.exactness == Exactness.EXACT, plan.promise.reason
    assert_same_function(model, grown)


@PROPERTY
@given(case=family_models(), extra=st.integers(1, 9), layers=st.integers(1, 3), source=st.sampled_from(["copy", "fresh"]))
def test_grow_mlp_and_grow_layers_keep_logits(case, extra, layers, source):
    family, model = case
    n = model.config.num_hidden_layers
    ops = [{"op": "grow_mlp", "intermediate_size": f"+{extra}"}, {"op": "grow_layers", "num_layers": n + layers, "from": source}]
    grown, plan = grow(model, ops)
    assert plan.promise.exactness == Exactness.EXACT
    assert_same_function(model, grown)
    types = getattr(grown.config, "layer_types", None)
    if types is not None:
        assert len(types) == n + layers


@PROPERTY
@given(case=family_models(), factor=st.sampled_from([2, 3]), noise=st.sampled_from([0.0, 0.1]))
def test_clone_width_keeps_logits(case, factor, noise):
    family, model = case
    grown, plan = grow(model, [{"op": "clone_width", "factor": factor, "noise": noise}])
    assert plan.promise.exactness == Exactness.EXACT
    assert_same_function(model, grown)
