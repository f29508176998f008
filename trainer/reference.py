"""Plain transformers computations: exact full-vocabulary log-probabilities (the ground truth
that the vLLM services and the top-k divergence estimates are checked against, in tests and
benchmarks) and greedy decoding (the embedded build's report, the attribution workers)."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def response_logprobs(model_dir, sequences: list[list[int]], starts: list[int], batch_size: int = 16) -> list[np.ndarray]:
    """For each sequence, [len - start, V] log-probabilities of positions ``start..len-1`` (the
    distribution each of those tokens was drawn from). Right-padded batches, one forward each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first : first + batch_size]
        lengths = torch.tensor([len(s) for s in chunk])
        ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        ids[mask] = torch.tensor([t for s in chunk for t in s])
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask.long()).logits.float(), -1)
        for i, seq in enumerate(chunk):
            start = starts[first + i]
            out.append(logp[i, start - 1 : len(seq) - 1].numpy())  # logits at j-1 predict token j
    return out


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=64):
    """Greedy responses (decoded, special tokens dropped) for a list of prompt id lists.

    Prompts are sorted by length and left-padded per batch; generation stops at EOS.
    """
    model.eval()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in batch])[:, None]).long()
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos_id, pad_token_id=pad_id)
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(order[start:start + batch_size], texts):
            outputs[i] = text
    return outputs
