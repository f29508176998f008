"""Checks on the teacher and student model directories, made before any engine starts."""
from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """A model directory (or pair) that cannot serve a run; the message says which and why."""


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as err:
        raise ModelError(f"{model}: no usable tokenizer ({type(err).__name__}: {err})") from err


def check_causal_lm(model: str, role: str):
    """The config of ``model``; a clear error if it is missing or not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if ("/" not in model or model.startswith((".", "/"))) and not Path(model).exists():
        raise ModelError(f"models.{role}: directory not found: {model}")
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as err:
        raise ModelError(f"models.{role}: {model} has no readable Hugging Face config ({type(err).__name__}: {err})") from err
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"models.{role}: {model} is a {config.model_type!r} model, not a causal LM")
    # A model type can have a causal head and still be saved as something else (BERT as a masked LM).
    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    if config.architectures and not causal & set(config.architectures):
        raise ModelError(f"models.{role}: {model} holds {', '.join(config.architectures)}, not a causal LM")
    return config


def check_pair(teacher: str, student: str):
    """Teacher and student must be causal LMs with one tokenizer: the top-k ids they exchange
    mean the same tokens only then. Returns the (shared) tokenizer."""
    teacher_config = check_causal_lm(teacher, "teacher")
    student_config = check_causal_lm(student, "student")
    teacher_tok, student_tok = load_tokenizer(teacher), load_tokenizer(student)
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
        differ = sorted(set(t.items()) ^ set(s.items()), key=str)[:5]
        raise ModelError(
            f"teacher {teacher} and student {student} have different tokenizers "
            f"({len(t)} vs {len(s)} tokens; first differences: {differ}); switching needs one shared vocabulary"
        )
    if teacher_tok.eos_token_id != student_tok.eos_token_id:
        raise ModelError(f"teacher and student disagree on EOS ({teacher_tok.eos_token_id} vs {student_tok.eos_token_id})")
    # The embedding tables may be padded past the tokenizer, but must cover it.
    for role, config in (("teacher", teacher_config), ("student", student_config)):
        if config.vocab_size < len(teacher_tok):
            raise ModelError(f"models.{role}: vocab_size {config.vocab_size} is smaller than the tokenizer ({len(teacher_tok)})")
    return teacher_tok
