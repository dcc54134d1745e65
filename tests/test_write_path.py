"""The fast write path writes the bits of the plain computation: kernel copies, storage-dtype moves, async hashes."""
import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from hypothesis import given, settings, strategies as st

from conftest import save_checkpoint, tensor_bytes
from factories import make_config, make_model
from surgery import api, execute
from surgery.card import HASH_COVERS, source_content_hash
from surgery.execute import compute_dtype_for, output_tensors
from surgery.io import writer
from surgery.io.checkpoint import read_safetensors_header
from surgery.lazy import evaluate, storage_exact
from surgery.ops.slices import Fill

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


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def source(request, tmp_path) -> Path:
    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    return save_checkpoint(model.to(request.param), tmp_path / "src")


@pytest.mark.parametrize("pieces", [False, True], ids=["computed", "in-pieces"])
def test_a_grown_output_holds_the_bytes_of_the_reference_computation(source, tmp_path, monkeypatch, pieces):
    """Every output tensor equals evaluating its graph in the compute dtype and rounding once; hashes match.
    In pieces: growths of stored tensors are written as kernel copies of the kept bytes plus the new entries."""
    used = []
    real = execute.grown_pieces
    monkeypatch.setattr(execute, "grown_pieces", lambda node, *a: used.append(node) or real(node, *a))
    monkeypatch.setattr(execute, "MIN_PIECE", 0 if pieces else 1 << 60)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GROWTHS.format(src=source, out=tmp_path / "out"))
    result = api.run(recipe, verify=False)
    assert len(used) >= 8 if pieces else not used
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
    assert f"# source content blake3 ({HASH_COVERS}): {source_content_hash(source)}" in (out / "surgery_recipe.yaml").read_text()
    assert result.output == out or out.is_dir()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_native_output_takes_the_same_write_path_and_holds_the_reference_bits_in_native_layout(tmp_path, monkeypatch, dtype):
    """format: mistral is written by the one executor: untouched tensors are kernel copies of the source's bytes,
    growths are written in pieces, wq/wk are computed and put in native rotary order, the tied embedding is also
    output.weight; every tensor holds the bits of the plain computation, and the file's digest is taken on the way."""
    from surgery.io.native_layout import hf_to_native, to_native_rotary

    model = make_model(make_config("mistral", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8, tied=True), dtype=torch.float32)
    source = save_checkpoint(model.to(dtype), tmp_path / "src")
    copied, pieces = [], []
    real_copy, real_pieces = writer.copy_range, execute.grown_pieces
    monkeypatch.setattr(writer, "copy_range", lambda *a: copied.append(a) or real_copy(*a))
    monkeypatch.setattr(execute, "grown_pieces", lambda node, *a: pieces.append(node) or real_pieces(node, *a))
    monkeypatch.setattr(execute, "MIN_PIECE", 0)
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: native\nsource: {source}\noutput:\n  path: {out}\n  format: mistral\n"
                      "ops:\n  - op: grow_mlp\n    intermediate_size: x1.5\n")
    api.run(recipe, verify=False)
    p = api.plan(recipe)
    spec, cd = p.final.spec, compute_dtype_for(p.final)
    written = tensor_bytes(out)
    expected = {}
    for name, node, d in output_tensors(p.final, "auto"):
        t = evaluate(node, p.checkpoint, torch.device("cpu"), cd).to(d)
        role = p.final.info(name).role.value
        if role in ("attn.q", "attn.k"):
            t = to_native_rotary(t, spec.num_heads if role == "attn.q" else spec.num_kv_heads, spec.head_dim)
        expected[hf_to_native(name)] = as_bytes(t)
    expected["output.weight"] = expected["tok_embeddings.weight"]
    assert written == expected
    untouched = [n for n, node, d in output_tensors(p.final, "auto") if node.fn is None and "q_proj" not in n and "k_proj" not in n]
    assert len(copied) == len(untouched) + 1 and untouched, "untouched tensors (and the tied output) go through the kernel copy"
    assert len(pieces) == 3 * spec.num_layers, "gate, up and down grow in pieces"
    report = json.loads((out / "surgery_report.json").read_text())
    assert report["tensor_blake3"] == {n: blake3(b).hexdigest() for n, b in written.items()}
    assert report["files_blake3"]["consolidated.safetensors"] == blake3((out / "consolidated.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("kernel", ["copy_file_range", "sendfile", "buffer"])
def test_untouched_tensors_are_the_source_bytes_whichever_kernel_call_copies_them(source, tmp_path, monkeypatch, kernel):
    """`buffer`: neither kernel call copies between files (macOS's sendfile writes to sockets only)."""
    if kernel != "copy_file_range":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    if kernel == "buffer":
        def to_sockets_only(*a):
            raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")
        monkeypatch.setattr(os, "sendfile", to_sockets_only)
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


@pytest.mark.parametrize("tensor", ["down_proj", "gate_proj"])
def test_a_nan_in_a_growth_written_in_pieces_is_refused_by_name(tmp_path, capsys, monkeypatch, tensor):
    """down_proj's zero fill never reads the source: the read-back checks its copied bytes; gate_proj's
    random fill reads it, checked as it is read."""
    from surgery.cli import main

    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    with torch.no_grad():
        getattr(model.model.layers[1].mlp, tensor).weight[3, 5] = float("nan")
    src = save_checkpoint(model, tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: grow\nsource: {src}\nops:\n  - op: grow_mlp\n    intermediate_size: x2\n")
    used = []
    real = execute.grown_pieces
    monkeypatch.setattr(execute, "grown_pieces", lambda node, *a: used.append(node) or real(node, *a))
    monkeypatch.setattr(execute, "MIN_PIECE", 0)
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert f"'model.layers.1.mlp.{tensor}.weight' holds 1 NaN/Inf value(s)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and used



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


def test_the_next_files_first_tensor_computes_while_the_last_of_the_file_before_is_written(tmp_path, monkeypatch):
    """One stream for every file: writing a file's last tensor waits here until the next file's first has started
    computing, which a stream per file (started once the file before is done) would never do."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from surgery.execute import computed_in_order

    files = [("a.safetensors", [writer.PlannedTensor("a", (4,), torch.float32)]),
             ("b.safetensors", [writer.PlannedTensor("b", (4,), torch.float32)])]
    started = threading.Event()
    real = writer.ShardWriter.write

    def compute(name):
        if name == "b":
            started.set()
        return torch.full((4,), float(ord(name)))

    def write(self, name, data):
        if name == "a":
            assert started.wait(10), "the next file's first tensor did not start computing"
        real(self, name, data)

    monkeypatch.setattr(writer.ShardWriter, "write", write)
    order = [t for _, shard in files for t in shard]
    with ThreadPoolExecutor(2) as pool:
        done = writer.write_files(tmp_path, files, computed_in_order(pool, compute, order, lambda n: 1, 2, 1))
    assert set(done.tensors) == {"a", "b"} and set(done.files) == {"a.safetensors", "b.safetensors"}
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("b"), torch.full((4,), 98.0))


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


@st.composite
def growths(draw):
    """A stored tensor, an axis, ascending old positions with gaps anywhere, and a fill."""
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 6)) for _ in range(rank)]
    axis = draw(st.integers(0, rank - 1))
    new_size = shape[axis] + draw(st.integers(1, 5))
    dest = sorted(draw(st.permutations(range(new_size)))[:shape[axis]])
    fill = draw(st.sampled_from([Fill("zeros"), Fill("ones"), Fill("const", value=0.3), Fill("random", ("t", 1)),
                                 Fill("mean"), Fill("const_mean")]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31)))).to(dtype)
    return values, axis, new_size, dest, fill


@given(growths())
@settings(max_examples=60, deadline=None)
def test_a_growth_written_in_pieces_holds_the_bytes_of_its_computation_and_its_source_digest(tmp_path_factory, case):
    """Kernel-copied kept entries + computed new entries (zeros left to the file) = evaluating the growth;
    where the fill never read the source, the read-back digests its bytes and checks them."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from surgery.io.checkpoint import Checkpoint
    from surgery.lazy import read
    from surgery.ops.slices import grow_axis

    values, axis, new_size, dest, fill = case
    d = values.dtype
    tmp = tmp_path_factory.mktemp("pieces")
    save_file({"pad": torch.zeros(3, dtype=torch.int8), "w": values}, tmp / "model.safetensors")
    (tmp / "config.json").write_text("{}")
    ckpt = Checkpoint(tmp)
    state = SimpleNamespace(tensors={"w": read("w", values.shape, d)}, new_slices=[])
    grow_axis(state, "w", axis, new_size, dest, fill, "grow")
    node = state.tensors["w"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(execute, "MIN_PIECE", 0)  # these tensors are tiny: every run is "short"
        layout = execute.kept_layout(node, d, ckpt)
    assert layout is not None and sum(n for *_, n in layout.copies) == values.numel() * d.itemsize
    pieces = execute.grown_pieces(node, layout, ckpt, torch.device("cpu"), torch.float32, d)
    w = writer.ShardWriter(tmp / "out.safetensors", [writer.PlannedTensor("w", node.shape, d)])
    w.write("w", pieces)
    w.close()
    expected = evaluate(node, ckpt, torch.device("cpu"), d if storage_exact(node, d) else torch.float32).to(d)
    got = tensor_bytes_of(tmp / "out.safetensors")["w"]
    assert got == as_bytes(expected)
    assert w.digests["w"] == blake3(got).hexdigest()
    assert w.source_digests == ({} if fill.reads_values else {"w": blake3(as_bytes(values)).hexdigest()})


def tensor_bytes_of(file: Path) -> dict[str, bytes]:
    header = read_safetensors_header(file)
    raw = file.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    return {n: raw[start + i["data_offsets"][0]:start + i["data_offsets"][1]] for n, i in header.items() if n != "__metadata__"}


def _data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (absolute byte offset, bytes) in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + a, b - a) for k, v in header.items() if k != "__metadata__" for a, b in [v["data_offsets"]]}


def _copied_bytes_by_offset_modulo_64(recipe: Path, src: Path, out: Path) -> list[dict[int, int]]:
    """Per output shard: bytes of its tensors by (output offset - source offset) modulo 64, after running `recipe`."""
    api.run(recipe, verify=False, force=True)
    source = {k: at for f in src.glob("*.safetensors") for k, (at, _) in _data_ranges(f).items()}
    classes = []
    for f in sorted(out.glob("*.safetensors")):
        by: dict[int, int] = {}
        for k, (at, n) in _data_ranges(f).items():
            by[(at - source[k]) % 64] = by.get((at - source[k]) % 64, 0) + n
        classes.append(by)
    return classes


def test_kernel_copied_tensors_keep_their_source_offset_modulo_64(tmp_path, monkeypatch):
    """The kernel copies a range about twice as fast when source and output offsets agree modulo a cache line:
    each shard's header is padded so that most of its copied bytes do (where that aligns a MiB more), and still loads."""
    model = make_model(make_config("llama", vocab=1030, hidden_heads=8, kv_heads=2, head_dim=64, layers=2,
                                   intermediate=520), dtype=torch.float32)
    src = tmp_path / "src"
    model.to(torch.bfloat16).save_pretrained(src, max_shard_size="2MB")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: copy\nsource: {src}\noutput:\n  path: {tmp_path / 'out'}\n  shard_size: 3MB\n")
    padded = _copied_bytes_by_offset_modulo_64(recipe, src, tmp_path / "out")
    behind = lambda by: max(by.values()) - by.get(0, 0)  # noqa: E731  bytes a better padding would have aligned
    assert len(padded) > 1 and all(behind(by) < writer.ALIGN_GAIN for by in padded), padded
    monkeypatch.setattr(writer, "_aligning_pad", lambda *a: 0)
    unpadded = _copied_bytes_by_offset_modulo_64(recipe, src, tmp_path / "out")
    assert any(behind(by) >= writer.ALIGN_GAIN for by in unpadded), "aligned without the padding: the test proves nothing"
    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                assert torch.equal(st.get_tensor(k), model.to(torch.bfloat16).state_dict()[k])


def test_a_nan_in_an_early_shard_stops_the_run_within_a_shard_of_it(tmp_path, capsys, monkeypatch):
    """Shards close (last digests, fsync) on a thread of their own while the next is written: a NaN found there
    still refuses the run, with nothing written, and no more than one further shard is started."""
    from surgery.cli import main

    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8, layers=6), dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] = float("nan")
    src = save_checkpoint(model.to(torch.bfloat16), tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: copy\nsource: {src}\noutput:\n  shard_size: 20KB\n")
    started = []
    real = writer.ShardWriter.__init__
    monkeypatch.setattr(writer.ShardWriter, "__init__",
                        lambda self, path, *a, **k: started.append(path.name) or real(self, path, *a, **k))
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "'model.embed_tokens.weight' holds 1 NaN/Inf value(s)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    planned = int(started[0].split("-of-")[1].split(".")[0])
    assert started[0].startswith("model-00001-") and len(started) <= 2 < planned, (started, planned)
