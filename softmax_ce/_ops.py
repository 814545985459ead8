"""The launchers registered as PyTorch custom ops (namespace `softmax_ce`).

Layer: above `_launch` (its only import in the package), below the autograd Functions.

Registering them makes the kernels opaque, well-described nodes for
torch.compile (fullgraph tracing) and for CUDA graphs: no op here synchronises with
the host.  The functional ops allocate their outputs and call a launcher of
`_launch`.  The `_` ops are out-variants: they return nothing and write only into
tensors they were given, each named in `mutates_args` (the logits' own storage for
the gradient, and the caller's row outputs), so that under torch.compile
functionalization sees exactly what is written and Inductor can reinplace it rather
than clone a logits-sized buffer.  Eager code calls their launchers directly
(`inplace_*` below), which skips the dispatcher and bumps the version counters
autograd checks, as the op would.
"""

from typing import List, Optional

import torch
from torch import Tensor

from . import _launch


def _row_outputs(logits: Tensor, count: int = 4):
    n_rows = logits.shape[0]
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return [logits.new_empty(n_rows, dtype=dt) for _ in range(count)]


@torch.library.custom_op("softmax_ce::fwd", mutates_args=())
def fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
        beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
        softcap: Optional[float]) -> List[Tensor]:
    """-> [loss, row_max, log_d, dlse], each (n_rows,) fp32; lse = row_max + log_d."""
    loss, row_max, log_d, dlse = _row_outputs(logits)
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse, None,
                         prob_target, softcap)
    return [loss, row_max, log_d, dlse]


@torch.library.custom_op("softmax_ce::fwd_grad", mutates_args=())
def fwd_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
             beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
             softcap: Optional[float]) -> List[Tensor]:
    """Fused: -> [loss, row_max, log_d, dlse, grad]; grad (n_rows, n_cols) is for grad_output = 1."""
    loss, row_max, log_d, dlse = _row_outputs(logits)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse, grad,
                         prob_target, softcap)
    return [loss, row_max, log_d, dlse, grad]


@torch.library.custom_op("softmax_ce::fwd_grad_",
                         mutates_args=("logits", "loss", "row_max", "log_d", "dlse"))
def fwd_grad_(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
              beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
              softcap: Optional[float], loss: Tensor, row_max: Tensor, log_d: Tensor,
              dlse: Tensor) -> None:
    """Fused, in place: the logits are overwritten by the gradient for grad_output = 1;
    the row outputs loss, row_max, log_d, dlse ((n_rows,) fp32) are written."""
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse, logits,
                         prob_target, softcap)


@torch.library.custom_op("softmax_ce::bwd", mutates_args=())
def bwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor, log_d: Tensor,
        dlse: Tensor, alpha: Tensor, beta: Optional[Tensor], prob_target: bool,
        softcap: Optional[float]) -> Tensor:
    """Recompute strategy: -> grad (n_rows, n_cols), grad_output already in the coefficients."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch.backward_into(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad,
                          prob_target, softcap)
    return grad


@torch.library.custom_op("softmax_ce::bwd_", mutates_args=("logits",))
def bwd_(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor, log_d: Tensor,
         dlse: Tensor, alpha: Tensor, beta: Optional[Tensor], prob_target: bool,
         softcap: Optional[float]) -> None:
    """Recompute strategy, in place: the logits are overwritten by the gradient."""
    _launch.backward_into(logits, target, weight, row_max, log_d, dlse, alpha, beta, logits,
                          prob_target, softcap)


@torch.library.custom_op("softmax_ce::scale_", mutates_args=("grad",))
def scale_(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i]; rows whose factor is 1 are not touched on the GPU."""
    _launch.scale_(grad, scale)


@torch.library.custom_op("softmax_ce::fwd_stats", mutates_args=())
def fwd_stats(logits: Tensor, target: Tensor, weight: Optional[Tensor], need_smooth: bool,
              prob_target: bool, softcap: Optional[float]) -> List[Tensor]:
    """One vocabulary slice's row statistics, for softmax_ce.distributed:
    -> [row_max, log_d, stats]; stats (n_rows, 3): lse - z'_t (or sum w y (lse - z')),
    sum w (lse - z'), sum w y, each about this slice's own lse = row_max + log_d."""
    ones = _row_outputs(logits, 1)[0].fill_(1.0)
    loss, row_max, log_d, dlse = _row_outputs(logits)
    stats = ones.new_zeros(logits.shape[0], 3)
    _launch.forward_into(logits, target, weight, ones, ones if need_smooth else None, None,
                         loss, row_max, log_d, dlse, None, prob_target, softcap, stats)
    return [row_max, log_d, stats]


@fwd_stats.register_fake
def _(logits, target, weight, need_smooth, prob_target, softcap):
    row_max, log_d = _row_outputs(logits, 2)
    return [row_max, log_d, row_max.new_empty(logits.shape[0], 3)]


@fwd.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap):
    return _row_outputs(logits)


@fwd_grad.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap):
    return _row_outputs(logits) + [torch.empty_like(logits, memory_format=torch.contiguous_format)]


@fwd_grad_.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap, loss, row_max, log_d, dlse):
    return None


@bwd.register_fake
def _(logits, target, weight, row_max, log_d, dlse, alpha, beta, prob_target, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@bwd_.register_fake
def _(logits, target, weight, row_max, log_d, dlse, alpha, beta, prob_target, softcap):
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
            zeta: Optional[Tensor], softcap: Optional[float], inv_temp: float) -> List[Tensor]:
    """-> [loss_rows, row_max, log_d, dlse], each (N,) fp32; the (N, V) logits are never stored."""
    return list(_launch.linear_forward(x, w, b, target, class_weight, alpha, beta, zeta, softcap,
                                       inv_temp))


@torch.library.custom_op("softmax_ce::lce_bwd", mutates_args=())
def lce_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
            class_weight: Optional[Tensor], row_max: Tensor, log_d: Tensor, dlse: Tensor,
            alpha: Tensor, beta: Optional[Tensor], softcap: Optional[float], need_dx: bool,
            need_dw: bool, need_db: bool, filter_eps: float, inv_temp: float) -> List[Tensor]:
    """-> [dx (N, D), dw (V, D), db (V,)] in fp32, each empty when not needed."""
    return list(_launch.linear_backward(x, w, b, target, class_weight, row_max, log_d, dlse,
                                        alpha, beta, softcap, need_dx, need_dw, need_db,
                                        filter_eps, inv_temp))


@torch.library.custom_op("softmax_ce::lce_chunked", mutates_args=())
def lce_chunked(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                class_weight: Optional[Tensor], alpha: Tensor, beta: Optional[Tensor],
                zeta: Optional[Tensor], softcap: Optional[float], need_dx: bool, need_dw: bool,
                need_db: bool, chunk_rows: int, accum_dtype: torch.dtype, inv_temp: float,
                token_stats: bool) -> List[Tensor]:
    """Chunked on the matmul library: -> [loss_rows, row_max, log_d, dlse, dx, dw, db,
    entropy, argmax]; the gradients (for grad_output = 1) are computed in this same pass
    when asked for, the entropy and argmax of each row when token_stats (else empty)."""
    entropy, argmax = _token_outputs(x, token_stats)
    return list(_launch.linear_chunked(x, w, b, target, class_weight, alpha, beta, zeta, softcap,
                                       need_dx, need_dw, need_db, chunk_rows, accum_dtype,
                                       inv_temp, entropy if token_stats else None,
                                       argmax if token_stats else None)) + [entropy, argmax]


def _token_outputs(x: Tensor, token_stats: bool):
    n = x.shape[0] if token_stats else 0
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(n, dtype=dt), x.new_empty(n, dtype=torch.int64)


@torch.library.custom_op("softmax_ce::lce_chunked_bwd", mutates_args=())
def lce_chunked_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                    class_weight: Optional[Tensor], row_max: Tensor, log_d: Tensor,
                    dlse: Tensor, alpha: Tensor, beta: Optional[Tensor],
                    softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool,
                    chunk_rows: int, accum_dtype: torch.dtype, inv_temp: float,
                    ent: Optional[Tensor]) -> List[Tensor]:
    """Chunked, recomputing the logits: -> [dx (x's dtype), dw, db (accum_dtype)]; ent
    (N, 2): the entropy's gradient and sum s z'' per row, or None."""
    return list(_launch.linear_chunked_backward(x, w, b, target, class_weight, row_max, log_d,
                                                dlse, alpha, beta, softcap, need_dx, need_dw,
                                                need_db, chunk_rows, accum_dtype, inv_temp, ent))


@torch.library.custom_op("softmax_ce::lce_stats", mutates_args=())
def lce_stats(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
              class_weight: Optional[Tensor], need_smooth: bool,
              softcap: Optional[float], chunk_rows: int, inv_temp: float,
              token_stats: bool) -> List[Tensor]:
    """One vocabulary slice's row statistics of x @ w.T + b, for softmax_ce.distributed:
    -> [row_max, log_d, target_term, smooth_term, entropy, argmax] ((N,) each; smooth_term
    empty without smoothing, entropy and argmax without token_stats), about this slice's
    own lse = row_max + log_d.  chunk_rows > 0: chunked on the matmul library; 0: the
    fused kernel (no token statistics)."""
    entropy, argmax = _token_outputs(x, token_stats)
    if chunk_rows > 0:
        stats = _launch.linear_chunked_stats(x, w, b, target, class_weight, need_smooth, softcap,
                                             chunk_rows, inv_temp,
                                             entropy if token_stats else None,
                                             argmax if token_stats else None)
    else:
        stats = _launch.linear_stats(x, w, b, target, class_weight, need_smooth, softcap,
                                     inv_temp)
    row_max, log_d, target_term, smooth_term = stats
    # the PyTorch path hands back columns of one (N, 3) tensor; an op's outputs may not
    # alias each other, so each leaves as its own (N,) copy
    return [row_max, log_d, target_term.clone(),
            smooth_term.clone() if smooth_term is not None else row_max.new_empty(0),
            entropy, argmax]


@lce_stats.register_fake
def _(x, w, b, target, class_weight, need_smooth, softcap, chunk_rows, inv_temp, token_stats):
    row_max, log_d, target_term = _row_outputs(x, 3)
    return [row_max, log_d, target_term, row_max.new_empty(x.shape[0] if need_smooth else 0),
            *_token_outputs(x, token_stats)]


@lce_fwd.register_fake
def _(x, w, b, target, class_weight, alpha, beta, zeta, softcap, inv_temp):
    return _row_outputs(x)


def _grad_outputs(x, w, row_max, need_dx, need_dw, need_db, dx_dtype, acc_dtype):
    n, d = x.shape
    v = w.shape[0]
    return [x.new_empty((n, d) if need_dx else (0,), dtype=dx_dtype),
            w.new_empty((v, d) if need_dw else (0,), dtype=acc_dtype),
            w.new_empty((v,) if need_db else (0,), dtype=acc_dtype)]


@lce_bwd.register_fake
def _(x, w, b, target, class_weight, row_max, log_d, dlse, alpha, beta, softcap, need_dx, need_dw,
      need_db, filter_eps, inv_temp):
    return _grad_outputs(x, w, row_max, need_dx, need_dw, need_db, row_max.dtype, row_max.dtype)


@lce_chunked.register_fake
def _(x, w, b, target, class_weight, alpha, beta, zeta, softcap, need_dx, need_dw, need_db,
      chunk_rows, accum_dtype, inv_temp, token_stats):
    rows = _row_outputs(x)
    return (rows + _grad_outputs(x, w, rows[0], need_dx, need_dw, need_db, x.dtype, accum_dtype)
            + list(_token_outputs(x, token_stats)))


@lce_chunked_bwd.register_fake
def _(x, w, b, target, class_weight, row_max, log_d, dlse, alpha, beta, softcap, need_dx, need_dw,
      need_db, chunk_rows, accum_dtype, inv_temp, ent):
    return _grad_outputs(x, w, row_max, need_dx, need_dw, need_db, x.dtype, accum_dtype)


# ----------------------------------------------------------------------------
# Eager forms of the out-variant ops
# ----------------------------------------------------------------------------

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def inplace_fwd_grad(logits, target, weight, alpha, beta, zeta, prob_target, softcap):
    """fwd_grad_ with fresh row outputs -> [loss, row_max, log_d, dlse]; the logits now hold the
    gradient.  The op under torch.compile, its launcher otherwise."""
    loss, row_max, log_d, dlse = _row_outputs(logits)
    if _compiling():
        fwd_grad_(logits, target, weight, alpha, beta, zeta, prob_target, softcap,
                  loss, row_max, log_d, dlse)
    else:
        _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse,
                             logits, prob_target, softcap)
        torch.autograd.graph.increment_version(logits)
    return [loss, row_max, log_d, dlse]


def inplace_bwd(logits, target, weight, row_max, log_d, dlse, alpha, beta, prob_target, softcap):
    """bwd_: the logits are overwritten by the gradient (op under compile, launcher otherwise)."""
    if _compiling():
        bwd_(logits, target, weight, row_max, log_d, dlse, alpha, beta, prob_target, softcap)
    else:
        _launch.backward_into(logits, target, weight, row_max, log_d, dlse, alpha, beta, logits,
                              prob_target, softcap)
        torch.autograd.graph.increment_version(logits)


def softmax_fwd(logits, target, alpha, zeta):
    """The PyTorch path's training forward (_launch.caches_softmax): -> [loss, row_max,
    log_d, dlse, soft], soft = softmax(logits) for softmax_grad_.  Eager only, never under
    torch.compile or torch.func (CrossEntropyCore's grad_mode "softmax"), so no op."""
    loss, row_max, log_d, dlse = _row_outputs(logits)
    soft = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch.softmax_forward_into(logits, target, alpha, zeta, loss, row_max, log_d, dlse, soft)
    return [loss, row_max, log_d, dlse, soft]


def softmax_grad_(soft, target, dlse, alpha):
    """softmax_fwd's soft becomes the gradient in place (eager only)."""
    _launch.softmax_grad_(soft, target, dlse, alpha)
    torch.autograd.graph.increment_version(soft)


def softmax_(logits):
    """softmax_fwd's soft, written over the logits (an in-place backward) -> the logits."""
    _launch.softmax_(logits)
    torch.autograd.graph.increment_version(logits)
    return logits


def softmax(logits):
    """softmax_fwd's soft alone, by the same op (a second backward over its graph)."""
    return _launch.softmax(logits)


caches_softmax = _launch.caches_softmax


def inplace_scale(grad, scale):
    """scale_: grad[i, :] *= scale[i] (op under compile, launcher otherwise)."""
    if _compiling():
        scale_(grad, scale)
    else:
        _launch.scale_(grad, scale)
        torch.autograd.graph.increment_version(grad)


# ----------------------------------------------------------------------------
# Batching rules (torch.func.vmap): a batch of row blocks is one longer row block
# ----------------------------------------------------------------------------
#
# Every tensor argument of fwd and bwd but the class weights is per row, so vmap over
# any of them is the op over the batch's rows stacked, B * n_rows of them, cut back
# into (B, n_rows, ...).  A batch of class weights runs the op once per weight.

def _batched_rows(args, in_dims, batch_size, per_row):
    """The per-row tensor arguments with the batch stacked into the rows."""
    out = list(args)
    for i in per_row:
        t, d = args[i], in_dims[i]
        if t is None:
            continue
        t = t.movedim(d, 0) if d is not None else t.expand(batch_size, *t.shape)
        out[i] = t.reshape(batch_size * t.shape[1], *t.shape[2:])
    return out


def _vmap_rule(op, per_row, weight_arg):
    def rule(info, in_dims, *args):
        batch_size = info.batch_size
        if in_dims[weight_arg] is not None:
            # one call per class-weight vector
            per_item = []
            for b in range(batch_size):
                item = [a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]
                res = op(*item)
                per_item.append(res if isinstance(res, (list, tuple)) else [res])
            outs = [torch.stack(o) for o in zip(*per_item)]
            return (outs if isinstance(res, (list, tuple)) else outs[0],
                    [0] * len(outs) if isinstance(res, (list, tuple)) else 0)
        n_rows = args[0].shape[1] if in_dims[0] is not None else args[0].shape[0]
        res = op(*_batched_rows(args, in_dims, batch_size, per_row))
        if isinstance(res, (list, tuple)):
            return [r.reshape(batch_size, n_rows, *r.shape[1:]) for r in res], [0] * len(res)
        return res.reshape(batch_size, n_rows, *res.shape[1:]), 0
    return rule


# fwd(logits, target, weight, alpha, beta, zeta, ...); bwd(logits, target, weight, row_max,
# log_d, dlse, alpha, beta, ...)
torch.library.register_vmap(fwd, _vmap_rule(fwd, (0, 1, 3, 4, 5), 2))
torch.library.register_vmap(bwd, _vmap_rule(bwd, (0, 1, 3, 4, 5, 6, 7), 2))
