"""Roofline plots of perf/bench.py's CSV: PNGs written next to the CSV.

1. bench_gbps_<dtype>.png: achieved GB/s (the CSV's gbps: each provider's byte model,
   the nominal one for peers; see bench.py) against the vocabulary size (log x), one
   subplot per mode, one line per provider, at one row count N (--rows, default the
   most measured one).  Horizontal lines: the copy bandwidth measured in the same runs
   (median of the rows' copy_gbps) and the datasheet HBM peak where DATASHEET knows the
   GPU (otherwise the title says it is omitted).
2. roofline.png: the classic roofline, log-log: arithmetic intensity (FLOP/byte) on x,
   achieved FLOP/s on y.  Roofs: memory = the measured copy bandwidth x intensity;
   compute = the datasheet fp32 non-tensor-core rate (the cross-entropy's elementwise
   work) and the bf16 dense tensor-core rate (the linear section's matmuls), where known.
   Each measured row is a point: FLOP from FLOP_MODEL below, bytes = the row's gbps x ms
   (the same byte model bench.py charged), so intensity = FLOP / bytes.

FLOP model (written once, here):
* cross-entropy, per logit element (exp counted as one FLOP, as the SFU issues it):
    forward   5: the running max (1), subtract it (1), exp (1), add to the sum (1), and
                 the upcast / online rescale, amortised (1)
    backward  5: subtract m and log d (2), exp (1), times the row coefficient (1), the
                 target's one-hot subtraction as a select (1)
    fwd+bwd   10 (recompute: both of the above)
  softmax_ce_fused computes the gradient in its forward and only rescales it later:
    forward 10, backward 1, fwd+bwd 11.
  Peers are charged the recompute model, like their nominal bytes: their points show
  effective throughput on the same intensity as ours.
* linear cross-entropy, per N*V*D, useful work only: forward 2 (x W^T), backward 4 (the
  two gradient matmuls G W and G^T x), fwd+bwd 6, whichever provider; a fused backward
  that recomputes the logits (2 more) is not credited for it, so its point sits lower by
  what recomputing costs.  The O(N*V) softmax work is left out (under 0.5% at D >= 2048).

Run:
    python perf/plot.py perf/results/nvidia-h100-80gb-hbm3/bench.csv
    python perf/plot.py bench.csv --rows 8192 --out-dir /tmp/plots

From Python, ``main([csv, ...])`` returns the list of written PNG paths.
"""

import argparse
import importlib.util
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the GPU machine or in CI
import matplotlib.pyplot as plt  # noqa: E402


# perf/_common.py by file path (perf/ is not a package and not on sys.path), once per process;
# registered before it runs, since dataclasses look their module up in sys.modules
_spec = importlib.util.spec_from_file_location("softmax_ce_perf_common", Path(__file__).resolve().with_name("_common.py"))
if _spec.name not in sys.modules:
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
C = sys.modules[_spec.name]

# Datasheet peaks by a substring of the lowercased device name; the first match wins
# (so "h100 pcie" is tried before "h100").  GB/s of HBM, TFLOP/s fp32 without tensor
# cores, TFLOP/s bf16 dense on tensor cores.
DATASHEET = [
    ("h100 pcie", dict(label="H100 PCIe", hbm_gbps=2000, fp32_tflops=51, bf16_tflops=756)),
    ("h100 nvl", dict(label="H100 NVL", hbm_gbps=3900, fp32_tflops=60, bf16_tflops=835)),
    ("h100", dict(label="H100 SXM", hbm_gbps=3350, fp32_tflops=67, bf16_tflops=989)),
    ("h200", dict(label="H200 SXM", hbm_gbps=4800, fp32_tflops=67, bf16_tflops=989)),
]

CE_FLOP = {"forward": 5, "backward": 5, "fwd+bwd": 10}
CE_FLOP_FUSED = {"forward": 10, "backward": 1, "fwd+bwd": 11}
LINEAR_FLOP = {"forward": 2, "backward": 4, "fwd+bwd": 6}

MODES = ("forward", "backward", "fwd+bwd")
MARKERS = {"forward": "o", "backward": "s", "fwd+bwd": "^"}


def datasheet(gpu: str):
    name = gpu.lower()
    for key, spec in DATASHEET:
        if key in name:
            return spec
    return None


def flop(row) -> float:
    n, v = int(row["n_rows"]), int(row["vocab"])
    if row["section"] == "linear":
        return LINEAR_FLOP[row["mode"]] * n * v * int(row["hidden"])
    model = CE_FLOP_FUSED if row["provider"] == "softmax_ce_fused" else CE_FLOP
    return model[row["mode"]] * n * v


def load(path):
    """Measured rows (ms present), the latest per key (a CSV collects many runs)."""
    latest = {}
    for r in C.read_rows(path):
        if C.as_float(r.get("ms")) is None:
            continue
        key = (r["gpu"], r["section"], r["provider"], r["mode"], r["dtype"], r["n_rows"],
               r["vocab"], r.get("hidden", ""))
        if key not in latest or r["timestamp"] >= latest[key]["timestamp"]:
            latest[key] = r
    return list(latest.values())


def copy_bw(rows):
    vals = [C.as_float(r.get("copy_gbps")) for r in rows]
    vals = [v for v in vals if v]
    return statistics.median(vals) if vals else None


def _colors(names):
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % cmap.N) for i, n in enumerate(sorted(names))}


def plot_gbps(rows, gpu, dtype, n_rows, path):
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
    colors = _colors({r["provider"] for r in rows})
    copy, sheet = copy_bw(rows), datasheet(gpu)
    for ax, mode in zip(axes[0], modes):
        by_provider = defaultdict(list)
        for r in rows:
            if r["mode"] == mode and C.as_float(r.get("gbps")):
                by_provider[r["provider"]].append((int(r["vocab"]), float(r["gbps"])))
        for prov, pts in sorted(by_provider.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[mode],
                    color=colors[prov], label=prov)
        if copy:
            ax.axhline(copy, color="black", ls="--", lw=1, label=f"copy {copy:.0f} GB/s (measured)")
        if sheet:
            ax.axhline(sheet["hbm_gbps"], color="grey", ls=":", lw=1,
                       label=f"{sheet['label']} datasheet {sheet['hbm_gbps']} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("GB/s (byte model / time)")
        ax.set_title(f"{mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    note = "" if sheet else " | datasheet peak unknown for this device: omitted"
    fig.suptitle(f"cross-entropy, {dtype}, N={n_rows} on {gpu}{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roofline(rows, gpu, path):
    copy, sheet = copy_bw(rows), datasheet(gpu)
    pts = []
    for r in rows:
        ms, gbps = C.as_float(r.get("ms")), C.as_float(r.get("gbps"))
        if not ms or not gbps:
            continue
        nbytes = gbps * 1e9 * ms * 1e-3
        f = flop(r)
        pts.append((f / nbytes, f / (ms * 1e-3), r))
    fig, ax = plt.subplots(figsize=(11, 6))
    colors = _colors({r["provider"] for _, _, r in pts})
    xs = [p[0] for p in pts] or [1.0]
    lo, hi = min(xs + [0.1]) / 2, max(xs + [1e3]) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    notes = []
    if copy:
        roof = copy * 1e9
        cap = max(sheet["fp32_tflops"], sheet["bf16_tflops"]) * 1e12 if sheet else None
        ax.plot(grid, [min(roof * x, cap) if cap else roof * x for x in grid], color="black",
                lw=1.5, label=f"memory roof: copy {copy:.0f} GB/s (measured)")
    if sheet:
        ax.plot(grid, [sheet["hbm_gbps"] * 1e9 * x for x in grid], color="grey", ls=":", lw=1,
                label=f"datasheet HBM {sheet['hbm_gbps']} GB/s")
        for key, label, ls in (("fp32_tflops", "fp32 (no tensor cores): elementwise", "--"),
                               ("bf16_tflops", "bf16 dense tensor cores: matmuls", "-.")):
            ax.axhline(sheet[key] * 1e12, color="tab:red", ls=ls, lw=1,
                       label=f"{sheet['label']} {label} {sheet[key]:g} TFLOP/s")
    else:
        notes.append("compute roofs omitted: datasheet unknown for this device")
    seen = set()
    for x, y, r in pts:
        label = f"{r['provider']} ({r['section']})"
        ax.scatter([x], [y], color=colors[r["provider"]], marker=MARKERS[r["mode"]], s=22,
                   label=None if label in seen else label, alpha=0.8)
        seen.add(label)
    for mode, marker in MARKERS.items():  # a legend key for the marker shapes
        ax.scatter([], [], color="grey", marker=marker, label=f"mode: {mode}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, bench.py byte model)")
    ax.set_ylabel("FLOP/s (FLOP model in perf/plot.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    ax.set_title(f"roofline on {gpu}" + (f"\n{'; '.join(notes)}" if notes else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="a CSV written by perf/bench.py")
    p.add_argument("--out-dir", help="default: the CSV's folder")
    p.add_argument("--rows", type=int, help="N of the GB/s-vs-V plot (default: the most "
                                            "measured N per dtype)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    csv_path = Path(args.csv)
    out_dir = Path(args.out_dir) if args.out_dir else csv_path.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load(csv_path)
    gpus = sorted({r["gpu"] for r in rows})
    written = []
    for gpu in gpus:
        g_rows = [r for r in rows if r["gpu"] == gpu]
        # one device per CSV is the rule (perf/results/<gpu>/); otherwise name files by it
        tag = f"_{C.name_key(gpu)}" if len(gpus) > 1 else ""
        ce = [r for r in g_rows if r["section"] == "ce"]
        for dtype in sorted({r["dtype"] for r in ce}):
            d_rows = [r for r in ce if r["dtype"] == dtype]
            counts = defaultdict(int)
            for r in d_rows:
                counts[int(r["n_rows"])] += 1
            n = args.rows if args.rows in counts else max(counts, key=lambda k: (counts[k], k))
            written.append(plot_gbps([r for r in d_rows if int(r["n_rows"]) == n], gpu, dtype, n,
                                     out_dir / f"bench_gbps{tag}_{dtype}.png"))
        if g_rows:
            written.append(plot_roofline(g_rows, gpu, out_dir / f"roofline{tag}.png"))
    for w in written:
        print(w)
    if not written:
        print(f"no measured rows in {csv_path}: nothing plotted")
    return [str(w) for w in written]


if __name__ == "__main__":
    main()
