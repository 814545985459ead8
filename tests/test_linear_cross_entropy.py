"""Fused linear cross-entropy: `lce(x, W, t, b, ...)` must equal
the unfused `cross_entropy(F.linear(x, W, b), t, ...)` - loss and the gradients of x, W
and b - without ever allocating an N x V tensor.

Every value is checked against an fp64 unfused reference (tests/reference.py on
F.linear(...) logits in float64), on each implementation path:

* kernel         : the Triton kernels (native on CUDA; Triton's interpreter on CPU, whose
                   tile config puts BLOCK_V up to 1024 and BLOCK_N up to 128);
* kernel_tiles16 : the interpreted kernels with 16 x 16 x 16 tiles, so that even the
                   small shapes span several row blocks, vocabulary blocks and steps of
                   the D loop, with masked tails in all three (CPU only);
* torch          : the chunked PyTorch path (routed with _launch.FORCED_BACKEND) in one chunk;
* torch_chunked  : the same with CHUNK_ELEMENTS small, so rows are walked in several chunks.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import TorchDispatchMode

import softmax_ce
import softmax_ce._launch as _launch
import softmax_ce._torch_path as _torch_path
import softmax_ce._ops as _ops
import softmax_ce.testing as testing
from softmax_ce._launch import uses_triton
from softmax_ce.kernels import linear_cross_entropy as KL

from _helpers import gen


def lce(x, w, t, b=None, *, class_weight=None, impl="fused", **kw):
    """softmax_ce.linear_cross_entropy in this file's terms: the fused kernels (impl="fused",
    what this file covers; tests/test_linear_chunked.py covers "chunked" beside it),
    the head's bias fourth, class weights as class_weight (torch's `weight`)."""
    return softmax_ce.linear_cross_entropy(x, w, t, linear_bias=b, weight=class_weight, impl=impl, **kw)
from reference import reference_cross_entropy

# The kernels' tanh (kernels/_online.py) is 1 - 2 / (exp(2x) + 1): exp overflows to inf for
# large x by design, which NumPy reports under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

CUDA = torch.cuda.is_available()
LPATHS = ("kernel", "kernel_tiles16", "torch", "torch_chunked")
# Logits per chunk on torch_chunked: 18 rows of V=123 (47 rows: 3 chunks, a partial last
# one), 2 rows of V=1030.  At least 2 rows: a 1-row chunk makes x_rows @ W.t() a gemv,
# which torch's CPU thread pool runs ~1000x slower than a 2-row matmul (~8 ms vs 8 us).
CHUNK_SMALL = 2300


def use_path(name, monkeypatch):
    """Route the following calls through implementation `name`; -> the device for tensors."""
    if name == "kernel":
        return "cuda" if CUDA else "cpu"
    if name == "kernel_tiles16":
        if CUDA:
            pytest.skip("the interpreter's tile config is CPU only (CUDA autotunes)")
        monkeypatch.setattr(KL, "lce_interpreter_config",
                            lambda n_rows, n_vocab, dim: dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16,
                                                              GROUP_N=2))
        return "cpu"
    monkeypatch.setattr(_launch, "FORCED_BACKEND", "torch")
    if name == "torch_chunked":
        monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", CHUNK_SMALL)
        monkeypatch.setattr(_torch_path, "SMALL_ELEMENTS", CHUNK_SMALL)
    return "cpu"


def expect_path(name, x):
    """The tensor really goes where the test says (float64 always takes the PyTorch path)."""
    assert uses_triton(x) == name.startswith("kernel"), (name, x.dtype, x.device)


@pytest.fixture(params=LPATHS)
def lpath(request, monkeypatch):
    device = use_path(request.param, monkeypatch)
    return request.param, device


@pytest.fixture(params=("kernel", "torch_chunked"))
def lpath2(request, monkeypatch):
    """The kernels and the multi-chunk PyTorch path: for tests where tiling does not matter."""
    device = use_path(request.param, monkeypatch)
    return request.param, device


# ----------------------------------------------------------------------------
# Reference and comparisons
# ----------------------------------------------------------------------------

def reference(x, w, t, b=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              z_loss=0.0, softcap=None, shift=False, class_weight=None):
    """Unfused: F.linear, then the fp64 cross-entropy reference (softcap, z-loss included)."""
    if shift:
        x, t = x[..., :-1, :], t[..., 1:]
    logits = F.linear(x, w, b)
    loss = reference_cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), class_weight,
                                   ignore_index, reduction, label_smoothing, z_loss, softcap)
    return loss.reshape(t.shape) if reduction == "none" else loss


def assert_close(actual, ref, rtol, atol_scale, what):
    """|a - r| <= rtol |r| + atol_scale * max|r|, whatever the dtype; NaN and inf in the same
    places (softmax_ce.testing.assert_close)."""
    testing.assert_close(actual, ref, rtol=rtol, atol=atol_scale, what=what)


TOL = {
    # (loss rtol, loss atol_scale, grad rtol, grad atol_scale)
    torch.float32: (1e-5, 1e-6, 1e-5, 1e-5),
    # bf16: the loss is returned in bf16 (one rounding, 2^-9 relative); the gradient
    # tile G is rounded to bf16 before the two matmuls (as the unfused bf16 backward
    # rounds the logits' gradient), and dx, dW are rounded to bf16 at the end.
    torch.bfloat16: (8e-3, 1e-3, 2e-2, 1e-2),
}


def make_inputs(key, N, D, V, *, batch=None, bias=False, ignore_frac=0.0, ignore_index=-100,
                logit_scale=3.0):
    """x (N, D) or (*batch, D), W (V, D), b, t: fp32, logits of std about `logit_scale`."""
    g = gen(*key)
    shape = tuple(batch) if batch is not None else (N,)
    x = torch.randn(*shape, D, generator=g)
    w = torch.randn(V, D, generator=g) * (logit_scale / math.sqrt(D))
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, shape, generator=g)
    if ignore_frac:
        t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return x, w, b, t


def leaf(v, device, requires_grad=True):
    """A fresh leaf copy on `device` (never the caller's tensor itself)."""
    return v.detach().to(device).clone().requires_grad_(requires_grad)


def ref_leaf(v, requires_grad=True):
    """A fresh float64 leaf for the reference."""
    return v.detach().double().requires_grad_(requires_grad)


def run_pair(x, w, b, t, dtype, device, opts, grad_out_key=None, impl="fused"):
    """softmax_ce in `dtype` on `device` and the fp64 reference on the same (rounded) values.

    -> (loss, ref_loss, [(grad, ref_grad, name), ...]).  reduction="none" is
    backpropagated with a random per-token grad_output.
    """
    vals = [v.to(dtype) if v is not None else None for v in (x, w, b)]  # rounded once
    ours = [leaf(v, device) if v is not None else None for v in vals]
    refs = [ref_leaf(v) if v is not None else None for v in vals]
    opts = dict(opts)
    cw = opts.pop("class_weight", None)
    tt = t.to(device)
    run_opts = dict(opts)
    if impl == "chunked":  # about three chunks, the last one partial
        rows = max(1, x.reshape(-1, x.shape[-1]).shape[0] // 3)
        run_opts["chunk_bytes"] = rows * w.shape[0] * ours[0].element_size()
    loss = lce(ours[0], ours[1], tt, ours[2], class_weight=cw.to(device) if cw is not None else None,
               impl=impl, **run_opts)
    ref = reference(refs[0], refs[1], t, refs[2], class_weight=cw.double() if cw is not None
                    else None, **opts)
    if opts.get("reduction") == "none":
        go = torch.rand(ref.shape, generator=gen("grad_out", grad_out_key),
                        dtype=torch.float64) + 0.5
        loss.backward(go.to(device=device, dtype=loss.dtype))
        ref.backward(go)
    else:
        loss.backward()
        ref.backward()
    pairs = [(o.grad, r.grad, n) for o, r, n in zip(ours, refs, ("dx", "dW", "db"))
             if o is not None]
    for o, n in zip(ours, ("x", "W", "b")):
        if o is not None:
            assert o.grad.dtype == dtype and o.grad.shape == o.shape, (n, o.grad.dtype)
    return loss, ref, pairs


def check_pair(loss, ref, pairs, dtype):
    lr, la, gr, ga = TOL[dtype]
    expected_dtype = dtype
    assert loss.dtype == expected_dtype, loss.dtype
    assert_close(loss, ref, lr, la, "loss")
    for got, want, name in pairs:
        assert_close(got, want, gr, ga, name)


# ----------------------------------------------------------------------------
# Parity with the unfused reference
# ----------------------------------------------------------------------------

ODD = dict(N=47, D=31, V=123)
CASES = {
    "odd": (ODD, {}),
    "odd_bias": (dict(ODD, bias=True), {}),
    # V > 1024 and N > 128: several vocabulary and row blocks of the interpreter's tiles
    "multiblock": (dict(N=200, D=8, V=1030, bias=True, ignore_frac=0.1), {}),
    "ignore": (dict(ODD, ignore_frac=0.3), {}),
    "ignore_index_is_a_class": (ODD, dict(ignore_index=5)),
    "smoothing": (dict(ODD, ignore_frac=0.2), dict(label_smoothing=0.1)),
    "z_loss": (dict(ODD, ignore_frac=0.2), dict(z_loss=1e-2)),
    "softcap": (dict(ODD, bias=True, logit_scale=6.0), dict(softcap=4.0)),
    "class_weight": (dict(ODD, ignore_frac=0.2), dict(class_weight=True)),
    "weight_smooth_sum": (dict(ODD, ignore_frac=0.2), dict(class_weight=True, label_smoothing=0.2,
                                                          reduction="sum")),
    "none": (dict(ODD, ignore_frac=0.2), dict(reduction="none")),
    "sum": (dict(ODD, bias=True), dict(reduction="sum")),
    "everything_none": (dict(ODD, bias=True, ignore_frac=0.2, logit_scale=6.0),
                        dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, class_weight=True,
                             reduction="none")),
    "everything_mean_multiblock": (dict(N=150, D=8, V=1100, bias=True, ignore_frac=0.2,
                                        logit_scale=6.0),
                                   dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                                        class_weight=True)),
    "btd": (dict(N=None, D=20, V=77, batch=(3, 9), bias=True, ignore_frac=0.2), {}),
    "btd_none": (dict(N=None, D=20, V=77, batch=(3, 9), ignore_frac=0.2), dict(reduction="none")),
    "single_token": (dict(N=None, D=12, V=33, batch=()), {}),
}


def _materialise(name, shape, opts):
    shape = dict(shape)
    opts = dict(opts)
    if "ignore_index" in opts:
        shape["ignore_index"] = opts["ignore_index"]
    x, w, b, t = make_inputs(("case", name), **shape)
    if opts.get("class_weight"):
        opts["class_weight"] = torch.rand(w.shape[0], generator=gen("cw", name)) + 0.5
    if "ignore_index" in opts and "ignore_frac" not in shape:
        t[:10] = opts["ignore_index"]  # the index itself is a class: make sure some rows use it
    return x, w, b, t, opts


def case_paths(cases):
    """(case, path) pairs, leaving out 16x16 tiles on vocabularies over 1024: ~850
    interpreted tiles each, while the default tiles already span several blocks there."""
    return [(c, p) for c in cases for p in LPATHS
            if not (p == "kernel_tiles16" and CASES[c][0].get("V", 0) > 1024)]


def with_impls(pairs):
    """(case, path, impl): both impls, but "chunked" not on kernel_tiles16 (it runs no LCE
    tile; the CE kernels' small tiles are tests/test_values.py's)."""
    return [(c, p, i) for c, p in pairs for i in ("fused", "chunked")
            if not (i == "chunked" and p == "kernel_tiles16")]


@pytest.mark.parametrize("case,path,impl", with_impls(case_paths(CASES)))
def test_parity_fp32(case, path, impl, monkeypatch):
    name, device = path, use_path(path, monkeypatch)
    x, w, b, t, opts = _materialise(case, *CASES[case])
    expect_path(name, x.to(device))
    loss, ref, pairs = run_pair(x, w, b, t, torch.float32, device, opts, grad_out_key=case,
                                impl=impl)
    check_pair(loss, ref, pairs, torch.float32)


@pytest.mark.parametrize("case,path,impl", with_impls(case_paths(
    ["odd_bias", "multiblock", "everything_none", "everything_mean_multiblock"])))
def test_parity_bf16(case, path, impl, monkeypatch):
    name, device = path, use_path(path, monkeypatch)
    x, w, b, t, opts = _materialise(case, *CASES[case])
    expect_path(name, x.to(device=device, dtype=torch.bfloat16))
    loss, ref, pairs = run_pair(x, w, b, t, torch.bfloat16, device, opts, grad_out_key=case,
                                impl=impl)
    check_pair(loss, ref, pairs, torch.bfloat16)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction, lpath2):
    """mean over nothing is nan (as torch), sum 0, none zeros; every gradient is 0."""
    _, device = lpath2
    x, w, b, t = make_inputs(("all_ignored", reduction), 20, 9, 40, bias=True)
    t[:] = -100
    loss, ref, pairs = run_pair(x, w, b, t, torch.float32, device, dict(reduction=reduction,
                                                                         z_loss=1e-2,
                                                                         label_smoothing=0.1))
    check_pair(loss, ref, pairs, torch.float32)
    if reduction == "mean":
        assert loss.isnan()
    for got, _, name in pairs:
        assert not got.any(), name


def test_zero_rows(lpath2):
    _, device = lpath2
    x = torch.zeros(0, 8, device=device, requires_grad=True)
    w = torch.randn(30, 8, generator=gen("zero_rows"), device="cpu").to(device).requires_grad_()
    t = torch.zeros(0, dtype=torch.long, device=device)
    assert lce(x, w, t, reduction="none").shape == (0,)
    loss = lce(x, w, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and w.grad is not None and not w.grad.any()
    assert lce(x, w, t).isnan()  # a mean over nothing, as torch


@pytest.mark.parametrize("tdtype", [torch.int32, torch.uint8])
def test_narrow_target_dtypes(tdtype, lpath2):
    _, device = lpath2
    x, w, b, t = make_inputs(("narrow", str(tdtype)), 30, 10, 50, bias=True)
    loss, ref, pairs = run_pair(x, w, b, t.to(tdtype), torch.float32, device, {})
    check_pair(loss, ref, pairs, torch.float32)


# ----------------------------------------------------------------------------
# shift=True, shapes and strides
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shift(reduction, lpath):
    """Position t predicts target t + 1: the reference runs on hidden[:, :-1], target[:, 1:]."""
    name, device = lpath
    x, w, b, t = make_inputs(("shift", reduction), None, 20, 77, batch=(3, 9), bias=True,
                             ignore_frac=0.2)
    t[1, -3:] = -100  # an ignored tail, as padding gives
    loss, ref, pairs = run_pair(x, w, b, t, torch.float32, device,
                                dict(reduction=reduction, shift=True), grad_out_key=reduction)
    if reduction == "none":
        assert loss.shape == (3, 8)
    check_pair(loss, ref, pairs, torch.float32)
    # dx of the last position is exactly zero: it predicts nothing
    dx = pairs[0][0]
    assert not dx[:, -1].any()
    # and the same as shifting the targets by hand (the documented equivalence)
    t_shifted = torch.cat([t[:, 1:], torch.full((3, 1), -100)], dim=1)
    loss2 = lce(x.to(device), w.to(device), t_shifted.to(device),
                                            b.to(device), reduction=reduction)
    if reduction == "none":
        loss2 = loss2[:, :-1]
    torch.testing.assert_close(loss.detach(), loss2, rtol=1e-6, atol=1e-7)


def test_shift_one_dimensional_sequence(lpath2):
    """(T, D) hidden states and (T,) targets: the time dimension is the only one."""
    _, device = lpath2
    x, w, b, t = make_inputs(("shift_1d",), 13, 10, 29)
    loss, ref, pairs = run_pair(x, w, b, t, torch.float32, device, dict(shift=True))
    check_pair(loss, ref, pairs, torch.float32)


def test_non_contiguous(lpath):
    """Strided x (every other column), transposed W, strided target: no copies needed."""
    name, device = lpath
    g = gen("strided")
    N, D, V = 37, 19, 130
    x_store = torch.randn(N, 2 * D, generator=g)
    w_store = torch.randn(D, V, generator=g) * (3.0 / math.sqrt(D))
    t_store = torch.randint(0, V, (2 * N,), generator=g)
    t_store[::7] = -100
    x_nc = x_store.to(device)[:, ::2].detach().requires_grad_()  # a leaf view: strides kept
    w_nc = w_store.to(device).t().detach().requires_grad_()
    t_nc = t_store.to(device)[::2]
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous() and not t_nc.is_contiguous()
    loss = lce(x_nc, w_nc, t_nc, label_smoothing=0.1)
    loss.backward()
    xr = ref_leaf(x_store[:, ::2])
    wr = ref_leaf(w_store.t())
    ref = reference(xr, wr, t_store[::2], label_smoothing=0.1)
    ref.backward()
    check_pair(loss, ref, [(x_nc.grad, xr.grad, "dx"), (w_nc.grad, wr.grad, "dW")], torch.float32)


def test_non_contiguous_3d_input(lpath2):
    """A (B, T, D) view with the batch and time dimensions transposed, with shift."""
    _, device = lpath2
    g = gen("strided3d")
    B, T, D, V = 3, 7, 12, 50
    store = torch.randn(T, B, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.8
    t = torch.randint(0, V, (B, T), generator=g)
    x = store.to(device).transpose(0, 1).detach().requires_grad_()
    assert not x.is_contiguous()
    wd = leaf(w, device)
    loss = lce(x, wd, t.to(device), shift=True, reduction="sum")
    loss.backward()
    xr = ref_leaf(store.transpose(0, 1))
    wr = ref_leaf(w)
    ref = reference(xr, wr, t, shift=True, reduction="sum")
    ref.backward()
    check_pair(loss, ref, [(x.grad, xr.grad, "dx"), (wd.grad, wr.grad, "dW")], torch.float32)


# ----------------------------------------------------------------------------
# Gradient plumbing
# ----------------------------------------------------------------------------

def test_reduction_none_grad_output(lpath2):
    """A random per-token grad_output (incl. zeros and negatives) scales each row's gradient."""
    _, device = lpath2
    x, w, b, t = make_inputs(("none_go",), 33, 14, 90, bias=True, ignore_frac=0.2)
    go = torch.randn(33, generator=gen("go"), dtype=torch.float64)
    go[:4] = 0.0
    xs, ws, bs = (leaf(v, device) for v in (x, w, b))
    loss = lce(xs, ws, t.to(device), bs, reduction="none",
                                           z_loss=1e-2, label_smoothing=0.05)
    loss.backward(go.float().to(device))
    xr, wr, br = (ref_leaf(v) for v in (x, w, b))
    ref = reference(xr, wr, t, br, reduction="none", z_loss=1e-2, label_smoothing=0.05)
    ref.backward(go)
    check_pair(loss, ref, [(xs.grad, xr.grad, "dx"), (ws.grad, wr.grad, "dW"),
                           (bs.grad, br.grad, "db")], torch.float32)
    assert not xs.grad[:4].any()  # rows with grad_output 0 get no gradient


def test_no_grad(lpath2):
    _, device = lpath2
    x, w, b, t = make_inputs(("no_grad",), 25, 10, 60, bias=True)
    xs, ws, bs = (leaf(v, device) for v in (x, w, b))
    with torch.no_grad():
        loss = lce(xs, ws, t.to(device), bs)
    assert not loss.requires_grad
    ref = reference(x.double(), w.double(), t, b.double())
    assert_close(loss, ref, 1e-5, 0, "loss")
    # nothing requires grad at all: a plain value
    loss2 = lce(x.to(device), w.to(device), t.to(device), b.to(device))
    assert not loss2.requires_grad and loss2.grad_fn is None
    assert_close(loss2, ref, 1e-5, 0, "loss")


@pytest.mark.parametrize("needs", [("w",), ("x",), ("b",), ("x", "b"), ("w", "b")])
def test_partial_requires_grad(needs, lpath2):
    """Only the tensors that require grad get one; the others stay None."""
    _, device = lpath2
    x, w, b, t = make_inputs(("partial",) + needs, 29, 11, 70, bias=True, ignore_frac=0.1)
    ours = {k: leaf(v, device, k in needs) for k, v in zip("xwb", (x, w, b))}
    refs = {k: ref_leaf(v, k in needs) for k, v in zip("xwb", (x, w, b))}
    loss = lce(ours["x"], ours["w"], t.to(device), ours["b"],
                                           label_smoothing=0.1, softcap=5.0)
    loss.backward()
    reference(refs["x"], refs["w"], t, refs["b"], label_smoothing=0.1, softcap=5.0).backward()
    for k in "xwb":
        if k in needs:
            assert ours[k].grad is not None, k
            assert_close(ours[k].grad, refs[k].grad, 1e-5, 1e-5, "d" + k)
        else:
            assert ours[k].grad is None, k


def test_grads_accumulate_into_existing(lpath2):
    """A second backward adds to .grad, like any autograd op."""
    _, device = lpath2
    x, w, b, t = make_inputs(("accumulate",), 20, 8, 40)
    xs, ws = leaf(x, device), leaf(w, device)
    for _ in range(2):
        lce(xs, ws, t.to(device)).backward()
    xr, wr = ref_leaf(x), ref_leaf(w)
    reference(xr, wr, t).backward()
    assert_close(ws.grad, 2 * wr.grad, 1e-5, 1e-5, "dW")
    assert_close(xs.grad, 2 * xr.grad, 1e-5, 1e-5, "dx")


def test_autocast_bf16(lpath2):
    """fp32 params under CPU autocast(bf16): inputs cast like F.linear, fp32 loss, fp32 grads."""
    name, device = lpath2
    x, w, b, t = make_inputs(("autocast",), 40, 24, 150, bias=True, ignore_frac=0.1)
    xs, ws, bs = (leaf(v, device) for v in (x, w, b))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = lce(xs, ws, t.to(device), bs)
        # what the unfused model computes under autocast: bf16 logits, fp32 loss
        logits = F.linear(xs.detach(), ws.detach(), bs.detach())
        assert logits.dtype == torch.bfloat16
        unfused = F.cross_entropy(logits, t.to(device))
    assert loss.dtype == torch.float32 and unfused.dtype == torch.float32
    loss.backward()
    for p in (xs, ws, bs):
        assert p.grad.dtype == torch.float32
    # The unfused loss comes from bf16-rounded logits (2^-9 relative each); the kernels
    # keep the logits in fp32, the PyTorch path rounds them like F.linear does.
    assert_close(loss, unfused, 5e-3, 0, "loss vs autocast unfused")
    rounded = [ref_leaf(v.to(torch.bfloat16)) for v in (x, w, b)]
    ref = reference(rounded[0], rounded[1], t, rounded[2])
    ref.backward()
    assert_close(loss, ref, 2e-3, 0, "loss")
    for got, r, n in zip((xs, ws, bs), rounded, ("dx", "dW", "db")):
        assert_close(got.grad, r.grad, *TOL[torch.bfloat16][2:], n)


def test_weight_grad_accumulates_in_fp32(lpath2):
    """bf16: N identical rows each add the same g to dW.  A bf16 accumulator stalls once
    the sum is 2^8 times g (the increment falls below half an ulp); fp32 is exact."""
    _, device = lpath2
    N, D, V = 2048, 16, 16
    g = gen("accumulate_fp32")
    x = torch.randn(1, D, generator=g).expand(N, D).to(torch.bfloat16)
    w = torch.randn(V, D, generator=g).to(torch.bfloat16)
    t = torch.full((N,), 3)
    xs, ws = leaf(x.contiguous(), device), leaf(w, device)
    lce(xs, ws, t.to(device), reduction="sum").backward()
    assert ws.grad.dtype == torch.bfloat16
    xr, wr = ref_leaf(x[:1]), ref_leaf(w)
    reference(xr, wr, t[:1], reduction="sum").backward()
    expected = N * wr.grad  # every row contributes the same
    # G is rounded to bf16 once (2^-9 relative), the sum is exact, the result rounded once
    assert_close(ws.grad, expected, 1e-2, 1e-3, "dW")


# ----------------------------------------------------------------------------
# gradcheck (float64: the PyTorch path in float64)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    g = gen("gradcheck", reduction)
    N, D, V = 6, 4, 9
    x = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[1] = -100
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return lce(x, w, t, b, reduction=reduction, softcap=2.0,
                                               label_smoothing=0.1, z_loss=0.05, class_weight=cw)

    assert torch.autograd.gradcheck(f, (x, w, b))
    # and the float64 path agrees with the reference to float64 precision
    ref = reference(x, w, t, b, reduction=reduction, softcap=2.0, label_smoothing=0.1,
                    z_loss=0.05, class_weight=cw)
    torch.testing.assert_close(f(x, w, b), ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

P = r"^softmax_ce\.linear_cross_entropy: "


def _good():
    g = gen("errors")
    return (torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g),
            torch.randint(0, 10, (6,), generator=g))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(reduction="avg"), ValueError, P + "reduction='avg'"),
    (dict(label_smoothing=1.5), RuntimeError, P + "label_smoothing"),
    (dict(label_smoothing=-0.1), RuntimeError, P + "label_smoothing"),
    (dict(softcap=0.0), ValueError, P + "softcap"),
    (dict(softcap=-1.0), ValueError, P + "softcap"),
    (dict(z_loss=-1e-3), ValueError, P + "z_loss"),
    (dict(class_weight=torch.ones(9)), RuntimeError, P + "weight"),
])
def test_bad_options(kwargs, exc, match):
    x, w, t = _good()
    with pytest.raises(exc, match=match):
        lce(x, w, t, **kwargs)
    kwargs = {("weight" if k == "class_weight" else k): v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        softmax_ce.LinearCrossEntropyLoss(w.shape[1], w.shape[0], **kwargs)(x, t)


def test_bad_tensors():
    x, w, t = _good()
    with pytest.raises(RuntimeError, match=P + r"weight \(10, 7\) does not match input \(6, 8\)"):
        lce(x, w[:, :7], t)
    with pytest.raises(RuntimeError, match=P + "weight must be"):
        lce(x, w[0], t)
    with pytest.raises(RuntimeError, match=P + r"bias must have shape \(10,\)"):
        lce(x, w, t, torch.zeros(11))
    with pytest.raises(RuntimeError, match=P + "bias"):
        lce(x, w, t, torch.zeros(1, 10))
    with pytest.raises(RuntimeError, match=P + "target must hold class indices"):
        lce(x, w, t.float())
    with pytest.raises(RuntimeError, match=P + "target must hold class indices"):
        lce(x, w, t.to(torch.int16))
    with pytest.raises(ValueError, match=P + r"Expected input batch_size \(6\) to match target "
                                            r"batch_size \(5\)"):
        lce(x, w, t[:5])
    with pytest.raises(ValueError, match=P + r"Expected input batch_size \(2\)"):
        lce(x.reshape(2, 3, 8), w, t)
    with pytest.raises(RuntimeError, match=P + r"target of shape \(2, 2\)"):
        lce(x.reshape(2, 3, 8), w, t[:4].reshape(2, 2))
    with pytest.raises(RuntimeError, match=P + "input"):
        lce(x.long(), w, t)
    with pytest.raises(ValueError, match=P + "shift=True"):
        lce(x[0], w, t[0], shift=True)


@pytest.mark.parametrize("bad", [10, 11, -1, -101])
def test_target_out_of_range(bad):
    x, w, t = _good()
    t[2] = bad
    with pytest.raises(IndexError, match=P + r"target holds a class outside \[0, 10\)"):
        lce(x, w, t)


def test_dtype_mismatch_without_autocast():
    x, w, t = _good()
    with pytest.raises(RuntimeError,
                       match=P + r"input \(torch.float32\), weight \(torch.bfloat16\)"):
        lce(x, w.bfloat16(), t)
    with pytest.raises(RuntimeError, match=P + "input .* and bias must share a dtype"):
        lce(x, w, t, torch.zeros(10, dtype=torch.float64))
    # under autocast the same mix is fine: everything is cast to the autocast dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lce(x, w.bfloat16(), t)
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------
# No N x V tensor
# ----------------------------------------------------------------------------

# softmax_ce's custom ops (torch.library.custom_op) are opaque to a TorchDispatchMode:
# the mode sees `softmax_ce.lce_fwd` as one op and, since a mode is popped while its
# __torch_dispatch__ runs, nothing that op's implementation does.  So the mode below
# runs the implementation of each softmax_ce op itself, with the mode pushed again:
# every aten op the launchers execute (matmuls, chunk temporaries, gradient buffers)
# then passes through it and its outputs are recorded.  (The interpreter's own NumPy
# arrays are not torch ops; perf/linear_memory.py measures that path's peak RSS.)
_CUSTOM_IMPLS = {v._opoverload: v._init_fn for v in vars(_ops).values()
                 if isinstance(v, CustomOpDef)}


class RecordAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = []  # (numel, op name) of every tensor an op returned
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func.overloadpacket))
        if func in _CUSTOM_IMPLS:
            with self:
                out = _CUSTOM_IMPLS[func](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for o in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(o, torch.Tensor):
                # bytes of the storage behind it: a view reports its base's size, so a
                # view cannot hide a big allocation (and the interpreter's byte views of
                # its arguments' storages count as what they are, the arguments' size)
                self.sizes.append((o.untyped_storage().nbytes(), str(func)))
        return out


@pytest.mark.parametrize("name", ["torch_chunked", "kernel"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_n_by_v_tensor(name, reduction, monkeypatch):
    N, D, V = 256, 16, 512  # N*V = 131072 > 16 * max(V*D, N*D, chunk)
    chunk = 2048
    device = use_path(name, monkeypatch)
    if device != "cpu":
        pytest.skip("CPU: the dispatch mode wraps the CPU launchers")
    monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(_torch_path, "SMALL_ELEMENTS", chunk)
    x, w, b, t = make_inputs(("nxv", name, reduction), N, D, V, bias=True, ignore_frac=0.1)
    xs, ws, bs = (leaf(v, device) for v in (x, w, b))
    cw = torch.rand(V, generator=gen("nxv_cw")) + 0.5
    with RecordAllocations() as rec:
        loss = lce(xs, ws, t, bs, reduction=reduction,
                                               label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                               class_weight=cw)
        loss.backward(torch.ones_like(loss))
    # the mode really saw inside the custom ops: the matmuls of the launchers
    assert "softmax_ce.lce_fwd" in rec.ops and "softmax_ce.lce_bwd" in rec.ops
    if name == "torch_chunked":
        assert rec.ops & {"aten.mm", "aten.matmul", "aten.addmm_"}, sorted(rec.ops)
    biggest, op = max(rec.sizes)
    bound = 4 * max(V * D, N * D, chunk)  # fp32 bytes of W, x or one chunk of logits
    assert biggest <= bound, f"{op} returned {biggest} bytes (fp32 N x V: {4 * N * V})"
    assert 4 * N * V >= 16 * bound
    assert xs.grad is not None and ws.grad is not None and bs.grad is not None


# ----------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------

def test_module_equals_function(lpath2):
    """The module owns its head (torch's nn.LinearCrossEntropyLoss layout): with the same
    weights it gives the function's numbers, options included."""
    _, device = lpath2
    x, w, b, t = make_inputs(("module",), None, 16, 64, batch=(2, 10), bias=True, ignore_frac=0.2)
    cw = (torch.rand(64, generator=gen("module_cw")) + 0.5).to(device)
    opts = dict(ignore_index=-100, reduction="sum", label_smoothing=0.1, z_loss=1e-3,
                softcap=5.0, shift=True)
    mod = softmax_ce.LinearCrossEntropyLoss(16, 64, bias=True, weight=cw, **opts).to(device)
    assert torch.equal(mod.weight, cw) and "weight" in dict(mod.named_buffers())
    with torch.no_grad():
        mod.linear.weight.copy_(w)
        mod.linear.bias.copy_(b)
    xs = leaf(x, device)
    loss = mod(xs, t.to(device))
    loss.backward()
    xr, ws, bs = leaf(x, device), leaf(w, device), leaf(b, device)
    ref = softmax_ce.linear_cross_entropy(xr, ws, t.to(device), linear_bias=bs, weight=cw, **opts)
    ref.backward()
    assert torch.equal(loss.detach(), ref.detach())
    for ours, theirs in ((xs.grad, xr.grad), (mod.linear.weight.grad, ws.grad),
                         (mod.linear.bias.grad, bs.grad)):
        assert torch.equal(ours, theirs)
    # defaults: the plain mean, no bias
    plain = softmax_ce.LinearCrossEntropyLoss(16, 64).to(device)
    assert plain.linear.bias is None
    assert torch.equal(plain(x.to(device), t.to(device)),
                       softmax_ce.linear_cross_entropy(x.to(device), plain.linear.weight,
                                                       t.to(device)))
