"""The launchers registered as PyTorch custom ops (namespace `softmax_ce`).

Registering them makes the kernels opaque, well-described nodes for
torch.compile (fullgraph tracing, functionalization of the in-place variants)
and for CUDA graphs: no op here synchronises with the host.  Each op allocates
its outputs and calls a launcher of `_launch`; the `_` ops write into the
logits' own storage instead of a new buffer, and declare that mutation.
"""

from typing import List, Optional

import torch
from torch import Tensor

from . import _launch, _launch_linear


def _row_outputs(logits: Tensor, count: int = 4):
    n_rows = logits.shape[0]
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return [logits.new_empty(n_rows, dtype=dt) for _ in range(count)]


@torch.library.custom_op("softmax_ce::fwd", mutates_args=())
def fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
        beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
        softcap: Optional[float]) -> List[Tensor]:
    """-> [loss, mx, logd, dlse], each (n_rows,) fp32; lse = mx + logd."""
    loss, mx, logd, dlse = _row_outputs(logits)
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, mx, logd, dlse, None,
                         prob_target, softcap)
    return [loss, mx, logd, dlse]


@torch.library.custom_op("softmax_ce::fwd_grad", mutates_args=())
def fwd_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
             beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
             softcap: Optional[float]) -> List[Tensor]:
    """Fused: -> [loss, mx, logd, dlse, grad]; grad (n_rows, n_cols) is for grad_output = 1."""
    loss, mx, logd, dlse = _row_outputs(logits)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, mx, logd, dlse, grad,
                         prob_target, softcap)
    return [loss, mx, logd, dlse, grad]


@torch.library.custom_op("softmax_ce::fwd_grad_", mutates_args=("logits",))
def fwd_grad_(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
              beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
              softcap: Optional[float]) -> List[Tensor]:
    """Fused, in place: the logits are overwritten by the gradient. -> [loss, mx, logd, dlse]."""
    loss, mx, logd, dlse = _row_outputs(logits)
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, mx, logd, dlse, logits,
                         prob_target, softcap)
    return [loss, mx, logd, dlse]


@torch.library.custom_op("softmax_ce::bwd", mutates_args=())
def bwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], mx: Tensor, logd: Tensor,
        s_coef: Tensor, alpha: Tensor, beta: Optional[Tensor], prob_target: bool,
        softcap: Optional[float]) -> Tensor:
    """Recompute strategy: -> grad (n_rows, n_cols), grad_output already in the coefficients."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch.backward_into(logits, target, weight, mx, logd, s_coef, alpha, beta, grad,
                          prob_target, softcap)
    return grad


@torch.library.custom_op("softmax_ce::bwd_", mutates_args=("logits",))
def bwd_(logits: Tensor, target: Tensor, weight: Optional[Tensor], mx: Tensor, logd: Tensor,
         s_coef: Tensor, alpha: Tensor, beta: Optional[Tensor], prob_target: bool,
         softcap: Optional[float]) -> None:
    """Recompute strategy, in place: the logits are overwritten by the gradient."""
    _launch.backward_into(logits, target, weight, mx, logd, s_coef, alpha, beta, logits,
                          prob_target, softcap)


@torch.library.custom_op("softmax_ce::scale_", mutates_args=("grad",))
def scale_(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i]; rows whose factor is 1 are not touched on the GPU."""
    _launch.scale_(grad, scale)


@fwd.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap):
    return _row_outputs(logits)


@fwd_grad.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap):
    return _row_outputs(logits) + [torch.empty_like(logits, memory_format=torch.contiguous_format)]


@fwd_grad_.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap):
    return _row_outputs(logits)


@bwd.register_fake
def _(logits, target, weight, mx, logd, s_coef, alpha, beta, prob_target, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@bwd_.register_fake
def _(logits, target, weight, mx, logd, s_coef, alpha, beta, prob_target, softcap):
    return None


@scale_.register_fake
def _(grad, scale):
    return None


# ----------------------------------------------------------------------------
# Fused linear cross-entropy
# ----------------------------------------------------------------------------

@torch.library.custom_op("softmax_ce::lce_fwd", mutates_args=())
def lce_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
            class_weight: Optional[Tensor], alpha: Tensor, beta: Optional[Tensor],
            zeta: Optional[Tensor], softcap: Optional[float]) -> List[Tensor]:
    """-> [loss_rows, mx, logd, dlse], each (N,) fp32; the (N, V) logits are never stored."""
    return list(_launch_linear.forward(x, w, b, target, class_weight, alpha, beta, zeta, softcap))


@torch.library.custom_op("softmax_ce::lce_bwd", mutates_args=())
def lce_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
            class_weight: Optional[Tensor], mx: Tensor, logd: Tensor, s_coef: Tensor, alpha: Tensor,
            beta: Optional[Tensor], softcap: Optional[float], need_dx: bool, need_dw: bool,
            need_db: bool) -> List[Tensor]:
    """-> [dx (N, D), dw (V, D), db (V,)] in fp32, each empty when not needed."""
    return list(_launch_linear.backward(x, w, b, target, class_weight, mx, logd, s_coef, alpha, beta,
                                        softcap, need_dx, need_dw, need_db))


@lce_fwd.register_fake
def _(x, w, b, target, class_weight, alpha, beta, zeta, softcap):
    return _row_outputs(x)


@lce_bwd.register_fake
def _(x, w, b, target, class_weight, mx, logd, s_coef, alpha, beta, softcap, need_dx, need_dw,
      need_db):
    n, d = x.shape
    v = w.shape[0]
    return [mx.new_empty((n, d) if need_dx else (0,)), mx.new_empty((v, d) if need_dw else (0,)),
            mx.new_empty((v,) if need_db else (0,))]
