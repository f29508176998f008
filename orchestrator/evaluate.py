"""Held-out evaluation: the student's greedy answers, exact match of the final answer, Rouge-L."""
from __future__ import annotations

from typing import Callable

import numpy as np

from orchestrator.data import Examples
from services.model_service import raise_errors
from orchestrator.scoring import score_batch


def evaluate(pool, examples: Examples, tokenizer, n: int, max_new_tokens: int, max_model_len: int,
             postprocess: Callable[[str], str] | None = None) -> dict:
    """Greedy generation by ``pool`` on the first ``n`` examples, scored against the references
    (after ``postprocess``, e.g. dropping a rationale line the student writes first)."""
    count = min(n, len(examples))
    prompts = examples.prompt_ids[:count]
    budgets = np.minimum(max_new_tokens, max_model_len - np.array([len(p) for p in prompts]) - 1).tolist()
    out = pool.generate(prompts, budgets, 1, 0.0).result()
    raise_errors(out, "eval request")
    texts = tokenizer.batch_decode([out.tokens[i, : out.lengths[i]] for i in range(count)], skip_special_tokens=True)
    if postprocess is not None:
        texts = [postprocess(t) for t in texts]
    scores = score_batch(texts, examples.answers[:count], examples.references[:count])
    rows = [{"index": i, "exact_match": bool(em), "rouge_l": rl, "rouge_l_whitespace": rl_ws,
             "reference_tokens": len(examples.reference_ids[i]), "output": text}
            for i, (em, rl, rl_ws, text) in enumerate(zip(scores["exact_match_rows"], scores["rouge_l_rows"],
                                                          scores["rouge_l_whitespace_rows"], texts))]
    return {"exact_match": scores["exact_match"], "rouge_l": scores["rouge_l"], "n": scores["n"],
            "version": out.version, "samples": texts[:3], "rows": rows}
