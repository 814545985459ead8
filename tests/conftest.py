"""Test configuration: pick the device and the implementation path.

Triton decides at decoration time (when softmax_ce.kernels is imported) whether
`@triton.jit` kernels are compiled or interpreted, so TRITON_INTERPRET=1 must be
in os.environ before triton or softmax_ce is imported.  Without a GPU we set it
here, before any such import; with one, the kernels run natively and the CPU
PyTorch path is still exercised on CPU tensors.

Override with SOFTMAX_CE_TEST_DEVICE=cpu|cuda if the auto-detection is wrong.
"""

import os
import shutil
import sys
import zlib


def _cuda_expected() -> bool:
    forced = os.environ.get("SOFTMAX_CE_TEST_DEVICE", "").lower()
    if forced in ("cpu", "cuda"):
        return forced == "cuda"
    if shutil.which("nvidia-smi") is None:
        return False  # decided without importing torch
    # A driver is installed; ask torch (importing torch does not import triton).
    import torch

    return torch.cuda.is_available()


if not _cuda_expected():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("tests/conftest.py: triton was imported before TRITON_INTERPRET=1 could "
                           "be set; the CPU tests need Triton's interpreter")
    os.environ["TRITON_INTERPRET"] = "1"

from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import softmax_ce._launch as _launch  # noqa: E402
import softmax_ce._torch_path as _torch_path  # noqa: E402
from softmax_ce.kernels import cross_entropy as _K  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    assert _K.interpreting(), "CPU run without Triton's interpreter: the kernels would go untested"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Reproducible, per-test random inputs even where a test draws from the global RNG
    (most tests use _helpers.gen(params) generators instead)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device():
    return "cuda" if CUDA else "cpu"


class Path(NamedTuple):
    """Which implementation a test drives: its name, the device of its tensors, and
    whether softmax_ce must route them through the Triton kernels."""

    name: str
    device: str
    triton: bool


# kernel         : the Triton kernels (native on CUDA, Triton's interpreter on CPU)
# kernel_tiles16 : the interpreted kernels with 16-wide tiles, so that even small
#                  vocabularies span several tiles (multi-tile online softmax, the
#                  per-row `ref` shift, masked tails); CPU only (CUDA autotunes BLOCK_V)
# torch          : the pure-PyTorch path of softmax_ce._launch, in one chunk
# torch_chunked  : the same with CHUNK_ELEMENTS tiny, so rows are walked in several
#                  chunks with a partial last one
ALL_PATHS = ("kernel", "kernel_tiles16", "torch", "torch_chunked")
TINY_CHUNK = 24  # logits per chunk: 1 to 4 rows of the shapes used in the tests


def make_path(name: str, monkeypatch) -> Path:
    if name == "kernel":
        return Path(name, "cuda" if CUDA else "cpu", True)
    if name == "kernel_tiles16":
        if CUDA:
            pytest.skip("CUDA-less only: the interpreter's tile size (CUDA autotunes BLOCK_V)")
        monkeypatch.setattr(_K, "interpreter_block", lambda n_cols: 16)
        return Path(name, "cpu", True)
    # The pure-PyTorch path, routed explicitly (softmax_ce._launch.FORCED_BACKEND)
    monkeypatch.setattr(_launch, "FORCED_BACKEND", "torch")
    if name == "torch_chunked":
        monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", TINY_CHUNK)
        monkeypatch.setattr(_torch_path, "SMALL_ELEMENTS", TINY_CHUNK)
    return Path(name, "cpu", False)


@pytest.fixture(params=ALL_PATHS)
def path(request, monkeypatch):
    """Every implementation path."""
    return make_path(request.param, monkeypatch)


@pytest.fixture(params=("kernel", "torch_chunked"))
def path2(request, monkeypatch):
    """The kernels and the (multi-chunk) PyTorch path: for tests where tiling does not matter."""
    return make_path(request.param, monkeypatch)
