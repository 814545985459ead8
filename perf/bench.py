"""softmax_ce against its peers: time, effective bandwidth and peak memory of cross-entropy.

Two sections, each a declarative table of shapes and providers (below):

* "ce": cross-entropy on given logits (N, V), reduction="mean", class-index targets.
  Providers: softmax_ce (grad_mode "recompute"), softmax_ce_fused, softmax_ce_inplace
  (inplace_backward=True), torch (F.cross_entropy eager), torch_compile, liger
  (liger_kernel's LigerCrossEntropyLoss), quack (quack.cross_entropy); and, to measure
  what the options cost beside the plain loss: softmax_ce_stats (temperature=2.0,
  return_entropy=True, return_argmax=True; the backward differentiates the loss) and
  softmax_ce_teacher (target_logits=True: a second (N, V) tensor of the logits' dtype,
  the teacher's logits, is the target).  Modes:
    forward   the training forward (the logits require grad, so each provider saves what
              its backward needs)
    backward  the backward alone, grad_output a random scalar; each call gets a fresh
              autograd graph built outside the timed region
    fwd+bwd   a training step: forward, then torch.autograd.grad with that grad_output
* "linear": the LM head matmul and the loss, x (N, D) @ W (V, D)^T.  Providers:
  softmax_ce_linear (impl="chunked"), softmax_ce_linear_fused (impl="fused"), torch_chunked
  (torch's F.linear_cross_entropy, torch 2.13+), torch_unfused (F.cross_entropy(F.linear)),
  cce (cut_cross_entropy), liger_fused_linear and matmul_floor: the three matmuls of an
  unfused step (x W^T; g W; g^T x, g a random logits-shaped tensor), the compute floor.

A peer that does not import gets rows with ms empty and note "unavailable: ..."; it is never
estimated.  Peers that need CUDA are "skipped" on CPU.

Numbers, per CSV row:
* ms: CUDA: triton.testing.do_bench's median (it flushes the L2 before every call), cycling
  through enough copies of the logits to exceed twice the L2; the backward mode (and nothing
  else) uses an event timer whose per-call setup, the forward, is untimed.  CPU:
  time.perf_counter, median of --cpu-reps after a warm-up.
* gbps: bytes of the provider's byte model / time, 1e9 B/s.  Per logit element, in units
  of b (the dtype's size):
      recompute (softmax_ce, softmax_ce_inplace)   forward b, backward 2b, fwd+bwd 3b
      fused (softmax_ce_fused)                     forward 3b (reads the row twice, writes
                                                   the gradient), backward 2b (rescale, as
                                                   grad_output != 1), fwd+bwd 5b; for
                                                   V <= 8192 (one tile) forward 2b, 4b in all
      softmax_ce_stats                             as recompute: temperature, entropy and
                                                   argmax add no bytes per element
      softmax_ce_teacher                           recompute + one read of the teacher's row
                                                   per pass: forward 2b, backward 3b,
                                                   fwd+bwd 5b
  Peers are charged the NOMINAL bytes (the recompute model, the least any implementation
  of the plain loss moves), so their gbps is an effective bandwidth; eff_gbps charges every
  provider, ours too, the nominal bytes, so it ranks by time alone.  Linear rows: gbps from
  the nominal reads of x and W per pass (and writes of dx, dW), tflops from 2NVD (forward),
  4NVD (backward), 6NVD (fwd+bwd) for every provider.
* copy_gbps: a --copy-mib device-to-device copy, read + write, once per run: the ceiling.
* peak_mem_mb (MiB): CUDA: torch.cuda.max_memory_allocated during the call minus what was
  allocated before it; peak_beyond_grad_mb also less the new gradient(s) it returns.
  Empty on CPU.

Rows are appended to the CSV as measured (default perf/out/<gpu-key>/bench.csv, git-ignored),
so a run cut short keeps them; a table is printed last, then each option's time against
the plain loss, and on CUDA a summary against GOALS.

Run:
    python perf/bench.py --quick                       # the goal shapes, every provider
    python perf/bench.py                               # the full table (long; --time-budget)
    python perf/bench.py --sections ce --vocab 128256 --rows 8192 --dtypes bf16 \\
        --providers softmax_ce,liger --modes fwd+bwd
    python perf/bench.py --resume --time-budget 400    # continue a cut-short table
    python perf/bench.py --device cpu --vocab 512 --rows 8   # CPU (PyTorch path) smoke run
    TRITON_INTERPRET=1 python perf/bench.py --device cpu --vocab 512 --rows 8 --hidden 32

From Python, ``main([...])`` returns this run's rows (a list of dicts).
"""

import argparse
import gc
import importlib
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import softmax_ce

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

MODES = ("forward", "backward", "fwd+bwd")
MiB = 2 ** 20

# LLM vocabularies (Llama-2 32000, GPT-2 50257, Llama-3 128256, Qwen2 151936, Gemma 256000)
CE_SHAPES = dict(vocab=(4096, 32000, 50257, 128256, 151936, 256000), rows=(4096, 8192, 16384),
                 dtypes=("bf16", "fp32"))
CE_QUICK = dict(vocab=(32000, 128256), rows=(8192,), dtypes=("bf16",))
LINEAR_SHAPES = dict(vocab=(32000, 128256, 256000), rows=(16384,), hidden=(2048, 4096),
                     dtypes=("bf16",))
LINEAR_QUICK = dict(vocab=(128256,), rows=(8192,), hidden=(4096,), dtypes=("bf16",))  # Llama-3-8B
CPU_CE_SHAPES = dict(vocab=(512,), rows=(8,), dtypes=("fp32",))
CPU_LINEAR_SHAPES = dict(vocab=(512,), rows=(8,), hidden=(32,), dtypes=("fp32",))

RECOMPUTE = {"forward": 1, "backward": 2, "fwd+bwd": 3}  # read; read + write; 3 passes
# fused, rows longer than one tile: the forward reads each row twice (the second from HBM at
# LLM sizes) and writes the gradient; the backward rescales it (grad_output is not 1 here)
FUSED = {"forward": 3, "backward": 2, "fwd+bwd": 5}
FUSED_ONE_TILE = {"forward": 2, "backward": 2, "fwd+bwd": 4}  # a one-tile row is read once
TEACHER = {"forward": 2, "backward": 3, "fwd+bwd": 5}  # recompute + the teacher's row per pass
NOMINAL = RECOMPUTE
LINEAR_FLOP = {"forward": 2, "backward": 4, "fwd+bwd": 6}   # x N*V*D
LINEAR_BYTES = {"forward": 1, "backward": 2, "fwd+bwd": 3}  # x (N + V)*D*b
STATS_OPTIONS = dict(temperature=2.0, return_entropy=True, return_argmax=True)


@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable          # () -> loss_fn(*inputs); None for the matmul floor
    bytes: dict = None      # CE: mode -> bytes per logit element / b
    requires: str = ""      # a module that must import, else "unavailable"
    cuda_only: bool = False
    cpu_default: bool = True
    overwrites_input: bool = False  # the logits hold a gradient afterwards: refill them
    floor: bool = False
    teacher: bool = False   # its target is a second (N, V) tensor: the teacher's logits
    option: bool = False    # an option beyond the plain loss: compared with softmax_ce only


def byte_model(provider, vocab):
    """mode -> bytes per logit element / b of `provider` at this vocabulary size."""
    return FUSED_ONE_TILE if provider.bytes is FUSED and vocab <= 8192 else provider.bytes


def _ours(fn, field=None, **options):
    if field is None:
        return lambda: (lambda *a: fn(*a, **options))
    return lambda: (lambda *a: getattr(fn(*a, **options), field))


def _torch_compile():
    torch._dynamo.reset()  # per shape: past its recompile limit Dynamo silently runs eagerly
    return torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)


def _liger():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss()  # mean; writes the gradient into its input


def _quack():
    from quack.cross_entropy import cross_entropy
    return lambda x, t: (lambda loss: loss if loss.dim() == 0 else loss.mean())(cross_entropy(x, t))


def _torch_chunked():
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
    options = LinearCrossEntropyOptions()
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _cce():
    from cut_cross_entropy import linear_cross_entropy
    return lambda x, w, t: linear_cross_entropy(x, w, t)  # its defaults (filter_eps="high")


def _liger_linear():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    module = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: module(w, x, t)  # its order: (lin_weight, input, target)


CE_PROVIDERS = {p.name: p for p in (
    Provider("softmax_ce", _ours(softmax_ce.cross_entropy), RECOMPUTE),
    Provider("softmax_ce_fused", _ours(softmax_ce.cross_entropy, grad_mode="fused"), FUSED),
    Provider("softmax_ce_inplace", _ours(softmax_ce.cross_entropy, inplace_backward=True),
             RECOMPUTE, overwrites_input=True),
    Provider("softmax_ce_stats", _ours(softmax_ce.cross_entropy, "loss", **STATS_OPTIONS),
             RECOMPUTE, option=True),
    Provider("softmax_ce_teacher", _ours(softmax_ce.cross_entropy, target_logits=True), TEACHER,
             teacher=True, option=True),
    Provider("torch", lambda: (lambda x, t: F.cross_entropy(x, t)), NOMINAL),
    Provider("torch_compile", _torch_compile, NOMINAL, cpu_default=False),
    Provider("liger", _liger, NOMINAL, "liger_kernel.transformers", True, overwrites_input=True),
    Provider("quack", _quack, NOMINAL, "quack.cross_entropy", True, overwrites_input=True),
)}
LINEAR_PROVIDERS = {p.name: p for p in (
    Provider("softmax_ce_linear", _ours(softmax_ce.linear_cross_entropy)),
    Provider("softmax_ce_linear_fused", _ours(softmax_ce.linear_cross_entropy, impl="fused")),
    Provider("torch_unfused", lambda: (lambda x, w, t: F.cross_entropy(F.linear(x, w), t))),
    Provider("torch_chunked", _torch_chunked,
             requires="torch.nn.modules.linear_cross_entropy_options"),
    Provider("cce", _cce, requires="cut_cross_entropy", cuda_only=True),
    Provider("liger_fused_linear", _liger_linear, requires="liger_kernel.transformers",
             cuda_only=True),
    Provider("matmul_floor", lambda: None, floor=True),
)}

GOALS = dict(forward_copy_fraction=0.90, forward_min_vocab=32000,  # forward >= 90% of copy
             step_copy_fraction=0.85,                               # fwd+bwd, own byte model
             goal_shape=("bf16", 8192, 128256), vs_liger=2.0, vs_torch_compile=1.5,
             extra_bytes_per_row=1024)  # "O(N)": peak beyond the gradient <= 1 KiB per row

KEY = ["section", "provider", "mode", "dtype", "n_rows", "vocab", "hidden"]
COLUMNS = ["timestamp", "gpu", *KEY, "ms", "gbps", "eff_gbps", "bytes_per_elem", "tflops",
           "peak_mem_mb", "peak_beyond_grad_mb", "copy_gbps", "path", "torch", "triton",
           "git_sha", "note"]


def availability(p, device):
    """'' when the provider can run here, else the note its rows carry."""
    if p.requires:
        try:
            importlib.import_module(p.requires)
        except Exception as exc:  # ImportError, or a peer broken against this torch/triton
            return f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return "skipped: needs CUDA" if p.cuda_only and device.type != "cuda" else ""


def error_note(exc):
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    return f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def cases(loss_fn, mode, inputs, wrt, gout):
    """(fn, setup) timing `mode` over a rotation of input tuples; setup None unless backward."""
    it = itertools.cycle(inputs)
    if mode == "forward":
        return (lambda: loss_fn(*next(it))), None
    if mode == "fwd+bwd":
        def fn():
            args = next(it)
            loss = loss_fn(*args)
            torch.autograd.grad(loss, [args[i] for i in wrt], gout(loss))
        return fn, None
    state = {}

    def setup():
        args = next(it)
        state["wrt"], state["loss"] = [args[i] for i in wrt], loss_fn(*args)
    return (lambda: torch.autograd.grad(state["loss"], state["wrt"], gout(state["loss"]))), setup


def floor_case(mode, x, w, g):
    fwd = lambda: torch.mm(x, w.t())  # noqa: E731
    bwd = lambda: (torch.mm(g, w), torch.mm(g.t(), x))  # noqa: E731
    return {"forward": fwd, "backward": bwd, "fwd+bwd": lambda: (fwd(), bwd())}[mode]


def cuda_peak(run, device, grads_of=None):
    """(peak MiB of run() beyond what is allocated before it, the same less new gradients)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / MiB
    if grads_of is None:
        return peak, None
    own = {t.untyped_storage().data_ptr() for t in grads_of}
    new = sum(g.numel() * g.element_size() for g in out if g.untyped_storage().data_ptr() not in own)
    return peak, peak - new / MiB


def peak_of(loss_fn, mode, args, wrt, gout, device):
    """cuda_peak of one call of `mode` (a backward's forward runs before the measurement)."""
    if mode == "forward":
        return cuda_peak(lambda: loss_fn(*args), device)
    held = loss_fn(*args) if mode == "backward" else None

    def go():
        loss = held if held is not None else loss_fn(*args)
        return torch.autograd.grad(loss, wrt, gout(loss))
    return cuda_peak(go, device, wrt)


class GradOut:
    """The random scalar grad_output in the loss's dtype, made once per dtype/shape."""

    def __init__(self, value, device):
        self.value, self.device, self.cache = value, device, {}

    def __call__(self, loss):
        key = (loss.dtype, tuple(loss.shape))
        if key not in self.cache:
            self.cache[key] = torch.full(loss.shape, self.value, dtype=loss.dtype, device=self.device)
        return self.cache[key]


def row_key(r):
    return tuple(str(r.get(k) or "") for k in KEY)


class Run:
    def __init__(self, a):
        self.a, self.device = a, torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.prov = dict(gpu=C.device_name(self.device), git_sha=C.git_sha(), **C.versions())
        self.t0, self.rows, self.skipped, self.resumed, self.copy_gbps = time.monotonic(), [], [], [], None
        if a.resume and Path(a.csv).exists():
            old = pd.read_csv(a.csv, dtype=str, keep_default_na=False).to_dict("records")
            self.resumed = [r for r in old if r.get("ms") and all(r.get(k) == v for k, v in self.prov.items())]
        self.done = {row_key(r) for r in self.resumed}

    def over_budget(self):
        return self.a.time_budget is not None and time.monotonic() - self.t0 > self.a.time_budget

    def time(self, fn, setup):
        if not self.cuda:
            return C.cpu_median_ms(fn, setup=setup, reps=self.a.cpu_reps)
        if setup is None:
            return C.do_bench_median(fn, warmup_ms=self.a.warmup_ms, rep_ms=self.a.rep_ms)
        return C.cuda_median_ms(fn, setup, rep_ms=self.a.rep_ms)

    def emit(self, row):
        row = dict(timestamp=C.utc_now(), copy_gbps=self.copy_gbps, **self.prov, **row)
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = float(f"{v:.6g}")  # 6 significant digits: tiny CPU rates stay > 0
        self.rows.append(row)
        C.append_rows(self.a.csv, COLUMNS, [row])  # at once: a killed run keeps its rows
        self.bar.update()
        self.bar.set_postfix_str(f"{row['provider']} {row['mode']} V={row['vocab']} "
                                 + (f"{C.sig(row.get('ms'))} ms" if row.get("ms") else row["note"][:40]))

    def shape(self, section, providers, dt, n, v, d, make_inputs, measure):
        """Every (provider, mode) of one shape: inputs made once, rows emitted as measured."""
        base = dict(section=section, dtype=dt, n_rows=n, vocab=v, hidden=d)
        todo = {p.name: [m for m in self.a.modes if row_key(dict(base, provider=p.name, mode=m))
                         not in self.done] for p in providers}
        if not any(todo.values()):
            return
        if self.over_budget():
            self.skipped.append(f"{section} {dt} N={n} V={v}" + (f" D={d}" if d else ""))
            return
        try:
            inputs = make_inputs()
        except Exception as exc:
            for p in providers:
                for m in todo[p.name]:
                    self.emit(dict(base, provider=p.name, mode=m, note="inputs: " + error_note(exc)))
            return self.free()
        for p in (p for p in providers if todo[p.name]):
            if self.over_budget():
                self.skipped.append(f"{section} {p.name} {dt} N={n} V={v}")
                continue
            note, fn = availability(p, self.device), None
            if not note:
                try:
                    fn = p.make()
                except Exception as exc:
                    note = error_note(exc)
            for m in todo[p.name]:
                row = dict(base, provider=p.name, mode=m, note=note)
                if not note:
                    try:
                        measure(p, fn, m, inputs, row)
                    except Exception as exc:  # OOM at a large shape, a broken peer, ...
                        row["note"] = "; ".join(filter(None, [row["note"], error_note(exc)]))
                    gc.collect()
                self.emit(row)
            del fn
            self.free()
        del inputs
        self.free()

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def n_copies(run, nbytes):
    """Input copies to cycle through: together > 2x the L2, at most 8 and a quarter of memory."""
    if not run.cuda:
        return 1
    props = torch.cuda.get_device_properties(run.device)
    want = math.ceil(2 * (getattr(props, "L2_cache_size", 0) or 50 * MiB) / max(nbytes, 1))
    return max(1, min(8, want, int(0.25 * props.total_memory // max(nbytes, 1))))


def run_ce(run, shapes, providers):
    dev = run.device
    for dt, n, v in itertools.product(shapes["dtypes"], shapes["rows"], shapes["vocab"]):
        dtype = C.torch_dtype(dt)
        b = dtype.itemsize
        k = n_copies(run, n * v * b)
        gen = torch.Generator(device=dev).manual_seed(run.a.seed)
        state = {"dirty": False}

        def make():  # handed over as an LM head's output: the in-place providers may overwrite
            xs = [C.handover(torch.randn(n, v, generator=gen, device=dev, dtype=dtype)) for _ in range(k)]
            target = torch.randint(0, v, (n,), generator=gen, device=dev)
            gout = GradOut(float(torch.rand((), generator=gen, device=dev)) * 1.5 + 0.5, dev)
            return xs, target, gout, {}

        def measure(p, loss_fn, m, inputs, row):
            xs, target, gout, teachers = inputs
            if state["dirty"]:  # an in-place provider left gradients in the logits
                with torch.no_grad():
                    for x in xs:
                        x.normal_(generator=gen)
            state["dirty"] |= p.overwrites_input
            if p.teacher and not teachers:  # one teacher per copy of the logits, made once
                teachers.update((i, torch.randn(n, v, generator=gen, device=dev, dtype=dtype))
                                for i in range(k))
            tgts = [teachers[i] for i in range(k)] if p.teacher else [target] * k
            model = byte_model(p, v)
            row.update(bytes_per_elem=model[m] * b, path=C.path_name(xs[0]) if
                       p.name.startswith("softmax_ce") else "", note="; ".join(
                           filter(None, [row["note"], f"{k} input copies" if k > 1 else ""])))
            fn, setup = cases(loss_fn, m, list(zip(xs, tgts)), (0,), gout)
            ms = row["ms"] = run.time(fn, setup)
            row["gbps"] = model[m] * b * n * v / (ms * 1e-3) / 1e9
            row["eff_gbps"] = NOMINAL[m] * b * n * v / (ms * 1e-3) / 1e9
            if run.cuda:
                row["peak_mem_mb"], row["peak_beyond_grad_mb"] = peak_of(
                    loss_fn, m, (xs[0], tgts[0]), [xs[0]], gout, dev)

        run.shape("ce", providers, dt, n, v, "", make, measure)


def run_linear(run, shapes, providers):
    dev = run.device
    for dt, n, v, d in itertools.product(shapes["dtypes"], shapes["rows"], shapes["vocab"],
                                         shapes["hidden"]):
        dtype = C.torch_dtype(dt)
        gen = torch.Generator(device=dev).manual_seed(run.a.seed)

        def make():  # x and W exceed the L2 at the table's shapes: one copy
            return (torch.randn(n, d, generator=gen, device=dev, dtype=dtype).requires_grad_(),
                    (torch.randn(v, d, generator=gen, device=dev, dtype=dtype) * d ** -0.5
                     ).requires_grad_(), torch.randint(0, v, (n,), generator=gen, device=dev),
                    GradOut(float(torch.rand((), generator=gen, device=dev)) * 1.5 + 0.5, dev))

        def measure(p, loss_fn, m, inputs, row):
            x, w, target, gout = inputs
            if p.floor:
                g = torch.randn(n, v, generator=gen, device=dev, dtype=dtype)
                fn, setup = floor_case(m, x.detach(), w.detach(), g), None
            else:
                fn, setup = cases(loss_fn, m, [(x, w, target)], (0, 1), gout)
                row["path"] = C.path_name(x) if p.name.startswith("softmax_ce") else ""
            ms = row["ms"] = run.time(fn, setup)
            row["gbps"] = row["eff_gbps"] = LINEAR_BYTES[m] * (n + v) * d * dtype.itemsize / (ms * 1e-3) / 1e9
            row["tflops"] = LINEAR_FLOP[m] * n * v * d / (ms * 1e-3) / 1e12
            if run.cuda:
                row["peak_mem_mb"], row["peak_beyond_grad_mb"] = (
                    cuda_peak(fn, dev) if p.floor else peak_of(loss_fn, m, (x, w, target), [x, w],
                                                               gout, dev))

        run.shape("linear", providers, dt, n, v, d, make, measure)


def _latest(rows):
    """The latest row per key with a time, numbers as floats (rows may be CSV strings)."""
    df = pd.DataFrame(list({row_key(r): r for r in rows}.values()))
    if df.empty:
        return df
    for c in ("ms", "gbps", "copy_gbps", "peak_beyond_grad_mb", "n_rows", "vocab"):
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df else float("nan")
    return df[(df["section"] == "ce") & df["ms"].notna()]


def goals_report(rows):
    """Lines judging rows (this run's and resumed ones, CSV strings or numbers) against GOALS;
    the latest row per key counts."""
    G, out, ce = GOALS, [], _latest(rows)
    if ce.empty:
        ce = pd.DataFrame(columns=KEY + ["ms", "gbps", "copy_gbps", "peak_beyond_grad_mb"])
    ce = ce.assign(frac=ce["gbps"] / ce["copy_gbps"])

    def judge(label, sel, want):
        sel = sel.dropna(subset=["frac"])
        if sel.empty:
            return f"n/a   {label}: no rows"
        worst, n_ok = sel.loc[sel["frac"].idxmin()], int((sel["frac"] >= want).sum())
        return (f"{'PASS' if n_ok == len(sel) else 'FAIL'}  {label}: {n_ok}/{len(sel)} rows; worst "
                f"{worst['frac']:.1%} ({worst['dtype']}, N={worst['n_rows']:.0f}, V={worst['vocab']:.0f})")
    out.append(judge(f"forward >= {G['forward_copy_fraction']:.0%} of copy bandwidth (softmax_ce, "
                     f"V >= {G['forward_min_vocab']})",
                     ce[(ce["provider"] == "softmax_ce") & (ce["mode"] == "forward")
                        & (ce["vocab"] >= G["forward_min_vocab"])], G["forward_copy_fraction"]))
    for name in [n for n in CE_PROVIDERS if n.startswith("softmax_ce")]:
        out.append(judge(f"fwd+bwd >= {G['step_copy_fraction']:.0%} of copy bandwidth ({name}, its "
                         f"byte model)", ce[(ce["provider"] == name) & (ce["mode"] == "fwd+bwd")],
                         G["step_copy_fraction"]))
    dt, n, v = G["goal_shape"]
    at = ce[(ce["mode"] == "fwd+bwd") & (ce["dtype"] == dt) & (ce["n_rows"] == n) & (ce["vocab"] == v)]
    at = dict(zip(at["provider"], at["ms"]))
    ours = at.get("softmax_ce")
    plain = [p for p in CE_PROVIDERS if p.startswith("softmax_ce") and not CE_PROVIDERS[p].option]
    best = min(((at[p], p) for p in plain if p in at), default=None)
    for peer, want in (("liger", G["vs_liger"]), ("torch_compile", G["vs_torch_compile"])):
        label = f"fwd+bwd >= {want:g}x faster than {peer} at N={n}, V={v}, {dt}"
        if ours is None or at.get(peer) is None:
            out.append(f"n/a   {label}: no rows for softmax_ce and {peer}")
            continue
        sp = at[peer] / ours
        extra = f"; best variant {best[1]} {at[peer] / best[0]:.2f}x" if best[1] != "softmax_ce" else ""
        out.append(f"{'PASS' if sp >= want else 'FAIL'}  {label}: {sp:.2f}x ({ours:.3f} ms vs "
                   f"{at[peer]:.3f} ms){extra}")
    mem = ce[ce["provider"].str.startswith("softmax_ce") & (ce["mode"] == "fwd+bwd")
             & ce["peak_beyond_grad_mb"].notna()]
    if mem.empty:
        return out + ["n/a   peak memory beyond the gradient O(N): no rows"]
    per_row = mem["peak_beyond_grad_mb"] * MiB / mem["n_rows"]
    w = mem.loc[per_row.idxmax()]
    ok = per_row.max() <= G["extra_bytes_per_row"]
    return out + [f"{'PASS' if ok else 'FAIL'}  peak memory beyond the gradient O(N) (<= "
                  f"{G['extra_bytes_per_row']} B/row): worst {per_row.max():.0f} B/row ({w['provider']}, "
                  f"{w['dtype']}, N={w['n_rows']:.0f}, V={w['vocab']:.0f})"]


def options_report(rows):
    """Per shape and mode: each option provider's time over the plain softmax_ce's, beside
    the ratio of their byte models (what a bandwidth-bound kernel would take)."""
    ce, out = _latest(rows), []
    if ce.empty:
        return out
    plain = ce[ce["provider"] == "softmax_ce"].set_index(["dtype", "n_rows", "vocab", "mode"])["ms"]
    for _, r in ce[ce["provider"].map(lambda p: p in CE_PROVIDERS and CE_PROVIDERS[p].option)].iterrows():
        base = plain.get((r["dtype"], r["n_rows"], r["vocab"], r["mode"]))
        if base:
            model = byte_model(CE_PROVIDERS[r["provider"]], r["vocab"])[r["mode"]] / RECOMPUTE[r["mode"]]
            out.append(f"{r['provider']:<20} {r['mode']:<8} {r['dtype']} N={r['n_rows']:.0f} "
                       f"V={r['vocab']:.0f}: {r['ms'] / base:.2f}x softmax_ce's time "
                       f"(byte model {model:.2f}x)")
    return out


def print_tables(rows):
    ce = [dict(r, pct=r["gbps"] / r["copy_gbps"] if r.get("gbps") and r.get("copy_gbps") else None)
          for r in rows if r["section"] == "ce"]
    common = [("provider", "provider", None), ("mode", "mode", None), ("dtype", "dtype", None),
              ("n_rows", "N", "{}"), ("vocab", "V", "{}")]
    if ce:
        print(C.table(ce, common + [("ms", "ms", C.sig), ("gbps", "GB/s", C.sig),
                                    ("pct", "%copy", lambda v: C.sig(100 * v, 2) + "%"),
                                    ("peak_mem_mb", "peak MiB", "{:.1f}"), ("note", "note", None)],
                      na="-"))
    lin = [r for r in rows if r["section"] == "linear"]
    if lin:
        print("\n" + C.table(lin, common + [
            ("hidden", "D", "{}"), ("ms", "ms", C.sig), ("tflops", "TFLOP/s", C.sig),
            ("peak_mem_mb", "peak MiB", "{:.1f}"), ("peak_beyond_grad_mb", "beyond grads", "{:.1f}"),
            ("note", "note", None)], na="-"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", type=C.name_list, default=("ce", "linear"), help="ce,linear")
    p.add_argument("--vocab", type=C.int_list, help="comma list; overrides both sections' table")
    p.add_argument("--rows", type=C.int_list, help="comma list of N (tokens)")
    p.add_argument("--hidden", type=C.int_list, help="comma list of D (linear section)")
    p.add_argument("--dtypes", type=C.name_list, help=f"comma list of {sorted(C.DTYPE_NAMES)}")
    p.add_argument("--providers", type=C.name_list,
                   help=f"comma list of {', '.join([*CE_PROVIDERS, *LINEAR_PROVIDERS])}")
    p.add_argument("--modes", type=C.name_list, default=MODES, help=",".join(MODES))
    p.add_argument("--quick", action="store_true", help="the goal shapes only")
    p.add_argument("--csv", help="CSV to append to (default perf/out/<gpu-key>/bench.csv)")
    p.add_argument("--copy-mib", type=int, help="copy-bandwidth buffer (default 2048 CUDA, 64 CPU)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition time (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=5, help="timed calls per row on CPU")
    p.add_argument("--time-budget", type=float, help="seconds; no new shape starts after it")
    p.add_argument("--resume", action="store_true",
                   help="skip rows the CSV already has for this GPU, versions and git revision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for kind, given, known in (("mode", a.modes, MODES), ("dtype", a.dtypes or (), C.DTYPE_NAMES),
                               ("section", a.sections, ("ce", "linear")),
                               ("provider", a.providers or (), {**CE_PROVIDERS, **LINEAR_PROVIDERS})):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {kind}(s) {', '.join(bad)}; choose from {', '.join(known)}")
    cuda = torch.device(a.device).type == "cuda"
    a.ce_providers = [q for q in CE_PROVIDERS.values()
                      if (q.name in a.providers if a.providers else cuda or q.cpu_default)]
    a.linear_providers = [q for q in LINEAR_PROVIDERS.values() if not a.providers or q.name in a.providers]
    ce = dict(CE_QUICK if a.quick else CE_SHAPES) if cuda else dict(CPU_CE_SHAPES)
    lin = dict(LINEAR_QUICK if a.quick else LINEAR_SHAPES) if cuda else dict(CPU_LINEAR_SHAPES)
    for shapes in (ce, lin):
        shapes.update({k: v for k, v in (("vocab", a.vocab), ("rows", a.rows), ("dtypes", a.dtypes)) if v})
    lin["hidden"] = a.hidden or lin["hidden"]
    a.shapes = {"ce": ce, "linear": lin}
    a.copy_mib = a.copy_mib or (2048 if cuda else 64)
    a.csv = a.csv or str(C.out_dir(C.device_key(a.device)) / "bench.csv")
    return a


def main(argv=None):
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    run = Run(a)
    print(f"softmax_ce bench on {run.prov['gpu']} | softmax_ce path: "
          f"{C.path_name(torch.empty(1, device=run.device))} | torch {run.prov['torch']} | triton "
          f"{run.prov['triton']} | git {run.prov['git_sha']} | csv {a.csv}\n"
          "gbps: bytes of each provider's byte model / time (peers: nominal = recompute model, "
          "i.e. effective bandwidth); see the module docstring", flush=True)
    run.copy_gbps = C.copy_gbps(run.device, a.copy_mib * MiB)
    print(f"copy bandwidth ({a.copy_mib} MiB, read + write, median): {C.sig(run.copy_gbps)} GB/s",
          flush=True)
    sections = [(s, run_ce if s == "ce" else run_linear, a.ce_providers if s == "ce" else
                 a.linear_providers) for s in ("ce", "linear") if s in a.sections]
    total = sum(math.prod(len(v) for v in a.shapes[s].values()) * len(ps) * len(a.modes)
                for s, _, ps in sections)
    run.bar = tqdm(total=total - len(run.done), desc="bench", unit="row", file=sys.stderr,
                   disable=a.no_progress)
    try:
        for s, fn, providers in sections:
            if providers:
                fn(run, a.shapes[s], providers)
    finally:
        run.bar.close()
    print()
    print_tables(run.rows)
    if run.resumed:
        print(f"\n--resume: {len(run.resumed)} rows already in {a.csv} were not re-measured")
    if run.skipped:
        print(f"\ntime budget ({a.time_budget:g} s) spent; not measured: " + "; ".join(run.skipped))
    options = options_report([*run.resumed, *run.rows])
    if options:
        print("\noptions against the plain loss:\n" + "\n".join("  " + line for line in options))
    print()
    if run.cuda:
        print("goals:\n" + "\n".join("  " + line for line in goals_report([*run.resumed, *run.rows])))
    else:
        print("goals: judged on CUDA only (this was a CPU run)")
    return run.rows


if __name__ == "__main__":
    main()
