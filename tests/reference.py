"""The one fp64 reference every test compares against.

`reference_cross_entropy` is torch.nn.functional.cross_entropy computed in float64,
plus the two options torch does not have, written out from their definitions:

* softcap: the logits become ``softcap * tanh(z / softcap)`` before anything else
  (the lse is the one of the capped logits);
* z_loss: each row adds ``z_loss * rho_i * lse_i**2`` with rho_i = weight[target_i]
  (1 without a weight, 0 for an ignored row, 1 for probability targets), reduced
  like the loss: per element for "none", summed for "sum", and for "mean" divided
  by torch's denominator of the nll term (sum of rho over the rows; the number of
  rows for probability targets).

It is differentiable (autograd through F.cross_entropy), so gradients come from
``torch.autograd`` on the float64 copy of the inputs.
"""

import torch
import torch.nn.functional as F


def _class_dim(x):
    return 0 if x.dim() == 1 else 1


def reference_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False):
    x = input if input.dtype == torch.float64 else input.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    prob_target = target.is_floating_point()
    t = target.double() if prob_target else target.long()
    w = weight.double() if weight is not None else None

    # torch (and softmax_ce) refuse a non-default ignore_index with probability targets
    loss = F.cross_entropy(x, t, w, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=_class_dim(x))

    if z_loss:
        if prob_target:
            rho = torch.ones_like(lse)
        else:
            valid = t != ignore_index
            if w is not None:
                rho = w[torch.where(valid, t, 0)] * valid
            else:
                rho = valid.double()
        # where(): an ignored row adds exactly 0 even if its lse is not finite
        zl = torch.where(rho != 0, z_loss * rho * lse * lse, torch.zeros_like(lse))
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            loss = loss + zl.sum() / rho.sum()
    if return_lse:
        return loss, lse
    return loss
