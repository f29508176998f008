"""The top-k divergence estimator (pure math, no models)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.divergence import jsd, kl, shared_support, topk_divergences
from protocol.topk import topk_from_logprobs


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _exact(p_logits, q_logits):
    p, q = np.exp(_log_softmax(p_logits)), np.exp(_log_softmax(q_logits))
    return {"jsd": jsd(p, q), "kl": kl(p, q), "reverse_kl": kl(q, p)}


def _estimate(p_logits, q_logits, k):
    tokens = np.zeros(p_logits.shape[:-1], dtype=np.int64)
    p = topk_from_logprobs(_log_softmax(p_logits), tokens, k)
    q = topk_from_logprobs(_log_softmax(q_logits), tokens, k)
    return topk_divergences(p.ids, p.logprobs, q.ids, q.logprobs)


def test_full_vocabulary_lists_give_the_exact_values():
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.normal(size=(2, 7, 16)) * 3
    exact = _exact(p_logits, q_logits)
    for k in (16, 40):  # k = V and k > V (padded slots)
        estimate = _estimate(p_logits, q_logits, k)
        for name in exact:
            np.testing.assert_allclose(estimate[name], exact[name], rtol=1e-6, atol=1e-9)  # logprobs travel as float32


def test_identical_distributions_have_zero_divergence():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 100)) * 2
    for name, value in _estimate(logits, logits.copy(), 5).items():
        np.testing.assert_allclose(value, 0.0, atol=1e-12, err_msg=name)


def test_disjoint_confident_lists_give_a_large_jsd():
    p_logits = np.full(50, -20.0)
    q_logits = np.full(50, -20.0)
    p_logits[:3] = 10.0
    q_logits[10:13] = 10.0
    d = _estimate(p_logits, q_logits, 3)
    assert d["jsd"] > 0.65  # ln 2 = 0.693 for fully disjoint supports
    assert d["kl"] > 10


def test_unlisted_rule_keeps_both_sides_normalised_and_capped():
    p_ids = np.array([[1, 2, 3]])
    p_lp = np.log(np.array([[0.5, 0.2, 0.1]]))  # tail 0.2
    q_ids = np.array([[3, 4, 5]])
    q_lp = np.log(np.array([[0.6, 0.3, 0.05]]))  # tail 0.05
    s = shared_support(p_ids, p_lp, q_ids, q_lp)
    np.testing.assert_allclose(s.p.sum(-1), 1.0)
    np.testing.assert_allclose(s.q.sum(-1), 1.0)
    # Teacher did not list 4 and 5: each gets min(0.1, 0.2 / 3).
    np.testing.assert_allclose(s.p[0, 3:6], [0.0, 0.2 / 3, 0.2 / 3])
    # Student did not list 1 and 2: each gets min(0.05, 0.05 / 3); id 3 is shared.
    np.testing.assert_allclose(s.q[0, :3], [0.05 / 3, 0.05 / 3, 0.6])


@st.composite
def _topk_pair(draw):
    vocab = draw(st.integers(2, 40))
    k = draw(st.integers(1, 60))
    scale = draw(st.floats(0.1, 30))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    p_logits, q_logits = rng.normal(size=(2, 3, vocab)) * scale
    # Some tokens with zero probability: -inf logprobs must not break anything.
    p_logits[..., rng.random(vocab) < 0.2] = -np.inf
    p_logits[..., 0] = 0.0
    return p_logits, q_logits, k


@settings(max_examples=200, deadline=None)
@given(_topk_pair())
def test_estimates_are_finite_and_in_range(pair):
    p_logits, q_logits, k = pair
    with np.errstate(invalid="ignore"):
        d = _estimate(p_logits, q_logits, k)
    for name, value in d.items():
        assert np.all(np.isfinite(value)), name
        assert np.all(value >= 0), name
    assert np.all(d["jsd"] <= np.log(2) + 1e-6)  # float32 logprobs sum to 1 ± 1e-7
