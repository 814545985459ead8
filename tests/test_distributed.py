"""Vocabulary-parallel loss (`process_group=`) across real processes: gloo on CPU.

One spawn per world size (2 and 3 ranks) runs every check of CHECKS in order; each
check becomes its own pytest item (``test_check[<world>-<name>]``) that reports the
check's outcome on every rank.  The children run the same kernels as the other tests:
they get the parent's TRITON_INTERPRET (tests/conftest.py sets it to 1 on a machine
without a GPU) in their environment from their start, before anything imports triton.

Every check compares, on every rank, the loss (and lse) with the unsharded loss, the
gradient of the local slice with this rank's slice of the unsharded gradient (the full
input gradient for linear_cross_entropy), against the float64 reference of
tests/reference.py (and, for a few, against softmax_ce without a process group).  A
counter wrapped around the collectives checks the communication on the way: one
all-gather of (world * rows, K) fp32 statistics per forward, K =
softmax_ce.distributed.N_STATS a small constant that the module docstring states
(7 or 8 per row, never anything of vocabulary size) (plus at most one all-gather
of the slice sizes), nothing in the backward of cross_entropy, one all-reduce of the
(rows, D) input gradient in that of linear_cross_entropy, and never a tensor of
vocabulary size.

No hang: the processes are softmax_ce.testing.run_ranks's (a free TCP port, a 60 s
collective timeout, the others killed after it once a rank fails, a deadline on the
whole spawn); on top of it, a control group through which the ranks agree after every
check (a rank that lost its peers exits), per-rank result files that survive a killed
child, and a fresh spawn that resumes after a check that broke the run.
"""

import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from datetime import timedelta

import pytest

WORLD_SIZES = (2, 3)
SPAWN_DEADLINE_S = 170     # the whole run of one world size, start-up included
COLLECTIVE_TIMEOUT_S = 60  # init_process_group(timeout=...)
SYNC_TIMEOUT_S = 8         # the control group's agreement after each check

# Uneven splits of an odd vocabulary for the option grid (a 1-class slice for 3 ranks)
V_SMALL = 1001
SPLITS = {1: [1001], 2: [601, 400], 3: [400, 1, 600]}
V_LARGE = 50257  # split as torch.chunk would (the last slice is the short one)


# ----------------------------------------------------------------------------
# The checks, run in every child.  `C` is the child's context (_Ctx below).
# ----------------------------------------------------------------------------

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__[len("check_"):]] = fn
    return fn


class SkipCheck(Exception):
    pass


@check
def check_ce_comm_pattern(C):
    """Cold: all-gather of slice sizes then of the statistics; warm: the statistics only.
    The statistics per row are the few fp32 values the module docstring states."""
    import re

    import softmax_ce.distributed as D
    assert 1 <= C.n_stats <= 8, f"N_STATS = {C.n_stats} values per row"
    m = re.search(r"(\d+) fp32 values sent by each rank, (\d+) \* world_size", D.__doc__ or "")
    if m:
        assert (int(m.group(1)), int(m.group(2))) == (C.n_stats, 4 * C.n_stats), (
            f"softmax_ce.distributed's docstring says {m.group(0)!r}, N_STATS = {C.n_stats}")
    C.reset_slice_cache()
    sizes = C.split
    for call in range(2):
        r = C.run_ce(V=V_SMALL, sizes=sizes, seed=("comm", call))
        fwd, bwd = r["fwd"], r["bwd"]
        names = [e["name"] for e in fwd]
        expected = ["_all_gather", "_all_gather"] if call == 0 else ["_all_gather"]
        assert names == expected, f"forward {call}: collectives {fwd}"
        stats = fwd[-1]
        K = C.n_stats
        # 4 rows + the slice-check row (see softmax_ce.distributed.gather_statistics)
        assert stats["tensors"][0]["shape"] == [C.world * 5, K], stats
        sent = stats["tensors"][1]
        assert sent["shape"] == [5, K] and sent["dtype"] == "torch.float32", stats
        assert stats["tensors"][1]["nbytes"] == 5 * K * 4  # 4 K bytes sent per row, + 1 row
        if call == 0:
            assert fwd[0]["tensors"][0]["shape"] == [C.world], fwd[0]
            assert fwd[0]["tensors"][0]["dtype"] == "torch.int64", fwd[0]
        assert bwd == [], f"backward: collectives {bwd}"


@check
def check_ce_large_vocab(C):
    """50257 classes split as torch.chunk would; against the reference and unsharded softmax_ce."""
    sizes = C.chunk_sizes(V_LARGE)
    C.run_ce(V=V_LARGE, sizes=sizes, N=4, seed="large", single=True)


@check
def check_ce_reductions(C):
    for reduction in ("none", "mean", "sum"):
        C.run_ce(V=V_SMALL, sizes=C.split, N=5, reduction=reduction, seed=("red", reduction),
                 single=reduction == "none")


@check
def check_ce_ignore_index_class_of_rank1(C):
    """ignore_index is a real class owned by rank 1; targets hit it and every rank."""
    sizes = [601, 400] if C.world == 2 else [400, 3, 598]
    ignore = sizes[0] + 1
    for reduction in ("mean", "none"):
        C.run_ce(V=V_SMALL, sizes=sizes, N=6, ignore_index=ignore, reduction=reduction,
                 label_smoothing=0.1, seed=("ign", reduction))


@check
def check_ce_int32_uint8_targets(C):
    import torch
    C.run_ce(V=V_SMALL, sizes=C.split, target_dtype=torch.int32, label_smoothing=0.1, seed="i32")
    sizes = [200, 55] if C.world == 2 else [100, 100, 55]  # uint8 holds classes < 256
    C.run_ce(V=255, sizes=sizes, target_dtype=torch.uint8, ignore_index=254, seed="u8")


@check
def check_ce_zero_rows(C):
    """An empty batch: mean is nan (as torch), sum 0, none empty; the all-gather is empty."""
    for reduction in ("mean", "sum", "none"):
        C.run_ce(V=V_SMALL, sizes=C.split, N=0, reduction=reduction, seed=("zero", reduction))


@check
def check_ce_label_smoothing(C):
    for reduction in ("mean", "none", "sum"):
        C.run_ce(V=V_SMALL, sizes=C.split, label_smoothing=0.2, reduction=reduction,
                 seed=("ls", reduction))


@check
def check_ce_z_loss(C):
    for reduction in ("mean", "sum"):
        C.run_ce(V=V_SMALL, sizes=C.split, z_loss=1e-2, reduction=reduction, seed=("z", reduction))


@check
def check_ce_softcap(C):
    C.run_ce(V=V_SMALL, sizes=C.split, softcap=3.0, scale=8.0, seed="cap")
    C.run_ce(V=V_SMALL, sizes=C.split, softcap=3.0, scale=8.0, label_smoothing=0.1, z_loss=1e-2,
             reduction="none", seed="cap2")


@check
def check_ce_weight_full(C):
    C.run_ce(V=V_SMALL, sizes=C.split, weight="full", seed="wfull")
    C.run_ce(V=V_SMALL, sizes=C.split, weight="full", label_smoothing=0.1, z_loss=1e-2,
             seed="wfull2")


@check
def check_ce_weight_slice(C):
    C.run_ce(V=V_SMALL, sizes=C.split, weight="slice", reduction="sum", label_smoothing=0.1,
             seed="wslice")
    C.run_ce(V=V_SMALL, sizes=C.split, weight="slice", reduction="mean", z_loss=1e-2,
             seed="wslice2")


@check
def check_ce_probability_targets(C):
    C.run_ce(V=V_SMALL, sizes=C.split, prob=True, seed="prob", single=True)
    C.run_ce(V=V_SMALL, sizes=C.split, prob=True, weight="full", label_smoothing=0.1,
             softcap=4.0, z_loss=1e-2, seed="prob2")
    C.run_ce(V=V_SMALL, sizes=C.split, prob=True, weight="slice", reduction="none", seed="prob3")


@check
def check_ce_probability_target_gradient(C):
    """Unsharded softmax_ce differentiates probability targets (d loss / d y); the sharded
    loss must give each rank its slice of that gradient (or refuse), not drop it."""
    C.run_ce(V=V_SMALL, sizes=C.split, prob=True, target_grad=True, seed="ygrad")


@check
def check_ce_fp64(C):
    import torch
    C.run_ce(V=V_SMALL, sizes=C.split, dtype=torch.float64, weight="full", label_smoothing=0.1,
             z_loss=1e-2, softcap=5.0, seed="f64")
    C.run_ce(V=V_SMALL, sizes=C.split, dtype=torch.float64, prob=True, weight="slice",
             reduction="sum", seed="f64p")


@check
def check_ce_bf16(C):
    import torch
    C.run_ce(V=V_SMALL, sizes=C.split, dtype=torch.bfloat16, label_smoothing=0.1, seed="bf16")


@check
def check_ce_return_lse(C):
    C.run_ce(V=V_SMALL, sizes=C.split, return_lse=True, seed="lse")
    C.run_ce(V=V_SMALL, sizes=C.split, return_lse=True, softcap=3.0, scale=8.0,
             reduction="none", seed="lse2")


@check
def check_ce_return_lse_is_differentiable(C):
    """softmax_ce.cross_entropy's docstring: the lse of return_lse "is differentiable with
    grad_mode='recompute'" - the only grad_mode allowed with a process group."""
    C.run_ce(V=V_SMALL, sizes=C.split, return_lse=True, lse_grad=0.3, seed="lsegrad")


@check
def check_ce_inplace_backward(C):
    C.run_ce(V=V_SMALL, sizes=C.split, inplace=True, label_smoothing=0.1, seed="inpl")
    C.run_ce(V=V_SMALL, sizes=C.split, inplace=True, prob=True, reduction="none", seed="inpl2")


@check
def check_ce_input_shapes(C):
    """(C,) with a 0-d target, and (N, C, d) with (N, d) targets / (N, C, d) probabilities."""
    C.run_ce(V=V_SMALL, sizes=C.split, N=None, seed="1d")
    C.run_ce(V=V_SMALL, sizes=C.split, N=None, prob=True, seed="1dp")
    C.run_ce(V=V_SMALL, sizes=C.split, N=3, extra=(2,), reduction="none", seed="3d")
    C.run_ce(V=V_SMALL, sizes=C.split, N=2, extra=(2,), prob=True, label_smoothing=0.1,
             seed="3dp")


@check
def check_ce_strided_slice(C):
    """The local logits are a column view of the full tensor (row stride V, not V_local)."""
    C.run_ce(V=V_SMALL, sizes=C.split, view=True, label_smoothing=0.1, seed="view")
    C.run_ce(V=V_SMALL, sizes=C.split, view=True, prob=True, seed="viewp")


@check
def check_ce_all_ignored(C):
    """Every row ignored: mean is nan (0/0) as in torch, sum is 0, gradients 0."""
    for reduction in ("mean", "sum"):
        C.run_ce(V=V_SMALL, sizes=C.split, all_ignored=True, reduction=reduction,
                 seed=("allign", reduction))


@check
def check_ce_masked_slice(C):
    """The last rank's slice is -inf (a padded vocabulary): it holds no probability mass."""
    sizes = list(C.split)
    C.run_ce(V=V_SMALL, sizes=sizes, mask_last=True, seed="mask")
    C.run_ce(V=V_SMALL, sizes=sizes, mask_last=True, reduction="none", z_loss=1e-2, seed="mask2")


@check
def check_ce_empty_slice(C):
    """The last rank holds no class: V = 2 over 3 ranks, V = 5 as [5, 0] over 2."""
    V = 5 if C.world == 2 else 2
    sizes = [5, 0] if C.world == 2 else [1, 1, 0]
    C.run_ce(V=V, sizes=sizes, seed="empty")
    C.run_ce(V=V, sizes=sizes, label_smoothing=0.1, z_loss=1e-2, reduction="none", seed="empty2")
    C.run_ce(V=V, sizes=sizes, prob=True, weight="slice", label_smoothing=0.1, seed="empty3")
    C.run_ce(V=V, sizes=sizes, return_lse=True, inplace=True, seed="empty4")


@check
def check_ce_grad_mode_fused_raises(C):
    import torch
    import softmax_ce
    x = torch.randn(2, C.split[C.rank])
    with C.comm.track() as log:
        try:
            softmax_ce.cross_entropy(x, torch.tensor([0, 1]), grad_mode="fused",
                                     process_group=C.group)
        except ValueError as e:
            assert "grad_mode" in str(e) and "process_group" in str(e), e
        else:
            raise AssertionError("grad_mode='fused' with a process group did not raise")
    assert log == [], log


@check
def check_ce_target_out_of_range_raises(C):
    import torch
    import softmax_ce
    x = torch.randn(2, C.split[C.rank])
    C.reset_slice_cache()
    try:
        softmax_ce.cross_entropy(x, torch.tensor([0, V_SMALL]), process_group=C.group)
    except IndexError as e:
        assert str(V_SMALL) in str(e), e
    else:
        raise AssertionError("a target == V did not raise IndexError")


@check
def check_ce_subgroup(C):
    """A group of ranks 1..world-1 (rank 0 is not in it): slices in group-rank order."""
    import torch.distributed as dist
    sub = dist.new_group(list(range(1, C.world)), backend="gloo",
                         timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    if C.rank == 0:
        return
    sizes = [V_SMALL] if C.world == 2 else [700, 301]
    C.run_ce(V=V_SMALL, sizes=sizes, group=sub, label_smoothing=0.1, weight="full", seed="sub")


@check
def check_ce_dtensor(C):
    C.run_ce(V=V_SMALL, dtensor=True, seed="dt")
    C.run_ce(V=V_SMALL, dtensor=True, weight="full", label_smoothing=0.1, softcap=4.0,
             return_lse=True, seed="dt2")
    C.run_ce(V=V_SMALL, dtensor=True, prob=True, reduction="sum", seed="dt3")


@check
def check_ce_dtensor_empty_shard(C):
    """torch.chunk of world - 1 classes over world ranks leaves the last rank empty."""
    C.run_ce(V=C.world - 1, dtensor=True, seed="dtempty")


@check
def check_ce_slice_cache_two_vocabularies(C):
    """One group, two vocabulary partitions in which each rank's slice size recurs.

    Slice sizes are cached per group, so after a new partition some ranks' cached sizes no
    longer match their slices; the statistics all-gather's check row tells every rank at
    once, and all of them redo the step with fresh sizes: right results, no rank waiting
    alone in a collective the others skip."""
    phases = ({2: [3, 4], 3: [3, 4, 5]}, {2: [4, 3], 3: [5, 3, 4]}, {2: [3, 3], 3: [3, 3, 4]})
    C.reset_slice_cache()
    for i, phase in enumerate(phases):
        sizes = phase[C.world]
        C.run_ce(V=sum(sizes), sizes=sizes, N=4, label_smoothing=0.1, seed=("cache", i),
                 what=f"partition {i} {sizes}")


@check
def check_ce_extended_options(C):
    """temperature, entropy, argmax (ties across ranks go to the lower rank, as to the lower
    column), accuracy and teacher logits (CE and KL, the teacher sharded like the student,
    one slice of it -inf), against the unsharded fp64 definitions; the gradient of
    loss + entropy is this rank's slice of the unsharded one."""
    import torch
    import torch.nn.functional as F

    import softmax_ce
    sizes = C.split
    V, N, T = sum(sizes), 6, 1.7
    off, n = sum(sizes[:C.rank]), sizes[C.rank]
    for case in ("stats", "teacher-ce", "teacher-kl"):
        g = _gen("ext", case)
        full = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
        full[0, 0] = full[0, sizes[0]] = 40.0    # a tie between rank 0's and rank 1's slices
        full[1, V - 1] = 41.0                    # the argmax on the last rank
        full = full.float()
        t = C.targets(g, V, sizes, (N,), -100)
        t[2] = full[2].argmax()
        teacher = (torch.randn(N, V, generator=g) * 2).float()
        teacher[:, V - sizes[-1]:] = float("-inf")  # the teacher rules the last slice out
        x = full[:, off:off + n].clone().requires_grad_()
        xr = full.double().requires_grad_()
        z = xr / T
        uh = torch.randn(N, generator=g, dtype=torch.float64)
        if case == "stats":
            out = softmax_ce.cross_entropy(x, t, temperature=T, return_entropy=True,
                                           return_argmax=True, return_accuracy=True,
                                           process_group=C.group)
            ref = F.cross_entropy(z, t)
            ref_h = torch.special.entr(torch.softmax(z, -1)).sum(-1)
            assert torch.equal(out.argmax, full.argmax(-1)), (out.argmax, full.argmax(-1))
            valid = t != -100
            acc = ((full.argmax(-1) == t) & valid).sum().double() / valid.sum()
            assert abs(out.accuracy.item() - acc.item()) < 1e-7
            _close(out.entropy, ref_h, f"{case}: entropy", torch.float32)
            (out.loss.double() + (out.entropy.double() * uh).sum()).backward()
            (ref + (ref_h * uh).sum()).backward()
        else:
            kl = case == "teacher-kl"
            out = softmax_ce.cross_entropy(x, teacher[:, off:off + n].clone(), temperature=T,
                                           target_logits=True, kl=kl, return_entropy=True,
                                           process_group=C.group)
            logy = torch.log_softmax(teacher.double() / T, -1)
            y = logy.exp()
            rows = -(y * torch.log_softmax(z, -1)).sum(-1)
            if kl:
                rows = rows + torch.where(y > 0, y * logy, 0.0).sum(-1)
            ref = (rows * T * T).mean()
            out.loss.double().backward()
            ref.backward()
        _close(out.loss, ref, f"{case}: loss", torch.float32)
        _close(x.grad, xr.grad[:, off:off + n], f"{case}: grad of this rank's slice",
               torch.float32)


@check
def check_lce_temperature(C):
    """linear_cross_entropy(process_group=...) with a temperature, both impls."""
    import torch
    import torch.nn.functional as F

    import softmax_ce
    sizes = C.split
    V, N, D = sum(sizes), 5, 8
    off, n = sum(sizes[:C.rank]), sizes[C.rank]
    for impl in ("chunked", "fused"):
        g = _gen("lce-temp", impl)
        x0 = torch.randn(N, D, generator=g)
        w0 = torch.randn(V, D, generator=g)
        t = C.targets(g, V, sizes, (N,), -100)
        x = x0.clone().requires_grad_()
        w = w0[off:off + n].clone().requires_grad_()
        loss = softmax_ce.linear_cross_entropy(x, w, t, temperature=0.6, impl=impl,
                                               process_group=C.group)
        xr, wr = x0.double().requires_grad_(), w0.double().requires_grad_()
        ref = F.cross_entropy(F.linear(xr, wr) / 0.6, t)
        loss.backward()
        ref.backward()
        _close(loss, ref, f"{impl}: loss", torch.float32)
        _close(x.grad, xr.grad, f"{impl}: dx", torch.float32)
        _close(w.grad, wr.grad[off:off + n], f"{impl}: dw slice", torch.float32)


@check
def check_lce_statistics(C):
    """linear_cross_entropy(process_group=...) with entropy, argmax and accuracy: the global
    ones on every rank, and the gradients of loss + entropy."""
    import torch
    import torch.nn.functional as F

    import softmax_ce
    sizes = C.split
    V, N, D = sum(sizes), 6, 8
    off, n = sum(sizes[:C.rank]), sizes[C.rank]
    g = _gen("lce-stats")
    x0 = torch.randn(N, D, generator=g)
    w0 = torch.randn(V, D, generator=g)
    w0[V - 1] = x0[1] * 3.0  # row 1's argmax on the last rank
    t = C.targets(g, V, sizes, (N,), -100)
    x = x0.clone().requires_grad_()
    w = w0[off:off + n].clone().requires_grad_()
    out = softmax_ce.linear_cross_entropy(x, w, t, temperature=1.3, return_entropy=True,
                                          return_argmax=True, return_accuracy=True,
                                          process_group=C.group)
    xr, wr = x0.double().requires_grad_(), w0.double().requires_grad_()
    raw = F.linear(xr, wr)
    z = raw / 1.3
    ref = F.cross_entropy(z, t)
    ref_h = torch.special.entr(torch.softmax(z, -1)).sum(-1)
    assert torch.equal(out.argmax, raw.argmax(-1)), (out.argmax, raw.argmax(-1))
    valid = t != -100
    acc = ((raw.argmax(-1) == t) & valid).sum().double() / valid.sum()
    assert abs(out.accuracy.item() - acc.item()) < 1e-7
    _close(out.entropy, ref_h, "entropy", torch.float32)
    uh = torch.randn(N, generator=g, dtype=torch.float64)
    (out.loss.double() + (out.entropy.double() * uh).sum()).backward()
    (ref + (ref_h * uh).sum()).backward()
    _close(out.loss, ref, "loss", torch.float32)
    _close(x.grad, xr.grad, "dx", torch.float32)
    _close(w.grad, wr.grad[off:off + n], "dw slice", torch.float32)


@check
def check_lce_comm_pattern(C):
    C.reset_slice_cache()
    for call in range(2):
        r = C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, seed=("lcomm", call))
        fwd, bwd = r["fwd"], r["bwd"]
        names = [e["name"] for e in fwd]
        expected = ["_all_gather", "_all_gather"] if call == 0 else ["_all_gather"]
        assert names == expected, f"forward {call}: collectives {fwd}"
        # 6 rows + the slice-check row (see softmax_ce.distributed.gather_statistics)
        assert fwd[-1]["tensors"][1]["shape"] == [6 + 1, C.n_stats], fwd[-1]
        assert fwd[-1]["tensors"][1]["dtype"] == "torch.float32", fwd[-1]
        assert [e["name"] for e in bwd] == ["all_reduce"], f"backward: collectives {bwd}"
        t = bwd[0]["tensors"][0]
        assert t["shape"] == [6, 16] and t["dtype"] == "torch.float32", bwd
    # no input gradient wanted: no all-reduce at all
    r = C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, x_grad=False, seed="lcomm-nox")
    assert r["bwd"] == [], r["bwd"]


@check
def check_lce_basic(C):
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, single=True, seed="lbasic")
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, bias=False, reduction="sum", seed="lbasic2")


@check
def check_lce_large_vocab(C):
    C.run_lce(V=V_LARGE, sizes=C.chunk_sizes(V_LARGE), N=4, D=16, seed="llarge")


@check
def check_lce_options(C):
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
              class_weight="full", reduction="sum", seed="lopt")
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, label_smoothing=0.2, class_weight="slice",
              bias=False, ignore_index=C.split[0] + 1, reduction="mean", seed="lopt2")
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, z_loss=1e-2, reduction="none", seed="lopt3")


@check
def check_lce_fused_impl(C):
    """Each rank on the fused kernels instead of the chunked default."""
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, label_smoothing=0.1, softcap=4.0,
              class_weight="slice", reduction="sum", impl="fused", seed="lfused")
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, z_loss=1e-2, reduction="none", impl="fused",
              single=True, seed="lfused2")


@check
def check_lce_zero_rows(C):
    for reduction in ("mean", "sum"):
        C.run_lce(V=V_SMALL, sizes=C.split, N=0, D=16, reduction=reduction,
                  seed=("lzero", reduction))


@check
def check_lce_shift(C):
    for reduction in ("none", "mean"):
        C.run_lce(V=V_SMALL, sizes=C.split, N=(2, 4), D=16, shift=True, reduction=reduction,
                  label_smoothing=0.1, seed=("lshift", reduction))


@check
def check_lce_fp64(C):
    import torch
    C.run_lce(V=V_SMALL, sizes=C.split, N=6, D=16, dtype=torch.float64, label_smoothing=0.1,
              z_loss=1e-2, softcap=4.0, class_weight="slice", seed="l64")


@check
def check_lce_empty_slice(C):
    V = 5 if C.world == 2 else 2
    sizes = [5, 0] if C.world == 2 else [1, 1, 0]
    C.run_lce(V=V, sizes=sizes, N=4, D=16, seed="lempty")
    C.run_lce(V=V, sizes=sizes, N=4, D=16, label_smoothing=0.1, z_loss=1e-2, softcap=2.0,
              reduction="none", seed="lempty2")


@check
def check_lce_dtensor_weight(C):
    C.run_lce(V=V_SMALL, N=6, D=16, dtensor=True, seed="ldt")
    C.run_lce(V=V_SMALL, N=6, D=16, dtensor=True, bias=False, label_smoothing=0.1,
              class_weight="full", seed="ldt2")
    C.run_lce(V=C.world - 1, N=4, D=16, dtensor=True, seed="ldt-empty")


# Last: checks that may leave a rank waiting in a collective when they fail (a rank
# raising alone); the parent then resumes in fresh processes after them.

@check
def check_ce_empty_slice_class_weight(C):
    """Class weights (full or sliced) with a rank that holds no class."""
    V = 5 if C.world == 2 else 2
    sizes = [5, 0] if C.world == 2 else [1, 1, 0]
    C.run_ce(V=V, sizes=sizes, weight="full", seed="emptyw")
    C.run_ce(V=V, sizes=sizes, weight="slice", label_smoothing=0.1, reduction="none",
             seed="emptyw2")


@check
def check_lce_empty_slice_class_weight(C):
    V = 5 if C.world == 2 else 2
    sizes = [5, 0] if C.world == 2 else [1, 1, 0]
    C.run_lce(V=V, sizes=sizes, N=4, D=16, class_weight="full", label_smoothing=0.1,
              seed="lemptyw")


# ----------------------------------------------------------------------------
# The child's helpers
# ----------------------------------------------------------------------------

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
                "_reduce_scatter_base", "all_to_all", "all_to_all_single", "broadcast", "reduce",
                "gather", "scatter", "send", "recv", "isend", "irecv", "barrier",
                "all_gather_object", "broadcast_object_list", "all_reduce_coalesced",
                "all_gather_coalesced", "batch_isend_irecv")


class _Comm:
    """Wraps torch.distributed's collectives and softmax_ce.distributed._all_gather;
    inside `track()`, logs each outermost call with the tensors it was given."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        import softmax_ce.distributed as D

        self.log = None
        self._local = threading.local()
        for mod in (dist, c10d):
            for name in _COLLECTIVES:
                fn = getattr(mod, name, None)
                if callable(fn):
                    setattr(mod, name, self._wrap(name, fn))
        D._all_gather = self._wrap("_all_gather", D._all_gather)

    def _wrap(self, name, fn):
        import torch

        def describe(a):
            if isinstance(a, torch.Tensor):
                return [dict(shape=list(a.shape), dtype=str(a.dtype), numel=a.numel(),
                             nbytes=a.numel() * a.element_size())]
            if isinstance(a, (list, tuple)):
                return [d for x in a for d in describe(x)]
            return []

        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0 and self.log is not None:
                tensors = [d for a in list(args) + list(kwargs.values()) for d in describe(a)]
                self.log.append(dict(name=name, tensors=tensors))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        wrapper.__wrapped__ = fn
        return wrapper

    class _Track:
        def __init__(self, comm):
            self.comm = comm

        def __enter__(self):
            self.comm.log = []
            return self.comm.log

        def __exit__(self, *exc):
            self.comm.log = None

    def track(self):
        return self._Track(self)


def _forward_pattern_ok(fwd, stats, sizes_g):
    """One statistics all-gather, after one slice-size all-gather when the cache is cold;
    or, when the cached sizes no longer match a rank's slice (a new partition of the same
    group), the redo every rank takes together: statistics, sizes, statistics."""
    kinds = ["stats" if e in stats else "sizes" for e in fwd]
    return (all(e["name"] == "_all_gather" for e in fwd)
            and kinds in (["stats"], ["sizes", "stats"], ["stats", "sizes", "stats"]))


def _bytes_ok(log, V, allowed_numels):
    """No collective tensor of vocabulary size, only the expected sizes."""
    for e in log:
        for t in e["tensors"]:
            assert t["numel"] in allowed_numels, (
                f"collective {e['name']} carried {t} (allowed numels {sorted(allowed_numels)}, "
                f"V={V})")


def _close(actual, expected, what, dtype):
    """Elementwise |a - e| <= rtol |e| + atol max|e|, same nan / inf pattern
    (softmax_ce.testing.assert_close with this file's tolerances per dtype).

    Gradients through a softcap get no looser tolerance: the slope sech^2 is computed
    without cancelling (kernels/_online.softcap_slope)."""
    import torch

    from softmax_ce.testing import assert_close
    tols = {torch.float64: (1e-9, 1e-11), torch.float32: (3e-5, 3e-6)}
    rtol, atol = tols.get(dtype, (2e-2, 1e-2))
    assert_close(actual, expected, dtype, rtol=rtol, atol=atol, what=what)


def _gen(*key):
    import zlib

    import torch
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


class _Ctx:
    def __init__(self, rank, world):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.group = dist.group.WORLD
        self.split = SPLITS[world]
        self._mesh = None
        import softmax_ce.distributed as D
        self.n_stats = D.N_STATS
        self.comm = _Comm()

    # -- setup ---------------------------------------------------------------
    def chunk_sizes(self, V):
        """torch.chunk's split of V over the ranks (what DTensor's Shard does)."""
        step = -(-V // self.world)
        return [max(0, min(step, V - r * step)) for r in range(self.world)]

    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh
            self._mesh = init_device_mesh("cpu", (self.world,))
        return self._mesh

    @staticmethod
    def reset_slice_cache():
        import softmax_ce.distributed as D
        D.forget_slices()

    @staticmethod
    def targets(g, V, sizes, shape, ignore_index, n_ignored=1):
        """Random classes, with the first (then last) class of every non-empty slice first
        and `n_ignored` ignored entries last."""
        import torch
        t = torch.randint(0, V, shape, generator=g).reshape(-1)
        offs = [sum(sizes[:r]) for r in range(len(sizes))]
        firsts = [o for o, n in zip(offs, sizes) if n]
        lasts = [o + n - 1 for o, n in zip(offs, sizes) if n]
        picks = firsts + lasts
        k = max(0, t.numel() - n_ignored)
        for i, c in enumerate(picks[:k]):
            t[i] = c
        for i in range(min(n_ignored, t.numel())):
            t[t.numel() - 1 - i] = ignore_index
        return t.reshape(shape)

    # -- cross_entropy ---------------------------------------------------------
    def run_ce(self, *, V, sizes=None, N=4, extra=(), dtype=None, prob=False, weight=None,
               ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
               softcap=None, return_lse=False, lse_grad=0.0, inplace=False, view=False,
               scale=3.0, all_ignored=False, mask_last=False, dtensor=False, group=None,
               single=False, target_dtype=None, target_grad=False, seed=(),
               what=""):
        import torch
        import torch.distributed as dist

        import softmax_ce
        from reference import reference_cross_entropy

        dtype = dtype or torch.float32
        group = group or self.group
        g = _gen("ce", seed)
        shape = (V,) if N is None else (N, V) + tuple(extra)
        cdim = 0 if N is None else 1
        batch = () if N is None else (N,) + tuple(extra)
        full = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        if dtensor:
            sizes = self.chunk_sizes(V)
        grank = dist.get_rank(group)
        off, n = sum(sizes[:grank]), sizes[grank]
        if mask_last:
            full.narrow(cdim, V - sizes[-1], sizes[-1]).fill_(float("-inf"))
        if prob:
            y = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=cdim)
            if mask_last:
                y.narrow(cdim, V - sizes[-1], sizes[-1]).zero_()
            y = y / y.sum(cdim, keepdim=True)
            y = y.to(dtype)
            target = y
        else:
            n_ign = (1 if N is not None else 0) if not all_ignored else 10 ** 9
            valid_sizes = list(sizes[:-1]) + [0] if mask_last else sizes
            target = self.targets(g, V, valid_sizes, batch, ignore_index, n_ign)
            if mask_last:  # no target in the masked slice: its loss would be inf
                target = torch.where((target >= V - sizes[-1]) & (target != ignore_index),
                                     torch.zeros_like(target), target)
            if target_dtype is not None:
                target = target.to(target_dtype)
        w_full = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(
            torch.float64 if dtype == torch.float64 else torch.float32) if weight else None
        gout = (torch.randn(batch, generator=g, dtype=torch.float64) if reduction == "none"
                else torch.tensor(1.7, dtype=torch.float64))
        kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap)
        opts = dict(kw, prob=prob, weight=weight)
        tag = f"{what} ce(V={V}, sizes={sizes}, dtype={dtype}, {opts})"

        # the unsharded float64 reference
        x64 = full.to(torch.float64, copy=True).requires_grad_()
        y64 = target.to(torch.float64, copy=True).requires_grad_(target_grad) if prob else None
        out = reference_cross_entropy(x64, y64 if prob else target,
                                      w_full.double() if w_full is not None else None,
                                      return_lse=True, **kw)
        ref_loss, ref_lse = out
        ((ref_loss * gout).sum() + (lse_grad * ref_lse).sum()).backward()
        ref_grad = x64.grad.narrow(cdim, off, n)

        # this rank's slice
        local = full.narrow(cdim, off, n)
        if not view:
            local = local.clone()
        if dtensor:
            from torch.distributed.tensor import Shard, distribute_tensor
            leaf = distribute_tensor(full, self.mesh(), [Shard(cdim)]).requires_grad_()
            assert leaf.to_local().shape == local.shape, (leaf.to_local().shape, sizes)
        else:
            leaf = local.detach().requires_grad_()
        inp = leaf * 1 if inplace else leaf
        t_local = target.narrow(cdim, off, n) if prob else target
        if target_grad:
            t_local = t_local.clone().requires_grad_()
        w_arg = None
        if w_full is not None:
            w_arg = w_full if weight == "full" else w_full[off:off + n].clone()
        pg = None if dtensor else group
        with self.comm.track() as fwd:
            res = softmax_ce.cross_entropy(inp, t_local, w_arg, **kw, inplace_backward=inplace,
                                           return_lse=return_lse or bool(lse_grad),
                                           process_group=pg)
        loss, lse = res if (return_lse or lse_grad) else (res, None)
        assert type(loss) is torch.Tensor, f"{tag}: loss is a {type(loss)}"
        assert loss.dtype == dtype, (loss.dtype, dtype)
        _close(loss, ref_loss, f"{tag}: loss", dtype)
        if lse is not None:
            assert type(lse) is torch.Tensor
            _close(lse, ref_lse, f"{tag}: lse",
                   torch.float64 if dtype == torch.float64 else torch.float32)
        objective = (loss.double() * gout).sum()
        if lse_grad:
            assert lse.requires_grad, f"{tag}: the lse of return_lse does not require grad"
            objective = objective + (lse_grad * lse.double()).sum()
        with self.comm.track() as bwd:
            objective.backward()
        grad = leaf.grad
        if dtensor:
            from torch.distributed.tensor import DTensor
            assert isinstance(grad, DTensor), f"{tag}: grad is a {type(grad)}"
            grad_local = grad.to_local()
            _close(grad.full_tensor(), x64.grad, f"{tag}: full_tensor() of the DTensor grad", dtype)
        else:
            grad_local = grad
        assert grad_local.dtype == dtype
        _close(grad_local, ref_grad, f"{tag}: grad of the local slice", dtype)
        if target_grad:
            assert t_local.grad is not None, (f"{tag}: no gradient for the probability target "
                                              f"(unsharded softmax_ce gives one)")
            _close(t_local.grad, y64.grad.narrow(cdim, off, n), f"{tag}: target grad slice", dtype)
        if inplace and n > 0 and N is not None and not extra:
            assert torch.equal(inp.detach(), grad_local), f"{tag}: inplace_backward wrote elsewhere"

        # communication
        gw = dist.get_world_size(group)
        rows = 1 if N is None else N * (1 if not extra else int(torch.tensor(extra).prod()))
        stats = [e for e in fwd if e["name"] == "_all_gather" and e["tensors"][0]["numel"] != gw]
        sizes_g = [e for e in fwd if e not in stats]
        assert _forward_pattern_ok(fwd, stats, sizes_g), f"{tag}: forward collectives {fwd}"
        # one extra row per call: the slice-size check (see softmax_ce.distributed)
        assert stats[0]["tensors"][0]["shape"] == [gw * (rows + 1), self.n_stats], stats
        assert stats[0]["tensors"][1]["dtype"] == str(
            torch.float64 if dtype == torch.float64 else torch.float32), stats
        assert bwd == [], f"{tag}: backward collectives {bwd}"
        _bytes_ok(fwd, V, {gw, (rows + 1) * self.n_stats, gw * (rows + 1) * self.n_stats, 1})

        if single:  # softmax_ce without a process group, on the full tensors
            xs = full.clone().requires_grad_()
            ls = softmax_ce.cross_entropy(xs, target, w_full, **kw)
            (ls.double() * gout).sum().backward()
            _close(loss, ls, f"{tag}: loss vs unsharded softmax_ce", dtype)
            _close(grad_local, xs.grad.narrow(cdim, off, n), f"{tag}: grad vs unsharded softmax_ce",
                   dtype)
        return dict(fwd=fwd, bwd=bwd)

    # -- linear_cross_entropy --------------------------------------------------
    def run_lce(self, *, V, sizes=None, N=6, D=16, dtype=None, bias=True, class_weight=None,
                impl="chunked",
                ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                softcap=None, shift=False, x_grad=True, dtensor=False, single=False, seed=()):
        import torch
        import torch.distributed as dist

        import softmax_ce
        from reference import reference_cross_entropy

        dtype = dtype or torch.float32
        g = _gen("lce", seed)
        batch = tuple(N) if isinstance(N, tuple) else (N,)
        x = torch.randn(batch + (D,), generator=g, dtype=torch.float64).to(dtype)
        W = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
        b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
        if dtensor:
            sizes = self.chunk_sizes(V)
        off, n = sum(sizes[:self.rank]), sizes[self.rank]
        target = self.targets(g, V, sizes, batch, ignore_index)
        cw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(
            torch.float64 if dtype == torch.float64 else torch.float32) if class_weight else None
        out_batch = batch[:-1] + (batch[-1] - 1,) if shift else batch
        gout = (torch.randn(out_batch, generator=g, dtype=torch.float64) if reduction == "none"
                else torch.tensor(1.7, dtype=torch.float64))
        kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                  z_loss=z_loss, softcap=softcap)
        tag = (f"lce(V={V}, sizes={sizes}, N={N}, D={D}, dtype={dtype}, "
               f"{dict(kw, bias=bias, class_weight=class_weight, shift=shift)})")

        # unsharded float64 reference
        x64 = x.to(torch.float64, copy=True).requires_grad_()
        W64 = W.to(torch.float64, copy=True).requires_grad_()
        b64 = b.to(torch.float64, copy=True).requires_grad_() if b is not None else None
        logits = x64 @ W64.t() + (b64 if b64 is not None else 0)
        t = target
        if shift:
            logits, t = logits[..., :-1, :], target[..., 1:]
        ref_loss = reference_cross_entropy(logits.reshape(-1, V), t.reshape(-1),
                                           cw.double() if cw is not None else None, **kw)
        if reduction == "none":
            ref_loss = ref_loss.reshape(out_batch)
        (ref_loss * gout).sum().backward()

        # this rank's rows of the head
        xl = x.clone().requires_grad_(x_grad)
        if dtensor:
            from torch.distributed.tensor import Shard, distribute_tensor
            Wl = distribute_tensor(W, self.mesh(), [Shard(0)]).requires_grad_()
            bl = distribute_tensor(b, self.mesh(), [Shard(0)]).requires_grad_() if bias else None
        else:
            Wl = W[off:off + n].clone().requires_grad_()
            bl = b[off:off + n].clone().requires_grad_() if bias else None
        cw_arg = None
        if cw is not None:
            cw_arg = cw if class_weight == "full" else cw[off:off + n].clone()
        with self.comm.track() as fwd:
            loss = softmax_ce.linear_cross_entropy(xl, Wl, target, linear_bias=bl, **kw,
                                                   shift=shift, weight=cw_arg, impl=impl,
                                                   process_group=None if dtensor else self.group)
        assert type(loss) is torch.Tensor and loss.dtype == dtype, (type(loss), loss.dtype)
        _close(loss, ref_loss, f"{tag}: loss", dtype)
        with self.comm.track() as bwd:
            (loss.double() * gout).sum().backward()
        if x_grad:
            _close(xl.grad, x64.grad, f"{tag}: input grad (full, every rank)", dtype)
        else:
            assert xl.grad is None
        wg, bg = Wl.grad, (bl.grad if bias else None)
        if dtensor:
            from torch.distributed.tensor import DTensor
            assert isinstance(wg, DTensor), f"{tag}: weight grad is a {type(wg)}"
            wg = wg.to_local()
            if bias:
                assert isinstance(bg, DTensor), f"{tag}: bias grad is a {type(bg)}"
                bg = bg.to_local()
        _close(wg, W64.grad[off:off + n], f"{tag}: weight grad slice", dtype)
        if bias:
            _close(bg, b64.grad[off:off + n], f"{tag}: bias grad slice", dtype)

        rows = int(torch.tensor(batch).prod())
        stats = [e for e in fwd
                 if e["name"] == "_all_gather" and e["tensors"][0]["numel"] != self.world]
        sizes_g = [e for e in fwd if e not in stats]
        assert _forward_pattern_ok(fwd, stats, sizes_g), f"{tag}: forward collectives {fwd}"
        # one extra row per call: the slice-size check (see softmax_ce.distributed)
        assert stats[0]["tensors"][0]["shape"] == [self.world * (rows + 1), self.n_stats], stats
        reduces = [e for e in bwd if e["name"] == "all_reduce"]
        assert len(reduces) == (1 if x_grad else 0) and len(bwd) == len(reduces), (
            f"{tag}: backward collectives {bwd}")
        if reduces:
            assert reduces[0]["tensors"][0]["shape"] == [rows, D], reduces
        k = self.n_stats
        _bytes_ok(fwd + bwd, V, {self.world, (rows + 1) * k, self.world * (rows + 1) * k, 1, rows * D})

        if single:
            xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
            bs = b.clone().requires_grad_() if bias else None
            ls = softmax_ce.linear_cross_entropy(xs, Ws, target, linear_bias=bs, **kw,
                                                 shift=shift, weight=cw, impl=impl)
            (ls.double() * gout).sum().backward()
            _close(loss, ls, f"{tag}: loss vs unsharded softmax_ce", dtype)
            _close(xl.grad, xs.grad, f"{tag}: input grad vs unsharded", dtype)
            _close(Wl.grad, Ws.grad[off:off + n], f"{tag}: weight grad vs unsharded", dtype)
        return dict(fwd=fwd, bwd=bwd)


# ----------------------------------------------------------------------------
# The child process
# ----------------------------------------------------------------------------

def _run_checks(rank, world, out_dir, names):
    """One rank (softmax_ce.testing.run_ranks has set up the process group): run the
    checks `names` in order, each record appended to rank<r>.jsonl as it happens."""
    import torch
    import torch.distributed as dist

    f = open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a", buffering=1)

    def emit(**rec):
        f.write(json.dumps(dict(rec, rank=rank)) + "\n")
        f.flush()

    lost = None
    try:
        torch.set_num_threads(1)
        ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=SYNC_TIMEOUT_S))
        from softmax_ce.kernels import cross_entropy as K
        emit(event="env", triton_interpret=os.environ.get("TRITON_INTERPRET"),
             interpreting=K.interpreting(), cuda=torch.cuda.is_available())
        sync = dist.all_reduce  # kept unwrapped: the control exchange is not counted
        C = _Ctx(rank, world)
        for name in names:
            fn = CHECKS[name]
            emit(event="start", check=name)
            t0 = time.monotonic()
            status, msg = "pass", ""
            try:
                C.reset_slice_cache()
                fn(C)
            except SkipCheck as e:
                status, msg = "skip", str(e)
            except AssertionError:
                status, msg = "fail", traceback.format_exc()
            except BaseException:
                status, msg = "error", traceback.format_exc()
            emit(event="end", check=name, status=status, msg=msg,
                 seconds=round(time.monotonic() - t0, 2))
            # every rank finished this check: otherwise one is stuck in a collective
            try:
                sync(torch.zeros(1), group=ctrl)
            except BaseException:
                lost = f"lost the other ranks after check {name}"
                emit(event="fatal", check=name, msg=f"{lost}:\n" + traceback.format_exc())
                break
        emit(event="done")
    except BaseException:
        emit(event="fatal", msg=traceback.format_exc())
        raise
    finally:
        f.close()
    if lost:
        raise RuntimeError(lost)  # run_ranks: no destroy_process_group, exit code 1


# ----------------------------------------------------------------------------
# The parent: one spawn per world size, cached for the module
# ----------------------------------------------------------------------------

def _spawn_once(world, names, deadline):
    """Run the checks `names` in `world` fresh processes -> what their result files say."""
    from softmax_ce.testing import run_ranks

    out_dir = tempfile.mkdtemp(prefix=f"softmax_ce_dist{world}_")
    # the children run the parent's kernels: interpreted here without a GPU (conftest.py)
    env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"), "OMP_NUM_THREADS": "1"}
    ranks = run_ranks(world, _run_checks, (out_dir, names), backend="gloo", env=env,
                      deadline_s=max(1.0, deadline - time.monotonic()),
                      collective_timeout_s=COLLECTIVE_TIMEOUT_S)

    problems, checks = [], {}  # checks: name -> rank -> record
    started, done, env_recs, aborted_after, fatal = {}, set(), [], set(), set()
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.jsonl")
        if not os.path.exists(path):
            problems.append(f"rank {r}: no result file (the process did not start?)")
            continue
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                ev = rec.get("event")
                if ev == "start":
                    started[r] = rec["check"]
                elif ev == "end":
                    checks.setdefault(rec["check"], {})[r] = rec
                    started.pop(r, None)
                elif ev == "done":
                    done.add(r)
                elif ev == "fatal":
                    fatal.add(r)
                    problems.append(f"rank {r}: {rec['msg']}")
                    if rec.get("check"):
                        aborted_after.add(rec["check"])
                elif ev == "env":
                    env_recs.append(rec)
    # why run_ranks saw a rank fail, unless its file says it already (killed, ...)
    problems += [f"world {world}, rank {r.rank}: {r.error}" for r in ranks
                 if not r.ok and r.rank not in fatal]
    for r, name in started.items():  # killed inside a check: that check failed
        problems.append(f"rank {r} never finished check {name!r}")
        checks.setdefault(name, {})[r] = dict(status="error", msg=f"rank {r} was killed in it:\n"
                                              + "\n".join(problems))
        aborted_after.add(name)
    for r in ranks:
        if r.exitcode != 0:
            problems.append(f"rank {r.rank} exit code {r.exitcode}")
    shutil.rmtree(out_dir, ignore_errors=True)
    # the checks that ran to the end on every rank, or the last one that broke the run
    last = max((names.index(n) for n in aborted_after if n in names), default=None)
    if last is None and len(done) < world:
        last = max((names.index(n) for n in checks if n in names), default=None)
    return dict(checks=checks, problems=problems, done=done, env=env_recs,
                resume=None if last is None else last + 1)


def _spawn(world):
    """All checks for one world size; a check that breaks the run (a rank raised while
    its peers wait in a collective) ends that spawn, and a fresh one resumes after it."""
    names = list(CHECKS)
    t0 = time.monotonic()
    deadline = t0 + SPAWN_DEADLINE_S
    run = dict(checks={}, problems=[], done=set(range(world)), env=[], spawns=0)
    while names:
        one = _spawn_once(world, names, deadline)
        run["spawns"] += 1
        run["checks"].update(one["checks"])
        run["env"] += one["env"]
        if one["resume"] is None:
            run["problems"] += one["problems"]
            run["done"] &= one["done"]
            break
        run["broken_by"] = run.get("broken_by", []) + [names[one["resume"] - 1]]
        run["problems"] += [f"(spawn {run['spawns']}, broken by check "
                            f"{names[one['resume'] - 1]!r}) {p}" for p in one["problems"]]
        names = names[one["resume"]:]
        if time.monotonic() > deadline - 15 or run["spawns"] >= 4:
            run["problems"].append(f"gave up before checks {names}")
            run["done"] = set()
            break
    run["seconds"] = time.monotonic() - t0
    return run


_RUNS = {}


def _run(world):
    if world not in _RUNS:
        _RUNS[world] = _spawn(world)
    return _RUNS[world]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_processes_finish(world):
    """The spawn itself: every rank ran every check and exited 0, under the kernels under
    test; no check broke the run (left a rank waiting in a collective)."""
    run = _run(world)
    assert not run["problems"], "\n".join(run["problems"])
    assert run["spawns"] == 1 and run["done"] == set(range(world)), run
    for rec in run["env"]:
        parent = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        assert rec["interpreting"] == parent, rec


@pytest.mark.parametrize("name", list(CHECKS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_check(world, name):
    run = _run(world)
    recs = run["checks"].get(name, {})
    missing = [r for r in range(world) if r not in recs]
    if missing:
        pytest.fail(f"check {name!r} has no result from ranks {missing}; the run's problems:\n"
                    + "\n".join(run["problems"]))
    if all(rec["status"] == "skip" for rec in recs.values()):
        pytest.skip(recs[0]["msg"])
    bad = {r: rec for r, rec in sorted(recs.items()) if rec["status"] not in ("pass", "skip")}
    if bad:
        pytest.fail("\n".join(f"--- rank {r} ({rec['status']}):\n{rec['msg']}"
                              for r, rec in bad.items()), pytrace=False)
