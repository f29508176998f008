"""Attribution scores against a straightforward one-row autograd computation, batched vs one row,
and the rationale selection rules on hand-made inputs. The model is a real (tiny, randomly
initialised) transformers Llama; the tokenizer is the embedded task's BPE, trained here."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator.data import Examples
from orchestrator.rationale.data import reference_batch, training_texts
from protocol.batch import REFERENCE
from orchestrator.rationale.attribution import attribution_scores
from trainer.config import LossConfig
from build.embedded.tokenizer import train_tokenizer
from trainer.losses import distillation_loss
from orchestrator.rationale.selection import (RATIONALE_PREFIX, answer_overlap, content_token_spans, select_words,
                               strip_rationale, word_scores)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Summarize this record in one sentence, then give the name and age.\nname: Ava\nage: 42",
             "Sort 4 1 8 6 from smallest to largest.", "Ava is a 42 year old baker from Lima.\nAnswer: Ava, 42"]
    return train_tokenizer(texts * 20, vocab_size=160)


def one_row_scores(model, prompt, target, kind):
    """The definition, one row, no padding: d(sum of target log-probs)/d(input embeddings)."""
    ids = torch.tensor([prompt + target])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logprobs = torch.log_softmax(model(inputs_embeds=embeds).logits[0].double(), -1)
    total = sum(logprobs[len(prompt) + j - 1, token] for j, token in enumerate(target))
    total.backward()
    grad = embeds.grad[0, : len(prompt)]
    if kind == "grad_l1":
        return grad.abs().sum(-1).numpy()
    if kind == "grad_l2":
        return grad.norm(dim=-1).numpy()
    return (grad * embeds.detach()[0, : len(prompt)]).sum(-1).abs().numpy()


ROWS = [([5, 9, 14, 3, 7], [11, 12, 2]), ([4, 8], [30, 31, 32, 33, 34, 35]), ([60, 61, 62, 63, 64, 65, 66, 67], [2])]


@pytest.mark.parametrize("kind", ["grad_l1", "grad_l2", "grad_x_input"])
def test_scores_equal_one_row_autograd(model, kind):
    for prompt, target in ROWS:
        got = attribution_scores(model, [prompt], [target], kind)[0]
        want = one_row_scores(model, prompt, target, kind)
        assert got.shape == (len(prompt),)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_batched_padded_scores_equal_one_row_scores(model):
    batched = attribution_scores(model, [p for p, _ in ROWS], [t for _, t in ROWS], "grad_l1", pad_id=0)
    for (prompt, target), got in zip(ROWS, batched):
        alone = attribution_scores(model, [prompt], [target], "grad_l1")[0]
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-7)


def test_scores_refuse_an_empty_target(model):
    with pytest.raises(ValueError, match="at least one target token"):
        attribution_scores(model, [[1, 2]], [[]])


def test_only_the_users_text_can_score(tokenizer):
    content = "Summarize this record in one sentence, then give the name and age.\nname: Ava"
    ids, spans = content_token_spans(tokenizer, content)
    assert ids == list(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                     add_generation_prompt=True, tokenize=True)["input_ids"])
    special = np.isin(ids, tokenizer.all_special_ids)
    assert special.sum() >= 2 and (spans[special] == -1).all()  # <|user|>, <|assistant|>
    inside = spans[:, 0] >= 0
    # The scored tokens spell the content exactly, and no template newline is among them.
    assert "".join(content[s:e] for s, e in spans[inside]) == content
    assert spans[inside].min() == 0 and spans[inside].max() == len(content)


def test_pieces_merge_into_words_by_max_or_sum():
    content = "Sort smallest, please"
    # Tokens: "Sort", " small", "est", ",", " please" (offsets in content).
    spans = np.array([[0, 4], [4, 10], [10, 13], [13, 14], [14, 21]])
    scores = np.array([1.0, 2.0, 5.0, 9.0, 0.5])
    words, by_max = word_scores(content, spans, scores, "max")
    assert [w for w, _ in words] == ["Sort", "smallest", "please"]  # the comma is no word
    np.testing.assert_allclose(by_max, [1.0, 5.0, 0.5])
    _, by_sum = word_scores(content, spans, scores, "sum")
    np.testing.assert_allclose(by_sum, [1.0, 7.0, 0.5])


def test_a_word_no_scored_token_covers_cannot_be_chosen():
    spans = np.array([[-1, -1], [3, 8]])
    words, merged = word_scores("go away", spans, np.array([9.0, 1.0]))
    assert np.isnan(merged[0]) and merged[1] == 1.0
    assert select_words(words, merged, 5, frozenset()) == ["away"]


def test_selection_drops_stopwords_dedupes_keeps_top_k_in_input_order():
    words = [("the", 0), ("Ava", 4), ("is", 8), ("42", 11), ("ava", 14), ("baker", 18), ("Lima", 24)]
    scores = np.array([100.0, 3.0, 50.0, 4.0, 7.0, 1.0, 6.0])
    # "the"/"is" are stopwords; "Ava" counts once, at its best occurrence ("ava", 7.0).
    assert select_words(words, scores, 3) == ["42", "ava", "Lima"]
    assert select_words(words, scores, 10) == ["42", "ava", "baker", "Lima"]
    # Ties go to the earlier word.
    assert select_words([("b", 0), ("c", 2), ("d", 4)], np.array([1.0, 1.0, 1.0]), 2, frozenset()) == ["b", "c"]


def test_answer_overlap_counts_rows_with_an_answer_word():
    assert answer_overlap([["Ava", "Lima"], ["7"], ["x"]], ["Ava, 42", "1 7 9", None]) == 1.0
    assert answer_overlap([["Lima"], ["7"]], ["Ava, 42", "1 7 9"]) == 0.5


def test_training_texts_per_format():
    ex = Examples("s", ["Q1", "Q2"], ["R1\nAnswer: 1", "R2\nAnswer: 2"], ["1", "2"], [[1], [2]], [[3], [4]], 0)
    words = [["a", "b"], ["c"]]
    answers, extra = training_texts(ex, words, "multitask")
    assert answers == [("Q1", "R1\nAnswer: 1"), ("Q2", "R2\nAnswer: 2")]
    assert extra[1][1] == f"{RATIONALE_PREFIX} c" and extra[1][0].startswith("Q2\n")
    answers, extra = training_texts(ex, words, "single_sequence")
    assert extra is None and answers[0][1] == f"{RATIONALE_PREFIX} a, b\nR1\nAnswer: 1"
    assert strip_rationale(answers[0][1]) == "R1\nAnswer: 1"
    answers, _ = training_texts(ex, words, "input_augmentation")
    assert answers[0] == (f"Q1\n{RATIONALE_PREFIX} a, b", "R1\nAnswer: 1")


def test_reference_batch_trains_on_its_own_tokens_with_cross_entropy():
    batch = reference_batch([([7, 8, 9], [4, 5, 2]), ([6], [3, 2])], policy_version=4)
    np.testing.assert_array_equal(batch.tokens, [[7, 8, 9, 4, 5, 2], [6, 3, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch.response_mask, [[True, True, True], [True, True, False]])
    assert (batch.writer == REFERENCE).all() and (batch.policy_version == 4).all()
    logits = torch.randn(2, 3, 11)
    targets = torch.tensor([[4, 5, 2], [3, 2, 0]])
    mask = torch.tensor(batch.response_mask)
    got = distillation_loss(logits, torch.tensor(batch.teacher.ids), torch.tensor(batch.teacher.logprobs), mask,
                            LossConfig(kind="cross_entropy"), targets)
    want = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(got, want)
