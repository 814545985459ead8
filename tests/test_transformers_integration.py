"""softmax_ce.integrations.transformers: `apply(model)` swaps a Hugging Face causal LM's
loss for the fused linear cross-entropy.  A patched model must give the stock model's
loss and gradients (shift or not as the model does, every post-head scale and softcap,
a router's aux loss, -100 ignored), train the same way, and leave everything without
labels (logits, generation) untouched; a model whose loss it cannot reproduce must be
refused by apply() with a clear error, never patched into a different loss.

Tiny randomly initialised models of four families are built here: Llama, Qwen2, Gemma 2
(with a final logit softcap small enough to matter, and tied embeddings) and GPT-2
(tied embeddings, a biasless Conv1D body; dropout off so that two runs can be
compared).  A representative subset of every model type of the installed transformers
(unshifted, scaled, softcapped, composite, mixture-of-experts, refused) goes through
tests/hf_sweep.py's builder and comparison; `python tests/hf_sweep.py` runs all of them.
"""

import copy
import os
import sys
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
    import softmax_ce._launch as _launch

    if request.param == "torch":
        monkeypatch.setattr(_launch, "FORCED_BACKEND", "torch")
    cpu = torch.empty(1)
    assert _launch.backend_for(cpu) == ("torch" if request.param == "torch" or
                                        torch.cuda.is_available() else "triton")
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
    (loss, logits, cache); the patched one keeps every position, None for the logits, so
    that out[1] is never the cache."""
    stock, patched = build(family)
    ids, mask, labels = batch(family, "order")
    t1 = stock(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    t2 = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(t2, tuple)
    assert t2[0] is not None, f"tuple output {[type(o).__name__ for o in t2]}: loss is not first"
    torch.testing.assert_close(t2[0], t1[0], rtol=1e-5, atol=0)
    assert len(t2) == len(t1) and t2[1] is None and t1[1] is not None
    assert type(t2[2]) is type(t1[2]) and t2[2] is not None  # the cache, where it was
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


def test_head_hooks_refused():
    """A forward hook on the head could change the logits: refused in apply(), and a hook
    added afterwards makes the labelled call raise."""
    stock, patched = build("llama")
    ids, mask, labels = batch("hooks")
    handle = stock.lm_head.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(sce_hf.UnsupportedModelError, match="forward hooks"):
        sce_hf.apply(stock)
    handle.remove()
    handle = patched.lm_head.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(RuntimeError, match="forward hooks"):
        patched(input_ids=ids, labels=labels)
    handle.remove()
    assert patched(input_ids=ids, labels=labels).logits is None


def test_rejects_non_linear_head():
    stock, _ = build("llama")
    stock.lm_head = torch.nn.Identity()
    with pytest.raises(TypeError, match="^softmax_ce.integrations.transformers.apply"):
        sce_hf.apply(stock)
    with pytest.raises(sce_hf.UnsupportedModelError, match="'llama'.*Identity"):
        sce_hf.apply(stock)
    assert not hasattr(stock, "_softmax_ce_original_forward")


# --------------------------------------------------------------------------------------
# Every kind of model: through tests/hf_sweep.py's tiny configs (a transform the config
# offers gets a value that matters, a mixture-of-experts model returns its router logits
# and has an aux-loss coefficient that matters)
# --------------------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_sweep  # noqa: E402


def sweep_model(model_type):
    """-> (stock model, its batch), eval mode, built as the sweep builds it."""
    cls, cfg = hf_sweep.build(model_type)
    with torch.random.fork_rng():
        torch.manual_seed(_seed("sweep", model_type))
        model = cls(cfg)
    model.eval()
    ids, labels = hf_sweep.make_batch(cfg, _seed("sweep batch", model_type))
    return model, ids, labels


def naive_loss(model, ids, labels, **kw):
    """What apply() used to compute for every model: a shifted cross-entropy of the head's
    input through the head, nothing else (so the tests below can show that each model's
    own conventions matter on these configs)."""
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, labels=labels, **kw)
    finally:
        hook.remove()
    from softmax_ce import linear_cross_entropy

    return linear_cross_entropy(seen[0], head.weight, labels, shift=True,
                                loss_dtype=torch.float32,
                                linear_bias=head.bias)


# type -> what explain() must report; each one's naive (old) loss differs from stock
SUBSET = {
    "bart": "unshifted",                                   # CrossEntropyLoss, no shift
    "whisper": "unshifted",
    "cohere": "shifted, logits scaled by 0.3",             # logits * logit_scale
    "granite": "shifted, logits scaled by 0.25",           # logits / logits_scaling (4)
    "hyperclovax": "shifted, logits scaled by 4",          # logits * logits_scaling
    "gemma4": "shifted, softcap 0.5",                      # composite: text_config's cap
    "recurrent_gemma": "shifted, softcap 0.5",             # tanh(logits / cap) * cap
    "inkling2_text": "shifted, softcap 0.5",               # a softcap module
    "mixtral": "shifted, + router aux loss",               # + coef * aux_loss
    "granitemoe": "shifted, logits scaled by 0.25, + router aux loss",
    "gemma3": "shifted",  # composite, the labels reach the base model (its masks)
}


@pytest.fixture
def torch_path(monkeypatch):
    """The PyTorch path of the fused loss: what these tests check is the integration's
    reading of each model, which both back ends compute the same (the tests above and
    `python tests/hf_sweep.py --path kernel` run the kernels); the interpreted kernels
    would cost most of this file's time budget."""
    import softmax_ce._launch as _launch

    monkeypatch.setattr(_launch, "FORCED_BACKEND", "torch")


@pytest.mark.parametrize("model_type", list(SUBSET))
def test_model_types_match_stock(model_type, torch_path):
    status, detail = hf_sweep.sweep_one(model_type)
    assert status == "match", f"{model_type}: {status}: {detail}"
    assert detail.startswith(SUBSET[model_type] + ";") or detail.startswith(
        SUBSET[model_type] + " ("), detail
    assert "also num_items_in_batch, shift_labels, " in detail and "tuple" in detail, detail
    if model_type == "gemma3":
        return
    model, ids, labels = sweep_model(model_type)
    kw = dict(use_cache=False) if "use_cache=False" in detail else {}
    with torch.no_grad():
        stock = model(input_ids=ids, labels=labels, **kw).loss
    naive = naive_loss(model, ids, labels, **kw)
    assert abs(naive.item() - stock.item()) > 1e-3 * abs(stock.item()), \
        f"{model_type}: the model's own convention does not matter on this config"


@pytest.mark.parametrize("model_type, reason", [
    ("dory", "'dory'.*DoryLMHead has a forward of its own"),    # a learnable per-token scale
    ("git", "'git'.*logits\\[:, num_image_tokens:-1"),            # image tokens before the text
    ("prophetnet", "'prophetnet'.*_compute_loss"),              # n-gram streams, own loss
    ("musicgen", "'musicgen.*ModuleList"),                      # one head per codebook
])
def test_refused_model_types(model_type, reason):
    model, ids, labels = sweep_model(model_type)
    forward = model.forward
    with pytest.raises(sce_hf.UnsupportedModelError, match=reason):
        sce_hf.apply(model)
    assert not hasattr(model, "_softmax_ce_original_forward") and model.forward == forward
    assert sce_hf.explain(model).startswith("refused: ")


def test_head_with_parameters_of_its_own_refused():
    """An nn.Linear subclass with a learnable scale passes isinstance(head, nn.Linear); its
    scale would get no gradient, so apply() refuses it."""
    class ScaledHead(torch.nn.Linear):
        def __init__(self, d, v):
            super().__init__(d, v, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return super().forward(x) * self.logit_scale

    stock, _ = build("llama")
    stock.lm_head = ScaledHead(32, V)
    with pytest.raises(sce_hf.UnsupportedModelError, match="forward of its own"):
        sce_hf.apply(stock)

    class Extra(torch.nn.Linear):
        def __init__(self, d, v):
            super().__init__(d, v, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    stock.lm_head = Extra(32, V)
    with pytest.raises(sce_hf.UnsupportedModelError, match="beyond weight and bias"):
        sce_hf.apply(stock)


def test_refused_by_configuration():
    """Refusals that depend on a config value, decided in apply() from the model's own
    condition: Bamba's z-loss over every position, Inkling's cut of a padded vocabulary."""
    model, ids, labels = sweep_model("bamba")
    sce_hf.revert(sce_hf.apply(copy.deepcopy(model)))  # z_loss_coefficient 0: accepted
    model.z_loss_coefficient = 1e-2
    with pytest.raises(sce_hf.UnsupportedModelError, match="'bamba'.*z_loss"):
        sce_hf.apply(model)

    cls, cfg = hf_sweep.build("inkling_text")
    cfg.unpadded_vocab_size = hf_sweep.V - 3
    with pytest.raises(sce_hf.UnsupportedModelError, match="'inkling_text'.*unpadded"):
        sce_hf.apply(cls(cfg))


def test_custom_loss_function_refused():
    stock, _ = build("llama")
    stock.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    with pytest.raises(sce_hf.UnsupportedModelError, match="ForCausalLMLoss"):
        sce_hf.apply(stock)


class _TinyLM(transformers.PreTrainedModel):
    """A causal LM of one's own: an embedding and a head, loss by transformers."""

    config_class = transformers.LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _LongInputsCut(_TinyLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids))
        if logits.shape[1] > 8:  # known only at call time; a clamp not reproduced
            logits = logits.clamp(-1.0, 1.0)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _InPlace(_TinyLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids))
        logits.mul_(2.0)
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _ViewMutated(_TinyLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids))
        flat = logits.view(-1, self.config.vocab_size)
        flat.clamp_(-1.0, 1.0)  # through a view: the logits change too
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def _halve_(t):
    t.mul_(0.5)


class _HelperMutates(_TinyLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids))
        _halve_(logits)
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _OwnTransform(_TinyLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = torch.nn.functional.gelu(self.lm_head(self.embed(input_ids)))
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


class _ScaledThenCapped(_TinyLM):
    """A scale, a softcap and a scale after it: folds into scale-then-softcap."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.embed(input_ids)) * 3.0
        if self.config.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.config.final_logit_softcapping)
            logits = logits * self.config.final_logit_softcapping * 0.5
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def _tiny(cls, **cfg):
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, **cfg)
    with torch.random.fork_rng():
        torch.manual_seed(_seed("tiny", cls.__name__))
        model = cls(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits of order 1
    return model


def test_own_model_check():
    """check(model) on a model of one's own, and what apply() reads from its forward."""
    report = sce_hf.check(_tiny(_TinyLM))
    assert report["plan"] == "shifted" and report["max_grad_rel_err"] < 1e-4
    model = _tiny(_ScaledThenCapped, final_logit_softcapping=2.0)
    # 0.5 c tanh(3 z / c) = c' tanh(s z / c') with c' = c / 2 = 1, s = 3 / 2
    assert sce_hf.explain(model) == "shifted, logits scaled by 1.5, softcap 1"
    sce_hf.check(model)
    model.config.final_logit_softcapping = None
    sce_hf.check(model)
    assert sce_hf.explain(model) == "shifted, logits scaled by 3"


@pytest.mark.parametrize("cls, reason", [
    (_InPlace, r"'llama'.*logits\.mul_\(2\.0\)"),
    (_ViewMutated, r"'llama'.*flat\.clamp_"),
    (_HelperMutates, r"'llama'.*_halve_\(logits\)"),
    (_OwnTransform, r"'llama'.*gelu"),
])
def test_own_model_refused(cls, reason):
    with pytest.raises(sce_hf.UnsupportedModelError, match=reason):
        sce_hf.apply(_tiny(cls))


def test_condition_known_at_call_time():
    """A condition on the sequence length can only be decided when the model runs: the
    call on which the forward would do what apply() does not reproduce raises (never a
    silent difference); shorter inputs match, and the head is restored after the error."""
    model = _tiny(_LongInputsCut)
    patched = sce_hf.apply(copy.deepcopy(model))
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids, labels=ids).loss,
                                   model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=0)
    ids = torch.randint(0, V, (2, 9))
    with pytest.raises(RuntimeError, match="'llama'.*cannot be reproduced.*clamp"):
        patched(input_ids=ids, labels=ids)
    assert "forward" not in vars(patched.get_output_embeddings())
    assert "_loss_function" not in vars(patched)


def test_config_changes_after_apply_are_followed():
    """The scale and the cap are the model's expressions, evaluated at every call."""
    stock, patched = build("gemma2")
    ids, mask, labels = batch("config change")
    for cap in (None, 1.5):
        stock.config.final_logit_softcapping = cap
        patched.config.final_logit_softcapping = cap
        l1 = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
        l2 = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)
    model, ids, labels = sweep_model("cohere")
    patched = sce_hf.apply(copy.deepcopy(model))
    model.logit_scale = patched.logit_scale = 2.0
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids, labels=labels).loss,
                                   model(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=0)


def test_moe_aux_loss_gradient():
    """The router gets its load-balancing gradient: without the aux term in the patched
    loss its gradient would differ (checked by the sweep's comparison), and the term is
    there only when the model returns router logits."""
    model, ids, labels = sweep_model("mixtral")
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.25
    patched = sce_hf.apply(copy.deepcopy(model))
    with torch.no_grad():
        on = patched(input_ids=ids, labels=labels)
        off = patched(input_ids=ids, labels=labels, output_router_logits=False)
        stock_off = model(input_ids=ids, labels=labels, output_router_logits=False)
    assert on.aux_loss is not None and off.aux_loss is None
    torch.testing.assert_close(on.loss - off.loss, 0.25 * on.aux_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(off.loss, stock_off.loss, rtol=1e-5, atol=0)


def _bf16_reference(model, ids, labels):
    """The stock convention without the bf16 logits: the head's bf16 input and weight,
    their product and the loss in fp32."""
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, labels=labels)
    finally:
        hook.remove()
    logits = seen[0].float() @ head.weight.float().T
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1))


def test_bf16_weights_loss_in_fp32(lce_path):
    """A bf16 model: the loss comes back in fp32, unrounded (stock upcasts its logits),
    still without (N, V) logits."""
    stock, _ = build("llama")
    stock = stock.to(torch.bfloat16)
    patched = sce_hf.apply(copy.deepcopy(stock))
    ids, mask, labels = batch("bf16")
    with torch.no_grad():
        l1 = stock(input_ids=ids, labels=labels).loss
        l2 = patched(input_ids=ids, labels=labels).loss
    assert l1.dtype == l2.dtype == torch.float32
    ref = _bf16_reference(stock, ids, labels)
    # against fp32 logits of the same bf16 operands: fp32 accumulation noise only (a loss
    # rounded to bf16 would be up to 2e-3 off); against stock: its logits' bf16 rounding
    torch.testing.assert_close(l2, ref, rtol=2e-5, atol=0)
    torch.testing.assert_close(l2, l1, rtol=5e-3, atol=0)
    l2.requires_grad_(False)
    # the gradients: bf16, like the parameters, and close to stock's
    stock.zero_grad()
    stock(input_ids=ids, labels=labels).loss.backward()
    out = patched(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    for (name, p1), (_, p2) in zip(stock.named_parameters(), patched.named_parameters()):
        assert p2.grad.dtype == torch.bfloat16, name
        err = (p1.grad.float() - p2.grad.float()).abs().max().item()
        assert err <= 5e-2 * p1.grad.float().abs().max().item() + 1e-6, name


def test_bf16_autocast(lce_path):
    """An fp32 model under bf16 autocast: the head runs in bf16, the loss in fp32."""
    stock, patched = build("gemma2")
    ids, mask, labels = batch("autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l1 = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
        l2 = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert l1.dtype == l2.dtype == torch.float32
    torch.testing.assert_close(l2, l1, rtol=5e-3, atol=0)
    l1.backward()
    l2.backward()
    for (name, p1), (_, p2) in zip(stock.named_parameters(), patched.named_parameters()):
        assert p2.grad.dtype == torch.float32, name
        err = (p1.grad - p2.grad).abs().max().item()
        assert err <= 5e-2 * p1.grad.abs().max().item() + 1e-6, name


def test_return_dict_false_keeps_positions():
    """MoE output (loss, aux_loss, logits, cache, router_logits): None where the logits
    were, everything else where stock puts it."""
    model, ids, labels = sweep_model("mixtral")
    patched = sce_hf.apply(copy.deepcopy(model))
    with torch.no_grad():
        t1 = model(input_ids=ids, labels=labels, return_dict=False)
        t2 = patched(input_ids=ids, labels=labels, return_dict=False)
    assert len(t1) == len(t2) == 5
    assert t2[2] is None and t1[2] is not None and t1[2].shape[-1] == hf_sweep.V
    torch.testing.assert_close(t2[0], t1[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(t2[1], t1[1], rtol=1e-5, atol=0)  # aux_loss
    assert type(t2[3]) is type(t1[3])


def test_check_helper():
    stock, _ = build("qwen2")
    report = sce_hf.check(stock)
    assert report["max_grad_rel_err"] < 1e-4 and report["plan"] == "shifted"
    assert abs(report["loss_patched"] - report["loss_stock"]) <= 1e-5 * report["loss_stock"]
    assert not hasattr(stock, "_softmax_ce_original_forward")  # checked on copies
    model, _, _ = sweep_model("dory")
    with pytest.raises(sce_hf.UnsupportedModelError):
        sce_hf.check(model)


def test_explain():
    assert sce_hf.explain(sweep_model("cohere")[0]) == "shifted, logits scaled by 0.3"
    assert sce_hf.explain(sweep_model("bart")[0]) == "unshifted"
