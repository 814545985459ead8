"""Shared `@triton.jit` helpers: the online-softmax update, the softcap, and the
gradient of one tile.  Every cross-entropy kernel imports these instead of
rewriting them, so the forward, the fused gradient and the recompute backward
agree to the bit on how a logit becomes a probability.
"""

import triton
import triton.language as tl


@triton.jit
def tanh_f32(x):
    # tanh through exp, valid for the whole fp32 range: exp(2x) overflows to
    # inf for large x, giving 1 - 0 = 1, and underflows to 0 for very negative
    # x, giving -1.  Written out because the name of tanh moved between Triton
    # releases (tl.math / libdevice) and the interpreter has no libdevice.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def to_store_dtype(x, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even.

    Triton's interpreter converts fp32 to bf16 by truncation, while the GPU
    rounds to nearest; rounding the bits by hand first (the result is then
    exactly representable) makes both give the same, correctly rounded value.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def load_logits(row_ptr, offs, mask, stride_col, softcap, HAS_SOFTCAP: tl.constexpr):
    """One tile of a row as fp32, softcapped when asked; lanes past the row are -inf."""
    z = tl.load(row_ptr + offs * stride_col, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh_f32(z / softcap)
        # tanh(-inf / cap) = -1 would turn the padding lanes into -cap
        z = tl.where(mask, z, float("-inf"))
    return z


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
def grad_tile(
    row_ptr, offs, mask, stride_col,      # logits of this row
    weight_ptr,                           # (n_cols,) fp32 class weights
    tgt_row_ptr, stride_tgt_col, target,  # probability row, or the class index
    shift, log_d, s_coef, alpha, beta, softcap,   # per-row fp32 scalars
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """d loss / d z for one tile, in fp32.

    With z' = softcap(z), s = softmax(z') = exp((z' - m) - log d), lse = m + log d.
    m and log d are kept apart: rounding lse itself to fp32 would cost about 1e-3
    relative error in s for rows whose logits are near +-1e4.
        d/dz' = s_coef * s - alpha * onehot(target) - beta * w          (class index)
        d/dz' = s_coef * s - alpha * w * y          - beta * w          (probabilities)
        d/dz  = d/dz' * (1 - tanh(z / softcap)^2)                       (softcap)
    s_coef, alpha and beta already hold the reduction's scale and grad_output.
    The subtraction is done in fp32 and rounded once on store, so the target
    entry s - 1 (about -1e-3 for a confident model) keeps its precision in bf16.
    """
    z = tl.load(row_ptr + offs * stride_col, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SOFTCAP:
        th = tanh_f32(z / softcap)
        z = softcap * th
    g = s_coef * tl.exp((z - shift) - log_d)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    if PROB_TARGET:
        y = tl.load(tgt_row_ptr + offs * stride_tgt_col, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            y = y * w
        g -= alpha * y
    else:
        g -= tl.where(offs == target, alpha, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= beta * w
        else:
            g -= beta
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return g


@triton.jit
def write_grad_row(
    logits_row, stride_col, grad_row, stride_grad_col,   # this row's logits and gradient
    weight_ptr, tgt_row_ptr, stride_tgt_col, target, n_cols,
    shift, log_d, s_coef, alpha, beta, softcap,           # per-row fp32 scalars
    BLOCK_V: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Stream one row's gradient: read each logit once, write each gradient once.

    An ignored row (all coefficients 0) has a zero gradient: its logits are not read
    at all (a masked-off load moves no bytes), only zeros are written.  Each tile is
    read before it is written, so grad_row may be logits_row (in place)."""
    active = (s_coef != 0.0) | (alpha != 0.0)
    if HAS_SMOOTHING:
        active = active | (beta != 0.0)
    n_read = tl.where(active, n_cols, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        g = grad_tile(logits_row, offs, offs < n_read, stride_col, weight_ptr,
                      tgt_row_ptr, stride_tgt_col, target,
                      shift, log_d, s_coef, alpha, beta, softcap,
                      PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP)
        g = tl.where(active, g, 0.0)
        tl.store(grad_row + offs * stride_grad_col, to_store_dtype(g, grad_row.dtype.element_ty),
                 mask=offs < n_cols)
