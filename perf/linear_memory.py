"""Peak memory of the fused linear cross-entropy on CPU: forward + backward of
`softmax_ce.linear_cross_entropy(x, W, t)` must stay under 0.35 GiB beyond its inputs and
their gradients, where the unfused `F.cross_entropy(F.linear(x, W), t)` needs the N x V
logits several times over (at the default N=2048, V=131072 fp32, 1 GiB each).

Providers, each measured in a fresh subprocess (TRITON_INTERPRET must be in the
environment before triton is imported, and one provider's high-water mark must not
hide another's):

    softmax_ce interpreter   TRITON_INTERPRET=1: impl="fused", the Triton LCE kernels through
                             Triton's interpreter (the chunked impl's cross-entropy kernel,
                             interpreted over V = 131072, would take tens of minutes here)
    softmax_ce cpu           TRITON_INTERPRET=0: impl="chunked" (the default), the PyTorch path
    torch unfused            F.linear + F.cross_entropy, for comparison (no limit)
    torch chunked            torch's F.linear_cross_entropy(options=LinearCrossEntropyOptions())

Method, in the subprocess: allocate x (N, D) and W (V, D) (fp32, requires_grad), the
targets, and the gradients up front (`p.grad = zeros_like(p)`, so the backward
accumulates into touched memory in place); run one tiny forward + backward of the same
provider so lazy imports and one-time setup are not counted; then reset the resident
high-water mark (`/proc/self/clear_refs` 5), read the current RSS as the baseline, run
forward + backward once at the full shape and report peak RSS (VmHWM) minus baseline.
VmHWM is the address space's own high-water mark (what clear_refs resets); ru_maxrss
also folds in the parent's peak at exec, so it is only the fallback where /proc has no
VmHWM.  glibc's mmap threshold is fixed at 1 MiB in the subprocess so that freed
temporaries go back to the OS at once instead of being cached in the heap.

Run:
    python perf/linear_memory.py                          # N=2048, D=256, V=131072 (minutes)
    python perf/linear_memory.py --rows 64 --vocab 4096 --hidden 32   # a quick smoke run
    python perf/linear_memory.py --providers "softmax_ce cpu,torch unfused"

Exits non-zero when a softmax_ce provider exceeds --limit-gib (default 0.35) or fails.
From Python, `main([...])` returns the measured rows (a list of dicts).
"""

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# perf/_common.py by file path (perf/ is not a package and not on sys.path), once per process;
# registered before it runs, since dataclasses look their module up in sys.modules
_spec = importlib.util.spec_from_file_location("softmax_ce_perf_common", Path(__file__).resolve().with_name("_common.py"))
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
C = sys.modules[_spec.name]

LIMIT_GIB = 0.35
MMAP_THRESHOLD = C.MMAP_THRESHOLD
RESULT_MARK = "LINEAR_MEMORY_RESULT "

# name -> (TRITON_INTERPRET value, is a softmax_ce path held to the limit)
PROVIDERS = {
    "softmax_ce interpreter": ("1", True),
    "softmax_ce cpu": ("0", True),
    "torch unfused": ("0", False),
    # torch 2.13+: its own chunked linear cross-entropy, with its default options
    "torch chunked": ("0", False),
}


# ----------------------------------------------------------------------------
# The measured step (subprocess side)
# ----------------------------------------------------------------------------

def make_inputs(rows, vocab, hidden, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::16] = -100
    return x, w, t


def loss_fn(provider):
    import torch.nn.functional as F
    if provider == "torch unfused":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if provider == "torch chunked":
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=LinearCrossEntropyOptions())
    import softmax_ce
    if provider == "softmax_ce interpreter":
        return lambda x, w, t: softmax_ce.linear_cross_entropy(x, w, t, impl="fused")
    return softmax_ce.linear_cross_entropy


def step(fn, x, w, t):
    loss = fn(x, w, t)
    loss.backward()
    return loss.item()


def child(args):
    """Runs in the subprocess: -> the result dict printed for the parent."""
    import torch
    import softmax_ce  # imports triton: TRITON_INTERPRET is already in the environment
    from softmax_ce._launch import uses_triton

    fn = loss_fn(args.child)
    x, w, t = make_inputs(args.rows, args.vocab, args.hidden)
    path = "triton" if uses_triton(x) else "pytorch"
    if args.child.startswith("softmax_ce"):
        expect = "triton" if PROVIDERS[args.child][0] == "1" else "pytorch"
        assert path == expect, f"{args.child} would take the {path} path"
    for p in (x, w):
        p.grad = torch.zeros_like(p)  # touched; backward accumulates into it in place

    # warm-up at a tiny shape: imports, kernel decoration, thread pools
    xs, ws, ts = make_inputs(32, 256, 16, seed=1)
    step(fn, xs, ws, ts)
    del xs, ws, ts
    gc.collect()

    can_reset = C.reset_peak_rss()
    base = C.rss_kib()
    peak_before, source = C.peak_rss()  # (KiB, "VmHWM" or "ru_maxrss")
    t0 = time.perf_counter()
    loss = step(fn, x, w, t)
    wall = time.perf_counter() - t0
    peak, source = C.peak_rss()
    if not can_reset and peak <= peak_before:
        peak_mib = None  # an earlier high-water mark hides this step's
    else:
        peak_mib = max(0, peak - base) / 1024
    return dict(provider=args.child, path=path, peak_mib=peak_mib, base_mib=base / 1024,
                wall_s=wall, loss=loss, peak_source=source + (" (reset)" if can_reset else ""),
                grad_norm_w=float(w.grad.norm()), grad_norm_x=float(x.grad.norm()))


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="N, tokens (default 2048)")
    ap.add_argument("--vocab", type=int, default=131072, help="V (default 131072)")
    ap.add_argument("--hidden", type=int, default=256, help="D (default 256)")
    ap.add_argument("--limit-gib", type=float, default=LIMIT_GIB,
                    help="peak beyond inputs and gradients allowed to softmax_ce (GiB)")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma-separated subset of: " + ", ".join(PROVIDERS))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per provider")
    ap.add_argument("--provider", dest="child", default=None, choices=list(PROVIDERS),
                    help=argparse.SUPPRESS)  # internal: run one provider in this process
    args = ap.parse_args(argv)
    args.selected = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in args.selected:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; expected one of {list(PROVIDERS)}")
    return args


def run_provider(args, provider):
    env = dict(os.environ, TRITON_INTERPRET=PROVIDERS[provider][0],
               MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, os.path.abspath(__file__), "--provider", provider,
           "--rows", str(args.rows), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(provider=provider, error=f"timed out after {args.timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return dict(provider=provider,
                error=f"subprocess rc {proc.returncode}: {proc.stderr.strip()[-1500:]}")


def header(args):
    v = {pkg: C.package_version(pkg) for pkg in ("torch", "triton")}  # no import in the parent
    gib = lambda n: n * 4 / 2**30  # noqa: E731  fp32 bytes
    n, d, vocab = args.rows, args.hidden, args.vocab
    return "\n".join([
        "softmax_ce linear_cross_entropy: peak CPU memory of forward + backward, reduction=mean",
        f"device: cpu ({C.cpu_description()}) | torch {v['torch']} | triton {v['triton']}",
        f"shape: N={n} D={d} V={vocab} fp32 | x {gib(n * d) * 1024:.2f} MiB, "
        f"W {gib(vocab * d) * 1024:.1f} MiB (each again for its gradient) | "
        f"fp32 N x V logits would be {gib(n * vocab):.3f} GiB",
        "memory: peak RSS (VmHWM after clear_refs) minus RSS after allocating inputs and "
        "zeroed gradients and a tiny warm-up step; fresh subprocess per provider, "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
        f"limit for softmax_ce paths: {args.limit_gib} GiB = {args.limit_gib * 1024:.0f} MiB",
    ])


def format_table(rows):
    titles = ["provider", "path", "peak extra MiB", "limit MiB", "result", "wall s", "loss"]
    cells = [titles]
    for r in rows:
        peak = r.get("peak_mib")
        cells.append([
            r["provider"], r.get("path", "-"),
            "n/a" if peak is None else f"{peak:.1f}",
            "-" if r.get("limit_mib") is None else f"{r['limit_mib']:.0f}",
            r["result"],
            "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f}",
            "-" if r.get("loss") is None else f"{r['loss']:.6f}",
        ])
    return C.layout_table(cells, left=(0, 1))


def judge(row, limit_mib):
    held = PROVIDERS[row["provider"]][1]
    row["limit_mib"] = limit_mib if held else None
    if row.get("error"):
        row["result"] = "error"
        row["ok"] = not held
    elif not held:
        row["result"] = "(reference)"
        row["ok"] = True
    elif row.get("peak_mib") is None:
        row["result"] = "n/a"
        row["ok"] = False
    else:
        row["ok"] = row["peak_mib"] <= limit_mib
        row["result"] = "pass" if row["ok"] else "FAIL"
    return row


def exit_code(rows) -> int:
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.child:
        result = child(args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return [result]

    print(header(args), flush=True)
    limit_mib = args.limit_gib * 1024
    rows = []
    for provider in args.selected:
        print(f"... {provider}", file=sys.stderr, flush=True)
        row = judge(run_provider(args, provider), limit_mib)
        if row.get("error"):
            print(f"[{provider}] {row['error']}", file=sys.stderr)
        rows.append(row)
    print(format_table(rows), flush=True)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    if len(losses) > 1:
        spread = max(losses) - min(losses)
        print(f"loss spread across providers: {spread:.3g} (same inputs in every subprocess)")
    return rows


if __name__ == "__main__":
    sys.exit(exit_code(main()))
