"""Shared helpers: per-test random generators, dtype-aware comparisons."""

import zlib

import torch

from softmax_ce._launch import uses_triton

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


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at each of `values` (subnormal spacing below the normals)."""
    fi = torch.finfo(dtype)
    a = values.abs().clamp_min(fi.tiny)
    return fi.eps * torch.exp2(torch.floor(torch.log2(a)))


def assert_close_to_ref(actual, ref, dtype, *, rtol=1e-5, scale_atol=1e-6, ulps=2,
                        lowp_scale_atol=2e-6, what="value"):
    """Compare a result of softmax_ce in `dtype` with the fp64 reference.

    fp32: |a - r| <= rtol * |r| + scale_atol * max|r| (the fp32 accumulation's noise
          relative to the largest entry: a gradient row is a difference of terms of
          about that size).
    bf16 / fp16: the reference is first rounded to the dtype; allow `ulps` units in the
          last place of it, plus the same fp32-noise term (entries far below the
          largest one can be off by more than an ulp of themselves when they come from
          a cancellation in fp32 - no implementation storing in the dtype can do better).
    fp64: 1e-10 relative.
    NaN and inf must appear in the same places.
    """
    a = actual.detach().cpu().double()
    r = ref.detach().cpu().double()
    assert a.shape == r.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(r.shape)}"
    assert torch.equal(a.isnan(), r.isnan()), f"{what}: NaN pattern differs:\n{a}\nvs reference\n{r}"
    inf = r.isinf()
    assert torch.equal(a.isinf(), inf) and torch.equal(a[inf], r[inf]), f"{what}: inf differs"
    fin = r.isfinite()
    a, r = a[fin], r[fin]
    if r.numel() == 0:
        return
    scale = r.abs().max()
    if dtype == torch.float64:
        tol = 1e-10 * r.abs() + 1e-12 * scale
    elif dtype == torch.float32:
        tol = rtol * r.abs() + scale_atol * scale
    else:
        r = r.to(dtype).double()
        tol = ulps * ulp(r, dtype) + lowp_scale_atol * scale
    err = (a - r).abs()
    bad = err > tol
    if bad.any():
        i = int(torch.argmax(err - tol))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{r.numel()} entries off; worst: got {a[i].item():.9g}, "
            f"reference {r[i].item():.9g} (err {err[i].item():.3g} > tol {tol[i].item():.3g})")
