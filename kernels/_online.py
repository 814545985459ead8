"""Shared `@triton.jit` helpers: the online-softmax update, the softcap, and the
gradient of one tile.  Every cross-entropy kernel imports these instead of
rewriting them, so the forward, the fused gradient and the recompute backward
agree to the bit on how a logit becomes a probability.

Layer: the bottom of the kernels; imports triton only.
"""

import triton
import triton.language as tl


@triton.jit
def softcap_slope(z, softcap):
    """z' = softcap * tanh(z / softcap) and its slope dz'/dz = sech^2(z / softcap).

    Both come from one e = exp(-2|u|) in (0, 1], u = z / softcap:
        tanh|u| = (1 - e) / (1 + e),     sech^2 u = 4 e / (1 + e)^2.
    The slope is computed from e, never as 1 - tanh^2, which cancels to 0 in fp32 once
    |u| passes about 9 (there sech^2 < 6e-8, and for |u| = 20 it is 1.7e-17, still a
    normal fp32 number).  Valid for the whole fp32 range: e underflows to 0 for large
    |u| (tanh = +-1, slope 0), -inf gives -softcap and slope 0, nan stays nan.  Written
    out because the name of tanh moved between Triton releases (tl.math / libdevice)
    and the interpreter has no libdevice."""
    u = z / softcap
    e = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(u < 0, -th, th)
    return softcap * th, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def to_store_dtype(x, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even.

    Triton's interpreter converts fp32 to bf16 by truncation, while the GPU
    rounds to nearest; rounding the bits by hand first (the result is then
    exactly representable) makes both give the same, correctly rounded value.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN is not rounded: adding 0x7FFF to a NaN whose payload fills the mantissa
        # (0x7FFFFFFF, the canonical NaN of NVIDIA arithmetic) carries into the sign bit
        # and leaves -0.0.  Every NaN becomes the quiet NaN 0x7FC00000 instead, exactly
        # representable, so that a truncating conversion (the interpreter's) does not
        # turn a NaN whose payload sits in the low 16 bits (0x7F800001) into inf either.
        # (A select of a constant: selecting x itself kept the whole tile live and made
        # ptxas spill in the all-options kernel.)
        x = tl.where(x != x, 0x7FC00000, rounded).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def row_split(first, n_cols, VEC: tl.constexpr):
    """Where a row's 16-byte accesses can start and end.

    first: the flat offset (in elements, from the tensor's base pointer) of the row's
    first element; VEC: elements per 16 bytes when the row's columns are contiguous, else
    1 (the host decides, see cross_entropy.vec_width).  Returns (body0, n_head, n_body):
    columns [n_head, n_head + n_body) sit at flat offsets body0, body0 + 1, ..., where
    body0 is a multiple of VEC (and says so to the compiler) and n_body is one too, so a
    tile of the body has a mask that is constant over each group of VEC lanes.  With
    the base pointer 16-byte aligned (Triton specialises on that), every body access is
    then a 16-byte vector, whatever the row length; without this a row length that is
    not a multiple of VEC (50257, say) puts every row but some off the 16-byte grid and
    Triton falls back to 2-byte accesses for the whole row.  The head (< VEC columns
    before the body) and the tail (< VEC after it) are the edge tile (edge_cols)."""
    lead = ((VEC - first % VEC) % VEC).to(tl.int32)
    body0 = first + lead
    # int32 column counts (first is int64): int64 lane indices would double the
    # registers of every column-index tensor in the caller's loop
    n_head = tl.minimum(lead, n_cols)
    n_body = (n_cols - n_head) // VEC * VEC
    return tl.multiple_of(body0, VEC), n_head, n_body


@triton.jit
def lanes(BLOCK: tl.constexpr, WIDE_COLS: tl.constexpr):
    """tl.arange(0, BLOCK) as the column index type: int32, or int64 when WIDE_COLS.

    A column offset is column * column stride.  In int32 that is exact for contiguous
    rows (the stride is 1) but wraps once (n_cols - 1) * stride reaches 2**31, which a
    column-strided view such as (W @ h.T).T (stride = n_rows) does at LLM sizes; the
    host sets WIDE_COLS for exactly those launches (cross_entropy.wide_cols), so the
    usual launch keeps int32 column indices (half the registers of int64 ones)."""
    lane = tl.arange(0, BLOCK)
    if WIDE_COLS:
        lane = lane.to(tl.int64)
    return lane


@triton.jit
def edge_cols(n_head, n_body, n_cols, VEC: tl.constexpr, WIDE_COLS: tl.constexpr):
    """The columns a row_split body leaves out: lanes [0, VEC) hold the head, lanes
    [VEC, 2 VEC) the tail; (columns, mask)."""
    lane = lanes(2 * VEC, WIDE_COLS)
    tail = n_head + n_body + (lane - VEC)
    cols = tl.where(lane < VEC, lane, tail)
    mask = tl.where(lane < VEC, lane < n_head, tail < n_cols)
    return cols, mask


@triton.jit
def transform(z, mask, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """The logits the softmax sees, z'' = softcap(z) / temperature, from raw fp32 logits
    whose lanes off the mask are -inf (they stay -inf).

    The softcap comes first: it belongs to the model (Gemma 2 caps its head's output),
    the temperature to how that output is read (sampling, distillation, RL), so
    softcap(z) / T is the temperature applied to the model's own logits.  inv_temp is
    1.0 without a temperature, and z * 1.0 is z exactly."""
    if HAS_SOFTCAP:
        z, _ = softcap_slope(z, softcap)
        # tanh(-inf / cap) = -1 would turn the padding lanes into -cap
        z = tl.where(mask, z, float("-inf"))
    return z * inv_temp


@triton.jit
def load_logits(ptrs, mask, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """One tile of logits as z'' = softcap(z) / T in fp32; lanes off the mask are -inf."""
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    return transform(z, mask, softcap, inv_temp, HAS_SOFTCAP)


@triton.jit
def online_softmax_update(m, d, z):
    """Fold a tile z into the running max m and rescaled sum d (Milakov & Gimelshein 2018).

    d <- d * exp(m - m') + sum(exp(z - m')),  m' = max(m, max(z)).
    While every logit seen so far is -inf (masked vocabulary), m' is -inf and
    z - m' would be nan; shifting by 0 instead keeps d at exactly 0.
    """
    m_new = tl.maximum(m, tl.max(z, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
    return m_new, d


@triton.jit
def online_entropy_update(m, d, q, s, z, cols):
    """online_softmax_update that also keeps, for the entropy H = log d - s / d:

    q = d - 1, the sum of e^(z - m) over every logit but one at the max.  A confident
        row has d = 1 + q with q far below fp32's 6e-8 resolution near 1, so log d from d
        would be 0 and H would lose its largest-but-one term; log1p(q) keeps it.  When the
        max moves to m' (inside this tile), d' = d e^(m - m') + sum_tile, and with one
        lane at m' left out of the tile's sum, q' = (1 + q) e^(m - m') + sum_others: a sum
        of non-negative terms, with no 1 - 1 cancellation.
    s = sum e^(z - m) (z - m), the first moment about the running max.  When the max
        moves, each old term e^(z-m) (z-m) becomes e^(m-m') e^(z-m') ((z-m') - (m-m')),
        so s <- e^(m-m') (s + (m-m') d) before the tile's own terms are added.
    H = log1p(q) - s / (1 + q) is then a sum of two non-negative terms, with no
    cancellation, where lse - sum(s z) would subtract two nearly equal numbers.

    cols: the tile's column indices (to leave out one lane at the max).  Returns (m', d',
    q', s', the tile's e^(z - m'), m' as `shift` (0 while every logit is -inf), and
    e^(m - m')), for a caller that weights other sums by the same probabilities (the
    teacher's soft targets)."""
    t_max = tl.max(z, axis=0)
    m_new = tl.maximum(m, t_max)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    s = scale * (s + tl.where(d == 0.0, 0.0, (m - shift) * d))
    e = tl.exp(z - shift)
    d = d * scale + tl.sum(e, axis=0)
    new_max = t_max > m
    first = tl.min(tl.where(z == m_new, cols, 2147483647), axis=0)
    others = tl.sum(tl.where(cols == first, 0.0, e), axis=0)
    q = tl.where(new_max, (1.0 + q) * scale + others, q + tl.sum(e, axis=0))
    # a -inf logit has e = 0: its term is 0, not 0 * -inf
    s += tl.sum(tl.where(e > 0.0, e * (z - shift), 0.0), axis=0)
    return m_new, d, q, s, e, shift, scale


@triton.jit
def log1p(q):
    """log(1 + q), accurate for small q (the interpreter has no libdevice log1p):
    log(u) * q / (u - 1) with u = 1 + q rounded, which cancels u's rounding error."""
    u = 1.0 + q
    return tl.where(u == 1.0, q, tl.log(u) * (q / (u - 1.0)))


@triton.jit
def argmax_update(best, best_col, z, cols, mask):
    """Fold a tile of raw logits into the running (max, its first column), as torch.argmax
    picks: the largest value, a nan above everything, and among equals the lowest column.
    Tiles may come in any column order (a row's edge columns are walked after its body),
    so ties are settled by the column, not by which tile came first."""
    is_nan = (z != z) & mask
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    zk = tl.where(is_nan, float("-inf"), z)
    t_max = tl.max(zk, axis=0)
    hit = tl.where(any_nan, is_nan, (zk == t_max) & mask)
    t_col = tl.min(tl.where(hit, cols, 2147483647), axis=0).to(tl.int32)
    t_val = tl.where(any_nan, float("nan"), t_max)
    best_nan = best != best
    take = (any_nan & (~best_nan | (t_col < best_col))) | (
        ~best_nan & ~any_nan & ((t_max > best) | ((t_max == best) & (t_col < best_col))))
    return tl.where(take, t_val, best), tl.where(take, t_col, best_col)


@triton.jit
def grad_tile(
    z, cols, mask, active,                # this tile's raw logits (fp32), their column indices; is the row live
    weight_ptr,                           # (n_cols,) fp32 class weights
    tgt_row_ptr, stride_tgt_col, target,  # probability (or teacher logit) row, or the class index
    row_max, log_d, dlse, alpha, beta, softcap,   # per-row fp32 scalars
    inv_temp,                             # 1 / temperature (1.0 without one)
    t_max, t_log_d,                       # the teacher row's max and log sum-exp of t / T  [TEACHER]
    ent_grad, ent_mean,                   # d loss / d entropy, and sum s z''  [HAS_ENT_GRAD]
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TEACHER: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
):
    """d loss / d z for one tile of logits already in registers, in fp32.

    With z'' = softcap(z) / T, s = softmax(z'') = exp((z'' - m) - log d), lse = m + log d.
    m and log d are kept apart: rounding lse itself to fp32 would cost about 1e-3
    relative error in s for rows whose logits are near +-1e4.
        d/dz'' = dlse * s - alpha * onehot(target) - beta * w         (class index)
        d/dz'' = dlse * s - alpha * w * y          - beta * w         (probabilities)
               y = exp(t / T - t_max - t_log_d)                         (teacher logits t)
        d/dz'' += ent_grad * s * (sum(s z'') - z'')                     (entropy's gradient)
        d/dz  = d/dz'' * sech^2(z / softcap) / T                        (softcap, temperature)
    dlse, alpha, beta and ent_grad already hold the reduction's scale and grad_output.
    The subtraction is done in fp32 and rounded once on store, so the target
    entry s - 1 (about -1e-3 for a confident model) keeps its precision in bf16.
    """
    if HAS_SOFTCAP:
        z, slope = softcap_slope(z, softcap)
    z = z * inv_temp
    if HAS_ENT_GRAD:
        # s (E_s[z''] - z'') is 0 on a -inf logit (s = 0), not 0 * inf
        spread = tl.where(z == float("-inf"), 0.0, ent_mean - z)
        g = (dlse + ent_grad * spread) * tl.exp((z - row_max) - log_d)
    else:
        g = dlse * tl.exp((z - row_max) - log_d)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if TEACHER:
        t = tl.load(tgt_row_ptr + cols * stride_tgt_col, mask=mask, other=float("-inf"))
        g -= alpha * tl.exp((t.to(tl.float32) * inv_temp - t_max) - t_log_d)
    elif PROB_TARGET:
        y = tl.load(tgt_row_ptr + cols * stride_tgt_col, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            y = y * w
        g -= alpha * y
    else:
        g -= tl.where(cols == target, alpha, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= beta * w
        else:
            g -= beta
    if HAS_SOFTCAP:
        g = g * slope
    g = g * inv_temp
    # an ignored row's gradient is 0, even where its (unread) logits were nan
    return tl.where(active, g, 0.0)


@triton.jit
def row_active(dlse, alpha, beta, ent_grad, HAS_SMOOTHING: tl.constexpr,
               HAS_ENT_GRAD: tl.constexpr):
    """A row whose coefficients are all 0 (ignored, or grad_output 0) has a zero gradient."""
    active = (dlse != 0.0) | (alpha != 0.0)
    if HAS_SMOOTHING:
        active = active | (beta != 0.0)
    if HAS_ENT_GRAD:
        active = active | (ent_grad != 0.0)
    return active


@triton.jit
def write_grad_row(
    logits_ptr, first, stride_col,        # the logits: base, this row's flat offset, column stride
    grad_ptr, gfirst, stride_grad_col,    # the gradient, alike
    weight_ptr, tgt_row_ptr, stride_tgt_col, target, n_cols,
    row_max, log_d, dlse, alpha, beta, softcap,           # per-row fp32 scalars
    inv_temp, t_max, t_log_d, ent_grad, ent_mean,         # as in grad_tile
    body_lo,                              # first body column to do (the caller did those before)
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, GRAD_VEC: tl.constexpr, WIDE_COLS: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TEACHER: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
):
    """Stream one row's gradient: read each logit once, write each gradient once.

    The row is walked as row_split says, so logits move in 16-byte vectors; the
    gradient's body is stored in 16-byte vectors too when its rows sit on the 16-byte
    grid alike (GRAD_VEC == VEC: the host checked that the two row strides agree modulo
    VEC), else element by element.  An ignored row (all coefficients 0) has a zero
    gradient: its logits are not read at all (a masked-off load moves no bytes), only
    zeros are written.  Each tile is read before it is written, so the gradient may be
    the logits (in place)."""
    active = row_active(dlse, alpha, beta, ent_grad, HAS_SMOOTHING, HAS_ENT_GRAD)
    body0, n_head, n_body = row_split(first, n_cols, VEC)
    gbody0 = tl.multiple_of(gfirst + n_head * stride_grad_col, GRAD_VEC)
    n_read = tl.where(active, n_body, 0)
    lane = lanes(BLOCK_V, WIDE_COLS)
    for start in range(body_lo, n_body, BLOCK_V):
        j = start + lane
        mask = j < n_body
        read = j < n_read
        z = tl.load(logits_ptr + body0 + j * stride_col, mask=read, other=float("-inf")).to(tl.float32)
        g = grad_tile(z, n_head + j, read, active,
                      weight_ptr, tgt_row_ptr, stride_tgt_col, target,
                      row_max, log_d, dlse, alpha, beta, softcap,
                      inv_temp, t_max, t_log_d, ent_grad, ent_mean,
                      PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, TEACHER, HAS_ENT_GRAD)
        tl.store(grad_ptr + gbody0 + j * stride_grad_col,
                 to_store_dtype(g, grad_ptr.dtype.element_ty), mask=mask)
    if n_body < n_cols:
        cols, mask = edge_cols(n_head, n_body, n_cols, VEC, WIDE_COLS)
        read = mask & (cols < tl.where(active, n_cols, 0))
        z = tl.load(logits_ptr + first + cols * stride_col, mask=read, other=float("-inf")).to(tl.float32)
        g = grad_tile(z, cols, read, active,
                      weight_ptr, tgt_row_ptr, stride_tgt_col, target,
                      row_max, log_d, dlse, alpha, beta, softcap,
                      inv_temp, t_max, t_log_d, ent_grad, ent_mean,
                      PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, TEACHER, HAS_ENT_GRAD)
        tl.store(grad_ptr + gfirst + cols * stride_grad_col,
                 to_store_dtype(g, grad_ptr.dtype.element_ty), mask=mask)
