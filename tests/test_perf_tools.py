"""The performance tooling (perf/bench.py, perf/autotune.py, perf/plot.py) on tiny shapes.

Without a GPU these run the CPU paths: bench.py on CPU tensors (through Triton's
interpreter, which conftest.py switches on), autotune.py's dry run through the
interpreter, plot.py on a synthetic CSV.  With a GPU, bench.py and the autotune dry run
also run on CUDA (tiny shapes, short timings).  Nothing here writes outside tmp_path:
CSVs and the tuned table go to --csv / --table-dir.

perf/ is not a package: the scripts are loaded by file path, as they load their
shared perf/_common.py.
"""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from softmax_ce.kernels import tuning

PERF = Path(__file__).resolve().parents[1] / "perf"
sys.path.insert(0, str(PERF))
import _common  # noqa: E402
sys.path.pop(0)
CUDA = torch.cuda.is_available()

REQUIRED = {"gpu", "provider", "mode", "dtype", "n_rows", "vocab", "ms", "gbps", "peak_mem_mb",
            "copy_gbps", "torch", "triton", "git_sha", "timestamp", "note"}


def load(name):
    """perf/<name>.py as a module (registered, so its dataclasses resolve)."""
    modname = f"softmax_ce_perf_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def bench():
    return load("bench")


@pytest.fixture
def autotune():
    return load("autotune")


@pytest.fixture
def fresh_tables():
    """tuning.load_table caches per process: never let a test's table outlive the test."""
    tuning.load_table.cache_clear()
    yield
    tuning.load_table.cache_clear()


# ----------------------------------------------------------------------------
# bench.py
# ----------------------------------------------------------------------------

BENCH_PROVIDERS = ("softmax_ce,softmax_ce_fused,softmax_ce_inplace,softmax_ce_stats,"
                   "softmax_ce_teacher,torch,softmax_ce_linear,torch_unfused,matmul_floor")


def bench_argv(device, csv_path, *extra, dtype="fp32"):
    return ["--device", device, "--vocab", "64", "--rows", "4", "--hidden", "16",
            "--dtypes", dtype, "--csv", str(csv_path), "--copy-mib", "8", "--cpu-reps", "2",
            "--warmup-ms", "1", "--rep-ms", "5", *extra]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs CUDA"))])
def test_bench_writes_csv(bench, tmp_path, device):
    csv_path = tmp_path / "res" / "bench.csv"
    # bf16 on a GPU (the kernels' main case), fp32 on CPU
    dtype, size = ("bf16", 2) if device == "cuda" else ("fp32", 4)
    rows = bench.main(bench_argv(device, csv_path, "--providers", BENCH_PROVIDERS, dtype=dtype))
    on_disk = read_csv(csv_path)
    assert REQUIRED <= set(on_disk[0])
    assert len(on_disk) == len(rows) == 9 * 3  # providers x modes
    assert {r["section"] for r in on_disk} == {"ce", "linear"}
    assert {r["mode"] for r in on_disk} == {"forward", "backward", "fwd+bwd"}
    for r in on_disk:
        assert not any(w in r["note"] for w in ("error", "OOM", "unavailable")), r
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0, r
        assert r["git_sha"] and r["torch"] == torch.__version__ and r["triton"]
        assert int(r["n_rows"]) == 4 and int(r["vocab"]) == 64
        if r["section"] == "linear":
            assert float(r["tflops"]) > 0 and r["hidden"] == "16"
        else:
            # the byte model: bytes per logit element = model x the dtype's size
            model = bench.byte_model(bench.CE_PROVIDERS[r["provider"]], int(r["vocab"]))[r["mode"]]
            assert float(r["bytes_per_elem"]) == model * size and r["dtype"] == dtype
        if device == "cuda":
            assert float(r["peak_mem_mb"]) >= 0
        else:
            assert r["peak_mem_mb"] == ""  # not measured on CPU
        if r["provider"].startswith("softmax_ce"):  # which back end ran, on every row
            assert r["path"] == ("CUDA Triton kernels" if device == "cuda" else "Triton interpreter"), r

    # the options' byte models: temperature, entropy and argmax add nothing; the teacher
    # one read of its row per pass
    assert bench.byte_model(bench.CE_PROVIDERS["softmax_ce_stats"], 64) == bench.RECOMPUTE
    assert bench.byte_model(bench.CE_PROVIDERS["softmax_ce_teacher"], 64) == {
        "forward": 2, "backward": 3, "fwd+bwd": 5}
    lines = bench.options_report(rows)
    assert len(lines) == 2 * 3 and all("x softmax_ce's time (byte model" in ln for ln in lines), lines

    # a second run appends under the same header, and --resume skips what is there
    again = bench.main(bench_argv(device, csv_path, "--providers", "torch", "--modes",
                                  "forward", "--resume", dtype=dtype))
    assert again == [] and len(read_csv(csv_path)) == len(on_disk)


def test_bench_unavailable_and_failing_providers(bench, tmp_path, monkeypatch):
    """A peer that does not import, and one that raises, get rows with ms empty and a note;
    the others are measured as usual."""
    fake = bench.Provider("fake_peer", lambda: None, bench.NOMINAL,
                          requires="softmax_ce_no_such_peer_module")

    def broken(x, t):
        raise RuntimeError("broken peer")
    monkeypatch.setitem(bench.CE_PROVIDERS, "fake_peer", fake)
    monkeypatch.setitem(bench.CE_PROVIDERS, "broken_peer",
                        bench.Provider("broken_peer", lambda: broken, bench.NOMINAL))
    csv_path = tmp_path / "bench.csv"
    bench.main(bench_argv("cpu", csv_path, "--providers", "fake_peer,broken_peer,torch",
                          "--sections", "ce", "--modes", "forward,fwd+bwd"))
    rows = read_csv(csv_path)
    by = {p: [r for r in rows if r["provider"] == p] for p in ("fake_peer", "broken_peer", "torch")}
    assert all(len(v) == 2 for v in by.values()), rows
    for r in by["fake_peer"] + by["broken_peer"]:
        assert r["ms"] == "" and r["gbps"] == "", r  # never estimated
    assert all(r["note"].startswith("unavailable: ModuleNotFoundError") for r in by["fake_peer"])
    assert all(r["note"] == "error: RuntimeError: broken peer" for r in by["broken_peer"])
    assert all(float(r["ms"]) > 0 for r in by["torch"])


def test_bench_rejects_unknown_names(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(bench_argv("cpu", tmp_path / "b.csv", "--providers", "no_such_provider"))
    with pytest.raises(SystemExit):
        bench.main(bench_argv("cpu", tmp_path / "b.csv", "--modes", "sideways"))


def test_bench_goals_report(bench):
    """The CUDA summary, judged on synthetic rows (CSV-like strings, as --resume reads them)."""
    def row(provider, mode, gbps, ms, vocab=128256, n=8192, dtype="bf16", beyond=""):
        return dict(section="ce", provider=provider, mode=mode, dtype=dtype, n_rows=str(n),
                    vocab=str(vocab), hidden="", ms=str(ms), gbps=str(gbps), copy_gbps="3000",
                    peak_beyond_grad_mb=str(beyond))
    mib_per_row = 512 / 2**20  # 512 B per row
    rows = [
        row("softmax_ce", "forward", 2800, 1.0),            # 93%: pass
        row("softmax_ce", "forward", 2000, 1.0, vocab=4096),  # below the V >= 32000 line: ignored
        row("softmax_ce", "fwd+bwd", 2400, 2.0, beyond=8192 * mib_per_row),  # 80%: fail
        row("liger", "fwd+bwd", 900, 5.0),                  # 2.5x: pass
        row("torch_compile", "fwd+bwd", 1500, 2.5),         # 1.25x: fail
    ]
    lines = bench.goals_report(rows)
    text = "\n".join(lines)
    assert lines[0].startswith("PASS") and "1/1 rows" in lines[0], text
    step = next(ln for ln in lines if "fwd+bwd >= 85%" in ln and "(softmax_ce," in ln)
    assert step.startswith("FAIL") and "80.0%" in step, text
    assert next(ln for ln in lines if "than liger" in ln).startswith("PASS"), text
    assert next(ln for ln in lines if "than torch_compile" in ln).startswith("FAIL"), text
    mem = next(ln for ln in lines if "O(N)" in ln)
    assert mem.startswith("PASS") and "512 B/row" in mem, text


# ----------------------------------------------------------------------------
# autotune.py
# ----------------------------------------------------------------------------

def test_autotune_dry_run_writes_csv_and_table(autotune, tmp_path, monkeypatch, fresh_tables):
    csv_path, table_dir = tmp_path / "autotune.csv", tmp_path / "tuned"
    out = autotune.main(["--dry-run", "--linear", "--csv", str(csv_path),
                         "--table-dir", str(table_dir), "--no-progress"])
    rows = read_csv(csv_path)

    # one row per (kernel, variant, config) of the tiny sweep, every one checked correct
    # (on a GPU a config may not fit the shared memory: the sweep records and skips it)
    dry = autotune.DRY
    expected = sum(len(autotune.pick_configs(spec.configs(), dry["max_configs"])) * len(spec.variants)
                   for spec in autotune.KERNELS.values())
    assert len(rows) == expected == len(out["rows"])
    for r in rows:
        assert r["status"] == "ok" or (CUDA and r["status"].startswith("error: OutOfResources")), r
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["ms"]) > 0 for r in ok)
    assert {r["variant"] for r in rows if r["kernel"] == "ce_fwd"} == {"recompute", "fused",
                                                                       "fused_inplace"}

    # the table: winners are the min-ms configs of each group's primary variant
    table_path = Path(out["table"])
    assert table_path == table_dir / f"{out['device_key']}.json"
    table = json.loads(table_path.read_text())
    assert {"device", "torch", "triton", "created", "tuned_for", "configs"} <= set(table)
    v = dry["vocab"][0]
    (short,) = {r["dtype"] for r in rows}  # fp32 through the interpreter, bf16 on a GPU
    dname = tuning.dtype_name(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[short]))
    dtype = getattr(torch, dname)
    for kernel in autotune.KERNELS:
        group = [r for r in rows if r["kernel"] == kernel and r["primary"] == "1"]
        best = min((r for r in group if r["status"] == "ok"), key=lambda r: float(r["ms"]))
        assert [r["winner"] for r in group].count("1") == 1 and best["winner"] == "1"
        entry = table["configs"][kernel][dname][str(v)]
        assert entry == json.loads(best["config"])
        assert set(entry) >= {"BLOCK_V", "num_warps", "num_stages"}

    # ... and softmax_ce.kernels.tuning reads it as the package would on that device
    monkeypatch.setattr(tuning, "TABLE_DIR", table_dir)
    tuning.load_table.cache_clear()
    assert tuning.load_table(out["device_key"])["configs"] == table["configs"]
    name = table["device"]
    monkeypatch.setattr(tuning, "_device_name", lambda index: name)
    device = torch.device("cuda" if CUDA else "cpu")
    for kernel in autotune.KERNELS:
        assert tuning.config_for(kernel, device, v, dtype) == table["configs"][kernel][dname][str(v)]
    assert tuning.config_for("ce_fwd", device, v + 1, dtype) is None  # untuned: autotune there

    # a second sweep merges: an entry for another vocabulary joins the first ones
    autotune.main(["--dry-run", "--kernels", "ce_scale", "--vocab", "40", "--csv", str(csv_path),
                   "--table-dir", str(table_dir), "--no-progress"])
    merged = json.loads(table_path.read_text())
    assert set(merged["configs"]["ce_scale"][dname]) == {str(v), "40"}
    assert merged["configs"]["ce_fwd"] == table["configs"]["ce_fwd"]
    assert merged["created"] == table["created"]


def test_autotune_inplace_trials_restore_their_inputs(autotune):
    """An in-place trial (gradient over the logits) leaves the logits as they were, and the
    result check would catch a trial that ran on a corrupted input."""
    device = torch.device("cuda" if CUDA else "cpu")
    problem = autotune.CEProblem(4, 100, torch.float32, device)
    fwd_inplace = next(vt for vt in autotune.KERNELS["ce_fwd"].variants if vt.inplace)
    cfg = autotune.KERNELS["ce_fwd"].configs()[0]
    sweep_rows = []
    for variant in autotune.KERNELS["ce_fwd"].variants + autotune.KERNELS["ce_bwd"].variants:
        kernel = "ce_fwd" if variant in autotune.KERNELS["ce_fwd"].variants else "ce_bwd"
        launch, setup, check, _ = problem.launch(kernel, variant, cfg)
        for _ in range(3):  # as the timer does: setup, then the launch
            if setup:
                setup()
            launch()
        sweep_rows.append((kernel, variant.name, check()))
        problem.reset()
        assert torch.equal(problem.logits, problem.pristine), (kernel, variant.name)
    assert all(ok for _, _, ok in sweep_rows), sweep_rows

    # without its restore, the second launch reads a gradient as logits: check() says so
    launch, _, check, _ = problem.launch("ce_fwd", fwd_inplace, cfg)
    launch()
    launch()
    assert not check()
    problem.reset()


def test_autotune_launch_matches_the_package(autotune):
    """The sweep's raw launch (arguments by parameter name) computes what the package's own
    launcher does: the per-row loss of softmax_ce.cross_entropy(reduction='none')."""
    import softmax_ce

    device = torch.device("cuda" if CUDA else "cpu")
    problem = autotune.CEProblem(5, 77, torch.float32, device, seed=3)
    recompute = autotune.KERNELS["ce_fwd"].variants[0]
    launch, _, check, _ = problem.launch("ce_fwd", recompute, autotune.KERNELS["ce_fwd"].configs()[0])
    launch()
    assert check()
    want = softmax_ce.cross_entropy(problem.pristine, problem.target, reduction="none")
    torch.testing.assert_close(problem.loss * problem.n, want.float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# plot.py
# ----------------------------------------------------------------------------

def synthetic_csv(bench, path, gpu="NVIDIA H100 80GB HBM3"):
    import _common as common
    rows = []
    for provider, eff in (("softmax_ce", 0.9), ("softmax_ce_fused", 0.85), ("torch", 0.3),
                          ("liger", 0.45)):
        for mode in bench.MODES:
            for dtype, b in (("bf16", 2), ("fp32", 4)):
                for v in (4096, 32000, 128256):
                    for n in (4096, 8192):
                        gbps = 3000 * eff
                        nbytes = bench.CE_PROVIDERS[provider].bytes[mode] * b * n * v
                        rows.append(dict(timestamp="2026-11-21T00:00:00Z", gpu=gpu, section="ce",
                                         provider=provider, mode=mode, dtype=dtype, n_rows=n,
                                         vocab=v, ms=nbytes / gbps / 1e6, gbps=gbps,
                                         copy_gbps=3000, torch="2.11.0", triton="3.6.0",
                                         path="CUDA Triton kernels"
                                         if provider.startswith("softmax_ce") else ""))
    rows.append(dict(timestamp="2026-11-21T00:00:00Z", gpu=gpu, section="ce", provider="cce",
                     mode="forward", dtype="bf16", n_rows=8192, vocab=32000,
                     note="unavailable: ModuleNotFoundError"))  # no ms: not plotted
    for provider, tflops in (("softmax_ce_linear", 500), ("matmul_floor", 700)):
        n, v, d = 16384, 128256, 4096
        ms = 6 * n * v * d / (tflops * 1e12) * 1e3
        rows.append(dict(timestamp="2026-11-21T00:00:00Z", gpu=gpu, section="linear",
                         provider=provider, mode="fwd+bwd", dtype="bf16", n_rows=n, vocab=v,
                         hidden=d, ms=ms, gbps=3 * (n + v) * d * 2 / (ms * 1e-3) / 1e9,
                         tflops=tflops, copy_gbps=3000))
    common.append_rows(path, bench.COLUMNS, rows)
    return path


def test_plot_writes_pngs(bench, tmp_path):
    plot = load("plot")
    csv_path = synthetic_csv(bench, tmp_path / "nvidia" / "bench.csv")
    written = [Path(p) for p in plot.main([str(csv_path)])]
    names = {p.name for p in written}
    assert names == {"bench_gbps_bf16.png", "bench_gbps_fp32.png", "roofline.png"}
    for p in written:
        assert p.parent == csv_path.parent and p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.datasheet("NVIDIA H100 80GB HBM3")["hbm_gbps"] == 3350
    assert plot.datasheet("NVIDIA H100 PCIe")["hbm_gbps"] == 2000
    assert plot.datasheet("NVIDIA H200")["hbm_gbps"] == 4800


def test_plot_unknown_device_and_out_dir(bench, tmp_path):
    """A device without datasheet numbers (the CPU) still gets both plots, roofs omitted."""
    plot = load("plot")
    csv_path = synthetic_csv(bench, tmp_path / "bench.csv", gpu="cpu (some CPU)")
    assert plot.datasheet("cpu (some CPU)") is None
    written = plot.main([str(csv_path), "--out-dir", str(tmp_path / "png"), "--rows", "4096"])
    assert {Path(p).name for p in written} == {"bench_gbps_bf16.png", "bench_gbps_fp32.png",
                                               "roofline.png"}
    assert all(Path(p).parent == tmp_path / "png" and Path(p).stat().st_size > 1000
               for p in written)


def test_plot_reads_the_autotune_csv_and_refuses_clearly(autotune, tmp_path, capsys):
    """plot.py on the sweep's own CSV plots it (it used to fail with KeyError 'section'); a
    missing file or a foreign CSV is a one-line error, not a traceback."""
    plot = load("plot")
    rows = [dict(timestamp="t", gpu="cpu-interpreter", kernel=k, variant="recompute", primary=1,
                 dtype="fp32", n_rows=4, vocab=100, config='{"BLOCK_V": %d}' % b, ms=b / 1000,
                 status="ok", torch="2", triton="3") for k in ("ce_fwd", "ce_bwd") for b in (64, 128)]
    csv_path = _common.append_rows(tmp_path / "autotune.csv", autotune.COLUMNS, rows)
    (png,) = plot.main([str(csv_path)])
    assert Path(png).name == "autotune.png" and Path(png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no such file"):
        plot.main([str(tmp_path / "missing.csv")])
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="neither a bench.py nor an autotune.py CSV"):
        plot.main([str(tmp_path / "other.csv")])


def test_plot_titles_name_path_device_and_versions(bench, tmp_path, monkeypatch):
    plot = load("plot")
    titles = []
    real = plot.plt.Figure.suptitle
    monkeypatch.setattr(plot.plt.Figure, "suptitle", lambda self, t, **k: (titles.append(t), real(self, t, **k))[1])
    csv_path = synthetic_csv(bench, tmp_path / "bench.csv")
    plot.main([str(csv_path)])
    assert titles and all("NVIDIA H100 80GB HBM3" in t and "torch" in t and "triton" in t
                          and "CUDA Triton kernels" in t for t in titles), titles


def test_significant_figures():
    sig = _common.sig
    assert [sig(x) for x in (0.00123456, 0.5, 12.34, 3021.4, 0)] == ["0.00123", "0.500", "12.3", "3020", "0"]
    assert sig(None) == "n/a" and sig(float("nan")) == "n/a"


def test_memory_harness_measures_a_fresh_child(tmp_path):
    """The one child-process harness: a child that holds 64 MiB for its step reports about that."""
    script = tmp_path / "child.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(PERF)!r}); import _common as C\n"
                      "C.child_result(C.measure_peak(lambda: len(bytearray(64 << 20))))\n")
    res, err = _common.run_child(script, [])
    assert err is None and res["value"] == 64 << 20
    assert res["peak_mib"] is None or 60 <= res["peak_mib"] <= 80, res
    res, err = _common.run_child(tmp_path / "missing.py", [])
    assert res is None and "exit status" in err


def test_main_job_tiny_on_cpu(capsys):
    main = load("main")
    rows = main.main(["--rows", "8", "--vocab", "300", "--repeats", "2", "--warmup", "1",
                      "--providers", "torch,softmax_ce,softmax_ce fused inplace"])
    out = capsys.readouterr().out
    assert main.exit_code(rows) == 0 and [r["provider"] for r in rows] == [
        "torch", "softmax_ce", "softmax_ce fused inplace"]
    assert all(r["ms"] > 0 and r["peak_mb"] is not None for r in rows), rows
    assert "softmax_ce path: Triton interpreter" in out and "median ms" in out


def test_cpu_memory_and_linear_memory_tiny():
    cm, lm = load("cpu_memory"), load("linear_memory")
    rows = cm.main(["--rows", "16", "--vocab", "512", "--hidden", "8", "--providers", "torch,softmax_ce inplace"])
    assert [r["result"] for r in rows] == ["ref", "pass*"] or rows[1]["result"] in ("FAIL*",), rows
    assert all(r["error"] is None and r["path"] == "PyTorch path" for r in rows), rows
    rows = lm.main(["--rows", "16", "--vocab", "256", "--hidden", "8", "--providers",
                    "softmax_ce cpu,torch unfused"])
    assert lm.exit_code(rows) == 0 and rows[0]["path"] == "PyTorch path", rows
