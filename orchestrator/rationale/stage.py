"""The attribution stage: teacher copies in Ray actors turn a split into rationales, shard by shard.

    python -m orchestrator.rationale.stage --config deploy/configs/embedded-rationale.yaml [--splits train,test]

Shards are written next to the dataset, under ``rationales/<teacher>-<hash>/<split>/`` (the hash
covers the teacher, the data source and every attribution setting), each one atomically once
finished. A re-run reads finished shards and attributes only the missing ones, so a crashed
worker (Ray restarts it; its shard is sent again) or a killed stage loses no finished shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import ray

from orchestrator.config import RunConfig, load_config
from orchestrator.data import Examples, load_split
from orchestrator.launcher import connect_ray, start_attribution_workers, stop_actors
from orchestrator.models import check_pair
from orchestrator.rationale.selection import answer_overlap
from orchestrator.rationale.worker import AttributionSettings
from protocol.files import write_atomic
from services.pool import wait_until_answers

# A restarted worker must answer within this long before its shard is sent to it again.
RESTART_TIMEOUT_S = 300.0


def stage_dir(cfg: RunConfig, split: str, examples: Examples) -> Path:
    """Where this split's rationales live; the name says which teacher and settings made them."""
    key = {"teacher": str(Path(cfg.models.teacher).resolve()) if Path(cfg.models.teacher).exists() else cfg.models.teacher,
           "source": examples.source, "split": split, "max_prompt_tokens": cfg.data.max_prompt_tokens,
           "shard_rows": cfg.sft.shard_rows,
           "settings": asdict(AttributionSettings.of(cfg.sft, cfg.data.use_chat_template))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    if cfg.sft.cache_dir is not None:
        root = Path(cfg.sft.cache_dir)
    elif "://" not in examples.source and Path(examples.source).is_file():
        root = Path(examples.source).parent / "rationales"
    else:  # a hub dataset: no directory of ours next to it
        root = Path(cfg.output_dir) / "rationales"
    out = root / f"{Path(cfg.models.teacher).name}-{digest}" / split
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.json"
    if not manifest.exists():
        write_atomic(manifest, json.dumps(key, indent=1, sort_keys=True))
    return out


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.jsonl"


def attribute_split(cfg: RunConfig, split: str, examples: Examples, n_rows: int | None = None,
                    metrics=None) -> list[dict]:
    """Rationales of the first ``n_rows`` rows of ``examples`` (all if None), row by row:
    ``{"index", "rationale": [words], "target": text}``. Finished shards are read, not redone."""
    n = len(examples) if n_rows is None else min(n_rows, len(examples))
    size = cfg.sft.shard_rows
    shards = (n + size - 1) // size
    out = stage_dir(cfg, split, examples)
    todo = [s for s in range(shards) if not shard_path(out, s).exists()]
    if todo:
        print(f"attribution of {split}: {len(todo)} of {shards} shards to do ({out})")
        rows_of = {s: [{"index": i, "prompt": examples.prompts[i], "reference": examples.references[i]}
                       for i in range(s * size, min(n, (s + 1) * size))] for s in todo}
        run_shards(cfg, rows_of, out, split, shards, metrics)
    rows = [json.loads(line) for s in range(shards) for line in shard_path(out, s).read_text().splitlines()]
    return rows[:n]


def run_shards(cfg: RunConfig, rows_of: dict[int, list[dict]], out: Path, split: str, total_shards: int,
               metrics=None) -> None:
    """Spread the shards over ``sft.workers`` actors; write each as it finishes."""
    r = cfg.sft
    workers = start_attribution_workers(cfg, min(r.workers, len(rows_of)))
    queue, idle, pending = deque(sorted(rows_of)), list(workers), {}
    failures = dict.fromkeys(rows_of, 0)
    started, done_rows, done_shards = time.perf_counter(), 0, total_shards - len(rows_of)
    try:
        while queue or pending:
            while queue and idle:
                shard, worker = queue.popleft(), idle.pop()
                pending[worker.attribute.remote(rows_of[shard])] = (shard, worker)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            shard, worker = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                failures[shard] += 1
                if failures[shard] > r.max_restarts:
                    raise RuntimeError(f"attribution of {split} shard {shard}: its worker died "
                                       f"{failures[shard]} times (sft.max_restarts={r.max_restarts})") from err
                print(f"attribution worker died on shard {shard} ({type(err).__name__}); sending it again")
                if metrics is not None:
                    metrics.event("attribution_retried", {"split": split, "shard": shard})
                wait_until_answers(worker.ready.remote, RESTART_TIMEOUT_S, "an attribution worker")
                queue.appendleft(shard)
                idle.append(worker)
                continue
            write_atomic(shard_path(out, shard), "".join(json.dumps(row) + "\n" for row in result["rows"]))
            idle.append(worker)
            done_rows, done_shards = done_rows + len(result["rows"]), done_shards + 1
            record = {"attribution_split": split, "attribution_progress": done_shards / total_shards,
                      "attribution_rows_per_second": done_rows / (time.perf_counter() - started),
                      "attribution_shard": shard, "attribution_shard_seconds": result["seconds"],
                      "attribution_generate_seconds": result["generate_seconds"]}
            print(f"  shard {shard}: {len(result['rows'])} rows in {result['seconds']:.1f} s "
                  f"({done_shards}/{total_shards}, {record['attribution_rows_per_second']:.1f} rows/s)")
            if metrics is not None:
                metrics.log(record)
    finally:
        stop_actors(workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchkd-rationales", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded-rationale.yaml")
    parser.add_argument("--splits", default="train", help="comma-separated splits to attribute")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # the models must exist: a run (or build/) makes them
    tokenizer = check_pair(cfg.models.teacher, cfg.models.student)
    connect_ray(cfg)
    for split in args.splits.split(","):
        examples = load_split(cfg.data, split, tokenizer)
        n = cfg.sft.train_rows if split == cfg.data.train_split else None
        rows = attribute_split(cfg, split, examples, n)
        overlap = answer_overlap([r["rationale"] for r in rows], examples.answers[: len(rows)])
        print(json.dumps({"split": split, "rows": len(rows), "answer_overlap": overlap}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
