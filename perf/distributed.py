"""Vocabulary-parallel loss: time and bytes of softmax_ce's `process_group=` path.

For each world size it spawns that many processes (CPU: gloo, one process per rank;
CUDA with k GPUs: nccl, one GPU per rank, world sizes up to k), gives each rank its
contiguous slice of the vocabulary (torch.chunk's split, so uneven when V is not a
multiple of the world size) and measures one training step, forward + backward, of

    cross_entropy(logits_local (N, V_local), target, process_group=group)
    linear_cross_entropy(hidden (N, D), weight_local (V_local, D), target, process_group=group)

and prints, per world size and op:

* median step time (the slowest rank of each step, ranks aligned by a barrier first),
  split into the time inside the collectives (softmax_ce.distributed._all_gather and
  torch.distributed.all_reduce wrapped with timers; on CUDA synchronised before and
  after each call, which serialises compute and communication) and the rest
  (compute).  Time in a collective includes waiting for a slower rank.
* the bytes each rank handed to the collectives per row of the batch, counted from
  the tensors actually passed (sent = the input, received = the output), per forward
  and per backward, and the number of collective calls;
* Megatron-LM's vocab-parallel cross-entropy for comparison, from its formula (not
  measured): three all-reduces of one fp32 per row in the forward (max logit,
  sum of exp, target logit), i.e. 12 bytes per row per rank, none in the backward of
  the loss; its column-parallel LM head all-reduces dX (N x D) in the backward like ours;
* "collectives alone": our one all-gather of (N, K) fp32 (K = softmax_ce.distributed.N_STATS)
  and Megatron's three all-reduces of (N,) fp32, timed standalone in the same processes
  (latency vs bytes).

On a CPU machine the children run the PyTorch path of softmax_ce (TRITON_INTERPRET=0)
unless --interpret is given (the Triton interpreter: use tiny shapes).

Run:
    python perf/distributed.py                        # CPU: world sizes 2,3, small shapes
    python perf/distributed.py --world-sizes 2,4 --rows 4096 --vocab 128256 --dtype bf16
    python perf/distributed.py --csv dist.csv

From Python, ``main([...])`` returns the rows (list of dicts) it printed.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

DTYPES = {short: C.torch_dtype(short) for short in C.DTYPE_NAMES}

DEFAULTS = {
    "cuda": dict(rows=8192, vocab=128256, hidden=4096, dtype="bf16", repeats=20, warmup=3),
    "cpu": dict(rows=256, vocab=32000, hidden=256, dtype="fp32", repeats=5, warmup=1),
    "cpu-interpreter": dict(rows=16, vocab=2048, hidden=64, dtype="fp32", repeats=2, warmup=1),
}

MEGATRON_FWD_BYTES = 12  # 3 all-reduces x 1 fp32 per row: max, sum-exp, target logit
SPAWN_TIMEOUT_S = 300
COLLECTIVE_TIMEOUT_S = 60


# ----------------------------------------------------------------------------
# The child: one rank
# ----------------------------------------------------------------------------

class _CommTimer:
    """Wraps the collectives softmax_ce calls; accumulates their time and bytes per phase."""

    def __init__(self, device):
        import torch.distributed as dist

        import softmax_ce.distributed as D

        self.device = device
        self.phase = None
        self.reset()
        D._all_gather = self._wrap("all_gather", D._all_gather)
        dist.all_reduce = self._wrap("all_reduce", dist.all_reduce)

    def reset(self):
        self.seconds = 0.0
        self.events = []  # (phase, name, bytes sent, bytes received)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.phase is None:
                return fn(*args, **kwargs)
            self._sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.seconds += time.perf_counter() - t0
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name == "all_gather":  # (output, input)
                sent, recv = tensors[1], tensors[0]
            else:
                sent = recv = tensors[0]
            self.events.append((self.phase, name, sent.numel() * sent.element_size(),
                                recv.numel() * recv.element_size()))
            return out
        wrapper.__wrapped__ = fn
        return wrapper


def _chunk_sizes(V, world):
    step = -(-V // world)
    return [max(0, min(step, V - r * step)) for r in range(world)]


def _measure(rank, world, cfg, device):
    import torch.distributed as dist

    import softmax_ce
    import softmax_ce.distributed as D

    barrier = dist.barrier
    timer = _CommTimer(device)
    N, V, Dh = cfg["rows"], cfg["vocab"], cfg["hidden"]
    dtype = DTYPES[cfg["dtype"]]
    sizes = _chunk_sizes(V, world)
    n_local = sizes[rank]
    g_shared = torch.Generator().manual_seed(0)        # replicated: targets, hidden states
    g_local = torch.Generator().manual_seed(1 + rank)  # this rank's slice
    target = torch.randint(0, V, (N,), generator=g_shared).to(device)
    hidden = torch.randn(N, Dh, generator=g_shared).to(device=device, dtype=dtype)
    logits = (torch.randn(N, n_local, generator=g_local) * 2).to(device=device, dtype=dtype)
    head = (torch.randn(n_local, Dh, generator=g_local) * Dh ** -0.5).to(device=device,
                                                                         dtype=dtype)
    group = dist.group.WORLD

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step_ce():
        x = logits.detach().requires_grad_()
        timer.phase = "fwd"
        loss = softmax_ce.cross_entropy(x, target, process_group=group)
        timer.phase = "bwd"
        loss.backward()
        timer.phase = None
        return loss

    def step_lce():
        x = hidden.detach().requires_grad_()
        w = head.detach().requires_grad_()
        timer.phase = "fwd"
        loss = softmax_ce.linear_cross_entropy(x, w, target, process_group=group)
        timer.phase = "bwd"
        loss.backward()
        timer.phase = None
        return loss

    result = dict(rank=rank, n_local=n_local, path=C.path_name(logits), ops={})
    for op, step in (("cross_entropy", step_ce), ("linear_cross_entropy", step_lce)):
        D.forget_slices()  # the first warm-up step pays the one-time slice-size all-gather
        setup = []
        for i in range(cfg["warmup"]):
            timer.reset()
            step()
            if i == 0:
                setup = list(timer.events)
        totals, comms, events = [], [], None
        for _ in range(cfg["repeats"]):
            timer.reset()
            barrier(group=group)
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            totals.append(time.perf_counter() - t0)
            comms.append(timer.seconds)
            events = list(timer.events)
        result["ops"][op] = dict(totals=totals, comms=comms, events=events, setup=setup,
                                 loss=float(loss.detach()))

    # the collectives alone: ours (one all-gather of N x N_STATS fp32) vs Megatron's three
    # all-reduces of N fp32, same rows, same processes
    f32 = dict(dtype=torch.float32, device=device)
    local = torch.randn(N, D.N_STATS, **f32)  # what softmax_ce's forward all-gathers per row
    out = torch.empty(world * N, D.N_STATS, **f32)
    bufs = [torch.randn(N, **f32) for _ in range(3)]
    all_gather, all_reduce = D._all_gather.__wrapped__, dist.all_reduce.__wrapped__
    alone = {"ours": [], "megatron": []}

    def ours():
        all_gather(out, local, group=group)

    def megatron():
        for b in bufs:
            all_reduce(b, op=dist.ReduceOp.MAX, group=group)

    for key, fn in (("ours", ours), ("megatron", megatron)):  # one pattern per loop
        for i in range(cfg["warmup"] + max(cfg["repeats"], 30)):
            barrier(group=group)
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= cfg["warmup"]:
                alone[key].append(time.perf_counter() - t0)
    result["alone"] = alone
    gathered = [None] * world
    dist.all_gather_object(gathered, result, group=group)
    return gathered


def _rank(rank, world, cfg):
    """One rank, in the process group softmax_ce.testing.run_ranks set up -> rank 0's
    gathered measurements (None on the other ranks)."""
    if cfg["backend"] == "nccl":
        device = torch.device("cuda", rank)  # run_ranks has made it the current device
    else:
        torch.set_num_threads(cfg["threads"])
        device = torch.device("cpu")
    res = _measure(rank, world, cfg, device)
    return res if rank == 0 else None


# ----------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------

def _spawn(world, cfg):
    """Measure on `world` fresh processes -> every rank's measurements (from rank 0)."""
    from softmax_ce.testing import run_ranks

    # cfg["env"] (TRITON_INTERPRET) is in the children's environment before they import
    # softmax_ce, and so triton
    ranks = run_ranks(world, _rank, (cfg,), backend=cfg["backend"], env=cfg["env"],
                      deadline_s=SPAWN_TIMEOUT_S, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    errors = [f"rank {r.rank}:\n{r.error}" for r in ranks if not r.ok]
    if errors:
        raise RuntimeError(f"world size {world} failed:\n" + "\n".join(errors))
    return ranks[0].value


def _median_ms(xs):
    return 1e3 * statistics.median(xs) if xs else float("nan")


def _rows_for(world, per_rank, cfg, device_label):
    N = cfg["rows"]
    rows = []
    for op in ("cross_entropy", "linear_cross_entropy"):
        ops = [r["ops"][op] for r in per_rank]
        n_steps = len(ops[0]["totals"])
        # per step: the slowest rank's total; its comm time; then medians over the steps
        step_total = [max(o["totals"][i] for o in ops) for i in range(n_steps)]
        slowest = [max(range(world), key=lambda r: ops[r]["totals"][i]) for i in range(n_steps)]
        step_comm = [ops[slowest[i]]["comms"][i] for i in range(n_steps)]
        total = _median_ms(step_total)
        comm = _median_ms(step_comm)
        ev = ops[0]["events"]  # rank 0's steady-state step (every rank passes the same sizes)
        fwd = [e for e in ev if e[0] == "fwd"]
        bwd = [e for e in ev if e[0] == "bwd"]
        ours_fwd_sent = sum(e[2] for e in fwd) / N
        ours_fwd_recv = sum(e[3] for e in fwd) / N
        ours_bwd = sum(e[2] for e in bwd) / N
        megatron_bwd = (cfg["hidden"] * 4) if op == "linear_cross_entropy" else 0
        rows.append(dict(
            world=world, op=op, device=device_label, path=per_rank[0]["path"], dtype=cfg["dtype"],
            rows=N, vocab=cfg["vocab"],
            hidden=cfg["hidden"] if op == "linear_cross_entropy" else None,
            v_local=[r["n_local"] for r in per_rank],
            total_ms=total, comm_ms=comm, compute_ms=total - comm,
            comm_pct=100.0 * comm / total if total else float("nan"),
            fwd_collectives=len(fwd), bwd_collectives=len(bwd),
            setup_collectives=max(0, len(ops[0]["setup"]) - len(ev)),
            ours_fwd_sent_B_per_row=ours_fwd_sent, ours_fwd_recv_B_per_row=ours_fwd_recv,
            ours_bwd_B_per_row=ours_bwd,
            # ring algorithms, per rank: all-gather sends (w-1) x its input, all-reduce of
            # s bytes sends 2 (w-1)/w x s  (a model, not measured)
            ours_fwd_ring_B_per_row=(world - 1) * ours_fwd_sent,
            megatron_fwd_B_per_row=MEGATRON_FWD_BYTES,
            megatron_fwd_ring_B_per_row=MEGATRON_FWD_BYTES * 2 * (world - 1) / world,
            megatron_fwd_collectives=3, megatron_bwd_B_per_row=megatron_bwd,
            alone_ours_ms=_median_ms(per_rank[0]["alone"]["ours"]),
            alone_megatron_ms=_median_ms(per_rank[0]["alone"]["megatron"]),
            loss=ops[0]["loss"],
        ))
    return rows


def _format_table(rows, cols):
    return C.table(rows, cols)


TIME_COLS = [
    ("world", "world", "{}"), ("op", "op", "{}"), ("v_local", "V per rank", "{}"),
    ("total_ms", "step ms", "{:.2f}"), ("compute_ms", "compute ms", "{:.2f}"),
    ("comm_ms", "comm ms", "{:.2f}"), ("comm_pct", "comm %", "{:.1f}"),
    ("fwd_collectives", "colls fwd", "{}"), ("bwd_collectives", "colls bwd", "{}"),
]
BYTES_COLS = [
    ("world", "world", "{}"), ("op", "op", "{}"),
    ("ours_fwd_sent_B_per_row", "ours fwd sent", "{:.0f}"),
    ("ours_fwd_recv_B_per_row", "ours fwd recv", "{:.0f}"),
    ("ours_fwd_ring_B_per_row", "ours fwd ring*", "{:.0f}"),
    ("megatron_fwd_B_per_row", "Megatron fwd**", "{:.0f}"),
    ("megatron_fwd_ring_B_per_row", "Megatron ring*", "{:.1f}"),
    ("ours_bwd_B_per_row", "ours bwd", "{:.0f}"),
    ("megatron_bwd_B_per_row", "Megatron bwd**", "{:.0f}"),
    ("alone_ours_ms", "1 all-gather ms", "{:.3f}"),
    ("alone_megatron_ms", "3 all-reduce ms", "{:.3f}"),
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="tokens N (default: by device)")
    p.add_argument("--vocab", type=int, help="global vocabulary V")
    p.add_argument("--hidden", type=int, help="hidden size D of linear_cross_entropy")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="logits / hidden / weight dtype")
    p.add_argument("--repeats", type=int, help="timed steps per op (median)")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--world-sizes", help="comma-separated, e.g. 2,3 (CUDA: clipped to the GPUs)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels through the interpreter (tiny shapes)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    return p.parse_args(argv)


def _versions():
    return " | ".join([f"torch {torch.__version__}"]
                      + [f"{pkg} {C.package_version(pkg)}" for pkg in ("triton", "softmax_ce")])


def main(argv=None):
    args = parse_args(argv)
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = n_gpus > 0
    mode = "cuda" if cuda else ("cpu-interpreter" if args.interpret else "cpu")
    d = DEFAULTS[mode]
    cfg = dict(rows=args.rows or d["rows"], vocab=args.vocab or d["vocab"],
               hidden=args.hidden or d["hidden"], dtype=args.dtype or d["dtype"],
               repeats=args.repeats or d["repeats"],
               warmup=d["warmup"] if args.warmup is None else args.warmup)
    if cuda:
        default_ws = sorted({w for w in (1, 2, 4, 8, 16) if w <= n_gpus} | {n_gpus})
        worlds = ([int(w) for w in args.world_sizes.split(",")] if args.world_sizes
                  else default_ws)
        skipped = [w for w in worlds if w > n_gpus]
        worlds = [w for w in worlds if w <= n_gpus]
        cfg.update(backend="nccl", threads=None, env={})
        device_label = f"{n_gpus} x {torch.cuda.get_device_name(0)}"
    else:
        worlds = [int(w) for w in (args.world_sizes or "2,3").split(",")]
        skipped = []
        cores = os.cpu_count() or 1
        cfg.update(backend="gloo", env={"TRITON_INTERPRET": "1" if args.interpret else "0"})
        device_label = f"CPU ({C.cpu_description(cores, load_label='load average')})"

    header = [
        "softmax_ce vocabulary-parallel loss: forward + backward per step, "
        "one process per rank, vocabulary split as torch.chunk",
        f"device: {device_label} | backend: {cfg['backend']} | {_versions()} | "
        f"python {sys.version.split()[0]}",
        f"shapes: N={cfg['rows']} rows, V={cfg['vocab']}, D={cfg['hidden']} (linear), "
        f"dtype {cfg['dtype']}, reduction mean, class-index targets | world sizes {worlds}"
        + (f" (skipped {skipped}: only {n_gpus} GPUs)" if skipped else ""),
        f"time: median over {cfg['repeats']} steps after {cfg['warmup']} warm-up of the slowest "
        f"rank (ranks aligned by a barrier); comm = time inside the collectives"
        + (" (CUDA-synchronised before and after each)" if cuda else ""),
    ]
    if not cuda:
        header.append(
            f"CPU: TRITON_INTERPRET={cfg['env']['TRITON_INTERPRET']} in the children; torch "
            f"threads per rank = max(1, {os.cpu_count()} cores // world); ranks beyond the core "
            f"count share cores, so compute times grow with the world size here")
    print("\n".join(header), flush=True)

    rows = []
    for world in C.tqdm_iter(worlds, "world sizes"):
        if not cuda:
            cfg["threads"] = max(1, (os.cpu_count() or 1) // world)
        per_rank = _spawn(world, cfg)
        rows += _rows_for(world, per_rank, cfg, device_label)
    if rows:
        print(f"path in the children: {rows[0]['path']}")
    print()
    print(_format_table(rows, TIME_COLS))
    print()
    print("bytes per row of the batch, per rank (ours: counted from the tensors passed to the "
          "collectives in a steady-state step)")
    print(_format_table(rows, BYTES_COLS))
    print()
    print("*  ring-algorithm model of the bytes each rank puts on the wire: an all-gather sends "
          "(w-1) x its input, an all-reduce of s bytes 2 (w-1)/w x s.")
    print("** Megatron-LM's vocab-parallel cross-entropy, from its formula, not measured: three "
          "all-reduces of one fp32 per row in the forward (max logit, sum of exp, target logit) "
          "= 12 B per row per rank, three latency-bound collectives; none in the loss's backward; "
          "its column-parallel LM head all-reduces dX (N x D, fp32 here) in the backward, as "
          "linear_cross_entropy does.")
    if rows:
        sent = rows[0]["ours_fwd_sent_B_per_row"]
        print(f"ours: one all-gather of {sent:.0f} B per row per forward ({sent / 4:.0f} fp32 "
              f"sent, w times that received, plus one slice-check row per call), and a one-time "
              f"all-gather of the slice sizes per group (in the warm-up: "
              f"{rows[0]['setup_collectives']} extra call); "
              f"'1 all-gather ms' / '3 all-reduce ms': those collectives alone for N rows.")
    if args.csv:
        import pandas as pd
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
