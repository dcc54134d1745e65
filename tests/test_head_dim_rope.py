"""grow_head_dim keeps the old rotary frequencies: bit for bit, or up to a float32 rounding it states.

transformers computes pair j's inverse frequency in float32 as 1 / theta ** float32(2j / D), whatever
the model dtype. Where D = m d (m any integer, 3 included), old pair i goes to pair m i and theta is
kept: the same float32 numbers, so the grown model matches its source at any position. Otherwise
theta ** (D/d) gives them back only up to float32 rounding (2i/D and 2i/d round differently); the
plan says how far, and verification measures what that does on the source with the written
frequencies and allows exactly that. Positions here run to 4095 (past the builtins' 2048), where a
frequency one ulp off moves a phase by ~1e-4.
"""
from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import api
from surgery.errors import SurgeryError
from surgery.ops.base import resolve_size
from conftest import ASSETS, save_checkpoint
from factories import make_config, make_model, release_config

FAMILIES = {  # builtin: (head_dim, rotary layout, ops after grow_head_dim that keep it exact)
    "tiny-llama": (16, "full", []),
    "tiny-mistral-hf": (16, "full", []),
    "tiny-olmo2": (16, "full", [{"op": "rescale_norm"}]),  # head_dim is hidden / heads: the residual grows
    "tiny-qwen3": (32, "full", []),
    "tiny-gemma3": (32, "full", []),
    "tiny-stablelm": (16, "partial", [{"op": "rescale_norm"}]),
    "tiny-phi3": (16, "partial", [{"op": "rescale_norm"}]),
}
GROWTHS = ["x3", "x1.5", "x1.25", "+4", "+8", "x2.5", "+12"]  # no power of two among the ratios
ROPE = {  # rope types the op accepts, with settings that put the builtins' frequencies in every band
    "default": {},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # partial rotary only
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},  # partial rotary only
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],  # Phi-3's 12 rotary dims
                 "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0], "original_max_position_embeddings": 64},
}
ROPES = {  # what each builtin's config class accepts (Phi-3: default and longrope; Gemma 3 nests its sections)
    "full": ["default", "linear", "llama3"], "tiny-stablelm": ["default", "linear", "dynamic", "yarn", "llama3"],
    "tiny-phi3": ["default", "longrope"], "tiny-gemma3": ["default"],
}
LONG = torch.arange(4064, 4096)[None]  # position ids
# RMSNorm computes its statistics in float32 whatever the model dtype; q/k norms over a zero-padded,
# longer head round differently (Qwen3, Gemma 3, OLMo 2): measured <= 4e-7 relative.
FLOAT32_NORMS = 1e-6


@functools.lru_cache(maxsize=None)
def builtin(name: str, rope: str = "default"):
    """A builtin in float64, its rope settings replaced by `rope` (the weights kept)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ASSETS / name, dtype=torch.float64)
    if rope == "default":
        return model.eval()
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = {**cfg.rope_parameters, **ROPE[rope]}
    grown = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    grown.load_state_dict(model.state_dict())
    return grown.eval()


def inv_freqs(model) -> dict[str, torch.Tensor]:
    """The float32 frequencies transformers computed for the model (`{layer_type}_inv_freq` in Gemma 3)."""
    return {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}


def with_frequencies(model, frequencies: dict[str, torch.Tensor]):
    out = copy.deepcopy(model)
    for name, f in frequencies.items():
        module, _, leaf = name.rpartition(".")
        out.get_submodule(module)._buffers[leaf] = f.clone()
    return out


def long_logits(model, seed: int):
    x = torch.randint(0, model.config.vocab_size, (1, LONG.shape[1]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=x, position_ids=LONG).logits


def rel_diff(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@settings(max_examples=20, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), growth=st.sampled_from(GROWTHS), data=st.data(), seed=st.integers(0, 100))
def test_grow_head_dim_keeps_the_old_frequencies_bit_for_bit_for_integer_ratios_and_up_to_rounding_otherwise(
        family, growth, data, seed):
    d, rotary, after = FAMILIES[family]
    rope = data.draw(st.sampled_from(ROPES.get(family, ROPES["full"])), label="rope")
    D = resolve_size(growth, d, "head_dim")
    src = builtin(family, rope)
    ops = [{"op": "grow_head_dim", "head_dim": growth}]
    ops[0].update({"residual_fill": "mean"} if family == "tiny-stablelm" else {})
    new, plan = api.transform(src, ops + after)
    old_f, new_f = inv_freqs(src), inv_freqs(new)
    m = D // d if rotary == "full" and D % d == 0 else 1
    # where each old pair is: pair m i (integer ratio m), else pair i; partial rotary keeps the rotary width
    to = [m * i for i in range(len(next(iter(old_f.values()))))]
    reference = src
    if rotary == "partial" or m > 1:  # the same float32 numbers
        assert all(torch.equal(new_f[n][to], f) for n, f in old_f.items())
    else:  # theta ** (D/d): each frequency within a few float32 ulps; the source is run with them
        assert all(((new_f[n][to].double() / f.double() - 1).abs() < 4e-6).all() for n, f in old_f.items())
        reference = with_frequencies(src, {n: new_f[n][to] for n in old_f})
    assert rel_diff(long_logits(reference, seed), long_logits(new, seed)) <= FLOAT32_NORMS


def run_recipe(tmp_path, source: str, ops: list[dict], data: str = "builtin:python-license", **extra):
    recipe = {"name": "rope", "source": source, "output": str(tmp_path / "out"), "seed": 0, "device": "cpu", "ops": ops,
              "verify": {"data": data, "max_tokens": 2048, "tolerance": 1e-4, **extra}}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    return api.run(tmp_path / "recipe.yaml", verify=True)


@pytest.fixture(scope="module")
def qwen3_head_dim_24(tmp_path_factory):
    """A Qwen3 with head_dim 24 (ratio 32/24 = 4/3), float32, random weights."""
    cfg = release_config("qwen3", heads=4, kv_heads=2, head_dim=24, hidden=64, vocab=512, max_position_embeddings=2048)
    return save_checkpoint(make_model(cfg, dtype=torch.float32), tmp_path_factory.mktemp("qwen3-24"))


@pytest.mark.parametrize("source,head_dim,after,integer", [
    ("builtin:tiny-llama", "+4", [], False),
    ("builtin:tiny-mistral-hf", "+8", [], False),
    ("builtin:tiny-olmo2", "+4", [{"op": "rescale_norm"}], False),
    ("qwen3-24", 32, [], False),
    ("builtin:tiny-llama", "x3", [], True),
])
def test_non_power_of_two_head_dim_growth_passes_verification_at_2048_tokens(tmp_path, qwen3_head_dim_24, source, head_dim,
                                                                            after, integer):
    data = "random" if source == "qwen3-24" else "builtin:python-license"
    source = str(qwen3_head_dim_24) if source == "qwen3-24" else source
    result = run_recipe(tmp_path, source, [{"op": "grow_head_dim", "head_dim": head_dim}] + after, data=data)
    report = result.report
    assert report.passed, report.rule
    rope = report.noise_floor["rope"]
    if integer:  # the same frequencies: judged against float32 noise alone
        assert rope is None and "rope" not in report.rule
    else:  # the written frequencies' rounding, measured on the source, is part of the bound and no more
        assert rope is not None and rope["max_logit_diff"] > 0 and "written rope frequencies" in report.rule
        floor = report.noise_floor["compute"]["max_logit_diff"]
        assert report.bound["max_logit_diff"] == pytest.approx(2 * (floor + rope["max_logit_diff"]))


def test_a_written_rope_theta_off_by_more_than_rounding_gets_no_allowance_and_fails(tmp_path):
    """The allowance covers float32 rounding of the frequencies, not a wrong theta."""
    from surgery.verify.run import verify_plan

    result = run_recipe(tmp_path, "builtin:tiny-llama", [{"op": "grow_head_dim", "head_dim": "+4"}], max_tokens=512)
    assert result.report.passed
    config = tmp_path / "out" / "config.json"
    c = json.loads(config.read_text())
    c["rope_parameters"]["rope_theta"] *= 1.001
    config.write_text(json.dumps(c))
    report = verify_plan(api.plan(tmp_path / "recipe.yaml"), tmp_path / "out", torch.device("cpu"))
    assert not report.passed and report.noise_floor["rope"] is None
    assert "written rope frequencies differ from the reference's by more than float32 rounding" in report.rule


def test_the_plan_states_how_many_old_frequencies_float32_rounds_and_how_verification_allows_for_it(tmp_path):
    from surgery.verify.schedule import schedule

    src = builtin("tiny-llama")
    _, plan = api.transform(src, [{"op": "grow_head_dim", "head_dim": "+4"}])
    note = next(n for n in plan.steps[0].promise.notes if "rope_theta" in n)
    differ, of = map(int, re.search(r"(\d+) of (\d+) differ", note).groups())
    grown = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**plan.final.spec.config))
    old, new = inv_freqs(src)["model.rotary_emb.inv_freq"], inv_freqs(grown)["model.rotary_emb.inv_freq"][:8]
    assert (differ, of) == (int((old != new).sum()), 8) and differ > 0
    assert plan.steps[0].promise.rotary.rounded is not None
    recipe = {"name": "r", "source": "builtin:tiny-llama", "output": str(tmp_path / "o"),
              "ops": [{"op": "grow_head_dim", "head_dim": "+4"}]}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    assert "written rope frequencies' float32 rounding" in schedule(api.plan(tmp_path / "r.yaml")).planned_rule()
    _, plan = api.transform(src, [{"op": "grow_head_dim", "head_dim": "x3"}])
    assert plan.final.spec.config["rope_parameters"]["rope_theta"] == 10000.0
    assert plan.steps[0].promise.rotary.rounded is None and plan.steps[0].promise.rotary.to == tuple(range(0, 24, 3))


@pytest.mark.parametrize("rope", ["dynamic", "yarn"])
def test_full_rotary_refuses_rope_types_that_derive_frequencies_from_head_dim_otherwise(rope):
    cfg = make_config("llama", hidden_heads=2, kv_heads=1, head_dim=4, vocab=32)
    cfg.rope_parameters = {**ROPE[rope], "rope_theta": 10000.0}
    with pytest.raises(SurgeryError) as e:
        api.transform(make_model(cfg), [{"op": "grow_head_dim", "head_dim": 12}])
    assert f"rope_type {rope!r}" in e.value.message and e.value.loc == ("ops", 0, "head_dim")


def test_a_rope_theta_raised_beyond_float32_is_refused_with_the_growths_that_keep_it():
    model = make_model(make_config("llama", hidden_heads=2, kv_heads=1, head_dim=4, vocab=32))
    with pytest.raises(SurgeryError) as e:
        api.transform(model, [{"op": "grow_head_dim", "head_dim": 42}])  # 10000 ** 10.5 = 1e42
    assert "overflows float32" in e.value.message and "multiple of 4" in e.value.message and e.value.loc == ("ops", 0, "head_dim")
    new, _ = api.transform(model, [{"op": "grow_head_dim", "head_dim": 44}])
    assert new.config.rope_parameters["rope_theta"] == 10000.0


def test_partial_rotary_refuses_proportional_rope_which_divides_by_the_whole_head_dim():
    cfg = make_config("stablelm", hidden_heads=2, kv_heads=2, head_dim=8, vocab=32)
    cfg.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(SurgeryError) as e:
        api.transform(make_model(cfg), [{"op": "grow_head_dim", "head_dim": 12, "residual_fill": "mean"}, {"op": "rescale_norm"}])
    assert "rope_type 'proportional'" in e.value.message and e.value.loc == ("ops", 0, "head_dim")
