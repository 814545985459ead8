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
                 stats: Optional[Tensor] = None) -> None:
    """Per-row loss, row max and log d (lse = row_max + log_d, kept apart for precision)
    and d loss/d lse; with `grad`, also the gradient for grad_output = 1; with `stats`
    (n_rows, 3), the raw terms before the coefficients: lse - z'_t (or sum w y (lse - z')),
    sum w (lse - z'), sum w y.

    logits (n_rows, n_cols); target (n_rows,) int or (n_rows, n_cols) float; grad may be
    the logits (in place)."""
    if logits.shape[0] == 0:
        return
    _impl(logits).ce_forward(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d,
                             dlse, grad, prob_target, softcap, stats)


def backward_into(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
                  log_d: Tensor, dlse: Tensor, alpha: Tensor, beta: Optional[Tensor],
                  grad: Tensor, prob_target: bool, softcap: Optional[float]) -> None:
    """The gradient recomputed from the saved row max and log d; dlse, alpha and beta
    already hold grad_output (and dlse the lse's own gradient)."""
    if logits.shape[0] == 0:
        return
    _impl(logits).ce_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad,
                              prob_target, softcap)


def scale_(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i]; `scale` may be an expanded scalar (stride 0)."""
    if grad.shape[0] == 0:
        return
    _impl(grad).ce_scale(grad, scale)


# ----------------------------------------------------------------------------
# Linear cross-entropy: logits x @ W^T + b never stored
# ----------------------------------------------------------------------------

def linear_stats(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                 class_weight: Optional[Tensor], need_smooth: bool, softcap: Optional[float]):
    """Per-row (row_max, log_d, lse - z'_t, sum_c w_c (lse - z'_c) or None) of
    z' = softcap(x w^T + b), lse = row_max + log_d.

    A row whose target is not in [0, V) gets a meaningless target term; callers mask it.
    """
    if x.shape[0] == 0:
        dtype = _torch_path.row_dtype(x)
        # distinct tensors: a custom op may not return one tensor twice
        return tuple(x.new_empty(0, dtype=dtype) for _ in range(3)) + (
            x.new_empty(0, dtype=dtype) if need_smooth else None,)
    return _impl(x).lce_stats(x, w, b, target, class_weight, need_smooth, softcap)


def linear_forward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                   class_weight: Optional[Tensor], alpha: Tensor, beta: Optional[Tensor],
                   zeta: Optional[Tensor], softcap: Optional[float]):
    """-> (loss_rows, row_max, log_d, dlse), each (N,) fp32 (float64 on the float64 path)."""
    row_max, log_d, target_term, smooth_term = linear_stats(x, w, b, target, class_weight,
                                                            beta is not None, softcap)
    W = class_weight.sum() if class_weight is not None else float(w.shape[0])
    loss, dlse = compose_rows(row_max + log_d, target_term, smooth_term, alpha, beta, zeta, W)
    return loss, row_max, log_d, dlse


def linear_backward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                    class_weight: Optional[Tensor], row_max: Tensor, log_d: Tensor,
                    dlse: Tensor, alpha: Tensor, beta: Optional[Tensor],
                    softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool):
    """-> (dx (N, D), dw (V, D), db (V,)) accumulated in fp32; empty where not needed."""
    impl = _triton_path if uses_triton(x) and x.shape[0] > 0 else _torch_path
    return impl.lce_backward(x, w, b, target, class_weight, row_max, log_d, dlse, alpha, beta,
                             softcap, need_dx, need_dw, need_db)
