"""Outputs made only of moves round nothing: a half-precision output whose every value is a stored value
copied unchanged or a constant its dtype holds exactly (and concatenations, slices and pads of those)
is judged by the float32 noise alone, not by a storage rounding it never underwent (issue 25)."""
import json
import struct
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from surgery import api, execute
from surgery.cli import main
from surgery.lazy import LazyTensor, evaluate, full, read, storage_exact
from surgery.ops.slices import Fill, grow_axis
from test_verdicts import half_source, report_of

BF16 = torch.bfloat16


def bf16_holds(v: float) -> bool:
    """bfloat16 is float32 with the low 16 bits zero: an oracle independent of torch's casts."""
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return struct.unpack("<f", struct.pack("<f", v))[0] == v and bits & 0xFFFF == 0


class Reader:
    def __init__(self, tensors):
        self.tensors = tensors

    def load(self, name):
        return self.tensors[name]


VALUES = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, 3.0, 0.1, 1 / 3, 2e-4]),
                   st.floats(-1e4, 1e4, allow_nan=False, width=32))


@st.composite
def graphs(draw, depth=3):
    """A node over one stored bf16 tensor `w` (4 x 3), built from reads, constants, concatenations, row slices and
    row growths with a constant fill; returns it with the constants it used."""
    if depth == 0 or draw(st.booleans()):
        if draw(st.booleans()):
            return read("w", (4, 3), BF16), []
        v = draw(VALUES)
        return full((draw(st.integers(1, 3)), 3), BF16, v, "const"), [v]
    how = draw(st.sampled_from(["cat", "narrow", "grow"]))
    a, used = draw(graphs(depth=depth - 1))
    if how == "cat":
        b, more = draw(graphs(depth=depth - 1))
        return LazyTensor((a.shape[0] + b.shape[0], 3), BF16, lambda x, y: torch.cat([x, y]), (a, b), "cat", kind="move"), used + more
    if how == "narrow":
        start = draw(st.integers(0, a.shape[0] - 1))
        n = draw(st.integers(1, a.shape[0] - start))
        return a.map(lambda t: t.narrow(0, start, n).clone(), (n, 3), "rows", kind="move"), used
    v = draw(VALUES)
    state = SimpleNamespace(tensors={"x": a}, new_slices=[])
    n = a.shape[0]
    grow_axis(state, "x", 0, 2 * n, list(range(0, 2 * n, 2)), Fill("const", value=v), "grow")
    return state.tensors["x"], used + [v]


@settings(max_examples=150, deadline=None)
@given(graphs(), st.integers(0, 2**31))
def test_copies_slices_concatenations_and_constants_bfloat16_holds_are_moves_and_round_nothing(case, seed):
    node, constants = case
    w = torch.randn((4, 3), generator=torch.Generator().manual_seed(seed)).to(BF16)
    exact = storage_exact(node, BF16)
    assert exact == all(bf16_holds(v) for v in constants)
    if exact:  # the same bits in bf16 as in float32, and every value a stored one or a constant: nothing rounded
        in_storage = evaluate(node, Reader({"w": w}), torch.device("cpu"), BF16)
        in_float = evaluate(node, Reader({"w": w}), torch.device("cpu"), torch.float32)
        assert torch.equal(in_storage.view(torch.int16), in_float.to(BF16).view(torch.int16))
        allowed = set(w.float().flatten().tolist()) | set(constants)
        assert set(in_float.flatten().tolist()) <= allowed


def test_a_constant_of_another_dtype_is_a_move_only_where_the_value_is_held():
    assert storage_exact(full((2,), torch.float32, 0.5, "c"), torch.float16)
    assert not storage_exact(full((2,), torch.float32, 0.1, "c"), torch.float16)
    assert storage_exact(full((2,), torch.float32, 0.1, "c"), torch.float32) is False  # 0.1 rounds in float32 too
    assert storage_exact(full((2,), torch.float64, 0.1, "c"), torch.float64)


MOVES_ONLY = [
    ("tiny-llama", "grow_layers\n    num_layers: x2"),  # zero writers: constants
    ("tiny-phi3", "grow_mlp\n    intermediate_size: x2"),  # gate_up_proj split and joined again
    ("tiny-llama", "grow_vocab\n    add_tokens: ['<x>', '<y>']"),  # mean rows: neither an old logit nor the judged mass
]


@pytest.mark.parametrize("builtin,op", MOVES_ONLY, ids=["grow_layers", "phi3-grow_mlp", "grow_vocab"])
def test_a_bfloat16_output_of_moves_only_is_judged_by_the_float32_noise_alone(builtin, op, write_recipe, tmp_path):
    src = half_source(builtin, BF16, tmp_path)
    recipe = write_recipe(f"name: t\nsource: {src}\nops:\n  - op: {op}\nverify:\n  max_tokens: 128\n  per_op: false\n")
    assert api.plan(recipe).rounded_storage is None
    assert main(["run", str(recipe), "--output", str(tmp_path / "o")]) == 0
    rep = report_of(tmp_path / "o")
    assert rep["noise_floor"]["storage"] is None and "bfloat16" not in rep["rule"]
    assert rep["bound"]["max_logit_diff"] == pytest.approx(2 * rep["noise_floor"]["compute"]["max_logit_diff"])


def test_a_bfloat16_grow_layers_with_writers_of_2e_4_instead_of_0_fails_without_per_op(write_recipe, tmp_path, monkeypatch):
    """The written zero writers hold 2e-4: far above float32 noise, far below bfloat16 storage noise on this model."""
    real = execute.evaluate

    def slipping(node, *args):
        t = real(node, *args)
        return t + 2e-4 if node.label.endswith("zero writer") else t

    monkeypatch.setattr(execute, "evaluate", slipping)
    src = half_source("tiny-llama", BF16, tmp_path)
    recipe = write_recipe(f"name: t\nsource: {src}\nops:\n  - op: grow_layers\n    num_layers: x2\n"
                          "verify:\n  max_tokens: 128\n  per_op: false\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "o")]) == 1
    rep = report_of(tmp_path / "o")
    assert not rep["passed"] and any(f.startswith("max |dlogit|") for f in rep["failed"])


def test_a_constant_bfloat16_cannot_hold_is_rounded_storage(write_recipe, tmp_path, monkeypatch):
    import surgery.ops.grow_layers as grow_layers

    src = half_source("tiny-llama", BF16, tmp_path)
    recipe = write_recipe(f"name: t\nsource: {src}\nops:\n  - op: grow_layers\n    num_layers: x2\n")
    assert api.plan(recipe).rounded_storage is None
    monkeypatch.setattr(grow_layers, "full", lambda shape, dtype, value, label: full(shape, dtype, value + 0.1, label))
    assert api.plan(recipe).rounded_storage == "bfloat16"
