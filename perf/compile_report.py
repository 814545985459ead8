"""Compile every config of softmax_ce's Triton kernels for a GPU architecture, on a machine
without that GPU, and report what each binary needs: registers, spilled bytes, shared
memory, theoretical occupancy, and how wide its global loads and stores are.

Why: a streaming kernel reaches the memory-bandwidth roof only with 16-byte accesses and
enough warps in flight, and a config that spills or overflows shared memory wastes an
autotune trial at best.  All of this is decided at compile time, so it can be checked
(and tested in CI) without a GPU; the timings themselves come from perf/bench.py and
perf/autotune.py on the GPU.

How: Triton's own JIT specialises and compiles each launch exactly as it would before
running it (`JITFunction.warmup` on the same arguments perf/autotune.py launches: CPU
tensors of the real row length, so alignment and divisibility specialise alike), with a
driver stand-in that names the target architecture instead of asking a GPU.  ptxas's
resource usage is read off the cubin with the cuobjdump that ships with Triton; the
access widths are counted in the PTX.

Columns of the CSV (perf/results/static-sm<arch>/compile-triton<version>.csv):
    regs, local_bytes (local memory), stack_bytes (stack frame), smem_bytes (Triton's
    dynamic + static shared memory),
    blocks_per_sm / occupancy (resident warps / 64) from the sm_90 limits below,
    ld / st / atom: global accesses as "<bits>x<count>" (128x2 = two 16-byte loads),
    sass: counts of machine instructions from the cubin (HGMMA: Hopper tensor cores,
    LDG128 / STG128 / LDGSTS128: 16-byte accesses, LDL / STL: local memory),
    problems: "local" (a stack frame or local memory, i.e. spilled registers), "smem" (more
    than one block's maximum), "compile" (an error).

Run:
    python perf/compile_report.py                       # every kernel, config, bf16+fp32
    python perf/compile_report.py --quick --json out.json   # one config each (the tests)
    python perf/compile_report.py --kernels ce_fwd --vocab 50257 --dtypes bf16
    python perf/compile_report.py --quick --scalar      # VEC=1: element-wise accesses

From Python, ``main([...])`` returns the rows (dicts).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("compile_report.py compiles kernels: run it in a process without "
                     "TRITON_INTERPRET=1 (Triton fixes the mode when it first decorates a kernel)")
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

AT = C.load_module("softmax_ce_perf_autotune", C.PERF_DIR / "autotune.py")

# Per-SM limits of compute capability 9.0 (H100, H200): CUDA programming guide, table of
# technical specifications.
SM90 = dict(regs=65536, smem=233472, smem_per_block=232448, smem_reserved=1024, warps=64,
            blocks=32, reg_unit=256)

# Representative vocabulary sizes: Triton specialises an integer on "== 1" and on
# "divisible by 16", so 128256 stands for every multiple of 16 and 50257 for the rest.
VOCAB = (128256, 50257)
DTYPES = ("bf16", "fp32")
CE_ROWS = 2
LCE_ROWS, LCE_HIDDEN = 16, 256

# Compile-only variants beside perf/autotune.py's timed ones: every per-element option on
# (the most registers a streaming kernel can need), and the options of cross_entropy's
# temperature / return_entropy / return_argmax (token_stats; its backward's entropy
# gradient, ent_grad) and target_logits (teacher, teacher_kl: teacher logits as the target).
EXTRA_VARIANTS = {
    "ce_fwd": (AT.Variant("fused_all_options", flags=dict(
        WRITE_GRAD=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_ZLOSS=True, HAS_SOFTCAP=True)),
        AT.Variant("token_stats", flags=dict(WRITE_TOKEN_STATS=True)),
        AT.Variant("teacher", flags=dict(TEACHER=True)),
        AT.Variant("teacher_kl", flags=dict(TEACHER=True, TEACHER_KL=True))),
    "ce_bwd": (AT.Variant("all_options", flags=dict(
        HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_SOFTCAP=True)),
        AT.Variant("ent_grad", flags=dict(HAS_ENT_GRAD=True)),
        AT.Variant("teacher", flags=dict(TEACHER=True))),
    "lce_fwd": (AT.Variant("all_options", flags=dict(
        HAS_BIAS=True, HAS_SMOOTHING=True, HAS_CLASS_WEIGHT=True, HAS_SOFTCAP=True)),),
    "lce_bwd": (AT.Variant("all_options", flags=dict(
        HAS_BIAS=True, HAS_SMOOTHING=True, HAS_CLASS_WEIGHT=True, HAS_SOFTCAP=True,
        COMPUTE_DB=True)),),
}

COLUMNS = ["triton", "arch", "kernel", "variant", "dtype", "vocab", "config", "BLOCK_V", "BLOCK_N",
           "BLOCK_D", "GROUP_N", "num_warps", "num_stages", "status", "regs", "local_bytes",
           "stack_bytes", "smem_bytes", "blocks_per_sm", "occupancy", "ld", "st", "atom", "sass",
           "problems", "compile_s", "git_sha"]


class CompileOnlyDriver:
    """What Triton's JIT asks of the active driver before it compiles, answered for a
    target architecture; nothing that would load or launch a binary is provided."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def _cuobjdump() -> str:
    path = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise SystemExit(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return str(path)


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's one function, from `cuobjdump -res-usage`."""
    out = cuobjdump(cubin, "-res-usage")
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    return {k: int(v) for k, v in fields.items()}


# Machine instructions worth counting in the SASS: the tensor-core path (HGMMA is
# Hopper's wgmma; HMMA the older mma.sync), 16-byte global loads and stores, local
# memory traffic (spills that actually execute), and GPU-wide memory fences
# (MEMBAR.*.GPU / .SYS; CCTL.IVALL invalidates the L1 after an acquire): Triton's
# default acq_rel atomics put both around every atomic, which a relaxed accumulation
# never needs.  (MEMBAR.ALL.CTA, a block-local fence, comes with wgmma's proxy fence.)
SASS_OPS = {"HGMMA": r"HGMMA", "HMMA": r"HMMA", "LDG128": r"LDG\.E\.128",
            "STG128": r"STG\.E\.128", "LDGSTS128": r"LDGSTS\.E(?:\.\w+)*\.128",
            "LDL": r"LDL", "STL": r"STL", "MEMBAR_GPU": r"MEMBAR(?:\.\w+)*\.(?:GPU|SYS)",
            "CCTL": r"CCTL\.IVALL"}


def sass_counts(cubin: bytes) -> dict:
    sass = cuobjdump(cubin, "-sass")
    return {name: len(re.findall(rf"\b{pat}\b", sass)) for name, pat in SASS_OPS.items()}


_ACCESS = re.compile(r"\b(ld|st|atom|red)\.global((?:\.[\w:]+)*)")


def access_widths(ptx: str) -> dict:
    """{'ld': {bits: count}, 'st': ..., 'atom': ...}: each global access instruction of the
    PTX by the bits it moves per thread (vector length x element width)."""
    out = {"ld": {}, "st": {}, "atom": {}}
    for op, suffix in _ACCESS.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        width = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 0)
        kind = "atom" if op in ("atom", "red") else op
        out[kind][vec * width] = out[kind].get(vec * width, 0) + 1
    return out


def fmt_widths(counts: dict) -> str:
    return " ".join(f"{bits}x{n}" for bits, n in sorted(counts.items(), reverse=True))


def occupancy(regs: int, smem: int, num_warps: int, lim=SM90) -> tuple:
    """(resident blocks per SM, resident warps / max warps), from registers, shared memory,
    warps and the block limit."""
    per_warp = -(-regs * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // per_warp) // num_warps if per_warp else lim["blocks"]
    by_smem = lim["smem"] // (smem + lim["smem_reserved"]) if smem else lim["blocks"]
    by_warps = lim["warps"] // num_warps
    blocks = max(0, min(by_regs, by_smem, by_warps, lim["blocks"]))
    return blocks, blocks * num_warps / lim["warps"]


def compile_row(call, base: dict, lim=SM90) -> dict:
    row = dict(base)
    t0 = time.perf_counter()
    try:
        kernel = call.compile()
    except Exception as exc:  # a config Triton cannot build for this target
        row.update(status=f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:300],
                   problems="compile", compile_s=round(time.perf_counter() - t0, 2))
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    res = resource_usage(kernel.asm["cubin"])
    smem = int(getattr(kernel.metadata, "shared", 0) or 0) + res.get("SHARED", 0)
    blocks, occ = occupancy(res.get("REG", 0), smem, call.num_warps, lim)
    widths = access_widths(kernel.asm["ptx"])
    sass = sass_counts(kernel.asm["cubin"])
    problems = []
    if res.get("LOCAL", 0) or res.get("STACK", 0):
        problems.append("local")  # a stack frame or local memory: spilled registers
    if smem > lim["smem_per_block"]:
        problems.append("smem")
    row.update(status="ok", regs=res.get("REG"), local_bytes=res.get("LOCAL", 0),
               stack_bytes=res.get("STACK", 0), smem_bytes=smem, blocks_per_sm=blocks,
               occupancy=round(occ, 3), ld=fmt_widths(widths["ld"]), st=fmt_widths(widths["st"]),
               atom=fmt_widths(widths["atom"]),
               sass=" ".join(f"{k}:{v}" for k, v in sass.items() if v), problems=" ".join(problems))
    return row


def lce_vocab(v: int) -> int:
    """A small vocabulary that Triton specialises like v (the LCE problem builds a float32
    reference of W, which at v=128256, D=4096 would be 2 GiB for nothing)."""
    return v if v <= 4096 else 4096 + v % 16


def problems_for(args):
    """(kernel, variant, dtype, vocab, problem) for everything to compile."""
    for dt in args.dtypes:
        dtype = C.torch_dtype(dt)
        for v in args.vocab:
            ce = lce = None
            for kernel in args.kernels:
                spec = AT.KERNELS[kernel]
                variants = spec.variants + EXTRA_VARIANTS.get(kernel, ())
                if spec.linear:
                    lce = lce or AT.LCEProblem(LCE_ROWS, lce_vocab(v), LCE_HIDDEN, dtype, "cpu")
                    problem = lce
                else:
                    ce = ce or AT.CEProblem(CE_ROWS, v, dtype, "cpu")
                    problem = ce
                for variant in variants:
                    yield kernel, variant, dt, v, problem


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--kernels", type=C.name_list, default=tuple(AT.KERNELS),
                   help=f"comma list of {', '.join(AT.KERNELS)}")
    p.add_argument("--vocab", type=C.int_list, default=VOCAB)
    p.add_argument("--dtypes", type=C.name_list, default=DTYPES)
    p.add_argument("--quick", action="store_true",
                   help="only each kernel's package default (tuning.heuristic) config")
    p.add_argument("--scalar", action="store_true",
                   help="compile the streaming kernels with VEC=1, as for a column-strided "
                        "tensor: element-wise accesses, for comparison")
    p.add_argument("--csv", help="default perf/results/static-sm<arch>/compile-triton<ver>.csv "
                                 "(overwritten)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    unknown = [k for k in args.kernels if k not in AT.KERNELS]
    if unknown:
        p.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(AT.KERNELS)}")
    for dt in args.dtypes:
        if dt not in C.DTYPE_NAMES:
            p.error(f"unknown dtype {dt!r}")
    if args.csv is None:
        args.csv = str(C.RESULTS_DIR / f"static-sm{args.arch}" / f"compile-triton{triton.__version__}.csv")
    return args


def configs_for(kernel: str, v: int, dt: str, quick: bool):
    from softmax_ce.kernels import tuning

    dtype = C.torch_dtype(dt)
    if quick:
        cfg = tuning.heuristic(kernel, v, dtype)
        meta, launch = tuning.split_meta(cfg)
        return [triton.Config(meta, **launch)]
    return AT.KERNELS[kernel].config_list(dtype)


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    driver.set_active(CompileOnlyDriver(args.arch))
    torch.manual_seed(0)
    work = [(k, vt, dt, v, prob, cfg) for k, vt, dt, v, prob in problems_for(args)
            for cfg in configs_for(k, v, dt, args.quick)]
    print(f"softmax_ce compile report | sm_{args.arch} | triton {triton.__version__} | "
          f"{len(work)} compilations", flush=True)
    base0 = dict(triton=triton.__version__, arch=f"sm_{args.arch}", git_sha=C.git_sha())
    bar = tqdm(total=len(work), desc="compile", file=sys.stderr, disable=args.no_progress)
    rows = []
    try:
        for kernel, variant, dt, v, problem, cfg in work:
            cd = AT.config_dict(cfg)
            base = dict(base0, kernel=kernel, variant=variant.name, dtype=dt, vocab=v,
                        config=json.dumps(cd, sort_keys=True),
                        **{k: cd.get(k) for k in ("BLOCK_V", "BLOCK_N", "BLOCK_D", "GROUP_N",
                                                  "num_warps", "num_stages")})
            call = problem.launch(kernel, variant, cfg)[0]
            if args.scalar:
                for name in ("VEC", "GRAD_VEC"):
                    if name in call.constexprs:
                        call.constexprs[name] = 1
                base["variant"] += "_scalar"
            row = compile_row(call, base)
            rows.append(row)
            bar.set_postfix_str(f"{kernel}/{variant.name} {dt} V={v} {row.get('regs', row['status'])}")
            bar.update()
    finally:
        bar.close()
    path = Path(args.csv)
    if path.exists():
        path.unlink()
    C.append_rows(path, COLUMNS, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    print(f"\ncsv {path}")
    return rows


def summary(rows) -> str:
    """Per (kernel, variant, dtype, V): configs compiled, with problems, register range and
    the widest logits-sized load."""
    import pandas as pd
    df = pd.DataFrame(rows)
    df["ok"] = df["status"] == "ok"
    out = []
    for (k, vt, dt, v), g in df.groupby(["kernel", "variant", "dtype", "vocab"], sort=False):
        ok = g[g["ok"]]
        out.append(dict(kernel=k, variant=vt, dtype=dt, V=v, configs=len(g), errors=len(g) - len(ok),
                        local=int(ok["problems"].str.contains("local").sum()),
                        smem=int(ok["problems"].str.contains("smem").sum()),
                        regs=f"{ok['regs'].min():.0f}-{ok['regs'].max():.0f}" if len(ok) else "-",
                        occupancy=f"{ok['occupancy'].min():.2f}-{ok['occupancy'].max():.2f}"
                        if len(ok) else "-",
                        ld=ok["ld"].iloc[0] if len(ok) else "-"))
    return C.table(out, [(c, "ld (bits x count), first config" if c == "ld" else c, None)
                         for c in out[0]]) if out else "nothing compiled"


if __name__ == "__main__":
    main()
