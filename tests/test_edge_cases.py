"""Edge cases, each behaving as torch.nn.functional.cross_entropy does (in fp64)."""

import pytest
import torch

import softmax_ce
from _helpers import assert_close_to_ref, check_path, gen
from reference import reference_cross_entropy

ce = softmax_ce.cross_entropy


def _backward(loss, up=None):
    if loss.dim() == 0:
        loss.backward()
    else:
        loss.backward(up if up is not None else torch.ones_like(loss))


# ----------------------------------------------------------------------------
# Every target ignored
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("options", ["plain", "weight-smoothing-zloss"])
def test_every_target_ignored(reduction, grad_mode, options, path2):
    """torch: mean over no target is nan (0/0), sum 0, none zeros; the gradient is zero."""
    g = gen("all-ignored", reduction, grad_mode, options, path2.name)
    x = torch.randn(5, 9, generator=g).to(path2.device).requires_grad_()
    t = torch.full((5,), -1, dtype=torch.long, device=path2.device)
    kw = dict(ignore_index=-1, reduction=reduction, grad_mode=grad_mode)
    if options != "plain":
        kw.update(weight=torch.rand(9, generator=g).to(path2.device) + 0.5, label_smoothing=0.1,
                  z_loss=1e-2)
    check_path(path2, x)
    loss = ce(x, t, **kw)
    ref = reference_cross_entropy(x.detach(), t, **{k: v for k, v in kw.items() if k != "grad_mode"})
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)
    elif reduction == "sum":
        assert loss.item() == 0.0 == ref.item()
    else:
        assert torch.equal(loss.cpu(), torch.zeros(5))
    _backward(loss)
    assert torch.equal(x.grad.cpu(), torch.zeros(5, 9))


# ----------------------------------------------------------------------------
# Empty batch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("target_kind", ["class", "prob"])
@pytest.mark.parametrize("shape", [(0, 7), (0, 7, 3)], ids=["0xC", "0xCx3"])
def test_empty_batch(reduction, grad_mode, target_kind, shape, path2):
    """N = 0: mean nan, sum 0, none an empty tensor; lse empty; gradient empty."""
    x = torch.randn(shape, device=path2.device, requires_grad=True)
    batch = shape[:1] + shape[2:]
    t = (torch.zeros(batch, dtype=torch.long, device=path2.device) if target_kind == "class"
         else torch.zeros(shape, device=path2.device))
    check_path(path2, x)
    loss, lse = ce(x, t, reduction=reduction, grad_mode=grad_mode, return_lse=True)
    ref = reference_cross_entropy(x.detach(), t, reduction=reduction)
    assert lse.shape == batch and lse.dtype == torch.float32
    if reduction == "none":
        assert loss.shape == batch == ref.shape
    elif reduction == "sum":
        assert loss.item() == 0.0 == ref.item()
    else:
        assert torch.isnan(loss) and torch.isnan(ref)
    _backward(loss)
    assert x.grad is not None and x.grad.shape == shape


# ----------------------------------------------------------------------------
# -inf logits for masked vocabulary entries
# ----------------------------------------------------------------------------
def _masked_logits(g, n, v, dtype):
    z = torch.randn(n, v, generator=g) * 2
    mask = torch.rand(n, v, generator=g) < 0.3
    mask[:, :20] = True  # a whole leading tile (16 wide) is masked: the running max starts at -inf
    target = torch.randint(20, v, (n,), generator=g)
    mask[torch.arange(n), target] = False  # never mask the target itself
    return z.masked_fill(mask, float("-inf")).to(dtype), mask, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("options", ["plain", "weight-zloss-mean", "softcap-sum"])
def test_masked_vocabulary_class_targets(dtype, grad_mode, options, path):
    """-inf logits: finite loss, and exactly zero gradient on the masked entries."""
    g = gen("masked-class", dtype, grad_mode, options, path.name)
    z, mask, target = _masked_logits(g, 5, 50, dtype)
    kw = {"plain": dict(reduction="none"),
          "weight-zloss-mean": dict(weight=torch.rand(50, generator=g).to(dtype) + 0.5, z_loss=1e-2),
          "softcap-sum": dict(softcap=3.0, reduction="sum")}[options]
    ref_x = z.double().requires_grad_()
    ref = reference_cross_entropy(ref_x, target, **kw)
    _backward(ref)

    x = z.clone().to(path.device).requires_grad_()
    check_path(path, x)
    dev_kw = {k: (v.to(path.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = ce(x, target.to(path.device), grad_mode=grad_mode, **dev_kw)
    assert torch.isfinite(loss).all()
    assert_close_to_ref(loss, ref, dtype, what="loss")
    _backward(loss)
    grad = x.grad.cpu()
    assert torch.isfinite(grad).all()
    assert (grad[mask] == 0).all()
    assert_close_to_ref(grad, ref_x.grad, dtype, what="grad")


# the interpreter evaluates 0 * -inf before the kernel's where() discards it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
def test_masked_vocabulary_probability_targets(grad_mode, weight, path):
    """Probability targets with y = 0 wherever the logit is -inf.

    Deliberate difference from torch: softmax_ce uses the xlogy convention, so a
    y = 0 entry on a -inf logit contributes 0 (the limit of y*log p), giving a finite
    loss; torch computes 0 * -inf = nan there.  The reference therefore replaces the
    -inf logits by -1e30 (exp underflows to exactly 0 and 0 * -1e30 = 0), which is the
    same limit.
    """
    g = gen("masked-prob", grad_mode, weight, path.name)
    z, mask, _ = _masked_logits(g, 4, 50, torch.float32)
    y = torch.softmax(torch.randn(4, 50, generator=g), 1).masked_fill(mask, 0.0)
    w = torch.rand(50, generator=g) + 0.5 if weight else None

    torch_loss = torch.nn.functional.cross_entropy(z.double(), y.double())
    assert torch.isnan(torch_loss)  # what torch does; softmax_ce differs on purpose

    ref_x = z.double().masked_fill(mask, -1e30).requires_grad_()
    ref = reference_cross_entropy(ref_x, y, w, label_smoothing=0.0, z_loss=1e-2)
    ref.backward()

    x = z.clone().to(path.device).requires_grad_()
    check_path(path, x)
    loss = ce(x, y.to(path.device), w.to(path.device) if w is not None else None,
              z_loss=1e-2, grad_mode=grad_mode)
    assert torch.isfinite(loss)
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    loss.backward()
    grad = x.grad.cpu()
    assert (grad[mask] == 0).all()
    assert_close_to_ref(grad, ref_x.grad, torch.float32, what="grad")


# ----------------------------------------------------------------------------
# Rows far from 0: every logit about -1e4 (or +1e4), plus small noise
# ----------------------------------------------------------------------------
def _far_case(g, offset, options, n=4, v=300):
    z = offset + torch.randn(n, v, generator=g)
    kw = dict(reduction="none")
    if options.startswith("class"):
        target = torch.randint(0, v, (n,), generator=g)
    elif options == "prob":
        target = torch.softmax(torch.randn(n, v, generator=g), 1)
    else:
        target = (torch.rand(n, v, generator=g) < 0.2) * torch.rand(n, v, generator=g)
    if "smoothing" in options:
        kw["label_smoothing"] = 0.2
    if "weight" in options:
        kw["weight"] = torch.rand(v, generator=g) + 0.5
    if "zloss" in options:
        kw["z_loss"] = 1e-6
    return z, target, kw


@pytest.mark.parametrize("offset", [-1e4, 1e4], ids=["neg1e4", "pos1e4"])
@pytest.mark.parametrize("options", ["class", "class-smoothing-weight", "class-zloss",
                                     "prob", "multilabel-smoothing"])
def test_rows_far_from_zero(offset, options, path2):
    """Every logit about -1e4 (or +1e4) plus noise: exp(-1e4) underflows, so the kernels
    must shift by the row max; the result is finite and matches torch.

    The loss must keep fp32's relative precision (1e-5), as torch's fp32 log_softmax
    does (~1e-7 here): the loss is a few units while the logits are 1e4, so any formula
    that forms lse (~1e4, fp32 ulp ~1e-3) first and subtracts later loses 3-4 digits.
    The kernels' docstring says they take the sums about a per-row reference point for
    exactly this case.

    The gradient is checked to the precision the fp32 lse it is computed from allows:
    exp(z - lse) with lse rounded to fp32 at 1e4 is off by up to ulp(1e4)/2 ~ 5e-4
    relative (see test_gradient_precision_far_from_zero for the strict check).
    """
    g = gen("far", offset, options, path2.name)
    z, target, kw = _far_case(g, offset, options)
    ref_x = z.double().requires_grad_()
    ref = reference_cross_entropy(ref_x, target, **kw)
    ref.sum().backward()

    x = z.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    dev_kw = {k: (v.to(path2.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = ce(x, target.to(path2.device), **dev_kw)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    lse_ulp = float(torch.finfo(torch.float32).eps * 2 ** 13)  # fp32 spacing at 1e4
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32, rtol=lse_ulp, scale_atol=lse_ulp,
                        what="grad")
    assert_close_to_ref(loss, ref, torch.float32, what="loss")


def test_gradient_precision_far_from_zero(path2):
    """fp32 gradient of rows at -1e4 (class targets, nothing else): torch's fp32
    cross_entropy gets it to ~1e-7 relative (log_softmax's output is small and exact
    enough); softmax_ce should stay within the fp32 tolerance of 1e-5 too.  Computing
    exp(z - lse) from an lse rounded to fp32 (ulp 1e-3 at 1e4) cannot: it is off by up
    to ~5e-4 relative."""
    g = gen("far-grad", path2.name)
    z, target, kw = _far_case(g, -1e4, "class")
    ref_x = z.double().requires_grad_()
    reference_cross_entropy(ref_x, target).backward()
    torch_x = z.clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch_x, target).backward()
    assert_close_to_ref(torch_x.grad, ref_x.grad, torch.float32, what="torch's own fp32 grad")

    x = z.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    ce(x, target.to(path2.device)).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32, what="grad")


# ----------------------------------------------------------------------------
# Rows whose logits span more than fp32's exp range
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("target_kind", ["class-smoothing", "prob"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_rows_spanning_a_wide_range(target_kind, grad_mode, path):
    """The online softmax must rescale its running sum to the running max: with logits
    100 apart between tiles, exp(difference) over- or underflows fp32 if the shift is
    anything else.  Several tiles on every kernel path: 20000 classes (>= 3 tiles of at
    most 8192 on the GPU, 5 in the interpreter), 300 with 16-wide tiles (19 tiles)."""
    g = gen("wide", target_kind, grad_mode, path.name)
    v = 300 if path.name == "kernel_tiles16" else 20000
    z = torch.randn(3, v, generator=g)
    z[0, :100] += 40.0   # the max comes first, then everything ~100 below it
    z[0, 100:] -= 60.0
    z[1] += torch.linspace(-60.0, 40.0, v)  # ascending
    z[2, -1] = 90.0      # a spike in the very last tile
    if target_kind == "prob":
        t = torch.softmax(torch.randn(3, v, generator=g), 1)
        kw = {}
    else:
        t = torch.tensor([0, v - 1, 7])
        kw = dict(label_smoothing=0.1)
    ref_x = z.double().requires_grad_()
    ref = reference_cross_entropy(ref_x, t, reduction="none", **kw)
    ref.sum().backward()
    x = z.clone().to(path.device).requires_grad_()
    check_path(path, x)
    loss = ce(x, t.to(path.device), reduction="none", grad_mode=grad_mode, **kw)
    assert torch.isfinite(loss).all()
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    loss.sum().backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32, what="grad")


# ----------------------------------------------------------------------------
# NaN propagation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["target-logit", "other-logit"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["nols", "ls"])
def test_nan_logit_propagates(where, grad_mode, smoothing, path):
    """A NaN logit makes that row's loss NaN (others unaffected) and the mean NaN; a NaN
    in an ignored row is ignored, as in torch."""
    g = gen("nan", where, grad_mode, smoothing, path.name)
    z = torch.randn(4, 40, generator=g)
    target = torch.randint(0, 40, (4,), generator=g)
    target[3] = -100
    col = int(target[1]) if where == "target-logit" else (int(target[1]) + 7) % 40
    z[1, col] = float("nan")
    z[3, 5] = float("nan")  # ignored row
    ref = reference_cross_entropy(z, target, reduction="none", label_smoothing=smoothing)
    assert torch.isnan(ref[1]) and not torch.isnan(ref[[0, 2, 3]]).any()

    x = z.to(path.device)
    check_path(path, x)
    loss = ce(x, target.to(path.device), reduction="none", label_smoothing=smoothing,
              grad_mode=grad_mode)
    assert_close_to_ref(loss, ref, torch.float32, what="loss")  # NaN exactly at row 1
    assert loss[3].item() == 0.0
    assert torch.isnan(ce(x, target.to(path.device), label_smoothing=smoothing, grad_mode=grad_mode))
    # without row 1 the mean is finite: the ignored row's NaN does not leak
    keep = torch.tensor([0, 2, 3])
    mean = ce(x[keep], target.to(path.device)[keep], label_smoothing=smoothing, grad_mode=grad_mode)
    assert torch.isfinite(mean)
    assert_close_to_ref(mean, reference_cross_entropy(z[keep], target[keep], label_smoothing=smoothing),
                        torch.float32, what="mean")


@pytest.mark.parametrize("bad", ["nan", "all-minus-inf"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_ignored_row_of_nan_or_minus_inf_with_z_loss(bad, grad_mode, path):
    """An ignored row's gradient is 0 whatever its logits hold, also with z_loss: its d loss
    / d lse is 2 * 0 * lse, which is nan for an lse of nan or -inf unless it is taken as 0
    (it was, and the nan reached every gradient of the step through the LM head)."""
    g = gen("ignored-zloss", bad, grad_mode, path.name)
    z = torch.randn(4, 40, generator=g)
    target = torch.randint(0, 40, (4,), generator=g)
    target[2] = -100
    if bad == "nan":
        z[2, 7] = float("nan")
    else:
        z[2] = float("-inf")
    live = torch.tensor([0, 1, 3])
    ref_x = z.double().requires_grad_()
    ref = reference_cross_entropy(ref_x[live], target[live], reduction="sum", z_loss=1e-2)
    ref.backward()
    x = (z.to(path.device) * 1.0).requires_grad_()
    check_path(path, x)
    loss = ce(x, target.to(path.device), reduction="sum", z_loss=1e-2, grad_mode=grad_mode)
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    loss.backward()
    assert (x.grad[2] == 0).all(), x.grad[2]
    assert_close_to_ref(x.grad[live], ref_x.grad[live], torch.float32, what="grad")


# ----------------------------------------------------------------------------
# Class-index dtypes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.uint8], ids=["int32", "uint8"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_index_dtypes_match_int64(index_dtype, grad_mode, path2):
    """int32 and uint8 targets give exactly what int64 targets give."""
    g = gen("idx", index_dtype, grad_mode, path2.name)
    z = torch.randn(6, 30, generator=g).to(path2.device)
    t64 = torch.randint(0, 30, (6,), generator=g).to(path2.device)
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, grad_mode=grad_mode,
              weight=(torch.rand(30, generator=g) + 0.5).to(path2.device))
    if index_dtype != torch.uint8:
        t64[2] = -100  # uint8 cannot hold ignore_index
    xa = z.clone().requires_grad_()
    xb = z.clone().requires_grad_()
    la = ce(xa, t64, **kw)
    lb = ce(xb, t64.to(index_dtype), **kw)
    assert torch.equal(la, lb)
    la.sum().backward()
    lb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert_close_to_ref(la, reference_cross_entropy(z, t64, **{k: v for k, v in kw.items() if k != "grad_mode"}),
                        torch.float32)


def test_uint8_target_is_never_ignore_index(path2):
    """A uint8 class index c is a class, never ignore_index=-100, even when c == -100 mod 256
    (156): torch (which accepts uint8 targets) compares the index as an integer."""
    z = torch.randn(2, 200, generator=gen("uint8-156")).to(path2.device)
    t = torch.tensor([156, 3], dtype=torch.uint8, device=path2.device)
    torch_loss = torch.nn.functional.cross_entropy(z.cpu().double(), t.cpu(), reduction="none")
    assert torch_loss[0] > 0  # torch does not ignore class 156
    loss = ce(z, t, reduction="none")
    assert_close_to_ref(loss, reference_cross_entropy(z, t, reduction="none"), torch.float32)


# ----------------------------------------------------------------------------
# Extreme but valid options
# ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(2x) -> inf in tanh
@pytest.mark.parametrize("options", ["smoothing1", "zero-weights", "tiny-softcap", "big-zloss"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_extreme_options(options, grad_mode, path2):
    g = gen("extreme", options, grad_mode, path2.name)
    z = torch.randn(5, 17, generator=g) * 4
    t = torch.randint(0, 17, (5,), generator=g)
    kw = {"smoothing1": dict(label_smoothing=1.0),
          "zero-weights": dict(weight=torch.rand(17, generator=g).masked_fill(torch.arange(17) % 3 == 0, 0.0),
                               label_smoothing=0.3),
          # logits 20-100 caps away: the slope sech^2 is computed without cancelling
          # (kernels/_online.softcap_slope), so the tolerance is the usual one
          "tiny-softcap": dict(softcap=0.05, z_loss=0.1),
          "big-zloss": dict(z_loss=10.0, reduction="sum")}[options]
    ref_x = z.double().requires_grad_()
    ref = reference_cross_entropy(ref_x, t, **kw)
    ref.backward()
    x = z.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    dev_kw = {k: (v.to(path2.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = ce(x, t.to(path2.device), grad_mode=grad_mode, **dev_kw)
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    loss.backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32, what="grad")


# ----------------------------------------------------------------------------
# Poisoning: no gradient element may be left unwritten
# ----------------------------------------------------------------------------
POISON_SHAPES = {
    "2d": ((8, 37), lambda r: r),
    "transposed": ((37, 6), lambda r: r.t()),
    "strided": ((8, 75), lambda r: r[::2, 1::2]),
    "1d": ((37,), lambda r: r),
    # rows whose starts fall at every offset from the 16-byte grid: the kernels' head /
    # aligned body / tail split of a row (a body of several tiles on the 16-wide path)
    "odd-rows": ((8, 45), lambda r: r),
    "window": ((8, 61), lambda r: r[:, 5:50]),
}


@pytest.mark.parametrize("shape", list(POISON_SHAPES))
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("target_kind", ["class-ignored", "prob-smoothing"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inplace_overwrites_every_element(shape, grad_mode, dtype, target_kind, reduction, path):
    """The package allocates its gradient itself, so a forgotten element would be
    invisible (uninitialised memory that happens to be 0).  With inplace_backward the
    gradient goes into the logits' storage: logits of 20 + noise (never within 15 of
    any gradient entry, which lies in [-1, 1]) left unwritten would show up at once.
    Ignored rows, whose logits the kernels do not even read, must be written as 0."""
    raw_shape, view = POISON_SHAPES[shape]
    g = gen("poison", shape, grad_mode, dtype, target_kind, reduction, path.name)
    raw = (20.0 + torch.randn(raw_shape, generator=g)).to(dtype)
    vshape = view(raw).shape
    n_classes = vshape[-1]
    if target_kind == "class-ignored":
        t = torch.randint(0, n_classes, vshape[:-1], generator=g)
        if t.dim():
            t[::3] = -100
        kw = {}
    else:
        t = torch.softmax(torch.randn(vshape, generator=g), -1).to(dtype)
        kw = dict(label_smoothing=0.2)
    ref_raw = raw.double().requires_grad_()
    ref = reference_cross_entropy(view(ref_raw), t, reduction=reduction, **kw)
    up = torch.randn(ref.shape, generator=g).to(dtype)
    (ref * up.double()).sum().backward()

    x = raw.clone().to(path.device).requires_grad_()
    base = x * 1.0  # an intermediate with x's layout: in place on the leaf itself is refused
    xin = view(base)
    check_path(path, xin)
    loss = ce(xin, t.to(path.device), reduction=reduction, inplace_backward=True,
              grad_mode=grad_mode, **kw)
    (loss * up.to(path.device)).sum().backward()
    assert torch.equal(x.detach().cpu(), raw), "the user's leaf tensor was modified"
    written = view(base.detach()).cpu().double()
    assert (written.abs() < 5).all(), "an element of the logits was not overwritten"
    assert_close_to_ref(written, view(ref_raw.grad), dtype, what="gradient in the logits' storage")
    assert_close_to_ref(x.grad, ref_raw.grad, dtype, what="grad")
    assert not torch.isnan(x.grad).any()
