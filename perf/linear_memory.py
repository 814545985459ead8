"""Peak memory of the linear cross-entropy on CPU: forward + backward of
`softmax_ce.linear_cross_entropy(x, W, t)` must stay under --limit-gib (0.35 GiB) beyond its
inputs and their gradients, where the unfused `F.cross_entropy(F.linear(x, W), t)` needs the
N x V logits several times over (1 GiB each at the default N=2048, V=131072 fp32).

Providers, each in a fresh subprocess (perf/_common.py's memory harness; TRITON_INTERPRET is
set before triton is imported):

    softmax_ce interpreter   TRITON_INTERPRET=1: impl="fused", the Triton LCE kernels interpreted
    softmax_ce cpu           TRITON_INTERPRET=0: impl="chunked" (the default), the PyTorch path
    torch unfused            F.linear + F.cross_entropy (no limit)
    torch chunked            torch's F.linear_cross_entropy(options=LinearCrossEntropyOptions())

In the subprocess: x (N, D), W (V, D) fp32 requiring grad, targets (every 16th ignored), the
gradients allocated up front (zeros, so the backward accumulates into touched memory); one
tiny step of the same provider first; then the peak RSS (VmHWM after clear_refs) of one
full-shape step minus the RSS before it, glibc's mmap threshold at 1 MiB.

Run:
    python perf/linear_memory.py                          # N=2048, D=256, V=131072 (minutes)
    python perf/linear_memory.py --rows 64 --vocab 4096 --hidden 32   # a quick smoke run
    python perf/linear_memory.py --providers "softmax_ce cpu,torch unfused"

Exits non-zero when a softmax_ce provider exceeds the limit or fails.  From Python,
`main([...])` returns the rows (dicts).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

# name -> (TRITON_INTERPRET, held to the limit)
PROVIDERS = {"softmax_ce interpreter": ("1", True), "softmax_ce cpu": ("0", True),
             "torch unfused": ("0", False), "torch chunked": ("0", False)}


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
    impl = "fused" if provider == "softmax_ce interpreter" else "chunked"
    return lambda x, w, t: softmax_ce.linear_cross_entropy(x, w, t, impl=impl)


def child(a):
    import torch
    fn = loss_fn(a.provider)
    x, w, t = make_inputs(a.rows, a.vocab, a.hidden)
    path = C.path_name(x)
    if a.provider.startswith("softmax_ce"):
        want = "Triton interpreter" if PROVIDERS[a.provider][0] == "1" else "PyTorch path"
        assert path == want, f"{a.provider} would take the {path}"
    for p in (x, w):
        p.grad = torch.zeros_like(p)

    def step(x, w, t):
        loss = fn(x, w, t)
        loss.backward()
        return loss.item()
    r = C.measure_peak(lambda: step(x, w, t), warmup=lambda: step(*make_inputs(32, 256, 16, seed=1)))
    C.child_result(dict(provider=a.provider, path=path, peak_mib=r["peak_mib"], wall_s=r["seconds"],
                        loss=r["value"]))


def run_provider(a, provider):
    res, err = C.run_child(__file__, ["--provider", provider, "--rows", str(a.rows), "--vocab",
                                      str(a.vocab), "--hidden", str(a.hidden)],
                           {"TRITON_INTERPRET": PROVIDERS[provider][0]}, timeout=a.timeout)
    return res or dict(provider=provider, error=err)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048, help="N, tokens (default 2048)")
    ap.add_argument("--vocab", type=int, default=131072, help="V (default 131072)")
    ap.add_argument("--hidden", type=int, default=256, help="D (default 256)")
    ap.add_argument("--limit-gib", type=float, default=0.35,
                    help="peak beyond inputs and gradients allowed to softmax_ce (GiB)")
    ap.add_argument("--providers", type=C.name_list, default=tuple(PROVIDERS),
                    help="comma-separated subset of: " + ", ".join(PROVIDERS))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per provider")
    ap.add_argument("--provider", choices=list(PROVIDERS), help=argparse.SUPPRESS)  # internal
    a = ap.parse_args(argv)
    for p in a.providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; expected one of {list(PROVIDERS)}")
    return a


def judge(row, limit_mib):
    held = PROVIDERS[row["provider"]][1]
    row["limit_mib"] = limit_mib if held else None
    if row.get("error"):
        row["result"], row["ok"] = "error", not held
    elif not held:
        row["result"], row["ok"] = "(reference)", True
    elif row.get("peak_mib") is None:
        row["result"], row["ok"] = "n/a", False
    else:
        row["ok"] = row["peak_mib"] <= limit_mib
        row["result"] = "pass" if row["ok"] else "FAIL"
    return row


def exit_code(rows):
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv=None):
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.provider:
        return child(a)
    n, d, v = a.rows, a.hidden, a.vocab
    mib = lambda k: k * 4 / 2**20  # noqa: E731  fp32
    print("softmax_ce linear_cross_entropy: peak CPU memory of forward + backward, reduction=mean\n"
          f"device: cpu ({C.cpu_description()}) | torch {C.package_version('torch')} | triton "
          f"{C.package_version('triton')}\nshape: N={n} D={d} V={v} fp32 | x {mib(n * d):.2f} MiB, W "
          f"{mib(v * d):.1f} MiB (each again for its gradient) | fp32 N x V logits would be "
          f"{mib(n * v) / 1024:.3f} GiB\nmemory: peak RSS (VmHWM after clear_refs) minus RSS after "
          "the inputs, zeroed gradients and a tiny warm-up step; fresh subprocess per provider, "
          f"MALLOC_MMAP_THRESHOLD_={C.MMAP_THRESHOLD}\nlimit for softmax_ce paths: {a.limit_gib} GiB "
          f"= {a.limit_gib * 1024:.0f} MiB", flush=True)
    rows = [judge(run_provider(a, p), a.limit_gib * 1024) for p in C.tqdm_iter(a.providers, "linear memory")]
    for r in rows:
        if r.get("error"):
            print(f"[{r['provider']}] {r['error']}", file=sys.stderr)
    print(C.table(rows, [("provider", "provider", None), ("path", "path", None),
                         ("peak_mib", "peak extra MiB", "{:.1f}"), ("limit_mib", "limit MiB", "{:.0f}"),
                         ("result", "result", None), ("wall_s", "wall s", "{:.1f}"),
                         ("loss", "loss", "{:.6f}")], na="-"), flush=True)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    if len(losses) > 1:
        print(f"loss spread across providers: {max(losses) - min(losses):.3g} (same inputs in every "
              "subprocess)")
    return rows


if __name__ == "__main__":
    sys.exit(exit_code(main()))
