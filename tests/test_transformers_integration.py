"""softmax_ce.integrations.transformers: `apply(model)` swaps a Hugging Face causal LM's
loss for the fused linear cross-entropy.  A patched model must give the stock model's
loss and gradients (same labels, -100 ignored, shift inside), train the same way, and
leave everything without labels (logits, generation) untouched.

Tiny randomly initialised models of four families: Llama, Qwen2, Gemma 2 (with a final
logit softcap small enough to matter, and tied embeddings) and GPT-2 (tied embeddings,
a biasless Conv1D body; dropout off so that two runs can be compared).
"""

import copy
import zlib

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import softmax_ce.integrations.transformers as sce_hf  # noqa: E402

V = 97  # a prime: not a multiple of any tile size
B, T = 2, 11


def _configs():
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**common)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common)),
        # initializer_range 0.5: logits of a few units, so that the cap at 3.0 matters
        # (with the default 0.02 they are ~0.1 and the softcap changes nothing)
        "gemma2": (transformers.Gemma2ForCausalLM,
                   transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0,
                                             initializer_range=0.5)),
        "gpt2": (transformers.GPT2LMHeadModel,
                 transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                         n_positions=64, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)),
    }


FAMILIES = list(_configs())


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def build(family, *, train=False):
    """-> (stock model, patched deep copy): the same random weights."""
    cls, cfg = _configs()[family]
    with torch.random.fork_rng():
        torch.manual_seed(_seed("model", family))
        stock = cls(cfg)
    stock.train(train)
    patched = sce_hf.apply(copy.deepcopy(stock))
    return stock, patched


def batch(*key):
    """input_ids, attention_mask and labels with -100: a prompt and a right-padded row."""
    g = torch.Generator().manual_seed(_seed("batch", *key))
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[0, :3] = -100        # prompt tokens: no loss
    labels[1, -3:] = -100       # padding
    ids[1, -3:] = 0
    return ids, mask, labels


@pytest.fixture(params=("kernel", "torch"))
def lce_path(request, monkeypatch):
    """The fused loss through the Triton kernels (interpreted on CPU) or the PyTorch path."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def assert_grads_match(stock, patched, scale=1e-5):
    """Every parameter has a gradient in both, equal up to fp32 noise relative to its largest
    entry (observed: below 2e-6 of it for every parameter of these models, on both paths)."""
    n = 0
    for (name, p1), (name2, p2) in zip(stock.named_parameters(), patched.named_parameters()):
        assert name == name2
        assert (p1.grad is None) == (p2.grad is None), name
        if p1.grad is None:
            continue
        n += 1
        tol = scale * max(p1.grad.abs().max().item(), 1e-30)
        err = (p1.grad - p2.grad).abs().max().item()
        assert err <= tol, f"{name}: max |grad difference| {err:.3g} > {tol:.3g}"
    assert n > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_match(family, lce_path):
    stock, patched = build(family)
    ids, mask, labels = batch(family)
    o1 = stock(input_ids=ids, attention_mask=mask, labels=labels)
    o2 = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert o1.logits is not None and o2.logits is None
    assert o2.loss.dtype == torch.float32 and o2.loss.shape == ()
    torch.testing.assert_close(o2.loss, o1.loss, rtol=1e-5, atol=0)
    o1.loss.backward()
    o2.loss.backward()
    assert_grads_match(stock, patched)


def test_softcap_is_applied():
    """Gemma 2's final_logit_softcapping reaches the fused loss, and it matters here."""
    stock, patched = build("gemma2")
    ids, mask, labels = batch("softcap")
    with torch.no_grad():
        logits = stock(input_ids=ids, attention_mask=mask).logits
        capped = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
        stock.config.final_logit_softcapping = None
        uncapped = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert logits.abs().max() > 2.0  # the capped logits come near the cap (3.0)
    assert abs(capped.item() - uncapped.item()) > 1e-2 * abs(uncapped.item())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_match(family, lce_path):
    """Three AdamW steps on the same batches give the same loss curve and weights."""
    stock, patched = build(family, train=True)
    # eps well above fp32 noise in the gradients: an element whose true gradient is ~0
    # must not get a +-lr step in one model and not the other from a rounding difference
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-6) for m in (stock, patched)]
    curves = ([], [])
    for step in range(3):
        ids, mask, labels = batch(family, "step", step)
        for model, opt, curve in zip((stock, patched), opts, curves):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
    ids, mask, labels = batch(family, "final")
    with torch.no_grad():
        for model, curve in zip((stock, patched), curves):
            curve.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=0)
    assert curves[0][-1] != curves[0][0]  # the steps really changed the model
    for (name, p1), (_, p2) in zip(stock.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_num_items_in_batch(family):
    """The trainer's gradient-accumulation normaliser: a sum divided by num_items_in_batch."""
    stock, patched = build(family)
    ids, mask, labels = batch(family, "items")
    n_items = torch.tensor(3 * int((labels[:, 1:] != -100).sum()))  # e.g. 3 micro-batches
    o1 = stock(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
    o2 = patched(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
    torch.testing.assert_close(o2.loss, o1.loss, rtol=1e-5, atol=0)
    mean = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(o2.loss * 3, mean, rtol=1e-5, atol=0)  # really a different reduction
    o1.loss.backward()
    o2.loss.backward()
    assert_grads_match(stock, patched)
    # a plain int works as well
    o3 = patched(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=int(n_items))
    torch.testing.assert_close(o3.loss, o1.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shift_labels(family):
    """Labels already shifted by the caller (transformers' `shift_labels`) are used as given."""
    stock, patched = build(family)
    ids, mask, labels = batch(family, "shift_labels")
    shift_labels = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1)
    l1 = stock(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift_labels).loss
    l2 = patched(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift_labels).loss
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)
    # shift_labels given: labels are not shifted again (an unshifted use would differ)
    assert abs(l2.item() - patched(input_ids=ids, attention_mask=mask,
                                   labels=shift_labels).loss.item()) > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_order_like_stock(family):
    """The loss comes first wherever the stock model puts it first: `out[0]`,
    `out.to_tuple()[0]` and, with return_dict=False, the tuple (`model(**batch)[0]` is a
    common idiom; the Trainer uses it for tuple outputs).  The stock tuple is
    (loss, logits, cache); the patched one is the same without the logits."""
    stock, patched = build(family)
    ids, mask, labels = batch(family, "order")
    t1 = stock(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    t2 = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(t2, tuple)
    assert t2[0] is not None, f"tuple output {[type(o).__name__ for o in t2]}: loss is not first"
    torch.testing.assert_close(t2[0], t1[0], rtol=1e-5, atol=0)
    assert len(t2) == len(t1) - 1 and all(o is not None for o in t2)
    o2 = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert list(o2.keys())[0] == "loss", list(o2.keys())
    assert o2[0] is o2.loss and o2.to_tuple()[0] is o2.loss


@pytest.mark.parametrize("family", FAMILIES)
def test_without_labels_unchanged(family):
    """No labels: the stock forward, logits and all; generation is unchanged."""
    stock, patched = build(family)
    ids, mask, _ = batch(family, "nolabels")
    with torch.no_grad():
        l1 = stock(input_ids=ids, attention_mask=mask).logits
        l2 = patched(input_ids=ids, attention_mask=mask).logits
    assert l2 is not None and l2.shape == (B, T, V)
    assert torch.equal(l1, l2)
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(stock.generate(prompt, **kw), patched.generate(prompt, **kw))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_revert_and_idempotent(family):
    stock, patched = build(family)
    ids, mask, labels = batch(family, "revert")
    ref = stock(input_ids=ids, attention_mask=mask, labels=labels)

    fwd = patched.forward
    original = getattr(patched, "_softmax_ce_original_forward")
    assert sce_hf.apply(patched) is patched  # idempotent: no second wrapper
    assert patched.forward is fwd
    assert getattr(patched, "_softmax_ce_original_forward") is original
    o = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert o.logits is None
    torch.testing.assert_close(o.loss, ref.loss, rtol=1e-5, atol=0)

    assert sce_hf.revert(patched) is patched
    assert not hasattr(patched, "_softmax_ce_original_forward")
    assert "forward" not in vars(patched)  # the class's forward again
    o = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert o.logits is not None and torch.equal(o.logits, ref.logits)
    assert torch.equal(o.loss, ref.loss)
    sce_hf.revert(patched)  # reverting twice is harmless

    # and it can be applied again after a revert
    sce_hf.apply(patched)
    o = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert o.logits is None
    torch.testing.assert_close(o.loss, ref.loss, rtol=1e-5, atol=0)


def test_head_restored_after_error():
    """The output head's temporary override is removed even when the forward raises."""
    stock, patched = build("llama")
    ids, _, labels = batch("error")
    with pytest.raises(Exception):
        patched(input_ids=ids, labels=labels[:, :5])  # labels of the wrong length
    head = patched.get_output_embeddings()
    assert "forward" not in vars(head)
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_rejects_non_linear_head():
    stock, _ = build("llama")
    stock.lm_head = torch.nn.Identity()
    with pytest.raises(TypeError, match="^softmax_ce.integrations.transformers.apply"):
        sce_hf.apply(stock)
