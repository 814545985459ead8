"""The CPU memory bar: peak resident memory of a training step's loss, in logits' sizes.

The step is an LM head followed by the loss, so the logits are an intermediate
that autograd may free or overwrite, as in training:

    logits = hidden @ head.T        # hidden (N, D), head (V, D), both requiring grad
    loss = provider(logits, target)
    loss.backward()

Each provider runs in a fresh subprocess (so no provider's high-water mark or
allocator cache leaks into another's) on the pure PyTorch path of softmax_ce
(TRITON_INTERPRET=0 in the children).  Its cost is the peak RSS during the step
minus the RSS once the inputs exist, divided by the logits' size N*V*4 bytes.
The bar (at N=4096, V=131072, fp32, where the logits are 2 GiB):

    torch eager                        about 4x (reference, not enforced)
    softmax_ce                         < 2.25x
    softmax_ce inplace_backward=True   < 1.25x

Exit status 1 when a softmax_ce provider misses its limit or fails to run.  The
limits are enforced only when the logits dwarf softmax_ce's fixed-size chunk
temporaries (N*V >= ENFORCE_MIN_CHUNKS * CHUNK_ELEMENTS); at smaller shapes the
table is informative only.  Providers run one after another: torch alone needs
about 5 logits' worth (10 GiB) at the full shape.

Run:
    python perf/cpu_memory.py                                # the full shape, ~1-2 minutes on 2 cores
    python perf/cpu_memory.py --rows 64 --vocab 4096 --hidden 16   # tiny, for tests

From Python, ``main([...])`` returns the rows as a list of dicts and
``exit_code(rows)`` the status the command line would exit with.
"""

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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

DEFAULT_SHAPE = dict(rows=4096, vocab=131072, hidden=64)


@dataclass(frozen=True)
class Provider:
    name: str
    options: dict = field(default_factory=dict)  # softmax_ce.cross_entropy keywords; None: torch
    limit: float = None                           # max peak / logits bytes; None: not enforced


PROVIDERS = (
    Provider("torch", None),
    Provider("softmax_ce", {}, 2.25),
    Provider("softmax_ce inplace", {"inplace_backward": True}, 1.25),
    # The fused mode holds the gradient from the forward on, in its own buffer or in
    # the logits, so the same bars apply to it.
    Provider("softmax_ce fused", {"grad_mode": "fused"}, 2.25),
    Provider("softmax_ce fused inplace", {"grad_mode": "fused", "inplace_backward": True}, 1.25),
)

# Enforce the limits only when the logits hold at least this many of softmax_ce's
# chunks: its temporaries (a few fp32 chunks of CHUNK_ELEMENTS) are a fixed size,
# so they dominate tiny logits by design.
ENFORCE_MIN_CHUNKS = 32

RESULT_MARK = "CPU_MEMORY_RESULT "


# ----------------------------------------------------------------------------
# Resident memory (Linux /proc; the RSS readings are C.rss_kib / C.peak_rss_kib)
# ----------------------------------------------------------------------------

def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None


# ----------------------------------------------------------------------------
# The child: one provider, one step
# ----------------------------------------------------------------------------

def _loss_fn(provider):
    import torch.nn.functional as F
    import softmax_ce
    if provider.options is None:
        return F.cross_entropy
    return lambda logits, target: softmax_ce.cross_entropy(logits, target, **provider.options)


def _lm_head_inputs(rows, vocab, hidden, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).requires_grad_()
    # scaled so the logits have unit variance, like a trained head's
    w = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=gen)
    return h, w, target


def _train_step(fn, h, w, target):
    logits = h @ w.t()
    loss = fn(logits, target)
    loss.backward()
    return loss.item()


def measure(provider, rows, vocab, hidden):
    """Peak RSS of one step beyond its inputs, in this process (meant to be a fresh one)."""
    import torch
    from softmax_ce import _launch, _torch_path  # which path a CPU tensor takes; its chunk

    fn = _loss_fn(provider)
    # Lazy one-time costs (BLAS and OpenMP pools, autograd and custom-op dispatch)
    # are not the step's: pay them on a tiny step first.
    _train_step(fn, *_lm_head_inputs(8, 256, hidden))
    gc.collect()

    h, w, target = _lm_head_inputs(rows, vocab, hidden)
    gc.collect()
    can_reset = C.reset_peak_rss()
    base = C.rss_kib()
    before = C.peak_rss_kib()
    t0 = time.perf_counter()
    loss = _train_step(fn, h, w, target)
    seconds = time.perf_counter() - t0
    peak = C.peak_rss_kib()
    import resource
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # for the record; see C.peak_rss
    # Without a reset, an earlier high-water mark can hide the step's peak.
    known = can_reset or peak > before
    return dict(
        extra_kib=max(0, peak - base) if known else None,
        base_kib=base,
        peak_kib=peak,
        ru_maxrss_kib=maxrss,
        loss=loss,
        seconds=seconds,
        path="Triton" if _launch.uses_triton(torch.empty(1)) else "PyTorch chunked",
        chunk_elements=_torch_path.CHUNK_ELEMENTS,
    )


def run_child(provider, args):
    """Run `measure` for one provider in a fresh interpreter on softmax_ce's PyTorch path."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--provider", provider.name,
           "--rows", str(args.rows), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), None
    why = ("killed by signal %d (out of memory?)" % -proc.returncode if proc.returncode < 0
           else f"exit status {proc.returncode}")
    return None, f"{why}: {proc.stderr.strip()[-1500:]}"


# ----------------------------------------------------------------------------
# The parent: every provider, a table, a verdict
# ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=DEFAULT_SHAPE["rows"], help="tokens N")
    p.add_argument("--vocab", type=int, default=DEFAULT_SHAPE["vocab"], help="classes V")
    p.add_argument("--hidden", type=int, default=DEFAULT_SHAPE["hidden"], help="LM head width D")
    p.add_argument("--providers", help="comma-separated subset of: "
                   + ", ".join(pr.name for pr in PROVIDERS))
    p.add_argument("--provider", help=argparse.SUPPRESS)  # internal: measure this one, here
    args = p.parse_args(argv)
    names = ([n.strip() for n in args.providers.split(",")] if args.providers
             else [pr.name for pr in PROVIDERS])
    unknown = set(names + ([args.provider] if args.provider else [])) - {pr.name for pr in PROVIDERS}
    if unknown:
        p.error(f"unknown provider(s): {', '.join(sorted(unknown))}")
    args.selected = [pr for pr in PROVIDERS if pr.name in names]
    return args


def header(args, chunk_elements):
    import torch
    logits_mib = args.rows * args.vocab * 4 / 2**20
    ram = mem_total_gib()
    return "\n".join([
        "softmax_ce CPU memory bar: logits = hidden @ head.T; loss = provider(logits, target); "
        "loss.backward()",
        f"cpu: {C.cpu_model()} ({os.cpu_count()} cores"
        + (f", {ram:.1f} GiB RAM)" if ram else ")")
        + f" | torch {torch.__version__} | TRITON_INTERPRET=0 in the children",
        f"shape: N={args.rows} V={args.vocab} D={args.hidden}, fp32 | logits "
        f"{logits_mib:.1f} MiB | softmax_ce chunk: {chunk_elements} logits "
        f"({chunk_elements * 4 / 2**20:.0f} MiB fp32)",
        "measure: peak RSS (VmHWM) during the step minus RSS after the inputs, "
        "fresh subprocess per provider",
    ])


def format_table(rows):
    titles = ["provider", "peak extra MiB", "x logits", "limit", "result", "loss", "step s"]
    cells = [titles]
    for r in rows:
        def num(v, fmt):
            return "n/a" if v is None else fmt.format(v)
        cells.append([r["provider"], num(r["extra_mib"], "{:.1f}"), num(r["ratio"], "{:.3f}"),
                      "-" if r["limit"] is None else f"< {r['limit']:g}", r["result"],
                      num(r["loss"], "{:.6f}"), num(r["seconds"], "{:.2f}")])
    return C.layout_table(cells, left=(0, 3, 4))


def exit_code(rows) -> int:
    """1 if a softmax_ce provider missed an enforced limit or could not be measured."""
    for r in rows:
        if r["limit"] is None:
            continue
        if r["error"] or (r["enforced"] and r["passed"] is not True):
            return 1
    return 0


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.provider:
        provider = next(pr for pr in PROVIDERS if pr.name == args.provider)
        result = measure(provider, args.rows, args.vocab, args.hidden)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return [dict(result, provider=provider.name, limit=None, error=None)]

    from softmax_ce import _torch_path
    logits_bytes = args.rows * args.vocab * 4
    enforced = args.rows * args.vocab >= ENFORCE_MIN_CHUNKS * _torch_path.CHUNK_ELEMENTS
    print(header(args, _torch_path.CHUNK_ELEMENTS), flush=True)

    rows = []
    for provider in args.selected:  # one at a time: torch alone needs ~5 logits of RAM
        result, error = run_child(provider, args)
        row = dict(provider=provider.name, extra_mib=None, ratio=None, limit=provider.limit,
                   enforced=enforced, passed=None, result="error", loss=None, seconds=None,
                   path=None, error=error)
        if result is not None:
            row.update(loss=result["loss"], seconds=result["seconds"], path=result["path"])
            if result["extra_kib"] is not None:
                row["extra_mib"] = result["extra_kib"] / 1024
                row["ratio"] = result["extra_kib"] * 1024 / logits_bytes
            if provider.options is not None and result["path"] != "PyTorch chunked":
                row["error"] = f"softmax_ce ran on the {result['path']} path, not PyTorch"
            elif row["ratio"] is None:
                row["result"] = "n/a"
            elif provider.limit is None:
                row["result"] = "ref"
            else:
                row["passed"] = row["ratio"] < provider.limit
                row["result"] = ("pass" if row["passed"] else "FAIL") + ("" if enforced else "*")
        rows.append(row)
        print(f"  measured {provider.name}", file=sys.stderr, flush=True)

    print(format_table(rows))
    for r in rows:
        if r["error"]:
            print(f"{r['provider']}: {r['error']}")
    if not enforced:
        print(f"* not enforced: {args.rows}x{args.vocab} logits are under {ENFORCE_MIN_CHUNKS} "
              f"chunks of {_torch_path.CHUNK_ELEMENTS}, so fixed-size chunk temporaries dominate")
    return rows


if __name__ == "__main__":
    sys.exit(exit_code(main()))
