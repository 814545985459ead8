"""Temperature, per-token statistics and teacher logits: the ops and the autograd Function.

What training loops log and RL and distillation recipes need, from the same single pass
over each row of logits that computes the loss (no second read, no N x V temporary):

* temperature T: the softmax sees z'' = softcap(z) / T (softcap first: it belongs to
  the model, T to how its output is read); the gradient carries the 1 / T;
* entropy H = -sum s log s of s = softmax(z''), kept as log d - sum s (z'' - m) so a
  confident row loses nothing to cancellation; differentiable: d H / d z'' = s (E_s[z''] - z'');
* argmax of the raw logits (ties and nan as torch.argmax), and from it token accuracy;
* teacher logits t as the target: y = softmax(t / T) is formed tile by tile beside the
  student's row (online, with its own max and sum), never as a tensor.

Bytes per logit element beyond the plain loss's (b = bytes of the logits' dtype), as
kernels/cross_entropy.py counts them: temperature, entropy and argmax add none (a few
registers and O(1) per row: entropy fp32, argmax int64, and for the backward of the
entropy two fp32 per row); teacher logits add one read of the teacher's row per pass
(b_t, its dtype's size: forward and backward each read it once).

Layer: above `_launch` and `_rows` (its only imports in the package), beside `_autograd`;
functional.py routes a call here when one of these options is asked for.
"""

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from . import _launch
from . import _rows as R


class CrossEntropyOutput(NamedTuple):
    """What `cross_entropy(..., return_entropy=/return_argmax=/return_accuracy=True)`
    returns: the loss first, then each statistic asked for (None where not asked).

    lse, entropy, argmax: per token (the target's shape); lse and entropy fp32 (float64
    for float64 input), of the logits the softmax saw (after softcap and temperature);
    entropy is differentiable; argmax (int64) is of the raw input logits.  accuracy: a
    0-dim fp32, the fraction of the non-ignored tokens whose argmax is the target (nan
    when every token is ignored)."""

    loss: Tensor
    lse: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    argmax: Optional[Tensor] = None
    accuracy: Optional[Tensor] = None


def _row_dtype(logits: Tensor):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("softmax_ce::xfwd", mutates_args=())
def xfwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], alpha: Tensor,
         beta: Optional[Tensor], zeta: Optional[Tensor], prob_target: bool,
         softcap: Optional[float], inv_temp: float, token_stats: bool, teacher: bool,
         teacher_kl: bool) -> List[Tensor]:
    """-> [loss, row_max, log_d, dlse, entropy, argmax, teacher_rows]: per row, fp32
    (float64 on the float64 path); entropy and argmax (int64) empty unless token_stats,
    teacher_rows (n_rows, 2: the teacher's max and log d of t / T) empty unless teacher."""
    loss, row_max, log_d, dlse, entropy, argmax, teacher_rows = _xfwd_outputs(
        logits, token_stats, teacher)
    _launch.forward_into(logits, target, weight, alpha, beta, zeta, loss, row_max, log_d, dlse,
                         None, prob_target, softcap, inv_temp=inv_temp,
                         entropy=entropy if token_stats else None,
                         argmax=argmax if token_stats else None,
                         teacher=teacher_rows if teacher else None, teacher_kl=teacher_kl)
    return [loss, row_max, log_d, dlse, entropy, argmax, teacher_rows]


def _xfwd_outputs(logits, token_stats, teacher):
    n_rows = logits.shape[0]
    dt = _row_dtype(logits)
    rows = [logits.new_empty(n_rows, dtype=dt) for _ in range(4)]
    n_stat = n_rows if token_stats else 0
    return rows + [logits.new_empty(n_stat, dtype=dt),
                   logits.new_empty(n_stat, dtype=torch.int64),
                   logits.new_empty(n_rows if teacher else 0, 2, dtype=dt)]


@xfwd.register_fake
def _(logits, target, weight, alpha, beta, zeta, prob_target, softcap, inv_temp, token_stats,
      teacher, teacher_kl):
    return _xfwd_outputs(logits, token_stats, teacher)


@torch.library.custom_op("softmax_ce::xfwd_stats", mutates_args=())
def xfwd_stats(logits: Tensor, target: Tensor, weight: Optional[Tensor], need_smooth: bool,
               prob_target: bool, softcap: Optional[float], inv_temp: float,
               token_stats: bool, teacher: bool, teacher_kl: bool) -> List[Tensor]:
    """One vocabulary slice's rows for softmax_ce.distributed, as _ops.fwd_stats, plus the
    slice's own entropy and argmax and teacher rows (empty where not asked):
    -> [row_max, log_d, stats (n_rows, 3), entropy, argmax, teacher_rows]."""
    loss, row_max, log_d, dlse, entropy, argmax, teacher_rows = _xfwd_outputs(
        logits, token_stats, teacher)
    ones = torch.ones_like(loss)
    stats = ones.new_zeros(logits.shape[0], 3)
    _launch.forward_into(logits, target, weight, ones, ones if need_smooth else None, None,
                         loss, row_max, log_d, dlse, None, prob_target, softcap, stats,
                         inv_temp=inv_temp, entropy=entropy if token_stats else None,
                         argmax=argmax if token_stats else None,
                         teacher=teacher_rows if teacher else None, teacher_kl=teacher_kl)
    return [row_max, log_d, stats, entropy, argmax, teacher_rows]


@xfwd_stats.register_fake
def _(logits, target, weight, need_smooth, prob_target, softcap, inv_temp, token_stats, teacher,
      teacher_kl):
    _, row_max, log_d, _, entropy, argmax, teacher_rows = _xfwd_outputs(logits, token_stats,
                                                                        teacher)
    return [row_max, log_d, row_max.new_empty(logits.shape[0], 3), entropy, argmax, teacher_rows]


def recompute_grad(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad_loss,
                   grad_lse, grad_entropy, entropy, prob_target, softcap, inv_temp,
                   teacher_rows, inplace):
    """The backward of these options: d (loss, lse, entropy) / d logits from the forward's
    saved rows (the global ones, for a vocabulary slice), over the logits (inplace) or
    into a new tensor.  Shared by ExtendedCrossEntropyFunction and softmax_ce.distributed."""
    if torch.is_grad_enabled():
        raise RuntimeError("softmax_ce.cross_entropy: double backward (create_graph=True) is "
                           "not supported with temperature, return_entropy/argmax/accuracy "
                           "or target_logits")
    g = grad_loss.to(dlse.dtype) if grad_loss is not None else torch.zeros_like(dlse)
    dlse_g = g * dlse
    if grad_lse is not None:
        dlse_g = dlse_g + grad_lse
    ent = None
    if grad_entropy is not None:
        # d H / d z'' = s (E_s[z''] - z''), E_s[z''] = lse - H
        ent = torch.stack([grad_entropy.to(dlse.dtype), (row_max + log_d) - entropy], dim=1)
    args = (target, weight, row_max, log_d, dlse_g, g * alpha,
            g * beta if beta is not None else None, prob_target, softcap, inv_temp,
            teacher_rows, ent)
    if inplace:
        _inplace_xbwd(logits, *args)
        return logits
    return torch.ops.softmax_ce.xbwd(logits, *args)


@torch.library.custom_op("softmax_ce::xbwd", mutates_args=())
def xbwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
         log_d: Tensor, dlse: Tensor, alpha: Tensor, beta: Optional[Tensor], prob_target: bool,
         softcap: Optional[float], inv_temp: float, teacher_rows: Optional[Tensor],
         ent: Optional[Tensor]) -> Tensor:
    """-> d loss / d logits (n_rows, n_cols); grad_output is already in the coefficients,
    ent (n_rows, 2) holds d loss / d entropy and sum s z'' per row."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _launch.backward_into(logits, target, weight, row_max, log_d, dlse, alpha, beta, grad,
                          prob_target, softcap, inv_temp=inv_temp, teacher=teacher_rows, ent=ent)
    return grad


@xbwd.register_fake
def _(logits, target, weight, row_max, log_d, dlse, alpha, beta, prob_target, softcap, inv_temp,
      teacher_rows, ent):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("softmax_ce::xbwd_", mutates_args=("logits",))
def xbwd_(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
          log_d: Tensor, dlse: Tensor, alpha: Tensor, beta: Optional[Tensor], prob_target: bool,
          softcap: Optional[float], inv_temp: float, teacher_rows: Optional[Tensor],
          ent: Optional[Tensor]) -> None:
    """xbwd written over the logits (inplace_backward=True)."""
    _launch.backward_into(logits, target, weight, row_max, log_d, dlse, alpha, beta, logits,
                          prob_target, softcap, inv_temp=inv_temp, teacher=teacher_rows, ent=ent)


def _inplace_xbwd(logits, *args):
    if torch.compiler.is_compiling():
        torch.ops.softmax_ce.xbwd_(logits, *args)
        return
    # eager: the launcher itself, and the version bump the op would make, so that autograd
    # refuses a later backward that would read these logits (now a gradient)
    with torch.no_grad():
        _launch.backward_into(logits, *args[:7], logits, *args[7:9], inv_temp=args[9],
                              teacher=args[10], ent=args[11])
    torch.autograd.graph.increment_version(logits)


class ExtendedCrossEntropyFunction(torch.autograd.Function):
    """Autograd over (n_rows, n_cols) logits -> (loss_rows, lse, entropy, argmax, row_max,
    log_d, dlse, teacher_rows), the recompute strategy only: the forward saves per row the
    max, log d (and the teacher's two numbers), the backward reads the logits (and the
    teacher's row) once more and writes the gradient of the loss, the lse and the entropy
    together.  argmax and the saved rows are not differentiable; teacher logits receive
    no gradient (the caller refuses a teacher that requires one)."""

    @staticmethod
    def forward(ctx, logits, target, weight, alpha, beta, zeta, prob_target, softcap, inv_temp,
                token_stats, teacher, teacher_kl, inplace):
        loss, row_max, log_d, dlse, entropy, argmax, teacher_rows = torch.ops.softmax_ce.xfwd(
            logits, target, weight, alpha, beta, zeta, prob_target, softcap, inv_temp,
            token_stats, teacher, teacher_kl)
        lse = row_max + log_d
        ctx.args = (prob_target, softcap, inv_temp, teacher, inplace, token_stats)
        ctx.mark_non_differentiable(argmax, row_max, log_d, dlse, teacher_rows)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, target, weight, row_max, log_d, dlse, alpha, beta,
                              entropy, teacher_rows)
        return loss, lse, entropy, argmax, row_max, log_d, dlse, teacher_rows

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy, *_):
        prob_target, softcap, inv_temp, teacher, inplace, token_stats = ctx.args
        if not ctx.needs_input_grad[0]:
            return (None,) * 13
        (logits, target, weight, row_max, log_d, dlse, alpha, beta, entropy,
         teacher_rows) = ctx.saved_tensors
        # without token statistics the entropy output is empty; torch.compile still hands
        # it a (materialised, empty) gradient
        grad = recompute_grad(logits, target, weight, row_max, log_d, dlse, alpha, beta,
                              grad_loss, grad_lse, grad_entropy if token_stats else None,
                              entropy, prob_target, softcap, inv_temp,
                              teacher_rows if teacher else None, inplace)
        return (grad,) + (None,) * 12

def wanted(temperature, return_entropy, return_argmax, return_accuracy, target_logits, kl) -> bool:
    """Whether a call needs this module (otherwise the plain Function runs)."""
    return (temperature != 1.0 or return_entropy or return_argmax or return_accuracy
            or target_logits or kl)


def check(temperature, target_logits, kl, grad_mode, api="cross_entropy"):
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        R.fail(TypeError, f"temperature must be a positive float, got {temperature!r}", api)
    if not t > 0.0 or t == float("inf"):
        R.fail(ValueError, f"temperature must be a positive, finite float, got {temperature!r}", api)
    if kl and not target_logits:
        R.fail(ValueError, "kl=True compares against a teacher's distribution: it needs "
                         "target_logits=True", api)
    if grad_mode != "recompute":
        R.fail(ValueError, f"grad_mode={grad_mode!r} is not available with temperature, "
                         f"return_entropy/argmax/accuracy or target_logits (their gradient "
                         f"is known only in the backward); use grad_mode=\"recompute\"", api)
    return t


def accuracy(argmax: Tensor, target2: Tensor, valid: Tensor) -> Tensor:
    """Fraction of the valid rows whose argmax is the target: a 0-dim fp32 (nan if none)."""
    hit = (argmax == target2.long()) & valid
    return hit.sum().to(torch.float32) / valid.sum().to(torch.float32)


class Extension(NamedTuple):
    """The extended options of one call, as the kernels and softmax_ce.distributed take them."""

    inv_temp: float = 1.0
    token_stats: bool = False   # entropy and argmax per row
    teacher: bool = False       # target holds teacher logits
    teacher_kl: bool = False
    alpha_scale: float = 1.0    # T^2 with teacher logits


def prepare(input, target, weight, label_smoothing, grad_mode, temperature, return_entropy,
            return_argmax, return_accuracy, target_logits, kl) -> Extension:
    """Check the extended options against the call (before anything runs) -> Extension."""
    temperature = check(temperature, target_logits, kl, grad_mode)
    prob_target = isinstance(target, Tensor) and target.is_floating_point()
    if target_logits:
        if not prob_target or target.shape != input.shape:
            R.fail(RuntimeError, f"target_logits=True takes the teacher's logits, a floating "
                                 f"tensor of the input's shape {tuple(input.shape)}, got "
                                 f"{getattr(target, 'dtype', type(target))} of shape "
                                 f"{tuple(getattr(target, 'shape', ()))}")
        if weight is not None:
            R.fail(RuntimeError, "weight (class weights) is not supported with target_logits=True")
        if label_smoothing:
            R.fail(RuntimeError, "label_smoothing is not supported with target_logits=True (the "
                                 "teacher's distribution is already soft)")
    if prob_target and target.requires_grad and torch.is_grad_enabled():
        R.fail(RuntimeError, "with temperature, return_entropy/argmax/accuracy or "
                             "target_logits, the target (probabilities or teacher logits) "
                             "would receive no gradient; pass target.detach()")
    if return_accuracy and prob_target:
        R.fail(RuntimeError, "return_accuracy needs class-index targets (accuracy is "
                             "argmax == target)")
    return Extension(
        inv_temp=1.0 / temperature,
        token_stats=bool(return_entropy or return_argmax or return_accuracy),
        teacher=bool(target_logits), teacher_kl=bool(kl),
        # distillation's T^2 (Hinton et al. 2015): keeps the soft targets' gradient, which
        # scales as 1 / T^2, comparable across temperatures
        alpha_scale=temperature * temperature if target_logits else 1.0)


def outputs(ext, loss, lse, entropy, argmax, target2, ignore_index, batch_shape, return_lse,
            return_entropy, return_argmax, return_accuracy):
    """The call's result: a bare loss (or (loss, lse)) without statistics, else a
    CrossEntropyOutput."""
    if not ext.token_stats:
        return (loss, lse.reshape(batch_shape)) if return_lse else loss
    acc = None
    if return_accuracy:
        acc = accuracy(argmax, target2, target2.long() != ignore_index)
    return CrossEntropyOutput(
        loss,
        lse.reshape(batch_shape) if return_lse else None,
        entropy.reshape(batch_shape) if return_entropy else None,
        argmax.reshape(batch_shape) if return_argmax else None,
        acc)


def run(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        inplace_backward, grad_mode, return_lse, ext, return_entropy, return_argmax,
        return_accuracy):
    """cross_entropy with the extended options `ext` (from `prepare`) on one device."""
    logits2, target2, prob_target, batch_shape, n_classes = R.flatten(input, target)
    R.check_prob_ignore(prob_target, ignore_index)
    n_rows = logits2.shape[0]
    row_dtype = _row_dtype(input)
    weight32 = None
    if weight is not None:
        R.check_weight(weight, n_classes)
        weight32 = weight.detach().to(device=input.device, dtype=row_dtype).contiguous()
    alpha, beta, zeta, nan_if_empty = R.row_coefficients(
        target2, prob_target, weight32, n_rows, n_classes, ignore_index, reduction,
        label_smoothing, z_loss, row_dtype)
    alpha = alpha * ext.alpha_scale if ext.alpha_scale != 1.0 else alpha
    kernel_weight = weight32 if (prob_target or beta is not None) else None
    _, inplace = R.grad_plan(logits2, grad_mode, bool(inplace_backward))
    loss_rows, lse, entropy, argmax, *_ = ExtendedCrossEntropyFunction.apply(
        logits2, target2, kernel_weight, alpha, beta, zeta, prob_target,
        float(softcap) if softcap is not None else None, ext.inv_temp, ext.token_stats,
        ext.teacher, ext.teacher_kl, inplace)
    loss = R.reduce_rows(loss_rows, lse, reduction, nan_if_empty, batch_shape, input.dtype,
                         False)
    return outputs(ext, loss, lse, entropy, argmax, target2, ignore_index, batch_shape,
                   return_lse, return_entropy, return_argmax, return_accuracy)
