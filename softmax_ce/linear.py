"""`linear_cross_entropy`: `cross_entropy(F.linear(input, weight, bias), target)` without
ever materialising the (N, V) logits.

Layer: the public function, beside `cross_entropy`.  The forward keeps, per token, only
the log-sum-exp and the loss coefficients (O(N)); the backward recomputes each logits
tile from input and weight and accumulates the gradients of input, weight and bias in
fp32 (low-precision accumulation of the weight gradient over many tokens diverges in
training), returning them in the parameters' dtypes.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _rows as R
from . import distributed
from ._autograd import LinearCrossEntropyFunction

_API = "linear_cross_entropy"


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
    R.check_options(reduction, label_smoothing, z_loss, softcap, api=_API)
    weight, bias, process_group = _unwrap_dtensor_head(weight, bias, process_group)
    R.check_linear_inputs(input, weight, target, bias, shift, _API)
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
                R.fail(RuntimeError, f"class_weight must be a 1-D tensor with one entry per class "
                                    f"({n_vocab}), got {tuple(class_weight.shape)}", _API)
            cw = class_weight.detach().to(device=input.device, dtype=row_dtype).contiguous()
        alpha, beta, zeta, nan_if_empty = R.row_coefficients(
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
        R.fail(ValueError, f"a DTensor weight must be sharded on dim 0 (the vocabulary) over a "
                          f"1-D device mesh, got {placements}", _API)
    if isinstance(bias, DTensor):
        bias = bias.to_local()
    return weight.to_local(), bias, mesh.get_group()


def _sharded(x2, weight, bias, target2, class_weight, softcap, ignore_index, reduction,
             label_smoothing, z_loss, group, row_dtype):
    if class_weight is not None and (not isinstance(class_weight, Tensor)
                                     or class_weight.dim() != 1):
        R.fail(RuntimeError, "class_weight must be a 1-D tensor: the full (V,) vector or this "
                            "rank's slice", _API)
    with torch.autocast(x2.device.type, enabled=False):
        loss_rows, nan_if_empty = distributed.ShardedLinearCrossEntropyFunction.apply(
            x2, weight, bias, target2, class_weight,
            float(softcap) if softcap is not None else None,
            ignore_index, reduction, float(label_smoothing), float(z_loss), group, _API)
    return loss_rows, nan_if_empty if reduction == "mean" else None


__all__ = ["linear_cross_entropy", "LinearCrossEntropyFunction"]
