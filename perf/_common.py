"""Helpers shared by the perf/ scripts (main.py, cpu_memory.py, linear_memory.py,
distributed.py, bench.py, autotune.py, plot.py).

Not a script and not part of the package: each of those scripts loads this file by
its path (the few lines under their imports show how; ``load_module()`` below does the
same for a script), so they run as ``python perf/x.py`` from a checkout with nothing
added to sys.path.

What lives here, and why once:
* provenance of every result row (device name and its file-name key, torch/triton
  versions, git revision, UTC timestamp) and of every printed header (CPU model, core
  count and load average, installed package versions);
* the timers: `triton.testing.do_bench` with a median across Triton versions, a
  CUDA-event timer whose per-call setup (restoring an in-place buffer, building an
  autograd graph) stays outside the timed region, and a perf_counter timer for CPU;
* the device-to-device copy bandwidth, the ceiling every memory-bound row is read against;
* resident memory on Linux (RSS, its high-water mark VmHWM and the clear_refs reset),
  for the CPU memory measurements of main.py, cpu_memory.py and linear_memory.py;
* CSV appending/reading, a progress bar, a plain-text table.

Nothing here imports triton or softmax_ce at module level: autotune.py must set
TRITON_INTERPRET before Triton is first imported (Triton fixes the interpreter mode
when it decorates a kernel).
"""

import csv
import datetime
import importlib.util
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PERF_DIR / "results"

# Short names on the command line and in the CSV -> torch dtype attribute names.
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# do_bench flushes the L2 with a 256 MB buffer; our own timer does the same.
FLUSH_BYTES = 256 << 20
DEFAULT_L2_BYTES = 50 << 20  # H100's L2, where the device does not report its own


def load_module(name: str, path: Path):
    """Import a perf script by file path (perf/ is not a package and is not on sys.path)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------

def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def torch_dtype(short: str):
    import torch

    return getattr(torch, DTYPE_NAMES[short])


def dtype_short(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return {v: k for k, v in DTYPE_NAMES.items()}.get(name, name)


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def versions() -> dict:
    import torch

    return {"torch": torch.__version__, "triton": triton_version()}


def git_sha() -> str:
    """The checkout's revision (with -dirty for uncommitted changes), or 'unknown'.

    SOFTMAX_CE_GIT_SHA overrides it, for a copy of the tree without .git (the GPU
    machine receives a copy of the working tree)."""
    forced = os.environ.get("SOFTMAX_CE_GIT_SHA", "").strip()
    if forced:
        return forced
    if shutil.which("git") is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(PERF_DIR), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def load_average(label: str = "load") -> str:
    """', load 1.23': the 1-minute load average (CPU times swing with whatever else runs),
    or '' where the platform has none."""
    return f", {label} {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""


def cpu_description(cores=None, load_label=None) -> str:
    """'<model>, <cores> cores' (cores: os.cpu_count() unless given), then the load
    average under load_label when one is asked for."""
    cores = os.cpu_count() if cores is None else cores
    load = "" if load_label is None else load_average(load_label)
    return f"{cpu_model()}, {cores} cores{load}"


def package_version(name: str) -> str:
    """An installed distribution's version, read from its metadata (nothing is imported),
    or 'not installed'."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_name(device) -> str:
    """'NVIDIA H100 80GB HBM3' for a GPU; 'cpu (<model>)' for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()})"


def name_key(name: str) -> str:
    """File-name key of a device name; the same rule as softmax_ce.kernels.tuning.device_key,
    so perf/results/<key>/ and kernels/tuned/<key>.json name a GPU alike."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_key(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return name_key(torch.cuda.get_device_name(device))
    return "cpu"


def results_dir(key: str) -> Path:
    return RESULTS_DIR / key


# ----------------------------------------------------------------------------
# Timers (all return milliseconds)
# ----------------------------------------------------------------------------

def l2_bytes(device) -> int:
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


class L2Flush:
    """Zeroes a buffer larger than the L2 (as do_bench does), so the next call starts cold."""

    def __init__(self, device):
        import torch

        n = max(FLUSH_BYTES, 2 * l2_bytes(device))
        self.buf = torch.empty(n, dtype=torch.int8, device=device)

    def __call__(self):
        self.buf.zero_()


def do_bench_median(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """triton.testing.do_bench's median, in ms.

    Its signature moved across Triton releases (fast_flush went away in 3.2,
    return_mode='median' arrived in 3.0, 'all' later), so only the keywords this
    Triton has are passed: return_mode='median' where accepted, else the 0.5 quantile.
    do_bench flushes the L2 before every timed call itself."""
    import inspect

    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    kwargs = {}
    if "warmup" in params:
        kwargs["warmup"] = warmup_ms
    if "rep" in params:
        kwargs["rep"] = rep_ms
    if "return_mode" in params:
        try:
            return float(do_bench(fn, return_mode="median", **kwargs))
        except (AssertionError, ValueError, TypeError):
            pass  # a Triton without 'median': fall through to the quantile
    out = do_bench(fn, quantiles=[0.5], **kwargs)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return float(out)


def cuda_median_ms(fn, setup=None, flush=None, warmup: int = 2, rep_ms: float = 100,
                   min_reps: int = 5, max_reps: int = 200) -> float:
    """Median of CUDA-event-timed calls of fn; setup() and the L2 flush run before each
    call, outside the timed region (do_bench cannot leave a setup out of the timing).

    Used where each call needs fresh state: an in-place kernel's input restored, an
    autograd graph rebuilt for a backward."""
    import torch

    def one():
        if setup is not None:
            setup()
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    for _ in range(max(1, warmup)):  # compiles, autotunes, lazy inits
        one()
    torch.cuda.synchronize()
    s, e = one()
    torch.cuda.synchronize()
    estimate = max(s.elapsed_time(e), 1e-3)
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    events = [one() for _ in range(reps)]
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cpu_median_ms(fn, setup=None, warmup: int = 1, reps: int = 5) -> float:
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def copy_gbps(device, nbytes: int, cpu_reps: int = 5) -> float:
    """Device-to-device copy bandwidth, GB/s (1e9 B/s), counting bytes read + written:
    the practical ceiling for a streaming kernel on this device, measured in the same
    run as the rows it is compared with."""
    import torch

    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    try:
        if device.type == "cuda":
            ms = do_bench_median(lambda: dst.copy_(src))
        else:
            ms = cpu_median_ms(lambda: dst.copy_(src), warmup=1, reps=cpu_reps)
    finally:
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------
# Resident memory (Linux /proc; ru_maxrss as the fallback)
# ----------------------------------------------------------------------------

# glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) in the measuring subprocesses: with
# glibc's default, buffers under 32 MB freed by a warm-up step stay cached (resident) in
# the heap and the next step reuses them without raising RSS; at 1 MiB every freed
# buffer goes back to the OS at once, so an RSS delta counts what the step holds live.
MMAP_THRESHOLD = 1 << 20


def handover(x):
    """x as an LM head hands its logits to the loss: an intermediate of the autograd graph
    (not a leaf, not a view of one) sharing x's storage, no copy.  inplace_backward refuses
    a leaf that requires grad, as torch refuses in-place ops on one; a benchmark owns its
    buffers, so it measures the in-place modes on such a handed-over tensor, and the
    gradient is taken with torch.autograd.grad(loss, handover_output)."""
    import torch

    class _Handover(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.detach()

        @staticmethod
        def backward(ctx, g):
            return g

    return _Handover.apply(x.detach().requires_grad_())


def rss_kib() -> int:
    """This process's resident set now, KiB."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss():
    """-> (KiB, source): this process's resident high-water mark, from VmHWM where /proc
    has it, else from ru_maxrss.

    ru_maxrss is max(this address space's high-water mark, the signal struct's
    maxrss), and exec folds the spawning process's address space into the latter, so
    a fresh subprocess starts with ru_maxrss at least its parent's peak (here: the
    parent holding the inputs and the reference).  VmHWM is the address space's own
    mark, the one clear_refs resets; ru_maxrss is only the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM"
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def peak_rss_kib() -> int:
    """This process's resident high-water mark, KiB (see peak_rss)."""
    return peak_rss()[0]


def reset_peak_rss() -> bool:
    """Lower this process's high-water mark to its current RSS (Linux >= 4.0);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------
# CSV, progress, tables
# ----------------------------------------------------------------------------

def append_rows(path, columns, rows) -> Path:
    """Append rows (dicts) to a CSV, writing the header when the file is new.  A file
    whose header differs (an older column set) is moved aside, never mixed into."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(columns):
            aside = path.with_name(f"{path.stem}.old-{utc_now().replace(':', '')}{path.suffix}")
            path.rename(aside)
            print(f"[perf] {path} had other columns; moved to {aside}", file=sys.stderr)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def read_rows(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def as_float(v):
    """CSV cell -> float, or None for empty / non-numeric."""
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class Progress:
    """tqdm when it is installed, else one rewritten stderr line."""

    def __init__(self, total: int, desc: str, disable: bool = False):
        self.total, self.desc, self.n, self.disable = total, desc, 0, disable
        self._bar = None
        if not disable:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, postfix: str = ""):
        self.n += 1
        if self.disable:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(1)
        else:
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} {postfix[:70]:<70}")
            sys.stderr.flush()

    def close(self):
        if self.disable:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


def format_table(rows, columns) -> str:
    """columns: [(key, title, format)]; None / '' cells print as '-'."""
    cells = [[title for _, title, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None or v == "":
                line.append("-")
            elif isinstance(v, (int, float)) and fmt:
                line.append(fmt.format(v))
            else:
                line.append(str(v))
        cells.append(line)
    return layout_table(cells)


def layout_table(cells, left=(0,)) -> str:
    """cells: the title row, then one list of strings per row.  Columns whose index is in
    `left` are left-aligned, the others right-aligned; a rule of dashes under the titles."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    out = []
    for k, c in enumerate(cells):
        out.append("  ".join(s.ljust(w) if i in left else s.rjust(w)
                             for i, (s, w) in enumerate(zip(c, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def int_list(s):
    """argparse type: "1,2,3" -> (1, 2, 3)."""
    return tuple(int(x) for x in s.split(",") if x.strip())


def name_list(s):
    """argparse type: "a, b" -> ("a", "b")."""
    return tuple(x.strip() for x in s.split(",") if x.strip())
