"""Vocabulary-parallel cross-entropy over torch.distributed (tensor-parallel LM heads).

Layer: beside the public functions, built on the layers below them (_rows, _ops,
_autograd), never on the public functions themselves.

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
received, plus one row per call for the slice check below (Megatron's vocab-parallel loss uses three all-reduces of one value each:
max, target logit, sum-exp; 12 bytes sent and received per token, but three
latency-bound collectives instead of one).  The backward of `cross_entropy` needs no
communication: the forward saved the global lse and coefficients, so each rank writes
its slice of the gradient.  That of `linear_cross_entropy` all-reduces the fp32
gradient of the replicated hidden states (N x D), as the column-parallel LM head it
replaces would; nothing of size V ever crosses the wire.

The extended options (softmax_ce._extended) add columns to the same all-gather: the
slice's entropy, its argmax's raw value and global column (3 fp32 per token, for
return_entropy/argmax/accuracy; columns stay exact below 2**24 classes), the teacher's
slice max and log sum-exp (2 fp32 per token, for target_logits).  The global entropy is
that of the mixture of the slices' softmaxes, H = sum_r pi_r (H_r + delta_r) with
pi_r = exp(-delta_r); a teacher's soft target is y = pi_r^t y_r on slice r, so its
cross-entropy is sum_r pi_r^t (term_r + delta_r) (minus delta_r^t for KL).  The
backward still communicates nothing for cross_entropy.

Slice offsets come from one all-gather of slice sizes the first time a group is seen,
then from a cache.  The statistics all-gather carries one extra row in which every rank
says whether the cached sizes still match its slice, so a changed partition is seen by
all ranks at once: on CPU they all redo the step with fresh sizes, on CUDA a
device-side assert fires (deciding to redo would need a host synchronisation).
"""

from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _extended, _ops
from ._autograd import linear_recompute_grads, recompute_grad
from ._rows import check_target_range, coefficients, compose_rows, fail

# columns of the gathered per-row statistics
_ROW_MAX, _LOG_D, _TARGET, _SMOOTH, _SWY, _OWNER, _TARGET_WEIGHT, _SLICE_WEIGHT = range(8)
N_STATS = 8

# torch renamed all_gather_into_tensor to all_gather_single (2.13); accept either
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_sizes: Dict[int, List[int]] = {}


def _collective_device(group, fallback: torch.device) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" else torch.device("cpu")


def _gather_sizes(group, n_local: int, device: torch.device) -> List[int]:
    device = _collective_device(group, device)
    sizes = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    _all_gather(sizes, torch.full((1,), n_local, dtype=torch.int64, device=device), group=group)
    # a host synchronisation, but once per group: the sizes are cached by gather_statistics
    return sizes.tolist()


def _gather_rows(local: Tensor, group) -> Tensor:
    """(R, k) on each rank -> (world, R, k)."""
    world = dist.get_world_size(group)
    # the concatenated form (world * R, k): the one every backend accepts
    out = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
    _all_gather(out, local.contiguous(), group=group)
    return out.view((world,) + tuple(local.shape))


def gather_statistics(group, n_local: int, device: torch.device,
                      compute: Callable[[int, int], Tensor]) -> Tuple[Tensor, int, int]:
    """The forward's one collective: every rank's `compute(offset, n_global)` rows.

    -> (gathered (world, N, k), this rank's offset, the global vocabulary size).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    key = id(group)
    for fresh in (False, True):
        if fresh or key not in _sizes:
            _sizes[key] = _gather_sizes(group, n_local, device)
        sizes = _sizes[key]
        ok = len(sizes) == world and sizes[rank] == n_local
        offset, n_global = (sum(sizes[:rank]), sum(sizes)) if ok else (0, n_local)
        local = compute(offset, n_global)
        flag = local.new_zeros(1, local.shape[1])
        flag[0, 0] = 1.0 if ok else 0.0
        gathered = _gather_rows(torch.cat([local, flag]), group)
        all_ok = (gathered[:, -1, 0] == 1).all()
        if local.is_cuda:
            torch._assert_async(all_ok, "softmax_ce.distributed: the vocabulary slice sizes of "
                                        "this process group changed; call "
                                        "softmax_ce.distributed.forget_slices() on every rank")
            return gathered[:, :-1], offset, n_global
        if bool(all_ok):
            return gathered[:, :-1], offset, n_global
    raise AssertionError("unreachable: fresh slice sizes always match")


def forget_slices() -> None:
    """Drop the cached slice sizes (every rank must call it, e.g. after re-partitioning)."""
    _sizes.clear()


def _check_targets(target2, ignore_index, n_global, api):
    """Class targets in [0, V) of the whole vocabulary, or ignore_index (as unsharded)."""
    valid = target2.long() != ignore_index  # int64: uint8 would wrap -100 to 156
    check_target_range(target2, valid, n_global, ignore_index, api)


def _local_targets(target2, offset, n_local, ignore_index):
    """This rank's view of class targets: the index in its slice, -1 where not owned."""
    valid = target2.long() != ignore_index
    local = target2.long() - offset
    owned = valid & (local >= 0) & (local < n_local)
    return torch.where(owned, local, -1), owned


def _slice_weight(weight, offset, n_local, n_global, dtype, device, api, name):
    """A full (V,) class-weight vector or this rank's slice -> this rank's slice."""
    if weight is None:
        return None
    if weight.dim() != 1 or weight.numel() not in (n_global, n_local):
        fail(RuntimeError, f"{name} must have {n_global} entries (every class) or {n_local} "
                            f"(this rank's slice), got {tuple(weight.shape)}", api)
    if weight.numel() == n_global:
        weight = weight[offset:offset + n_local]
    return weight.detach().to(device=device, dtype=dtype).contiguous()


def _mixture(log_d_r, m_r):
    """Global (m, log d) of slices' (m_r, log d_r), and each slice's share of the mass,
    pi_r = exp(lse_r - lse), and delta_r = lse - lse_r (0 for an empty slice).  A slice
    with no probability mass (empty, or all -inf) has log d_r = -inf."""
    empty = torch.isneginf(log_d_r)
    m = torch.where(empty, float("-inf"), m_r).amax(dim=0)
    m = torch.where(torch.isneginf(m), 0.0, m)
    log_d = torch.logsumexp(log_d_r + (m_r - m[None]), dim=0)
    delta = torch.where(empty, 0.0, (m[None] - m_r) + (log_d[None] - log_d_r))
    pi = torch.where(empty, 0.0, torch.exp(-delta))
    return m, log_d, pi, delta


def _combine(gathered: Tensor, prob_target: bool):
    """Global per-row (m, log d, target term, smoothing term, sum w y, w[t], W) from the slices.

    lse = m + log d with m = max_r m_r and log d = log sum_r d_r e^(m_r - m); the
    difference delta_r = lse - lse_r is formed as (m - m_r) + (log d - log d_r), never by
    subtracting two rounded lse values (rows near +-1e4 would lose ~1e-3 to that).
    """
    m, log_d, _, delta = _mixture(gathered[..., _LOG_D], gathered[..., _ROW_MAX])
    owner = gathered[..., _OWNER]
    if prob_target:
        target_term = (gathered[..., _TARGET] + gathered[..., _SWY] * delta).sum(0)
    else:
        target_term = torch.where(owner != 0, gathered[..., _TARGET] + delta, 0.0).sum(0)
    smooth_term = (gathered[..., _SMOOTH] + gathered[..., _SLICE_WEIGHT] * delta).sum(0)
    s_wy = gathered[..., _SWY].sum(0)
    w_target = (gathered[..., _TARGET_WEIGHT] * owner).sum(0)
    W = gathered[:, :1, _SLICE_WEIGHT].sum()  # the same in every row; :1 keeps N = 0 working
    return m, log_d, target_term, smooth_term, s_wy, w_target, W


def _local_stats(row_max, log_d, target_term, smooth_term, s_wy, owned, weight_local, local_t, n_local):
    """This rank's (N, 8) fp32 rows for the all-gather (columns: see _ROW_MAX ... _SLICE_WEIGHT)."""
    zeros = torch.zeros_like(row_max)
    cols = [row_max, log_d, target_term,
            smooth_term if smooth_term is not None else zeros,
            s_wy if s_wy is not None else zeros,
            owned.to(row_max.dtype) if owned is not None else torch.ones_like(row_max)]
    if weight_local is not None and owned is not None and n_local > 0:
        cols.append(weight_local.to(row_max.dtype).gather(0, local_t.clamp(min=0)) * owned)
    elif weight_local is not None and owned is not None:
        cols.append(zeros)  # an empty slice owns no target
    else:
        cols.append(torch.ones_like(row_max))
    W_r = weight_local.sum() if weight_local is not None else float(n_local)
    cols.append(torch.ones_like(row_max) * W_r)
    return torch.stack(cols, dim=1)


def _empty_slice_stats(n_rows, dtype, device, need_smooth):
    """m, log d, target and smoothing terms of a slice with no classes (no probability mass)."""
    row_max = torch.zeros(n_rows, dtype=dtype, device=device)
    return (row_max, torch.full_like(row_max, float("-inf")), torch.zeros_like(row_max),
            torch.zeros_like(row_max) if need_smooth else None)


def _combine_extended(gathered, ext, cols):
    """The extra columns of the extended options (softmax_ce._extended), combined:

    entropy:  H = sum_r pi_r (H_r + delta_r)   (the mixture of the slices' softmaxes)
    argmax:   the slice value torch.argmax picks (nan first, ties to the lowest rank, whose
              columns come first), and its global column
    teacher:  the teacher's global (max, log d) from its slices', and the target term
              sum_r pi_r^t (term_r + delta_r [- delta_r^t for KL]), pi^t the teacher's
              shares: y = pi_r^t y_r on slice r, and H(y) = sum_r pi_r^t (H_r^t + delta_r^t).
    -> dict of global per-row tensors."""
    out = {}
    _, _, pi, delta = _mixture(gathered[..., _LOG_D], gathered[..., _ROW_MAX])
    if ext.token_stats:
        h_r = gathered[..., cols["entropy"]]
        out["entropy"] = torch.where(pi > 0, pi * (h_r + delta), 0.0).sum(0)
        pick = torch.argmax(gathered[..., cols["argmax_value"]], dim=0, keepdim=True)
        out["argmax"] = gathered[..., cols["argmax_col"]].gather(0, pick)[0].round().long()
    if ext.teacher:
        t_m, t_ld, t_pi, t_delta = _mixture(gathered[..., cols["t_log_d"]],
                                            gathered[..., cols["t_max"]])
        term = gathered[..., _TARGET] + delta
        if ext.teacher_kl:
            term = term - t_delta
        out["target_term"] = torch.where(t_pi > 0, t_pi * term, 0.0).sum(0)
        out["teacher_rows"] = torch.stack([t_m, t_ld], dim=1)
    return out


def _global_coefficients(gathered, prob_target, target2, ignore_index, has_weight, n_global,
                         reduction, label_smoothing, z_loss, teacher_term=None, alpha_scale=1.0):
    """-> per-row loss, m, log d, dlse, alpha, beta and the mean-of-nothing term, all global.
    teacher_term: the combined target term of teacher logits (then sum y = 1); alpha_scale:
    distillation's T^2."""
    m, log_d, target_term, smooth_term, s_wy, w_target, W = _combine(gathered, prob_target)
    if teacher_term is not None:
        target_term, s_wy = teacher_term, torch.ones_like(m)
    if prob_target:
        valid = rho = torch.ones_like(m)
    else:
        valid = (target2.long() != ignore_index).to(m.dtype)
        rho = w_target * valid if has_weight else valid
    alpha, beta, zeta, nan_if_empty = coefficients(rho, valid, n_global, reduction,
                                                    label_smoothing, z_loss)
    if alpha_scale != 1.0:
        alpha = alpha * alpha_scale
    loss, dlse = compose_rows(m + log_d, target_term, smooth_term, alpha, beta,
                                             zeta, W, s_wy if prob_target else None)
    if nan_if_empty is None:
        nan_if_empty = torch.zeros((), dtype=m.dtype, device=m.device)
    return loss, m, log_d, dlse, alpha, beta, nan_if_empty


# ----------------------------------------------------------------------------
# cross_entropy over vocabulary-sharded logits
# ----------------------------------------------------------------------------

class ShardedCrossEntropyFunction(torch.autograd.Function):
    """(N, V_local) logits -> per-row loss (N,), global lse (N,), the mean-of-nothing term,
    and with the extended options (`ext`, a softmax_ce._extended.Extension or None) the
    global entropy (N,) and argmax (N,) (empty otherwise), equal on every rank."""

    @staticmethod
    def forward(ctx, logits, target2, weight, prob_target, softcap, ignore_index, reduction,
                label_smoothing, z_loss, inplace, group, api, ext=None):
        n_rows, n_local = logits.shape
        need_smooth = label_smoothing > 0
        row_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ctx.needs_target_grad = prob_target and ctx.needs_input_grad[1]
        if ctx.needs_target_grad:
            ctx.target_grad_logits = logits.detach().clone()
        kept = {}
        cols = {}

        def compute(offset, n_global):
            weight_local = _slice_weight(weight, offset, n_local, n_global, row_dtype,
                                         logits.device, api, "weight")
            if prob_target:
                local_t, owned = target2, None
            else:
                local_t, owned = _local_targets(target2, offset, n_local, ignore_index)
            kernel_weight = weight_local if (prob_target or need_smooth) else None
            extra = None
            if n_local > 0 and ext is not None:
                row_max_r, log_d_r, stats, h_r, am_r, t_rows = _extended.xfwd_stats(
                    logits, local_t, kernel_weight, need_smooth, prob_target, softcap,
                    ext.inv_temp, ext.token_stats, ext.teacher, ext.teacher_kl)
                extra = (h_r, am_r, t_rows)
            elif n_local > 0:
                row_max_r, log_d_r, stats = _ops.fwd_stats(logits, local_t, kernel_weight, need_smooth,
                                                     prob_target, softcap)
            else:
                stats = torch.zeros(n_rows, 3, dtype=row_dtype, device=logits.device)
                row_max_r, log_d_r, _, _ = _empty_slice_stats(n_rows, row_dtype, logits.device, False)
            kept.update(local_t=local_t, weight_local=weight_local, kernel_weight=kernel_weight)
            local = _local_stats(row_max_r, log_d_r, stats[:, 0], stats[:, 1] if need_smooth else None,
                                 stats[:, 2] if prob_target else None, owned, weight_local,
                                 local_t, n_local)
            if ext is None:
                return local
            return torch.cat([local, _extended_columns(ext, extra, logits, offset, row_max_r,
                                                       cols)], dim=1)

        gathered, _, n_global = gather_statistics(group, n_local, logits.device, compute)
        if not prob_target:
            _check_targets(target2, ignore_index, n_global, api)
        combined = _combine_extended(gathered, ext, cols) if ext is not None else {}
        loss, row_max, log_d, dlse, alpha, beta, nan_if_empty = _global_coefficients(
            gathered, prob_target, target2, ignore_index, weight is not None, n_global,
            reduction, label_smoothing, z_loss, combined.get("target_term"),
            ext.alpha_scale if ext is not None else 1.0)
        ctx.prob_target, ctx.softcap, ctx.inplace, ctx.ext = prob_target, softcap, inplace, ext
        entropy = combined.get("entropy", row_max.new_empty(0))
        argmax = combined.get("argmax", row_max.new_empty(0, dtype=torch.int64))
        teacher_rows = combined.get("teacher_rows")
        ctx.save_for_backward(logits, kept["local_t"], kept["kernel_weight"], row_max, log_d, dlse,
                              alpha, beta, entropy, teacher_rows)
        ctx.weight_local = kept["weight_local"]
        lse = row_max + log_d
        ctx.mark_non_differentiable(nan_if_empty, argmax)
        return loss, lse, nan_if_empty, entropy, argmax

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_nan, grad_entropy=None, grad_argmax=None):
        (logits, local_t, weight, row_max, log_d, dlse, alpha, beta, entropy,
         teacher_rows) = ctx.saved_tensors
        g = grad_loss.to(dlse.dtype)
        grad = grad_target = None
        ext = ctx.ext
        if ctx.needs_input_grad[0]:
            if logits.shape[1] == 0:
                grad = torch.zeros_like(logits)
            elif ext is not None:
                grad = _extended.recompute_grad(
                    logits, local_t, weight, row_max, log_d, dlse, alpha, beta, grad_loss,
                    grad_lse, grad_entropy if ext.token_stats else None, entropy,
                    ctx.prob_target, ctx.softcap, ext.inv_temp, teacher_rows, ctx.inplace)
            else:
                grad = recompute_grad(logits, local_t, weight, row_max, log_d, dlse, alpha, beta,
                                      grad_loss, grad_lse, ctx.prob_target, ctx.softcap,
                                      ctx.inplace)
        if ctx.needs_target_grad:
            # d loss / d y = alpha * w * (lse - z'), this rank's slice of it
            z = ctx.target_grad_logits.to(row_max.dtype)
            if ctx.softcap is not None:
                z = ctx.softcap * torch.tanh(z / ctx.softcap)
            grad_target = (g * alpha)[:, None] * ((row_max[:, None] - z) + log_d[:, None])
            if ctx.weight_local is not None:
                grad_target = grad_target * ctx.weight_local
        return (grad, grad_target) + (None,) * 11


def _extended_columns(ext, extra, logits, offset, row_max_r, cols, value=None):
    """This slice's extra gathered columns (see _combine_extended); `cols` receives where
    each sits in the gathered rows.  An empty slice (extra None) sends no mass: entropy 0,
    argmax value -inf, teacher log d -inf.  value: the raw logit at the slice's argmax
    when there are no logits to read it from (the linear loss)."""
    like = row_max_r
    n_rows = like.shape[0]
    new = []
    if ext.token_stats:
        if extra is not None:
            h_r, am_r, _ = extra
            if value is None:
                value = logits.gather(1, am_r[:, None])[:, 0]
            value = value.to(like.dtype)
            col = (am_r + offset).to(like.dtype)  # exact below 2**24 classes in fp32
        else:
            h_r = torch.zeros(n_rows, dtype=like.dtype, device=like.device)
            value = torch.full_like(h_r, float("-inf"))
            col = torch.full_like(h_r, float(offset))
        new += [("entropy", h_r), ("argmax_value", value), ("argmax_col", col)]
    if ext.teacher:
        if extra is not None:
            t_rows = extra[2]
            new += [("t_max", t_rows[:, 0]), ("t_log_d", t_rows[:, 1])]
        else:
            zeros = torch.zeros(n_rows, dtype=like.dtype, device=like.device)
            new += [("t_max", zeros), ("t_log_d", torch.full_like(zeros, float("-inf")))]
    for i, (name, _) in enumerate(new):
        cols[name] = N_STATS + i
    return torch.stack([t.to(like.dtype) for _, t in new], dim=1)


def sharded_cross_entropy(logits2, target2, weight, prob_target, softcap, ignore_index,
                          reduction, label_smoothing, z_loss, inplace, group,
                          api="cross_entropy", ext=None):
    """-> (loss_rows, lse, nan_if_empty, entropy, argmax); see
    `softmax_ce.cross_entropy(process_group=...)`.

    weight: the full (V,) class weights or this rank's slice, or None; ext: the extended
    options (softmax_ce._extended.Extension) or None."""
    return ShardedCrossEntropyFunction.apply(
        logits2, target2, weight, prob_target, softcap, ignore_index, reduction,
        float(label_smoothing), float(z_loss), inplace, group, api, ext)


# ----------------------------------------------------------------------------
# linear_cross_entropy with a vocabulary-sharded LM head
# ----------------------------------------------------------------------------

class ShardedLinearCrossEntropyFunction(torch.autograd.Function):
    """x (N, D) replicated, weight (V_local, D), bias (V_local,) -> per-row loss (N,), the
    global per-row lse (N,) and the mean-of-nothing term.

    Each rank runs the single-device design on its slice (params.impl): chunked, the
    slice's logits a chunk of rows at a time on the matmul library, or fused.  The
    forward only gathers statistics (the gradient needs the global lse, known after the
    all-gather), and the backward recomputes the slice's logits: 8 N V_local D FLOPs."""

    @staticmethod
    def forward(ctx, x, weight, bias, target2, class_weight, ignore_index, reduction,
                label_smoothing, z_loss, group, api, params):
        n_local = weight.shape[0]
        need_smooth = label_smoothing > 0
        row_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        chunk_rows = params.chunk_rows if params.impl == "chunked" else 0
        ext = _extended.Extension(token_stats=True) if params.token_stats else None
        kept = {}
        cols = {}

        def compute(offset, n_global):
            cw_local = _slice_weight(class_weight, offset, n_local, n_global, row_dtype,
                                     x.device, api, "weight")
            local_t, owned = _local_targets(target2, offset, n_local, ignore_index)
            cw = cw_local if need_smooth else None
            extra = None
            if n_local > 0:
                row_max_r, log_d_r, target_term, smooth_term, h_r, am_r = _ops.lce_stats(
                    x, weight, bias, local_t, cw, need_smooth, params.softcap, chunk_rows,
                    params.inv_temp, params.token_stats)
                smooth_term = smooth_term if need_smooth else None
                extra = (h_r, am_r, None)
            else:
                row_max_r, log_d_r, target_term, smooth_term = _empty_slice_stats(
                    x.shape[0], row_dtype, x.device, need_smooth)
            kept.update(local_t=local_t, cw=cw, has_weight=cw_local is not None)
            local = _local_stats(row_max_r, log_d_r, target_term, smooth_term, None, owned,
                                 cw_local, local_t, n_local)
            if ext is None:
                return local
            # the argmax's value: the slice's logit there, recomputed for those N rows only
            logit_at = None
            if extra is not None:
                w_rows = weight[am_r]
                logit_at = (x.to(row_dtype) * w_rows.to(row_dtype)).sum(-1)
                if bias is not None:
                    logit_at = logit_at + bias[am_r].to(row_dtype)
            return torch.cat([local, _extended_columns(ext, extra, None, offset, row_max_r, cols,
                                                       value=logit_at)], dim=1)

        gathered, _, n_global = gather_statistics(group, n_local, x.device, compute)
        _check_targets(target2, ignore_index, n_global, api)
        combined = _combine_extended(gathered, ext, cols) if ext is not None else {}
        loss, row_max, log_d, dlse, alpha, beta, nan_if_empty = _global_coefficients(
            gathered, False, target2, ignore_index, kept["has_weight"], n_global,
            reduction, label_smoothing, z_loss)
        ctx.params, ctx.group = params, group
        entropy = combined.get("entropy", row_max.new_empty(0))
        argmax = combined.get("argmax", row_max.new_empty(0, dtype=torch.int64))
        ctx.save_for_backward(x, weight, bias, kept["local_t"], kept["cw"], row_max, log_d, dlse,
                              alpha, beta, entropy)
        ctx.mark_non_differentiable(nan_if_empty, argmax)
        return loss, row_max + log_d, nan_if_empty, entropy, argmax

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_nan, grad_entropy=None, grad_argmax=None):
        x, weight, bias, local_t, cw, row_max, log_d, dlse, alpha, beta, entropy = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        if not ctx.params.token_stats:
            grad_entropy = None
        if weight.shape[0] > 0:
            dx, dw, db = linear_recompute_grads(ctx.params, x, weight, bias, local_t, cw, row_max,
                                                log_d, dlse, alpha, beta, grad_loss, grad_lse,
                                                need_dx, need_dw, need_db, grad_entropy, entropy)
        else:
            dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
            dw = torch.zeros(weight.shape, dtype=dlse.dtype, device=x.device)
            db = torch.zeros(weight.shape[:1], dtype=dlse.dtype, device=x.device)
        if need_dx:
            # the replicated hidden states feed every rank's slice: sum the partial gradients
            # (in fp32: bf16 partial sums would round at every rank)
            dx = dx.to(dlse.dtype)
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return (dx.to(x.dtype) if need_dx else None,
                dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if need_db else None,
                None, None, None, None, None, None, None, None, None)
