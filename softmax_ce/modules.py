"""`CrossEntropyLoss`: the nn.Module face of `softmax_ce.cross_entropy`."""

from typing import Optional

import torch
from torch import Tensor, nn

from .functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for `torch.nn.CrossEntropyLoss`, with the extra options of `cross_entropy`.

    >>> loss_fn = CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
    >>> loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None,
                 inplace_backward: bool = False, grad_mode: str = "recompute"):
        super().__init__()
        # a buffer, as in torch: it follows .to(device) and lands in the state dict
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.grad_mode = grad_mode

    def forward(self, input: Tensor, target: Tensor, return_lse: bool = False):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward, grad_mode=self.grad_mode,
                             return_lse=return_lse)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.grad_mode != "recompute":
            parts.append(f"grad_mode={self.grad_mode!r}")
        return ", ".join(parts)
