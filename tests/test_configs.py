"""Checkpoints as users bring them: transformers-4.x configs, persisted buffers, patched outputs, pinned sources.

Each source here is a random float32 model saved by transformers and then given the config form
real checkpoints carry (rope_theta + rope_scaling, Qwen2 sliding windows without layer_types, no
head_dim). Runs go through the CLI; outputs are then checked independently: loaded by stock
transformers in float64 and compared with the source on the same ids.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery import api
from surgery.card import source_content_hash
from surgery.cli import main
from surgery.verify.data import license_text

VOCAB = 512  # the tiny-stablelm tokenizer's
FLOAT32 = 1e-5  # RMSNorm statistics and RoPE frequencies are float32 in transformers whatever the model dtype
LEGACY_KEYS = ("rope_scaling", "rope_theta", "partial_rotary_factor")
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64, "rope_type": "llama3"}


def source(tmp_path: Path, family: str, name: str = "src", config_edit=None, **shape) -> Path:
    shape = {"hidden_heads": 4, "kv_heads": 2, "head_dim": 8, **shape}
    model = make_model(make_config(family, vocab=VOCAB, **shape), dtype=torch.float32)
    path = save_checkpoint(model, tmp_path / name)
    if config_edit is not None:
        cfg = json.loads((path / "config.json").read_text())
        config_edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def recipe(tmp_path: Path, src: Path, ops: str, max_tokens: int = 96) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(f"name: t\nsource: {src}\nops:\n{ops}\nverify:\n  max_tokens: {max_tokens}\n")
    return p


def run(tmp_path: Path, src: Path, ops: str, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    return main(["run", str(recipe(tmp_path, src, ops)), "--output", str(out), "--force", *flags]), out


def max_rel_logit_diff(src: Path, out: Path, length: int = 48) -> float:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)(input_ids=ids).logits
    return float((a - b).abs().max() / a.abs().max())


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ------------------------------------------------------------------- residual_fill: mean on RMSNorm
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mean_fill_on_rmsnorm_is_refused_with_one_line_naming_the_exact_alternative(tmp_path, capsys, family):
    src = source(tmp_path, family)
    capsys.readouterr()
    code, out = run(tmp_path, src, "  - op: grow_heads\n    num_heads: x2\n    residual_fill: mean\n  - op: rescale_norm")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "ops.0.residual_fill" in err and "RMSNorm" in err and "residual_fill: zero" in err
    assert not out.exists()


# ------------------------------------------------------------------------- rope configs, 4.x style
def llama3_legacy(cfg: dict) -> None:
    """What the Hub ships for Llama 3.x: top-level rope_theta and rope_scaling, as transformers 4.x wrote them."""
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = dict(LLAMA3_SCALING)


def test_llama3_hub_config_keeps_its_frequencies_through_grow_mlp_then_grow_head_dim(tmp_path):
    src = source(tmp_path, "llama", config_edit=llama3_legacy)
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"\n  - op: grow_head_dim\n    head_dim: x2")
    assert code == 0
    cfg = config_of(out)
    assert not set(LEGACY_KEYS) & set(cfg)  # one rope section
    rp = cfg["rope_parameters"]
    assert rp["rope_type"] == "llama3" and rp["factor"] == 8.0 and rp["original_max_position_embeddings"] == 64
    assert rp["rope_theta"] == 500000.0  # x2: old pair i at pair 2i, the same float32 frequency
    assert max_rel_logit_diff(src, out) < FLOAT32


@pytest.mark.parametrize("form", [
    {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},  # legacy "type" key
    {"rope_theta": 20000.0, "rope_scaling": None},
    {"rope_theta": 20000.0},
    {"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 20000.0}, "rope_scaling": {"rope_type": "default"}},  # both: 5.x reads rope_scaling
    {"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 20000.0}},  # transformers 5
], ids=["linear-type", "scaling-null", "theta-only", "both-sections", "rope-parameters"])
def test_every_rope_config_form_is_written_as_one_section_with_the_frequencies_kept(tmp_path, form):
    def edit(cfg):
        cfg.pop("rope_parameters", None)
        cfg.update(json.loads(json.dumps(form)))

    src = source(tmp_path, "mistral", config_edit=edit)
    code, out = run(tmp_path, src, "  - op: grow_head_dim\n    head_dim: \"+4\"", "--no-verify")
    assert code == 0
    cfg = config_of(out)
    assert not set(LEGACY_KEYS) & set(cfg)
    theta = AutoConfig.from_pretrained(src).rope_parameters["rope_theta"]  # what transformers reads from the source
    assert cfg["rope_parameters"]["rope_theta"] == pytest.approx(theta ** 1.5)
    assert max_rel_logit_diff(src, out) < FLOAT32


def test_stablelm_config_as_stablelm_2_ships_it_keeps_its_rotary_dims_through_the_head_dim_recipe(tmp_path):
    def edit(cfg):  # stablelm-2-1_6b's config.json: rope settings at the top level
        cfg.pop("rope_parameters", None)
        cfg.update(partial_rotary_factor=0.25, rope_theta=10000, rope_scaling=None)

    src = source(tmp_path, "stablelm", hidden_heads=4, kv_heads=4, head_dim=16, config_edit=edit)
    out = tmp_path / "out"
    assert main(["run", "stablelm_grow_head_dim", "--source", str(src), "--output", str(out), "--set", "verify.max_tokens=96"]) == 0
    cfg = config_of(out)
    assert not set(LEGACY_KEYS) & set(cfg)
    assert int(cfg["head_dim"] if "head_dim" in cfg else cfg["hidden_size"] // cfg["num_attention_heads"]) == 20
    assert int(20 * cfg["rope_parameters"]["partial_rotary_factor"]) == int(16 * 0.25)  # the same 4 rotary dims


def test_planning_changes_no_config_in_place_and_every_step_holds_one_rope_section(tmp_path):
    from surgery.modeling import config_from_dict
    from surgery.spec import hf_config

    src = source(tmp_path, "llama", config_edit=llama3_legacy)
    p = api.plan(recipe(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"\n  - op: grow_head_dim\n    head_dim: x1.5"))
    assert p.checkpoint.config == config_of(src)  # the loaded config, untouched
    thetas = [s.spec.config["rope_parameters"]["rope_theta"] for s in p.states()]
    assert thetas == [500000.0, 500000.0, pytest.approx(500000.0 ** 1.5)]
    assert all(not set(LEGACY_KEYS) & set(s.spec.config) for s in p.states())
    legacy = config_of(src)
    for build in (hf_config, config_from_dict):  # transformers standardises rope dicts in place: only copies reach it
        built = build(legacy)
        assert legacy == config_of(src) and built.rope_parameters["rope_type"] == "llama3"


# ------------------------------------------------------------------------------ Qwen2 layer_types
def qwen2_legacy_sliding(cfg: dict) -> None:
    """Qwen2 as 4.x wrote it: sliding layers derived from use_sliding_window and max_window_layers."""
    cfg.pop("layer_types", None)
    cfg.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)


def test_qwen2_sliding_layers_stay_with_their_layers_when_a_layer_is_inserted_at_0(tmp_path):
    src = source(tmp_path, "qwen2", layers=3, config_edit=qwen2_legacy_sliding)
    code, out = run(tmp_path, src, "  - op: grow_layers\n    num_layers: 4\n    positions: [0]")
    assert code == 0
    assert config_of(out)["layer_types"] == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert max_rel_logit_diff(src, out) < 1e-12  # the residual is untouched: float64 exact


def test_mistral_sliding_window_applies_to_every_layer_so_inserted_layers_keep_it(tmp_path):
    def edit(cfg):
        cfg["sliding_window"] = 8

    src = source(tmp_path, "mistral", layers=2, config_edit=edit)
    code, out = run(tmp_path, src, "  - op: grow_layers\n    num_layers: 3\n    positions: [0]", "--no-verify")
    assert code == 0
    cfg = config_of(out)
    assert cfg["sliding_window"] == 8 and "layer_types" not in cfg  # MistralConfig has no per-layer types
    assert max_rel_logit_diff(src, out) < 1e-12


# ------------------------------------------------------------------------ patched outputs load loudly
LOAD_PATCHED = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
try:
    AutoModelForCausalLM.from_pretrained(out)
    print("LOADED-WITHOUT-REMOTE-CODE")
except Exception as e:
    print("REFUSED:", type(e).__name__, str(e).splitlines()[0])
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
print("CLASS", type(model).__name__)
tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
ids = tok(open(sys.argv[2]).read(), return_tensors="pt")["input_ids"][:, :int(sys.argv[3])]
with torch.no_grad():
    print("LOSS", float(model(input_ids=ids, labels=ids).loss))
"""


def test_a_patched_output_refuses_stock_loading_and_loads_right_with_remote_code(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "stablelm_grow", "--source", "builtin:tiny-stablelm", "--output", str(out)]) == 0
    report = json.loads((out / "surgery_report.json").read_text())
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    text = tmp_path / "text.txt"
    text.write_text(license_text())
    res = subprocess.run([sys.executable, "-c", LOAD_PATCHED, str(out), str(text), str(report["tokens"])],
                         capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED-WITHOUT-REMOTE-CODE" not in res.stdout
    assert "REFUSED:" in res.stdout and "trust_remote_code" in res.stdout
    assert "CLASS SurgeryStableLmForCausalLM" in res.stdout
    # loaded as users load it, the model gives the loss surgery verified
    loss = float(res.stdout.split("LOSS ")[1].split()[0])
    assert report["passed"] and abs(loss - report["loss_output"]) <= 1e-5 * abs(report["loss_output"])
    assert abs(loss - report["loss_source"]) <= 1e-5 * abs(report["loss_source"])


def test_a_patched_output_is_a_source_surgery_reads_without_asking_to_run_its_code(tmp_path, monkeypatch):
    first = tmp_path / "first"
    assert main(["run", "stablelm_grow", "--source", "builtin:tiny-stablelm", "--output", str(first)]) == 0
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("surgery asked whether to run the shipped code"))
    code, out = run(tmp_path, first, "  - op: grow_mlp\n    intermediate_size: x2")
    assert code == 0
    cfg = config_of(out)
    assert cfg["model_type"] == "surgery_stablelm" and cfg["surgery_live_width"] == config_of(first)["surgery_live_width"]


# -------------------------------------------------------------------------- no head_dim, inv_freq
def drop_head_dim(cfg: dict) -> None:
    cfg.pop("head_dim", None)  # Llama-2 / Qwen2 style: head_dim is hidden_size / num_attention_heads


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_grow_heads_keeping_the_residual_works_on_configs_without_head_dim(tmp_path, family):
    src = source(tmp_path, family, config_edit=drop_head_dim)
    code, out = run(tmp_path, src, "  - op: grow_heads\n    num_heads: x2\n    residual: keep")
    assert code == 0
    cfg = config_of(out)
    assert (cfg["num_attention_heads"], cfg["head_dim"], cfg["hidden_size"]) == (8, 8, 32)
    assert max_rel_logit_diff(src, out) < 1e-12


def test_a_head_count_transformers_rejects_for_the_config_is_refused_with_its_reason(tmp_path, capsys):
    src = source(tmp_path, "llama", config_edit=drop_head_dim)
    capsys.readouterr()
    code, out = run(tmp_path, src, "  - op: grow_heads\n    num_heads: 6\n    residual: keep")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "ops.0: transformers rejects the resulting config: The hidden size (32) is not a multiple" in err


def add_inv_freq(src: Path, layers: int = 2) -> None:
    f = src / "model.safetensors"
    sd = load_file(f)
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    save_file(sd, f, metadata={"format": "pt"})


def test_persisted_rotary_inv_freq_buffers_are_dropped_as_transformers_does_and_the_plan_says_so(tmp_path, capsys):
    src = source(tmp_path, "llama")
    add_inv_freq(src)
    ops = "  - op: grow_mlp\n    intermediate_size: \"+8\""
    assert main(["plan", str(recipe(tmp_path, src, ops))]) == 0
    assert "dropped 2 persisted buffer(s)" in capsys.readouterr().out
    code, out = run(tmp_path, src, ops)
    assert code == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "inv_freq" in k]
    assert max_rel_logit_diff(src, out) < 1e-12



# ------------------------------------------------------------------- a tied config over a stored lm_head
def store_head(src: Path, same: bool) -> None:
    """Store lm_head.weight beside the embedding of a tied source: a copy of it, or other values (bf16 storage)."""
    f = src / "model.safetensors"
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}
    embed = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = embed.clone() if same else torch.randn(embed.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    save_file(sd, f, metadata={"format": "pt"})


def test_a_tied_config_over_a_different_stored_lm_head_is_read_untied_as_transformers_loads_it(tmp_path, capsys):
    """transformers keeps the stored head apart (and warns); reading it tied, a grow wrote another function."""
    src = source(tmp_path, "llama", tied=True)
    store_head(src, same=False)
    ops = "  - op: grow_mlp\n    intermediate_size: \"+8\""
    assert main(["plan", str(recipe(tmp_path, src, ops))]) == 0
    assert "config: tie_word_embeddings: true -> false: lm_head.weight is stored with other values" in capsys.readouterr().out
    code, out = run(tmp_path, src, ops)
    assert code == 0
    assert config_of(out)["tie_word_embeddings"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert max_rel_logit_diff(src, out) < 1e-12


def test_a_tied_config_over_a_stored_copy_of_the_embedding_stays_tied_and_drops_the_copy(tmp_path):
    src = source(tmp_path, "llama", tied=True)
    store_head(src, same=True)
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"")
    assert code == 0
    assert config_of(out)["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert max_rel_logit_diff(src, out) < 1e-12


def test_a_tensor_name_with_a_control_character_is_refused_in_one_line(tmp_path, capsys):
    """The source content hash joins names with newlines and NULs: such a name could pose as two tensors' entries."""
    src = source(tmp_path, "llama")
    f = src / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight\0bfloat16\nmodel.norm.weight"] = torch.zeros(2)
    save_file(sd, f, metadata={"format": "pt"})
    capsys.readouterr()
    code, _ = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"", "--no-verify")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.safetensors" in err and "control character" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()



def test_a_config_whose_model_type_disagrees_with_the_tensors_is_refused_before_writing_even_unverified(tmp_path, capsys):
    """StableLM's config over a Llama's tensors planned cleanly and, with --no-verify, wrote an output transformers
    loads with its layer-norm biases missing."""
    src = source(tmp_path, "llama", config_edit=lambda c: c.update(model_type="stablelm", architectures=["StableLmForCausalLM"]))
    capsys.readouterr()
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"", "--no-verify")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the tensors do not match the model the config describes" in err
    assert "missing keys" in err and str(src / "config.json") in err
    assert not out.exists()



def test_a_tokenizer_giving_ids_beyond_the_vocabulary_is_refused_before_writing(tmp_path, capsys):
    """The builtin 512-token tokenizer beside a 64-token model: verification indexed the embedding past its end
    (exit 3) after the output was written."""
    src = save_checkpoint(make_model(make_config("llama", vocab=64), dtype=torch.float32), tmp_path / "src")
    capsys.readouterr()
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "vocab_size is 64: tokenizer and model disagree" in err
    assert not out.exists()


# --------------------------------------------------------------------------- source content hash
def recorded_hash(out: Path) -> str:
    for line in (out / "surgery_recipe.yaml").read_text().splitlines():
        if line.startswith("# source content blake3"):
            return line.rsplit(" ", 1)[1]
    raise AssertionError("no source hash recorded")


@pytest.mark.parametrize("dtype,flags", [("float32", ()), ("bfloat16", ("--set", "output.dtype=float32"))],
                         ids=["copies-adopt-the-writer-digest", "converted-hashed-as-read"])
def test_source_hash_changes_when_one_weight_byte_changes_and_equals_a_fresh_hash(tmp_path, dtype, flags):
    src = source(tmp_path, "llama")
    if dtype != "float32":
        sd = {k: v.to(getattr(torch, dtype)) for k, v in load_file(src / "model.safetensors").items()}
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"", "--no-verify", *flags)
    assert code == 0
    first = recorded_hash(out)
    assert first == source_content_hash(src)
    sd = load_file(src / "model.safetensors")
    w = sd["model.layers.1.input_layernorm.weight"]  # untouched by grow_mlp: written byte for byte
    w.view(torch.int16)[0] ^= 1  # one bit of one weight: same names, shapes, dtypes and file size
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"", "--no-verify", *flags)
    assert code == 0 and recorded_hash(out) != first


@pytest.mark.parametrize("pieces", [False, True], ids=["computed", "in-pieces"])
def test_the_source_hash_needs_no_second_read_of_the_weights(tmp_path, monkeypatch, pieces):
    """Each source tensor is read at most once while the output is written; kernel-copied ones are hashed from the
    output's bytes. In pieces, grow_mlp's gate/up are read once (their fill draws from them) and copied; down_proj
    only copied. Planning reads the stored lm_head and the embedding once more: a tie holds only if they are equal."""
    from surgery.io import checkpoint

    src = source(tmp_path, "llama", tied=True)
    sd = load_file(src / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # tied but stored: never read by the copy
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    reads: dict[str, int] = {}
    real = checkpoint.Checkpoint.load

    def counting(self, name):
        reads[name] = reads.get(name, 0) + 1
        return real(self, name)

    monkeypatch.setattr(checkpoint.Checkpoint, "load", counting)
    real_rows = checkpoint.Checkpoint.load_rows
    monkeypatch.setattr(checkpoint.Checkpoint, "load_rows",
                        lambda self, name, a, b: counting(self, name) if (a, b) == (0, self.tensors[name].shape[0]) else real_rows(self, name, a, b))
    from surgery import execute

    kernel: set[str] = set()  # untouched tensors: copied by the kernel, hashed from the output's bytes
    real_bytes = execute.source_bytes
    monkeypatch.setattr(execute, "source_bytes", lambda r, name: kernel.add(name) or real_bytes(r, name))
    monkeypatch.setattr(execute, "MIN_PIECE", 0 if pieces else 1 << 60)
    code, out = run(tmp_path, src, "  - op: grow_mlp\n    intermediate_size: \"+8\"", "--no-verify")
    assert code == 0
    for tie_checked in ("lm_head.weight", "model.embed_tokens.weight"):
        reads[tie_checked] -= 1
    reads = {name: n for name, n in reads.items() if n}
    assert reads and max(reads.values()) == 1 and kernel and set(reads) | kernel == set(sd)
    mlp, grown = {n for n in sd if ".mlp." in n}, set(reads) - {"lm_head.weight"}  # lm_head: read by the hash alone
    if pieces:
        assert mlp <= kernel and grown == {n for n in mlp if "down_proj" not in n}
    else:
        assert not kernel & set(reads) and grown == mlp
    assert recorded_hash(out) == source_content_hash(src)


# ------------------------------------------------------------------ property: every form, every family
FORMS = [
    {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_SCALING)},
    {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_theta": 20000.0, "rope_scaling": None},
    {"rope_theta": 20000.0},
    {"rope_parameters": {**LLAMA3_SCALING, "rope_theta": 20000.0}, "rope_scaling": {"rope_type": "default"}},
    {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0}},
]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["llama", "mistral", "qwen2"]), form=st.sampled_from(range(len(FORMS))),
       head_dim=st.sampled_from([4, 8]), growth=st.sampled_from(["+2", "x2"]), insert_first=st.booleans(),
       sliding=st.booleans(), tied=st.booleans(), seed=st.integers(0, 1000))
def test_configs_in_any_form_keep_the_function_transformers_reads_from_them(family, form, head_dim, growth, insert_first,
                                                                          sliding, tied, seed):
    """The reference is the source config as transformers itself reads it, legacy keys and all."""
    from surgery.execute import materialize
    from surgery.io.checkpoint import InMemoryCheckpoint
    from surgery.plan import compile_plan
    from surgery.recipe.loader import validate_recipe
    from surgery.spec import hf_config
    from surgery.runtime.build import model_from_tensors

    model = make_model(make_config(family, hidden_heads=4, kv_heads=2, head_dim=head_dim, layers=2, vocab=48, tied=tied),
                       seed=seed)
    cfg = json.loads(json.dumps(model.config.to_dict()))
    cfg.pop("rope_parameters", None)
    cfg.update(json.loads(json.dumps(FORMS[form])))
    if sliding and family == "qwen2":
        cfg.pop("layer_types", None)
        cfg.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    elif sliding:
        cfg["sliding_window"] = 4
    state = {k: v for k, v in model.state_dict().items()}
    reference = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float64, attn_implementation="eager")
    reference.load_state_dict(state, strict=False)
    reference.eval()
    ops = ([{"op": "grow_layers", "num_layers": 3, "positions": [0]}] if insert_first else []) + \
          [{"op": "grow_head_dim", "head_dim": growth}]
    loaded = validate_recipe({"name": "p", "source": "<memory>", "ops": ops}, "<ops>")
    ckpt = InMemoryCheckpoint(cfg, state)
    before = json.loads(json.dumps(cfg))
    p = compile_plan(loaded, Path("<memory>"), ckpt)
    assert ckpt.config == before  # planning and its config checks worked on copies
    new = model_from_tensors(p.final.spec.config, materialize(p.final, ckpt, torch.device("cpu"), torch.float64),
                             torch.float64, torch.device("cpu"), attn_implementation="eager")
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = reference(input_ids=ids).logits, new(input_ids=ids).logits
    assert float((a - b).abs().max() / a.abs().max()) < FLOAT32
