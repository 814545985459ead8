"""The main job: softmax_ce against torch on one training step, for accuracy, time and memory.

Per provider: forward + backward of a cross-entropy loss on the same logits and targets, with
a random positive grad_output (a scalar for "mean"/"sum", one per row for "none"), and one row:

    provider | max abs loss error | max abs grad error | median ms | peak MiB | ok

* providers: torch eager, torch.compile (CUDA; on CPU with --compile), softmax_ce with
  grad_mode "recompute" and "fused", each also with inplace_backward=True (their logits are
  rebuilt, untimed, before every step, since the step overwrites them);
* the backward is torch.autograd.grad(loss, logits, grad_output): the gradient the loss hands
  to whatever produced the logits;
* errors: against a float64 torch reference computed chunk by chunk from the same logits;
* time: forward + backward, median over --repeats after --warmup (CUDA events; CPU
  time.perf_counter);
* peak memory beyond the inputs: CUDA torch.cuda.max_memory_allocated delta; CPU the peak
  RSS (VmHWM) delta in a fresh subprocess per provider, glibc's mmap threshold at 1 MiB
  (perf/_common.py's memory harness).

Exits non-zero when a provider's loss or gradient error is beyond the dtype's tolerance, so the
job doubles as a smoke check.

Run:
    python perf/main.py                                   # default shape for the device
    python perf/main.py --rows 4096 --vocab 128256 --dtype bf16 --reduction sum
    python perf/main.py --device cpu --compile            # add torch.compile on CPU (slow)
    TRITON_INTERPRET=1 python perf/main.py --device cpu   # the Triton kernels, interpreted

From Python, ``main([...])`` returns the rows (dicts), ``exit_code(rows)`` the exit status.
"""

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import softmax_ce

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

DEFAULTS = {  # CPU: seconds on 2 cores; the interpreter runs every op through NumPy
    "cuda": dict(rows=8192, vocab=128256, dtype="bf16", repeats=20, warmup=3),
    "cpu": dict(rows=256, vocab=32000, dtype="fp32", repeats=10, warmup=2),
    "cpu-interpreter": dict(rows=32, vocab=4096, dtype="fp32", repeats=3, warmup=1),
}
# name -> (softmax_ce options, None for torch eager and "compile" for torch.compile)
PROVIDERS = {
    "torch": None,
    "torch.compile": "compile",  # inductor compiles for minutes on CPU: CUDA or --compile only
    "softmax_ce": {},
    "softmax_ce fused": {"grad_mode": "fused"},
    "softmax_ce inplace": {"inplace_backward": True},
    "softmax_ce fused inplace": {"grad_mode": "fused", "inplace_backward": True},
}
# loss error against max(1, |ref|), gradient error against the largest reference gradient
TOLERANCES = {"fp32": dict(loss=2e-5, grad=1e-4), "bf16": dict(loss=2e-2, grad=5e-2),
              "fp16": dict(loss=4e-3, grad=1e-2)}
REF_CHUNK_ELEMENTS = 1 << 24  # the fp64 reference never holds all the logits in fp64


def make_inputs(a, device):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(a.rows, a.vocab, generator=gen, device=device, dtype=C.torch_dtype(a.dtype))
    target = torch.randint(0, a.vocab, (a.rows,), generator=gen, device=device)
    g_shape = (a.rows,) if a.reduction == "none" else ()
    grad_out = (torch.rand(g_shape, generator=gen, device=device) * 1.5 + 0.5).to(logits.dtype)
    return logits, target, grad_out


def chunks(n, v):
    step = max(1, REF_CHUNK_ELEMENTS // v)
    return [slice(r0, r0 + step) for r0 in range(0, n, step)]


def reference(logits, target, reduction, grad_out):
    n, v = logits.shape
    g = grad_out.double().expand(n) / (n if reduction == "mean" else 1)
    loss = torch.empty(n, dtype=torch.float64, device=logits.device)
    grad = torch.empty(n, v, dtype=torch.float32, device=logits.device)
    for r in chunks(n, v):
        x = logits[r].double().requires_grad_()
        lr = F.cross_entropy(x, target[r], reduction="none")
        (grad[r],) = torch.autograd.grad(lr, x, g[r])
        loss[r] = lr.detach()
    return (loss if reduction == "none" else loss.sum() / (n if reduction == "mean" else 1)), grad


def loss_fn(name, reduction):
    opts = PROVIDERS[name]
    if isinstance(opts, dict):
        return lambda x, t: softmax_ce.cross_entropy(x, t, reduction=reduction, **opts)
    eager = lambda x, t: F.cross_entropy(x, t, reduction=reduction)  # noqa: E731
    return torch.compile(eager, dynamic=False) if opts == "compile" else eager


def prepare(name, logits):
    """A leaf, or for the in-place modes a fresh copy handed over as an LM head's output."""
    inplace = isinstance(PROVIDERS[name], dict) and PROVIDERS[name].get("inplace_backward")
    return C.handover(logits.clone()) if inplace else logits.detach().requires_grad_()


def step(fn, x, target, grad_out):
    loss = fn(x, target)  # autograd.grad: the gradient the loss hands on, no AccumulateGrad copy
    return loss, torch.autograd.grad(loss, x, grad_out)[0]


def errors(loss, grad, ref_loss, ref_grad, tol):
    loss_err = (loss.detach().double() - ref_loss).abs()
    loss_ok = bool((loss_err <= tol["loss"] * ref_loss.abs().clamp_min(1.0)).all())
    grad_err = torch.stack([(grad[r].float() - ref_grad[r]).abs().max()
                            for r in chunks(*grad.shape)]).max().item()  # nan stays nan
    return loss_err.max().item(), grad_err, loss_ok and grad_err <= tol["grad"] * ref_grad.abs().max().item()


def time_ms(fn, name, logits, target, grad_out, a, device):
    held = {}

    def setup():
        held["x"] = prepare(name, logits)  # the copy an in-place provider needs: untimed

    def run():
        step(fn, held.pop("x"), target, grad_out)
    if device.type != "cuda":
        return C.cpu_median_ms(run, setup=setup, warmup=a.warmup, reps=a.repeats)
    for _ in range(a.warmup):
        setup()
        run()
    return C.cuda_median_ms(run, setup, warmup=0, min_reps=a.repeats, max_reps=a.repeats)


def peak_mb(fn, name, logits, target, grad_out, a, device):
    if device.type != "cuda":
        res, why = C.run_child(__file__, ["--rows", str(a.rows), "--vocab", str(a.vocab), "--dtype",
                                          a.dtype, "--device", "cpu", "--reduction", a.reduction,
                                          "--rss-child", name])
        if why:
            print(f"[{name}] memory subprocess failed: {why}", file=sys.stderr)
        return res and res["peak_mb"]
    x = prepare(name, logits)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step(fn, x, target, grad_out)
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def rss_child(a):
    """In a fresh process: one steady-state step's peak RSS beyond its inputs."""
    logits, target, grad_out = make_inputs(a, torch.device("cpu"))
    fn, name, held = loss_fn(a.rss_child, a.reduction), a.rss_child, {}

    def warmup():
        step(fn, prepare(name, logits), target, grad_out)
        held["x"] = prepare(name, logits)
    r = C.measure_peak(lambda: step(fn, held.pop("x"), target, grad_out) and None, warmup=warmup)
    C.child_result(dict(peak_mb=r["peak_mib"]))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="logit rows N (tokens); default depends on device")
    p.add_argument("--vocab", type=int, help="classes V; default depends on device")
    p.add_argument("--dtype", choices=sorted(C.DTYPE_NAMES), help="logits dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum", "none"))
    p.add_argument("--repeats", type=int, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing")
    p.add_argument("--providers", type=C.name_list, help="comma-separated subset of: "
                                                         + ", ".join(PROVIDERS))
    p.add_argument("--compile", action="store_true", help="include torch.compile on CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: one provider's RSS
    a = p.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    for k, v in DEFAULTS["cuda" if cuda else "cpu-interpreter" if C.interpreting() else "cpu"].items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    names = a.providers or [n for n, o in PROVIDERS.items() if o != "compile" or cuda or a.compile]
    if set(names) - set(PROVIDERS):
        p.error(f"unknown provider(s): {', '.join(sorted(set(names) - set(PROVIDERS)))}")
    a.selected = [n for n in PROVIDERS if n in names]
    return a


def header(a, device, logits):
    cuda = device.type == "cuda"
    dev = (torch.cuda.get_device_name(device) if cuda else f"{C.cpu_model()}, "
           f"{torch.get_num_threads()} threads" + (f", load {os.getloadavg()[0]:.2f}"
                                                   if hasattr(os, "getloadavg") else ""))
    memory = ("skipped" if a.no_memory else "torch.cuda.max_memory_allocated delta beyond the "
              "inputs" if cuda else "peak RSS (VmHWM) delta beyond the inputs, fresh subprocess "
              "per provider, glibc mmap threshold 1 MiB")
    return (f"softmax_ce main job: cross-entropy forward+backward, reduction={a.reduction}, "
            f"grad_output={'random per-row vector' if a.reduction == 'none' else 'random scalar'}\n"
            f"device: {device} ({dev}) | dtype: {a.dtype} | logits: {a.rows} x {a.vocab} "
            f"({logits.numel() * logits.element_size() / 2**20:.1f} MiB) | torch {torch.__version__} "
            f"| triton {C.package_version('triton')}\nsoftmax_ce path: {C.path_name(logits)} | "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}\n"
            f"time: median of {a.repeats} after {a.warmup} warm-up "
            f"({'CUDA events' if cuda else 'time.perf_counter'}) | memory: {memory}")


def exit_code(rows):
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv=None):
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.rss_child:
        return rss_child(a)
    device = torch.device(a.device)
    logits, target, grad_out = make_inputs(a, device)
    print(header(a, device, logits), flush=True)
    t0 = time.perf_counter()
    ref_loss, ref_grad = reference(logits, target, a.reduction, grad_out)
    tol, rows = TOLERANCES[a.dtype], []
    bar = tqdm(a.selected, desc="main job", unit="provider", file=sys.stderr,
               postfix=f"fp64 reference {time.perf_counter() - t0:.1f} s")
    for name in bar:
        row = dict(provider=name, loss_err=None, grad_err=None, ms=None, peak_mb=None, ok=False,
                   error=None)
        try:
            bar.set_postfix_str(f"{name}: check")
            fn = loss_fn(name, a.reduction)
            loss, grad = step(fn, prepare(name, logits), target, grad_out)
            row["loss_err"], row["grad_err"], row["ok"] = errors(loss, grad, ref_loss, ref_grad, tol)
            del loss, grad
            bar.set_postfix_str(f"{name}: time")
            row["ms"] = time_ms(fn, name, logits, target, grad_out, a, device)
            if not a.no_memory:
                bar.set_postfix_str(f"{name}: memory")
                row["peak_mb"] = peak_mb(fn, name, logits, target, grad_out, a, device)
        except Exception as exc:  # one broken provider must not hide the others' rows
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
        rows.append(row)
    bar.close()
    print(C.table(rows, [("provider", "provider", None), ("loss_err", "loss err", "{:.3e}"),
                         ("grad_err", "grad err", "{:.3e}"), ("ms", "median ms", "{:.3f}"),
                         ("peak_mb", "peak MiB", "{:.1f}"),
                         ("ok", "ok", lambda v: "ok" if v else "FAIL")]).replace(" NaN", " n/a"))
    for r in rows:
        if r["error"]:
            print(f"{r['provider']}: {r['error']}")
    print(f"tolerance ({a.dtype}): loss err <= {tol['loss']:g} * max(1, |ref|), "
          f"grad err <= {tol['grad']:g} * max |ref grad|")
    return rows


if __name__ == "__main__":
    sys.exit(exit_code(main()))
