"""The autograd Functions: the custom ops of `_ops` with their gradients.

Layer: above `_ops` (its only import in the package), below the public functions.
`recompute_grad` is the recompute strategy's backward, shared by the plain and the
vocabulary-parallel loss.
"""

import dataclasses
from typing import Optional

import torch

from . import _ops

def recompute_grad(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad_loss, grad_lse,
                   prob_target, softcap, inplace):
    """The recompute strategy's backward: d loss / d logits from the forward's saved row
    statistics and coefficients, written over the logits (inplace) or into a new tensor.
    Shared by CrossEntropyFunction and the vocabulary-parallel function."""
    g = grad_loss.to(dlse.dtype)
    dlse = g * dlse
    if grad_lse is not None:
        dlse = dlse + grad_lse
    args = (target, weight, row_max, log_d, dlse, g * alpha, g * beta if beta is not None else None,
            prob_target, softcap)
    if inplace:
        _ops.inplace_bwd(logits, *args)
        return logits
    return _ops.bwd(logits, *args)

class CrossEntropyFunction(torch.autograd.Function):
    """Autograd over (n_rows, n_cols) logits -> (loss_rows, lse), both (n_rows,) fp32.

    grad_mode "recompute": the forward saves the row max m, log d (lse = m + log d)
    and the row coefficients; the backward reads the logits once more and writes the
    gradient scaled by grad_output (3 passes' worth of bytes in all: read, read, write).
    grad_mode "fused": the forward also writes the gradient for grad_output = 1;
    the backward rescales it in place, a no-op on the GPU when grad_output == 1.  That
    in-place rescale means one backward per forward (no retain_graph re-runs, no
    gradcheck): autograd raises its in-place error on a second one.
    inplace: the gradient is written into the logits' storage; the write bumps the
    logits' version counter (the out-variant op under torch.compile, explicitly in
    eager), so autograd makes any later use of those logits in a backward raise instead
    of reading a gradient as logits.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, beta, zeta, prob_target, softcap,
                grad_mode, inplace):
        args = (target, weight, alpha, beta, zeta, prob_target, softcap)
        ctx.fused = grad_mode == "fused"
        ctx.prob_target, ctx.softcap, ctx.inplace = prob_target, softcap, inplace
        ctx.needs_target_grad = prob_target and ctx.needs_input_grad[1]
        if ctx.needs_target_grad:
            # before any in-place variant overwrites the logits with the gradient
            target_grad_logits = logits.detach().clone()
        if ctx.fused:
            if inplace:
                loss, row_max, log_d, dlse = _ops.inplace_fwd_grad(logits, *args)
                grad = logits
            else:
                loss, row_max, log_d, dlse, grad = _ops.fwd_grad(logits, *args)
            ctx.save_for_backward(grad)
        else:
            loss, row_max, log_d, dlse = _ops.fwd(logits, *args)
            ctx.save_for_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta)
        if ctx.needs_target_grad:
            ctx.target_grad_inputs = (target_grad_logits, row_max, log_d, alpha, weight)
        lse = row_max + log_d
        if ctx.fused:
            ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            if ctx.fused:
                (grad_logits,) = ctx.saved_tensors
                _ops.inplace_scale(grad_logits, grad_loss.float())
            else:
                grad_logits = recompute_grad(*ctx.saved_tensors, grad_loss, grad_lse,
                                             ctx.prob_target, ctx.softcap, ctx.inplace)
        if ctx.needs_target_grad:
            grad_target = _probability_target_grad(ctx, grad_loss)
        return grad_logits, grad_target, None, None, None, None, None, None, None, None

def _probability_target_grad(ctx, grad_loss):
    """d loss / d y for probability targets: alpha * w * (lse - z').  Rare, so plain PyTorch."""
    logits, row_max, log_d, alpha, weight = ctx.target_grad_inputs
    z = logits.to(row_max.dtype)
    if ctx.softcap is not None:
        z = ctx.softcap * torch.tanh(z / ctx.softcap)
    g = (grad_loss.to(row_max.dtype) * alpha)[:, None] * ((row_max[:, None] - z) + log_d[:, None])
    return g * weight if weight is not None else g

def linear_recompute_grads(params, x, weight, bias, target, class_weight, row_max, log_d, dlse,
                           alpha, beta, grad_loss, grad_lse, need_dx, need_dw, need_db):
    """The linear cross-entropy's recomputing backward: (dx, dw, db) from the forward's row
    statistics and coefficients scaled by grad_output (plus the lse's own gradient), by
    params.impl.  Shared by LinearCrossEntropyFunction and the vocabulary-parallel one."""
    g = grad_loss.to(dlse.dtype)
    if g.dim() == 0:
        g = g.expand(dlse.shape)
    dlse = g * dlse
    if grad_lse is not None:
        dlse = dlse + grad_lse.to(dlse.dtype)
    args = (x, weight, bias, target, class_weight, row_max, log_d, dlse, g * alpha,
            g * beta if beta is not None else None, params.softcap, need_dx, need_dw, need_db)
    if params.impl == "fused":
        return _ops.lce_bwd(*args, params.filter_eps)
    return _ops.lce_chunked_bwd(*args, params.chunk_rows, params.accum_dtype)


@dataclasses.dataclass(frozen=True)
class LinearParams:
    """How LinearCrossEntropyFunction runs (everything but tensors).

    impl: "chunked" (logits a chunk of rows at a time on the matmul library, the
        cross-entropy kernels in place on each chunk) or "fused" (one Triton kernel per
        tile, logits never stored at all).
    grad_in_forward: chunked only: compute the gradients in the forward pass (the loss
        is reduced to a scalar, so grad_output scales them exactly) -> the Function
        returns the summed loss; else the per-row losses, and the backward recomputes.
    chunk_rows: rows per chunk; accum_dtype: of dW and db (chunked); filter_eps: fused
        only, 0 (exact) or the gradient filter's threshold.
    allow_retain_graph: grad_in_forward only: the backward scales the forward's gradients
        in place (no second weight-sized buffer), so a second backward raises; True keeps
        them and scales copies (as torch's LinearCrossEntropyOptions.allow_retain_graph)."""
    softcap: Optional[float]
    impl: str = "chunked"
    grad_in_forward: bool = False
    chunk_rows: int = 1
    accum_dtype: torch.dtype = torch.float32
    filter_eps: float = 0.0
    allow_retain_graph: bool = False


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over x (N, D), weight (V, D), bias (V,) -> (loss, lse): loss the per-row
    losses (N,) fp32, or their sum when params.grad_in_forward; lse (N,) fp32, the
    per-row log-sum-exp (differentiable unless grad_in_forward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, alpha, beta, zeta, params):
        ctx.params = params
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.precomputed = params.grad_in_forward and (need_dx or need_dw or need_db)
        if params.impl == "fused":
            loss, row_max, log_d, dlse = _ops.lce_fwd(x, weight, bias, target, class_weight,
                                                      alpha, beta, zeta, params.softcap)
        elif ctx.precomputed:
            loss, row_max, log_d, dlse, dx, dw, db = _ops.lce_chunked(
                x, weight, bias, target, class_weight, alpha, beta, zeta, params.softcap,
                need_dx, need_dw, need_db, params.chunk_rows, params.accum_dtype)
            ctx.save_for_backward(dx if need_dx else None, dw if need_dw else None,
                                  db if need_db else None)
        else:
            loss, row_max, log_d, dlse = _ops.lce_chunked(
                x, weight, bias, target, class_weight, alpha, beta, zeta, params.softcap,
                False, False, False, params.chunk_rows, params.accum_dtype)[:4]
        if not ctx.precomputed:
            ctx.save_for_backward(x, weight, bias, target, class_weight, row_max, log_d, dlse,
                                  alpha, beta)
        lse = row_max + log_d
        if params.grad_in_forward:
            ctx.mark_non_differentiable(lse)
            return loss.sum(), lse
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        p = ctx.params
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.precomputed:
            # computed in the forward for grad_output = 1: the loss is a sum, so grad_output
            # (a scalar) scales every gradient alike; in place unless the graph may be kept
            if getattr(ctx, "consumed", False):
                raise RuntimeError(
                    "softmax_ce.linear_cross_entropy: this loss's gradients, computed in its "
                    "forward, were consumed by a first backward; for retain_graph=True pass "
                    "options=LinearCrossEntropyOptions(allow_retain_graph=True)")
            ctx.consumed = not p.allow_retain_graph
            grads = []
            for t, dt in zip(ctx.saved_tensors, ctx.dtypes):
                if t is None:
                    grads.append(None)
                    continue
                g = grad_loss.to(torch.promote_types(t.dtype, torch.float32))
                grads.append((t.mul_(g) if not p.allow_retain_graph and t.dtype == g.dtype
                              else t * g).to(dt))
            return (*grads, None, None, None, None, None, None)
        x, weight, bias, target, class_weight, row_max, log_d, dlse, alpha, beta = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        dx, dw, db = linear_recompute_grads(p, x, weight, bias, target, class_weight, row_max,
                                            log_d, dlse, alpha, beta, grad_loss, grad_lse,
                                            need_dx, need_dw, need_db)
        return (dx.to(x_dtype) if need_dx else None,
                dw.to(w_dtype) if need_dw else None,
                db.to(b_dtype) if need_db else None,
                None, None, None, None, None, None)
