"""grow_heads + rescale_norm (+ patch_layernorm) keep the logits of any StableLM, Llama, Mistral, Qwen2.

Random shapes, GQA layouts, tied and untied embeddings, random norm weights and biases, non-zero
embedding mean: the grown model is run by stock transformers (or the shipped patched code) and
compared with the source in float64.

Precision: LayerNorm models run fully in float64, so exact growth agrees to ~1e-12. transformers'
RMSNorm computes its statistics in float32 whatever the model dtype, so growing the residual of an
RMSNorm model (which changes those statistics by d/D and the weights by sqrt(d/D)) agrees to
float32 rounding, ~1e-6 relative; growth that leaves the residual alone stays at float64 precision.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factories import FAMILIES, logits, loss, make_config, make_model
from surgery import api

F64_EXACT = 1e-9
F32_INTERNAL = 2e-5  # relative, for RMSNorm statistics computed in float32

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def model_cases(draw, families=FAMILIES):
    family = draw(st.sampled_from(families))
    kv = draw(st.integers(1, 3))
    rep = draw(st.integers(1, 3))
    if family == "stablelm" and draw(st.booleans()):
        rep = 1  # StableLM checkpoints are usually MHA
    head_dim = draw(st.sampled_from([4, 8, 12]))  # StableLM rotates half of each head: keep it even
    cfg = dict(
        family=family, hidden_heads=kv * rep, kv_heads=kv, head_dim=head_dim, layers=draw(st.integers(1, 2)),
        intermediate=draw(st.sampled_from([12, 20])), vocab=48, tied=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        parallel_residual=family == "stablelm" and draw(st.booleans()),
    )
    extra_q = draw(st.integers(1, 3))  # new query heads per kv group
    return cfg, rep, extra_q


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _grow(model, ops):
    new, plan = api.transform(model, ops)
    return new, plan


@SETTINGS
@given(case=model_cases(), seed=st.integers(0, 10_000))
def test_grow_heads_with_rescale_keeps_logits_for_every_family(case, seed):
    cfg, rep, extra_q = case
    family = cfg.pop("family")
    model = make_model(make_config(family, **cfg), seed=seed)
    new_heads = cfg["kv_heads"] * (rep + extra_q)
    ops = [{"op": "grow_heads", "num_heads": new_heads}, {"op": "rescale_norm"}]
    if family == "stablelm":
        ops.append({"op": "patch_layernorm"})
    grown, plan = _grow(model, ops)
    ids = torch.randint(0, 48, (2, 17), generator=torch.Generator().manual_seed(seed))
    tol = F64_EXACT if family == "stablelm" else F32_INTERNAL
    assert _relative(logits(model, ids), logits(grown, ids)) < tol
    assert grown.config.num_attention_heads == new_heads
    assert grown.num_parameters() == plan.final.num_parameters


@SETTINGS
@given(case=model_cases(families=("stablelm",)), seed=st.integers(0, 10_000))
def test_stablelm_mean_fill_is_exact_in_stock_layernorm(case, seed):
    cfg, rep, extra_q = case
    cfg.pop("family")
    model = make_model(make_config("stablelm", **cfg), seed=seed)
    ops = [{"op": "grow_heads", "num_heads": cfg["kv_heads"] * (rep + extra_q), "residual_fill": "mean"}, {"op": "rescale_norm"}]
    grown, plan = _grow(model, ops)
    assert type(grown).__name__ == "StableLmForCausalLM"  # stock code, nothing shipped
    ids = torch.randint(0, 48, (1, 19), generator=torch.Generator().manual_seed(seed))
    assert _relative(logits(model, ids), logits(grown, ids)) < F64_EXACT
    assert plan.promise.exactness.value == "exact"


def test_new_query_heads_join_their_kv_group_instead_of_being_appended():
    model = make_model(make_config("llama", hidden_heads=4, kv_heads=2, head_dim=8))
    grown, _ = _grow(model, [{"op": "grow_heads", "num_heads": 8, "residual": "keep"}])
    q_old = model.model.layers[0].self_attn.q_proj.weight.view(4, 8, -1)
    q_new = grown.model.layers[0].self_attn.q_proj.weight.view(8, 8, -1)
    # group 0 holds old heads 0, 1 then two new heads; group 1 holds old heads 2, 3 then two new heads
    for old, new in [(0, 0), (1, 1), (2, 4), (3, 5)]:
        assert torch.equal(q_old[old], q_new[new])
    ids = torch.randint(0, 48, (1, 9))
    assert _relative(logits(model, ids), logits(grown, ids)) < F64_EXACT


def test_kv_heads_can_grow_as_whole_groups():
    model = make_model(make_config("mistral", hidden_heads=4, kv_heads=2, head_dim=8))
    grown, _ = _grow(model, [{"op": "grow_heads", "num_heads": 8, "num_kv_heads": 4}, {"op": "rescale_norm"}])
    assert (grown.config.num_attention_heads, grown.config.num_key_value_heads) == (8, 4)
    ids = torch.randint(0, 48, (1, 9))
    assert _relative(logits(model, ids), logits(grown, ids)) < F32_INTERNAL


def test_grow_heads_alone_on_layernorm_is_approximate_and_says_why():
    model = make_model(make_config("stablelm", hidden_heads=4, kv_heads=4, head_dim=8))
    grown, plan = _grow(model, [{"op": "grow_heads", "num_heads": 5}, {"op": "rescale_norm"}])
    assert plan.promise.exactness.value == "approximate"
    assert "patch_layernorm" in plan.promise.reason
    ids = torch.randint(0, 48, (1, 9))
    assert _relative(logits(model, ids), logits(grown, ids)) > 1e-6  # measurably not exact


def test_qk_layernorm_models_grow_exactly_with_per_head_norms_moved_and_q_k_scaled_for_the_shared_eps():
    model = make_model(make_config("stablelm", hidden_heads=4, kv_heads=4, head_dim=8, qk_layernorm=True))
    grown, plan = _grow(model, [{"op": "grow_heads", "num_heads": 6}, {"op": "rescale_norm"}, {"op": "patch_layernorm"}])
    assert plan.promise.exactness.value == "exact with shipped code"
    assert any("shared with the q/k norms" in n for s in plan.steps for n in s.promise.notes)
    ids = torch.randint(0, 48, (1, 9))
    # eps shrinks by d/D; q and k scaled by sqrt(d/D) make the per-head norms see the eps they had
    assert _relative(logits(model, ids), logits(grown, ids)) < F64_EXACT


def test_trainable_init_gives_new_heads_nonzero_readers_and_zero_writers():
    model = make_model(make_config("llama", hidden_heads=2, kv_heads=2, head_dim=8))
    grown, plan = _grow(model, [{"op": "grow_heads", "num_heads": 3}, {"op": "rescale_norm"}])
    attn = grown.model.layers[0].self_attn
    assert attn.q_proj.weight[16:].abs().sum() > 0
    assert attn.o_proj.weight[:, 16:].abs().sum() == 0
    assert any(s.op == "grow_heads" for s in plan.final.new_slices)
