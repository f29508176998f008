"""Top-k divergence estimates against exact full-vocabulary values on the embedded models.

The bounds below were measured on the fast build (python bench/topk_estimate.py --variant fast
prints the figures) and hold with margin; larger k must never be worse on average.
"""
import pytest

from bench.topk_estimate import measure

# |estimate - exact| in nats, and the share of SWITCH decisions (default tau0, decay) that agree with
# the exact JSD, measured on two fast builds (1378 positions each; its student is barely trained,
# so its distributions are flat and top-k lists miss much of its mass: the hard case):
#   k = 5:  JSD p99 0.41 / 0.43, JSD mean 0.032, KL p99 2.49 / 2.71, agreement 0.919 / 0.919
#   k = 20: JSD p99 0.18 / 0.21, KL p99 1.52 / 1.79, agreement 1.000 / 1.000
#   k = 50: JSD p99 0.027 / 0.018, KL p99 0.25 / 0.245, agreement 1.000 / 1.000
# Bounds: the larger of the two measurements x 1.4. At k = 5 one position can be off by most of
# ln 2 = 0.693 (p99 0.43), so a p99 bound there says nothing: only the mean error and the decision
# agreement are asserted for k = 5.
JSD_P99_BOUND = {20: 0.29, 50: 0.038}
KL_P99_BOUND = {20: 2.5, 50: 0.35}
JSD_MEAN_BOUND_K5 = 0.045
AGREEMENT_BOUND = {5: 0.88, 20: 0.98, 50: 0.98}


@pytest.fixture(scope="module")
def result(embedded_fast):
    return measure(embedded_fast, examples=24)


@pytest.mark.parametrize("k", [20, 50])
def test_estimate_error_bounds(result, k):
    row = result["by_k"][k]
    assert row["jsd"]["p99_abs_error"] < JSD_P99_BOUND[k], row
    assert row["kl"]["p99_abs_error"] < KL_P99_BOUND[k], row
    assert row["switch_decision_agreement"] > AGREEMENT_BOUND[k], row


def test_k5_estimate_is_right_on_average_and_in_most_decisions(result):
    row = result["by_k"][5]
    assert row["jsd"]["mean_abs_error"] < JSD_MEAN_BOUND_K5, row
    assert row["switch_decision_agreement"] > AGREEMENT_BOUND[5], row


def test_error_shrinks_with_k(result):
    errors = [result["by_k"][k]["jsd"]["mean_abs_error"] for k in (5, 20, 50)]
    assert errors[0] >= errors[1] >= errors[2]
