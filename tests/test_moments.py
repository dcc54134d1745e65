"""Statistics behind random fills: the same bits whatever torch's thread count, close to float64."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from surgery.execute import torch_threads
from surgery.ops import moments
from surgery.ops.slices import Fill, scatter_axis

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def with_threads(n: int, fn):
    with torch_threads(n):
        return fn()


@st.composite
def tensors(draw):
    # above torch's 32768-element grain, where its own reductions split across threads
    rows = draw(st.integers(1, 300))
    cols = draw(st.integers(max(1, 40_000 // rows), max(2, 200_000 // rows)))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale, shift = draw(st.sampled_from([(0.02, 0.0), (1.0, 3.0), (1e-3, -0.5), (1e-3, 1000.0)]))
    return (torch.randn(rows, cols, generator=g) * scale + shift).to(dtype)


@settings(max_examples=25, deadline=None)
@given(tensors())
def test_std_and_mean_have_the_same_bits_on_one_two_and_three_threads(t):
    got = [with_threads(n, lambda: moments.std_mean(t)) for n in (1, 2, 3)]
    assert got[0] == got[1] == got[2]
    assert [with_threads(n, lambda: moments.mean(t)) for n in (1, 2, 3)] == [got[0][1]] * 3


@settings(max_examples=25, deadline=None)
@given(tensors())
def test_std_and_mean_match_float64_to_float32_accuracy(t):
    ref = t.double().numpy()
    std, mean = moments.std_mean(t)
    assert std == pytest.approx(float(ref.std(ddof=1)), rel=1e-6)
    assert mean == pytest.approx(float(ref.mean()), rel=1e-6, abs=1e-7 * float(np.abs(ref).mean()))


def test_a_random_fill_draws_the_same_bits_on_one_and_two_threads():
    """torch's own std and mean split their sums by thread; the drawn rows followed them (a 1.7 GB
    grow_mlp wrote different bytes with 1 and 2 threads)."""
    old = (torch.randn(700, 300) * 0.02 + 1e-3).to(torch.bfloat16)
    grow = lambda: scatter_axis(old, 0, 900, torch.arange(700), Fill("random", ("seed", 1)))  # noqa: E731
    a, b = with_threads(1, grow), with_threads(2, grow)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.equal(a[:700], old) and a[700:].float().std() > 0


def test_statistics_of_tiny_and_constant_tensors():
    assert moments.std_mean(torch.tensor([1.0, 3.0])) == (pytest.approx(2 ** 0.5), 2.0)
    assert moments.std_mean(torch.full((5000,), 0.25)) == (0.0, 0.25)
    assert moments.mean(torch.tensor([7.0])) == 7.0


def test_std_and_mean_read_their_blocks_once():
    """Two passes (the mean, then deviations from it) read a random fill's source twice: at 8B the largest cost."""
    t = torch.randn(3, 5000) * 0.02
    calls = []

    def blocks():
        calls.append(1)
        return (t[0], t[1:])

    assert moments.std_mean_of(blocks, t.numel()) == moments.std_mean(t)
    assert len(calls) == 1
