"""What the student learns from under method sft: the references, and for the rationale formats
the teacher's rationales, turned into training rows, and batches of them in the rollout's
MixedBatch form (the dataset writes every token, the loss is cross-entropy; no teacher call
during training).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.config import RunConfig
from orchestrator.data import Examples, with_prompts
from orchestrator.rationale.selection import (answer_overlap, augmented_prompt, rationale_prompt, rationale_text,
                                              strip_rationale)
from orchestrator.rationale.stage import attribute_split
from orchestrator.text import encode_prompt, encode_response
from protocol.batch import REFERENCE, MixedBatch
from protocol.topk import PAD_ID, TopK


@dataclass
class RationaleRows:
    """Token ids per training example: its answer row and, for ``multitask``, its rationale row."""

    answer: list[tuple[list[int], list[int]]]  # (prompt ids, response ids + EOS)
    rationale: list[tuple[list[int], list[int]]] | None

    def __len__(self) -> int:
        return len(self.answer)

    def batch(self, indices: np.ndarray, policy_version: int) -> MixedBatch:
        """The rows of examples ``indices`` (answer rows, then their rationale rows)."""
        rows = [self.answer[i] for i in indices]
        if self.rationale is not None:
            rows += [self.rationale[i] for i in indices]
        return reference_batch(rows, policy_version)


def reference_batch(rows: list[tuple[list[int], list[int]]], policy_version: int) -> MixedBatch:
    """A MixedBatch whose every response token the dataset wrote; the teacher top-k is empty (k = 1,
    no mass), which the cross-entropy loss never reads."""
    prompt_lengths = np.array([len(p) for p, _ in rows], dtype=np.int64)
    response_lengths = np.array([len(r) for _, r in rows], dtype=np.int64)
    width, resp = int((prompt_lengths + response_lengths).max()), int(response_lengths.max())
    sequences = np.concatenate([p + r for p, r in rows])
    tokens = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    tokens[np.arange(width)[None, :] < (prompt_lengths + response_lengths)[:, None]] = sequences
    teacher = TopK.empty((len(rows), resp), 1)
    teacher.mask[...] = np.arange(resp)[None, :] < response_lengths[:, None]
    n = len(rows)
    stats = {"teacher_fraction": np.zeros(n), "switched": np.zeros(n, dtype=bool),
             "first_switch": np.full(n, -1, dtype=np.int64), "divergence_mean": np.full(n, np.nan),
             "teacher_calls": np.zeros(n, dtype=np.int64), "student_calls": np.zeros(n, dtype=np.int64)}
    return MixedBatch(tokens, prompt_lengths, response_lengths, np.full((n, resp), REFERENCE, np.int8), teacher,
                      np.full(n, policy_version, dtype=np.int64), stats)


def training_texts(examples: Examples, rationales: list[list[str]], fmt: str):
    """(prompt, response) texts of the answer rows and of the rationale rows (None unless multitask)."""
    answers = list(zip(examples.prompts, examples.references))
    if fmt == "single_sequence":
        answers = [(p, f"{rationale_text(w)}\n{r}") for (p, r), w in zip(answers, rationales)]
    elif fmt == "input_augmentation":
        answers = [(augmented_prompt(p, w), r) for (p, r), w in zip(answers, rationales)]
    extra = None
    if fmt == "multitask":
        extra = [(rationale_prompt(p), rationale_text(w)) for p, w in zip(examples.prompts, rationales)]
    return answers, extra


def prepare(cfg: RunConfig, tokenizer, train: Examples, held_out: Examples, metrics=None):
    """Attribute what the format needs, and return (training rows, held-out examples as the
    student will see them at evaluation, a postprocess for its outputs, a summary dict)."""
    fmt, max_response = cfg.sft.format, cfg.rollout.max_new_tokens
    n = len(train) if cfg.sft.train_rows is None else min(cfg.sft.train_rows, len(train))
    summary: dict = {"rationale_format": fmt, "rationale_train_rows": n}
    rationales = [[] for _ in range(n)]
    if fmt != "answer_only":  # plain SFT on the same rows needs no teacher
        attributed = attribute_split(cfg, cfg.data.train_split, train, n, metrics)
        rationales = [row["rationale"] for row in attributed]
        summary["rationale_answer_overlap"] = answer_overlap(rationales, train.answers[:n])
        summary["rationale_examples"] = [{"prompt": train.prompts[i], "rationale": rationales[i]} for i in range(3)]
    if fmt == "input_augmentation":  # the teacher's rationales are part of the held-out prompts too
        words = [row["rationale"] for row in attribute_split(cfg, cfg.data.eval_split, held_out, None, metrics)]
        held_out = with_prompts(held_out, [augmented_prompt(p, w) for p, w in zip(held_out.prompts, words)],
                                tokenizer, cfg.data.use_chat_template)

    subset = Examples(train.source, train.prompts[:n], train.references[:n], train.answers[:n],
                      train.prompt_ids[:n], train.reference_ids[:n], 0)
    answers, extra = training_texts(subset, rationales, fmt)

    def encode(pairs):
        return [(encode_prompt(tokenizer, p, cfg.data.use_chat_template),
                 encode_response(tokenizer, r)[:max_response]) for p, r in pairs]

    rows = RationaleRows(encode(answers), encode(extra) if extra is not None else None)
    postprocess = strip_rationale if fmt == "single_sequence" else None
    return rows, held_out, postprocess, summary
