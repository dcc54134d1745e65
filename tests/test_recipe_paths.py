"""Where a recipe's values come from: paths relative to the recipe file, `extends` next to it, `+N` sizes."""
import json
import shutil
from pathlib import Path

import yaml

from surgery.cli import main

ASSETS = Path(__file__).resolve().parent.parent / "surgery" / "assets"
MLP = 160  # tiny-llama's intermediate_size


def mlp_growth_plan(capsys, recipe: Path, *args) -> str:
    assert main(["plan", str(recipe), *args]) == 0
    return capsys.readouterr().out


def test_unquoted_plus_size_in_a_recipe_file_grows_by_that_much(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: +200\n")
    assert f"intermediate_size: {MLP} -> {MLP + 200}" in mlp_growth_plan(capsys, recipe)


def test_plus_size_from_set_grows_by_that_much_as_in_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: 400\n")
    out = mlp_growth_plan(capsys, recipe, "--set", "ops.0.intermediate_size=+8")
    assert f"intermediate_size: {MLP} -> {MLP + 8}" in out


def test_plus_size_through_a_variable_stays_relative(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsource: builtin:tiny-llama\nvars:\n  extra: +16\n"
                      "ops:\n  - op: grow_mlp\n    intermediate_size: ${extra}\n")
    assert f"intermediate_size: {MLP} -> {MLP + 16}" in mlp_growth_plan(capsys, recipe)


def test_extends_finds_a_base_recipe_next_to_the_extending_one_from_any_directory(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "base.yaml").write_text("name: base\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n")
    (recipes / "child.yaml").write_text("extends: base\nname: child\nops+:\n  - op: grow_mlp\n    intermediate_size: +8\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = mlp_growth_plan(capsys, recipes / "child.yaml")
    assert f"intermediate_size: {2 * MLP} -> {2 * MLP + 8}" in out


def test_extends_a_missing_neighbour_path_is_one_line_at_the_extends_key(tmp_path, capsys):
    (tmp_path / "child.yaml").write_text("name: child\nextends: ./nope\n")
    assert main(["validate", str(tmp_path / "child.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "child.yaml:2:10" in err and "extends './nope'" in err


def _project(tmp_path: Path) -> Path:
    """A recipe directory holding its source checkpoint and its verification text, named relatively."""
    project = tmp_path / "project"
    shutil.copytree(ASSETS / "tiny-llama", project / "models" / "base")
    (project / "data").mkdir()
    (project / "data" / "eval.txt").write_text((ASSETS / "python-license.txt").read_text())
    (project / "grow.yaml").write_text(
        "name: grow\nsource: models/base\noutput: out/grown\n"
        "ops:\n  - op: grow_mlp\n    intermediate_size: +32\n"
        "verify:\n  data: data/eval.txt\n  max_tokens: 64\n  per_op: false\n")
    return project


def test_paths_in_a_recipe_are_relative_to_the_recipe_file_and_a_resolved_recipe_reruns_to_the_same_place(
        tmp_path, monkeypatch):
    project = _project(tmp_path)
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["run", "../project/grow.yaml"]) == 0
    out = project / "out" / "grown"
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == MLP + 32
    assert not (cwd / "out").exists()
    resolved = yaml.safe_load((out / "surgery_recipe.yaml").read_text())
    assert resolved["output"] == str(out) and resolved["source"]["path"] == str(project / "models" / "base")
    assert resolved["verify"]["data"] == str(project / "data" / "eval.txt")

    again = tmp_path / "again"
    again.mkdir()
    shutil.copyfile(out / "surgery_recipe.yaml", again / "surgery_recipe.yaml")
    monkeypatch.chdir(tmp_path)
    before = (out / "surgery_report.json").stat().st_mtime_ns
    assert main(["run", str(again / "surgery_recipe.yaml"), "--force"]) == 0
    assert (out / "surgery_report.json").stat().st_mtime_ns != before
    assert sorted(p.name for p in again.iterdir()) == ["surgery_recipe.yaml"]


def test_output_and_source_from_the_command_line_stay_relative_to_the_current_directory(tmp_path, monkeypatch):
    project = _project(tmp_path)
    shutil.copytree(ASSETS / "tiny-llama", tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(project / "grow.yaml"), "--source", "mine", "--output", "here", "--no-verify"]) == 0
    assert (tmp_path / "here" / "config.json").is_file() and not (project / "out").exists()
    resolved = yaml.safe_load((tmp_path / "here" / "surgery_recipe.yaml").read_text())
    assert resolved["source"]["path"] == str(tmp_path / "mine") and resolved["output"] == str(tmp_path / "here")


def test_validate_refuses_a_data_file_that_run_cannot_find(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(project / "grow.yaml")]) == 0  # data/eval.txt next to the recipe, not in the cwd
    capsys.readouterr()
    (project / "data" / "eval.txt").unlink()
    assert main(["validate", str(project / "grow.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grow.yaml:8:9" in err and str(project / "data" / "eval.txt") in err
    assert main(["run", str(project / "grow.yaml")]) == 2
    assert not (project / "out").exists()


def test_convert_output_named_relatively_is_where_its_resolved_recipe_reruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "builtin:tiny-mistral", "converted", "--to", "hf", "--no-verify"]) == 0
    out = tmp_path / "converted"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(out / "surgery_recipe.yaml", tmp_path / "again.yaml")  # --force never replaces the recipe it runs
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(tmp_path / "again.yaml"), "--force", "--no-verify"]) == 0
    assert (out / "model.safetensors").is_file() and not list(elsewhere.iterdir())


def test_builtin_and_hub_recipes_resolve_relative_paths_against_the_current_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from surgery import api

    monkeypatch.chdir(tmp_path)
    assert api.load("stablelm_grow").recipe.output == str(tmp_path / "out" / "stablelm-grown")  # not inside the package
    cache = tmp_path / "hub-cache"
    (cache / "snapshots").mkdir(parents=True)
    (cache / "snapshots" / "r.yaml").write_text("name: r\nsource: builtin:tiny-llama\noutput: grown\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert api.load(cache / "snapshots" / "r.yaml").recipe.output == str(tmp_path / "grown")


def test_validate_refuses_a_local_source_directory_that_does_not_exist_next_to_the_recipe(tmp_path, monkeypatch, capsys):
    project = _project(tmp_path)
    shutil.rmtree(project / "models")
    shutil.copytree(ASSETS / "tiny-llama", tmp_path / "models" / "base")  # in the cwd, not next to the recipe
    monkeypatch.chdir(tmp_path)
    recipe = project / "grow.yaml"
    recipe.write_text(recipe.read_text().replace("source: models/base", "source: ./models/base"))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grow.yaml:2:9" in err and f"source directory not found: {project / 'models' / 'base'}" in err
