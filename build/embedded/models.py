"""Tiny Llama models for the embedded default: config, packed batches, the SFT loop.

Plain `LlamaForCausalLM`, so vLLM and transformers load the saved directories like any
other model. head_dim = hidden / heads = 64, which vLLM's CPU attention supports.
"""

import random
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from orchestrator.text import encode_prompt, encode_response
from trainer.schedule import lr_scheduler

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
    rows: int = 12  # packed rows per step; 12 x 256 tokens is about 32 examples
    row_tokens: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 50


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
    return [(encode_prompt(tokenizer, e["prompt"]), encode_response(tokenizer, e["response"]))
            for e in examples]


def packed_batches(encoded, rows, row_tokens, rng):
    """Endless batches of `rows` rows, each a list of whole examples of at most
    `row_tokens` tokens in all, one pass over the shuffled data per epoch (first fit).

    Packing instead of padding: examples range from ~30 to ~200 tokens, so padded batches
    spend half their compute on padding, and sorting by length to avoid that makes batches
    single-family (each family has its own length profile), which trains far worse."""
    too_long = max(len(p) + len(r) for p, r in encoded)
    if too_long > row_tokens:
        raise ValueError(f"an example has {too_long} tokens, more than row_tokens={row_tokens}")
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        batch, space = [], []
        for i in order:
            size = len(encoded[i][0]) + len(encoded[i][1])
            row = next((r for r, free in enumerate(space) if free >= size), None)
            if row is None and len(batch) == rows:
                yield batch
                batch, space = [], []
            if row is None:
                batch.append([])
                space.append(row_tokens)
                row = len(batch) - 1
            batch[row].append(encoded[i])
            space[row] -= size


def collate_packed(rows, pad_id):
    """Input ids, position ids, a block-diagonal causal attention mask, and labels set only
    on response tokens. Positions restart at 0 for every example and the mask stops
    attention across examples, so each example is computed exactly as if it were alone."""
    width = max(sum(len(p) + len(r) for p, r in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.zeros((len(rows), width), dtype=torch.long)  # which example a token is in
    for r, row in enumerate(rows):
        at = 0
        for k, (prompt, response) in enumerate(row):
            n = len(prompt) + len(response)
            input_ids[r, at:at + n] = torch.tensor(prompt + response)
            labels[r, at + len(prompt):at + n] = torch.tensor(response)
            position_ids[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # trailing padding: its own segment
        segment[r, at:] = len(row)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    # A 4D float mask is used by transformers as given (0 = attend), for sdpa and eager alike.
    attention_mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return input_ids, position_ids, attention_mask[:, None], labels


def sft(model, encoded, settings, pad_id, seed, name="model"):
    """Supervised fine-tuning on response tokens; returns the logged (step, loss) pairs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=(0.9, 0.95))
    # Linear warmup, then cosine decay to lr * min_lr_ratio.
    scheduler = lr_scheduler(optimizer, "cosine", settings.warmup_steps, settings.steps, settings.min_lr_ratio)
    batches = packed_batches(encoded, settings.rows, settings.row_tokens, rng)
    model.train()
    log, running, start = [], 0.0, time.time()
    for step in range(settings.steps):
        lr = scheduler.get_last_lr()[0]
        input_ids, position_ids, attention_mask, labels = collate_packed(next(batches), pad_id)
        loss = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                     labels=labels, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            n = (step % settings.log_every) + 1
            log.append((step + 1, running / n))
            print(f"[{name}] step {step + 1}/{settings.steps} loss {running / n:.4f} "
                  f"lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
            running = 0.0
    model.eval()
    return log
