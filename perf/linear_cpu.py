"""Linear cross-entropy on CPU against torch's own chunked F.linear_cross_entropy.

A training step (forward + backward, reduction="mean") of
    softmax_ce.linear_cross_entropy(x, W, t)                       impl="chunked" (default)
    torch: F.linear_cross_entropy(x, W, t, options=LinearCrossEntropyOptions())
at N=4096, D=256, V=32000 fp32 by default.  Time: both in one process, interleaved
(ours, torch, ours, torch, ...) so a change in the machine's load hits both alike, after
one warm-up call each; every run's ratio torch/ours is printed, and the goal is that
each one is at least --goal (1.2).  Memory: peak resident memory beyond the inputs and
their gradients, each provider in a fresh subprocess (perf/linear_memory.py's method);
the goal is ours at or under torch's.

FLOPs per step, both providers: 6 N V D (three GEMMs: logits, dx, dW) = 201 GFLOP at
the default shape; softmax_ce computes the gradients during the forward (the loss is a
scalar), so its backward only scales them.

Run:
    python perf/linear_cpu.py                       # 2 threads, 5 interleaved runs
    python perf/linear_cpu.py --threads 1 --runs 3
    python perf/linear_cpu.py --rows 256 --vocab 2048 --hidden 64 --runs 2   # smoke
Exits non-zero when a goal is missed.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)
LM = C.load_module("softmax_ce_perf_linear_memory", C.PERF_DIR / "linear_memory.py")

PROVIDERS = ("softmax_ce", "torch chunked")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="interleaved timed runs of each")
    ap.add_argument("--goal", type=float, default=1.2, help="least torch/ours time ratio per run")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    return ap.parse_args(argv)


def _steps(args):
    x, w, t = LM.make_inputs(args.rows, args.vocab, args.hidden)

    def run(fn):
        def step():
            xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
            fn(xs, ws, t).backward()
            return ws.grad
        return step
    return {"softmax_ce": run(LM.loss_fn("softmax_ce cpu")),
            "torch chunked": run(LM.loss_fn("torch chunked"))}


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import torch

    torch.set_num_threads(args.threads)
    n, d, v = args.rows, args.hidden, args.vocab
    print(f"softmax_ce linear CE vs torch's chunked F.linear_cross_entropy | cpu "
          f"({C.cpu_description()}) | {args.threads} threads | torch {torch.__version__} | "
          f"N={n} D={d} V={v} fp32 | 6NVD = {6 * n * v * d / 1e9:.0f} GFLOP per step",
          flush=True)
    steps = _steps(args)
    grads = {name: fn() for name, fn in steps.items()}  # the same answer (warms up too)
    diff = (grads["softmax_ce"] - grads["torch chunked"]).abs().max().item()
    scale = grads["torch chunked"].abs().max().item()
    print(f"dW agreement: max |ours - torch| = {diff:.2e} (max |dW| {scale:.2e})", flush=True)
    _, times = C.interleaved_medians(steps, args.runs)
    for i, (ours, theirs) in enumerate(zip(times["softmax_ce"], times["torch chunked"])):
        print(f"run {i + 1}: ours {ours * 1e3:.0f} ms, torch {theirs * 1e3:.0f} ms, torch/ours "
              f"{theirs / ours:.2f}", flush=True)
    ratios = [a / b for a, b in zip(times["torch chunked"], times["softmax_ce"])]
    ok_time = min(ratios) >= args.goal
    print(f"median ours {statistics.median(times['softmax_ce']) * 1e3:.0f} ms, torch "
          f"{statistics.median(times['torch chunked']) * 1e3:.0f} ms; torch/ours per run "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (min {min(ratios):.2f}, goal >= {args.goal}: "
          f"{'met' if ok_time else 'MISSED'})", flush=True)
    ok_mem = True
    if not args.no_memory:
        lm_args = LM.parse_args(["--rows", str(n), "--vocab", str(v), "--hidden", str(d)])
        mem = {p: LM.run_provider(lm_args, p)
               for p in C.tqdm_iter(("softmax_ce cpu", "torch chunked"), "memory")}
        for p, row in mem.items():
            print(f"peak extra memory, {p}: "
                  + (f"{C.sig(row['peak_mib'])} MiB" if row.get("peak_mib") is not None
                     else row.get("error", "n/a")), flush=True)
        ours, theirs = mem["softmax_ce cpu"].get("peak_mib"), mem["torch chunked"].get("peak_mib")
        ok_mem = ours is not None and theirs is not None and ours <= theirs
        print(f"memory goal (ours <= torch's): {'met' if ok_mem else 'MISSED'}", flush=True)
    return 0 if ok_time and ok_mem else 1


if __name__ == "__main__":
    sys.exit(main())
