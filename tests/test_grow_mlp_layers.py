"""grow_mlp and grow_layers: exact in stock transformers, trainable, and strict about their values.

Every property test builds a float64 random model (tests/factories.py: random norms, biases and an
off-centre embedding, so no growth is right by accident), applies the ops through `api.transform`
and compares logits with the source on random ids.

Precision: MLP and layer growth leave every norm's input untouched (new neurons and new blocks add
exact zeros), so their logits match to float64 rounding (1e-12 relative). A growth of the residual
(grow_heads + rescale_norm) changes the width the norms average over; RMSNorm (Llama, Mistral,
Qwen2) upcasts to float32 internally, whatever the model dtype, so those compositions agree only
to float32 rounding (~1e-7, asserted at 1e-5). StableLM's LayerNorm runs in float64, and with
patch_layernorm it is exact at float64 precision.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import api
from surgery.cli import main as cli_main
from surgery.errors import SurgeryError
from surgery.ops import Exactness
from surgery.ops.grow_layers import GrowLayers, spread_positions
from surgery.recipe.loader import load_recipe
from surgery.recipe.schema import Recipe
from factories import FAMILIES, logits, make_config, make_model

VOCAB = 32
FLOAT64 = 1e-12  # float64 rounding: nothing but exact zeros was added
FLOAT32_NORM = 1e-5  # RMSNorm's internal float32, once the residual width changed
GQA = [(4, 2), (4, 4), (4, 1), (2, 1)]  # (query heads, kv heads)
RECIPES = str(Path(api.__file__).parent / "recipes") + "/"
PROPERTY = settings(max_examples=15, deadline=None)


def build(family, *, layers=2, heads=(4, 2), head_dim=4, intermediate=12, tied=False, bias=True,
          qk_layernorm=False, parallel=False, layer_types=None, seed=0):
    cfg = make_config(family, hidden_heads=heads[0], kv_heads=heads[1], head_dim=head_dim, layers=layers,
                      intermediate=intermediate, vocab=VOCAB, tied=tied, qkv_bias=bias,
                      qk_layernorm=qk_layernorm, parallel_residual=parallel)
    if layer_types is not None:  # Qwen2 with sliding-window layers: the window (3) is shorter than the ids
        cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 3, 0
        cfg.layer_types = list(layer_types)
    return make_model(cfg, seed=seed)


def ids(seed=0, length=10):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def rel_diff(a, b):
    return float((a - b).abs().max() / a.abs().max())


def check_counts(new, plan):
    """What `surgery plan` prints is what the materialized model holds."""
    assert plan.final.num_parameters == new.num_parameters()
    assert sum(p.numel() for p in new.parameters()) == new.num_parameters()


# ---------------------------------------------------------------------------------- grow_mlp
@PROPERTY
@given(family=st.sampled_from(FAMILIES), heads=st.sampled_from(GQA), head_dim=st.sampled_from([4, 8]),
       intermediate=st.integers(4, 20), extra=st.integers(1, 12), form=st.sampled_from(["abs", "plus", "x2"]),
       tied=st.booleans(), bias=st.booleans(), init=st.sampled_from(["trainable", "zeros"]))
def test_grow_mlp_keeps_logits_at_float64_precision_in_every_family(family, heads, head_dim, intermediate, extra, form,
                                                                      tied, bias, init):
    model = build(family, heads=heads, head_dim=head_dim, intermediate=intermediate, tied=tied, bias=bias)
    size = {"abs": intermediate + extra, "plus": f"+{extra}", "x2": "x2"}[form]
    want = {"abs": intermediate + extra, "plus": intermediate + extra, "x2": 2 * intermediate}[form]
    new, plan = api.transform(model, [{"op": "grow_mlp", "intermediate_size": size, "init": init}])
    assert new.config.intermediate_size == want
    assert plan.promise.exactness == Exactness.EXACT
    x = ids()
    assert rel_diff(logits(model, x), logits(new, x)) <= FLOAT64
    check_counts(new, plan)
    sd = new.state_dict()
    down = sd["model.layers.0.mlp.down_proj.weight"]
    assert down[:, intermediate:].abs().max() == 0
    gate = sd["model.layers.0.mlp.gate_proj.weight"][intermediate:]
    assert (gate.abs().max() > 0) == (init == "trainable")


# -------------------------------------------------------------------------------- grow_layers
def expected_layer_types(types, new, positions):
    """Old layers keep their type; a new block takes the type of the layer before it (layer 0 at the front)."""
    out, old = [], iter(types)
    for p in range(new):
        out.append((out[-1] if out else types[0]) if p in positions else next(old))
    return out


@PROPERTY
@given(data=st.data(), family=st.sampled_from(FAMILIES), heads=st.sampled_from(GQA), layers=st.integers(1, 4),
       extra=st.integers(1, 4), source=st.sampled_from(["copy", "fresh"]), init=st.sampled_from(["trainable", "zeros"]),
       tied=st.booleans(), bias=st.booleans(), stablelm_variant=st.sampled_from(["plain", "qk_layernorm", "parallel"]))
def test_grow_layers_keeps_logits_at_float64_precision_and_layer_types_follow(data, family, heads, layers, extra, source,
                                                                             init, tied, bias, stablelm_variant):
    new_count = layers + extra
    positions = data.draw(st.one_of(st.none(), st.lists(st.integers(0, new_count - 1), min_size=extra, max_size=extra,
                                                        unique=True)), label="positions")
    types = None
    if family == "qwen2":
        types = data.draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=layers,
                                   max_size=layers), label="layer_types")
    model = build(family, heads=heads, layers=layers, tied=tied, bias=bias, layer_types=types,
                  qk_layernorm=family == "stablelm" and stablelm_variant == "qk_layernorm",
                  parallel=family == "stablelm" and stablelm_variant == "parallel")
    op = {"op": "grow_layers", "num_layers": new_count, "from": source, "init": init}
    if positions is not None:
        op["positions"] = positions
    new, plan = api.transform(model, [op])
    assert new.config.num_hidden_layers == new_count
    assert plan.promise.exactness == Exactness.EXACT
    x = ids()
    assert rel_diff(logits(model, x), logits(new, x)) <= FLOAT64
    check_counts(new, plan)
    where = set(positions if positions is not None else spread_positions(layers, extra))
    if types is not None:
        assert new.config.layer_types == expected_layer_types(types, new_count, where)
    sd = new.state_dict()
    for p in where:
        assert sd[f"model.layers.{p}.self_attn.o_proj.weight"].abs().max() == 0
        assert sd[f"model.layers.{p}.mlp.down_proj.weight"].abs().max() == 0


# ------------------------------------------------------------------------------ compositions
@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), heads=st.sampled_from(GQA), tied=st.booleans(),
       order=st.sampled_from(list(itertools.permutations(range(3)))), residual=st.sampled_from(["grow", "keep"]),
       source=st.sampled_from(["copy", "fresh"]))
def test_mlp_and_layer_growth_compose_with_grow_heads_in_any_order(family, heads, tied, order, residual, source):
    h, k = heads
    model = build(family, heads=heads, tied=tied)
    if family == "stablelm":
        residual = "grow"  # StableLM's head_dim is hidden / heads: the residual grows with the heads
    heads_unit = [{"op": "grow_heads", "num_heads": 2 * h, "residual": residual}]
    if residual == "grow":
        heads_unit.append({"op": "rescale_norm"})
        if family == "stablelm":
            heads_unit.append({"op": "patch_layernorm"})
    units = [heads_unit, [{"op": "grow_mlp", "intermediate_size": "+5"}],
             [{"op": "grow_layers", "num_layers": "+2", "from": source}]]
    ops = [op for i in order for op in units[i]]
    new, plan = api.transform(model, ops)
    assert (new.config.num_attention_heads, new.config.intermediate_size, new.config.num_hidden_layers) == (2 * h, 17, 4)
    x = ids()
    if family == "stablelm":  # patched LayerNorm, computed in float64
        assert plan.promise.exactness == Exactness.EXACT_SHIPPED_CODE
        tol = FLOAT64
    else:
        assert plan.promise.exactness == Exactness.EXACT
        tol = FLOAT64 if residual == "keep" else FLOAT32_NORM
    assert rel_diff(logits(model, x), logits(new, x)) <= tol
    check_counts(new, plan)


# ------------------------------------------------------------------------- layout and content
def test_default_positions_put_one_new_block_after_each_group_as_llama_pro_does():
    assert spread_positions(32, 8) == [4, 9, 14, 19, 24, 29, 34, 39]  # LLaMA Pro: 32 -> 40, after every 4th layer
    assert spread_positions(2, 2) == [1, 3]
    assert spread_positions(3, 2) == [2, 4]  # uneven groups: 2 layers, then 1
    assert spread_positions(2, 3) == [1, 3, 4]  # more new blocks than layers: every new block follows an old one


def test_copied_blocks_hold_the_preceding_layer_with_zero_writers_and_fresh_ones_its_statistics():
    model = build("llama", layers=2, bias=True)
    old = model.state_dict()
    copy, _ = api.transform(model, [{"op": "grow_layers", "num_layers": 4, "positions": [0, 2], "from": "copy"}])
    fresh, _ = api.transform(model, [{"op": "grow_layers", "num_layers": 4, "positions": [0, 2], "from": "fresh"}])
    # output layers: new(made from 0), old 0, new(made from 0), old 1
    for new_layer, old_layer in ((0, 0), (1, 0), (2, 0), (3, 1)):
        for part in ("self_attn.q_proj.weight", "self_attn.k_proj.bias", "mlp.up_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            assert torch.equal(copy.state_dict()[f"model.layers.{new_layer}.{part}"], old[f"model.layers.{old_layer}.{part}"])
    for new_layer in (0, 2):
        for part in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight"):
            assert copy.state_dict()[f"model.layers.{new_layer}.{part}"].abs().max() == 0
        f, o = fresh.state_dict(), old
        assert torch.equal(f[f"model.layers.{new_layer}.input_layernorm.weight"], o["model.layers.0.input_layernorm.weight"])
        q_new, q_old = f[f"model.layers.{new_layer}.self_attn.q_proj.weight"], o["model.layers.0.self_attn.q_proj.weight"]
        assert not torch.equal(q_new, q_old)
        assert abs(float(q_new.std()) / float(q_old.std()) - 1) < 0.3
    assert not torch.equal(fresh.state_dict()["model.layers.0.mlp.gate_proj.weight"],
                           fresh.state_dict()["model.layers.2.mlp.gate_proj.weight"])


def test_stablelm_per_head_qk_norms_are_renumbered_and_copied_with_their_layer():
    model = build("stablelm", layers=2, qk_layernorm=True)
    old = model.state_dict()
    new, _ = api.transform(model, [{"op": "grow_layers", "num_layers": 3, "positions": [1]}])
    sd = new.state_dict()
    for head in range(4):
        name = "model.layers.{}.self_attn.q_layernorm.norms.%d.weight" % head
        assert torch.equal(sd[name.format(2)], old[name.format(1)])  # old layer 1 moved to 2
        assert torch.equal(sd[name.format(1)], old[name.format(0)])  # the new block copies layer 0


def test_qwen2_layer_types_move_with_their_layers_and_matter_to_the_logits():
    types = ["full_attention", "sliding_attention", "full_attention"]
    model = build("qwen2", layers=3, layer_types=types)
    x = ids(length=12)
    ref = logits(model, x)
    # the sliding window is shorter than the ids: a wrong layer type would change the logits
    assert rel_diff(ref, logits(build("qwen2", layers=3, layer_types=["full_attention"] * 3), x)) > 1e-6
    new, plan = api.transform(model, [{"op": "grow_layers", "num_layers": 6, "positions": [0, 3, 5]}])
    assert new.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention",
                                      "full_attention", "full_attention"]
    assert rel_diff(ref, logits(new, x)) <= FLOAT64


def test_solar_layout_with_identity_false_equals_the_two_stacks_joined_and_is_promised_approximate():
    model = build("llama", layers=4)
    new, plan = api.transform(model, [{"op": "grow_layers", "num_layers": 6, "from": "copy", "identity": False,
                                       "positions": [3, 4], "from_layers": [1, 2]}])
    assert plan.promise.exactness == Exactness.APPROXIMATE
    assert "identity: false" in plan.promise.reason
    assert plan.final.new_slices == []
    # SOLAR with overlap 1: layers [0, 1, 2] + [1, 2, 3], built by hand
    cfg = make_config("llama", hidden_heads=4, kv_heads=2, head_dim=4, layers=6, intermediate=12, vocab=VOCAB)
    ref = make_model(cfg)
    src = model.state_dict()
    stacked = {}
    for name, t in src.items():
        if ".layers." not in name:
            stacked[name] = t
    for out_layer, old_layer in enumerate([0, 1, 2, 1, 2, 3]):
        prefix = f"model.layers.{old_layer}."
        for name, t in src.items():
            if name.startswith(prefix):
                stacked[f"model.layers.{out_layer}." + name[len(prefix):]] = t
    ref.load_state_dict(stacked)
    x = ids()
    assert rel_diff(logits(ref, x), logits(new, x)) <= FLOAT64
    assert rel_diff(logits(model, x), logits(new, x)) > 1e-3  # not function-preserving, as promised


# ------------------------------------------------------------------------------ new slices
def test_trainable_growth_records_every_zero_writer_as_a_new_slice_and_each_gets_gradient():
    model = build("llama", layers=2, intermediate=12, bias=True)
    new, plan = api.transform(model, [{"op": "grow_mlp", "intermediate_size": 16},
                                      {"op": "grow_layers", "num_layers": 3, "positions": [1]}])
    got = {(s.tensor, s.axis, tuple(s.index), s.op) for s in plan.final.new_slices}
    want = {(f"model.layers.{layer}.mlp.down_proj.weight", 1, (12, 13, 14, 15), "grow_mlp") for layer in (0, 2)}
    for part, rows in (("self_attn.o_proj.weight", 16), ("self_attn.o_proj.bias", 16), ("mlp.down_proj.weight", 16)):
        want.add((f"model.layers.1.{part}", 0, tuple(range(rows)), "grow_layers"))
    assert got == want  # old layer 1's slice followed it to layer 2; the new block's writers are whole new slices
    x = ids()
    new.train()
    new(input_ids=x, labels=x).loss.backward()
    params = dict(new.named_parameters())
    for s in plan.final.new_slices:
        grad = params[s.tensor].grad.index_select(s.axis, torch.tensor(s.index))
        assert grad.abs().max() > 0, s


def test_zeros_init_records_no_new_slices():
    model = build("mistral", layers=2)
    _, plan = api.transform(model, [{"op": "grow_mlp", "intermediate_size": "+4", "init": "zeros"},
                                    {"op": "grow_layers", "num_layers": "+1", "init": "zeros"}])
    assert plan.final.new_slices == []


# ---------------------------------------------------------------------------------- errors
BAD = [
    ([{"op": "grow_mlp", "intermediate_size": 8}], ("ops", 0, "intermediate_size"), "shrink"),
    ([{"op": "grow_mlp", "intermediate_size": 12}], ("ops", 0, "intermediate_size"), "already"),
    ([{"op": "grow_mlp", "intermediate_size": "x1.1"}], ("ops", 0, "intermediate_size"), "not an integer"),
    ([{"op": "grow_mlp", "intermediate_size": "big"}], ("ops", 0, "intermediate_size"), "not a size"),
    ([{"op": "grow_mlp", "intermediate_size": 16, "init": "ones"}], ("ops", 0, "init"), ""),
    ([{"op": "grow_layers", "num_layers": 1}], ("ops", 0, "num_layers"), "shrink"),
    ([{"op": "grow_layers", "num_layers": "x1"}], ("ops", 0, "num_layers"), "already"),
    ([{"op": "grow_layers", "num_layers": 4, "positions": [1]}], ("ops", 0, "positions"), "1 position(s) for 2"),
    ([{"op": "grow_layers", "num_layers": 4, "positions": [0, 4]}], ("ops", 0, "positions", 1), "outside"),
    ([{"op": "grow_layers", "num_layers": 4, "positions": [-1, 2]}], ("ops", 0, "positions", 0), "outside"),
    ([{"op": "grow_layers", "num_layers": 4, "positions": [2, 2]}], ("ops", 0, "positions", 1), "twice"),
    ([{"op": "grow_layers", "num_layers": 4, "positions": [2, 3], "from_layers": [0, 2]}], ("ops", 0, "from_layers", 1),
     "not a layer"),
    ([{"op": "grow_layers", "num_layers": 4, "from_layers": [0]}], ("ops", 0, "from_layers"), "1 layer(s) for 2"),
    ([{"op": "grow_layers", "num_layers": 3, "from": "fresh", "identity": False}], ("ops", 0, "identity"), "from: copy"),
    ([{"op": "grow_layers", "num_layers": 3, "from": "clone"}], ("ops", 0, "from"), ""),
    ([{"op": "grow_layers", "num_layers": 3, "from_": "copy"}], ("ops", 0, "from_"), "unknown key"),
    ([{"op": "grow_mlp", "intermediate_size": 16}, {"op": "grow_layers", "num_layers": 3, "positions": [3]}],
     ("ops", 1, "positions", 0), "outside"),
]


@pytest.mark.parametrize("ops,loc,fragment", BAD, ids=[".".join(map(str, b[1])) + f"[{i}]" for i, b in enumerate(BAD)])
def test_bad_values_raise_surgery_error_naming_the_field(ops, loc, fragment, tiny_llama):
    with pytest.raises(SurgeryError) as e:
        api.transform(tiny_llama, ops)
    assert e.value.loc == loc
    assert fragment in e.value.message


@pytest.fixture(scope="module")
def tiny_llama():
    return build("llama", layers=2, intermediate=12)


# --------------------------------------------------------------------------------- recipes
def test_yaml_key_is_from_and_the_resolved_recipe_round_trips():
    op = GrowLayers.model_validate({"op": "grow_layers", "num_layers": 4, "from": "fresh"})
    assert op.from_ == "fresh"
    assert op.label() == "grow_layers(num_layers=4, from=fresh)"
    loaded = load_recipe(RECIPES + "llama_pro_depth.yaml")
    dumped = loaded.recipe.model_dump(mode="json", exclude_none=True)
    assert dumped["ops"][0]["from"] == "copy" and "from_" not in dumped["ops"][0]
    assert Recipe.model_validate(dumped) == loaded.recipe


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A checkpoint shaped like builtin:tiny-llama (2 layers, 4/2 heads of 16, MLP 160)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = make_config("llama", hidden_heads=4, kv_heads=2, head_dim=16, layers=2, intermediate=160, vocab=VOCAB,
                      qkv_bias=False)
    model = make_model(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("recipe,sets,exactness,layers,inter", [
    ("llama_grow_mlp.yaml", [], Exactness.EXACT, 2, 240),
    ("llama_pro_depth.yaml", [], Exactness.EXACT, 4, 160),
    ("solar_depth_upscale.yaml", ["ops.0.num_layers=4", "ops.0.positions=[2,3]", "ops.0.from_layers=[0,1]"],
     Exactness.APPROXIMATE, 4, 160),
])
def test_recipes_plan_on_a_tiny_llama_and_surgery_plan_counts_the_materialized_parameters(
        recipe, sets, exactness, layers, inter, tiny_llama_dir, capsys):
    path, model = tiny_llama_dir
    loaded = load_recipe(RECIPES + recipe, sets=sets, source=str(path))
    plan = api.plan(loaded)
    spec = plan.final.spec
    assert (spec.num_layers, spec.intermediate_size, plan.promise.exactness) == (layers, inter, exactness)
    new, _ = api.transform(model, [op.model_dump(mode="json") for op in loaded.recipe.ops])
    assert plan.final.num_parameters == new.num_parameters()
    argv = ["plan", RECIPES + recipe, "--source", str(path)] + [a for s in sets for a in ("--set", s)]
    assert cli_main(argv) == 0
    result = capsys.readouterr().out.split("\nresult ")[-1]  # the plan's last section: the model it writes
    assert f"-> {new.num_parameters():,} (" in result


def test_recipe_headers_point_at_the_schema_and_solar_has_a_loose_tolerance():
    for name in ("llama_grow_mlp.yaml", "llama_pro_depth.yaml", "solar_depth_upscale.yaml"):
        text = open(RECIPES + name).read()
        assert text.splitlines()[0] == "# yaml-language-server: $schema=../../schema/recipe.schema.json"
        assert "Exactness:" in text and "Source of the idea:" in text
    assert load_recipe(RECIPES + "solar_depth_upscale.yaml").recipe.verify.tolerance >= 10.0
