"""softmax_ce: Triton kernels for softmax cross-entropy over large vocabularies.

    import softmax_ce
    loss = softmax_ce.cross_entropy(logits, target)          # like F.cross_entropy
    loss_fn = softmax_ce.CrossEntropyLoss(ignore_index=-100)  # like nn.CrossEntropyLoss
"""

from .functional import GRAD_MODES, CrossEntropyFunction, cross_entropy
from .modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyFunction", "GRAD_MODES"]
