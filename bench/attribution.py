"""Attribution benchmark and the answer-overlap analysis of the rationale method.

    python bench/attribution.py [--teacher DIR] [--data FILE] [--rows 256] [--batch 16] [--repeats 3]

1. Speed: attribution scores (one forward + one backward to the input embeddings) vs a plain
   teacher forward pass over the same rows (prompt + the teacher's greedy answer), same batch
   size, measured side by side; rows/s of each and their ratio (goal: <= 3x). The greedy
   generation that makes the targets is timed apart: it is the stage's other cost.
2. Analysis (Ballout et al. report 68 % on answer-in-input datasets): per task family, the share
   of rows where an extracted word is one of the reference answer's words.
Figures only: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from orchestrator.rationale.attribution import attribution_scores, pad_right
from orchestrator.rationale.worker import AttributionSettings, AttributionWorker
from orchestrator.rationale.selection import answer_overlap
from orchestrator.text import encode_response


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="artifacts/embedded/full/teacher")
    parser.add_argument("--data", default="artifacts/embedded/full/data/test.jsonl")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-words", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    rows = [json.loads(line) for line in open(args.data)][: args.rows]
    worker = AttributionWorker(args.teacher, AttributionSettings(top_words=args.top_words), args.batch)
    model, tokenizer, pad = worker.model, worker.tokenizer, worker.tokenizer.pad_token_id or 0

    # The whole worker path once: generation + scores + selection (and the analysis's rationales).
    items = [{"index": i, "prompt": r["prompt"], "reference": r["response"]} for i, r in enumerate(rows)]
    result = worker.attribute(items)
    targets = [encode_response(tokenizer, r["target"]) for r in result["rows"]]
    from orchestrator.rationale.selection import content_token_spans

    prompts = [content_token_spans(tokenizer, r["prompt"])[0] for r in rows]
    batches = [(prompts[s:s + args.batch], targets[s:s + args.batch]) for s in range(0, len(rows), args.batch)]

    def attribution():
        for p, t in batches:
            attribution_scores(model, p, t, "grad_l1", pad)

    def forward():
        with torch.no_grad():
            for p, t in batches:
                tokens, _, lengths = pad_right(p, t, pad)
                mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()
                model(input_ids=tokens, attention_mask=mask)

    attribution(), forward()  # warm-up
    a_times, f_times = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        a_times.append(timed(attribution))
        f_times.append(timed(forward))
    a, f = statistics.median(a_times), statistics.median(f_times)
    tokens = sum(len(p) + len(t) for p, t in zip(prompts, targets))
    print(f"teacher {args.teacher}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(rows)} rows, "
          f"{tokens} tokens (prompt + greedy answer), batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"plain forward:        {len(rows) / f:8.1f} rows/s  ({f:.2f} s, median of {args.repeats})")
    print(f"attribution scores:   {len(rows) / a:8.1f} rows/s  ({a:.2f} s)")
    print(f"ratio attribution / forward: {a / f:.2f}x  (goal <= 3x)")
    print(f"whole worker once (greedy answers + scores + selection): {len(rows) / result['seconds']:.1f} rows/s, "
          f"of which generation {result['generate_seconds'] / result['seconds']:.0%}")

    by_family = defaultdict(list)
    for row, out in zip(rows, result["rows"]):
        by_family[row.get("task", "all")].append((out["rationale"], row.get("answer")))
    print(f"\nanswer overlap (share of rows where an extracted word is in the reference answer), K={args.top_words}:")
    for family, pairs in sorted(by_family.items()):
        print(f"  {family:12s} {answer_overlap(*map(list, zip(*pairs))):.3f}  (n={len(pairs)})")
    print(f"  {'all':12s} {answer_overlap([r['rationale'] for r in result['rows']], [r.get('answer') for r in rows]):.3f}")
    for family in sorted(by_family):
        row = next(r for r in rows if r.get("task") == family)
        out = result["rows"][rows.index(row)]
        print(f"  e.g. {family}: {row['prompt'][:60]!r}... -> {out['rationale']} (answer {row.get('answer')!r})")


if __name__ == "__main__":
    main()
