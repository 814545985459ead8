"""Which back end runs a call, and the entry points every layer above launches through.

Two back ends with the same semantics write into tensors the caller allocated:

* `_triton_path`: the Triton kernels of softmax_ce.kernels, for CUDA tensors and, when
  the kernels were decorated under TRITON_INTERPRET=1, for CPU tensors (Triton's
  interpreter runs the same kernels);
* `_torch_path`: the chunked PyTorch path, for everything else: CPU tensors when the
  kernels are compiled, and float64 anywhere.

The choice is `backend_for(tensor)`, decided by the tensor and the one fact fixed when
the kernels were decorated (softmax_ce.kernels.cross_entropy.INTERPRETED).  Nothing here
reads the environment; `FORCED_BACKEND = "torch"` routes every call to the PyTorch path
(as the tests do to exercise both on the same CPU tensors).

Imports the two back ends and the per-row math only.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _torch_path, _triton_path
from ._rows import compose_rows
from .kernels import cross_entropy as K

# None: by the tensor; "torch": the PyTorch path for every call
FORCED_BACKEND: Optional[str] = None


def backend_for(t: Tensor) -> str:
    """"triton" or "torch": the back end that runs a call on tensor t."""
    if FORCED_BACKEND == "torch" or t.dtype == torch.float64:
        return "torch"
    if t.is_cuda or (t.device.type == "cpu" and K.INTERPRETED):
        return "triton"
    return "torch"


def uses_triton(t: Tensor) -> bool:
    return backend_for(t) == "triton"


def _impl(t: Tensor):
    return _triton_path if uses_triton(t) else _torch_path


# ----------------------------------------------------------------------------
# Cross-entropy over given logits
# ----------------------------------------------------------------------------

def forward_into(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
                 beta: Optional[Tensor], zeta: Optional[Tensor],
                 loss: Tensor, row_max: Tensor, log_d: Tensor, dlse: Tensor,
                 grad: Optional[Tensor], prob_target: bool, softcap: Optional[float],
                 stats: Optional[Tensor] = None, *, inv_temp: float = 1.0,
                 entropy: Optional[Tensor] = None, argmax: Optional[Tensor] = None,
                 teacher: Optional[Tensor] = None, teacher_kl: bool = False) -> None:
    """Per-row loss, row max and log d (lse = row_max + log_d, kept apart for precision)
    and d loss/d lse; with `grad`, also the gradient for grad_output = 1; with `stats`
    (n_rows, 3), the raw terms before the coefficients: lse - z'_t (or sum w y (lse - z')),
    sum w (lse - z'), sum w y.

    logits (n_rows, n_cols); target (n_rows,) int or (n_rows, n_cols) float; grad may be
    the logits (in place).  inv_temp: 1 / temperature; entropy, argmax ((n_rows,) fp32
    and int64): written when given; teacher ((n_rows, 2) fp32): when given, target holds
    teacher logits (prob_target is set), the soft target is softmax(target * inv_temp),
    and the teacher's max and log d are written there; teacher_kl: the target term is
    KL(y || s) rather than the cross-entropy."""
    if logits.shape[0] == 0:
        return
    _impl(logits).ce_forward(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d,
                             dlse, grad, prob_target, softcap, stats, inv_temp=inv_temp,
                             entropy=entropy, argmax=argmax, teacher=teacher,
                             teacher_kl=teacher_kl)


def backward_into(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
                  log_d: Tensor, dlse: Tensor, alpha: Tensor, beta: Optional[Tensor],
                  grad: Tensor, prob_target: bool, softcap: Optional[float], *,
                  inv_temp: float = 1.0, teacher: Optional[Tensor] = None,
                  ent: Optional[Tensor] = None) -> None:
    """The gradient recomputed from the saved row max and log d; dlse, alpha and beta
    already hold grad_output (and dlse the lse's own gradient).  teacher: the forward's
    (n_rows, 2) teacher rows (target holds teacher logits); ent (n_rows, 2): d loss / d
    entropy and sum s z'' per row, for the entropy's gradient."""
    if logits.shape[0] == 0:
        return
    _impl(logits).ce_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad,
                              prob_target, softcap, inv_temp=inv_temp, teacher=teacher, ent=ent)


def caches_softmax(logits: Tensor) -> bool:
    """Whether a training step's forward writes softmax(z) for its backward
    (softmax_forward_into), rather than the backward recomputing it: the PyTorch path's
    strategy, where a second read of the logits costs an exp per element and a fresh
    buffer.  The kernels recompute (a read of HBM is cheaper than a write and a read)."""
    return backend_for(logits) == "torch" and logits.dtype in (torch.float32, torch.float64)


def softmax_forward_into(logits: Tensor, target: Tensor, alpha: Tensor, zeta: Optional[Tensor],
                         loss: Tensor, row_max: Tensor, log_d: Tensor, dlse: Tensor,
                         soft: Tensor) -> None:
    """forward_into for class-index targets, no label smoothing or softcap, with softmax(z)
    written into `soft` (the logits' shape); PyTorch path only (caches_softmax)."""
    if logits.shape[0] == 0:
        return
    _torch_path.softmax_forward(logits, target, alpha, zeta, loss, row_max, log_d, dlse, soft)


def softmax(logits: Tensor) -> Tensor:
    """The `soft` that softmax_forward_into writes, alone, bit for bit."""
    soft = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if logits.shape[0] != 0:
        _torch_path.softmax_(logits, soft)
    return soft


def softmax_(logits: Tensor) -> None:
    """softmax(), written over the (contiguous) logits themselves."""
    if logits.shape[0] != 0:
        _torch_path.softmax_(logits, logits)


def softmax_grad_(soft: Tensor, target: Tensor, dlse: Tensor, alpha: Tensor) -> None:
    """softmax_forward_into's `soft` becomes the gradient in place; dlse and alpha already
    hold grad_output (and dlse the lse's own gradient)."""
    if soft.shape[0] == 0:
        return
    _torch_path.softmax_grad_(soft, target, dlse, alpha)


def scale_(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i]; `scale` may be an expanded scalar (stride 0)."""
    if grad.shape[0] == 0:
        return
    _impl(grad).ce_scale(grad, scale)


# ----------------------------------------------------------------------------
# Linear cross-entropy: logits x @ W^T + b never stored
# ----------------------------------------------------------------------------

def linear_stats(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                 class_weight: Optional[Tensor], need_smooth: bool, softcap: Optional[float],
                 inv_temp: float = 1.0):
    """Per-row (row_max, log_d, lse - z'_t, sum_c w_c (lse - z'_c) or None) of
    z' = softcap(x w^T + b), lse = row_max + log_d.

    A row whose target is not in [0, V) gets a meaningless target term; callers mask it.
    """
    if x.shape[0] == 0:
        dtype = _torch_path.row_dtype(x)
        # distinct tensors: a custom op may not return one tensor twice
        return tuple(x.new_empty(0, dtype=dtype) for _ in range(3)) + (
            x.new_empty(0, dtype=dtype) if need_smooth else None,)
    return _impl(x).lce_stats(x, w, b, target, class_weight, need_smooth, softcap, inv_temp)


def linear_forward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                   class_weight: Optional[Tensor], alpha: Tensor, beta: Optional[Tensor],
                   zeta: Optional[Tensor], softcap: Optional[float], inv_temp: float = 1.0):
    """-> (loss_rows, row_max, log_d, dlse), each (N,) fp32 (float64 on the float64 path)."""
    row_max, log_d, target_term, smooth_term = linear_stats(x, w, b, target, class_weight,
                                                            beta is not None, softcap, inv_temp)
    W = class_weight.sum() if class_weight is not None else float(w.shape[0])
    loss, dlse = compose_rows(row_max + log_d, target_term, smooth_term, alpha, beta, zeta, W)
    return loss, row_max, log_d, dlse


def linear_backward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                    class_weight: Optional[Tensor], row_max: Tensor, log_d: Tensor,
                    dlse: Tensor, alpha: Tensor, beta: Optional[Tensor],
                    softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool,
                    filter_eps: float = 0.0, inv_temp: float = 1.0):
    """-> (dx (N, D), dw (V, D), db (V,)) accumulated in fp32; empty where not needed.
    filter_eps > 0: the Triton kernel skips tiles whose gradient is below it (see
    kernels/linear_cross_entropy.py); the PyTorch path computes every chunk."""
    if uses_triton(x) and x.shape[0] > 0:
        return _triton_path.lce_backward(x, w, b, target, class_weight, row_max, log_d, dlse,
                                         alpha, beta, softcap, need_dx, need_dw, need_db,
                                         filter_eps, inv_temp)
    return _torch_path.lce_backward(x, w, b, target, class_weight, row_max, log_d, dlse, alpha,
                                    beta, softcap, need_dx, need_dw, need_db, inv_temp)


# ----------------------------------------------------------------------------
# Linear cross-entropy, chunked on the matmul library (impl="chunked")
# ----------------------------------------------------------------------------
#
# Per chunk of rows c:  logits_c = x_c @ W^T (+ b) into one reused buffer (the matmul
# library: cuBLAS on a GPU), then the cross-entropy kernels read it and write the
# gradient G_c over it in place, then dx_c = G_c @ W and dW += G_c^T @ x_c, db += sum G_c.
# FLOPs: 2 N V D per pass of logits, 2 N V D for each of dx and dW.  With the gradient
# computed in the forward (scalar reductions) a training step does the three GEMMs once,
# 6 N V D; recomputing in the backward (reduction="none", vocabulary parallelism) adds
# the logits again, 8 N V D.  Bytes per logit element of the buffer's dtype b: the GEMM
# writes it (b), the cross-entropy kernel reads it and writes G (2b, 3b for rows longer
# than one tile, see kernels/cross_entropy.py), the two GEMMs read G (2b).
# Memory: one chunk of logits (chunk_rows x V in the input's dtype) plus the
# accumulators dW (V x D in accum_dtype) and db.

def _logit_chunks(x: Tensor, w: Tensor, b: Optional[Tensor], chunk_rows: int):
    """(rows, logits of those rows) for each chunk, computed by the matmul library into one
    buffer reused from chunk to chunk (the chunk's logits are valid until the next one)."""
    n_rows = x.shape[0]
    if n_rows == 0:
        return
    buf = x.new_empty(min(chunk_rows, n_rows), w.shape[0])
    for r0 in range(0, n_rows, chunk_rows):
        rows = slice(r0, min(n_rows, r0 + chunk_rows))
        z = buf[:rows.stop - r0]
        torch.matmul(x[rows], w.t(), out=z)
        if b is not None:
            z += b
        yield rows, z


def _grad_buffers(x: Tensor, w: Tensor, need_dx: bool, need_dw: bool, need_db: bool,
                  accum_dtype: torch.dtype):
    """dx (x's dtype, every row written), dw and db (accum_dtype, zeroed); empty if unneeded."""
    n_vocab, dim = w.shape
    empty = w.new_empty(0, dtype=accum_dtype)
    return (x.new_empty(x.shape[0], dim) if need_dx else x.new_empty(0),
            w.new_zeros(n_vocab, dim, dtype=accum_dtype) if need_dw else empty,
            w.new_zeros(n_vocab, dtype=accum_dtype) if need_db else empty.clone())


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, with acc possibly wider (fp32) than a and b (bf16)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _MM_OUT_DTYPE:
        acc += torch.mm(a, b, out_dtype=acc.dtype)  # cuBLAS: bf16 in, fp32 out, no rounding
    else:
        acc += (a @ b).to(acc.dtype)


_MM_OUT_DTYPE = "out_dtype" in (torch.mm.__doc__ or "")


def linear_chunked(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                   class_weight: Optional[Tensor], alpha: Tensor, beta: Optional[Tensor],
                   zeta: Optional[Tensor], softcap: Optional[float], need_dx: bool,
                   need_dw: bool, need_db: bool, chunk_rows: int, accum_dtype: torch.dtype,
                   inv_temp: float = 1.0, entropy: Optional[Tensor] = None,
                   argmax: Optional[Tensor] = None):
    """Forward of the chunked linear cross-entropy, with the gradients for grad_output = 1
    when any is asked for -> (loss, row_max, log_d, dlse, dx, dw, db); dx in x's dtype, dw
    and db in accum_dtype, each empty when not needed.  entropy, argmax ((N,) fp32 and
    int64): written from the same pass over each chunk when given."""
    rows_dtype = _torch_path.row_dtype(x)
    loss, row_max, log_d, dlse = (x.new_empty(x.shape[0], dtype=rows_dtype) for _ in range(4))
    with_grad = need_dx or need_dw or need_db
    dx, dw, db = _grad_buffers(x, w, need_dx, need_dw, need_db, accum_dtype)
    for rows, z in _logit_chunks(x, w, b, chunk_rows):
        forward_into(z, target[rows], class_weight, alpha[rows],
                     beta[rows] if beta is not None else None,
                     zeta[rows] if zeta is not None else None,
                     loss[rows], row_max[rows], log_d[rows], dlse[rows],
                     z if with_grad else None, False, softcap, inv_temp=inv_temp,
                     entropy=entropy[rows] if entropy is not None else None,
                     argmax=argmax[rows] if argmax is not None else None)
        if with_grad:
            _chunk_grads(z, x[rows], w, dx[rows] if need_dx else None,
                         dw if need_dw else None, db if need_db else None)
    return loss, row_max, log_d, dlse, dx, dw, db


def _chunk_grads(g: Tensor, x_c: Tensor, w: Tensor, dx_c, dw, db) -> None:
    if dx_c is not None:
        torch.matmul(g, w, out=dx_c)
    if dw is not None:
        _accumulate(dw, g.t(), x_c)
    if db is not None:
        db += g.sum(dim=0, dtype=db.dtype)


def linear_chunked_stats(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                         class_weight: Optional[Tensor], need_smooth: bool,
                         softcap: Optional[float], chunk_rows: int, inv_temp: float = 1.0,
                         entropy: Optional[Tensor] = None, argmax: Optional[Tensor] = None):
    """linear_stats, chunked on the matmul library: (row_max, log_d, lse - z'_t,
    sum_c w_c (lse - z'_c) or None), for a caller that combines slices itself; entropy
    and argmax of each row written when given."""
    n_rows = x.shape[0]
    rows_dtype = _torch_path.row_dtype(x)
    row_max, log_d, unused_loss, unused_dlse = (x.new_empty(n_rows, dtype=rows_dtype)
                                                for _ in range(4))
    stats = x.new_zeros(n_rows, 3, dtype=rows_dtype)
    ones = x.new_ones(n_rows, dtype=rows_dtype)
    for rows, z in _logit_chunks(x, w, b, chunk_rows):
        forward_into(z, target[rows], class_weight, ones[rows], ones[rows] if need_smooth else None,
                     None, unused_loss[rows], row_max[rows], log_d[rows], unused_dlse[rows], None,
                     False, softcap, stats[rows], inv_temp=inv_temp,
                     entropy=entropy[rows] if entropy is not None else None,
                     argmax=argmax[rows] if argmax is not None else None)
    return (row_max, log_d, stats[:, 0].clone(),
            stats[:, 1].clone() if need_smooth else None)


def linear_chunked_backward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                            class_weight: Optional[Tensor], row_max: Tensor, log_d: Tensor,
                            dlse: Tensor, alpha: Tensor, beta: Optional[Tensor],
                            softcap: Optional[float], need_dx: bool, need_dw: bool,
                            need_db: bool, chunk_rows: int, accum_dtype: torch.dtype,
                            inv_temp: float = 1.0, ent: Optional[Tensor] = None):
    """The gradients recomputed chunk by chunk from the saved row statistics (dlse, alpha,
    beta already hold grad_output; ent (N, 2): the entropy's gradient and sum s z'' per
    row, or None) -> (dx in x's dtype, dw and db in accum_dtype)."""
    dx, dw, db = _grad_buffers(x, w, need_dx, need_dw, need_db, accum_dtype)
    for rows, z in _logit_chunks(x, w, b, chunk_rows):
        backward_into(z, target[rows], class_weight, row_max[rows], log_d[rows], dlse[rows],
                      alpha[rows], beta[rows] if beta is not None else None, z, False, softcap,
                      inv_temp=inv_temp, ent=ent[rows] if ent is not None else None)
        _chunk_grads(z, x[rows], w, dx[rows] if need_dx else None,
                     dw if need_dw else None, db if need_db else None)
    return dx, dw, db
