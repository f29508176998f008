"""Switching policies as pure rules (no models): each rule, and chunk == step-by-step."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import PolicyConfig, from_dict
from orchestrator.policies import (
    REFERENCE,
    STUDENT,
    TEACHER,
    Decision,
    advance,
    decide,
    draw_from_topk,
    init_state,
    keyed_uniform,
)

POLICIES = ["on_policy", "teacher", "ground_truth", "mixed", "skd", "switch", "adaswitch"]


def _policy(name, **sections):
    return from_dict(PolicyConfig, {"name": name, **sections})


def _random_topk(rng, B, T, k, V, sharpness):
    logits = rng.normal(size=(B, T, V)) * sharpness
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, -1)[..., :k]
    return ids, np.take_along_axis(logp, ids, -1)


def _inputs(seed, B=4, T=24, k=8, V=40):
    rng = np.random.default_rng(seed)
    t_ids, t_lp = _random_topk(rng, B, T, k, V, 2.0)
    s_ids, s_lp = _random_topk(rng, B, T, k, V, rng.uniform(0.5, 3.0, size=(B, T, 1)))
    tokens = rng.integers(0, V, size=(B, T))
    positions = np.broadcast_to(np.arange(T), (B, T)) + rng.integers(0, 50, size=(B, 1))
    return t_ids, t_lp, s_ids, s_lp, positions, tokens


def test_fixed_writer_policies():
    args = _inputs(0)
    rng = np.random.default_rng(0)
    for name, want in [("on_policy", STUDENT), ("teacher", TEACHER), ("ground_truth", REFERENCE)]:
        policy = _policy(name)
        d = decide(policy, *args, init_state(policy, 4, rng))
        assert (d.writer == want).all(), name


def test_mixed_draws_one_writer_per_sequence_with_probability_lambda():
    policy = _policy("mixed", mixed={"student_prob": 0.3})
    state = init_state(policy, 20_000, np.random.default_rng(1))
    assert abs((~state.use_reference).mean() - 0.3) < 0.02  # 5 sigma at n = 20k
    args = _inputs(1, B=6)
    d = decide(policy, *args, state.rows(slice(0, 6)))
    for row in d.writer:
        assert len(set(row.tolist())) == 1 and row[0] in (STUDENT, REFERENCE)


def test_skd_hands_over_when_the_sampled_token_is_not_in_the_teachers_top_k():
    policy = _policy("skd", skd={"top_k": 2})
    teacher_ids = np.array([[[5, 6, 7], [5, 6, 7], [5, 6, 7]]])
    teacher_lp = np.log(np.full((1, 3, 3), 0.3))
    tokens = np.array([[6, 7, 5]])  # 7 is listed but third: outside K = 2
    d = decide(policy, teacher_ids, teacher_lp, teacher_ids, teacher_lp, np.array([[0, 1, 2]]), tokens,
               init_state(policy, 1, np.random.default_rng(0)))
    assert d.writer.tolist() == [[STUDENT, TEACHER, STUDENT]]


def test_switch_threshold_decays_with_position():
    # The same disagreement at every position: below τ0 at t = 0, above τ_t later on.
    policy = _policy("switch", switch={"tau0": 0.3, "decay": 0.05})
    t_ids = np.tile(np.array([0, 1, 2]), (1, 40, 1))
    t_lp = np.log(np.tile(np.array([0.7, 0.2, 0.1]), (1, 40, 1)))
    s_lp = np.log(np.tile(np.array([0.3, 0.5, 0.2]), (1, 40, 1)))
    positions = np.arange(40)[None]
    d = decide(policy, t_ids, t_lp, t_ids, s_lp, positions, np.zeros((1, 40), int),
               init_state(policy, 1, np.random.default_rng(0)))
    jsd = d.divergence[0, 0]
    threshold = 0.3 * np.exp(-0.05 * positions[0])
    assert (d.writer[0] == np.where(jsd > threshold, TEACHER, STUDENT)).all()
    assert d.writer[0, 0] == STUDENT and d.writer[0, -1] == TEACHER


def test_adaswitch_switches_once_after_a_spike_over_a_full_window():
    policy = _policy("adaswitch", adaswitch={"window": 3, "factor": 2.0})
    state = init_state(policy, 2, np.random.default_rng(0))
    d = np.array([[9.0, 1.0, 1.0, 1.0, 2.5, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0, 1.5, 1.0, 1.0]])
    from orchestrator.policies import adaswitch_trigger

    fired = adaswitch_trigger(policy, d, state)
    # Row 0: no switch before a full window of 3 (9.0 is the first value); at index 4 the window
    # (1, 1, 1) has mean 1 and 2.5 > 2·1: teacher from then on, even though later d is small.
    assert fired[0].tolist() == [False, False, False, False, True, True, True]
    assert not fired[1].any()


def _stepwise(policy, args, state):
    """Lockstep's use of a policy: one position at a time, every position kept."""
    t_ids, t_lp, s_ids, s_lp, positions, tokens = args
    writers = []
    for t in range(positions.shape[1]):
        step = slice(t, t + 1)
        d = decide(policy, t_ids[:, step], t_lp[:, step], s_ids[:, step], s_lp[:, step], positions[:, step],
                   tokens[:, step], state)
        writers.append(d.writer[:, 0])
        state = advance(policy, state, d, np.ones((positions.shape[0], 1), bool))
    return np.stack(writers, 1)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(POLICIES), seed=st.integers(0, 10_000), cut=st.integers(1, 23),
       window=st.integers(1, 6), factor=st.floats(1.0, 3.0), tau0=st.floats(0.0, 0.6))
def test_a_chunk_decides_like_step_by_step(name, seed, cut, window, factor, tau0):
    """The pure form of the lockstep == draft-verify invariant: deciding a whole run at once, or
    a run cut in two with the state advanced over the first part, equals deciding one position
    at a time."""
    policy = _policy(name, adaswitch={"window": window, "factor": factor}, switch={"tau0": tau0, "decay": 0.02},
                     skd={"top_k": 4})
    args = _inputs(seed)
    B = args[4].shape[0]
    state = init_state(policy, B, np.random.default_rng(seed))
    want = _stepwise(policy, args, state)

    whole = decide(policy, *args, state)
    assert (whole.writer == want).all()

    first = [a[:, :cut] for a in args]
    second = [a[:, cut:] for a in args]
    d1 = decide(policy, *first, state)
    state2 = advance(policy, state, d1, np.ones((B, cut), bool))
    d2 = decide(policy, *second, state2)
    assert (np.concatenate([d1.writer, d2.writer], 1) == want).all()


def test_advance_keeps_only_the_kept_prefix_in_adaswitch_history():
    policy = _policy("adaswitch", adaswitch={"window": 3, "factor": 2.0})
    state = init_state(policy, 2, np.random.default_rng(0))
    decision = Decision(np.zeros((2, 4), np.int8), np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    kept = np.array([[True, True, False, False], [True, True, True, True]])
    new = advance(policy, state, decision, kept)
    assert new.history_len.tolist() == [2, 3]
    assert new.history[0, 1:].tolist() == [1.0, 2.0]
    assert new.history[1].tolist() == [6.0, 7.0, 8.0]


def test_draw_from_topk_greedy_and_sampling_frequencies():
    ids = np.array([[7, 3, 9, 0]])
    logprobs = np.array([[np.log(0.5), np.log(0.3), np.log(0.2), -np.inf]])  # the last slot is empty
    assert draw_from_topk(ids, logprobs, 0.0, 0, np.array([0]), np.array([0])).tolist() == [7]
    n = 40_000
    rows, positions = np.arange(n), np.zeros(n, dtype=np.int64)  # 40k different rows at one position
    draws = draw_from_topk(np.repeat(ids, n, 0), np.repeat(logprobs, n, 0), 1.0, 0, rows, positions)
    assert 0 not in draws
    freq = np.array([(draws == i).mean() for i in (7, 3, 9)])
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.012)  # > 5 sigma at n = 40k
    # Temperature 0.5 squares and renormalises the top-k probabilities.
    draws = draw_from_topk(np.repeat(ids, n, 0), np.repeat(logprobs, n, 0), 0.5, 1, rows, positions)
    want = np.array([0.25, 0.09, 0.04]) / 0.38
    np.testing.assert_allclose([(draws == i).mean() for i in (7, 3, 9)], want, atol=0.012)
    # One row along 40k positions too (the draws are a hash of seed, row, position and slot).
    draws = draw_from_topk(np.repeat(ids, n, 0), np.repeat(logprobs, n, 0), 1.0, 2, np.zeros(n, np.int64), rows)
    np.testing.assert_allclose([(draws == i).mean() for i in (7, 3, 9)], [0.5, 0.3, 0.2], atol=0.012)


def test_teacher_draws_depend_on_row_and_position_not_on_call_order():
    ids = np.tile(np.arange(6), (50, 1))
    logprobs = np.log(np.full((50, 6), 1 / 6))
    rows, positions = np.arange(50) * 7 + 3, np.arange(50) % 11
    together = draw_from_topk(ids, logprobs, 1.0, 5, rows, positions)
    order = np.random.default_rng(0).permutation(50)
    shuffled = draw_from_topk(ids[order], logprobs[order], 1.0, 5, rows[order], positions[order])
    np.testing.assert_array_equal(shuffled, together[order])  # the same token for each (row, position)
    one_at_a_time = [draw_from_topk(ids[i:i + 1], logprobs[i:i + 1], 1.0, 5, rows[i:i + 1], positions[i:i + 1])[0]
                     for i in range(50)]
    np.testing.assert_array_equal(one_at_a_time, together)
    assert not np.array_equal(draw_from_topk(ids, logprobs, 1.0, 6, rows, positions), together)  # the seed matters
    u = keyed_uniform(5, rows, positions, 6)
    assert u.shape == (50, 6) and (u > 0).all() and (u < 1).all() and len(np.unique(u)) == u.size


@pytest.mark.parametrize("name", POLICIES)
def test_writer_codes_are_valid(name):
    policy = _policy(name)
    d = decide(policy, *_inputs(3), init_state(policy, 4, np.random.default_rng(3)))
    assert d.writer.dtype == np.int8 and set(np.unique(d.writer)) <= {STUDENT, TEACHER, REFERENCE}
