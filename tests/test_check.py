"""`surgery check`: every shipped recipe, run on the tiny builtin of its family, keeps its promise."""
from surgery.cli import main
from surgery.recipe.check import check_library


def test_every_shipped_recipe_keeps_its_promise_on_its_test_model():
    results = check_library()
    failed = [(r.name, r.problem) for r in results if not r.passed]
    assert not failed
    assert len(results) >= 10


def test_every_shipped_recipe_keeps_its_promise_on_a_bf16_copy_of_its_test_model(capsys):
    """Real releases are stored in bf16: every promise must hold there too (judged against bf16 rounding)."""
    results = check_library(source_dtype="bfloat16")
    assert not [(r.name, r.problem) for r in results if not r.passed]
    assert all(r.source.endswith(" as bfloat16") for r in results)


def test_check_reports_a_broken_recipe_and_exits_1(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: x2\nverify:\n  max_tokens: 64\n  tolerance: 0\n")
    assert main(["check", str(tmp_path), "--only", "bad"]) == 1
    out = capsys.readouterr().out
    assert "bad" in out and "NO" in out and "0 passed, 1 failed" in out
