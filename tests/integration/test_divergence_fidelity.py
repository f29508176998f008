"""SWITCH and AdaSwitch on a real vocabulary: SmolLM2-135M-Instruct (49,152 tokens) as the teacher,
its cold 6-layer pruned copy as the student.

The exact rule comes from the independent reference (tests/reference_rollout.py: transformers, one
token at a time, full-vocabulary JSD and KL; it imports nothing of switchkd). Along the exact
rule's own greedy rollouts, switchkd's estimate from top-500 lists (rollout.divergence_k=500)
must make the exact rule's decision at >= 99 % of positions for SWITCH and AdaSwitch, and the
top-20 lists must show the gap they close. Figures: `python bench/divergence_fidelity.py` (README, "Deciding on a real
vocabulary").
"""
import json

import pytest

from bench.divergence_fidelity import measure, topk_estimator
from build.embedded import task
from orchestrator.text import encode_prompt

PROMPTS, NEW_TOKENS = 8, 48


@pytest.fixture(scope="module")
def result(smollm2):
    tok = smollm2["tokenizer"]
    rows = task.make_splits(3, 0, PROMPTS, 0)["validation"]
    prompts = [encode_prompt(tok, row["prompt"]) for row in rows]
    estimators = {f"topk@{k}": (lambda k=k: topk_estimator(k)) for k in (20, 500)}
    out = measure(smollm2["dir"] / "instruct", smollm2["dir"] / "student", prompts, NEW_TOKENS, tok.eos_token_id,
                  estimators)
    print(json.dumps(out, indent=1))
    return out


def test_top500_lists_decide_like_the_exact_rule(result):
    """Measured on these 8 prompts (untuned instruct teacher, cold student): at top-500 SWITCH agrees
    at 100 % of 274 positions and AdaSwitch at 99.74 % of 384; the bound is the issue's goal."""
    top500 = result["open_loop"]["topk@500"]
    assert top500["switch_position_agreement"] >= 0.99, top500
    assert top500["adaswitch_position_agreement"] >= 0.99, top500


def test_top20_lists_are_measurably_worse(result):
    """The negative control, and the error the issue reported: at top-20 the JSD estimate is off
    by 0.14 nats on average (lumping the tails lowers it) and SWITCH decided differently at 98.5 %
    agreement, AdaSwitch at 78.9 %; KL(p||q) needs the student's probability at the teacher's ids,
    which a cold student's top-20 rarely lists."""
    top20, top500 = result["open_loop"]["topk@20"], result["open_loop"]["topk@500"]
    assert top20["jsd_mean_abs_error"] > 2 * top500["jsd_mean_abs_error"], (top20, top500)
    assert top20["kl_mean_abs_error"] > top500["kl_mean_abs_error"], (top20, top500)
    assert top20["adaswitch_position_agreement"] < top500["adaswitch_position_agreement"], (top20, top500)
