"""The recipe library: names, extends/vars/--set reuse, schema, hub addresses, and self-checking."""
import json
from pathlib import Path

import yaml

from surgery import api
from surgery.cli import main
from surgery.recipe.schema import json_schema

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "surgery" / "recipes"


def test_every_shipped_recipe_validates_and_starts_with_the_schema_line():
    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        assert f.read_text().splitlines()[0] == "# yaml-language-server: $schema=../../schema/recipe.schema.json", f
        api.load(f)


def test_committed_schema_file_equals_the_generated_schema():
    committed = json.loads((ROOT / "schema" / "recipe.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema())), "run: surgery schema > schema/recipe.schema.json"


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    assert "grow_heads" in capsys.readouterr().out


def test_recipes_list_shows_name_ops_and_exactness(capsys):
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("stablelm_grow "))
    assert "stablelm" in line and "grow_heads, rescale_norm, patch_layernorm" in line and "exact with shipped code" in line


def test_recipes_show_and_cp_then_run_the_edited_copy_with_set(tmp_path, capsys):
    assert main(["recipes", "show", "stablelm_grow"]) == 0
    assert "patch_layernorm" in capsys.readouterr().out
    assert main(["recipes", "cp", "stablelm_grow", str(tmp_path)]) == 0
    copy = tmp_path / "stablelm_grow.yaml"
    copy.write_text(copy.read_text().replace("max_tokens: 2048", "max_tokens: 256"))
    rc = main(["run", str(copy), "--source", "builtin:tiny-stablelm", "--output", str(tmp_path / "o"),
               "--set", "ops.0.num_heads=6"])
    assert rc == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_attention_heads"] == 6


def test_run_accepts_a_library_name(tmp_path):
    r = api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "o"), sets=["verify.max_tokens=128"])
    assert r.report.passed


def test_extends_appends_ops_with_ops_plus_and_overrides_values(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("name: base\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: x2\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nops+:\n  - op: rescale_norm\n")
    loaded = api.load(tmp_path / "child.yaml")
    assert [o.op for o in loaded.recipe.ops] == ["grow_heads", "rescale_norm"] and loaded.recipe.name == "child"
    assert main(["plan", str(tmp_path / "child.yaml")]) == 0
    assert "ops[1] rescale_norm" in capsys.readouterr().out


def test_extends_with_ops_replaces_the_list(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: x2\n")
    (tmp_path / "child.yaml").write_text("extends: base\nname: child\nops:\n  - op: grow_heads\n    num_heads: 8\n")
    loaded = api.load(tmp_path / "child.yaml", libraries=[str(tmp_path)])
    assert [o.num_heads for o in loaded.recipe.ops] == [8]


def test_error_in_an_extended_recipe_points_into_that_file(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("name: base\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_head: x2\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\n")
    assert main(["validate", str(tmp_path / "child.yaml")]) == 2
    assert "base.yaml:5:5" in capsys.readouterr().err


def test_vars_are_substituted_with_their_type_and_can_be_set(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "name: v\nsource: builtin:tiny-llama\nvars:\n  heads: 8\nops:\n  - op: grow_heads\n    num_heads: ${heads}\n")
    assert api.load(tmp_path / "r.yaml").recipe.ops[0].num_heads == 8
    assert api.load(tmp_path / "r.yaml", sets=["vars.heads=x3"]).recipe.ops[0].num_heads == "x3"


def test_unknown_variable_is_an_error_at_its_position(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("name: v\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: ${nope}\n")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:5:16" in err and "${nope}" in err


def test_library_directory_from_environment_is_searched(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("name: mine\nsource: builtin:tiny-llama\n")
    monkeypatch.setenv("SURGERY_RECIPES_PATH", str(tmp_path))
    assert api.load("mine").recipe.name == "mine"


def test_hub_recipe_offline_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", "hf://someone/recipes/grow.yaml"]) == 2
    err = capsys.readouterr().err
    assert "hf://someone/recipes/grow.yaml" in err and "Hub" in err


def test_resolved_recipe_reruns_to_bit_identical_tensors(tmp_path):
    api.run("stablelm_grow", source="builtin:tiny-stablelm", output=str(tmp_path / "a"), verify=False)
    resolved = tmp_path / "a" / "surgery_recipe.yaml"
    data = yaml.safe_load(resolved.read_text())
    assert data["source"]["path"].endswith("tiny-stablelm") and "blake3" in resolved.read_text()
    api.run(resolved, output=str(tmp_path / "b"), verify=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
