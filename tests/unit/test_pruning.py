"""Layer pruning on three architectures (Llama with a tied head, Qwen2 with per-layer attention
kinds, GPT-2 with `transformer.h`): the student keeps exactly the chosen layers' weights, the
embeddings and the head (still tied where the source ties it), and runs."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from build.pretrained import decoder_layers, pruned_layer_indices, prune_layers

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama-tied": lambda: LlamaConfig(num_hidden_layers=7, tie_word_embeddings=True, **SMALL),
    "llama-untied": lambda: LlamaConfig(num_hidden_layers=7, tie_word_embeddings=False, **SMALL),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=7, tie_word_embeddings=True, use_sliding_window=True,
                                 sliding_window=16, max_window_layers=3, **SMALL),
    "gpt2": lambda: GPT2Config(n_layer=7, n_embd=64, n_head=4, vocab_size=96, n_positions=64),
}


def test_layer_choice_spreads_evenly_and_keeps_both_ends():
    assert pruned_layer_indices(30, 6) == [0, 6, 12, 17, 23, 29]
    assert pruned_layer_indices(7, 3) == [0, 3, 6]
    assert pruned_layer_indices(4, 4) == [0, 1, 2, 3]
    assert pruned_layer_indices(5, 1) == [0]
    with pytest.raises(ValueError, match="keep"):
        pruned_layer_indices(5, 6)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_pruned_student_holds_the_kept_layers(tmp_path, arch):
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    source.save_pretrained(tmp_path / "source")
    info = prune_layers(tmp_path / "source", tmp_path / "student", keep=3)
    assert info["kept_layers"] == [0, 3, 6] and info["of_layers"] == 7

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 3
    assert info["parameters"] == sum(p.numel() for p in student.parameters()) < info["teacher_parameters"]
    _, source_layers = decoder_layers(source)
    _, student_layers = decoder_layers(student)
    for new, old in enumerate(info["kept_layers"]):
        for (name, a), (_, b) in zip(source_layers[old].state_dict().items(), student_layers[new].state_dict().items()):
            assert torch.equal(a, b), f"layer {new} ({name}) is not source layer {old}"
    assert torch.equal(source.get_input_embeddings().weight, student.get_input_embeddings().weight)
    assert torch.equal(source.get_output_embeddings().weight, student.get_output_embeddings().weight)
    tied = student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    assert tied == bool(source.config.tie_word_embeddings)
    if getattr(source.config, "layer_types", None):  # per-layer kinds follow their layers
        assert student.config.layer_types == [source.config.layer_types[i] for i in info["kept_layers"]]
    logits = student(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
