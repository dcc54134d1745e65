"""Verdicts are sound: logits judged against measured rounding noise, both ways, after a reinit too.

Each test is a case where a verdict was wrong (issue 12), run where a user meets it: `surgery run`
or `surgery verify` through `surgery.cli.main`. Where a run passes, an independent float64
comparison of the written files must agree: top-1 >= 0.99 and max |dlogit| within the stated bound.
"""
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import ASSETS, save_checkpoint
from factories import FAMILIES, make_config, make_model
from surgery.cli import main
from surgery.ops import Exactness, Promise
from surgery.runtime.evaluation import Comparison
from surgery.verify.pair import compare_checkpoints
from surgery.verify.rules import NoiseFloor, judge


def half_source(builtin: str, dtype: torch.dtype, where: Path) -> Path:
    """A builtin tiny model stored in half precision, as most real checkpoints are."""
    d = where / f"{builtin}-{str(dtype)[6:]}"
    shutil.copytree(ASSETS / builtin, d)
    w = load_file(d / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in w.items()}, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "dtype": str(dtype)[6:]}))
    return d


def report_of(out: Path) -> dict:
    return json.loads((out / "surgery_report.json").read_text())


def assert_independently_sound(out: Path, source: Path | str, tokens: int, min_top1: float | None = 0.99) -> None:
    """A PASSED verdict, checked in float64 outside the judged run, against the stated bound and,
    unless min_top1 is None (random models, where measured rounding alone flips near-ties), 0.99."""
    rep = report_of(out)
    f64 = compare_checkpoints(str(out), str(source), max_tokens=tokens, dtype="float64")
    near_ties_only = f64.max_flip_gap <= 2 * rep["bound"]["max_logit_diff"]  # flips logits within the bound can make
    assert rep["passed"] and (f64.top1_agreement >= rep["bound"]["min_top1_agreement"] or near_ties_only), \
        (f64.top1_agreement, f64.max_flip_gap, rep["rule"])
    assert f64.max_logit_diff <= rep["bound"]["max_logit_diff"], (f64.max_logit_diff, rep["bound"])
    if min_top1 is not None:
        assert rep["bound"]["min_top1_agreement"] == min_top1 and f64.top1_agreement >= min_top1


def run(recipe: Path, *extra: str) -> int:
    return main(["run", str(recipe), *extra])


def test_a_broken_growth_stored_in_bfloat16_fails_on_its_logits(write_recipe, tmp_path, capsys, monkeypatch):
    # Mean fill on RMSNorm is not exact: top-1 agreement ~0.2, while the loss of this untrained model
    # moves by only ~0.5%, which the old rule (2 x bf16 eps on the loss) passed as exact. Planning now
    # refuses mean fill on RMSNorm; the op is made to lie (its LayerNorm path on an RMSNorm model) so
    # the verdict itself is what is tested: a growth that breaks its promise must fail.
    import dataclasses

    import surgery.ops.grow_heads as grow_heads
    from surgery.ops.residual import grow_residual

    def lying(state, *args, **kwargs):
        arch = state.spec.arch
        state.spec.arch = dataclasses.replace(arch, norm="layernorm")
        try:
            grow_residual(state, *args, **kwargs)
        finally:
            state.spec.arch = arch

    monkeypatch.setattr(grow_heads, "grow_residual", lying)
    src = save_checkpoint(make_model(make_config("llama", vocab=512), seed=2, dtype=torch.float32), tmp_path / "src")
    recipe = write_recipe(
        f"name: t\nsource: {src}\noutput: {{path: {tmp_path / 'o'}, dtype: bfloat16}}\nops:\n"
        "  - op: grow_heads\n    num_heads: x2\n    residual_fill: mean\n  - op: rescale_norm\n"
        "verify:\n  max_tokens: 256\n  tolerance: 1.0e-4\n")
    assert run(recipe) == 1
    err = capsys.readouterr().err
    assert "KL" in err and "beyond" in err
    rep = report_of(tmp_path / "o")
    assert abs(rep["rel_change"]) < 2 * torch.finfo(torch.bfloat16).eps, "the case needs a loss that barely moved"
    assert not rep["passed"] and rep["failed"] and rep["top1_agreement"] < 0.99


@pytest.mark.parametrize("recipe,dtype,tokens", [
    ("stablelm_grow_heads_mean_fill", torch.bfloat16, 512),
    ("stablelm_grow", torch.float16, 2048),  # passed at 512 tokens and failed at 2048 under the loss rule
])
def test_shipped_stablelm_recipes_pass_on_half_precision_sources_within_the_measured_noise(recipe, dtype, tokens, tmp_path):
    src = half_source("tiny-stablelm", dtype, tmp_path)
    out = tmp_path / "o"
    assert run(recipe, "--source", str(src), "--output", str(out), "--set", f"verify.max_tokens={tokens}") == 0
    rep = report_of(out)
    before, written = rep["steps"][-2], rep["steps"][-1]
    # the right reason: the exact math (before rounding) holds at float32 precision; the rounding is the rest
    assert "before" in before["op"] and before["passed"] and before["max_logit_diff"] < 1e-4
    assert written["passed"] and f"{str(dtype)[6:]} storage" in written["rule"]
    assert_independently_sound(out, src, tokens)


def test_llama_grow_heads_with_rescaled_norms_passes_on_a_bfloat16_source(write_recipe, tmp_path):
    src = half_source("tiny-llama", torch.bfloat16, tmp_path)
    recipe = write_recipe(f"name: t\nsource: {src}\nops:\n  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n"
                          "verify:\n  max_tokens: 512\n")
    assert run(recipe, "--output", str(tmp_path / "o")) == 0
    assert_independently_sound(tmp_path / "o", src, 512)


def test_a_half_precision_output_one_norm_weight_off_fails_surgery_verify(tmp_path, capsys):
    src = half_source("tiny-stablelm", torch.bfloat16, tmp_path)
    out = tmp_path / "o"
    assert run("stablelm_grow_heads_mean_fill", "--source", str(src), "--output", str(out), "--no-verify") == 0
    assert main(["verify", str(out), "--against", str(src), "--max-tokens", "256"]) == 0
    w = load_file(out / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] * 1.1  # a 10% slip in one tensor: far above bf16 rounding
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(out), "--against", str(src), "--max-tokens", "256"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_unrelated_models_fail_surgery_verify_and_the_failing_metrics_are_named(capsys):
    assert main(["verify", "builtin:tiny-llama", "--against", "builtin:tiny-stablelm", "--max-tokens", "128"]) == 1
    out = capsys.readouterr().out
    assert "verdict FAILED" in out and "max |dlogit|" in out and "top-1 agreement" in out


def test_surgery_verify_tolerance_accepts_an_approximation_within_it_and_refuses_one_beyond(capsys):
    args = ["verify", "builtin:tiny-llama", "--against", "builtin:tiny-stablelm", "--max-tokens", "128", "--json"]
    assert main(args + ["--tolerance", "10"]) == 0
    assert main(args + ["--tolerance", "1e-3"]) == 1
    rep = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert not rep["passed"] and any(f.startswith("|rel change|") or f.startswith("KL") for f in rep["failed"])


def test_surgery_verify_of_a_model_against_itself_passes(capsys):
    assert main(["verify", "builtin:tiny-llama", "--against", "builtin:tiny-llama", "--max-tokens", "64"]) == 0
    assert "verdict PASSED" in capsys.readouterr().out


SOLAR = """\
name: solar
source: SRC
ops:
  - op: grow_layers
    num_layers: 3
    positions: [2]
    from_layers: [1]
    from: copy
    identity: false
verify:
  max_tokens: 256
  tolerance: 1.0e-3
  per_op: false
"""


def test_an_approximate_growth_that_lowers_the_loss_beyond_tolerance_fails(write_recipe, tmp_path, capsys):
    src = save_checkpoint(make_model(make_config("llama", vocab=512), seed=0, dtype=torch.float32), tmp_path / "src")
    assert run(write_recipe(SOLAR.replace("SRC", str(src))), "--output", str(tmp_path / "o")) == 1
    rep = report_of(tmp_path / "o")
    assert rep["rel_change"] < -1e-3, "the case needs a loss that went down"  # the old one-sided rule passed it
    assert any(f.startswith("|rel change|") for f in rep["failed"])


def cmp(rel: float, kl: float, max_diff: float = 5.0, loss: float = 2.0) -> Comparison:
    return Comparison(loss=loss * (1 + rel), rel_change=rel, max_logit_diff=max_diff, mean_logit_diff=max_diff / 10,
                      top1_agreement=0.5, kl_divergence=kl, compared_vocab=64, reference_loss=loss)


FLOOR = NoiseFloor(compute=cmp(0.0, 1e-12, 1e-5))


def test_the_approximate_rule_bounds_the_loss_both_ways_and_the_kl():
    approx = Promise(Exactness.APPROXIMATE, "test")
    assert judge(approx, cmp(-0.0135, 0.0), FLOOR, 1e-4, 64).passed is False  # SOLAR's -1.35% with tolerance 1e-4
    assert judge(approx, cmp(0.0, 0.05), FLOOR, 1e-2, 64).passed is False  # loss unchanged, predictions moved
    ok = judge(approx, cmp(0.005, 0.005), FLOOR, 1e-2, 64)
    assert ok.passed and math.isinf(ok.bound.max_logit_diff)


def test_the_exact_rule_fails_a_model_whose_loss_is_unchanged_but_logits_moved():
    v = judge(Promise(Exactness.EXACT, "test"), cmp(0.0, 0.0, max_diff=1e-3), FLOOR, 1e-4, 64)
    assert v.passed is False and v.failed[0].startswith("max |dlogit|")


REINIT_THEN = """\
name: r
source: builtin:tiny-llama
ops:
  - op: reinit
    method: hf
  - op: grow_heads
    num_heads: x2
EXTRA
verify:
  max_tokens: 256
  per_op: PER_OP
"""


@pytest.mark.parametrize("per_op", ["true", "false"])
def test_growth_after_a_reinit_is_judged_against_the_reinitialised_state(per_op, write_recipe, tmp_path):
    # Without rescale_norm the RMSNorms see a wider residual: approximate, and the initial-loss rule passed it.
    broken = write_recipe(REINIT_THEN.replace("EXTRA", "").replace("PER_OP", per_op), "broken.yaml")
    assert run(broken, "--output", str(tmp_path / "b")) == 1
    rep = report_of(tmp_path / "b")
    assert rep["reference"] == "ops[0] reinit" and rep["broken_by"] == "ops[1] grow_heads"
    assert rep["steps"][0]["passed"] and "initial loss" in rep["steps"][0]["rule"]
    exact = write_recipe(REINIT_THEN.replace("EXTRA", "  - op: rescale_norm").replace("PER_OP", per_op), "exact.yaml")
    assert run(exact, "--output", str(tmp_path / "e")) == 0
    rep = report_of(tmp_path / "e")
    assert rep["steps"][-1]["exactness"] == "exact" and rep["max_logit_diff"] <= rep["bound"]["max_logit_diff"]


BLAME = """\
name: b
source: builtin:tiny-llama
ops:
  - op: grow_mlp
    intermediate_size: x1.5
  - op: grow_layers
    num_layers: 3
    positions: [2]
    from_layers: [1]
    from: copy
    identity: false
verify:
  max_tokens: 128
  tolerance: 1.0e-4
  per_op: PER_OP
"""


def test_broken_by_names_the_failing_op_only_when_each_op_was_evaluated(write_recipe, tmp_path):
    assert run(write_recipe(BLAME.replace("PER_OP", "true"), "a.yaml"), "--output", str(tmp_path / "a")) == 1
    assert report_of(tmp_path / "a")["broken_by"] == "ops[1] grow_layers"
    # one final state cannot tell which op broke it (it used to blame ops[0], the exact grow_mlp)
    assert run(write_recipe(BLAME.replace("PER_OP", "false"), "b.yaml"), "--output", str(tmp_path / "b")) == 1
    assert report_of(tmp_path / "b")["broken_by"] == "one of ops[0..1] (grow_mlp, grow_layers)"


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 10_000),
       tied=st.booleans())
def test_exact_growth_of_a_half_precision_model_passes_and_an_independent_float64_check_agrees(family, dtype, seed, tied):
    # random norm weights and biases, non-zero embedding means (factories), stored in half precision
    model = make_model(make_config(family, vocab=512, tied=tied), seed=seed, dtype=torch.float32).to(dtype)
    ops = "  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n" + ("  - op: patch_layernorm\n" if family == "stablelm" else "")
    with tempfile.TemporaryDirectory() as tmp:
        src = save_checkpoint(model, Path(tmp) / "src")
        recipe = Path(tmp) / "r.yaml"
        recipe.write_text(f"name: p\nsource: {src}\noutput: {Path(tmp) / 'o'}\nops:\n{ops}verify:\n  max_tokens: 128\n  per_op: false\n")
        assert run(recipe) == 0
        assert_independently_sound(Path(tmp) / "o", src, 128, min_top1=None)


def test_each_reinit_is_the_reference_for_the_ops_up_to_the_next(write_recipe, tmp_path):
    # the growth between two re-inits breaks the first re-initialised state: judged, not waved through
    text = ("name: r\nsource: builtin:tiny-llama\nops:\n  - op: reinit\n    method: hf\n  - op: grow_heads\n    num_heads: x2\n"
            "  - op: reinit\n    method: normal\n    targets: [lm_head]\nverify:\n  max_tokens: 128\n  per_op: true\n")
    assert run(write_recipe(text), "--output", str(tmp_path / "o")) == 1
    rep = report_of(tmp_path / "o")
    assert [s["passed"] for s in rep["steps"]] == [True, False, True]
    assert rep["steps"][1]["reference"] == "ops[0] reinit" and rep["broken_by"] == "ops[1] grow_heads"


def test_a_math_error_below_bfloat16_rounding_still_fails_through_the_check_before_rounding(write_recipe, tmp_path, monkeypatch):
    import surgery.ops.rescale_norm as rescale_norm

    exact_scale = rescale_norm.scale
    slip = 1 + 2 ** -10  # a quarter of bfloat16's unit roundoff: rounding alone would hide it
    monkeypatch.setattr(rescale_norm, "scale", lambda node, factor, label: exact_scale(node, factor * slip, label))
    src = half_source("tiny-llama", torch.bfloat16, tmp_path)
    recipe = write_recipe(f"name: t\nsource: {src}\nops:\n  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n"
                          "verify:\n  max_tokens: 256\n")
    assert run(recipe, "--output", str(tmp_path / "o")) == 1
    before, written = report_of(tmp_path / "o")["steps"][-2:]
    assert "before bfloat16 rounding" in before["op"] and before["passed"] is False
    assert written["passed"] is True  # within the measured bfloat16 noise: the written output alone would pass


def test_top1_flips_pass_only_where_the_reference_had_a_near_tie_within_twice_the_logit_bound():
    exact = Promise(Exactness.EXACT, "test")
    floor = NoiseFloor(compute=Comparison(loss=2.0, rel_change=0.0, max_logit_diff=0.05, mean_logit_diff=0.005,
                                          top1_agreement=1.0, kl_divergence=1e-12, compared_vocab=64))  # bound 0.1
    flips = dict(loss=2.0, rel_change=0.0, max_logit_diff=0.08, mean_logit_diff=0.01, top1_agreement=0.97,
                 kl_divergence=1e-13, compared_vocab=64, reference_loss=2.0)
    assert judge(exact, Comparison(**flips, max_flip_gap=0.15), floor, 1e-4, 64).passed is True
    decisive = judge(exact, Comparison(**flips, max_flip_gap=0.5), floor, 1e-4, 64)
    assert decisive.passed is False and decisive.failed[0].startswith("top-1 agreement 0.9700 < 0.9900")
    assert judge(exact, Comparison(**flips), floor, 1e-4, 64).passed is False  # gap unknown: 0.99 holds
