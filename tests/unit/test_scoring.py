import pytest
from hypothesis import given, strategies as st

from orchestrator.scoring import exact_match, extract_answer, lcs_length, rouge_l, rouge_l_whitespace, score_batch


def reference_lcs(a, b):
    """The textbook double loop, to check the row-at-a-time version against."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@pytest.mark.parametrize("a, b, expected", [
    ("a b c d", "a b c d", 4),
    ("a b c d", "b d", 2),
    ("a b c b d a b", "b d c a b a", 4),
    ("x y z", "a b c", 0),
    ("", "a b", 0),
    ("a a a", "a", 1),
    ("a b a b", "b a b a", 3),
])
def test_lcs_known_cases(a, b, expected):
    assert lcs_length(a.split(), b.split()) == expected


@given(st.lists(st.sampled_from("abcd"), max_size=12), st.lists(st.sampled_from("abcd"), max_size=12))
def test_lcs_matches_double_loop(a, b):
    assert lcs_length(a, b) == reference_lcs(a, b)


def test_rouge_l_whitespace_values():
    assert rouge_l_whitespace("a b c d", "a b c d") == 1.0
    assert rouge_l_whitespace("x y", "a b") == 0.0
    # lcs 2, precision 2/2, recall 2/4 -> F1 = 2/3
    assert rouge_l_whitespace("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l_whitespace("", "a b") == 0.0
    assert rouge_l_whitespace("", "") == 1.0
    # whitespace tokens: newlines and repeated spaces are separators
    assert rouge_l_whitespace("a\nb  c", "a b c") == 1.0


def test_rouge_l_is_rouge_score_with_stemming():
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)  # the same LCS F-measure on plain words
    assert rouge_l("The cats were Running", "the cat was run") == pytest.approx(3 / 4)  # lowercased, stemmed
    assert rouge_l_whitespace("The cats were Running", "the cat was run") == 0.0
    # punctuation and operators are not tokens: only letters and digits count
    assert rouge_l("Step 1: 12 + 3 = 15\nAnswer: 15", "step 1 12 3 15 answer 15") == 1.0
    assert rouge_l_whitespace("Step 1: 12 + 3 = 15\nAnswer: 15", "step 1 12 3 15 answer 15") == pytest.approx(0.5)  # LCS 4 of 9 and 7
    assert rouge_l("", "a b") == 0.0 and rouge_l("", "") == 0.0  # rouge-score scores an empty pair 0


def test_extract_answer():
    assert extract_answer("1 + 2 = 3\nAnswer: 3") == "3"
    assert extract_answer("Answer: 1\nmore\nAnswer:  7, 8 ") == "7, 8"
    assert extract_answer("  Answer: 5") == "5"
    assert extract_answer("no final line here") is None
    assert extract_answer("the Answer: 4 is inline") is None
    assert extract_answer("") is None
    assert extract_answer("Answer:") == ""


def test_exact_match():
    assert exact_match("x\nAnswer: 92", "92")
    assert exact_match("x\nAnswer: 1,  2", "1, 2")  # whitespace is normalized
    assert not exact_match("x\nAnswer: 93", "92")
    assert not exact_match("92", "92")  # no Answer: line, no match


def test_score_batch():
    result = score_batch(["s\nAnswer: 1", "u\nAnswer: 3", "nothing"],
                         ["1", "2", "5"],
                         ["s\nAnswer: 1", "u\nAnswer: 2", "v\nAnswer: 5"])
    assert result["n"] == 3
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["rouge_l"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert result["rouge_l_whitespace"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert score_batch([], [], [])["n"] == 0
    with pytest.raises(ValueError):
        score_batch(["a"], [], ["a"])
