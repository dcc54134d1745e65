"""What a new user meets first (issue 18): the name, the version, one-line errors, tables, reports, cards."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import surgery
from surgery.cli import main, parser
from surgery.recipe.schema import json_schema

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--set", "verify.max_tokens=256"]


# a phase's summary line ("evaluating source: loss ... (1.2 s)"), or verification's plan and estimate
PROGRESS = re.compile(r".+ \(\d+\.\d s\)|verification: .+ ~ [\d.]+ (s|min|h)( for the rest)?")


def one_error_line(err: str) -> str:
    """The one error line, after any summary lines of the phases that ran before it."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert err.endswith("\n") and all(PROGRESS.fullmatch(x) for x in lines[:-1]), f"expected one line, got:\n{err}"
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def cli(args: list[str], env: dict | None = None, cwd: Path = ROOT, python_flags: tuple = ()) -> subprocess.CompletedProcess:
    """The real command, `python -m surgery`, in a fresh interpreter."""
    return subprocess.run([sys.executable, *python_flags, "-m", "surgery", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


# --- 1. the distribution name and --version ----------------------------------------------------

def test_distribution_is_published_as_model_surgery_with_the_surgery_command():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == surgery.DISTRIBUTION == "model-surgery"
    assert project["scripts"] == {"surgery": "surgery.cli:entry"}
    assert {"plot", "native", "test"} <= set(project["optional-dependencies"])


def test_no_install_hint_names_the_unrelated_surgery_distribution():
    texts = [p for p in (ROOT / "surgery").rglob("*.py")] + [ROOT / "README.md"] + list((ROOT / "docs").rglob("*.md"))
    wrong = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts
             for m in re.finditer(r"(?<![\w.-])surgery\[\w+\]", p.read_text())]
    assert not wrong, wrong
    assert "model-surgery[plot]" in (ROOT / "surgery" / "inspect.py").read_text()


def test_version_flag_prints_version_and_distribution(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"surgery {surgery.__version__} (distribution model-surgery)"


def test_version_works_from_a_clone_without_installed_metadata(tmp_path):
    """`python -S` sees no site-packages, so no installed metadata: the version comes from the package."""
    proc = cli(["--version"], env={"PYTHONPATH": str(ROOT)}, cwd=tmp_path, python_flags=("-S",))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"surgery {surgery.__version__} (distribution model-surgery)"


# --- 4. no tracebacks -----------------------------------------------------------------------------

def test_recipes_cp_into_a_missing_directory_is_one_line(tmp_path, capsys):
    dest = tmp_path / "missing" / "x.yaml"
    assert main(["recipes", "cp", "stablelm_grow", str(dest)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {dest}: ") and "does not exist" in line
    assert not dest.parent.exists()


def test_check_only_an_unknown_name_is_an_error_listing_the_known_ones(capsys):
    assert main(["check", "--only", "nope"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --only: ") and "'nope'" in line and "stablelm_grow" in line


def test_check_only_takes_comma_separated_names_and_refuses_unknown_ones(capsys):
    assert main(["check", "--only", "a,b"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'a', 'b'" in line


def test_check_dir_checks_that_directory_only_and_counts_broken_recipes(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(
        "name: mine\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: x1.5\n"
        "verify:\n  max_tokens: 64\n  per_op: false\n")
    (tmp_path / "broken.yaml").write_text("name: broken\nsource: builtin:tiny-llama\nops:\n  - op: nope\n")
    assert main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:] if line and not line.startswith(("broken:", " "))]
    assert rows[:2] == ["broken", "mine"] and "stablelm_grow" not in out
    assert "broken: does not load" in out and "1 passed, 1 failed" in out


def test_check_of_a_directory_without_recipes_says_so(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "no recipe files" in one_error_line(capsys.readouterr().err)


def test_debug_is_accepted_after_the_subcommand(capsys):
    assert main(["recipes", "show", "no-such-recipe", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("`surgery recipes list` shows the library")


def test_usage_errors_are_one_line_naming_the_flag(capsys):
    assert main(["verify", "builtin:tiny-llama", "--against", "builtin:tiny-llama", "--max-tokens", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --max-tokens: 0: at least 2 tokens")


def test_an_unexpected_os_error_is_one_line(monkeypatch, capsys):
    import surgery.recipe.schema as schema

    def fail():
        raise PermissionError(13, "Permission denied", "/somewhere/x")

    monkeypatch.setattr(schema, "json_schema", fail)
    assert main(["schema"]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: /somewhere/x: Permission denied"


def test_a_bug_is_one_line_and_the_traceback_is_behind_debug(monkeypatch, capsys):
    import surgery.recipe.schema as schema

    monkeypatch.setattr(schema, "json_schema", lambda: {}["boom"])
    assert main(["schema"]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "internal error (KeyError: 'boom')" in line and "--debug" in line
    assert main(["schema", "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err


# --- 5, 6, 10. what a run writes: the report renders, a failure is marked, the card is hub metadata -

def md_table(text: str) -> list[list[str]]:
    """The cells of the markdown table in `text`, split as a markdown renderer splits them."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_report_table_renders_with_one_cell_per_column_and_card_metadata_is_hub_valid(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "stablelm_grow", "--source", "builtin:tiny-stablelm", "--output", str(out), *TINY_RUN]) == 0
    table = md_table((out / "surgery_report.md").read_text())
    assert table[0] == ["step", "loss", "rel. change", "max abs logit diff", "rule", "ok"]
    assert all(len(row) == 6 for row in table), table
    assert [row[5] for row in table[2:]] == ["", "-", "-", "yes"]
    assert any("|" in row[4] for row in table), "the rules hold |rel change|: escaped, they stay in their cell"
    card = (out / "README.md").read_text()
    assert "base_model" not in front_matter(card)  # builtin:tiny-stablelm is no hub id
    took = re.search(r"from `builtin:tiny-stablelm` in ([0-9.e+-]+) s \(verification ([0-9.e+-]+) s\)", card)
    assert took and float(took.group(1)) > 0 and float(took.group(2)) > 0, card[:400]
    report = json.loads((out / "surgery_report.json").read_text())
    assert float(took.group(1)) == pytest.approx(report["surgery_seconds"], rel=0.01, abs=1e-3)


def test_model_card_base_model_only_for_hub_ids(tmp_path, monkeypatch):
    from surgery.card import write_model_card, write_resolved_recipe
    from surgery.io.resolve import is_hub_id, resolve_source
    from surgery.plan import compile_plan
    from surgery.recipe.loader import validate_recipe

    assert is_hub_id("stabilityai/stablelm-2-1_6b")
    assert not any(is_hub_id(s) for s in ("builtin:tiny-llama", "/abs/model", "./rel/model", "~/model", str(tmp_path)))
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    monkeypatch.chdir(tmp_path)  # "org/model" now names a local directory, not a hub repository
    assert not is_hub_id("org/model")
    for source, expected in (("stabilityai/stablelm-2-1_6b", "stabilityai/stablelm-2-1_6b"), ("builtin:tiny-stablelm", None)):
        loaded = validate_recipe({"name": "t", "source": source, "ops": []}, "t")
        p = compile_plan(loaded, resolve_source("builtin:tiny-stablelm"))
        d = tmp_path / source.replace("/", "_").replace(":", "_")
        d.mkdir()
        write_resolved_recipe(loaded, p, d, "0" * 64)
        write_model_card(loaded, p, d, None, 0.0123)
        card = (d / "README.md").read_text()
        assert front_matter(card).get("base_model") == expected
        assert "in 0.0123 s." in card


def test_failed_verification_says_the_output_is_kept_unverified_and_marks_card_and_report(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["run", "article_solution1", "--source", "builtin:tiny-stablelm", "--output", str(out), *TINY_RUN,
                 "--set", "verify.tolerance=0", "--set", "verify.per_op=false"])
    assert code == 1
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert f"the output is kept at {out} for inspection, not verified" in line
    assert "wrote" not in captured.out
    assert out.is_dir() and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "surgery-verification-failed" in front_matter(card)["tags"]
    assert "**Verification FAILED**" in card.split("## Verification")[0]
    report_md = (out / "surgery_report.md").read_text()
    assert report_md.splitlines()[0].endswith(": FAILED") and "**NO**" in report_md
    doc = json.loads((out / "surgery_report.json").read_text())
    assert doc["passed"] is False and doc["verified"] is False and doc["verification"] == "failed"


def test_copied_recipe_points_at_the_installed_schema(tmp_path, capsys):
    assert main(["recipes", "cp", "stablelm_grow", str(tmp_path)]) == 0
    first = (tmp_path / "stablelm_grow.yaml").read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema=file://"
    assert first.startswith(prefix), first
    schema = Path(first[len(prefix):])
    assert json.loads(schema.read_text()) == json.loads(json.dumps(json_schema()))
    assert main(["validate", str(tmp_path / "stablelm_grow.yaml")]) == 0


def test_shipped_recipes_cite_nothing_a_user_does_not_have():
    for f in sorted((ROOT / "surgery" / "recipes").glob("*.yaml")):
        text = f.read_text()
        assert not re.search(r"\.\./shared|\bseeds/|\bnotes/|surgery/recipes/", text), f.name


# --- 7. hub errors ----------------------------------------------------------------------------------

HUB_CASES = [
    ("offline", {"HF_HUB_OFFLINE": "1"}, "not in the local cache, and HF_HUB_OFFLINE is set"),
    ("unreachable", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "cannot reach http://127.0.0.1:9 ("),
]


@pytest.mark.parametrize("env,expect", [c[1:] for c in HUB_CASES], ids=[c[0] for c in HUB_CASES])
@pytest.mark.parametrize("args", [["plan", "stablelm_grow"], ["run", "hf://some-org/some-repo/recipe.yaml"]],
                         ids=["hub-source", "hub-recipe"])
def test_hub_failures_are_one_complete_line_at_once(tmp_path, env, expect, args):
    """One stderr line: huggingface_hub's retries (~25 s) would log a `Retrying in Ns` line each."""
    proc = cli(args, env={**env, "HF_HOME": str(tmp_path / "hf")}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert expect in line and "from the Hugging Face Hub" in line
    assert line.endswith(("download it elsewhere and pass --source PATH", "download it and pass its path")), line


def test_unreachable_hub_falls_back_to_a_cached_recipe(tmp_path):
    """huggingface_hub's cache layout: refs/main names the snapshot that holds the file."""
    repo = tmp_path / "hf" / "hub" / "models--some-org--some-repo"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "recipe.yaml").write_text("name: cached\nsource: builtin:tiny-llama\nops: []\n")
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    proc = cli(["validate", "hf://some-org/some-repo/recipe.yaml"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("recipe.yaml: ok (0 ops)")


# --- 8. tables fit the terminal --------------------------------------------------------------------

def test_recipes_list_fits_columns_and_explains_question_marks(tmp_path, monkeypatch, capsys):
    (tmp_path / "anyarch.yaml").write_text(
        "name: anyarch\ndescription: re-initialise whatever model it is given\nsource: ./my-model\n"
        "ops:\n  - op: reinit\n    method: hf\n")
    (tmp_path / "typo.yaml").write_text("name: typo\nsource: builtin:tiny-llama\nops:\n  - op: grow_mlpp\n")
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["recipes", "list", "--library", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not listed, they do not load:" in out and "typo.yaml" in out
    assert all(len(line) <= 80 for line in out.splitlines()), max(out.splitlines(), key=len)
    row = next(line for line in out.splitlines() if line.startswith("anyarch "))
    assert row.split()[1] == "?"
    assert "? = not planned on a test model" in out and "anyarch: no test_source" in out
    names = {line.split()[0] for line in out.splitlines()[2:] if line[:1].strip()}
    assert {"stablelm_grow_heads_mean_fill", "solar_depth_upscale", "anyarch"} <= names


def test_run_table_fits_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "72")
    out = tmp_path / "o"
    assert main(["run", "stablelm_grow", "--source", "builtin:tiny-stablelm", "--output", str(out), *TINY_RUN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 72 for line in lines), max(lines, key=len)
    assert "rescale_norm" in "\n".join(lines) and lines[-1] == f"wrote {out}"


def test_tables_are_unwrapped_when_stdout_is_no_terminal(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["recipes", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("stablelm_grow "))
    assert row.endswith("Grow StableLM's hidden size by 25% through more attention heads, exactly.")


# --- 9. README and help match reality ------------------------------------------------------------

def test_every_option_has_help_text():
    missing = []

    def walk(p, prog):
        for a in p._actions:
            if a.option_strings and a.help is None:
                missing.append(f"{prog} {a.option_strings[0]}")
            for name, sub in (getattr(a, "choices", None) or {}).items() if hasattr(a, "_name_parser_map") else ():
                walk(sub, f"{prog} {name}")

    walk(parser(), "surgery")
    assert not missing, missing


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"`(surgery [^`]+)`", text) + re.findall(r"^\$ (surgery .+)$", text, re.M)
    # commands with arguments; `surgery verify` alone names the command in prose
    return [c for c in found if len(c.split()) > 2 and not re.search(r"[\[|]|\.\.\.", c)]


def test_readme_commands_parse():
    cmds = readme_commands()
    assert any(c.startswith("surgery inspect") for c in cmds) and len(cmds) >= 5, cmds
    for c in cmds:
        try:
            parser().parse_args(c.split()[1:])
        except SystemExit as e:
            assert e.code == 0, f"README command does not parse: {c}"


def test_readme_states_no_stale_bad_input_count():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"tests/bad_inputs/cases.yaml` holds (\d+)", text)
    assert m is None, "a count goes stale: describe the corpus without a number"


def test_inspect_plot_with_a_wrong_suffix_is_refused_before_any_work(capsys):
    assert main(["inspect", "builtin:tiny-llama", "--plot", "x.pdf"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "ending in .png" in one_error_line(captured.err)


def test_inspect_plot_into_a_missing_directory_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "nodir" / "x.png"
    assert main(["inspect", "builtin:tiny-llama", "--plot", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "does not exist" in one_error_line(captured.err)
    assert not target.parent.exists()


def test_force_never_replaces_an_output_by_one_whose_verification_failed(tmp_path, capsys):
    out = tmp_path / "o"
    good = ["run", "article_solution1", "--source", "builtin:tiny-stablelm", "--output", str(out), *TINY_RUN]
    assert main([*good, "--set", "verify.tolerance=1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*good, "--force", "--set", "verify.tolerance=0", "--set", "verify.per_op=false"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"the output is kept at {out}.failed for inspection" in line and f"the previous output at {out} is untouched" in line
    assert (out / "model.safetensors").read_bytes() == before and json.loads((out / "surgery_report.json").read_text())["passed"]
    assert json.loads((tmp_path / "o.failed" / "surgery_report.json").read_text())["passed"] is False


# --- start-up: the commands that read no weight load neither torch nor transformers ----------------

@pytest.mark.parametrize("argv", [["--help"], ["validate", "recipes/llama_grow_mlp.yaml"],
                                  ["validate", "recipes/olmo2_grow_heads_mlp.yaml"],
                                  ["validate", "recipes/llama_grow_mlp.yaml", "--set", "output.shard_size=2GB"]],
                         ids=["help", "validate", "validate-2-ops", "validate-shard-size"])
def test_help_and_validate_import_neither_torch_nor_transformers(argv):
    probe = ("import sys\nfrom surgery.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")], ids=["default-passive", "explicit-kept"])
def test_torch_threads_sleep_while_waiting_unless_the_user_chose_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    probe = "import os, surgery; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == expected, done.stderr
