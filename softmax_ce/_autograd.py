"""The autograd Functions: the custom ops of `_ops` with their gradients.

Layer: above `_ops` (its only import in the package), below the public functions.
`recompute_grad` is the recompute strategy's backward, shared by the plain and the
vocabulary-parallel loss.
"""

import dataclasses
from typing import Optional

import torch

from . import _ops

def recompute_grad(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad_loss, grad_lse,
                   prob_target, softcap, inplace):
    """The recompute strategy's backward: d loss / d logits from the forward's saved row
    statistics and coefficients, written over the logits (inplace) or into a new tensor.
    Shared by CrossEntropyFunction and the vocabulary-parallel function; first order
    only (CrossEntropyFunction differentiates twice through _differentiable_grad)."""
    if torch.is_grad_enabled():
        raise RuntimeError("softmax_ce.cross_entropy: double backward (create_graph=True) is "
                           "not supported with process_group (vocabulary parallelism)")
    g = grad_loss.to(dlse.dtype)
    dlse = g * dlse
    if grad_lse is not None:
        dlse = dlse + grad_lse
    args = (target, weight, row_max, log_d, dlse, g * alpha, g * beta if beta is not None else None,
            prob_target, softcap)
    if inplace:
        _ops.inplace_bwd(logits, *args)
        return logits
    return _ops.bwd(logits, *args)


class CrossEntropyCore(torch.autograd.Function):
    """Autograd over (n_rows, n_cols) logits -> (loss_rows, lse, row_max, log_d, dlse, extra):
    the per-row losses and log-sum-exp ((n_rows,) fp32, float64 for float64 logits), then
    the forward's saved statistics (non-differentiable; callers keep the first two).

    grad_mode "recompute": the forward saves the row max m, log d (lse = m + log d)
    and the row coefficients; the backward reads the logits once more and writes the
    gradient scaled by grad_output (3 passes' worth of bytes in all: read, read, write).
    grad_mode "fused": the forward also writes the gradient for grad_output = 1 (`extra`,
    or the logits themselves in place); the backward rescales it in place, a no-op on
    the GPU when grad_output == 1.  That in-place rescale means one backward per forward
    (no retain_graph re-runs, no gradcheck): autograd raises its in-place error on a
    second one.  `extra` is otherwise empty, or, fused and in place with a probability
    target that requires grad, a copy of the logits made before they are overwritten.
    grad_mode "softmax" (internal, chosen by training_grad_mode for the PyTorch path): as
    "recompute", and the forward also writes softmax(z) (`extra`, kept on ctx), which the
    first backward rescales in place into the gradient; anything else recomputes.
    inplace: the gradient is written into the logits' storage; the write bumps the
    logits' version counter (the out-variant op under torch.compile, explicitly in
    eager), so autograd makes any later use of those logits in a backward raise instead
    of reading a gradient as logits.

    Beyond first order (setup_context style, so torch.func works; vmap through the ops'
    batching rules): a backward that must itself be differentiable (create_graph=True,
    torch.func.grad / vjp, gradgradcheck) and the forward-mode `jvp` use
    `_differentiable_grad`, the same gradient in plain PyTorch ops on the saved inputs;
    grad_mode="fused" and inplace cannot, and raise (`higher_order_error`).  The jvp is
    CrossEntropyFunction's, this class's subclass.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, alpha, beta, zeta, prob_target, softcap, grad_mode,
                inplace):
        args = (target, weight, alpha, beta, zeta, prob_target, softcap)
        extra = None
        if grad_mode == "fused":
            if inplace:
                if prob_target and target.requires_grad:
                    # before the forward overwrites the logits with the gradient
                    extra = logits.detach().clone()
                loss, row_max, log_d, dlse = _ops.inplace_fwd_grad(logits, *args)
            else:
                loss, row_max, log_d, dlse, extra = _ops.fwd_grad(logits, *args)
        elif grad_mode == "softmax" and not inplace:
            loss, row_max, log_d, dlse, extra = _ops.softmax_fwd(logits, target, alpha, zeta)
        else:
            loss, row_max, log_d, dlse = _ops.fwd(logits, *args)
        if extra is None:
            extra = row_max.new_empty(0)
        return loss, row_max + log_d, row_max, log_d, dlse, extra

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, alpha, beta, zeta, prob_target, softcap, grad_mode, inplace = inputs
        _, lse, row_max, log_d, dlse, extra = output
        ctx.fused = grad_mode == "fused"
        ctx.prob_target, ctx.softcap, ctx.inplace = prob_target, softcap, inplace
        ctx.needs_target_grad = prob_target and ctx.needs_input_grad[1]
        ctx.mark_non_differentiable(row_max, log_d, dlse, extra)
        # no zero cotangents for the outputs callers drop (`extra` is logits-sized)
        ctx.set_materialize_grads(False)
        if ctx.fused:
            ctx.mark_non_differentiable(lse)
            grad = logits if inplace else extra
            # the logits as the forward read them, for d loss / d target
            target_logits = (extra if inplace else logits) if ctx.needs_target_grad else None
            ctx.save_for_backward(grad, target_logits, row_max, log_d, alpha, weight)
        else:
            ctx.save_for_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta,
                                  zeta)
            ctx.save_for_forward(logits, target, weight, alpha, beta, zeta)
            # grad_mode "softmax": the forward's softmax, which the first backward turns into
            # the gradient in place.  Kept on ctx, not saved: the saved-tensor version check
            # would make a second backward (retain_graph) raise, where it recomputes the
            # softmax with the same op instead, so that both give the same bits.
            # In place, the backward writes the softmax over the logits instead.
            ctx.softmax_mode = grad_mode == "softmax"
            ctx.soft = extra if ctx.softmax_mode and not inplace else None

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, *_):
        if grad_loss is None:  # only the lse was used
            grad_loss = torch.zeros_like(ctx.saved_tensors[4 if ctx.fused else 6])  # alpha
        if torch.is_grad_enabled():
            # create_graph=True or a torch.func transform: this gradient is differentiated
            # again, so it is built from differentiable ops rather than the kernels
            if ctx.fused or ctx.inplace:
                raise higher_order_error("double backward (create_graph=True, "
                                         "gradgradcheck, torch.func.grad/vjp)", ctx.fused)
            logits, target, weight, _, _, _, alpha, beta, zeta = ctx.saved_tensors
            grad_logits, grad_target = _differentiable_grad(
                logits, target, weight, alpha, beta, zeta, grad_loss, grad_lse,
                ctx.prob_target, ctx.softcap, ctx.needs_input_grad[0], ctx.needs_target_grad)
            return (grad_logits, grad_target) + (None,) * 8
        grad_logits = grad_target = None
        if ctx.fused:
            grad, target_logits, row_max, log_d, alpha, weight = ctx.saved_tensors
            if ctx.needs_target_grad:
                grad_target = _probability_target_grad(target_logits, row_max, log_d, alpha,
                                                       weight, grad_loss, ctx.softcap)
            if ctx.needs_input_grad[0]:
                _ops.inplace_scale(grad, grad_loss.float())
                grad_logits = grad
        else:
            logits, target, weight, row_max, log_d, dlse, alpha, beta, _ = ctx.saved_tensors
            if ctx.needs_target_grad:
                # before an in-place backward overwrites the logits
                grad_target = _probability_target_grad(logits, row_max, log_d, alpha, weight,
                                                       grad_loss, ctx.softcap)
            if ctx.needs_input_grad[0] and ctx.softmax_mode and not _batched(grad_loss, grad_lse):
                soft, ctx.soft = ctx.soft, None  # handed out once
                if ctx.inplace:
                    soft = _ops.softmax_(logits)
                elif soft is None:
                    soft = _ops.softmax(logits)
                g = grad_loss.to(dlse.dtype)
                coef = g * dlse if grad_lse is None else g * dlse + grad_lse
                _ops.softmax_grad_(soft, target, coef, g * alpha)
                grad_logits = soft
            elif ctx.needs_input_grad[0]:
                grad_logits = recompute_grad(logits, target, weight, row_max, log_d, dlse, alpha,
                                             beta, grad_loss, grad_lse, ctx.prob_target,
                                             ctx.softcap, ctx.inplace)
        return (grad_logits, grad_target) + (None,) * 8


class CrossEntropyFunction(CrossEntropyCore):
    """CrossEntropyCore with forward-mode AD: what eager code runs.  torch.compile traces
    CrossEntropyCore instead (`cross_entropy_function`): Dynamo refuses a custom jvp."""

    @staticmethod
    def jvp(ctx, t_logits, t_target, *_):
        """Forward mode: the loss's tangent is sum_c (d loss / d z_c) v_c per row (the
        gradient for grad_output = 1, options' coefficients and softcap slope included),
        plus alpha * sum_c w_c (lse - z'_c) dy_c for a probability target; the lse's is
        sum_c s_c (dz'_c / dz_c) v_c."""
        if ctx.fused:
            raise higher_order_error("forward-mode AD (torch.func.jvp, "
                                     "torch.autograd.forward_ad)", True)
        logits, target, weight, alpha, beta, zeta = ctx.saved_tensors
        zc, slope, lse, s = _softmax_parts(logits, alpha.dtype, ctx.softcap)
        t_loss = t_lse = None
        if t_logits is not None:
            v = t_logits.to(alpha.dtype)
            ones = torch.ones_like(alpha)
            grad, _ = _differentiable_grad(logits, target, weight, alpha, beta, zeta, ones, None,
                                           ctx.prob_target, ctx.softcap, True, False,
                                           parts=(zc, slope, lse, s))
            t_loss = (grad * v).sum(dim=1)
            sv = s * v if slope is None else s * slope * v
            t_lse = sv.sum(dim=1)
        if ctx.prob_target and t_target is not None:
            dy = alpha[:, None] * (lse[:, None] - zc)
            if weight is not None:
                dy = dy * weight
            t_y = (dy * t_target.to(alpha.dtype)).sum(dim=1)
            t_loss = t_y if t_loss is None else t_loss + t_y
        if t_loss is None:
            t_loss = torch.zeros_like(alpha)
        if t_lse is None:
            t_lse = torch.zeros_like(alpha)
        return t_loss, t_lse, None, None, None, None


def _batched(*grads):
    """Whether a backward's incoming gradients are vmapped (is_grads_batched, batched
    gradcheck): the in-place softmax path cannot take them, the recompute ops can."""
    F = torch._C._functorch
    return any(g is not None and (F.is_functorch_wrapped_tensor(g) or F.is_legacy_batchedtensor(g))
               for g in grads)


def training_grad_mode(logits, grad_mode, inplace, prob_target, softcap, beta):
    """The grad_mode the Function runs: "softmax" in place of "recompute" where the back end
    keeps the forward's softmax for the backward (_ops.caches_softmax: the PyTorch path),
    for class-index targets without label smoothing or softcap, in eager first-order
    training; grad_mode otherwise.  In place (contiguous logits), the backward writes the
    softmax over the logits and rescales it there.  "softmax" is "recompute" in
    everything but speed and when the buffer is made: the logits are saved as well, so a
    backward that must be differentiated (create_graph, torch.func), the jvp and a second
    backward over the same graph recompute from them, while the first plain backward only
    rescales the softmax."""
    if (grad_mode == "recompute" and (not inplace or logits.is_contiguous())
            and not prob_target and softcap is None
            and beta is None and torch.is_grad_enabled() and logits.requires_grad
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(logits)
            and _ops.caches_softmax(logits)):
        return "softmax"
    return grad_mode


def cross_entropy_function():
    """The Function a call runs: CrossEntropyFunction, or CrossEntropyCore under torch.compile."""
    return CrossEntropyCore if torch.compiler.is_compiling() else CrossEntropyFunction


def higher_order_error(what, fused):
    mode = ('grad_mode="fused" (its gradient is written by the forward and only rescaled)'
            if fused else
            "inplace_backward=True (its gradient overwrites the logits)")
    return RuntimeError(f"softmax_ce.cross_entropy: {what} is not supported with {mode}; "
                        f"use the default grad_mode=\"recompute\" with inplace_backward=False")


def _softmax_parts(logits, dtype, softcap):
    """(z', dz'/dz or None, lse, softmax) of a row block, in differentiable PyTorch ops.
    The softcap's slope is sech^2(z / softcap) as 4 e / (1 + e)^2, e = exp(-2|z / softcap|),
    as the kernels write it (1 - tanh^2 cancels to 0 for large |z|)."""
    z = logits.to(dtype)
    slope = None
    if softcap is not None:
        u = z / softcap
        e = torch.exp(-2.0 * u.abs())
        slope = 4.0 * e / (1.0 + e) ** 2
        z = softcap * torch.tanh(u)
    lse = torch.logsumexp(z, dim=1)
    s = torch.exp(z - lse[:, None])
    return z, slope, lse, s


def _differentiable_grad(logits, target, weight, alpha, beta, zeta, grad_loss, grad_lse,
                         prob_target, softcap, need_logits, need_target, parts=None):
    """(d loss / d logits, d loss / d target) for the per-row losses' cotangent grad_loss
    (and the lse's, grad_lse), in plain differentiable PyTorch ops, so that they can be
    differentiated again (the Hessian-vector product of softmax cross-entropy,
    c * s * (v - sum(s * v)) per row, chained through the softcap) and batched by vmap.
    The formula of the kernels (see README, "The math"):
        d loss_i / d z'_i = (alpha_i S_i + beta_i W + 2 zeta_i lse_i) s_i - alpha_i y~_i - beta_i w
    with S_i = sum_c w_c y_ic and y~ = w * y for probability targets (S_i = 1 and y~ the one-hot
    target for class indices), W = sum_c w_c; rows whose coefficients are all 0 get 0."""
    dt = alpha.dtype
    zc, slope, lse, s = parts if parts is not None else _softmax_parts(logits, dt, softcap)
    n_cols = zc.shape[1]
    g = grad_loss.to(dt)
    ga = g * alpha
    grad_logits = grad_target = None
    if need_logits:
        if prob_target:
            wy = target.to(dt) if weight is None else target.to(dt) * weight
            coef = ga * wy.sum(dim=1)
            sub = ga[:, None] * wy
        else:
            # ignored rows have alpha = 0: any in-range column will do for them
            cols = torch.where((target >= 0) & (target < n_cols), target, 0).long()[:, None]
            sub = torch.zeros_like(s).scatter(1, cols, ga[:, None])
            coef = ga
        active = alpha != 0
        if beta is not None:
            gb = g * beta
            coef = coef + gb * (weight.sum() if weight is not None else float(n_cols))
            sub = sub + gb[:, None] * (weight if weight is not None else 1.0)
            active = active | (beta != 0)
        if zeta is not None:
            coef = coef + 2.0 * g * zeta * lse
        if grad_lse is not None:
            coef = coef + grad_lse.to(dt)
            active = active | (grad_lse != 0)
        grad = coef[:, None] * s - sub
        if slope is not None:
            grad = grad * slope
        # as the kernels: a row with nothing to contribute is 0, even where its logits are nan
        grad_logits = torch.where(active[:, None], grad, 0.0).to(logits.dtype)
    if need_target:
        grad_target = ga[:, None] * (lse[:, None] - zc)
        if weight is not None:
            grad_target = grad_target * weight
        grad_target = grad_target.to(target.dtype)
    return grad_logits, grad_target


def _probability_target_grad(logits, row_max, log_d, alpha, weight, grad_loss, softcap):
    """d loss / d y for probability targets: alpha * w * (lse - z').  Rare, so plain PyTorch."""
    z = logits.to(row_max.dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    g = (grad_loss.to(row_max.dtype) * alpha)[:, None] * ((row_max[:, None] - z) + log_d[:, None])
    return g * weight if weight is not None else g


def linear_recompute_grads(params, x, weight, bias, target, class_weight, row_max, log_d, dlse,
                           alpha, beta, grad_loss, grad_lse, need_dx, need_dw, need_db,
                           grad_entropy=None, entropy=None):
    """The linear cross-entropy's recomputing backward: (dx, dw, db) from the forward's row
    statistics and coefficients scaled by grad_output (plus the lse's and the entropy's
    own gradients), by params.impl.  Shared by LinearCrossEntropyFunction and the
    vocabulary-parallel one."""
    if torch.is_grad_enabled():
        raise linear_higher_order_error("double backward (create_graph=True, gradgradcheck)")
    g = grad_loss.to(dlse.dtype)
    if g.dim() == 0:
        g = g.expand(dlse.shape)
    dlse = g * dlse
    if grad_lse is not None:
        dlse = dlse + grad_lse.to(dlse.dtype)
    args = (x, weight, bias, target, class_weight, row_max, log_d, dlse, g * alpha,
            g * beta if beta is not None else None, params.softcap, need_dx, need_dw, need_db)
    if params.impl == "fused":
        return _ops.lce_bwd(*args, params.filter_eps, params.inv_temp)
    ent = None
    if grad_entropy is not None:
        # d H / d z'' = s (E_s[z''] - z''), E_s[z''] = lse - H
        ent = torch.stack([grad_entropy.to(dlse.dtype), (row_max + log_d) - entropy], dim=1)
    return _ops.lce_chunked_bwd(*args, params.chunk_rows, params.accum_dtype, params.inv_temp,
                                ent)


def linear_higher_order_error(what):
    return RuntimeError(
        f"softmax_ce.linear_cross_entropy: {what} is not supported (first-order gradients "
        f"only); for it, compute cross_entropy(F.linear(input, weight, bias), target) "
        f"with softmax_ce.cross_entropy, which supports it")


@dataclasses.dataclass(frozen=True)
class LinearParams:
    """How LinearCrossEntropyFunction runs (everything but tensors).

    impl: "chunked" (logits a chunk of rows at a time on the matmul library, the
        cross-entropy kernels in place on each chunk) or "fused" (one Triton kernel per
        tile, logits never stored at all).
    grad_in_forward: chunked only: compute the gradients in the forward pass (the loss
        is reduced to a scalar, so grad_output scales them exactly) -> the Function
        returns the summed loss; else the per-row losses, and the backward recomputes.
    chunk_rows: rows per chunk; accum_dtype: of dW and db (chunked); filter_eps: fused
        only, 0 (exact) or the gradient filter's threshold.
    allow_retain_graph: grad_in_forward only: the backward scales the forward's gradients
        in place (no second weight-sized buffer), so a second backward raises; True keeps
        them and scales copies (as torch's LinearCrossEntropyOptions.allow_retain_graph).
    inv_temp: 1 / temperature; token_stats: chunked only, the entropy and argmax of each
        row from the forward's pass (then the gradients are recomputed in the backward,
        where the entropy's gradient is known)."""
    softcap: Optional[float]
    impl: str = "chunked"
    grad_in_forward: bool = False
    chunk_rows: int = 1
    accum_dtype: torch.dtype = torch.float32
    filter_eps: float = 0.0
    allow_retain_graph: bool = False
    inv_temp: float = 1.0
    token_stats: bool = False


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over x (N, D), weight (V, D), bias (V,) -> (loss, lse, entropy, argmax):
    loss the per-row losses (N,) fp32, or their sum when params.grad_in_forward; lse (N,)
    fp32, the per-row log-sum-exp (differentiable unless grad_in_forward); entropy (N,)
    (differentiable) and argmax (N,) int64 when params.token_stats, else empty."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, alpha, beta, zeta, params):
        ctx.params = params
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.precomputed = params.grad_in_forward and (need_dx or need_dw or need_db)
        entropy = argmax = x.new_empty(0)
        if params.impl == "fused":
            loss, row_max, log_d, dlse = _ops.lce_fwd(x, weight, bias, target, class_weight,
                                                      alpha, beta, zeta, params.softcap,
                                                      params.inv_temp)
        elif ctx.precomputed:
            loss, row_max, log_d, dlse, dx, dw, db = _ops.lce_chunked(
                x, weight, bias, target, class_weight, alpha, beta, zeta, params.softcap,
                need_dx, need_dw, need_db, params.chunk_rows, params.accum_dtype,
                params.inv_temp, False)[:7]
            ctx.save_for_backward(dx if need_dx else None, dw if need_dw else None,
                                  db if need_db else None)
        else:
            loss, row_max, log_d, dlse, _, _, _, entropy, argmax = _ops.lce_chunked(
                x, weight, bias, target, class_weight, alpha, beta, zeta, params.softcap,
                False, False, False, params.chunk_rows, params.accum_dtype, params.inv_temp,
                params.token_stats)
        if not ctx.precomputed:
            ctx.save_for_backward(x, weight, bias, target, class_weight, row_max, log_d, dlse,
                                  alpha, beta, entropy)
        ctx.mark_non_differentiable(argmax)
        lse = row_max + log_d
        if params.grad_in_forward:
            ctx.mark_non_differentiable(lse)
            return loss.sum(), lse, entropy, argmax
        return loss, lse, entropy, argmax

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy=None, grad_argmax=None):
        if torch.is_grad_enabled():
            # the gradients come from kernels (or from the forward) with no graph of their
            # own: differentiating them again would give zeros, so refuse
            raise linear_higher_order_error("double backward (create_graph=True, gradgradcheck)")
        p = ctx.params
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.precomputed:
            # computed in the forward for grad_output = 1: the loss is a sum, so grad_output
            # (a scalar) scales every gradient alike; in place unless the graph may be kept
            if getattr(ctx, "consumed", False):
                raise RuntimeError(
                    "softmax_ce.linear_cross_entropy: this loss's gradients, computed in its "
                    "forward, were consumed by a first backward; for retain_graph=True pass "
                    "options=LinearCrossEntropyOptions(allow_retain_graph=True)")
            ctx.consumed = not p.allow_retain_graph
            grads = []
            for t, dt in zip(ctx.saved_tensors, ctx.dtypes):
                if t is None:
                    grads.append(None)
                    continue
                g = grad_loss.to(torch.promote_types(t.dtype, torch.float32))
                grads.append((t.mul_(g) if not p.allow_retain_graph and t.dtype == g.dtype
                              else t * g).to(dt))
            return (*grads, None, None, None, None, None, None)
        (x, weight, bias, target, class_weight, row_max, log_d, dlse, alpha, beta,
         entropy) = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        if not p.token_stats:
            grad_entropy = None
        dx, dw, db = linear_recompute_grads(p, x, weight, bias, target, class_weight, row_max,
                                            log_d, dlse, alpha, beta, grad_loss, grad_lse,
                                            need_dx, need_dw, need_db, grad_entropy, entropy)
        return (dx.to(x_dtype) if need_dx else None,
                dw.to(w_dtype) if need_dw else None,
                db.to(b_dtype) if need_db else None,
                None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        raise linear_higher_order_error("forward-mode AD (torch.func.jvp, "
                                        "torch.autograd.forward_ad)")
