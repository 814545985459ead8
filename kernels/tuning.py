"""Which launch config each kernel gets on a GPU.

Layer: kernels; imports linear_cross_entropy (its tile lists) only.

Order of precedence, per (kernel, device, vocabulary size, dtype):

1. a per-GPU tuned table, `tuned/<device-key>.json` beside this file, written by
   `perf/autotune.py` on that GPU and loaded once per process;
2. for a device that has a table but no entry for this shape: `triton.autotune`
   over the kernel's config list (timed once per shape, in the first call);
3. for a device with no table at all: `heuristic()` below, a fixed rule that needs
   no timing (set SOFTMAX_CE_AUTOTUNE=1 to autotune there instead).

Table format (JSON):
    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "torch": "2.11.0",
     "created": "2026-11-21T20:00:00Z",
     "configs": {"ce_fwd": {"bfloat16": {"128256": {"BLOCK_V": 4096, "num_warps": 8}}}}}
(num_stages appears only for the LCE kernels, whose matmul loop Triton pipelines.)
"""

import functools
import json
import os
import re
from pathlib import Path
from typing import Optional

import triton

TABLE_DIR = Path(__file__).resolve().parent / "tuned"

KERNELS = ("ce_fwd", "ce_bwd", "ce_scale", "lce_fwd", "lce_bwd")

_META = ("num_warps", "num_stages")


def device_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file name of its table)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def load_table(key: str) -> Optional[dict]:
    path = TABLE_DIR / f"{key}.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def heuristic(kernel: str, n_cols: int, dtype=None) -> dict:
    """A config for devices without a table; chosen by reasoning, not by timing:
    streaming kernels want >= 8 elements per thread per tile and a tile that covers the
    row when it is short; the LCE kernels take the first tile of their list for the
    dtype (a standard tensor-core tile for 16-bit inputs, a small FMA tile for fp32;
    both compile for sm_90 without spilling, see perf/results/static-sm90/)."""
    if kernel in ("lce_fwd", "lce_bwd"):
        from .linear_cross_entropy import lce_configs

        cfg = lce_configs(kernel[4:], dtype)[0]
        return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block = max(256, min(4096, triton.next_power_of_2(n_cols)))
    warps = max(1, min(8, block // 512))
    return dict(BLOCK_V=block, num_warps=warps)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def config_for(kernel: str, device, n_cols: int, dtype) -> Optional[dict]:
    """The launch config (meta-parameters + num_warps/num_stages) for a GPU call, or None
    to let the kernel's `triton.autotune` wrapper choose."""
    name = _device_name(device.index if device.index is not None else 0)
    table = load_table(device_key(name))
    if table is not None:
        entry = table.get("configs", {}).get(kernel, {}).get(dtype_name(dtype), {}).get(str(n_cols))
        return dict(entry) if entry is not None else None
    if os.environ.get("SOFTMAX_CE_AUTOTUNE", "0") not in ("", "0"):
        return None
    return heuristic(kernel, n_cols, dtype)


def split_meta(config: dict):
    """{'BLOCK_V': .., 'num_warps': ..} -> (constexpr kwargs, launch kwargs)."""
    meta = {k: v for k, v in config.items() if k not in _META}
    launch = {k: v for k, v in config.items() if k in _META}
    return meta, launch
