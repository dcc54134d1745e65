"""`surgery run` end to end on checkpoints on disk: written, loadable, verified, source untouched."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery import api
from surgery.cli import main

GROW = """\
name: grow
source: SOURCE
ops:
  - op: grow_heads
    num_heads: x2
  - op: rescale_norm
verify:
  max_tokens: 256
"""


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    model = make_model(make_config("llama", vocab=512, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    return save_checkpoint(model, tmp_path / "src-llama")


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_run_writes_a_checkpoint_that_loads_without_missing_keys(llama_dir, write_recipe, tmp_path):
    out = tmp_path / "out"
    result = api.run(write_recipe(GROW.replace("SOURCE", str(llama_dir))), output=str(out))
    assert result.report.passed
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_attention_heads == 8
    for f in ("config.json", "tokenizer.json", "README.md", "surgery_recipe.yaml", "surgery_report.json", "generation_config.json"):
        assert (out / f).is_file(), f


def test_plan_parameter_count_equals_the_real_output(llama_dir, write_recipe, tmp_path):
    recipe = write_recipe(GROW.replace("SOURCE", str(llama_dir)))
    planned = api.plan(recipe).final.num_parameters
    api.run(recipe, output=str(tmp_path / "out"), verify=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").num_parameters() == planned


def test_source_is_byte_identical_after_a_run(llama_dir, write_recipe, tmp_path):
    before = tree_digest(llama_dir)
    api.run(write_recipe(GROW.replace("SOURCE", str(llama_dir))), output=str(tmp_path / "out"))
    assert tree_digest(llama_dir) == before


def test_report_has_the_fields_and_per_op_steps(llama_dir, write_recipe, tmp_path):
    api.run(write_recipe(GROW.replace("SOURCE", str(llama_dir))), output=str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "surgery_report.json").read_text())
    for key in ("loss_source", "loss_output", "rel_change", "max_logit_diff", "passed", "params_source", "params_output", "steps"):
        assert key in report
    assert [s["op"].split("(")[0] for s in report["steps"]] == ["grow_heads", "rescale_norm"]
    assert abs(report["rel_change"]) < 1e-5 and report["dead_slices"] == []


def test_empty_ops_is_a_bit_identical_copy(llama_dir, write_recipe, tmp_path):
    out = tmp_path / "copy"
    api.run(write_recipe(f"name: copy\nsource: {llama_dir}\n"), output=str(out))
    with safe_open(llama_dir / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k))


def test_small_shard_size_writes_an_index_that_transformers_loads(llama_dir, write_recipe, tmp_path):
    text = GROW.replace("SOURCE", str(llama_dir)) + f"output:\n  path: {tmp_path / 'sharded'}\n  shard_size: 40KB\n"
    result = api.run(write_recipe(text))
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert result.report.passed


def test_bfloat16_output_dtype_is_written(llama_dir, write_recipe, tmp_path):
    text = GROW.replace("SOURCE", str(llama_dir)) + f"output:\n  path: {tmp_path / 'bf16'}\n  dtype: bfloat16\n"
    api.run(write_recipe(text), verify=False)
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_pytorch_model_bin_source_is_read(tmp_path, write_recipe):
    model = make_model(make_config("mistral", vocab=512), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "bin")
    sd = {k: v for k, v in model.state_dict().items()}
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    result = api.run(write_recipe(GROW.replace("SOURCE", str(src))), output=str(tmp_path / "out"))
    assert result.report.passed


def test_non_empty_output_is_refused_without_force(llama_dir, write_recipe, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    recipe = write_recipe(GROW.replace("SOURCE", str(llama_dir)))
    assert main(["run", str(recipe), "--output", str(out), "--no-verify"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert main(["run", str(recipe), "--output", str(out), "--no-verify", "--force"]) == 2  # not an output of surgery
    assert "it holds no surgery_report.json" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"


def test_output_inside_the_source_is_refused(llama_dir, write_recipe, capsys):
    recipe = write_recipe(GROW.replace("SOURCE", str(llama_dir)))
    assert main(["run", str(recipe), "--output", str(llama_dir / "grown")]) == 2
    assert "inside" in capsys.readouterr().err


def test_failed_verification_exits_1_and_names_the_rule(llama_dir, write_recipe, tmp_path, capsys):
    text = f"name: t\nsource: {llama_dir}\nops:\n  - op: grow_heads\n    num_heads: x2\nverify:\n  max_tokens: 64\n  tolerance: 0\n"
    assert main(["run", str(write_recipe(text)), "--output", str(tmp_path / "o")]) == 1
    assert "verification failed" in capsys.readouterr().err


def test_plan_prints_shapes_deltas_and_promise_without_reading_weights(llama_dir, write_recipe, capsys, monkeypatch):
    from surgery.io import checkpoint

    def no_reads(self, name):
        raise AssertionError("plan must not read weights")

    monkeypatch.setattr(checkpoint.Checkpoint, "load", no_reads)
    assert main(["plan", str(write_recipe(GROW.replace("SOURCE", str(llama_dir))))]) == 0
    out = capsys.readouterr().out
    assert "config num_attention_heads: 4 -> 8" in out
    assert "model.layers.0.self_attn.q_proj.weight: [32, 32] -> [64, 64]" in out
    assert "promise: exact" in out


def test_reinit_with_an_lm_head_of_std_1_fails_and_names_the_lm_head(write_recipe, tmp_path, capsys):
    text = ("name: t\nsource: builtin:tiny-llama\nops:\n  - op: reinit\n    method: hf\n"
            "  - op: reinit\n    method: normal\n    targets: [lm_head]\n    std: 1.0\nverify:\n  max_tokens: 256\n")
    assert main(["run", str(write_recipe(text)), "--output", str(tmp_path / "o")]) == 1
    assert "lm_head amplifies" in capsys.readouterr().err


def test_bfloat16_output_is_judged_against_the_measured_bfloat16_rounding_noise(tmp_path):
    r = api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "o"),
                sets=["output.dtype=bfloat16", "verify.max_tokens=512"])
    assert r.report.passed, r.report.rule
    assert "stored as bfloat16" in r.report.precision and "bfloat16 rounding" in r.report.rule
    floor = r.report.noise_floor["storage"]
    assert r.report.max_logit_diff <= r.report.bound["max_logit_diff"] == pytest.approx(
        2 * (floor["max_logit_diff"] + r.report.noise_floor["compute"]["max_logit_diff"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine; runs where one is lent")
def test_gpu_run_writes_the_same_bits_as_the_cpu_run(tmp_path):
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "cpu"), device="cpu", verify=False)
    gpu = api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "gpu"), device="cuda")
    assert gpu.report.passed
    a = json.loads((tmp_path / "cpu" / "surgery_report.json").read_text())["tensor_blake3"]
    b = json.loads((tmp_path / "gpu" / "surgery_report.json").read_text())["tensor_blake3"]
    assert a == b
