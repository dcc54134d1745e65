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
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from factories import logits, loss, make_model, release_config
from surgery import api
from surgery.errors import SurgeryError
from surgery.ops import Exactness

NEW_FAMILIES = ("qwen3", "olmo2", "phi3", "gemma2", "gemma3_text")
HEAD_DIM_FIELD = {"qwen3": True, "olmo2": False, "phi3": False, "gemma2": True, "gemma3_text": True}  # whether head_dim is a config field (else hidden / heads)
VOCAB = 40
REL = 1e-5
MAX_LOGIT = 1e-3
# Sliding windows shorter than the test sequences, so that a layer_types entry that does not follow its layer
# changes the logits: Qwen3 as 4.x configs derive it (layers >= max_window_layers slide), Gemma alternating.
WINDOWS = {
    "qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "gemma2": dict(sliding_window=3),
    "gemma3_text": dict(sliding_window=3, sliding_window_pattern=2),
}
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def family_models(draw, families=NEW_FAMILIES):
    family = draw(st.sampled_from(families))
    kv = draw(st.integers(1, 2))
    rep = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([4, 8]))
    extra = dict(WINDOWS.get(family, {}))
    if HEAD_DIM_FIELD[family]:
        extra["hidden"] = draw(st.sampled_from([12, 20]))  # unrelated to heads x head_dim, as in Qwen3-0.6B
    if family in ("qwen3", "olmo2", "gemma2", "gemma3_text"):
        extra["attention_bias"] = draw(st.booleans())  # q/k biases must scale with q/k wherever they do
    if family == "phi3" and draw(st.booleans()):
        extra["partial_rotary_factor"] = None  # Phi-3-mini: config.json leaves the class default (1.0) out
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
    try:
        grown, plan = api.transform(model, ops)  # loads into the stock class; missing or unexpected keys raise
    except SurgeryError as e:
        # Gemma's config classes insist on hidden_size % num_heads == 0 even with a head_dim field; the plan
        # refuses such a growth in one line, and the property is about the growths transformers accepts.
        assume("is not a multiple of the number of attention heads" not in str(e))
        raise
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


# ------------------------------------------------------------------------------ written checkpoints
WRITTEN = {
    "qwen3": [{"op": "grow_heads", "num_heads": "x2", "residual": "keep"}, {"op": "grow_head_dim", "head_dim": "x1.5"},
              {"op": "grow_mlp", "intermediate_size": "x1.5"}],
    "olmo2": [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}, {"op": "grow_layers", "num_layers": "x1.5"}],
    "phi3": [{"op": "grow_head_dim", "head_dim": "x2"}, {"op": "rescale_norm"}, {"op": "grow_mlp", "intermediate_size": "x1.5"}],
    "gemma2": [{"op": "clone_width", "factor": 2}, {"op": "grow_heads", "num_heads": "x2", "residual": "keep"},
               {"op": "grow_layers", "num_layers": "x2"}],
    "gemma3_text": [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}, {"op": "grow_head_dim", "head_dim": "x2"}],
}


def recipe_text(source, ops) -> str:
    import yaml

    return yaml.safe_dump({"name": "family-run", "source": str(source), "ops": ops, "verify": {"max_tokens": 64, "per_op": True}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_written_output_loads_in_stock_transformers_without_missing_keys_and_passes_verification(family, dtype, tmp_path,
                                                                                                   write_recipe):
    from transformers import AutoModelForCausalLM

    from conftest import save_checkpoint

    cfg = release_config(family, heads=4, kv_heads=2, head_dim=8, vocab=512, tied=family != "olmo2",
                         **({"hidden": 32} if HEAD_DIM_FIELD[family] else {}))
    src = save_checkpoint(make_model(cfg, seed=3, dtype=dtype), tmp_path / "src")
    out = tmp_path / "out"
    result = api.run(write_recipe(recipe_text(src, WRITTEN[family])), output=str(out))
    assert result.report.passed, result.report.rule  # bf16: within the measured rounding noise of the stored weights
    if dtype == torch.float32:
        assert abs(result.report.rel_change) < REL and result.report.max_logit_diff <= MAX_LOGIT
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == cfg.architectures[0]


# ------------------------------------------------------------------------------ family quirks
def test_qwen3_4x_config_without_layer_types_keeps_each_layers_sliding_window_when_layers_are_inserted(tmp_path, write_recipe):
    import json

    from conftest import save_checkpoint

    cfg = release_config("qwen3", heads=2, kv_heads=1, head_dim=8, vocab=512, layers=3, use_sliding_window=True,
                         sliding_window=4, max_window_layers=1)
    src = save_checkpoint(make_model(cfg, seed=1, dtype=torch.float32), tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    raw.pop("layer_types")  # as 4.x wrote it: layers >= max_window_layers slide
    (src / "config.json").write_text(json.dumps(raw))
    recipe = recipe_text(src, [{"op": "grow_layers", "num_layers": 4, "positions": [0]}])
    result = api.run(write_recipe(recipe), output=str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert result.report.passed and abs(result.report.rel_change) < REL


def test_gemma_norms_scale_the_gain_one_plus_w_and_pad_zero_gain_as_minus_one():
    model = make_model(release_config("gemma3_text", heads=2, kv_heads=1, head_dim=4, hidden=8, vocab=VOCAB, tied=True))
    grown, plan = grow(model, [{"op": "grow_head_dim", "head_dim": 8, "init": "zeros"}])
    old, new = model.model.layers[0].self_attn.k_norm.weight, grown.model.layers[0].self_attn.k_norm.weight
    kept = [0, 2, 4, 6]  # head_dim x2: rotary pair i goes to pair 2i, so dims [0, 1 | 2, 3] -> [0, 2 | 4, 6]
    # scores use query_pre_attn_scalar, not head_dim: k's gain shrinks by the whole norm growth 4/8
    assert torch.allclose(1 + new[kept], (1 + old) * 4 / 8)
    assert torch.equal(new[[1, 3, 5, 7]], torch.full((4,), -1.0, dtype=new.dtype))  # zero gain
    assert_same_function(model, grown)
    grown, _ = grow(model, [{"op": "grow_heads", "num_heads": 4}, {"op": "rescale_norm"}])
    w0, w1 = model.model.norm.weight, grown.model.norm.weight[:8]
    # rescale_norm's sqrt(8/16) and, tied, sqrt(16/8) for the embedding's sqrt(hidden_size) scale cancel
    assert torch.allclose(1 + w1, 1 + w0)
    assert torch.allclose(grown.model.embed_tokens.weight[:, :8], model.model.embed_tokens.weight * math.sqrt(8 / 16))


def test_phi3_output_holds_the_fused_tensors_and_longrope_factor_lists_stay_valid():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + i / 10 for i in range(3)], "long_factor": [2.0 + i / 10 for i in range(3)],
            "original_max_position_embeddings": 64}
    model = make_model(release_config("phi3", heads=2, kv_heads=1, head_dim=8, vocab=VOCAB, rope_scaling=rope))
    grown, plan = grow(model, [{"op": "grow_head_dim", "head_dim": 16}, {"op": "rescale_norm"}, {"op": "grow_mlp", "intermediate_size": "+4"}])
    assert set(grown.state_dict()) == set(model.state_dict())
    assert grown.model.layers[0].self_attn.qkv_proj.weight.shape == (16 * 2 + 16 * 2, 32)
    assert grown.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 28, 32)
    rp = grown.config.rope_parameters
    assert int(16 * rp["partial_rotary_factor"]) == 6 and len(rp["short_factor"]) == 3  # the same 6 rotary dims
    assert_same_function(model, grown)


def test_olmo2_and_qwen3_say_which_new_q_k_rows_their_norms_force_to_zero():
    olmo = make_model(release_config("olmo2", heads=2, kv_heads=2, head_dim=4, vocab=VOCAB))
    grown, plan = grow(olmo, [{"op": "grow_heads", "num_heads": 3}, {"op": "rescale_norm"}])
    assert any("whole projection" in n for n in plan.steps[0].promise.notes)
    q = grown.model.layers[0].self_attn.q_proj.weight
    assert q[8:, :8].abs().sum() == 0 and q[:8].abs().sum() > 0  # (new residual columns read zeros: any value)
    qwen = make_model(release_config("qwen3", heads=2, kv_heads=1, head_dim=4, hidden=12, vocab=VOCAB))
    _, plan = grow(qwen, [{"op": "grow_head_dim", "head_dim": 8}])
    assert any("start dead" in n for n in plan.steps[0].promise.notes)


def test_gemma2_growth_transformers_cannot_configure_is_refused_in_one_line_before_any_weight_is_read():
    model = make_model(release_config("gemma2", heads=4, kv_heads=2, head_dim=8, hidden=20, vocab=VOCAB))
    with pytest.raises(SurgeryError, match="not a multiple of the number of attention heads"):
        api.transform(model, [{"op": "grow_heads", "num_heads": 6, "residual": "keep"}])


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_bf16_source_grows_exactly_in_float32_the_embedding_scale_taken_as_the_model_computes_it(family):
    model = make_model(release_config(family, heads=4, kv_heads=2, head_dim=8, hidden=24, vocab=VOCAB, tied=True),
                       seed=5, dtype=torch.bfloat16)
    grown, plan = api.transform(model, [{"op": "grow_heads", "num_heads": 8}, {"op": "rescale_norm"}])
    assert grown.dtype == torch.float32  # computed in float32 from the bf16 weights, as verification runs it
    # the source as verification loads it: built in float32 (sqrt(hidden_size) unrounded), bf16 weights upcast
    source = type(model)(model.config).eval()
    source.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert_same_function(source, grown)


def test_phi3_reinit_draws_each_part_of_the_fused_tensors_and_inspect_predicts_the_fused_tensor(tmp_path):
    from conftest import save_checkpoint
    from surgery.inspect import inspect_checkpoint

    model = make_model(release_config("phi3", heads=4, kv_heads=2, head_dim=8, vocab=VOCAB, intermediate=32), dtype=torch.float32)
    fresh, plan = grow(model, [{"op": "reinit", "method": "hf", "targets": ["attn.k", "mlp.up"]}])
    h, kv, inter = 4 * 8, 2 * 8, 32
    old, new = model.model.layers[1].self_attn.qkv_proj.weight, fresh.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(old[:h], new[:h]) and torch.equal(old[h + kv:], new[h + kv:])  # q and v rows kept
    assert abs(float(new[h:h + kv].detach().std()) - 0.02) < 0.005  # k rows re-drawn
    gu_old, gu_new = model.model.layers[0].mlp.gate_up_proj.weight, fresh.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gu_old[:inter], gu_new[:inter]) and not torch.equal(gu_old[inter:], gu_new[inter:])
    stats = {s.name: s for s in inspect_checkpoint(save_checkpoint(fresh, tmp_path / "fresh"), method="hf").stats}
    assert stats["model.layers.0.self_attn.qkv_proj.weight"].predicted.std == 0.02


@PROPERTY
@given(case=family_models(), order=st.permutations(["heads", "head_dim", "clone", "mlp"]))
def test_growths_compose_in_any_order_with_one_rescale_norm_at_the_end(case, order):
    family, model = case
    ops = {"heads": {"op": "grow_heads", "num_heads": "x2"}, "head_dim": {"op": "grow_head_dim", "head_dim": "x1.5"},
           "clone": {"op": "clone_width", "factor": 2}, "mlp": {"op": "grow_mlp", "intermediate_size": "+3"}}
    grown, plan = grow(model, [ops[o] for o in order] + [{"op": "rescale_norm"}])
    assert plan.promise.exactness == Exactness.EXACT, plan.promise.reason
    assert_same_function(model, grown)


def test_phi3_mini_config_without_partial_rotary_factor_grows_head_dim_with_the_class_default(tmp_path, write_recipe):
    import json

    from conftest import save_checkpoint

    cfg = release_config("phi3", heads=2, kv_heads=2, head_dim=8, vocab=512, partial_rotary_factor=None)
    src = save_checkpoint(make_model(cfg, seed=2, dtype=torch.float32), tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    raw.pop("rope_parameters")  # as 4.x wrote Phi-3-mini: rope_theta, rope_scaling null, no partial_rotary_factor
    raw.update(rope_theta=10000.0, rope_scaling=None)
    (src / "config.json").write_text(json.dumps(raw))
    result = api.run(write_recipe(recipe_text(src, [{"op": "grow_head_dim", "head_dim": 12}, {"op": "rescale_norm"}])),
                     output=str(tmp_path / "out"))
    assert result.report.passed, result.report.rule
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert int(12 * written["rope_parameters"]["partial_rotary_factor"]) == 8  # the 8 rotary dims of the source


def test_gemma3_4x_config_keeps_both_rope_bases_and_the_sliding_pattern_through_head_dim_and_depth_growth(tmp_path, write_recipe):
    import json

    from conftest import save_checkpoint

    cfg = release_config("gemma3_text", heads=2, kv_heads=1, head_dim=8, hidden=16, vocab=512, layers=3, tied=True,
                         sliding_window=4, sliding_window_pattern=2)
    src = save_checkpoint(make_model(cfg, seed=4, dtype=torch.float32), tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):  # as 4.x wrote Gemma 3: two bases at the top, a pattern
        raw.pop(key)
    raw.update(rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None, sliding_window_pattern=2)
    (src / "config.json").write_text(json.dumps(raw))
    ops = [{"op": "grow_head_dim", "head_dim": 12}, {"op": "grow_layers", "num_layers": 4, "positions": [0]}]
    result = api.run(write_recipe(recipe_text(src, ops)), output=str(tmp_path / "out"))
    assert result.report.passed, result.report.rule
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    rope = written["rope_parameters"]
    assert math.isclose(rope["full_attention"]["rope_theta"], 1e6 ** 1.5)
    assert math.isclose(rope["sliding_attention"]["rope_theta"], 1e4 ** 1.5)
    # pattern 2 over 3 layers: sliding, full, sliding; the new block at 0 copies layer 0's entry
    assert written["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_reinit_hf_matches_a_freshly_constructed_transformers_model_gemma_norms_at_unit_gain(family):
    model = make_model(release_config(family, heads=4, kv_heads=2, head_dim=8, vocab=VOCAB, intermediate=64,
                                      **({"hidden": 32} if HEAD_DIM_FIELD[family] else {})), dtype=torch.float32)
    out, _ = api.transform(model, [{"op": "reinit", "method": "hf"}])
    torch.manual_seed(1)
    fresh = type(model)(model.config).state_dict()
    got = out.state_dict()
    assert set(fresh) == set(got)
    for name, f in fresh.items():
        t = got[name]
        if f.std() == 0:  # norms (Gemma: w = 0, unit gain) and biases: the same constants
            assert torch.equal(t, f), name
        else:
            assert abs(float(t.std()) / float(f.std()) - 1) < 0.2, name


def test_a_bf16_gemma_whose_residual_grows_is_told_its_embedding_scale_rounds_in_bf16_execution(tmp_path):
    from conftest import save_checkpoint

    cfg = release_config("gemma2", heads=4, kv_heads=2, head_dim=8, vocab=512, tied=True, hidden=32)
    src = save_checkpoint(make_model(cfg, seed=1, dtype=torch.bfloat16), tmp_path / "src")
    plan = api.plan(_recipe_file(tmp_path, src, [{"op": "clone_width", "factor": 2}]))
    assert any("sqrt(32) and sqrt(64) round differently" in n for n in plan.steps[0].promise.notes)


def _recipe_file(tmp_path, src, ops):
    p = tmp_path / "r.yaml"
    p.write_text(recipe_text(src, ops))
    return p
