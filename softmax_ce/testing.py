"""Helpers to check softmax_ce against a reference and across processes.

* `assert_close` / `mismatch`: one tolerance comparator for a result against a
  (float64) reference, with dtype-aware defaults (`TOLERANCES`, `ulp`);
* `run_ranks`: run a function in `world` fresh processes joined by a process group,
  collect what each rank returned (or its traceback), never hang.

Imports torch and the standard library only, nothing of softmax_ce (importing this
module still runs softmax_ce/__init__.py, as any submodule does).
"""

import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["TOLERANCES", "ulp", "mismatch", "assert_close", "RankResult", "free_port",
           "run_ranks"]

# ----------------------------------------------------------------------------
# Comparing with a reference
# ----------------------------------------------------------------------------

# Default tolerances per dtype of the result (see `mismatch` for their meaning): fp32 the
# accumulation's noise; bf16 / fp16 two units in the last place of the reference rounded
# to the dtype, plus fp32 noise relative to the largest entry.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(atol=2e-6, ulps=2),
    torch.float16: dict(atol=2e-6, ulps=2),
}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at each of `values` (subnormal spacing below the normals)."""
    fi = torch.finfo(dtype)
    a = values.abs().clamp_min(fi.tiny)
    return fi.eps * torch.exp2(torch.floor(torch.log2(a)))


def mismatch(actual, expected, dtype=None, *, rtol=None, atol=None, ulps=None,
             what="value") -> Optional[str]:
    """None if `actual` matches `expected`, else a message naming the worst entry.

    Compared in float64 on the CPU: the same shape, NaN in the same places, the same
    infinities in the same places, and on the finite entries of `expected`
        |a - e| <= rtol * |e| + atol * max|e| + ulps * ulp(e, dtype)
    where, when `ulps` is given, e is first rounded to `dtype` (a result stored in that
    dtype cannot do better; max|e| stays that of the unrounded reference).
    `dtype`: the result's dtype (default actual.dtype); it names the defaults and the
    rounding.  Give any of rtol / atol / ulps (the others are then 0 / none), or none of
    them for TOLERANCES[dtype].
    """
    dtype = actual.dtype if dtype is None else dtype
    if rtol is None and atol is None and ulps is None:
        if dtype not in TOLERANCES:
            raise ValueError(f"no default tolerance for {dtype}: pass rtol / atol / ulps")
        tol_args = TOLERANCES[dtype]
        rtol, atol, ulps = tol_args.get("rtol"), tol_args.get("atol"), tol_args.get("ulps")
    rtol, atol = rtol or 0.0, atol or 0.0
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if a.shape != e.shape:
        return f"{what}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    if not torch.equal(a.isnan(), e.isnan()):
        return f"{what}: NaN pattern differs:\n{a}\nvs reference\n{e}"
    inf = e.isinf()
    if not (torch.equal(a.isinf(), inf) and torch.equal(a[inf], e[inf])):
        return f"{what}: inf differs:\n{a}\nvs reference\n{e}"
    fin = e.isfinite()
    where = fin.reshape(-1).nonzero()[:, 0]  # flat indices of the compared entries
    a, e = a[fin], e[fin]
    if e.numel() == 0:
        return None
    scale = e.abs().max()
    if ulps is not None:
        e = e.to(dtype).double()
    tol = rtol * e.abs() + atol * scale
    if ulps is not None:
        tol = tol + ulps * ulp(e, dtype)
    err = (a - e).abs()
    bad = err > tol
    if not bad.any():
        return None
    i = int(torch.argmax(err - tol))
    index = tuple(int(k) for k in torch.unravel_index(where[i], fin.shape))
    return (f"{what} ({dtype}): {int(bad.sum())}/{e.numel()} entries off; worst at {index}: "
            f"got {a[i].item():.9g}, reference {e[i].item():.9g} "
            f"(err {err[i].item():.3g} > tol {tol[i].item():.3g})")


def assert_close(actual, expected, dtype=None, *, rtol=None, atol=None, ulps=None,
                 what="value") -> None:
    """Raise AssertionError with `mismatch`'s message unless `actual` matches `expected`."""
    msg = mismatch(actual, expected, dtype, rtol=rtol, atol=atol, ulps=ulps, what=what)
    if msg is not None:
        raise AssertionError(msg)


# ----------------------------------------------------------------------------
# Running ranks in processes
# ----------------------------------------------------------------------------

@dataclass
class RankResult:
    """One rank's outcome: `value` returned by the target when `ok`, else `error` (its
    traceback, or why there is none: killed, exited without a result)."""
    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    exitcode: Optional[int] = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, backend, collective_timeout_s, target, args, conn):
    ok = False
    try:
        import torch.distributed as dist
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=collective_timeout_s))
        reply = ("ok", target(rank, world, *args))
        ok = True
    except BaseException:
        reply = ("error", traceback.format_exc())
    try:
        try:
            conn.send(reply)
        except BaseException:  # e.g. a return value that does not pickle
            ok = False
            conn.send(("error", "could not send the result:\n" + traceback.format_exc()))
        conn.close()
        if ok:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0 if ok else 1)  # a rank whose peers are gone must not wait in gloo's destructors


def run_ranks(world: int, target: Callable, args=(), *, backend: str = "gloo",
              env: Optional[Dict[str, str]] = None, deadline_s: float = 300.0,
              collective_timeout_s: float = 60.0, grace_s: float = 10.0) -> List[RankResult]:
    """Run ``target(rank, world, *args)`` in `world` fresh "spawn" processes, each after
    init_process_group(backend) over a free 127.0.0.1 port -> one RankResult per rank.

    `target` and `args` must pickle (a module-level function); its return value is sent
    back.  backend "nccl" puts rank r on cuda:r.  `env` is in the children's environment
    from their start, before they import anything (set in os.environ while they start).
    Never hangs: once a rank fails (raises, or exits without a result) the others get
    collective_timeout_s + grace_s to finish (their collectives time out by then), and
    at deadline_s after the start every rank still running is killed.
    """
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    saved = {k: os.environ.get(k) for k in (env or {})}
    try:
        os.environ.update(env or {})
        for rank in range(world):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, daemon=True,
                            args=(rank, world, port, backend, collective_timeout_s, target,
                                  tuple(args), send))
            p.start()
            send.close()  # the child's end: EOF here once the child is gone
            procs.append(p)
            conns.append(recv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    start = time.monotonic()
    results: Dict[int, RankResult] = {}
    pending = dict(enumerate(conns))
    failed_at, why = None, ""
    while pending:
        now = time.monotonic()
        if now > start + deadline_s:
            why = f"killed: the deadline of {deadline_s:.0f} s passed"
            break
        if failed_at is not None and now > failed_at + collective_timeout_s + grace_s:
            why = (f"killed: another rank failed and this one did not finish within "
                   f"{collective_timeout_s + grace_s:.0f} s")
            break
        for conn in multiprocessing.connection.wait(list(pending.values()), timeout=0.2):
            rank = next(r for r, c in pending.items() if c is conn)
            del pending[rank]
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):
                procs[rank].join(1)
                status, payload = "error", (f"exited (code {procs[rank].exitcode}) "
                                            "without a result")
            if status == "ok":
                results[rank] = RankResult(rank, True, value=payload)
            else:
                results[rank] = RankResult(rank, False, error=payload)
                failed_at = now if failed_at is None else failed_at
    # ranks that replied exit at once (after destroy_process_group); the others are killed
    end = time.monotonic() + (grace_s if not pending else 0)
    for rank, p in enumerate(procs):
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        if rank not in results:
            results[rank] = RankResult(rank, False, error=why or "killed")
        results[rank].exitcode = p.exitcode
        conns[rank].close()
    return [results[r] for r in range(world)]
