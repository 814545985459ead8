"""The Triton back end: launchers that write into tensors the caller allocated.

Each launcher binds a kernel of softmax_ce.kernels to its tensors (pointers, strides,
the compile-time flags derived from them: VEC, GRAD_VEC, WIDE_COLS, ONE_TILE) and
launches it with the config softmax_ce.kernels.tuning picks, under the tensors' CUDA
device.  Under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1 when the kernels
were decorated) they run the same kernels with a fixed config.  Imports the kernels
only.
"""

import contextlib

import torch
from torch import Tensor

from .kernels import cross_entropy as K
from .kernels import linear_cross_entropy as KL
from .kernels import tuning

def device_guard(device: torch.device):
    """Triton launches on the current CUDA device's current stream: make that the
    tensors' device, so a model spread over several GPUs in one process launches each
    kernel where its tensors are, ordered with that device's stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

_PROBED = {}

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

def ce_forward(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse, grad, prob_target,
                softcap, stats=None, *, inv_temp=1.0, entropy=None, argmax=None, teacher=None,
                teacher_kl=False):
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
        WRITE_TOKEN_STATS=entropy is not None,
        TEACHER=teacher is not None,
        TEACHER_KL=teacher is not None and teacher_kl,
    )

    def launch_args(logits, target, alpha, beta, zeta, loss, row_max, log_d, dlse, grad, stats,
                    entropy, argmax, teacher):
        return (
            logits, target,
            weight if weight is not None else alpha,
            alpha,
            beta if beta is not None else alpha,
            zeta if zeta is not None else alpha,
            loss, row_max, log_d, dlse,
            grad if grad is not None else logits,
            stats if stats is not None else alpha,
            entropy if entropy is not None else alpha,
            argmax if argmax is not None else alpha,
            teacher if teacher is not None else alpha,
            n_cols,
            logits.stride(0), logits.stride(1),
            *_target_strides(target, prob_target),
            *(grad.stride() if grad is not None else (0, 0)),
            float(softcap) if softcap is not None else 1.0,
            float(inv_temp),
        )

    def probe():
        # the same launch on a few rows, out of place: a copy of those rows, a fresh
        # gradient with the same row offsets modulo 16 bytes (GRAD_VEC), fresh row outputs
        r = probe_rows(n_rows, n_cols)
        rows = [t[:r] if t is not None else None
                for t in (target, alpha, beta, zeta, loss, row_max, log_d, dlse, stats,
                          entropy, argmax, teacher)]
        rows = [t.clone() if t is not None else None for t in rows]
        return (lambda meta: (r,)), launch_args(logits[:r].clone(), rows[0], *rows[1:8],
                                                 torch.empty_like(logits[:r]), *rows[8:])

    inplace = grad is not None and grad.data_ptr() == logits.data_ptr()
    run_kernel("ce_fwd", K.ce_fwd_kernel, K.ce_fwd_tuned, lambda meta: (n_rows,),
               launch_args(logits, target, alpha, beta, zeta, loss, row_max, log_d, dlse, grad, stats,
                           entropy, argmax, teacher),
               flags, logits.device, n_cols, logits.dtype,
               dict(BLOCK_V=K.interpreter_block(n_cols), num_warps=4),
               probe=probe if inplace else None)

def ce_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad, prob_target, softcap,
                *, inv_temp=1.0, teacher=None, ent=None):
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
        TEACHER=teacher is not None,
        HAS_ENT_GRAD=ent is not None,
    )

    def launch_args(logits, target, row_max, log_d, dlse, alpha, beta, grad, teacher, ent):
        return (
            logits, target,
            weight if weight is not None else row_max,
            row_max, log_d, dlse, alpha,
            beta if beta is not None else row_max,
            grad,
            teacher if teacher is not None else row_max,
            ent if ent is not None else row_max,
            n_cols,
            logits.stride(0), logits.stride(1),
            *_target_strides(target, prob_target),
            grad.stride(0), grad.stride(1),
            float(softcap) if softcap is not None else 1.0,
            float(inv_temp),
        )

    def probe():
        r = probe_rows(n_rows, n_cols)
        rows = [t[:r] if t is not None else None
                for t in (target, row_max, log_d, dlse, alpha, beta)]
        extra = [t[:r] if t is not None else None for t in (teacher, ent)]
        return (lambda meta: (r,)), launch_args(logits[:r].clone(), *rows,
                                                 torch.empty_like(logits[:r]), *extra)

    inplace = grad.data_ptr() == logits.data_ptr()
    run_kernel("ce_bwd", K.ce_bwd_kernel, K.ce_bwd_tuned, lambda meta: (n_rows,),
               launch_args(logits, target, row_max, log_d, dlse, alpha, beta, grad, teacher, ent),
               flags, logits.device, n_cols, logits.dtype,
               dict(BLOCK_V=K.interpreter_block(n_cols), num_warps=4),
               probe=probe if inplace else None)

def ce_scale(grad, scale):
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

def _dot_precision(x: Tensor) -> str:
    # torch runs fp32 matmuls in full precision unless the user allows tf32
    return "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"

def _upcast_dot(x: Tensor) -> bool:
    # Triton's interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bit
    # patterns (triton-lang/triton#11584); the GPU path never upcasts.
    return K.interpreting() and x.dtype != torch.float32

def _grid(n_rows, n_vocab):
    return lambda meta: (triton_cdiv(n_rows, meta["BLOCK_N"]) * triton_cdiv(n_vocab, meta["BLOCK_V"]),)

def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

def lce_stats(x, w, b, target, class_weight, need_smooth, softcap, inv_temp=1.0):
    n_rows, dim = x.shape
    n_vocab = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    m = torch.full((n_rows,), float("-inf"), **f32)
    d = torch.zeros(n_rows, **f32)
    z_t = torch.zeros(n_rows, **f32)
    swz = torch.zeros(n_rows, **f32)
    locks = torch.zeros(triton_cdiv(n_rows, 16), dtype=torch.int32, device=x.device)  # BLOCK_N >= 16
    args = (x, w, b if b is not None else m, target,
            class_weight if class_weight is not None else m,
            m, d, z_t, swz, locks, n_rows, n_vocab, dim,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), target.stride(0),
            float(softcap) if softcap is not None else 1.0, float(inv_temp))
    flags = dict(HAS_BIAS=b is not None, HAS_CLASS_WEIGHT=class_weight is not None,
                 HAS_SMOOTHING=need_smooth, HAS_SOFTCAP=softcap is not None,
                 DOT_PRECISION=_dot_precision(x), UPCAST_DOT=_upcast_dot(x))
    run_kernel("lce_fwd", KL.lce_fwd_kernel, KL.lce_fwd_tuned, _grid(n_rows, n_vocab), args, flags,
               x.device, n_vocab, x.dtype, KL.lce_interpreter_config(n_rows, n_vocab, dim))
    row_max = torch.where(m == float("-inf"), 0.0, m)
    log_d = d.log()
    target_term = (row_max - z_t) + log_d  # exact for a confident row whose target is the max
    W = class_weight.sum() if class_weight is not None else float(n_vocab)
    smooth_term = W * (row_max + log_d) - swz if need_smooth else None
    return row_max, log_d, target_term, smooth_term

def lce_backward(x, w, b, target, class_weight, row_max, log_d, dlse, alpha, beta, softcap,
                need_dx, need_dw, need_db, filter_eps=0.0, inv_temp=1.0):
    n_rows, dim = x.shape
    n_vocab = w.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(n_rows, dim, **f32) if need_dx else row_max.new_empty(0)
    dw = torch.zeros(n_vocab, dim, **f32) if need_dw else row_max.new_empty(0)
    db = torch.zeros(n_vocab, **f32) if need_db else row_max.new_empty(0)
    args = (x, w, b if b is not None else row_max, target,
            class_weight if class_weight is not None else row_max,
            row_max, log_d, dlse, alpha, beta if beta is not None else row_max,
            dx, dw, db, n_rows, n_vocab, dim,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), target.stride(0),
            float(softcap) if softcap is not None else 1.0, float(inv_temp), float(filter_eps))
    flags = dict(HAS_BIAS=b is not None, HAS_CLASS_WEIGHT=class_weight is not None,
                 HAS_SMOOTHING=beta is not None, HAS_SOFTCAP=softcap is not None,
                 COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                 HAS_FILTER=filter_eps > 0,
                 DOT_PRECISION=_dot_precision(x), UPCAST_DOT=_upcast_dot(x))
    run_kernel("lce_bwd", KL.lce_bwd_kernel, KL.lce_bwd_tuned, _grid(n_rows, n_vocab), args, flags,
               x.device, n_vocab, x.dtype, KL.lce_interpreter_config(n_rows, n_vocab, dim))
    return dx, dw, db
