"""`surgery verify`: comparisons of any two checkpoints, and integrity re-checks."""
import torch
from safetensors.torch import load_file, save_file

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery import api
from surgery.cli import main
from surgery.verify.pair import compare_checkpoints
from conftest import ASSETS


def test_known_perturbation_of_lm_head_is_reported_at_its_size(tmp_path):
    model = make_model(make_config("llama", vocab=512), dtype=torch.float32)
    src = save_checkpoint(model, tmp_path / "src")
    model.lm_head.weight.data[7, 3] += 0.5  # logit of token 7 moves by 0.5 * (final hidden)[3]
    pert = save_checkpoint(model, tmp_path / "pert")
    rep = compare_checkpoints(str(pert), str(src), max_tokens=64)
    with torch.no_grad():
        from surgery.verify.data import tokenize

        ids = tokenize(src, "builtin:python-license", 64)
        hidden = model.model(input_ids=ids).last_hidden_state[0, :, 3]
    assert abs(rep.max_logit_diff - 0.5 * float(hidden.abs().max())) < 1e-4
    assert rep.kl_divergence > 0 and rep.top1_agreement <= 1


def test_exact_growth_compares_at_float_rounding_level(tmp_path):
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "o"), verify=False)
    rep = compare_checkpoints(str(tmp_path / "o"), "builtin:tiny-stablelm", max_tokens=256)
    assert abs(rep.rel_change) < 1e-5 and rep.max_logit_diff < 1e-4 and rep.kl_divergence < 1e-9


def test_float64_comparison_sees_only_the_float32_storage_rounding(tmp_path):
    # The grown weights (norms x sqrt(d/D)) are stored in float32 like the source: ~1e-7 relative each.
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "o"), verify=False)
    rep = compare_checkpoints(str(tmp_path / "o"), "builtin:tiny-stablelm", max_tokens=128, dtype="float64")
    assert rep.precision == "float64" and rep.max_logit_diff < 1e-5 and abs(rep.rel_change) < 1e-6


def test_integrity_detects_a_changed_tensor_file(tmp_path, capsys):
    out = tmp_path / "o"
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(out), verify=False)
    assert main(["verify", "--integrity", str(out)]) == 0
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"][0] += 1
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", "--integrity", str(out)]) == 1
    assert "model.safetensors" in capsys.readouterr().out


def test_integrity_checks_reports_written_before_blake3_with_their_sha256(tmp_path, capsys):
    import hashlib
    import json

    out = tmp_path / "o"
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(out), verify=False)
    report = out / "surgery_report.json"
    doc = json.loads(report.read_text())
    files = doc.pop("files_blake3")
    doc["files_sha256"] = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files}
    report.write_text(json.dumps(doc))
    assert main(["verify", "--integrity", str(out)]) == 0
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    assert main(["verify", "--integrity", str(out)]) == 1
    assert "config.json" in capsys.readouterr().out


def test_a_local_dataset_directory_is_verification_data(tmp_path):
    datasets = __import__("pytest").importorskip("datasets")
    text = (ASSETS / "python-license.txt").read_text()
    datasets.Dataset.from_dict({"id": [1, 2], "text": [text[:3000], text[3000:6000]]}).save_to_disk(str(tmp_path / "ds"))
    rep = compare_checkpoints("builtin:tiny-llama", "builtin:tiny-llama", data=str(tmp_path / "ds"), max_tokens=4096)
    assert 1000 < rep.tokens < 4096 and rep.max_logit_diff == 0


def test_random_data_verifies_models_without_a_tokenizer(tmp_path):
    model = make_model(make_config("llama", vocab=512), dtype=torch.float32)
    model.save_pretrained(tmp_path / "a")  # no tokenizer files
    model.save_pretrained(tmp_path / "b")
    rep = compare_checkpoints(str(tmp_path / "b"), str(tmp_path / "a"), data="random", max_tokens=50)
    assert rep.tokens == 50 and rep.max_logit_diff == 0 and rep.top1_agreement == 1


def test_tokenizers_that_split_the_data_differently_are_refused(tmp_path, capsys):
    model = make_model(make_config("llama", vocab=512), dtype=torch.float32)
    a = save_checkpoint(model, tmp_path / "a", tokenizer_from="tiny-llama")
    b = save_checkpoint(model, tmp_path / "b", tokenizer_from="tiny-mistral")
    assert main(["verify", str(b), "--against", str(a), "--max-tokens", "64"]) == 2
    assert "tokenizers split the data differently" in capsys.readouterr().err


def test_a_candidate_without_tokenizer_is_compared_with_a_warning(tmp_path, capsys):
    model = make_model(make_config("llama", vocab=512), dtype=torch.float32)
    a = save_checkpoint(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert main(["verify", str(tmp_path / "b"), "--against", str(a), "--max-tokens", "64"]) == 0
    assert "no loadable tokenizer" in capsys.readouterr().err


def test_a_recorded_recipe_nested_deeper_than_python_recurses_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "surgery_recipe.yaml").write_text("name: t\nsource: x\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "surgery_recipe.yaml: not valid YAML" in err and "pass --against SOURCE" in err
