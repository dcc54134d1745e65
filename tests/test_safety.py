"""Nothing surgery is handed runs code: pickles, YAML, recipes, a source's remote code; hub pins hold.

Every payload here would create a marker file if it ran; each test checks that the marker is absent
(and, for the pickle, that the payload is live when loaded unsafely, so the test means something).
"""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ASSETS, save_checkpoint
from factories import make_config, make_model
from surgery import api
from surgery.cli import main

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"


class Payload:
    """Unpickling this calls exec(code): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    model = make_model(make_config("llama", vocab=512), dtype=torch.float32)
    return save_checkpoint(model, tmp_path_factory.mktemp("good") / "src")


def malicious_state_dict(marker: Path) -> dict:
    return {"model.embed_tokens.weight": torch.zeros(4, 4), "evil": Payload(marker)}


# --- pickles ----------------------------------------------------------------------------------

def test_malicious_pytorch_model_bin_is_refused_and_its_payload_does_not_run(good_source, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = tmp_path / "src"
    shutil.copytree(good_source, src)
    (src / "model.safetensors").unlink()
    torch.save(malicious_state_dict(marker), src / "pytorch_model.bin")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {src}\n")

    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src / 'pytorch_model.bin'}: refused to load (weights_only=True)") and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()

    # Control: the same file loaded unsafely does run the payload.
    torch.load(src / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"


def test_malicious_native_pth_is_refused_and_its_payload_does_not_run(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = tmp_path / "native"
    src.mkdir()
    for f in ("params.json", "tokenizer.model"):
        shutil.copyfile(ASSETS / "tiny-mistral" / f, src / f)
    torch.save(malicious_state_dict(marker), src / "consolidated.00.pth")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {src}\n")
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "refused to load (weights_only=True)" in err and "consolidated.00.pth" in err
    assert not marker.exists()


# --- YAML -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tagged", [
    "!!python/object/apply:os.system ['touch {m}']",
    "!!python/object/apply:builtins.exec [\"open('{m}', 'w')\"]",
    "!!python/object/new:os.system ['touch {m}']",
    "!!python/name:os.system",
    "!!python/module:os",
])
def test_python_yaml_tags_are_refused_by_safe_load(tagged, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: builtin:tiny-llama\ndescription: {tagged.format(m=marker)}\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}:3:14: malformed YAML: could not determine a constructor for the tag")
    assert err.count("\n") == 1 and not marker.exists()


def test_python_tag_in_an_extended_base_recipe_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    (tmp_path / "base.yaml").write_text(f"name: b\nsource: !!python/object/apply:os.system ['touch {marker}']\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: c\n")
    assert main(["validate", str(child)]) == 2
    err = capsys.readouterr().err
    assert "base.yaml:2:9: malformed YAML" in err and not marker.exists()


def test_a_python_tag_given_to_set_stays_a_plain_string(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsource: builtin:tiny-llama\n")
    value = f"!!python/object/apply:os.system ['touch {marker}']"
    loaded = api.load(recipe, sets=[f"description={value}"])
    assert loaded.recipe.description == value and not marker.exists()


# --- recipes are data -------------------------------------------------------------------------

def test_recipe_values_that_look_like_code_are_only_text(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    code = f"__import__('os').system('touch {marker}')"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"vars:\n  cmd: \"{code}\"\nname: \"${{cmd}}\"\ndescription: \"{{{{ {code} }}}} $(touch {marker}) `touch {marker}`\"\n"
        "source: builtin:tiny-llama\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n"
    )
    assert main(["plan", str(recipe)]) == 0
    assert api.load(recipe).recipe.name == code
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name, isinstance(f, ast.Name)


def test_the_package_never_evaluates_code_or_loads_unsafely():
    """Static backstop for the behavioural tests above: every loader call in surgery/ is a safe one."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node, owner, name, bare in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "compile") and (bare or owner == "builtins"):
                problems.append(f"{where}: {name}()")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "full_load_all"):
                problems.append(f"{where}: yaml.{name}")
            if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            trc = kw.get("trust_remote_code")
            if trc is not None and not (isinstance(trc, ast.Constant) and trc.value is False):
                problems.append(f"{where}: trust_remote_code={ast.unparse(trc)}")
            if name == "compose" and owner == "yaml":
                loader = kw.get("Loader")
                if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                    problems.append(f"{where}: yaml.compose without SafeLoader")
    assert not problems, "\n".join(problems)


# --- a source's remote code -------------------------------------------------------------------

REMOTE_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    pass
class EvilForCausalLM(LlamaForCausalLM):
    pass
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def with_remote_code(good: Path, dst: Path, marker: Path, model_type: str | None = None) -> Path:
    """A copy of `good` whose config and tokenizer config point (auto_map) to code with a side effect."""
    shutil.copytree(good, dst)
    (dst / "evil_model.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    if model_type:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil_model.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return dst


def test_a_source_with_auto_map_is_loaded_without_running_its_code(good_source, tmp_path, capsys):
    """Verification loads the source and the output with transformers (tokenizer, config, model):
    without trust_remote_code the stock llama classes are used and evil_model.py never runs."""
    marker = tmp_path / "MARKER"
    src = with_remote_code(good_source, tmp_path / "src", marker)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {src}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\nverify:\n  max_tokens: 64\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert not marker.exists()


def test_a_source_that_needs_its_own_code_is_refused_without_running_it(good_source, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = with_remote_code(good_source, tmp_path / "src", marker, model_type="evil")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {src}\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    assert "model_type 'evil' is not supported" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- hub pins ---------------------------------------------------------------------------------

def test_hub_source_is_downloaded_at_the_pinned_revision(good_source, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(good_source)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pin = "0123456789abcdef0123456789abcdef01234567"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource:\n  path: some-org/some-model\n  revision: {pin}\n")
    api.run(recipe, output=str(tmp_path / "out"), verify=False)
    assert calls and all(c == ("some-org/some-model", calls[0][1]) for c in calls)
    assert all(kw["revision"] == pin for _, kw in calls)
    resolved = yaml.safe_load((tmp_path / "out" / "surgery_recipe.yaml").read_text())
    assert resolved["source"] == {"path": "some-org/some-model", "revision": pin}


def test_hub_recipe_is_fetched_at_its_pinned_revision(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    local = tmp_path / "fetched.yaml"
    local.write_text("name: t\nsource: builtin:tiny-llama\n")

    def fake_hf_hub_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("revision")))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    api.load("hf://some-org/recipes/grow/r.yaml@v1.2")
    assert calls and set(calls) == {("some-org/recipes", "grow/r.yaml", "v1.2")}


def test_a_sources_remote_code_is_not_passed_on_to_the_output(tmp_path):
    import json

    import torch

    from conftest import save_checkpoint
    from factories import make_config, make_model
    from surgery import api

    src = save_checkpoint(make_model(make_config("llama", vocab=512), dtype=torch.float32), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "evil_model.py").write_text("raise SystemExit('ran')\n")
    (tmp_path / "r.yaml").write_text(f"name: t\nsource: {src}\n")
    api.run(tmp_path / "r.yaml", output=str(tmp_path / "out"), verify=False)
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not (tmp_path / "out" / "evil_model.py").exists()
