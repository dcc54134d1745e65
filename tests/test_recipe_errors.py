"""Bad recipes are refused before any weight is read: one line, file:line:column, exit code 2."""
import pytest

from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.recipe.loader import load_recipe

GOOD = """\
name: t
source: builtin:tiny-stablelm
ops:
  - op: grow_heads
    num_heads: x1.25
  - op: rescale_norm
"""


def error_of(write_recipe, text, **kw) -> str:
    with pytest.raises(SurgeryError) as e:
        load_recipe(write_recipe(text), **kw)
    return str(e.value)


def test_valid_recipe_loads_with_ops_in_order(write_recipe):
    r = load_recipe(write_recipe(GOOD)).recipe
    assert [o.op for o in r.ops] == ["grow_heads", "rescale_norm"]


def test_unknown_key_points_at_its_line_and_suggests_the_close_name(write_recipe):
    msg = error_of(write_recipe, GOOD.replace("    num_heads: x1.25", "    num_head: x1.25"))
    assert "recipe.yaml:5:5" in msg
    assert "unknown key 'num_head'" in msg and "did you mean 'num_heads'" in msg


def test_unknown_op_suggests_the_close_op(write_recipe):
    msg = error_of(write_recipe, GOOD.replace("op: rescale_norm", "op: rescale_norms"))
    assert "unknown op 'rescale_norms'" in msg and "did you mean 'rescale_norm'" in msg
    assert "recipe.yaml:6:" in msg


def test_wrong_type_names_field_and_value(write_recipe):
    msg = error_of(write_recipe, GOOD + "seed: abc\n")
    assert "seed" in msg and "'abc'" in msg and "recipe.yaml:7:7" in msg


def test_missing_name_is_reported(write_recipe):
    msg = error_of(write_recipe, GOOD.replace("name: t\n", ""))
    assert "missing required key 'name'" in msg


def test_malformed_yaml_points_at_the_problem(write_recipe):
    msg = error_of(write_recipe, "name: t\nops: [\n")
    assert "malformed YAML" in msg and "recipe.yaml:" in msg


def test_set_override_replaces_a_nested_value(write_recipe):
    r = load_recipe(write_recipe(GOOD), sets=["ops.0.num_heads=8", "seed=3"]).recipe
    assert r.ops[0].num_heads == 8 and r.seed == 3


def test_bad_set_path_is_reported_against_the_flag(write_recipe):
    msg = error_of(write_recipe, GOOD, sets=["ops.5.num_heads=8"])
    assert msg.startswith("--set ops.5.num_heads=8") and "2 entries" in msg


def test_invalid_value_from_set_points_at_the_flag(write_recipe):
    msg = error_of(write_recipe, GOOD, sets=["device=tpu"])
    assert msg.startswith("--set device=tpu")


def test_cli_prints_one_line_and_exits_2_without_traceback(write_recipe, capsys):
    path = write_recipe(GOOD.replace("op: grow_heads", "op: grow_head"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "ops, expected, where",
    [
        ("  - op: grow_heads\n    num_heads: 2\n", "shrink", "recipe.yaml:5:16: ops.0.num_heads"),
        ("  - op: grow_heads\n    num_heads: x1.1\n", "not an integer", "recipe.yaml:5:16: ops.0.num_heads"),
        ("  - op: grow_heads\n    num_heads: 'x2'\n    num_kv_heads: 3\n", "does not divide", "recipe.yaml:6:19: ops.0.num_kv_heads"),
        ("  - op: rescale_norm\n", "nothing to rescale", "recipe.yaml:4:9: ops.0.op"),
        ("  - op: grow_heads\n    num_heads: 0\n", "positive", "recipe.yaml:5:16: ops.0.num_heads"),
    ],
)
def test_impossible_sizes_are_refused_at_plan_time_with_position(write_recipe, ops, expected, where, capsys):
    path = write_recipe(f"name: t\nsource: builtin:tiny-llama\nops:\n{ops}")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and where in err


def test_patch_layernorm_on_an_rmsnorm_model_is_a_validation_error(write_recipe, capsys):
    path = write_recipe("name: t\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: x2\n  - op: patch_layernorm\n")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "RMSNorm" in err and "recipe.yaml:6:9: ops.1.op" in err


def test_hub_source_offline_fails_clearly_and_suggests_a_path(write_recipe, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_recipe("name: t\nsource: nobody/no-such-model\n")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--source PATH" in err and "recipe.yaml:2:9" in err


def test_yaml_nested_deeper_than_python_recurses_is_one_line_not_an_internal_error(write_recipe):
    """5000 nested lists made the YAML composer exceed Python's recursion limit (exit 3, internal error)."""
    msg = error_of(write_recipe, "name: t\nsource: builtin:tiny-stablelm\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")
    assert msg.endswith("malformed YAML: nested too deeply") and "\n" not in msg
