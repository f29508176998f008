"""A small BPE tokenizer trained on the task text, saved as a Hugging Face fast tokenizer
with a chat template, so the generic `apply_chat_template` path works as for real models.

Not byte-level: tokens are plain substrings. The pre-tokenizer splits text into words (with
their leading space), single digits, single punctuation marks and single whitespace
characters; the decoder concatenates tokens, so decoding gives back the text exactly.
Digits are always single tokens so that arithmetic is learnable.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT]

# The model's turn is `response + EOS`; the generation prompt ends right before it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or message['role'] == 'system' %}"
    "<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] }}<|endoftext|>"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A word with its leading space, a digit run, one punctuation mark, or one whitespace char.
PIECE_PATTERN = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\s"

# Every printable ASCII character is in the base alphabet, so no text we make is ever unknown.
ALPHABET = sorted(set(string.printable))


def train_tokenizer(texts, vocab_size=512):
    """Train BPE on `texts` and wrap it as a PreTrainedTokenizerFast with a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=ALPHABET, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,  # GPT-2 convention: no separate BOS, and none is ever prepended
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation pads on the left; training pads by hand
        model_max_length=512,
    )


def training_texts(examples):
    """The text the tokenizer learns from: prompts and responses of the train split."""
    for example in examples:
        yield example["prompt"]
        yield example["response"]

