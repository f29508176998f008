"""Exact full-vocabulary log-probabilities with transformers: the ground truth that the vLLM
services and the top-k divergence estimates are checked against (tests, benchmarks)."""
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
