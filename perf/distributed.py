"""Vocabulary-parallel loss: time and bytes of softmax_ce's `process_group=` path.

For each world size, that many processes (CPU: gloo; CUDA with k GPUs: nccl, one GPU per
rank, world sizes up to k), each holding its contiguous slice of the vocabulary
(torch.chunk's split), time one training step, forward + backward, of

    cross_entropy(logits_local (N, V_local), target, process_group=group)
    linear_cross_entropy(hidden (N, D), weight_local (V_local, D), target, process_group=group)

and print, per world size and op:
* median step time of the slowest rank (ranks aligned by a barrier), split into the time
  inside the collectives (softmax_ce.distributed._all_gather and dist.all_reduce wrapped
  with timers; on CUDA synchronised around each call, which serialises compute and
  communication; it includes waiting for a slower rank) and the rest (compute);
* the bytes each rank handed to the collectives per row (sent = the input, received = the
  output), per forward and backward, and the number of calls;
* Megatron-LM's vocab-parallel cross-entropy from its formula (not measured): three
  all-reduces of one fp32 per row in the forward (max logit, sum of exp, target logit),
  12 B per row per rank, none in the loss's backward; its column-parallel head all-reduces
  dX (N x D) in the backward, as ours does;
* "collectives alone": our one all-gather of (N, K) fp32 (K = softmax_ce.distributed.N_STATS)
  and Megatron's three all-reduces of (N,) fp32, timed standalone (latency vs bytes).

On CPU the children run softmax_ce's PyTorch path (TRITON_INTERPRET=0) unless --interpret.

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

DEFAULTS = {
    "cuda": dict(rows=8192, vocab=128256, hidden=4096, dtype="bf16", repeats=20, warmup=3),
    "cpu": dict(rows=256, vocab=32000, hidden=256, dtype="fp32", repeats=5, warmup=1),
    "cpu-interpreter": dict(rows=16, vocab=2048, hidden=64, dtype="fp32", repeats=2, warmup=1),
}
MEGATRON_FWD_BYTES = 12  # 3 all-reduces x 1 fp32 per row: max, sum-exp, target logit
OPS = ("cross_entropy", "linear_cross_entropy")


class _CommTimer:
    """Wraps the collectives softmax_ce calls; accumulates their time and bytes per phase."""

    def __init__(self, device):
        import torch.distributed as dist

        import softmax_ce.distributed as D
        self.device, self.phase, self.seconds, self.events = device, None, 0.0, []
        D._all_gather = self._wrap("all_gather", D._all_gather)
        dist.all_reduce = self._wrap("all_reduce", dist.all_reduce)

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.phase is None:
                return fn(*args, **kwargs)
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - t0
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            sent, recv = (tensors[1], tensors[0]) if name == "all_gather" else (tensors[0],) * 2
            self.events.append((self.phase, sent.numel() * sent.element_size(),
                                recv.numel() * recv.element_size()))
            return out
        wrapper.__wrapped__ = fn
        return wrapper


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, group, device):
    import torch.distributed as dist
    dist.barrier(group=group)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _rank(rank, world, cfg):
    """One rank, in the process group softmax_ce.testing.run_ranks set up -> rank 0's
    gathered measurements (None on the other ranks)."""
    import torch.distributed as dist

    import softmax_ce
    import softmax_ce.distributed as D
    if cfg["backend"] == "nccl":
        device = torch.device("cuda", rank)  # run_ranks has made it the current device
    else:
        torch.set_num_threads(cfg["threads"])
        device = torch.device("cpu")
    timer, group = _CommTimer(device), dist.group.WORLD
    n, v, d, dtype = cfg["rows"], cfg["vocab"], cfg["hidden"], C.torch_dtype(cfg["dtype"])
    n_local = len(range(v)[rank * -(-v // world):(rank + 1) * -(-v // world)])
    g_shared, g_local = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1 + rank)
    target = torch.randint(0, v, (n,), generator=g_shared).to(device)
    hidden = torch.randn(n, d, generator=g_shared).to(device=device, dtype=dtype)
    logits = (torch.randn(n, n_local, generator=g_local) * 2).to(device=device, dtype=dtype)
    head = (torch.randn(n_local, d, generator=g_local) * d ** -0.5).to(device=device, dtype=dtype)
    losses = {
        "cross_entropy": lambda: softmax_ce.cross_entropy(
            logits.detach().requires_grad_(), target, process_group=group),
        "linear_cross_entropy": lambda: softmax_ce.linear_cross_entropy(
            hidden.detach().requires_grad_(), head.detach().requires_grad_(), target,
            process_group=group)}

    def step(op):
        timer.phase = "fwd"
        loss = losses[op]()
        timer.phase = "bwd"
        loss.backward()
        timer.phase = None
        return loss

    result = dict(rank=rank, n_local=n_local, path=C.path_name(logits), ops={})
    for op in OPS:
        D.forget_slices()  # the first warm-up step pays the one-time slice-size all-gather
        setup = []
        for i in range(cfg["warmup"]):
            timer.seconds, timer.events = 0.0, []
            step(op)
            setup = list(timer.events) if i == 0 else setup
        totals, comms = [], []
        for _ in range(cfg["repeats"]):
            timer.seconds, timer.events = 0.0, []
            total, loss = _timed(lambda: step(op), group, device)
            totals.append(total)
            comms.append(timer.seconds)
        result["ops"][op] = dict(totals=totals, comms=comms, events=list(timer.events),
                                 setup=setup, loss=float(loss.detach()))
    # the collectives alone: ours (one all-gather of N x N_STATS fp32) vs Megatron's three
    # all-reduces of N fp32, same rows, same processes
    f32 = dict(dtype=torch.float32, device=device)
    local, out = torch.randn(n, D.N_STATS, **f32), torch.empty(world * n, D.N_STATS, **f32)
    bufs = [torch.randn(n, **f32) for _ in range(3)]
    alone = {"ours": lambda: D._all_gather.__wrapped__(out, local, group=group),
             "megatron": lambda: [dist.all_reduce.__wrapped__(b, op=dist.ReduceOp.MAX, group=group)
                                  for b in bufs]}
    result["alone"] = {k: [_timed(fn, group, device)[0]
                           for _ in range(cfg["warmup"] + max(cfg["repeats"], 30))][cfg["warmup"]:]
                       for k, fn in alone.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, result, group=group)
    return gathered if rank == 0 else None


def _ms(xs):
    return 1e3 * statistics.median(xs) if xs else float("nan")


def _rows_for(world, per_rank, cfg):
    rows = []
    for op in OPS:
        ops = [r["ops"][op] for r in per_rank]
        steps = range(len(ops[0]["totals"]))
        # per step: the slowest rank's total and its comm time; then medians over the steps
        slowest = [max(ops, key=lambda o: o["totals"][i]) for i in steps]
        total = _ms([s["totals"][i] for i, s in zip(steps, slowest)])
        comm = _ms([s["comms"][i] for i, s in zip(steps, slowest)])
        ev = ops[0]["events"]  # rank 0's steady-state step (every rank passes the same sizes)
        fwd, bwd = [e for e in ev if e[0] == "fwd"], [e for e in ev if e[0] == "bwd"]
        sent = sum(e[1] for e in fwd) / cfg["rows"]
        rows.append(dict(
            world=world, op=op, path=per_rank[0]["path"], dtype=cfg["dtype"], rows=cfg["rows"],
            vocab=cfg["vocab"], hidden=cfg["hidden"] if op == "linear_cross_entropy" else None,
            v_local=[r["n_local"] for r in per_rank], total_ms=total, comm_ms=comm,
            compute_ms=total - comm, comm_pct=100.0 * comm / total if total else float("nan"),
            fwd_collectives=len(fwd), bwd_collectives=len(bwd),
            setup_collectives=max(0, len(ops[0]["setup"]) - len(ev)),
            ours_fwd_sent_B_per_row=sent, ours_fwd_recv_B_per_row=sum(e[2] for e in fwd) / cfg["rows"],
            ours_bwd_B_per_row=sum(e[1] for e in bwd) / cfg["rows"],
            # ring algorithms, per rank: an all-gather sends (w-1) x its input, an all-reduce
            # of s bytes 2 (w-1)/w x s  (a model, not measured)
            ours_fwd_ring_B_per_row=(world - 1) * sent, megatron_fwd_B_per_row=MEGATRON_FWD_BYTES,
            megatron_fwd_ring_B_per_row=MEGATRON_FWD_BYTES * 2 * (world - 1) / world,
            megatron_fwd_collectives=3,
            megatron_bwd_B_per_row=cfg["hidden"] * 4 if op == "linear_cross_entropy" else 0,
            alone_ours_ms=_ms(per_rank[0]["alone"]["ours"]),
            alone_megatron_ms=_ms(per_rank[0]["alone"]["megatron"]), loss=ops[0]["loss"]))
    return rows


TIME_COLS = [
    ("world", "world", "{}"), ("op", "op", "{}"), ("v_local", "V per rank", "{}"),
    ("total_ms", "step ms", "{:.2f}"), ("compute_ms", "compute ms", "{:.2f}"),
    ("comm_ms", "comm ms", "{:.2f}"), ("comm_pct", "comm %", "{:.1f}"),
    ("fwd_collectives", "colls fwd", "{}"), ("bwd_collectives", "colls bwd", "{}")]
BYTES_COLS = [
    ("world", "world", "{}"), ("op", "op", "{}"),
    ("ours_fwd_sent_B_per_row", "ours fwd sent", "{:.0f}"),
    ("ours_fwd_recv_B_per_row", "ours fwd recv", "{:.0f}"),
    ("ours_fwd_ring_B_per_row", "ours fwd ring*", "{:.0f}"),
    ("megatron_fwd_B_per_row", "Megatron fwd**", "{:.0f}"),
    ("megatron_fwd_ring_B_per_row", "Megatron ring*", "{:.1f}"),
    ("ours_bwd_B_per_row", "ours bwd", "{:.0f}"),
    ("megatron_bwd_B_per_row", "Megatron bwd**", "{:.0f}"),
    ("alone_ours_ms", "1 all-gather ms", "{:.3f}"), ("alone_megatron_ms", "3 all-reduce ms", "{:.3f}")]
FOOTNOTES = (
    "*  ring-algorithm model of the bytes each rank puts on the wire: an all-gather sends "
    "(w-1) x its input, an all-reduce of s bytes 2 (w-1)/w x s.\n"
    "** Megatron-LM's vocab-parallel cross-entropy, from its formula, not measured: three "
    "all-reduces of one fp32 per row in the forward (max logit, sum of exp, target logit) "
    "= 12 B per row per rank, three latency-bound collectives; none in the loss's backward; "
    "its column-parallel LM head all-reduces dX (N x D, fp32 here) in the backward, as "
    "linear_cross_entropy does.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, help="tokens N (default: by device)")
    p.add_argument("--vocab", type=int, help="global vocabulary V")
    p.add_argument("--hidden", type=int, help="hidden size D of linear_cross_entropy")
    p.add_argument("--dtype", choices=sorted(C.DTYPE_NAMES), help="logits / hidden / weight dtype")
    p.add_argument("--repeats", type=int, help="timed steps per op (median)")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--world-sizes", type=C.int_list, help="comma-separated, e.g. 2,3 (CUDA: clipped "
                                                          "to the GPUs)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the Triton kernels through the interpreter (tiny shapes)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    a = p.parse_args(argv)
    from softmax_ce.testing import run_ranks
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    d = DEFAULTS["cuda" if n_gpus else "cpu-interpreter" if a.interpret else "cpu"]
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else d[k] for k in d}
    if n_gpus:
        asked = a.world_sizes or sorted({w for w in (1, 2, 4, 8, 16) if w <= n_gpus} | {n_gpus})
        worlds, skipped = [w for w in asked if w <= n_gpus], [w for w in asked if w > n_gpus]
        cfg.update(backend="nccl", threads=None, env={})
        device = f"{n_gpus} x {torch.cuda.get_device_name(0)}"
    else:
        worlds, skipped = a.world_sizes or (2, 3), []
        cfg.update(backend="gloo", env={"TRITON_INTERPRET": "1" if a.interpret else "0"})
        device = f"CPU ({C.cpu_description(load_label='load average')})"
    print("softmax_ce vocabulary-parallel loss: forward + backward per step, one process per rank, "
          f"vocabulary split as torch.chunk\ndevice: {device} | backend: {cfg['backend']} | torch "
          f"{torch.__version__} | triton {C.package_version('triton')} | softmax_ce "
          f"{C.package_version('softmax_ce')} | python {sys.version.split()[0]}\nshapes: "
          f"N={cfg['rows']} rows, V={cfg['vocab']}, D={cfg['hidden']} (linear), dtype {cfg['dtype']}, "
          f"reduction mean, class-index targets | world sizes {list(worlds)}"
          + (f" (skipped {skipped}: only {n_gpus} GPUs)" if skipped else "")
          + f"\ntime: median over {cfg['repeats']} steps after {cfg['warmup']} warm-up of the slowest "
          "rank (ranks aligned by a barrier); comm = time inside the collectives"
          + (" (CUDA-synchronised before and after each)" if n_gpus else
             f"\nCPU: TRITON_INTERPRET={cfg['env']['TRITON_INTERPRET']} in the children; torch "
             f"threads per rank = max(1, {os.cpu_count()} cores // world); ranks beyond the core "
             "count share cores, so compute times grow with the world size here"), flush=True)
    rows = []
    for world in C.tqdm_iter(worlds, "world sizes"):
        cfg["threads"] = None if n_gpus else max(1, (os.cpu_count() or 1) // world)
        # cfg["env"] (TRITON_INTERPRET) is set in the children before they import triton
        ranks = run_ranks(world, _rank, (cfg,), backend=cfg["backend"], env=cfg["env"],
                          deadline_s=300, collective_timeout_s=60)
        errors = [f"rank {r.rank}:\n{r.error}" for r in ranks if not r.ok]
        if errors:
            raise RuntimeError(f"world size {world} failed:\n" + "\n".join(errors))
        rows += _rows_for(world, ranks[0].value, cfg)
    if rows:
        print(f"path in the children: {rows[0]['path']}")
    print(f"\n{C.table(rows, TIME_COLS)}\n\nbytes per row of the batch, per rank (ours: counted "
          f"from the tensors passed to the collectives in a steady-state step)\n"
          f"{C.table(rows, BYTES_COLS)}\n\n{FOOTNOTES}")
    if rows:
        sent = rows[0]["ours_fwd_sent_B_per_row"]
        print(f"ours: one all-gather of {sent:.0f} B per row per forward ({sent / 4:.0f} fp32 "
              f"sent, w times that received, plus one slice-check row per call), and a one-time "
              f"all-gather of the slice sizes per group (in the warm-up: "
              f"{rows[0]['setup_collectives']} extra call); "
              f"'1 all-gather ms' / '3 all-reduce ms': those collectives alone for N rows.")
    if a.csv:
        import pandas as pd
        pd.DataFrame(rows).to_csv(a.csv, index=False)
        print(f"wrote {a.csv}")
    return rows


if __name__ == "__main__":
    main()
