"""The functional API: `cross_entropy`, a drop-in for torch.nn.functional.cross_entropy.

Layers, bottom up: kernels (softmax_ce.kernels) -> launchers that write into given
tensors (_launch) -> custom ops (_ops) -> the autograd Function below -> this
function, which checks arguments, flattens shapes, turns the options into per-row
coefficients and applies the reduction.

How the options become per-row coefficients (all on the device, no host sync):
    rho_i   = weight[t_i] (1 without weight), 0 where t_i == ignore_index
    alpha_i = (1 - label_smoothing) * rho_i
    beta_i  = label_smoothing / C * [t_i != ignore_index]
    zeta_i  = z_loss * rho_i
and for reduction="mean" each is divided by torch's denominator, sum(rho) (the
number of non-ignored targets without a weight).  Probability targets have
rho_i = 1 and the number of rows as denominator.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from ._launch import uses_triton

GRAD_MODES = ("recompute", "fused")
_REDUCTIONS = ("none", "mean", "sum")
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


def recompute_grad(logits, target, weight, mx, logd, dlse, alpha, beta, grad_loss, grad_lse,
                   prob_target, softcap, inplace):
    """The recompute strategy's backward: d loss / d logits from the forward's saved row
    statistics and coefficients, written over the logits (inplace) or into a new tensor.
    Shared by CrossEntropyFunction and the vocabulary-parallel function."""
    g = grad_loss.to(dlse.dtype)
    s_coef = g * dlse
    if grad_lse is not None:
        s_coef = s_coef + grad_lse
    args = (target, weight, mx, logd, s_coef, g * alpha, g * beta if beta is not None else None,
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
                loss, mx, logd, dlse = _ops.inplace_fwd_grad(logits, *args)
                grad = logits
            else:
                loss, mx, logd, dlse, grad = _ops.fwd_grad(logits, *args)
            ctx.save_for_backward(grad)
        else:
            loss, mx, logd, dlse = _ops.fwd(logits, *args)
            ctx.save_for_backward(logits, target, weight, mx, logd, dlse, alpha, beta)
        if ctx.needs_target_grad:
            ctx.target_grad_inputs = (target_grad_logits, mx, logd, alpha, weight)
        lse = mx + logd
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
    logits, mx, logd, alpha, weight = ctx.target_grad_inputs
    z = logits.to(mx.dtype)
    if ctx.softcap is not None:
        z = ctx.softcap * torch.tanh(z / ctx.softcap)
    g = (grad_loss.to(mx.dtype) * alpha)[:, None] * ((mx[:, None] - z) + logd[:, None])
    return g * weight if weight is not None else g


def _fail(exc, msg, api="cross_entropy"):
    raise exc(f"softmax_ce.{api}: {msg}")


def _check_options(reduction, label_smoothing, z_loss, softcap, grad_mode="recompute",
                   api="cross_entropy"):
    if reduction not in _REDUCTIONS:
        _fail(ValueError, f"reduction={reduction!r} is not a valid value for reduction; "
                          f"expected one of {_REDUCTIONS}", api)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        _fail(RuntimeError, f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}",
              api)
    if not float(z_loss) >= 0.0:
        _fail(ValueError, f"z_loss must be a non-negative float, got {z_loss}", api)
    if softcap is not None and not float(softcap) > 0.0:
        _fail(ValueError, f"softcap must be None or a positive float, got {softcap}", api)
    if grad_mode not in GRAD_MODES:
        _fail(ValueError, f"grad_mode={grad_mode!r} is not one of {GRAD_MODES}", api)


def _flatten(input: Tensor, target: Tensor):
    """(C) / (N, C) / (N, C, d1..dk) -> (rows, C) logits view and row-shaped target.

    Errors have torch's exception types (TypeError for a non-tensor, ValueError for a
    batch-size mismatch, RuntimeError for the rest; NotImplementedError, a
    RuntimeError, for a non-floating input), so code that catches torch's keeps
    working, with messages that name the argument."""
    if not isinstance(input, Tensor):
        _fail(TypeError, f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        _fail(NotImplementedError, f"input must be a floating-point tensor (float32, bfloat16, "
                                   f"float16 or float64), got {input.dtype}")
    if input.dim() == 0:
        _fail(RuntimeError, "input must have at least one dimension (the classes), got a 0-d "
                            "tensor")
    if not isinstance(target, Tensor):
        _fail(TypeError, f"target must be a Tensor, got {type(target).__name__}")
    if target.device != input.device:
        _fail(RuntimeError, f"target is on {target.device} but input is on {input.device}; "
                            f"expected both on the same device")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = input.shape[:0] if input.dim() == 1 else input.shape[:1] + input.shape[2:]

    if target.is_floating_point():
        if target.shape != input.shape:
            _fail(RuntimeError, f"target of floating dtype {target.dtype} must hold class "
                                f"probabilities of the input's shape {tuple(input.shape)}, got "
                                f"{tuple(target.shape)}; class-index targets must be integer "
                                f"(int64, int32 or uint8)")
        prob_target = True
    else:
        if target.dtype not in _INDEX_DTYPES:
            _fail(RuntimeError, f"target must hold class indices (int64, int32 or uint8) or "
                                f"class probabilities (floating), got {target.dtype}")
        if target.shape != batch_shape:
            if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
                _fail(ValueError, f"Expected input batch_size ({input.shape[0]}) to match "
                                  f"target batch_size ({target.shape[0]}): input "
                                  f"{tuple(input.shape)}, target {tuple(target.shape)}")
            _fail(RuntimeError, f"target of shape {tuple(target.shape)} does not match input of "
                                f"shape {tuple(input.shape)}: expected target shape "
                                f"{tuple(batch_shape)} (the input's shape without the class dim 1)")
        prob_target = False

    def rows(t: Tensor, with_classes: bool) -> Tensor:
        if input.dim() == 1:
            return t.unsqueeze(0) if with_classes else t.reshape(1)
        if input.dim() == 2:
            return t if with_classes else t.reshape(-1)
        if with_classes:
            return t.movedim(1, -1).reshape(-1, n_classes)
        return t.reshape(-1)

    return rows(input, True), rows(target, prob_target), prob_target, batch_shape, n_classes


def _check_weight(weight, n_classes=None, api="cross_entropy"):
    """weight: a floating (C,) tensor (n_classes None: any length, the sharded case)."""
    if not isinstance(weight, Tensor):
        _fail(TypeError, f"weight must be a Tensor or None, got {type(weight).__name__}", api)
    if not weight.is_floating_point():
        _fail(RuntimeError, f"weight must be a floating-point tensor (class weights), got "
                            f"{weight.dtype}", api)
    if weight.dim() != 1 or (n_classes is not None and weight.numel() != n_classes):
        expected = f"({n_classes},), one entry per class" if n_classes is not None else "(C,)"
        _fail(RuntimeError, f"weight must have shape {expected}, got {tuple(weight.shape)}", api)


def _grad_plan(logits2: Tensor, grad_mode: str, inplace: bool, api="cross_entropy"):
    """(grad_mode, inplace) for this call.

    When no backward can follow (grad disabled, or logits that do not require grad: an
    eval loop under torch.no_grad()), the call is forward-only whatever was asked: no
    gradient is computed and nothing is written into the logits.  In place on a leaf
    that requires grad (an nn.Parameter, a tensor made with requires_grad=True), or on
    a view of one, is refused as torch refuses in-place ops there: the user still owns
    those values."""
    if not (torch.is_grad_enabled() and logits2.requires_grad):
        return "recompute", False
    if inplace:
        base = logits2
        while base._base is not None:
            base = base._base
        if base.is_leaf:
            _fail(RuntimeError, "inplace_backward=True would overwrite input with its gradient, "
                                "but input is a leaf tensor that requires grad (or a view of one, "
                                "e.g. an nn.Parameter): torch refuses in-place operations on such "
                                "a leaf and its values would be lost. Use inplace_backward=False, "
                                "or pass logits computed from it (an LM head's output)", api)
    return grad_mode, inplace


def _check_prob_ignore(prob_target, ignore_index, api="cross_entropy"):
    if prob_target and ignore_index != -100:
        _fail(RuntimeError, f"ignore_index={ignore_index} is not supported for floating point "
                            f"(probability) target, as in torch", api)


def _check_target_range(target: Tensor, valid: Tensor, n_classes: int, ignore_index: int,
                        api="cross_entropy"):
    bad = valid & ((target < 0) | (target >= n_classes))
    msg = (f"softmax_ce.{api}: target holds a class outside [0, {n_classes}) "
           f"that is not ignore_index={ignore_index}")
    if target.is_cuda or torch.compiler.is_compiling():
        # device-side: no host synchronisation; the kernels never read out of bounds
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        first = int(target[bad][0])
        raise IndexError(f"{msg} (found {first})")


def _row_weights(target2, prob_target, weight32, n_rows, n_classes, ignore_index, dtype,
                 api="cross_entropy"):
    """rho (the target's class weight, 0 where ignored) and valid (0/1), per row."""
    if prob_target:
        ones = torch.ones(n_rows, dtype=dtype, device=target2.device)
        return ones, ones
    # compared as int64: a uint8 target would turn ignore_index=-100 into class 156
    is_valid = target2.long() != ignore_index
    _check_target_range(target2, is_valid, n_classes, ignore_index, api)
    valid = is_valid.to(dtype)
    if weight32 is None:
        return valid, valid
    safe = torch.where(is_valid, target2, 0).long()
    return weight32.to(dtype).gather(0, safe) * valid, valid


def _coefficients(rho, valid, n_classes, reduction, label_smoothing, z_loss):
    """alpha, beta, zeta (beta/zeta None when unused) and the term that makes mean of nothing nan."""
    eps = float(label_smoothing)
    alpha = (1.0 - eps) * rho
    beta = (eps / n_classes) * valid if eps > 0 else None
    zeta = float(z_loss) * rho if z_loss != 0 else None
    nan_if_empty = None
    if reduction == "mean":
        denom = rho.sum()
        inv = torch.where(denom != 0, 1.0 / denom, 0.0)
        alpha = alpha * inv
        beta = beta * inv if beta is not None else None
        zeta = zeta * inv if zeta is not None else None
        # torch: a mean over no weight at all is nan (0 / 0), e.g. every target ignored
        nan_if_empty = torch.where(denom != 0, 0.0, float("nan"))
    return alpha, beta, zeta, nan_if_empty


def _row_coefficients(target2, prob_target, weight32, n_rows, n_classes, ignore_index,
                      reduction, label_smoothing, z_loss, dtype, api="cross_entropy"):
    rho, valid = _row_weights(target2, prob_target, weight32, n_rows, n_classes, ignore_index,
                              dtype, api)
    return _coefficients(rho, valid, n_classes, reduction, label_smoothing, z_loss)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, inplace_backward: bool = False,
                  grad_mode: str = "recompute", return_lse: bool = False,
                  process_group=None):
    """Softmax cross-entropy, a drop-in for `torch.nn.functional.cross_entropy`.

    Same arguments, shapes, dtypes, reductions and errors as torch, plus:

    z_loss: adds ``z_loss * lse**2`` per token (PaLM's auxiliary loss), weighted and
        reduced like the target term (ignored tokens add nothing).
    softcap: logits become ``softcap * tanh(z / softcap)`` before the softmax (Gemma 2).
    inplace_backward: write the gradient into the logits' storage, so a training step
        needs no second logits-sized buffer when the logits are an intermediate (an LM
        head's output).  The logits must not be used afterwards; autograd raises if a
        backward would read them.  Refused (RuntimeError) for a leaf that requires grad
        or a view of one, as torch refuses in-place ops there.
    grad_mode: ``"recompute"`` (default) saves only the per-row lse and recomputes
        softmax in the backward: 3 logits-sized passes of traffic per step whatever
        grad_output is.  ``"fused"`` writes the gradient during the forward and only
        rescales it in the backward: 3 passes when grad_output is exactly 1, 5
        otherwise (the row is read twice, from HBM at LLM sizes), and 2 / 4 for rows
        that fit one tile (V <= BLOCK_V), which are read once.  With ``"fused"`` and
        ``inplace_backward=True`` the logits are overwritten already by the forward.
        When no backward can follow (``torch.no_grad()``, logits that do not require
        grad) every mode runs forward only: nothing is computed for a gradient and
        nothing is written into the logits.
    return_lse: also return the per-row log-sum-exp (fp32, the target's shape, of the
        softcapped logits), from the same pass: ``loss, lse = cross_entropy(...,
        return_lse=True)``.  It is differentiable with grad_mode="recompute".

    process_group: vocabulary parallelism.  With a `torch.distributed` group, the class
        dimension of `input` (and of probability targets) is this rank's contiguous slice
        of the vocabulary, slices in rank order; class-index targets are global indices;
        `weight` may be the full (V,) vector or this rank's slice.  The loss (and lse) is
        the unsharded one on every rank and the gradient is this rank's slice of the
        unsharded gradient; one all-gather of per-row statistics per forward, none in the
        backward (see softmax_ce.distributed).  A DTensor `input` sharded on the class
        dimension over a 1-D mesh (a ColwiseParallel LM head's output) brings its own
        group.  grad_mode must be "recompute" there.

    Float64 inputs go through a PyTorch path that computes in float64 (for gradcheck);
    everything else accumulates in fp32 and returns the input's dtype, as torch does.
    """
    _check_options(reduction, label_smoothing, z_loss, softcap, grad_mode)
    input, target, process_group = _unwrap_dtensor(input, target, process_group)
    if process_group is not None:
        return _sharded(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                        softcap, inplace_backward, grad_mode, return_lse, process_group)
    logits2, target2, prob_target, batch_shape, n_classes = _flatten(input, target)
    _check_prob_ignore(prob_target, ignore_index)
    n_rows = logits2.shape[0]

    weight32 = None
    if weight is not None:
        _check_weight(weight, n_classes)
        row_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        weight32 = weight.detach().to(device=input.device, dtype=row_dtype).contiguous()

    row_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    alpha, beta, zeta, nan_if_empty = _row_coefficients(
        target2, prob_target, weight32, n_rows, n_classes, ignore_index, reduction,
        label_smoothing, z_loss, row_dtype)
    # The kernels read class weights only where a class other than the target matters.
    kernel_weight = weight32 if (prob_target or beta is not None) else None
    if softcap is not None:
        softcap = float(softcap)
    grad_mode, inplace = _grad_plan(logits2, grad_mode, bool(inplace_backward))

    loss_rows, lse = CrossEntropyFunction.apply(
        logits2, target2, kernel_weight, alpha, beta, zeta, prob_target, softcap,
        grad_mode, inplace)
    return _reduce(loss_rows, lse, reduction, nan_if_empty, batch_shape, input.dtype, return_lse)


def _reduce(loss_rows, lse, reduction, nan_if_empty, batch_shape, dtype, return_lse):
    if reduction == "none":
        loss = loss_rows.reshape(batch_shape)
    else:
        loss = loss_rows.sum()
        if nan_if_empty is not None:
            loss = loss + nan_if_empty
    loss = loss.to(dtype)
    if return_lse:
        return loss, lse.reshape(batch_shape)
    return loss


def _unwrap_dtensor(input, target, process_group):
    """A DTensor sharded on the class dimension -> (local tensor, its group)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without distributed
        return input, target, process_group
    if isinstance(target, DTensor):
        target = target.full_tensor()
    if not isinstance(input, DTensor):
        return input, target, process_group
    class_dim = 0 if input.dim() == 1 else 1
    mesh = input.device_mesh
    placements = input.placements
    if (mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard)
            or placements[0].dim % input.dim() != class_dim):
        _fail(ValueError, f"a DTensor input must be sharded on the class dimension {class_dim} "
                          f"over a 1-D device mesh, got {placements} on {mesh}")
    if process_group is not None and process_group is not mesh.get_group():
        _fail(ValueError, "process_group differs from the DTensor input's mesh group")
    return input.to_local(), target, mesh.get_group()


def _sharded(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             inplace_backward, grad_mode, return_lse, group):
    from . import distributed

    if grad_mode != "recompute":
        _fail(ValueError, f"grad_mode={grad_mode!r} is not available with process_group: the "
                          f"gradient needs the global lse, known only after the forward")
    logits2, target2, prob_target, batch_shape, n_local = _flatten(input, target)
    _check_prob_ignore(prob_target, ignore_index)
    _, inplace_backward = _grad_plan(logits2, grad_mode, bool(inplace_backward))
    if weight is not None:
        _check_weight(weight)  # the full (V,) vector or this rank's slice
    loss_rows, lse, nan_if_empty = distributed.sharded_cross_entropy(
        logits2, target2, weight, prob_target,
        float(softcap) if softcap is not None else None, ignore_index, reduction,
        label_smoothing, z_loss, bool(inplace_backward), group)
    return _reduce(loss_rows, lse, reduction, nan_if_empty if reduction == "mean" else None,
                   batch_shape, input.dtype, return_lse)


__all__ = ["cross_entropy", "CrossEntropyFunction", "GRAD_MODES", "uses_triton"]
