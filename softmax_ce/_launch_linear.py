"""Launchers of the fused linear cross-entropy: Triton kernels or a chunked PyTorch path.

Same dispatch as `_launch`: CUDA tensors and, under TRITON_INTERPRET=1, CPU tensors
run `softmax_ce.kernels.linear_cross_entropy`; anything else (CPU, float64) computes
the logits of at most CHUNK_ELEMENTS at a time in PyTorch and reuses the plain
cross-entropy's chunk math, so no N x V tensor exists on either path.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _launch
from ._launch import run_kernel, uses_triton
from .kernels import linear_cross_entropy as K
from .kernels.cross_entropy import interpreting


def _dot_precision(x: Tensor) -> str:
    # torch runs fp32 matmuls in full precision unless the user allows tf32
    return "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _upcast_dot(x: Tensor) -> bool:
    # Triton's interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bit
    # patterns (triton-lang/triton#11584); the GPU path never upcasts.
    return interpreting() and x.dtype != torch.float32


def _grid(n_rows, n_vocab):
    return lambda meta: (triton_cdiv(n_rows, meta["BLOCK_N"]) * triton_cdiv(n_vocab, meta["BLOCK_V"]),)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def compose_rows(lse, target_term, smooth_term, alpha, beta, zeta, W, s_wy=None):
    """Per-row loss and d loss/d lse from the per-row terms (O(N) PyTorch ops).

    target_term = lse - z'_t (probability targets: sum_c w y (lse - z'_c), with
    s_wy = sum_c w y), smooth_term = sum_c w_c (lse - z'_c), W = sum_c w_c.
    """
    loss = torch.where(alpha != 0, alpha * target_term, 0.0)
    dlse = alpha * s_wy if s_wy is not None else alpha.clone()
    if beta is not None:
        loss = loss + torch.where(beta != 0, beta * smooth_term, 0.0)
        dlse = dlse + beta * W
    if zeta is not None:
        loss = loss + torch.where(zeta != 0, zeta * lse * lse, 0.0)
        dlse = dlse + 2.0 * zeta * lse
    return loss, dlse


def _stats_triton(x, w, b, target, class_weight, need_smooth, softcap):
    n_rows, dim = x.shape
    n_vocab = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    m = torch.full((n_rows,), float("-inf"), **f32)
    d = torch.zeros(n_rows, **f32)
    z_t = torch.zeros(n_rows, **f32)
    swz = torch.zeros(n_rows, **f32)
    locks = torch.zeros(triton_cdiv(n_rows, 16), dtype=torch.int32, device=x.device)  # BLOCK_N >= 16
    args = (x, w, b if b is not None else m, target,
            class_weight if class_weight is not None else m,
            m, d, z_t, swz, locks, n_rows, n_vocab, dim,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), target.stride(0),
            float(softcap) if softcap is not None else 1.0)
    flags = dict(HAS_BIAS=b is not None, HAS_CLASS_WEIGHT=class_weight is not None,
                 HAS_SMOOTHING=need_smooth, HAS_SOFTCAP=softcap is not None,
                 DOT_PRECISION=_dot_precision(x), UPCAST_DOT=_upcast_dot(x))
    run_kernel("lce_fwd", K.lce_fwd_kernel, K.lce_fwd_tuned, _grid(n_rows, n_vocab), args, flags,
               x.device, n_vocab, x.dtype, K.lce_interpreter_config(n_rows, n_vocab, dim))
    shift = torch.where(m == float("-inf"), 0.0, m)
    log_d = d.log()
    target_term = (shift - z_t) + log_d  # exact for a confident row whose target is the max
    W = class_weight.sum() if class_weight is not None else float(n_vocab)
    smooth_term = W * (shift + log_d) - swz if need_smooth else None
    return shift, log_d, target_term, smooth_term


def _bwd_triton(x, w, b, target, class_weight, mx, logd, s_coef, alpha, beta, softcap,
                need_dx, need_dw, need_db):
    n_rows, dim = x.shape
    n_vocab = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(n_rows, dim, **f32) if need_dx else mx.new_empty(0)
    dw = torch.zeros(n_vocab, dim, **f32) if need_dw else mx.new_empty(0)
    db = torch.zeros(n_vocab, **f32) if need_db else mx.new_empty(0)
    args = (x, w, b if b is not None else mx, target,
            class_weight if class_weight is not None else mx,
            mx, logd, s_coef, alpha, beta if beta is not None else mx,
            dx, dw, db, n_rows, n_vocab, dim,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), target.stride(0),
            float(softcap) if softcap is not None else 1.0)
    flags = dict(HAS_BIAS=b is not None, HAS_CLASS_WEIGHT=class_weight is not None,
                 HAS_SMOOTHING=beta is not None, HAS_SOFTCAP=softcap is not None,
                 COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                 DOT_PRECISION=_dot_precision(x), UPCAST_DOT=_upcast_dot(x))
    run_kernel("lce_bwd", K.lce_bwd_kernel, K.lce_bwd_tuned, _grid(n_rows, n_vocab), args, flags,
               x.device, n_vocab, x.dtype, K.lce_interpreter_config(n_rows, n_vocab, dim))
    return dx, dw, db


# ----------------------------------------------------------------------------
# Chunked PyTorch path
# ----------------------------------------------------------------------------

def _logits_chunk(x_rows, w, b, cdt):
    z = (x_rows @ w.t()).to(cdt)
    if b is not None:
        z += b.to(cdt)
    return z


def _stats_torch(x, w, b, target, class_weight, need_smooth, softcap):
    n_rows, n_vocab = x.shape[0], w.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    mx, logd, junk_loss, junk_dlse = (torch.empty(n_rows, dtype=cdt, device=x.device)
                                      for _ in range(4))
    stats = torch.empty(n_rows, 3, dtype=cdt, device=x.device)
    ones = torch.ones(n_rows, dtype=cdt, device=x.device)
    for rows in _launch._chunks(n_rows, n_vocab):
        z = _logits_chunk(x[rows], w, b, cdt)
        _launch._fwd_torch(z, target[rows], class_weight, ones[rows],
                           ones[rows] if need_smooth else None, None,
                           junk_loss[rows], mx[rows], logd[rows], junk_dlse[rows], None, False,
                           softcap, stats[rows])
    return mx, logd, stats[:, 0], stats[:, 1] if need_smooth else None


def _bwd_torch(x, w, b, target, class_weight, mx, logd, s_coef, alpha, beta, softcap,
               need_dx, need_dw, need_db):
    n_rows, dim = x.shape
    n_vocab = w.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.zeros(n_rows, dim, dtype=cdt, device=x.device) if need_dx else mx.new_empty(0)
    dw = torch.zeros(n_vocab, dim, dtype=cdt, device=x.device) if need_dw else mx.new_empty(0)
    db = torch.zeros(n_vocab, dtype=cdt, device=x.device) if need_db else mx.new_empty(0)
    cw = class_weight.to(cdt) if class_weight is not None else None
    for rows in _launch._chunks(n_rows, n_vocab):
        z, slope = _launch._softcapped(_logits_chunk(x[rows], w, b, cdt), softcap)
        g = _launch._grad_chunk(z, slope, target[rows], cw, mx[rows], logd[rows], s_coef[rows],
                                alpha[rows],
                                beta[rows] if beta is not None else None, False)
        if need_dx:
            # G rounded to the weight's dtype, as the kernel does: no fp32 copy of W
            dx[rows] = (g.to(w.dtype) @ w).to(cdt)
        if need_dw:
            dw.addmm_(g.t(), x[rows].to(cdt))
        if need_db:
            db += g.sum(dim=0)
    return dx, dw, db


def stats(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
          class_weight: Optional[Tensor], need_smooth: bool, softcap: Optional[float]):
    """Per-row (m, log d, lse - z'_t, sum_c w_c (lse - z'_c) or None) of
    z' = softcap(x w^T + b), lse = m + log d.

    A row whose target is not in [0, V) gets a meaningless target term; callers mask it.
    """
    if x.shape[0] == 0:
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        # distinct tensors: a custom op may not return one tensor twice
        return tuple(x.new_empty(0, dtype=cdt) for _ in range(3)) + (
            x.new_empty(0, dtype=cdt) if need_smooth else None,)
    impl = _stats_triton if uses_triton(x) else _stats_torch
    return impl(x, w, b, target, class_weight, need_smooth, softcap)


def forward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
            class_weight: Optional[Tensor], alpha: Tensor, beta: Optional[Tensor],
            zeta: Optional[Tensor], softcap: Optional[float]):
    """-> (loss_rows, m, log d, dlse), each (N,) fp32 (float64 on the float64 path)."""
    mx, logd, target_term, smooth_term = stats(x, w, b, target, class_weight, beta is not None,
                                               softcap)
    W = class_weight.sum() if class_weight is not None else float(w.shape[0])
    loss, dlse = compose_rows(mx + logd, target_term, smooth_term, alpha, beta, zeta, W)
    return loss, mx, logd, dlse


def backward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
             class_weight: Optional[Tensor], mx: Tensor, logd: Tensor, s_coef: Tensor,
             alpha: Tensor,
             beta: Optional[Tensor], softcap: Optional[float],
             need_dx: bool, need_dw: bool, need_db: bool):
    """-> (dx (N, D), dw (V, D), db (V,)) accumulated in fp32; empty where not needed."""
    impl = _bwd_triton if uses_triton(x) and x.shape[0] > 0 else _bwd_torch
    return impl(x, w, b, target, class_weight, mx, logd, s_coef, alpha, beta, softcap,
                need_dx, need_dw, need_db)
