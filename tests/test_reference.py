"""The fp64 reference itself: F.cross_entropy where the extras are off, the documented
formulas where they are on."""

import pytest
import torch
import torch.nn.functional as F

from _helpers import gen
from reference import reference_cross_entropy

CASES = {
    "class-2d": dict(shape=(5, 7)),
    "class-1d": dict(shape=(7,)),
    "class-4d": dict(shape=(2, 7, 3, 2)),
    "prob-2d": dict(shape=(5, 7), prob=True),
    "prob-4d": dict(shape=(2, 7, 3), prob=True),
}


def _inputs(name):
    c = CASES[name]
    g = gen("ref", name)
    shape = c["shape"]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    cdim = 0 if len(shape) == 1 else 1
    batch = shape[:cdim] + shape[cdim + 1:]
    if c.get("prob"):
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), cdim)
    else:
        t = torch.randint(0, shape[cdim], batch, generator=g)
        if t.dim():
            t.view(-1)[1] = 2
    w = torch.rand(shape[cdim], generator=g, dtype=torch.float64) + 0.5
    return x, t, w, cdim


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["nols", "ls"])
def test_reference_is_torch_without_extras(name, reduction, weighted, smoothing):
    x, t, w, _ = _inputs(name)
    w = w if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    if not t.is_floating_point():
        kw["ignore_index"] = 2
    torch.testing.assert_close(reference_cross_entropy(x, t, w, **kw), F.cross_entropy(x, t, w, **kw),
                               rtol=0, atol=0)
    # a float32 input is upcast, not computed in float32
    got = reference_cross_entropy(x.float(), t, w, **kw)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.cross_entropy(x.float().double(), t, w, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_reference_z_loss_and_softcap_formulas(name, weighted):
    """z_loss: + z * rho_i * lse_i^2 per row, reduced like the nll term; softcap first."""
    x, t, w, cdim = _inputs(name)
    w = w if weighted else None
    z, cap = 0.03, 2.5
    xc = cap * torch.tanh(x / cap)
    lse = torch.logsumexp(xc, cdim)
    if t.is_floating_point():
        rho = torch.ones_like(lse)
        ign = {}
    else:
        ign = dict(ignore_index=2)
        rho = torch.where(t == 2, 0.0, w[t.clamp(0)] if w is not None else 1.0).double()
    none = F.cross_entropy(xc, t, w, reduction="none", **ign) + z * rho * lse ** 2
    got_none, got_lse = reference_cross_entropy(x, t, w, reduction="none", z_loss=z, softcap=cap,
                                                return_lse=True, **ign)
    torch.testing.assert_close(got_none, none)
    torch.testing.assert_close(got_lse, lse)
    torch.testing.assert_close(reference_cross_entropy(x, t, w, reduction="sum", z_loss=z,
                                                       softcap=cap, **ign), none.sum())
    torch.testing.assert_close(reference_cross_entropy(x, t, w, z_loss=z, softcap=cap, **ign),
                               none.sum() / rho.sum())


def test_reference_worked_example():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = reference_cross_entropy(x, torch.tensor(1))
    loss.backward()
    assert loss.item() == pytest.approx(1.4076, abs=1e-4)
    torch.testing.assert_close(x.grad, torch.tensor([0.0900, -0.7553, 0.6652], dtype=torch.float64),
                               atol=1e-4, rtol=0)
