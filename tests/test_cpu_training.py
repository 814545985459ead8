"""The PyTorch path's training step: grad_mode "softmax" (softmax_ce._autograd.training_grad_mode).

On that path a training call's forward writes softmax(z) and the backward turns it into
the gradient in place (one multiply and a scatter), where the recompute backward read the
logits again with an exp per element into a freshly allocated buffer.  These tests check
where the mode is chosen, its values against the fp64 reference with poisoned outputs and
GPU-like inputs (masked columns, rows near 1e4, ignored rows of -inf or nan), what its
backward runs, and that a second backward over the same graph gives the same bits.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import softmax_ce
from softmax_ce import _autograd, _launch
from _helpers import assert_close_to_ref, gen
from reference import reference_cross_entropy

NAN = float("nan")


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setattr(_launch, "FORCED_BACKEND", "torch")


@pytest.fixture
def poisoned(monkeypatch):
    """The forward's row outputs and its softmax buffer start as nan, so an element the
    forward never writes shows in the loss or the gradient."""
    real = _launch.softmax_forward_into
    calls = []

    def forward(logits, target, alpha, zeta, *outputs):
        for t in outputs:
            t.fill_(NAN)
        calls.append(logits.shape)
        real(logits, target, alpha, zeta, *outputs)

    monkeypatch.setattr(_launch, "softmax_forward_into", forward)
    return calls


def _mode(x, **kw):
    args = dict(grad_mode="recompute", inplace=False, prob_target=False, softcap=None, beta=None)
    args.update(kw)
    return _autograd.training_grad_mode(x, args.pop("grad_mode"), **args)


def test_where_the_mode_is_chosen(torch_path):
    x = torch.randn(4, 7, requires_grad=True)
    assert _mode(x) == "softmax"
    assert _mode(x.double()) == "softmax"
    assert _mode(x.bfloat16()) == "recompute"  # its softmax would be rounded to bf16
    assert _mode(x, prob_target=True) == "recompute"
    assert _mode(x, softcap=30.0) == "recompute"
    assert _mode(x, beta=torch.ones(4)) == "recompute"  # label smoothing
    assert _mode(x, inplace=True) == "softmax"  # the backward's softmax over the logits
    assert _mode(x.t(), inplace=True) == "recompute"  # not in place on a strided tensor
    assert _mode(x, grad_mode="fused") == "fused"
    assert _mode(x.detach()) == "recompute"
    with torch.no_grad():
        assert _mode(x) == "recompute"
    seen = []
    torch.func.grad(lambda y: seen.append(_mode(y)) or y.sum())(x.detach())
    assert seen == ["recompute"]


def test_the_kernels_keep_recomputing(monkeypatch):
    monkeypatch.setattr(_launch, "FORCED_BACKEND", None)
    x = torch.randn(4, 7, requires_grad=True)
    if _launch.uses_triton(x):  # interpreted kernels (no GPU) or a CUDA tensor
        assert _mode(x) == "recompute"
    if torch.cuda.is_available():
        assert _mode(x.cuda()) == "recompute"


def _gpu_like_logits(n, v, g):
    """Random logits with what real ones have: a masked (-inf) vocabulary tail, a row
    near +1e4, and two ignored rows, one of only -inf and one holding a nan."""
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    z[:, -3:] = float("-inf")
    z[1] += 1e4
    z[2] = float("-inf")
    z[3, 5] = NAN
    t = torch.randint(0, v - 3, (n,), generator=g)
    t[2] = t[3] = -100
    return z, t


OPTIONS = {
    "mean": dict(),
    "sum-weight": dict(reduction="sum", weight=True),
    "none-zloss": dict(reduction="none", z_loss=1e-3),
    "mean-lse": dict(return_lse=True, z_loss=1e-4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_values_and_gradient(name, dtype, torch_path, poisoned):
    opts = dict(OPTIONS[name])
    g = gen("cpu-training", name, dtype)
    n, v = 9, 40
    z, t = _gpu_like_logits(n, v, g)
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5 if opts.pop("weight", False) else None
    x = z.to(dtype).requires_grad_()
    ref_x = x.detach().double().requires_grad_()  # the reference sees the rounded logits
    ref = reference_cross_entropy(ref_x, t, w, **opts)
    out = softmax_ce.cross_entropy(x, t, w.to(dtype) if w is not None else None, **opts)
    assert poisoned == [(n, v)], "the training step did not take the softmax mode"
    ref_loss, loss = (ref[0], out[0]) if opts.get("return_lse") else (ref, out)
    up = torch.randn(ref_loss.shape, generator=g, dtype=torch.float64)
    ref_obj, obj = (ref_loss * up).sum(), (loss * up.to(dtype)).sum()
    if opts.get("return_lse"):  # the lse's own gradient joins the loss's
        live = t != -100
        ref_obj = ref_obj + ref[1][live].sum()
        obj = obj + out[1][live].sum()
        assert_close_to_ref(out[1][live], ref[1][live], dtype, what="lse")
    ref_obj.backward()
    obj.backward()
    assert_close_to_ref(loss, ref_loss, dtype, what="loss")
    live = t != -100  # torch's gradient of an ignored row of nan or -inf is nan; ours is 0
    assert_close_to_ref(x.grad[live], ref_x.grad[live], dtype, what="grad")
    assert (x.grad[~live] == 0).all(), "an ignored row's gradient is not 0"


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        big = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
               if isinstance(o, torch.Tensor) and o.numel() > 100]  # not row vectors
        self.ops.append((str(func), [o.data_ptr() for o in big]))
        return out


def test_backward_rescales_the_forward_softmax(torch_path):
    """The backward makes no logits-sized buffer and computes no exp or softmax: it
    scales the forward's softmax in place and returns it as the gradient."""
    g = gen("cpu-training-ops")
    z = torch.randn(64, 300, generator=g)
    t = torch.randint(0, 300, (64,), generator=g)
    x = z.clone().requires_grad_()
    with _Ops() as fwd:
        loss = softmax_ce.cross_entropy(x, t)
    soft = [p for op, ptrs in fwd.ops if "_softmax" in op for p in ptrs]
    assert soft, fwd.ops
    with _Ops() as bwd:
        loss.backward()
    names = {op.split(".")[1] for op, _ in bwd.ops}
    assert not names & {"exp", "exp_", "_softmax", "_log_softmax", "sub"}, names
    assert {p for _, ptrs in bwd.ops for p in ptrs} == {soft[0]}, "a logits-sized buffer was made"
    assert x.grad.data_ptr() == soft[0]
    ref_x = z.double().requires_grad_()
    reference_cross_entropy(ref_x, t).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.float32)


@pytest.mark.parametrize("name", ["mean", "none-zloss", "mean-lse"])
def test_second_backward_gives_the_same_bits(name, torch_path):
    """The first backward hands out the forward's softmax; a second one over the same graph
    (retain_graph) recomputes it with the same op, so both gradients are identical."""
    opts = dict(OPTIONS[name])
    g = gen("cpu-training-twice", name)
    z, t = _gpu_like_logits(6, 30, g)
    x = z.float().requires_grad_()
    out = softmax_ce.cross_entropy(x, t, **opts)
    obj = (out[0].sum() + out[1][t != -100].sum()) if opts.get("return_lse") else out.sum()
    first, = torch.autograd.grad(obj, x, retain_graph=True)
    second, = torch.autograd.grad(obj, x)
    assert torch.equal(first, second)
    assert not torch.isnan(first[t != -100]).any()


@pytest.mark.parametrize("name", ["mean", "none-zloss"])
def test_inplace_backward_writes_the_softmax_over_the_logits(name, torch_path):
    """inplace_backward=True: the backward writes the softmax over the logits and rescales
    it there (no exp, no second buffer), and the logits' storage ends up holding the
    gradient; the user's leaf is untouched."""
    opts = dict(OPTIONS[name])
    g = gen("cpu-training-inplace", name)
    z, t = _gpu_like_logits(8, 50, g)
    leaf = z.float().requires_grad_()
    base = leaf * 1.0  # an LM head's output, say
    loss = softmax_ce.cross_entropy(base, t, inplace_backward=True, **opts)
    up = torch.randn(loss.shape, generator=g)
    with _Ops() as bwd:
        (loss * up).sum().backward()
    names = [op for op, _ in bwd.ops]
    softmax_out = [ptrs for op, ptrs in bwd.ops if op == "aten._softmax.out"]
    assert softmax_out == [[base.data_ptr()]], names
    assert not {op.split(".")[1] for op in names} & {"exp", "exp_", "sub"}, names
    ref_x = z.float().double().requires_grad_()
    (reference_cross_entropy(ref_x, t, **opts) * up.double()).sum().backward()
    live = t != -100
    assert_close_to_ref(leaf.grad[live], ref_x.grad[live], torch.float32, what="grad")
    assert (leaf.grad[~live] == 0).all()
    assert torch.equal(base.detach(), leaf.grad), "the logits' storage does not hold the gradient"
    torch.testing.assert_close(leaf.detach(), z.float(), rtol=0, atol=0, equal_nan=True)
