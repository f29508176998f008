"""switchkd's rollouts against the independent reference (tests/reference_rollout.py), shared by
the embedded test (test_reference_rollout.py) and the SmolLM2 one (test_pretrained_smollm2.py).

Both of switchkd's strategies (real vLLM engines in Ray actors, greedy) must write the reference's
tokens by the reference's hands. A difference is allowed only where the reference's own decision
is within what can legitimately move it: numerical noise between vLLM and transformers (~1e-5 in a
logprob, NOISE below), and, where switchkd decides on top-k lists (rollout.divergence=topk), the
estimate's error measured at that very position (the estimate applied to the reference's own
top-k lists, against the exact value). There the row's comparison stops, and the test reports the
positions. Up to that point the learner's targets (teacher.ids and logprobs) must equal the top-k
of the reference's full-vocabulary softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from topk_checks import assert_topk_equals_full_softmax

from orchestrator.config import PolicyConfig, RolloutConfig, from_dict
from orchestrator.divergence import topk_divergence
from orchestrator.rollout import Rollout, run_rollout
from protocol.batch import TEACHER
from tests.reference_rollout import Rule, reference_rollout

K = 20  # the learner's list width
NOISE = 1e-3  # a decision margin (nats, or logprob gap) within this is a numerical tie
POLICIES = ["on_policy", "teacher", "skd", "switch", "adaswitch"]


@dataclass
class Pair:
    """A teacher/student pair twice over: vLLM engines (switchkd) and transformers models (the reference)."""

    pools: tuple  # (teacher pool, student pool)
    models: tuple  # (teacher, student) transformers models
    prompts: list[list[int]]
    eos: int
    new_tokens: int
    max_model_len: int
    divergence: str = "exact"  # what switchkd decides SWITCH and AdaSwitch on
    divergence_k: int | None = None
    rules: dict | None = None  # policy -> Rule (choose_rules)
    references: dict | None = None  # policy -> the reference's rollout under that rule


def choose_rules(pair: Pair, policies: list[str] = POLICIES) -> dict:
    """Rules under which the reference's own rollout has both writers (each on at least 10 % of
    the tokens), so the comparison covers hand-overs both ways: SWITCH's tau0 a quantile of the
    JSD along the student's own rollout (the median first), AdaSwitch a short window, SKD's list
    length 3 or else the median rank of the student's greedy token in the teacher's distribution
    along the teacher's rollout. SWITCH and AdaSwitch must find one; SKD may not (a cold student
    whose greedy token the teacher never ranks in its top 20 leaves the teacher every token: the
    test then still checks that path). The chosen rules' reference rollouts are kept in
    ``pair.references``."""
    rules = {"on_policy": Rule("on_policy"), "teacher": Rule("teacher")}
    pair.references = {name: run_reference(pair, rules[name]) for name in rules if name in policies or name == "on_policy"}
    jsd = np.concatenate(pair.references["on_policy"].exact_jsd)
    candidates = {
        "switch": lambda: [Rule("switch", tau0=float(np.quantile(jsd, q)), decay=0.0) for q in (0.5, 0.75, 0.9, 0.97, 0.25)],
        "adaswitch": lambda: [Rule("adaswitch", window=4, factor=2.0)],
        "skd": lambda: [Rule("skd", skd_top_k=k) for k in dict.fromkeys(
            [3, median_student_rank(pair.references.get("teacher") or run_reference(pair, Rule("teacher"))) + 1])],
    }
    for name in [p for p in candidates if p in policies]:
        tries, shares = candidates[name](), []
        for rule in tries:
            ref = run_reference(pair, rule)
            shares.append(float(np.concatenate(ref.writer).mean()))
            if 0.1 <= shares[-1] <= 0.9 or rule is tries[-1] and name == "skd":
                rules[name], pair.references[name] = rule, ref
                break
        else:
            raise AssertionError(f"{name}: no rule tried gives both writers in the reference "
                                 f"(teacher shares {shares} for {tries})")
        print(f"{name}: {rules[name]}, teacher writes {shares[-1]:.2f} of the reference's tokens")
    return rules


def median_student_rank(ref) -> int:
    """Median rank of the student's greedy token in the teacher's distribution, over the positions
    of ``ref``, capped at K - 1 (SKD's list may not be longer than the learner's)."""
    ranks = [(p > p.gather(-1, q.argmax(-1, keepdim=True))).sum(-1)
             for p, q in ((torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(ref.teacher_logprobs, ref.student_logprobs))]
    return int(min(torch.cat(ranks).median(), K - 1))


def run_reference(pair: Pair, rule: Rule):
    return reference_rollout(*pair.models, pair.prompts, rule, pair.new_tokens, pair.eos, keep_distributions=True)


def switchkd_rollout(pair: Pair, rule: Rule, strategy: str):
    teacher, student = pair.pools
    policy = {"name": rule.name, "skd": {"top_k": rule.skd_top_k}, "switch": {"tau0": rule.tau0, "decay": rule.decay},
              "adaswitch": {"window": rule.window, "factor": rule.factor}}
    ro = Rollout(from_dict(PolicyConfig, policy),
                 from_dict(RolloutConfig, {"strategy": strategy, "top_k": K, "max_new_tokens": pair.new_tokens,
                                           "student_temperature": 0.0, "teacher_temperature": 0.0,
                                           "divergence": pair.divergence, "divergence_k": pair.divergence_k}),
                 teacher, student, pair.eos, pair.max_model_len, teacher.vocab_size)
    n = len(pair.prompts)
    return run_rollout(ro, pair.prompts, None, np.arange(n), 0, student.versions()[0])


def estimate_error(pair: Pair, ref, row: int, kind: str) -> np.ndarray:
    """[T] |estimate - exact| of divergence ``kind`` at each position of ``row``: switchkd's top-k
    estimate applied to the reference's own top-``divergence_k`` lists (zero in exact mode)."""
    exact = ref.exact_jsd[row] if kind == "jsd" else ref.exact_kl[row]
    if pair.divergence == "exact":
        return np.zeros(len(exact))
    k = pair.divergence_k or K
    p = torch.from_numpy(ref.teacher_logprobs[row]).topk(k, -1)
    q = torch.from_numpy(ref.student_logprobs[row]).topk(k, -1)
    estimate = topk_divergence(kind, p.indices.numpy(), p.values.numpy(), q.indices.numpy(), q.values.numpy())
    return np.abs(estimate - exact)


def mean_of_window_before(x: np.ndarray, window: int) -> np.ndarray:
    """[T] the mean of x[t - window:t] (NaN for t < window)."""
    out = np.full(len(x), np.nan)
    if len(x) > window:
        out[window:] = sliding_window_view(x, window)[:-1].mean(-1)
    return out


def near_ties(pair: Pair, ref, row: int, rule: Rule) -> np.ndarray:
    """Positions of ``row`` where the reference's choice can legitimately come out the other way: a
    greedy argmax whose runner-up is within NOISE, or a divergence within NOISE plus the estimate's
    measured error of its threshold."""
    p, q = torch.from_numpy(ref.teacher_logprobs[row]), torch.from_numpy(ref.student_logprobs[row])
    gap = lambda lp: -lp.topk(2, -1).values.diff(dim=-1)[:, 0].numpy()  # noqa: E731  best minus runner-up
    tie = (gap(p) < NOISE) | (gap(q) < NOISE)
    if rule.name == "switch":
        tie |= np.abs(ref.exact_jsd[row] - rule.tau0) < NOISE + estimate_error(pair, ref, row, "jsd")
    if rule.name == "adaswitch":  # the trigger's margin: d_t against factor x the mean of the window before
        kl, error = ref.exact_kl[row], estimate_error(pair, ref, row, "kl")
        margin = np.abs(kl - rule.factor * mean_of_window_before(kl, rule.window))
        tie |= margin < NOISE + error + rule.factor * mean_of_window_before(error, rule.window)  # NaN: no trigger yet
    if rule.name == "skd":
        third, fourth = p.topk(rule.skd_top_k + 1, -1).values[:, -2:].T.numpy()
        tie |= (third - fourth) < NOISE
    return tie


def compare_with_reference(pair: Pair, policy: str) -> list[tuple]:
    """Run ``policy`` both ways on ``pair``; fails on any difference the reference does not excuse.
    Returns the excused (strategy, row, position) triples."""
    rule, ref = pair.rules[policy], pair.references[policy]
    n = len(pair.prompts)
    excused = []
    for strategy in ("lockstep", "draft_verify"):
        batch = switchkd_rollout(pair, rule, strategy)
        for i in range(n):
            start, length = batch.prompt_lengths[i], batch.response_lengths[i]
            tokens = batch.tokens[i, start:start + length]
            hands = batch.writer[i, :length] == TEACHER
            want_tokens, want_hands = np.asarray(ref.tokens[i]), ref.writer[i] == 1
            same = min(len(tokens), len(want_tokens))
            differ = np.flatnonzero((tokens[:same] != want_tokens[:same]) | (hands[:same] != want_hands[:same]))
            if differ.size == 0:
                assert len(tokens) == len(want_tokens), f"{strategy} row {i}: length {len(tokens)} vs {len(want_tokens)}"
                upto = same
            else:
                first = int(differ[0])
                assert near_ties(pair, ref, i, rule)[first], (
                    f"{policy} {strategy} row {i}: position {first} differs from the reference "
                    f"(token {tokens[first]} vs {want_tokens[first]}, teacher {hands[first]} vs {want_hands[first]}) "
                    "and the reference's decision there is not within noise or the estimate's measured error")
                excused.append((strategy, i, first))
                upto = first
            # The learner's targets: the teacher's top-k, as the reference's full distribution gives it.
            assert_topk_equals_full_softmax(batch.teacher.ids[i, :upto], batch.teacher.logprobs[i, :upto],
                                            ref.teacher_logprobs[i][:upto], 1e-4, f"{policy} {strategy} row {i}")
        if strategy == "draft_verify":
            check_round_trips(batch, policy)
    print(f"{policy}: positions excused (strategy, row, position): {excused}")
    assert len(excused) <= n // 2, f"{policy}: too many rows end in a tie to check anything: {excused}"
    return excused


def check_round_trips(batch, policy: str) -> None:
    """Draft-verify's round trips: one per hand-over, never one per token (SWITCH and SKD may hand
    over at every token)."""
    teacher_calls, calls = batch.stats["teacher_calls"], batch.stats["teacher_calls"] + batch.stats["student_calls"]
    if policy not in ("switch", "skd"):
        assert (calls < batch.response_lengths).all(), (calls, batch.response_lengths)
    if policy in ("on_policy", "teacher"):
        assert (teacher_calls <= 1).all(), teacher_calls
    if policy == "adaswitch":  # each student draft verified once, then the teacher continues once
        assert (teacher_calls <= batch.stats["student_calls"] + 1).all(), teacher_calls
