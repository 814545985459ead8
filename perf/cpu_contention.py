"""The CPU path against torch eager, on an idle machine and with one busy process beside it.

A training step (forward + backward, reduction="mean", fp32 leaf logits) of
softmax_ce.cross_entropy (its chunked PyTorch path) and of F.cross_entropy, and of
softmax_ce.linear_cross_entropy against torch's unfused F.linear + F.cross_entropy, in one
process, interleaved (ours, torch, ours, ...) so a change of load hits both alike.  Each
(shape, threads, load) cell reports the median of --runs timed calls of each after a
warm-up, and the ratio torch/ours (> 1: ours is faster).

"busy": the script starts one process that spins on a core (as a dataloader worker or
another job on a shared box would) before the cell and stops it after; "idle": none.

Run:
    python perf/cpu_contention.py                     # the default grid (minutes)
    python perf/cpu_contention.py --shapes 256x32000 --threads 2 --runs 3
    python perf/cpu_contention.py --shapes "" --threads 2 --loads busy --linear-chunk-mib 128
Exits non-zero when ours is slower than torch in any cell.
"""

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

SHAPES = ("4096x32000", "2048x131072", "256x32000")
LINEAR_SHAPE = (4096, 256, 32000)  # N, D, V of the linear cross-entropy rows


def busy_process():
    """A process that keeps one core busy until stopped."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _ce_steps(n, v):
    import torch
    import torch.nn.functional as F

    import softmax_ce
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)

    def step(fn):
        def run():
            x = z.detach().requires_grad_()
            fn(x, t).backward()
        return run

    return {"softmax_ce": step(softmax_ce.cross_entropy), "torch": step(F.cross_entropy)}


def _linear_steps(n, d, v, chunk_bytes=None):
    import torch
    import torch.nn.functional as F

    import softmax_ce
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, d, generator=g)
    w0 = torch.randn(v, d, generator=g) * d ** -0.5
    t = torch.randint(0, v, (n,), generator=g)

    def step(fn):
        def run():
            x, w = x0.detach().requires_grad_(), w0.detach().requires_grad_()
            fn(x, w, t).backward()
        return run

    return {"softmax_ce": step(lambda x, w, t: softmax_ce.linear_cross_entropy(
                x, w, t, chunk_bytes=chunk_bytes)),
            "torch": step(lambda x, w, t: F.cross_entropy(F.linear(x, w), t))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma list of NxV (cross_entropy); empty for the linear row only")
    ap.add_argument("--linear-chunk-mib", type=int, default=0,
                    help="the linear cross-entropy's chunk_bytes in MiB (0: the package default)")
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--loads", default="idle,busy", help="comma list of idle, busy")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-linear", action="store_true", help="skip the linear cross-entropy rows")
    args = ap.parse_args(argv)
    import torch

    import softmax_ce._launch as L
    from softmax_ce._torch_path import CHUNK_ELEMENTS

    probe = torch.empty(1)
    assert not L.uses_triton(probe), "run without TRITON_INTERPRET=1: this measures the PyTorch path"
    print(f"softmax_ce CPU path vs torch eager | torch {torch.__version__} | fwd+bwd, fp32, "
          f"mean | {args.runs} interleaved runs, medians | chunk {CHUNK_ELEMENTS} logits",
          flush=True)
    cells = [("cross_entropy", tuple(int(a) for a in s.split("x")))
             for s in args.shapes.split(",") if s]
    if not args.no_linear:
        cells.append(("linear_cross_entropy", LINEAR_SHAPE))
    rows, worst = [], float("inf")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for load in args.loads.split(","):
            spinner = busy_process() if load == "busy" else None
            try:
                for op, shape in cells:
                    steps = (_ce_steps(*shape) if op == "cross_entropy" else
                             _linear_steps(*shape, chunk_bytes=args.linear_chunk_mib << 20
                                           if args.linear_chunk_mib else None))
                    med = C.interleaved_medians(steps, args.runs)[0]
                    ratio = med["torch"] / med["softmax_ce"]
                    worst = min(worst, ratio)
                    label = "x".join(map(str, shape))
                    rows.append((op, label, threads, load, med["torch"], med["softmax_ce"], ratio))
                    print(f"{op:21s} {label:16s} threads={threads} {load:4s}  torch "
                          f"{med['torch'] * 1e3:7.0f} ms  ours {med['softmax_ce'] * 1e3:7.0f} ms  "
                          f"torch/ours {ratio:5.2f}", flush=True)
                    del steps
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    print(f"worst torch/ours: {worst:.2f} ({'ours never slower' if worst >= 1 else 'ours SLOWER somewhere'})")
    return 0 if worst >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
