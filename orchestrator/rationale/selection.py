"""Rationales from token scores: which prompt tokens may score, words from tokens, the top K
words, and the texts the student learns from (plain functions, no model).

Selection (Ballout et al. 2409.12586, as reconstructed in README): tokens of the user's text
only (no special or chat-template tokens); sub-word pieces merged into words (a word's score is
the max or the sum of its pieces'); stopwords and punctuation dropped; a word repeated in the
prompt counts once, at its best-scoring occurrence; the top K words, put back in input order.
"""
from __future__ import annotations

import re

import numpy as np

RATIONALE_PREFIX = "Important words:"
RATIONALE_INSTRUCTION = "List the important words of this question."

# Letters and digits; punctuation never forms a word, so it is dropped with everything unmatched.
WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")

# A short English list (NLTK's core words); sft.extra_stopwords adds task-specific ones.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split())


def content_token_spans(tokenizer, content: str, use_chat_template: bool = True) -> tuple[list[int], np.ndarray]:
    """The prompt's token ids (as the run encodes it) and, per token, its character span in
    ``content`` ([T, 2]; -1 for tokens outside the user's text: special and template tokens).

    Needs a fast tokenizer (offsets); the content must appear verbatim in the rendered template.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"rationale: tokenizer {type(tokenizer).__name__} has no offsets (needs a fast tokenizer)")
    rendered = content
    if use_chat_template and tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 add_generation_prompt=True, tokenize=False)
    start = rendered.find(content)
    if start < 0:
        raise ValueError(f"rationale: the chat template changes the prompt text, cannot locate it: {content[:60]!r}")
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2) - start
    inside = (offsets[:, 0] >= 0) & (offsets[:, 1] <= len(content)) & (offsets[:, 1] > offsets[:, 0])
    inside &= ~np.isin(ids, tokenizer.all_special_ids)
    return ids, np.where(inside[:, None], offsets, -1)


def word_scores(content: str, spans: np.ndarray, token_scores: np.ndarray, merge: str = "max"):
    """Words of ``content`` (text, start offset) and each word's score from the tokens over it.

    A word no scored token covers gets NaN (it cannot be chosen).
    """
    found = [(m.group(), m.start(), m.end()) for m in WORD.finditer(content)]
    if not found:
        return [], np.empty(0)
    starts = np.array([f[1] for f in found])
    ends = np.array([f[2] for f in found])
    scored = spans[:, 0] >= 0
    # [T, W]: token t overlaps word w.
    covers = scored[:, None] & (spans[:, 0:1] < ends[None, :]) & (spans[:, 1:2] > starts[None, :])
    if merge == "max":
        merged = np.where(covers, token_scores[:, None], -np.inf).max(axis=0)
    elif merge == "sum":
        merged = np.where(covers, token_scores[:, None], 0.0).sum(axis=0)
    else:
        raise ValueError(f"sft.word_merge: unknown rule {merge!r} (max, sum)")
    merged = np.where(covers.any(axis=0), merged, np.nan)
    return [(f[0], f[1]) for f in found], merged


def select_words(words: list[tuple[str, int]], scores: np.ndarray, k: int,
                 stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """The top ``k`` words by score, stopwords dropped, each word once (case-insensitive, its
    best occurrence), in the order they appear in the input."""
    best: dict[str, tuple[float, int, str]] = {}  # lowercased word -> (score, offset, text)
    for (text, offset), score in zip(words, scores):
        key = text.lower()
        if key in stopwords or not np.isfinite(score):
            continue
        if key not in best or score > best[key][0]:
            best[key] = (float(score), offset, text)
    # Highest score first; an earlier word wins a tie.
    chosen = sorted(best.values(), key=lambda entry: (-entry[0], entry[1]))[:k]
    return [text for _, _, text in sorted(chosen, key=lambda entry: entry[1])]


def rationale_text(words: list[str]) -> str:
    return f"{RATIONALE_PREFIX} {', '.join(words)}"


def rationale_prompt(prompt: str) -> str:
    """The prompt of the rationale task (multi-task training): the question, then the ask."""
    return f"{prompt}\n{RATIONALE_INSTRUCTION}"


def augmented_prompt(prompt: str, words: list[str]) -> str:
    """Input augmentation (the upper-bound row): the teacher's rationale given in the prompt."""
    return f"{prompt}\n{rationale_text(words)}"


def strip_rationale(text: str) -> str:
    """A single-sequence output without its leading rationale line (for answer scoring)."""
    if text.lstrip().startswith(RATIONALE_PREFIX):
        return text.lstrip().split("\n", 1)[1] if "\n" in text.lstrip() else ""
    return text


def answer_overlap(rationales: list[list[str]], answers: list[str | None]) -> float:
    """Share of rows (with an answer) where an extracted word is one of the answer's words: the
    paper's "68 % of the extracted tokens are part of the ground truth" analysis."""
    hits = [bool({w.lower() for w in words} & {w.lower() for w in WORD.findall(answer)})
            for words, answer in zip(rationales, answers) if answer]
    return float(np.mean(hits)) if hits else float("nan")
