"""The nn.Module faces: `CrossEntropyLoss` and `LinearCrossEntropyLoss`.

Layer: above the public functions (their only imports in the package).  Both modules
hold the options the two functions share in one base, `_LossOptions`; a class weight is
a buffer, as in torch, so it follows .to(device) and lands in the state dict.
"""

from typing import Optional

from torch import Tensor, nn

from .functional import cross_entropy
from .linear import linear_cross_entropy


class _LossOptions(nn.Module):
    """ignore_index, reduction, label_smoothing, z_loss, softcap, and the class weights
    under `weight_name` (torch's `weight` for CrossEntropyLoss)."""

    def __init__(self, weight_name: str, weight: Optional[Tensor], ignore_index: int,
                 reduction: str, label_smoothing: float, z_loss: float,
                 softcap: Optional[float]):
        super().__init__()
        self.register_buffer(weight_name, weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def _options(self) -> dict:
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                    softcap=self.softcap)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        return ", ".join(parts + self._extra_parts())

    def _extra_parts(self) -> list:
        return []


class CrossEntropyLoss(_LossOptions):
    """Drop-in for `torch.nn.CrossEntropyLoss`, with the extra options of `cross_entropy`.

    >>> loss_fn = CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
    >>> loss = loss_fn(logits.view(-1, vocab), labels.view(-1))
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None,
                 inplace_backward: bool = False, grad_mode: str = "recompute"):
        super().__init__("weight", weight, ignore_index, reduction, label_smoothing, z_loss,
                         softcap)
        self.inplace_backward = inplace_backward
        self.grad_mode = grad_mode

    def forward(self, input: Tensor, target: Tensor, return_lse: bool = False):
        return cross_entropy(input, target, self.weight, **self._options(),
                             inplace_backward=self.inplace_backward, grad_mode=self.grad_mode,
                             return_lse=return_lse)

    def _extra_parts(self) -> list:
        parts = []
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.grad_mode != "recompute":
            parts.append(f"grad_mode={self.grad_mode!r}")
        return parts


class LinearCrossEntropyLoss(_LossOptions):
    """Module form of `linear_cross_entropy`: forward(input, weight, target, bias=None)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, shift: bool = False,
                 class_weight: Optional[Tensor] = None):
        super().__init__("class_weight", class_weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap)
        self.shift = shift

    def forward(self, input: Tensor, weight: Tensor, target: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(input, weight, target, bias, **self._options(),
                                    shift=self.shift, class_weight=self.class_weight)

    def _extra_parts(self) -> list:
        return ["shift=True"] if self.shift else []
