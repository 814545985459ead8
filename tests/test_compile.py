"""The kernels as Triton compiles them for Hopper (sm_90), checked without a GPU.

perf/compile_report.py compiles each kernel with its package-default config through
Triton's own JIT specialisation and reads the binary's resources; here it runs in a
subprocess (this process has Triton's interpreter on).  What is asserted is what a
memory-bound kernel needs and what the interpreter cannot show:

* every kernel compiles for sm_90, in every variant the package launches;
* the linear kernels' accumulating atomics are relaxed: no memory fence in the
  backward's machine code at all;
* the streaming kernels spill nothing and fit their shared memory, and the linear
  kernels' matmuls run on Hopper's tensor cores (HGMMA in the machine code);
* their logits loads and gradient stores are 16-byte vectors, for a vocabulary that
  is a multiple of 16 and for one that is not (50257: every other row starts off the
  16-byte grid); and the same report on element-wise launches (VEC=1) finds none,
  so the check can fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "perf" / "compile_report.py"
CE = "ce_fwd,ce_bwd,ce_scale"
WRITES_GRAD = {("ce_fwd", "fused"), ("ce_fwd", "fused_inplace"), ("ce_fwd", "fused_all_options"),
               ("ce_bwd", "recompute"), ("ce_bwd", "inplace"), ("ce_bwd", "all_options"),
               ("ce_bwd", "ent_grad"), ("ce_bwd", "teacher"), ("ce_scale", "scale")}


def report(tmp_path, *args):
    out = tmp_path / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(REPORT), "--quick", "--no-progress",
                           "--csv", str(tmp_path / "rows.csv"), "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows, "the report compiled nothing"
    return rows


def widths(cell: str) -> set:
    """'128x2 32x1' -> {128, 32}"""
    return {int(part.split("x")[0]) for part in cell.split()}


def sass(cell: str) -> dict:
    """'HGMMA:4 LDG128:2' -> {'HGMMA': 4, 'LDG128': 2}"""
    return {k: int(v) for k, v in (part.split(":") for part in cell.split())}


@pytest.fixture(scope="module")
def ce_rows(tmp_path_factory):
    return report(tmp_path_factory.mktemp("ce"), "--kernels", CE, "--dtypes", "bf16,fp32",
                  "--vocab", "128256,50257")


def test_streaming_kernels_compile_without_spills(ce_rows):
    seen = {(r["kernel"], r["variant"], r["dtype"], r["vocab"]) for r in ce_rows}
    # 13 kernel variants (with the entropy/argmax, teacher and entropy-gradient ones) x 2
    # dtypes x 2 vocabularies
    assert len(seen) == 13 * 2 * 2
    for r in ce_rows:
        what = f"{r['kernel']}/{r['variant']} {r['dtype']} V={r['vocab']}"
        assert r["status"] == "ok", f"{what}: {r['status']}"
        assert r["problems"] == "", f"{what}: {r['problems']} (regs {r['regs']}, stack " \
                                    f"{r['stack_bytes']}, smem {r['smem_bytes']})"
        assert r["occupancy"] >= 0.25, f"{what}: occupancy {r['occupancy']}"


def test_streaming_kernels_move_16_byte_vectors(ce_rows):
    for r in ce_rows:
        what = f"{r['kernel']}/{r['variant']} {r['dtype']} V={r['vocab']}"
        assert 128 in widths(r["ld"]), f"{what}: no 16-byte load in {r['ld']!r}"
        assert sass(r["sass"]).get("LDG128", 0) > 0, f"{what}: no LDG.E.128 in {r['sass']!r}"
        if (r["kernel"], r["variant"]) in WRITES_GRAD:
            assert 128 in widths(r["st"]), f"{what}: no 16-byte store in {r['st']!r}"
            assert sass(r["sass"]).get("STG128", 0) > 0, f"{what}: no STG.E.128 in {r['sass']!r}"


def test_one_tile_fused_forward(tmp_path):
    """Rows that fit one tile (V <= BLOCK_V): the fused forward keeps the row in registers
    between the statistics and the gradient.  It must still spill nothing and move
    16-byte vectors, at a V on the 16-byte grid and one off it."""
    rows = report(tmp_path, "--kernels", "ce_fwd", "--dtypes", "bf16,fp32", "--vocab", "4096,4001")
    fused = [r for r in rows if r["variant"].startswith("fused")]
    assert len(fused) == 3 * 2 * 2
    for r in fused:
        what = f"{r['kernel']}/{r['variant']} {r['dtype']} V={r['vocab']}"
        assert r["status"] == "ok" and r["problems"] == "", f"{what}: {r['status']} {r['problems']}"
        assert r["occupancy"] >= 0.25, f"{what}: occupancy {r['occupancy']}"
        assert sass(r["sass"]).get("LDG128", 0) > 0 and sass(r["sass"]).get("STG128", 0) > 0, what


def test_element_wise_launches_have_no_vectors(tmp_path):
    """The control: with VEC=1 (a column-strided tensor) the same check finds no vector."""
    rows = report(tmp_path, "--kernels", "ce_fwd,ce_bwd", "--dtypes", "bf16", "--vocab", "50257",
                  "--scalar")
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert 128 not in widths(r["ld"]), f"{r['kernel']}/{r['variant']}: {r['ld']}"
        assert "LDG128" not in sass(r["sass"]), f"{r['kernel']}/{r['variant']}: {r['sass']}"


def test_linear_kernels_compile_and_fit(tmp_path):
    rows = report(tmp_path, "--kernels", "lce_fwd,lce_bwd", "--dtypes", "bf16",
                  "--vocab", "128256,50257")
    assert len(rows) == 4 * 2
    fenced = []
    for r in rows:
        what = f"{r['kernel']}/{r['variant']} V={r['vocab']}"
        assert r["status"] == "ok", f"{what}: {r['status']}"
        assert "smem" not in r["problems"], f"{what}: shared memory {r['smem_bytes']}"
        assert r["blocks_per_sm"] >= 1, what
        # the tiles' matmuls run on Hopper's tensor cores (wgmma), fed by 16-byte copies
        assert sass(r["sass"]).get("HGMMA", 0) > 0, f"{what}: no HGMMA in {r['sass']!r}"
        assert sass(r["sass"]).get("LDGSTS128", 0) > 0, f"{what}: {r['sass']!r}"
        # relaxed accumulation: no GPU-wide fence and no L1 invalidation around the
        # atomics (acq_rel put one pair around each of them, 16 per D-step); the
        # forward's row-block lock keeps the few its acquire and release need
        fences = sass(r["sass"]).get("MEMBAR_GPU", 0) + sass(r["sass"]).get("CCTL", 0)
        if fences > (0 if r["kernel"] == "lce_bwd" else 2):
            fenced.append(f"{what}: {fences} fences ({r['sass']})")
    assert not fenced, "GPU-wide fences around the atomics:\n" + "\n".join(fenced)
