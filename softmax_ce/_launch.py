"""Launchers: write into tensors the caller allocated, never allocate logits-sized memory.

Each entry point dispatches to one of two implementations with the same semantics:

* the Triton kernels of `softmax_ce.kernels.cross_entropy`, for CUDA tensors and,
  under TRITON_INTERPRET=1, for CPU tensors (the interpreter runs the same kernels);
* a chunked PyTorch path for everything else (CPU without the interpreter, and
  float64 anywhere, which the fp32-accumulating kernels would not honour).  It walks
  the rows in chunks of at most CHUNK_ELEMENTS logits, so its temporaries stay a
  fixed size however large the logits are.

All row-level tensors (alpha, beta, zeta, loss, mx, logd, dlse, s_coef) are fp32
vectors of length n_rows (float64 on the float64 path); see the kernel file for
what each means.
"""

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .kernels import cross_entropy as K
from .kernels import tuning

# Rows per chunk of the PyTorch path: about 4M logits, so its few fp32
# temporaries (upcast chunk, exp, gradient) stay near 50 MB.
CHUNK_ELEMENTS = 1 << 22


def uses_triton(logits: Tensor) -> bool:
    if logits.dtype == torch.float64:
        return False
    if logits.is_cuda:
        return True
    return logits.device.type == "cpu" and K.interpreting()


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device's current stream: make that the
    tensors' device, so a model spread over several GPUs in one process launches each
    kernel where its tensors are, ordered with that device's stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# (kernel name, device, n_cols, dtype, flags) -> config found by autotuning a probe
_PROBED = {}

# Rows of the probe on which an in-place launch is tuned: about 64 MiB of bf16 logits
# at V = 128256, so tuning never allocates anything of the logits' size.
PROBE_ELEMENTS = 1 << 25


def probe_rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, PROBE_ELEMENTS // max(n_cols, 1)))


def _best_config(tuned) -> dict:
    best = tuned.best_config
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


def run_kernel(name, raw, tuned, grid, args, flags, device, n_cols, dtype, interpreter_config,
               probe=None):
    """Launch `raw` with the config tuning.config_for picks, or `tuned` (triton.autotune)
    when it picks none; under the interpreter, with `interpreter_config`.
    grid: meta-parameters -> launch grid.

    probe: for a launch that overwrites one of its inputs (in place), a function giving
    (grid, args) of the same problem on a few rows, out of place, in fresh buffers.
    Autotuning runs on that probe instead: triton.autotune would otherwise have to
    restore the overwritten logits-sized tensor before every trial (a clone of it, in the
    very mode that exists to save that memory, and copies inside the timed region).  The
    config it finds (the key holds n_cols, not n_rows) is then launched on the real
    tensors, once per process and key."""
    if K.interpreting():
        raw[grid(interpreter_config)](*args, **interpreter_config,
                                      **_one_tile(flags, n_cols, interpreter_config))
        return
    with device_guard(device):
        config = tuning.config_for(name, device, n_cols, dtype)
        if config is None:
            # autotuning: a ONE_TILE launch tunes over the tiles that hold its row only
            flags = _one_tile(flags, n_cols, dict(BLOCK_V=K.MAX_BLOCK_V))
            if probe is None:
                tuned[grid](*args, **flags)
                return
            key = (name, str(device), n_cols, dtype, tuple(sorted(flags.items())))
            config = _PROBED.get(key)
            if config is None:
                probe_grid, probe_args = probe()
                tuned[probe_grid](*probe_args, **flags)
                config = _PROBED[key] = _best_config(tuned)
        raw[grid(config)](*args, **config, **_one_tile(flags, n_cols, config))


def _one_tile(flags: dict, n_cols: int, config: dict) -> dict:
    """Resolve ce_fwd's ONE_TILE request (True: "read the row once if one tile holds it")
    against the tile the launch will use."""
    if not flags.get("ONE_TILE", False):
        return flags
    return dict(flags, ONE_TILE=n_cols <= config["BLOCK_V"])


def _target_strides(target: Tensor, prob_target: bool):
    return (target.stride(0), target.stride(1)) if prob_target else (target.stride(0), 0)


# ----------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------

def _fwd_triton(logits, target, weight, alpha, beta, zeta, loss, mx, logd, dlse, grad, prob_target,
                softcap, stats=None):
    n_rows, n_cols = logits.shape
    col_strides = [logits.stride(1)] + ([grad.stride(1)] if grad is not None else []) + \
        ([target.stride(1)] if prob_target else [])
    flags = dict(
        PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=beta is not None,
        HAS_ZLOSS=zeta is not None,
        HAS_SOFTCAP=softcap is not None,
        WRITE_GRAD=grad is not None,
        WRITE_STATS=stats is not None,
        VEC=K.vec_width(logits),
        GRAD_VEC=K.grad_vec_width(logits, grad),
        WIDE_COLS=K.wide_cols(n_cols, *col_strides),
        # the fused forward reads a row once when one tile holds it (run_kernel decides)
        ONE_TILE=grad is not None and n_cols <= K.MAX_BLOCK_V,
    )

    def launch_args(logits, target, alpha, beta, zeta, loss, mx, logd, dlse, grad, stats):
        return (
            logits, target,
            weight if weight is not None else alpha,
            alpha,
            beta if beta is not None else alpha,
            zeta if zeta is not None else alpha,
            loss, mx, logd, dlse,
            grad if grad is not None else logits,
            stats if stats is not None else alpha,
            n_cols,
            logits.stride(0), logits.stride(1),
            *_target_strides(target, prob_target),
            *(grad.stride() if grad is not None else (0, 0)),
            float(softcap) if softcap is not None else 1.0,
        )

    def probe():
        # the same launch on a few rows, out of place: a copy of those rows, a fresh
        # gradient with the same row offsets modulo 16 bytes (GRAD_VEC), fresh row outputs
        r = probe_rows(n_rows, n_cols)
        rows = [t[:r] if t is not None else None
                for t in (target, alpha, beta, zeta, loss, mx, logd, dlse, stats)]
        rows = [t.clone() if t is not None else None for t in rows]
        return (lambda meta: (r,)), launch_args(logits[:r].clone(), rows[0], *rows[1:8],
                                                 torch.empty_like(logits[:r]), rows[8])

    inplace = grad is not None and grad.data_ptr() == logits.data_ptr()
    run_kernel("ce_fwd", K.ce_fwd_kernel, K.ce_fwd_tuned, lambda meta: (n_rows,),
               launch_args(logits, target, alpha, beta, zeta, loss, mx, logd, dlse, grad, stats),
               flags, logits.device, n_cols, logits.dtype,
               dict(BLOCK_V=K.interpreter_block(n_cols), num_warps=4),
               probe=probe if inplace else None)


def _bwd_triton(logits, target, weight, mx, logd, s_coef, alpha, beta, grad, prob_target, softcap):
    n_rows, n_cols = logits.shape
    col_strides = [logits.stride(1), grad.stride(1)] + ([target.stride(1)] if prob_target else [])
    flags = dict(
        PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=beta is not None,
        HAS_SOFTCAP=softcap is not None,
        VEC=K.vec_width(logits),
        GRAD_VEC=K.grad_vec_width(logits, grad),
        WIDE_COLS=K.wide_cols(n_cols, *col_strides),
    )

    def launch_args(logits, target, mx, logd, s_coef, alpha, beta, grad):
        return (
            logits, target,
            weight if weight is not None else mx,
            mx, logd, s_coef, alpha,
            beta if beta is not None else mx,
            grad,
            n_cols,
            logits.stride(0), logits.stride(1),
            *_target_strides(target, prob_target),
            grad.stride(0), grad.stride(1),
            float(softcap) if softcap is not None else 1.0,
        )

    def probe():
        r = probe_rows(n_rows, n_cols)
        rows = [t[:r] if t is not None else None
                for t in (target, mx, logd, s_coef, alpha, beta)]
        return (lambda meta: (r,)), launch_args(logits[:r].clone(), *rows,
                                                 torch.empty_like(logits[:r]))

    inplace = grad.data_ptr() == logits.data_ptr()
    run_kernel("ce_bwd", K.ce_bwd_kernel, K.ce_bwd_tuned, lambda meta: (n_rows,),
               launch_args(logits, target, mx, logd, s_coef, alpha, beta, grad),
               flags, logits.device, n_cols, logits.dtype,
               dict(BLOCK_V=K.interpreter_block(n_cols), num_warps=4),
               probe=probe if inplace else None)


def _scale_triton(grad, scale):
    n_rows, n_cols = grad.shape

    def launch_args(grad, scale):
        return (grad, scale, n_cols, grad.stride(0), grad.stride(1), scale.stride(0))

    def probe():
        # the scale kernel always works in place: tune it on a copy of a few rows (its
        # autotuner restores that copy between trials, not the whole gradient)
        r = probe_rows(n_rows, n_cols)
        return (lambda meta: (r,)), launch_args(grad[:r].clone(), scale[:r])

    run_kernel("ce_scale", K.ce_scale_kernel, K.ce_scale_tuned, lambda meta: (n_rows,),
               launch_args(grad, scale),
               dict(VEC=K.vec_width(grad), WIDE_COLS=K.wide_cols(n_cols, grad.stride(1))),
               grad.device, n_cols, grad.dtype, dict(BLOCK_V=K.interpreter_block(n_cols), num_warps=4),
               probe=probe)


# ----------------------------------------------------------------------------
# Chunked PyTorch path: the same math, a bounded number of rows at a time
# ----------------------------------------------------------------------------

def _chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))


def _softcapped(z: Tensor, softcap, need_slope: bool = True):
    """z' and, for the chain rule, dz'/dz = sech^2(z / softcap) (None without a softcap).

    The slope is 4 e / (1 + e)^2 with e = exp(-2|u|), as in the kernels
    (_online.softcap_slope), never 1 - tanh^2, which cancels to 0 once |u| passes 9."""
    if softcap is None:
        return z, None
    u = z / softcap
    if not need_slope:
        return torch.tanh(u).mul_(softcap), None
    e = u.abs().mul_(-2.0).exp_()
    slope = e.mul(4.0).div_((e + 1.0).square_())
    return torch.tanh(u).mul_(softcap), slope


def _grad_chunk(z, slope, target, weight, shift, log_d, s_coef, alpha, beta, prob_target):
    """d loss / d z of a chunk; the same formula as kernels._online.grad_tile."""
    g = (z - shift[:, None]).sub_(log_d[:, None]).exp_().mul_(s_coef[:, None])
    if prob_target:
        y = target.to(z.dtype) * alpha[:, None]  # never in place: target is the user's
        if weight is not None:
            y = y * weight
        g.sub_(y)
    else:
        in_range = (target >= 0) & (target < z.shape[1])
        cols = torch.where(in_range, target, 0).long()[:, None]
        g.scatter_add_(1, cols, -torch.where(in_range, alpha, 0.0)[:, None].to(g.dtype))
    if beta is not None:
        g.sub_(beta[:, None] * (weight if weight is not None else 1.0))
    if slope is not None:
        g.mul_(slope)
    active = (s_coef != 0) | (alpha != 0)
    if beta is not None:
        active |= beta != 0
    return g.masked_fill_(~active[:, None], 0.0)


def _fwd_torch(logits, target, weight, alpha, beta, zeta, loss, mx, logd, dlse, grad, prob_target,
               softcap,
               stats=None):
    n_rows, n_cols = logits.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = weight.to(cdt) if weight is not None else None
    for rows in _chunks(n_rows, n_cols):
        z, slope = _softcapped(logits[rows].to(cdt), softcap, need_slope=grad is not None)
        a = alpha[rows].to(cdt)
        m = z.amax(dim=1)
        shift = torch.where(m == float("-inf"), 0.0, m)
        log_d = (z - shift[:, None]).exp_().sum(dim=1).log()
        lse_c = shift + log_d
        t = target[rows]
        s_wy = torch.zeros_like(lse_c)
        if prob_target:
            y = t.to(cdt)
            wy = y * w if w is not None else y
            logp = (z - shift[:, None]) - log_d[:, None]  # not z - lse: exact near +-1e4
            # y = 0 on a masked (-inf) logit contributes 0, not 0 * -inf
            target_term = -torch.where(wy != 0, wy * logp, 0.0).sum(dim=1)
            s_wy = wy.sum(dim=1)
            dlse_c = a * s_wy
        else:
            in_range = (t >= 0) & (t < n_cols)
            z_t = z.gather(1, torch.where(in_range, t, 0).long()[:, None])[:, 0]
            z_t = torch.where(in_range, z_t, shift)
            target_term = (shift - z_t) + log_d
            dlse_c = a.clone()
        loss_c = torch.where(a != 0, a * target_term, 0.0)
        smooth = torch.zeros_like(lse_c)
        if beta is not None:
            b = beta[rows].to(cdt)
            logp = (z - shift[:, None]) - log_d[:, None]
            W = w.sum() if w is not None else float(n_cols)
            smooth = -(logp * w).sum(dim=1) if w is not None else -logp.sum(dim=1)
            loss_c += torch.where(b != 0, b * smooth, 0.0)
            dlse_c += b * W
        if zeta is not None:
            zt = zeta[rows].to(cdt)
            loss_c += torch.where(zt != 0, zt * lse_c * lse_c, 0.0)
            dlse_c += 2.0 * zt * lse_c
        loss[rows] = loss_c
        mx[rows] = shift
        logd[rows] = log_d
        dlse[rows] = dlse_c
        if stats is not None:
            stats[rows] = torch.stack([target_term, smooth, s_wy], dim=1)
        if grad is not None:
            g = _grad_chunk(z, slope, t, w, shift, log_d, dlse_c, a,
                            beta[rows].to(cdt) if beta is not None else None, prob_target)
            grad[rows] = g  # after every read of this chunk: grad may alias logits
            del g  # so the next chunk's temporaries can take its place


def _bwd_torch(logits, target, weight, mx, logd, s_coef, alpha, beta, grad, prob_target, softcap):
    n_rows, n_cols = logits.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = weight.to(cdt) if weight is not None else None
    for rows in _chunks(n_rows, n_cols):
        z, slope = _softcapped(logits[rows].to(cdt), softcap)
        g = _grad_chunk(z, slope, target[rows], w, mx[rows].to(cdt), logd[rows].to(cdt),
                        s_coef[rows].to(cdt),
                        alpha[rows].to(cdt), beta[rows].to(cdt) if beta is not None else None,
                        prob_target)
        grad[rows] = g
        del g  # so the next chunk's temporaries can take its place


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def forward_into(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
                 beta: Optional[Tensor], zeta: Optional[Tensor],
                 loss: Tensor, mx: Tensor, logd: Tensor, dlse: Tensor, grad: Optional[Tensor],
                 prob_target: bool, softcap: Optional[float],
                 stats: Optional[Tensor] = None) -> None:
    """Per-row loss, row max m and log d (lse = m + log d, kept apart for precision) and
    d loss/d lse; with `grad`, also the gradient for grad_output = 1;
    with `stats` (n_rows, 3), the uncoefficiented terms: lse - z'_t (or sum w y (lse - z')),
    sum w (lse - z'), sum w y.

    logits (n_rows, n_cols); target (n_rows,) int or (n_rows, n_cols) float; grad may be logits.
    """
    if logits.shape[0] == 0:
        return
    impl = _fwd_triton if uses_triton(logits) else _fwd_torch
    impl(logits, target, weight, alpha, beta, zeta, loss, mx, logd, dlse, grad, prob_target, softcap,
         stats)


def backward_into(logits: Tensor, target: Tensor, weight: Optional[Tensor], mx: Tensor, logd: Tensor,
                  s_coef: Tensor, alpha: Tensor, beta: Optional[Tensor], grad: Tensor,
                  prob_target: bool, softcap: Optional[float]) -> None:
    """The gradient recomputed from the saved m and log d; coefficients hold grad_output."""
    if logits.shape[0] == 0:
        return
    impl = _bwd_triton if uses_triton(logits) else _bwd_torch
    impl(logits, target, weight, mx, logd, s_coef, alpha, beta, grad, prob_target, softcap)


def scale_(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i]; `scale` may be an expanded scalar (stride 0)."""
    if grad.shape[0] == 0:
        return
    if uses_triton(grad):
        _scale_triton(grad, scale)
    else:
        for rows in _chunks(*grad.shape):
            grad[rows] *= scale[rows, None].to(grad.dtype)
