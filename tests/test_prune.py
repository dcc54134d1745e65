"""prune_mlp, prune_heads, prune_layers: what goes, what loads, and what the importance buys.

Exactness of the cut itself: a unit whose writer is zero (an MLP neuron's down_proj column, a head's o_proj
columns, a layer's o_proj and down_proj) contributes nothing, so every importance must rank it last and
pruning it must keep the function. Each property zeroes the writers of random units of a random float64
model of each family, prunes as many units as it zeroed, and compares logits and loss with the source run by
stock transformers; a unit cut from the wrong place (a query head moved out of its kv group, a layer's
tensors renumbered wrong, a layer_types entry left behind) changes them.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from factories import logits, loss, make_config, make_model, release_config
from surgery import api
from surgery.errors import SurgeryError
from surgery.importance import choose_heads, top
from surgery.ops import Exactness

VOCAB = 40
REL = 1e-5
MAX_LOGIT = 1e-3
PROPERTY = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")  # head_dim is a config field
ALL_FAMILIES = HEAD_FAMILIES + ("olmo2", "phi3", "stablelm")
WINDOWS = {"qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1), "gemma2": dict(sliding_window=3),
           "gemma3_text": dict(sliding_window=3, sliding_window_pattern=2)}


@st.composite
def models(draw, families=ALL_FAMILIES, layers=st.integers(1, 2), kv=st.integers(1, 2), rep=st.integers(1, 2)):
    family = draw(st.sampled_from(families))
    kv, rep, head_dim = draw(kv), draw(rep), draw(st.sampled_from([4, 8]))
    n_layers, inter, seed = draw(layers), draw(st.sampled_from([12, 20])), draw(st.integers(0, 1000))
    if family in ("llama", "mistral", "qwen2", "stablelm"):
        cfg = make_config(family, hidden_heads=kv * rep, kv_heads=kv, head_dim=head_dim, layers=n_layers, intermediate=inter,
                          vocab=VOCAB, tied=draw(st.booleans()))
    else:
        extra = dict(WINDOWS.get(family, {}))
        if family not in ("olmo2", "phi3"):
            extra["hidden"] = draw(st.sampled_from([12, 20]))
        cfg = release_config(family, heads=kv * rep, kv_heads=kv, head_dim=head_dim, layers=n_layers, intermediate=inter,
                             vocab=VOCAB, tied=draw(st.booleans()), **extra)
    return family, make_model(cfg, seed=seed)


def ids(seed: int = 0, length: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def assert_same_function(model, pruned):
    x = ids()
    a, b = logits(model, x), logits(pruned, x)
    assert float((a - b).abs().max()) <= MAX_LOGIT
    assert float((a - b).abs().max() / a.abs().max()) < REL
    assert abs(loss(model, x) - loss(pruned, x)) / loss(model, x) < REL


def prune(model, ops):
    try:
        pruned, plan = api.transform(model, ops, calibration_ids=ids(1, 16)[:1])  # stock class; missing/unexpected keys raise
    except SurgeryError as e:  # Gemma's config classes insist on hidden_size % num_heads == 0
        assume("is not a multiple of the number of attention heads" not in str(e))
        raise
    assert type(pruned) is type(model)
    assert pruned.num_parameters() == plan.final.num_parameters
    assert all(s.promise.exactness == Exactness.PRUNED for s in plan.steps)
    return pruned, plan


def zero_(t: torch.Tensor, index=None, axis: int = 1) -> None:
    with torch.no_grad():
        if index is None:
            t.zero_()
        else:
            t.index_fill_(axis, torch.tensor(index, dtype=torch.long), 0.0)


def writers(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return attn.o_proj, mlp.down_proj


@PROPERTY
@given(case=models(), importance=st.sampled_from(["activation", "magnitude"]), dead=st.integers(1, 5), data=st.data())
def test_prune_mlp_drops_exactly_the_neurons_that_write_nothing(case, importance, dead, data):
    family, model = case
    inter = model.config.intermediate_size
    for layer in model.model.layers:
        zero_(writers(layer)[1].weight, data.draw(st.permutations(range(inter)))[:dead], axis=1)
    pruned, plan = prune(model, [{"op": "prune_mlp", "intermediate_size": f"-{dead}", "importance": importance}])
    assert pruned.config.intermediate_size == inter - dead
    assert_same_function(model, pruned)


@PROPERTY
@given(case=models(HEAD_FAMILIES), importance=st.sampled_from(["activation", "magnitude"]), whole_groups=st.booleans(),
       data=st.data())
def test_prune_heads_drops_exactly_the_heads_that_write_nothing_and_keeps_each_query_head_in_its_kv_group(
        case, importance, whole_groups, data):
    family, model = case
    c = model.config
    h, k, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    rep = h // k
    assume(h > 1 and (k > 1 if whole_groups else rep > 1))
    if whole_groups:  # one kv group writes nothing: all its query heads' o_proj columns zero
        g = data.draw(st.integers(0, k - 1))
        dead_heads, op = list(range(g * rep, (g + 1) * rep)), {"num_kv_heads": k - 1}
    else:  # in every group, one query head writes nothing
        dead_heads = [grp * rep + data.draw(st.integers(0, rep - 1)) for grp in range(k)]
        op = {"num_heads": h - k}
    cols = [x * hd + i for x in dead_heads for i in range(hd)]
    for layer in model.model.layers:
        zero_(writers(layer)[0].weight, cols, axis=1)
    pruned, plan = prune(model, [{"op": "prune_heads", "importance": importance, **op}])
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == ((h - rep, k - 1) if whole_groups else (h - k, k))
    assert plan.steps[0].promise.pruning.dropped == [dead_heads] * c.num_hidden_layers
    assert_same_function(model, pruned)


@PROPERTY
@given(case=models(layers=st.integers(2, 4)), importance=st.sampled_from(["block_influence", "angular", "magnitude"]),
       block=st.booleans(), data=st.data())
def test_prune_layers_drops_exactly_the_layers_that_write_nothing_and_their_layer_types_go_with_them(
        case, importance, block, data):
    family, model = case
    n = model.config.num_hidden_layers
    count = data.draw(st.integers(1, n - 1))
    start = data.draw(st.integers(0, n - count))
    dead = list(range(start, start + count)) if block else sorted(data.draw(st.permutations(range(n)))[:count])
    for j in dead:
        for w in writers(model.model.layers[j]):
            zero_(w.weight)
            if w.bias is not None:
                zero_(w.bias)
    types = list(getattr(model.config, "layer_types", None) or [])
    pruned, plan = prune(model, [{"op": "prune_layers", "num_layers": n - count, "importance": importance, "block": block}])
    assert plan.steps[0].promise.pruning.dropped == dead
    if types:
        kept = [t for j, t in enumerate(types) if j not in dead]
        assert pruned.config.layer_types == kept
        if getattr(model.config, "max_window_layers", None) is not None:  # Qwen: what 4.x readers derive the types from
            assert derived_layer_types(pruned.config) == kept
    assert_same_function(model, pruned)


def qwen2_moe_model(layers: int = 4, max_window_layers: int = 3):
    """Qwen2-MoE with sliding windows on: its config slides the even layers below max_window_layers (the
    opposite of Qwen2's rule, where the layers from it on slide)."""
    return make_model(transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=16,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        use_sliding_window=True, sliding_window=3, max_window_layers=max_window_layers, max_position_embeddings=64))


def derived_layer_types(config) -> list[str]:
    """The layer types transformers derives from the config's max_window_layers (as for a config without layer_types)."""
    d = config.to_dict()
    d.pop("layer_types")
    return transformers.AutoConfig.for_model(**d).layer_types


def windows(model) -> list:
    return [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]


@pytest.mark.parametrize("drop, derivable", [([0, 2], True), ([3], True), ([1, 2], True), ([1], False)])
def test_qwen2_moe_layers_keep_their_sliding_windows_and_max_window_layers_is_restated_by_qwen2_moe_own_rule(drop, derivable):
    model = qwen2_moe_model()
    pruned, _ = prune(model, [{"op": "prune_layers", "drop": drop}])
    kept = [j for j in range(4) if j not in drop]
    assert pruned.config.layer_types == [model.config.layer_types[j] for j in kept]
    assert windows(pruned) == [windows(model)[j] for j in kept]
    if derivable:  # a reader deriving the types from max_window_layers gets the same layers sliding
        assert derived_layer_types(pruned.config) == pruned.config.layer_types


def test_qwen2_upcycled_into_qwen2_moe_states_max_window_layers_by_qwen2_moe_rule():
    cfg = make_config("qwen2", layers=3, vocab=VOCAB)
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 3, 3  # no layer slides (Qwen2's rule)
    cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_dict().items() if k != "layer_types"})
    model = make_model(cfg)
    new, _ = api.transform(model, [{"op": "upcycle_moe", "num_experts": 4}])
    assert new.config.layer_types == ["full_attention"] * 3 and windows(new) == windows(model) == [None] * 3
    assert derived_layer_types(new.config) == new.config.layer_types


def without_layers(model, gone):
    """The stock model with the layers in `gone` taken out by hand: the brute force's own cut, no surgery code. It
    attends as transformers does by default (sdpa where the family has it), as the streamed runner does: in float64
    eager and sdpa differ by ~1e-9."""
    m = copy.deepcopy(model)
    m.set_attn_implementation(m._check_and_adjust_attn_implementation(None))
    kept = [j for j in range(m.config.num_hidden_layers) if j not in gone]
    m.model.layers = torch.nn.ModuleList([m.model.layers[j] for j in kept])
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [m.config.layer_types[j] for j in kept]
    m.config.num_hidden_layers = len(kept)
    return m


def calibration_loss(model, x: torch.Tensor) -> float:
    """Mean next-token cross-entropy in the model's dtype (transformers' own loss casts the logits to float32)."""
    with torch.no_grad():
        z = model(input_ids=x, use_cache=False).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(z, x[0, 1:]))


def every_choice(model, x: torch.Tensor, count: int) -> dict[tuple[int, ...], float]:
    """The loss of the model without each window of `count` consecutive layers (count 1: each layer), run whole."""
    n = model.config.num_hidden_layers
    return {tuple(range(s, s + count)): calibration_loss(without_layers(model, range(s, s + count)), x)
            for s in range(n - count + 1)}


@PROPERTY
@given(case=models(layers=st.integers(2, 4)), block=st.booleans(), data=st.data())
def test_loss_importance_drops_the_layer_or_block_whose_removal_costs_least_of_every_choice_random_included(
        case, block, data):
    family, model = case
    n = model.config.num_hidden_layers
    count = data.draw(st.integers(1, n - 1)) if block else 1
    x = ids(1, 16)[:1]  # the calibration tokens prune() measures on
    op = {"op": "prune_layers", "num_layers": n - count, "block": block}
    pruned, plan = prune(model, [{**op, "importance": "loss"}])
    pruning = plan.steps[0].promise.pruning
    losses = every_choice(model, x, count)
    chosen = losses[tuple(pruning.dropped)]
    assert all(chosen <= other for other in losses.values())
    _, random = api.transform(model, [{**op, "importance": "random"}])
    assert chosen <= losses[tuple(random.steps[0].promise.pruning.dropped)]
    measured = pruning.measurement.scores.tolist()  # the streamed runner's loss of each candidate: the loss itself
    assert measured == pytest.approx(list(losses.values()), rel=1e-12)


@pytest.mark.parametrize("source, count, block", [("tiny-llama", 1, False), ("tiny-llama-deep", 1, False),
                                                  ("tiny-llama-deep", 3, True), ("tiny-gemma2", 1, False)])
def test_loss_importance_on_the_trained_models_drops_what_costs_least_of_every_choice(source, count, block, tmp_path):
    from surgery.verify.data import calibration_ids

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "p", "source": f"builtin:{source}", "verify": {"max_tokens": 256},
                                  "ops": [{"op": "prune_layers", "num_layers": -count, "importance": "loss", "block": block}]}))
    plan = api.plan(recipe, measure=True)
    model = AutoModelForCausalLM.from_pretrained(plan.source_dir, dtype=torch.float64)
    x = calibration_ids(plan.source_dir, "builtin:python-license", 256, model.config.vocab_size)
    losses = every_choice(model, x, count)
    assert losses[tuple(plan.steps[0].promise.pruning.dropped)] == min(losses.values())


def test_loss_importance_keeps_the_layer_of_tiny_llama_that_block_influence_dropped_and_never_loses_to_random(tmp_path):
    """tiny-llama, one of two layers dropped: block influence chose the layer that costs +384%, random +192%."""
    result = run(tmp_path, "tiny-llama", [{"op": "prune_layers", "num_layers": 1, "importance": "loss"}])
    (row,) = result.report.pruning
    assert row.importance == "loss" and len(row.scores) == 2
    assert row.loss == min(row.scores)  # what was measured is what the written output scores
    assert row.loss <= row.random.loss
    influence = run(tmp_path, "tiny-llama", [{"op": "prune_layers", "num_layers": 1}], name="influence")
    assert row.loss < influence.report.pruning[0].loss
    assert_loads_cleanly(result.output)


def test_importance_loss_is_accepted_for_layers_and_refused_for_neurons_and_heads_in_one_line(tmp_path):
    recipe = _recipe(tmp_path, [{"op": "prune_layers", "num_layers": 1, "importance": "loss", "block": True}])
    assert "when the run starts" in api.plan(recipe).steps[0].promise.notes[0]
    for op, noun in (({"op": "prune_mlp", "intermediate_size": "x0.5"}, "neurons"), ({"op": "prune_heads", "num_heads": 2}, "heads")):
        with pytest.raises(SurgeryError, match=f"measured for layers only \\(prune_layers\\); for {noun} use activation"):
            api.plan(_recipe(tmp_path, [{**op, "importance": "loss"}]))


def test_plan_measure_lists_the_layers_loss_importance_drops_and_the_loss_without_each(tmp_path, capsys):
    from surgery.cli import main

    recipe = _recipe(tmp_path, [{"op": "prune_layers", "num_layers": 1, "importance": "loss"}])
    recipe.write_text(recipe.read_text().replace('"ops"', '"verify": {"max_tokens": 128}, "ops"'))
    assert main(["plan", str(recipe), "--measure"]) == 0
    out = capsys.readouterr().out
    assert "(by loss on 128 calibration tokens)" in out and "calibration loss without each layer: 0: " in out


def test_listed_layers_go_and_the_rest_are_renumbered_in_order():
    model = make_model(make_config("llama", layers=4, vocab=VOCAB), seed=3)
    pruned, plan = prune(model, [{"op": "prune_layers", "drop": [2, 0]}])
    assert plan.steps[0].promise.pruning.dropped == [0, 2]
    for new, old in enumerate([1, 3]):
        assert torch.equal(pruned.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight)


def test_top_breaks_ties_by_the_lower_index_and_head_choice_keeps_groups_whole():
    assert top(torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0]), 2) == [1, 2]
    heads, groups = choose_heads(torch.tensor([0.1, 0.2, 5.0, 0.1, 1.0, 1.0]), h=6, k=3, new_h=2, new_k=2)
    assert groups == [1, 2] and heads == [2, 4]  # group 1 (5.1) and 2 (2.0); the best head of each


# the shipped trained models ---------------------------------------------------------------------

# tiny-olmo2 is left out of the comparison: trained 30 steps, its loss (5.43) is near uniform (6.24), and both its
# activation prune (5.375) and its random one (5.362) *lower* it: the difference is noise (magnitude: 5.40 vs 5.47).
TRAINED = ("tiny-llama", "tiny-mistral-hf", "tiny-stablelm", "tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3")


def run(tmp_path, source: str, ops: list[dict], verify: bool = True, name: str = "out"):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps({"name": "prune", "source": f"builtin:{source}", "output": str(tmp_path / name), "ops": ops,
                                  "verify": {"max_tokens": 512}}))
    return api.run(recipe, verify=verify)


def assert_loads_cleanly(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("source", TRAINED)
def test_activation_prune_of_a_trained_model_loads_cleanly_and_loses_less_than_the_seeded_random_prune(source, tmp_path):
    result = run(tmp_path, source, [{"op": "prune_mlp", "intermediate_size": "x0.75"}])
    model = assert_loads_cleanly(result.output)
    assert model.config.intermediate_size == result.plan.initial.spec.intermediate_size * 3 // 4
    (row,) = result.report.pruning
    assert row.importance == "activation" and row.tokens == 512
    assert row.loss < row.random.loss, row  # what the importance bought
    assert result.report.passed
    report = (result.output / "surgery_report.md").read_text()
    assert "same sizes at random" in report and "Dropped by" in report


@pytest.mark.parametrize("count", [1, 2])
def test_block_influence_drops_layers_of_the_deep_trained_model_at_less_loss_than_the_seeded_random_drop(count, tmp_path):
    result = run(tmp_path, "tiny-llama-deep", [{"op": "prune_layers", "num_layers": -count}])
    model = assert_loads_cleanly(result.output)
    assert model.config.num_hidden_layers == 8 - count
    (row,) = result.report.pruning
    assert row.importance == "block_influence" and len(row.dropped) == count and len(row.scores) == 8
    assert row.loss < row.random.loss, row


def test_a_plan_says_data_driven_choices_are_made_at_run_time_and_its_tensors_cannot_be_evaluated(tmp_path):
    from surgery.execute import materialize

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "p", "source": "builtin:tiny-llama",
                                  "ops": [{"op": "prune_layers", "num_layers": 1}]}))
    plan = api.plan(recipe)
    assert "when the run starts" in plan.steps[0].promise.notes[0]
    with pytest.raises(AssertionError, match="when the run starts"):
        materialize(plan.final, plan.checkpoint, torch.device("cpu"))
    measured = api.plan(recipe, measure=True)
    assert measured.steps[0].promise.pruning.dropped in ([0], [1])


def test_prune_then_grow_back_judges_the_growth_exact_against_the_pruned_model(tmp_path):
    result = run(tmp_path, "tiny-llama", [{"op": "prune_mlp", "intermediate_size": "x0.5", "importance": "random"},
                                          {"op": "grow_mlp", "intermediate_size": "x2"}])
    first, second = result.report.steps
    assert first.exactness == "pruned" and first.passed
    assert second.exactness == "exact" and second.passed and second.reference.startswith("ops[0]")
    assert_loads_cleanly(result.output)


def test_a_random_prune_lists_the_units_it_dropped_in_the_report_and_is_its_own_baseline(tmp_path):
    result = run(tmp_path, "tiny-llama", [{"op": "prune_mlp", "intermediate_size": "x0.5", "importance": "random"},
                                          {"op": "prune_layers", "num_layers": 1, "importance": "random"}])
    mlp, layers = (s.promise.pruning for s in result.plan.steps)
    assert [r.importance for r in result.report.pruning] == ["random", "random"]
    assert [r.dropped for r in result.report.pruning] == [mlp.dropped, layers.dropped]
    assert [len(d) for d in mlp.dropped] == [80, 80] and len(layers.dropped) == 1
    assert all(r.random is None and r.beats_random is None for r in result.report.pruning)
    report = (result.output / "surgery_report.md").read_text()
    assert f"- layer 0: {', '.join(map(str, mlp.dropped[0][:16]))}" in report
    assert f"Dropped by `{result.plan.steps[1].op.label()}`: layers {layers.dropped} of 2." in report
    assert "a random prune, its own baseline" in result.report.table()


def test_every_row_states_its_loss_change_against_the_source_and_a_prune_after_a_prune_also_against_the_state_it_pruned(
        tmp_path):
    result = run(tmp_path, "tiny-llama", [{"op": "prune_mlp", "intermediate_size": "x0.75"},
                                          {"op": "prune_heads", "num_heads": 2}])
    rep = result.report
    source = rep.loss_source
    first, second = rep.steps
    for row in (first, second, *rep.pruning, *(r.random for r in rep.pruning)):
        assert row.rel_change == (row.loss - source) / source
    assert rep.rel_change == (rep.loss_output - source) / source and rep.loss_output == second.loss
    assert second.reference == rep.reference == rep.pruning[1].reference == "ops[0] prune_mlp"
    assert second.rel_change_vs_reference == rep.rel_change_vs_reference == rep.pruning[1].rel_change_vs_reference \
        == (second.loss - first.loss) / first.loss
    assert f"{second.rel_change:+.3e} ({second.rel_change_vs_reference:+.3e} vs ops[0] prune_mlp)" in rep.table()
    report = json.loads((result.output / "surgery_report.json").read_text())
    assert report["rel_change"] == rep.rel_change and report["steps"][1]["rel_change_vs_reference"] == second.rel_change_vs_reference


@pytest.mark.parametrize("ops, message", [
    ([{"op": "prune_mlp", "intermediate_size": "x2"}], "would grow from 160 to 320"),
    ([{"op": "prune_heads", "num_heads": 3}], "2 kv heads do not divide 3 query heads"),
    ([{"op": "prune_heads", "num_kv_heads": 1, "num_heads": 4}], "4 query heads over 1 kv heads is 4 per group"),
    ([{"op": "prune_layers", "num_layers": 1, "drop": [0]}], "set either num_layers"),
    ([{"op": "prune_layers", "drop": [0, 1]}], "leaves no model"),
    ([{"op": "prune_layers", "num_layers": "-2"}], "must be positive"),
    ([{"op": "upcycle_moe", "num_experts": 2, "top_k": 1}, {"op": "prune_mlp", "intermediate_size": 8}], "mixture of experts"),
])
def test_impossible_prunes_are_refused_in_one_line_before_any_weight_is_read(ops, message, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "p", "source": "builtin:tiny-llama", "ops": ops}))
    with pytest.raises(SurgeryError, match=message):
        api.plan(recipe)


@pytest.mark.parametrize("family", ["stablelm", "olmo2", "phi3"])
def test_prune_heads_is_refused_where_head_dim_is_hidden_size_over_heads(family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "p", "source": f"builtin:tiny-{family}", "ops": [{"op": "prune_heads", "num_kv_heads": 1}]}))
    with pytest.raises(SurgeryError, match="derives head_dim from hidden_size / num_heads"):
        api.plan(recipe)


def test_barely_trained_olmo2_prunes_load_cleanly_and_the_report_sets_the_random_prune_beside_them(tmp_path):
    result = run(tmp_path, "tiny-olmo2", [{"op": "prune_mlp", "intermediate_size": "x0.75"}, {"op": "prune_layers", "num_layers": 1}])
    assert_loads_cleanly(result.output)
    assert [r.importance for r in result.report.pruning] == ["activation", "block_influence"]
    assert all(math.isfinite(r.random.loss) for r in result.report.pruning)


def test_a_bf16_source_keeps_its_bits_in_every_kept_unit(tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(api.plan(_recipe(tmp_path, []), measure=False).source_dir,
                                         dtype=torch.bfloat16).save_pretrained(src)
    recipe = _recipe(tmp_path, [{"op": "prune_mlp", "intermediate_size": "x0.75", "importance": "random"},
                                {"op": "prune_heads", "num_kv_heads": 1, "importance": "random"}], source=str(src))
    result = api.run(recipe, verify=False)
    a, b = load_file(src / "model.safetensors"), load_file(result.output / "model.safetensors")
    mlp, heads = (s.promise.pruning for s in result.plan.steps)
    for layer in range(2):
        kept = [i for i in range(160) if i not in mlp.dropped[layer]]
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        assert b[down].dtype == torch.bfloat16 and torch.equal(b[down], a[down][:, kept])
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        rows = [h * 16 + i for h in range(4) if h not in heads.dropped[layer] for i in range(16)]
        assert torch.equal(b[q], a[q][rows])


def test_a_mixture_of_experts_loses_layers_and_heads_and_still_loads_cleanly(tmp_path):
    from safetensors.torch import load_file

    recipe = _recipe(tmp_path, [{"op": "upcycle_moe", "num_experts": 4, "top_k": 2},
                                {"op": "prune_layers", "drop": [0]}, {"op": "prune_heads", "num_kv_heads": 1, "importance": "magnitude"}])
    result = api.run(recipe, verify=False)
    model = assert_loads_cleanly(result.output)
    assert (type(model).__name__, model.config.num_hidden_layers, model.config.num_local_experts) == ("MixtralForCausalLM", 1, 4)
    tensors = load_file(result.output / "model.safetensors")
    source = load_file(api.plan(_recipe(tmp_path, []), measure=False).source_dir / "model.safetensors")
    assert torch.equal(tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"], source["model.layers.1.mlp.down_proj.weight"])


def test_plan_measure_on_the_command_line_lists_the_dropped_units(tmp_path, capsys):
    from surgery.cli import main

    recipe = _recipe(tmp_path, [{"op": "prune_heads", "num_heads": 2}])
    assert main(["plan", str(recipe), "--measure"]) == 0
    out = capsys.readouterr().out
    assert "dropped 2 of 4 heads per layer (by activation on 2048 calibration tokens)" in out and "layer 1:" in out


def _recipe(tmp_path, ops, source="builtin:tiny-llama"):
    recipe = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    recipe.write_text(json.dumps({"name": "p", "source": source, "output": str(tmp_path / recipe.stem), "ops": ops}))
    return recipe


def test_measured_importance_without_a_tokenizer_says_to_set_verify_data_and_runs_on_random_ids(tmp_path, capsys):
    from surgery.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        (src / f).write_bytes((api.plan(_recipe(tmp_path, []), measure=False).source_dir / f).read_bytes())
    recipe = _recipe(tmp_path, [{"op": "prune_mlp", "intermediate_size": "x0.75"}], source=str(src))
    assert main(["run", str(recipe), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "importance activation runs the model on calibration tokens" in err and "set verify.data" in err
    assert main(["run", str(recipe), "--set", "verify.data=random", "--set", "verify.max_tokens=64"]) == 0
    assert "activation" in (tmp_path / recipe.stem / "surgery_report.md").read_text()


@pytest.mark.parametrize("ops", [[{"op": "prune_mlp", "intermediate_size": "x0.75", "importance": "random"}],
                                 [{"op": "grow_mlp", "intermediate_size": "x1.25"}]], ids=["prune", "grow"])
def test_a_bf16_output_that_only_moves_stored_values_is_judged_without_storage_rounding(ops, tmp_path):
    """Kept slices, pads and zero fills of bf16 tensors are written as the source's bits: nothing computed is rounded,
    so an exact step is held to float32 noise alone (and no dithered reference pass is spent)."""
    from conftest import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(api.plan(_recipe(tmp_path, []), measure=False).source_dir, dtype=torch.bfloat16)
    src = save_checkpoint(model, tmp_path / "bf16", tokenizer_from="tiny-llama")
    result = api.run(_recipe(tmp_path, ops, source=str(src)))
    assert result.report.passed and result.report.precision == "float32"
    assert result.report.noise_floor["storage"] is None


@PROPERTY
@given(case=models(), grow=st.sampled_from(["mlp", "layers", "heads"]))
def test_a_pruned_model_grown_back_computes_the_pruned_function(case, grow):
    """Prune, then grow: the growth's promise holds relative to the pruned model (its own reference)."""
    family, model = case
    pruned, _ = prune(model, [{"op": "prune_mlp", "intermediate_size": "x0.5", "importance": "random"}])
    assume(grow != "heads" or family in HEAD_FAMILIES)
    op = {"mlp": {"op": "grow_mlp", "intermediate_size": "x2"}, "layers": {"op": "grow_layers", "num_layers": "+1"},
          "heads": {"op": "grow_heads", "num_heads": f"+{model.config.num_key_value_heads}", "residual": "keep"}}[grow]
    try:
        grown, plan = api.transform(pruned, [op])
    except SurgeryError as e:
        assume("is not a multiple of the number of attention heads" not in str(e))
        raise
    assert plan.steps[0].promise.exactness == Exactness.EXACT
    assert_same_function(pruned, grown)
