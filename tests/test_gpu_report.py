"""perf/gpu_report.py --dry-run: the whole report end to end on CPU (tiny shapes, both the
Triton interpreter and the PyTorch path), into tmp_path, with its archive."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd

REPORT = Path(__file__).resolve().parents[1] / "perf" / "gpu_report.py"


def test_gpu_report_dry_run(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPORT), "--dry-run", "--budget-s", "400",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    for stage in ("tests", "bench_ce", "bench_linear", "plot", "tune"):
        assert f"[{stage}] ok" in log, log[-3000:]
    env = json.loads((out / "env.json").read_text())
    assert env["copy_gbps"] > 0 and env["torch"] and env["triton"]
    bench = pd.read_csv(out / "bench.csv")
    ours = bench[bench["provider"].str.startswith("softmax_ce")]
    assert set(ours["path"]) == {"Triton interpreter", "PyTorch path"}
    assert (ours["ms"] > 0).all() and (ours["gbps"] > 0).all()
    for option in ("softmax_ce_stats", "softmax_ce_teacher"):  # measured beside the plain loss
        rows = ours[ours["provider"] == option]
        assert len(rows) == 2 * 3 and set(rows["path"]) == {"Triton interpreter", "PyTorch path"}
    peers = bench[bench["provider"].isin(["liger", "cce", "quack"])]
    assert peers["ms"].isna().all() and peers["note"].str.match("unavailable|skipped").all()
    assert {"bench_gbps_fp32.png", "roofline.png", "autotune.png"} <= {p.name for p in out.iterdir()}
    tuned = json.loads((out / "tuned" / "cpu-interpreter.json").read_text())
    assert set(tuned["configs"]) == {"ce_fwd", "ce_scale"}
    with tarfile.open(out / "gpu-report-cpu.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"bench.csv", "autotune.csv", "env.json", "report.log", "roofline.png"} <= names
