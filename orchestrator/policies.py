"""Who writes the next token: the switching policies as pure rules over arrays.

Every policy sees, for a batch of sequences B and a run of T consecutive response positions, the
teacher's and the student's top-k at each position (both conditioned on the same prefix), the
position index t, the token the student sampled there, and a small per-sequence state. It says
who writes each of those tokens *as if every earlier position of the run were kept*.

That one form serves both rollout strategies: lockstep calls it with T = 1 at every step;
draft-verify calls it over a drafted chunk and cuts at the first position whose writer is not
the one holding the pen. Because each rule depends only on the prefix (and, for `skd`, on the
student's sampled token), both give the same sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.config import PolicyConfig
from orchestrator.divergence import topk_divergence
from protocol.batch import REFERENCE, STUDENT, TEACHER  # writer codes (the who-wrote-it mask)


@dataclass
class PolicyState:
    """Per-sequence state, one row per sequence in the batch."""

    use_reference: np.ndarray  # bool [B]: the dataset's reference writes this whole sequence
    switched: np.ndarray  # bool [B]: adaswitch has handed the pen to the teacher for good
    history: np.ndarray  # float64 [B, L]: adaswitch's last L divergences, right-aligned
    history_len: np.ndarray  # int64 [B]: how many entries of ``history`` are filled

    def rows(self, index) -> "PolicyState":
        return PolicyState(self.use_reference[index], self.switched[index], self.history[index], self.history_len[index])

    def set_rows(self, index, rows: "PolicyState") -> None:
        """Write back the state of a subset of rows (after ``advance`` on ``self.rows(index)``)."""
        self.use_reference[index] = rows.use_reference
        self.switched[index] = rows.switched
        self.history[index] = rows.history
        self.history_len[index] = rows.history_len


@dataclass
class Decision:
    writer: np.ndarray  # int8 [B, T]: STUDENT, TEACHER or REFERENCE
    divergence: np.ndarray  # float64 [B, T]: the divergence the rule compared (NaN where none)


def init_state(policy: PolicyConfig, batch_size: int, rng: np.random.Generator) -> PolicyState:
    if policy.name == "ground_truth":
        use_reference = np.ones(batch_size, dtype=bool)
    elif policy.name == "mixed":
        # GKD's λ: each sequence is the student's with probability λ, else the reference.
        use_reference = rng.random(batch_size) >= policy.mixed.student_prob
    else:
        use_reference = np.zeros(batch_size, dtype=bool)
    window = policy.adaswitch.window
    return PolicyState(
        use_reference=use_reference,
        switched=np.zeros(batch_size, dtype=bool),
        history=np.zeros((batch_size, window)),
        history_len=np.zeros(batch_size, dtype=np.int64),
    )


def decide(
    policy: PolicyConfig,
    teacher_ids: np.ndarray,
    teacher_logprobs: np.ndarray,
    student_ids: np.ndarray,
    student_logprobs: np.ndarray,
    positions: np.ndarray,
    student_tokens: np.ndarray,
    state: PolicyState,
) -> Decision:
    """Writers for a [B, T] run of positions; top-k arrays are [B, T, k], the rest [B, T]."""
    shape = positions.shape
    nan = np.full(shape, np.nan)
    name = policy.name
    if name in ("ground_truth", "mixed"):
        writer = np.where(state.use_reference[:, None], REFERENCE, STUDENT)
        return Decision(np.broadcast_to(writer, shape).astype(np.int8), nan)
    if name == "on_policy":
        return Decision(np.full(shape, STUDENT, dtype=np.int8), nan)
    if name == "teacher":
        return Decision(np.full(shape, TEACHER, dtype=np.int8), nan)
    if name == "skd":
        top = teacher_ids[..., : policy.skd.top_k]
        listed = np.isfinite(teacher_logprobs[..., : policy.skd.top_k])
        accepted = ((top == student_tokens[..., None]) & listed).any(-1)
        return Decision(np.where(accepted, STUDENT, TEACHER).astype(np.int8), nan)
    if name == "switch":
        d = topk_divergence("jsd", teacher_ids, teacher_logprobs, student_ids, student_logprobs)
        return Decision(np.where(d > switch_threshold(policy, positions), TEACHER, STUDENT).astype(np.int8), d)
    if name == "adaswitch":
        d = topk_divergence("kl", teacher_ids, teacher_logprobs, student_ids, student_logprobs)
        return Decision(np.where(adaswitch_trigger(policy, d, state), TEACHER, STUDENT).astype(np.int8), d)
    raise ValueError(f"unknown policy {name!r}")


def first_pen(policy: PolicyConfig) -> int:
    """Who drafts first in draft-verify: the teacher only for sequence-level KD."""
    return TEACHER if policy.name == "teacher" else STUDENT


def drafts_can_be_cut(policy: PolicyConfig) -> bool:
    """Whether the verifier can cut a student draft (SKD, SWITCH, AdaSwitch): then drafts start
    short and grow while they are kept. SKD and SWITCH hand the pen over many times. AdaSwitch
    switches once, but where is unknown: a student draft of the whole response decodes, for
    nothing, every token after the switch. The other policies never cut a draft."""
    return policy.name in ("skd", "switch", "adaswitch")


def teacher_hands_back(policy: PolicyConfig) -> bool:
    """Whether a run the teacher drafts must be verified by the student: only SWITCH can hand
    the pen back (AdaSwitch's switch is one-time, `teacher` never switches)."""
    return policy.name == "switch"


def pen_after_teacher_token(policy: PolicyConfig, student_tokens_kept: np.ndarray) -> np.ndarray:
    """Who drafts after the teacher wrote a hand-over token into a student draft.

    SKD's teacher only corrects one token: the student goes on. AdaSwitch's switch is for good:
    the teacher. SWITCH decides every position from both distributions, so either pen gives the
    same decisions and only the cost differs: a teacher run of one token costs one round with
    the student drafting and two with the teacher drafting (draft, then the student takes the
    pen back). So the student keeps the pen, unless its draft was refused at the first token
    (the teacher is on a run: let it draft the run)."""
    if policy.name == "skd":
        return np.full(student_tokens_kept.shape, STUDENT, dtype=np.int8)
    if policy.name == "switch":
        return np.where(student_tokens_kept == 0, TEACHER, STUDENT).astype(np.int8)
    return np.full(student_tokens_kept.shape, TEACHER, dtype=np.int8)


def switch_threshold(policy: PolicyConfig, positions: np.ndarray) -> np.ndarray:
    """SWITCH's τ_t = τ0·exp(−λ·t): the teacher steps in more readily further into a response."""
    return policy.switch.tau0 * np.exp(-policy.switch.decay * positions)


def adaswitch_trigger(policy: PolicyConfig, d: np.ndarray, state: PolicyState) -> np.ndarray:
    """AdaSwitch: teacher from the first t with d_t > K·mean(d over the previous L steps), for good.

    ``d`` is [B, T]; the window runs over the state's history followed by the run itself. A
    full window of L earlier steps is needed before the rule can fire.
    """
    window, factor = policy.adaswitch.window, policy.adaswitch.factor
    batch, length = d.shape
    values = np.concatenate([state.history, d], axis=1)  # [B, L + T]
    filled = np.concatenate([np.arange(window)[None, :] >= window - state.history_len[:, None], np.ones_like(d, bool)], 1)
    values = np.where(filled, values, 0.0)
    csum = np.concatenate([np.zeros((batch, 1)), np.cumsum(values, axis=1)], axis=1)
    ccount = np.concatenate([np.zeros((batch, 1), np.int64), np.cumsum(filled, axis=1)], axis=1)
    # The window for run position j covers values[j : j + L] (the L steps before it).
    idx = np.arange(length)
    window_sum = csum[:, idx + window] - csum[:, idx]
    window_count = ccount[:, idx + window] - ccount[:, idx]
    fires = (window_count == window) & (d > factor * window_sum / window)
    return np.logical_or.accumulate(fires | state.switched[:, None], axis=1)


def advance(policy: PolicyConfig, state: PolicyState, decision: Decision, kept: np.ndarray) -> PolicyState:
    """State after the positions marked ``kept`` ([B, T], a prefix of each row) are appended."""
    if policy.name != "adaswitch":
        return state
    switched = state.switched | ((decision.writer == TEACHER) & kept).any(1)
    history, history_len = _push_history(state.history, state.history_len, decision.divergence, kept)
    return PolicyState(state.use_reference, switched, history, history_len)


def _push_history(history, history_len, d, kept):
    """Append the kept divergences to each row's right-aligned history, keeping the last L."""
    batch, window = history.shape
    filled = np.arange(window)[None, :] >= window - history_len[:, None]
    values = np.concatenate([history, d], axis=1)
    valid = np.concatenate([filled, kept], axis=1)
    from_right = np.cumsum(valid[:, ::-1], axis=1)[:, ::-1]  # valid entries at or after each index
    keep = valid & (from_right <= window)
    rows, cols = np.nonzero(keep)
    new_history = np.zeros_like(history)
    new_history[rows, window - from_right[rows, cols]] = values[rows, cols]
    return new_history, np.minimum(history_len + kept.sum(1), window)


def draw_from_topk(ids: np.ndarray, logprobs: np.ndarray, temperature: float, seed: int, row_ids: np.ndarray,
                   positions: np.ndarray) -> np.ndarray:
    """A token from each row's top-k ([N, k]) at ``temperature``; 0 means greedy (the top entry).

    The coordinator draws every teacher hand-over token this way, in both strategies, so that they
    follow the same distribution whichever way the rollout runs. The randomness of row i comes
    from (seed, row_ids[i], positions[i]) alone, not from a stream consumed in the order calls
    return, so a rerun draws the same tokens and lockstep and draft-verify draw the same token
    at the same position.
    """
    if temperature == 0:
        return ids[..., 0]
    gumbel = -np.log(-np.log(keyed_uniform(seed, row_ids, positions, ids.shape[-1])))
    scores = np.where(np.isfinite(logprobs), logprobs / temperature + gumbel, -np.inf)
    return np.take_along_axis(ids, scores.argmax(-1)[..., None], axis=-1)[..., 0]


def keyed_uniform(seed: int, row_ids: np.ndarray, positions: np.ndarray, slots: int) -> np.ndarray:
    """Uniform numbers in (0, 1), [N, slots], each a hash of (seed, row id, position, slot)
    (SplitMix64's finaliser, chained over the four keys)."""
    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # the arithmetic is mod 2^64 on purpose
        z = mix(np.full(len(row_ids), seed, dtype=np.uint64) + golden)
        z = mix(z ^ (np.asarray(row_ids, dtype=np.int64).astype(np.uint64) + golden))
        z = mix(z ^ (np.asarray(positions, dtype=np.int64).astype(np.uint64) + golden))
        z = mix(z[:, None] ^ (np.arange(slots, dtype=np.uint64)[None, :] + golden))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
