"""What the perf/ scripts share: provenance, timers, the copy ceiling, the one child-process
memory harness, CSV and table formatting.  Not a script: each script loads this file by its
path (perf/ is not a package).  Nothing here imports triton or softmax_ce at module level
(autotune.py sets TRITON_INTERPRET before Triton is first imported)."""

import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PERF_DIR / "results"   # committed results: perf/results/<gpu-key>/
OUT_DIR = PERF_DIR / "out"           # default output of every run: git-ignored
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MMAP_THRESHOLD = 1 << 20  # glibc mmap threshold in memory children: freed buffers leave RSS
CHILD_MARK = "PERF_CHILD_RESULT "


def load_module(name, path):
    """Import a perf script by file path, once per process."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses need this
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


# ---------------------------------------------------------------- provenance

def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def torch_dtype(short):
    import torch
    return getattr(torch, DTYPE_NAMES[short])


def package_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions():
    import torch
    return {"torch": torch.__version__, "triton": package_version("triton")}


def git_sha():
    """The checkout's revision (-dirty with uncommitted changes); SOFTMAX_CE_GIT_SHA overrides
    it for a copy of the tree without .git."""
    forced = os.environ.get("SOFTMAX_CE_GIT_SHA", "").strip()
    if forced:
        return forced
    try:
        out = subprocess.run(["git", "-C", str(PERF_DIR), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_description(cores=None, load_label=None):
    """'<model>, <cores> cores[, <load_label> 1.23]'."""
    load = f", {load_label} {os.getloadavg()[0]:.2f}" if load_label and hasattr(os, "getloadavg") else ""
    return f"{cpu_model()}, {cores or os.cpu_count()} cores{load}"


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def path_name(t):
    """Which softmax_ce back end a tensor takes: 'CUDA Triton kernels', 'Triton interpreter'
    or 'PyTorch path'."""
    from softmax_ce import _launch
    if not _launch.uses_triton(t):
        return "PyTorch path"
    return "Triton interpreter" if interpreting() else "CUDA Triton kernels"


def device_name(device):
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"


def device_key(device):
    """File-name key of a device (softmax_ce.kernels.tuning.device_key's rule; 'cpu')."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def out_dir(key):
    return OUT_DIR / key


# ---------------------------------------------------------------- timers (ms)

def do_bench_median(fn, warmup_ms=25, rep_ms=100):
    """triton.testing.do_bench's median (it flushes the L2 before every call)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cuda_median_ms(fn, setup, warmup=2, rep_ms=100, min_reps=5, max_reps=200):
    """Median of CUDA-event-timed fn() calls with setup() and do_bench's own L2 flush before
    each, untimed (do_bench cannot leave a per-call setup out of the timing)."""
    import torch
    from triton import runtime
    cache = runtime.driver.active.get_empty_cache_for_benchmark()

    def one():
        setup()
        runtime.driver.active.clear_cache(cache)
        ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev[0].record()
        fn()
        ev[1].record()
        return ev

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    s, e = one()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(min_reps, rep_ms / max(s.elapsed_time(e), 1e-3))))
    events = [one() for _ in range(reps)]
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cpu_median_ms(fn, setup=None, warmup=1, reps=5):
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_medians(steps, runs):
    """{name: step()} -> ({name: median seconds}, {name: [seconds per run]}), after one
    warm-up call each, the steps taken in turn in every run so a change of load hits all."""
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    for _ in range(runs):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def copy_gbps(device, nbytes, cpu_reps=5):
    """Device-to-device copy bandwidth (bytes read + written, 1e9 B/s, median): the ceiling a
    streaming kernel can reach on this device."""
    import torch
    device = torch.device(device)
    src = torch.ones(max(1, nbytes // 4), device=device)
    dst = torch.empty_like(src)
    ms = (do_bench_median(lambda: dst.copy_(src)) if device.type == "cuda"
          else cpu_median_ms(lambda: dst.copy_(src), reps=cpu_reps))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def handover(x):
    """x as an LM head hands its logits to the loss: a non-leaf sharing x's storage (the
    in-place modes refuse a leaf, as torch does); differentiate with autograd.grad."""
    import torch

    class _Handover(torch.autograd.Function):
        forward = staticmethod(lambda ctx, t: t.detach())
        backward = staticmethod(lambda ctx, g: g)
    return _Handover.apply(x.detach().requires_grad_())


# ---------------------------------------------------------------- the memory harness

def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kib():
    """VmHWM (the address space's own high-water mark; ru_maxrss only as the fallback:
    it folds in the parent's peak at exec)."""
    try:
        return next(int(line.split()[1]) for line in open("/proc/self/status")
                    if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_peak(step, warmup=None):
    """In a (fresh) process: warmup(), then step() once -> dict(peak_mib: peak RSS during it
    beyond the RSS before it, None when an earlier high-water mark could hide it; seconds;
    value: step()'s return)."""
    if warmup is not None:
        warmup()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := RSS now
        reset = True
    except OSError:
        reset = False
    base, before = _rss_kib(), _peak_kib()
    t0 = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - t0
    peak = _peak_kib()
    known = reset or peak > before
    return dict(peak_mib=max(0, peak - base) / 1024 if known else None, seconds=seconds,
                value=value)


def child_result(result):
    """What a memory child prints for its parent (see run_child)."""
    print(CHILD_MARK + json.dumps(result), flush=True)


def run_child(script, argv, env=None, timeout=None):
    """Run `python script *argv` fresh, with glibc's mmap threshold pinned so freed buffers
    leave RSS -> (its child_result dict, None) or (None, why it failed)."""
    if not os.path.exists("/proc/self/statm"):
        return None, "resident memory is not measurable here (no /proc)"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), **(env or {}))
    try:
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):]), None
    why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
           else f"exit status {proc.returncode}")
    return None, f"{why}: {proc.stderr.strip()[-1500:]}"


# ---------------------------------------------------------------- numbers, tables, CSV

def sig(x, digits=3):
    """x to `digits` significant figures, never in exponent form: 0.00123, 1.23, 3020."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    d = digits - 1 - math.floor(math.log10(abs(x)))
    return f"{round(x, d):.{max(0, d)}f}"


def table(rows, columns, na="n/a"):
    """rows: dicts; columns: [(key, title, format or callable)] -> pandas' plain-text table."""
    import pandas as pd

    def cell(v, fmt):
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            return na
        return fmt(v) if callable(fmt) else (fmt.format(v) if fmt else str(v))
    df = pd.DataFrame([[cell(r.get(k), f) for k, _, f in columns] for r in rows],
                      columns=[t for _, t, _ in columns])
    return df.to_string(index=False)


def append_rows(path, columns, rows):
    """Append rows to a CSV (header when new); a file with other columns is moved aside."""
    import pandas as pd
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        if list(pd.read_csv(path, nrows=0).columns) != list(columns):
            aside = path.with_name(f"{path.stem}.old-{utc_now().replace(':', '')}{path.suffix}")
            path.rename(aside)
            print(f"[perf] {path} had other columns; moved to {aside}", file=sys.stderr)
    new = not path.exists() or not path.stat().st_size
    pd.DataFrame(list(rows), columns=list(columns)).to_csv(path, mode="a", header=new,
                                                          index=False)
    return path


def int_list(s):
    return tuple(int(x) for x in s.split(",") if x.strip())


def name_list(s):
    return tuple(x.strip() for x in s.split(",") if x.strip())


def tqdm_iter(items, desc, disable=False):
    """A progress bar over items, on stderr."""
    from tqdm import tqdm
    return tqdm(items, desc=desc, file=sys.stderr, disable=disable)
