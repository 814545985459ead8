"""softmax_ce: Triton kernels for softmax cross-entropy over large vocabularies.

    import softmax_ce
    loss = softmax_ce.cross_entropy(logits, target)          # like F.cross_entropy
    loss_fn = softmax_ce.CrossEntropyLoss(ignore_index=-100)  # like nn.CrossEntropyLoss
    loss = softmax_ce.linear_cross_entropy(hidden, lm_head.weight, target)  # no logits stored
"""

from .functional import GRAD_MODES, CrossEntropyFunction, cross_entropy
from .linear import LinearCrossEntropyFunction, LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "cross_entropy", "CrossEntropyLoss", "CrossEntropyFunction", "GRAD_MODES",
    "linear_cross_entropy", "LinearCrossEntropyLoss", "LinearCrossEntropyFunction",
]
