"""`cross_entropy`: a drop-in for torch.nn.functional.cross_entropy.

Layer: the public function.  It checks the arguments, flattens the input to rows and
turns the options into per-row coefficients (_rows), runs the autograd Function
(_autograd) or, with a process group, the vocabulary-parallel one (distributed), and
reduces.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction

from . import _extended
from . import _rows as R
from . import distributed
from ._autograd import (CrossEntropyFunction, cross_entropy_function, higher_order_error,
                        training_grad_mode)
from ._rows import GRAD_MODES


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, inplace_backward: bool = False,
                  grad_mode: str = "recompute", return_lse: bool = False,
                  process_group=None, temperature: float = 1.0, return_entropy: bool = False,
                  return_argmax: bool = False, return_accuracy: bool = False,
                  target_logits: bool = False, kl: bool = False):
    """Softmax cross-entropy, a drop-in for `torch.nn.functional.cross_entropy`.

    Same arguments (in torch's positional order), shapes, dtypes, reductions and errors
    as torch; the deprecated size_average / reduce, when either is given, set reduction
    as in torch, with torch's deprecation warning.  Plus, keyword-only:

    z_loss: adds ``z_loss * lse**2`` per token (PaLM's auxiliary loss), weighted and
        reduced like the target term (ignored tokens add nothing).
    softcap: logits become ``softcap * tanh(z / softcap)`` before the softmax (Gemma 2).
    inplace_backward: write the gradient into the logits' storage, so a training step
        needs no second logits-sized buffer when the logits are an intermediate (an LM
        head's output).  The logits must not be used afterwards; autograd raises if a
        backward would read them.  Refused (RuntimeError) for a leaf that requires grad
        or a view of one, as torch refuses in-place ops there.
    grad_mode: ``"recompute"`` (default) saves only the per-row lse and recomputes
        softmax in the backward: 3 logits-sized passes of traffic per step whatever
        grad_output is.  ``"fused"`` writes the gradient during the forward and only
        rescales it in the backward: 3 passes when grad_output is exactly 1, 5
        otherwise (the row is read twice, from HBM at LLM sizes), and 2 / 4 for rows
        that fit one tile (V <= BLOCK_V), which are read once.  With ``"fused"`` and
        ``inplace_backward=True`` the logits are overwritten already by the forward.
        On the PyTorch path (CPU tensors, float64), "recompute" keeps the forward's
        softmax instead, in the buffer the backward would allocate, and the backward
        rescales it in place (one multiply, no second exp per logit), for class-index
        targets without label smoothing or softcap; a backward that is differentiated
        again, or run twice, still recomputes.
        When no backward can follow (``torch.no_grad()``, logits that do not require
        grad) every mode runs forward only: nothing is computed for a gradient and
        nothing is written into the logits.
    return_lse: also return the per-row log-sum-exp (fp32, the target's shape, of the
        softcapped logits), from the same pass: ``loss, lse = cross_entropy(...,
        return_lse=True)``.  It is differentiable with grad_mode="recompute".

    process_group: vocabulary parallelism.  With a `torch.distributed` group, the class
        dimension of `input` (and of probability targets) is this rank's contiguous slice
        of the vocabulary, slices in rank order; class-index targets are global indices;
        `weight` may be the full (V,) vector or this rank's slice.  The loss (and lse) is
        the unsharded one on every rank and the gradient is this rank's slice of the
        unsharded gradient; one all-gather of per-row statistics per forward, none in the
        backward (see softmax_ce.distributed).  A DTensor `input` sharded on the class
        dimension over a 1-D mesh (a ColwiseParallel LM head's output) brings its own
        group.  grad_mode must be "recompute" there.

    temperature: the softmax sees ``softcap(z) / temperature`` (softcap first: it is the
        model's, the temperature is how its output is read), with its gradient.
    return_entropy, return_argmax, return_accuracy: per-token statistics from the same
        pass over the logits; when any is asked for the result is a
        `CrossEntropyOutput(loss, lse, entropy, argmax, accuracy)` (None where not asked).
        entropy (per token, fp32, of the softmax the loss uses) is differentiable; argmax
        (int64, of the raw input, ties and nan as torch.argmax) and accuracy (0-dim fp32,
        the fraction of non-ignored tokens whose argmax is the target) are not.
    target_logits: `target` holds a teacher's logits (the input's shape); the soft target
        is ``softmax(target / temperature)``, formed row by row in the kernels and never
        stored, and the distillation term is scaled by ``temperature**2`` (knowledge
        distillation; a z_loss term is not).
        kl=True gives KL(teacher || student) instead of the cross-entropy (they differ by
        the teacher's entropy, which has no gradient).  The teacher receives no gradient.
    These options run the recompute strategy (grad_mode="fused" is refused), also with
    process_group (the teacher's logits sharded like the student's); double backward and
    torch.func are not supported with them.

    Float64 inputs go through a PyTorch path that computes in float64 (for gradcheck);
    everything else accumulates in fp32 and returns the input's dtype, as torch does.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    R.check_options(reduction, label_smoothing, z_loss, softcap, grad_mode)
    input, target, process_group = _unwrap_dtensor(input, target, process_group)
    stats = (return_entropy, return_argmax, return_accuracy)
    ext = None
    if _extended.wanted(temperature, *stats, target_logits, kl):
        ext = _extended.prepare(input, target, weight, label_smoothing, grad_mode, temperature,
                                *stats, target_logits, kl)
        if isinstance(input, Tensor) and _under_torch_func(input):
            R.fail(RuntimeError, "a torch.func transform (grad, vjp, jvp, vmap) is not "
                                 "supported with temperature, return_entropy/argmax/accuracy "
                                 "or target_logits (first-order autograd only)")
        if process_group is None:
            return _extended.run(input, target, weight, ignore_index, reduction,
                                 label_smoothing, z_loss, softcap, inplace_backward, grad_mode,
                                 return_lse, ext, *stats)
    if process_group is not None:
        if isinstance(input, Tensor) and _under_torch_func(input):
            R.fail(RuntimeError, "a torch.func transform (grad, vjp, jvp, vmap) is not "
                                 "supported with process_group (vocabulary parallelism)")
        return _sharded(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                        softcap, inplace_backward, grad_mode, return_lse, process_group, ext,
                        stats)
    logits2, target2, prob_target, batch_shape, n_classes = R.flatten(input, target)
    R.check_prob_ignore(prob_target, ignore_index)
    n_rows = logits2.shape[0]

    weight32 = None
    if weight is not None:
        R.check_weight(weight, n_classes)
        row_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        weight32 = weight.detach().to(device=input.device, dtype=row_dtype).contiguous()

    row_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    alpha, beta, zeta, nan_if_empty = _row_coefficients(
        target2, prob_target, weight32, n_rows, n_classes, ignore_index, reduction,
        label_smoothing, z_loss, row_dtype)
    # The kernels read class weights only where a class other than the target matters.
    kernel_weight = weight32 if (prob_target or beta is not None) else None
    if softcap is not None:
        softcap = float(softcap)
    grad_mode, inplace = R.grad_plan(logits2, grad_mode, bool(inplace_backward))

    if (grad_mode == "fused" or inplace) and _under_torch_func(logits2):
        raise higher_order_error("a torch.func transform (grad, vjp, jvp, vmap)",
                                 grad_mode == "fused")
    grad_mode = training_grad_mode(logits2, grad_mode, inplace, prob_target, softcap, beta)
    loss_rows, lse = cross_entropy_function().apply(
        logits2, target2, kernel_weight, alpha, beta, zeta, prob_target, softcap,
        grad_mode, inplace)[:2]
    return R.reduce_rows(loss_rows, lse, reduction, nan_if_empty, batch_shape, input.dtype, return_lse)


def _row_coefficients(target2, prob_target, weight32, *options):
    """R.row_coefficients; under torch.func.vmap of class-index targets through
    _BatchedRowCoefficients, whose class-index range check reads the targets."""
    if not prob_target and _under_torch_func(target2):
        return _BatchedRowCoefficients.apply(target2, weight32, *options)
    return R.row_coefficients(target2, prob_target, weight32, *options)


class _BatchedRowCoefficients(torch.autograd.Function):
    """The row coefficients of class-index targets, computable under torch.func.vmap:
    the range check (IndexError on CPU) reads the targets, which a vmapped function
    cannot, so the batching rule runs R.row_coefficients on each item's real targets
    (a mean divides by each item's own weight sum, as a loop over the items would).
    The outputs carry no gradient: targets are integers, class weights are detached."""

    @staticmethod
    def forward(target2, weight32, *options):
        return tuple(R.row_coefficients(target2, False, weight32, *options))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(o for o in output if o is not None))

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * (len(grads) + 7)

    @staticmethod
    def vmap(info, in_dims, target2, weight32, *options):
        items = []
        for b in range(info.batch_size):
            t = target2.select(in_dims[0], b) if in_dims[0] is not None else target2
            w = weight32.select(in_dims[1], b) if in_dims[1] is not None else weight32
            items.append(_row_coefficients(t, False, w, *options))
        outs = tuple(torch.stack(o) if o[0] is not None else None for o in zip(*items))
        return outs, tuple(0 if o is not None else None for o in outs)


def _under_torch_func(t):
    """Whether t is a tensor of a torch.func transform (grad, vjp, jvp, vmap); never while
    torch.compile traces (its tensors are fake, and the check is opaque to it)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.is_functorch_wrapped_tensor(t))


def _unwrap_dtensor(input, target, process_group):
    """A DTensor sharded on the class dimension -> (local tensor, its group)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without distributed
        return input, target, process_group
    if isinstance(target, DTensor):
        target = target.full_tensor()
    if not isinstance(input, DTensor):
        return input, target, process_group
    class_dim = 0 if input.dim() == 1 else 1
    mesh = input.device_mesh
    placements = input.placements
    if (mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard)
            or placements[0].dim % input.dim() != class_dim):
        R.fail(ValueError, f"a DTensor input must be sharded on the class dimension {class_dim} "
                          f"over a 1-D device mesh, got {placements} on {mesh}")
    if process_group is not None and process_group is not mesh.get_group():
        R.fail(ValueError, "process_group differs from the DTensor input's mesh group")
    return input.to_local(), target, mesh.get_group()


def _sharded(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             inplace_backward, grad_mode, return_lse, group, ext=None, stats=(False,) * 3):
    if grad_mode != "recompute":
        R.fail(ValueError, f"grad_mode={grad_mode!r} is not available with process_group: the "
                          f"gradient needs the global lse, known only after the forward")
    logits2, target2, prob_target, batch_shape, n_local = R.flatten(input, target)
    R.check_prob_ignore(prob_target, ignore_index)
    _, inplace_backward = R.grad_plan(logits2, grad_mode, bool(inplace_backward))
    if weight is not None:
        R.check_weight(weight)  # the full (V,) vector or this rank's slice
    loss_rows, lse, nan_if_empty, entropy, argmax = distributed.sharded_cross_entropy(
        logits2, target2, weight, prob_target,
        float(softcap) if softcap is not None else None, ignore_index, reduction,
        label_smoothing, z_loss, bool(inplace_backward), group, ext=ext)
    if ext is None:
        return R.reduce_rows(loss_rows, lse, reduction,
                             nan_if_empty if reduction == "mean" else None,
                             batch_shape, input.dtype, return_lse)
    loss = R.reduce_rows(loss_rows, lse, reduction, nan_if_empty if reduction == "mean" else None,
                         batch_shape, input.dtype, False)
    return _extended.outputs(ext, loss, lse, entropy, argmax, target2, ignore_index, batch_shape,
                             return_lse, *stats)


__all__ = ["cross_entropy", "CrossEntropyFunction", "GRAD_MODES"]
