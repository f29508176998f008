"""switchkd's rollouts against an independent reference that cannot agree with them by construction,
on the fast embedded models (the SmolLM2 case is in test_pretrained_smollm2.py).

tests/reference_rollout.py implements the policies from DESIGN.md with plain transformers, one
token at a time, on full-vocabulary distributions, importing nothing of switchkd. Here both of
switchkd's strategies (real vLLM engines in Ray actors, rollout.divergence=exact, greedy) must
write the reference's tokens by the reference's hands, except where the reference's own decision
is a numerical tie (reference_checks.py). Thresholds come from the reference's divergences on
these prompts, so that both writers occur.
"""
import pytest
from reference_checks import POLICIES, Pair, choose_rules, compare_with_reference

from tests.reference_rollout import load_model


@pytest.fixture(scope="module")
def embedded_pair(embedded_data, teacher_pool, student_pool):
    d = embedded_data["dir"]
    pair = Pair((teacher_pool, student_pool), (load_model(d / "teacher"), load_model(d / "student")),
                embedded_data["prompts"][:8], embedded_data["eos"], new_tokens=48, max_model_len=512)
    pair.rules = choose_rules(pair)
    return pair


@pytest.mark.parametrize("policy", POLICIES)
def test_embedded_both_strategies_write_what_the_reference_writes(embedded_pair, policy):
    compare_with_reference(embedded_pair, policy)
