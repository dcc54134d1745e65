"""Large tensors are computed and written in row blocks: the bits of computing them whole, in bounded memory."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from hypothesis import given, settings, strategies as st

from conftest import save_checkpoint, tensor_bytes
from factories import make_config, make_model, release_config
from surgery import api, execute, rowwise
from surgery.card import HASH_COVERS, source_content_hash
from surgery.execute import compute_dtype_for, output_tensors, torch_threads
from surgery.lazy import evaluate, generator, read, storage_exact
from surgery.ops import moments
from surgery.ops.clone_width import CloneRows, _clone_tensor
from surgery.ops.slices import Fill, grow_axis, scale
from surgery.rowwise import RowEvaluator, randn_rows

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def blocks_of(nbytes: int, draw: int | None = None):
    """Row blocks of `nbytes` of float32 (and random draws in blocks of `draw` values) inside the block."""
    before = rowwise.BLOCK_BYTES, rowwise.DRAW_VALUES
    rowwise.BLOCK_BYTES = nbytes
    if draw is not None:
        rowwise.DRAW_VALUES = draw
    try:
        yield
    finally:
        rowwise.BLOCK_BYTES, rowwise.DRAW_VALUES = before


class Reader:
    reads_rows = True

    def __init__(self, tensors):
        self.tensors = tensors
        self.row_reads = 0

    def load(self, name):
        return self.tensors[name]

    def load_rows(self, name, start, stop):
        self.row_reads += 1
        return self.tensors[name][start:stop]


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class _State:  # the part of ModelState that grow_axis touches
    def __init__(self, node):
        self.tensors = {"w": node}
        self.new_slices = []


FILLS = [Fill("zeros"), Fill("ones"), Fill("const", value=0.5), Fill("mean"), Fill("const_mean"), Fill("random", ("s", 1))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def graphs(draw):
    """A stored tensor, grown along any axis with any fill but a mean over rows (then maybe scaled), or cloned
    (any tiling, noise or none): the row-separable graphs the executor computes in blocks."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = [draw(st.integers(1, 40)), draw(st.integers(1, 12))] + ([draw(st.integers(1, 3))] if draw(st.booleans()) else [])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    w = (torch.randn(shape, generator=g) * 0.3 + 0.1).to(dtype)
    src = read("w", shape, dtype)
    if draw(st.booleans()):
        axis = draw(st.integers(0, len(shape) - 1))
        new = shape[axis] + draw(st.integers(1, 6))
        dest = draw(st.lists(st.integers(0, new - 1), min_size=shape[axis], max_size=shape[axis], unique=True))
        if draw(st.booleans()):
            dest = sorted(dest)
        state = _State(src)
        grow_axis(state, "w", axis, new, dest, draw(st.sampled_from(FILLS if axis else [f for f in FILLS if f.kind != "mean"])),
                  "grow")
        node = state.tensors["w"]
        if draw(st.booleans()):
            node = scale(node, 0.7, "scale")
    else:
        shape2 = shape[:2]
        w = w if len(shape) == 2 else w[..., 0].contiguous()
        src = read("w", shape2, dtype)
        tiled = draw(st.sampled_from([[0], [1], [0, 1]]))
        input_axis = 1 if 1 in tiled and draw(st.booleans()) else None
        k, noise, extra = draw(st.integers(2, 3)), draw(st.sampled_from([0.0, 0.1])), draw(st.sampled_from([1.0, 0.5]))
        out = tuple(s * k if i in tiled else s for i, s in enumerate(shape2))
        node = src.map(lambda t: _clone_tensor(t, tiled, input_axis, k, noise, ("c",), extra), out, "clone",
                       rows=CloneRows(tiled, input_axis, k, noise, ("c",), extra))
    return w, node, draw(st.integers(4, 600)), draw(st.sampled_from([1, 7, 64, 1 << 20]))


@settings(max_examples=150, deadline=None)
@given(graphs(), st.sampled_from([torch.float32, torch.float64, None]))
def test_row_blocks_of_a_graph_have_the_bits_of_evaluating_it_whole(graph, compute):
    """Whatever the block size and the random draws' block size, in the compute dtype or the storage dtype."""
    w, node, nbytes, draw = graph
    dtype = compute or w.dtype
    if compute is None and not storage_exact(node, w.dtype):
        dtype = torch.float32
    reader = Reader({"w": w})
    with blocks_of(nbytes, draw):
        whole = evaluate(node, reader, torch.device("cpu"), dtype)
        ev = RowEvaluator(node, reader, torch.device("cpu"), dtype)
        ev.prepare()
        blocks = list(ev.blocks())
    assert reader.row_reads >= 1 and len(blocks) >= 1
    assert bits(torch.cat(blocks)) == bits(whole)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.lists(st.integers(1, 9000), min_size=1, max_size=6), st.sampled_from(DTYPES))
def test_statistics_of_consecutive_blocks_have_the_bits_of_the_whole_tensor(n, cuts, dtype):
    t = (torch.randn(n * 3) * 0.02 + 0.3).to(dtype)
    edges = sorted({0, t.numel(), *[c % t.numel() for c in cuts]})
    parts = lambda: [t[a:b] for a, b in zip(edges, edges[1:])]  # noqa: E731
    assert moments.std_mean_of(parts, t.numel()) == moments.std_mean(t)
    assert moments.mean_of(parts, t.numel()) == moments.mean(t)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9000), st.integers(1, 5), st.lists(st.integers(1, 9000), max_size=5),
       st.sampled_from(["mean", "hewitt", "subword", "zeros"]), st.sampled_from(DTYPES))
def test_new_vocabulary_rows_from_row_blocks_have_the_bits_of_the_whole_old_rows(rows, width, cuts, init, dtype):
    """grow_vocab's new rows are computed from the old rows' row blocks, cut anywhere (more or fewer rows than
    the 4096 its sums run over), with the bits of reading the old rows whole."""
    from surgery.ops.grow_vocab import VocabInit, new_rows

    old = (torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)) * 0.02 + 0.1).to(dtype)
    edges = sorted({0, rows, *[c % rows for c in cuts]})
    pieces = [[0, rows - 1], None, [rows // 2]]
    whole = new_rows(lambda: (old,), VocabInit(init), 3, pieces, ("v",))
    blocks = new_rows(lambda: [old[a:b] for a, b in zip(edges, edges[1:])], VocabInit(init), 3, pieces, ("v",))
    assert bits(blocks) == bits(whole)
    if init == "subword":
        assert torch.equal(whole[0], old[[0, rows - 1]].double().mean(dim=0)) and torch.equal(whole[2], old[rows // 2].double())


def test_a_random_draw_is_defined_per_row_block_of_fixed_size():
    """Rows [a, b) of a draw are rows a..b of the whole; block 0 is the seed's own torch.randn, so tensors of at
    most DRAW_VALUES values draw what they drew before blocks; later blocks are seeded apart."""
    shape = (3000, 1000)  # 1048 rows per block of 2**20 values
    whole = randn_rows(shape, ("t",), 0, shape[0])
    assert rowwise.draw_rows(shape) == 1048
    for a, b in [(0, 1), (5, 1048), (1000, 1100), (1048, 3000), (2999, 3000)]:
        assert torch.equal(randn_rows(shape, ("t",), a, b), whole[a:b])
    assert torch.equal(whole[:1048], torch.randn((1048, 1000), generator=generator("t")))
    assert torch.equal(randn_rows((30, 40), ("t",), 0, 30), torch.randn((30, 40), generator=generator("t")))
    assert not torch.equal(whole[1048:1096], whole[:48])


def test_consecutive_blocks_compute_side_by_side_and_come_in_order():
    """The first two tasks meet at a barrier (each would wait forever for the other if they ran one after the
    other); the later ones finish in reverse order; the results still come in the order of the tasks."""
    import threading
    import time

    meet = threading.Barrier(2, timeout=10)

    def task(i):
        if i < 2:
            meet.wait()
        time.sleep(0.01 * (6 - i))
        return i

    assert list(rowwise.in_order([lambda i=i: task(i) for i in range(6)])) == list(range(6))


def test_blocks_are_rounded_to_their_stored_dtype_on_the_threads_that_compute_them(monkeypatch):
    """One thread rounding every block to bf16 behind two computing them was a clone's slowest step."""
    import threading

    monkeypatch.setattr(rowwise, "BLOCK_BYTES", 4 * 64 * 8)  # 8 rows of 64 float32 values a block
    node = scale(read("w", (40, 64), torch.float32), 0.5, "half")
    w = torch.randn(40, 64)
    reader = type("R", (), {"load": lambda self, name: w, "tensors": {"w": None}})()
    where = []

    def then(t):
        where.append(threading.current_thread().name)
        return rowwise.stored_as(t, torch.bfloat16)

    ev = RowEvaluator(node, reader, torch.device("cpu"), torch.float32)
    ev.prepare()
    got = torch.cat(list(ev.blocks(then=then)))
    assert got.dtype == torch.bfloat16 and torch.equal(got, (w * 0.5).to(torch.bfloat16))
    assert len(where) == 5 and all(name.startswith("rows") for name in where)


def test_an_error_in_a_block_reaches_the_consumer_and_the_blocks_after_it_never_start():
    started = []

    def task(i):
        started.append(i)
        if i == 1:
            raise ValueError("block 1")
        return i

    got = []
    with pytest.raises(ValueError, match="block 1"):
        for x in rowwise.in_order([lambda i=i: task(i) for i in range(50)]):
            got.append(x)
    assert got == [0] and max(started) <= 3


def test_rows_read_a_little_out_of_order_are_hashed_in_order():
    """Two threads computing consecutive blocks read their rows out of order: the digest is still that of the
    rows in order; reads too far ahead, or of rows already hashed, give no digest rather than a wrong one."""
    t = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    whole = blake3(t.numpy().tobytes()).hexdigest()
    spans = [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]

    def fed(order, seq=None):
        seq = seq or rowwise.Sequential()
        got = [seq.feed("w", a, b, 40, t[a:b], blake3) for a, b in order]
        return [d for d in got if d is not None]

    assert fed(spans) == [whole]
    assert fed([spans[i] for i in (1, 0, 3, 2, 4)]) == [whole]
    assert fed([spans[i] for i in (4, 3, 2, 1, 0)]) == [whole]  # four reads ahead: all kept
    assert fed([(0, 8), (8, 16), (0, 8), (16, 24), (8, 16), (24, 40)]) == [whole]  # rows read again are not hashed twice
    many = [(a, a + 1) for a in range(40)]
    assert fed(many[6:] + many[:6]) == []  # more than AHEAD reads ahead: no digest (a whole load gives it)


GROWTHS = {
    "grow_mlp": "  - op: grow_mlp\n    intermediate_size: x1.5\n",
    "grow_heads_zeros": "  - op: grow_heads\n    num_heads: x2\n    init: zeros\n  - op: rescale_norm\n",
    "grow_heads": "  - op: grow_heads\n    num_heads: x2\n  - op: rescale_norm\n",
    "grow_vocab": "  - op: grow_vocab\n    pad_to_multiple_of: 128\n",
    "grow_vocab_hewitt": "  - op: grow_vocab\n    pad_to_multiple_of: 1000\n    init: hewitt\n",
    "clone_width": "  - op: clone_width\n    factor: 3\n",
    "clone_width_noise": "  - op: clone_width\n    factor: 2\n    noise: 0.01\n",
    "mean_fill": "  - op: grow_heads\n    num_heads: x2\n    residual_fill: mean\n  - op: rescale_norm\n",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    made = {}
    for family, dtype in [("llama", torch.bfloat16), ("stablelm", torch.float32)]:
        model = make_model(make_config(family, vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
        made[family] = save_checkpoint(model.to(dtype), root / family)
    model = make_model(release_config("gemma2", heads=4, kv_heads=2, head_dim=8, hidden=32, vocab=96), dtype=torch.float32)
    made["gemma2"] = save_checkpoint(model.to(torch.bfloat16), root / "gemma2")
    return made


def write(source: Path, ops: str, out: Path, tmp_path: Path, **run) -> Path:
    recipe = tmp_path / f"{out.name}.yaml"
    recipe.write_text(f"name: t\nsource: {source}\noutput: {out}\nops:\n{ops}")
    api.run(recipe, verify=False, **run)
    return recipe


@pytest.mark.parametrize("recipe", list(GROWTHS))
@pytest.mark.parametrize("family", ["llama", "stablelm", "gemma2"])
def test_tensors_written_in_row_blocks_are_the_bytes_of_computing_them_whole(sources, tmp_path, monkeypatch, recipe, family):
    """Every output tensor (grown, cloned, scaled, written in pieces or in blocks of a few rows) equals
    evaluating its graph whole and rounding once; digests, file digests and the source's content hash
    (hashed from its row reads) are those of the bytes."""
    if recipe == "mean_fill" and family != "stablelm":
        pytest.skip("residual_fill: mean is for LayerNorm")
    blocked, pieces = [], []
    real_blocks, real_pieces = execute.byte_blocks, execute.grown_pieces
    monkeypatch.setattr(execute, "byte_blocks", lambda node, *a: blocked.append(node) or real_blocks(node, *a))
    monkeypatch.setattr(execute, "grown_pieces", lambda node, *a: pieces.append(node) or real_pieces(node, *a))
    monkeypatch.setattr(execute, "MIN_PIECE", 0 if family == "llama" else 1 << 60)
    monkeypatch.setattr(rowwise, "BLOCK_BYTES", 600)
    monkeypatch.setattr(rowwise, "DRAW_VALUES", 100)
    out = tmp_path / "out"
    r = write(sources[family], GROWTHS[recipe], out, tmp_path)
    assert blocked or pieces
    p = api.plan(r)
    cd = compute_dtype_for(p.final)
    written = tensor_bytes(out)
    assert set(written) == set(p.final.tensors)
    for name, node, d in output_tensors(p.final, "auto"):
        t = evaluate(node, p.checkpoint, torch.device("cpu"), d if storage_exact(node, d) else cd)
        assert written[name] == bits(t.to(d) if t.is_floating_point() else t), name
    report = json.loads((out / "surgery_report.json").read_text())
    assert report["tensor_blake3"] == {n: blake3(b).hexdigest() for n, b in written.items()}
    for f in out.glob("*.safetensors"):
        assert report["files_blake3"][f.name] == blake3(f.read_bytes()).hexdigest()
    assert f"({HASH_COVERS}): {source_content_hash(sources[family])}" in (out / "surgery_recipe.yaml").read_text()


def test_random_fills_and_noise_have_the_same_bits_whatever_the_block_size_and_thread_count(sources, tmp_path):
    ops = GROWTHS["grow_heads"] + GROWTHS["clone_width_noise"]
    digests = []
    for nbytes, threads in [(1 << 30, 1), (600, 1), (4096, 2), (333, 3)]:
        out = tmp_path / f"out-{nbytes}-{threads}"
        with blocks_of(nbytes, 100), torch_threads(threads):
            write(sources["llama"], ops, out, tmp_path)
        digests.append(json.loads((out / "surgery_report.json").read_text())["tensor_blake3"])
    assert digests[1] == digests[0] and digests[2] == digests[0] and digests[3] == digests[0]


def test_a_nan_in_a_tensor_read_in_row_blocks_is_refused_with_the_whole_tensors_count(sources, tmp_path, capsys, monkeypatch):
    from surgery.cli import main

    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
        model.lm_head.weight[90, 0] = float("inf")
    src = save_checkpoint(model, tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nsource: {src}\nops:\n{GROWTHS['clone_width']}")
    monkeypatch.setattr(rowwise, "BLOCK_BYTES", 600)
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "'lm_head.weight' holds 2 NaN/Inf value(s)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


PEAK = """
import sys
from pathlib import Path

def peak():  # VmHWM, the peak of this process's own memory: ru_maxrss starts at the forking parent's peak
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024

try:
    from surgery import rowwise
    rowwise.BLOCK_BYTES = 4 << 20
except ImportError:  # before row blocks
    pass
from surgery import api

def run(src, out):
    recipe = Path(out + ".yaml")
    recipe.write_text(f"name: t\\nsource: {src}\\noutput: {out}\\nops:\\n" + sys.argv[4])
    api.run(recipe, verify=False)

run(sys.argv[1], sys.argv[3] + "-warm")  # the same code paths on a small model: every import made
before = peak()
run(sys.argv[2], sys.argv[3])
print(peak() - before)
"""


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A 1-layer bf16 model with a vocabulary of 2**19 rows: embedding and lm_head 64 MiB each."""
    root = tmp_path_factory.mktemp("wide")
    small = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=16, layers=1), dtype=torch.float32)
    big = make_model(make_config("llama", vocab=1 << 19, hidden_heads=4, kv_heads=2, head_dim=16, layers=1), dtype=torch.float32)
    return save_checkpoint(small.to(torch.bfloat16), root / "small"), save_checkpoint(big.to(torch.bfloat16), root / "big")


@pytest.mark.parametrize("ops", ["clone_width_noise", "grow_heads", "grow_vocab_hewitt"])
def test_peak_memory_of_a_vocabulary_sized_growth_stays_a_few_blocks(wide_vocab, tmp_path, ops):
    """Computed whole, lm_head's clone (2**19 x 128 float32: 256 MiB, with its repeat and its noise draw), its
    random fill (with the float32 source) or grow_vocab's new rows (the old rows widened to float32, 128 MiB a
    tensor) took 380-770 MiB over the process's size; in 4 MiB blocks, 11-19 MiB.
    glibc's mmap threshold is fixed (it otherwise rises to keep freed blocks for reuse, tens of MiB more
    whatever their size), so the peak counts what the code holds."""
    small, big = wide_vocab
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="262144")
    done = subprocess.run([sys.executable, "-c", PEAK, str(small), str(big), str(tmp_path / "out"), GROWTHS[ops]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grew = int(done.stdout.split()[-1])
    assert grew < 48 << 20, f"peak RSS grew by {grew / 2**20:.0f} MiB"
