"""One command that settles a GPU: tests, benchmarks, tuning, plots, one archive.

    python perf/gpu_report.py --budget-s 480 --out DIR [--wheelhouse WHEELS] [--dry-run]

Stages, each a subprocess under a time cap (its share of the budget, cut to what is left; a
stage whose minimum does not fit is skipped with a line saying so):

1. env      device, capability, memory, versions of torch/triton/peers, and the copy
            ceiling (a device-to-device copy, triton.testing.do_bench median): env.json
2. tests    the CUDA tier, `pytest -m cuda tests/test_cuda.py` (tests skip without CUDA and
            are then reported as skipped, never as passed): pytest.log
3. bench    perf/bench.py against every peer that imports (torch eager, torch.compile, Liger,
            CCE, QuACK, torch's chunked F.linear_cross_entropy): cross-entropy forward,
            backward and training step at N=8192, V in HEADLINE_VOCAB, bf16 (goal shape
            first), with the options measured beside the plain loss (softmax_ce_stats:
            temperature 2, entropy and argmax, no extra bytes; softmax_ce_teacher: bf16
            teacher logits as the target, one more read of the teacher's row per pass),
            then the linear CE at Llama-3-8B's head (N=8192, D=4096, V=128256): bench.csv,
            appended row by row; plotted after each part
4. tune     perf/autotune.py on the headline shapes (LCE first, then the CE kernels, goal
            vocabulary first): tuned/<gpu-key>.json and autotune.csv
5. bundle   every file of DIR into DIR/gpu-report-<gpu-key>.tar.gz, also when the run is
            interrupted or out of budget, so a stopped run keeps what it measured.

Budget on an H100/H200 (first-call compiles included), in STAGES below: env 15 s, tests 90 s,
bench 270 s (CE 210, linear 60), tune 90 s, plots and archive 15 s.  Compiles, counted on
CPU from the kernels' config lists: the package runs its heuristic config where no table
exists, so a CE shape compiles about six kernel variants per vocabulary (two
specialisations: multiples of 16, and 50257); torch.compile recompiles per shape; tuning
compiles and times 11 + 11 + 6 configs (ce_fwd, ce_bwd, ce_scale) per vocabulary and 3 + 5
(lce_fwd, lce_bwd) for the linear head.  --dry-run runs every stage on CPU at tiny shapes,
through both the Triton interpreter and the PyTorch path.

--wheelhouse DIR installs the peers' wheels found there (pip install --no-index --no-deps
--target <temp>) for a machine without network; the children get them on PYTHONPATH.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
sys.path.pop(0)

REPO = C.PERF_DIR.parent
HEADLINE_VOCAB = (128256, 32000, 50257, 151936, 256000)
# stage -> (cap s, least worth starting s)
STAGES = {"env": (15, 5), "tests": (90, 20), "bench_ce": (210, 30), "bench_linear": (60, 20),
          "tune": (90, 20)}
RESERVE_S = 15  # plots and the archive
PEERS = ("liger-kernel", "cut-cross-entropy", "quack-kernels")

ENV_PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2]); import _common as C
dev = torch.device(sys.argv[1])
info = dict(device=C.device_name(dev), key=C.device_key(dev), torch=torch.__version__,
            triton=C.package_version("triton"), python=sys.version.split()[0], git_sha=C.git_sha(),
            path=C.path_name(torch.empty(1, device=dev)),
            peers={p: C.package_version(p) for p in %r})
if dev.type == "cuda":
    p = torch.cuda.get_device_properties(dev)
    info.update(capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
mib = int(sys.argv[3])
info.update(copy_mib=mib, copy_gbps=round(C.copy_gbps(dev, mib << 20), 1))
print(json.dumps(info))
""" % (PEERS,)


class Report:
    def __init__(self, a):
        self.a, self.out, self.t0 = a, Path(a.out).resolve(), time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "report.log", "a")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.summary = []

    def left(self):
        return self.a.budget_s - (time.monotonic() - self.t0)

    def say(self, line):
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, stage, cmd, env=None, cap=None):
        """Run cmd under min(cap, budget left - reserve); its stdout to the console and the log.
        -> exit status, or None when skipped."""
        cap, least = STAGES.get(stage, (cap, 5)) if cap is None else (cap, 5)
        limit = min(cap, self.left() - RESERVE_S)
        if limit < least:
            self.say(f"[{stage}] skipped: {max(0, self.left()):.0f} s of the budget left, "
                     f"the stage needs at least {least} s (+{RESERVE_S} s reserve)")
            self.summary.append(f"{stage}: skipped (budget)")
            return None
        self.say(f"[{stage}] {' '.join(map(str, cmd))}  (cap {limit:.0f} s)")
        t0 = time.monotonic()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, env=dict(self.env, **(env or {})))
        try:
            for line in proc.stdout:  # a child past its cap is killed from the deadline check
                self.log.write(line)
                sys.stdout.write(line)
                if time.monotonic() - t0 > limit:
                    proc.kill()
            rc = proc.wait(timeout=max(1, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        dt = time.monotonic() - t0
        status = "ok" if rc == 0 else f"stopped at its cap ({limit:.0f} s)" if dt >= limit else f"exit {rc}"
        self.say(f"[{stage}] {status} after {dt:.0f} s; {self.left():.0f} s of the budget left")
        self.summary.append(f"{stage}: {status}, {dt:.0f} s")
        return rc

    def bundle(self):
        key = getattr(self, "key", "unknown")
        path = self.out / f"gpu-report-{key}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for f in sorted(self.out.rglob("*")):
                if f.is_file() and f != path and not f.name.endswith(".tar.gz"):
                    tar.add(f, arcname=f"gpu-report-{key}/{f.relative_to(self.out)}")
        self.say(f"archive: {path}")
        return path


def install_wheels(r, wheelhouse):
    wheels = sorted(Path(wheelhouse).glob("*.whl"))
    if not wheels:
        r.say(f"[wheelhouse] no wheels in {wheelhouse}")
        return
    target = tempfile.mkdtemp(prefix="softmax_ce_peers_")
    rc = r.run("wheelhouse", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                              "--target", target, *wheels], cap=60)
    if rc == 0:
        r.env["PYTHONPATH"] = os.pathsep.join(filter(None, [target, r.env.get("PYTHONPATH")]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget, seconds")
    p.add_argument("--out", required=True, help="output folder (CSV, PNG, logs, archive)")
    p.add_argument("--wheelhouse", help="folder of peer wheels to install offline")
    p.add_argument("--dry-run", action="store_true", help="every stage on CPU at tiny shapes")
    p.add_argument("--stages", type=C.name_list, default=("env", "tests", "bench", "tune"),
                   help="subset of env,tests,bench,tune (the archive is always written)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    r = Report(a)
    py, perf = sys.executable, C.PERF_DIR
    dev = "cpu" if a.dry_run else "cuda"
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    r.say(f"softmax_ce GPU report | budget {a.budget_s:.0f} s | out {r.out}"
          + (" | DRY RUN on CPU (tiny shapes)" if a.dry_run else ""))
    try:
        if a.wheelhouse:
            install_wheels(r, a.wheelhouse)
        out = subprocess.run([py, "-c", ENV_PROBE, dev, perf, "8" if a.dry_run else "2048"],
                             capture_output=True, text=True, env=r.env, cwd=REPO, timeout=120)
        if out.returncode:
            r.say(f"[env] failed: {out.stderr.strip()[-2000:]}")
            return 1
        env = json.loads(out.stdout.strip().splitlines()[-1])
        r.key = env["key"]
        (r.out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
        r.say("[env] " + " | ".join(f"{k} {v}" for k, v in env.items() if k != "peers")
              + " | peers " + ", ".join(f"{k} {v}" for k, v in env["peers"].items()))
        if not a.dry_run and "capability" not in env:
            r.say("[env] no CUDA device: run with --dry-run on a machine without a GPU")
            return 1
        bench_csv, tune_csv = r.out / "bench.csv", r.out / "autotune.csv"
        plot = [py, perf / "plot.py", bench_csv, "--out-dir", r.out]
        if "tests" in a.stages:
            r.run("tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                            "tests/test_cuda.py", f"--junitxml={r.out / 'pytest.xml'}"])
        if "bench" in a.stages:
            common = [py, perf / "bench.py", "--csv", bench_csv, "--device", dev]
            if a.dry_run:  # both CPU back ends: the interpreter, then the PyTorch path
                tiny = ["--vocab", "64", "--rows", "4", "--hidden", "16", "--dtypes", "fp32",
                        "--cpu-reps", "2", "--copy-mib", "8"]
                for interp in ("1", "0"):
                    r.run("bench_ce", common + tiny + ["--sections", "ce"], {"TRITON_INTERPRET": interp})
                    r.run("bench_linear", common + tiny + ["--sections", "linear"],
                          {"TRITON_INTERPRET": interp})
            else:
                r.run("bench_ce", common + ["--sections", "ce", "--rows", "8192", "--dtypes", "bf16",
                                            "--vocab", ",".join(map(str, HEADLINE_VOCAB)),
                                            "--time-budget", str(STAGES["bench_ce"][0] - 20)])
                r.run("plot", plot, cap=15)
                r.run("bench_linear", common + ["--sections", "linear", "--quick"])
            r.run("plot", plot, cap=15)
        if "tune" in a.stages:
            tune = [py, perf / "autotune.py", "--csv", tune_csv, "--table-dir", r.out / "tuned",
                    "--no-progress"]
            if a.dry_run:
                r.run("tune", tune + ["--dry-run", "--kernels", "ce_fwd,ce_scale"])
            else:
                budget = str(STAGES["tune"][0] // 3)
                r.run("tune", tune + ["--kernels", "lce_fwd,lce_bwd", "--vocab", "128256",
                                      "--dtypes", "bf16", "--time-budget", budget])
                r.run("tune", tune + ["--vocab", ",".join(map(str, HEADLINE_VOCAB)), "--dtypes",
                                      "bf16", "--time-budget", str(STAGES["tune"][0] - int(budget) - 10)])
            if tune_csv.exists():
                r.run("plot", [py, perf / "plot.py", tune_csv, "--out-dir", r.out], cap=15)
    except KeyboardInterrupt:
        r.say("interrupted: bundling what was measured")
    finally:
        r.say("summary: " + "; ".join(r.summary))
        archive = r.bundle()
        r.say(f"done in {time.monotonic() - r.t0:.0f} s of {a.budget_s:.0f}. To commit: copy "
              f"bench.csv and the PNGs to perf/results/<gpu-key>/ and tuned/<gpu-key>.json to "
              f"kernels/tuned/ (see README, 'GPU report'); {archive.name} holds everything.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
