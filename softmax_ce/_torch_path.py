"""The chunked PyTorch back end: the kernels' math on a bounded number of rows at a time.

Runs everything the Triton kernels do, with the same semantics, for CPU tensors when
the kernels are not interpreted and for float64 anywhere (the fp32-accumulating kernels
would not honour it).  It walks the rows in chunks of at most CHUNK_ELEMENTS logits, so
its temporaries stay a fixed size however large the logits are; the linear
cross-entropy computes each chunk's logits x_c @ W^T and reuses the same chunk math,
so no N x V tensor exists.  A training step's forward (softmax_forward) and the fused
modes' run on the whole tensor instead: they need no temporary, only the buffer that
becomes the gradient.  Imports nothing of the package but its per-row math (_rows).

Row vectors: row_max (m, 0 for an all -inf row), log_d (lse = row_max + log_d, kept
apart for precision), dlse (d loss / d lse; in a backward, scaled by grad_output and
plus the lse's own gradient), alpha, beta, zeta (see _rows).
"""


import torch
from torch import Tensor

from ._rows import compose_rows

# Logits per chunk: about 4M, so that a chunk (16 MB in fp32) stays in the last-level
# cache from one op to the next and its fp32 temporaries (one log_softmax, or an upcast
# chunk, exp and gradient on the general path) stay near 16-50 MB.  A tensor of up to
# SMALL_ELEMENTS goes in one chunk: there the op count matters more than the cache, as
# every op ends in a barrier of the thread pool, which a core taken by another process
# makes slow (perf/cpu_contention.py).
CHUNK_ELEMENTS = 1 << 22
SMALL_ELEMENTS = 1 << 24


def row_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the per-row vectors: float64 for float64 inputs, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunks(n_rows: int, n_cols: int):
    if n_rows * n_cols <= max(SMALL_ELEMENTS, CHUNK_ELEMENTS):
        yield slice(0, n_rows)
        return
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))

def _softcapped(z: Tensor, softcap, need_slope: bool = True, inv_temp: float = 1.0):
    """z'' = softcap(z) / T and, for the chain rule, dz''/dz = sech^2(z / softcap) / T
    (None when that is 1: no softcap, no temperature).  The softcap comes first, as in
    the kernels (_online.transform).

    The slope is 4 e / (1 + e)^2 with e = exp(-2|u|), as in the kernels
    (_online.softcap_slope), never 1 - tanh^2, which cancels to 0 once |u| passes 9."""
    if softcap is None:
        if inv_temp == 1.0:
            return z, None
        slope = torch.full((), inv_temp, dtype=z.dtype, device=z.device) if need_slope else None
        return z * inv_temp, slope
    u = z / softcap
    zc = torch.tanh(u).mul_(softcap)
    if inv_temp != 1.0:
        zc.mul_(inv_temp)
    if not need_slope:
        return zc, None
    e = u.abs().mul_(-2.0).exp_()
    slope = e.mul(4.0 * inv_temp).div_((e + 1.0).square_())
    return zc, slope


def _entropy(z: Tensor, row_max: Tensor) -> Tensor:
    """-sum s log s per row as the kernels compute it (_online.online_entropy_update):
    log1p(q) - sum e (z - m) / (1 + q), e = exp(z - m), q = d - 1 summed over every logit
    but one at the max, so a confident row (d = 1 + q, q below fp32's resolution at 1)
    keeps its entropy to fp32's relative precision; no lse - sum(s z) cancellation."""
    dz = z - row_max[:, None]
    e = dz.exp()
    s = torch.where(e > 0, e * dz, 0.0).sum(dim=1)  # e = 0 on a -inf logit: 0, not 0 * -inf
    d = e.sum(dim=1)
    e.scatter_(1, dz.argmax(dim=1, keepdim=True), 0.0)
    q = e.sum(dim=1)
    return torch.log1p(q) - s / d


def _teacher_log_probs(t: Tensor, inv_temp: float, cdt):
    """log softmax(t / T) of a chunk of teacher logits, and its row (max, log d)."""
    tz = t.to(cdt) * inv_temp
    m = tz.amax(dim=1)
    t_max = torch.where(m == float("-inf"), 0.0, m)
    t_log_d = (tz - t_max[:, None]).exp_().sum(dim=1).log()
    return (tz - t_max[:, None]).sub_(t_log_d[:, None]), t_max, t_log_d

def _grad_chunk(z, slope, target, weight, row_max, log_d, dlse, alpha, beta, prob_target,
                teacher=None, inv_temp=1.0, ent=None):
    """d loss / d z of a chunk; the same formula as kernels._online.grad_tile.
    teacher: the chunk's (t_max, t_log_d) when target holds teacher logits; ent: its
    (d loss / d entropy, sum s z'') per row."""
    g = (z - row_max[:, None]).sub_(log_d[:, None]).exp_()
    if ent is not None:
        # s (E_s[z''] - z'') is 0 on a -inf logit (s = 0), not 0 * inf
        spread = torch.where(z == float("-inf"), 0.0, ent[:, 1, None] - z)
        g.mul_(dlse[:, None] + ent[:, 0, None] * spread)
    else:
        g.mul_(dlse[:, None])
    if teacher is not None:
        y = (target.to(z.dtype) * inv_temp).sub_(teacher[:, 0, None]).sub_(teacher[:, 1, None])
        g.sub_(y.exp_().mul_(alpha[:, None]))
    elif prob_target:
        y = target.to(z.dtype) * alpha[:, None]  # never in place: target is the user's
        if weight is not None:
            y = y * weight
        g.sub_(y)
    else:
        _sub_onehot(g, target, alpha)
    if beta is not None:
        g.sub_(beta[:, None] * (weight if weight is not None else 1.0))
    if slope is not None:
        g.mul_(slope)
    return _zero_ignored(g, dlse, alpha, beta, ent)


def _sub_onehot(g, target, alpha):
    """g[i, target_i] -= alpha_i for class-index targets (none for one outside [0, C))."""
    in_range = (target >= 0) & (target < g.shape[1])
    cols = torch.where(in_range, target, 0).long()[:, None]
    g.scatter_add_(1, cols, -torch.where(in_range, alpha, 0.0)[:, None].to(g.dtype))


def _zero_ignored(g, dlse, alpha, beta, ent=None):
    """A row whose coefficients are all 0 (ignored, or grad_output 0) has a zero gradient,
    even where its logits were nan; the pass is skipped when every row is live (a host
    read, free on a CPU)."""
    active = (dlse != 0) | (alpha != 0)
    if beta is not None:
        active |= beta != 0
    if ent is not None:
        active |= ent[:, 0] != 0
    if not bool(active.all()):
        g.masked_fill_(~active[:, None], 0.0)
    return g

def _ce_forward_in_place(z, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse):
    """ce_forward when the gradient goes over the logits themselves, already in the
    compute dtype, class-index targets, no softcap (the linear cross-entropy's chunks):
    e = exp(z - m) is formed over z, its row sums give log d, and the gradient is then
    e * (dlse / d) - alpha onehot - beta w, all in place.  Five passes over the chunk and
    no temporary of its size, where the general path makes two."""
    n_cols = z.shape[1]
    m = z.amax(dim=1)
    rmax = torch.where(m == float("-inf"), 0.0, m)
    in_range = (target >= 0) & (target < n_cols)
    cols = torch.where(in_range, target, 0).long()[:, None]
    z_t = torch.where(in_range, z.gather(1, cols)[:, 0], rmax)
    z.sub_(rmax[:, None])
    if beta is not None:
        # sum_c w_c (z_c - m), about the row max so that W lse - sum w z does not cancel
        W = weight.sum() if weight is not None else float(n_cols)
        wz = torch.mv(z, weight) if weight is not None else z.sum(dim=1)
    z.exp_()
    ld = z.sum(dim=1).log_()
    lse = rmax + ld
    target_term = (rmax - z_t) + ld
    # sum_c w_c (lse - z_c) = W log d - sum_c w_c (z_c - m)
    smooth = W * ld - wz if beta is not None else None
    loss_c, dlse_c = compose_rows(lse, target_term, smooth, alpha, beta, zeta,
                                  W if beta is not None else None)
    loss.copy_(loss_c)
    row_max.copy_(rmax)
    log_d.copy_(ld)
    dlse.copy_(dlse_c)
    z.mul_((dlse_c * torch.exp(-ld))[:, None])  # s * dlse = e / d * dlse
    _sub_onehot(z, target, alpha)
    if beta is not None:
        z.sub_(beta[:, None] * (weight if weight is not None else 1.0))
    _zero_ignored(z, dlse_c, alpha, beta)


def _ce_forward_stats(z, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse):
    """ce_forward without a gradient, for class-index targets, no softcap, logits already
    in the compute dtype: one fused log_softmax per chunk (and two row maxima) instead of
    the general path's five whole-chunk ops.  log d comes from log_softmax's own maximum,
    -max_c logp_c = log sum exp(z - m), which keeps its precision for rows near +-1e4
    (lse - m would not)."""
    n_cols = z.shape[1]
    logp = torch.log_softmax(z, dim=1)
    m = z.amax(dim=1)
    dead = m == float("-inf")  # every logit -inf: lse -inf, as the kernels say
    rmax = torch.where(dead, 0.0, m)
    ld = torch.where(dead, float("-inf"), -logp.amax(dim=1))
    in_range = (target >= 0) & (target < n_cols)
    cols = torch.where(in_range, target, 0).long()[:, None]
    logp_t = logp.gather(1, cols)[:, 0]
    target_term = torch.where(in_range, -logp_t, ld)  # a target elsewhere: kept finite
    target_term = torch.where(dead, float("nan"), target_term)
    lse = rmax + ld
    W = smooth = None
    if beta is not None:
        W = weight.sum() if weight is not None else float(n_cols)
        smooth = -(torch.mv(logp, weight) if weight is not None else logp.sum(dim=1))
    loss_c, dlse_c = compose_rows(lse, target_term, smooth, alpha, beta, zeta, W)
    loss.copy_(loss_c)
    row_max.copy_(rmax)
    log_d.copy_(ld)
    dlse.copy_(dlse_c)


def softmax_forward(logits, target, alpha, zeta, loss, row_max, log_d, dlse, soft):
    """ce_forward for class-index targets, no label smoothing, no softcap, logits in the
    compute dtype, which also writes softmax(z) into `soft` for softmax_grad_ to turn into
    the gradient in place: a CPU training step's forward (grad_mode "softmax"), and the
    fused modes' (soft = the gradient's buffer, which may be the logits themselves: every
    read of the logits comes before the softmax is written).

    Three passes over the whole tensor, each one of PyTorch's fused row kernels: the row
    max of z, softmax into `soft`, and the row max of s, which is exactly 1/d (its
    exponent is 0), so log d = -log max s keeps its precision for rows near +-1e4.  No
    temporary, so no chunks: whole-tensor ops are fewer thread-pool barriers, each of
    which waits for a thread that another process has descheduled
    (perf/cpu_contention.py).  Keeping s costs one logits-sized buffer from the forward
    on, which the recompute backward would allocate anyway; in exchange the backward is
    one multiply instead of a second read of the logits with an exp per element (torch's
    exp costs more than its whole softmax here), and it faults in no fresh buffer."""
    n_cols = logits.shape[1]
    m = logits.amax(dim=1)
    in_range = (target >= 0) & (target < n_cols)
    z_t = logits.gather(1, torch.where(in_range, target, 0).long()[:, None])[:, 0]
    softmax_(logits, soft)
    dead = m == float("-inf")  # every logit -inf: lse -inf, loss nan, as the kernels say
    rmax = torch.where(dead, 0.0, m)
    ld = torch.where(dead, float("-inf"), soft.amax(dim=1).log().neg_())
    target_term = torch.where(in_range, (rmax - z_t) + ld, ld)  # elsewhere: kept finite
    target_term = torch.where(dead, float("nan"), target_term)
    loss_c, dlse_c = compose_rows(rmax + ld, target_term, None, alpha, None, zeta, None)
    loss.copy_(loss_c)
    row_max.copy_(rmax)
    log_d.copy_(ld)
    dlse.copy_(dlse_c)


def softmax_(logits, soft):
    """soft = softmax(logits) over the last dimension: PyTorch's fused row kernel."""
    torch._softmax(logits, 1, False, out=soft)


def softmax_grad_(soft, target, dlse, alpha):
    """softmax_forward's `soft` becomes d loss / d z in place: s * dlse - alpha onehot, with
    dlse and alpha already holding grad_output (and dlse the lse's own gradient).  Whole-
    tensor ops: one multiply and a scatter."""
    soft.mul_(dlse[:, None].to(soft.dtype))
    _sub_onehot(soft, target, alpha.to(soft.dtype))
    _zero_ignored(soft, dlse, alpha, None)


def ce_forward(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse, grad,
               prob_target, softcap, stats=None, *, inv_temp=1.0, entropy=None, argmax=None,
               teacher=None, teacher_kl=False):
    n_rows, n_cols = logits.shape
    cdt = row_dtype(logits)
    plain = inv_temp == 1.0 and entropy is None and teacher is None
    if (plain and grad is not None and stats is None and softcap is None and not prob_target
            and beta is None and logits.dtype == cdt and grad.is_contiguous()
            and (grad.data_ptr() != logits.data_ptr() or logits.is_contiguous())):
        # the fused modes: the softmax into the gradient's buffer, then one multiply
        a, zt = alpha.to(cdt), zeta.to(cdt) if zeta is not None else None
        softmax_forward(logits, target, a, zt, loss, row_max, log_d, dlse, grad)
        softmax_grad_(grad, target, dlse, a)
        return
    if (plain and grad is None and stats is None and softcap is None and not prob_target
            and logits.dtype == cdt):
        w = weight.to(cdt) if weight is not None else None
        for rows in _chunks(n_rows, n_cols):
            _ce_forward_stats(logits[rows], target[rows], w, alpha[rows].to(cdt),
                              beta[rows].to(cdt) if beta is not None else None,
                              zeta[rows].to(cdt) if zeta is not None else None,
                              loss[rows], row_max[rows], log_d[rows], dlse[rows])
        return
    if (plain and grad is not None and grad.data_ptr() == logits.data_ptr() and logits.dtype == cdt
            and logits.is_contiguous() and grad.is_contiguous() and softcap is None
            and not prob_target and stats is None):
        w = weight.to(cdt) if weight is not None else None
        _ce_forward_in_place(logits, target, w, alpha.to(cdt),
                             beta.to(cdt) if beta is not None else None,
                             zeta.to(cdt) if zeta is not None else None,
                             loss, row_max, log_d, dlse)
        return
    w = weight.to(cdt) if weight is not None else None
    for rows in _chunks(n_rows, n_cols):
        raw = logits[rows].to(cdt)
        if argmax is not None:
            argmax[rows] = raw.argmax(dim=1)
        z, slope = _softcapped(raw, softcap, need_slope=grad is not None, inv_temp=inv_temp)
        a = alpha[rows].to(cdt)
        m = z.amax(dim=1)
        row_max_c = torch.where(m == float("-inf"), 0.0, m)
        log_d_c = (z - row_max_c[:, None]).exp_().sum(dim=1).log()
        lse_c = row_max_c + log_d_c
        if entropy is not None:
            entropy[rows] = _entropy(z, row_max_c)
        t = target[rows]
        s_wy = torch.zeros_like(lse_c)
        teacher_c = None
        if teacher is not None:
            y_logp, t_max, t_log_d = _teacher_log_probs(t, inv_temp, cdt)
            y = y_logp.exp()
            logp = (z - row_max_c[:, None]) - log_d_c[:, None]
            target_term = -torch.where(y > 0, y * logp, 0.0).sum(dim=1)
            if teacher_kl:
                target_term += torch.where(y > 0, y * y_logp, 0.0).sum(dim=1)
            # a teacher row of only -inf has no distribution: nan, as the kernels give
            target_term = torch.where(torch.isneginf(t_log_d), float("nan"), target_term)
            del y, y_logp
            s_wy = torch.ones_like(lse_c)
            dlse_c = a.clone()
            teacher_c = torch.stack([t_max, t_log_d], dim=1)
            teacher[rows] = teacher_c
        elif prob_target:
            y = t.to(cdt)
            wy = y * w if w is not None else y
            logp = (z - row_max_c[:, None]) - log_d_c[:, None]  # not z - lse: exact near +-1e4
            # y = 0 on a masked (-inf) logit contributes 0, not 0 * -inf
            target_term = -torch.where(wy != 0, wy * logp, 0.0).sum(dim=1)
            s_wy = wy.sum(dim=1)
            dlse_c = a * s_wy
        else:
            in_range = (t >= 0) & (t < n_cols)
            z_t = z.gather(1, torch.where(in_range, t, 0).long()[:, None])[:, 0]
            z_t = torch.where(in_range, z_t, row_max_c)
            target_term = (row_max_c - z_t) + log_d_c
            dlse_c = a.clone()
        loss_c = torch.where(a != 0, a * target_term, 0.0)
        smooth = torch.zeros_like(lse_c)
        if beta is not None:
            b = beta[rows].to(cdt)
            logp = (z - row_max_c[:, None]) - log_d_c[:, None]
            W = w.sum() if w is not None else float(n_cols)
            smooth = -(logp * w).sum(dim=1) if w is not None else -logp.sum(dim=1)
            loss_c += torch.where(b != 0, b * smooth, 0.0)
            dlse_c += b * W
        if zeta is not None:
            zt = zeta[rows].to(cdt)
            loss_c += torch.where(zt != 0, zt * lse_c * lse_c, 0.0)
            dlse_c += torch.where(zt != 0, 2.0 * zt * lse_c, 0.0)
        loss[rows] = loss_c
        row_max[rows] = row_max_c
        log_d[rows] = log_d_c
        dlse[rows] = dlse_c
        if stats is not None:
            stats[rows] = torch.stack([target_term, smooth, s_wy], dim=1)
        if grad is not None:
            g = _grad_chunk(z, slope, t, w, row_max_c, log_d_c, dlse_c, a,
                            beta[rows].to(cdt) if beta is not None else None, prob_target,
                            teacher_c, inv_temp)
            grad[rows] = g  # after every read of this chunk: grad may alias logits
            del g  # so the next chunk's temporaries can take its place


def _ce_backward_into(z, target, weight, row_max, log_d, dlse, alpha, beta, g):
    """ce_backward for class-index targets, no softcap, logits already in the compute
    dtype: the gradient is formed in the output itself, with no temporary and no copy,
    in three passes over it (sub into g; sub_, exp_ in place) when every row's dlse is
    positive (the coefficient goes into the exponent: s * dlse = exp(z - m - (log d -
    log dlse))), four otherwise.  Few, whole-tensor ops matter on a CPU more than bytes:
    every op ends in a barrier of the thread pool, and on a machine where another
    process holds a core each barrier waits for the descheduled thread (the general
    path's nine ops per chunk of 4M logits ran at 0.8x torch's speed there)."""
    torch.sub(z, row_max[:, None], out=g)
    if bool((dlse > 0).all()):  # a host read: free on CPU
        g.sub_((log_d - dlse.log())[:, None]).exp_()
    else:
        g.sub_(log_d[:, None]).exp_().mul_(dlse[:, None])
    _sub_onehot(g, target, alpha)
    if beta is not None:
        g.sub_(beta[:, None] * (weight if weight is not None else 1.0))
    _zero_ignored(g, dlse, alpha, beta)


def ce_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad, prob_target, softcap,
                *, inv_temp=1.0, teacher=None, ent=None):
    n_rows, n_cols = logits.shape
    cdt = row_dtype(logits)
    w = weight.to(cdt) if weight is not None else None
    # (g may be the logits themselves: every op below is elementwise, so in place is safe)
    if (not prob_target and softcap is None and logits.dtype == cdt and grad.dtype == cdt
            and inv_temp == 1.0 and ent is None):
        _ce_backward_into(logits, target, w, row_max.to(cdt), log_d.to(cdt), dlse.to(cdt),
                          alpha.to(cdt), beta.to(cdt) if beta is not None else None, grad)
        return
    for rows in _chunks(n_rows, n_cols):
        z, slope = _softcapped(logits[rows].to(cdt), softcap, inv_temp=inv_temp)
        g = _grad_chunk(z, slope, target[rows], w, row_max[rows].to(cdt), log_d[rows].to(cdt),
                        dlse[rows].to(cdt),
                        alpha[rows].to(cdt), beta[rows].to(cdt) if beta is not None else None,
                        prob_target, teacher[rows].to(cdt) if teacher is not None else None,
                        inv_temp, ent[rows].to(cdt) if ent is not None else None)
        grad[rows] = g
        del g  # so the next chunk's temporaries can take its place

def ce_scale(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i], a chunk of rows at a time."""
    for rows in _chunks(*grad.shape):
        grad[rows] *= scale[rows, None].to(grad.dtype)

def _logits_chunk(x_rows, w, b, cdt):
    z = (x_rows @ w.t()).to(cdt)
    if b is not None:
        z += b.to(cdt)
    return z

def lce_stats(x, w, b, target, class_weight, need_smooth, softcap, inv_temp=1.0):
    n_rows, n_vocab = x.shape[0], w.shape[0]
    cdt = row_dtype(x)
    row_max, log_d, unused_loss, unused_dlse = (torch.empty(n_rows, dtype=cdt, device=x.device)
                                      for _ in range(4))
    stats = torch.empty(n_rows, 3, dtype=cdt, device=x.device)
    ones = torch.ones(n_rows, dtype=cdt, device=x.device)
    for rows in _chunks(n_rows, n_vocab):
        z = _logits_chunk(x[rows], w, b, cdt)
        ce_forward(z, target[rows], class_weight, ones[rows],
                           ones[rows] if need_smooth else None, None,
                           unused_loss[rows], row_max[rows], log_d[rows], unused_dlse[rows], None, False,
                           softcap, stats[rows], inv_temp=inv_temp)
    return row_max, log_d, stats[:, 0], stats[:, 1] if need_smooth else None

def lce_backward(x, w, b, target, class_weight, row_max, log_d, dlse, alpha, beta, softcap,
               need_dx, need_dw, need_db, inv_temp=1.0):
    n_rows, dim = x.shape
    n_vocab = w.shape[0]
    cdt = row_dtype(x)
    dx = torch.zeros(n_rows, dim, dtype=cdt, device=x.device) if need_dx else row_max.new_empty(0)
    dw = torch.zeros(n_vocab, dim, dtype=cdt, device=x.device) if need_dw else row_max.new_empty(0)
    db = torch.zeros(n_vocab, dtype=cdt, device=x.device) if need_db else row_max.new_empty(0)
    cw = class_weight.to(cdt) if class_weight is not None else None
    for rows in _chunks(n_rows, n_vocab):
        z, slope = _softcapped(_logits_chunk(x[rows], w, b, cdt), softcap, inv_temp=inv_temp)
        g = _grad_chunk(z, slope, target[rows], cw, row_max[rows], log_d[rows], dlse[rows],
                                alpha[rows],
                                beta[rows] if beta is not None else None, False)
        if need_dx:
            # G rounded to the weight's dtype, as the kernel does: no fp32 copy of W
            dx[rows] = (g.to(w.dtype) @ w).to(cdt)
        if need_dw:
            dw.addmm_(g.t(), x[rows].to(cdt))
        if need_db:
            db += g.sum(dim=0)
    return dx, dw, db
