"""softmax_ce against its peers: time, effective bandwidth and peak memory of cross-entropy.

Two sections, each a declarative table of shapes and providers (below):

* "ce": cross-entropy on given logits (N, V), reduction="mean", class-index targets.
  Providers: softmax_ce (grad_mode "recompute"), softmax_ce_fused, softmax_ce_inplace
  (inplace_backward=True), torch (F.cross_entropy eager), torch_compile, liger
  (liger_kernel's LigerCrossEntropyLoss).  Modes:
    forward   the training forward (logits require grad, so each provider saves
              what its backward needs, as in training)
    backward  the backward alone, grad_output a random scalar; each call gets a fresh
              autograd graph built outside the timed region
    fwd+bwd   a training step: forward, then torch.autograd.grad with a random scalar
              grad_output (the gradient the loss hands to the LM head)
* "linear": the LM head matmul and the loss, x (N, D) @ W (V, D)^T.  Providers:
  softmax_ce_linear (softmax_ce.linear_cross_entropy, impl="chunked"), softmax_ce_linear_fused
  (impl="fused"), torch_chunked (torch's F.linear_cross_entropy with its chunked options, torch
  2.13+), torch_unfused
  (F.cross_entropy(F.linear(x, W), t)), cce (cut_cross_entropy.linear_cross_entropy),
  liger_fused_linear (LigerFusedLinearCrossEntropyLoss) and matmul_floor: the three
  bf16 matmuls of an unfused step (logits = x W^T; dx = g W; dW = g^T x, g a random
  tensor of the logits' shape), the compute floor of any implementation.

A peer that does not import gets rows with ms empty and note "unavailable: ..."; it is
never estimated.  Peers that need CUDA are "skipped" on CPU.

Numbers, per row of the CSV:
* ms: CUDA: the median of triton.testing.do_bench (it flushes the L2 before every
  call), cycling through enough distinct copies of the logits to exceed twice the L2,
  so no call finds its inputs cached; the backward mode uses a CUDA-event timer whose
  per-call setup (the forward that builds the graph) is untimed.  CPU: time.perf_counter,
  median of --cpu-reps after a warm-up.
* gbps: bytes of the provider's byte model / time, in 1e9 B/s.  The byte model is per
  logit element, in units of b (the dtype's size), written next to each provider:
      recompute (softmax_ce, softmax_ce_inplace)   forward b, backward 2b, fwd+bwd 3b
      fused (softmax_ce_fused)                     forward 3b (reads the row twice, writes
                                                   the gradient), backward 2b (rescale, as
                                                   grad_output != 1), fwd+bwd 5b; for
                                                   V <= 8192 (one tile) forward 2b, 4b in all
  The peers (torch, torch_compile, liger) are charged NOMINAL bytes, the recompute
  model, whatever they really move: their gbps is an *effective bandwidth* (the least
  traffic any implementation of that mode needs, over their time), directly comparable
  with ours; torch eager in fact moves several times more.  eff_gbps charges every
  provider, ours too, the nominal bytes, so eff_gbps ranks by time alone.
  Linear rows: gbps from the nominal reads of x and W per pass (and writes of dx, dW),
  tflops from the useful FLOPs 2NVD (forward), 4NVD (backward), 6NVD (fwd+bwd), the
  same for every provider (a fused backward's recompute of the logits is not credited).
* copy_gbps: a --copy-mib device-to-device copy (dst.copy_(src)), bytes read + written,
  measured once at the start of the run: the ceiling a streaming kernel can reach.
* peak_mem_mb (MiB): CUDA: torch.cuda.max_memory_allocated during the call minus what was
  allocated before it (the inputs; for the backward mode also the forward's saved
  state).  peak_beyond_grad_mb subtracts the gradient(s) the call returns when they
  are new storage (not the logits' own, as with inplace_backward or liger).  Empty on CPU.

Rows are appended to the CSV as they are measured (default
perf/results/<gpu-key>/bench.csv), so a run cut short keeps what it measured; a short
table is printed last, and on CUDA a summary against the goals (GOALS below).

Run:
    python perf/bench.py --quick                       # the goal shapes, every provider
    python perf/bench.py                               # the full table (long; --time-budget)
    python perf/bench.py --sections ce --vocab 128256 --rows 8192 --dtypes bf16 \\
        --providers softmax_ce,liger --modes fwd+bwd
    python perf/bench.py --resume --time-budget 400    # continue a cut-short table
    python perf/bench.py --device cpu --vocab 512 --rows 8   # CPU (PyTorch path) smoke run
    TRITON_INTERPRET=1 python perf/bench.py --device cpu --vocab 512 --rows 8 --hidden 32

From Python, ``main([...])`` returns this run's rows (a list of dicts).
"""

import argparse
import gc
import importlib.util
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import softmax_ce


# perf/_common.py by file path (perf/ is not a package and not on sys.path), once per process;
# registered before it runs, since dataclasses look their module up in sys.modules
_spec = importlib.util.spec_from_file_location("softmax_ce_perf_common", Path(__file__).resolve().with_name("_common.py"))
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
C = sys.modules[_spec.name]

MODES = ("forward", "backward", "fwd+bwd")

# ----------------------------------------------------------------------------
# What is measured: shapes
# ----------------------------------------------------------------------------

# The cross-entropy table: LLM vocabularies (Llama-2 32000, GPT-2 50257, Llama-3
# 128256, Qwen2 151936, Gemma 256000) and a small one; tokens per step.
CE_SHAPES = dict(vocab=(4096, 32000, 50257, 128256, 151936, 256000),
                 rows=(4096, 8192, 16384), dtypes=("bf16", "fp32"))
# --quick: the goal shape (N=8192, V=128256, bf16) and one smaller vocabulary.
CE_QUICK = dict(vocab=(32000, 128256), rows=(8192,), dtypes=("bf16",))

LINEAR_SHAPES = dict(vocab=(32000, 128256, 256000), rows=(16384,), hidden=(2048, 4096),
                     dtypes=("bf16",))
LINEAR_QUICK = dict(vocab=(128256,), rows=(8192,), hidden=(4096,), dtypes=("bf16",))

# CPU: shapes that finish in seconds (the PyTorch path, or the Triton interpreter).
CPU_CE_SHAPES = dict(vocab=(512,), rows=(8,), dtypes=("fp32",))
CPU_LINEAR_SHAPES = dict(vocab=(512,), rows=(8,), hidden=(32,), dtypes=("fp32",))

# ----------------------------------------------------------------------------
# What is measured: providers, each with its byte model (bytes per logit element,
# in units of the dtype's size b; see the module docstring)
# ----------------------------------------------------------------------------

RECOMPUTE = {"forward": 1, "backward": 2, "fwd+bwd": 3}  # read; read + write; 3 passes
# fused, for rows longer than one tile (V > 8192): the forward reads each row twice (the
# second read from HBM at these sizes: hundreds of rows in flight x row bytes exceed the
# L2) and writes the gradient; the backward rescales it (read + write) since grad_output
# is not 1 here (GradOut draws it from [0.5, 2)).  FUSED_ONE_TILE: rows that fit one tile
# are read once.
FUSED = {"forward": 3, "backward": 2, "fwd+bwd": 5}
FUSED_ONE_TILE = {"forward": 2, "backward": 2, "fwd+bwd": 4}
NOMINAL = RECOMPUTE  # what the peers are charged: the least any implementation moves


def byte_model(provider, vocab: int) -> dict:
    """mode -> bytes per logit element / b of `provider` at this vocabulary size."""
    return FUSED_ONE_TILE if provider.bytes is FUSED and vocab <= 8192 else provider.bytes


@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable          # () -> loss_fn(x, target); called once per shape
    bytes: dict             # mode -> bytes per logit element / b
    requires: str = ""      # a module that must import, else "unavailable"
    cuda_only: bool = False
    cpu_default: bool = True
    overwrites_input: bool = False  # the logits hold a gradient afterwards: refill them


def _softmax_ce(**options):
    return lambda: (lambda x, t: softmax_ce.cross_entropy(x, t, **options))


def _torch_eager():
    return lambda x, t: F.cross_entropy(x, t)


def _torch_compile():
    # A fresh Dynamo cache per shape: Dynamo recompiles a function for each new static
    # shape only up to its per-code limit (8), then silently runs it eagerly.
    torch._dynamo.reset()
    return torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss()  # reduction="mean"; writes the gradient into its input


CE_PROVIDERS = {p.name: p for p in (
    Provider("softmax_ce", _softmax_ce(), RECOMPUTE),
    Provider("softmax_ce_fused", _softmax_ce(grad_mode="fused"), FUSED),
    Provider("softmax_ce_inplace", _softmax_ce(inplace_backward=True), RECOMPUTE,
             overwrites_input=True),
    Provider("torch", _torch_eager, NOMINAL),
    # inductor compiles for minutes on a small CPU: there only on request
    Provider("torch_compile", _torch_compile, NOMINAL, cpu_default=False),
    Provider("liger", _liger, NOMINAL, requires="liger_kernel.transformers", cuda_only=True,
             overwrites_input=True),
)}


# Linear section: FLOPs in units of N*V*D, nominal bytes in units of (N + V)*D*b
# (each pass reads x and W once; the backward also writes dx and dW).
LINEAR_FLOP = {"forward": 2, "backward": 4, "fwd+bwd": 6}
LINEAR_BYTES = {"forward": 1, "backward": 2, "fwd+bwd": 3}


@dataclass(frozen=True)
class LinearProvider:
    name: str
    make: Callable          # () -> loss_fn(x, W, target), or None for the matmul floor
    requires: str = ""
    cuda_only: bool = False
    floor: bool = False     # times the three matmuls directly, no autograd


def _softmax_ce_linear(**options):
    # "chunked" (the default): 6 N V D FLOPs a step, the three GEMMs on cuBLAS, a chunk of
    # logits (1 GiB) in memory; "fused": 8 N V D (the backward recomputes the logits
    # tile by tile), no logits at all
    return lambda: (lambda x, w, t: softmax_ce.linear_cross_entropy(x, w, t, **options))


def _torch_chunked():
    # torch 2.13+: F.linear_cross_entropy's own chunked implementation, default options
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    options = LinearCrossEntropyOptions()
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _torch_unfused():
    return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    # defaults: impl="cce", filter_eps="high" (skips gradient entries below bf16 resolution)
    return lambda x, w, t: linear_cross_entropy(x, w, t)


def _liger_fused_linear():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: module(w, x, t)  # its argument order: (lin_weight, input, target)


LINEAR_PROVIDERS = {p.name: p for p in (
    LinearProvider("softmax_ce_linear", _softmax_ce_linear()),
    LinearProvider("softmax_ce_linear_fused", _softmax_ce_linear(impl="fused")),
    LinearProvider("torch_unfused", _torch_unfused),
    LinearProvider("torch_chunked", _torch_chunked,
                   requires="torch.nn.modules.linear_cross_entropy_options"),
    LinearProvider("cce", _cce, requires="cut_cross_entropy", cuda_only=True),
    LinearProvider("liger_fused_linear", _liger_fused_linear,
                   requires="liger_kernel.transformers", cuda_only=True),
    LinearProvider("matmul_floor", lambda: None, floor=True),
)}

# ----------------------------------------------------------------------------
# Goals, reported on CUDA (see goals_report)
# ----------------------------------------------------------------------------

GOALS = dict(
    forward_copy_fraction=0.90, forward_min_vocab=32000,  # forward >= 90% of copy, V >= 32000
    step_copy_fraction=0.85,                               # fwd+bwd >= 85%, own byte model
    goal_shape=("bf16", 8192, 128256),                     # where the speedups are judged
    vs_liger=2.0, vs_torch_compile=1.5,                    # fwd+bwd speedups there
    extra_bytes_per_row=1024,  # "O(N)": peak beyond the gradient <= 1 KiB per row
                               # (one logits row is V*b >= 8 KiB at V >= 4096 bf16)
)

COLUMNS = ["timestamp", "gpu", "section", "provider", "mode", "dtype", "n_rows", "vocab", "hidden",
           "ms", "gbps", "eff_gbps", "bytes_per_elem", "tflops", "peak_mem_mb",
           "peak_beyond_grad_mb", "copy_gbps", "torch", "triton", "git_sha", "note"]

MiB = 2 ** 20


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------

def availability(p, device) -> str:
    """'' when the provider can run here, else the note its rows carry."""
    if p.requires:
        import importlib
        try:
            importlib.import_module(p.requires)
        except Exception as exc:  # ImportError, or a peer broken against this torch/triton
            return f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if p.cuda_only and device.type != "cuda":
        return "skipped: needs CUDA"
    return ""


class Timer:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.flush = C.L2Flush(device) if device.type == "cuda" else None

    def __call__(self, fn, setup=None):
        a = self.args
        if self.device.type != "cuda":
            return C.cpu_median_ms(fn, setup=setup, warmup=1, reps=a.cpu_reps)
        if setup is None:
            return C.do_bench_median(fn, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms)
        # do_bench would time setup() too: our event timer leaves it (and the flush) out
        return C.cuda_median_ms(fn, setup=setup, flush=self.flush, rep_ms=a.rep_ms)


class GradOut:
    """The random scalar grad_output, in the loss's dtype (made once per dtype)."""

    def __init__(self, value, device):
        self.value, self.device, self.cache = value, device, {}

    def __call__(self, loss):
        key = (loss.dtype, tuple(loss.shape))
        g = self.cache.get(key)
        if g is None:
            g = self.cache[key] = torch.full(loss.shape, self.value, dtype=loss.dtype,
                                             device=self.device)
        return g


def autograd_case(loss_fn, mode, inputs, wrt, gout):
    """(fn, setup) timing `mode` of loss_fn over a rotation of inputs.

    inputs: list of argument tuples (copies); wrt: indices of the arguments to
    differentiate.  backward mode: setup() runs the forward on the next copy."""
    it = itertools.cycle(inputs)
    if mode == "forward":
        def fn():
            loss_fn(*next(it))
        return fn, None
    if mode == "fwd+bwd":
        def fn():
            args = next(it)
            loss = loss_fn(*args)
            torch.autograd.grad(loss, [args[i] for i in wrt], gout(loss))
        return fn, None
    state = {}

    def setup():
        args = next(it)
        state["wrt"] = [args[i] for i in wrt]
        state["loss"] = loss_fn(*args)

    def fn():
        loss = state.pop("loss")
        torch.autograd.grad(loss, state.pop("wrt"), gout(loss))
    return fn, setup


def cuda_peak(loss_fn, mode, args, wrt, gout, device):
    """(peak MiB beyond what is allocated before the call, the same beyond the new gradients)."""
    gc.collect()
    torch.cuda.synchronize(device)
    loss = loss_fn(*args) if mode == "backward" else None  # held before the timed call
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    grads = ()
    if mode == "forward":
        out = loss_fn(*args)
    else:
        if loss is None:
            loss = loss_fn(*args)
        grads = torch.autograd.grad(loss, [args[i] for i in wrt], gout(loss))
        out = grads
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    own = {args[i].untyped_storage().data_ptr() for i in wrt}
    new_grad_bytes = sum(g.numel() * g.element_size() for g in grads
                         if g.untyped_storage().data_ptr() not in own)
    del out, grads, loss
    beyond = (peak - new_grad_bytes) / MiB if mode != "forward" else None
    return peak / MiB, beyond


def is_oom(exc) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_note(exc) -> str:
    if is_oom(exc):
        return "OOM"
    return f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def attempt(thunk, notes, prefix):
    """thunk()'s value, or None with the failure added to notes.  The exception (and the
    tensors its traceback holds) is gone once this returns, so memory can be freed then."""
    try:
        return thunk()
    except Exception as exc:  # OOM at a large shape, a peer broken on this stack, ...
        notes.append(prefix + error_note(exc))
        return None


def free_memory_if(notes, device):
    """After a failed measurement (an OOM above all): drop the cached blocks it left."""
    if any(n.startswith(("OOM", "error", "peak memory")) for n in notes if n):
        free_memory(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def shape_todo(run, providers, modes, shape, skipped):
    """The (provider, mode) pairs to measure at one shape, shape = (section, dtype, N, V,
    D or ""): those the CSV does not have yet (--resume); [] when none are left or when
    the time budget is spent (`skipped` is recorded)."""
    section, dt, n, v, d = shape
    todo = [(p, m) for p in providers for m in modes
            if (section, p.name, m, dt, str(n), str(v), str(d)) not in run.done]
    if todo and run.over_budget():
        run.skipped.append(skipped)
        return []
    return todo


def emit_notes(run, base, cases, note):
    """A row with no measurement, only the note saying why, for each (provider, mode)."""
    for p, m in cases:
        run.emit(dict(base, provider=p.name, mode=m, note=note))


def modes_to_run(run, p, modes, todo, base, skipped):
    """The modes of provider p to measure at this shape; [] when none are left to do,
    when the time budget is spent (`skipped` is recorded) or when p cannot run on this
    device (its rows are emitted with the reason)."""
    p_modes = [m for m in modes if (p, m) in todo]
    if not p_modes:
        return []
    if run.over_budget():
        run.skipped.append(skipped)
        return []
    note = availability(p, run.device)
    if note:
        emit_notes(run, base, [(p, m) for m in p_modes], note)
        return []
    return p_modes


def softmax_ce_path(x) -> str:
    from softmax_ce import _launch

    if x.is_cuda:
        return ""
    return "cpu: Triton interpreter" if _launch.uses_triton(x) else "cpu: PyTorch chunked path"


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------

class Run:
    """State of one invocation: device, provenance, CSV, budget, rows."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.gpu = C.device_name(self.device)
        self.prov = dict(gpu=self.gpu, git_sha=C.git_sha(), **C.versions())
        self.timer = Timer(args, self.device)
        self.t0 = time.monotonic()
        self.rows, self.skipped = [], []
        self.done = set()
        self.resumed = []
        if args.resume and Path(args.csv).exists():
            for r in C.read_rows(args.csv):
                if (r.get("ms") and all(r.get(k) == v for k, v in self.prov.items())):
                    self.done.add(row_key(r))
                    self.resumed.append(r)
        self.copy_gbps = None

    def over_budget(self) -> bool:
        b = self.args.time_budget
        return b is not None and time.monotonic() - self.t0 > b

    def emit(self, row):
        row = dict(timestamp=C.utc_now(), copy_gbps=self.copy_gbps, **self.prov, **row)
        for k in ("ms", "gbps", "eff_gbps", "tflops", "peak_mem_mb", "peak_beyond_grad_mb",
                  "copy_gbps"):
            if isinstance(row.get(k), float):
                row[k] = float(f"{row[k]:.6g}")  # 6 significant digits: tiny CPU rates stay > 0
        self.rows.append(row)
        C.append_rows(self.args.csv, COLUMNS, [row])  # at once: a killed run keeps its rows
        return row


def row_key(r):
    return (str(r["section"]), str(r["provider"]), str(r["mode"]), str(r["dtype"]),
            str(r["n_rows"]), str(r["vocab"]), str(r.get("hidden") or ""))


def n_copies(run, nbytes) -> int:
    """Distinct input copies to cycle through: together > 2x the L2 (CUDA), at most 8 and
    at most a quarter of the device's memory; 1 on CPU."""
    if run.device.type != "cuda":
        return 1
    want = math.ceil(2 * C.l2_bytes(run.device) / max(nbytes, 1))
    total = torch.cuda.get_device_properties(run.device).total_memory
    fit = max(1, int(0.25 * total // max(nbytes, 1)))
    return max(1, min(8, want, fit))


def run_ce(run, shapes, providers, modes):
    args, device = run.args, run.device
    for dt, n, v in itertools.product(shapes["dtypes"], shapes["rows"], shapes["vocab"]):
        todo = shape_todo(run, providers, modes, ("ce", dt, n, v, ""), f"ce {dt} N={n} V={v}")
        if not todo:
            continue
        dtype = C.torch_dtype(dt)
        b = torch.empty((), dtype=dtype).element_size()
        base = dict(section="ce", dtype=dt, n_rows=n, vocab=v, hidden="")
        gen = torch.Generator(device=device).manual_seed(args.seed)
        k = n_copies(run, n * v * b)
        notes = []
        made = attempt(lambda: (
            # handed over as an LM head's output: the in-place providers may overwrite
            # them (in place on a leaf is refused), the others differentiate them alike
            [C.handover(torch.randn(n, v, generator=gen, device=device, dtype=dtype))
             for _ in range(k)],
            torch.randint(0, v, (n,), generator=gen, device=device),
            GradOut(float(torch.rand((), generator=gen, device=device)) * 1.5 + 0.5, device)),
            notes, "inputs: ")
        if made is None:
            free_memory(device)
            emit_notes(run, base, todo, notes[0])
            continue
        xs, target, gout = made
        dirty = False
        for p in providers:
            p_modes = modes_to_run(run, p, modes, todo, base, f"ce {p.name} {dt} N={n} V={v}")
            if not p_modes:
                continue
            if dirty:  # an in-place provider left gradients in the logits: fresh ones
                with torch.no_grad():
                    for x in xs:
                        x.normal_(generator=gen)
                dirty = False
            notes = []
            loss_fn = attempt(p.make, notes, "")
            if loss_fn is None:
                emit_notes(run, base, [(p, m) for m in p_modes], notes[0])
                continue
            path = softmax_ce_path(xs[0]) if p.name.startswith("softmax_ce") else ""
            for m in p_modes:
                notes = [path, f"{k} input copies" if k > 1 else ""]
                model = byte_model(p, v)
                row = dict(base, provider=p.name, mode=m, bytes_per_elem=model[m] * b)
                fn, setup = autograd_case(loss_fn, m, [(x, target) for x in xs], (0,), gout)
                ms = attempt(lambda: run.timer(fn, setup), notes, "")
                if ms is not None:
                    row["ms"] = ms
                    row["gbps"] = model[m] * b * n * v / (ms * 1e-3) / 1e9
                    row["eff_gbps"] = NOMINAL[m] * b * n * v / (ms * 1e-3) / 1e9
                    if device.type == "cuda":
                        peak = attempt(lambda: cuda_peak(loss_fn, m, (xs[0], target), (0,), gout,
                                                         device), notes, "peak memory: ")
                        if peak is not None:
                            row["peak_mem_mb"], row["peak_beyond_grad_mb"] = peak
                del fn, setup
                free_memory_if(notes, device)
                row["note"] = "; ".join(x for x in notes if x)
                dirty |= p.overwrites_input
                run.emit(row)
            del loss_fn
        del xs, target
        free_memory(device)


def run_linear(run, shapes, providers, modes):
    args, device = run.args, run.device
    for dt, n, v, d in itertools.product(shapes["dtypes"], shapes["rows"], shapes["vocab"],
                                         shapes["hidden"]):
        todo = shape_todo(run, providers, modes, ("linear", dt, n, v, d),
                          f"linear {dt} N={n} V={v} D={d}")
        if not todo:
            continue
        dtype = C.torch_dtype(dt)
        b = torch.empty((), dtype=dtype).element_size()
        base = dict(section="linear", dtype=dt, n_rows=n, vocab=v, hidden=d)
        flop = {m: LINEAR_FLOP[m] * n * v * d for m in MODES}
        nbytes = {m: LINEAR_BYTES[m] * (n + v) * d * b for m in MODES}
        gen = torch.Generator(device=device).manual_seed(args.seed)
        notes = []
        # x, W are each > the L2 at the table's shapes and the step is compute-bound:
        # one copy (do_bench still flushes the L2 before every call)
        made = attempt(lambda: (
            torch.randn(n, d, generator=gen, device=device, dtype=dtype).requires_grad_(),
            (torch.randn(v, d, generator=gen, device=device, dtype=dtype) * d ** -0.5
             ).requires_grad_(),
            torch.randint(0, v, (n,), generator=gen, device=device),
            GradOut(float(torch.rand((), generator=gen, device=device)) * 1.5 + 0.5, device)),
            notes, "inputs: ")
        if made is None:
            free_memory(device)
            emit_notes(run, base, todo, notes[0])
            continue
        x, w, target, gout = made
        for p in providers:
            p_modes = modes_to_run(run, p, modes, todo, base,
                                   f"linear {p.name} {dt} N={n} V={v} D={d}")
            if not p_modes:
                continue
            notes = []
            made = attempt(lambda: (p.make(), torch.randn(n, v, generator=gen, device=device,
                                                          dtype=dtype) if p.floor else None),
                           notes, "")
            if made is None:
                free_memory(device)
                emit_notes(run, base, [(p, m) for m in p_modes], notes[0])
                continue
            loss_fn, g = made
            for m in p_modes:
                notes = []
                row = dict(base, provider=p.name, mode=m)
                if p.floor:
                    fn, setup = floor_case(m, x.detach(), w.detach(), g), None
                else:
                    fn, setup = autograd_case(loss_fn, m, [(x, w, target)], (0, 1), gout)
                ms = attempt(lambda: run.timer(fn, setup), notes, "")
                if ms is not None:
                    row["ms"] = ms
                    row["gbps"] = row["eff_gbps"] = nbytes[m] / (ms * 1e-3) / 1e9
                    row["tflops"] = flop[m] / (ms * 1e-3) / 1e12
                    if device.type == "cuda":
                        if p.floor:
                            peak = attempt(lambda: (floor_peak(fn, device), None), notes,
                                           "peak memory: ")
                        else:
                            peak = attempt(lambda: cuda_peak(loss_fn, m, (x, w, target), (0, 1),
                                                             gout, device), notes, "peak memory: ")
                        if peak is not None:
                            row["peak_mem_mb"], row["peak_beyond_grad_mb"] = peak
                del fn, setup
                free_memory_if(notes, device)
                row["note"] = "; ".join(notes)
                run.emit(row)
            del loss_fn, g
            free_memory(device)
        del x, w, target
        free_memory(device)


def floor_case(mode, x, w, g):
    """The three matmuls of an unfused step; which of them `mode` needs."""
    def forward():
        torch.mm(x, w.t())

    def backward():
        torch.mm(g, w)
        torch.mm(g.t(), x)

    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    return lambda: (forward(), backward())


def floor_peak(fn, device):
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


# ----------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------

def goals_report(rows) -> list:
    """Lines judging rows (this run's, plus those a --resume run took from the CSV)
    against GOALS.  Rows may hold CSV strings; the latest row per key counts."""
    latest = {}
    for r in rows:
        latest[row_key(r)] = r
    rows = list(latest.values())
    f = C.as_float
    G = GOALS
    out = []

    def frac(r):
        g, c = f(r.get("gbps")), f(r.get("copy_gbps"))
        return g / c if g and c else None

    ce = [r for r in rows if r["section"] == "ce" and f(r.get("ms"))]
    fwd = [r for r in ce if r["provider"] == "softmax_ce" and r["mode"] == "forward"
           and int(r["vocab"]) >= G["forward_min_vocab"] and frac(r) is not None]
    out.append(_judge(f"forward >= {G['forward_copy_fraction']:.0%} of copy bandwidth "
                      f"(softmax_ce, V >= {G['forward_min_vocab']})", fwd, frac,
                      G["forward_copy_fraction"]))
    for name in [n for n in CE_PROVIDERS if n.startswith("softmax_ce")]:
        step = [r for r in ce if r["provider"] == name and r["mode"] == "fwd+bwd"
                and frac(r) is not None]
        out.append(_judge(f"fwd+bwd >= {G['step_copy_fraction']:.0%} of copy bandwidth "
                          f"({name}, its byte model)", step, frac, G["step_copy_fraction"]))
    dt, n, v = G["goal_shape"]
    at = {r["provider"]: f(r["ms"]) for r in ce if r["mode"] == "fwd+bwd" and r["dtype"] == dt
          and int(r["n_rows"]) == n and int(r["vocab"]) == v}
    ours = at.get("softmax_ce")
    best = min(((ms, p) for p, ms in at.items() if p.startswith("softmax_ce")), default=None)
    for peer, want in (("liger", G["vs_liger"]), ("torch_compile", G["vs_torch_compile"])):
        label = f"fwd+bwd >= {want:g}x faster than {peer} at N={n}, V={v}, {dt}"
        if ours is None or at.get(peer) is None:
            out.append(f"n/a   {label}: no rows for softmax_ce and {peer}")
            continue
        sp = at[peer] / ours
        extra = (f"; best variant {best[1]} {at[peer] / best[0]:.2f}x"
                 if best and best[1] != "softmax_ce" else "")
        out.append(f"{'PASS' if sp >= want else 'FAIL'}  {label}: {sp:.2f}x "
                   f"({ours:.3f} ms vs {at[peer]:.3f} ms){extra}")
    mem = [r for r in ce if r["provider"].startswith("softmax_ce") and r["mode"] == "fwd+bwd"
           and f(r.get("peak_beyond_grad_mb")) is not None]

    def per_row(r):
        return f(r["peak_beyond_grad_mb"]) * MiB / int(r["n_rows"])
    if mem:
        worst = max(mem, key=per_row)
        ok = per_row(worst) <= G["extra_bytes_per_row"]
        out.append(f"{'PASS' if ok else 'FAIL'}  peak memory beyond the gradient O(N) "
                   f"(<= {G['extra_bytes_per_row']} B/row): worst {per_row(worst):.0f} B/row "
                   f"({worst['provider']}, {worst['dtype']}, N={worst['n_rows']}, "
                   f"V={worst['vocab']})")
    else:
        out.append("n/a   peak memory beyond the gradient O(N): no rows")
    return out


def _judge(label, rows, value, want):
    if not rows:
        return f"n/a   {label}: no rows"
    vals = [(value(r), r) for r in rows]
    worst, r = min(vals, key=lambda t: t[0])
    n_ok = sum(v >= want for v, _ in vals)
    return (f"{'PASS' if n_ok == len(vals) else 'FAIL'}  {label}: {n_ok}/{len(vals)} rows; "
            f"worst {worst:.1%} ({r['dtype']}, N={r['n_rows']}, V={r['vocab']})")


def print_tables(rows):
    ce = [dict(r, pct=(r["gbps"] / r["copy_gbps"] if r.get("gbps") and r.get("copy_gbps")
                       else None)) for r in rows if r["section"] == "ce"]
    if ce:
        print(C.format_table(ce, [
            ("provider", "provider", None), ("mode", "mode", None), ("dtype", "dtype", None),
            ("n_rows", "N", "{}"), ("vocab", "V", "{}"), ("ms", "ms", "{:.3f}"),
            ("gbps", "GB/s", "{:.0f}"), ("pct", "%copy", "{:.0%}"),
            ("peak_mem_mb", "peak MiB", "{:.1f}"), ("note", "note", None)]))
    lin = [r for r in rows if r["section"] == "linear"]
    if lin:
        print()
        print(C.format_table(lin, [
            ("provider", "provider", None), ("mode", "mode", None), ("dtype", "dtype", None),
            ("n_rows", "N", "{}"), ("vocab", "V", "{}"), ("hidden", "D", "{}"),
            ("ms", "ms", "{:.3f}"), ("tflops", "TFLOP/s", "{:.0f}"),
            ("peak_mem_mb", "peak MiB", "{:.1f}"), ("peak_beyond_grad_mb", "beyond grads", "{:.1f}"),
            ("note", "note", None)]))


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", type=C.name_list, default=("ce", "linear"), help="ce,linear")
    p.add_argument("--vocab", type=C.int_list, help="comma list; overrides both sections' table")
    p.add_argument("--rows", type=C.int_list, help="comma list of N (tokens)")
    p.add_argument("--hidden", type=C.int_list, help="comma list of D (linear section)")
    p.add_argument("--dtypes", type=C.name_list, help=f"comma list of {sorted(C.DTYPE_NAMES)}")
    p.add_argument("--providers", type=C.name_list,
                   help=f"comma list of {', '.join([*CE_PROVIDERS, *LINEAR_PROVIDERS])}")
    p.add_argument("--modes", type=C.name_list, default=MODES, help=",".join(MODES))
    p.add_argument("--quick", action="store_true", help="the goal shapes only")
    p.add_argument("--csv", help="CSV to append to (default perf/results/<gpu-key>/bench.csv)")
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth buffer "
                                                "(default 2048 on CUDA, 64 on CPU)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=5, help="timed calls per row on CPU")
    p.add_argument("--time-budget", type=float, help="seconds; no new shape starts after it")
    p.add_argument("--resume", action="store_true",
                   help="skip rows the CSV already has for this GPU, versions and git revision")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for dt in args.dtypes or ():
        if dt not in C.DTYPE_NAMES:
            p.error(f"unknown dtype {dt!r}; choose from {', '.join(C.DTYPE_NAMES)}")
    for s in args.sections:
        if s not in ("ce", "linear"):
            p.error(f"unknown section {s!r}; choose from ce, linear")
    known = {**CE_PROVIDERS, **LINEAR_PROVIDERS}
    if args.providers:
        unknown = [n for n in args.providers if n not in known]
        if unknown:
            p.error(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        args.ce_providers = [CE_PROVIDERS[n] for n in args.providers if n in CE_PROVIDERS]
        args.linear_providers = [LINEAR_PROVIDERS[n] for n in args.providers
                                 if n in LINEAR_PROVIDERS]
    else:
        args.ce_providers = [pr for pr in CE_PROVIDERS.values()
                             if device.type == "cuda" or pr.cpu_default]
        args.linear_providers = list(LINEAR_PROVIDERS.values())

    cuda = device.type == "cuda"
    ce = dict(CE_QUICK if args.quick else CE_SHAPES) if cuda else dict(CPU_CE_SHAPES)
    lin = dict(LINEAR_QUICK if args.quick else LINEAR_SHAPES) if cuda else dict(CPU_LINEAR_SHAPES)
    for shapes in (ce, lin):
        if args.vocab:
            shapes["vocab"] = args.vocab
        if args.rows:
            shapes["rows"] = args.rows
        if args.dtypes:
            shapes["dtypes"] = args.dtypes
    if args.hidden:
        lin["hidden"] = args.hidden
    args.ce_shapes, args.linear_shapes = ce, lin
    if args.copy_mib is None:
        args.copy_mib = 2048 if cuda else 64
    if args.csv is None:
        args.csv = str(C.results_dir(C.device_key(device)) / "bench.csv")
    return args


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    run = Run(args)
    device = run.device
    print(f"softmax_ce bench on {run.gpu} | torch {run.prov['torch']} | triton "
          f"{run.prov['triton']} | git {run.prov['git_sha']} | csv {args.csv}", flush=True)
    print("gbps: bytes of each provider's byte model / time (peers: nominal = recompute "
          "model, i.e. effective bandwidth); see the module docstring", flush=True)
    run.copy_gbps = C.copy_gbps(device, args.copy_mib * MiB)
    print(f"copy bandwidth ({args.copy_mib} MiB, read + write): {run.copy_gbps:.0f} GB/s",
          flush=True)

    if "ce" in args.sections and args.ce_providers:
        run_ce(run, args.ce_shapes, args.ce_providers, args.modes)
    if "linear" in args.sections and args.linear_providers:
        run_linear(run, args.linear_shapes, args.linear_providers, args.modes)

    print()
    print_tables(run.rows)
    if run.resumed:
        print(f"\n--resume: {len(run.resumed)} rows already in {args.csv} were not re-measured")
    if run.skipped:
        print(f"\ntime budget ({args.time_budget:g} s) spent; not measured: "
              + "; ".join(run.skipped))
    print()
    if device.type == "cuda":
        print("goals:")
        for line in goals_report([*run.resumed, *run.rows]):
            print("  " + line)
    else:
        print("goals: judged on CUDA only (this was a CPU run)")
    return run.rows


if __name__ == "__main__":
    main()
