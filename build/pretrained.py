"""Real Hugging Face checkpoints as teacher and student: a GGUF file turned into an ordinary model
directory, and a layer-pruned student cut from a teacher.

Nothing here assumes an architecture: the decoder stack is found as the model's ``ModuleList``
with ``num_hidden_layers`` entries (``model.layers`` for Llama/Qwen/Mistral, ``transformer.h``
for GPT-2), and the rest (embeddings, final norm, head, tied or not) is copied by name.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from orchestrator.text import encode_prompt


def gguf_to_hf(gguf_dir: str | Path, gguf_file: str, out_dir: str | Path) -> float:
    """Dequantise ``gguf_dir/gguf_file`` to float32 and save it as a Hugging Face directory (model,
    tokenizer, chat template). Returns the largest |logit| difference between the saved directory
    and the GGUF-loaded model on a probe prompt (0 when the copy is exact)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization entry): rebuild the
    # same architecture from a clean config and copy the dequantised weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    copy_weights(loaded.state_dict(), fresh, gguf_file)
    fresh.generation_config = loaded.generation_config
    out = Path(out_dir)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return max_logit_difference(loaded, saved, tokenizer)


def copy_weights(state: dict, model, source: str) -> None:
    """Load ``state`` into ``model``: every weight must have its place (a tied head may be absent)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not is_tied_head(model, m)]
    if missing or unexpected:
        raise RuntimeError(f"{source}: weights do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()


def is_tied_head(model, name: str) -> bool:
    """``name`` is the output head and the model ties it to the input embeddings."""
    head = model.get_output_embeddings()
    return bool(model.config.tie_word_embeddings) and head is not None and name.startswith(
        next(n for n, m in model.named_modules() if m is head))


def max_logit_difference(a, b, tokenizer, text: str = "Start with 12.\nStep 1: add 3\nWhat is the result?") -> float:
    ids = torch.tensor([encode_prompt(tokenizer, text)])
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).abs().max())


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(dotted name, module list) of the decoder stack: the ModuleList with one entry per layer."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: cannot tell which ModuleList is the decoder stack "
                         f"(ModuleLists with {n} entries: {[name for name, _ in found]})")
    return found[0]


def pruned_layer_indices(n_layers: int, keep: int) -> list[int]:
    """``keep`` layers spread evenly over ``n_layers``, first and last included (DistilBERT-style:
    every n-th layer; 6 of 30 gives 0, 6, 12, 17, 23, 29)."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"keep: must be in 1..{n_layers}, got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def prune_layers(model_dir: str | Path, out_dir: str | Path, keep: int) -> dict:
    """Save a copy of ``model_dir`` with ``keep`` of its decoder layers (and everything else:
    embeddings, final norm, head, tokenizer). Returns what was kept and the parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stack, _ = decoder_layers(teacher)
    n_layers = teacher.config.num_hidden_layers
    kept = pruned_layer_indices(n_layers, keep)

    config = teacher.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen, Gemma)
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    renumber = {old: new for new, old in enumerate(kept)}
    layer_key = re.compile(rf"^{re.escape(stack)}\.(\d+)\.(.*)$")
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = layer_key.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in renumber:
            state[f"{stack}.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    copy_weights(state, student, f"pruning {model_dir}")
    student.generation_config = teacher.generation_config
    out = Path(out_dir)
    student.save_pretrained(out)
    if (Path(model_dir) / "tokenizer_config.json").exists():  # the student shares the teacher's tokenizer
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return {"kept_layers": kept, "of_layers": n_layers,
            "parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters())}
