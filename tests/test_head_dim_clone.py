"""grow_head_dim and clone_width: exact in stock transformers, right about GQA and rotary, strict about values.

Every property test builds a float64 random model (tests/factories.py: random norms, biases and an
off-centre embedding, so no growth is right by accident), applies the ops through `api.transform`
and compares logits with the source on random ids.

Precision. StableLM's LayerNorm and rotary run in float64 and its rotary dims and frequencies are
kept exactly, so its growths match to float64 rounding (1e-12 relative). Two things in
transformers run in float32 whatever the model dtype: RMSNorm (Llama, Mistral, Qwen2) upcasts its
input, and RoPE computes its inverse frequencies in float32. grow_head_dim with full rotary by a
non-integer ratio changes rope_theta to theta ** (D_h/d_h), which gives the old frequencies back only
up to float32 rounding (tests/test_head_dim_rope.py), and clone_width makes RMSNorm average over k*d dims, which rounds differently from d dims (k = 2
happens to round identically); those agree to ~1e-7 relative, asserted at 1e-5.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import api
from surgery.errors import SurgeryError
from surgery.ops import Exactness
from surgery.recipe.loader import load_recipe
from surgery.verify.gradient_flow import dead_slices
from factories import FAMILIES, logits, make_config, make_model

VOCAB = 32
FLOAT64 = 1e-12  # float64 rounding
FLOAT32 = 1e-5  # RMSNorm's internal float32 or RoPE's float32 frequencies (see the module docstring)
GQA = [(4, 2), (4, 4), (4, 1), (2, 1)]  # (query heads, kv heads)
RECIPES = str(Path(api.__file__).parent / "recipes") + "/"
PROPERTY = settings(max_examples=15, deadline=None)


def build(family, *, heads=(4, 2), head_dim=4, layers=2, intermediate=12, tied=False, bias=True,
          qk_layernorm=False, parallel=False, seed=0):
    cfg = make_config(family, hidden_heads=heads[0], kv_heads=heads[1], head_dim=head_dim, layers=layers,
                      intermediate=intermediate, vocab=VOCAB, tied=tied, qkv_bias=bias,
                      qk_layernorm=qk_layernorm, parallel_residual=parallel)
    return make_model(cfg, seed=seed)


def ids(seed=0, length=10):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def rel_diff(a, b):
    return float((a - b).abs().max() / a.abs().max())


def tolerance(family):
    return FLOAT64 if family == "stablelm" else FLOAT32


def check_counts(new, plan):
    """What `surgery plan` prints is what the materialized model holds."""
    assert plan.final.num_parameters == new.num_parameters()


def head_dim_of(model):
    return getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads


# ------------------------------------------------------------------------------ grow_head_dim
@PROPERTY
@given(family=st.sampled_from(FAMILIES), heads=st.sampled_from(GQA), head_dim=st.sampled_from([4, 8]),
       growth=st.sampled_from(["+2", "+4", "x1.5", "x2", "abs"]), tied=st.booleans(), bias=st.booleans(),
       init=st.sampled_from(["trainable", "zeros"]), fill=st.sampled_from(["zero", "mean"]))
def test_grow_head_dim_keeps_logits_in_every_family_with_rotary_dims_and_frequencies_kept(
        family, heads, head_dim, growth, tied, bias, init, fill):
    model = build(family, heads=heads, head_dim=head_dim, tied=tied, bias=bias)
    size = head_dim + 6 if growth == "abs" else growth
    want = {"+2": head_dim + 2, "+4": head_dim + 4, "x1.5": head_dim * 3 // 2, "x2": 2 * head_dim, "abs": head_dim + 6}[growth]
    ops = [{"op": "grow_head_dim", "head_dim": size, "init": init}]
    stablelm = family == "stablelm"
    if stablelm:  # head_dim is hidden / heads: the residual grows, and its norms need their usual fixes
        ops[0]["residual_fill"] = fill
        ops += [{"op": "rescale_norm"}] + ([{"op": "patch_layernorm"}] if fill == "zero" else [])
    new, plan = api.transform(model, ops)
    cfg = new.config
    assert head_dim_of(new) == want
    assert cfg.num_attention_heads == heads[0] and cfg.num_key_value_heads == heads[1]
    if stablelm:
        assert cfg.hidden_size == heads[0] * want
        assert int(want * cfg.rope_parameters["partial_rotary_factor"]) == int(head_dim * 0.5)  # same rotary dims
        assert cfg.rope_parameters["rope_theta"] == 10000.0
        expected = Exactness.EXACT if fill == "mean" else Exactness.EXACT_SHIPPED_CODE
    else:
        assert cfg.hidden_size == model.config.hidden_size  # head_dim is a config field: the residual stays
        # an integer ratio keeps theta (old pair i at pair m i); otherwise theta ** (D/d) keeps pair i at i
        kept = want % head_dim == 0
        assert cfg.rope_parameters["rope_theta"] == pytest.approx(10000.0 if kept else 10000.0 ** (want / head_dim))
        expected = Exactness.EXACT
    assert plan.promise.exactness == expected
    check_counts(new, plan)
    x = ids()
    assert rel_diff(logits(model, x), logits(new, x)) <= tolerance(family)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_grow_head_dim_with_per_head_qk_layernorm_keeps_the_norms_eps_by_scaling_q_and_k_and_is_exact(heads, fill):
    model = build("stablelm", heads=heads, head_dim=8, qk_layernorm=True, parallel=True)
    ops = [{"op": "grow_head_dim", "head_dim": "x1.25", "residual_fill": fill}, {"op": "rescale_norm"}]
    ops += [{"op": "patch_layernorm"}] if fill == "zero" else []
    new, plan = api.transform(model, ops)
    assert "q/k" not in plan.promise.reason  # q, k scaled by sqrt(10/8), then by sqrt(32/40) when eps shrinks
    assert plan.promise.exactness == (Exactness.EXACT if fill == "mean" else Exactness.EXACT_SHIPPED_CODE)
    assert len(new.model.layers[0].self_attn.k_layernorm.norms) == heads[1]
    assert new.model.layers[0].self_attn.q_layernorm.norms[0].weight.shape == (10,)
    x = ids()
    assert rel_diff(logits(model, x), logits(new, x)) <= FLOAT64


@pytest.mark.parametrize("new_dim,kept", [(6, [0, 1, 3, 4]), (8, [0, 2, 4, 6]), (12, [0, 3, 6, 9])])
def test_full_rotary_puts_old_pair_i_at_pair_i_or_at_pair_m_i_for_an_integer_ratio_m_and_scales_q(new_dim, kept):
    """Head 4 -> 6: pairs (0, 2), (1, 3) go to (0, 3), (1, 4). Head 4 -> 8: pair i goes to pair 2i,
    (0, 4) and (2, 6); 4 -> 12: to pair 3i, (0, 6) and (3, 9)."""
    model = build("llama", heads=(2, 1), head_dim=4)
    new, _ = api.transform(model, [{"op": "grow_head_dim", "head_dim": new_dim, "init": "zeros"}])
    sd, old = new.state_dict(), model.state_dict()
    s = math.sqrt(new_dim / 4)
    fresh = [j for j in range(new_dim) if j not in kept]
    for role, heads, factor in (("q_proj", 2, s), ("k_proj", 1, 1.0), ("v_proj", 1, 1.0)):
        w = sd[f"model.layers.0.self_attn.{role}.weight"].view(heads, new_dim, -1)
        w0 = old[f"model.layers.0.self_attn.{role}.weight"].view(heads, 4, -1)
        torch.testing.assert_close(w[:, kept], w0 * factor, rtol=0, atol=1e-15)
        assert not w[:, fresh].any()
    o = sd["model.layers.0.self_attn.o_proj.weight"].view(-1, 2, new_dim)
    o0 = old["model.layers.0.self_attn.o_proj.weight"].view(-1, 2, 4)
    assert torch.equal(o[..., kept], o0) and not o[..., fresh].any()


@pytest.mark.parametrize("family", ["llama", "stablelm"])
def test_grow_head_dim_trainable_new_q_rows_and_o_proj_columns_get_gradient_from_the_first_step(family):
    model = build(family, heads=(4, 2), head_dim=4)
    ops = [{"op": "grow_head_dim", "head_dim": 8, "init": "trainable"}]
    ops += [{"op": "rescale_norm"}, {"op": "patch_layernorm"}] if family == "stablelm" else []
    new, plan = api.transform(model, ops)
    new_dims = [p * 8 + i for p in range(4) for i in ((1, 3, 5, 7) if family == "llama" else (4, 5, 6, 7))]
    kv_new = [p * 8 + i for p in range(2) for i in ((1, 3, 5, 7) if family == "llama" else (4, 5, 6, 7))]
    attn = new.model.layers[0].self_attn
    # before training: q's new rows are zero and k's random, so q.k is unchanged
    assert not attn.q_proj.weight[new_dims, : 4 * 4].any() and attn.k_proj.weight[kv_new].abs().min() > 0
    tracked = {s.tensor for s in plan.final.new_slices if s.op == "grow_head_dim"}
    assert "model.layers.0.self_attn.o_proj.weight" in tracked
    x = ids()
    assert dead_slices(new, x, plan.final.new_slices) == []
    new.zero_grad()
    with torch.enable_grad():
        new(input_ids=x, labels=x).loss.backward()
    per_row = attn.q_proj.weight.grad[new_dims].abs().amax(dim=1)
    assert (per_row > 0).all()  # the zero side trains at once: not a saddle


def test_grow_head_dim_zeros_init_adds_only_zeros_and_records_no_new_slices():
    model = build("mistral", heads=(4, 2), head_dim=4)
    new, plan = api.transform(model, [{"op": "grow_head_dim", "head_dim": "+4", "init": "zeros"}])
    assert plan.final.new_slices == []
    k = new.model.layers[1].self_attn.k_proj.weight.view(2, 8, -1)
    assert not k[:, [1, 3, 5, 7]].any()


def test_partial_rotary_factor_is_nudged_where_the_plain_ratio_would_lose_a_rotary_dim():
    # 0.5 * 12 / 47 and 6 / 47 both give int(47 * f) == 5; the next float up keeps the 6 rotary dims
    model = build("stablelm", heads=(2, 2), head_dim=12)
    new, _ = api.transform(model, [{"op": "grow_head_dim", "head_dim": 47, "residual_fill": "mean"}, {"op": "rescale_norm"}])
    f = new.config.rope_parameters["partial_rotary_factor"]
    assert int(47 * f) == 6 and new.model.layers[0].self_attn.rotary_ndims == 6
    x = ids()
    assert rel_diff(logits(model, x), logits(new, x)) <= FLOAT64


# -------------------------------------------------------------------------------- clone_width
@PROPERTY
@given(family=st.sampled_from(FAMILIES), heads=st.sampled_from(GQA), head_dim=st.sampled_from([4, 8]),
       factor=st.sampled_from([2, 3]), tied=st.booleans(), bias=st.booleans(), noise=st.sampled_from([0.0, 0.05]),
       qk_layernorm=st.booleans(), parallel=st.booleans())
def test_clone_width_keeps_logits_in_every_family_with_gqa_groups_matched(family, heads, head_dim, factor, tied, bias,
                                                                         noise, qk_layernorm, parallel):
    stablelm = family == "stablelm"
    model = build(family, heads=heads, head_dim=head_dim, tied=tied, bias=bias,
                  qk_layernorm=qk_layernorm and stablelm, parallel=parallel and stablelm)
    new, plan = api.transform(model, [{"op": "clone_width", "factor": factor, "noise": noise}])
    cfg, old = new.config, model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
        factor * old.hidden_size, factor * heads[0], factor * heads[1], factor * old.intermediate_size)
    assert head_dim_of(new) == head_dim and cfg.rope_parameters == old.rope_parameters
    assert plan.promise.exactness == Exactness.EXACT
    check_counts(new, plan)
    x = ids()
    assert rel_diff(logits(model, x), logits(new, x)) <= tolerance(family)


def test_clone_width_noise_breaks_the_symmetry_between_copies_but_keeps_the_function():
    model = build("llama", heads=(4, 2), head_dim=4)
    x = ids()
    for noise in (0.0, 0.1):
        new, _ = api.transform(model, [{"op": "clone_width", "factor": 2, "noise": noise}])
        q = new.model.layers[0].self_attn.q_proj.weight  # (2 * 16, 2 * 16): copies of rows, halves of columns
        down = new.model.layers[0].mlp.down_proj.weight
        same = torch.equal(q[:16], q[16:]) and torch.equal(q[:, :16], q[:, 16:]) and torch.equal(down[:16], down[16:])
        assert same == (noise == 0.0)
        torch.testing.assert_close(q[:, :16] + q[:, 16:], model.model.layers[0].self_attn.q_proj.weight.repeat(2, 1),
                                   rtol=0, atol=1e-12)
        assert rel_diff(logits(model, x), logits(new, x)) <= FLOAT32
    emb = new.model.embed_tokens.weight
    assert torch.equal(emb[:, :16], emb[:, 16:])  # writers stay noise-free: the residual copies stay equal


def test_clone_width_with_tied_embeddings_divides_the_final_norm_instead_of_lm_head():
    model = build("stablelm", tied=True)
    new, plan = api.transform(model, [{"op": "clone_width", "factor": 2}])
    torch.testing.assert_close(new.model.norm.weight, model.model.norm.weight.repeat(2) / 2, rtol=0, atol=0)
    torch.testing.assert_close(new.model.norm.bias, model.model.norm.bias.repeat(2) / 2, rtol=0, atol=0)
    assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()
    assert any("tied" in n for n in plan.steps[0].promise.notes)


def test_clone_width_leaves_nothing_for_rescale_norm_to_do():
    model = build("llama")
    with pytest.raises(SurgeryError) as e:
        api.transform(model, [{"op": "clone_width", "factor": 2}, {"op": "rescale_norm"}])
    assert "nothing to rescale" in e.value.message and e.value.loc[:2] == ("ops", 1)


@pytest.mark.parametrize("family,fill", [("llama", "zero"), ("stablelm", "mean")])
def test_clone_width_after_a_growth_keeps_the_pending_rescale_right(family, fill):
    model = build(family, heads=(4, 2))
    ops = [{"op": "grow_heads", "num_heads": 6, "residual_fill": fill}, {"op": "clone_width", "factor": 2, "noise": 0.02},
           {"op": "rescale_norm"}, {"op": "grow_head_dim", "head_dim": 6, "residual_fill": fill}]
    ops += [{"op": "rescale_norm"}] if family == "stablelm" else []
    new, plan = api.transform(model, ops)
    assert plan.steps[1].state.spec.norm_width == 2 * model.config.hidden_size
    assert plan.promise.exactness == Exactness.EXACT
    x = ids()
    assert dead_slices(new, x, plan.final.new_slices) == []
    assert rel_diff(logits(model, x), logits(new, x)) <= tolerance(family)


# --------------------------------------------------------------------------------- bad values
BAD = [
    ("llama", [{"op": "grow_head_dim", "head_dim": 4}], ("ops", 0, "head_dim"), "already 4"),
    ("llama", [{"op": "grow_head_dim", "head_dim": 2}], ("ops", 0, "head_dim"), "shrink"),
    ("llama", [{"op": "grow_head_dim", "head_dim": "x1.3"}], ("ops", 0, "head_dim"), "not an integer"),
    ("llama", [{"op": "grow_head_dim", "head_dim": "+1"}], ("ops", 0, "head_dim"), "even"),
    ("qwen2", [{"op": "grow_head_dim", "head_dim": "x2", "init": "random"}], ("ops", 0, "init"), ""),
    ("llama", [{"op": "clone_width", "factor": 1}], ("ops", 0, "factor"), "2"),
    ("llama", [{"op": "clone_width", "factor": 2, "noise": -0.1}], ("ops", 0, "noise"), "0"),
    ("llama", [{"op": "clone_width", "factor": 2, "init": "zeros"}], ("ops", 0, "init"), "unknown key"),
    ("stablelm", [{"op": "grow_heads", "num_heads": 6}, {"op": "rescale_norm"}, {"op": "patch_layernorm"},
                  {"op": "clone_width", "factor": 2}], ("ops", 3, "op"), "cannot follow patch_layernorm"),
    ("stablelm", [{"op": "grow_heads", "num_heads": 6}, {"op": "clone_width", "factor": 2}], ("ops", 1, "op"),
     "zero-padded"),
]


@pytest.mark.parametrize("family,ops,loc,fragment", BAD, ids=[".".join(map(str, b[2])) + f"[{i}]" for i, b in enumerate(BAD)])
def test_bad_values_raise_surgery_error_naming_the_field(family, ops, loc, fragment):
    with pytest.raises(SurgeryError) as e:
        api.transform(build(family), ops)
    assert e.value.loc == loc
    assert fragment in e.value.message


def test_full_rotary_refuses_rope_types_whose_frequencies_depend_on_head_dim_otherwise():
    cfg = make_config("llama", hidden_heads=2, kv_heads=1, head_dim=4, vocab=VOCAB)
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(SurgeryError) as e:
        api.transform(make_model(cfg), [{"op": "grow_head_dim", "head_dim": 8}])
    assert "rope_type 'dynamic'" in e.value.message and e.value.loc == ("ops", 0, "head_dim")


# ----------------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints shaped like the recipes' sources, small: a StableLM (4 heads of 16) and a Llama (4/2 heads)."""
    out = {}
    for family, heads in (("stablelm", (4, 4)), ("llama", (4, 2))):
        path = tmp_path_factory.mktemp(family)
        cfg = make_config(family, hidden_heads=heads[0], kv_heads=heads[1], head_dim=16, intermediate=40, vocab=VOCAB,
                          qkv_bias=family == "stablelm")
        if family == "stablelm":
            cfg.rope_parameters["partial_rotary_factor"] = 0.25  # as stablelm-2-1_6b
        model = make_model(cfg, dtype=torch.float32)
        model.save_pretrained(path)
        out[family] = (path, model)
    return out


@pytest.mark.parametrize("recipe,family,exactness,shape", [
    ("stablelm_grow_head_dim.yaml", "stablelm", Exactness.EXACT_SHIPPED_CODE, (80, 4, 20)),
    ("stablelm_grow_heads_mean_fill.yaml", "stablelm", Exactness.EXACT, (80, 5, 16)),
    ("hypercloning_x2.yaml", "llama", Exactness.EXACT, (128, 8, 16)),
])
def test_recipes_plan_what_they_promise_and_the_plan_counts_the_materialized_parameters(recipe, family, exactness, shape,
                                                                                        checkpoints):
    path, model = checkpoints[family]
    loaded = load_recipe(RECIPES + recipe, source=str(path))
    plan = api.plan(loaded)
    spec = plan.final.spec
    assert (spec.hidden_size, spec.num_heads, spec.head_dim, plan.promise.exactness) == (*shape, exactness)
    new, _ = api.transform(model, [op.model_dump(mode="json") for op in loaded.recipe.ops])
    assert plan.final.num_parameters == new.num_parameters()
    text = open(RECIPES + recipe).read()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../../schema/recipe.schema.json"
    assert "Exactness:" in text and "Source of the idea:" in text
