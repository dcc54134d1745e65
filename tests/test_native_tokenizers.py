"""Native tokenizers are read by the libraries that own them, and weight surgery never fails on one.

The tokenizers are built here, deterministically, from the license text (`tokenizer_factories`):
a sentencepiece model with sentencepiece's default `nmt_nfkc` normalisation (not Mistral's
settings) and a tiny tekken.json in mistral-common's format.
"""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery.cli import main
from surgery.io import tokenizer as native_tok
from surgery.io.tokenizer import read_native_tokenizer, text_encoder
from tokenizer_factories import TEXT, sentencepiece_model, tekken_file, tekken_vocab_size

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "surgery" / "assets" / "tiny-mistral"
GROW = ROOT / "surgery" / "recipes" / "mistral_native_grow.yaml"
PROBES = ("Hello world", "  two  spaces\tand a tab\nnew line", "Ünïcødé ✓ 1234", "ＡＢＣ ﬁ full width", TEXT[:2000])

needs_mistral_common = pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None,
                                          reason="mistral-common is not installed (pip install mistral-common)")


def native_copy(tmp_path: Path, name: str, tokenizer_files: dict[str, Path]) -> Path:
    """tiny-mistral's weights and params with only the given tokenizer files beside them."""
    d = tmp_path / name
    d.mkdir()
    for f in ("params.json", "consolidated.safetensors"):
        shutil.copyfile(TINY / f, d / f)
    for dest, src in tokenizer_files.items():
        shutil.copyfile(src, d / dest)
    return d


@pytest.fixture(scope="module")
def nfkc_model(tmp_path_factory) -> Path:
    return sentencepiece_model(tmp_path_factory.mktemp("spm") / "tokenizer.model", vocab=512, normalization="nmt_nfkc")


@pytest.fixture(scope="module")
def tekken(tmp_path_factory) -> Path:
    return tekken_file(tmp_path_factory.mktemp("tekken") / "tekken.json")


def sentencepiece_ids(model: Path, text: str) -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [sp.bos_id()] + sp.encode(text)


def test_native_release_with_a_non_mistral_sentencepiece_tokenizer_grows_verifies_and_gets_a_tokenizer_json(
        nfkc_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    src = native_copy(tmp_path, "nfkc", {"tokenizer.model": nfkc_model})
    assert main(["run", str(GROW), "--source", str(src), "--output", str(tmp_path / "grown"),
                 "--set", "verify.max_tokens=256"]) == 0
    assert "verification PASSED" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for s in PROBES:
        assert tok(s)["input_ids"] == sentencepiece_ids(nfkc_model, s), s
    assert text_encoder(src)(PROBES[3]) == sentencepiece_ids(nfkc_model, PROBES[3])  # NFKC folds "ＡＢＣ ﬁ" to "ABC fi"


def test_a_tokenizer_json_transformers_cannot_make_is_skipped_with_a_warning_and_the_run_passes(
        nfkc_model, tmp_path, capsys, monkeypatch):
    def no_protobuf(file):
        raise ImportError("SentencePieceExtractor requires the protobuf library but it was not found")

    monkeypatch.setattr(native_tok, "hf_tokenizer_from_native", no_protobuf)
    src = native_copy(tmp_path, "nfkc", {"tokenizer.model": nfkc_model})
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out, err = capsys.readouterr()
    assert "verification PASSED" in out
    assert err.startswith("warning: ") and "no tokenizer.json written" in err and "protobuf" in err
    assert (tmp_path / "hf" / "tokenizer.model").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()


@needs_mistral_common
def test_versioned_sentencepiece_file_is_read_by_mistral_common_and_by_sentencepiece_alike(nfkc_model, tmp_path, monkeypatch):
    src = native_copy(tmp_path, "v3", {"tokenizer.model.v3": nfkc_model})
    tok = read_native_tokenizer(src / "tokenizer.model.v3")
    assert type(tok.encode.__closure__[0].cell_contents).__module__.startswith("mistral_common")
    with_mistral = [tok.encode(s) for s in PROBES]
    monkeypatch.setitem(sys.modules, "mistral_common.tokens.tokenizers.sentencepiece", None)  # import fails
    alone = read_native_tokenizer(src / "tokenizer.model.v3")
    assert [alone.encode(s) for s in PROBES] == with_mistral == [sentencepiece_ids(nfkc_model, s) for s in PROBES]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (alone.bos_id, alone.eos_id, alone.pad_id) == (1, 2, 3)


@pytest.fixture
def tekken_release(tekken, tmp_path) -> Path:
    """A native release (random weights, vocab of the tiny tekken) whose only tokenizer is tekken.json."""
    model = make_model(make_config("mistral", vocab=tekken_vocab_size(), qkv_bias=False), dtype=torch.float32)
    hf = save_checkpoint(model, tmp_path / "hf-src")
    assert main(["convert", str(hf), str(tmp_path / "tekken-native"), "--to", "mistral", "--no-verify"]) == 0
    native = tmp_path / "tekken-native"
    for f in native.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "special_tokens")):
            f.unlink()
    shutil.copyfile(tekken, native / "tekken.json")
    return native


@needs_mistral_common
def test_tekken_release_is_verified_with_mistral_common_and_converts_to_hf_with_its_token_ids(
        tekken, tekken_release, tmp_path, capsys):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers import AutoTokenizer

    ref = Tekkenizer.from_file(tekken)
    assert text_encoder(tekken_release)(TEXT) == ref.encode(TEXT, bos=True, eos=False)
    assert main(["run", str(GROW), "--source", str(tekken_release), "--output", str(tmp_path / "grown"),
                 "--set", "verify.max_tokens=256"]) == 0
    assert main(["convert", str(tekken_release), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "verification PASSED" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (ref.bos_id, ref.eos_id, ref.pad_id)
    with_mistral_common = AutoTokenizer.from_pretrained(tmp_path / "hf")  # tekken.json is copied beside the weights
    converted = AutoTokenizer.from_pretrained(tmp_path / "hf", mistral_format=False)  # the tokenizer.json surgery wrote
    assert type(with_mistral_common).__name__ == "MistralCommonBackend" and (tmp_path / "hf" / "tokenizer.json").is_file()
    for s in PROBES:
        want = ref.encode(s, bos=True, eos=False)
        assert converted(s)["input_ids"] == want and with_mistral_common(s)["input_ids"] == want, s


def test_tekken_without_mistral_common_is_one_clear_line(tekken_release, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common.tokens.tokenizers.tekken", None)
    assert main(["run", str(GROW), "--source", str(tekken_release), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tekken.json needs Mistral's mistral-common" in err and "pip install mistral-common" in err
    assert not (tmp_path / "o").exists()


def test_hf_to_mistral_to_hf_verifies_and_keeps_the_token_ids(tmp_path, capsys):
    config = make_config("mistral", vocab=512, qkv_bias=False)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 3
    src = save_checkpoint(make_model(config, dtype=torch.float32), tmp_path / "hf", tokenizer_from="tiny-mistral")
    assert main(["convert", str(src), str(tmp_path / "native"), "--to", "mistral"]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert capsys.readouterr().out.count("verification PASSED") == 2
    before, after = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "sliding_window",
                "max_position_embeddings", "rope_parameters", "tie_word_embeddings"):
        assert after[key] == before[key], key


def _grow_vocab_error(src: Path, token: str, tmp_path: Path, capsys) -> str:
    recipe = tmp_path / f"{src.name}.json"
    out = tmp_path / f"{src.name}-out"
    recipe.write_text(json.dumps({"name": "v", "source": str(src), "output": str(out),
                                  "ops": [{"op": "grow_vocab", "add_tokens": ["surgeryword", token]}]}))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    return err


def test_grow_vocab_on_a_sentencepiece_release_refuses_a_token_it_has_with_the_id_sentencepiece_gives(nfkc_model, tmp_path, capsys):
    """The nmt_nfkc normaliser prefixes ▁: "the" is the piece ▁the, which sentencepiece itself encodes it to."""
    src = native_copy(tmp_path, "nfkc", {"tokenizer.model": nfkc_model})
    ids = sentencepiece_ids(nfkc_model, "the")[1:]
    assert len(ids) == 1
    err = _grow_vocab_error(src, "the", tmp_path, capsys)
    assert "ops.0.add_tokens.1: token 'the' is already in the vocabulary" in err and f"'▁the' (id {ids[0]})" in err


@needs_mistral_common
def test_grow_vocab_on_a_tekken_release_refuses_a_token_it_has_with_the_id_mistral_common_gives(tekken, tekken_release,
                                                                                               tmp_path, capsys):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    ids = Tekkenizer.from_file(tekken).encode(" the", bos=False, eos=False)
    assert len(ids) == 1
    err = _grow_vocab_error(tekken_release, " the", tmp_path, capsys)
    assert "ops.0.add_tokens.1: token ' the' is already in the vocabulary" in err and f"(id {ids[0]})" in err
