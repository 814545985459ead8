"""torch.func, forward-mode AD and double backward, against torch and the fp64 reference.

* float64 (gradgradcheck, forward-mode gradcheck): float64 logits always run on the
  PyTorch path (`_launch.backend_for` routes float64 there, asserted below), so these
  checks cover that path's forward and first-order backward, and the differentiable
  backward that every path shares;
* float32 on `path2` (the interpreted kernels and the chunked PyTorch path): the same
  transforms on each back end's forward (and first-order backward), compared with the
  fp64 reference's own torch.func results;
* torch's positional order and its deprecated size_average / reduce;
* the modes that cannot go beyond first order raise, saying so.
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vjp, vmap

import softmax_ce
from softmax_ce._launch import backend_for

from _helpers import assert_close_to_ref, check_path, gen
from reference import reference_cross_entropy

ce = softmax_ce.cross_entropy

# option sets over the two kinds of target; "ignore" puts ignore_index on some targets
# (class indices only: torch refuses it with probabilities), "weight" draws class weights
OPTIONS = {
    "plain": {},
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "smooth": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.5),
    "all": dict(weight=True, ignore=True, label_smoothing=0.15, z_loss=0.05, softcap=3.0),
}
GRID = [(tk, name, red) for tk in ("index", "prob") for name in OPTIONS
        for red in ("mean", "sum", "none") if not (tk == "prob" and name == "ignore")]
LSE_GRID = [(tk, red) for tk in ("index", "prob") for red in ("mean", "none")]


def _case(target_kind, opts, dtype=torch.float64, shape=(4, 6), key=()):
    """(logits, target, kwargs for ours and the reference)"""
    g = gen("func", target_kind, sorted(opts), dtype, shape, *key)
    n_classes = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    batch = shape[:1] + shape[2:]
    if target_kind == "prob":
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=1).to(dtype)
    else:
        t = torch.randint(0, n_classes, batch, generator=g)
        if opts.get("ignore"):
            t.view(-1)[::3] = -100
    kw = {k: v for k, v in opts.items() if k not in ("weight", "ignore")}
    if opts.get("weight"):
        kw["weight"] = torch.rand(n_classes, generator=g, dtype=torch.float64).to(dtype) + 0.2
    return x, t, kw


# ----------------------------------------------------------------------------
# float64: gradgradcheck, first-order gradcheck with batched (vmapped) gradients,
# forward-mode gradcheck
# ----------------------------------------------------------------------------

def _fn(t_fixed, kw, with_target, return_lse=False):
    """The loss as a function of the logits (and of probability targets)."""
    def f(x, *y):
        return ce(x, y[0] if with_target else t_fixed, **kw, return_lse=return_lse)
    return f


@pytest.mark.parametrize("target_kind,name,reduction", GRID, ids=["-".join(c) for c in GRID])
def test_gradgradcheck(target_kind, name, reduction):
    x, t, kw = _case(target_kind, OPTIONS[name])
    assert backend_for(x) == "torch"  # float64 runs on the PyTorch path on every device
    x.requires_grad_()
    inputs = (x, t.requires_grad_()) if target_kind == "prob" else (x,)
    f = _fn(t, dict(kw, reduction=reduction), target_kind == "prob")
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("target_kind,reduction", LSE_GRID, ids=["-".join(c) for c in LSE_GRID])
def test_gradgradcheck_return_lse(target_kind, reduction):
    x, t, kw = _case(target_kind, OPTIONS["all"] if target_kind == "index"
                     else dict(OPTIONS["all"], ignore=False), key=("lse",))
    x.requires_grad_()
    inputs = (x, t.requires_grad_()) if target_kind == "prob" else (x,)
    f = _fn(t, dict(kw, reduction=reduction), target_kind == "prob", return_lse=True)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradgradcheck_spatial():
    """(N, C, d) logits: the class dimension moved to the rows and back."""
    x, t, kw = _case("index", OPTIONS["all"], shape=(2, 5, 3))
    f = _fn(t, kw, False)
    assert torch.autograd.gradgradcheck(f, (x.requires_grad_(),))


@pytest.mark.parametrize("target_kind,name,reduction", GRID, ids=["-".join(c) for c in GRID])
def test_forward_ad_gradcheck(target_kind, name, reduction):
    """forward-mode AD (torch.autograd.forward_ad, and vmapped over tangents) against
    finite differences."""
    x, t, kw = _case(target_kind, OPTIONS[name], key=("fwd",))
    x.requires_grad_()
    inputs = (x, t.requires_grad_()) if target_kind == "prob" else (x,)
    f = _fn(t, dict(kw, reduction=reduction), target_kind == "prob",
            return_lse=name == "all")
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_forward_grad=True)


def test_double_backward_matches_torch():
    """Hessian-vector products of torch's own options, against torch's F.cross_entropy."""
    x, t, kw = _case("index", dict(weight=True, ignore=True, label_smoothing=0.1), key=("hvp",))
    v = torch.randn(x.shape, generator=gen("hvp-v"), dtype=torch.float64)
    results = []
    for fn in (ce, F.cross_entropy):
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xr, t, **kw), xr, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v).sum(), xr)
        results.append((gx.detach(), hv))
    assert_close_to_ref(results[0][0], results[1][0], torch.float64)
    assert_close_to_ref(results[0][1], results[1][1], torch.float64)
    assert results[1][1].abs().max() > 1e-3  # a Hessian that is not zero


# ----------------------------------------------------------------------------
# float32 on both back ends: torch.func against the fp64 reference
# ----------------------------------------------------------------------------

F32_GRID = [(tk, name) for tk in ("index", "prob") for name in ("plain", "all")]


def _ours_and_ref(target_kind, name, reduction="mean", return_lse=False):
    x, t, kw = _case(target_kind, OPTIONS[name] if target_kind == "index"
                     else dict(OPTIONS[name], ignore=False), dtype=torch.float32,
                     shape=(5, 20), key=(reduction, return_lse))

    def ours(z, y=t):
        return ce(z, y, reduction=reduction, return_lse=return_lse, **kw)

    def ref(z, y=t.double() if t.is_floating_point() else t):
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return reference_cross_entropy(z, y, reduction=reduction, return_lse=return_lse, **kw64)

    return x, t, ours, ref


@pytest.mark.parametrize("target_kind,name", F32_GRID, ids=["-".join(c) for c in F32_GRID])
def test_func_grad_and_vjp(target_kind, name, path2):
    """torch.func.grad and vjp (a differentiable backward) equal autograd's first-order
    backward on the path and the fp64 reference's gradient."""
    x, t, ours, ref = _ours_and_ref(target_kind, name)
    x = x.to(path2.device)
    check_path(path2, x)
    g_func = grad(ours)(x)
    xr = x.clone().requires_grad_()
    (g_autograd,) = torch.autograd.grad(ours(xr), xr)
    g_ref = grad(ref)(x.double())
    assert_close_to_ref(g_func, g_ref, torch.float32)
    assert_close_to_ref(g_autograd, g_ref, torch.float32)
    if target_kind == "prob":  # d loss / d target as well
        gy = grad(lambda y: ours(x, y))(t)
        assert_close_to_ref(gy, grad(lambda y: ref(x.double(), y))(t.double()), torch.float32)
    _, vjp_fn = vjp(ours, x)
    (g_vjp,) = vjp_fn(torch.tensor(0.5))
    assert_close_to_ref(g_vjp, 0.5 * g_ref, torch.float32)


@pytest.mark.parametrize("target_kind,name", F32_GRID, ids=["-".join(c) for c in F32_GRID])
def test_func_jvp_and_hvp(target_kind, name, path2):
    """torch.func.jvp (loss and lse tangents) and a Hessian-vector product (forward over
    reverse and reverse over reverse) against the fp64 reference."""
    x, t, ours, ref = _ours_and_ref(target_kind, name, reduction="none", return_lse=True)
    x = x.to(path2.device)
    check_path(path2, x)
    v = torch.randn(x.shape, generator=gen("jvp-v", target_kind, name))
    out, tangent = jvp(ours, (x,), (v,))
    out_ref, tangent_ref = jvp(ref, (x.double(),), (v.double(),))
    for a, b in zip(out + tangent, out_ref + tangent_ref):
        assert_close_to_ref(a, b, torch.float32)

    def scalar(f):
        return lambda z: f(z)[0].sum() + 0.3 * f(z)[1].sum()

    hvp_fwd = jvp(grad(scalar(ours)), (x,), (v,))[1]
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(scalar(ours)(xr), xr, create_graph=True)
    (hvp_rev,) = torch.autograd.grad((gx * v).sum(), xr)
    hvp_ref = jvp(grad(scalar(ref)), (x.double(),), (v.double(),))[1]
    assert_close_to_ref(hvp_fwd, hvp_ref, torch.float32, scale_atol=1e-5)
    assert_close_to_ref(hvp_rev, hvp_ref, torch.float32, scale_atol=1e-5)


VMAP_GRID = [(tk, name, red) for tk in ("index", "prob") for name in ("plain", "all")
             for red in ("mean", "none")]


@pytest.mark.parametrize("target_kind,name,reduction", VMAP_GRID,
                         ids=["-".join(c) for c in VMAP_GRID])
def test_vmap_matches_loop(target_kind, name, reduction, path2):
    """vmap over a batch of (logits, target) pairs: each item as its own call (a mean is
    over each item's own targets), and per-sample gradients by vmap(grad)."""
    B = 3
    x0, _, ours, ref = _ours_and_ref(target_kind, name, reduction)
    g = gen("vmap", target_kind, name, reduction)
    xs = torch.randn((B,) + x0.shape, generator=g).to(path2.device)
    if target_kind == "prob":
        ts = torch.softmax(torch.randn((B,) + x0.shape, generator=g), dim=-1)
    else:
        ts = torch.randint(0, x0.shape[1], (B, x0.shape[0]), generator=g)
        if name == "all":
            ts[0, ::2] = -100
            ts[2, :] = -100  # a mean over nothing: nan, as torch gives (gradient 0)
    check_path(path2, xs)

    def loss(z, y):
        out = ours(z, y)
        return out.sum() if reduction == "none" else out

    def loss_ref(z, y):
        out = ref(z.double(), y.double() if y.is_floating_point() else y)
        return out.sum() if reduction == "none" else out

    batched = vmap(ours)(xs, ts)
    looped = torch.stack([ours(xs[b], ts[b]) for b in range(B)])
    assert_close_to_ref(batched, looped, torch.float32)
    assert_close_to_ref(batched, torch.stack([ref(xs[b].double(), ts[b].double()
                                                  if target_kind == "prob" else ts[b])
                                              for b in range(B)]), torch.float32)
    per_sample = vmap(grad(loss))(xs, ts)
    for b in range(B):
        expected = grad(loss_ref)(xs[b].double(), ts[b])
        assert_close_to_ref(per_sample[b], expected, torch.float32)


def test_vmap_per_sample_gradients_of_a_model(path2):
    """The functional training idiom: per-sample gradients of a tiny LM head's parameters,
    vmap(grad(loss of functional_call)), against a loop of autograd on torch's loss."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30).to(path2.device)
    params = {k: v.detach() for k, v in head.named_parameters()}
    x = torch.randn(4, 3, 8)
    t = torch.randint(0, 30, (4, 3))
    t[1, 0] = -100

    def loss(p, xb, tb):
        return ce(torch.func.functional_call(head, p, (xb,)), tb)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)
    for b in range(4):
        head.zero_grad()
        F.cross_entropy(head(x[b]), t[b]).backward()
        for k, p in head.named_parameters():
            assert_close_to_ref(per_sample[k][b], p.grad, torch.float32, rtol=1e-5,
                                scale_atol=1e-6)


def test_vmap_over_class_weights_and_nested(path2):
    g = gen("vmap-w")
    xs = torch.randn(2, 3, 4, 7, generator=g)
    ts = torch.randint(0, 7, (2, 3, 4), generator=g)
    ws = torch.rand(2, 3, 7, generator=g) + 0.1
    check_path(path2, xs)
    ours = vmap(vmap(lambda z, y, w: ce(z, y, w, label_smoothing=0.1)))(xs, ts, ws)
    theirs = vmap(vmap(lambda z, y, w: F.cross_entropy(z, y, w, label_smoothing=0.1)))(
        xs.double(), ts, ws.double())
    assert_close_to_ref(ours, theirs, torch.float32)


def test_vmap_out_of_range_target_raises():
    xs = torch.randn(2, 3, 5)
    ts = torch.randint(0, 5, (2, 3))
    ts[1, 2] = 5
    with pytest.raises(IndexError, match="outside"):
        vmap(ce)(xs, ts)


# ----------------------------------------------------------------------------
# torch's positional order, size_average / reduce
# ----------------------------------------------------------------------------

def _xt():
    g = gen("legacy")
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 1, 2, 3, 1, 0])
    return x, t


def test_legacy_positional_call_is_torchs():
    """f(x, t, None, True): torch's fourth argument is size_average, not ignore_index
    (which would silently drop the class-1 rows)."""
    x, t = _xt()
    w = torch.rand(5, generator=gen("legacy-w"), dtype=torch.float64) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close_to_ref(ce(x, t, None, True), F.cross_entropy(x, t, None, True),
                            torch.float64)
        assert_close_to_ref(ce(x, t, w, None, 1, None, "sum", 0.1),
                            F.cross_entropy(x, t, w, None, 1, None, "sum", 0.1), torch.float64)
    assert not torch.allclose(ce(x, t, ignore_index=1), ce(x, t))  # class 1 matters here


LEGACY = [(None, False), (False, None), (True, True), (False, False), (True, False),
          (False, True), (True, None), (None, True)]


@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=[f"{a}-{b}" for a, b in LEGACY])
def test_size_average_and_reduce_as_torch(size_average, reduce):
    x, t = _xt()
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        mod_expected = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = ce(x, t, size_average=size_average, reduce=reduce)
        mod = softmax_ce.CrossEntropyLoss(None, size_average, -100, reduce)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert len(ours) == 2 and all(issubclass(w.category, UserWarning) for w in ours)
    assert got.shape == expected.shape
    assert_close_to_ref(got, expected, torch.float64)
    assert mod.reduction == mod_expected.reduction
    assert_close_to_ref(mod(x, t), mod_expected(x, t), torch.float64)


def test_module_positional_order_is_torchs():
    x, t = _xt()
    w = torch.rand(5, generator=gen("legacy-mw"), dtype=torch.float64) + 0.1
    args = (w, None, 1, None, "sum", 0.2)
    assert_close_to_ref(softmax_ce.CrossEntropyLoss(*args)(x, t),
                        torch.nn.CrossEntropyLoss(*args)(x, t), torch.float64)
    with pytest.raises(TypeError):
        softmax_ce.CrossEntropyLoss(*args, 0.1)  # our extras are keyword-only
    with pytest.raises(TypeError):
        ce(x, t, *args, 0.1)


# ----------------------------------------------------------------------------
# what cannot go beyond first order says so
# ----------------------------------------------------------------------------

MODES = {"fused": dict(grad_mode="fused"), "inplace": dict(inplace_backward=True),
         "fused-inplace": dict(grad_mode="fused", inplace_backward=True)}


@pytest.mark.parametrize("mode", list(MODES))
def test_higher_order_errors(mode, path2):
    kw = MODES[mode]
    x, t, _ = _case("index", {}, dtype=torch.float32, key=(mode,))
    x = x.to(path2.device)
    what = 'grad_mode="fused"' if "fused" in mode else "inplace_backward=True"
    w = torch.randn_like(x).requires_grad_()

    z = x * w  # an intermediate, so that in place is allowed
    with pytest.raises(RuntimeError, match=f"double backward .* not supported with {what}"):
        torch.autograd.grad(ce(z, t, **kw), w, create_graph=True)
    # a first-order backward of the same mode still works
    (gw,) = torch.autograd.grad(ce(x * w, t, **kw), w)
    (gw_ref,) = torch.autograd.grad(ce(x * w, t), w)
    assert_close_to_ref(gw, gw_ref, torch.float32)

    with pytest.raises(RuntimeError, match=f"torch.func transform .* not supported with {what}"):
        grad(lambda a: ce(x * a, t, **kw))(w.detach())
    if "fused" in mode:
        with fwAD.dual_level():
            dual = fwAD.make_dual(x * w, torch.ones_like(x))
            with pytest.raises(RuntimeError, match=f"forward-mode AD .* not supported with {what}"):
                ce(dual, t, **kw)


def test_linear_cross_entropy_higher_order_errors():
    g = gen("lce-errors")
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4,), generator=g)
    msg = "softmax_ce.linear_cross_entropy: {}.* is not supported"
    for reduction in ("mean", "none"):  # gradients made in the forward, or recomputed
        loss = softmax_ce.linear_cross_entropy(x, W, t, reduction=reduction).sum()
        with pytest.raises(RuntimeError, match=msg.format("double backward")):
            torch.autograd.grad(loss, (x, W), create_graph=True)
    with pytest.raises(RuntimeError, match=msg.format("a torch.func transform")):
        grad(lambda a: softmax_ce.linear_cross_entropy(a, W, t))(x.detach())
    with pytest.raises(RuntimeError, match=msg.format("forward-mode AD")):
        with fwAD.dual_level():
            softmax_ce.linear_cross_entropy(fwAD.make_dual(x.detach(), torch.ones_like(x)),
                                            W.detach(), t)
    # the suggested route works: cross_entropy over F.linear, twice differentiable
    assert torch.autograd.gradgradcheck(lambda a, b: ce(F.linear(a, b), t), (x, W))


def test_process_group_double_backward_error():
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([0, 5, 2])
        loss = ce(x, t, process_group=dist.group.WORLD)
        with pytest.raises(RuntimeError, match="double backward .* with process_group"):
            torch.autograd.grad(loss, x, create_graph=True)
        (gx,) = torch.autograd.grad(ce(x, t, process_group=dist.group.WORLD), x)
        assert_close_to_ref(gx, torch.autograd.grad(F.cross_entropy(x, t), x)[0], torch.float64)
        # a torch.func transform gets a clear error too, not torch's "setup_context" one
        with pytest.raises(RuntimeError, match="torch.func transform .* with process_group"):
            torch.func.grad(lambda z: ce(z, t, process_group=dist.group.WORLD))(x.detach())
    finally:
        if started:
            dist.destroy_process_group()


def test_torch_compile_of_the_plain_loss_still_works():
    """The default backend over the loss and its backward, as before this Function had
    a jvp (torch.compile traces the Function without it)."""
    torch._dynamo.reset()
    x, t, kw = _case("index", OPTIONS["all"], dtype=torch.float32, key=("compile",))

    def step(z):
        return ce(z, t, **kw)

    results = []
    for f in (step, torch.compile(step)):
        xr = x.clone().requires_grad_()
        loss = f(xr)
        loss.backward()
        results.append((loss.detach(), xr.grad))
    assert_close_to_ref(results[1][0], results[0][0], torch.float32)
    assert_close_to_ref(results[1][1], results[0][1], torch.float32)
