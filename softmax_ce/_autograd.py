"""The autograd Functions: the custom ops of `_ops` with their gradients.

Layer: above `_ops` (its only import in the package), below the public functions.
`recompute_grad` is the recompute strategy's backward, shared by the plain and the
vocabulary-parallel loss.
"""

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

class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over x (N, D), weight (V, D), bias (V,) -> per-row loss (N,) fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, alpha, beta, zeta, softcap):
        loss, row_max, log_d, dlse = _ops.lce_fwd(x, weight, bias, target, class_weight, alpha, beta,
                                            zeta, softcap)
        ctx.softcap = softcap
        ctx.save_for_backward(x, weight, bias, target, class_weight, row_max, log_d, dlse, alpha, beta)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, bias, target, class_weight, row_max, log_d, dlse, alpha, beta = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g = grad_loss.to(dlse.dtype)
        dx, dw, db = _ops.lce_bwd(x, weight, bias, target, class_weight, row_max, log_d, g * dlse,
                                  g * alpha, g * beta if beta is not None else None,
                                  ctx.softcap, need_dx, need_dw, need_db and bias is not None)
        return (dx.to(x.dtype) if need_dx else None,
                dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if need_db and bias is not None else None,
                None, None, None, None, None, None)
