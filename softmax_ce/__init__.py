"""softmax_ce: Triton kernels for softmax cross-entropy over large vocabularies.

    import softmax_ce
    loss = softmax_ce.cross_entropy(logits, target)          # like F.cross_entropy
    loss_fn = softmax_ce.CrossEntropyLoss(ignore_index=-100)  # like nn.CrossEntropyLoss
    loss = softmax_ce.linear_cross_entropy(hidden, lm_head.weight, target)  # no logits stored

Layers, each importing only those below it:
    kernels (softmax_ce.kernels: @triton.jit kernels, their configs, tuning)
    -> _rows (per-row math, argument checks: plain torch)
    -> _triton_path | _torch_path (the two back ends) -> _launch (which one runs a call)
    -> _ops (custom ops) -> _autograd (autograd Functions)
    -> functional, linear, distributed -> modules -> integrations
"""

from ._autograd import CrossEntropyFunction, LinearCrossEntropyFunction
from ._extended import CrossEntropyOutput
from ._rows import GRAD_MODES
from .functional import cross_entropy
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "cross_entropy", "CrossEntropyLoss", "CrossEntropyFunction", "CrossEntropyOutput", "GRAD_MODES",
    "linear_cross_entropy", "LinearCrossEntropyLoss", "LinearCrossEntropyFunction",
]
