"""reinit and init_schemes: each scheme's std per tensor, truncation, ties, reproducibility; inspect.

Expected stds are written out here from the sources (transformers 5 `_init_weights`, OLMo-core's
InitMethod as in seeds/003, GPT-2, the T5 PR of seeds/004), not taken from surgery.init_schemes.
"""
import math
from pathlib import Path

import pytest
import torch
import transformers

from factories import make_config, make_model
from surgery import api
from surgery.errors import SurgeryError
from surgery.io.checkpoint import InMemoryCheckpoint
from surgery.lazy import evaluate
from surgery.plan import compile_plan
from surgery.recipe.loader import LoadedRecipe
from surgery.recipe.schema import Recipe
from surgery.verify.rules import judge

D, N, INTER, VOCAB = 128, 4, 384, 1024  # hidden 128 = 4 heads x 32: ~1M parameters, 8k+ values per matrix
TOL = 0.04  # relative std error: the smallest matrix (k/v, 8192 values) has a sampling error of 0.8%
RECIPES = Path(__file__).resolve().parent.parent / "surgery" / "recipes"


def _phi(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


# std of a unit normal cut at +-3: torch.nn.init.trunc_normal_(std=s, a=-3s, b=3s) draws values of std s * T3
T3 = math.sqrt(1 - 2 * 3 * _phi(3) / math.erf(3 / math.sqrt(2)))


def role_of(name: str) -> str:
    table = {"embed_tokens": "embed", "lm_head": "lm_head", "q_proj": "q", "k_proj": "k", "v_proj": "v",
             "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    for key, role in table.items():
        if key in name:
            return role
    return "norm"


def layer_of(name: str):
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def expected(method: str, name: str, base: float = 0.02):
    """(std handed to the sampler, truncation bound or None) for a weight matrix, from each source."""
    role, i = role_of(name), layer_of(name)
    fan_in = {"o": D, "down": INTER}.get(role, D)
    out_proj = role in ("o", "down")
    if method in ("hf", "normal"):
        return base, None
    if method == "trunc_normal":
        return base, 3 * base
    if method == "scaled":  # GPT-2 c_proj / Megatron scaled_init_method_normal
        return (base / math.sqrt(2 * N) if out_proj else base), None
    if method == "lm_head_inv_sqrt_d":
        return D ** -0.5, None
    olmo = {  # OLMo-core: embeddings / init_final_w_out / Attention.init_weights / init_feed_forward
        "olmo_normal": {"embed": (base, True), "lm_head": (base, True)},
        "olmo_normalized": {"embed": (D ** -0.5, False), "lm_head": (D ** -0.5, True), "q": (D ** -0.5, True),
                            "k": (D ** -0.5, True), "v": (D ** -0.5, True), "gate": (D ** -0.5, True),
                            "up": (D ** -0.5, True),  # w3 keeps the std w1 set
                            "o": (D ** -0.5 / math.sqrt(2 * N), True), "down": (D ** -0.5 / math.sqrt(2 * N), True)},
        "olmo_llama": {"embed": (1.0, False), "lm_head": (D ** -0.5, True), "o": (base / math.sqrt(2 * N), True),
                       "up": (base / math.sqrt(2 * N), True), "down": (base / math.sqrt(2 * N), True)},
        "olmo_llama_depth": {"embed": (1.0, False), "lm_head": (D ** -0.5, True),
                             **{r: (base / math.sqrt(2 * ((i or 0) + 1)), True) for r in ("o", "up", "down")}},
        "olmo_fan_in": {"embed": (1.0, False), "lm_head": (D ** -0.5, True)},
    }[method]
    default = (fan_in ** -0.5, True) if method == "olmo_fan_in" else (base, True)
    std, cut = olmo.get(role, default)
    return std, (3 * std if cut else None)


def make(family="llama", tied=False, vocab=VOCAB, pad=None, seed=0):
    cfg = make_config(family, hidden_heads=4, kv_heads=2, head_dim=32, layers=N, intermediate=INTER, vocab=vocab,
                      tied=tied)
    cfg.pad_token_id = pad
    return make_model(cfg, seed=seed, dtype=torch.float32)


@pytest.fixture(scope="module")
def llama():
    return make()


def reinit(model, seed=0, order=None, **op):
    """Apply one reinit op without building a model: {name: tensor}, plan."""
    data = {"name": "t", "source": "<memory>", "seed": seed, "ops": [{"op": "reinit", **op}]}
    loaded = LoadedRecipe(Recipe.model_validate(data), "<ops>", data)
    sd = dict(model.state_dict())
    if order is not None:
        sd = {k: sd[k] for k in order(list(sd))}
    ckpt = InMemoryCheckpoint(model.config.to_dict(), sd)
    plan = compile_plan(loaded, Path("<memory>"), ckpt)
    names = list(plan.final.tensors)
    if order is not None:
        names = order(names)
    out = {n: evaluate(plan.final.tensors[n], ckpt, torch.device("cpu"), torch.float32) for n in names}
    return out, plan


METHODS = ["hf", "normal", "trunc_normal", "olmo_normal", "olmo_normalized", "olmo_llama", "olmo_llama_depth",
           "olmo_fan_in", "scaled", "lm_head_inv_sqrt_d"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_draws_each_weight_with_its_formula_std_and_cuts_exactly_where_the_source_truncates(llama, method):
    out, plan = reinit(llama, method=method)
    assert plan.promise.exactness.value == "re-initialisation"
    for name, t in out.items():
        if role_of(name) == "norm":
            assert torch.all(t == 1), name
            continue
        if name.endswith("bias"):
            assert torch.all(t == 0), name
            continue
        std, bound = expected(method, name)
        want = std * T3 if bound is not None else std
        got = float(t.double().std())
        assert abs(got / want - 1) < TOL, f"{name}: std {got:.5g}, formula {want:.5g}"
        assert abs(float(t.double().mean())) < 5 * want / math.sqrt(t.numel()), name
        peak = float(t.abs().max())
        if bound is not None:
            assert peak <= bound, f"{name}: {peak} beyond the truncation {bound}"
        else:  # a plain normal of 8k+ values has some beyond 3 std (P(none) ~ e^-22)
            assert peak > 3 * std, f"{name}: looks truncated ({peak} <= 3 * {std})"


@pytest.mark.parametrize("method", ["zeros", "ones"])
def test_zeros_and_ones_fill_every_selected_tensor_norms_and_biases_included(llama, method):
    out, _ = reinit(llama, method=method, targets=["attn.o", "norm"])
    value = 0.0 if method == "zeros" else 1.0
    changed = [n for n in out if "o_proj" in n or "norm" in n or "layernorm" in n]
    assert len(changed) == 2 * N + 2 * N + 1
    assert all(torch.all(out[n] == value) for n in changed)


@pytest.mark.parametrize("family", ["llama", "stablelm"])
def test_hf_matches_a_freshly_constructed_transformers_model_of_the_same_config(family):
    model = make(family, pad=3)
    out, _ = reinit(model, method="hf")
    torch.manual_seed(1)
    fresh = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).state_dict()
    assert set(fresh) == set(out)
    for name, t in out.items():
        f = fresh[name]
        if f.std() == 0:  # norms (ones) and biases (zeros): the same constants
            assert torch.equal(t, f), name
        else:
            assert abs(float(t.std()) / float(f.std()) - 1) < TOL, name
            assert float(t.abs().max()) > 3 * float(f.std()), f"{name}: transformers draws an untruncated normal"
    emb = out["model.embed_tokens.weight"]
    assert torch.all(emb[3] == 0) and torch.all(fresh["model.embed_tokens.weight"][3] == 0)  # padding row


def test_unselected_tensors_stay_bit_identical_and_keep_their_lazy_node(llama):
    out, plan = reinit(llama, method="olmo_llama", targets=["attn.q", "mlp.down"], layers="1-2")
    src = llama.state_dict()
    selected = {f"model.layers.{i}.{m}.weight" for i in (1, 2) for m in ("self_attn.q_proj", "mlp.down_proj")}
    selected |= {f"model.layers.{i}.self_attn.q_proj.bias" for i in (1, 2)}
    for name, t in out.items():
        if name in selected:
            assert not torch.equal(t, src[name]), name
        else:
            assert torch.equal(t, src[name]), name
            assert plan.final.tensors[name] is plan.initial.tensors[name], name
    assert sorted(n for n, *_ in plan.steps[0].touched) == sorted(selected)


def test_same_seed_gives_the_same_bits_whatever_the_visiting_order_or_the_other_selected_tensors(llama):
    full, _ = reinit(llama, method="olmo_llama_depth", seed=7)
    again, _ = reinit(llama, method="olmo_llama_depth", seed=7, order=lambda names: list(reversed(names)))
    assert all(torch.equal(full[n], again[n]) for n in full)
    name = "model.layers.2.mlp.up_proj.weight"
    alone, _ = reinit(llama, method="olmo_llama_depth", seed=7, targets=[name])
    assert torch.equal(alone[name], full[name])
    other, _ = reinit(llama, method="olmo_llama_depth", seed=8, targets=[name])
    assert not torch.equal(other[name], full[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_draws_are_the_same_bits_on_cuda_as_on_cpu(llama):
    cpu, plan = reinit(llama, method="trunc_normal")
    ckpt = InMemoryCheckpoint(llama.config.to_dict(), dict(llama.state_dict()))
    for name, node in plan.final.tensors.items():
        assert torch.equal(evaluate(node, ckpt, torch.device("cuda"), torch.float32).cpu(), cpu[name]), name


def test_a_full_hf_reinit_of_the_builtin_tiny_model_starts_within_5_percent_of_ln_vocab(write_recipe, tmp_path):
    recipe = (RECIPES / "mistral_reinit.yaml").read_text()
    result = api.run(write_recipe(recipe), source="builtin:tiny-llama", output=str(tmp_path / "out"),
                     sets=["verify.max_tokens=256"])
    ln_v = math.log(512)
    assert result.report.passed
    assert abs(result.report.loss_output / ln_v - 1) < 0.05, (result.report.loss_output, ln_v)


def test_lm_head_std_1_gives_a_loss_far_above_ln_vocab_and_inv_sqrt_d_a_sane_one(llama):
    """Seed 004: an lm_head of std 1 makes logits of variance d (loss ~110 for T5); std d^-0.5 makes them ~1."""
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(0))
    ln_v = math.log(VOCAB)
    losses = {}
    for name, op in {"std 1": dict(method="normal", std=1.0), "inv_sqrt_d": dict(method="lm_head_inv_sqrt_d")}.items():
        new, plan = api.transform(llama, [{"op": "reinit", "targets": ["lm_head"], **op}])
        with torch.no_grad():
            losses[name] = float(new(input_ids=ids, labels=ids).loss)
        cmp = type("C", (), {"loss": losses[name]})()
        losses[name + " judged"] = judge(plan.promise, cmp, None, 0.0, VOCAB).passed
    assert losses["std 1"] > 2 * ln_v and not losses["std 1 judged"]
    assert losses["inv_sqrt_d"] < 1.25 * ln_v and losses["inv_sqrt_d judged"]


def test_lm_head_on_a_tied_model_redraws_the_one_shared_tensor_by_the_head_rule_and_says_so():
    model = make(tied=True)
    out, plan = reinit(model, method="lm_head_inv_sqrt_d", targets=["lm_head"])
    emb = out["model.embed_tokens.weight"]
    assert "lm_head.weight" not in out
    assert abs(float(emb.std()) / D ** -0.5 - 1) < TOL
    assert any("input embedding is re-drawn too" in n for n in plan.steps[0].promise.notes)
    # the whole model under an OLMo scheme: the head's rule (truncated d^-0.5), not the embedding's N(0, 1)
    out, _ = reinit(model, method="olmo_llama")
    assert float(out["model.embed_tokens.weight"].abs().max()) <= 3 * D ** -0.5
    # under hf, transformers' own tie: the embedding's draw, padding row zero
    model.config.pad_token_id = 5
    out, _ = reinit(model, method="hf")
    assert torch.all(out["model.embed_tokens.weight"][5] == 0)


def test_std_override_replaces_the_base_std_and_leaves_shape_fixed_stds_alone(llama):
    out, plan = reinit(llama, method="olmo_llama", std=0.04, targets=["attn.q", "attn.o", "embed"])
    assert "base std (0.02, initializer_range) replaced by std 0.04" in plan.steps[0].promise.reason  # not 0.02 alone
    assert abs(float(out["model.layers.0.self_attn.q_proj.weight"].std()) / (0.04 * T3) - 1) < TOL
    assert abs(float(out["model.layers.0.self_attn.o_proj.weight"].std()) / (0.04 / math.sqrt(2 * N) * T3) - 1) < TOL
    assert abs(float(out["model.embed_tokens.weight"].std()) - 1) < TOL


@pytest.mark.parametrize("method", ["olmo_fan_in", "olmo_normalized", "lm_head_inv_sqrt_d", "zeros"])
def test_std_override_is_refused_by_methods_whose_stds_follow_from_shapes(llama, method):
    with pytest.raises(SurgeryError) as e:
        reinit(llama, method=method, std=0.1)
    assert e.value.loc == ("ops", 0, "std")


@pytest.mark.parametrize("targets, index", [(["attn.q", "mlp.gatee"], 1), (["model.layers.9.*"], 0), (["lm_head"], 0)])
def test_a_target_that_selects_nothing_is_an_error_located_at_that_target(llama, targets, index):
    layers = "0-1" if targets == ["lm_head"] else None  # the head sits in no layer
    with pytest.raises(SurgeryError) as e:
        reinit(llama, method="hf", targets=targets, layers=layers)
    assert e.value.loc == ("ops", 0, "targets", index)
    assert "selects no tensor" in e.value.message


@pytest.mark.parametrize("layers", ["3-1", "a", "4", "0-2,x", "", "-1"])
def test_bad_layer_ranges_are_errors_located_at_layers(llama, layers):
    with pytest.raises(SurgeryError) as e:
        reinit(llama, method="hf", layers=layers)
    assert e.value.loc == ("ops", 0, "layers")


def test_an_unknown_method_is_a_schema_error_that_lists_the_methods(llama):
    with pytest.raises(SurgeryError) as e:
        api.transform(llama, [{"op": "reinit", "method": "xavier"}])
    assert "olmo_llama_depth" in str(e.value)


def test_layer_lists_and_role_groups_select_exactly_those_tensors(llama):
    _, plan = reinit(llama, method="normal", targets=["mlp", "norm"], layers="0,2-3")
    touched = {n for n, *_ in plan.steps[0].touched}
    assert touched == {f"model.layers.{i}.{t}.weight" for i in (0, 2, 3) for t in
                       ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}


@pytest.mark.parametrize("recipe", ["mistral_reinit.yaml", "olmo_llama_depth_reinit.yaml", "lm_head_reinit.yaml"])
def test_shipped_reinit_recipes_validate_and_plan_on_the_tiny_llama(recipe):
    path = RECIPES / recipe
    assert path.read_text().startswith("# yaml-language-server: $schema=../../schema/recipe.schema.json\n")
    plan = api.plan(path, source="builtin:tiny-llama")
    assert plan.promise.exactness.value == "re-initialisation"


# surgery inspect ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reinit_dir(llama, tmp_path_factory):
    new, _ = api.transform(llama, [{"op": "reinit", "method": "olmo_llama_depth"}])
    path = tmp_path_factory.mktemp("insp") / "ckpt"
    new.save_pretrained(path)
    return path


def test_inspect_table_gives_shape_mean_std_extremes_tail_share_and_the_scheme_std(reinit_dir):
    from surgery.inspect import format_table, inspect_checkpoint

    r = inspect_checkpoint(reinit_dir, "attn.o", "olmo_llama_depth")  # a role: weights and biases
    assert [s.name for s in r.stats][:3] == ["model.layers.0.self_attn.o_proj.bias", "model.layers.0.self_attn.o_proj.weight",
                                             "model.layers.1.self_attn.o_proj.bias"]
    s = r.stats[7]
    assert s.name == "model.layers.3.self_attn.o_proj.weight"
    assert s.shape == (D, D) and s.max <= 3 * 0.02 / math.sqrt(8) and abs(s.ratio - 1) < TOL
    assert 0 < s.beyond_3std < 0.003  # truncated at 3 sigma: only the values between 3 measured std and the cut
    table = format_table(r)
    for word in ("shape", "mean", "std", "min", "max", ">3std", "olmo_llama_depth std", "ratio", "128x128"):
        assert word in table


def test_inspect_plot_writes_a_png_through_the_cli_entry_points(reinit_dir, tmp_path, capsys):
    import argparse

    from surgery.inspect import add_inspect_parser

    ap = argparse.ArgumentParser()
    add_inspect_parser(ap.add_subparsers(dest="command"))
    png = tmp_path / "h.png"
    args = ap.parse_args(["inspect", str(reinit_dir), "--tensors", "model.layers.[03].*o*_proj.weight",
                          "--method", "olmo_llama_depth", "--plot", str(png), "--log"])
    assert args.handler(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_inspect_glob_that_matches_nothing_is_an_error(reinit_dir):
    from surgery.inspect import inspect_checkpoint

    with pytest.raises(SurgeryError, match="matches no tensor"):
        inspect_checkpoint(reinit_dir, "nothing.*")
