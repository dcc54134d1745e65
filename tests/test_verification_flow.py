"""Verification fails early with the reason, works without a tokenizer, and says what it is doing."""
import torch

from factories import make_config, make_model
from surgery import api
from surgery.cli import main


def test_missing_verification_data_fails_before_any_weight_is_written(tmp_path, write_recipe, capsys):
    r = write_recipe(f"name: t\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n"
                     f"verify:\n  data: {tmp_path / 'nope.txt'}\n")
    assert main(["run", str(r), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "recipe.yaml:7" in err and "not found" in err
    assert not (tmp_path / "o").exists()


def test_a_source_without_tokenizer_is_refused_early_with_the_random_alternative(tmp_path, write_recipe, capsys):
    make_model(make_config("llama", vocab=512), dtype=torch.float32).save_pretrained(tmp_path / "src")
    r = write_recipe(f"name: t\nsource: {tmp_path / 'src'}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n")
    assert main(["run", str(r), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the source tokenizer" in err and "verify.data: random" in err
    assert not (tmp_path / "o").exists()


def test_random_token_ids_verify_a_model_that_ships_no_tokenizer(tmp_path):
    make_model(make_config("qwen2", vocab=512), dtype=torch.float32).save_pretrained(tmp_path / "src")
    res = api.run(_recipe(tmp_path), output=str(tmp_path / "o"))
    assert res.report.passed and res.report.tokens == 300 and abs(res.report.rel_change) < 1e-5


def _recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: t\nsource: {tmp_path / 'src'}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n"
                 "verify:\n  data: random\n  max_tokens: 300\n")
    return p


def test_every_verification_phase_reports_a_summary_line(tmp_path, write_recipe, capsys):
    r = write_recipe("name: t\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n")
    assert main(["run", str(r), "--output", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    for phase in ("wrote", "evaluating source: loss", "evaluating ops[0] grow_heads: loss", "evaluating output: loss",
                  "gradient-flow check: "):
        assert phase in err, phase
