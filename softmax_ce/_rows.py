"""Per-row math and argument checks, in plain torch: the layer every other one builds on.

Holds: the options' checks (torch's exception types, messages naming the argument),
flattening (C) / (N, C) / (N, C, d1, ...) inputs to rows, how the options become the
per-row coefficients alpha, beta, zeta, composing a row's loss from its terms, and the
reduction.  Imports nothing of the package.

How the options become per-row coefficients (all on the device, no host sync):
    rho_i   = weight[t_i] (1 without weight), 0 where t_i == ignore_index
    alpha_i = (1 - label_smoothing) * rho_i
    beta_i  = label_smoothing / C * [t_i != ignore_index]
    zeta_i  = z_loss * rho_i
and for reduction="mean" each is divided by torch's denominator, sum(rho) (the
number of non-ignored targets without a weight).  Probability targets have
rho_i = 1 and the number of rows as denominator.
"""


import torch
from torch import Tensor

GRAD_MODES = ("recompute", "fused")
REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)

def fail(exc, msg, api="cross_entropy"):
    raise exc(f"softmax_ce.{api}: {msg}")

def check_options(reduction, label_smoothing, z_loss, softcap, grad_mode="recompute",
                   api="cross_entropy"):
    if reduction not in REDUCTIONS:
        fail(ValueError, f"reduction={reduction!r} is not a valid value for reduction; "
                          f"expected one of {REDUCTIONS}", api)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        fail(RuntimeError, f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}",
              api)
    if not float(z_loss) >= 0.0:
        fail(ValueError, f"z_loss must be a non-negative float, got {z_loss}", api)
    if softcap is not None and not float(softcap) > 0.0:
        fail(ValueError, f"softcap must be None or a positive float, got {softcap}", api)
    if grad_mode not in GRAD_MODES:
        fail(ValueError, f"grad_mode={grad_mode!r} is not one of {GRAD_MODES}", api)

def flatten(input: Tensor, target: Tensor):
    """(C) / (N, C) / (N, C, d1..dk) -> (rows, C) logits view and row-shaped target.

    Errors have torch's exception types (TypeError for a non-tensor, ValueError for a
    batch-size mismatch, RuntimeError for the rest; NotImplementedError, a
    RuntimeError, for a non-floating input), so code that catches torch's keeps
    working, with messages that name the argument."""
    if not isinstance(input, Tensor):
        fail(TypeError, f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        fail(NotImplementedError, f"input must be a floating-point tensor (float32, bfloat16, "
                                   f"float16 or float64), got {input.dtype}")
    if input.dim() == 0:
        fail(RuntimeError, "input must have at least one dimension (the classes), got a 0-d "
                            "tensor")
    if not isinstance(target, Tensor):
        fail(TypeError, f"target must be a Tensor, got {type(target).__name__}")
    if target.device != input.device:
        fail(RuntimeError, f"target is on {target.device} but input is on {input.device}; "
                            f"expected both on the same device")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    batch_shape = input.shape[:0] if input.dim() == 1 else input.shape[:1] + input.shape[2:]

    if target.is_floating_point():
        if target.shape != input.shape:
            fail(RuntimeError, f"target of floating dtype {target.dtype} must hold class "
                                f"probabilities of the input's shape {tuple(input.shape)}, got "
                                f"{tuple(target.shape)}; class-index targets must be integer "
                                f"(int64, int32 or uint8)")
        prob_target = True
    else:
        if target.dtype not in INDEX_DTYPES:
            fail(RuntimeError, f"target must hold class indices (int64, int32 or uint8) or "
                                f"class probabilities (floating), got {target.dtype}")
        if target.shape != batch_shape:
            if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
                fail(ValueError, f"Expected input batch_size ({input.shape[0]}) to match "
                                  f"target batch_size ({target.shape[0]}): input "
                                  f"{tuple(input.shape)}, target {tuple(target.shape)}")
            fail(RuntimeError, f"target of shape {tuple(target.shape)} does not match input of "
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

def check_weight(weight, n_classes=None, api="cross_entropy"):
    """weight: a floating (C,) tensor (n_classes None: any length, the sharded case)."""
    if not isinstance(weight, Tensor):
        fail(TypeError, f"weight must be a Tensor or None, got {type(weight).__name__}", api)
    if not weight.is_floating_point():
        fail(RuntimeError, f"weight must be a floating-point tensor (class weights), got "
                            f"{weight.dtype}", api)
    if weight.dim() != 1 or (n_classes is not None and weight.numel() != n_classes):
        expected = f"({n_classes},), one entry per class" if n_classes is not None else "(C,)"
        fail(RuntimeError, f"weight must have shape {expected}, got {tuple(weight.shape)}", api)

def grad_plan(logits2: Tensor, grad_mode: str, inplace: bool, api="cross_entropy"):
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
            fail(RuntimeError, "inplace_backward=True would overwrite input with its gradient, "
                                "but input is a leaf tensor that requires grad (or a view of one, "
                                "e.g. an nn.Parameter): torch refuses in-place operations on such "
                                "a leaf and its values would be lost. Use inplace_backward=False, "
                                "or pass logits computed from it (an LM head's output)", api)
    return grad_mode, inplace

def check_prob_ignore(prob_target, ignore_index, api="cross_entropy"):
    if prob_target and ignore_index != -100:
        fail(RuntimeError, f"ignore_index={ignore_index} is not supported for floating point "
                            f"(probability) target, as in torch", api)

def check_target_range(target: Tensor, valid: Tensor, n_classes: int, ignore_index: int,
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

def check_linear_inputs(input, weight, target, bias, shift, api="linear_cross_entropy"):
    """torch's exception types (TypeError for a non-tensor, ValueError for a batch-size
    mismatch, RuntimeError otherwise), messages that name the argument."""
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            fail(TypeError, f"{name} must be a Tensor, got {type(t).__name__}", api)
    if bias is not None and not isinstance(bias, Tensor):
        fail(TypeError, f"bias must be a Tensor or None, got {type(bias).__name__}", api)
    if not input.is_floating_point() or input.dim() < 1:
        fail(RuntimeError, f"input must be a floating-point tensor of shape (..., D), got "
                            f"{input.dtype} {tuple(input.shape)}", api)
    if weight.dim() != 2 or not weight.is_floating_point():
        fail(RuntimeError, f"weight must be a floating-point (V, D) tensor, as for F.linear, got "
                            f"{weight.dtype} {tuple(weight.shape)}", api)
    if weight.shape[1] != input.shape[-1]:
        fail(RuntimeError, f"weight {tuple(weight.shape)} does not match input "
                            f"{tuple(input.shape)}: expected weight (V, {input.shape[-1]})", api)
    if bias is not None and bias.shape != weight.shape[:1]:
        fail(RuntimeError, f"bias must have shape ({weight.shape[0]},) like weight's rows, got "
                            f"{tuple(bias.shape)}", api)
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != input.device:
            fail(RuntimeError, f"{name} is on {t.device} but input is on {input.device}; "
                                f"expected all on the same device", api)
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.int32, torch.uint8):
        fail(RuntimeError, f"target must hold class indices (int64, int32 or uint8), got "
                            f"{target.dtype}", api)
    if target.shape != input.shape[:-1]:
        if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            fail(ValueError, f"Expected input batch_size ({input.shape[0]}) to match target "
                              f"batch_size ({target.shape[0]}): input {tuple(input.shape)}, "
                              f"target {tuple(target.shape)}", api)
        fail(RuntimeError, f"target of shape {tuple(target.shape)} does not match input of "
                            f"shape {tuple(input.shape)}: expected {tuple(input.shape[:-1])}", api)
    if shift and target.dim() < 1:
        fail(ValueError, "shift=True needs a time dimension: input (..., T, D), target (..., T)",
              api)
    autocast = torch.is_autocast_enabled(input.device.type)
    if not autocast and (weight.dtype != input.dtype
                         or (bias is not None and bias.dtype != input.dtype)):
        fail(RuntimeError, f"input ({input.dtype}), weight ({weight.dtype}) and bias must share "
                            f"a dtype, as for F.linear (or run under torch.autocast)", api)

def row_weights(target2, prob_target, weight32, n_rows, n_classes, ignore_index, dtype,
                 api="cross_entropy"):
    """rho (the target's class weight, 0 where ignored) and valid (0/1), per row."""
    if prob_target:
        ones = torch.ones(n_rows, dtype=dtype, device=target2.device)
        return ones, ones
    # compared as int64: a uint8 target would turn ignore_index=-100 into class 156
    is_valid = target2.long() != ignore_index
    check_target_range(target2, is_valid, n_classes, ignore_index, api)
    valid = is_valid.to(dtype)
    if weight32 is None:
        return valid, valid
    safe = torch.where(is_valid, target2, 0).long()
    return weight32.to(dtype).gather(0, safe) * valid, valid

def coefficients(rho, valid, n_classes, reduction, label_smoothing, z_loss):
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

def row_coefficients(target2, prob_target, weight32, n_rows, n_classes, ignore_index,
                      reduction, label_smoothing, z_loss, dtype, api="cross_entropy"):
    rho, valid = row_weights(target2, prob_target, weight32, n_rows, n_classes, ignore_index,
                              dtype, api)
    return coefficients(rho, valid, n_classes, reduction, label_smoothing, z_loss)

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
        dlse = dlse + torch.where(zeta != 0, 2.0 * zeta * lse, 0.0)  # 0, not 0 * inf
    return loss, dlse

def reduce_rows(loss_rows, lse, reduction, nan_if_empty, batch_shape, dtype, return_lse):
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
