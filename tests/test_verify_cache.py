"""The cache of the source's reference passes (#27): a second run of a recipe on the same source skips the
source's evaluation and noise floor, says so, and reports the same numbers; other bytes or other data miss."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery import api

RECIPE = "name: t\nsource: {src}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\nverify:\n  max_tokens: 128\n"


@pytest.fixture
def source(tmp_path) -> Path:
    config = make_config("llama", vocab=512, layers=2, hidden_heads=4, kv_heads=2, head_dim=8, intermediate=64)
    return save_checkpoint(make_model(config, dtype=torch.bfloat16), tmp_path / "llama")


def run(tmp_path: Path, src: Path, capsys, *sets: str) -> tuple[dict, str]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(src=src))
    out = tmp_path / "out"
    result = api.run(recipe, sets=list(sets), output=str(out), force=True, progress=True)
    assert result.report.passed
    cap = capsys.readouterr()
    err = cap.out + cap.err  # the phases line (stdout), then, where the cache changes it, verification's own (stderr)
    doc = json.loads((out / "surgery_report.json").read_text())
    return without_timings(doc), err


def without_timings(doc):
    """The report less its timings (and the model card's hash: the card states them)."""
    if isinstance(doc, dict):
        return {k: without_timings(v) for k, v in doc.items() if "seconds" not in k and k != "README.md"}
    if isinstance(doc, list):
        return [without_timings(v) for v in doc]
    return doc


def headline(err: str) -> str:
    """The last announced verification estimate: in the phases line, or verification's own once the cache is known."""
    return [line[line.index("verification: "):] for line in err.splitlines() if "verification: " in line][-1]


def test_a_second_run_skips_the_sources_passes_says_so_and_reports_the_same(tmp_path, source, capsys, verify_cache):
    first, err1 = run(tmp_path, source, capsys)
    assert "cached" not in err1
    assert len(list(verify_cache.glob("*.safetensors"))) == 1 and len(list(verify_cache.glob("*.json"))) == 1
    second, err2 = run(tmp_path, source, capsys)
    assert second == first
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)
    assert headline(err1).startswith("verification: 4 passes (source, noise floor, 1 step, gradient check) ~ ")
    assert headline(err2).startswith("verification: 2 passes (1 step, gradient check; cached, skipped: source, noise floor) ~ ")
    assert re.search(r"^evaluating source: loss [\d.]+, cached, skipped \(\d+\.\d s\)$", err2, re.M)
    assert re.search(r"^noise floor: source in float64: cached, skipped \(\d+\.\d s\)$", err2, re.M)


def test_other_source_bytes_or_other_data_miss_the_cache(tmp_path, source, capsys):
    run(tmp_path, source, capsys)
    _, err = run(tmp_path, source, capsys, "verify.data=random")
    assert "cached" not in err, "other token ids reused the cache"
    _, err = run(tmp_path, source, capsys, "verify.max_tokens=96")
    assert "cached" not in err, "other token ids reused the cache"
    f = source / "model.safetensors"
    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, f, metadata={"format": "pt"})
    _, err = run(tmp_path, source, capsys)
    assert "cached" not in err, "changed source bytes reused the cache"
    _, err = run(tmp_path, source, capsys)
    assert "cached, skipped" in err


def test_verify_cache_false_neither_reads_nor_writes_the_cache(tmp_path, source, capsys, verify_cache):
    run(tmp_path, source, capsys, "verify.cache=false")
    assert not verify_cache.exists() or not any(verify_cache.iterdir())
    run(tmp_path, source, capsys)
    _, err = run(tmp_path, source, capsys, "verify.cache=false")
    assert "cached" not in err
