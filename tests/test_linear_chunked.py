"""Linear cross-entropy with torch's signature, chunked on the matmul library or fused.

Every value is checked against an fp64 unfused reference, F.cross_entropy(F.linear(...)),
on both CPU paths (path2: the interpreted Triton kernels, the multi-chunk PyTorch path):

* impl="chunked" (default) and impl="fused" over reductions and options, with a chunk
  budget that makes several chunks and a partial last one;
* torch's own F.linear_cross_entropy / nn.LinearCrossEntropyLoss called with the same
  arguments give the same loss and gradients (the signature and the meaning of `weight`);
* what is allocated: never an N x V tensor in either impl, at most one chunk of logits
  in "chunked", the chunk size torch's `options.batch_chunk_size` asks for;
* accum_dtype, filter_eps, return_lse, retain_graph, forward-only under no_grad.
"""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce

from _helpers import assert_close_to_ref, check_path, gen

lce = softmax_ce.linear_cross_entropy
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
N, D, V = 29, 12, 150


def _inputs(key, dtype=torch.float32, bias=True, ignore=True):
    g = gen(*key)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.2 if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[::4] = -100
    cw = torch.rand(V, generator=g) + 0.5
    return x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None), t, cw


def _reference(x, w, b, t, cw, reduction, label_smoothing, softcap=None, z_loss=0.0):
    """fp64, unfused; z_loss as in tests/reference.py."""
    from reference import reference_cross_entropy
    z = F.linear(x, w, b)
    return reference_cross_entropy(z, t, cw, reduction=reduction,
                                   label_smoothing=label_smoothing, softcap=softcap,
                                   z_loss=z_loss)


def _leaf(t, device):
    return t.clone().to(device).requires_grad_() if t is not None else None


OPTIONS = {
    "plain": dict(),
    "weights-smoothing": dict(weight=True, label_smoothing=0.1),
    "softcap-zloss": dict(softcap=3.0, z_loss=1e-2),
}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_matches_the_unfused_reference(impl, reduction, options, path2):
    x, w, b, t, cw = _inputs(("lce-ref", impl, reduction, options, path2.name))
    o = dict(OPTIONS[options])
    use_w = o.pop("weight", False)
    ref_x, ref_w, ref_b = (a.double().requires_grad_() for a in (x, w, b))
    ref = _reference(ref_x, ref_w, ref_b, t, cw.double() if use_w else None, reduction,
                     o.get("label_smoothing", 0.0), o.get("softcap"), o.get("z_loss", 0.0))
    up = torch.randn(ref.shape, generator=gen("up", impl, reduction, options)).double() \
        if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (ref * up).sum().backward()

    xs, ws, bs = (_leaf(a, path2.device) for a in (x, w, b))
    check_path(path2, xs)
    # 11 rows per chunk: 3 chunks of 29 rows, the last one partial
    loss = lce(xs, ws, t.to(path2.device), linear_bias=bs, reduction=reduction, impl=impl,
               weight=cw.to(path2.device) if use_w else None, chunk_bytes=11 * V * 4, **o)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    (loss * up.float().to(path2.device)).sum().backward()
    for name, a, r in (("dx", xs, ref_x), ("dW", ws, ref_w), ("db", bs, ref_b)):
        assert_close_to_ref(a.grad, r.grad, torch.float32, rtol=2e-5, scale_atol=2e-6, what=name)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch has F.linear_cross_entropy from 2.13 on")
@pytest.mark.parametrize("call", ["defaults", "class-weights", "ignore-None", "smoothing-sum"])
def test_torch_signature_means_the_same(call, path2):
    """The very call a user writes for torch, keyword for keyword."""
    x, w, b, t, cw = _inputs(("torch-sig", call, path2.name))
    kw = {"defaults": dict(),
          "class-weights": dict(weight=cw, linear_bias=b),
          "ignore-None": dict(ignore_index=None, reduction="none"),
          "smoothing-sum": dict(label_smoothing=0.2, reduction="sum", linear_bias=b)}[call]
    results = []
    for fn, device in ((F.linear_cross_entropy, "cpu"), (lce, path2.device)):
        xs, ws = _leaf(x, device), _leaf(w, device)
        kwd = {k: (_leaf(v, device) if k == "linear_bias" else
                   v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        loss = fn(xs, ws, t.to(device), **kwd)
        loss.sum().backward()
        results.append([loss.detach().cpu(), xs.grad.cpu(), ws.grad.cpu()]
                       + ([kwd["linear_bias"].grad.cpu()] if "linear_bias" in kwd else []))
    for theirs, ours in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"),
                    reason="torch has nn.LinearCrossEntropyLoss from 2.13 on")
def test_module_follows_torchs(path2):
    x, _, _, t, cw = _inputs(("module", path2.name))
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, bias=True, weight=cw, label_smoothing=0.1)
    ours = softmax_ce.LinearCrossEntropyLoss(D, V, bias=True, weight=cw, label_smoothing=0.1)
    ours.load_state_dict(theirs.state_dict())
    ours = ours.to(path2.device)
    a = theirs(x, t)
    b = ours(x.to(path2.device), t.to(path2.device))
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(ours.linear.weight.grad.cpu(), theirs.linear.weight.grad,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out_features"):
        softmax_ce.LinearCrossEntropyLoss(D, V, out_features=(2,))


def _allocations(fn):
    """The sizes in bytes of every CPU allocation fn makes (the profiler sees inside our
    custom ops, where a dispatch mode would see only the op)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.nbytes() > 0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU memory profile")
@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_no_logits_beyond_the_chunk(impl, path2):
    x, w, b, t, cw = _inputs(("alloc", impl, path2.name))
    xs, ws, bs = (_leaf(a, path2.device) for a in (x, w, b))
    sizes = _allocations(lambda: lce(xs, ws, t, linear_bias=bs, impl=impl, label_smoothing=0.1,
                                     chunk_bytes=6 * V * 4).backward())
    logits = N * V * 4
    assert max(sizes) < logits, (sorted(sizes)[-5:], logits)
    if impl == "chunked":
        assert 6 * V * 4 in sizes  # the chunk buffer: 6 rows of logits


@pytest.mark.skipif(not HAS_TORCH_LCE or torch.cuda.is_available(),
                    reason="LinearCrossEntropyOptions: torch 2.13+; CPU memory profile")
def test_options_batch_chunk_size_sets_the_chunk(path2):
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
    x, w, b, t, _ = _inputs(("options", path2.name))
    xs, ws = _leaf(x, path2.device), _leaf(w, path2.device)
    out = {}
    sizes = _allocations(lambda: out.update(loss=lce(
        xs, ws, t, options=LinearCrossEntropyOptions(batch_chunk_size=7))))
    assert 7 * V * 4 in sizes and max(sizes) < N * V * 4
    ref = F.cross_entropy(F.linear(x.double(), w.double()), t)
    assert_close_to_ref(out["loss"], ref, torch.float32, what="loss")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU memory profile")
def test_eval_computes_no_gradient(path2):
    """Under no_grad neither the weight-gradient accumulator (V, D) nor dx is allocated;
    with grad enabled both are (the control)."""
    x, w, b, t, _ = _inputs(("eval", path2.name), bias=False)
    ws = w.clone().requires_grad_()
    out = {}

    def run():
        out["loss"] = lce(x, ws, t, chunk_bytes=5 * V * 4)

    with torch.no_grad():
        sizes = _allocations(run)
    assert V * D * 4 not in sizes and N * D * 4 not in sizes, sizes
    assert V * D * 4 in _allocations(run)
    ref = F.cross_entropy(F.linear(x.double(), w.double()), t)
    assert_close_to_ref(out["loss"], ref, torch.float32, what="loss")


def test_retain_graph_backward_twice(path2):
    """The gradients computed in the forward are scaled in place by the backward, so a
    second backward raises, as torch's chunked loss does; allow_retain_graph=True in the
    options keeps them, and a second backward gives the same again."""
    from types import SimpleNamespace
    x, w, b, t, _ = _inputs(("retain", path2.name))
    xs, ws = _leaf(x, path2.device), _leaf(w, path2.device)
    loss = lce(xs, ws, t.to(path2.device)) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="allow_retain_graph"):
        loss.backward()
    xs, ws = _leaf(x, path2.device), _leaf(w, path2.device)
    keep = SimpleNamespace(allow_retain_graph=True, batch_chunk_size=None)
    loss = lce(xs, ws, t.to(path2.device), options=keep) * 0.5
    loss.backward(retain_graph=True)
    first = ws.grad.clone()
    loss.backward()
    torch.testing.assert_close(ws.grad, 2 * first, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_return_lse_is_exact_and_differentiable(impl, path2):
    x, w, b, t, _ = _inputs(("lse", impl, path2.name), bias=False)
    xs, ws = _leaf(x, path2.device), _leaf(w, path2.device)
    loss, lse = lce(xs, ws, t.to(path2.device), impl=impl, return_lse=True)
    ref_x, ref_w = x.double().requires_grad_(), w.double().requires_grad_()
    z = ref_x @ ref_w.t()
    ref_lse = torch.logsumexp(z, 1)
    assert_close_to_ref(lse, ref_lse, torch.float32, what="lse")
    (F.cross_entropy(z, t) + 0.3 * ref_lse.sum()).backward()
    (loss + 0.3 * lse.sum()).backward()
    assert_close_to_ref(ws.grad, ref_w.grad, torch.float32, rtol=2e-5, scale_atol=2e-6, what="dW")


def test_accum_dtype(path2):
    x, w, b, t, _ = _inputs(("accum", path2.name), bias=False)
    ref_w = w.double().requires_grad_()
    F.cross_entropy(F.linear(x.double(), ref_w), t).backward()
    for accum in (torch.float32, None):
        ws = _leaf(w, path2.device)
        lce(x.to(path2.device), ws, t.to(path2.device), accum_dtype=accum).backward()
        assert ws.grad.dtype == torch.float32
        assert_close_to_ref(ws.grad, ref_w.grad, torch.float32, rtol=2e-5, scale_atol=2e-6)
    with pytest.raises(ValueError, match="accum_dtype"):
        lce(x, w, t, accum_dtype=torch.float16)
    with pytest.raises(ValueError, match="accum_dtype"):
        lce(x.to(torch.bfloat16), w.to(torch.bfloat16), t, accum_dtype=torch.bfloat16,
            impl="fused")


def test_accum_in_the_weights_dtype_bf16(path2):
    """bf16 head, dW accumulated in bf16 (half the accumulator's memory): still within bf16's
    precision of the fp64 gradient, returned in bf16."""
    x, w, b, t, _ = _inputs(("accum-bf16", path2.name), dtype=torch.bfloat16, bias=False)
    ref_w = w.double().requires_grad_()
    F.cross_entropy(F.linear(x.double(), ref_w), t).backward()
    ws = _leaf(w, path2.device)
    lce(x.to(path2.device), ws, t.to(path2.device), accum_dtype=torch.bfloat16,
        chunk_bytes=8 * V * 2).backward()
    assert ws.grad.dtype == torch.bfloat16
    err = (ws.grad.double().cpu() - ref_w.grad).abs().max() / ref_w.grad.abs().max()
    assert err < 2e-2, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter stand-in for the kernel")
def test_filter_eps(monkeypatch):
    """Fused kernels only.  A threshold above every |G| / max|dlse| skips every tile (no
    gradient at all); a tiny one changes nothing; the chunked impl refuses it."""
    from conftest import make_path
    path = make_path("kernel", monkeypatch)
    x, w, b, t, _ = _inputs(("filter",), bias=False)
    grads = {}
    for eps in (0.0, 1e-30, 10.0):
        ws = _leaf(w, path.device)
        lce(x, ws, t, impl="fused", filter_eps=eps).backward()
        grads[eps] = ws.grad
    assert torch.equal(grads[1e-30], grads[0.0])
    assert torch.count_nonzero(grads[10.0]) == 0 and torch.count_nonzero(grads[0.0]) > 0
    with pytest.raises(ValueError, match="filter_eps"):
        lce(x, w, t, filter_eps=1e-3)
    with pytest.raises(ValueError, match="impl"):
        lce(x, w, t, impl="bogus")
