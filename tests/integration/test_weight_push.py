"""Learner -> student vLLM service: after a push, vLLM's greedy output is transformers' greedy
output from the learner's current weights, the whole top-20 list at every scored position (and the
scored token's own logprob) matches transformers' within 1e-4 (fp32), and the service reports the
pushed version. A negative control pushes the same weights with one tensor left at its old value:
the same check must then fail.

The service starts from the learner's exported HF directory, so this also checks that vLLM
loads what ``export_hf`` writes. Tied and untied embeddings both: vLLM needs ``lm_head.weight``
in the blob even when it is tied. Three architectures: nothing in the learner or the push assumes
Llama's layout. (A tied Llama is pushed in test_pretrained_smollm2.py, on the real pretrained model.)
"""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from learner_helpers import make_batch, model_with, tiny_causal_lm, tiny_llama
from topk_checks import assert_topk_matches_model

from orchestrator.launcher import start_learner, start_service
from orchestrator.steps import push_weights
from protocol.weights import pack_state
from services.config import EngineConfig
from trainer.config import LearnerConfig, LossConfig

EOS = 1
MAX_NEW_TOKENS = 12


def hf_greedy(model, prefixes: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation of each prefix, EOS included (as vLLM returns it)."""
    out = []
    for prefix in prefixes:
        ids = torch.tensor([prefix])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                       do_sample=False, eos_token_id=EOS, pad_token_id=0)
        out.append(generated[0, len(prefix):].tolist())
    return out


def vllm_scored(pool, sequences: list[list[int]], start: int):
    """The service's top-K at positions ``start:`` of each sequence."""
    return pool.score(sequences, [start] * len(sequences), K).result().topk


# fp32 on both sides; vLLM's CPU kernels sum in another order than transformers' eager ones.
LOGPROB_ATOL = 1e-4
K = 20  # the whole top-k list is compared, not only the scored token


def vllm_greedy(pool, prefixes) -> tuple[list[list[int]], int]:
    result = pool.generate(prefixes, MAX_NEW_TOKENS, 5, temperature=0.0).result()
    return [row[:n].tolist() for row, n in zip(result.tokens, result.lengths)], result.version


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("gpt2", True)],
                         ids=["llama-untied", "qwen2-tied", "gpt2-tied"])
def test_push_makes_vllm_generate_like_the_learner(ray_cluster, tmp_path, arch, tied):
    # vLLM's CPU attention wants head_dim 64: hidden 128 over 2 heads.
    size = dict(vocab=64, hidden=128, heads=2, layers=2, max_positions=512)
    student_dir = tmp_path / "student"
    tiny_causal_lm(arch, seed=0, tied=tied, **size).save_pretrained(student_dir)
    teacher = tiny_llama(seed=1, **size)
    data = [make_batch(teacher, 300 + i, [3, 2, 5, 4], [6, 8, 4, 7]) for i in range(3)]
    rng = np.random.default_rng(7)
    prefixes = [rng.integers(2, 64, n).tolist() for n in (3, 4, 5, 6)]
    scored = [rng.integers(2, 64, 24).tolist() for _ in range(4)]  # logprobs of positions 2..23

    cfg = LearnerConfig(world_size=2, zero_stage=3, optimizer="adam", lr=5e-2)
    group = start_learner(str(student_dir), cfg, LossConfig(kind="forward_kl"))
    pool = None
    try:
        group.train_step(data[0])
        exported = group.export_hf(str(tmp_path / "export"))
        initial = group.export_state()  # the weights the service starts from (the export)
        pool = start_service("student", exported, EngineConfig(gpu_memory_utilization=0.1, enforce_eager=True,
                                                               max_logprobs=20), eos_token_id=EOS)
        before, version = vllm_greedy(pool, prefixes)
        assert version == 0
        assert before == hf_greedy(model_with(initial, exported), prefixes)  # vLLM loads the export

        for batch in data[1:]:
            group.train_step(batch)
        expected = hf_greedy(model_with(group.export_state(), exported), prefixes)
        assert expected != before  # the steps changed the greedy output, so a push that did nothing fails

        # Buckets of 64 KiB: the 0.2 MB model arrives in several, streamed from rank 0 as they are packed.
        pushed = push_weights(group, pool, version=1, bucket_mb=1 / 16)
        after, version = vllm_greedy(pool, prefixes)
        assert after == expected
        assert version == 1 and pool.versions() == [1]
        assert pushed["buckets"] > 2 and pushed["bytes"] > 0 and pushed["push_s"] > 0
        state = group.export_state()
        learner_model = model_with(state, exported)
        # The whole top-K list at every scored position, and each token's own logprob, as the learner's model gives them.
        pushed = vllm_scored(pool, scored, 2)
        assert_topk_matches_model(pushed, scored, [2] * len(scored), learner_model, LOGPROB_ATOL)

        # Negative control: one tensor of a middle layer left at its value before the steps; the same check fails,
        # and by far (more than 10x the tolerance).
        stale_name = next(n for n in state if ("layers.1." in n or ".h.1." in n) and "mlp" in n and n.endswith("weight"))
        assert not torch.equal(initial[stale_name], state[stale_name])
        pool.load_weights(pack_state({**state, stale_name: initial[stale_name]}), version=2)
        stale = vllm_scored(pool, scored, 2)
        with pytest.raises(AssertionError):
            assert_topk_matches_model(stale, scored, [2] * len(scored), learner_model, LOGPROB_ATOL)
        gap = np.abs(stale.token_logprob[stale.mask] - pushed.token_logprob[pushed.mask]).max()
        assert gap > 10 * LOGPROB_ATOL, f"{stale_name} left stale went unseen"
    finally:
        group.shutdown()
        if pool is not None:
            for actor in pool.actors:
                ray.kill(actor)
