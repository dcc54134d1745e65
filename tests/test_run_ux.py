"""What a person sees during a run (#26): a result table that fits the terminal with each rule in a few
words (in full in surgery_report.md), `surgery verify OUT` against the source OUT records, Ctrl-C
during verification keeping the complete output as unverified, and `surgery plan` naming a tokenizer
verification will need and cannot load."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import exited, save_checkpoint
from factories import make_config, make_model
from surgery import api, interrupt
from surgery.cli import main
from surgery.io.atomic import TMP_PREFIX
from surgery.ops import Exactness, Promise
from surgery.rule_summary import short_rule
from surgery.runtime.evaluation import Comparison
from surgery.verify.rules import NoiseFloor, judge

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--set", "verify.max_tokens=256"]
GROW = "name: t\nsource: {src}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\nverify:\n  max_tokens: 256\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    config = make_config("llama", vocab=512, layers=2, hidden_heads=4, kv_heads=2, head_dim=8, intermediate=64)
    return save_checkpoint(make_model(config, dtype=torch.float32), tmp_path_factory.mktemp("src") / "llama")


def records(out: Path) -> dict:
    return json.loads((out / "surgery_report.json").read_text())


# --- 1. the table fits the terminal; the rules are short there and whole in the report -----------------

def test_run_table_at_80_columns_fits_with_short_rules_and_the_reports_keep_the_full_rules(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "o"
    assert main(["run", "stablelm_grow", "--source", "builtin:tiny-stablelm", "--output", str(out), *TINY_RUN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert not any("measured" in line for line in lines), "the full rule is in the terminal table"
    assert any(line.startswith("verification PASSED: 256 tokens") for line in lines)
    doc = records(out)
    final = doc["steps"][-1]["rule"]
    assert final.startswith("exact with shipped code: max |dlogit| <= ") and "(2x measured float32 noise)" in final
    md = (out / "surgery_report.md").read_text()
    assert all(s["rule"].replace("|", "\\|") in md for s in doc["steps"])
    assert "informational" in md  # the md table's intermediate rows keep their own full text
    assert "approximate so far: informational, later ops may restore it" in md


def floor(storage: bool = False) -> NoiseFloor:
    noise = Comparison(1.0, 1e-8, 1e-5, 1e-6, 1.0, 1e-12, 512, 1.0, 0.0)
    return NoiseFloor(noise, noise if storage else None, "bfloat16" if storage else None)


@pytest.mark.parametrize("exactness, rounded, tolerance, prune_tolerance, short", [
    (Exactness.EXACT, False, 0.0, None, "exact: 2x float32 noise"),
    (Exactness.EXACT, True, 0.0, None, "exact: 2x float32 + bfloat16 noise"),
    (Exactness.EXACT_SHIPPED_CODE, False, 0.0, None, "exact, shipped code: 2x float32 noise"),
    (Exactness.APPROXIMATE, False, 1e-4, None, "approx: tol 0.0001"),
    (Exactness.REINIT, False, 0.0, None, "reinit: loss <= 2 ln(vocab)"),
    (Exactness.PRUNED, False, 0.0, None, "pruned: measured"),
    (Exactness.PRUNED, False, 0.0, 0.2, "pruned: rel change <= 0.2"),
])
def test_short_rule_says_each_kind_of_rule_in_a_few_words(exactness, rounded, tolerance, prune_tolerance, short):
    cmp = Comparison(1.5, 0.5, 9.0, 1.0, 0.5, 0.3, 512, 1.0, 3.0)  # far off: the failed form has the same short text
    verdict = judge(Promise(exactness, "test"), cmp, floor(rounded), tolerance, 512, rounded=rounded,
                    prune_tolerance=prune_tolerance)
    assert short_rule(exactness.value, verdict.rule, verdict.passed) == short
    assert short_rule(exactness.value, verdict.rule, None) == "informational"
    assert len(short) < 40 < len(verdict.rule)


# --- 2. surgery verify OUT: against the source OUT records ----------------------------------------------

@pytest.fixture
def made(source, tmp_path):
    """An output of a grow_mlp run (not verified) from a copy of the source, and that copy."""
    src = shutil.copytree(source, tmp_path / "src")
    (tmp_path / "r.yaml").write_text(GROW.format(src=src))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "r.yaml"), "--output", str(out), "--no-verify"]) == 0
    return out, src


def test_verify_without_against_compares_with_the_recorded_source(made, capsys):
    out, src = made
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    cap = capsys.readouterr()
    assert f"reference: {src}, the source {out} records (content hash matches); judged as the run judged it" in cap.err
    assert "verification PASSED" in cap.out
    assert main(["verify", str(out), "--max-tokens", "512"]) == 0  # an option of its own: a comparison of two checkpoints
    cap = capsys.readouterr()
    assert "judged as the same function (exact)" in cap.err and "verdict PASSED: exact" in cap.out


@pytest.mark.parametrize("how", ["moved", "changed"])
def test_verify_without_against_refuses_a_moved_or_changed_source_in_one_line(made, capsys, how):
    out, src = made
    if how == "moved":
        elsewhere = src.rename(src.with_name("moved"))
    else:
        sd = load_file(src / "model.safetensors")
        sd["model.norm.weight"].view(torch.int32)[0] ^= 1  # one bit of one weight
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out / 'surgery_recipe.yaml'}: the recorded source {src} ")
    assert ("cannot be read" if how == "moved" else "has changed since the output was made") in err
    assert "pass --against SOURCE" in err
    if how == "moved":  # --against still chooses the reference
        assert main(["verify", str(out), "--against", str(elsewhere)]) == 0


def test_verify_alone_judges_by_the_recipe_s_own_rules_and_a_comparison_by_its_promise_refusing_a_reinit(tmp_path, capsys):
    (tmp_path / "approx.yaml").write_text("name: a\nsource: builtin:tiny-stablelm\nops:\n  - op: grow_heads\n    num_heads: x1.25\n"
                                          "    init: zeros\n  - op: rescale_norm\nverify:\n  tolerance: 0.5\n")
    (tmp_path / "reinit.yaml").write_text("name: r\nsource: builtin:tiny-llama\nops:\n  - op: reinit\n    method: hf\n")
    for name in ("approx", "reinit"):
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--output", str(tmp_path / name), "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "approx"), "--max-tokens", "2048"]) == 0
    assert "judged as an approximation within the recipe's tolerance 0.5" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "reinit"), "--max-tokens", "2048"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "promise is re-initialisation" in err and "--tolerance T" in err
    assert main(["verify", str(tmp_path / "reinit")]) == 0  # alone: judged by its own rule, the initial loss
    assert "reinit: loss <= 2 ln(vocab)" in capsys.readouterr().out


def test_verify_of_a_checkpoint_surgery_did_not_write_asks_for_against(source, capsys):
    assert main(["verify", str(source)]) == 2
    assert capsys.readouterr().err == f"error: {source}: no surgery_recipe.yaml, so no recorded source; pass --against SOURCE\n"


# --- 3. Ctrl-C: during verification the output is kept, unverified; while writing, nothing ------------

def assert_complete_and_marked_unverified(out: Path) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    doc = records(out)
    assert doc["verification"] == "interrupted" and doc["verified"] is False and "steps" not in doc
    card = (out / "README.md").read_text()
    assert "surgery-verification-interrupted" in card and "**Not verified**: verification was interrupted" in card
    assert main(["verify", "--integrity", str(out)]) == 0


def test_ctrl_c_during_verification_keeps_the_complete_output_unverified(source, tmp_path, monkeypatch, capsys):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "verify_plan", ctrl_c)
    (tmp_path / "r.yaml").write_text(GROW.format(src=source))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "r.yaml"), "--output", str(out)]) == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"interrupted during verification; the output {out} is complete but not verified (its surgery_report.json "
                   f"and README.md say so): `surgery verify {out}` verifies it against its recorded source")
    assert_complete_and_marked_unverified(out)
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    with pytest.raises(interrupt.VerificationInterrupted) as e:  # the API raises it too, after moving the output into place
        api.run(tmp_path / "r.yaml", output=str(tmp_path / "again"))
    assert e.value.output == tmp_path / "again" and (tmp_path / "again" / "model.safetensors").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0  # what the message says to do


def surgery(*argv: str, cwd: Path, code: str = "") -> subprocess.Popen:
    """`surgery ARGV` as the command runs it (its `entry`), after `code` (a test's hook) has run."""
    script = f"import sys\n{code}\nsys.argv = ['surgery', *{list(argv)!r}]\nfrom surgery.cli import entry\nentry()\n"
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


HELD_OPEN = """
import sys, time
from surgery import api

real = api.verify_plan

def verify_plan(*a, **k):  # the phase held open, so that the signal surely lands in it
    print("verification begins", file=sys.stderr, flush=True)
    time.sleep(60)
    return real(*a, **k)

api.verify_plan = verify_plan
"""


def test_sigint_in_the_verification_phase_keeps_the_output_and_says_how_to_verify_it(source, tmp_path):
    (tmp_path / "r.yaml").write_text(GROW.format(src=source))
    out = tmp_path / "out"
    proc = surgery("run", "r.yaml", "--output", str(out), cwd=tmp_path, code=HELD_OPEN)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line == "verification begins\n":
            proc.send_signal(signal.SIGINT)
            break
    rest = exited(proc, "the run")
    assert proc.returncode == 130, "".join(seen) + rest
    assert rest.splitlines()[-1].startswith(f"interrupted during verification; the output {out} is complete but not verified")
    assert f"`surgery verify {out}`" in rest and "Traceback" not in rest
    assert_complete_and_marked_unverified(out)


CTRL_C_IN_A_FINALIZER = """
import signal
from surgery.io import writer

class CtrlC:
    def __del__(self):  # Ctrl-C as it lands where Python only prints it ("Exception ignored in")
        signal.raise_signal(signal.SIGINT)

real, closed = writer.ShardWriter.close, []

def close(self):
    closed.append(self.path.name)
    if len(closed) == 2:
        CtrlC()
    return real(self)

writer.ShardWriter.close = close
"""


def test_ctrl_c_swallowed_by_a_finalizer_while_writing_still_stops_the_run_and_leaves_nothing(source, tmp_path):
    """The flake of test_ctrl_c_exits_130_and_leaves_nothing (a traceback and exit 0): the interrupt landed in a
    weakref callback (each shard's hashing lane is collected), Python printed it and the run went on."""
    (tmp_path / "r.yaml").write_text(GROW.format(src=source) + "output:\n  path: out\n  shard_size: 16KB\n")
    proc = surgery("run", "r.yaml", "--no-verify", cwd=tmp_path, code=CTRL_C_IN_A_FINALIZER)
    err = exited(proc, "the run")
    assert proc.returncode == 130 and err == "interrupted; the output was not written\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


# --- 4. surgery plan names a tokenizer that verification will need and cannot load ----------------------

def test_plan_names_a_missing_tokenizer_that_verification_on_text_needs(tmp_path, capsys):
    make_model(make_config("llama", vocab=512), dtype=torch.float32).save_pretrained(tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {tmp_path / 'src'}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n")
    assert main(["plan", str(recipe)]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"  warning: surgery run will refuse: {tmp_path / 'src'}: cannot load "
                                                     "the source tokenizer")
    assert "set verify.data: random" in warned[0]
    assert api.plan(recipe).warnings == [warned[0].removeprefix("  warning: ")]
    assert api.plan(recipe, sets=["verify.data=random"]).warnings == []
