"""The CUDA tier (`pytest -m cuda`, run by perf/gpu_report.py): LLM shapes on a real GPU.

Every test skips without CUDA (a skip is never a pass; gpu_report.py reports skips as such):
bf16 gradients free of NaN at LLM shapes and extreme logits, column-strided logits whose
element offsets pass 2^31, the linear CE's bf16 tensor-core path against float64, the
in-place backward under torch.compile, tensors on a second GPU in one process, and the
vocabulary-parallel loss over NCCL on two GPUs.  A few minutes at most on an H100.
"""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fp64_ce(logits, target, **kw):
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x, target, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("grad_mode", ["recompute", "fused"])
@pytest.mark.parametrize("scale", [1.0, 300.0])  # unit logits, and logits far past exp's range
def test_bf16_gradients_finite_and_right(grad_mode, scale):
    n, v = 4096, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, v, device="cuda", generator=gen) * scale).bfloat16()
    target = torch.randint(0, v, (n,), device="cuda", generator=gen)
    target[::7] = -100
    x = logits.clone().requires_grad_()
    loss = softmax_ce.cross_entropy(x, target, grad_mode=grad_mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    ref_loss, ref_grad = fp64_ce(logits, target)
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * max(1.0, abs(ref_loss.item()))
    assert rel_err(x.grad, ref_grad) < 2e-2


@pytest.mark.parametrize("inplace", [False, True])
def test_column_strided_offsets_past_2_31(inplace):
    n, v = 8192, 150_000  # base (n, 2v) bf16: 2.46e9 elements, 4.6 GiB
    base = torch.empty(n, 2 * v, device="cuda", dtype=torch.bfloat16).normal_()
    logits = base[:, 1::2]  # stride (2v, 2): the last rows start past 2^31 elements
    assert logits.stride(1) == 2 and logits.storage_offset() + (n - 1) * logits.stride(0) > 2**31
    target = torch.randint(0, v, (n,), device="cuda")
    if inplace:
        x = softmax_ce_handover(logits)
    else:
        x = logits.detach().requires_grad_()
    rows = torch.arange(n - 64, n, device="cuda")  # the rows past the 2^31 mark
    ref_loss, ref_grad = fp64_ce(logits[rows], target[rows], reduction="none")
    loss = softmax_ce.cross_entropy(x, target, reduction="none", inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    assert rel_err(loss.detach()[rows], ref_loss) < 1e-2
    assert rel_err(grad[rows], ref_grad) < 2e-2


def softmax_ce_handover(t):
    """t as a non-leaf intermediate (the in-place mode refuses leaves), sharing its storage."""
    class Handover(torch.autograd.Function):
        forward = staticmethod(lambda ctx, a: a.detach())
        backward = staticmethod(lambda ctx, g: g)
    return Handover.apply(t.detach().requires_grad_())


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_linear_ce_bf16_tensor_cores_against_fp64(impl):
    n, d, v = 4096, 4096, 32000
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=gen) * d ** -0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    loss = softmax_ce.linear_cross_entropy(x, w, t, impl=impl)
    loss.backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(xd @ wd.t(), t)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())
    assert rel_err(x.grad, xd.grad) < 3e-2 and rel_err(w.grad, wd.grad) < 3e-2


def test_inplace_backward_under_torch_compile():
    n, d, v = 2048, 512, 32000
    gen = torch.Generator(device="cuda").manual_seed(2)
    h0 = torch.randn(n, d, device="cuda", generator=gen).bfloat16()
    w0 = (torch.randn(v, d, device="cuda", generator=gen) * d ** -0.5).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)

    def step(h, w):
        return softmax_ce.cross_entropy(h @ w.t(), t, inplace_backward=True)
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (l0, gh0, gw0), (l1, gh1, gw1) = grads
    assert torch.isfinite(gh1).all() and torch.isfinite(gw1).all()
    assert abs(l0.item() - l1.item()) < 1e-2
    assert rel_err(gh1, gh0) < 1e-2 and rel_err(gw1, gw0) < 1e-2


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_second_gpu_in_one_process():
    n, v = 1024, 50257
    logits = torch.randn(n, v, device="cuda:0").bfloat16()
    target = torch.randint(0, v, (n,), device="cuda:0")
    out = []
    for dev in ("cuda:0", "cuda:1"):
        x = logits.to(dev).requires_grad_()
        loss = softmax_ce.cross_entropy(x, target.to(dev))
        loss.backward()
        assert loss.device == torch.device(dev) and x.grad.device == torch.device(dev)
        out.append((loss.detach().cpu(), x.grad.cpu()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _nccl_rank(rank, world):
    import torch.distributed as dist
    torch.manual_seed(0)
    n, v = 2048, 128256
    logits = torch.randn(n, v, device=f"cuda:{rank}")
    target = torch.randint(0, v, (n,), device=f"cuda:{rank}")
    local = logits.chunk(world, dim=1)[rank].contiguous().requires_grad_()
    loss = softmax_ce.cross_entropy(local, target, process_group=dist.group.WORLD)
    loss.backward()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full, target)
    ref.backward()
    return (abs(loss.item() - ref.item()),
            rel_err(local.grad, full.grad.chunk(world, dim=1)[rank]))


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_vocab_parallel_over_nccl():
    from softmax_ce.testing import run_ranks
    ranks = run_ranks(2, _nccl_rank, backend="nccl", deadline_s=180)
    assert all(r.ok for r in ranks), [r.error for r in ranks]
    for r in ranks:
        loss_err, grad_err = r.value
        assert loss_err < 1e-4 and grad_err < 1e-4, r
