"""benchmarks/run.py's pieces that decide what a benchmark reports: the synthetic checkpoint, the targets, the report file."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny(bench):
    return bench.Shape(hidden=64, vocab=300, heads=2, kv_heads=1, head_dim=32, inter=96, rope_theta=500000.0)


def test_streamed_checkpoint_loads_with_its_shapes_and_is_deterministic(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "GEN_CHUNK", 1000)  # several row blocks per matrix
    shape = tiny(bench)
    for d in ("a", "b"):
        bench.build_checkpoint(tmp_path / d, shape, 2, "bfloat16", shard_size=40_000)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "a" / "model.safetensors.index.json").is_file()
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    expected = dict(shape.tensors(2))
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(expected)
    for name, fname in index.items():
        with safe_open(str(tmp_path / "a" / fname), "pt") as fh:
            t = fh.get_tensor(name)
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[name]
        if t.dim() == 1:
            assert bool((t == 1).all())
        else:
            assert abs(float(t.float().std()) - 0.02) < 0.004


def test_scaled_llama3_shape_runs_streamed_with_its_rope_theta(bench, tmp_path):
    from surgery.runtime.evaluation import evaluate
    from surgery.runtime.sources import open_source

    shape = bench.Shape(**bench.SHAPES["llama3-8b"]).scaled(32)
    assert (shape.head_dim, shape.heads * shape.head_dim, shape.kv_heads) == (128, shape.hidden, 1)
    bench.build_checkpoint(tmp_path / "c", shape, 1, "bfloat16", shard_size=10**9)
    source = open_source(tmp_path / "c")
    ev = evaluate(source, torch.randint(0, shape.vocab, (1, 8)), torch.device("cpu"), torch.float32)
    assert math.isfinite(ev.loss)
    assert ev.streamed.config.rope_parameters["rope_theta"] == 500000.0


def record(bench, method, total, read=1e9, written=1e9, maxrss=10**9, rc=0):
    return {"method": method, "total": total, "read_bytes": read, "written_bytes": written, "maxrss": maxrss, "rc": rc}


def test_shape_targets_pass_or_miss_on_their_ratio(bench):
    results = [record(bench, "cp", 10.0), record(bench, "copy", 12.0), record(bench, "grow_mlp", 25.0, written=1e9),
               record(bench, "clone_width", 20.0, written=4e9, maxrss=2 * 10**9),
               record(bench, "forward256", 10.0, written=0), record(bench, "verify256", 59.0),
               record(bench, "forward2048", 10.0, written=0), record(bench, "verify2048", 61.0)]
    bench.annotate(results)
    got = {(c["method"], c["target"].split()[0]): c for c in bench.shape_checks(results)}
    assert got[("copy", "time")]["met"] and got[("copy", "time")]["shown"] == "1.20x"
    assert not got[("grow_mlp", "time")]["met"]  # 2.5x cp for the same bytes
    assert got[("clone_width", "time")]["met"]  # 2x the time for 2.5x the bytes: 0.8x
    assert not got[("clone_width", "peak")]["met"] and got[("copy", "peak")]["met"]
    assert got[("verify256", "time")]["met"] and not got[("verify2048", "time")]["met"]
    assert got[("grow_heads", "time")]["shown"] == "not measured" and not got[("grow_heads", "time")]["met"]


def test_phase_lines_parse_with_colons_in_their_names(bench):
    log = ("wrote /tmp/o: 20,514,304 parameters (0.1 s)\n"
           "noise floor: source in float64: loss 9.787366, 1 layers, 2048 tokens (1.3 s)\n"
           "gradient-flow check: 1 new slice(s), 0 with dead units (0.2 s)\n"
           "| source | 9.78 |\n")
    assert [(p["phase"], p["seconds"]) for p in bench.parse_phases(log)] == [
        ("wrote /tmp/o", 0.1), ("noise floor: source in float64", 1.3), ("gradient-flow check", 0.2)]


def test_shape_section_replaces_its_previous_one_and_keeps_the_rest(bench, tmp_path):
    f = tmp_path / "RESULTS.md"
    f.write_text(f"# table\n{bench.ANALYSIS_MARK}\n## hand-written\n")
    bench.insert_section(f, "llama3-8b", "## first\n")
    bench.insert_section(f, "llama3-8b", "## second\n")
    text = f.read_text()
    assert "## first" not in text and text.count("## second") == 1
    assert text.index(bench.ANALYSIS_MARK) < text.index("## second") < text.index("## hand-written")


def test_a_time_target_below_its_floor_is_reported_unreachable(bench):
    results = [record(bench, "cp", 10.0), record(bench, "copy", 16.0), record(bench, "floor_copy", 14.0),
               record(bench, "grow_mlp", 25.0), record(bench, "floor_grow_mlp", 12.0)]
    bench.annotate(results)
    got = {(c["method"], c["target"].split()[0]): c for c in bench.shape_checks(results)}
    copy, grow = got[("copy", "time")], got[("grow_mlp", "time")]
    assert not copy["met"] and copy["floor_shown"] == "1.40x" and not copy["reachable"]
    assert not grow["met"] and grow["floor_shown"] == "1.20x" and grow["reachable"]
    assert got[("copy", "peak")]["floor"] is None, "a floor is a time, not a memory"


def test_other_works_share_of_the_cores_is_the_busy_time_a_run_did_not_use_itself(bench):
    """A run keeping both cores busy itself is not other work (the load average counted its threads as such)."""
    own = {"wall": 10.0, "user": 15.0, "sys": 4.0}
    assert bench.others_share(dict(own, busy=19.5), 2) == pytest.approx(0.025)
    assert bench.others_share(dict(own, busy=29.0), 2) == pytest.approx(0.5)
    assert bench.others_share(dict(own, busy=18.0), 2) == 0.0  # sampling: never below nothing
    assert bench.others_share(dict(own), 2) == 0.0  # a record from before the measure existed
    assert bench.busy_seconds() > 0


def test_a_growths_floor_runs_only_after_its_growth_wrote_something(bench, tmp_path):
    args = type("A", (), {"shard_size": 10**9})()
    assert bench.command_for("floor_grow_mlp", tmp_path, tmp_path / "o", {}, tmp_path, args, None, {}) is None
    cmd = bench.command_for("floor_grow_mlp", tmp_path, tmp_path / "o", {}, tmp_path, args, None, {"grow_mlp": 123})
    assert cmd[-2:] == ["--bytes", "123"] and cmd[1].endswith("floor.py")


def test_floor_writes_the_bytes_asked_for_and_copies_every_shard(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_floor", ROOT / "benchmarks" / "floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    src = tmp_path / "src"
    src.mkdir()
    for i, n in enumerate([3000, 70_000]):
        (src / f"model-{i}.safetensors").write_bytes(bytes(range(256)) * (n // 256))
    assert floor.main(["write", str(src), str(tmp_path / "w"), "--bytes", str(5 * floor.BLOCK // 2)]) == 0
    assert sum(f.stat().st_size for f in (tmp_path / "w").iterdir()) == 5 * floor.BLOCK // 2
    assert floor.main(["copy", str(src), str(tmp_path / "c")]) == 0
    assert {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()} == {f.name: f.read_bytes() for f in src.iterdir()}
