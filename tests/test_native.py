"""Mistral's native release layout: read in place, written back, bit-exact, and checked independently.

The independent checks never use surgery's permutation: `independent_hf_state_dict` follows the
reference converter (transformers' convert_mistral_weights_to_hf.py) line by line, and
`native_forward` runs the native weights as Mistral's reference code does (interleaved rotary
pairs as complex numbers), with no conversion at all.
"""
import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery import api
from surgery.cli import main
from surgery.convert import add_convert_parser, convert_recipe, run_convert
from surgery.errors import SurgeryError
from surgery.io.native import NativeCheckpoint
from surgery.io.native_params import is_native, params_to_config, read_params
from surgery.io.tokenizer import hf_tokenizer_from_native, text_encoder
from surgery.runtime.build import load_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "surgery" / "assets" / "tiny-mistral"
RECIPE = ROOT / "surgery" / "recipes" / "mistral_native_grow.yaml"
CPU = torch.device("cpu")


# independent implementations ----------------------------------------------------------------

def permute_for_rope(w, n_heads, dim1, dim2):
    """The reference converter's permutation (native interleaved pairs -> rotate_half)."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def independent_hf_state_dict(folder: Path, kv_heads_for_k: str = "n_kv_heads") -> tuple[dict, dict]:
    params = json.loads((folder / "params.json").read_text())
    sd = load_file(folder / "consolidated.safetensors")
    dim, hd = params["dim"], params["head_dim"]
    out = {}
    for k, t in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", k)
        if k == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif k == "norm.weight":
            out["model.norm.weight"] = t
        elif k == "output.weight":
            out["lm_head.weight"] = t
        else:
            i, rest = m.group(1), m.group(2)
            name = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
                    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}[rest]
            if rest == "attention.wq":
                t = permute_for_rope(t, params["n_heads"], params["n_heads"] * hd, dim)
            elif rest == "attention.wk":
                t = permute_for_rope(t, params[kv_heads_for_k], params["n_kv_heads"] * hd, dim)
            out[f"model.layers.{i}.{name}.weight"] = t
    return params, out


def independent_model(folder: Path, dtype=torch.float64, kv_heads_for_k: str = "n_kv_heads"):
    from transformers import MistralConfig, MistralForCausalLM

    params, sd = independent_hf_state_dict(folder, kv_heads_for_k)
    config = MistralConfig(
        vocab_size=params["vocab_size"], hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
        num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"], num_key_value_heads=params["n_kv_heads"],
        head_dim=params["head_dim"], rms_norm_eps=params["norm_eps"], sliding_window=params.get("sliding_window"),
        max_position_embeddings=params.get("max_seq_len", 32768), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)},
    )
    model = MistralForCausalLM._from_config(config, dtype=dtype, attn_implementation="eager")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return model.eval()


def native_forward(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Mistral's reference math on the native weights (float64): RoPE on interleaved pairs as complex numbers."""
    p = json.loads((folder / "params.json").read_text())
    sd = {k: v.double() for k, v in load_file(folder / "consolidated.safetensors").items()}
    T, H, K, hd = ids.numel(), p["n_heads"], p["n_kv_heads"], p["head_dim"]
    freqs = 1.0 / p.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)

    def rope(t):
        c = torch.view_as_complex(t.reshape(T, -1, hd // 2, 2).contiguous())
        return torch.view_as_real(c * cis[:, None, :]).reshape(t.shape)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + p["norm_eps"]) * w

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = sd["tok_embeddings.weight"][ids]
    for i in range(p["n_layers"]):
        w = lambda n: sd[f"layers.{i}.{n}.weight"]  # noqa: E731
        h = rms(x, w("attention_norm"))
        q = rope((h @ w("attention.wq").T).view(T, H, hd))
        k = rope((h @ w("attention.wk").T).view(T, K, hd)).repeat_interleave(H // K, dim=1)
        v = (h @ w("attention.wv").T).view(T, K, hd).repeat_interleave(H // K, dim=1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + mask).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(T, H * hd) @ w("attention.wo").T
        h = rms(x, w("ffn_norm"))
        x = x + (F.silu(h @ w("feed_forward.w1").T) * (h @ w("feed_forward.w3").T)) @ w("feed_forward.w2").T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def license_ids(n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    return tok((ROOT / "surgery" / "assets" / "python-license.txt").read_text(), return_tensors="pt")["input_ids"][:, :n]


def convert(source, out: Path, to: str, verify: bool = False, max_tokens: int = 256):
    loaded = convert_recipe(str(source), str(out), to)
    loaded.recipe.verify.max_tokens = max_tokens
    return api.run(loaded, verify=verify)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "hf"
    convert("builtin:tiny-mistral", out, "hf")
    return out


# reading ----------------------------------------------------------------------------------

def test_builtin_tiny_mistral_is_a_small_native_folder():
    assert is_native(TINY)
    assert {f.name for f in TINY.iterdir()} >= {"params.json", "consolidated.safetensors", "tokenizer.model"}
    assert not (TINY / "config.json").exists()
    assert sum(f.stat().st_size for f in TINY.iterdir()) < 1_000_000


def test_surgery_read_gives_the_logits_of_an_independent_conversion(hf_dir):
    from transformers import AutoModelForCausalLM

    ids = license_ids(128)
    ours = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="eager").eval()
    ref = independent_model(TINY)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    for k in ref_sd:
        assert torch.equal(ours_sd[k], ref_sd[k]), k
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_converted_model_matches_native_reference_math_and_the_n_heads_bug_does_not():
    ids = license_ids(64)
    want = native_forward(TINY, ids[0])
    with torch.no_grad():
        got = load_model(TINY, torch.float64, CPU)(input_ids=ids).logits[0]
        buggy = independent_model(TINY, kv_heads_for_k="n_heads")(input_ids=ids).logits[0]
    assert (got - want).abs().max() < 1e-4  # transformers computes cos/sin in float32
    assert (buggy - want).abs().max() > 1e-2  # wk permuted with the query head count scrambles GQA


def test_tiny_mistral_has_a_low_loss_on_its_training_text():
    ids = license_ids(2048)
    with torch.no_grad():
        loss = float(load_model(TINY, torch.float32, CPU)(input_ids=ids, labels=ids).loss)
    assert loss < 0.5


def test_native_tokenizer_read_by_its_library_equals_sentencepiece_transformers_conversion_and_the_shipped_json():
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    ours, converted, shipped = text_encoder(TINY), hf_tokenizer_from_native(TINY / "tokenizer.model"), AutoTokenizer.from_pretrained(TINY)
    text = (ROOT / "surgery" / "assets" / "python-license.txt").read_text()
    for s in (text, "  indented\n\tline ✓ 42", "Ünïcødé"):
        want = [sp.bos_id()] + sp.encode(s)
        assert ours(s) == want and converted(s)["input_ids"] == want and shipped(s)["input_ids"] == want, s
    assert converted.decode(converted(text)["input_ids"], skip_special_tokens=True) == text


def test_missing_rope_theta_defaults_to_10000_and_kv_heads_to_n_heads(tmp_path):
    f = tmp_path / "params.json"
    f.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 160, "norm_eps": 1e-5, "vocab_size": 512,
                             "sliding_window": "4096"}))
    params, _ = read_params(f)
    cfg = params_to_config(params)
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert cfg["num_key_value_heads"] == 4 and cfg["head_dim"] == 16 and cfg["sliding_window"] == 4096
    assert cfg["max_position_embeddings"] == 32768 and cfg["tie_word_embeddings"] is False


def split_release(dst: Path, modules_split: bool = True) -> Path:
    """The tiny model as a two-rank release: consolidated.00.pth / consolidated.01.pth."""
    dst.mkdir()
    for f in ("params.json", "tokenizer.model"):
        shutil.copyfile(TINY / f, dst / f)
    sd = load_file(TINY / "consolidated.safetensors")
    shards = [{}, {}]
    for i, (k, t) in enumerate(sorted(sd.items())):
        if not modules_split:
            shards[i % 2][k] = t.clone()
            continue
        dim = 1 if re.search(r"tok_embeddings|wo|w2", k) else None if t.ndim == 1 else 0
        parts = [t, t] if dim is None else t.chunk(2, dim=dim)
        for s, part in zip(shards, parts):
            s[k] = part.clone()
    for r, s in enumerate(shards):
        torch.save(s, dst / f"consolidated.{r:02d}.pth")
    return dst


@pytest.mark.parametrize("modules_split", [True, False], ids=["slices-per-rank", "whole-tensors-per-file"])
def test_multi_file_pth_release_is_concatenated_by_the_native_rules(tmp_path, monkeypatch, modules_split):
    one = NativeCheckpoint(TINY)
    folder = split_release(tmp_path / "split", modules_split)
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    two = NativeCheckpoint(folder)
    assert {k: m.shape for k, m in two.tensors.items()} == {k: m.shape for k, m in one.tensors.items()}
    for k in one.tensors:
        assert torch.equal(two.load(k), one.load(k)), k
    # Each pickle is opened once, memory-mapped and unable to run code: memory stays flat.
    assert len(calls) == 2 and all(kw.get("mmap") is True and kw.get("weights_only") is True for kw in calls)


def test_pth_loading_refuses_a_malicious_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copyfile(TINY / "params.json", d / "params.json")
    torch.save({"tok_embeddings.weight": torch.zeros(2), "payload": Payload()}, d / "consolidated.00.pth")
    with pytest.raises(SurgeryError, match="weights_only"):
        NativeCheckpoint(d)
    assert not marker.exists()


# writing ----------------------------------------------------------------------------------

def test_native_to_hf_to_native_is_bit_exact(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "back", "mistral")
    for f in ("consolidated.safetensors", "params.json", "tokenizer.model"):
        assert (tmp_path / "back" / f).read_bytes() == (TINY / f).read_bytes(), f
    assert not (tmp_path / "back" / "config.json").exists()


def test_hf_to_native_to_hf_is_bit_exact_and_writes_the_tied_head(tmp_path):
    model = make_model(make_config("mistral", vocab=512, tied=True, qkv_bias=False), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "hf")
    assert convert(src, tmp_path / "native", "mistral", verify=True).report.passed
    convert(tmp_path / "native", tmp_path / "hf2", "hf")
    with safe_open(tmp_path / "native" / "consolidated.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("output.weight"), f.get_tensor("tok_embeddings.weight"))
    sd = model.state_dict()
    with safe_open(tmp_path / "hf2" / "model.safetensors", "pt") as f:
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), sd[k if k != "lm_head.weight" else "model.embed_tokens.weight"]), k


def test_growth_recipe_on_native_model_verifies_and_params_match_the_grown_shapes(tmp_path):
    out = tmp_path / "grown"
    result = api.run(RECIPE, output=str(out), sets=["verify.max_tokens=512"])
    assert result.report.passed and [s.op.split("(")[0] for s in result.report.steps] == ["grow_heads", "rescale_norm"]
    params = json.loads((out / "params.json").read_text())
    assert (params["dim"], params["n_heads"], params["n_kv_heads"], params["head_dim"]) == (128, 8, 2, 16)
    assert params["norm_eps"] == pytest.approx(5e-6) and not (out / "config.json").exists()
    with safe_open(out / "consolidated.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["layers.0.attention.wq.weight"] == (8 * 16, 128)
    assert shapes["layers.0.attention.wk.weight"] == (2 * 16, 128)
    assert shapes["layers.1.attention.wo.weight"] == (128, 8 * 16)
    assert shapes["tok_embeddings.weight"] == (512, 128) and shapes["norm.weight"] == (128,)
    # The grown native folder is the source's function, read by the independent converter and
    # run by native reference math (no transformers, no permutation at all).
    ids = license_ids(256)
    with torch.no_grad():
        grown = independent_model(out)(input_ids=ids, labels=ids).loss
        source = independent_model(TINY)(input_ids=ids, labels=ids).loss
    assert abs(float(grown) / float(source) - 1) < 1e-6  # float32 weights: rescaled norms round
    assert (native_forward(out, ids[0]) - native_forward(TINY, ids[0])).abs().max() < 1e-4


def test_convert_command_writes_a_verified_native_folder(tmp_path, capsys):
    ap = argparse.ArgumentParser()
    add_convert_parser(ap.add_subparsers(dest="command"))
    model = make_model(make_config("llama", vocab=512, qkv_bias=False), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "llama")
    assert run_convert(ap.parse_args(["convert", str(src), str(tmp_path / "n"), "--to", "mistral"])) == 0
    assert "verification PASSED" in capsys.readouterr().out
    assert is_native(tmp_path / "n") and (tmp_path / "n" / "consolidated.safetensors").is_file()


def test_a_model_with_biases_cannot_be_written_natively(tmp_path):
    model = make_model(make_config("llama", vocab=512, qkv_bias=True), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "llama")
    with pytest.raises(SurgeryError, match="no biases"):
        convert(src, tmp_path / "n", "mistral")
    assert not (tmp_path / "n").exists()


def test_the_command_refuses_a_model_native_code_cannot_run_in_one_line_before_announcing_any_phase(tmp_path, capsys):
    model = make_model(make_config("llama", vocab=512, qkv_bias=True), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "llama")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "n"), "--to", "mistral"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "no biases" in err
    assert not (tmp_path / "n").exists()


# errors -----------------------------------------------------------------------------------

def _edit(params: dict, case: str) -> str:
    if case == "missing":
        del params["hidden_dim"]
    elif case == "type":
        params["n_heads"] = "4"
    elif case == "shapes":
        params["n_kv_heads"] = 4
    elif case == "unknown":
        params["moe"] = {"num_experts": 8}
    return json.dumps(params)


@pytest.mark.parametrize("case,expect", [
    ("missing", "missing field 'hidden_dim'"),
    ("type", "field 'n_heads' must be a positive integer"),
    ("shapes", "'layers.0.attention.wk.weight' (consolidated.safetensors) has shape [32, 64] but params.json (n_kv_heads=4"),
    ("unknown", "field 'moe': mixture-of-experts"),
    ("json", "invalid JSON at line 1"),
])
def test_malformed_params_json_is_a_clear_error_with_exit_code_2(tmp_path, capsys, case, expect):
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("consolidated.safetensors", "tokenizer.model"):
        (d / f).symlink_to(TINY / f)
    params = json.loads((TINY / "params.json").read_text())
    (d / "params.json").write_text("{dim: 64" if case == "json" else _edit(params, case))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {d}\n")
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(d / "params.json") in err and expect in err, err
