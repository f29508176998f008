"""Task-agnostic scoring of generated responses: final-answer exact match and ROUGE-L.

Rouge-L is the F-measure of Google's `rouge-score` package with stemming, as the distillation
papers report it (its tokeniser lowercases and keeps letters and digits only). The earlier
whitespace-token Rouge-L (`rouge_l_whitespace`) is kept beside it so one table can show the
difference.
"""

import numpy as np
from rouge_score import rouge_scorer

_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

ANSWER_PREFIX = "Answer:"


def extract_answer(text):
    """The text after the last line that starts with `Answer:`, stripped; None if no such line."""
    answer = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(ANSWER_PREFIX):
            answer = stripped[len(ANSWER_PREFIX):].strip()
    return answer


def normalize(text):
    return " ".join(text.split())


def exact_match(prediction_text, answer):
    predicted = extract_answer(prediction_text)
    return predicted is not None and normalize(predicted) == normalize(answer)


def lcs_length(a, b):
    """Longest common subsequence of two token lists.

    One DP row per token of `a`: with c[j] = max(prev[j], prev[j-1] + [a_i == b_j]), the new
    row is the running maximum of c, which unrolls the row[j-1] dependency into one array op.
    """
    if not a or not b:
        return 0
    ids = {}
    a_ids = np.array([ids.setdefault(t, len(ids)) for t in a])
    b_ids = np.array([ids.setdefault(t, len(ids)) for t in b])
    prev = np.zeros(len(b) + 1, dtype=np.int64)
    for token in a_ids:
        candidate = prev.copy()
        candidate[1:] = np.maximum(prev[1:], prev[:-1] + (b_ids == token))
        prev = np.maximum.accumulate(candidate)
    return int(prev[-1])


def rouge_l(prediction, reference):
    """Rouge-L F-measure (rouge-score, stemming on). An empty text scores 0, as rouge-score has it."""
    return float(_ROUGE_L.score(reference, prediction)["rougeL"].fmeasure)


def rouge_l_whitespace(prediction, reference):
    """ROUGE-L F1 over whitespace tokens. Two empty texts match perfectly; one empty scores 0."""
    pred, ref = prediction.split(), reference.split()
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_batch(predictions, answers, references):
    """Mean exact match (on the final answer) and mean ROUGE-L (against the full reference), per
    row too; ``rouge_l_whitespace`` beside it."""
    if not (len(predictions) == len(answers) == len(references)):
        raise ValueError(f"length mismatch: {len(predictions)} predictions, "
                         f"{len(answers)} answers, {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "rouge_l": 0.0, "rouge_l_whitespace": 0.0, "n": 0}
    em = [exact_match(p, a) for p, a in zip(predictions, answers)]
    rl = [rouge_l(p, r) for p, r in zip(predictions, references)]
    rl_ws = [rouge_l_whitespace(p, r) for p, r in zip(predictions, references)]
    return {"exact_match": float(np.mean(em)), "rouge_l": float(np.mean(rl)), "rouge_l_whitespace": float(np.mean(rl_ws)),
            "n": n, "exact_match_rows": em, "rouge_l_rows": rl, "rouge_l_whitespace_rows": rl_ws}
