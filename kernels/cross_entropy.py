"""Softmax cross-entropy over large vocabularies: forward, fused gradient, recompute backward.

Math, per row of logits z (n_cols = V classes), after the optional softcap
z' = softcap * tanh(z / softcap):

    lse  = log sum_c exp(z'_c)                       (online: m, d in fp32)
    loss = alpha * (lse - z'_t)                      class index t
         | alpha * (lse * sum(w*y) - sum(w*y*z'))    probability target y
         + beta  * (W * lse - sum(w*z'))             label smoothing, W = sum(w)
         + zeta  * lse^2                             z-loss
    dloss/dz' = dlse * softmax(z') - alpha * onehot(t) - beta * w   (or - alpha*w*y)
    dlse      = dloss/dlse = alpha (* sum(w*y)) + beta * W + 2 * zeta * lse

alpha, beta and zeta are per-row fp32 coefficients that the host computes on the
device: they carry the class weight of the target, ignore_index (0 for ignored
rows), label smoothing and the reduction's denominator.  The kernels never see
the reduction or the options as such, only these numbers, so one kernel serves
every combination torch accepts.

Bytes moved per logit element (b = bytes of the logits' dtype, 2 for bf16), counted
element by element under the interpreter by tests/test_safety.py::test_bytes_per_logit:

    ce_fwd_kernel, WRITE_GRAD=False   reads b                      (loss, lse: O(1) per row)
    ce_fwd_kernel, WRITE_GRAD=True    reads 2b, writes b           rows longer than BLOCK_V
                                      reads b,  writes b           ONE_TILE: n_cols <= BLOCK_V
    ce_bwd_kernel                     reads b, writes b            (recompute from m, log d)
    ce_scale_kernel                   reads b, writes b            (skipped when grad_output == 1)

The fused forward's second read of a long row is a second HBM read at LLM sizes, not an
L2 hit: the default launch keeps about 6 programs per SM, so 132 SMs have ~800 rows in
flight, 800 x 250 KB (V = 128256 bf16) = 200 MB against a 50-60 MB L2.  A row that fits
one tile (V <= 8192) stays in registers between the statistics and the gradient and is
read once.  So a training step costs 3b per element with the recompute strategy
(forward, then backward), and with the fused one 3b (grad_output == 1, the rescale is
skipped) or 5b (any other grad_output: loss scaling, gradient accumulation), 2b / 4b for
one-tile rows: recompute is the default because the usual step has a scaled grad_output.
Probability targets add one read of the target per pass.

The extended options (softmax_ce._extended): a temperature (z'' = softcap(z) / T, one
multiply per element), the entropy and argmax of each row (WRITE_TOKEN_STATS: a second
running sum, the tile's argmax; 4 + 8 bytes written per row) and the entropy's gradient
in the backward (HAS_ENT_GRAD: 8 bytes read per row) move no byte per logit element.
Teacher logits as the target (TEACHER) add one read of the teacher's row per pass (its
dtype's size: b_t in the forward, b_t again in the backward, where the soft target
exp(t / T - t_max - log t_d) is recomputed from 8 bytes per row the forward saved), as
probability targets do, but never write the teacher's probabilities.

Each kernel handles one row per program, walking it in tiles of BLOCK_V; row
offsets are int64 because n_rows * V passes 2**31 at LLM scale.  A row is walked
as a body that starts and ends on the 16-byte grid, in 16-byte vector accesses, and
an edge tile of the fewer than 2 * VEC elements around it (_online.row_split), so a
row of 50257 bf16 logits (not a multiple of 16 bytes) moves in the same 16-byte
accesses as one of 50304.

Layer: kernels; imports _online only.  Launched by softmax_ce._triton_path.
"""


import triton
import triton.language as tl

from ._online import (argmax_update, edge_cols, grad_tile, lanes, load_logits, log1p,
                      online_entropy_update, online_softmax_update, row_active, row_split,
                      to_store_dtype, transform, write_grad_row)


def interpreting() -> bool:
    """True when our kernels run through Triton's NumPy interpreter: Triton fixes that when
    it decorates a kernel, i.e. when this module is imported with TRITON_INTERPRET=1
    (INTERPRETED, set below the kernels).  Which back end a call takes is decided in
    softmax_ce._launch from this fact and the tensor, never from the environment later."""
    return INTERPRETED


# ----------------------------------------------------------------------------
# Tunable configurations.  The GPU path autotunes over these per (V, dtype,
# flags); the interpreter cannot autotune ("0 active drivers"), so it runs the
# single fixed config below, through the same launcher.
# ----------------------------------------------------------------------------

MAX_BLOCK_V = 8192  # the largest tile of fwd_configs: rows up to it can be ONE_TILE


def one_tile_prune(configs, named_args, **kwargs):
    """triton.autotune's early_config_prune for ce_fwd: a ONE_TILE launch needs a tile
    that holds the whole row."""
    if not kwargs.get("ONE_TILE", False):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_V"] >= named_args["n_cols"]]


def fwd_configs():
    """Configs for ce_fwd_kernel and ce_bwd_kernel: a streaming loop over one row.

    No num_stages: the row loop carries its running statistics from tile to tile, so
    Triton does not software-pipeline it; for sm_90 the binaries of stages 1, 2 and 3
    are identical in every (kernel, variant, dtype, V, BLOCK_V, warps) group of the
    compile report (perf/results/static-sm90/compile-*.csv), so tuning over them only
    tripled the first call's compile time."""
    return [
        triton.Config({"BLOCK_V": bv}, num_warps=nw)
        for bv in (1024, 2048, 4096, 8192)
        for nw in (4, 8, 16)
        if bv // (32 * nw) >= 4  # at least 4 elements per thread per tile
    ]


def bwd_configs():
    return fwd_configs()


def scale_configs():
    return [triton.Config({"BLOCK_V": bv}, num_warps=nw) for bv in (2048, 4096, 8192) for nw in (4, 8)]


def vec_width(t) -> int:
    """The kernels' VEC for a 2-D tensor: elements per 16 bytes when its columns are
    contiguous (8 for bf16, 4 for fp32), else 1 (no vector accesses)."""
    return 16 // t.element_size() if t.stride(1) == 1 or t.shape[1] <= 1 else 1


def grad_vec_width(logits, grad) -> int:
    """GRAD_VEC: the logits' VEC when the gradient's rows start at the same offset modulo
    VEC as the logits' rows (always for a contiguous pair, and in place), else 1.  The
    kernels split each row where the logits cross the 16-byte grid, so the gradient's
    vector stores need the same crossing points."""
    vec = vec_width(logits)
    if grad is None or vec == 1 or vec_width(grad) != vec:
        return 1
    return vec if (grad.stride(0) - logits.stride(0)) % vec == 0 else 1


def wide_cols(n_cols: int, *col_strides: int) -> bool:
    """WIDE_COLS: whether some column offset (n_cols - 1) * stride of the tensors a launch
    walks by column needs 64 bits (see _online.lanes)."""
    return max((abs(s) for s in col_strides), default=0) * max(n_cols - 1, 0) >= 2**31


def interpreter_block(n_cols: int) -> int:
    # Large tiles make the interpreter (one NumPy call per op and tile) fast.
    return max(16, min(4096, triton.next_power_of_2(n_cols)))


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _stats_tile(m, d, s_w, s_wz, s_wy, s_wyz, z_raw, cols, mask, pivot,
                ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz,
                weight_ptr, tgt_row, stride_target_col, softcap, inv_temp,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                WRITE_TOKEN_STATS: tl.constexpr, TEACHER: tl.constexpr):
    """ce_fwd_kernel's pass 1 over one tile of raw logits (lanes off the mask -inf): the
    online (m, d) of z'' = softcap(z) / T, the linear sums, and on request the entropy's
    moment and the argmax (of the raw logits, as torch.argmax of the input), or the
    teacher's online statistics and the student's sum under the teacher's softmax."""
    if WRITE_TOKEN_STATS:
        best, best_col = argmax_update(best, best_col, z_raw, cols, mask)
    z = transform(z_raw, mask, softcap, inv_temp, HAS_SOFTCAP)
    if WRITE_TOKEN_STATS:
        m, d, ent_q, ent_s, _, _, _ = online_entropy_update(m, d, ent_q, ent_s, z, cols)
    else:
        m, d = online_softmax_update(m, d, z)
    if HAS_SMOOTHING:
        zc = tl.where(mask, z - pivot, 0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
            s_w += tl.sum(w, axis=0)
            s_wz += tl.sum(w * zc, axis=0)
        else:
            s_wz += tl.sum(zc, axis=0)
    if TEACHER:
        # soft targets y = softmax(t / T), never formed: the teacher's own online (max,
        # sum) t_m, t_d, its moment t_s (for its entropy, KL), and t_sz = sum e^(t/T - t_m)
        # (z'' - pivot), all rescaled together when the teacher's max moves.
        t = tl.load(tgt_row + cols * stride_target_col, mask=mask, other=float("-inf"))
        t = t.to(tl.float32) * inv_temp
        t_m, t_d, t_q, t_s, e, _, scale = online_entropy_update(t_m, t_d, t_q, t_s, t, cols)
        # y > 0 on a -inf student logit makes the loss inf, as it should; y = 0 adds 0
        t_sz = t_sz * scale + tl.sum(tl.where(e > 0.0, e * (z - pivot), 0.0), axis=0)
    elif PROB_TARGET:
        zc = tl.where(mask, z - pivot, 0.0)
        y = tl.load(tgt_row + cols * stride_target_col, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0)
        s_wy += tl.sum(y, axis=0)
        # y = 0 on a masked (-inf) logit contributes 0, not 0 * -inf
        s_wyz += tl.sum(tl.where(y != 0.0, y * zc, 0.0), axis=0)
    return m, d, s_w, s_wz, s_wy, s_wyz, ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz


@triton.jit
def ce_fwd_kernel(
    # pointers
    logits_ptr,        # (n_rows, n_cols) fp32 / bf16 / fp16
    target_ptr,        # (n_rows,) int class index, or (n_rows, n_cols) probabilities / teacher logits
    weight_ptr,        # (n_cols,) fp32 class weights          [HAS_WEIGHT]
    alpha_ptr,         # (n_rows,) fp32 target-term coefficient
    beta_ptr,          # (n_rows,) fp32 smoothing coefficient   [HAS_SMOOTHING]
    zeta_ptr,          # (n_rows,) fp32 z-loss coefficient      [HAS_ZLOSS]
    loss_ptr,          # (n_rows,) fp32 out: loss of each row, coefficients applied
    row_max_ptr,       # (n_rows,) fp32 out: m, the row max of z'' (0 for an all -inf row)
    log_d_ptr,         # (n_rows,) fp32 out: log d; lse = m + log d, kept apart for precision
    dlse_ptr,          # (n_rows,) fp32 out: d loss_row / d lse
    grad_ptr,          # (n_rows, n_cols) out: d loss / d z    [WRITE_GRAD]; may alias logits
    stats_ptr,         # (n_rows, 3) fp32 out: target term, smoothing term, sum w*y  [WRITE_STATS]
    entropy_ptr,       # (n_rows,) fp32 out: entropy of softmax(z'')        [WRITE_TOKEN_STATS]
    argmax_ptr,        # (n_rows,) int64 out: argmax of the raw logits      [WRITE_TOKEN_STATS]
    teacher_ptr,       # (n_rows, 2) fp32 out: the teacher's max and log d of t / T  [TEACHER]
    # sizes
    n_cols,
    # strides (in elements)
    stride_logits_row, stride_logits_col,
    stride_target_row, stride_target_col,
    stride_grad_row, stride_grad_col,
    # runtime scalars
    softcap,           # fp32, read when HAS_SOFTCAP
    inv_temp,          # fp32, 1 / temperature (1.0 without one)
    # compile-time constants
    BLOCK_V: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    VEC: tl.constexpr,       # elements per 16 bytes of the logits, 1 if columns are strided
    GRAD_VEC: tl.constexpr,  # VEC if the gradient's rows sit on the 16-byte grid alike, else 1
    WIDE_COLS: tl.constexpr,  # column offsets need int64 (a column stride >= 2**31 / n_cols)
    ONE_TILE: tl.constexpr = False,  # WRITE_GRAD and n_cols <= BLOCK_V: read the row once
    WRITE_TOKEN_STATS: tl.constexpr = False,  # entropy and argmax of each row
    TEACHER: tl.constexpr = False,     # target_ptr holds teacher logits (PROB_TARGET set too)
    TEACHER_KL: tl.constexpr = False,  # the target term is KL(y || s), not the cross-entropy
):
    row = tl.program_id(0).to(tl.int64)
    first = row * stride_logits_row
    logits_row = logits_ptr + first
    tgt_row = target_ptr + row * stride_target_row
    lane = lanes(BLOCK_V, WIDE_COLS)

    alpha = tl.load(alpha_ptr + row)
    beta = 0.0
    if HAS_SMOOTHING:
        beta = tl.load(beta_ptr + row)
    zeta = 0.0
    if HAS_ZLOSS:
        zeta = tl.load(zeta_ptr + row)

    target = -1
    if not PROB_TARGET:
        target = tl.load(tgt_row).to(tl.int64)

    # The linear sums (sum w*z'', sum w*y*z'') are taken about a per-row reference
    # point `pivot` (the first tile's max) so that W*lse - sum(w*z'') does not
    # cancel catastrophically for rows far from 0 (e.g. every logit near -1e4).
    NEED_SUMS: tl.constexpr = HAS_SMOOTHING or PROB_TARGET
    pivot = 0.0
    if NEED_SUMS:
        z0 = load_logits(logits_row + lane * stride_logits_col, lane < n_cols, softcap, inv_temp,
                         HAS_SOFTCAP)
        pivot = tl.max(z0, axis=0)
        pivot = tl.where((pivot == float("-inf")) | (pivot != pivot), 0.0, pivot)

    # ---- pass 1: online softmax statistics, read each logit once ----------
    # The row is walked as row_split says: an aligned body in 16-byte vectors, then
    # the few columns around it (none when the row starts and ends on the grid).
    m = float("-inf")
    d = 0.0
    s_w = 0.0      # sum w           (smoothing with weights)
    s_wz = 0.0     # sum w (z'' - pivot)
    s_wy = 0.0     # sum w y         (probability targets)
    s_wyz = 0.0    # sum w y (z'' - pivot)
    ent_q = -1.0   # d - 1, kept apart (see online_entropy_update)  [WRITE_TOKEN_STATS]
    ent_s = 0.0    # sum e^(z'' - m) (z'' - m)            [WRITE_TOKEN_STATS]
    best = float("-inf")  # running argmax: value and column [WRITE_TOKEN_STATS]
    best_col = 0
    t_m = float("-inf")   # the teacher's running max, sum, moment [TEACHER]
    t_d = 0.0
    t_q = -1.0
    t_s = 0.0
    t_sz = 0.0     # sum e^(t/T - t_m) (z'' - pivot)       [TEACHER]
    body0, n_head, n_body = row_split(first, n_cols, VEC)
    body_lo = 0
    if ONE_TILE:
        # The whole body is one tile (the host checked n_cols <= BLOCK_V): its raw logits
        # stay in registers, the gradient below is computed from them, and the row is
        # read from memory once, not twice.  (Only then: keeping a tile live across the
        # loop of a longer row would cost 20-50 registers and half the occupancy.)
        j = lane
        z0_raw = tl.load(logits_ptr + body0 + j * stride_logits_col, mask=j < n_body,
                         other=float("-inf")).to(tl.float32)
        m, d, s_w, s_wz, s_wy, s_wyz, ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz = _stats_tile(
            m, d, s_w, s_wz, s_wy, s_wyz, z0_raw, n_head + j, j < n_body, pivot,
            ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz,
            weight_ptr, tgt_row, stride_target_col, softcap, inv_temp,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TOKEN_STATS, TEACHER)
        body_lo = BLOCK_V
    for start in range(body_lo, n_body, BLOCK_V):
        j = start + lane
        z = tl.load(logits_ptr + body0 + j * stride_logits_col, mask=j < n_body,
                    other=float("-inf")).to(tl.float32)
        m, d, s_w, s_wz, s_wy, s_wyz, ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz = _stats_tile(
            m, d, s_w, s_wz, s_wy, s_wyz, z, n_head + j, j < n_body, pivot,
            ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz,
            weight_ptr, tgt_row, stride_target_col, softcap, inv_temp,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TOKEN_STATS, TEACHER)
    if n_body < n_cols:
        cols, mask = edge_cols(n_head, n_body, n_cols, VEC, WIDE_COLS)
        z = tl.load(logits_row + cols * stride_logits_col, mask=mask,
                    other=float("-inf")).to(tl.float32)
        m, d, s_w, s_wz, s_wy, s_wyz, ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz = _stats_tile(
            m, d, s_w, s_wz, s_wy, s_wyz, z, cols, mask, pivot,
            ent_q, ent_s, best, best_col, t_m, t_d, t_q, t_s, t_sz,
            weight_ptr, tgt_row, stride_target_col, softcap, inv_temp,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, WRITE_TOKEN_STATS, TEACHER)

    row_max = tl.where(m == float("-inf"), 0.0, m)
    log_d = tl.log(d)
    lse = row_max + log_d

    # ---- the row's loss terms, loss and d loss / d lse ----------------------
    # target term: lse - z''_t, or sum w y (lse - z'') for probabilities
    t_max = 0.0
    t_log_d = 0.0
    if TEACHER:
        # sum y = 1: lse - sum y z'' = (m - pivot) + log d - t_sz / t_d
        t_max = tl.where(t_m == float("-inf"), 0.0, t_m)
        t_log_d = tl.log(t_d)
        target_term = ((row_max - pivot) + log_d) - t_sz / t_d
        if TEACHER_KL:
            # KL = CE - H(y), H(y) = log1p(t_q) - t_s / t_d
            target_term -= log1p(t_q) - t_s / t_d
        s_wy = 1.0
        dlse = alpha
        tl.store(teacher_ptr + row * 2, t_max)
        tl.store(teacher_ptr + row * 2 + 1, t_log_d)
    elif PROB_TARGET:
        target_term = ((row_max - pivot) + log_d) * s_wy - s_wyz
        dlse = alpha * s_wy
    else:
        in_range = (target >= 0) & (target < n_cols)
        z_t = load_logits(logits_row + tl.where(in_range, target, 0) * stride_logits_col,
                          in_range, softcap, inv_temp, HAS_SOFTCAP)
        z_t = tl.where(in_range, z_t, row_max)  # a target elsewhere: keep the math finite
        # (m - z_t) + log d rather than lse - z_t: exact when z_t is the max,
        # which keeps a confident model's small loss accurate
        target_term = (row_max - z_t) + log_d
        dlse = alpha
    loss = tl.where(alpha != 0.0, alpha * target_term, 0.0)
    # smoothing term: sum w (lse - z'')
    smooth_term = 0.0
    if HAS_SMOOTHING:
        W = n_cols * 1.0
        if HAS_WEIGHT:
            W = s_w
        smooth_term = W * ((row_max - pivot) + log_d) - s_wz
        loss += tl.where(beta != 0.0, beta * smooth_term, 0.0)
        dlse += beta * W
    if HAS_ZLOSS:
        loss += tl.where(zeta != 0.0, zeta * lse * lse, 0.0)
        # an ignored row (zeta 0) of -inf or nan logits: 0, not 0 * inf, so its gradient is 0
        dlse += tl.where(zeta != 0.0, 2.0 * zeta * lse, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(row_max_ptr + row, row_max)
    tl.store(log_d_ptr + row, log_d)
    tl.store(dlse_ptr + row, dlse)
    if WRITE_STATS:
        # the terms before coefficients, for a vocabulary-parallel caller that
        # combines the slices' rows itself (softmax_ce.distributed)
        tl.store(stats_ptr + row * 3, target_term)
        tl.store(stats_ptr + row * 3 + 1, smooth_term)
        tl.store(stats_ptr + row * 3 + 2, s_wy)
    if WRITE_TOKEN_STATS:
        # H = -sum s log s = log d - sum s (z'' - m), log d = log1p(d - 1)
        tl.store(entropy_ptr + row, log1p(ent_q) - ent_s / d)
        tl.store(argmax_ptr + row, best_col.to(tl.int64))

    # ---- pass 2 (fused strategy): the gradient for grad_output = 1 ---------
    if WRITE_GRAD:
        grad_lo = 0
        if ONE_TILE:
            # the whole body is in registers (z0_raw): no second read of it
            j = lane
            active = row_active(dlse, alpha, beta, 0.0, HAS_SMOOTHING, False)
            g = grad_tile(z0_raw, n_head + j, j < tl.where(active, n_body, 0), active,
                          weight_ptr, tgt_row, stride_target_col, target,
                          row_max, log_d, dlse, alpha, beta, softcap,
                          inv_temp, t_max, t_log_d, 0.0, 0.0,
                          PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, TEACHER, False)
            gfirst = row * stride_grad_row
            gbody0 = tl.multiple_of(gfirst + n_head * stride_grad_col, GRAD_VEC)
            tl.store(grad_ptr + gbody0 + j * stride_grad_col,
                     to_store_dtype(g, grad_ptr.dtype.element_ty), mask=j < n_body)
            grad_lo = BLOCK_V
        # the rest of the body, if any, read again; then the edge (< 2 VEC elements)
        write_grad_row(logits_ptr, first, stride_logits_col,
                       grad_ptr, row * stride_grad_row, stride_grad_col,
                       weight_ptr, tgt_row, stride_target_col, target, n_cols,
                       row_max, log_d, dlse, alpha, beta, softcap,
                       inv_temp, t_max, t_log_d, 0.0, 0.0, grad_lo,
                       BLOCK_V, VEC, GRAD_VEC, WIDE_COLS, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING,
                       HAS_SOFTCAP, TEACHER, False)


@triton.jit
def ce_bwd_kernel(
    # pointers
    logits_ptr,        # (n_rows, n_cols) the forward's logits
    target_ptr,        # (n_rows,) int class index, or (n_rows, n_cols) probabilities / teacher logits
    weight_ptr,        # (n_cols,) fp32 class weights          [HAS_WEIGHT]
    row_max_ptr,       # (n_rows,) fp32 m saved by the forward
    log_d_ptr,         # (n_rows,) fp32 log d saved by the forward
    dlse_ptr,          # (n_rows,) fp32 grad_out * dlse (+ grad of lse)
    alpha_ptr,         # (n_rows,) fp32 grad_out * alpha
    beta_ptr,          # (n_rows,) fp32 grad_out * beta           [HAS_SMOOTHING]
    grad_ptr,          # (n_rows, n_cols) out; may alias logits
    teacher_ptr,       # (n_rows, 2) fp32 the teacher's max and log d of t / T  [TEACHER]
    ent_ptr,           # (n_rows, 2) fp32 d loss / d entropy, and sum s z''      [HAS_ENT_GRAD]
    # sizes
    n_cols,
    # strides (in elements)
    stride_logits_row, stride_logits_col,
    stride_target_row, stride_target_col,
    stride_grad_row, stride_grad_col,
    # runtime scalars
    softcap,
    inv_temp,          # fp32, 1 / temperature
    # compile-time constants
    BLOCK_V: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    VEC: tl.constexpr,       # as in ce_fwd_kernel
    GRAD_VEC: tl.constexpr,
    WIDE_COLS: tl.constexpr,
    TEACHER: tl.constexpr = False,
    HAS_ENT_GRAD: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    tgt_row = target_ptr + row * stride_target_row

    row_max = tl.load(row_max_ptr + row)
    log_d = tl.load(log_d_ptr + row)
    dlse = tl.load(dlse_ptr + row)
    alpha = tl.load(alpha_ptr + row)
    beta = 0.0
    if HAS_SMOOTHING:
        beta = tl.load(beta_ptr + row)
    target = -1
    if not PROB_TARGET:
        target = tl.load(tgt_row).to(tl.int64)
    t_max = 0.0
    t_log_d = 0.0
    if TEACHER:
        t_max = tl.load(teacher_ptr + row * 2)
        t_log_d = tl.load(teacher_ptr + row * 2 + 1)
    ent_grad = 0.0
    ent_mean = 0.0
    if HAS_ENT_GRAD:
        ent_grad = tl.load(ent_ptr + row * 2)
        ent_mean = tl.load(ent_ptr + row * 2 + 1)

    write_grad_row(logits_ptr, row * stride_logits_row, stride_logits_col,
                   grad_ptr, row * stride_grad_row, stride_grad_col,
                   weight_ptr, tgt_row, stride_target_col, target, n_cols,
                   row_max, log_d, dlse, alpha, beta, softcap,
                   inv_temp, t_max, t_log_d, ent_grad, ent_mean, 0,
                   BLOCK_V, VEC, GRAD_VEC, WIDE_COLS, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING,
                   HAS_SOFTCAP, TEACHER, HAS_ENT_GRAD)


@triton.jit
def ce_scale_kernel(
    grad_ptr,          # (n_rows, n_cols) in/out: the fused forward's gradient
    scale_ptr,         # (n_rows,) fp32 grad_output per row (stride 0 for a scalar)
    n_cols,
    stride_grad_row, stride_grad_col,
    stride_scale,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,       # elements per 16 bytes of the gradient, 1 if columns are strided
    WIDE_COLS: tl.constexpr,  # as in ce_fwd_kernel
):
    """grad *= grad_output, skipping rows whose factor is exactly 1 (then no byte moves)."""
    row = tl.program_id(0).to(tl.int64)
    first = row * stride_grad_row
    scale = tl.load(scale_ptr + row * stride_scale)
    body0, n_head, n_body = row_split(first, n_cols, VEC)
    n_touch = tl.where(scale != 1.0, n_body, 0)
    lane = lanes(BLOCK_V, WIDE_COLS)
    for start in range(0, n_touch, BLOCK_V):
        j = start + lane
        ptrs = grad_ptr + body0 + j * stride_grad_col
        mask = j < n_touch
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, to_store_dtype(g * scale, grad_ptr.dtype.element_ty), mask=mask)
    if (n_body < n_cols) & (scale != 1.0):
        cols, mask = edge_cols(n_head, n_body, n_cols, VEC, WIDE_COLS)
        ptrs = grad_ptr + first + cols * stride_grad_col
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, to_store_dtype(g * scale, grad_ptr.dtype.element_ty), mask=mask)



INTERPRETED = type(ce_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------
# Autotuned entry points (GPU only).  Keys: the vocabulary size and the flags;
# Triton adds the tensors' dtypes to the key itself.  An in-place launch is never
# tuned on its own tensors (a trial would overwrite the logits, and restoring them
# would clone a logits-sized buffer per trial): the launcher tunes these on a few
# copied rows out of place and reuses the config (softmax_ce._launch.run_kernel).
# ----------------------------------------------------------------------------

_FWD_KEY = ["n_cols", "PROB_TARGET", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_ZLOSS", "HAS_SOFTCAP",
            "WRITE_GRAD", "WRITE_STATS", "VEC", "GRAD_VEC", "WIDE_COLS", "WRITE_TOKEN_STATS",
            "TEACHER", "TEACHER_KL"]
_BWD_KEY = ["n_cols", "PROB_TARGET", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP", "VEC", "GRAD_VEC",
            "WIDE_COLS", "TEACHER", "HAS_ENT_GRAD"]

ce_fwd_tuned = triton.autotune(configs=fwd_configs(), key=_FWD_KEY + ["ONE_TILE"],
                               prune_configs_by={"early_config_prune": one_tile_prune})(ce_fwd_kernel)
ce_bwd_tuned = triton.autotune(configs=bwd_configs(), key=_BWD_KEY)(ce_bwd_kernel)
# in place by nature; tuned on a copied probe, which restore_value resets between trials
ce_scale_tuned = triton.autotune(configs=scale_configs(), key=["n_cols", "VEC", "WIDE_COLS"],
                                 restore_value=["grad_ptr"])(ce_scale_kernel)
