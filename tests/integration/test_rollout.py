"""The coordinator on real engines: lockstep and draft-verify give the same sequences."""
import numpy as np
import pytest

from orchestrator.config import PolicyConfig, RolloutConfig, from_dict
from orchestrator.rollout import Rollout, run_rollout
from protocol.batch import REFERENCE, STUDENT, TEACHER

K = 20
# Parameters that make every rule fire on the fast embedded models, so the comparison covers
# hand-overs in both directions and not only all-student runs.
POLICY_SETTINGS = {
    # On the fast build the student is so weak that JSD exceeds this almost everywhere: the greedy
    # SWITCH comparison is then mostly teacher-held (the teacher-pen path); the mixed case is
    # covered by the fake-model test and by the sampled SKD test below.
    "switch": {"switch": {"tau0": 0.08, "decay": 0.01}},
    "adaswitch": {"adaswitch": {"window": 4, "factor": 2.0}},
    "skd": {"skd": {"top_k": 3}},
    "mixed": {"mixed": {"student_prob": 0.5}},
}


def _rollout(pools, data, policy, strategy, n, max_new_tokens, temperature, seed=0, **cfg):
    teacher, student = pools
    ro = Rollout(
        policy=from_dict(PolicyConfig, {"name": policy, **POLICY_SETTINGS.get(policy, {})}),
        cfg=from_dict(RolloutConfig, {"strategy": strategy, "top_k": K, "max_new_tokens": max_new_tokens,
                                      "student_temperature": temperature, "teacher_temperature": temperature, **cfg}),
        teacher=teacher, student=student, eos_token_id=data["eos"], max_model_len=512, vocab_size=teacher.vocab_size,
    )
    prompts = [data["prompts"][i % len(data["prompts"])] for i in range(n)]
    references = [data["references"][i % len(data["references"])] for i in range(n)]
    version = student.versions()[0]
    return run_rollout(ro, prompts, references, np.arange(n), seed, version)


@pytest.fixture(scope="module")
def pools(teacher_pool, student_pool):
    return teacher_pool, student_pool


# on_policy, teacher, skd, switch and adaswitch are compared, both strategies, with an independent
# reference in test_reference_rollout.py (which implies lockstep = draft-verify for them); the two
# policies that write reference tokens have no such reference, so they are checked here.
@pytest.mark.parametrize("policy", ["ground_truth", "mixed"])
def test_greedy_lockstep_and_draft_verify_are_identical(pools, embedded_data, policy):
    lock = _rollout(pools, embedded_data, policy, "lockstep", n=8, max_new_tokens=96, temperature=0.0)
    dv = _rollout(pools, embedded_data, policy, "draft_verify", n=8, max_new_tokens=96, temperature=0.0)
    np.testing.assert_array_equal(dv.response_lengths, lock.response_lengths)
    np.testing.assert_array_equal(dv.tokens, lock.tokens)
    np.testing.assert_array_equal(dv.writer[dv.response_mask], lock.writer[lock.response_mask])
    # The learner's targets agree too (same prefixes; prefill vs step-by-step numerics).
    np.testing.assert_allclose(dv.teacher.logprobs[dv.response_mask], lock.teacher.logprobs[lock.response_mask],
                               atol=1e-4)

    writers = set(np.unique(dv.writer[dv.response_mask]).tolist())
    expected = {"ground_truth": {REFERENCE}, "mixed": {STUDENT, REFERENCE}}[policy]
    assert expected <= writers <= {STUDENT, TEACHER, REFERENCE}, f"{policy}: got writers {writers}"

    # Draft-verify's round trips: one per hand-over, never one per token.
    calls = dv.stats["teacher_calls"] + dv.stats["student_calls"]
    assert (calls < dv.response_lengths).all()
    if policy == "ground_truth":
        assert (dv.stats["teacher_calls"] <= 1).all()


@pytest.mark.parametrize("policy", ["switch", "adaswitch"])
@pytest.mark.parametrize("mode", [{"divergence": "exact"}, {"divergence_k": 100}])
def test_greedy_identity_holds_in_every_divergence_mode(pools, embedded_data, policy, mode):
    """rollout.divergence=exact (whole-vocabulary lists) and wider top-k lists change what the rule
    sees, never the invariant: lockstep and draft-verify write the same tokens, by the same hands."""
    lock = _rollout(pools, embedded_data, policy, "lockstep", n=6, max_new_tokens=64, temperature=0.0, **mode)
    dv = _rollout(pools, embedded_data, policy, "draft_verify", n=6, max_new_tokens=64, temperature=0.0, **mode)
    np.testing.assert_array_equal(dv.tokens, lock.tokens)
    np.testing.assert_array_equal(dv.writer, lock.writer)
    assert dv.teacher.k == K  # the learner still gets top_k entries, however wide the exchange
    if policy == "switch":  # AdaSwitch's lockstep also computes d_t after its switch; draft-verify does not
        finite = np.isfinite(dv.stats["divergence_mean"])
        np.testing.assert_allclose(dv.stats["divergence_mean"][finite], lock.stats["divergence_mean"][finite],
                                   rtol=1e-3, atol=1e-5)


def test_draft_verify_with_a_draft_limit_matches_lockstep(pools, embedded_data):
    lock = _rollout(pools, embedded_data, "switch", "lockstep", n=6, max_new_tokens=80, temperature=0.0)
    dv = _rollout(pools, embedded_data, "switch", "draft_verify", n=6, max_new_tokens=80, temperature=0.0,
                  max_draft_tokens=7)
    np.testing.assert_array_equal(dv.tokens, lock.tokens)
    np.testing.assert_array_equal(dv.writer, lock.writer)


def test_sessions_change_no_token(pools, embedded_data):
    """rollout.sessions keeps each row's request in both engines between calls (a lockstep step
    then sends one token per row): the same tokens by the same hands, in both strategies, also
    where six rows outgrow the replicas' session budget (cpu_engine's session_kv_tokens) and the
    oldest sessions end and start over; no session outlives its rollout."""
    import ray

    def ended_for_room() -> int:
        return sum(ray.get(actor.info.remote())["sessions_ended_for_room"] for pool in pools for actor in pool.actors)

    plain = _rollout(pools, embedded_data, "switch", "lockstep", n=6, max_new_tokens=64, temperature=0.0)
    for strategy in ("lockstep", "draft_verify"):
        before = ended_for_room()
        kept = _rollout(pools, embedded_data, "switch", strategy, n=6, max_new_tokens=64, temperature=0.0,
                        sessions=True)
        np.testing.assert_array_equal(kept.tokens, plain.tokens)
        np.testing.assert_array_equal(kept.writer, plain.writer)
        np.testing.assert_allclose(kept.teacher.logprobs[kept.response_mask], plain.teacher.logprobs[plain.response_mask],
                                   atol=1e-4)
        assert pools[0].end_sessions() == 0 and pools[1].end_sessions() == 0
        if strategy == "lockstep":  # its rows hold 223 prompt tokens + 64 each by the end: past 256
            assert ended_for_room() > before


def test_rollout_stops_at_eos_or_budget_in_both_strategies(pools, embedded_data):
    for strategy in ("lockstep", "draft_verify"):
        batch = _rollout(pools, embedded_data, "on_policy", strategy, n=6, max_new_tokens=12, temperature=0.0)
        assert (batch.response_lengths <= 12).all()
        for i in range(len(batch)):
            response = batch.tokens[i, batch.prompt_lengths[i]: batch.prompt_lengths[i] + batch.response_lengths[i]]
            eos_at = np.flatnonzero(response == embedded_data["eos"])
            # EOS, if any, is the last token; otherwise the budget was used up.
            assert (eos_at.size == 0 and response.size == 12) or (eos_at.size == 1 and eos_at[0] == response.size - 1)


def test_sampled_switch_rates_agree_within_sampling_error(pools, embedded_data):
    # SKD: on the fast build its sampled teacher fraction is mixed (SWITCH's is ~1 there).
    """Under sampling the two strategies give the same distribution of sequences. Per-sequence
    teacher fractions are independent draws; a two-sample z-test at |z| < 3.29 fails a correct
    implementation with probability 0.001."""
    n = 128
    fractions = {}
    for strategy in ("lockstep", "draft_verify"):
        batch = _rollout(pools, embedded_data, "skd", strategy, n=n, max_new_tokens=32, temperature=1.0,
                         seed={"lockstep": 1, "draft_verify": 2}[strategy])
        fractions[strategy] = batch.stats["teacher_fraction"]
    a, b = fractions["lockstep"], fractions["draft_verify"]
    z = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert 0.02 < a.mean() < 0.98, "the setting must give a mixed switch rate for the test to mean anything"
    assert abs(z) < 3.29, f"teacher fraction lockstep {a.mean():.3f} vs draft-verify {b.mean():.3f} (z = {z:.2f})"
