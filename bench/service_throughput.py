"""Services benchmark: scoring and generation throughput with top-k, conversion share, weight loads.

    python bench/service_throughput.py [--variant full] [--rows 32] [--tokens 256] [--k 20]

On the embedded teacher (scoring) and student (generation): a batch of ``rows`` sequences of
``tokens`` response tokens. Prints tokens/s, and the share of the service's wall time spent
turning vLLM's outputs into arrays (``times.convert_seconds / times.seconds``, measured inside the actor).
Then the time of ``load_weights`` into a running engine for the embedded student and for a
random ~100 MB Llama. Figures only: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def random_llama(path: Path, vocab: int, hidden: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


def without_eos(model_dir: Path, out: Path, eos: int) -> Path:
    shutil.copytree(model_dir, out)
    for name in ("config.json", "generation_config.json"):
        if (out / name).exists():
            config = json.loads((out / name).read_text())
            config["eos_token_id"] = eos
            (out / name).write_text(json.dumps(config))
    return out


def time_weight_load(pool, state: dict, repeats: int) -> tuple[float, float, int]:
    """Best (pack seconds, load seconds, bytes) over ``repeats`` loads of ``state``."""
    from protocol.weights import pack_state

    best_pack, best_load, size = float("inf"), float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        blob = pack_state(state)
        t1 = time.perf_counter()
        pool.load_weights(blob, max(pool.versions()) + 1)
        t2 = time.perf_counter()
        best_pack, best_load, size = min(best_pack, t1 - t0), min(best_load, t2 - t1), len(blob)
    return best_pack, best_load, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="full", choices=["full", "fast"])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from safetensors.torch import load_file

    from services.config import EngineConfig
    from services.model_service import raise_errors
    from orchestrator.config import load_config
    from orchestrator.launcher import connect_ray, start_service
    from build.embedded.build import build

    root = build("artifacts/embedded", variant=args.variant, seed=0)
    connect_ray(load_config(None, ["ray.dashboard=false", "ray.num_cpus=4"]))
    engine = EngineConfig(gpu_memory_utilization=0.1, enforce_eager=True, max_logprobs=max(args.k, 20),
                          cpu_kv_cache_gb=1, max_model_len=args.tokens + 64)
    # Every row must run to the token budget: copies of the models whose EOS (in config.json and
    # generation_config.json, which vLLM also stops on) is the vocabulary's last id, never emitted.
    work = Path(tempfile.mkdtemp(prefix="bench-services-"))
    eos = json.loads((root / "student" / "config.json").read_text())["vocab_size"] - 1
    teacher = start_service("teacher", str(without_eos(root / "teacher", work / "teacher", eos)), engine, eos)
    student = start_service("student", str(without_eos(root / "student", work / "student", eos)), engine, eos)
    rng = np.random.default_rng(0)
    vocab = teacher.infos[0]["vocab_size"]
    prompts = [rng.integers(3, vocab, 32).tolist() for _ in range(args.rows)]
    print(f"batch: {args.rows} rows x {args.tokens} response tokens, k={args.k}")

    def best(fn):
        results = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            results.append((time.perf_counter() - t, out))
        return min(results, key=lambda r: r[0])

    gen_s, gen = best(lambda: student.generate(prompts, args.tokens, args.k, temperature=1.0,
                                               seeds=list(range(args.rows))).result())
    raise_errors(gen)
    tokens = int(gen.lengths.sum())
    print(f"student generate: {tokens} tokens in {gen_s:.2f}s = {tokens / gen_s:.0f} tok/s; "
          f"conversion {gen.times.convert_seconds:.3f}s = {gen.times.convert_seconds / gen.times.seconds:.1%} of the service's "
          f"{gen.times.seconds:.2f}s")

    sequences = [p + gen.tokens[i, : gen.lengths[i]].tolist() for i, p in enumerate(prompts)]
    starts = [len(p) for p in prompts]
    score_s, scored = best(lambda: teacher.score(sequences, starts, args.k).result())
    raise_errors(scored)
    print(f"teacher score:    {tokens} tokens in {score_s:.2f}s = {tokens / score_s:.0f} tok/s; "
          f"conversion {scored.times.convert_seconds:.3f}s = {scored.times.convert_seconds / scored.times.seconds:.1%} of the "
          f"service's {scored.times.seconds:.2f}s")

    state = load_file(str(root / "student" / "model.safetensors"))
    if "lm_head.weight" not in state:  # vLLM's reload wants it even when tied
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    pack_s, load_s, size = time_weight_load(student, state, args.repeats)
    print(f"weight load, embedded student: {size / 1e6:.1f} MB, pack {pack_s:.3f}s, load_weights {load_s:.3f}s")

    with tempfile.TemporaryDirectory() as tmp:
        big = random_llama(Path(tmp) / "big", vocab=8192, hidden=512, layers=6)
        big_pool = start_service("big", str(Path(tmp) / "big"), engine, eos_token_id=1)
        pack_s, load_s, size = time_weight_load(big_pool, big.state_dict(), args.repeats)
        print(f"weight load, random Llama {sum(p.numel() for p in big.parameters()) / 1e6:.1f}M params: "
              f"{size / 1e6:.1f} MB, pack {pack_s:.3f}s, load_weights {load_s:.3f}s")
    ray.shutdown()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
