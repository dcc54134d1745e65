"""The NaN/Inf refusal: the exponent-bit count equals torch.isfinite's, exactly, in every float format."""
import numpy as np
import pytest
import torch

from conftest import save_checkpoint
from factories import make_config, make_model
from surgery.finite import _BLOCK, count_non_finite, tensor_non_finite

FORMATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def reference(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_is_counted_non_finite_exactly_when_isfinite_says_so(dtype):
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert tensor_non_finite(every) == reference(every) > 0
    bad = ~torch.isfinite(every)
    assert tensor_non_finite(every[~bad]) == 0
    for i in torch.nonzero(bad).flatten()[::97]:  # each non-finite pattern alone among finite values
        one = every[~bad][:300].clone()
        one[150] = every[i]
        assert tensor_non_finite(one) == 1


@pytest.mark.parametrize("dtype", FORMATS)
def test_extremes_subnormals_and_zeros_pass_and_nan_inf_are_counted(dtype):
    fi = torch.finfo(dtype)
    ok = torch.tensor([0.0, -0.0, fi.max, -fi.max, fi.tiny, -fi.tiny, fi.tiny / 4, -fi.tiny / 4, fi.eps, 1.0],
                      dtype=torch.float64).to(dtype)
    assert torch.isfinite(ok).all() and tensor_non_finite(ok) == 0
    bad = torch.cat([ok, torch.tensor([float("nan"), float("inf"), -float("inf"), -float("nan")], dtype=dtype)])
    assert tensor_non_finite(bad) == reference(bad) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_bit_patterns_are_counted_like_isfinite(dtype):
    g = np.random.default_rng(0)
    raw = g.integers(0, 256, size=(3 * _BLOCK + 5) * dtype.itemsize, dtype=np.uint8)
    raw[::7] = 0xFF  # many exponents all ones
    t = torch.from_numpy(raw).view(dtype)
    assert tensor_non_finite(t) == reference(t) > 0
    assert count_non_finite(memoryview(raw.tobytes()), dtype) == reference(t)


@pytest.mark.parametrize("dtype", FORMATS)
def test_one_nan_in_the_last_element_past_several_blocks_is_found(dtype):
    t = torch.randn(2 * _BLOCK + 3, dtype=torch.float64).to(dtype)
    assert tensor_non_finite(t) == 0
    t[-1] = float("nan")
    assert tensor_non_finite(t) == 1
    assert tensor_non_finite(t[::2]) == 1  # a strided view (the last index is even) is made contiguous first


def test_a_nan_in_a_tensor_an_op_changes_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    from surgery.cli import main

    model = make_model(make_config("llama", vocab=96, hidden_heads=4, kv_heads=2, head_dim=8), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[2, 1] = float("inf")
    src = save_checkpoint(model.to(torch.bfloat16), tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: grow\nsource: {src}\nops:\n  - op: grow_mlp\n    intermediate_size: \"+8\"\n")
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "'model.layers.0.mlp.up_proj.weight' holds 1 NaN/Inf value(s)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
