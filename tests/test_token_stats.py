"""Temperature, per-token statistics (entropy, argmax, accuracy) and teacher logits, on
every CPU path (the Triton kernels through the interpreter, with one tile and with
16-wide tiles, and the PyTorch path in one chunk and in several), against fp64
references written from the definitions below.

    z'' = softcap(z) / T                      (softcap first, then the temperature)
    entropy = -sum_c s_c log s_c,             s = softmax(z'')
    argmax  = torch.argmax(z)                 (the raw logits: ties to the lowest column, nan first)
    teacher: y = softmax(t / T),  CE = -sum_c y_c log s_c,  KL = sum_c y_c (log y_c - log s_c),
             both times T^2
"""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
import softmax_ce._extended as X
from _helpers import assert_close_to_ref, check_path, gen
from reference import reference_cross_entropy

ce = softmax_ce.cross_entropy


def transformed(x, softcap, temperature):
    z = x.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_entropy(z2):
    """-sum p log p in fp64, differentiable also where a logit is -inf (p = 0 there: its
    term is 0 and so is its gradient; torch.special.entr's would be 0 * inf = nan)."""
    logp = torch.log_softmax(z2, dim=-1)
    return -(logp.exp() * torch.where(torch.isneginf(logp), 0.0, logp)).sum(-1)


@pytest.fixture
def poisoned(monkeypatch):
    """The statistics' outputs start as nan / -7, so an element never written shows."""
    real = X._xfwd_outputs

    def outputs(logits, token_stats, teacher):
        out = real(logits, token_stats, teacher)
        for t in out:
            t.fill_(-7 if t.dtype == torch.int64 else float("nan"))
        return out

    monkeypatch.setattr(X, "_xfwd_outputs", outputs)


OPTIONS = {
    "plain": {},
    "weight-ignore": dict(weight=True, ignore_index=2),
    "smoothing": dict(label_smoothing=0.1),
    "zloss-softcap": dict(z_loss=1e-3, softcap=4.0),
}


@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.6, 2.5])
def test_temperature_matches_reference(opts, reduction, temperature, path, poisoned):
    kw = dict(OPTIONS[opts])
    g = gen("temp", opts, reduction, temperature, path.name)
    n, v = 7, 37
    x = (torch.randn(n, v, generator=g) * 3).to(path.device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[1] = 2  # an ignored row where ignore_index = 2
    weight = torch.rand(v, generator=g) + 0.5 if kw.pop("weight", False) else None
    softcap = kw.pop("softcap", None)
    check_path(path, x)
    loss = ce(x, t, weight, reduction=reduction, temperature=temperature, softcap=softcap, **kw)
    xr = x.detach().double().requires_grad_()
    ref = reference_cross_entropy(transformed(xr, softcap, temperature), t, weight,
                                  reduction=reduction, **kw)
    up = torch.randn(ref.shape, generator=g)
    (loss * up).sum().backward()
    (ref * up.double()).sum().backward()
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    assert_close_to_ref(x.grad, xr.grad, torch.float32, what="grad")


def test_temperature_one_is_the_plain_loss(path):
    g = gen("t1", path.name)
    x = torch.randn(5, 33, generator=g)
    t = torch.randint(0, 33, (5,), generator=g)
    assert torch.equal(ce(x, t, temperature=1.0), ce(x, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_statistics_and_the_entropy_gradient(dtype, temperature, softcap, path, poisoned):
    """loss, lse, entropy, argmax and accuracy from one call; then a backward through both
    the loss and the entropy (an RL entropy bonus), against fp64 autograd."""
    g = gen("stats", dtype, temperature, softcap, path.name)
    n, v = 9, 53
    x0 = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    t[4] = x0[4].float().argmax()  # at least one hit
    x = x0.clone().requires_grad_()
    out = ce(x, t, reduction="none", temperature=temperature, softcap=softcap,
             return_lse=True, return_entropy=True, return_argmax=True, return_accuracy=True)
    assert isinstance(out, softmax_ce.CrossEntropyOutput)
    xr = x0.double().requires_grad_()
    z2 = transformed(xr, softcap, temperature)
    ref_loss = F.cross_entropy(z2, t, reduction="none")
    ref_h = ref_entropy(z2)
    assert_close_to_ref(out.loss, ref_loss, dtype, what="loss")
    assert_close_to_ref(out.lse, torch.logsumexp(z2, -1), torch.float32, what="lse")
    assert_close_to_ref(out.entropy, ref_h, torch.float32, rtol=2e-5, what="entropy")
    assert out.entropy.dtype == torch.float32 and out.entropy.shape == (n,)
    assert torch.equal(out.argmax, x0.argmax(-1))
    valid = t != -100
    expect_acc = ((x0.argmax(-1) == t) & valid).sum().double() / valid.sum()
    assert out.accuracy.dim() == 0 and abs(out.accuracy.item() - expect_acc.item()) < 1e-7

    # the loss is returned in the input's dtype, so its grad_output arrives rounded to it
    up, uh = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g)
    ((out.loss * up).sum() + (out.entropy * uh).sum()).backward()
    ((ref_loss * up.double()).sum() + (ref_h * uh.double()).sum()).backward()
    assert_close_to_ref(x.grad, xr.grad, dtype, what="grad of loss + entropy")


def test_entropy_alone_backpropagates(path):
    """Only the entropy is used (a pure entropy bonus): the loss's gradient is 0."""
    g = gen("ent-only", path.name)
    x = torch.randn(6, 40, generator=g).requires_grad_()
    t = torch.randint(0, 40, (6,), generator=g)
    out = ce(x, t, return_entropy=True, temperature=1.3)
    out.entropy.sum().backward()
    xr = x.detach().double().requires_grad_()
    ref_entropy(xr / 1.3).sum().backward()
    assert_close_to_ref(x.grad, xr.grad, torch.float32, what="grad of the entropy")


def test_entropy_of_confident_rows(path):
    """A row whose winner is 20 above the rest has entropy ~1e-5 and d = 1 + 4e-7: as
    lse - sum s z in fp32 that is noise of ~1e-6, and even log d from d itself loses a
    few % of it to fp32's 6e-8 steps near 1; log1p(d - 1) - sum s (z - m) keeps it to
    1e-4 relative.  (Far more confident rows outrun the float64 reference itself.)"""
    g = gen("confident", path.name)
    x = torch.randn(4, 200, generator=g)
    x[torch.arange(4), torch.tensor([0, 17, 150, 199])] = 20.0
    x[3] += 1e4  # far from 0 too
    t = torch.zeros(4, dtype=torch.long)
    h = ce(x, t, return_entropy=True).entropy
    ref = ref_entropy(x.double())
    assert (ref > 0).all() and (ref < 1e-4).all()
    assert_close_to_ref(h, ref, torch.float32, rtol=1e-4, scale_atol=0.0, what="tiny entropy")


def test_argmax_as_torch_argmax(path):
    """Ties go to the lowest column, wherever the tied columns fall (the same tile, two
    tiles, the edge columns walked after the body); a nan beats everything; a row of
    -inf gives column 0."""
    g = gen("argmax", path.name)
    n, v = 8, 41
    x = torch.randn(n, v, generator=g)
    x[0, 3] = x[0, 40] = 9.0          # two tiles apart (16-wide tiles), and the last column
    x[1, 0] = x[1, 1] = 9.0           # first columns
    x[2, 39] = x[2, 40] = 9.0         # the tail
    x[3, 7] = float("nan"); x[3, 2] = float("inf")
    x[4, 30] = float("nan"); x[4, 5] = float("nan")
    x[5] = float("-inf")
    x[6, 20] = float("inf"); x[6, 10] = float("inf")
    t = torch.zeros(n, dtype=torch.long)
    got = ce(x, t, reduction="none", return_argmax=True).argmax
    assert torch.equal(got, x.argmax(-1)), (got, x.argmax(-1))
    # and on a view with a row offset off the 16-byte grid (a body/edge split at column 1+)
    y = torch.randn(n, v + 1, generator=g)
    y[:, 1] = y[:, 33] = 50.0
    got = ce(y[:, 1:], t, reduction="none", return_argmax=True).argmax
    assert torch.equal(got, y[:, 1:].argmax(-1))


@pytest.mark.parametrize("kl", [False, True], ids=["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_teacher_logits(kl, temperature, reduction, dtype, path, poisoned):
    g = gen("teacher", kl, temperature, reduction, dtype, path.name)
    n, v = 6, 45
    s0 = (torch.randn(n, v, generator=g) * 2).to(dtype)
    t0 = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t0[1, :5] = float("-inf")  # a teacher that rules classes out (masked vocabulary)
    x = s0.clone().requires_grad_()
    loss = ce(x, t0, reduction=reduction, target_logits=True, kl=kl, temperature=temperature,
              return_entropy=True)
    xr = s0.double().requires_grad_()
    logs = torch.log_softmax(xr / temperature, -1)
    logy = torch.log_softmax(t0.double() / temperature, -1)
    y = logy.exp()
    rows = -(y * logs).sum(-1)
    if kl:
        rows = rows + torch.where(y > 0, y * logy, 0.0).sum(-1)
    ref = rows * temperature ** 2
    if reduction == "mean":
        ref = ref.mean()
    assert_close_to_ref(loss.loss, ref, dtype, what="distillation loss")
    assert_close_to_ref(loss.entropy, ref_entropy(xr.detach() / temperature), torch.float32,
                        rtol=2e-5, what="student entropy")
    up = torch.randn(ref.shape, generator=g).to(dtype)
    (loss.loss * up).sum().backward()
    (ref * up.double()).sum().backward()
    assert_close_to_ref(x.grad, xr.grad, dtype, what="student grad")


def test_teacher_bare_loss_and_kl_of_itself_is_zero(path):
    g = gen("self-kl", path.name)
    x = torch.randn(5, 30, generator=g)
    loss = ce(x, x.clone(), target_logits=True, kl=True, temperature=1.5)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert abs(loss.item()) < 1e-5


def test_inplace_backward_with_temperature_and_entropy(path):
    """inplace_backward writes the gradient of loss + entropy over the logits' storage;
    logits of 20 + noise left unwritten would show."""
    g = gen("inplace-ext", path.name)
    raw = 20.0 + torch.randn(7, 39, generator=g)
    t = torch.randint(0, 39, (7,), generator=g)
    t[3] = -100
    x = raw.clone().requires_grad_()
    base = x * 1.0
    out = ce(base, t, temperature=0.8, return_entropy=True, inplace_backward=True)
    (out.loss + 0.5 * out.entropy.sum()).backward()
    xr = raw.double().requires_grad_()
    z2 = xr / 0.8
    (F.cross_entropy(z2, t) + 0.5 * ref_entropy(z2).sum()).backward()
    assert (base.detach().abs() < 5).all(), "an element of the logits was not overwritten"
    assert_close_to_ref(x.grad, xr.grad, torch.float32, what="grad")
    assert torch.equal(x.detach(), raw)


def test_eval_loop_statistics_under_no_grad(path):
    g = gen("eval", path.name)
    x = torch.randn(8, 35, generator=g)
    t = torch.randint(0, 35, (8,), generator=g)
    before = x.clone()
    with torch.no_grad():
        out = ce(x, t, return_accuracy=True, return_entropy=True, inplace_backward=True)
    assert torch.equal(x, before)
    assert out.entropy.grad_fn is None and out.loss.grad_fn is None
    assert_close_to_ref(out.loss, F.cross_entropy(x.double(), t), torch.float32)


def test_statistics_follow_the_batch_shape(path):
    g = gen("shape", path.name)
    x = torch.randn(2, 31, 3, generator=g)
    t = torch.randint(0, 31, (2, 3), generator=g)
    out = ce(x, t, reduction="none", return_entropy=True, return_argmax=True)
    assert out.entropy.shape == (2, 3) and out.argmax.shape == (2, 3)
    assert torch.equal(out.argmax, x.argmax(1))
    assert_close_to_ref(out.entropy, ref_entropy(x.double().movedim(1, -1)), torch.float32)
    assert out.lse is None and out.accuracy is None


def test_plain_calls_keep_their_results():
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    assert isinstance(ce(x, t), torch.Tensor)
    loss, lse = ce(x, t, return_lse=True)
    assert lse.shape == (4,)


BAD = [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(kl=True), ValueError, "target_logits"),
    (dict(temperature=2.0, grad_mode="fused"), ValueError, "grad_mode"),
    (dict(return_entropy=True, grad_mode="fused"), ValueError, "grad_mode"),
    (dict(target_logits=True), RuntimeError, "target_logits"),   # class-index target
]


@pytest.mark.parametrize("kw,exc,word", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options(kw, exc, word):
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(exc, match=word):
        ce(x, t, **kw)
    assert x.grad is None


def test_bad_teacher_options():
    x = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="weight"):
        ce(x, teacher, torch.ones(10), target_logits=True)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        ce(x, teacher, target_logits=True, label_smoothing=0.1)
    with pytest.raises(RuntimeError, match="receive no gradient"):
        ce(x, teacher.clone().requires_grad_(), target_logits=True)
    with pytest.raises(RuntimeError, match="class-index"):
        ce(x, teacher.softmax(-1), return_accuracy=True)
    with pytest.raises(RuntimeError, match="shape"):
        ce(x, torch.randn(4, 11), target_logits=True)
    before = teacher.clone()
    ce(x, teacher, target_logits=True, temperature=2.0).backward()
    assert torch.equal(teacher, before)


def test_torch_compile_matches_eager(path):
    g = gen("compile-ext", path.name)
    x0 = torch.randn(6, 40, generator=g)
    t = torch.randint(0, 40, (6,), generator=g)

    def step(x):
        out = ce(x, t, temperature=0.9, return_entropy=True, return_accuracy=True)
        return out.loss + 0.1 * out.entropy.mean(), out.accuracy

    xe = x0.clone().requires_grad_()
    le, ae = step(xe)
    le.backward()
    xc = x0.clone().requires_grad_()
    lc, ac = torch.compile(step, fullgraph=True)(xc)
    lc.backward()
    assert torch.allclose(lc, le, rtol=1e-6, atol=1e-6) and torch.equal(ac, ae)
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# linear_cross_entropy: the same options over logits that are never stored
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["chunked", "fused"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_temperature(impl, softcap, path):
    g = gen("lin-temp", impl, softcap, path.name)
    n, d, v = 11, 8, 41
    x = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).requires_grad_()
    b = torch.randn(v, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[4] = -100
    loss = softmax_ce.linear_cross_entropy(x, w, t, linear_bias=b, impl=impl, softcap=softcap,
                                           temperature=0.7, chunk_bytes=3 * v * 4)
    xr, wr, br = (p.detach().double().requires_grad_() for p in (x, w, b))
    ref = F.cross_entropy(transformed(F.linear(xr, wr, br), softcap, 0.7), t)
    loss.backward()
    ref.backward()
    assert_close_to_ref(loss, ref, torch.float32, what="loss")
    for got, want, name in ((x.grad, xr.grad, "dx"), (w.grad, wr.grad, "dw"), (b.grad, br.grad, "db")):
        assert_close_to_ref(got, want, torch.float32, rtol=2e-5, scale_atol=2e-6, what=name)


@pytest.mark.parametrize("shift", [False, True])
def test_linear_statistics_and_entropy_gradient(shift, path, poisoned):
    """chunked over several chunks of rows: lse, entropy, argmax, accuracy per token, and a
    backward through loss + entropy (recomputed chunk by chunk), against fp64."""
    g = gen("lin-stats", shift, path.name)
    bsz, seq, d, v = 2, 6, 8, 37
    x = torch.randn(bsz, seq, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).requires_grad_()
    t = torch.randint(0, v, (bsz, seq), generator=g)
    t[0, 2] = -100
    out = softmax_ce.linear_cross_entropy(
        x, w, t, shift=shift, temperature=1.4, return_lse=True, return_entropy=True,
        return_argmax=True, return_accuracy=True, chunk_bytes=4 * v * 4)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z = F.linear(xr, wr) / 1.4
    tt = t
    if shift:
        z, tt = z[:, :-1], t[:, 1:]
    ref = F.cross_entropy(z.reshape(-1, v), tt.reshape(-1))
    ref_h = ref_entropy(z)
    raw = F.linear(x.detach(), w.detach())
    raw = raw[:, :-1] if shift else raw
    assert_close_to_ref(out.loss, ref, torch.float32, what="loss")
    assert_close_to_ref(out.lse, torch.logsumexp(z, -1), torch.float32, what="lse")
    assert_close_to_ref(out.entropy, ref_h, torch.float32, rtol=2e-5, what="entropy")
    assert torch.equal(out.argmax, raw.argmax(-1))
    valid = tt != -100
    expect = ((raw.argmax(-1) == tt) & valid).sum().double() / valid.sum()
    assert abs(out.accuracy.item() - expect.item()) < 1e-7
    uh = torch.randn(ref_h.shape, generator=g)
    (out.loss + (out.entropy * uh).sum()).backward()
    (ref + (ref_h * uh.double()).sum()).backward()
    assert_close_to_ref(x.grad, xr.grad, torch.float32, rtol=2e-5, scale_atol=2e-6, what="dx")
    assert_close_to_ref(w.grad, wr.grad, torch.float32, rtol=2e-5, scale_atol=2e-6, what="dw")


def test_linear_statistics_need_the_chunked_impl():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(NotImplementedError, match="chunked"):
        softmax_ce.linear_cross_entropy(x, w, t, impl="fused", return_entropy=True)
    with pytest.raises(ValueError, match="temperature"):
        softmax_ce.linear_cross_entropy(x, w, t, temperature=-2.0)


def test_modules_take_the_options():
    """CrossEntropyLoss as a distillation loss and with statistics; LinearCrossEntropyLoss
    with a temperature and statistics; both match the functions."""
    g = gen("modules")
    x = torch.randn(6, 20, generator=g)
    teacher = torch.randn(6, 20, generator=g)
    kd = softmax_ce.CrossEntropyLoss(temperature=2.0, target_logits=True, kl=True)
    assert "temperature=2.0" in repr(kd) and "kl=True" in repr(kd)
    assert torch.equal(kd(x, teacher), ce(x, teacher, temperature=2.0, target_logits=True, kl=True))
    t = torch.randint(0, 20, (6,), generator=g)
    out = softmax_ce.CrossEntropyLoss(temperature=0.5)(x, t, return_entropy=True)
    assert torch.equal(out.entropy, ce(x, t, temperature=0.5, return_entropy=True).entropy)
    head = softmax_ce.LinearCrossEntropyLoss(8, 20, temperature=1.5)
    h = torch.randn(6, 8, generator=g)
    got = head(h, t, return_argmax=True)
    want = softmax_ce.linear_cross_entropy(h, head.linear.weight, t, temperature=1.5,
                                           return_argmax=True)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.argmax, want.argmax)


def test_higher_order_is_refused_clearly():
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 12, (4,))
    with pytest.raises(RuntimeError, match="torch.func transform"):
        torch.func.grad(lambda z: ce(z, t, temperature=2.0))(x.detach())
    out = ce(x, t, return_entropy=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss + out.entropy.sum(), x, create_graph=True)


def test_entropy_gradient_on_masked_logits_is_zero(path):
    """A masked vocabulary (-inf logits) with an entropy bonus: s (E[z] - z) there is 0,
    not 0 * inf = nan, and no nan spreads to any row (even one whose entropy is unused)."""
    g = gen("masked-entropy", path.name)
    x0 = torch.randn(3, 40, generator=g)
    x0[0, 30:] = float("-inf")
    x0[2, :5] = float("-inf")
    t = torch.tensor([0, 1, 7])
    x = x0.clone().requires_grad_()
    out = ce(x, t, reduction="none", return_entropy=True, temperature=1.2)
    (out.loss.sum() + 0.5 * out.entropy[1] + 0.25 * out.entropy[2]).backward()
    xr = x0.double().requires_grad_()
    z2 = xr / 1.2
    h = ref_entropy(z2)
    (F.cross_entropy(z2, t, reduction="sum") + 0.5 * h[1] + 0.25 * h[2]).backward()
    assert not torch.isnan(x.grad).any()
    assert (x.grad[0, 30:] == 0).all() and (x.grad[2, :5] == 0).all()
    assert_close_to_ref(x.grad, xr.grad, torch.float32, what="grad")


def test_teacher_row_of_only_minus_inf_is_nan(path):
    x = torch.randn(3, 11)
    teacher = torch.randn(3, 11)
    teacher[1] = float("-inf")
    loss = ce(x, teacher, target_logits=True, reduction="none")
    assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2]]).any()


@pytest.mark.parametrize("kw", [dict(temperature=2.0), dict(target_logits=True, kl=True),
                                dict(temperature=0.5, return_lse=True)],
                         ids=["temperature", "teacher-kl", "temperature-lse"])
def test_torch_compile_without_the_entropy(kw, path):
    """Options without return_entropy: the (empty) entropy output gets a materialised
    gradient under torch.compile, which the backward must ignore."""
    g = gen("compile-no-entropy", str(kw), path.name)
    x0 = torch.randn(6, 37, generator=g)
    t = (torch.randn(6, 37, generator=g) if kw.get("target_logits")
         else torch.randint(0, 37, (6,), generator=g))

    def step(x):
        out = ce(x, t, **kw)
        return out[0] + out[1].sum() if kw.get("return_lse") else out

    xe = x0.clone().requires_grad_()
    le = step(xe)
    le.backward()
    torch._dynamo.reset()
    xc = x0.clone().requires_grad_()
    lc = torch.compile(step)(xc)
    lc.backward()
    assert torch.allclose(lc, le, rtol=1e-6, atol=1e-6)
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)
