"""Shared helpers: per-test random generators, the path check, the tests' tolerances
(on softmax_ce.testing's comparator)."""

import zlib

import torch

from softmax_ce._launch import uses_triton
from softmax_ce.testing import assert_close, ulp  # noqa: F401  (ulp: for the tests)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gen(*key) -> torch.Generator:
    """A CPU generator seeded from the test's parameters: fresh, reproducible inputs per test."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def check_path(path, logits):
    """The tensor really takes the implementation path the test is about."""
    assert str(logits.device).startswith(path.device)
    assert uses_triton(logits) == path.triton, (path, logits.dtype, logits.device)


def assert_close_to_ref(actual, ref, dtype, *, rtol=1e-5, scale_atol=1e-6, ulps=2,
                        lowp_scale_atol=2e-6, what="value"):
    """Compare a result of softmax_ce in `dtype` with the fp64 reference
    (softmax_ce.testing.assert_close with these tolerances).

    fp32: |a - r| <= rtol * |r| + scale_atol * max|r| (the fp32 accumulation's noise
          relative to the largest entry: a gradient row is a difference of terms of
          about that size).
    bf16 / fp16: the reference is first rounded to the dtype; allow `ulps` units in the
          last place of it, plus lowp_scale_atol * max|r| (entries far below the
          largest one can be off by more than an ulp of themselves when they come from
          a cancellation in fp32 - no implementation storing in the dtype can do better).
    fp64: 1e-10 relative, plus 1e-12 * max|r|.
    NaN and inf must appear in the same places.
    """
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-12)
    elif dtype == torch.float32:
        tol = dict(rtol=rtol, atol=scale_atol)
    else:
        tol = dict(atol=lowp_scale_atol, ulps=ulps)
    assert_close(actual, ref, dtype, **tol, what=what)
