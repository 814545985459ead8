"""Sweep the launch configs of softmax_ce's Triton kernels and write the winners into the
per-GPU tuned table (softmax_ce/kernels/tuned/<device-key>.json, read by
softmax_ce.kernels.tuning.config_for).

For each kernel (ce_fwd, ce_bwd, ce_scale; lce_fwd, lce_bwd with --linear) and each
(vocabulary size, dtype), every config of the kernel's own list (fwd_configs(),
bwd_configs(), scale_configs(), lce_configs()) is launched on the RAW @triton.jit kernel
with the arguments the package's launcher (softmax_ce/_triton_path.py)
passes, for the common case the table is tuned for: class-index targets, no class
weight, label smoothing, z-loss, softcap or bias, reduction "mean" (alpha = 1/N).
Arguments are matched to the kernel's parameters BY NAME (ARG_ROLES below), so a
renamed or added parameter stops the sweep with a message instead of silently feeding
the wrong tensor.

Each (kernel, dtype, V) group may time several launch variants, since the table keeps
one config for all of them (its key is kernel, dtype and V only):
    ce_fwd   recompute (WRITE_GRAD=False, the default strategy)   <- chooses the winner
             fused (WRITE_GRAD=True), fused_inplace (gradient over the logits)   [--variants all]
    ce_bwd   recompute (gradient into a new buffer)                <- chooses the winner
             inplace (gradient over the logits)                                  [--variants all]
    ce_scale scale (in place by nature)                            <- chooses the winner
    lce_fwd  stats; lce_bwd dx+dW (COMPUTE_DB=False)               <- each its own winner
The winner is the config with the lowest median time on the primary variant, among the
configs whose results check out against a float32 PyTorch reference (rows sampled).

Timing: CUDA events around each launch, median over ~--rep-ms of calls after warm-up;
before every call, untimed, the state a launch consumes is restored (an in-place
variant's logits copied back from a pristine copy, ce_scale's gradient, the LCE
accumulators zeroed) and the L2 is flushed, so no trial sees another's output and no
input is corrupted.  CPU (the Triton interpreter): time.perf_counter, the same setup.

Output:
* a CSV row per (variant, config), with ms, GB/s (the kernel docstring's byte model:
  ce_fwd b, or 3b with the gradient (2b for one-tile rows), ce_bwd 2b, ce_scale 2b per
  logit element) or TFLOP/s (LCE, the
  kernels' own work: 2NVD forward, 6NVD backward, which recomputes the logits), status
  and the winner mark: perf/results/<gpu-key>/autotune.csv;
* the winners, merged into <table-dir>/<device-key>.json (metadata: device, torch,
  triton, timestamps, the flags tuned for, the tuning shape; per-entry timings under
  "timings").  The table is rewritten after every finished group, so a run cut short
  keeps its winners.

--dry-run (automatic without CUDA) runs the same machinery on a tiny shape with a few
configs; on a CPU through Triton's interpreter (set here before Triton is imported),
with the device key "cpu-interpreter".  A dry run never writes into the package's
kernels/tuned/: its table goes to --table-dir, default perf/results/<key>/dry-run/.

Run:
    python perf/autotune.py                                  # ce kernels, bf16 + fp32
    python perf/autotune.py --linear --time-budget 300       # + LCE kernels, bounded
    python perf/autotune.py --vocab 128256 --dtypes bf16 --kernels ce_fwd --variants all
    python perf/autotune.py --skip-tuned                     # only what the table lacks
    python perf/autotune.py --dry-run --table-dir /tmp/t --csv /tmp/t/autotune.csv

From Python, ``main([...])`` returns a dict: csv, table, device_key, rows, winners.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Triton fixes interpreted-or-compiled when it decorates a kernel, i.e. when
# softmax_ce.kernels is first imported: without a GPU the interpreter must be on first.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from softmax_ce.kernels import cross_entropy as CE  # noqa: E402
from softmax_ce.kernels import linear_cross_entropy as LCE  # noqa: E402
from softmax_ce.kernels import tuning  # noqa: E402
from softmax_ce.testing import mismatch  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)
from tqdm import tqdm  # noqa: E402

# ----------------------------------------------------------------------------
# What is swept
# ----------------------------------------------------------------------------

# Priority order: the goal vocabulary first; 50257 last, being the one size not a
# multiple of 16 (Triton specialises on that, so it recompiles every config).
VOCAB = (128256, 32000, 151936, 256000, 4096, 50257)
DTYPES = ("bf16", "fp32")
ROWS = 8192
LCE_VOCAB = (128256, 32000, 151936, 256000, 50257)
LCE_DTYPES = ("bf16",)
LCE_ROWS, LCE_HIDDEN = 8192, 4096

# The dry run's tiny problem.  Its dtype: bf16 on a GPU (what the configs are for: some
# fp32 LCE tiles exceed the shared memory), fp32 through the interpreter (Triton 3.9's
# interpreter computes tl.dot of bf16 operands wrongly).
DRY = dict(vocab=(100,), dtypes=("fp32",), cuda_dtypes=("bf16",), rows=4, lce_rows=16, hidden=32,
           max_configs=3)

# The flags every trial runs with, unless its variant says otherwise: the common case.
DEFAULT_FLAGS = dict(PROB_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_ZLOSS=False,
                     HAS_SOFTCAP=False, WRITE_GRAD=False, WRITE_STATS=False, HAS_BIAS=False,
                     HAS_CLASS_WEIGHT=False, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=False,
                     UPCAST_DOT=False, ONE_TILE=False, HAS_FILTER=False, WRITE_TOKEN_STATS=False,
                     TEACHER=False, TEACHER_KL=False, HAS_ENT_GRAD=False)  # the GPU path never upcasts; the dry run is fp32
TUNED_FOR = ("class-index targets; no class weight, label smoothing, z-loss, softcap or bias; "
             "reduction mean. Other flag combinations and the fused/in-place launches use the "
             "same entry (the table is keyed by kernel, dtype and vocabulary size only).")

# Pointer parameters that the common case never reads: the launcher passes another
# fp32 row vector in their place, and so do we.
PLACEHOLDERS = {"weight_ptr", "beta_ptr", "zeta_ptr", "stats_ptr", "bias_ptr", "cw_ptr",
                "entropy_ptr", "argmax_ptr", "teacher_ptr", "ent_ptr"}


@dataclass(frozen=True)
class Variant:
    name: str
    primary: bool = False   # its times choose the table's winner
    flags: dict = field(default_factory=dict)
    inplace: bool = False   # the gradient is written over the logits
    bytes: int = 0          # per logit element, in units of the dtype's size (CE kernels)
    flop: int = 0           # in units of N*V*D (LCE kernels)


@dataclass(frozen=True)
class KernelSpec:
    raw: object             # the @triton.jit kernel
    configs: object         # () -> [triton.Config]; the LCE kernels' take the inputs' dtype
    variants: tuple
    linear: bool = False

    def config_list(self, dtype):
        return self.configs(dtype) if self.linear else self.configs()


KERNELS = {
    "ce_fwd": KernelSpec(CE.ce_fwd_kernel, CE.fwd_configs, (
        Variant("recompute", primary=True, flags=dict(WRITE_GRAD=False), bytes=1),
        # 3: two reads of a row longer than its tile (the second from HBM at LLM sizes),
        # one write; rows of one tile move 2 (the sweep's GB/s use 3 for V > BLOCK_V)
        Variant("fused", flags=dict(WRITE_GRAD=True), bytes=3),
        Variant("fused_inplace", flags=dict(WRITE_GRAD=True), inplace=True, bytes=3),
    )),
    "ce_bwd": KernelSpec(CE.ce_bwd_kernel, CE.bwd_configs, (
        Variant("recompute", primary=True, bytes=2),
        Variant("inplace", inplace=True, bytes=2),
    )),
    "ce_scale": KernelSpec(CE.ce_scale_kernel, CE.scale_configs, (
        Variant("scale", primary=True, inplace=True, bytes=2),
    )),
    "lce_fwd": KernelSpec(LCE.lce_fwd_kernel, lambda dtype=None: LCE.lce_configs("fwd", dtype), (
        Variant("stats", primary=True, flop=2),
    ), linear=True),
    "lce_bwd": KernelSpec(LCE.lce_bwd_kernel, lambda dtype=None: LCE.lce_configs("bwd", dtype), (
        # 6 NVD: the kernel recomputes the logits tile (2) before G W and G^T x (2 + 2)
        Variant("dx_dw", primary=True, flags=dict(COMPUTE_DX=True, COMPUTE_DW=True,
                                                  COMPUTE_DB=False), flop=6),
    ), linear=True),
}
CE_KERNELS = ("ce_fwd", "ce_bwd", "ce_scale")
LCE_KERNELS = ("lce_fwd", "lce_bwd")

COLUMNS = ["timestamp", "gpu", "kernel", "variant", "primary", "dtype", "n_rows", "vocab",
           "hidden", "config", "BLOCK_V", "BLOCK_N", "BLOCK_D", "GROUP_N", "num_warps",
           "num_stages", "ms", "gbps", "tflops", "status", "winner", "torch", "triton", "git_sha"]

GRAD_OUT = 0.75   # the backward's grad_output (a scalar, as with reduction "mean")
SCALE = 0.5       # ce_scale's factor: not 1.0, which the kernel skips
CHECK_ROWS = 64   # rows compared against the reference after each config


# ----------------------------------------------------------------------------
# Arguments by parameter name
# ----------------------------------------------------------------------------

def _is_constexpr(param) -> bool:
    ann = param.annotation
    return ann is tl.constexpr or (isinstance(ann, str) and "constexpr" in ann)


def launch_args(kernel_name, raw, values, flags, meta, placeholder):
    """(positional args, constexpr kwargs) for `raw`, every parameter matched by name.

    values: runtime arguments by parameter name (names a kernel lacks are ignored, so
    one dict serves the kernels' past and present signatures); flags: constexprs;
    meta: the config's meta-parameters (BLOCK_*, passed by the caller)."""
    import inspect

    args, kwargs = [], {}
    for p in inspect.signature(raw.fn).parameters.values():
        if _is_constexpr(p):
            if p.name in meta:
                continue
            if p.name in flags:
                kwargs[p.name] = flags[p.name]
            elif p.name in DEFAULT_FLAGS:
                kwargs[p.name] = DEFAULT_FLAGS[p.name]
            else:
                raise KeyError(f"{kernel_name}: constexpr {p.name!r} is unknown to perf/autotune.py "
                               f"(the kernel changed: add it to DEFAULT_FLAGS)")
        elif p.name in values:
            args.append(values[p.name])
        elif p.name in PLACEHOLDERS:
            args.append(placeholder)
        else:
            raise KeyError(f"{kernel_name}: parameter {p.name!r} is unknown to perf/autotune.py "
                           f"(the launcher's arguments changed: add its role to the problem's "
                           f"values)")
    return args, kwargs


@dataclass
class Call:
    """One launch of a raw kernel, every argument bound: calling it launches the kernel;
    compile() only compiles it, for the current driver's target (perf/compile_report.py
    binds a driver that compiles for a GPU without one).  Both specialise on the same
    tensors, so a report on a call describes the binary a launch would run."""
    raw: object
    grid: tuple
    args: list
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self):
        self.raw[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                            num_stages=self.num_stages)

    def compile(self):
        return self.raw.warmup(*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages, grid=self.grid)


def config_dict(cfg) -> dict:
    """A triton.Config as the tuned table stores it: meta-parameters + num_warps/num_stages."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def pick_configs(configs, limit):
    """All configs, or `limit` of them spread evenly over the list (dry runs)."""
    if not limit or limit >= len(configs):
        return list(configs)
    step = (len(configs) - 1) / max(1, limit - 1)
    return [configs[round(i * step)] for i in range(limit)]


# ----------------------------------------------------------------------------
# Problems: the tensors of one (dtype, shape), their reference, and per-variant launches
# ----------------------------------------------------------------------------

def _close(actual, ref, dtype) -> bool:
    """A trial's output is finite and within |a - r| <= rtol |r| + atol max|r| of its fp32
    reference (softmax_ce.testing.mismatch; bf16 / fp16 2e-2, 2e-2, else 1e-4, 1e-5)."""
    if not torch.isfinite(actual).all():
        return False
    rtol, atol = (2e-2, 2e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-5)
    return mismatch(actual, ref, dtype, rtol=rtol, atol=atol) is None


class CEProblem:
    """Logits (N, V) of one dtype and everything the three CE kernels read or write."""

    def __init__(self, n, v, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        f32 = dict(dtype=torch.float32, device=device)
        self.n, self.v, self.dtype, self.device = n, v, dtype, device
        self.pristine = torch.randn(n, v, generator=gen, device=device, dtype=dtype)
        self.logits = self.pristine.clone()
        self.target = torch.randint(0, v, (n,), generator=gen, device=device)
        self.grad = torch.empty_like(self.pristine)
        self.alpha = torch.full((n,), 1.0 / n, **f32)
        self.loss, self.mx, self.logd, self.dlse = (torch.empty(n, **f32) for _ in range(4))
        # the forward's saved statistics and the backward's coefficients, as
        # CrossEntropyFunction.backward computes them for grad_output = GRAD_OUT
        self.ref_mx, self.ref_logd = self._row_stats()
        self.ref_lse = self.ref_mx + self.ref_logd
        self.s_coef = self.alpha * GRAD_OUT
        self.alpha_b = self.alpha * GRAD_OUT
        self.dirty = False  # the logits hold an in-place variant's gradient
        self.scale = torch.full((1,), SCALE, **f32).expand(n)  # a scalar: stride 0
        self.rows = slice(0, min(n, CHECK_ROWS))

    def _row_stats(self, chunk=1024):
        mx = torch.empty(self.n, dtype=torch.float32, device=self.device)
        logd = torch.empty_like(mx)
        for r0 in range(0, self.n, chunk):
            z = self.pristine[r0:r0 + chunk].float()
            m = z.amax(dim=1)
            mx[r0:r0 + chunk] = m
            logd[r0:r0 + chunk] = (z - m[:, None]).exp().sum(dim=1).log()
        return mx, logd

    def _ref_grad(self, s_coef, alpha):
        r = self.rows
        z = self.pristine[r].float()
        g = (z - self.ref_lse[r, None]).exp() * s_coef[r, None]
        g[torch.arange(g.shape[0], device=g.device), self.target[r]] -= alpha[r]
        return g

    def launch(self, kernel, variant, cfg):
        """-> (launch(), setup(), check() -> bool, elements) for one config."""
        spec = KERNELS[kernel]
        meta = dict(cfg.kwargs)
        x = self.logits
        out_grad = x if variant.inplace else self.grad
        flags = dict(variant.flags)
        if kernel == "ce_scale":
            g = self.grad
            values = dict(grad_ptr=g, scale_ptr=self.scale, n_cols=self.v,
                          stride_grad_row=g.stride(0), stride_grad_col=g.stride(1),
                          stride_scale=self.scale.stride(0))
            flags.update(VEC=CE.vec_width(g), WIDE_COLS=CE.wide_cols(self.v, g.stride(1)))
        else:
            write_grad = kernel == "ce_bwd" or flags.get("WRITE_GRAD", False)
            # the 16-byte access widths, as the launcher (softmax_ce/_triton_path.py) sets them
            flags.update(VEC=CE.vec_width(x),
                         GRAD_VEC=CE.grad_vec_width(x, out_grad if write_grad else None),
                         WIDE_COLS=CE.wide_cols(self.v, x.stride(1)))
            if kernel == "ce_fwd" and write_grad:
                # as the launcher resolves it: the fused forward reads a one-tile row once
                flags.update(ONE_TILE=self.v <= meta["BLOCK_V"])
            gs = out_grad.stride() if write_grad else (0, 0)
            values = dict(
                logits_ptr=x, target_ptr=self.target, n_cols=self.v,
                stride_logits_row=x.stride(0), stride_logits_col=x.stride(1),
                stride_target_row=self.target.stride(0), stride_target_col=0,
                stride_grad_row=gs[0], stride_grad_col=gs[1], softcap=1.0, inv_temp=1.0,
                # without WRITE_GRAD the launcher passes the logits as the grad pointer
                grad_ptr=out_grad if write_grad else x)
            if kernel == "ce_fwd":
                values.update(alpha_ptr=self.alpha, loss_ptr=self.loss,
                              row_max_ptr=self.mx, log_d_ptr=self.logd, dlse_ptr=self.dlse)
            else:
                values.update(row_max_ptr=self.ref_mx, log_d_ptr=self.ref_logd,
                              dlse_ptr=self.s_coef, alpha_ptr=self.alpha_b)
        args, kwargs = launch_args(kernel, spec.raw, values, flags, meta, self.alpha)
        launch = Call(spec.raw, (self.n,), args, {**meta, **kwargs}, cfg.num_warps, cfg.num_stages)

        def restore_grad():  # any values will do as the gradient to rescale: the logits'
            self.grad.copy_(self.pristine)

        def restore_logits():
            self.logits.copy_(self.pristine)
            self.dirty = True

        setup = (restore_grad if kernel == "ce_scale" else
                 restore_logits if variant.inplace else None)
        return launch, setup, lambda: self.check(kernel, variant), self.n * self.v

    def reset(self):
        """After an in-place variant: the logits back, for the next trial that reads them."""
        if self.dirty:
            self.logits.copy_(self.pristine)
            self.dirty = False

    def check(self, kernel, variant) -> bool:
        r, dt = self.rows, self.dtype
        if kernel == "ce_scale":
            return _close(self.grad[r], self.pristine[r].float() * SCALE, dt)
        out_grad = self.logits if variant.inplace else self.grad
        if kernel == "ce_bwd":
            return _close(out_grad[r], self._ref_grad(self.s_coef, self.alpha_b), dt)
        # ce_fwd: the row statistics (lse, or m and log d), the loss, the gradient if written
        lse = self.mx + self.logd
        z = self.pristine[r].float()
        z_t = z.gather(1, self.target[r, None])[:, 0]
        ok = _close(lse[r], self.ref_lse[r], torch.float32)
        ok &= _close(self.loss[r], self.alpha[r] * (self.ref_lse[r] - z_t), torch.float32)
        if variant.flags.get("WRITE_GRAD"):
            ok &= _close(out_grad[r], self._ref_grad(self.alpha, self.alpha), dt)
        return ok


class LCEProblem:
    """x (N, D), W (V, D) of one dtype and what the two LCE kernels read or write."""

    def __init__(self, n, v, d, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        f32 = dict(dtype=torch.float32, device=device)
        self.n, self.v, self.d, self.dtype, self.device = n, v, d, dtype, device
        self.x = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
        self.w = (torch.randn(v, d, generator=gen, device=device, dtype=dtype) * d ** -0.5).to(dtype)
        self.target = torch.randint(0, v, (n,), generator=gen, device=device)
        self.m, self.dsum, self.zt, self.swz = (torch.empty(n, **f32) for _ in range(4))
        self.locks = torch.zeros(-(-n // 16), dtype=torch.int32, device=device)  # BLOCK_N >= 16
        self.dx = torch.zeros(n, d, **f32)
        self.dw = torch.zeros(v, d, **f32)
        self.db = torch.empty(0, **f32)
        self.alpha = torch.full((n,), 1.0 / n, **f32)
        self.w32 = self.w.float()  # the reference's copy of W, made once
        self.ref_mx, self.ref_logd = self._row_stats()
        self.ref_lse = self.ref_mx + self.ref_logd
        self.s_coef = self.alpha * GRAD_OUT
        self.alpha_b = self.alpha * GRAD_OUT
        self.rows = slice(0, min(n, CHECK_ROWS))
        # fp32 inputs run the dot in full precision unless the user allows tf32, as
        # softmax_ce._triton_path._dot_precision decides
        self.dot = ("ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
                    else "tf32")

    def _logits(self, rows):
        return self.x[rows].float() @ self.w32.t()

    def _row_stats(self, chunk=1024):
        mx = torch.empty(self.n, dtype=torch.float32, device=self.device)
        logd = torch.empty_like(mx)
        for r0 in range(0, self.n, chunk):
            z = self._logits(slice(r0, r0 + chunk))
            m = z.amax(dim=1)
            mx[r0:r0 + chunk] = m
            logd[r0:r0 + chunk] = (z - m[:, None]).exp().sum(dim=1).log()
        return mx, logd

    def launch(self, kernel, variant, cfg):
        spec = KERNELS[kernel]
        meta = dict(cfg.kwargs)
        x, w = self.x, self.w
        values = dict(x_ptr=x, w_ptr=w, target_ptr=self.target, n_rows=self.n, n_vocab=self.v,
                      dim=self.d, stride_x_row=x.stride(0), stride_x_col=x.stride(1),
                      stride_w_row=w.stride(0), stride_w_col=w.stride(1),
                      stride_target=self.target.stride(0), softcap=1.0, inv_temp=1.0)
        flags = dict(variant.flags, DOT_PRECISION=self.dot)
        if kernel == "lce_fwd":
            values.update(row_max_ptr=self.m, sum_exp_ptr=self.dsum, zt_ptr=self.zt, swz_ptr=self.swz,
                          lock_ptr=self.locks)

            def setup():  # the kernel folds tiles into running (m, d): start from scratch
                self.m.fill_(float("-inf"))
                self.dsum.zero_()
                self.zt.zero_()
                self.swz.zero_()
                self.locks.zero_()
        else:
            values.update(row_max_ptr=self.ref_mx, log_d_ptr=self.ref_logd,
                          dlse_ptr=self.s_coef, alpha_ptr=self.alpha_b,
                          dx_ptr=self.dx, dw_ptr=self.dw, db_ptr=self.db, filter_eps=0.0)

            def setup():  # atomically accumulated gradients start at zero
                self.dx.zero_()
                self.dw.zero_()
        args, kwargs = launch_args(kernel, spec.raw, values, flags, meta, self.alpha)
        grid = (triton.cdiv(self.n, meta["BLOCK_N"]) * triton.cdiv(self.v, meta["BLOCK_V"]),)
        launch = Call(spec.raw, grid, args, {**meta, **kwargs}, cfg.num_warps, cfg.num_stages)
        return launch, setup, lambda: self.check(kernel), self.n * self.v * self.d

    def check(self, kernel) -> bool:
        r, dt = self.rows, self.dtype
        z = self._logits(r)
        if kernel == "lce_fwd":
            lse = torch.where(self.m == float("-inf"), 0.0, self.m) + self.dsum.log()
            ok = _close(lse[r], self.ref_lse[r], dt)
            ok &= _close(self.zt[r], z.gather(1, self.target[r, None])[:, 0], dt)
            return ok
        g = (z - self.ref_lse[r, None]).exp() * self.s_coef[r, None]
        g[torch.arange(g.shape[0], device=g.device), self.target[r]] -= self.alpha_b[r]
        g = g.to(dt).float()  # the kernel rounds G to the input dtype for its matmuls
        ok = _close(self.dx[r], g @ self.w32, dt)
        if self.n * self.v <= 1 << 20:  # small enough to check dW over every row
            zz = self._logits(slice(0, self.n))
            gg = (zz - self.ref_lse[:, None]).exp() * self.s_coef[:, None]
            gg[torch.arange(self.n, device=gg.device), self.target] -= self.alpha_b
            ok &= _close(self.dw, gg.to(dt).float().t() @ self.x.float(), dt)
        return ok


# ----------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------

class Sweep:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dev_name = (torch.cuda.get_device_name(self.device) if self.cuda
                         else "cpu-interpreter")
        self.key = tuning.device_key(self.dev_name)
        self.prov = dict(gpu=self.dev_name, git_sha=C.git_sha(), **C.versions())
        self.t0 = time.monotonic()
        self.rows, self.winners, self.skipped = [], {}, []

    def over_budget(self):
        b = self.args.time_budget
        return b is not None and time.monotonic() - self.t0 > b

    def time_ms(self, launch, setup):
        if self.cuda:
            return C.cuda_median_ms(launch, setup or (lambda: None), rep_ms=self.args.rep_ms)
        return C.cpu_median_ms(launch, setup=setup, warmup=0, reps=self.args.cpu_reps)

    def trial(self, problem, kernel, variant, cfg, base):
        spec = KERNELS[kernel]
        cd = config_dict(cfg)
        row = dict(base, kernel=kernel, variant=variant.name, primary=int(variant.primary),
                   config=json.dumps(cd, sort_keys=True),
                   **{k: cd.get(k) for k in ("BLOCK_V", "BLOCK_N", "BLOCK_D", "GROUP_N",
                                             "num_warps", "num_stages")})
        try:
            launch, setup, check, elements = problem.launch(kernel, variant, cfg)
            ms = self.time_ms(launch, setup)
            # the last timed call ran on freshly restored state: its output must be right
            ok = check()
        except KeyError:
            raise  # the kernel's signature changed: stop, with the message
        except Exception as exc:  # e.g. triton's OutOfResources for a too-large tile
            row["status"] = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            return row
        finally:
            if hasattr(problem, "reset"):
                problem.reset()
        row["ms"] = float(f"{ms:.6g}")
        if spec.linear:
            row["tflops"] = float(f"{variant.flop * elements / (ms * 1e-3) / 1e12:.6g}")
        else:
            b = problem.dtype.itemsize if hasattr(problem.dtype, "itemsize") else \
                torch.empty((), dtype=problem.dtype).element_size()
            moved = variant.bytes
            if kernel == "ce_fwd" and variant.flags.get("WRITE_GRAD") and \
                    problem.v <= cfg.kwargs["BLOCK_V"]:
                moved = 2  # ONE_TILE: the row is read once
            row["gbps"] = float(f"{moved * b * elements / (ms * 1e-3) / 1e9:.6g}")
        row["status"] = "ok" if ok else "wrong result"
        return row

    def groups(self):
        a = self.args
        for dt in a.dtypes:
            for v in a.vocab:
                for k in a.kernels:
                    if not KERNELS[k].linear:
                        yield k, dt, v
        for dt in a.lce_dtypes:
            for v in a.lce_vocab:
                for k in a.kernels:
                    if KERNELS[k].linear:
                        yield k, dt, v

    def run(self):
        a = self.args
        groups = list(self.groups())
        existing = load_json(self.table_path)
        if a.skip_tuned and existing:
            have = existing.get("configs", {})
            kept = [g for g in groups if str(g[2]) not in
                    have.get(g[0], {}).get(C.DTYPE_NAMES[g[1]], {})]
            if len(kept) < len(groups):
                print(f"--skip-tuned: {len(groups) - len(kept)} groups already in "
                      f"{self.table_path}", flush=True)
            groups = kept
        configs = {(k, dt): pick_configs(KERNELS[k].config_list(C.torch_dtype(dt)), a.max_configs)
                   for k, dt, _ in groups}
        variants = {k: [vt for vt in KERNELS[k].variants if vt.primary or a.variants == "all"]
                    for k in a.kernels}
        total = sum(len(configs[(k, dt)]) * len(variants[k]) for k, dt, _ in groups)
        bar = tqdm(total=total, desc="autotune", unit="config", file=sys.stderr,
                   disable=a.no_progress)
        problems = {}
        try:
            for kernel, dt, v in groups:
                spec = KERNELS[kernel]
                dtype = C.torch_dtype(dt)
                if self.over_budget():
                    self.skipped.append(f"{kernel} {dt} V={v}")
                    continue
                pkey = (spec.linear, dt, v)
                if pkey not in problems:
                    problems.clear()  # one problem alive at a time: they are large
                    if self.cuda:
                        torch.cuda.empty_cache()
                    problems[pkey] = (LCEProblem(a.lce_rows, v, a.hidden, dtype, self.device)
                                      if spec.linear else CEProblem(a.rows, v, dtype, self.device))
                problem = problems[pkey]
                base = dict(timestamp=C.utc_now(), dtype=dt, vocab=v, **self.prov,
                            n_rows=problem.n, hidden=a.hidden if spec.linear else "")
                rows, complete = [], True
                for variant in variants[kernel]:
                    for cfg in configs[(kernel, dt)]:
                        if self.over_budget():
                            complete = False
                            break
                        row = self.trial(problem, kernel, variant, cfg, base)
                        rows.append(row)
                        bar.set_postfix_str(f"{kernel}/{variant.name} {dt} V={v} "
                                            f"{row.get('ms') or row['status'][:30]}")
                        bar.update()
                    if not complete:
                        break
                if not complete:
                    self.skipped.append(f"{kernel} {dt} V={v} (partial)")
                self.finish_group(kernel, dt, v, rows, complete)
        finally:
            bar.close()
            problems.clear()

    def finish_group(self, kernel, dt, v, rows, complete):
        ok = [r for r in rows if r["primary"] and r.get("status") == "ok"]
        win = min(ok, key=lambda r: r["ms"]) if ok and complete else None
        for r in rows:
            r["winner"] = int(r is win)
        self.rows.extend(rows)
        if rows:
            C.append_rows(self.args.csv, COLUMNS, rows)
        if win is None:
            if complete and rows:
                print(f"\n[autotune] {kernel} {dt} V={v}: no config passed; no entry written",
                      file=sys.stderr)
            return
        entry = json.loads(win["config"])
        self.winners[(kernel, dt, v)] = entry
        timing = {"ms": win["ms"], "n_rows": win["n_rows"]}
        timing.update({"gbps": win["gbps"]} if win.get("gbps") else {"tflops": win["tflops"],
                                                                     "hidden": win["hidden"]})
        if not self.args.no_table:
            write_table(self.table_path, self.dev_name, {(kernel, dt, v): (entry, timing)},
                        self.prov, self.args)

    @property
    def table_path(self) -> Path:
        return Path(self.args.table_dir) / f"{self.key}.json"


def load_json(path):
    path = Path(path)
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def write_table(path, dev_name, entries, prov, args):
    """Merge {(kernel, dt, V): (config, timing)} into the table at `path` (atomically)."""
    path = Path(path)
    old = load_json(path) or {}
    configs = old.get("configs", {})
    timings = old.get("timings", {})
    for (kernel, dt, v), (cfg, timing) in entries.items():
        dname = tuning.dtype_name(C.torch_dtype(dt))
        configs.setdefault(kernel, {}).setdefault(dname, {})[str(v)] = cfg
        timings.setdefault(kernel, {}).setdefault(dname, {})[str(v)] = timing
    now = C.utc_now()
    table = {
        "device": dev_name,
        "torch": prov["torch"],
        "triton": prov["triton"],
        "created": old.get("created", now),
        "updated": now,
        "git_sha": prov["git_sha"],
        "tuned_for": TUNED_FOR,
        "tuning_shape": {"ce_rows": args.rows, "lce_rows": args.lce_rows, "lce_hidden": args.hidden,
                         "dry_run": bool(args.dry_run)},
        "configs": configs,
        "timings": timings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", type=C.name_list, help=f"comma list of {', '.join(KERNELS)} "
                                                  f"(default the ce kernels; + lce with --linear)")
    p.add_argument("--linear", action="store_true", help="also tune lce_fwd and lce_bwd")
    p.add_argument("--vocab", type=C.int_list, help="comma list (also the LCE vocabularies)")
    p.add_argument("--dtypes", type=C.name_list, help="comma list of bf16, fp16, fp32")
    p.add_argument("--rows", type=int, help=f"logit rows of the CE trials (default {ROWS})")
    p.add_argument("--lce-rows", type=int, help=f"rows of the LCE trials (default {LCE_ROWS})")
    p.add_argument("--hidden", type=int, help=f"D of the LCE trials (default {LCE_HIDDEN})")
    p.add_argument("--variants", choices=("primary", "all"), default=None,
                   help="time only the winner-choosing launch (default) or every variant "
                        "(default for --dry-run)")
    p.add_argument("--max-configs", type=int, help="at most this many configs per kernel, "
                                                   "spread over its list")
    p.add_argument("--rep-ms", type=float, default=30, help="timed calls per trial, in ms (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=2, help="timed calls per trial (interpreter)")
    p.add_argument("--time-budget", type=float, help="seconds; a group not finished by then "
                                                     "writes no table entry")
    p.add_argument("--skip-tuned", action="store_true",
                   help="skip (kernel, dtype, V) groups the table already has")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shape and a few configs (automatic without CUDA)")
    p.add_argument("--csv", help="default perf/results/<key>/autotune.csv")
    p.add_argument("--table-dir", help="where <device-key>.json goes (default the package's "
                                       "kernels/tuned/, or perf/results/<key>/dry-run/ for a dry run)")
    p.add_argument("--no-table", action="store_true", help="write the CSV only")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type != "cuda":
        if not CE.interpreting():
            p.error("without CUDA the sweep runs through Triton's interpreter: run with "
                    "TRITON_INTERPRET=1 set before Python starts (or unset; this script sets it)")
        if not args.dry_run:
            print("[autotune] no CUDA device: a dry run through Triton's interpreter", flush=True)
        args.dry_run = True
    if args.kernels is None:
        args.kernels = CE_KERNELS + (LCE_KERNELS if args.linear else ())
    unknown = [k for k in args.kernels if k not in KERNELS]
    if unknown:
        p.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    for dt in args.dtypes or ():
        if dt not in C.DTYPE_NAMES:
            p.error(f"unknown dtype {dt!r}")

    dry = args.dry_run
    dry_dtypes = DRY["cuda_dtypes"] if device.type == "cuda" else DRY["dtypes"]
    args.vocab = args.vocab or (DRY["vocab"] if dry else VOCAB)
    args.lce_vocab = args.vocab if (dry or args.vocab != VOCAB) else LCE_VOCAB
    args.lce_dtypes = args.dtypes or (dry_dtypes if dry else LCE_DTYPES)
    args.dtypes = args.dtypes or (dry_dtypes if dry else DTYPES)
    args.rows = args.rows or (DRY["rows"] if dry else ROWS)
    args.lce_rows = args.lce_rows or (DRY["lce_rows"] if dry else LCE_ROWS)
    args.hidden = args.hidden or (DRY["hidden"] if dry else LCE_HIDDEN)
    if args.max_configs is None and dry:
        args.max_configs = DRY["max_configs"]
    if args.variants is None:
        args.variants = "all" if dry else "primary"

    key = tuning.device_key(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu-interpreter")
    if args.csv is None:
        args.csv = str(C.out_dir(key) / "autotune.csv")
    if args.table_dir is None:
        args.table_dir = str(C.out_dir(key) / "dry-run" if dry else tuning.TABLE_DIR)
    return args


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    sweep = Sweep(args)
    print(f"softmax_ce autotune on {sweep.dev_name} | torch {sweep.prov['torch']} | triton "
          f"{sweep.prov['triton']} | kernels {','.join(args.kernels)} | variants {args.variants}"
          f"{' | DRY RUN' if args.dry_run else ''}", flush=True)
    print(f"csv {args.csv} | table {sweep.table_path if not args.no_table else '(not written)'}",
          flush=True)
    sweep.run()

    print()
    lines = [dict(kernel=k, dtype=dt, vocab=v, **{kk: vv for kk, vv in cfg.items()})
             for (k, dt, v), cfg in sweep.winners.items()]
    for line in lines:
        win = next(r for r in sweep.rows if r["winner"] and r["kernel"] == line["kernel"]
                   and r["dtype"] == line["dtype"] and r["vocab"] == line["vocab"])
        line["ms"], line["rate"] = win["ms"], (f"{C.sig(win['gbps'])} GB/s" if win.get("gbps")
                                               else f"{C.sig(win['tflops'])} TFLOP/s")
    if lines:
        print(C.table(lines, [
            ("kernel", "kernel", None), ("dtype", "dtype", None), ("vocab", "V", "{}"),
            ("BLOCK_V", "BLOCK_V", "{}"), ("BLOCK_N", "BLOCK_N", "{}"), ("BLOCK_D", "BLOCK_D", "{}"),
            ("num_warps", "warps", "{}"), ("num_stages", "stages", "{}"), ("ms", "ms", C.sig),
            ("rate", "rate", None)], na="-"))
    bad = [r for r in sweep.rows if r.get("status") != "ok"]
    if bad:
        print(f"\n{len(bad)} trial(s) failed or gave wrong results; first: "
              f"{bad[0]['kernel']}/{bad[0]['variant']} {bad[0]['config']}: {bad[0]['status']}")
    if sweep.skipped:
        print(f"\ntime budget ({args.time_budget:g} s) spent; not tuned: {'; '.join(sweep.skipped)}")
    return dict(csv=args.csv, table=None if args.no_table else str(sweep.table_path),
                device_key=sweep.key, rows=sweep.rows, winners=sweep.winners)


if __name__ == "__main__":
    main()
