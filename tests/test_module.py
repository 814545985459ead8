"""CrossEntropyLoss: the module face of cross_entropy."""

import pytest
import torch

import softmax_ce
from _helpers import assert_close_to_ref, check_path, gen
from reference import reference_cross_entropy

OPTIONS = {
    "default": {},
    "weight-ignore-smoothing": dict(ignore_index=-1, label_smoothing=0.1, reduction="sum"),
    "zloss-softcap-fused": dict(z_loss=1e-2, softcap=5.0, grad_mode="fused", reduction="none"),
    "inplace": dict(inplace_backward=True, label_smoothing=0.05),
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("with_weight", [False, True], ids=["noweight", "weight"])
def test_module_matches_function(name, with_weight, path2):
    g = gen("module", name, with_weight, path2.name)
    z = torch.randn(6, 21, generator=g) * 2
    t = torch.randint(0, 21, (6,), generator=g)
    t[3] = OPTIONS[name].get("ignore_index", -100)
    w = torch.rand(21, generator=g) + 0.5 if with_weight else None
    up = torch.randn(6, generator=g) if OPTIONS[name].get("reduction") == "none" else torch.tensor(1.0)
    dev = path2.device
    results = []
    for use_module in (False, True):
        x = z.clone().to(dev).requires_grad_()
        check_path(path2, x)
        wd = w.to(dev) if w is not None else None
        logits = x * 1.0 if OPTIONS[name].get("inplace_backward") else x  # not the leaf itself
        if use_module:
            loss = softmax_ce.CrossEntropyLoss(wd, **OPTIONS[name])(logits, t.to(dev))
        else:
            loss = softmax_ce.cross_entropy(logits, t.to(dev), wd, **OPTIONS[name])
        loss.backward(up.to(dev))
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    ref_kw = {k: v for k, v in OPTIONS[name].items() if k not in ("grad_mode", "inplace_backward")}
    assert_close_to_ref(results[1][0], reference_cross_entropy(z, t, w, **ref_kw), torch.float32)


def test_module_drop_in_for_torch(path2):
    """Same numbers as torch.nn.CrossEntropyLoss (fp32) on (N, C, d) input with the options torch has."""
    g = gen("module-torch", path2.name)
    z = torch.randn(3, 8, 4, generator=g)
    t = torch.randint(0, 8, (3, 4), generator=g)
    t[0, 1] = 5
    w = torch.rand(8, generator=g) + 0.5
    kw = dict(ignore_index=5, label_smoothing=0.1)
    ours = softmax_ce.CrossEntropyLoss(w.to(path2.device), **kw)(z.to(path2.device), t.to(path2.device))
    theirs = torch.nn.CrossEntropyLoss(w, **kw)(z, t)
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-5, atol=1e-6)


def test_module_weight_is_a_buffer():
    w = torch.rand(7) + 0.5
    m = softmax_ce.CrossEntropyLoss(w, z_loss=1e-3)
    assert "weight" in dict(m.named_buffers())
    assert list(m.parameters()) == []
    assert torch.equal(m.state_dict()["weight"], w)
    m64 = m.to(torch.float64)
    assert m64.weight.dtype == torch.float64
    m2 = softmax_ce.CrossEntropyLoss(torch.zeros(7))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.weight, m.weight)
    assert softmax_ce.CrossEntropyLoss().weight is None
    assert "weight" not in softmax_ce.CrossEntropyLoss().state_dict()
    assert "z_loss=0.001" in repr(m)


def test_module_follows_device(device):
    m = softmax_ce.CrossEntropyLoss(torch.rand(5) + 0.5).to(device)
    assert m.weight.device.type == device
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 4, 2], device=device)
    assert torch.isfinite(m(x, t))


def test_module_return_lse(path2):
    g = gen("module-lse", path2.name)
    z = torch.randn(4, 10, generator=g).to(path2.device)
    t = torch.randint(0, 10, (4,), generator=g).to(path2.device)
    loss, lse = softmax_ce.CrossEntropyLoss(softcap=3.0)(z, t, return_lse=True)
    ref_loss, ref_lse = reference_cross_entropy(z, t, softcap=3.0, return_lse=True)
    assert_close_to_ref(loss, ref_loss, torch.float32)
    assert_close_to_ref(lse, ref_lse, torch.float32)
