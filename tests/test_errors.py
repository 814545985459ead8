"""Bad arguments raise like torch, with a message that starts with
"softmax_ce.cross_entropy:" and names the argument, and change nothing."""

import pytest
import torch

import softmax_ce

ce = softmax_ce.cross_entropy

# every way the call may write into the user's tensors
MODES = [dict(), dict(inplace_backward=True), dict(inplace_backward=True, grad_mode="fused"),
         dict(grad_mode="fused")]


def _msg(*words):
    """The message starts with the API's name and mentions each of `words`, in order."""
    return r"(?s)^softmax_ce\.cross_entropy: .*" + ".*".join(words)


def assert_raises_unchanged(exc, match, x, target, weight=None, **kw):
    tensors = [t for t in (x, target, weight) if isinstance(t, torch.Tensor) and not t.is_meta]
    before = [t.detach().clone() for t in tensors]
    for mode in MODES:
        with pytest.raises(exc, match=match):
            ce(x, target, weight, **{**mode, **kw})
        for t, b in zip(tensors, before):
            assert torch.equal(t.detach(), b), f"an argument was modified before raising ({mode})"
        if x.requires_grad:
            assert x.grad is None


@pytest.fixture
def x(device):
    return torch.randn(4, 5, device=device, requires_grad=True)


@pytest.fixture
def t(device):
    return torch.tensor([0, 4, 2, 1], device=device)


def test_batch_size_mismatch(x, device):
    assert_raises_unchanged(ValueError, _msg(r"Expected input batch_size \(4\) to match target "
                                             r"batch_size \(3\)"),
                            x, torch.tensor([0, 1, 2], device=device))


def test_spatial_shape_mismatch(device):
    """RuntimeError, as torch raises ("Expected target size [2, 3], got [2, 4]")."""
    x = torch.randn(2, 5, 3, device=device, requires_grad=True)
    assert_raises_unchanged(RuntimeError, _msg("target"), x, torch.zeros(2, 4, dtype=torch.long,
                                                                          device=device))


def test_float_class_index_target_of_wrong_shape(x, device):
    """A float target is read as class probabilities, so it must have the input's shape."""
    assert_raises_unchanged(RuntimeError, _msg("target"), x,
                            torch.tensor([0.0, 4.0, 2.0, 1.0], device=device))


def test_target_of_unsupported_dtype(x, device):
    assert_raises_unchanged(RuntimeError, _msg("target"), x,
                            torch.tensor([True, False, True, True], device=device))


@pytest.mark.parametrize("bad", [5, 7, -1, -5], ids=["C", "C+2", "minus1", "minus5"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("with_weight", [False, True], ids=["noweight", "weight"])
def test_target_out_of_range(bad, index_dtype, with_weight, path2):
    """An index outside [0, C) that is not ignore_index: IndexError naming target (on CPU;
    CUDA checks it asynchronously on the device)."""
    if path2.device == "cuda":
        pytest.skip("CUDA reports a bad index with a device-side assert, which poisons the context")
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, bad, 2, 1], dtype=index_dtype)
    w = torch.rand(5) + 0.5 if with_weight else None
    assert_raises_unchanged(IndexError, _msg("target"), x, t, w)
    assert_raises_unchanged(IndexError, _msg("target"), x, t, w, label_smoothing=0.1)


def test_uint8_target_out_of_range(path2):
    if path2.device == "cuda":
        pytest.skip("CUDA reports a bad index with a device-side assert, which poisons the context")
    x = torch.randn(3, 5, requires_grad=True)
    assert_raises_unchanged(IndexError, _msg("target"), x, torch.tensor([0, 255, 1], dtype=torch.uint8))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(x, t, value):
    assert_raises_unchanged(RuntimeError, _msg("label_smoothing"), x, t, label_smoothing=value)


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan")])
def test_softcap_not_positive(x, t, value):
    assert_raises_unchanged(ValueError, _msg("softcap"), x, t, softcap=value)


@pytest.mark.parametrize("value", [-1e-3, float("nan")])
def test_z_loss_negative(x, t, value):
    assert_raises_unchanged(ValueError, _msg("z_loss"), x, t, z_loss=value)


@pytest.mark.parametrize("shape", [(6,), (4,), (5, 1), ()], ids=["C+1", "C-1", "Cx1", "scalar"])
def test_weight_of_wrong_shape(x, t, shape, device):
    assert_raises_unchanged(RuntimeError, _msg("weight"), x, t, torch.rand(shape, device=device))


def test_weight_with_probability_targets_wrong_shape(x, device):
    y = torch.softmax(torch.randn(4, 5, device=device), 1)
    assert_raises_unchanged(RuntimeError, _msg("weight"), x, y, torch.rand(3, device=device))


@pytest.mark.parametrize("value", ["avg", "elementwise_mean", None])
def test_bad_reduction(x, t, value):
    assert_raises_unchanged(ValueError, _msg("reduction"), x, t, reduction=value)


@pytest.mark.parametrize("value", ["bogus", "Fused", None])
def test_bad_grad_mode(x, t, value):
    assert_raises_unchanged(ValueError, _msg("grad_mode"), x, t, grad_mode=value)


def test_zero_dim_input(device):
    x = torch.tensor(1.0, device=device, requires_grad=True)
    assert_raises_unchanged(RuntimeError, _msg("input"), x, torch.tensor(0, device=device))


def test_integer_input(device):
    x = torch.ones(4, 5, dtype=torch.long, device=device)
    assert_raises_unchanged(NotImplementedError, _msg("input", "int64"), x,
                            torch.zeros(4, dtype=torch.long, device=device))


def test_integer_weight_names_its_dtype(x, t, device):
    assert_raises_unchanged(RuntimeError, _msg("weight", "int64"), x, t,
                            torch.ones(5, dtype=torch.long, device=device))


def test_target_on_another_device(x):
    """A target elsewhere than the logits would hand the kernels a pointer of the wrong
    device: refused with a message naming both devices."""
    assert_raises_unchanged(RuntimeError, _msg("target", "meta", "input"), x,
                            torch.zeros(4, dtype=torch.long, device="meta"))


def _bad_calls(device):
    """(name, args, kwargs) of calls that torch.nn.functional.cross_entropy refuses."""
    x = torch.randn(3, 5, device=device)
    t = torch.tensor([0, 4, 2], device=device)
    return [
        ("batch size", (x, torch.tensor([0, 1, 2, 3], device=device)), {}),
        ("spatial shape", (torch.randn(3, 5, 2, device=device),
                           torch.zeros(3, 4, dtype=torch.long, device=device)), {}),
        ("2-d index target", (x, torch.zeros(3, 2, dtype=torch.long, device=device)), {}),
        ("probabilities of another shape", (x, torch.rand(3, 4, device=device)), {}),
        ("numpy target", (x, t.cpu().numpy()), {}),
        ("numpy input", (x.detach().cpu().numpy(), t), {}),
        ("list target", (x, [0, 1, 2]), {}),
        ("integer input", (torch.ones(3, 5, dtype=torch.long, device=device), t), {}),
        ("complex input", (torch.randn(3, 5, dtype=torch.complex64, device=device), t), {}),
        ("0-d input", (torch.tensor(1.0, device=device), torch.tensor(0, device=device)), {}),
        ("bool target", (x, torch.zeros(3, dtype=torch.bool, device=device)), {}),
        ("int16 target", (x, t.short()), {}),
        ("integer weight", (x, t), dict(weight=torch.ones(5, dtype=torch.long, device=device))),
        ("weight of 4", (x, t), dict(weight=torch.ones(4, device=device))),
        ("2-d weight", (x, t), dict(weight=torch.ones(5, 1, device=device))),
        ("numpy weight", (x, t), dict(weight=torch.ones(5).numpy())),
        ("reduction", (x, t), dict(reduction="avg")),
        ("label_smoothing", (x, t), dict(label_smoothing=2.0)),
        ("ignore_index with probabilities", (x, torch.rand(3, 5, device=device)),
         dict(ignore_index=1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))),
                         ids=[c[0] for c in _bad_calls("cpu")])
def test_exception_type_is_torchs(case, device):
    """A drop-in raises what torch raises, so that code catching torch's exception keeps
    working; the message stays ours and names the argument."""
    name, args, kw = _bad_calls(device)[case]
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.cross_entropy(*args, **kw)
    with pytest.raises(Exception) as ours:
        ce(*args, **kw)
    assert type(ours.value) is type(theirs.value), (name, ours.value, theirs.value)
    assert str(ours.value).startswith("softmax_ce.cross_entropy: "), ours.value


def test_module_raises_the_same(x, t):
    before = x.detach().clone()
    with pytest.raises(ValueError, match=_msg("reduction")):
        softmax_ce.CrossEntropyLoss(reduction="avg", inplace_backward=True)(x, t)
    with pytest.raises(ValueError, match=_msg("softcap")):
        softmax_ce.CrossEntropyLoss(softcap=-1.0, grad_mode="fused", inplace_backward=True)(x, t)
    assert torch.equal(x.detach(), before)



def test_ignore_index_with_probability_target(x, device):
    """torch refuses a non-default ignore_index for probability targets; so do we."""
    probs = torch.softmax(torch.randn(4, 5, device=device), dim=1)
    assert_raises_unchanged(RuntimeError, _msg("ignore_index", "probability"), x, probs,
                            ignore_index=0)


def _bad_linear_calls(device):
    x = torch.randn(3, 4, device=device)
    w = torch.randn(5, 4, device=device)
    t = torch.tensor([0, 4, 2], device=device)
    return [
        ("hidden size", (x, torch.randn(5, 3, device=device), t)),
        ("batch size", (x, w, torch.tensor([0, 1, 2, 3], device=device))),
        ("2-d target", (x, w, torch.zeros(3, 2, dtype=torch.long, device=device))),
        ("float target", (x, w, torch.rand(3, device=device))),
        ("1-d weight", (x, torch.randn(4, device=device), t)),
        ("dtype mismatch", (x.double(), w, t)),
    ]


@pytest.mark.skipif(not hasattr(torch.nn.functional, "linear_cross_entropy"),
                    reason="torch has F.linear_cross_entropy from 2.13 on")
@pytest.mark.parametrize("case", range(len(_bad_linear_calls("cpu"))),
                         ids=[c[0] for c in _bad_linear_calls("cpu")])
def test_linear_exception_type_is_torchs(case, device):
    name, args = _bad_linear_calls(device)[case]
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.linear_cross_entropy(*args)
    with pytest.raises(Exception) as ours:
        softmax_ce.linear_cross_entropy(*args)
    assert type(ours.value) is type(theirs.value), (name, ours.value, theirs.value)
    assert str(ours.value).startswith("softmax_ce.linear_cross_entropy: "), ours.value


@pytest.mark.parametrize("which", ["input", "weight"])
def test_linear_non_tensor_is_a_type_error(which, device):
    """torch's F.linear_cross_entropy lets a NumPy array fail with an AttributeError from
    deep inside; ours says TypeError, naming the argument."""
    x = torch.randn(3, 4, device=device)
    w = torch.randn(5, 4, device=device)
    args = dict(input=x, weight=w)
    args[which] = args[which].cpu().numpy()
    with pytest.raises(TypeError, match=rf"^softmax_ce\.linear_cross_entropy: {which} must be a Tensor"):
        softmax_ce.linear_cross_entropy(args["input"], args["weight"],
                                        torch.tensor([0, 4, 2], device=device))
