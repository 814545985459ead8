"""Sweep the launch configs of softmax_ce's Triton kernels and write the winners into the
per-GPU tuned table (softmax_ce/kernels/tuned/<device-key>.json, read by
softmax_ce.kernels.tuning.config_for).

For each kernel (ce_fwd, ce_bwd, ce_scale; lce_fwd, lce_bwd with --linear) and each
(vocabulary size, dtype), every config of the kernel's own list (fwd_configs(),
bwd_configs(), scale_configs(), lce_configs()) is launched on the RAW @triton.jit kernel
with the arguments softmax_ce/_triton_path.py passes for the case the table is tuned for:
class-index targets, no class weight, label smoothing, z-loss, softcap, temperature or
bias, reduction "mean" (alpha = 1/N).  Arguments are matched to the kernel's parameters
BY NAME (launch_args), so a renamed or added parameter stops the sweep with a message
instead of silently feeding the wrong tensor.

Launch variants per (kernel, dtype, V) group (the table keeps one config for all: its
key is kernel, dtype and V only):
    ce_fwd   recompute (WRITE_GRAD=False, the default strategy)   <- chooses the winner
             fused (WRITE_GRAD=True), fused_inplace (gradient over the logits)   [--variants all]
    ce_bwd   recompute (gradient into a new buffer)                <- chooses the winner
             inplace (gradient over the logits)                                  [--variants all]
    ce_scale scale (in place by nature)                            <- chooses the winner
    lce_fwd  stats; lce_bwd dx+dW (COMPUTE_DB=False)               <- each its own winner
The winner: the lowest median time on the primary variant among the configs whose
results check out against a float32 PyTorch reference (CHECK_ROWS rows).

Timing: CUDA events around each launch, median over ~--rep-ms of calls, with the state a
launch consumes restored untimed before each (an in-place variant's logits, ce_scale's
gradient, the LCE accumulators) and the L2 flushed (perf/_common.py cuda_median_ms).  CPU
(the Triton interpreter): time.perf_counter, the same setup.

Output: a CSV row per (variant, config) with ms, GB/s from the kernel docstring's byte
model per logit element (ce_fwd b, or 3b with the gradient, 2b for a one-tile row; ce_bwd
2b; ce_scale 2b) or TFLOP/s (LCE: 2NVD forward, 6NVD backward, which recomputes the
logits), status and the winner mark; the winners merged into <table-dir>/<device-key>.json
(device, versions, timestamps, the flags tuned for, the tuning shape, per-entry timings),
rewritten after every finished group, so a run cut short keeps its winners.

--dry-run (automatic without CUDA) runs the same machinery on a tiny shape with a few
configs; on a CPU through Triton's interpreter (set here before Triton is imported), with
the device key "cpu-interpreter".  A dry run never writes into the package's
kernels/tuned/: its table goes to --table-dir, default perf/out/<key>/dry-run/.

Run:
    python perf/autotune.py                                  # ce kernels, bf16 + fp32
    python perf/autotune.py --linear --time-budget 300       # + LCE kernels, bounded
    python perf/autotune.py --vocab 128256 --dtypes bf16 --kernels ce_fwd --variants all
    python perf/autotune.py --skip-tuned                     # only what the table lacks
    python perf/autotune.py --dry-run --table-dir /tmp/t --csv /tmp/t/autotune.csv

From Python, ``main([...])`` returns a dict: csv, table, device_key, rows, winners.
"""

import argparse
import inspect
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
from tqdm import tqdm  # noqa: E402

from softmax_ce.kernels import cross_entropy as CE  # noqa: E402
from softmax_ce.kernels import linear_cross_entropy as LCE  # noqa: E402
from softmax_ce.kernels import tuning  # noqa: E402
from softmax_ce.testing import mismatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

# Priority order: the goal vocabulary first; 50257 last, being the one size not a
# multiple of 16 (Triton specialises on that, so it recompiles every config).
VOCAB = (128256, 32000, 151936, 256000, 4096, 50257)
DTYPES = ("bf16", "fp32")
ROWS = 8192
LCE_VOCAB = (128256, 32000, 151936, 256000, 50257)
LCE_DTYPES = ("bf16",)
LCE_ROWS, LCE_HIDDEN = 8192, 4096
# The dry run's tiny problem: bf16 on a GPU (what the configs are for: some fp32 LCE
# tiles exceed the shared memory), fp32 through the interpreter (Triton 3.9's
# interpreter computes tl.dot of bf16 operands wrongly).
DRY = dict(vocab=(100,), dtypes=("fp32",), cuda_dtypes=("bf16",), rows=4, lce_rows=16, hidden=32,
           max_configs=3)

# The flags every trial runs with unless its variant says otherwise: the common case
# (the GPU path never upcasts the dot; the dry run is fp32).
DEFAULT_FLAGS = dict(PROB_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_ZLOSS=False,
                     HAS_SOFTCAP=False, WRITE_GRAD=False, WRITE_STATS=False, HAS_BIAS=False,
                     HAS_CLASS_WEIGHT=False, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=False,
                     UPCAST_DOT=False, ONE_TILE=False, HAS_FILTER=False, WRITE_TOKEN_STATS=False,
                     TEACHER=False, TEACHER_KL=False, HAS_ENT_GRAD=False)
TUNED_FOR = ("class-index targets; no class weight, label smoothing, z-loss, softcap or bias; "
             "reduction mean. Other flag combinations and the fused/in-place launches use the "
             "same entry (the table is keyed by kernel, dtype and vocabulary size only).")
# Pointers the common case never reads: the launcher passes an fp32 row vector instead.
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
        # two reads of a row longer than its tile (the second from HBM at LLM sizes), one
        # write; a one-tile row moves 2 (trial() charges that)
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
CONFIG_KEYS = ("BLOCK_V", "BLOCK_N", "BLOCK_D", "GROUP_N", "num_warps", "num_stages")
COLUMNS = ["timestamp", "gpu", "kernel", "variant", "primary", "dtype", "n_rows", "vocab",
           "hidden", "config", *CONFIG_KEYS, "ms", "gbps", "tflops", "status", "winner", "torch",
           "triton", "git_sha"]
GRAD_OUT = 0.75   # the backward's grad_output (a scalar, as with reduction "mean")
SCALE = 0.5       # ce_scale's factor: not 1.0, which the kernel skips
CHECK_ROWS = 64   # rows compared against the reference after each config


def launch_args(kernel_name, raw, values, flags, meta, placeholder):
    """(positional args, constexpr kwargs) for `raw`, every parameter matched by name.
    values: runtime arguments by parameter name (names a kernel lacks are ignored);
    flags: constexprs (else DEFAULT_FLAGS); meta: the config's BLOCK_* (the caller's)."""
    args, kwargs = [], {}
    for p in inspect.signature(raw.fn).parameters.values():
        ann = p.annotation
        if ann is tl.constexpr or (isinstance(ann, str) and "constexpr" in ann):
            if p.name in meta:
                continue
            if p.name not in flags and p.name not in DEFAULT_FLAGS:
                raise KeyError(f"{kernel_name}: constexpr {p.name!r} is unknown to perf/autotune.py "
                               f"(the kernel changed: add it to DEFAULT_FLAGS)")
            kwargs[p.name] = flags.get(p.name, DEFAULT_FLAGS.get(p.name))
        elif p.name in values:
            args.append(values[p.name])
        elif p.name in PLACEHOLDERS:
            args.append(placeholder)
        else:
            raise KeyError(f"{kernel_name}: parameter {p.name!r} is unknown to perf/autotune.py "
                           f"(the launcher's arguments changed: add its role to the problem's values)")
    return args, kwargs


@dataclass
class Call:
    """One launch of a raw kernel, every argument bound: calling it launches the kernel;
    compile() only compiles it for the current driver's target (perf/compile_report.py
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


def _close(actual, ref, dtype) -> bool:
    """Finite and within |a - r| <= rtol |r| + atol max|r| of the fp32 reference
    (softmax_ce.testing.mismatch; bf16 / fp16 2e-2, 2e-2, else 1e-4, 1e-5)."""
    if not torch.isfinite(actual).all():
        return False
    rtol, atol = (2e-2, 2e-2) if dtype in (torch.bfloat16, torch.float16) else (1e-4, 1e-5)
    return mismatch(actual, ref, dtype, rtol=rtol, atol=atol) is None


class _Problem:
    """What both problems share: the fp32 reference row statistics (m, log d) of the logits
    rows_fn(slice) gives, chunk by chunk, and the gradient the reference implies."""

    def _reference(self, rows_fn, chunk=1024):
        f32 = dict(dtype=torch.float32, device=self.device)
        self.ref_mx, self.ref_logd = torch.empty(self.n, **f32), torch.empty(self.n, **f32)
        for r0 in range(0, self.n, chunk):
            z = rows_fn(slice(r0, r0 + chunk))
            m = z.amax(dim=1)
            self.ref_mx[r0:r0 + chunk] = m
            self.ref_logd[r0:r0 + chunk] = (z - m[:, None]).exp().sum(dim=1).log()
        self.ref_lse = self.ref_mx + self.ref_logd
        self.alpha = torch.full((self.n,), 1.0 / self.n, **f32)
        self.s_coef = self.alpha_b = self.alpha * GRAD_OUT  # the backward's, for GRAD_OUT
        self.rows = slice(0, min(self.n, CHECK_ROWS))

    def _grad(self, z, rows, s_coef, alpha):
        g = (z - self.ref_lse[rows, None]).exp() * s_coef[rows, None]
        g[torch.arange(g.shape[0], device=g.device), self.target[rows]] -= alpha[rows]
        return g


class CEProblem(_Problem):
    """Logits (N, V) of one dtype and everything the three CE kernels read or write.  A
    variant flagged TEACHER gets teacher logits (N, V) of the same dtype as its target
    (PROB_TARGET), WRITE_TOKEN_STATS the entropy and int64 argmax outputs, HAS_ENT_GRAD the
    backward's (N, 2) entropy coefficients: the tensors the launcher passes for them."""

    def __init__(self, n, v, dtype, device, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        f32 = dict(dtype=torch.float32, device=device)
        self.n, self.v, self.dtype, self.device = n, v, dtype, device
        self.pristine = torch.randn(n, v, generator=gen, device=device, dtype=dtype)
        self.logits = self.pristine.clone()
        self.target = torch.randint(0, v, (n,), generator=gen, device=device)
        self.grad = torch.empty_like(self.pristine)
        self.loss, self.mx, self.logd, self.dlse, self.entropy = (torch.empty(n, **f32) for _ in range(5))
        self.argmax = torch.empty(n, dtype=torch.int64, device=device)
        self.pairs = torch.zeros(n, 2, **f32)  # teacher (max, log d) or the entropy's coefficients
        self._teacher = None
        self._reference(lambda r: self.pristine[r].float())
        self.dirty = False  # the logits hold an in-place variant's gradient
        self.scale = torch.full((1,), SCALE, **f32).expand(n)  # a scalar: stride 0

    @property
    def teacher(self):
        if self._teacher is None:  # made on first use: most trials never read it
            self._teacher = torch.randn_like(self.pristine)
        return self._teacher

    def launch(self, kernel, variant, cfg):
        """-> (launch(), setup(), check() -> bool, elements) for one config."""
        meta, flags, x = dict(cfg.kwargs), dict(variant.flags), self.logits
        out_grad = x if variant.inplace else self.grad
        if kernel == "ce_scale":
            g = self.grad
            values = dict(grad_ptr=g, scale_ptr=self.scale, n_cols=self.v,
                          stride_grad_row=g.stride(0), stride_grad_col=g.stride(1),
                          stride_scale=self.scale.stride(0))
            flags.update(VEC=CE.vec_width(g), WIDE_COLS=CE.wide_cols(self.v, g.stride(1)))
        else:
            write_grad = kernel == "ce_bwd" or flags.get("WRITE_GRAD", False)
            tgt = self.teacher if flags.get("TEACHER") else self.target
            flags.setdefault("PROB_TARGET", bool(flags.get("TEACHER")))
            # the 16-byte access widths and ONE_TILE, as the launcher sets them
            flags.update(VEC=CE.vec_width(x),
                         GRAD_VEC=CE.grad_vec_width(x, out_grad if write_grad else None),
                         WIDE_COLS=CE.wide_cols(self.v, x.stride(1)))
            if kernel == "ce_fwd" and write_grad:
                flags.update(ONE_TILE=self.v <= meta["BLOCK_V"])
            gs = out_grad.stride() if write_grad else (0, 0)
            values = dict(
                logits_ptr=x, target_ptr=tgt, n_cols=self.v,
                stride_logits_row=x.stride(0), stride_logits_col=x.stride(1),
                stride_target_row=tgt.stride(0), stride_target_col=tgt.stride(1) if tgt.dim() > 1 else 0,
                stride_grad_row=gs[0], stride_grad_col=gs[1], softcap=1.0, inv_temp=1.0,
                # without WRITE_GRAD the launcher passes the logits as the grad pointer
                grad_ptr=out_grad if write_grad else x)
            if flags.get("TEACHER"):
                values.update(teacher_ptr=self.pairs)
            if kernel == "ce_fwd":
                values.update(alpha_ptr=self.alpha, loss_ptr=self.loss, row_max_ptr=self.mx,
                              log_d_ptr=self.logd, dlse_ptr=self.dlse)
                if flags.get("WRITE_TOKEN_STATS"):
                    values.update(entropy_ptr=self.entropy, argmax_ptr=self.argmax)
            else:
                values.update(row_max_ptr=self.ref_mx, log_d_ptr=self.ref_logd,
                              dlse_ptr=self.s_coef, alpha_ptr=self.alpha_b)
                if flags.get("HAS_ENT_GRAD"):
                    values.update(ent_ptr=self.pairs)
        args, kwargs = launch_args(kernel, KERNELS[kernel].raw, values, flags, meta, self.alpha)
        launch = Call(KERNELS[kernel].raw, (self.n,), args, {**meta, **kwargs}, cfg.num_warps,
                      cfg.num_stages)

        def restore_grad():  # any values will do as the gradient to rescale: the logits'
            self.grad.copy_(self.pristine)

        def restore_logits():
            self.logits.copy_(self.pristine)
            self.dirty = True
        setup = restore_grad if kernel == "ce_scale" else restore_logits if variant.inplace else None
        return launch, setup, lambda: self.check(kernel, variant), self.n * self.v

    def reset(self):
        """After an in-place variant: the logits back, for the next trial that reads them."""
        if self.dirty:
            self.logits.copy_(self.pristine)
            self.dirty = False

    def check(self, kernel, variant) -> bool:
        """The outputs of the common case against the reference (a TEACHER or HAS_ENT_GRAD
        variant, compiled but never timed, is checked on its row statistics only)."""
        r, dt, flags = self.rows, self.dtype, variant.flags
        if kernel == "ce_scale":
            return _close(self.grad[r], self.pristine[r].float() * SCALE, dt)
        out_grad = self.logits if variant.inplace else self.grad
        z = self.pristine[r].float()
        if kernel == "ce_bwd":
            special = flags.get("TEACHER") or flags.get("HAS_ENT_GRAD")
            return special or _close(out_grad[r], self._grad(z, r, self.s_coef, self.alpha_b), dt)
        lse = self.mx + self.logd
        ok = _close(lse[r], self.ref_lse[r], torch.float32)
        if not flags.get("TEACHER"):
            z_t = z.gather(1, self.target[r, None])[:, 0]
            ok &= _close(self.loss[r], self.alpha[r] * (self.ref_lse[r] - z_t), torch.float32)
        if flags.get("WRITE_GRAD") and not flags.get("TEACHER"):
            ok &= _close(out_grad[r], self._grad(z, r, self.alpha, self.alpha), dt)
        if flags.get("WRITE_TOKEN_STATS"):
            s = (z - self.ref_lse[r, None]).exp()
            ok &= _close(self.entropy[r], self.ref_lse[r] - (s * z).sum(1), torch.float32)
            ok &= bool((self.argmax[r] == z.argmax(1)).all())
        return ok


class LCEProblem(_Problem):
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
        self.dx, self.dw = torch.zeros(n, d, **f32), torch.zeros(v, d, **f32)
        self.db = torch.empty(0, **f32)
        self.w32 = self.w.float()  # the reference's copy of W, made once
        self._reference(self._logits)
        # fp32 inputs run the dot in full precision unless the user allows tf32, as
        # softmax_ce._triton_path._dot_precision decides
        self.dot = "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"

    def _logits(self, rows):
        return self.x[rows].float() @ self.w32.t()

    def launch(self, kernel, variant, cfg):
        meta, x, w = dict(cfg.kwargs), self.x, self.w
        values = dict(x_ptr=x, w_ptr=w, target_ptr=self.target, n_rows=self.n, n_vocab=self.v,
                      dim=self.d, stride_x_row=x.stride(0), stride_x_col=x.stride(1),
                      stride_w_row=w.stride(0), stride_w_col=w.stride(1),
                      stride_target=self.target.stride(0), softcap=1.0, inv_temp=1.0)
        if kernel == "lce_fwd":
            values.update(row_max_ptr=self.m, sum_exp_ptr=self.dsum, zt_ptr=self.zt,
                          swz_ptr=self.swz, lock_ptr=self.locks)

            def setup():  # the kernel folds tiles into running (m, d): start from scratch
                self.m.fill_(float("-inf"))
                for t in (self.dsum, self.zt, self.swz, self.locks):
                    t.zero_()
        else:
            values.update(row_max_ptr=self.ref_mx, log_d_ptr=self.ref_logd, dlse_ptr=self.s_coef,
                          alpha_ptr=self.alpha_b, dx_ptr=self.dx, dw_ptr=self.dw, db_ptr=self.db,
                          filter_eps=0.0)

            def setup():  # atomically accumulated gradients start at zero
                self.dx.zero_()
                self.dw.zero_()
        flags = dict(variant.flags, DOT_PRECISION=self.dot)
        args, kwargs = launch_args(kernel, KERNELS[kernel].raw, values, flags, meta, self.alpha)
        grid = (triton.cdiv(self.n, meta["BLOCK_N"]) * triton.cdiv(self.v, meta["BLOCK_V"]),)
        launch = Call(KERNELS[kernel].raw, grid, args, {**meta, **kwargs}, cfg.num_warps,
                      cfg.num_stages)
        return launch, setup, lambda: self.check(kernel), self.n * self.v * self.d

    def check(self, kernel) -> bool:
        r, dt = self.rows, self.dtype
        z = self._logits(r)
        if kernel == "lce_fwd":
            lse = torch.where(self.m == float("-inf"), 0.0, self.m) + self.dsum.log()
            return _close(lse[r], self.ref_lse[r], dt) & _close(
                self.zt[r], z.gather(1, self.target[r, None])[:, 0], dt)
        # the kernel rounds G to the input dtype for its matmuls
        ok = _close(self.dx[r], self._grad(z, r, self.s_coef, self.alpha_b).to(dt).float() @ self.w32, dt)
        if self.n * self.v <= 1 << 20:  # small enough to check dW over every row
            every = slice(0, self.n)
            g = self._grad(self._logits(every), every, self.s_coef, self.alpha_b).to(dt).float()
            ok &= _close(self.dw, g.t() @ self.x.float(), dt)
        return ok


class Sweep:
    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dev_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu-interpreter"
        self.key = tuning.device_key(self.dev_name)
        self.prov = dict(gpu=self.dev_name, git_sha=C.git_sha(), **C.versions())
        self.t0, self.rows, self.winners, self.skipped = time.monotonic(), [], {}, []
        self.table_path = Path(args.table_dir) / f"{self.key}.json"

    def over_budget(self):
        b = self.args.time_budget
        return b is not None and time.monotonic() - self.t0 > b

    def trial(self, problem, kernel, variant, cfg, base):
        spec, cd = KERNELS[kernel], config_dict(cfg)
        row = dict(base, kernel=kernel, variant=variant.name, primary=int(variant.primary),
                   config=json.dumps(cd, sort_keys=True), **{k: cd.get(k) for k in CONFIG_KEYS})
        try:
            launch, setup, check, elements = problem.launch(kernel, variant, cfg)
            if self.cuda:
                ms = C.cuda_median_ms(launch, setup or (lambda: None), rep_ms=self.args.rep_ms)
            else:
                ms = C.cpu_median_ms(launch, setup=setup, warmup=0, reps=self.args.cpu_reps)
            ok = check()  # the last timed call ran on freshly restored state
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
            one_tile = kernel == "ce_fwd" and variant.flags.get("WRITE_GRAD") and \
                problem.v <= cfg.kwargs["BLOCK_V"]
            moved = 2 if one_tile else variant.bytes  # a one-tile row is read once
            row["gbps"] = float(f"{moved * problem.dtype.itemsize * elements / (ms * 1e-3) / 1e9:.6g}")
        row["status"] = "ok" if ok else "wrong result"
        return row

    def run(self):
        a = self.args
        groups = [(k, dt, v) for dt in a.dtypes for v in a.vocab for k in a.kernels
                  if not KERNELS[k].linear]
        groups += [(k, dt, v) for dt in a.lce_dtypes for v in a.lce_vocab for k in a.kernels
                   if KERNELS[k].linear]
        have = (load_json(self.table_path) or {}).get("configs", {}) if a.skip_tuned else {}
        kept = [g for g in groups if str(g[2]) not in have.get(g[0], {}).get(C.DTYPE_NAMES[g[1]], {})]
        if len(kept) < len(groups):
            print(f"--skip-tuned: {len(groups) - len(kept)} groups already in {self.table_path}",
                  flush=True)
        configs = {(k, dt): pick_configs(KERNELS[k].config_list(C.torch_dtype(dt)), a.max_configs)
                   for k, dt, _ in kept}
        variants = {k: [vt for vt in KERNELS[k].variants if vt.primary or a.variants == "all"]
                    for k in a.kernels}
        bar = tqdm(total=sum(len(configs[(k, dt)]) * len(variants[k]) for k, dt, _ in kept),
                   desc="autotune", unit="config", file=sys.stderr, disable=a.no_progress)
        problems = {}
        try:
            for kernel, dt, v in kept:
                spec, dtype = KERNELS[kernel], C.torch_dtype(dt)
                if self.over_budget():
                    self.skipped.append(f"{kernel} {dt} V={v}")
                    continue
                if (spec.linear, dt, v) not in problems:
                    problems.clear()  # one problem alive at a time: they are large
                    if self.cuda:
                        torch.cuda.empty_cache()
                    problems[(spec.linear, dt, v)] = (
                        LCEProblem(a.lce_rows, v, a.hidden, dtype, self.device) if spec.linear
                        else CEProblem(a.rows, v, dtype, self.device))
                problem = problems[(spec.linear, dt, v)]
                base = dict(timestamp=C.utc_now(), dtype=dt, vocab=v, **self.prov,
                            n_rows=problem.n, hidden=a.hidden if spec.linear else "")
                rows = []
                for variant in variants[kernel]:
                    for cfg in configs[(kernel, dt)]:
                        if self.over_budget():
                            break
                        rows.append(self.trial(problem, kernel, variant, cfg, base))
                        bar.set_postfix_str(f"{kernel}/{variant.name} {dt} V={v} "
                                            f"{rows[-1].get('ms') or rows[-1]['status'][:30]}")
                        bar.update()
                complete = len(rows) == len(variants[kernel]) * len(configs[(kernel, dt)])
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
        entry = self.winners[(kernel, dt, v)] = json.loads(win["config"])
        timing = {"ms": win["ms"], "n_rows": win["n_rows"]}
        timing.update({"gbps": win["gbps"]} if win.get("gbps") else
                      {"tflops": win["tflops"], "hidden": win["hidden"]})
        if not self.args.no_table:
            write_table(self.table_path, self.dev_name, {(kernel, dt, v): (entry, timing)},
                        self.prov, self.args)


def load_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def write_table(path, dev_name, entries, prov, args):
    """Merge {(kernel, dt, V): (config, timing)} into the table at `path` (atomically)."""
    path = Path(path)
    old = load_json(path) or {}
    configs, timings = old.get("configs", {}), old.get("timings", {})
    for (kernel, dt, v), (cfg, timing) in entries.items():
        dname = tuning.dtype_name(C.torch_dtype(dt))
        configs.setdefault(kernel, {}).setdefault(dname, {})[str(v)] = cfg
        timings.setdefault(kernel, {}).setdefault(dname, {})[str(v)] = timing
    now = C.utc_now()
    table = dict(device=dev_name, torch=prov["torch"], triton=prov["triton"],
                 created=old.get("created", now), updated=now, git_sha=prov["git_sha"],
                 tuned_for=TUNED_FOR, tuning_shape=dict(ce_rows=args.rows, lce_rows=args.lce_rows,
                                                        lce_hidden=args.hidden,
                                                        dry_run=bool(args.dry_run)),
                 configs=configs, timings=timings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


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
    p.add_argument("--variants", choices=("primary", "all"), help="time only the winner-choosing "
                   "launch (default) or every variant (default for --dry-run)")
    p.add_argument("--max-configs", type=int, help="at most this many configs per kernel, spread "
                                                   "over its list")
    p.add_argument("--rep-ms", type=float, default=30, help="timed calls per trial, in ms (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=2, help="timed calls per trial (interpreter)")
    p.add_argument("--time-budget", type=float, help="seconds; a group not finished by then "
                                                     "writes no table entry")
    p.add_argument("--skip-tuned", action="store_true",
                   help="skip (kernel, dtype, V) groups the table already has")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shape and a few configs (automatic without CUDA)")
    p.add_argument("--csv", help="default perf/out/<key>/autotune.csv")
    p.add_argument("--table-dir", help="where <device-key>.json goes (default the package's "
                                       "kernels/tuned/, or perf/out/<key>/dry-run/ for a dry run)")
    p.add_argument("--no-table", action="store_true", help="write the CSV only")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type != "cuda":
        if not CE.interpreting():
            p.error("without CUDA the sweep runs through Triton's interpreter: run with "
                    "TRITON_INTERPRET=1 set before Python starts (or unset; this script sets it)")
        if not a.dry_run:
            print("[autotune] no CUDA device: a dry run through Triton's interpreter", flush=True)
        a.dry_run = True
    a.kernels = a.kernels or CE_KERNELS + (LCE_KERNELS if a.linear else ())
    for kind, given, known in (("kernel", a.kernels, KERNELS), ("dtype", a.dtypes or (), C.DTYPE_NAMES)):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {kind}(s) {', '.join(bad)}; choose from {', '.join(known)}")
    dry = a.dry_run
    dry_dtypes = DRY["cuda_dtypes"] if device.type == "cuda" else DRY["dtypes"]
    a.vocab = a.vocab or (DRY["vocab"] if dry else VOCAB)
    a.lce_vocab = a.vocab if (dry or a.vocab != VOCAB) else LCE_VOCAB
    a.lce_dtypes = a.dtypes or (dry_dtypes if dry else LCE_DTYPES)
    a.dtypes = a.dtypes or (dry_dtypes if dry else DTYPES)
    a.rows = a.rows or (DRY["rows"] if dry else ROWS)
    a.lce_rows = a.lce_rows or (DRY["lce_rows"] if dry else LCE_ROWS)
    a.hidden = a.hidden or (DRY["hidden"] if dry else LCE_HIDDEN)
    a.max_configs = DRY["max_configs"] if a.max_configs is None and dry else a.max_configs
    a.variants = a.variants or ("all" if dry else "primary")
    key = tuning.device_key(torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu-interpreter")
    a.csv = a.csv or str(C.out_dir(key) / "autotune.csv")
    a.table_dir = a.table_dir or str(C.out_dir(key) / "dry-run" if dry else tuning.TABLE_DIR)
    return a


def main(argv=None):
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    sweep = Sweep(a)
    print(f"softmax_ce autotune on {sweep.dev_name} | torch {sweep.prov['torch']} | triton "
          f"{sweep.prov['triton']} | kernels {','.join(a.kernels)} | variants {a.variants}"
          f"{' | DRY RUN' if a.dry_run else ''}\ncsv {a.csv} | table "
          f"{'(not written)' if a.no_table else sweep.table_path}", flush=True)
    sweep.run()
    wins = [r for r in sweep.rows if r["winner"]]
    if wins:
        print("\n" + C.table([dict(r, rate=f"{C.sig(r['gbps'])} GB/s" if r.get("gbps") else
                                   f"{C.sig(r['tflops'])} TFLOP/s") for r in wins], [
            ("kernel", "kernel", None), ("dtype", "dtype", None), ("vocab", "V", "{}"),
            *[(k, k.replace("num_", ""), "{}") for k in CONFIG_KEYS if k != "GROUP_N"],
            ("ms", "ms", C.sig), ("rate", "rate", None)], na="-"))
    bad = [r for r in sweep.rows if r.get("status") != "ok"]
    if bad:
        print(f"\n{len(bad)} trial(s) failed or gave wrong results; first: "
              f"{bad[0]['kernel']}/{bad[0]['variant']} {bad[0]['config']}: {bad[0]['status']}")
    if sweep.skipped:
        print(f"\ntime budget ({a.time_budget:g} s) spent; not tuned: {'; '.join(sweep.skipped)}")
    return dict(csv=a.csv, table=None if a.no_table else str(sweep.table_path),
                device_key=sweep.key, rows=sweep.rows, winners=sweep.winners)


if __name__ == "__main__":
    main()
