#!/usr/bin/env bash
# softmax_ce's performance session on a GPU machine, in ONE device call (10 minutes):
# install the carried peer wheels and the package, run the test suite on CUDA, tune the
# kernels (perf/autotune.py), benchmark against the peers (perf/bench.py: --quick, then
# as much of the full table as time allows), plot (perf/plot.py), and bundle everything
# into $OUT (at most 8 files come back from it, 2 folders deep).
#
# ---- Before the session, on a machine with network, in the repo root ------------------
# The peers are pure-Python wheels (py3-none-any); .whl/ is git-ignored, so it travels
# only when the device call names it in `carry`:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl cut-cross-entropy
#
# Resolved on 2026-11-21 to liger_kernel-0.8.5-py3-none-any.whl (Requires-Dist: torch>=2.1.2,
# triton>=2.3.1; everything else is behind extras) and cut_cross_entropy-25.1.1-py3-none-any.whl
# (Requires-Dist: torch, triton on Linux; the rest behind extras).  The GPU image has torch
# 2.11 and triton 3.6, so nothing else needs carrying.  To re-check after a new release:
#   unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist     (skip the `extra ==` lines)
#
# ---- The device call ----------------------------------------------------------------
#   run(command="SOFTMAX_CE_GIT_SHA=$(git describe --always --dirty) bash perf/gpu_session.sh",
#       carry=[".whl"], timeout_s=600)
# (write the sha out literally: the command runs there, where the tree may have no .git)
# Then, here: tar xzf <files_at>/results.tar.gz   (restores perf/results/<gpu-key>/ and
# kernels/tuned/<gpu-key>.json into the tree).  A later call sends them along and
# continues where this one stopped: autotune --skip-tuned, bench --resume.
#
# ---- Stages and their caps (seconds of wall clock; override by environment) ----------
#   STAGES="install tests autotune bench_quick bench plot"   (bundle always runs)
#   TOTAL_S=570 TESTS_S=150 AUTOTUNE_S=150 QUICK_S=150 PLOT_S=30
# Each stage runs under `timeout`, its cap cut to what is left of TOTAL_S; autotune and
# bench also get the cap as their own --time-budget, so they stop between trials/shapes
# and keep what they measured (CSV rows are appended as measured; the tuned table is
# rewritten after every finished group).  e.g. a second call that only tunes and benches:
#   STAGES="install autotune bench plot" AUTOTUNE_S=300 bash perf/gpu_session.sh
#
# Files in $OUT: session.log, pytest.log, results.tar.gz (perf/results/ and kernels/tuned/),
# bench.csv, autotune.csv, tuned-<gpu-key>.json, roofline.png, bench_gbps_bf16.png.

set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/softmax_ce_session}
mkdir -p "$OUT"
STAGES=${STAGES:-"install tests autotune bench_quick bench plot"}
TOTAL_S=${TOTAL_S:-570}
TESTS_S=${TESTS_S:-150}
AUTOTUNE_S=${AUTOTUNE_S:-150}
QUICK_S=${QUICK_S:-150}
PLOT_S=${PLOT_S:-30}
RESERVE_S=20  # bundling at the end
START=$(date +%s)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

left() { echo $((TOTAL_S - ($(date +%s) - START))); }
# cap WANT [KEEP]: WANT, cut so that KEEP seconds (default RESERVE_S) stay after it
cap() {
    local want=$1 keep=${2:-$RESERVE_S} l
    l=$(($(left) - keep))
    ((l < want)) && want=$l
    ((want < 0)) && want=0
    echo "$want"
}
# inner T: a script's own --time-budget inside a T-second cap.  The scripts check their
# budget between trials / shapes, and one shape (torch.compile compiling, cce autotuning)
# can take a minute: keep a third of T, at most 60 s, as the margin.
inner() {
    local t=$1 m
    m=$((t / 3))
    ((m > 60)) && m=60
    echo $((t - m > 1 ? t - m : 1))
}
has() { [[ " $STAGES " == *" $1 "* ]]; }
declare -A RC
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S) UTC, $(left) s left)"; }
run_stage() {  # run_stage NAME SECONDS cmd...: the command under timeout, its rc recorded
    local name=$1 secs=$2
    shift 2
    if ((secs < 5)); then
        echo "skipped: no time left"
        RC[$name]=skipped
        return
    fi
    timeout -k 10 "$secs" "$@"
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "[$name] stopped by its ${secs} s cap"
    RC[$name]=$rc
}

session() {
    if has install; then
        stage install
        if compgen -G ".whl/*.whl" >/dev/null; then
            python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
                && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            echo "peer wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
        else
            echo "no .whl/ folder: liger and cce will be reported unavailable"
        fi
        # torch and triton are already on the machine: --no-deps, no build isolation
        $PY -m pip install -q -e . --no-deps --no-build-isolation
        RC[install]=$?
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
            --format=csv 2>/dev/null || true
    fi
    $PY - <<'EOF'
import importlib, torch, triton
print(f"torch {torch.__version__} | triton {triton.__version__} | "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA'}")
for m in ("liger_kernel", "cut_cross_entropy", "softmax_ce"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'installed')} ({mod.__file__})")
    except Exception as exc:
        print(f"  {m}: unavailable ({type(exc).__name__}: {exc})")
EOF
    KEY=$($PY -c "import torch; from softmax_ce.kernels.tuning import device_key; \
print(device_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else 'cpu')")
    RES=perf/results/$KEY
    echo "results: $RES | tuned table: kernels/tuned/$KEY.json"

    if has tests; then
        stage tests
        # tee through a process substitution: run_stage must stay in this shell (RC)
        run_stage tests "$(cap "$TESTS_S")" $PY -m pytest -q -x -p no:cacheprovider tests \
            > >(tee "$OUT/pytest.log") 2>&1
    fi

    if has autotune; then
        stage autotune
        t=$(cap "$AUTOTUNE_S")
        # the script's own budget stops between trials; the outer cap is the backstop
        run_stage autotune "$t" $PY perf/autotune.py --skip-tuned --no-progress \
            --time-budget "$(inner "$t")"
    fi

    if has bench_quick; then
        stage bench_quick
        t=$(cap "$QUICK_S" $((RESERVE_S + PLOT_S)))
        run_stage bench_quick "$t" $PY perf/bench.py --quick --resume --time-budget "$(inner "$t")"
    fi

    if has bench; then
        stage bench
        t=$(cap 100000 $((RESERVE_S + PLOT_S)))
        run_stage bench "$t" $PY perf/bench.py --resume --time-budget "$(inner "$t")"
    fi

    if has plot; then
        stage plot
        if [[ -f $RES/bench.csv ]]; then
            run_stage plot "$(cap "$PLOT_S" 5)" $PY perf/plot.py "$RES/bench.csv"
        else
            echo "no $RES/bench.csv: nothing to plot"
        fi
    fi

    stage bundle
    tar czf "$OUT/results.tar.gz" perf/results kernels/tuned 2>/dev/null
    n=3  # session.log, pytest.log, results.tar.gz
    for f in "$RES/bench.csv" "$RES/autotune.csv" "kernels/tuned/$KEY.json" \
             "$RES/roofline.png" "$RES/bench_gbps_bf16.png"; do
        if [[ -f $f && $n -lt 8 ]]; then
            name=$(basename "$f")
            [[ $f == kernels/tuned/* ]] && name="tuned-$name"
            cp "$f" "$OUT/$name"
            n=$((n + 1))
        fi
    done
    ls -la "$OUT"

    echo
    echo "=== stage exit codes (0 ok, 124 stopped by its cap)"
    local bad=0
    for s in install tests autotune bench_quick bench plot; do
        if [[ -n ${RC[$s]+x} ]]; then
            echo "  $s: ${RC[$s]}"
            [[ ${RC[$s]} != 0 && ${RC[$s]} != skipped ]] && bad=1
        fi
    done
    echo "total $(($(date +%s) - START)) s"
    return $bad
}

session 2>&1 | tee "$OUT/session.log"
exit "${PIPESTATUS[0]}"
