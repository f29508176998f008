"""Tiny Llama models for the embedded default: config, SFT loop, batched greedy generation.

Plain `LlamaForCausalLM`, so vLLM and transformers load the saved directories like any
other model. head_dim = hidden / heads = 64, which vLLM's CPU attention supports.
"""

import math
import random
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from trainer.embedded.tokenizer import prompt_ids, response_ids

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    max_positions: int = 512


@dataclass(frozen=True)
class SFTSettings:
    steps: int
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 50
    length_group: int = 4  # batches sorted by length together; 1 = plain random batches


def make_config(size, tokenizer):
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        num_hidden_layers=size.layers,
        intermediate_size=size.intermediate,
        max_position_embeddings=size.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def make_model(size, tokenizer, seed):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(size, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def encode_examples(tokenizer, examples):
    """(prompt ids, response ids + EOS) per example, each part tokenized the way it is at
    serving time: the prompt through the chat template, the response on its own."""
    return [(prompt_ids(tokenizer, e["prompt"]), response_ids(tokenizer, e["response"]))
            for e in examples]


def collate(encoded, pad_id):
    """Right-padded input ids, attention mask, and labels that are set only on response tokens."""
    length = max(len(p) + len(r) for p, r in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(encoded):
        n_prompt, n_total = len(prompt), len(prompt) + len(response)
        input_ids[row, :n_total] = torch.tensor(prompt + response)
        labels[row, n_prompt:n_total] = torch.tensor(response)
        attention_mask[row, :n_total] = 1
    return input_ids, attention_mask, labels


def batches_of_similar_length(encoded, batch_size, length_group, rng):
    """Endless shuffled batches, one pass over the data per epoch. Each run of
    `length_group` batches is sorted by length before it is cut, which halves the compute
    spent on padding at 4. Keep it small: each task family has its own length profile, so
    sorting over many batches makes batches single-family, and that trains far worse."""
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        group = batch_size * length_group
        for start in range(0, len(order) - group + 1, group):
            chunk = sorted(order[start:start + group], key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
            cut = [chunk[i:i + batch_size] for i in range(0, group, batch_size)]
            rng.shuffle(cut)
            for batch in cut:
                yield [encoded[i] for i in batch]


def lr_at(step, settings):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def sft(model, encoded, settings, pad_id, seed, name="model"):
    """Supervised fine-tuning on response tokens; returns the logged (step, loss) pairs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=(0.9, 0.95))
    batches = batches_of_similar_length(encoded, settings.batch_size, settings.length_group, rng)
    model.train()
    log, running, start = [], 0.0, time.time()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        input_ids, attention_mask, labels = collate(next(batches), pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        running += loss.item()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            n = (step % settings.log_every) + 1
            log.append((step + 1, running / n))
            print(f"[{name}] step {step + 1}/{settings.steps} loss {running / n:.4f} "
                  f"lr {lr_at(step, settings):.2e} {time.time() - start:.0f}s", flush=True)
            running = 0.0
    model.eval()
    return log


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
