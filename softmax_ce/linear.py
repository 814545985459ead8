"""Fused linear cross-entropy: `linear_cross_entropy(input, weight, target)` equals
`cross_entropy(F.linear(input, weight, bias), target)` without ever materialising
the (N, V) logits.

The forward keeps, per token, only the log-sum-exp and the loss coefficients
(O(N)); the backward recomputes each logits tile from input and weight and
accumulates the gradients of input, weight and bias in fp32 (low-precision
accumulation of the weight gradient over many tokens diverges in training),
returning them in the parameters' dtypes.
"""

from typing import Optional

import torch
from torch import Tensor, nn

from . import _ops
from .functional import _check_options, _fail, _row_coefficients

_API = "linear_cross_entropy"


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over x (N, D), weight (V, D), bias (V,) -> per-row loss (N,) fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, alpha, beta, zeta, softcap):
        loss, mx, logd, dlse = _ops.lce_fwd(x, weight, bias, target, class_weight, alpha, beta,
                                            zeta, softcap)
        ctx.softcap = softcap
        ctx.save_for_backward(x, weight, bias, target, class_weight, mx, logd, dlse, alpha, beta)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, bias, target, class_weight, mx, logd, dlse, alpha, beta = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g = grad_loss.to(dlse.dtype)
        dx, dw, db = _ops.lce_bwd(x, weight, bias, target, class_weight, mx, logd, g * dlse,
                                  g * alpha, g * beta if beta is not None else None,
                                  ctx.softcap, need_dx, need_dw, need_db and bias is not None)
        return (dx.to(x.dtype) if need_dx else None,
                dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if need_db and bias is not None else None,
                None, None, None, None, None, None)


def _check_linear_inputs(input, weight, target, bias, shift):
    """torch's exception types (TypeError for a non-tensor, ValueError for a batch-size
    mismatch, RuntimeError otherwise), messages that name the argument."""
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            _fail(TypeError, f"{name} must be a Tensor, got {type(t).__name__}", _API)
    if bias is not None and not isinstance(bias, Tensor):
        _fail(TypeError, f"bias must be a Tensor or None, got {type(bias).__name__}", _API)
    if not input.is_floating_point() or input.dim() < 1:
        _fail(RuntimeError, f"input must be a floating-point tensor of shape (..., D), got "
                            f"{input.dtype} {tuple(input.shape)}", _API)
    if weight.dim() != 2 or not weight.is_floating_point():
        _fail(RuntimeError, f"weight must be a floating-point (V, D) tensor, as for F.linear, got "
                            f"{weight.dtype} {tuple(weight.shape)}", _API)
    if weight.shape[1] != input.shape[-1]:
        _fail(RuntimeError, f"weight {tuple(weight.shape)} does not match input "
                            f"{tuple(input.shape)}: expected weight (V, {input.shape[-1]})", _API)
    if bias is not None and bias.shape != weight.shape[:1]:
        _fail(RuntimeError, f"bias must have shape ({weight.shape[0]},) like weight's rows, got "
                            f"{tuple(bias.shape)}", _API)
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != input.device:
            _fail(RuntimeError, f"{name} is on {t.device} but input is on {input.device}; "
                                f"expected all on the same device", _API)
    if target.is_floating_point() or target.dtype not in (torch.int64, torch.int32, torch.uint8):
        _fail(RuntimeError, f"target must hold class indices (int64, int32 or uint8), got "
                            f"{target.dtype}", _API)
    if target.shape != input.shape[:-1]:
        if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            _fail(ValueError, f"Expected input batch_size ({input.shape[0]}) to match target "
                              f"batch_size ({target.shape[0]}): input {tuple(input.shape)}, "
                              f"target {tuple(target.shape)}", _API)
        _fail(RuntimeError, f"target of shape {tuple(target.shape)} does not match input of "
                            f"shape {tuple(input.shape)}: expected {tuple(input.shape[:-1])}", _API)
    if shift and target.dim() < 1:
        _fail(ValueError, "shift=True needs a time dimension: input (..., T, D), target (..., T)",
              _API)
    autocast = torch.is_autocast_enabled(input.device.type)
    if not autocast and (weight.dtype != input.dtype
                         or (bias is not None and bias.dtype != input.dtype)):
        _fail(RuntimeError, f"input ({input.dtype}), weight ({weight.dtype}) and bias must share "
                            f"a dtype, as for F.linear (or run under torch.autocast)", _API)


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor,
                         bias: Optional[Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, *,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         shift: bool = False, class_weight: Optional[Tensor] = None,
                         process_group=None, loss_dtype: Optional[torch.dtype] = None) -> Tensor:
    """`cross_entropy(F.linear(input, weight, bias), target, ...)` without the logits.

    input: hidden states (..., D); weight: the LM head (V, D); bias: (V,) or None;
    target: class indices (...).  ignore_index, reduction, label_smoothing, z_loss and
    softcap mean what they mean in `softmax_ce.cross_entropy`; class_weight is that
    function's `weight` (per-class weights, (V,)).
    shift: the causal-LM shift, position t predicts target t + 1.  The hidden states are
        not copied: the target is shifted instead and the last position is ignored, and
        reduction="none" returns the (..., T - 1) losses.
    Under torch.autocast, input, weight and bias are cast to the autocast dtype as
    F.linear would be, and the loss is fp32; gradients flow back to fp32 master weights.
    process_group: vocabulary parallelism (a column-parallel LM head).  `weight` and
        `bias` hold this rank's contiguous slice of the vocabulary's rows, slices in rank
        order; `input` and `target` (global class indices) are replicated.  The loss is
        the unsharded one on every rank; the weight and bias gradients are this rank's
        slices, the input gradient is the full one on every rank (all-reduced over the
        group in the backward).  A DTensor weight sharded on dim 0 over a 1-D mesh brings
        its own group.  See softmax_ce.distributed for the communication.
    loss_dtype: the dtype of the returned loss; by default the input's (fp32 under
        autocast).  The loss is always accumulated in fp32, so `torch.float32` returns it
        unrounded for low-precision inputs, as transformers' losses (which upcast the
        logits) do.
    """
    _check_options(reduction, label_smoothing, z_loss, softcap, api=_API)
    weight, bias, process_group = _unwrap_dtensor_head(weight, bias, process_group)
    _check_linear_inputs(input, weight, target, bias, shift)
    device_type = input.device.type
    out_dtype = input.dtype
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        out_dtype = torch.float32  # autocast runs cross_entropy in fp32
    if loss_dtype is not None:
        out_dtype = loss_dtype

    n_vocab, dim = weight.shape
    x2 = input.reshape(-1, dim)
    batch_shape = target.shape
    if shift:
        pad = target.new_full(target.shape[:-1] + (1,), ignore_index)
        target = torch.cat([target[..., 1:], pad], dim=-1)
    target2 = target.reshape(-1)

    row_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if process_group is not None:
        loss_rows, nan_if_empty = _sharded(x2, weight, bias, target2, class_weight, softcap,
                                           ignore_index, reduction, label_smoothing, z_loss,
                                           process_group, row_dtype)
    else:
        cw = None
        if class_weight is not None:
            if class_weight.dim() != 1 or class_weight.numel() != n_vocab:
                _fail(RuntimeError, f"class_weight must be a 1-D tensor with one entry per class "
                                    f"({n_vocab}), got {tuple(class_weight.shape)}", _API)
            cw = class_weight.detach().to(device=input.device, dtype=row_dtype).contiguous()
        alpha, beta, zeta, nan_if_empty = _row_coefficients(
            target2, False, cw, x2.shape[0], n_vocab, ignore_index, reduction, label_smoothing,
            z_loss, row_dtype, api=_API)
        kernel_cw = cw if beta is not None else None
        with torch.autocast(device_type, enabled=False):
            loss_rows = LinearCrossEntropyFunction.apply(
                x2, weight, bias, target2, kernel_cw, alpha, beta, zeta,
                float(softcap) if softcap is not None else None)

    if reduction == "none":
        loss = loss_rows.reshape(batch_shape)
        if shift:
            loss = loss[..., :-1]
    else:
        loss = loss_rows.sum()
        if nan_if_empty is not None:
            loss = loss + nan_if_empty
    return loss.to(out_dtype)


def _unwrap_dtensor_head(weight, bias, process_group):
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return weight, bias, process_group
    if not isinstance(weight, DTensor):
        return weight, bias, process_group
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        _fail(ValueError, f"a DTensor weight must be sharded on dim 0 (the vocabulary) over a "
                          f"1-D device mesh, got {placements}", _API)
    if isinstance(bias, DTensor):
        bias = bias.to_local()
    return weight.to_local(), bias, mesh.get_group()


def _sharded(x2, weight, bias, target2, class_weight, softcap, ignore_index, reduction,
             label_smoothing, z_loss, group, row_dtype):
    from . import distributed

    if class_weight is not None and (not isinstance(class_weight, Tensor)
                                     or class_weight.dim() != 1):
        _fail(RuntimeError, "class_weight must be a 1-D tensor: the full (V,) vector or this "
                            "rank's slice", _API)
    with torch.autocast(x2.device.type, enabled=False):
        loss_rows, nan_if_empty = distributed.ShardedLinearCrossEntropyFunction.apply(
            x2, weight, bias, target2, class_weight,
            float(softcap) if softcap is not None else None,
            ignore_index, reduction, float(label_smoothing), float(z_loss), group, _API)
    return loss_rows, nan_if_empty if reduction == "mean" else None


class LinearCrossEntropyLoss(nn.Module):
    """Module form of `linear_cross_entropy`: forward(input, weight, target, bias=None)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, shift: bool = False,
                 class_weight: Optional[Tensor] = None):
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.shift = shift

    def forward(self, input: Tensor, weight: Tensor, target: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(input, weight, target, bias, self.ignore_index,
                                    self.reduction, self.label_smoothing, z_loss=self.z_loss,
                                    softcap=self.softcap, shift=self.shift,
                                    class_weight=self.class_weight)
