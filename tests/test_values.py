"""Forward and backward parity with the fp64 reference, over a grid of options."""

import itertools

import pytest
import torch

import softmax_ce
from _helpers import DTYPES, assert_close_to_ref, check_path, gen
from conftest import Path
from reference import reference_cross_entropy

# ----------------------------------------------------------------------------
# Shapes: (C), (N, C), (N, C, d1, d2) with the class dim 1, non-contiguous views
# and a (B, T, V) tensor seen as (B*T, V).  Each entry: the shape of the leaf
# tensor the test differentiates, and the view of it handed to cross_entropy.
# ----------------------------------------------------------------------------
SHAPES = {
    "1d": ((7,), lambda r: r),
    "2d": ((6, 11), lambda r: r),
    "4d": ((2, 5, 3, 2), lambda r: r),
    "4d_permuted": ((2, 3, 2, 5), lambda r: r.permute(0, 3, 1, 2)),  # channels-last (2, 5, 3, 2)
    "transposed": ((9, 5), lambda r: r.t()),            # (5, 9), column-major
    "strided": ((8, 27), lambda r: r[::2, 1::2]),      # (4, 13), row and column stride 2
    "btv": ((2, 3, 127), lambda r: r.reshape(-1, 127)),  # (B, T, V) -> (B*T, V)
    # (6, 35) from column 3 of rows of 41: rows start off the 16-byte grid, each at
    # another offset, and the gradient's (contiguous) rows cross it elsewhere
    "window": ((6, 41), lambda r: r[:, 3:38]),
}
# Views whose target is made non-contiguous too (a strided index vector, a
# transposed probability matrix).
NONCONTIG_TARGET = {"transposed", "strided"}


def make_inputs(g, shape_name, dtype, target_kind, ignore_index, with_weight, scale=3.0):
    """Leaf logits (fp32 values rounded to `dtype`), the target and the weight (CPU)."""
    raw_shape, view = SHAPES[shape_name] if shape_name in SHAPES else VOCAB_SHAPES[shape_name]
    raw = (torch.randn(raw_shape, generator=g) * scale).to(dtype)
    shape = view(raw).shape
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    batch = shape[:0] if len(shape) == 1 else shape[:1] + shape[2:]
    noncontig = shape_name in NONCONTIG_TARGET
    if target_kind == "class":
        target = torch.randint(0, n_classes, batch, generator=g)
        flat = target.view(-1)
        if flat.numel() > 1:
            flat[1::4] = ignore_index  # some ignored rows, never all of them
        elif flat.numel() == 1 and int(flat[0]) == ignore_index:
            flat[0] = (ignore_index + 1) % n_classes
        if noncontig:
            target = torch.stack([target, target], dim=-1)[..., 0]
            assert not target.is_contiguous()
    else:
        class_dim = 0 if len(shape) == 1 else 1
        if target_kind == "prob":
            y = torch.softmax(torch.randn(shape, generator=g) * 2, dim=class_dim)
        else:  # multi-label: unnormalized, sum(y) anywhere in [0, ~C/3], some rows all zero
            y = (torch.rand(shape, generator=g) < 0.3) * torch.rand(shape, generator=g) * 2
        target = y.to(dtype)
        if noncontig:
            target = target.t().contiguous().t()
            assert not target.is_contiguous()
    weight = (torch.rand(n_classes, generator=g) * 1.5 + 0.25).to(dtype) if with_weight else None
    return raw, view, target, weight


def upstream(reduction, shape, g, dtype):
    """grad_output: random per element for "none", 1 for "mean", 0.5 for "sum"."""
    if reduction == "none":
        return torch.randn(shape, generator=g).to(dtype)
    return torch.tensor(1.0 if reduction == "mean" else 0.5, dtype=dtype)


def run_parity(path, key, *, shape, dtype, target="class", weight=False, smoothing=0.0,
               reduction="mean", z_loss=0.0, softcap=None, grad_mode="recompute",
               inplace=False, ignore_index=-100, scale=3.0, grad_opts=None, loss_opts=None):
    """One forward + backward through softmax_ce on `path`, compared with the fp64 reference."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    g = gen(*key)
    raw, view, tgt, w = make_inputs(g, shape, dtype, target, ignore_index, weight, scale=scale)
    if target != "class":
        ignore_index = -100  # as torch, probability targets refuse any other ignore_index
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                z_loss=z_loss, softcap=softcap)

    ref_raw = raw.double().clone().requires_grad_()  # a copy even when raw is float64
    ref = reference_cross_entropy(view(ref_raw), tgt, w, **opts)
    up = upstream(reduction, ref.shape, g, dtype)
    (ref * up.double()).sum().backward()

    x = raw.clone().to(path.device).requires_grad_()
    # in place needs logits that are an intermediate (a leaf that requires grad is refused)
    base = x * 1.0 if inplace else x
    xin = view(base)
    check_path(path, xin)
    tgt_d = tgt.to(path.device)
    w_d = w.to(path.device) if w is not None else None
    tgt_before = tgt_d.clone()
    loss = softmax_ce.cross_entropy(xin, tgt_d, w_d, **opts, inplace_backward=inplace,
                                    grad_mode=grad_mode)
    assert loss.dtype == dtype and loss.device == x.device
    assert_close_to_ref(loss, ref, dtype, what="loss", **(loss_opts or {}))

    (loss * up.to(path.device)).sum().backward()
    grad = x.grad
    assert grad is not None and grad.dtype == dtype
    if not ref_raw.grad.isnan().any():
        assert not grad.isnan().any(), "NaN in the gradient"
    assert_close_to_ref(grad, ref_raw.grad, dtype, what="grad", **(grad_opts or {}))

    # the target and weight are never written; the logits only with inplace_backward
    assert torch.equal(tgt_d, tgt_before)
    if w is not None:
        assert torch.equal(w_d.cpu(), w)
    assert torch.equal(x.detach().cpu(), raw), "the user's leaf tensor was modified"
    if inplace and not shape.startswith("4d"):  # (4d: the (rows, C) matrix is a copy)
        # the gradient landed in the logits' own storage
        assert torch.equal(view(base.detach()), view(grad))
    return loss, grad


# ----------------------------------------------------------------------------
# The option grid.
#
# A full cartesian product of these factors is ~45k cases; most pairs of options
# do not interact (the kernels see only per-row coefficients, dtype, strides).
# So the grid is:
#   * the full product of the options that do interact in how the per-row
#     coefficients and the denominators are built:
#       target kind (class / normalized prob / unnormalized multi-label)
#       x weight x label_smoothing x reduction           (36 rows)
#     This contains every weight x label_smoothing x reduction triple and every
#     prob-target x weight x smoothing triple.
#   * the remaining factors (z_loss, softcap, grad_mode, inplace_backward, dtype,
#     ignore_index, shape) filled in greedily so that EVERY PAIR of values of ANY
#     two factors occurs in at least one row (all-pairs covering, deterministic;
#     test_grid_covers_all_pairs checks it).  That includes softcap x z_loss,
#     grad_mode x inplace, dtype x everything, shape x everything.
# Each row runs on every implementation path (see conftest.ALL_PATHS).
# ----------------------------------------------------------------------------
FACTORS = (
    ("target", ("class", "prob", "multilabel")),
    ("weight", (False, True)),
    ("smoothing", (0.0, 0.1)),
    ("reduction", ("none", "mean", "sum")),
    ("z_loss", (0.0, 1e-2)),
    ("softcap", (None, 4.0)),
    ("grad_mode", ("recompute", "fused")),
    ("inplace", (False, True)),
    ("dtype", ("fp32", "bf16", "fp16")),
    ("ignore_index", (-100, -1, 2)),  # the default, another negative, one inside [0, C)
    ("shape", tuple(SHAPES)),
)
FULL_PRODUCT = ("target", "weight", "smoothing", "reduction")


def _pairs(row):
    names = [n for n, _ in FACTORS]
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}


def pairwise_grid():
    levels = dict(FACTORS)
    names = [n for n, _ in FACTORS]
    uncovered = set()
    for a, b in itertools.combinations(names, 2):
        uncovered |= {((a, va), (b, vb)) for va in levels[a] for vb in levels[b]}
    usage = {(n, v): 0 for n in names for v in levels[n]}

    def fill(row):
        for n in names:
            if n in row:
                continue
            best = max(levels[n], key=lambda v: (
                sum(((m, row[m]), (n, v)) in uncovered or ((n, v), (m, row[m])) in uncovered
                    for m in row),
                -usage[(n, v)]))
            row[n] = best
        for n in names:
            usage[(n, row[n])] += 1
        uncovered.difference_update(_pairs(row))
        return row

    rows = [fill(dict(zip(FULL_PRODUCT, combo)))
            for combo in itertools.product(*(levels[n] for n in FULL_PRODUCT))]
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=repr)
        rows.append(fill({a: va, b: vb}))
    return rows


GRID = pairwise_grid()


def case_id(c):
    parts = [c["target"], "w" if c["weight"] else "", "ls" if c["smoothing"] else "", c["reduction"],
             "z" if c["z_loss"] else "", "cap" if c["softcap"] else "", c["grad_mode"],
             "inplace" if c["inplace"] else "", c["dtype"], f"ign{c['ignore_index']}", c["shape"]]
    return "-".join(p for p in parts if p)


def test_grid_covers_all_pairs():
    covered = set().union(*(_pairs(c) for c in GRID))
    levels = dict(FACTORS)
    for a, b in itertools.combinations([n for n, _ in FACTORS], 2):
        for va in levels[a]:
            for vb in levels[b]:
                assert ((a, va), (b, vb)) in covered, (a, va, b, vb)
    triples = {tuple(c[n] for n in FULL_PRODUCT) for c in GRID}
    assert len(triples) == 36
    assert len(GRID) < 60  # stays a grid, not a product


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_grid_matches_reference(case, path):
    run_parity(path, ("grid", case_id(case), path.name), **case)


@pytest.mark.parametrize("case", GRID[::3], ids=case_id)
def test_float64_path(case, device):
    """float64 input goes through the float64 PyTorch path (never the fp32-accumulating
    kernels, on any device) and matches the reference to ~1e-10."""
    run_parity(Path("float64", device, False), ("fp64", case_id(case)),
               **{**case, "dtype": torch.float64})


# ----------------------------------------------------------------------------
# Vocabulary sizes: odd ones (1, 3, 127, 1000, 4099: one tile, a tail, several
# tiles on the GPU) and real ones (32000, 50257) with a few rows, as (B, T, V)
# logits seen as (B*T, V).
# ----------------------------------------------------------------------------
VOCABS = [(1, 4), (3, 4), (127, 4), (1000, 4), (4099, 3), (32000, 3), (50257, 2)]

VARIANTS = {
    # the common case
    "plain-fp32": dict(dtype="fp32"),
    # every option at once, fused + inplace, per-row output
    "all-bf16-fused-inplace": dict(dtype="bf16", weight=True, smoothing=0.05, z_loss=1e-3,
                                   softcap=30.0, grad_mode="fused", inplace=True,
                                   reduction="none"),
    # probability targets with a weight
    "prob-fp16-weight-sum": dict(dtype="fp16", target="prob", weight=True, reduction="sum",
                                 inplace=True),
}


VOCAB_SHAPES = {f"vocab{v}x{rows}": ((1, rows, v), lambda r, v=v: r.reshape(-1, v))
                for v, rows in VOCABS}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("vocab,rows", VOCABS, ids=[f"V{v}" for v, _ in VOCABS])
def test_vocab_sizes(vocab, rows, variant, path2):
    shape = f"vocab{vocab}x{rows}"
    opts = dict(VARIANTS[variant])
    if vocab > 1000:
        # fp32 sums over tens of thousands of entries: a few ulps more than 1e-5
        opts["loss_opts"] = dict(rtol=2e-5)
    run_parity(path2, ("vocab", vocab, variant, path2.name), shape=shape, **opts)


# ----------------------------------------------------------------------------
# Named worked examples
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("logits", [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]], ids=["123", "234"])
@pytest.mark.parametrize("batched", [False, True], ids=["C", "1xC"])
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
def test_worked_example(logits, batched, grad_mode, path2):
    """softmax([1, 2, 3]) = [0.0900, 0.2447, 0.6652]; target 1: loss = lse - 2 = 1.4076,
    gradient = softmax - onehot(1).  Shifting every logit by 1 changes neither."""
    x = torch.tensor(logits, device=path2.device)
    t = torch.tensor(1, device=path2.device)
    if batched:
        x, t = x[None], t[None]
    x.requires_grad_()
    check_path(path2, x)
    loss = softmax_ce.cross_entropy(x, t, grad_mode=grad_mode)
    loss.backward()
    assert loss.shape == ()
    assert loss.item() == pytest.approx(1.4076, abs=1e-4)
    expected = torch.tensor([0.0900, -0.7553, 0.6652])
    torch.testing.assert_close(x.grad.reshape(3).cpu(), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------
# bf16 precision for a confident model
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("grad_mode", softmax_ce.GRAD_MODES)
@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_bf16_confident_model(grad_mode, inplace, path2):
    """softmax of the target ~0.999: its gradient (p - 1) / N ~ -1e-3 / N must keep bf16's
    relative precision, i.e. be computed in fp32 and rounded once (not 0.999 rounded to
    bf16, then minus 1, which would be off by ~100%)."""
    n, v = 4, 1000
    g = gen("confident", grad_mode, inplace, path2.name)
    target = torch.randint(0, v, (n,), generator=g)
    # the others sum to ~1e-3 of the target's exp: log(999 * 999) below it
    z = torch.randn(n, v, generator=g) * 0.1 + (10.0 - torch.log(torch.tensor(999.0 * 999.0)))
    z[torch.arange(n), target] = 10.0
    z = z.to(torch.bfloat16)

    ref_x = z.double().requires_grad_()
    ref = reference_cross_entropy(ref_x, target)
    ref.backward()
    p_t = torch.softmax(ref_x.detach(), 1)[torch.arange(n), target]
    assert ((p_t > 0.998) & (p_t < 0.9995)).all()

    x = z.clone().to(path2.device).requires_grad_()
    check_path(path2, x)
    loss = softmax_ce.cross_entropy(x * 1.0 if inplace else x, target.to(path2.device),
                                    grad_mode=grad_mode, inplace_backward=inplace)
    loss.backward()
    rows = torch.arange(n)
    got = x.grad.cpu()[rows, target].double()
    want = ref_x.grad[rows, target]
    assert (want < -1e-4).all() and (want > -1e-3).all()
    assert ((got - want).abs() / want.abs()).max() < 1e-2
    # the (small) loss itself keeps its relative precision too
    assert abs(loss.double().item() - ref.item()) / ref.item() < 1e-2
