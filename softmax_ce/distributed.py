"""Vocabulary-parallel cross-entropy over torch.distributed (tensor-parallel LM heads).

Each rank of `process_group` holds a contiguous slice of the vocabulary, slices in
rank order (uneven slices are fine): the class dimension of the logits, or the rows
of the LM-head weight.  No logits are gathered.  Per token, each rank reduces its
slice to a few fp32 numbers with the same kernels as the single-device loss,

    m_r, log d_r                the slice's max and log sum-exp about it (lse_r = m_r + log d_r)
    t_r = lse_r - z'_t          target term, on the rank that owns the target
          (probability targets: sum_c w y (lse_r - z'_c) and s_r = sum_c w y)
    q_r = sum_c w_c (lse_r - z'_c)       label-smoothing term
    w_r = weight[t], W_r = sum_c w_c     class weight of an owned target, slice weight

and ONE all-gather of these rows combines them exactly on every rank
(delta_r = lse - lse_r >= 0):

    lse = logsumexp_r lse_r,  lse - z'_t = t_owner + delta_owner,
    sum_c w_c (lse - z'_c) = sum_r q_r + W_r delta_r.

Bytes communicated per token: 8 fp32 values sent by each rank, 32 * world_size
received (Megatron's vocab-parallel loss uses three all-reduces of one value each:
max, target logit, sum-exp; 12 bytes sent and received per token, but three
latency-bound collectives instead of one).  The backward of `cross_entropy` needs no
communication: the forward saved the global lse and coefficients, so each rank writes
its slice of the gradient.  That of `linear_cross_entropy` all-reduces the fp32
gradient of the replicated hidden states (N x D), as the column-parallel LM head it
replaces would; nothing of size V ever crosses the wire.

The slice offsets are learned by one all-gather of slice sizes the first time a
(group, slice size) pair is seen, and cached.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _launch, _launch_linear, _ops
from .functional import _coefficients

# columns of the gathered per-row statistics
_MAX, _LOGD, _TARGET, _SMOOTH, _SWY, _OWNER, _WT, _WSLICE = range(8)
N_STATS = 8

_offsets: Dict[Tuple[int, int], Tuple[int, int]] = {}

# torch renamed all_gather_into_tensor to all_gather_single (2.13); accept either
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def slice_bounds(group, n_local: int, device: torch.device) -> Tuple[int, int]:
    """(offset of this rank's slice, global vocabulary size), cached per (group, n_local)."""
    key = (id(group), n_local)
    if key not in _offsets:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        sizes = torch.empty(world, dtype=torch.int64, device=device)
        _all_gather(sizes, torch.full((1,), n_local, dtype=torch.int64, device=device), group=group)
        sizes = sizes.tolist()
        _offsets[key] = (sum(sizes[:rank]), sum(sizes))
    return _offsets[key]


def _gather_rows(local: Tensor, group) -> Tensor:
    """(N, k) on each rank -> (world, N, k): the one collective of the forward."""
    world = dist.get_world_size(group)
    # the concatenated form (world * N, k): the one every backend accepts
    out = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
    _all_gather(out, local.contiguous(), group=group)
    return out.view((world,) + tuple(local.shape))


def _combine(gathered: Tensor, prob_target: bool):
    """Global per-row (m, log d, target term, smoothing term, sum w y, w[t], W) from the slices.

    lse = m + log d with m = max_r m_r and log d = log sum_r d_r e^(m_r - m); the
    difference delta_r = lse - lse_r is formed as (m - m_r) + (log d - log d_r), never by
    subtracting two rounded lse values (rows near +-1e4 would lose ~1e-3 to that).
    """
    m_r, logd_r = gathered[..., _MAX], gathered[..., _LOGD]
    # a slice with no probability mass (empty, or all -inf) has log d_r = -inf
    empty = torch.isneginf(logd_r)
    m = torch.where(empty, float("-inf"), m_r).amax(dim=0)
    m = torch.where(torch.isneginf(m), 0.0, m)
    log_d = torch.logsumexp(logd_r + (m_r - m[None]), dim=0)
    delta = torch.where(empty, 0.0, (m[None] - m_r) + (log_d[None] - logd_r))
    owner = gathered[..., _OWNER]
    if prob_target:
        target_term = (gathered[..., _TARGET] + gathered[..., _SWY] * delta).sum(0)
    else:
        target_term = torch.where(owner != 0, gathered[..., _TARGET] + delta, 0.0).sum(0)
    smooth_term = (gathered[..., _SMOOTH] + gathered[..., _WSLICE] * delta).sum(0)
    s_wy = gathered[..., _SWY].sum(0)
    w_target = (gathered[..., _WT] * owner).sum(0)
    W = gathered[:, :1, _WSLICE].sum()  # the same in every row; :1 keeps N = 0 working
    return m, log_d, target_term, smooth_term, s_wy, w_target, W


def _local_targets(target2, prob_target, offset, n_local, n_global, ignore_index, api):
    """This rank's view of the targets: class index in the slice, -1 where not owned."""
    if prob_target:
        return target2, None
    valid = target2.long() != ignore_index  # int64: uint8 would wrap -100 to 156
    bad = valid & ((target2 < 0) | (target2 >= n_global))
    msg = (f"softmax_ce.{api}: target holds a class outside [0, {n_global}) that is not "
           f"ignore_index={ignore_index}")
    if target2.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        raise IndexError(msg)
    local = target2.long() - offset
    owned = valid & (local >= 0) & (local < n_local)
    return torch.where(owned, local, -1), owned


def _local_stats(mx, logd, target_term, smooth_term, s_wy, owned, weight_local, local_t, n_local):
    """This rank's (N, 8) fp32 rows for the all-gather (columns: see _MAX ... _WSLICE)."""
    zeros = torch.zeros_like(mx)
    cols = [mx, logd, target_term,
            smooth_term if smooth_term is not None else zeros,
            s_wy if s_wy is not None else zeros,
            owned.to(mx.dtype) if owned is not None else torch.ones_like(mx)]
    if weight_local is not None and owned is not None:
        cols.append(weight_local.to(mx.dtype).gather(0, local_t.clamp(min=0)) * owned)
    else:
        cols.append(torch.ones_like(mx))
    W_r = weight_local.sum() if weight_local is not None else float(n_local)
    cols.append(torch.ones_like(mx) * W_r)
    return torch.stack(cols, dim=1)


def _global_coefficients(gathered, prob_target, target2, ignore_index, has_weight, n_global,
                         reduction, label_smoothing, z_loss):
    """-> per-row loss, m, log d, dlse, alpha, beta and the mean-of-nothing term, all global."""
    m, log_d, target_term, smooth_term, s_wy, w_target, W = _combine(gathered, prob_target)
    if prob_target:
        valid = rho = torch.ones_like(m)
    else:
        valid = (target2.long() != ignore_index).to(m.dtype)
        rho = w_target * valid if has_weight else valid
    alpha, beta, zeta, nan_if_empty = _coefficients(rho, valid, n_global, reduction,
                                                    label_smoothing, z_loss)
    loss, dlse = _launch_linear.compose_rows(m + log_d, target_term, smooth_term, alpha, beta,
                                             zeta, W, s_wy if prob_target else None)
    if nan_if_empty is None:
        nan_if_empty = torch.zeros((), dtype=m.dtype, device=m.device)
    return loss, m, log_d, dlse, alpha, beta, nan_if_empty


# ----------------------------------------------------------------------------
# cross_entropy over vocabulary-sharded logits
# ----------------------------------------------------------------------------

class ShardedCrossEntropyFunction(torch.autograd.Function):
    """(N, V_local) logits -> per-row loss (N,) and global lse (N,), equal on every rank."""

    @staticmethod
    def forward(ctx, logits, target2, weight_local, prob_target, softcap, ignore_index, reduction,
                label_smoothing, z_loss, inplace, group, api):
        n_rows, n_local = logits.shape
        offset, n_global = slice_bounds(group, n_local, logits.device)
        local_t, owned = _local_targets(target2, prob_target, offset, n_local, n_global,
                                        ignore_index, api)
        need_smooth = label_smoothing > 0
        row_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ones = torch.ones(n_rows, dtype=row_dtype, device=logits.device)
        loss_r, mx_r, logd_r, dlse_r = (torch.empty_like(ones) for _ in range(4))
        stats = torch.empty(n_rows, 3, dtype=row_dtype, device=logits.device)
        kernel_weight = weight_local if (prob_target or need_smooth) else None
        if n_local > 0:
            _launch.forward_into(logits, local_t, kernel_weight, ones, ones if need_smooth else None,
                                 None, loss_r, mx_r, logd_r, dlse_r, None, prob_target, softcap,
                                 stats)
        else:  # an empty slice holds no probability mass
            mx_r.zero_()
            logd_r.fill_(float("-inf"))
            stats.zero_()
        local = _local_stats(mx_r, logd_r, stats[:, 0], stats[:, 1] if need_smooth else None,
                             stats[:, 2] if prob_target else None, owned, weight_local, local_t,
                             n_local)
        gathered = _gather_rows(local, group)
        loss, mx, logd, dlse, alpha, beta, nan_if_empty = _global_coefficients(
            gathered, prob_target, target2, ignore_index, weight_local is not None, n_global,
            reduction, label_smoothing, z_loss)
        ctx.prob_target, ctx.softcap, ctx.inplace = prob_target, softcap, inplace
        ctx.save_for_backward(logits, local_t, kernel_weight, mx, logd, dlse, alpha, beta)
        lse = mx + logd
        ctx.mark_non_differentiable(lse, nan_if_empty)
        return loss, lse, nan_if_empty

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_nan):
        logits, local_t, weight, mx, logd, dlse, alpha, beta = ctx.saved_tensors
        g = grad_loss.to(dlse.dtype)
        args = (local_t, weight, mx, logd, g * dlse, g * alpha, g * beta if beta is not None else None,
                ctx.prob_target, ctx.softcap)
        if logits.shape[1] == 0:
            grad = torch.zeros_like(logits)
        elif ctx.inplace:
            _ops.bwd_(logits, *args)
            grad = logits
        else:
            grad = _ops.bwd(logits, *args)
        return (grad,) + (None,) * 11


def sharded_cross_entropy(logits2, target2, weight_local, prob_target, softcap, ignore_index,
                          reduction, label_smoothing, z_loss, inplace, group,
                          api="cross_entropy"):
    """-> (loss_rows, lse, nan_if_empty); see `softmax_ce.cross_entropy(process_group=...)`."""
    return ShardedCrossEntropyFunction.apply(
        logits2, target2, weight_local, prob_target, softcap, ignore_index, reduction,
        float(label_smoothing), float(z_loss), inplace, group, api)


# ----------------------------------------------------------------------------
# linear_cross_entropy with a vocabulary-sharded LM head
# ----------------------------------------------------------------------------

class ShardedLinearCrossEntropyFunction(torch.autograd.Function):
    """x (N, D) replicated, weight (V_local, D), bias (V_local,) -> per-row loss (N,)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target2, class_weight_local, softcap, ignore_index,
                reduction, label_smoothing, z_loss, group, api):
        n_local = weight.shape[0]
        offset, n_global = slice_bounds(group, n_local, x.device)
        local_t, owned = _local_targets(target2, False, offset, n_local, n_global, ignore_index,
                                        api)
        need_smooth = label_smoothing > 0
        cw = class_weight_local if need_smooth else None
        if n_local > 0:
            mx_r, logd_r, target_term, smooth_term = _launch_linear.stats(
                x, weight, bias, local_t, cw, need_smooth, softcap)
        else:  # an empty slice holds no probability mass
            row_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            mx_r = torch.zeros(x.shape[0], dtype=row_dtype, device=x.device)
            logd_r = torch.full_like(mx_r, float("-inf"))
            target_term = torch.zeros_like(mx_r)
            smooth_term = torch.zeros_like(mx_r) if need_smooth else None
        local = _local_stats(mx_r, logd_r, target_term, smooth_term, None, owned,
                             class_weight_local, local_t, n_local)
        gathered = _gather_rows(local, group)
        loss, mx, logd, dlse, alpha, beta, nan_if_empty = _global_coefficients(
            gathered, False, target2, ignore_index, class_weight_local is not None, n_global,
            reduction, label_smoothing, z_loss)
        ctx.softcap, ctx.group = softcap, group
        ctx.save_for_backward(x, weight, bias, local_t, cw, mx, logd, dlse, alpha, beta)
        ctx.mark_non_differentiable(nan_if_empty)
        return loss, nan_if_empty

    @staticmethod
    def backward(ctx, grad_loss, grad_nan):
        x, weight, bias, local_t, cw, mx, logd, dlse, alpha, beta = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g = grad_loss.to(dlse.dtype)
        if weight.shape[0] > 0:
            dx, dw, db = _ops.lce_bwd(x, weight, bias, local_t, cw, mx, logd, g * dlse, g * alpha,
                                      g * beta if beta is not None else None, ctx.softcap,
                                      need_dx, need_dw, need_db and bias is not None)
        else:
            dx = torch.zeros(x.shape, dtype=dlse.dtype, device=x.device)
            dw = torch.zeros(weight.shape, dtype=dlse.dtype, device=x.device)
            db = torch.zeros(weight.shape[:1], dtype=dlse.dtype, device=x.device)
        if need_dx:
            # the replicated hidden states feed every rank's slice: sum the partial gradients
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dx.to(x.dtype) if need_dx else None,
                dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if need_db and bias is not None else None,
                None, None, None, None, None, None, None, None, None)
