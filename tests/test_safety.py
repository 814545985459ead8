"""Never silently wrong: the defects a GPU or a real training loop would have shown first.

Each test here failed before its fix:

* in place never destroys a tensor the user still owns (a leaf that requires grad is
  refused; with no backward to follow, every mode is forward-only);
* NaN stays NaN for every fp32 bit pattern the kernels round to bf16, including the
  canonical NaN of NVIDIA arithmetic (0x7FFFFFFF), which the interpreter never makes;
* column offsets past 2**31 (a column-strided view of an LM head's output);
* the softcap's slope sech^2 far from 0, where 1 - tanh^2 cancels to 0 in fp32;
* launch hygiene: the tensor's CUDA device is the current one during a launch, an
  in-place launch is autotuned on a copied probe, never on (and never cloning) the
  logits, the streaming kernels' configs carry no dead num_stages;
* torch.compile with Inductor: every mode matches eager and the in-place ones allocate
  no second logits-sized buffer; the vocabulary-parallel forward runs through custom ops;
* the bytes each mode reads, counted element by element under Triton's interpreter.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import softmax_ce
import softmax_ce._triton_path as _triton  # the GPU launch path, driven with stand-ins
from softmax_ce.kernels import cross_entropy as K
from softmax_ce.kernels._online import to_store_dtype

from _helpers import assert_close_to_ref, check_path, gen
from reference import reference_cross_entropy

ce = softmax_ce.cross_entropy
CUDA = torch.cuda.is_available()
MODES = {"recompute": {}, "inplace": dict(inplace_backward=True), "fused": dict(grad_mode="fused"),
         "fused-inplace": dict(grad_mode="fused", inplace_backward=True)}


# ----------------------------------------------------------------------------
# 1. In place never destroys a tensor the user still owns
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("kind", ["leaf", "parameter", "view-of-leaf"])
def test_inplace_on_a_leaf_that_requires_grad_is_refused(kind, grad_mode, path2):
    g = gen("leaf", kind, grad_mode, path2.name)
    z = torch.randn(6, 50, generator=g).to(path2.device)
    t = torch.randint(0, 50, (6,), generator=g).to(path2.device)
    leaf = torch.nn.Parameter(z.clone()) if kind == "parameter" else z.clone().requires_grad_()
    logits = leaf[:, :40] if kind == "view-of-leaf" else leaf
    check_path(path2, logits)
    with pytest.raises(RuntimeError, match=r"^softmax_ce\.cross_entropy: inplace_backward=True"):
        ce(logits, t if kind != "view-of-leaf" else t.clamp_max(39), inplace_backward=True,
           grad_mode=grad_mode)
    assert torch.equal(leaf.detach(), z), "the leaf's values changed"
    # out of place, the same leaf trains as usual and keeps its values
    ce(logits, t.clamp_max(39), grad_mode=grad_mode).backward()
    assert torch.equal(leaf.detach(), z) and leaf.grad is not None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "no-requires-grad"])
def test_no_backward_means_forward_only(mode, how, path2):
    """An eval loop computing accuracy after the loss: nothing may be written into the
    logits, whatever the mode, and the loss is the same."""
    g = gen("eval", mode, how, path2.name)
    h = torch.randn(32, 16, generator=g).to(path2.device)
    W = torch.randn(200, 16, generator=g).to(path2.device).requires_grad_(how != "no-requires-grad")
    t = torch.randint(0, 200, (32,), generator=g).to(path2.device)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "no-requires-grad": contextlib.nullcontext}[how]
    with ctx():
        logits = h @ W.t()
        check_path(path2, logits)
        before = logits.clone()
        accuracy_before = (logits.argmax(1) == t).float().mean()
        loss = ce(logits, t, **MODES[mode])
        assert torch.equal(logits, before), "the forward wrote into the logits"
        assert (logits.argmax(1) == t).float().mean() == accuracy_before
    ref = reference_cross_entropy(before, t)
    assert_close_to_ref(loss, ref, torch.float32, what="loss")


# ----------------------------------------------------------------------------
# 2. Numerics that differ on a GPU
# ----------------------------------------------------------------------------
@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, to_store_dtype(x, y_ptr.dtype.element_ty), mask=offs < n)


SPECIAL_BITS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
                0x7FBFFFFF, 0x7FFF8000, 0x7FFF7FFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF,
                0x7F7F8000, 0x00000001, 0x80000000, 0x3F808000, 0x3F818000, 0x3F80FFFF]


@pytest.mark.skipif(CUDA, reason="the interpreter's fp32->bf16 cast is what this checks against")
def test_bf16_rounding_keeps_every_nan(device):
    """to_store_dtype against torch's fp32 -> bf16 (round to nearest even, NaN stays NaN):
    the special patterns and 2**16 random ones; equal bits for every non-NaN."""
    g = gen("bits")
    rand = torch.randint(-2**31, 2**31 - 1, (1 << 16,), generator=g, dtype=torch.int64)
    bits = torch.cat([torch.tensor(SPECIAL_BITS, dtype=torch.int64), rand])
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    x = bits.view(torch.float32).to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    expect = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), expect.isnan()), \
        f"NaN lost for bits {[hex(b & 0xFFFFFFFF) for b in bits[x.isnan() & ~y.isnan()].tolist()]}"
    # bit-exact for every non-NaN but fp32 subnormals, which the interpreter's own fp32 ->
    # bf16 cast mishandles (it gives 0x8070 for the exactly representable 0x803C0000;
    # the GPU's cvt.rn.bf16.f32 does not flush or mangle them)
    subnormal = (x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)
    keep = ~expect.isnan() & ~subnormal
    assert keep.sum() > 60000
    assert torch.equal(y[keep].view(torch.int16), expect[keep].view(torch.int16))


@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_canonical_gpu_nan_reaches_the_bf16_gradient(grad_mode, path2):
    """A class weight holding 0x7FFFFFFF, with label smoothing: every row's gradient is NaN
    in that class (torch's too), never -0.0."""
    g = gen("gpu-nan", grad_mode, path2.name)
    z = (torch.randn(5, 40, generator=g) * 2).to(torch.bfloat16)
    t = torch.randint(0, 40, (5,), generator=g)
    w = torch.rand(40, generator=g) + 0.5
    w.view(torch.int32)[7] = 0x7FFFFFFF
    assert w[7].isnan()
    ref_x = z.double().requires_grad_()
    reference_cross_entropy(ref_x, t, w, label_smoothing=0.1).backward()
    assert ref_x.grad[:, 7].isnan().all()
    x = z.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    ce(x, t.to(path2.device), w.to(path2.device), label_smoothing=0.1, grad_mode=grad_mode).backward()
    assert_close_to_ref(x.grad, ref_x.grad, torch.bfloat16, what="grad")


@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_column_offsets_past_2_31(grad_mode, path2):
    """A column-strided view whose last column sits 2**31 elements from its first: the
    column offset must not wrap in int32 (it segfaulted under the interpreter)."""
    N, V, S = 4, 3, 2**30
    # 4 GiB of address space, of which only the pages holding these 12 logits are touched
    store = torch.empty(S * (V - 1) + N, dtype=torch.bfloat16, device=path2.device)
    g = gen("wide", grad_mode, path2.name)
    vals = (torch.randn(N, V, generator=g) * 2).to(torch.bfloat16)
    t = torch.tensor([0, 2, 1, 2])
    x = store.as_strided((N, V), (1, S))
    x.copy_(vals)
    assert K.wide_cols(V, x.stride(1))
    xin = x.detach().requires_grad_()
    check_path(path2, xin)
    loss = ce(xin, t.to(path2.device), reduction="sum", grad_mode=grad_mode)
    loss.backward()
    ref_x = vals.double().requires_grad_()
    ref = reference_cross_entropy(ref_x, t, reduction="sum")
    ref.backward()
    assert_close_to_ref(loss, ref, torch.bfloat16, what="loss")
    assert_close_to_ref(xin.grad, ref_x.grad, torch.bfloat16, what="grad")


def _softcap_grad_fp64(z, t, cap):
    """d sum_rows CE(softcap(z)) / dz in fp64, with the slope as 1 / cosh^2(z / cap): the
    fp64 autograd of tanh uses 1 - tanh^2, which cancels to 0 past |u| = 19 itself."""
    u = z.double() / cap
    s = torch.softmax(cap * torch.tanh(u), dim=1)
    return (s - F.one_hot(t, z.shape[1]).double()) / torch.cosh(u) ** 2


def _far_logits(g, cap, rows, n_far):
    """Rows whose first 4 logits are near 0 (they carry the probability) and whose other
    n_far sit 9 to 30 caps away, both signs: sech^2 from 6e-8 down to 4e-26."""
    u = torch.linspace(9.0, 30.0, n_far) * torch.where(torch.arange(n_far) % 2 == 0, 1.0, -1.0)
    z = (cap * u)[None, :].repeat(rows, 1)
    return torch.cat([torch.randn(rows, 4, generator=g), z], 1)


@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_softcap_slope_far_from_zero(grad_mode, path):
    """Each gradient entry must be right to 1e-5 of itself, however small (1 - tanh^2 in
    fp32 made all of these 0)."""
    g = gen("softcap-slope", grad_mode, path.name)
    cap = 2.0
    z = _far_logits(g, cap, 3, 60)
    t = torch.tensor([0, 1, 2])
    ref = _softcap_grad_fp64(z, t, cap)
    x = z.clone().to(path.device).requires_grad_()
    check_path(path, x)
    ce(x, t.to(path.device), softcap=cap, reduction="sum", grad_mode=grad_mode).backward()
    r, a = ref[:, 4:], x.grad[:, 4:].cpu().double()
    assert (r != 0).all() and r.abs().min() < 1e-25
    rel = ((a - r).abs() / r.abs()).max()
    assert rel < 1e-5, f"softcap slope: worst relative error {rel:.3g}"


@pytest.mark.parametrize("lpath", ["kernel", "torch"])
def test_linear_softcap_slope_far_from_zero(lpath, monkeypatch):
    """The same for the linear cross-entropy's backward: W built so that x @ W.T is exactly
    such logits; dW = G^T x with G from the fp64 formula."""
    from test_linear_cross_entropy import use_path
    device = use_path(lpath, monkeypatch)
    g = gen("lce-softcap", lpath)
    cap = 2.0
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    L = _far_logits(g, cap, 3, 60).double()
    W = (torch.linalg.pinv(x) @ L).t()  # (64, 8): x @ W.T = L
    x, W = x.float(), W.float()
    t = torch.tensor([0, 1, 2])
    ref = _softcap_grad_fp64(x.double() @ W.double().t(), t, cap).t() @ x.double()  # (64, 8)
    w = W.clone().to(device).requires_grad_()
    softmax_ce.linear_cross_entropy(x.to(device), w, t.to(device), softcap=cap,
                                    reduction="sum").backward()
    r, a = ref[4:], w.grad[4:].cpu().double()
    scale = r.abs().amax(1)
    assert (scale > 0).all() and scale.min() < 1e-20
    rel = ((a - r).abs().amax(1) / scale).max()
    assert rel < 1e-4, f"linear softcap slope: worst relative error {rel:.3g}"


# ----------------------------------------------------------------------------
# 3. Launch hygiene (the GPU launch path, driven with stand-ins for the kernels)
# ----------------------------------------------------------------------------
class _FakeKernel:
    """Records launches: kernel[grid](*args, **kwargs)."""

    def __init__(self, guard_log=None):
        self.calls, self.guard_log = [], guard_log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(dict(grid=grid, args=args, kwargs=kwargs,
                                   guard=list(self.guard_log) if self.guard_log is not None else None))
        return launch


class _FakeTuner(_FakeKernel):
    """triton.autotune stand-in: records its launches and reports a best config."""

    def __init__(self):
        super().__init__()
        self.best_config = triton.Config({"BLOCK_V": 2048}, num_warps=4)


@pytest.fixture
def gpu_launch_path(monkeypatch):
    """run_kernel as it runs on a GPU: no interpreter, our stand-ins for the kernels."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(_triton, "_PROBED", {})
    guard_log = []

    @contextlib.contextmanager
    def guard(device):
        guard_log.append(device)
        yield
        guard_log.pop()

    monkeypatch.setattr(_triton, "device_guard", guard)
    kernels = {}
    for name in ("ce_fwd", "ce_bwd", "ce_scale"):
        kernels[name] = _FakeKernel(guard_log)
        kernels[name + "_tuned"] = _FakeTuner()
        monkeypatch.setattr(K, f"{name}_kernel", kernels[name])
        monkeypatch.setattr(K, f"{name}_tuned", kernels[name + "_tuned"])
    return kernels


def _row_vectors(n, count):
    return [torch.zeros(n) for _ in range(count)]


def test_device_guard_names_the_tensors_device():
    guard = _triton.device_guard(torch.device("cuda", 3))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 3
    assert isinstance(_triton.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_under_its_tensors_device(gpu_launch_path, monkeypatch):
    monkeypatch.setattr(_triton.tuning, "config_for",
                        lambda *a: {"BLOCK_V": 1024, "num_warps": 4})
    x = torch.randn(8, 100)
    t = torch.randint(0, 100, (8,))
    alpha, loss, row_max, log_d, dlse = _row_vectors(8, 5)
    _triton.ce_forward(x, t, None, alpha, None, None, loss, row_max, log_d, dlse, None, False, None)
    _triton.ce_backward(x, t, None, row_max, log_d, dlse, alpha, None, torch.empty_like(x), False, None)
    _triton.ce_scale(torch.empty_like(x), torch.ones(8))
    for name in ("ce_fwd", "ce_bwd", "ce_scale"):
        (call,) = gpu_launch_path[name].calls
        assert call["guard"] == [x.device], name


@pytest.mark.parametrize("kernel", ["ce_fwd", "ce_bwd", "ce_scale"])
def test_inplace_launch_is_tuned_on_a_probe(kernel, gpu_launch_path, monkeypatch):
    """No table entry, so the config is autotuned: an in-place launch must tune on a copy
    of a few rows (out of place for fwd/bwd), then launch the real tensors once with the
    config found; a second call reuses it without tuning."""
    monkeypatch.setattr(_triton.tuning, "config_for", lambda *a: None)
    monkeypatch.setattr(_triton, "PROBE_ELEMENTS", 3 * 100)
    n, v = 50, 100
    x = torch.randn(n, v)
    t = torch.randint(0, v, (n,))
    alpha, loss, row_max, log_d, dlse = _row_vectors(n, 5)
    for _ in range(2):
        if kernel == "ce_fwd":
            _triton.ce_forward(x, t, None, alpha, None, None, loss, row_max, log_d, dlse, x, False, None)
        elif kernel == "ce_bwd":
            _triton.ce_backward(x, t, None, row_max, log_d, dlse, alpha, None, x, False, None)
        else:
            _triton.ce_scale(x, torch.full((n,), 0.5))
    tuner, raw = gpu_launch_path[kernel + "_tuned"], gpu_launch_path[kernel]
    (trial,) = tuner.calls
    probe = trial["args"][0]
    assert probe.data_ptr() != x.data_ptr() and probe.shape == (3, v)
    if kernel != "ce_scale":
        grad_arg = trial["args"][10 if kernel == "ce_fwd" else 8]
        assert grad_arg.data_ptr() not in (x.data_ptr(), probe.data_ptr())
    assert len(raw.calls) == 2
    for call in raw.calls:
        assert call["args"][0] is x
        assert call["kwargs"]["BLOCK_V"] == 2048 and call["kwargs"]["num_warps"] == 4


def test_out_of_place_launch_autotunes_on_its_own_tensors(gpu_launch_path, monkeypatch):
    monkeypatch.setattr(_triton.tuning, "config_for", lambda *a: None)
    x = torch.randn(6, 100)
    t = torch.randint(0, 100, (6,))
    alpha, loss, row_max, log_d, dlse = _row_vectors(6, 5)
    _triton.ce_forward(x, t, None, alpha, None, None, loss, row_max, log_d, dlse, None, False, None)
    (call,) = gpu_launch_path["ce_fwd_tuned"].calls
    assert call["args"][0] is x and not gpu_launch_path["ce_fwd"].calls


def test_streaming_configs_have_no_dead_num_stages():
    """num_stages changes nothing in the streaming kernels' binaries (compile report):
    each (BLOCK_V, num_warps) is tuned once."""
    for configs in (K.fwd_configs(), K.bwd_configs(), K.scale_configs()):
        pairs = [(c.kwargs["BLOCK_V"], c.num_warps) for c in configs]
        assert len(pairs) == len(set(pairs)), pairs


# ----------------------------------------------------------------------------
# 4. torch.compile (default Inductor backend) and custom ops
# ----------------------------------------------------------------------------
def _logits_sized_allocations(fn, nbytes):
    """How many allocations of at least `nbytes` one call of fn makes (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.nbytes() >= nbytes)


COMPILE_MODES = {**MODES, "return_lse": dict(return_lse=True), "linear": {}}


@pytest.mark.skipif(CUDA, reason="CPU memory profile; the CUDA tier checks compile on the GPU")
@pytest.mark.parametrize("mode", list(COMPILE_MODES))
def test_torch_compile_matches_eager(mode, path2):
    N, V, D = 64, 1000, 32
    g = gen("compile", mode, path2.name)
    h = torch.randn(N, D, generator=g)
    W0 = torch.randn(V, D, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100

    def step(h, W, t):
        if mode == "linear":
            return softmax_ce.linear_cross_entropy(h, W, t, label_smoothing=0.1)
        out = ce(h @ W.t(), t, label_smoothing=0.1, **COMPILE_MODES[mode])
        return out[0] + 0.1 * out[1].mean() if mode == "return_lse" else out

    results = []
    compiled = torch.compile(step)
    for fn in (step, compiled):
        W = W0.clone().requires_grad_()
        loss = fn(h, W, t)
        loss.backward()
        results.append((loss.detach(), W.grad))
        W.grad = None
        if fn is compiled and mode in ("inplace", "fused-inplace"):
            # the logits themselves, and no second buffer of their size (no clone of them)
            assert _logits_sized_allocations(lambda: fn(h, W, t).backward(), N * V * 4) == 1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(CUDA, reason="CPU memory profile")
@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_eager_inplace_allocates_only_the_logits(mode):
    """The eager in-place modes hold one logits-sized buffer (the logits); out of place two."""
    N, V, D = 64, 1000, 32
    h, t = torch.randn(N, D), torch.randint(0, V, (N,))
    W = torch.randn(V, D, requires_grad=True)
    for inplace, expect in ((True, 1), (False, 2)):
        count = _logits_sized_allocations(
            lambda: ce(h @ W.t(), t, grad_mode=mode, inplace_backward=inplace).backward(), N * V * 4)
        assert count == expect, (inplace, count)


def test_vocabulary_parallel_forward_runs_through_custom_ops():
    """The sharded forward is made of registered ops (so torch.compile sees opaque nodes,
    not the launchers' Python): a one-rank group, ops recorded by a dispatch mode."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = gen("tp-ops")
        x = torch.randn(6, 16, generator=g)
        W = torch.randn(30, 16, generator=g)
        t = torch.randint(0, 30, (6,), generator=g)
        with Ops() as ops:
            loss = ce(x @ W.t(), t, label_smoothing=0.1, process_group=dist.group.WORLD)
            lin = softmax_ce.linear_cross_entropy(x, W, t, label_smoothing=0.1,
                                                  process_group=dist.group.WORLD)
        assert "softmax_ce.fwd_stats.default" in ops.names, sorted(ops.names)
        assert "softmax_ce.lce_stats.default" in ops.names, sorted(ops.names)
        ref = reference_cross_entropy(x.double() @ W.double().t(), t, label_smoothing=0.1)
        assert_close_to_ref(loss, ref, torch.float32, what="loss")
        assert_close_to_ref(lin, ref, torch.float32, what="linear loss")
    finally:
        if started:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------
# 5. Bytes: every logit load and store, counted under the interpreter
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def count_accesses(t: torch.Tensor):
    """{'load': n, 'store': n}: elements of t's storage the interpreted kernels read and
    write, one per unmasked lane."""
    from triton.runtime import interpreter as interp
    lo = t.untyped_storage().data_ptr()
    hi = lo + t.untyped_storage().nbytes()
    counts = {"load": 0, "store": 0}
    builder = interp.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def inside(ptrs, mask):
        p = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data
        return int(((p >= lo) & (p < hi)).sum())

    def counted_load(self, ptrs, mask, *args, **kwargs):
        counts["load"] += inside(ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        counts["store"] += inside(ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


@pytest.mark.skipif(CUDA, reason="counts accesses under Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["recompute", "fused"])
@pytest.mark.parametrize("tiles", ["one", "many"])
def test_bytes_per_logit(mode, tiles, dtype, monkeypatch):
    """What each pass reads and writes of the logits, per element (the byte model of
    kernels/cross_entropy.py): forward 1 read; recompute backward 1 read + 1 write (into
    the gradient); fused forward 1 read + 1 write when the row is one tile, 2 reads when
    it spans several (the second from L2 or HBM); plus O(1) per row (the target logit,
    the < 2 * VEC edge elements read again)."""
    if tiles == "many":
        monkeypatch.setattr(K, "interpreter_block", lambda n_cols: 64)
    N, V = 16, 1001  # rows off the 16-byte grid: head and tail edge tiles in most rows
    g = gen("bytes", mode, tiles, dtype)
    x = (torch.randn(N, V, generator=g)).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    with count_accesses(x) as fwd:
        loss = ce(x, t, grad_mode=mode)
    elements = N * V
    per_row = 1 + 2 * 16 // x.element_size()  # the target logit, the edge read again
    reads = 2 if (mode == "fused" and tiles == "many") else 1
    assert reads * elements <= fwd["load"] <= reads * elements + N * per_row, (fwd, elements)
    assert fwd["store"] == 0
    with count_accesses(x) as bwd_reads:
        loss.backward()
    if mode == "recompute":
        assert elements <= bwd_reads["load"] <= elements + N, bwd_reads
    else:
        assert bwd_reads["load"] == 0  # the fused forward's gradient is rescaled, not recomputed
