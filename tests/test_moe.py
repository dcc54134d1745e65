"""Mixture of experts: upcycle_moe (dense -> Mixtral / Qwen2-MoE) and the growth ops on MoE families.

Models are float64 random models (tests/factories.py: random norms and biases, an off-centre
embedding) run by stock transformers. Both MoE families compute their router softmax and the
routing weights in float32 whatever the model dtype, so an exact upcycle agrees with the dense
source to float32 rounding (~1e-7 relative), asserted at 1e-5 like every RMSNorm residual growth.
float64 MoE models run transformers' eager expert loop (its default grouped_mm has no float64 kernel).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import api
from surgery.cli import main as cli_main
from surgery.errors import SurgeryError
from surgery.ops import Exactness
from conftest import save_checkpoint
from factories import logits, loss, make_config, make_model, release_config

VOCAB = 32
TOKENIZER_VOCAB = 512  # the builtin tokenizer written beside saved checkpoints
FLOAT32_ROUTING = 1e-5
PROPERTY = settings(max_examples=8, deadline=None)
GQA = [(4, 2), (4, 4), (2, 1)]


def dense(family, *, heads=(4, 2), head_dim=4, intermediate=12, tied=False, bias=True, layers=2, seed=0, vocab=VOCAB):
    cfg = make_config(family, hidden_heads=heads[0], kv_heads=heads[1], head_dim=head_dim, layers=layers,
                      intermediate=intermediate, vocab=vocab, tied=tied, qkv_bias=bias and family != "llama")
    return make_model(cfg, seed=seed)


def mixtral(*, heads=(4, 2), head_dim=4, intermediate=12, experts=4, top_k=2, tied=False, layers=2, seed=0):
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=heads[0] * head_dim, head_dim=head_dim, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads[0], num_key_value_heads=heads[1],
        num_local_experts=experts, num_experts_per_tok=top_k, tie_word_embeddings=tied, max_position_embeddings=64)
    cfg._experts_implementation = "eager"
    return make_model(cfg, seed=seed)


def ids(seed=0, length=12):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def rel_diff(a, b):
    return float((a - b).abs().max() / a.abs().max())


def assert_same_function(src, new, x, tol=FLOAT32_ROUTING):
    a, b = logits(src, x), logits(new, x)
    assert rel_diff(a, b) <= tol
    assert float((a - b).abs().max()) <= 1e-3
    assert abs(loss(new, x) - loss(src, x)) <= tol * loss(src, x)


def check_counts(new, plan):
    assert plan.final.num_parameters == new.num_parameters()


# ------------------------------------------------------------------------------ upcycle_moe
@PROPERTY
@given(family=st.sampled_from(["llama", "mistral", "qwen2"]), heads=st.sampled_from(GQA), intermediate=st.integers(4, 16),
       experts=st.integers(2, 6), top_k=st.integers(1, 3), tied=st.booleans(), grow=st.booleans(),
       router=st.sampled_from(["zeros", "random", "hidden"]), share=st.sampled_from([0.0, 0.5, 0.75]))
def test_upcycle_keeps_the_dense_function_for_any_router(family, heads, intermediate, experts, top_k, tied, grow, router,
                                                        share):
    top_k = min(top_k, experts)
    model = dense(family, heads=heads, intermediate=intermediate, tied=tied)
    ops = [{"op": "grow_mlp", "intermediate_size": f"+{intermediate // 2 + 1}"}] if grow else []
    up = {"op": "upcycle_moe", "num_experts": experts, "top_k": top_k, "router": router}
    if family == "qwen2":
        up["shared_expert_share"] = share
    new, plan = api.transform(model, ops + [up], calibration_ids=ids(5, 16)[:1])
    assert type(new).__name__ == ("Qwen2MoeForCausalLM" if family == "qwen2" else "MixtralForCausalLM")
    assert plan.promise.exactness == Exactness.EXACT
    assert new.config.num_experts_per_tok == top_k
    check_counts(new, plan)
    assert_same_function(model, new, ids())


@PROPERTY
@given(experts=st.sampled_from([2, 4, 8]), top_k=st.integers(1, 2), heads=st.sampled_from(GQA))
def test_qwen2_moe_without_renormalisation_is_exact_with_a_zero_router(experts, top_k, heads):
    model = dense("qwen2", heads=heads)
    new, plan = api.transform(model, [{"op": "upcycle_moe", "num_experts": experts, "top_k": top_k, "router": "zeros",
                                       "norm_topk_prob": False}])
    assert new.config.norm_topk_prob is False
    assert plan.promise.exactness == Exactness.EXACT
    assert f"scaled by {experts}/{top_k}" in plan.promise.reason or "every op so far" in plan.promise.reason
    assert_same_function(model, new, ids())


def test_qwen2_moe_without_renormalisation_and_a_random_router_is_approximate_and_moves():
    model = dense("qwen2")
    new, plan = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, "router": "random", "router_std": 1.0,
                                       "norm_topk_prob": False}])
    assert plan.promise.exactness == Exactness.APPROXIMATE
    assert "norm_topk_prob: false" in plan.promise.reason
    assert rel_diff(logits(model, ids()), logits(new, ids())) > 1e-3


@pytest.mark.parametrize("option", [{"expert_noise": 0.05}, {"reinit_ratio": 0.25}])
def test_symmetry_breaking_is_approximate_and_makes_experts_differ(option):
    model = dense("mistral")
    new, plan = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, **option}])
    assert plan.promise.exactness == Exactness.APPROXIMATE
    fused = new.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(fused[0], fused[1])
    assert rel_diff(logits(model, ids()), logits(new, ids())) > 1e-6


def test_reinit_ratio_redraws_that_share_of_each_experts_neurons_with_different_subsets():
    model = dense("llama", intermediate=16)
    new, _ = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, "reinit_ratio": 0.25}])
    gate = model.model.layers[0].mlp.gate_proj.weight
    fused = new.model.layers[0].mlp.experts.gate_up_proj  # (E, 2I, H): gate rows first
    changed = [set(torch.nonzero((fused[e, :16] != gate).any(dim=1)).flatten().tolist()) for e in range(4)]
    assert all(len(c) == 4 for c in changed)
    assert len({frozenset(c) for c in changed}) > 1


def test_hidden_router_rows_are_distinct_unit_directions_from_the_calibration_states():
    model = dense("llama")
    new, _ = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, "router": "hidden"}],
                           calibration_ids=ids(3, 24)[:1])
    w = new.model.layers[1].mlp.gate.weight.detach().double()
    cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    assert float((cos - torch.eye(4, dtype=cos.dtype)).abs().max()) < 0.999
    assert torch.allclose(w.norm(dim=1), w.norm(dim=1)[0].expand(4))  # same length: no expert favoured


@pytest.mark.parametrize("op, message", [
    ({"into": "qwen2_moe"}, "cannot start from a llama model"),
    ({"top_k": 9}, "top_k 9 exceeds num_experts 8"),
    ({"norm_topk_prob": False}, "Mixtral always renormalises"),
    ({"shared_expert_share": 0.25}, "mixtral has no shared expert"),
])
def test_upcycle_refuses_what_the_output_family_cannot_express(op, message):
    with pytest.raises(SurgeryError, match=message):
        api.transform(dense("llama"), [{"op": "upcycle_moe", **op}])


def test_hidden_router_refuses_fewer_calibration_tokens_than_experts():
    with pytest.raises(SurgeryError, match="at least 8 calibration tokens, got 5"):
        api.transform(dense("mistral"), [{"op": "upcycle_moe", "num_experts": 8, "router": "hidden"}],
                      calibration_ids=ids(0, 5)[:1])


def test_upcycle_refuses_llama_attention_bias():
    cfg = make_config("llama", qkv_bias=True, vocab=VOCAB)
    with pytest.raises(SurgeryError, match="attention_bias: true"):
        api.transform(make_model(cfg), [{"op": "upcycle_moe"}])


# --------------------------------------------------------------- growth ops on MoE families
GROWTHS = [
    [{"op": "grow_mlp", "intermediate_size": "+5"}],
    [{"op": "grow_heads", "num_heads": "x2"}, {"op": "rescale_norm"}],
    [{"op": "clone_width", "factor": 2}],
    [{"op": "grow_layers", "num_layers": "+2"}],
    [{"op": "grow_layers", "num_layers": "+1", "from": "fresh"}],
]


@PROPERTY
@given(growth=st.sampled_from(GROWTHS), heads=st.sampled_from(GQA), intermediate=st.integers(4, 16),
       experts=st.integers(2, 5), top_k=st.integers(1, 2), tied=st.booleans(), seed=st.integers(0, 3))
def test_growth_of_a_mixtral_checkpoint_is_exact_on_every_expert_and_router(growth, heads, intermediate, experts, top_k,
                                                                             tied, seed):
    model = mixtral(heads=heads, intermediate=intermediate, experts=experts, top_k=top_k, tied=tied, seed=seed)
    new, plan = api.transform(model, growth)
    assert plan.promise.exactness == Exactness.EXACT
    check_counts(new, plan)
    assert_same_function(model, new, ids(seed))


@PROPERTY
@given(growth=st.sampled_from(GROWTHS), heads=st.sampled_from(GQA), experts=st.integers(2, 5), shared=st.integers(4, 20),
       tied=st.booleans(), seed=st.integers(0, 3))
def test_growth_of_a_qwen2_moe_checkpoint_keeps_its_unnormalised_routing_and_shared_expert(growth, heads, experts, shared,
                                                                                          tied, seed):
    cfg = transformers.Qwen2MoeConfig(  # Qwen1.5-MoE's conventions: norm_topk_prob false, a wider shared expert
        vocab_size=VOCAB, hidden_size=heads[0] * 4, num_attention_heads=heads[0], num_key_value_heads=heads[1],
        num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=shared,
        num_experts=experts, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=tied,
        max_position_embeddings=64)
    cfg._experts_implementation = "eager"
    model = make_model(cfg, seed=seed)
    new, plan = api.transform(model, growth)
    assert plan.promise.exactness == Exactness.EXACT
    check_counts(new, plan)
    assert_same_function(model, new, ids(seed))


@PROPERTY
@given(growth=st.sampled_from(GROWTHS), heads=st.sampled_from(GQA), tied=st.booleans())
def test_growth_after_an_upcycle_to_qwen2_moe_keeps_the_dense_function(growth, heads, tied):
    model = dense("qwen2", heads=heads, tied=tied)
    new, plan = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, "top_k": 2}] + growth)
    assert plan.promise.exactness == Exactness.EXACT
    check_counts(new, plan)
    assert_same_function(model, new, ids())


def test_grow_mlp_on_mixtral_grows_every_expert_and_leaves_the_router():
    model = mixtral(intermediate=8, experts=3)
    new, plan = api.transform(model, [{"op": "grow_mlp", "intermediate_size": 12}])
    assert new.config.intermediate_size == 12
    assert tuple(new.model.layers[0].mlp.experts.down_proj.shape) == (3, 16, 12)
    assert torch.equal(new.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)


def test_reinit_of_mixtral_routers_draws_them_by_the_families_rule_and_nothing_else():
    model = mixtral(experts=4)
    new, plan = api.transform(model, [{"op": "reinit", "method": "hf", "targets": ["moe.router"]}])
    assert plan.promise.exactness == Exactness.REINIT
    assert any("moe.router: normal" in n for n in plan.steps[0].promise.notes)
    for a, b in zip(model.model.layers, new.model.layers):
        assert not torch.equal(a.mlp.gate.weight, b.mlp.gate.weight)
        assert torch.equal(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj)
    w = torch.cat([layer.mlp.gate.weight.detach().flatten() for layer in new.model.layers])
    assert abs(float(w.std()) - model.config.initializer_range) < 0.3 * model.config.initializer_range


# ------------------------------------------------------------------------ written checkpoints
def run(tmp_path, write_recipe, source: Path, ops: str, name="out", dtype="auto"):
    recipe = write_recipe(f"name: moe\nsource: {source}\noutput: {{path: {tmp_path / name}, dtype: {dtype}}}\nops:\n{ops}\n"
                          "verify:\n  max_tokens: 256\n  tolerance: 0.05\n")
    assert cli_main(["run", str(recipe)]) == 0
    return tmp_path / name, json.loads((tmp_path / name / "surgery_report.json").read_text())


@pytest.mark.parametrize("family, dtype, router", [("llama", torch.float32, "random"), ("mistral", torch.bfloat16, "hidden"),
                                                   ("qwen2", torch.float32, "hidden")])
def test_written_upcycle_loads_in_stock_transformers_with_the_release_layout_and_trains(tmp_path, write_recipe, family,
                                                                                       dtype, router):
    model = dense(family, heads=(4, 2), head_dim=8, intermediate=16, tied=family == "mistral", vocab=TOKENIZER_VOCAB).to(dtype)
    src = save_checkpoint(model, tmp_path / "src")
    ops = ("  - op: grow_mlp\n    intermediate_size: x2\n  - op: upcycle_moe\n    num_experts: 4\n    top_k: 2\n"
           f"    router: {router}\n")
    out, report = run(tmp_path, write_recipe, src, ops)
    assert report["passed"] and abs(report["rel_change"]) <= 1e-5 and report["max_logit_diff"] <= 1e-3
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] \
        if (out / "model.safetensors.index.json").exists() else None
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        first = f.get_tensor(sorted(n for n in names if n.endswith("experts.0.w1.weight") or
                                    n.endswith("experts.0.gate_proj.weight"))[0])
    expert = "block_sparse_moe.experts.3.w2.weight" if family != "qwen2" else "mlp.experts.3.down_proj.weight"
    assert f"model.layers.1.{expert}" in names
    assert first.dtype == dtype
    if family == "qwen2":
        assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert report["dead_slices"] == []
    for layer in report["expert_symmetry"]:
        assert layer["distinct"] == 1  # exact copies
        assert layer["distinct_after_step"] > 1 and layer["router_grad_after_step"] > 0



def test_an_upcycle_to_widths_grouped_mm_refuses_is_verified_eagerly_and_its_plan_says_how_to_load_it(
        tmp_path, write_recipe, capsys):
    """An expert width of 13 float32 values (52 bytes) made torch's grouped_mm fail inside verification: exit 3 and
    no output for an exact upcycle."""
    src = save_checkpoint(dense("llama", heads=(4, 2), head_dim=8, intermediate=12, vocab=TOKENIZER_VOCAB), tmp_path / "src")
    ops = "  - op: grow_mlp\n    intermediate_size: \"+1\"\n  - op: upcycle_moe\n    num_experts: 4\n    top_k: 2\n"
    out, report = run(tmp_path, write_recipe, src, ops, dtype="float32")
    assert report["passed"] and abs(report["rel_change"]) <= 1e-5
    assert "load with experts_implementation=\"eager\"" in (out / "README.md").read_text()
    x = ids()
    a = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float64)
    b = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64, experts_implementation="eager")
    assert_same_function(a, b, x)


def test_noise_is_reported_approximate_with_its_measured_loss_change(tmp_path, write_recipe):
    src = save_checkpoint(dense("llama", head_dim=8, intermediate=16, vocab=TOKENIZER_VOCAB), tmp_path / "src")
    out, report = run(tmp_path, write_recipe, src, "  - op: upcycle_moe\n    num_experts: 4\n    expert_noise: 0.02\n")
    assert report["steps"][-1]["exactness"] == "approximate"
    assert report["rel_change"] != 0 and abs(report["rel_change"]) <= 0.05
    assert report["expert_symmetry"][0]["distinct"] == 4


def test_zero_router_is_reported_as_a_fixed_point_the_experts_never_leave(tmp_path, write_recipe):
    src = save_checkpoint(dense("mistral", head_dim=8, intermediate=16, vocab=TOKENIZER_VOCAB), tmp_path / "src")
    out, report = run(tmp_path, write_recipe, src, "  - op: upcycle_moe\n    num_experts: 4\n    router: zeros\n")
    assert report["passed"]
    assert all(layer["distinct_after_step"] <= 2 and layer["router_grad_after_step"] < 1e-6
               for layer in report["expert_symmetry"])
    assert "do not separate" in (out / "surgery_report.md").read_text()


def test_ops_after_an_upcycle_are_verified_step_by_step_in_stock_transformers(tmp_path, write_recipe):
    src = save_checkpoint(dense("qwen2", head_dim=8, intermediate=16, vocab=TOKENIZER_VOCAB), tmp_path / "src")
    ops = ("  - op: upcycle_moe\n    num_experts: 4\n  - op: grow_layers\n    num_layers: +1\n"
           "  - op: grow_mlp\n    intermediate_size: +8\n")
    out, report = run(tmp_path, write_recipe, src, ops)
    assert report["passed"] and [s["passed"] for s in report["steps"]] == [True, True, True]
    assert all(abs(s["rel_change"]) <= 1e-5 for s in report["steps"])
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["moe_intermediate_size"]) == ("qwen2_moe", 3, 24)
    assert len(config["layer_types"]) == 3


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_windows_shorter_than_the_ids_survive_the_upcycle(family):
    cfg = make_config(family, vocab=VOCAB)
    if family == "mistral":
        cfg.sliding_window = 4
    else:
        cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 3, 0
        cfg.layer_types = ["sliding_attention", "full_attention"]
    model = make_model(cfg)
    new, _ = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4}])
    assert new.config.sliding_window == cfg.sliding_window
    assert_same_function(model, new, ids(length=12))


def test_a_llama3_config_as_transformers_4_wrote_it_upcycles_exactly(tmp_path, write_recipe):
    cfg = make_config("llama", qkv_bias=False, vocab=TOKENIZER_VOCAB, head_dim=8)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    src = save_checkpoint(make_model(cfg).to(torch.bfloat16), tmp_path / "src")
    c = json.loads((src / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=c.pop("dtype"), transformers_version="4.46.0")
    (src / "config.json").write_text(json.dumps(c))
    out, report = run(tmp_path, write_recipe, src, "  - op: upcycle_moe\n    num_experts: 4\n")
    assert report["passed"] and abs(report["rel_change"]) <= 1e-5
    loaded = transformers.AutoConfig.from_pretrained(str(out))
    assert loaded.rope_parameters["rope_type"] == "llama3" and loaded.rope_parameters["rope_theta"] == 500000.0


# ------------------------------------------------------------------------------ Qwen3 -> Qwen3-MoE
@PROPERTY
@given(heads=st.sampled_from(GQA), head_dim=st.sampled_from([4, 8]), hidden=st.sampled_from([None, 24]),
       tied=st.booleans(), grow=st.booleans(), router=st.sampled_from(["zeros", "random", "hidden"]),
       experts=st.integers(2, 6))
def test_qwen3_upcycles_into_qwen3_moe_keeping_the_dense_function(heads, head_dim, hidden, tied, grow, router, experts):
    cfg = release_config("qwen3", heads=heads[0], kv_heads=heads[1], head_dim=head_dim, hidden=hidden, intermediate=12,
                         vocab=VOCAB, tied=tied)
    model = make_model(cfg)
    ops = [{"op": "grow_mlp", "intermediate_size": "+6"}] if grow else []
    new, plan = api.transform(model, ops + [{"op": "upcycle_moe", "num_experts": experts, "top_k": 2 if experts > 2 else 1,
                                             "router": router}], calibration_ids=ids(5, 16)[:1])
    assert type(new).__name__ == "Qwen3MoeForCausalLM" and new.config.norm_topk_prob is True
    assert plan.promise.exactness == Exactness.EXACT
    check_counts(new, plan)
    assert_same_function(model, new, ids())


@PROPERTY
@given(growth=st.sampled_from(GROWTHS), heads=st.sampled_from(GQA))
def test_growth_after_an_upcycle_to_qwen3_moe_keeps_the_dense_function(growth, heads):
    model = make_model(release_config("qwen3", heads=heads[0], kv_heads=heads[1], head_dim=4, vocab=VOCAB))
    new, plan = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, "top_k": 2, "router": "zeros",
                                       "norm_topk_prob": False}] + growth)
    assert plan.promise.exactness == Exactness.EXACT
    check_counts(new, plan)
    assert_same_function(model, new, ids())


def test_qwen3_with_sliding_window_layers_is_refused():
    cfg = release_config("qwen3", vocab=VOCAB, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(SurgeryError, match="sliding-window layers"):
        api.transform(make_model(cfg), [{"op": "upcycle_moe"}])


def test_hidden_routers_from_the_layer_stream_are_those_of_the_whole_model_run():
    """The routers are clustered from each layer's MLP inputs as the streamed model produces them: the same
    states the whole stock model computes (so the same rows, to float32 rounding)."""
    from surgery.calibration import router_from_states

    model, x = dense("llama").float(), ids(3, 24)[:1]
    new, plan = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4, "router": "hidden"}], calibration_ids=x)
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(new.model.layers):
        expected = router_from_states(seen[i].reshape(-1, seen[i].shape[-1]), 4, (0, 0, "hidden-router", i))
        assert torch.allclose(layer.mlp.gate.weight.detach().float(), expected, atol=1e-5), i


# ------------------------------------------------------------------------------ expert counts in either spelling
def qwen3_moe_source(tmp_path: Path, writer: str) -> Path:
    """A tiny Qwen3-MoE checkpoint whose config.json is what transformers `writer` saved: 5.x writes the expert
    count as num_local_experts (its attribute_map reads num_experts into it), 4.x wrote num_experts and rope_theta."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=TOKENIZER_VOCAB, hidden_size=16, head_dim=4, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, intermediate_size=12, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64)
    src = save_checkpoint(make_model(cfg, dtype=torch.float32), tmp_path / "src")
    c = json.loads((src / "config.json").read_text())
    assert c["num_local_experts"] == 4 and "num_experts" not in c  # as transformers 5's save_pretrained writes it
    if writer == "4.x":
        c["num_experts"] = c.pop("num_local_experts")
        c.update(rope_theta=c.pop("rope_parameters")["rope_theta"], rope_scaling=None, torch_dtype=c.pop("dtype"),
                 transformers_version="4.51.3")
        (src / "config.json").write_text(json.dumps(c))
    return src


@pytest.mark.parametrize("op", ["  - op: grow_layers\n    num_layers: 3\n", "  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n"],
                         ids=["grow_layers", "grow_heads"])
@pytest.mark.parametrize("writer", ["5.x", "4.x"])
def test_a_qwen3_moe_checkpoint_saved_by_transformers_5_or_4_grows_and_verifies(tmp_path, write_recipe, writer, op):
    src = qwen3_moe_source(tmp_path, writer)
    plan = api.plan(write_recipe(f"name: q\nsource: {src}\nops:\n{op}"))
    assert plan.initial.spec.num_experts == 4
    assert any("num_experts written as num_local_experts" in n for n in plan.initial.spec.meta.standardised) \
        == (writer == "4.x")
    out, report = run(tmp_path, write_recipe, src, op)
    assert report["passed"] and report["steps"][-1]["exactness"] == "exact"
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and "num_experts" not in config
    assert transformers.AutoConfig.from_pretrained(str(out)).num_experts == 4


@pytest.mark.parametrize("family, spelling", [("mixtral", "num_local_experts"), ("mixtral", "num_experts"),
                                              ("qwen3_moe", "num_local_experts"), ("qwen3_moe", "num_experts"),
                                              ("qwen2_moe", "num_experts")])
def test_the_expert_count_is_read_under_each_spelling_transformers_reads(family, spelling):
    from surgery.spec import ModelSpec
    from surgery.state import ModelState

    config = moe_family_config(family).to_dict()
    count = config.pop("num_local_experts" if family != "qwen2_moe" else "num_experts")
    spec = ModelSpec.from_config({**config, spelling: count})
    assert spec.num_experts == count == 3
    assert transformers.AutoConfig.for_model(**spec.config).to_dict() == transformers.AutoConfig.for_model(
        **{**config, spelling: count}).to_dict()
    state = ModelState(spec, {})
    assert state.expected_shape(spec.arch.classify("model.layers.0." + ("block_sparse_moe.gate.weight" if family == "mixtral"
                                                                         else "mlp.gate.weight"))) == (3, 16)


def moe_family_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=16, head_dim=4, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=1, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=12, num_local_experts=3, **common)
    cls = transformers.Qwen2MoeConfig if family == "qwen2_moe" else transformers.Qwen3MoeConfig
    return cls(intermediate_size=12, moe_intermediate_size=8, num_experts=3, **common)


# ------------------------------------------------- experts the verification batch leaves without tokens
def qwen_moe_source(tmp_path, family: str, experts: int, top_k: int) -> Path:
    """A saved Qwen2-MoE (Qwen1.5-MoE's conventions) or Qwen3-MoE, its config.json as releases write it."""
    common = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=8, num_experts=experts,
                  num_experts_per_tok=top_k, max_position_embeddings=256)
    if family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=16, norm_topk_prob=False, **common)
    else:
        cfg = transformers.Qwen3MoeConfig(norm_topk_prob=True, **common)
    src = save_checkpoint(make_model(cfg).float(), tmp_path / family)
    c = json.loads((src / "config.json").read_text())
    c["num_experts"] = c.pop("num_local_experts", c.get("num_experts"))  # transformers 5 saves Qwen3-MoE's under its alias
    (src / "config.json").write_text(json.dumps(c))
    return src


def unreached_summary(capsys) -> str:
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("gradient-flow check"))


def test_heads_grown_after_a_16_expert_upcycle_pass_though_the_batch_leaves_an_expert_without_tokens(tmp_path, write_recipe,
                                                                                                     capsys):
    src = save_checkpoint(dense("llama", heads=(4, 2), head_dim=8, intermediate=16, vocab=TOKENIZER_VOCAB).float(),
                          tmp_path / "src")
    ops = ("  - op: upcycle_moe\n    num_experts: 16\n    top_k: 2\n  - op: grow_heads\n    num_heads: x2\n"
           "  - op: rescale_norm\n")
    out, report = run(tmp_path, write_recipe, src, ops)
    assert report["passed"] and report["dead_slices"] == []
    assert "reached by an input" in unreached_summary(capsys)


@pytest.mark.parametrize("family, router, extra", [("llama", "random", ""), ("qwen2", "zeros", "    norm_topk_prob: false\n")])
def test_grow_mlp_then_a_top_1_upcycle_passes_though_the_batch_leaves_experts_without_tokens(tmp_path, write_recipe, capsys,
                                                                                              family, router, extra):
    """A random router leaves an expert no token of the batch picks; Qwen2-MoE's exact zero router without
    renormalisation sends every token to one expert, and its rows learn through the softmax normaliser."""
    model = dense(family, heads=(4, 2), head_dim=8, intermediate=16, vocab=TOKENIZER_VOCAB).float()
    src = save_checkpoint(model, tmp_path / "src")
    ops = ("  - op: grow_mlp\n    intermediate_size: x2\n  - op: upcycle_moe\n    num_experts: 8\n    top_k: 1\n"
           f"    router: {router}\n{extra}")
    out, report = run(tmp_path, write_recipe, src, ops)
    assert report["passed"] and report["dead_slices"] == []
    assert ("reached by an input" if router == "random" else "router row learns") in unreached_summary(capsys)


@pytest.mark.parametrize("family, experts, top_k", [("qwen2_moe", 8, 2), ("qwen3_moe", 16, 2)])
def test_grow_layers_on_qwen_moe_sources_passes_though_the_batch_leaves_experts_of_new_layers_without_tokens(
        tmp_path, write_recipe, capsys, family, experts, top_k):
    src = qwen_moe_source(tmp_path, family, experts, top_k)
    out, report = run(tmp_path, write_recipe, src, "  - op: grow_layers\n    num_layers: +2\n")
    assert report["passed"] and report["dead_slices"] == []
    assert "reached by an input" in unreached_summary(capsys)


def test_a_zero_router_without_renormalisation_is_said_to_learn_and_a_renormalised_one_to_stay_fixed():
    _, free = api.transform(dense("qwen2"), [{"op": "upcycle_moe", "num_experts": 4, "router": "zeros",
                                              "norm_topk_prob": False}])
    _, fixed = api.transform(dense("qwen2"), [{"op": "upcycle_moe", "num_experts": 4, "router": "zeros"}])
    assert any("routing moves after the first step" in n for n in free.steps[0].promise.notes)
    assert any("training never separates the experts" in n for n in fixed.steps[0].promise.notes)
