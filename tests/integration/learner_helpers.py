"""Tiny random Llamas and TrainBatches for the learner and weight-push tests."""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM, Qwen2Config

from protocol.batch import TrainBatch
from protocol.topk import topk_from_logprobs
from trainer.config import LossConfig
from trainer.losses import distillation_loss

VOCAB = 64


def tiny_llama(seed: int, vocab: int = VOCAB, hidden: int = 32, heads: int = 2, layers: int = 2,
               tied: bool = False, max_positions: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        initializer_range=0.2,  # peaked distributions: losses far from 0, greedy argmax without near-ties
    )
    return LlamaForCausalLM(config).eval()


def tiny_causal_lm(arch: str, seed: int, vocab: int, hidden: int, heads: int, layers: int, tied: bool,
                   max_positions: int):
    """A tiny random model of another architecture than Llama: Qwen2 (biased q/k/v projections)
    or GPT-2 (``transformer.h``, learned positions, Conv1D weights, always tied)."""
    if arch == "llama":
        return tiny_llama(seed, vocab, hidden, heads, layers, tied, max_positions)
    torch.manual_seed(seed)
    special = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0, initializer_range=0.2)
    if arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=tied, **special)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_head=heads, n_layer=layers, n_positions=max_positions,
                            tie_word_embeddings=True, **special)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(config).eval()


def make_batch(teacher, seed: int, prompt_lengths, response_lengths, k: int = 8) -> TrainBatch:
    """Random prompt + response tokens, the teacher's top-k at every response position."""
    rng = np.random.default_rng(seed)
    prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
    response_lengths = np.asarray(response_lengths, dtype=np.int64)
    total = prompt_lengths + response_lengths
    rows, width, resp = len(total), int(total.max()), int(response_lengths.max())
    vocab = teacher.config.vocab_size
    tokens = np.where(np.arange(width)[None] < total[:, None], rng.integers(1, vocab, (rows, width)), 0)
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(torch.tensor(tokens)).logits, -1).numpy()
    predicting = np.minimum(prompt_lengths[:, None] - 1 + np.arange(resp)[None], width - 2)
    targets = np.take_along_axis(tokens, predicting + 1, axis=1)
    topk = topk_from_logprobs(np.take_along_axis(logprobs, predicting[..., None], axis=1), targets, k)
    topk.mask[...] = np.arange(resp)[None] < response_lengths[:, None]
    topk.logprobs[~topk.mask] = -np.inf
    # Who wrote each token: the student (0) at even positions, the teacher (1) at odd ones
    # (sampled_reverse_kl reads it).
    writer = (np.arange(resp)[None] % 2).astype(np.int8).repeat(rows, 0)
    return TrainBatch(tokens=tokens.astype(np.int64), prompt_lengths=prompt_lengths,
                      response_lengths=response_lengths, teacher=topk, writer=writer)


def reference_loss(model, batch: TrainBatch, loss: LossConfig) -> float:
    """distillation_loss on logits from a plain forward of each row alone (no padding, no mask)."""
    rows, resp = batch.teacher.mask.shape
    logits = torch.zeros(rows, resp, model.config.vocab_size)
    targets = torch.zeros(rows, resp, dtype=torch.long)
    for b in range(rows):  # a reference, so one row at a time on purpose
        p, r = int(batch.prompt_lengths[b]), int(batch.response_lengths[b])
        seq = torch.tensor(batch.tokens[b, : p + r])[None]
        with torch.no_grad():
            logits[b, :r] = model(seq).logits[0, p - 1: p + r - 1]
        targets[b, :r] = seq[0, p:]
    t = batch.teacher
    return float(distillation_loss(logits, torch.tensor(t.ids), torch.tensor(t.logprobs), torch.tensor(t.mask),
                                   loss, targets, torch.tensor(t.token_logprob), torch.tensor(batch.writer == 0)))


def model_with(state: dict, like_dir) -> LlamaForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(like_dir, dtype=torch.float32).eval()
    model.load_state_dict(state)
    return model
