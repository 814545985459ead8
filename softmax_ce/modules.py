"""The nn.Module faces: `CrossEntropyLoss` and `LinearCrossEntropyLoss`.

Layer: above the public functions (their only imports in the package).  Both modules
hold the options the two functions share in one base, `_LossOptions`; a class weight is
a buffer, as in torch, so it follows .to(device) and lands in the state dict.
"""

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import _reduction

from .functional import cross_entropy
from .linear import linear_cross_entropy


class _LossOptions(nn.Module):
    """ignore_index, reduction, label_smoothing, z_loss, softcap, temperature, and the
    class weights under `weight_name` (torch's `weight` for CrossEntropyLoss)."""

    def __init__(self, weight_name: str, weight: Optional[Tensor], ignore_index: int,
                 reduction: str, label_smoothing: float, z_loss: float,
                 softcap: Optional[float], temperature: float = 1.0):
        super().__init__()
        self.register_buffer(weight_name, weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = temperature

    def _options(self) -> dict:
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                    softcap=self.softcap, temperature=self.temperature)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature}")
        return ", ".join(parts + self._extra_parts())

    def _extra_parts(self) -> list:
        return []


class CrossEntropyLoss(_LossOptions):
    """Drop-in for `torch.nn.CrossEntropyLoss` (torch's positional order, deprecated
    size_average / reduce mapped to reduction with torch's warning), with the extra
    options of `cross_entropy` as keywords.

    >>> loss_fn = CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
    >>> loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False,
                 grad_mode: str = "recompute", temperature: float = 1.0,
                 target_logits: bool = False, kl: bool = False):
        if size_average is not None or reduce is not None:
            # torch's deprecated arguments: mapped, with torch's own warning
            reduction = _reduction.legacy_get_string(size_average, reduce)
        super().__init__("weight", weight, ignore_index, reduction, label_smoothing, z_loss,
                         softcap, temperature)
        self.inplace_backward = inplace_backward
        self.grad_mode = grad_mode
        self.target_logits = target_logits
        self.kl = kl

    def forward(self, input: Tensor, target: Tensor, return_lse: bool = False,
                return_entropy: bool = False, return_argmax: bool = False,
                return_accuracy: bool = False):
        """target: class indices, probabilities, or (target_logits=True) a teacher's logits."""
        return cross_entropy(input, target, self.weight, **self._options(),
                             inplace_backward=self.inplace_backward, grad_mode=self.grad_mode,
                             return_lse=return_lse, return_entropy=return_entropy,
                             return_argmax=return_argmax, return_accuracy=return_accuracy,
                             target_logits=self.target_logits, kl=self.kl)

    def _extra_parts(self) -> list:
        parts = []
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.grad_mode != "recompute":
            parts.append(f"grad_mode={self.grad_mode!r}")
        if self.target_logits:
            parts.append(f"target_logits=True, kl={self.kl}")
        return parts


class LinearCrossEntropyLoss(_LossOptions):
    """Drop-in for torch's `nn.LinearCrossEntropyLoss` (torch 2.13+): it owns the head,
    `self.linear = nn.Linear(in_features, num_classes, bias=bias)`, and forward(input,
    target) is `linear_cross_entropy(input, self.linear.weight, target, ...)`.  torch's
    arguments mean what they mean there (weight: class weights; options: accepted, see
    linear_cross_entropy); out_features other than () (a K-dimensional head) is refused.
    Our extras are keywords after torch's."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 softcap: Optional[float] = None, shift: bool = False,
                 accum_dtype=torch.float32, impl: str = "chunked",
                 chunk_bytes: Optional[int] = None, filter_eps: float = 0.0,
                 temperature: float = 1.0):
        if tuple(out_features) != ():
            raise ValueError("softmax_ce.LinearCrossEntropyLoss: out_features must be () (a "
                             f"K-dimensional head is not supported), got {out_features}")
        super().__init__("weight", weight, -100 if ignore_index is None else ignore_index,
                         reduction, label_smoothing, z_loss, softcap, temperature)
        self.num_classes = num_classes
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.options = options
        self.shift = shift
        self.accum_dtype = accum_dtype
        self.impl = impl
        self.chunk_bytes = chunk_bytes
        self.filter_eps = filter_eps

    def forward(self, input: Tensor, target: Tensor, return_entropy: bool = False,
                return_argmax: bool = False, return_accuracy: bool = False):
        return linear_cross_entropy(input, self.linear.weight, target,
                                    linear_bias=self.linear.bias, weight=self.weight,
                                    **self._options(), options=self.options, shift=self.shift,
                                    accum_dtype=self.accum_dtype, impl=self.impl,
                                    chunk_bytes=self.chunk_bytes, filter_eps=self.filter_eps,
                                    return_entropy=return_entropy, return_argmax=return_argmax,
                                    return_accuracy=return_accuracy)

    def _extra_parts(self) -> list:
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"bias={self.linear.bias is not None}"]
        if self.shift:
            parts.append("shift=True")
        if self.impl != "chunked":
            parts.append(f"impl={self.impl!r}")
        return parts
