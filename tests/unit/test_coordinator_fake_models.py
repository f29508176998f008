"""The coordinator's bookkeeping against fake, deterministic bigram "models" (pure logic, no
vLLM, no Ray): lockstep and draft-verify must agree for every policy, prompt set and draft limit.
The real-engine version of this test is tests/integration/test_rollout.py."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import PolicyConfig, RolloutConfig, from_dict
from orchestrator.rollout import Rollout, run_rollout
from protocol.batch import REFERENCE, STUDENT, TEACHER
from protocol.topk import PAD_ID, TopK
from services.model_service import GenerateResult, ScoreResult

VOCAB, EOS = 12, 2


class FakeModel:
    """Next-token logprobs from the last token and the position: a deterministic bigram table."""

    def __init__(self, seed: int, sharpness: float):
        rng = np.random.default_rng(seed)
        self.table = rng.normal(size=(VOCAB, VOCAB)) * sharpness
        self.position = rng.normal(size=(7, VOCAB)) * sharpness * 0.5

    def logprobs(self, prefix: list[int]) -> np.ndarray:
        logits = self.table[prefix[-1]] + self.position[len(prefix) % 7]
        return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


class Done:
    """A finished call, shaped like services.pool.Pending."""

    refs: list = []

    def __init__(self, value):
        self.value = value

    def ready(self):
        return True

    def result(self):
        return self.value


class FakePool:
    def __init__(self, model: FakeModel):
        self.model = model

    def versions(self):
        return [0]

    def _topk(self, logp, k):
        order = np.argsort(-logp, kind="stable")[:k]
        return order, logp[order]

    def generate(self, prefixes, max_new_tokens, k, temperature=1.0, top_k=-1, seeds=None, keys=None, sessions=False):
        budgets = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else max_new_tokens
        width = max(budgets)
        tokens = np.full((len(prefixes), width), PAD_ID)
        topk = TopK.empty((len(prefixes), width), k)
        lengths = np.zeros(len(prefixes), int)
        for i, (prefix, budget) in enumerate(zip(prefixes, budgets)):
            rng = np.random.default_rng(None if seeds is None else seeds[i])
            seq = list(prefix)
            for t in range(budget):
                logp = self.model.logprobs(seq)
                ids, lps = self._topk(logp, k)
                if temperature == 0:
                    token = int(np.argmax(logp))
                else:
                    allowed = ids if top_k > 0 else np.arange(VOCAB)
                    p = np.exp(logp[allowed] / temperature)
                    token = int(rng.choice(allowed, p=p / p.sum()))
                tokens[i, t] = token
                topk.ids[i, t], topk.logprobs[i, t] = ids, lps
                topk.token_logprob[i, t], topk.mask[i, t] = logp[token], True
                seq.append(token)
                lengths[i] = t + 1
                if token == EOS:
                    break
        finished = np.array([lengths[i] > 0 and tokens[i, lengths[i] - 1] == EOS for i in range(len(prefixes))])
        return Done(GenerateResult(tokens[:, : lengths.max()], lengths, finished, topk[:, : lengths.max()], 0,
                                   [None] * len(prefixes)))

    def end_sessions(self, keys=None):  # a fake keeps no state between calls
        return 0

    def score(self, sequences, starts, k, keys=None):
        width = max(len(s) - r for s, r in zip(sequences, starts))
        topk = TopK.empty((len(sequences), width), k)
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            for j in range(start, len(seq)):
                logp = self.model.logprobs(seq[:j])
                ids, lps = self._topk(logp, k)
                topk.ids[i, j - start], topk.logprobs[i, j - start], topk.mask[i, j - start] = ids, lps, True
                topk.token_logprob[i, j - start] = logp[seq[j]]
        return Done(ScoreResult(topk, 0, [None] * len(sequences)))


SETTINGS = {
    "switch": {"switch": {"tau0": 0.25, "decay": 0.02}},
    "adaswitch": {"adaswitch": {"window": 3, "factor": 1.5}},
    "skd": {"skd": {"top_k": 2}},
    "mixed": {"mixed": {"student_prob": 0.5}},
}


def _run(policy, strategy, prompts, references, seed, max_draft, temperature=0.0, first_draft=16, regroup=0.5):
    ro = Rollout(
        policy=from_dict(PolicyConfig, {"name": policy, **SETTINGS.get(policy, {})}),
        cfg=from_dict(RolloutConfig, {"strategy": strategy, "top_k": 5, "max_new_tokens": 24,
                                      "max_draft_tokens": max_draft, "first_draft_tokens": first_draft,
                                      "regroup_fraction": regroup,
                                      "student_temperature": temperature,
                                      "teacher_temperature": temperature}),
        teacher=FakePool(FakeModel(100 + seed, 2.0)), student=FakePool(FakeModel(200 + seed, 1.0)),
        eos_token_id=EOS, max_model_len=64,
    )
    return run_rollout(ro, prompts, references, np.arange(len(prompts)), seed, 0)


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["on_policy", "teacher", "ground_truth", "mixed", "skd", "switch", "adaswitch"]),
    seed=st.integers(0, 1000),
    max_draft=st.one_of(st.none(), st.integers(1, 9)),
    first_draft=st.one_of(st.none(), st.integers(1, 9)),
    n=st.integers(1, 6),
    regroup=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_greedy_strategies_agree(policy, seed, max_draft, first_draft, n, regroup):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, size=rng.integers(1, 5)).tolist() for _ in range(n)]
    references = [rng.integers(3, VOCAB, size=rng.integers(1, 30)).tolist() for _ in range(n)]
    lock = _run(policy, "lockstep", prompts, references, seed, max_draft)
    dv = _run(policy, "draft_verify", prompts, references, seed, max_draft, first_draft=first_draft, regroup=regroup)
    np.testing.assert_array_equal(dv.tokens, lock.tokens)
    np.testing.assert_array_equal(dv.response_lengths, lock.response_lengths)
    np.testing.assert_array_equal(dv.writer, lock.writer)
    np.testing.assert_allclose(dv.teacher.logprobs[dv.response_mask], lock.teacher.logprobs[lock.response_mask])
    # Every response position carries the teacher's top-k of that exact prefix.
    teacher = FakeModel(100 + seed, 2.0)
    for i in range(len(prompts)):
        for j in range(dv.response_lengths[i]):
            prefix = dv.tokens[i, : dv.prompt_lengths[i] + j].tolist()
            logp = teacher.logprobs(prefix)
            np.testing.assert_allclose(dv.teacher.logprobs[i, j], np.sort(logp)[::-1][:5])
            np.testing.assert_allclose(dv.teacher.token_logprob[i, j], logp[dv.tokens[i, dv.prompt_lengths[i] + j]])


def test_draft_lengths_double_when_kept_and_shrink_when_cut():
    from orchestrator.rollout import next_draft_lengths

    kept = np.array([16, 0, 1, 3, 200])
    np.testing.assert_array_equal(next_draft_lengths(kept, cap=64), [32, 4, 4, 6, 64])
    np.testing.assert_array_equal(next_draft_lengths(kept, cap=2), [2, 2, 2, 2, 2])


def test_references_fill_whole_rows_and_respect_the_budget():
    prompts = [[3, 4], [5]]
    references = [[6] * 40, [7, 8, EOS]]
    batch = _run("ground_truth", "draft_verify", prompts, references, 0, None)
    assert batch.response_lengths.tolist() == [24, 3]  # cut to max_new_tokens
    assert (batch.writer[batch.response_mask] == REFERENCE).all()
    assert batch.tokens[1, 1:4].tolist() == [7, 8, EOS]


def test_switch_stats_describe_the_rows():
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB, size=3).tolist() for _ in range(8)]
    batch = _run("switch", "draft_verify", prompts, None, 3, None)
    s = batch.stats
    by_teacher = (batch.writer == TEACHER) & batch.response_mask
    np.testing.assert_allclose(s["teacher_fraction"], by_teacher.sum(1) / batch.response_lengths)
    assert (s["switched"] == by_teacher.any(1)).all()
    first = np.where(by_teacher.any(1), by_teacher.argmax(1), -1)
    assert (s["first_switch"] == first).all()
    assert ((batch.writer == STUDENT) | (batch.writer == TEACHER))[batch.response_mask].all()


@pytest.mark.parametrize("strategy", ["lockstep", "draft_verify"])
def test_a_student_answer_from_another_weight_version_is_refused(strategy):
    """The fake student serves weight version 0; a rollout for version 1 must not use its tokens."""
    ro = Rollout(policy=from_dict(PolicyConfig, {"name": "on_policy"}),
                 cfg=from_dict(RolloutConfig, {"strategy": strategy, "top_k": 5, "max_new_tokens": 8}),
                 teacher=FakePool(FakeModel(1, 2.0)), student=FakePool(FakeModel(2, 1.0)),
                 eos_token_id=EOS, max_model_len=64)
    with pytest.raises(RuntimeError, match="answered with weight version 0, but this rollout is for version 1"):
        run_rollout(ro, [[3, 4]], None, np.arange(1), seed=0, policy_version=1)
