"""A teacher copy (torch + transformers) that turns rows into rationales; a Ray actor wraps it.

Attribution needs gradients through the teacher, which vLLM does not give, so this is a plain
transformers model: one per GPU on a cluster, on CPU here.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from orchestrator.rationale.attribution import ScoreKind, attribution_scores
from orchestrator.rationale.selection import STOPWORDS, content_token_spans, select_words, word_scores
from orchestrator.text import encode_response
from trainer.reference import greedy_generate


@dataclass(frozen=True)
class AttributionSettings:
    """What decides a rationale (all of it goes into the cache key)."""

    target: str = "teacher_greedy"  # or "reference": the dataset's answer is the attributed output
    score: ScoreKind = "grad_l1"
    word_merge: str = "max"
    top_words: int = 10
    max_new_tokens: int = 256  # of the teacher's greedy answer
    extra_stopwords: tuple[str, ...] = ()
    use_chat_template: bool = True

    @staticmethod
    def of(sft, use_chat_template: bool) -> "AttributionSettings":
        """The settings an ``sft`` config section (orchestrator.config.SftConfig) asks for."""
        return AttributionSettings(target=sft.target, score=sft.score, word_merge=sft.word_merge,
                                   top_words=sft.top_words, max_new_tokens=sft.max_new_tokens,
                                   extra_stopwords=tuple(sft.extra_stopwords), use_chat_template=use_chat_template)


class AttributionWorker:
    def __init__(self, model_path: str, settings: AttributionSettings, batch_size: int = 16, threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        if torch.cuda.is_available():
            self.model.cuda()
        self.stopwords = STOPWORDS | {w.lower() for w in settings.extra_stopwords}

    def ready(self) -> int:
        return os.getpid()

    def attribute(self, rows: list[dict]) -> dict:
        """Rows ``{"index", "prompt", "reference"}`` -> their rationales, in ``batch_size`` batches.

        Returns ``{"rows": [{"index", "rationale", "target"}], "seconds", "generate_seconds"}``.
        """
        started = time.perf_counter()
        encoded = [content_token_spans(self.tokenizer, r["prompt"], self.settings.use_chat_template) for r in rows]
        prompt_ids = [ids for ids, _ in encoded]
        if self.settings.target == "teacher_greedy":
            targets = greedy_generate(self.model, self.tokenizer, prompt_ids, self.settings.max_new_tokens,
                                      batch_size=max(self.batch_size, 16))
        elif self.settings.target == "reference":
            targets = [r["reference"] for r in rows]
        else:
            raise ValueError(f"sft.target: unknown target {self.settings.target!r} (teacher_greedy, reference)")
        generated = time.perf_counter()
        target_ids = [encode_response(self.tokenizer, t)[: self.settings.max_new_tokens + 1] for t in targets]
        out = []
        for start in range(0, len(rows), self.batch_size):
            part = slice(start, start + self.batch_size)
            scores = attribution_scores(self.model, prompt_ids[part], target_ids[part], self.settings.score,
                                        self.tokenizer.pad_token_id or 0)
            for row, (_, spans), token_scores, target in zip(rows[part], encoded[part], scores, targets[part]):
                words, merged = word_scores(row["prompt"], spans, token_scores, self.settings.word_merge)
                out.append({"index": row["index"], "target": target,
                            "rationale": select_words(words, merged, self.settings.top_words, self.stopwords)})
        return {"rows": out, "seconds": time.perf_counter() - started, "generate_seconds": generated - started}

