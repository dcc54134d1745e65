"""Verification fails early with the reason, works without a tokenizer, and says what it is doing."""
import os
import re
import subprocess
import sys

import pytest
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


PHASE = re.compile(r".+ \(\d+\.\d s\)")  # a phase's summary line
PRUNE_THEN_GROW = ("name: t\nsource: builtin:tiny-llama\nops:\n  - op: prune_mlp\n    intermediate_size: x0.5\n"
                   "  - op: grow_mlp\n    intermediate_size: x2\nverify:\n  max_tokens: 128\n")


def run_merged(args: list[str]) -> list[str]:
    """`surgery ARGS` in a fresh interpreter, stdout and stderr as one stream in the order they were written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": ""}  # lines whole
    done = subprocess.run([sys.executable, "-m", "surgery", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout
    return done.stdout.splitlines()


def test_a_verified_run_first_names_its_phases_with_an_estimate_then_runs_exactly_those(tmp_path, write_recipe):
    r = write_recipe("name: t\nsource: builtin:tiny-llama\nops:\n  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n")
    lines = run_merged(["run", str(r), "--output", str(tmp_path / "o")])
    m = re.fullmatch(r"phases: write \d+\.\d MB ~ \d+ s; then verification: (\d+) passes "
                     r"\(source, noise floor, 2 steps, gradient check\) ~ \d+ s", lines[0])
    assert m, lines[:3]
    ran = [line for line in lines[1:] if PHASE.fullmatch(line) and not line.startswith("wrote ")]
    assert len(ran) == int(m.group(1)) == 5 and ran[0].startswith("evaluating source: loss")


def test_surgery_plan_lists_the_passes_a_run_then_runs_in_that_order(tmp_path, write_recipe, capsys):
    r = write_recipe(PRUNE_THEN_GROW)
    assert main(["plan", str(r)]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^ +\d+\. (.+?) \[\w+\](?:: (.*))?$", out, re.M)
    planned = [desc for desc, what in listed if not what.startswith("only if")]
    assert re.search(r"^verification: 7 passes \(source, noise floor x2, 2 steps, random baseline, gradient check\) ~ ", out, re.M)
    lines = run_merged(["run", str(r), "--output", str(tmp_path / "o")])
    assert lines[0].startswith("phases: measure importance; then write ") and "; then verification: 7 passes" in lines[0]
    ran = [line for line in lines[1:] if PHASE.fullmatch(line) and line.startswith(("evaluating", "noise floor", "gradient"))]
    assert len(ran) == len(planned) == 7 and all(line.startswith(desc) for line, desc in zip(ran, planned)), (planned, ran)


def test_the_schedule_states_the_rule_of_each_judged_row_and_a_stable_key_for_each_pass():
    from surgery.verify.schedule import OUTPUT, RANDOM, SOURCE, STATE, Kind, schedule

    plan = api.plan(api.load("stablelm_grow", source="builtin:tiny-stablelm", sets=["ops.0.init=trainable"]))
    s = schedule(plan)
    keys = [p.key for p in s.passes]
    assert len(keys) == len(set(keys)) and keys == [p.key for p in schedule(plan).passes]
    assert [(p.kind, p.model.kind) for p in s.passes if not p.when] == [
        (Kind.EVALUATE, SOURCE), (Kind.COMPUTE_NOISE, SOURCE), (Kind.EVALUATE, STATE), (Kind.EVALUATE, STATE),
        (Kind.EVALUATE, OUTPUT), (Kind.GRADIENT, OUTPUT)]
    assert [j.row for j in s.judgements] == [op.label() for op in plan.loaded.recipe.ops]
    assert [j.shown != "" for j in s.judgements] == [True, True, False]
    assert s.planned_rule() == s.judgements[-1].rule and s.planned_rule().startswith("exact with shipped code against the source")
    assert RANDOM not in {p.model.kind for p in s.passes}


def test_the_estimate_is_the_passes_units_at_a_rate_that_the_first_pass_measures():
    from surgery.verify.schedule import Kind, Rate, schedule

    s = schedule(api.plan(api.load("stablelm_grow", source="builtin:tiny-stablelm", sets=["ops.0.init=trainable"])))
    run = [p for p in s.passes if not p.when]
    assert [p.units for p in run[:2]] == [1.0, 2.0]  # the source, then its float64 probe: twice the work
    gradient = next(p for p in run if p.kind == Kind.GRADIENT)
    assert gradient.tokens == 128 and gradient.units == pytest.approx(3 * 211_200 / 160_768 * 128 / 2048)
    rate = Rate(overhead=1.0, unit=2.0, basis="test")
    assert s.estimate(rate) == pytest.approx(sum(1.0 + 2.0 * p.units for p in run))
    assert rate.timed(11.0).unit == 10.0 and s.headline(rate).endswith(f"~ {s.estimate(rate):.0f} s")
