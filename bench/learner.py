"""Learner benchmark: train-step throughput per world size and ZeRO stage, weight-push cost, checkpoints.

    python bench/learner.py [--student DIR] [--rows 32] [--prompt 48] [--response 128] [--steps 3]

For world size 1 and 2 and ZeRO stage 1, 2 and 3 (one Ray actor per rank, ``num_cpus`` 1
each): response tokens per second of a train step (best of ``--steps`` after a warm-up step),
the checkpoint's size on disk and the time to write it. Then, with a real vLLM student service:
the time to push the weights (streamed in buckets of `learner.push_bucket_mb`: gather, pack and load into vLLM overlap)
as a share of the step time, for world 1 / ZeRO-2 and world 2 / ZeRO-3 (goal: at most 10 %).

Without ``--student`` (or when the directory does not exist) it uses a random Llama of the
embedded student's kind of size: vocab 512, hidden 256, 4 heads (head_dim 64, as vLLM's CPU
attention wants), 4 layers. Figures only: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_STUDENT = "artifacts/embedded/full/student"
CONFIGS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]  # (world size, ZeRO stage)
PUSH_CONFIGS = [(1, 2), (2, 3)]


def random_student(path: Path, vocab: int = 512) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)


def random_batch(rows: int, prompt: int, response: int, vocab: int, k: int, seed: int):
    """Rollout-shaped random data: prompts and responses of varied length, a made-up teacher top-k."""
    from protocol.batch import TrainBatch
    from protocol.topk import TopK

    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(prompt // 2, prompt + 1, rows)
    response_lengths = rng.integers(response // 2, response + 1, rows)
    total = prompt_lengths + response_lengths
    tokens = np.where(np.arange(total.max())[None] < total[:, None], rng.integers(2, vocab, (rows, total.max())), 0)
    width = int(response_lengths.max())
    logits = rng.normal(size=(rows, width, k)).astype(np.float32) * 3
    logprobs = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.05), axis=-1)[..., ::-1]
    mask = np.arange(width)[None] < response_lengths[:, None]
    ids = np.stack([rng.permutation(vocab)[:k] for _ in range(rows * width)]).reshape(rows, width, k)
    topk = TopK(ids.astype(np.int64), np.ascontiguousarray(logprobs), logprobs[..., 0].copy(), mask)
    return TrainBatch(tokens.astype(np.int64), prompt_lengths.astype(np.int64), response_lengths.astype(np.int64), topk)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=DEFAULT_STUDENT)
    parser.add_argument("--rows", type=int, default=32, help="rows per batch (the embedded prompts_per_step)")
    parser.add_argument("--prompt", type=int, default=48, help="longest prompt (lengths are drawn from half to this)")
    parser.add_argument("--response", type=int, default=128, help="longest response")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config, after one warm-up step")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()

    import ray
    from transformers import AutoConfig

    from services.config import EngineConfig
    from orchestrator.config import load_config
    from orchestrator.launcher import connect_ray, start_learner, start_service
    from orchestrator.steps import push_weights
    from trainer.config import LearnerConfig, LossConfig

    work = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    student = Path(args.student)
    if not (student / "config.json").is_file():
        student = work / "student"
        random_student(student)
        print(f"student: random Llama (no {args.student}): vocab 512, hidden 256, 4 heads, 4 layers")
    else:
        print(f"student: {student}")
    config = AutoConfig.from_pretrained(student)
    vocab, eos = config.vocab_size, config.eos_token_id if isinstance(config.eos_token_id, int) else 1
    data = [random_batch(args.rows, args.prompt, args.response, vocab, args.k, seed) for seed in range(args.steps + 1)]
    print(f"batch: {args.rows} rows, prompts <= {args.prompt}, responses <= {args.response}, "
          f"{int(data[0].teacher.mask.sum())} response tokens, k={args.k}; one Ray actor (num_cpus 1) per rank")

    connect_ray(load_config(None, ["ray.dashboard=false", "ray.num_cpus=4"]))
    loss = LossConfig(kind="skew_reverse_kl")
    step_seconds = {}
    print(f"\n{'world':>5} {'ZeRO':>4} {'setup s':>8} {'step s':>7} {'fwd s':>6} {'bwd s':>6} {'opt s':>6} "
          f"{'tokens/s':>9} {'ckpt MB':>8} {'ckpt s':>7}")
    for world, stage in CONFIGS:
        cfg = LearnerConfig(world_size=world, zero_stage=stage, micro_batch_size=args.rows)
        started = time.perf_counter()
        group = start_learner(str(student), cfg, loss)
        setup_s = time.perf_counter() - started
        try:
            group.train_step(data[0])  # warm-up: first-touch allocations
            best = min((group.train_step(batch) for batch in data[1:]), key=lambda s: s["seconds"])
            run_dir = work / f"run-w{world}-z{stage}"
            started = time.perf_counter()
            saved = group.save_checkpoint(str(run_dir), 1, {"step": 1})
            ckpt_s = time.perf_counter() - started
            ckpt_mb = dir_size(Path(saved)) / 2**20
        finally:
            group.shutdown()
        step_seconds[(world, stage)] = best["seconds"]
        print(f"{world:>5} {stage:>4} {setup_s:>8.1f} {best['seconds']:>7.3f} {best['forward_s']:>6.3f} "
              f"{best['backward_s']:>6.3f} {best['step_s']:>6.3f} {best['tokens_per_s']:>9.0f} {ckpt_mb:>8.1f} "
              f"{ckpt_s:>7.2f}")

    print("\nweight push into a vLLM student service (best of 3 pushes)")
    pool = start_service("student", str(student), EngineConfig(gpu_memory_utilization=0.1, enforce_eager=True,
                                                                 max_logprobs=args.k), eos_token_id=eos)
    version = 0
    print(f"{'world':>5} {'ZeRO':>4} {'MB':>6} {'buckets':>7} {'push s':>7} {'step s':>7} {'push/step':>9}")
    for world, stage in PUSH_CONFIGS:
        group = start_learner(str(student), LearnerConfig(world_size=world, zero_stage=stage), loss)
        try:
            group.train_step(data[0])
            pushes = []
            for _ in range(3):
                version += 1
                pushes.append(push_weights(group, pool, version))
            push = min(pushes, key=lambda p: p["push_s"])
        finally:
            group.shutdown()
        step_s = step_seconds[(world, stage)]
        print(f"{world:>5} {stage:>4} {push['bytes'] / 2**20:>6.1f} {push['buckets']:>7} "
              f"{push['push_s']:>7.3f} {step_s:>7.3f} {push['push_s'] / step_s:>8.1%}")
    assert pool.versions() == [version]
    for actor in pool.actors:
        ray.kill(actor)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
