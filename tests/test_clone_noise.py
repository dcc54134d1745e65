"""clone_width's symmetry-breaking noise: k - 1 normals per entry on the Helmert basis, the distribution of
z - mean(z) over k normals (what it drew before), summing to zero over the k copies."""
import math

import pytest
import torch

from surgery.ops.clone_width import _clone_rows, helmert


def _noise(k: int, rows: int, n: int, scale: float, seed=("noise",)) -> torch.Tensor:
    """The noise alone (a reader of zeros), as [rows, k, n]."""
    t = torch.zeros(rows, n)
    out = _clone_rows(t, 0, (rows, k * n), [0, 1], 1, k, scale, seed, 1.0, 1.0)
    return out.view(rows, k, n)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_helmert_basis_is_orthonormal_and_spans_the_zero_sum_vectors(k):
    h = torch.tensor(helmert(k), dtype=torch.float64)  # k x (k - 1)
    assert torch.allclose(h.T @ h, torch.eye(k - 1, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(h.sum(dim=0), torch.zeros(k - 1, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(h @ h.T, torch.eye(k, dtype=torch.float64) - 1.0 / k, atol=1e-15)


def test_two_copies_get_exactly_opposite_noise():
    z = _noise(2, 64, 300, 0.05)
    assert torch.equal(z[:, 0], -z[:, 1])
    assert z.abs().max() > 0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_noise_has_the_mean_std_and_covariance_of_centred_normals(k):
    """Over k copies: mean zero (to float32 rounding), each copy's std scale * sqrt(1 - 1/k), copies correlated
    -1/(k - 1): the covariance scale^2 (I - 11^T/k) of z - mean(z) over k standard normals."""
    scale, rows, n = 0.01, 256, 4096
    z = _noise(k, rows, n, scale).double()
    assert z.sum(dim=1).abs().max() <= 8 * k * torch.finfo(torch.float32).eps * scale
    samples = z.permute(1, 0, 2).reshape(k, -1) / scale  # one row per copy, 2**20 samples each
    cov = samples @ samples.T / samples.shape[1]
    want = torch.eye(k, dtype=torch.float64) - 1.0 / k
    assert torch.allclose(cov, want, atol=6 / math.sqrt(samples.shape[1]))  # ~6 standard errors
    assert abs(samples.mean().item()) < 6 / math.sqrt(samples.numel())


def test_noise_is_added_to_the_divided_copies_and_is_deterministic_per_seed():
    t = torch.randn(40, 50)
    a = _clone_rows(t, 0, (40, 100), [0, 1], 1, 2, 0.1, ("s",), 1.0, 2.0)
    assert torch.equal(a, _clone_rows(t, 0, (40, 100), [0, 1], 1, 2, 0.1, ("s",), 1.0, 2.0))
    assert not torch.equal(a, _clone_rows(t, 0, (40, 100), [0, 1], 1, 2, 0.1, ("other",), 1.0, 2.0))
    assert torch.allclose(a[:, :50] + a[:, 50:], t, atol=1e-6)  # the copies sum to the input, up to rounding
    assert torch.equal(_clone_rows(t, 0, (40, 100), [0, 1], 1, 2, 0.0, ("s",), 1.0, 2.0), (t / 2).repeat(1, 2))
