"""The CPU memory bar: peak resident memory of a training step's loss, in logits' sizes.

The step is an LM head followed by the loss, so the logits are an intermediate that autograd
may free or overwrite, as in training:

    logits = hidden @ head.T        # hidden (N, D), head (V, D), both requiring grad
    loss = provider(logits, target)
    loss.backward()

Each provider runs in a fresh subprocess (perf/_common.py's memory harness) on softmax_ce's
PyTorch path (TRITON_INTERPRET=0 there).  Its cost: the peak RSS during the step minus the
RSS once the inputs exist, over the logits' size N*V*4 bytes.  The bar (N=4096, V=131072,
fp32, logits of 2 GiB): torch eager about 4x (reference), softmax_ce < 2.25x,
inplace_backward=True < 1.25x (the fused modes alike).  Enforced only when the logits hold
at least ENFORCE_MIN_CHUNKS of softmax_ce's fixed-size chunks; otherwise informative.
Providers run one after another (torch alone needs about 5 logits, 10 GiB, at full shape).

Run:
    python perf/cpu_memory.py                                # the full shape, 1-2 minutes
    python perf/cpu_memory.py --rows 64 --vocab 4096 --hidden 16   # tiny, for tests

Exit status 1 when a softmax_ce provider misses its limit or fails.  From Python,
``main([...])`` returns the rows (dicts) and ``exit_code(rows)`` the exit status.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

# name -> (softmax_ce.cross_entropy keywords, None for torch; max peak / logits bytes)
PROVIDERS = {
    "torch": (None, None),
    "softmax_ce": ({}, 2.25),
    "softmax_ce inplace": ({"inplace_backward": True}, 1.25),
    "softmax_ce fused": ({"grad_mode": "fused"}, 2.25),  # holds the gradient from the forward on
    "softmax_ce fused inplace": ({"grad_mode": "fused", "inplace_backward": True}, 1.25),
}
ENFORCE_MIN_CHUNKS = 32


def child(a):
    import torch
    import torch.nn.functional as F

    import softmax_ce
    from softmax_ce import _torch_path
    opts = PROVIDERS[a.provider][0]
    fn = F.cross_entropy if opts is None else (lambda z, t: softmax_ce.cross_entropy(z, t, **opts))

    def inputs(n, v, d):
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=gen).requires_grad_()
        w = (torch.randn(v, d, generator=gen) * d ** -0.5).requires_grad_()  # unit-variance logits
        return h, w, torch.randint(0, v, (n,), generator=gen)

    def step(h, w, t):
        loss = fn(h @ w.t(), t)
        loss.backward()
        return loss.item()
    h, w, t = inputs(a.rows, a.vocab, a.hidden)
    r = C.measure_peak(lambda: step(h, w, t), warmup=lambda: step(*inputs(8, 256, a.hidden)))
    C.child_result(dict(r, path=C.path_name(h), chunk_elements=_torch_path.CHUNK_ELEMENTS))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="tokens N")
    p.add_argument("--vocab", type=int, default=131072, help="classes V")
    p.add_argument("--hidden", type=int, default=64, help="LM head width D")
    p.add_argument("--providers", type=C.name_list, default=tuple(PROVIDERS),
                   help="comma-separated subset of: " + ", ".join(PROVIDERS))
    p.add_argument("--provider", help=argparse.SUPPRESS)  # internal: measure this one, here
    a = p.parse_args(argv)
    unknown = set(a.providers) - set(PROVIDERS) | ({a.provider} - set(PROVIDERS) if a.provider else set())
    if unknown:
        p.error(f"unknown provider(s): {', '.join(sorted(unknown))}")
    return a


def exit_code(rows):
    """1 if a softmax_ce provider missed an enforced limit or could not be measured."""
    return int(any(r["limit"] is not None and (r["error"] or (r["enforced"] and r["passed"] is not True))
                   for r in rows))


def main(argv=None):
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.provider:
        return child(a)
    from softmax_ce import _torch_path
    chunk = _torch_path.CHUNK_ELEMENTS
    logits_bytes = a.rows * a.vocab * 4
    enforced = a.rows * a.vocab >= ENFORCE_MIN_CHUNKS * chunk
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print("softmax_ce CPU memory bar: logits = hidden @ head.T; loss = provider(logits, target); "
          f"loss.backward()\ncpu: {C.cpu_model()} ({os.cpu_count()} cores, {ram:.1f} GiB RAM) | "
          f"torch {C.package_version('torch')} | TRITON_INTERPRET=0 in the children (PyTorch path)\n"
          f"shape: N={a.rows} V={a.vocab} D={a.hidden}, fp32 | logits {logits_bytes / 2**20:.1f} MiB "
          f"| softmax_ce chunk: {chunk} logits ({chunk * 4 / 2**20:.0f} MiB fp32)\nmeasure: peak RSS "
          "(VmHWM) during the step minus RSS after the inputs, fresh subprocess per provider",
          flush=True)
    rows = []
    for name in C.tqdm_iter(a.providers, "cpu memory"):
        opts, limit = PROVIDERS[name]
        res, err = C.run_child(__file__, ["--provider", name, "--rows", str(a.rows), "--vocab",
                                          str(a.vocab), "--hidden", str(a.hidden)], {"TRITON_INTERPRET": "0"})
        row = dict(provider=name, extra_mib=None, ratio=None, limit=limit, enforced=enforced,
                   passed=None, result="error", loss=None, seconds=None, path=None, error=err)
        if res:
            row.update(loss=res["value"], seconds=res["seconds"], path=res["path"], extra_mib=res["peak_mib"])
            row["ratio"] = None if res["peak_mib"] is None else res["peak_mib"] * 2**20 / logits_bytes
            if opts is not None and res["path"] != "PyTorch path":
                row["error"] = f"softmax_ce ran on the {res['path']}, not the PyTorch path"
            elif row["ratio"] is None:
                row["result"] = "n/a"
            elif limit is None:
                row["result"] = "ref"
            else:
                row["passed"] = row["ratio"] < limit
                row["result"] = ("pass" if row["passed"] else "FAIL") + ("" if enforced else "*")
        rows.append(row)
    print(C.table(rows, [("provider", "provider", None), ("extra_mib", "peak extra MiB", "{:.1f}"),
                         ("ratio", "x logits", "{:.3f}"), ("limit", "limit", lambda v: f"< {v:g}"),
                         ("result", "result", None), ("loss", "loss", "{:.6f}"),
                         ("seconds", "step s", "{:.2f}")]))
    for r in rows:
        if r["error"]:
            print(f"{r['provider']}: {r['error']}")
    if not enforced:
        print(f"* not enforced: {a.rows}x{a.vocab} logits are under {ENFORCE_MIN_CHUNKS} chunks of "
              f"{chunk}, so fixed-size chunk temporaries dominate")
    return rows


if __name__ == "__main__":
    sys.exit(exit_code(main()))
