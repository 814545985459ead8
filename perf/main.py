"""The main job: softmax_ce against torch on one training step, for accuracy, time and memory.

For each provider it runs forward + backward of a cross-entropy loss on the same
logits and targets, with a random positive grad_output (a scalar for the "mean"
and "sum" reductions, one per row for "none"), and prints one row:

    provider | max abs loss error | max abs grad error | median ms | peak MiB | ok

* providers: torch eager, torch.compile (CUDA; on CPU with --compile), softmax_ce
  with grad_mode "recompute" and "fused", each also with inplace_backward=True
  (their logits are rebuilt, untimed, before every step since the step overwrites them);
* the backward is torch.autograd.grad(loss, logits, grad_output): the gradient the
  loss hands to whatever produced the logits (see `step`);
* errors are against a float64 torch reference computed from the same logits;
* time is forward + backward, the median over --repeats after warm-up
  (CUDA: CUDA events around each step; CPU: time.perf_counter);
* peak memory is what the step allocates beyond its inputs (CUDA: the
  torch.cuda.max_memory_allocated delta; CPU: the peak resident-set delta
  (VmHWM, the address space's ru_maxrss), measured in a fresh subprocess per
  provider so that one provider's high-water mark cannot hide another's, with
  glibc's mmap threshold pinned so freed buffers leave RSS; see `cpu_peak_mb`).

The process exits non-zero when a provider's loss or gradient error is beyond the
dtype's tolerance (see TOLERANCES), so this job doubles as a smoke check.

Run:
    python perf/main.py                                   # default shape for the device
    python perf/main.py --rows 4096 --vocab 128256 --dtype bf16 --reduction sum
    python perf/main.py --device cpu --compile            # add torch.compile on CPU (slow to compile)
    TRITON_INTERPRET=1 python perf/main.py --device cpu   # the Triton kernels, interpreted (tiny default)

From Python, ``main([...])`` returns the measured rows as a list of dicts and
``exit_code(rows)`` the status the command line would exit with.
"""

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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

# ----------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------

DTYPES = {short: C.torch_dtype(short) for short in C.DTYPE_NAMES}

# Defaults by where softmax_ce runs.  The CPU one finishes in seconds on 2 cores;
# the interpreter runs every Triton op through NumPy, so it gets a tiny shape.
DEFAULTS = {
    "cuda": dict(rows=8192, vocab=128256, dtype="bf16", repeats=20, warmup=3),
    "cpu": dict(rows=256, vocab=32000, dtype="fp32", repeats=10, warmup=2),
    "cpu-interpreter": dict(rows=32, vocab=4096, dtype="fp32", repeats=3, warmup=1),
}


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str                      # "torch", "compile" or "softmax_ce"
    options: dict = field(default_factory=dict)
    overwrites_logits: bool = False  # the step consumes its logits: rebuild them each repeat
    cpu_default: bool = True       # run it on CPU without being asked


PROVIDERS = (
    Provider("torch", "torch"),
    # inductor compiles for minutes on a small CPU, so CPU runs it only on request
    Provider("torch.compile", "compile", cpu_default=False),
    Provider("softmax_ce", "softmax_ce"),
    Provider("softmax_ce fused", "softmax_ce", {"grad_mode": "fused"}),
    Provider("softmax_ce inplace", "softmax_ce", {"inplace_backward": True},
             overwrites_logits=True),
    Provider("softmax_ce fused inplace", "softmax_ce",
             {"grad_mode": "fused", "inplace_backward": True}, overwrites_logits=True),
)

# Allowed error relative to the size of what is compared: loss elements against
# max(1, |reference|), gradients against the largest reference gradient.  bf16 and
# fp16 results are rounded to the dtype (a bf16 loss near log(128256) ~ 11.8 is
# only good to ~0.03), so their bounds follow the dtype's epsilon.
TOLERANCES = {
    "fp32": dict(loss=2e-5, grad=1e-4),
    "bf16": dict(loss=2e-2, grad=5e-2),
    "fp16": dict(loss=4e-3, grad=1e-2),
}

# Rows per chunk of the float64 reference, in logits: the reference never holds a
# float64 copy of all the logits (8 GB at the CUDA default shape).
REF_CHUNK_ELEMENTS = 1 << 24

RSS_MARK = "RSS_RESULT "


# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # CPU times swing with whatever else runs: the load average says how busy it was
    return f"{C.cpu_model()}, {torch.get_num_threads()} threads{C.load_average()}"


def softmax_ce_path(logits: torch.Tensor) -> str:
    from softmax_ce import _launch, _torch_path  # the package's own dispatch and chunk size
    if _launch.uses_triton(logits):
        return "Triton interpreter (TRITON_INTERPRET=1)" if interpreting() else "Triton kernels"
    return f"PyTorch chunked path ({_torch_path.CHUNK_ELEMENTS} logits per chunk)"


# ----------------------------------------------------------------------------
# Inputs, reference, providers
# ----------------------------------------------------------------------------

def make_inputs(rows, vocab, dtype, reduction, device, seed=0):
    """Logits, targets and grad_output, reproducible so a subprocess rebuilds the same ones."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, device=device, dtype=dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    g_shape = (rows,) if reduction == "none" else ()
    grad_out = (torch.rand(g_shape, generator=gen, device=device) * 1.5 + 0.5).to(dtype)
    return logits, target, grad_out


def reference(logits, target, reduction, grad_out):
    """float64 loss and float32 gradient of the logits for grad_out, row chunk by row chunk."""
    n_rows, vocab = logits.shape
    g = grad_out.double().expand(n_rows)
    if reduction == "mean":
        g = g / n_rows  # no target is ignore_index, so torch's denominator is n_rows
    loss_rows = torch.empty(n_rows, dtype=torch.float64, device=logits.device)
    grad = torch.empty(n_rows, vocab, dtype=torch.float32, device=logits.device)
    step = max(1, REF_CHUNK_ELEMENTS // vocab)
    for r0 in range(0, n_rows, step):
        rows = slice(r0, r0 + step)
        x = logits[rows].double().requires_grad_()
        loss = F.cross_entropy(x, target[rows], reduction="none")
        (grad[rows],) = torch.autograd.grad(loss, x, g[rows])
        loss_rows[rows] = loss.detach()
    if reduction == "none":
        return loss_rows, grad
    total = loss_rows.sum()
    return (total / n_rows if reduction == "mean" else total), grad


def loss_fn(provider: Provider, reduction: str):
    if provider.kind == "softmax_ce":
        opts = provider.options
        return lambda x, t: softmax_ce.cross_entropy(x, t, reduction=reduction, **opts)

    def eager(x, t):
        return F.cross_entropy(x, t, reduction=reduction)
    if provider.kind == "compile":
        return torch.compile(eager, dynamic=False)
    return eager


def prepare(provider, logits):
    """The tensor the step differentiates: a leaf, or for the in-place modes a fresh copy
    handed over as an LM head's output would be (in place on a leaf is refused)."""
    if provider.overwrites_logits:
        return C.handover(logits.clone())
    return logits.detach().requires_grad_()


def step(fn, x, target, grad_out):
    # autograd.grad hands back the gradient the loss produces, as the LM head's
    # backward would receive it.  loss.backward() on a leaf would add AccumulateGrad's
    # copy of it (x.grad cannot alias x), which is not the loss's cost.
    loss = fn(x, target)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    return loss, grad


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------

def errors(loss, grad, ref_loss, ref_grad, tol):
    """(max abs loss error, max abs grad error, within tolerance)."""
    loss_err = (loss.detach().double() - ref_loss).abs()
    loss_ok = bool((loss_err <= tol["loss"] * ref_loss.abs().clamp_min(1.0)).all())
    step_rows = max(1, REF_CHUNK_ELEMENTS // grad.shape[1])
    chunk_errs = torch.stack([  # chunked: no logits-sized fp32 difference tensor
        (grad[r0:r0 + step_rows].float() - ref_grad[r0:r0 + step_rows]).abs().max()
        for r0 in range(0, grad.shape[0], step_rows)])
    grad_err = chunk_errs.max().item()  # torch's max propagates nan, Python's would not
    # nan compares False, so a nan anywhere fails
    grad_ok = grad_err <= tol["grad"] * ref_grad.abs().max().item()
    return loss_err.max().item(), grad_err, loss_ok and grad_ok


def time_ms(fn, provider, logits, target, grad_out, repeats, warmup, device):
    for _ in range(warmup):  # compile, autotune, lazy inits
        step(fn, prepare(provider, logits), target, grad_out)
    times = []
    for _ in range(repeats):
        x = prepare(provider, logits)  # the copy an in-place provider needs is not timed
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step(fn, x, target, grad_out)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = step(fn, x, target, grad_out)
            times.append((time.perf_counter() - t0) * 1e3)
        del x, out
    return statistics.median(times)


def cuda_peak_mb(fn, provider, logits, target, grad_out, device):
    x = prepare(provider, logits)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step(fn, x, target, grad_out)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, x
    return peak / 2**20


def rss_child(args, provider):
    """In a fresh process: peak RSS of one step beyond its inputs, in MB (None if unknowable)."""
    device = torch.device("cpu")
    logits, target, grad_out = make_inputs(args.rows, args.vocab, DTYPES[args.dtype],
                                           args.reduction, device)
    fn = loss_fn(provider, args.reduction)
    can_reset = C.reset_peak_rss()
    if can_reset:  # a steady-state step, like the CUDA measurement: lazy inits done first
        step(fn, prepare(provider, logits), target, grad_out)
    x = prepare(provider, logits)
    gc.collect()
    C.reset_peak_rss()
    base = C.rss_kib()
    before = C.peak_rss_kib()  # VmHWM, not ru_maxrss: see C.peak_rss
    out = step(fn, x, target, grad_out)
    peak = C.peak_rss_kib()
    del out
    # Without a reset, an earlier high-water mark (import, inputs) can hide the step's.
    if not can_reset and peak <= before:
        return None
    return max(0, peak - base) / 1024


def cpu_peak_mb(argv, provider):
    """Run rss_child in a fresh interpreter; None ("n/a") where RSS cannot be measured."""
    if not os.path.exists("/proc/self/statm"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--rss-child", provider.name]
    # With glibc's default, buffers under 32 MB freed by the warm-up step stay cached
    # (resident) in the heap and a second step reuses them without raising RSS, so
    # chunk-sized temporaries would vanish from the delta.  A fixed 1 MiB mmap
    # threshold returns every freed buffer at once: the delta then counts what the
    # step holds live, like torch.cuda.max_memory_allocated.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(C.MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RSS_MARK):
            return json.loads(line[len(RSS_MARK):])["peak_mb"]
    sys.stderr.write(f"[{provider.name}] memory subprocess failed (rc {proc.returncode}):\n"
                     f"{proc.stderr[-2000:]}\n")
    return None


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="logit rows N (tokens); default depends on device")
    p.add_argument("--vocab", type=int, help="classes V; default depends on device")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="logits dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum", "none"))
    p.add_argument("--repeats", type=int, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--providers", help="comma-separated subset of: "
                   + ", ".join(p.name for p in PROVIDERS))
    p.add_argument("--compile", action="store_true", help="include torch.compile on CPU")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory measurement (CPU: no subprocesses)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: one provider's RSS
    args = p.parse_args(argv)

    device = torch.device(args.device)
    key = "cuda" if device.type == "cuda" else ("cpu-interpreter" if interpreting() else "cpu")
    for name, value in DEFAULTS[key].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.providers:
        names = [n.strip() for n in args.providers.split(",")]
        unknown = set(names) - {p.name for p in PROVIDERS}
        if unknown:
            p.error(f"unknown provider(s): {', '.join(sorted(unknown))}")
        args.selected = [pr for pr in PROVIDERS if pr.name in names]
    else:
        args.selected = [pr for pr in PROVIDERS
                         if device.type == "cuda" or pr.cpu_default
                         or (pr.kind == "compile" and args.compile)]
    return args


def child_argv(args):
    """The options that make a subprocess rebuild exactly these inputs."""
    return ["--rows", str(args.rows), "--vocab", str(args.vocab), "--dtype", args.dtype,
            "--device", "cpu", "--reduction", args.reduction]


def header(args, device, logits):
    mib = logits.numel() * logits.element_size() / 2**20
    g = "random per-row vector" if args.reduction == "none" else "random scalar"
    timing = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    memory = ("torch.cuda.max_memory_allocated delta beyond the inputs" if device.type == "cuda"
              else "peak RSS (VmHWM) delta beyond the inputs, fresh subprocess per provider, "
                    "glibc mmap threshold 1 MiB")
    return "\n".join([
        f"softmax_ce main job: cross-entropy forward+backward, reduction={args.reduction}, "
        f"grad_output={g}",
        f"device: {device} ({device_name(device)}) | dtype: {args.dtype} | logits: "
        f"{args.rows} x {args.vocab} ({mib:.1f} MiB) | torch {torch.__version__} | "
        f"triton {C.triton_version()}",
        f"softmax_ce path: {softmax_ce_path(logits)} | "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}",
        f"time: median of {args.repeats} after {args.warmup} warm-up ({timing}) | "
        f"memory: {'skipped' if args.no_memory else memory}",
    ])


def format_table(rows):
    cols = [("provider", "{}"), ("loss_err", "{:.3e}"), ("grad_err", "{:.3e}"),
            ("ms", "{:.3f}"), ("peak_mb", "{:.1f}"), ("ok", "{}")]
    titles = {"provider": "provider", "loss_err": "loss err", "grad_err": "grad err",
              "ms": "median ms", "peak_mb": "peak MiB", "ok": "ok"}
    cells = [[titles[c] for c, _ in cols]]
    for r in rows:
        line = []
        for c, fmt in cols:
            v = r.get(c)
            if c == "ok":
                line.append("ok" if v else "FAIL")
            else:
                line.append("n/a" if v is None else fmt.format(v))
        cells.append(line)
    return C.layout_table(cells)


def exit_code(rows) -> int:
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.rss_child:
        provider = next(p for p in PROVIDERS if p.name == args.rss_child)
        peak_mb = rss_child(args, provider)
        print(RSS_MARK + json.dumps({"peak_mb": peak_mb}), flush=True)
        return [dict(provider=provider.name, peak_mb=peak_mb, ok=True)]

    logits, target, grad_out = make_inputs(args.rows, args.vocab, DTYPES[args.dtype],
                                           args.reduction, device)
    print(header(args, device, logits), flush=True)
    ref_loss, ref_grad = reference(logits, target, args.reduction, grad_out)
    tol = TOLERANCES[args.dtype]

    rows = []
    for provider in args.selected:
        row = dict(provider=provider.name, loss_err=None, grad_err=None, ms=None,
                   peak_mb=None, ok=False, error=None)
        try:
            fn = loss_fn(provider, args.reduction)
            loss, grad = step(fn, prepare(provider, logits), target, grad_out)
            row["loss_err"], row["grad_err"], row["ok"] = errors(loss, grad, ref_loss,
                                                                 ref_grad, tol)
            del loss, grad
            row["ms"] = time_ms(fn, provider, logits, target, grad_out, args.repeats,
                                args.warmup, device)
            if not args.no_memory:
                row["peak_mb"] = (cuda_peak_mb(fn, provider, logits, target, grad_out, device)
                                  if device.type == "cuda" else
                                  cpu_peak_mb(child_argv(args), provider))
        except Exception as exc:  # one broken provider must not hide the others' rows
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
        rows.append(row)

    print(format_table(rows))
    for r in rows:
        if r["error"]:
            print(f"{r['provider']}: {r['error']}")
    print(f"tolerance ({args.dtype}): loss err <= {tol['loss']:g} * max(1, |ref|), "
          f"grad err <= {tol['grad']:g} * max |ref grad|")
    return rows


if __name__ == "__main__":
    sys.exit(exit_code(main()))
