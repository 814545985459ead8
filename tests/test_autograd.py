"""Autograd: gradcheck, return_lse, the inplace_backward safety contract, torch.compile."""

import pytest
import torch

import softmax_ce
from _helpers import assert_close_to_ref, check_path, gen
from reference import reference_cross_entropy

ce = softmax_ce.cross_entropy


# ----------------------------------------------------------------------------
# gradcheck (float64 goes through the float64 PyTorch path)
# ----------------------------------------------------------------------------
ALL_OPTIONS = dict(label_smoothing=0.15, z_loss=0.05, softcap=3.0)

GRADCHECK_CASES = {
    "class-plain-mean": dict(shape=(3, 5)),
    "class-all-mean": dict(shape=(4, 5), weight=True, **ALL_OPTIONS),
    "class-all-none": dict(shape=(4, 5), weight=True, reduction="none", **ALL_OPTIONS),
    "class-all-sum-ignore": dict(shape=(4, 5), weight=True, reduction="sum", ignore=True, **ALL_OPTIONS),
    "class-1d": dict(shape=(6,), **ALL_OPTIONS),
    "class-4d-weight": dict(shape=(2, 4, 3), weight=True, label_smoothing=0.1),
    "prob-all-mean": dict(shape=(3, 5), target="prob", weight=True, **ALL_OPTIONS),
    "multilabel-all-none": dict(shape=(3, 5), target="multilabel", reduction="none", **ALL_OPTIONS),
    "prob-4d-sum": dict(shape=(2, 4, 3), target="prob", reduction="sum", z_loss=0.1),
}


def _gradcheck_inputs(case, device, name):
    case = dict(case)
    shape = case.pop("shape")
    g = gen("gradcheck", name)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    batch = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
    kind = case.pop("target", "class")
    if kind == "class":
        t = torch.randint(0, n_classes, batch, generator=g)
        if case.pop("ignore", False):
            t[1] = -100
        t = t.to(device)
    elif kind == "prob":
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1).to(device)
    else:
        t = ((torch.rand(shape, generator=g) < 0.5) * torch.rand(shape, generator=g)).double().to(device)
    w = (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.5).to(device) \
        if case.pop("weight", False) else None
    return x, t, w, case


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck(name, device):
    x, t, w, kw = _gradcheck_inputs(GRADCHECK_CASES[name], device, name)
    assert torch.autograd.gradcheck(lambda x: ce(x, t, w, **kw), (x,))
    if t.is_floating_point():  # probability targets are differentiable too, as in torch
        y = t.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: ce(x, y, w, **kw), (x, y))


@pytest.mark.parametrize("name", ["class-all-mean", "prob-all-mean"])
def test_fused_matches_gradchecked_recompute(name, device):
    """grad_mode="fused" rescales its saved gradient in place, so it supports one backward
    per forward and gradcheck (which differentiates the graph repeatedly) cannot run on
    it; its float64 gradient must equal the recompute one, which gradcheck verifies."""
    x, t, w, kw = _gradcheck_inputs(GRADCHECK_CASES[name], device, name)
    assert torch.autograd.gradcheck(lambda x: ce(x, t, w, **kw), (x,))
    (fused,) = torch.autograd.grad(ce(x, t, w, grad_mode="fused", **kw), (x,))
    (recompute,) = torch.autograd.grad(ce(x, t, w, **kw), (x,))
    torch.testing.assert_close(fused, recompute, rtol=1e-12, atol=1e-14)


def test_backward_twice_retain_graph(path2):
    """As with torch, a graph kept with retain_graph=True can be differentiated again
    (grad_mode="recompute"): the second backward adds the same gradient once more."""
    g = gen("retain", path2.name)
    x = torch.randn(4, 9, generator=g).to(path2.device).requires_grad_()
    t = torch.randint(0, 9, (4,), generator=g).to(path2.device)
    check_path(path2, x)
    loss = ce(x, t, reduction="none")
    up = torch.randn(4, generator=g).to(path2.device)
    loss.backward(up, retain_graph=True)
    first = x.grad.clone()
    loss.backward(up)
    torch.testing.assert_close(x.grad, 2 * first)
    ref_x = x.detach().double().requires_grad_()
    reference_cross_entropy(ref_x, t, reduction="none").backward(up.double())
    assert_close_to_ref(first, ref_x.grad, torch.float32)


def test_fused_second_backward_raises(path2):
    """grad_mode="fused" rescales the forward's gradient in place: a second backward of
    the same graph must raise autograd's in-place error, never return a twice-scaled
    gradient silently."""
    g = gen("retain-fused", path2.name)
    x = torch.randn(4, 9, generator=g).to(path2.device).requires_grad_()
    t = torch.randint(0, 9, (4,), generator=g).to(path2.device)
    check_path(path2, x)
    loss = ce(x, t, grad_mode="fused", reduction="none")
    up = torch.randn(4, generator=g).to(path2.device)
    loss.backward(up, retain_graph=True)
    ref_x = x.detach().double().requires_grad_()
    reference_cross_entropy(ref_x, t, reduction="none").backward(up.double())
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(up)


# ----------------------------------------------------------------------------
# Gradient with respect to probability targets
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_probability_target_gradient(grad_mode, inplace, path2):
    """d loss / d y = -(1 - eps) * w * log_softmax(z') / denominator, as torch computes it;
    it must not depend on inplace_backward (the logits may be overwritten, the
    gradient for y must still come from the logits)."""
    g = gen("target-grad", grad_mode, inplace, path2.name)
    z = torch.randn(4, 11, generator=g) * 2
    y = torch.softmax(torch.randn(4, 11, generator=g), 1)
    w = torch.rand(11, generator=g) + 0.5
    kw = dict(label_smoothing=0.1, softcap=5.0, z_loss=1e-2)
    ref_x = z.double().requires_grad_()
    ref_y = y.double().requires_grad_()
    reference_cross_entropy(ref_x, ref_y, w, **kw).backward()

    x = z.clone().to(path2.device).requires_grad_()
    yd = y.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    ce(x * 1.0 if inplace else x, yd, w.to(path2.device), grad_mode=grad_mode,
       inplace_backward=inplace, **kw).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32, what="grad logits")
    assert_close_to_ref(yd.grad, ref_y.grad, torch.float32, what="grad target")


# ----------------------------------------------------------------------------
# return_lse
# ----------------------------------------------------------------------------
LSE_SHAPES = {
    "1d": ((13,), lambda r: r),
    "2d": ((5, 13), lambda r: r),
    "4d": ((2, 13, 3, 2), lambda r: r),
    "transposed": ((13, 5), lambda r: r.t()),
}


@pytest.mark.parametrize("shape", list(LSE_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_return_lse_values(shape, dtype, softcap, grad_mode, path):
    """lse: fp32, the input's batch shape, = logsumexp of the (softcapped) logits in fp64,
    for ignored rows too."""
    raw_shape, view = LSE_SHAPES[shape]
    g = gen("lse", shape, dtype, softcap, grad_mode, path.name)
    raw = (torch.randn(raw_shape, generator=g) * 3).to(dtype)
    xin = view(raw.to(path.device))
    check_path(path, xin)
    cdim = 0 if xin.dim() == 1 else 1
    batch = xin.shape[:cdim] + xin.shape[cdim + 1:]
    t = torch.randint(0, xin.shape[cdim], batch, generator=g)
    if t.dim():
        t.view(-1)[0] = -100
    loss, lse = ce(xin, t.to(path.device), softcap=softcap, grad_mode=grad_mode, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == batch
    z = view(raw).double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    assert_close_to_ref(lse, torch.logsumexp(z, cdim), torch.float32, what="lse")
    ref_loss, ref_lse = reference_cross_entropy(view(raw), t, softcap=softcap, return_lse=True)
    assert_close_to_ref(ref_lse, torch.logsumexp(z, cdim), torch.float64)
    assert_close_to_ref(loss, ref_loss, dtype, what="loss")


@pytest.mark.parametrize("options", ["plain", "weight-ignore-zloss", "smoothing-softcap",
                                     "prob-weight", "lse-only", "none"])
def test_return_lse_gradient(options, path2):
    """In grad_mode="recompute" lse is differentiable: d lse / d z = softmax(z')
    (through the softcap); a loss + lse objective gets the reference gradient."""
    g = gen("lse-grad", options, path2.name)
    z = torch.randn(6, 17, generator=g) * 3
    t = torch.randint(0, 17, (6,), generator=g)
    kw = {"plain": {}, "weight-ignore-zloss": dict(weight=torch.rand(17, generator=g) + 0.5, z_loss=0.01),
          "smoothing-softcap": dict(label_smoothing=0.2, softcap=4.0), "prob-weight": {},
          "lse-only": {}, "none": dict(reduction="none")}[options]
    if options == "weight-ignore-zloss":
        t[[1, 4]] = -100
    if options == "prob-weight":
        t = torch.softmax(torch.randn(6, 17, generator=g), 1)
        kw = dict(weight=torch.rand(17, generator=g) + 0.5)
    r = torch.randn(6, generator=g)
    up = torch.randn(6, generator=g) if options == "none" else torch.tensor(1.0)
    loss_factor = 0.0 if options == "lse-only" else 1.0

    ref_x = z.double().requires_grad_()
    ref_loss, ref_lse = reference_cross_entropy(ref_x, t, return_lse=True, **kw)
    ((ref_loss * up.double()).sum() * loss_factor + (ref_lse * r.double()).sum()).backward()

    x = z.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    dkw = {k: (v.to(path2.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, lse = ce(x, t.to(path2.device), return_lse=True, **dkw)
    assert lse.requires_grad
    if options == "lse-only":
        (lse * r.to(path2.device)).sum().backward()
    else:
        ((loss * up.to(path2.device)).sum() + (lse * r.to(path2.device)).sum()).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32, what="grad")


def test_return_lse_fused_is_not_differentiable(path2):
    """grad_mode="fused" precomputes the loss gradient only: its lse carries no gradient,
    and the loss gradient is unaffected."""
    g = gen("lse-fused", path2.name)
    z = torch.randn(4, 9, generator=g)
    t = torch.randint(0, 9, (4,), generator=g)
    x = z.clone().to(path2.device).requires_grad_()
    loss, lse = ce(x, t.to(path2.device), grad_mode="fused", return_lse=True)
    assert not lse.requires_grad
    loss.backward()
    ref_x = z.double().requires_grad_()
    reference_cross_entropy(ref_x, t).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32)


# ----------------------------------------------------------------------------
# inplace_backward: same gradient, and its safety contract
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("target_kind", ["class", "prob"])
def test_inplace_matches_out_of_place(grad_mode, dtype, target_kind, path):
    g = gen("inplace-same", grad_mode, dtype, target_kind, path.name)
    z = (torch.randn(5, 33, generator=g) * 3).to(dtype)
    t = (torch.randint(0, 33, (5,), generator=g) if target_kind == "class"
         else torch.softmax(torch.randn(5, 33, generator=g), 1).to(dtype)).to(path.device)
    up = torch.randn(5, generator=g).to(dtype).to(path.device)
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, grad_mode=grad_mode)
    grads = []
    for inplace in (False, True):
        x = z.clone().to(path.device).requires_grad_()
        logits = x * 1.0 if inplace else x  # in place needs an intermediate, not the leaf
        check_path(path, logits)
        loss = ce(logits, t, inplace_backward=inplace, **kw)
        if inplace and grad_mode == "fused":
            # the forward already overwrote the logits with the gradient for grad_output = 1
            assert not torch.equal(logits.detach().cpu(), z)
        loss.backward(up)
        if inplace:
            assert torch.equal(logits.detach(), x.grad)  # the gradient is in the logits' storage
        assert torch.equal(x.detach().cpu(), z)  # the leaf is never written
        grads.append(x.grad.cpu())
    assert_close_to_ref(grads[1], grads[0].double(), dtype, rtol=1e-6, scale_atol=1e-7, ulps=1,
                        lowp_scale_atol=1e-6, what="inplace vs out-of-place")


@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_inplace_raises_when_logits_are_saved_elsewhere(grad_mode, path2):
    """tanh saved its output y; after the loss wrote its gradient into y, tanh's backward
    would read a gradient as y: autograd must raise instead."""
    g = gen("inplace-tanh", grad_mode, path2.name)
    x = torch.randn(4, 9, generator=g).to(path2.device).requires_grad_()
    t = torch.randint(0, 9, (4,), generator=g).to(path2.device)
    z = x * 1.0
    y = torch.tanh(z)
    check_path(path2, y)
    loss = ce(y, t, inplace_backward=True, grad_mode=grad_mode)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("modes", [("recompute", "recompute"), ("fused", "fused"),
                                   ("recompute", "fused"), ("fused", "recompute")],
                         ids=lambda m: "-".join(m))
def test_inplace_raises_for_two_losses_on_the_same_logits(modes, path2):
    """Two inplace losses of the same logits: the second would read the first's gradient
    (or the first a gradient from the second): raise rather than be silently wrong."""
    g = gen("inplace-two", modes, path2.name)
    x = torch.randn(4, 9, generator=g).to(path2.device).requires_grad_()
    t1 = torch.randint(0, 9, (4,), generator=g).to(path2.device)
    t2 = torch.randint(0, 9, (4,), generator=g).to(path2.device)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss = (ce(y, t1, inplace_backward=True, grad_mode=modes[0])
                + ce(y, t2, inplace_backward=True, grad_mode=modes[1]))
        loss.backward()


@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_inplace_after_an_op_that_saves_nothing(grad_mode, path2):
    """The intended use: logits that nothing else saved (x * 2 saves no tensor) may be
    overwritten, and the chain rule still holds."""
    g = gen("inplace-ok", grad_mode, path2.name)
    z = torch.randn(4, 9, generator=g)
    t = torch.randint(0, 9, (4,), generator=g)
    x = z.clone().to(path2.device).requires_grad_()
    ce(x * 2.0, t.to(path2.device), inplace_backward=True, grad_mode=grad_mode).backward()
    ref_x = z.double().requires_grad_()
    reference_cross_entropy(ref_x * 2.0, t).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32)


@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_fused_equals_recompute(grad_mode, path):
    """The two strategies agree with each other closely (not only each with the reference)."""
    g = gen("fused-vs-recompute", path.name)
    z = torch.randn(6, 40, generator=g) * 3
    t = torch.randint(0, 40, (6,), generator=g)
    t[2] = -100
    w = torch.rand(40, generator=g) + 0.5
    up = torch.randn(6, generator=g)
    out = {}
    for mode in softmax_ce.GRAD_MODES:
        x = z.clone().to(path.device).requires_grad_()
        loss = ce(x, t.to(path.device), w.to(path.device), reduction="none", label_smoothing=0.1,
                  z_loss=1e-2, softcap=5.0, grad_mode=mode)
        loss.backward(up.to(path.device))
        out[mode] = (loss.detach().cpu(), x.grad.cpu())
    torch.testing.assert_close(out["fused"][0], out["recompute"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["fused"][1], out["recompute"][1], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["recompute", "fused", "recompute-inplace-lse"])
def test_torch_compile_fullgraph(variant, device):
    """fullgraph tracing through the custom ops (aot_eager: no inductor codegen) gives the
    eager results, forward and backward."""
    torch._dynamo.reset()
    g = gen("compile", variant)
    z = torch.randn(4, 9, generator=g).to(device)
    t = torch.randint(0, 9, (4,), generator=g).to(device)
    kw = dict(grad_mode="fused" if variant == "fused" else "recompute")

    def fn(x, t):
        if variant == "recompute-inplace-lse":
            loss, lse = ce(x * 1.0, t, inplace_backward=True, return_lse=True, **kw)
            return loss + 0.1 * lse.sum()
        return ce(x, t, **kw)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        x = z.clone().requires_grad_()
        loss = f(x, t)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-8)
    assert torch.isfinite(results[0][0])
