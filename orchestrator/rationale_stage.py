"""The attribution stage: teacher copies in Ray actors turn a split into rationales, shard by shard.

    python -m orchestrator.rationale_stage --config deploy/configs/embedded-rationale.yaml [--splits train,test]

Shards are written next to the dataset, under ``rationales/<teacher>-<hash>/<split>/`` (the hash
covers the teacher, the data source and every attribution setting), each one atomically once
finished. A re-run reads finished shards and attributes only the missing ones, so a crashed
worker (Ray restarts it; its shard is sent again) or a killed stage loses no finished shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from orchestrator.config import RunConfig, load_config
from orchestrator.data import Examples
from trainer.attribution_worker import AttributionSettings
from trainer.rationale import answer_overlap

# A restarted worker must answer within this long before its shard is sent to it again.
RESTART_TIMEOUT_S = 300.0


def attribution_settings(cfg: RunConfig) -> AttributionSettings:
    r = cfg.rationale
    return AttributionSettings(target=r.target, score=r.score, word_merge=r.word_merge, top_words=r.top_words,
                               max_new_tokens=r.max_new_tokens, extra_stopwords=tuple(r.extra_stopwords),
                               use_chat_template=cfg.data.use_chat_template)


def stage_dir(cfg: RunConfig, split: str, examples: Examples) -> Path:
    """Where this split's rationales live; the name says which teacher and settings made them."""
    key = {"teacher": str(Path(cfg.models.teacher).resolve()) if Path(cfg.models.teacher).exists() else cfg.models.teacher,
           "source": examples.source, "split": split, "max_prompt_tokens": cfg.data.max_prompt_tokens,
           "shard_rows": cfg.rationale.shard_rows, "settings": asdict(attribution_settings(cfg))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    if cfg.rationale.cache_dir is not None:
        root = Path(cfg.rationale.cache_dir)
    elif "://" not in examples.source and Path(examples.source).is_file():
        root = Path(examples.source).parent / "rationales"
    else:  # a hub dataset: no directory of ours next to it
        root = Path(cfg.output_dir) / "rationales"
    out = root / f"{Path(cfg.models.teacher).name}-{digest}" / split
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.json"
    if not manifest.exists():
        _write_atomic(manifest, json.dumps(key, indent=1, sort_keys=True))
    return out


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.jsonl"


def attribute_split(cfg: RunConfig, split: str, examples: Examples, n_rows: int | None = None,
                    metrics=None) -> list[dict]:
    """Rationales of the first ``n_rows`` rows of ``examples`` (all if None), row by row:
    ``{"index", "rationale": [words], "target": text}``. Finished shards are read, not redone."""
    n = len(examples) if n_rows is None else min(n_rows, len(examples))
    size = cfg.rationale.shard_rows
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
    """Spread the shards over ``rationale.workers`` actors; write each as it finishes."""
    import ray

    from trainer.attribution_worker import AttributionWorker

    r = cfg.rationale
    worker_cls = ray.remote(AttributionWorker).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                                                        max_restarts=r.max_restarts)
    threads = max(1, int(r.num_cpus)) if r.num_gpus == 0 else None
    workers = [worker_cls.remote(cfg.models.teacher, attribution_settings(cfg), r.batch_size, threads)
               for _ in range(min(r.workers, len(rows_of)))]
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
                                       f"{failures[shard]} times (rationale.max_restarts={r.max_restarts})") from err
                print(f"attribution worker died on shard {shard} ({type(err).__name__}); sending it again")
                if metrics is not None:
                    metrics.event("attribution_retried", {"split": split, "shard": shard})
                _wait_alive(worker)
                queue.appendleft(shard)
                idle.append(worker)
                continue
            _write_atomic(shard_path(out, shard), "".join(json.dumps(row) + "\n" for row in result["rows"]))
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
        for worker in workers:
            ray.kill(worker)


def _wait_alive(worker, timeout_s: float = RESTART_TIMEOUT_S) -> None:
    """Block until Ray has restarted ``worker`` (calls to a restarting actor are refused)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(worker.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"an attribution worker did not come back within {timeout_s:g} s")
            time.sleep(1.0)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchkd-rationales", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded-rationale.yaml")
    parser.add_argument("--splits", default="train", help="comma-separated splits to attribute")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    from orchestrator.data import load_split
    from orchestrator.embedded import ensure_embedded
    from orchestrator.models import check_pair
    from orchestrator.run import connect_ray

    ensure_embedded(cfg)
    tokenizer = check_pair(cfg.models.teacher, cfg.models.student)
    connect_ray(cfg)
    for split in args.splits.split(","):
        examples = load_split(cfg.data, split, tokenizer)
        n = cfg.rationale.train_rows if split == cfg.data.train_split else None
        rows = attribute_split(cfg, split, examples, n)
        overlap = answer_overlap([r["rationale"] for r in rows], examples.answers[: len(rows)])
        print(json.dumps({"split": split, "rows": len(rows), "answer_overlap": overlap}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
