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
# name -> (kind, softmax_ce options, overwrites its logits, runs on CPU unasked)
PROVIDERS = {
    "torch": ("torch", {}, False, True),
    "torch.compile": ("compile", {}, False, False),  # inductor compiles for minutes on CPU
    "softmax_ce": ("softmax_ce", {}, False, True),
    "softmax_ce fused": ("softmax_ce", {"grad_mode": "fused"}, False, True),
    "softmax_ce inplace": ("softmax_ce", {"inplace_backward": True}, True, True),
    "softmax_ce fused inplace": ("softmax_ce", {"grad_mode": "fused", "inplace_backward": True},
                                 True, True),
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


def reference(logits, target, reduction, grad_out):
    n, v = logits.shape
    g = grad_out.double().expand(n) / (n if reduction == "mean" else 1)
    loss = torch.empty(n, dtype=torch.float64, device=logits.device)
    grad = torch.empty(n, v, dtype=torch.float32, device=logits.device)
    step = max(1, REF_CHUNK_ELEMENTS // v)
    for r in (slice(r0, r0 + step) for r0 in range(0, n, step)):
        x = logits[r].double().requires_grad_()
        lr = F.cross_entropy(x, target[r], reduction="none")
        (grad[r],) = torch.autograd.grad(lr, x, g[r])
        loss[r] = lr.detach()
    return (loss if reduction == "none" else loss.sum() / (n if reduction == "mean" else 1)), grad


def loss_fn(name, reduction):
    kind, opts, _, _ = PROVIDERS[name]
    if kind == "softmax_ce":
        return lambda x, t: softmax_ce.cross_entropy(x, t, reduction=reduction, **opts)
    eager = lambda x, t: F.cross_entropy(x, t, reduction=reduction)  # noqa: E731
    return torch.compile(eager, dynamic=False) if kind == "compile" else eager


def prepare(name, logits):
    """A leaf, or for the in-place modes a fresh copy handed over as an LM head's output."""
    return C.handover(logits.clone()) if PROVIDERS[name][2] else logits.detach().requires_grad_()


def step(fn, x, target, grad_out):
    loss = fn(x, target)  # autograd.grad: the gradient the loss hands on, no AccumulateGrad copy
    return loss, torch.autograd.grad(loss, x, grad_out)[0]


def errors(loss, grad, ref_loss, ref_grad, tol):
    loss_err = (loss.detach().double() - ref_loss).abs()
    loss_ok = bool((loss_err <= tol["loss"] * ref_loss.abs().clamp_min(1.0)).all())
    rows = max(1, REF_CHUNK_ELEMENTS // grad.shape[1])
    grad_err = torch.stack([(grad[r:r + rows].float() - ref_grad[r:r + rows]).abs().max()
                            for r in range(0, grad.shape[0], rows)]).max().item()  # nan stays
    return loss_err.max().item(), grad_err, loss_ok and grad_err <= tol["grad"] * ref_grad.abs().max().item()


def time_ms(fn, name, logits, target, grad_out, a, device):
    setup_x = {}

    def setup():
        setup_x["x"] = prepare(name, logits)  # the copy an in-place provider needs: untimed
    if device.type == "cuda":
        def run():
            step(fn, setup_x.pop("x"), target, grad_out)
        for _ in range(a.warmup):
            setup()
            run()
        return C.cuda_median_ms(run, setup, warmup=0, min_reps=a.repeats, max_reps=a.repeats)
    return C.cpu_median_ms(lambda: step(fn, setup_x.pop("x"), target, grad_out), setup=setup,
                           warmup=a.warmup, reps=a.repeats)


def cuda_peak_mb(fn, name, logits, target, grad_out, device):
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
    fn = loss_fn(a.rss_child, a.reduction)
    x = {}
    r = C.measure_peak(lambda: (step(fn, x.pop("x"), target, grad_out), None)[1],
                       warmup=lambda: (step(fn, prepare(a.rss_child, logits), target, grad_out),
                                       x.setdefault("x", prepare(a.rss_child, logits))))
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
    p.add_argument("--providers", help="comma-separated subset of: " + ", ".join(PROVIDERS))
    p.add_argument("--compile", action="store_true", help="include torch.compile on CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)  # internal: one provider's RSS
    a = p.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    for k, v in DEFAULTS["cuda" if cuda else "cpu-interpreter" if C.interpreting() else "cpu"].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    names = C.name_list(a.providers) if a.providers else [
        n for n, (kind, _, _, cpu) in PROVIDERS.items() if cuda or cpu or (kind == "compile" and a.compile)]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown provider(s): {', '.join(sorted(unknown))}")
    a.selected = [n for n in PROVIDERS if n in names]
    return a


def header(a, device, logits):
    cuda = device.type == "cuda"
    dev = (torch.cuda.get_device_name(device) if cuda else
           f"{C.cpu_model()}, {torch.get_num_threads()} threads"
           + (f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""))
    memory = ("skipped" if a.no_memory else "torch.cuda.max_memory_allocated delta beyond the "
              "inputs" if cuda else "peak RSS (VmHWM) delta beyond the inputs, fresh subprocess "
              "per provider, glibc mmap threshold 1 MiB")
    return "\n".join([
        f"softmax_ce main job: cross-entropy forward+backward, reduction={a.reduction}, "
        f"grad_output={'random per-row vector' if a.reduction == 'none' else 'random scalar'}",
        f"device: {device} ({dev}) | dtype: {a.dtype} | logits: {a.rows} x {a.vocab} "
        f"({logits.numel() * logits.element_size() / 2**20:.1f} MiB) | torch {torch.__version__} "
        f"| triton {C.triton_version()}",
        f"softmax_ce path: {C.path_name(logits)} | "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}",
        f"time: median of {a.repeats} after {a.warmup} warm-up "
        f"({'CUDA events' if cuda else 'time.perf_counter'}) | memory: {memory}"])


def exit_code(rows):
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.rss_child:
        return rss_child(a)
    device = torch.device(a.device)
    logits, target, grad_out = make_inputs(a, device)
    print(header(a, device, logits), flush=True)
    t0 = time.perf_counter()
    ref_loss, ref_grad = reference(logits, target, a.reduction, grad_out)
    tol, rows = TOLERANCES[a.dtype], []
    child_argv = [__file__, "--rows", str(a.rows), "--vocab", str(a.vocab), "--dtype", a.dtype,
                  "--device", "cpu", "--reduction", a.reduction, "--rss-child"]
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
                if device.type == "cuda":
                    row["peak_mb"] = cuda_peak_mb(fn, name, logits, target, grad_out, device)
                else:
                    res, why = C.run_child(child_argv[0], child_argv[1:] + [name])
                    row["peak_mb"] = res and res["peak_mb"]
                    if why:
                        print(f"[{name}] memory subprocess failed: {why}", file=sys.stderr)
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
