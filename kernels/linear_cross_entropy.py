"""Fused linear cross-entropy: the LM head matmul and the loss in one kernel, logits never written.

With hidden states x (N, D), head weight W (V, D) and bias b (V), each program
computes one (BLOCK_N, BLOCK_V) tile of z = x W^T + b in registers (a matmul over
D in steps of BLOCK_D) and consumes it on chip:

forward (lce_fwd_kernel), per tile, after the optional softcap and temperature
z' = c*tanh(z/c) / T:
    tile max m_t and sum-exp d_t per row, folded into the row's running (m, d)
        under a per-row-block lock:  d <- d e^(m - m') + d_t e^(m_t - m')
    z'_target, written by the one tile that holds the row's target
    sum_c w_c z'_c (label smoothing), accumulated atomically
  -> lse = m + log d; the host turns (lse, z'_t, sum w z') into the loss with the
     same per-row coefficients as the plain cross-entropy (see cross_entropy.py).

backward (lce_bwd_kernel): the tile is recomputed, and with s = exp(z' - lse)
    G   = (s_coef * s - alpha * onehot(t) - beta * w) * sech^2(z/c)     (BLOCK_N, BLOCK_V)
    dx += G  @ W_tile        atomically into an fp32 (N, D) buffer
    dW += G^T @ x_tile       atomically into an fp32 (V, D) buffer
    db += sum_rows G         atomically into an fp32 (V,) buffer
Every accumulating atomic is relaxed (sem="relaxed"): the sums are read only after
the kernel ends, and Triton's default acq_rel ordering would put a GPU-wide fence
(MEMBAR.ALL.GPU) and a cache invalidation around each of them, 16 per D-step.  Only
the forward's row-block lock keeps acquire/release ordering, which it needs.
G is rounded to the input dtype for the two tensor-core matmuls (as the unfused
bf16 path rounds the logits' gradient); every accumulation is fp32.

Memory beyond the inputs: O(N) row statistics and locks, plus the fp32 gradient
buffers, which have the shapes of x, W and b.  No N x V tensor exists.

FLOPs: the forward is one matmul (2 N V D), the backward recomputes it and does two
more (6 N V D in all); the three-matmul floor of an unfused step is 6 N V D.

Layer: kernels; imports _online only.  Launched by softmax_ce._triton_path.
"""

import triton
import triton.language as tl

from ._online import softcap_slope


# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) per kernel and input class.  Each
# one was compiled for sm_90 with Triton 3.6 and 3.9 by perf/compile_report.py (the CSVs
# are in perf/results/static-sm90/) and kept only if it fits one block's shared memory
# and its plain variants use no local memory (with every option on, some bf16 backward
# tiles keep a 16-32 byte stack); e.g. the backward's 128x256 and 256x128 tiles need 273
# KiB of shared memory (the limit is 227 KiB), and 128x128x32 with 4 warps spills.
# 16-bit inputs run the tiles' matmuls on the tensor cores (wgmma); fp32 inputs without
# TF32 on FMA units, whose accumulators live in registers: smaller tiles.
_TILES = {
    ("fwd", "tensor_core"): [(128, 128, 64, 8, 3), (64, 256, 64, 8, 4), (64, 128, 64, 4, 4)],
    ("bwd", "tensor_core"): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 2), (64, 128, 64, 8, 3),
                             (128, 128, 32, 8, 3), (64, 64, 64, 4, 3)],
    ("fwd", "fp32"): [(64, 64, 32, 8, 2), (64, 64, 16, 4, 2), (32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    ("bwd", "fp32"): [(64, 64, 32, 8, 2), (64, 64, 16, 4, 2), (32, 32, 32, 4, 2)],
}


def _input_class(dtype) -> str:
    return "fp32" if "float32" in str(dtype) else "tensor_core"


def lce_configs(kernel: str = "fwd", dtype=None):
    """Tile configs of lce_fwd_kernel ("fwd") or lce_bwd_kernel ("bwd") for inputs of
    `dtype` (a torch or Triton dtype); every input class's configs when dtype is None."""
    classes = ("tensor_core", "fp32") if dtype is None else (_input_class(dtype),)
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": 8},
                      num_warps=nw, num_stages=ns)
        for c in classes for bn, bv, bd, nw, ns in _TILES[(kernel, c)]
    ]


def _prune_to_dtype(kernel: str):
    """triton.autotune's early_config_prune: only the configs for the inputs' dtype."""
    def prune(configs, named_args, **kwargs):
        keep = {repr(c.all_kwargs()) for c in lce_configs(kernel, named_args["x_ptr"].dtype)}
        return [c for c in configs if repr(c.all_kwargs()) in keep]
    return prune


def lce_interpreter_config(n_rows: int, n_vocab: int, dim: int):
    # Big tiles: the interpreter pays per program and per op, not per element.
    return dict(
        BLOCK_N=max(16, min(128, triton.next_power_of_2(n_rows))),
        BLOCK_V=max(16, min(1024, triton.next_power_of_2(n_vocab))),
        BLOCK_D=max(16, min(256, triton.next_power_of_2(dim))),
        GROUP_N=8,
    )


@triton.jit
def _tile_coords(n_rows, n_vocab, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 GROUP_N: tl.constexpr):
    """This program's tile: its row and vocabulary blocks, row and column indices (int64)
    and masks.

    Grouped launch order: GROUP_N row blocks sweep the vocabulary together, so a tile of
    W stays in L2 while those row blocks use it."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n_rows, BLOCK_N)
    num_pid_v = tl.cdiv(n_vocab, BLOCK_V)
    per_group = GROUP_N * num_pid_v
    group = pid // per_group
    first_n = group * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    vcols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    return pid_n, pid_v, rows, vcols, rows < n_rows, vcols < n_vocab


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, bias_ptr, rows, vcols, row_mask, col_mask, dim,
    stride_x_row, stride_x_col, stride_w_row, stride_w_col, softcap, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """z'' = softcap(z) / T for one tile in fp32 (padding columns -inf), and
    dz'/dz = sech^2(z/c) for the chain rule (see _online.softcap_slope; the caller
    multiplies the gradient by 1 / T, 1.0 without a temperature, as _online.transform)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_D)
    for k0 in range(0, dim, BLOCK_D):
        k = k0 + ks
        k_mask = k < dim
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + k[None, :] * stride_x_col,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + vcols[:, None] * stride_w_row + k[None, :] * stride_w_col,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST_DOT:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + vcols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    slope = acc  # placeholder of the right type when there is no softcap
    if HAS_SOFTCAP:
        acc, slope = softcap_slope(acc, softcap)
    z = tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))
    return z, slope


@triton.jit
def lce_fwd_kernel(
    # pointers
    x_ptr,            # (N, D) hidden states
    w_ptr,            # (V, D) head weight
    bias_ptr,         # (V,) head bias                          [HAS_BIAS]
    target_ptr,       # (N,) class indices
    cw_ptr,           # (V,) fp32 class weights                [HAS_CLASS_WEIGHT]
    row_max_ptr,            # (N,) fp32 in/out: running max, -inf on entry
    sum_exp_ptr,            # (N,) fp32 in/out: running sum-exp, 0 on entry
    zt_ptr,           # (N,) fp32 out: z'_target
    swz_ptr,          # (N,) fp32 in/out: sum w z', 0 on entry  [HAS_SMOOTHING]
    lock_ptr,         # (cdiv(N, BLOCK_N),) int32 zeros: one lock per row block
    # sizes
    n_rows, n_vocab, dim,
    # strides (elements)
    stride_x_row, stride_x_col, stride_w_row, stride_w_col, stride_target,
    # runtime scalars
    softcap,
    inv_temp,         # fp32, 1 / temperature (1.0 without one)
    # compile-time constants
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" for fp32 inputs (torch's default), "tf32" otherwise
    UPCAST_DOT: tl.constexpr,      # interpreter only: its tl.dot multiplies bf16 bit patterns
):
    pid_n, pid_v, rows, vcols, row_mask, col_mask = _tile_coords(n_rows, n_vocab, BLOCK_N,
                                                                 BLOCK_V, GROUP_N)

    z, slope = _logits_tile(x_ptr, w_ptr, bias_ptr, rows, vcols, row_mask, col_mask, dim,
                         stride_x_row, stride_x_col, stride_w_row, stride_w_col, softcap, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION,
                         UPCAST_DOT)

    # the target logit: exactly one tile of the row's sweep holds it
    target = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=-1).to(tl.int64)
    hit = (vcols[None, :] == target[:, None]) & col_mask[None, :]
    z_t = tl.sum(tl.where(hit, z, 0.0), axis=1)
    mine = row_mask & (target >= pid_v * BLOCK_V) & (target < pid_v * BLOCK_V + BLOCK_V)
    tl.store(zt_ptr + rows, z_t, mask=mine)

    if HAS_SMOOTHING:
        zc = tl.where(col_mask[None, :], z, 0.0)
        if HAS_CLASS_WEIGHT:
            cw = tl.load(cw_ptr + vcols, mask=col_mask, other=0.0)
            zc = zc * cw[None, :]
        tl.atomic_add(swz_ptr + rows, tl.sum(zc, axis=1), mask=row_mask, sem="relaxed")

    # this tile's softmax statistics per row
    m_t = tl.max(z, axis=1)
    shift_t = tl.where(m_t == float("-inf"), 0.0, m_t)
    d_t = tl.sum(tl.exp(z - shift_t[:, None]), axis=1)

    # fold them into the row's running (m, d); the lock serialises the tiles of a
    # row block (the pattern of Triton's layer-norm backward tutorial)
    # (acquire on taking it, release on handing it back: the running (m, d) written
    # under it is then visible to the next holder; no full acq_rel fence pair each way)
    lock = lock_ptr + pid_n
    while tl.atomic_cas(lock, 0, 1, sem="acquire") == 1:
        pass
    m = tl.load(row_max_ptr + rows, mask=row_mask, other=float("-inf"))
    d = tl.load(sum_exp_ptr + rows, mask=row_mask, other=0.0)
    m_new = tl.maximum(m, m_t)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - shift) + d_t * tl.exp(m_t - shift)
    tl.store(row_max_ptr + rows, m_new, mask=row_mask)
    tl.store(sum_exp_ptr + rows, d, mask=row_mask)
    tl.debug_barrier()
    tl.atomic_xchg(lock, 0, sem="release")


@triton.jit
def lce_bwd_kernel(
    # pointers
    x_ptr,            # (N, D) hidden states
    w_ptr,            # (V, D) head weight
    bias_ptr,         # (V,) head bias                          [HAS_BIAS]
    target_ptr,       # (N,) class indices
    cw_ptr,           # (V,) fp32 class weights                [HAS_CLASS_WEIGHT]
    row_max_ptr,          # (N,) fp32 row max m from the forward
    log_d_ptr,         # (N,) fp32 log d from the forward (lse = m + log d, kept apart)
    dlse_ptr,       # (N,) fp32 grad_out * dloss/dlse
    alpha_ptr,        # (N,) fp32 grad_out * alpha
    beta_ptr,         # (N,) fp32 grad_out * beta               [HAS_SMOOTHING]
    dx_ptr,           # (N, D) fp32 accumulator, zeros on entry [COMPUTE_DX]
    dw_ptr,           # (V, D) fp32 accumulator, zeros on entry [COMPUTE_DW]
    db_ptr,           # (V,) fp32 accumulator, zeros on entry   [COMPUTE_DB]
    # sizes
    n_rows, n_vocab, dim,
    # strides (elements); the accumulators are contiguous
    stride_x_row, stride_x_col, stride_w_row, stride_w_col, stride_target,
    # runtime scalars
    softcap,
    inv_temp,         # fp32, 1 / temperature (1.0 without one)
    filter_eps,       # fp32, read when HAS_FILTER
    # compile-time constants
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_FILTER: tl.constexpr,      # skip tiles whose |G| < filter_eps * max|dlse| (off: exact)
):
    pid_n, pid_v, rows, vcols, row_mask, col_mask = _tile_coords(n_rows, n_vocab, BLOCK_N,
                                                                 BLOCK_V, GROUP_N)

    z, slope = _logits_tile(x_ptr, w_ptr, bias_ptr, rows, vcols, row_mask, col_mask, dim,
                         stride_x_row, stride_x_col, stride_w_row, stride_w_col, softcap, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION,
                         UPCAST_DOT)

    row_max = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    log_d = tl.load(log_d_ptr + rows, mask=row_mask, other=0.0)
    dlse = tl.load(dlse_ptr + rows, mask=row_mask, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=-1).to(tl.int64)

    g = dlse[:, None] * tl.exp((z - row_max[:, None]) - log_d[:, None])
    g -= tl.where(vcols[None, :] == target[:, None], alpha[:, None], 0.0)
    if HAS_SMOOTHING:
        beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
        if HAS_CLASS_WEIGHT:
            cw = tl.load(cw_ptr + vcols, mask=col_mask, other=0.0)
            g -= beta[:, None] * cw[None, :]
        else:
            g -= beta[:, None]
    if HAS_SOFTCAP:
        g = g * slope
    g = tl.where(row_mask[:, None] & col_mask[None, :], g * inv_temp, 0.0)

    # Gradient filtering (CCE's idea, off by default): a tile in which every entry of G is
    # below filter_eps times the largest row coefficient (logits whose probability is
    # below filter_eps, no target among them, no smoothing mass) adds nothing measurable
    # to dx, dW, db; its two matmuls and all its atomics are skipped.
    keep = True
    if HAS_FILTER:
        g_max = tl.max(tl.max(tl.abs(g), axis=1), axis=0)
        keep = g_max >= filter_eps * tl.max(tl.abs(dlse), axis=0)
    if keep:
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + vcols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")

        g_lo = g.to(x_ptr.dtype.element_ty)
        if UPCAST_DOT:
            g_lo = g_lo.to(tl.float32)
        ks = tl.arange(0, BLOCK_D)
        for k0 in range(0, dim, BLOCK_D):
            k = k0 + ks
            k_mask = k < dim
            if COMPUTE_DX:
                w = tl.load(w_ptr + vcols[:, None] * stride_w_row + k[None, :] * stride_w_col,
                            mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    w = w.to(tl.float32)
                tl.atomic_add(dx_ptr + rows[:, None] * dim + k[None, :],
                              tl.dot(g_lo, w, input_precision=DOT_PRECISION),
                              mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
            if COMPUTE_DW:
                x = tl.load(x_ptr + rows[:, None] * stride_x_row + k[None, :] * stride_x_col,
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    x = x.to(tl.float32)
                tl.atomic_add(dw_ptr + vcols[:, None] * dim + k[None, :],
                              tl.dot(tl.trans(g_lo), x, input_precision=DOT_PRECISION),
                              mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


_KEY = ["n_vocab", "dim", "HAS_BIAS", "HAS_CLASS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP"]

# The forward accumulates into its outputs (running m, d, sum w z', locks), so
# tuning trials must start from the same state each time.
lce_fwd_tuned = triton.autotune(configs=lce_configs("fwd"), key=_KEY,
                                prune_configs_by={"early_config_prune": _prune_to_dtype("fwd")},
                                restore_value=["row_max_ptr", "sum_exp_ptr", "swz_ptr", "lock_ptr"])(lce_fwd_kernel)
lce_bwd_tuned = triton.autotune(configs=lce_configs("bwd"),
                                key=_KEY + ["COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB"],
                                prune_configs_by={"early_config_prune": _prune_to_dtype("bwd")},
                                reset_to_zero=["dx_ptr", "dw_ptr", "db_ptr"])(lce_bwd_kernel)
