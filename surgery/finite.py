"""Counting NaN/Inf values from their exponent bits: no model is operated on if its source holds any.

An IEEE value (bfloat16, float16, float32, float64) is NaN or Inf exactly when its exponent bits are
all ones, i.e. when its bits without the sign, read as an unsigned integer, are at least the
exponent mask. Masking in cache-sized blocks into one scratch buffer reads each byte once at
~10 GB/s here, where torch's `aminmax` widens bfloat16 to float32 first (~4 GB/s) and `isfinite`
allocates a boolean tensor (~0.3 GB/s).
"""
from __future__ import annotations

import numpy as np

# dtype name -> (unsigned integer of its width, exponent mask = smallest non-finite magnitude)
_FORMATS = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00),
            "float32": (np.uint32, 0x7F800000), "float64": (np.uint64, 0x7FF0000000000000)}
_BLOCK = 1 << 16  # elements per block: the scratch buffer stays in L2 and under glibc's mmap threshold


def checkable(dtype) -> bool:
    """Whether `count_non_finite` knows `dtype`'s bit layout (a torch dtype)."""
    return str(dtype).removeprefix("torch.") in _FORMATS


def count_non_finite(raw, dtype) -> int:
    """NaN/Inf values in a buffer of raw bytes holding `dtype` values (torch dtype); 0 in one pass when none."""
    kind, ones = _FORMATS[str(dtype).removeprefix("torch.")]
    bits = np.frombuffer(raw, dtype=np.uint8).view(kind)
    magnitude = kind(ones - 1 | ones)  # every bit but the sign
    scratch = np.empty(min(_BLOCK, bits.size), dtype=kind)
    for i in range(0, bits.size, _BLOCK):
        block = bits[i:i + _BLOCK]
        s = scratch[:block.size]
        np.bitwise_and(block, magnitude, out=s)
        if s.max() >= ones:
            return int(np.count_nonzero((bits & magnitude) >= ones))
    return 0


def tensor_non_finite(t) -> int:
    """NaN/Inf values in a floating-point torch tensor."""
    import torch

    if not t.numel():
        return 0
    if t.device.type == "cpu" and checkable(t.dtype):
        return count_non_finite(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), t.dtype)
    # other layouts (float8, ...) and device tensors: min and max propagate NaN and reach +-Inf, one pass
    if all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
        return 0
    return int((~torch.isfinite(t)).sum())
