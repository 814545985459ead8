"""Sweep softmax_ce.integrations.transformers.apply over every causal-LM model type of the
installed transformers: a tiny random model of each type (fp32, eval mode, labels with
-100s), the stock loss and parameter gradients against the patched ones.

    python tests/hf_sweep.py                    # all types, the PyTorch path of the loss
    python tests/hf_sweep.py --path kernel      # the Triton kernels (interpreted on CPU)
    python tests/hf_sweep.py llama cohere bart  # some types

Each type ends as one of
    match            loss within rtol 1e-5, every parameter gradient within 1e-4 of its
                     largest stock entry (and the same set of parameters has gradients)
    refused          apply() raised UnsupportedModelError (the reason is printed)
    could-not-build  no tiny model of this type could be built and run stock (special
                     inputs, sizes the generic shrinking gets wrong, ...): untested
    FAIL             anything else: a different loss or gradient, an error from the
                     patched model - a defect of the integration
and the counts are printed at the end; the exit status is 1 when any type FAILs.

Configs: the type's config class from CONFIG_MAPPING with its sizes shrunk by name
(hidden size, layers, heads, vocabulary, intermediate sizes, experts, LoRA ranks),
sub-configs (text_config, ...) likewise; then every post-head transform the config
offers is given a value that matters (logit scales, logits_scaling, softcaps) and a
mixture-of-experts model returns its router logits, with an aux-loss coefficient that
matters.  Nothing is downloaded.
"""

import argparse
import copy
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
import warnings
import zlib

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

V = 99          # vocabulary of the tiny models
B, T = 2, 9
TIMEOUT_S = 120
MEMORY_LIMIT = 8 << 30  # address space of the child process

_SIZES = {
    "vocab_size": V,
    # widths
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "emb_dim": 32,
    "embed_dim": 32, "word_embed_proj_dim": 32, "embedding_size": 32, "hidden_dim": 32,
    "projection_dim": 32, "hidden_size_global": 32,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "d_ff": 64, "ff_dim": 64,
    "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "ffn_hidden_size": 64,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 16, "mlp_hidden_size": 64,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "decoder_layers": 2, "encoder_layers": 2, "num_decoder_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "decoder_attention_heads": 4, "encoder_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "kv_channels": 8, "attention_head_size": 8,
    # experts
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "num_selected_experts": 2, "ffn_config": None,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    # multi-head latent attention
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # misc
    "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64,
    "num_nextn_predict_layers": 0, "rotary_dim": 4, "moe_k": 2, "num_experts_per_token": 2,
    # state-space layers: heads x head dim = expand x hidden
    "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_expand": 1, "expand": 1,
    "mamba_n_groups": 1, "n_groups": 1, "ssm_state_size": 16, "state_size": 16,
    "mamba_d_state": 16, "mamba_headdim": 8,
    # multimodal adapters: from the encoder's width to the text model's
    "adapter_in_dim": 32, "adapter_out_dim": 32, "adapter_input_size": 32,
}
# sizes a config may leave None for the model to derive, where that fails tiny
_FILL = {"head_dim": 8, "num_experts_per_tok": 2, "num_key_value_heads": 4,
         "n_routed_experts": 4, "n_shared_experts": 1}
# what the generic shrinking cannot guess (deep-merged into the overrides)
_EXTRA = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0,
                                         "vocab_size_per_layer_input": 0}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default",
                                                                   "rope_theta": 10000.0}}},
    "reformer": {"axial_pos_shape": [4, 4], "axial_pos_embds_dim": [16, 16],
                 "lsh_attn_chunk_length": 4, "local_attn_chunk_length": 4,
                 "attn_layers": ["local", "lsh"], "hidden_size": 32,
                 "attention_head_size": 8, "num_attention_heads": 4, "feed_forward_size": 64},
}

# values that make a post-head transform matter (with initializer_range 0.3 the random
# logits are of order 1: a softcap of 0.5 bends them, a scale of 4 changes the softmax)
_TRANSFORMS = {
    "logit_scale": 0.3, "logits_scaling": 4.0, "final_logit_softcapping": 0.5,
    "logits_soft_cap": 0.5, "output_logit_soft_cap": 0.5, "lm_head_multiplier": 2.5,
    "logits_mup_width_multiplier": 2.0,
}
_AUX = {"router_aux_loss_coef": 0.25, "aux_loss_coef": 0.25}


def _shrink(cfg_cls, defaults, depth=0, keep_layers=False):
    """Overrides for cfg_cls(**overrides): sizes shrunk by name, sub-configs recursed."""
    over = {}
    sub = getattr(cfg_cls, "sub_configs", {}) or {}
    n_layers = None
    for key, value in defaults.items():
        if key in sub and isinstance(value, dict):
            sub_cls = sub[key]
            try:
                from transformers import CONFIG_MAPPING

                if "model_type" in value and value["model_type"] in CONFIG_MAPPING:
                    sub_cls = CONFIG_MAPPING[value["model_type"]]
            except Exception:
                pass
            inner = _shrink(sub_cls, value, depth + 1, keep_layers)
            over[key] = {**value, **inner}
            continue
        if keep_layers and key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers",
                                   "decoder_layers", "encoder_layers"):
            continue
        target = _SIZES.get(key, V if "vocab_size" in key else
                            8 if key.endswith("per_layer_input") else None)
        if target is not None and isinstance(value, int) and not isinstance(value, bool):
            if target is not None and value > target and not (key in ("expand", "mamba_expand")
                                                              and "mamba_n_heads" not in defaults
                                                              and "num_heads" not in defaults):
                over[key] = target
                if key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                    n_layers = (value, target)
    for key, value in _FILL.items():
        if key in defaults and defaults[key] is None:
            over[key] = value
    if "num_key_value_heads" in over and defaults.get("num_key_value_heads") == \
            defaults.get("num_attention_heads"):
        over["num_key_value_heads"] = over.get("num_attention_heads",
                                               defaults.get("num_attention_heads"))
    if n_layers:
        old, new = n_layers
        for key, value in defaults.items():
            if isinstance(value, list) and len(value) == old and key not in over:
                over[key] = value[:new]
            elif (isinstance(value, dict) and value and key not in over
                  and all(str(k).isdigit() for k in value)):
                over[key] = {k: v for k, v in value.items() if int(k) < new}
    for key, value in defaults.items():
        if key in _TRANSFORMS and isinstance(value, (int, float)) and not isinstance(value, bool):
            over[key] = _TRANSFORMS[key]
        elif key in _TRANSFORMS and value is None:  # off by default: switch it on
            over[key] = _TRANSFORMS[key]
        if key in _AUX and isinstance(value, (int, float)):
            over[key] = _AUX[key]
        if key == "output_router_logits":
            over[key] = True
        if key == "initializer_range" and isinstance(value, float):
            over[key] = 0.3  # logits of order 1, so that scales and softcaps matter
        if key == "is_decoder":
            over[key] = True  # a causal LM of an encoder family (BERT, RoBERTa, ...)
        if key.endswith("dropout") or key.endswith("_pdrop") or key.endswith("dropout_prob") \
                or key.endswith("dropout_rate"):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                over[key] = 0.0
        if (key.endswith("token_id") or key.endswith("token_index")) and isinstance(value, int) \
                and value >= V:
            over[key] = 0 if "pad" in key else V - 1
    return over


def special_ids(cfg):
    out = set()
    for c in [cfg] + [getattr(cfg, k, None) for k in (getattr(cfg, "sub_configs", {}) or {})]:
        if c is None:
            continue
        for k, v in c.to_dict().items():
            if k.endswith("token_id") or k.endswith("token_index") or k.endswith("_token_ids"):
                for x in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(x, int):
                        out.add(x)
    return out


def _merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(model_type, keep_layers=False, sub_direct=False):
    """-> (model class, config) for a tiny model of model_type."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    cfg_cls = CONFIG_MAPPING[model_type]
    try:
        defaults = cfg_cls().to_dict()
    except Exception:  # a default that fails its own validation (Gemma 4's assistant)
        defaults = cfg_cls(**_EXTRA.get(model_type, {})).to_dict()
    over = _merge(_shrink(cfg_cls, defaults, keep_layers=keep_layers),
                  _EXTRA.get(model_type, {}))
    cfg = cfg_cls(**over)
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(cfg, want):
        # the causal LM of a composite type takes one of its sub-configs (Llama 4's text)
        subs = [getattr(cfg, k, None) for k in (getattr(cfg, "sub_configs", {}) or {})]
        subs = [c for c in subs if isinstance(c, want)]
        if subs and not sub_direct:
            cfg = subs[0]
        else:  # that sub-config class on its own
            over = _merge(_shrink(want, want().to_dict(), keep_layers=keep_layers),
                          _EXTRA.get(model_type, {}))
            cfg = want(**over)
    for c in [cfg] + [getattr(cfg, k, None) for k in (getattr(cfg, "sub_configs", {}) or {})]:
        if c is not None and hasattr(c, "_attn_implementation"):
            try:
                c._attn_implementation = "eager"
            except Exception:
                pass
    return cls, cfg


def make_batch(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = min(V, getattr(text, "vocab_size", V) or V)
    banned = special_ids(cfg)
    allowed = torch.tensor([i for i in range(1, vocab) if i not in banned])
    ids = allowed[torch.randint(0, len(allowed), (B, T), generator=g)]
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def _loss_of(out):
    return out["loss"] if isinstance(out, dict) else out[0]


def run_model(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        out = model(input_ids=ids, labels=labels, **kw)
    loss = _loss_of(out)
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in model.named_parameters()}
    return out, loss.detach(), grads


def compare(stock_loss, patched_loss, g1, g2, rtol=1e-5, grad_rtol=1e-4, floor=1e-3):
    """-> None when they match, else a description of the difference.

    Each parameter's gradient must agree to grad_rtol of its own largest stock entry, or
    of `floor` times the largest stock gradient entry of the whole model if that is more
    (then to 1e-7 of the model's largest gradient): a gradient that is zero in exact
    arithmetic (an attention key's bias: softmax is invariant to it) is fp32 rounding
    noise in both, of ~1e-8 of the largest gradient here, and two noises do not agree to
    1e-4 of each other."""
    if patched_loss.dtype != torch.float32:
        return f"patched loss dtype {patched_loss.dtype}"
    if not torch.allclose(patched_loss.float(), stock_loss.float(), rtol=rtol, atol=0):
        return f"loss stock {stock_loss.item():.8g} patched {patched_loss.item():.8g}"
    n = 0
    top = max((g.abs().max().item() for g in g1.values() if g is not None), default=0.0)
    for name in g1:
        a, b = g1[name], g2.get(name)
        if (a is None) != (b is None):
            return f"{name}: gradient in only one of stock and patched"
        if a is None:
            continue
        n += 1
        scale = max(a.abs().max().item(), floor * top)
        err = (a.float() - b.float()).abs().max().item()
        if err > grad_rtol * scale or (scale == 0 and err > 0):
            return f"{name}: max |grad diff| {err:.3g} > {grad_rtol:g} x {scale:.3g}"
    if n == 0:
        return "no parameter has a gradient"
    return None


_DEBUG = False


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _refusal(sce_hf, e):
    return getattr(e, "reason", str(e))


DTYPE = torch.float32
# bf16: stock and patched differ by bf16 roundings (stock rounds its logits to bf16, and
# a plain CrossEntropyLoss of bf16 logits runs in bf16), so each is compared with the
# same bf16 weights run in fp32: the patched loss and gradients must be no further from
# it than BF16_SLACK times the stock ones (plus BF16_FLOOR, relative)
BF16_SLACK, BF16_FLOOR = 2.0, 1e-3


def _errors(ref_loss, ref_grads, loss, grads):
    """Relative loss error and worst relative gradient error against a reference (each
    gradient relative to max(its largest entry, 1e-3 of the model's largest))."""
    top = max((g.abs().max().item() for g in ref_grads.values() if g is not None), default=0)
    worst = 0.0
    for name, r in ref_grads.items():
        if r is None or grads.get(name) is None:
            continue
        scale = max(r.abs().max().item(), 1e-3 * top)
        if scale > 0:
            worst = max(worst, (grads[name].float() - r.float()).abs().max().item() / scale)
    return abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), worst


def compare_bf16(truth, stock, patched):
    """-> (None or a description of the failure, summary)."""
    (lt, gt), (l1, g1), (l2, g2) = truth, stock, patched
    if l2.dtype != torch.float32:
        return f"patched loss dtype {l2.dtype}", ""
    e1, ge1 = _errors(lt, gt, l1, g1)
    e2, ge2 = _errors(lt, gt, l2, g2)
    summary = (f"bf16 vs fp32 of the same weights: loss err stock {e1:.1e} patched {e2:.1e}, "
               f"grad err stock {ge1:.1e} patched {ge2:.1e}")
    if e2 > BF16_SLACK * e1 + BF16_FLOOR or ge2 > BF16_SLACK * ge1 + BF16_FLOOR:
        return summary, summary
    return None, summary


def sweep_one(model_type):
    """-> (status, detail)."""
    import softmax_ce.integrations.transformers as sce_hf

    seed = zlib.crc32(model_type.encode())
    built = None
    errors = []
    attempts = [dict(keep_layers=False), dict(keep_layers=False, use_cache=False),
                dict(keep_layers=True), dict(keep_layers=True, use_cache=False),
                dict(keep_layers=False, sub_direct=True),
                dict(keep_layers=False, sub_direct=True, use_cache=False)]
    for attempt in attempts:
        kw = {k: v for k, v in attempt.items() if k not in ("keep_layers", "sub_direct")}
        stage = "config"
        try:
            cls, cfg = build(model_type, keep_layers=attempt["keep_layers"],
                             sub_direct=attempt.get("sub_direct", False))
            stage = "model"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                stock = cls(cfg)
            stock.eval()
            stock.to(DTYPE)
            _prepare(stock)
            # apply() decides from the model alone: a refusal needs no stock run
            try:
                sce_hf.apply(copy.deepcopy(stock) if _copyable(stock) else stock)
            except sce_hf.UnsupportedModelError as e:
                return "refused", _refusal(sce_hf, e)
            finally:
                sce_hf.revert(stock)
            stage = "stock run"
            ids, labels = make_batch(cfg, seed)
            out1, l1, g1 = run_model(stock, ids, labels, **kw)
            if not torch.isfinite(l1):
                raise ValueError(f"stock loss {l1.item()}")
            built = (cls, cfg, stock, ids, labels, out1, l1, g1, kw)
            break
        except _Timeout:
            raise
        except Exception as e:
            if _DEBUG:
                traceback.print_exc()
            msg = str(e).strip().splitlines()
            errors.append(f"{stage}: {type(e).__name__}: {msg[-1][:150] if msg else ''}")
    if built is None:
        return "could-not-build", errors[0]
    cls, cfg, stock, ids, labels, out1, l1, g1, kw = built
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            patched = cls(cfg)  # not a deepcopy: weight-normed modules refuse one
        patched.to(DTYPE)
        patched.load_state_dict(stock.state_dict())
        patched.eval()
        _prepare(patched)
        sce_hf.apply(patched)
    except sce_hf.UnsupportedModelError as e:
        return "FAIL", "refused only the second time: " + _refusal(sce_hf, e)
    except Exception:
        return "FAIL", "apply() raised: " + traceback.format_exc().strip().splitlines()[-1]
    plan = sce_hf.explain(patched)
    try:
        out2, l2, g2 = run_model(patched, ids, labels, **kw)
    except Exception:
        return "FAIL", f"[{plan}] patched call raised: " + \
            traceback.format_exc().strip().splitlines()[-1][:200]
    if DTYPE == torch.bfloat16:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            truth = cls(cfg)
        truth.load_state_dict({k: v.float() for k, v in stock.state_dict().items()})
        truth.eval()
        _prepare(truth)
        _, lt, gt = run_model(truth, ids, labels, **kw)
        diff, summary = compare_bf16((lt, gt), (l1, g1), (l2, g2))
        if diff:
            return "FAIL", f"[{plan}] {diff}"
        return "match", f"{plan}; {summary}"
    diff = compare(l1, l2, g1, g2)
    if diff:
        return "FAIL", f"[{plan}] {diff}"
    if getattr(out2, "logits", None) is not None:
        return "FAIL", f"[{plan}] the patched output carries logits"
    extra = extra_checks(stock, patched, ids, labels, kw)
    if extra.startswith("FAIL"):
        return "FAIL", f"[{plan}] {extra}"
    return "match", plan + (f" ({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else "") \
        + f"; {extra}"


def tuple_layout(t):
    return [None if x is None else type(x).__name__ for x in t]


def extra_checks(stock, patched, ids, labels, kw):
    """The trainer's num_items_in_batch, shift_labels, and return_dict=False: each
    compared where the stock model takes it.  -> "FAIL ..." or a summary."""
    done = []
    n_items = torch.tensor(3 * int((labels[:, 1:] != -100).sum()))
    shift = torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], dim=1)
    shift[0, -3] = -100
    cases = [("num_items_in_batch", dict(num_items_in_batch=n_items)),
             ("shift_labels", dict(shift_labels=shift))]
    if getattr(stock.config, "output_router_logits", None):
        cases.append(("no router logits", dict(output_router_logits=False)))
    for name, extra in cases:
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                ref = _loss_of(stock(input_ids=ids, labels=labels, **kw, **extra))
        except Exception:
            continue  # the stock model does not take it
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                got = _loss_of(patched(input_ids=ids, labels=labels, **kw, **extra))
        except Exception as e:
            return f"FAIL {name}: patched raised {type(e).__name__}: {e}"
        if not torch.allclose(got.float(), ref.float(), rtol=1e-5, atol=0):
            return f"FAIL {name}: stock {ref.item():.8g} patched {got.item():.8g}"
        done.append(name)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            t1 = stock(input_ids=ids, labels=labels, return_dict=False, **kw)
    except Exception:
        t1 = None
    if t1 is not None:
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                t2 = patched(input_ids=ids, labels=labels, return_dict=False, **kw)
        except Exception as e:
            return f"FAIL return_dict=False: patched raised {type(e).__name__}: {e}"
        if not isinstance(t1, tuple) or not isinstance(t2, tuple):
            return f"FAIL return_dict=False: {type(t1).__name__} / {type(t2).__name__}"
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            keys = list(stock(input_ids=ids, labels=labels, **kw).keys())
        want = tuple_layout(t1)
        if "logits" in keys and len(keys) == len(want):
            want[keys.index("logits")] = None  # where the logits were
        if tuple_layout(t2) != want:
            return f"FAIL return_dict=False: stock {tuple_layout(t1)} patched {tuple_layout(t2)}"
        if not torch.allclose(t2[0].float(), t1[0].float(), rtol=1e-5, atol=0):
            return f"FAIL return_dict=False: loss {t1[0].item():.8g} / {t2[0].item():.8g}"
        done.append("tuple")
    return "also " + ", ".join(done) if done else "no extra checks"


def _copyable(model):
    try:
        copy.deepcopy(model)
        return True
    except Exception:
        return False


def _prepare(model):
    """What a model needs before its first call (X-MOD: a default language)."""
    if hasattr(model, "set_default_language"):
        langs = getattr(model.config, "languages", None) or []
        if langs:
            model.set_default_language(langs[0])


def main(argv=None):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("types", nargs="*", help="model types (default: all)")
    p.add_argument("--path", choices=("torch", "kernel"), default="torch",
                   help="the loss through softmax_ce's PyTorch path or its Triton kernels")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the models in bf16; stock and patched are each compared with "
                        "the same weights in fp32, and the patched one must be no further "
                        f"from it than {BF16_SLACK:g} x stock's + {BF16_FLOOR:g}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="in-process, with tracebacks")
    args = p.parse_args(argv)
    types = args.types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    global DTYPE
    DTYPE = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.child:
        return _child(types)
    if args.debug:
        global _DEBUG
        _DEBUG = True
        return _child(types)
    counts = {}
    t0 = time.time()
    backend = "?"
    todo = list(types)
    while todo:
        # the types run in a child process with bounded memory, so that a model whose
        # tiny config is still huge (or that crashes) costs one line, not the sweep
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--path", args.path,
               "--dtype", args.dtype, *todo]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        done = set()
        for line in proc.stdout:
            if not line.startswith("@@ "):
                continue
            t, status, detail = line[3:].rstrip("\n").split("\t", 2)
            if t == "#backend":
                backend = status
                continue
            done.add(t)
            counts[status] = counts.get(status, 0) + 1
            print(f"{t:28s} {status:16s} {detail}", flush=True)
        proc.wait()
        todo = [t for t in todo if t not in done]
        if todo:  # the child died on todo[0]
            t = todo.pop(0)
            counts["could-not-build"] = counts.get("could-not-build", 0) + 1
            print(f"{t:28s} {'could-not-build':16s} the process died (exit {proc.returncode}, "
                  f"out of memory?)", flush=True)
    print()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {args.dtype}, "
          f"loss path {args.path} (softmax_ce back end for CPU tensors: {backend}): {len(types)} "
          f"causal-LM types in {time.time() - t0:.0f} s")
    for k in ("match", "refused", "could-not-build", "FAIL"):
        print(f"  {k:16s} {counts.get(k, 0)}")
    return 1 if counts.get("FAIL") else 0


def _child(types):
    import transformers

    if not _DEBUG:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGALRM, _alarm)
    try:
        import softmax_ce._launch as _launch

        print(f"@@ #backend\t{_launch.backend_for(torch.empty(1))}\t", flush=True)
    except Exception as e:  # pragma: no cover - the dispatcher's name is not our API
        print(f"@@ #backend\tunknown ({type(e).__name__})\t", flush=True)
    for t in types:
        signal.alarm(TIMEOUT_S)
        try:
            status, detail = sweep_one(t)
        except _Timeout:
            status, detail = "could-not-build", f"timed out after {TIMEOUT_S} s"
        except MemoryError:
            status, detail = "could-not-build", "out of memory"
        except Exception as e:  # a bug in the sweep itself
            status, detail = "FAIL", f"sweep error {type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        detail = " ".join(str(detail).split())
        print(f"@@ {t}\t{status}\t{detail}", flush=True)
    return 0


if __name__ == "__main__":
    if "--path" in sys.argv and sys.argv[sys.argv.index("--path") + 1] == "kernel":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ["TRITON_INTERPRET"] = "0"
    sys.exit(main())
