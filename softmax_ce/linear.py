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

from . import _extended
from . import _rows as R
from . import distributed
from ._autograd import LinearCrossEntropyFunction, LinearParams, linear_higher_order_error

_API = "linear_cross_entropy"


IMPLS = ("chunked", "fused")

# The chunk of logits impl="chunked" holds at a time, by default: 1 GiB on a GPU (large
# enough that each chunk's GEMMs run at full speed), 32 MiB on a CPU (its RAM is the
# budget; at N=4096, D=256, V=32000 fp32 that is 262 rows, whose GEMMs still run at full
# speed, and the in-place chunk math of _torch_path adds no temporary of its size).
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 32 << 20}


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = -100,
                         label_smoothing: float = 0.0, options=None,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         shift: bool = False, return_lse: bool = False,
                         accum_dtype: Optional[torch.dtype] = torch.float32,
                         impl: str = "chunked", chunk_bytes: Optional[int] = None,
                         filter_eps: float = 0.0, process_group=None,
                         loss_dtype: Optional[torch.dtype] = None, temperature: float = 1.0,
                         return_entropy: bool = False, return_argmax: bool = False,
                         return_accuracy: bool = False):
    """`cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight, ...)`
    without the (N, V) logits: torch's `F.linear_cross_entropy` signature and meaning
    (`weight` is the class weights; torch 2.13+), plus our extras as keywords.

    input: hidden states (..., D); linear_weight: the LM head (V, D); linear_bias: (V,)
    or None; target: class indices (...).  ignore_index (None means -100, as in torch),
    reduction, label_smoothing, weight, z_loss and softcap mean what they mean in
    `softmax_ce.cross_entropy`.
    options: torch's LinearCrossEntropyOptions is accepted: batch_chunk_size, when set, is
        the number of rows per chunk, and allow_retain_graph=True keeps the gradients the
        forward computed so that a second backward works (by default the backward scales
        them in place, as torch's does); its other fields are torch's own policies and are
        ignored.
    impl: "chunked" (default): a chunk of rows' logits at a time in one reused buffer,
        computed by the matmul library (cuBLAS), with the cross-entropy kernels writing
        the gradient over it in place; for a scalar reduction the gradients are
        computed in the forward and only scaled in the backward, so a training step
        runs the three GEMMs once (6 N V D FLOPs); reduction="none" (and return_lse)
        recompute them in the backward (8 N V D).  Peak extra memory: one chunk plus
        the accumulators.  "fused": one Triton kernel per tile, the logits never exist,
        not even a chunk (8 N V D FLOPs, fp32 atomics; the smallest memory).
    chunk_bytes: the chunk's budget (default CHUNK_BYTES: 1 GiB on a GPU, 32 MiB on a CPU).
    accum_dtype: dtype of the weight's (and bias's) gradient accumulator with "chunked":
        float32 (default, float64 for a float64 head; V x D x 4 bytes, 2.1 GB for
        Llama-3-8B's head) or the weight's own dtype (half that memory for bf16, rounded
        at every chunk's addition).
    filter_eps: "fused" only, on the Triton kernels: skip a tile whose every gradient
        entry is below filter_eps times the largest row coefficient (softmax below
        filter_eps, no target in it); 0 (default) keeps the result exact.
    shift: the causal-LM shift, position t predicts target t + 1.  The hidden states are
        not copied: the target is shifted instead and the last position is ignored, and
        reduction="none" returns the (..., T - 1) losses.
    return_lse: also return the per-token log-sum-exp (fp32, target's shape; differentiable).
    Under torch.autocast, input, linear_weight and linear_bias are cast to the autocast
    dtype as F.linear would be, and the loss is fp32.
    process_group: vocabulary parallelism (a column-parallel LM head): linear_weight and
        linear_bias hold this rank's contiguous slice of the vocabulary's rows, slices in
        rank order; input and target (global class indices) are replicated.  The loss is
        the unsharded one on every rank; the head's gradients are this rank's slices, the
        input gradient the full one (all-reduced).  A DTensor head sharded on dim 0 over a
        1-D mesh brings its own group.  See softmax_ce.distributed.
    loss_dtype: the dtype of the returned loss; by default the input's (fp32 under
        autocast).  The loss is always accumulated in fp32, so `torch.float32` returns it
        unrounded for low-precision inputs, as transformers' losses do.
    temperature: the softmax sees softcap(x W^T + b) / temperature (both impls).
    return_entropy, return_argmax, return_accuracy: per-token statistics from the same
        pass over each chunk of logits (impl="chunked"), returned as a
        `CrossEntropyOutput(loss, lse, entropy, argmax, accuracy)` as by `cross_entropy`;
        with them a training step recomputes the logits in the backward (8 N V D FLOPs),
        where the entropy's gradient is known.
    """
    ignore_index = -100 if ignore_index is None else ignore_index
    R.check_options(reduction, label_smoothing, z_loss, softcap, api=_API)
    temperature = _extended.check(temperature, False, False, "recompute", _API)
    token_stats = bool(return_entropy or return_argmax or return_accuracy)
    if token_stats and impl != "chunked":
        R.fail(NotImplementedError, "return_entropy/argmax/accuracy need impl=\"chunked\" (the "
                                    "fused kernel keeps no per-token statistics)", _API)

    if impl not in IMPLS:
        R.fail(ValueError, f"impl={impl!r} is not one of {IMPLS}", _API)
    input_w, bias, process_group = _unwrap_dtensor_head(linear_weight, linear_bias, process_group)
    if not torch.compiler.is_compiling() and any(
            isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)
            for t in (input, input_w, bias, target)):
        raise linear_higher_order_error("a torch.func transform (grad, vjp, jvp, vmap)")
    R.check_linear_inputs(input, input_w, target, bias, shift, _API)
    device_type = input.device.type
    out_dtype = input.dtype
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        input, input_w = input.to(dt), input_w.to(dt)
        bias = bias.to(dt) if bias is not None else None
        out_dtype = torch.float32  # autocast runs cross_entropy in fp32
    if loss_dtype is not None:
        out_dtype = loss_dtype
    # a backward can follow only with grad enabled and something that requires grad;
    # otherwise the forward computes no gradient (an eval loop under no_grad)
    trains = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, input_w, bias))
    params = _params(input, input_w, softcap, impl, reduction,
                     (return_lse or token_stats) and trains, options, chunk_bytes, accum_dtype,
                     filter_eps, trains, 1.0 / temperature, token_stats)

    n_vocab, dim = input_w.shape
    x2 = input.reshape(-1, dim)
    batch_shape = target.shape
    if shift:
        pad = target.new_full(target.shape[:-1] + (1,), ignore_index)
        target = torch.cat([target[..., 1:], pad], dim=-1)
    target2 = target.reshape(-1)

    row_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if process_group is not None:
        loss_rows, lse, nan_if_empty, entropy, argmax = _sharded(
            x2, input_w, bias, target2, weight, ignore_index, reduction, label_smoothing, z_loss,
            process_group, params)
    else:
        cw = None
        if weight is not None:
            R.check_weight(weight, n_vocab, _API)
            cw = weight.detach().to(device=input.device, dtype=row_dtype).contiguous()
        alpha, beta, zeta, nan_if_empty = R.row_coefficients(
            target2, False, cw, x2.shape[0], n_vocab, ignore_index, reduction, label_smoothing,
            z_loss, row_dtype, api=_API)
        kernel_cw = cw if beta is not None else None
        with torch.autocast(device_type, enabled=False):
            loss_rows, lse, entropy, argmax = LinearCrossEntropyFunction.apply(
                x2, input_w, bias, target2, kernel_cw, alpha, beta, zeta, params)

    if reduction == "none":
        loss = loss_rows.reshape(batch_shape)
        lse = lse.reshape(batch_shape)
        if shift:
            loss, lse = loss[..., :-1], lse[..., :-1]
    else:
        loss = loss_rows.sum() if loss_rows.dim() else loss_rows  # (a sum already, or rows)
        if nan_if_empty is not None:
            loss = loss + nan_if_empty
        lse = lse.reshape(batch_shape)
        if shift:
            lse = lse[..., :-1]
    loss = loss.to(out_dtype)
    if not token_stats:
        return (loss, lse) if return_lse else loss
    cut = (lambda t: t[..., :-1]) if shift else (lambda t: t)
    acc = None
    if return_accuracy:
        acc = _extended.accuracy(argmax, target2, target2.long() != ignore_index)
    return _extended.CrossEntropyOutput(
        loss, lse if return_lse else None,
        cut(entropy.reshape(batch_shape)) if return_entropy else None,
        cut(argmax.reshape(batch_shape)) if return_argmax else None, acc)


def _params(x, w, softcap, impl, reduction, return_lse, options, chunk_bytes, accum_dtype,
            filter_eps, trains, inv_temp=1.0, token_stats=False) -> LinearParams:
    if accum_dtype is None or (accum_dtype == torch.float32 and w.dtype == torch.float64):
        accum_dtype = torch.float32 if w.dtype != torch.float64 else torch.float64
    if accum_dtype not in (torch.float32, w.dtype):
        R.fail(ValueError, f"accum_dtype must be torch.float32 or the weight's dtype ({w.dtype}), "
                           f"got {accum_dtype}", _API)
    if impl == "fused" and accum_dtype != (torch.float64 if w.dtype == torch.float64
                                           else torch.float32):
        R.fail(ValueError, "impl='fused' accumulates its gradients in fp32 (atomics): "
                           "accum_dtype must be torch.float32", _API)
    if not float(filter_eps) >= 0.0:
        R.fail(ValueError, f"filter_eps must be a non-negative float, got {filter_eps}", _API)
    if filter_eps and impl != "fused":
        R.fail(ValueError, "filter_eps filters the tiles of impl='fused'; the chunked path "
                           "computes every logit", _API)
    rows = getattr(options, "batch_chunk_size", None) if options is not None else None
    if rows is None:
        budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(x.device.type,
                                                                             CHUNK_BYTES["cuda"])
        rows = max(1, int(budget) // max(1, w.shape[0] * x.element_size()))
    elif int(rows) < 1:
        R.fail(ValueError, f"options.batch_chunk_size must be positive, got {rows}", _API)
    return LinearParams(softcap=float(softcap) if softcap is not None else None, impl=impl,
                        grad_in_forward=(trains and impl == "chunked" and reduction != "none"
                                         and not return_lse),
                        chunk_rows=int(rows), accum_dtype=accum_dtype, filter_eps=float(filter_eps),
                        allow_retain_graph=bool(getattr(options, "allow_retain_graph", False)),
                        inv_temp=float(inv_temp), token_stats=bool(token_stats))


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


def _sharded(x2, weight, bias, target2, class_weight, ignore_index, reduction, label_smoothing,
             z_loss, group, params):
    if class_weight is not None:
        R.check_weight(class_weight, None, _API)  # the full (V,) vector or this rank's slice
    with torch.autocast(x2.device.type, enabled=False):
        loss_rows, lse, nan_if_empty, entropy, argmax = (
            distributed.ShardedLinearCrossEntropyFunction.apply(
                x2, weight, bias, target2, class_weight, ignore_index, reduction,
                float(label_smoothing), float(z_loss), group, _API, params))
    return loss_rows, lse, nan_if_empty if reduction == "mean" else None, entropy, argmax


__all__ = ["linear_cross_entropy", "LinearCrossEntropyFunction"]
