"""Turning a prompt and a response into token ids, the same way for every model and dataset."""
from __future__ import annotations


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt, wrapped in the tokenizer's chat template when it has one."""
    if use_chat_template and tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding, older versions a plain list.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return tokenizer(prompt)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Token ids the model must produce: the response followed by EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
