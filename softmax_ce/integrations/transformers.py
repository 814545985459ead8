"""One-line swap of a Hugging Face `transformers` causal LM's loss for the fused linear
cross-entropy, so training never materialises the (batch, time, vocab) logits.

    import softmax_ce.integrations.transformers as sce_hf
    model = AutoModelForCausalLM.from_config(config)
    sce_hf.apply(model)
    out = model(input_ids, labels=labels)      # out.loss as before, out.logits is None

How: the model's own forward runs unchanged (so every family's attention, masks,
caches and options keep working) except that its output head is asked only to hand
back the final hidden states, which costs nothing.  The loss is then
`linear_cross_entropy(hidden, head.weight, labels, head.bias, shift=True)` with the
model's final-logit softcap (Gemma 2) and transformers' own conventions: ignore
index -100, mean over the non-ignored tokens, or a sum divided by
`num_items_in_batch` when the trainer passes it, `shift_labels` when given, fp32 loss.
Calls without labels (generation, evaluation of logits) run the stock forward.

Checked with the Llama, Qwen2, Gemma 2 and GPT-2 families; any causal LM whose forward
calls `self.get_output_embeddings()(hidden_states)` and then its loss works the same way.
"""

import functools

import torch

from ..linear import linear_cross_entropy

_ORIGINAL = "_softmax_ce_original_forward"
IGNORE_INDEX = -100


def apply(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model(..., labels=...)` compute its loss with softmax_ce's fused linear
    cross-entropy, never materialising the logits.  Idempotent; returns the model."""
    if hasattr(model, _ORIGINAL):
        return model
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"softmax_ce.integrations.transformers.apply: the model's output "
                        f"embeddings must be an nn.Linear, got {type(head).__name__}")
    original = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)

    @functools.wraps(original)
    def forward(*args, labels=None, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        return_tuple = kwargs.pop("return_dict", None) is False

        captured = []

        def hand_back_hidden_states(hidden_states):
            captured.append(hidden_states)
            return hidden_states  # the stock forward's "logits": never used below

        head.forward = hand_back_hidden_states
        try:
            out = original(*args, return_dict=True, **kwargs)
        finally:
            del head.forward  # back to nn.Linear.forward
        (hidden,) = captured

        if shift_labels is not None:
            target, shift = shift_labels, False
        else:
            target, shift = labels, True
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = linear_cross_entropy(hidden, head.weight, target.to(hidden.device), head.bias,
                                    ignore_index=IGNORE_INDEX, reduction=reduction,
                                    softcap=softcap, shift=shift).float()
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        # rebuilt rather than assigned: a ModelOutput orders its fields by declaration and
        # drops None ones only when built, so loss comes first and logits vanish, as stock
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        out = type(out)(loss=loss, **fields)
        return out.to_tuple() if return_tuple else out

    setattr(model, _ORIGINAL, original)
    model.forward = forward
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply`."""
    if hasattr(model, _ORIGINAL):
        del model.forward
        delattr(model, _ORIGINAL)
    return model
