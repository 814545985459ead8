"""Plots of perf/bench.py's CSV (and autotune.py's): PNGs written next to the CSV.

1. bench_gbps_<dtype>.png: GB/s (each provider's byte model, the nominal one for peers; see
   bench.py) against the vocabulary size (log x), one subplot per mode, one line per
   provider (its own marker and line style, translucent, so no line hides another) at one
   N (--rows, default the most measured).  Horizontal lines: the copy bandwidth measured in
   the same runs and the datasheet HBM peak where DATASHEET knows the GPU.
2. roofline.png: arithmetic intensity (FLOP/byte, bench.py's byte model) against FLOP/s.
   Roofs: the measured copy bandwidth; the datasheet fp32 non-tensor-core rate (the
   cross-entropy's elementwise work) and bf16 dense tensor-core rate (the matmuls).
   FLOP model, per logit element (exp = 1 FLOP): forward 5 (max, subtract, exp, add,
   upcast/rescale), backward 5 (subtract m and log d, exp, scale, one-hot select),
   fwd+bwd 10; softmax_ce_fused 10 / 1 / 11 (gradient in the forward, a rescale later);
   peers the recompute model.  Linear: 2NVD / 4NVD / 6NVD, useful work only.
3. autotune.png (for an autotune.py CSV): each config's time per kernel group.

Every title says which path ran (CUDA Triton kernels / Triton interpreter / PyTorch path),
the device, dtype, torch and triton versions.

Run:
    python perf/plot.py perf/out/nvidia-h100-80gb-hbm3/bench.csv
    python perf/plot.py bench.csv --rows 8192 --out-dir /tmp/plots

From Python, ``main([csv, ...])`` returns the list of written PNG paths.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

DATASHEET = [  # substring of the lowercased device name (first match wins): GB/s, TFLOP/s
    ("h100 pcie", dict(label="H100 PCIe", hbm_gbps=2000, fp32_tflops=51, bf16_tflops=756)),
    ("h100 nvl", dict(label="H100 NVL", hbm_gbps=3900, fp32_tflops=60, bf16_tflops=835)),
    ("h100", dict(label="H100 SXM", hbm_gbps=3350, fp32_tflops=67, bf16_tflops=989)),
    ("h200", dict(label="H200 SXM", hbm_gbps=4800, fp32_tflops=67, bf16_tflops=989)),
]
CE_FLOP = {"forward": 5, "backward": 5, "fwd+bwd": 10}
CE_FLOP_FUSED = {"forward": 10, "backward": 1, "fwd+bwd": 11}
LINEAR_FLOP = {"forward": 2, "backward": 4, "fwd+bwd": 6}
MODES = ("forward", "backward", "fwd+bwd")
MODE_MARKERS = {"forward": "o", "backward": "s", "fwd+bwd": "^"}
STYLES = [(m, ls) for ls in ("-", "--", ":", "-.") for m in "ovsD^P*Xh<>"]
NEEDS = {"bench": {"gpu", "section", "provider", "mode", "dtype", "n_rows", "vocab", "ms"},
         "autotune": {"gpu", "kernel", "variant", "dtype", "vocab", "config", "ms", "status"}}


def datasheet(gpu):
    return next((spec for key, spec in DATASHEET if key in str(gpu).lower()), None)


def style(names):
    return {n: STYLES[i % len(STYLES)] for i, n in enumerate(sorted(names))}


def conditions(df, gpu):
    """'<path> | <gpu> | torch x | triton y' from the rows' own columns."""
    def values(k):
        return sorted(set(df[k].dropna().astype(str))) if k in df else []
    vers = [f"{k} {', '.join(values(k)) or 'not recorded'}" for k in ("torch", "triton")]
    paths = values("path")
    return " | ".join([", ".join(paths) or "path not recorded", str(gpu)] + vers)


def flop(r):
    if r["section"] == "linear":
        return LINEAR_FLOP[r["mode"]] * r["n_rows"] * r["vocab"] * r["hidden"]
    return (CE_FLOP_FUSED if r["provider"] == "softmax_ce_fused" else CE_FLOP)[r["mode"]] * r["n_rows"] * r["vocab"]


def plot_gbps(df, gpu, dtype, n, path):
    modes = [m for m in MODES if (df["mode"] == m).any()]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.8), squeeze=False)
    st, copy, sheet = style(df["provider"].unique()), df["copy_gbps"].median(), datasheet(gpu)
    for ax, mode in zip(axes[0], modes):
        for prov, g in df[df["mode"] == mode].dropna(subset=["gbps"]).groupby("provider"):
            g = g.sort_values("vocab")
            ax.plot(g["vocab"], g["gbps"], marker=st[prov][0], ls=st[prov][1], alpha=0.75,
                    markersize=6, markerfacecolor="none", label=prov)
        if copy == copy:  # not NaN
            ax.axhline(copy, color="black", ls="--", lw=1, label=f"copy {copy:.3g} GB/s (measured)")
        if sheet:
            ax.axhline(sheet["hbm_gbps"], color="grey", ls=":", lw=1,
                       label=f"{sheet['label']} datasheet {sheet['hbm_gbps']} GB/s")
        ax.set(xscale="log", xlabel="vocabulary size V", ylabel="GB/s (byte model / time)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    note = "" if sheet else " | datasheet peak unknown: omitted"
    fig.suptitle(f"cross-entropy, {dtype}, N={n}{note}\n{conditions(df, gpu)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roofline(df, gpu, path):
    df = df.dropna(subset=["gbps"]).copy()
    df["flop"] = [flop(r) for _, r in df.iterrows()]
    df["x"] = df["flop"] / (df["gbps"] * 1e9 * df["ms"] * 1e-3)
    df["y"] = df["flop"] / (df["ms"] * 1e-3)
    copy, sheet = df["copy_gbps"].median(), datasheet(gpu)
    fig, ax = plt.subplots(figsize=(11, 6))
    lo, hi = min([0.1, *df["x"]]) / 2, max([1e3, *df["x"]]) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    if copy == copy:
        cap = max(sheet["fp32_tflops"], sheet["bf16_tflops"]) * 1e12 if sheet else float("inf")
        ax.plot(grid, [min(copy * 1e9 * x, cap) for x in grid], color="black", lw=1.5,
                label=f"memory roof: copy {copy:.3g} GB/s (measured)")
    if sheet:
        ax.plot(grid, [sheet["hbm_gbps"] * 1e9 * x for x in grid], color="grey", ls=":", lw=1,
                label=f"datasheet HBM {sheet['hbm_gbps']} GB/s")
        for key, label, ls in (("fp32_tflops", "fp32 (no tensor cores): elementwise", "--"),
                               ("bf16_tflops", "bf16 dense tensor cores: matmuls", "-.")):
            ax.axhline(sheet[key] * 1e12, color="tab:red", ls=ls, lw=1,
                       label=f"{sheet['label']} {label} {sheet[key]:g} TFLOP/s")
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(sorted(df["provider"].unique()))}
    for (prov, section, mode), g in df.groupby(["provider", "section", "mode"]):
        ax.scatter(g["x"], g["y"], color=colors[prov], marker=MODE_MARKERS[mode], s=24, alpha=0.7,
                   label=f"{prov} ({section}) {mode}")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylabel="FLOP/s (FLOP model in perf/plot.py)",
           xlabel="arithmetic intensity (FLOP / byte, bench.py byte model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: hides nothing
    ax.set_title(f"roofline{'' if sheet else ' (compute roofs omitted: datasheet unknown)'}\n"
                 f"{conditions(df, gpu)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_autotune(df, gpu, path):
    df = df[df["status"] == "ok"].dropna(subset=["ms"])
    groups = list(df.groupby(["kernel", "dtype", "vocab"]))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(3.2 * max(1, len(groups)), 4),
                             squeeze=False)
    for ax, ((k, dt, v), g) in zip(axes[0], groups):
        for (variant, _), gg in g.groupby(["variant", "primary"]):
            ax.plot(range(len(gg)), gg["ms"], "o", alpha=0.6, markerfacecolor="none", label=variant)
        ax.set(title=f"{k} {dt} V={v}", xlabel="config (CSV order)", ylabel="ms")
        ax.legend(fontsize=6)
    fig.suptitle(f"autotune sweep: time per config | {conditions(df, gpu)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="a CSV written by perf/bench.py or perf/autotune.py")
    p.add_argument("--out-dir", help="default: the CSV's folder")
    p.add_argument("--rows", type=int, help="N of the GB/s plot (default: the most measured)")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    path = Path(a.csv)
    if not path.is_file():
        sys.exit(f"plot.py: no such file: {path} (run perf/bench.py first; its CSV goes to "
                 "perf/out/<gpu-key>/bench.csv unless --csv says otherwise)")
    df = pd.read_csv(path)
    kind = next((k for k, cols in NEEDS.items() if cols <= set(df.columns)), None)
    if kind is None:
        sys.exit(f"plot.py: {path} is neither a bench.py nor an autotune.py CSV (columns: "
                 f"{', '.join(df.columns)})")
    out = Path(a.out_dir) if a.out_dir else path.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    df = df[pd.to_numeric(df["ms"], errors="coerce").notna()]
    written = []
    gpus = sorted(df["gpu"].unique())
    for gpu in gpus:
        tag = f"_{''.join(c if c.isalnum() else '-' for c in gpu.lower())}" if len(gpus) > 1 else ""
        g = df[df["gpu"] == gpu]
        if kind == "autotune":
            written.append(plot_autotune(g, gpu, out / f"autotune{tag}.png"))
            continue
        # the latest row per key: a CSV collects many runs
        keys = ["section", "provider", "mode", "dtype", "n_rows", "vocab", "hidden", "path"]
        g = g.sort_values("timestamp").drop_duplicates([k for k in keys if k in g], keep="last")
        ce = g[g["section"] == "ce"]
        for dtype, d in ce.groupby("dtype"):
            counts = d["n_rows"].value_counts()
            n = a.rows if a.rows in counts.index else max(counts.index, key=lambda k: (counts[k], k))
            written.append(plot_gbps(d[d["n_rows"] == n], gpu, dtype, n, out / f"bench_gbps{tag}_{dtype}.png"))
        if g["gbps"].notna().any():
            written.append(plot_roofline(g, gpu, out / f"roofline{tag}.png"))
    for w in written:
        print(w)
    if not written:
        print(f"no measured rows in {path}: nothing plotted")
    return [str(w) for w in written]


if __name__ == "__main__":
    main()
