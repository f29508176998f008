"""Embedded default: a self-made task, tokenizer, teacher and student, built locally."""
