"""The weight push's extra memory and time: streamed in buckets, against the whole model as one bucket.

    python -m bench.push_memory                                        # a random Llama: 250k vocabulary, ~206M parameters
    python -m bench.push_memory --student artifacts/smollm2/student    # any Hugging Face directory
    python -m bench.push_memory --bucket-mb 32 64                      # the bucket sizes to compare

One learner rank (ZeRO-2, AdamW, one train step first so the optimizer state exists) and one student
vLLM service on the same model. For one bucket holding the whole model (what a push did before
buckets: the whole state gathered, packed and loaded at once) and for each ``--bucket-mb``, three
pushes; per push, the time and the peak resident memory above the level just before it, of the
learner rank's process and of the student engine (its Ray actor and vLLM's engine process, summed),
sampled every 10 ms from this process. Prints per row the fastest of the pushes and the most
memory any took, and each row's extra
memory against the goal: at most 2 buckets + 10 % of the model. Figures only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


def random_student(path: Path, vocab: int, hidden: int, layers: int) -> None:
    """A Llama whose weights are mostly its tied embedding (head_dim 64, as vLLM's CPU attention wants)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)


class PeakRss:
    """The peak summed resident memory of some processes (and their children) while the block runs."""

    def __init__(self, pids: list[int]):
        self.processes = [psutil.Process(p) for p in pids]

    def now(self) -> int:
        total = 0
        for process in self.processes:
            for p in [process, *process.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        return total

    def __enter__(self):
        self.before, self.peak, self._done = self.now(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.extra = max(self.peak, self.now()) - self.before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="a Hugging Face model directory (default: a random 250k-vocab Llama)")
    parser.add_argument("--vocab", type=int, default=250_000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[64.0])
    parser.add_argument("--pushes", type=int, default=3)
    args = parser.parse_args()

    import ray
    from transformers import AutoConfig

    from orchestrator.launcher import start_learner, start_service
    from orchestrator.steps import push_weights
    from services.config import EngineConfig
    from trainer.config import LearnerConfig, LossConfig
    from bench.learner import random_batch

    work = Path(tempfile.mkdtemp(prefix="push-memory-"))
    student = Path(args.student) if args.student else work / "student"
    if args.student is None:
        random_student(student, args.vocab, args.hidden, args.layers)
    vocab = AutoConfig.from_pretrained(student).vocab_size
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    pool = start_service("student", str(student), EngineConfig(gpu_memory_utilization=0.1, enforce_eager=True,
                                                               cpu_kv_cache_gb=1), eos_token_id=1)
    group = start_learner(str(student), LearnerConfig(world_size=1, zero_stage=2), LossConfig(kind="forward_kl"))
    try:
        group.train_step(random_batch(8, 32, 32, vocab, 20, seed=0))
        learner_pid = ray.get(group.ranks[0].__ray_call__.remote(lambda _rank: os.getpid()))
        engine_pid = pool.infos[0]["pid"]
        model_bytes = sum(t.numel() * t.element_size() for t in group.export_state().values())
        print(f"model: {student} ({model_bytes / 2**20:.0f} MiB in fp32, vocabulary {vocab}); "
              f"learner rank pid {learner_pid}, student engine pid {engine_pid} (+ its vLLM process)")
        print("| buckets of | buckets | push s | learner extra MiB | engine extra MiB | goal: <= 2 buckets + 10 % of the model |")
        print("|---|---|---|---|---|---|")
        version = 0
        for bucket_mb in [model_bytes / 2**20 * 2, *args.bucket_mb]:  # the first: the whole model in one bucket
            rows = []
            for _ in range(args.pushes):
                version += 1
                with PeakRss([learner_pid]) as learner, PeakRss([engine_pid]) as engine:
                    pushed = push_weights(group, pool, version, bucket_mb)
                rows.append((pushed["push_s"], learner.extra, engine.extra, pushed["buckets"]))
            # the fastest push, and the most memory any of them took
            push_s, buckets = min(r[0] for r in rows), rows[0][3]
            learner_extra, engine_extra = max(r[1] for r in rows), max(r[2] for r in rows)
            bound = 2 * min(bucket_mb * 2**20, model_bytes) + 0.1 * model_bytes
            label = "whole model" if buckets == 1 else f"{bucket_mb:g} MiB"
            verdict = "met" if max(learner_extra, engine_extra) <= bound else "missed"
            print(f"| {label} | {buckets} | {push_s:.2f} | {learner_extra / 2**20:.0f} | {engine_extra / 2**20:.0f} | "
                  f"{verdict} ({bound / 2**20:.0f} MiB) |", flush=True)
        assert pool.versions() == [version]
    finally:
        group.shutdown()
        pool.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
