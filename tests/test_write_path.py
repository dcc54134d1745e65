"""The fast write path writes the bits of the plain computation: kernel copies, storage-dtype moves, async hashes."""
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from blake3 import blake3

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery import api
from surgery.execute import compute_dtype_for, output_tensors
from surgery.io import writer
from surgery.io.checkpoint import read_safetensors_header
from surgery.lazy import evaluate, storage_exact

GROWTHS = """\
name: grow
source: {src}
output: {out}
ops:
  - op: grow_heads
    num_heads: x2
  - op: grow_mlp
    intermediate_size: x1.5
  - op: grow_layers
    num_layers: x2
    from: copy
  - op: rescale_norm
"""


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor's raw bytes as stored, read from the file by its header (no library in between)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        header = read_safetensors_header(f)
        raw = f.read_bytes()
        start = 8 + struct.unpack("<Q", raw[:8])[0]
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                out[name] = raw[start + a:start + b]
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def source(request, tmp_path) -> Path:
    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    return save_checkpoint(model.to(request.param), tmp_path / "src")


def test_a_grown_output_holds_the_bytes_of_the_reference_computation(source, tmp_path):
    """Every output tensor equals evaluating its graph in the compute dtype and rounding once; hashes match."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GROWTHS.format(src=source, out=tmp_path / "out"))
    result = api.run(recipe, verify=False)
    out = tmp_path / "out"
    p = api.plan(recipe)
    cd = compute_dtype_for(p.final)
    written = tensor_bytes(out)
    assert set(written) == set(p.final.tensors)
    in_storage = 0
    for name, node, d in output_tensors(p.final, "auto"):
        t = evaluate(node, p.checkpoint, torch.device("cpu"), cd)
        assert written[name] == as_bytes(t.to(d) if t.is_floating_point() else t), name
        in_storage += node.fn is not None and storage_exact(node, d)
    if d == torch.bfloat16:
        assert in_storage >= 10, "grown tensors of a bf16 source are computed in bf16"
    report = json.loads((out / "surgery_report.json").read_text())
    assert report["tensor_blake3"] == {n: blake3(b).hexdigest() for n, b in written.items()}
    for f in out.glob("*.safetensors"):
        assert report["files_blake3"][f.name] == blake3(f.read_bytes()).hexdigest()
    assert result.output == out or out.is_dir()


@pytest.mark.parametrize("kernel", ["copy_file_range", "sendfile"])
def test_untouched_tensors_are_the_source_bytes_whichever_kernel_call_copies_them(source, tmp_path, monkeypatch, kernel):
    if kernel == "sendfile":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    calls = []
    real = writer.copy_range
    monkeypatch.setattr(writer, "copy_range", lambda *a: calls.append(a[0]) or real(*a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: copy\nsource: {source}\noutput:\n  path: {tmp_path / 'out'}\n  shard_size: 20KB\n")
    api.run(recipe, verify=False)
    src, out = tensor_bytes(source), tensor_bytes(tmp_path / "out")
    assert out == src
    assert len(calls) == len(src), "every untouched tensor goes through the kernel copy"
    report = json.loads((tmp_path / "out" / "surgery_report.json").read_text())
    assert report["tensor_blake3"] == {n: blake3(b).hexdigest() for n, b in src.items()}
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1
    for f in shards:
        assert report["files_blake3"][f.name] == blake3(f.read_bytes()).hexdigest()


def test_a_nan_in_a_kernel_copied_tensor_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    from surgery.cli import main

    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("-inf")
    src = save_checkpoint(model.to(torch.bfloat16), tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: copy\nsource: {src}\n")
    copied = []
    real = writer.copy_range
    monkeypatch.setattr(writer, "copy_range", lambda *a: copied.append(a[0]) or real(*a))
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "'model.layers.1.mlp.down_proj.weight' holds 2 NaN/Inf value(s)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and copied, "the tensor was copied by the kernel, checked from its bytes"



def test_tensors_computed_ahead_arrive_in_order_within_the_worker_and_memory_budget():
    """Two workers compute side by side only while their costs fit the budget; one always computes
    while the previous tensor is consumed; the order is the layout's."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from surgery.execute import computed_in_order

    costs = {"a": 10, "b": 4, "c": 4, "d": 10, "e": 1, "f": 1, "g": 1}
    planned = [writer.PlannedTensor(n, (costs[n],), torch.float32) for n in costs]
    lock, running, seen = threading.Lock(), set(), []

    def compute(name):
        with lock:
            running.add(name)
            seen.append(set(running))
        time.sleep(0.02)
        with lock:
            running.discard(name)
        return name.upper()

    with ThreadPoolExecutor(2) as pool:
        out = [(p.name, data) for p, data in computed_in_order(pool, compute, planned, costs.__getitem__, 2, 10)]
    assert out == [(n, n.upper()) for n in costs]
    assert all(len(s) <= 2 for s in seen)
    assert all(sum(costs[n] for n in s) <= 10 or len(s) == 1 for s in seen)  # a lone tensor may exceed it
    assert any(len(s) == 2 for s in seen)  # b with c, e with f: side by side


def test_writeback_is_started_over_the_written_bytes_in_order_and_the_shard_reads_back(tmp_path, monkeypatch):
    calls = []
    real = writer.start_writeback
    monkeypatch.setattr(writer, "WRITEBACK", 4096)
    monkeypatch.setattr(writer, "start_writeback", lambda fd, at, n: (calls.append((at, n)), real(fd, at, n)))
    tensors = {f"t{i}": torch.randn(300 + 7 * i) for i in range(12)}
    planned = [writer.PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = writer.ShardWriter(tmp_path / "model.safetensors", planned)
    for p in writer.layout_order(planned):
        w.write(p.name, tensors[p.name])
    w.close()
    assert calls and calls[0][0] == w.data_start
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))  # contiguous, ascending, each range once
    assert calls[-1][0] + calls[-1][1] <= (tmp_path / "model.safetensors").stat().st_size
    from safetensors.torch import load_file
    back = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
