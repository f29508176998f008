"""The coordinator: who writes each response token, run as lockstep or as draft-verify.

lockstep      every step, every live sequence asks the student for one token with its top-k
              and the teacher for its top-k on the same prefix; the policy decides; the chosen
              token is appended. One round trip to each service per token: the reference.
draft-verify  whoever holds the pen drafts a run of tokens; the other model scores the run in
              one prefill; the policy runs over the run; tokens before the first hand-over are
              kept, the hand-over token is written, the pen passes. One round trip per hand-over.
              Draft lengths adapt per row (``next_draft_lengths``): the decisions do not depend
              on them, only the wasted decoding does.

Both write into one RolloutBuffer with the same rule (orchestrator.policies.decide) on the same
prefixes, so under greedy decoding they give identical tokens and who-wrote-it masks. Teacher
tokens are drawn from the teacher's top-k at the teacher temperature in both: by
``draw_from_topk`` for a single hand-over token (its randomness a hash of seed, row and position,
so the order in which answers come back changes nothing), by vLLM's top-k sampling when the
teacher drafts.

With ``rollout.sessions`` each row's request stays alive in both engines between its calls
(services.model_service: vLLM resumable requests), so a lockstep step sends one token per row
instead of prefilling the row again from its last whole cached KV block; the rollout ends them.

In draft-verify sequences move independently: calls to the two services overlap, and rows that
finished a hand-over draft again together as soon as half the live rows are ready (or nothing
else is in flight), so calls stay batched without a global barrier.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from orchestrator.config import PolicyConfig, RolloutConfig
from orchestrator.policies import (
    PolicyState,
    advance,
    decide,
    drafts_can_be_cut,
    draw_from_topk,
    first_pen,
    init_state,
    pen_after_teacher_token,
    teacher_hands_back,
)
from orchestrator.rollout_buffer import RolloutBuffer
from protocol.batch import REFERENCE, STUDENT, TEACHER, MixedBatch
from protocol.topk import TopK
from services.model_service import raise_errors
from services.pool import wait_any


@dataclass
class Rollout:
    """Everything a rollout needs besides its prompts."""

    policy: PolicyConfig
    cfg: RolloutConfig
    teacher: object  # services.pool.ServicePool
    student: object
    eos_token_id: int
    max_model_len: int
    vocab_size: int | None = None  # needed by rollout.divergence=exact
    timings: dict = field(default_factory=dict)


def exchange_k(ro: Rollout) -> int:
    """How many entries of each model's top-k the services return per position: the learner's
    top_k, or more where SWITCH or AdaSwitch decide on divergences (rollout.divergence[_k])."""
    if ro.policy.name not in ("switch", "adaswitch"):
        return ro.cfg.top_k
    if ro.cfg.divergence == "exact":
        if ro.vocab_size is None:
            raise ValueError("rollout.divergence=exact needs the vocabulary size (Rollout.vocab_size)")
        return ro.vocab_size
    return max(ro.cfg.top_k, ro.cfg.divergence_k or ro.cfg.top_k)


def run_rollout(
    ro: Rollout,
    prompts: list[list[int]],
    references: list[list[int]] | None,
    row_ids: np.ndarray,
    seed: int,
    policy_version: int,
) -> MixedBatch:
    """Roll out one batch of prompts with the configured strategy.

    ``row_ids`` (unique per prompt and sample) seed the student's sampling, so a run can be
    reproduced. ``policy_version`` is the student weight version the rollout must be served by:
    a student answer from any other version is an error, never a silently stale batch.
    """
    if ro.cfg.strategy not in ("lockstep", "draft_verify"):  # "auto" is resolved with the run's config
        raise ValueError(f"rollout.strategy: {ro.cfg.strategy!r} must be resolved to lockstep or draft_verify "
                         "before a rollout (load_config resolves auto from the policy)")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    state = init_state(ro.policy, len(prompts), rng)
    buf = RolloutBuffer.start(prompts, ro.cfg.max_new_tokens, ro.max_model_len, ro.cfg.top_k)
    _write_references(ro, buf, references, state)
    strategy = lockstep if ro.cfg.strategy == "lockstep" else draft_verify
    row_ids = np.asarray(row_ids, dtype=np.int64)
    try:
        strategy(ro, buf, state, row_ids, seed, policy_version)
    finally:
        if ro.cfg.sessions:  # the rows' KV goes back to the engines
            for service in (ro.student, ro.teacher):
                service.end_sessions(row_ids.tolist())
    ro.timings["rollout_seconds"] = time.perf_counter() - started
    return buf.to_batch(policy_version)


# -- lockstep --------------------------------------------------------------------------------------


def lockstep(ro: Rollout, buf: RolloutBuffer, state: PolicyState, row_ids, seed, policy_version) -> None:
    k = exchange_k(ro)
    while (live := np.flatnonzero(~buf.done)).size:
        prefixes = buf.prefixes(live)
        positions = buf.length[live]
        keys = row_ids[live].tolist()
        student = ro.student.generate(prefixes, 1, k, ro.cfg.student_temperature,
                                      seeds=_seeds(seed, row_ids[live], positions), keys=keys, sessions=ro.cfg.sessions)
        teacher = ro.teacher.generate(prefixes, 1, k, 0.0, keys=keys, sessions=ro.cfg.sessions)
        student, teacher = student.result(), teacher.result()
        raise_errors(student, "student request")
        raise_errors(teacher, "teacher request")
        _check_version(student, policy_version)
        buf.student_calls[live] += 1
        buf.teacher_calls[live] += 1

        rows_state = state.rows(live)
        d = decide(ro.policy, teacher.topk.ids[:, :1], teacher.topk.logprobs[:, :1], student.topk.ids[:, :1],
                   student.topk.logprobs[:, :1], positions[:, None], student.tokens[:, :1], rows_state)
        drawn_from = teacher.topk[:, 0].first(ro.cfg.top_k)
        teacher_tokens = draw_from_topk(drawn_from.ids, drawn_from.logprobs, ro.cfg.teacher_temperature, seed,
                                        row_ids[live], positions)
        tokens = np.where(d.writer[:, 0] == TEACHER, teacher_tokens, student.tokens[:, 0])[:, None]
        target = teacher.topk[:, :1]
        # The teacher was asked before the token existed: its logprob is known where it listed
        # the token (NaN elsewhere; no loss reads it, draft-verify's scoring pass gives it exactly).
        target.token_logprob[:, 0] = _listed_logprob(target.ids[:, 0], target.logprobs[:, 0], tokens[:, 0])
        ones = np.ones(live.size, dtype=np.int64)
        buf.write(live, tokens, ones, d.writer, target, d.divergence, ro.eos_token_id)
        state.set_rows(live, advance(ro.policy, rows_state, d, np.ones((live.size, 1), bool)))


# -- draft-verify ----------------------------------------------------------------------------------


@dataclass
class _Call:
    pending: object  # services.pool.Pending
    phase: str  # "draft" or "verify"
    pen: int  # who drafted
    rows: np.ndarray
    draft: object = None  # the draft's GenerateResult, for a verify


def draft_verify(ro: Rollout, buf: RolloutBuffer, state: PolicyState, row_ids, seed, policy_version) -> None:
    k = exchange_k(ro)
    max_draft = ro.cfg.max_draft_tokens or int(buf.budget.max())
    adaptive = ro.cfg.first_draft_tokens is not None and drafts_can_be_cut(ro.policy)
    draft_length = np.full(len(buf.done), min(ro.cfg.first_draft_tokens, max_draft) if adaptive else max_draft)
    buf.pen[:] = first_pen(ro.policy)
    calls: list[_Call] = []

    def send_drafts(rows: np.ndarray) -> None:
        for pen in (STUDENT, TEACHER):
            group = rows[buf.pen[rows] == pen]
            if not group.size:
                continue
            verified = pen == STUDENT or teacher_hands_back(ro.policy)
            # A draft nobody verifies is all kept: no reason to cut it short.
            budgets = np.minimum(buf.remaining(group), draft_length[group] if verified else max_draft).tolist()
            keys = row_ids[group].tolist()
            if pen == STUDENT:
                pending = ro.student.generate(buf.prefixes(group), budgets, k, ro.cfg.student_temperature,
                                              seeds=_seeds(seed, row_ids[group], buf.length[group]), keys=keys,
                                              sessions=ro.cfg.sessions)
                buf.student_calls[group] += 1
            else:
                # The teacher samples from its top-k, as draw_from_topk does.
                pending = ro.teacher.generate(buf.prefixes(group), budgets, k, ro.cfg.teacher_temperature,
                                              top_k=ro.cfg.top_k, seeds=_seeds(seed + 1, row_ids[group], buf.length[group]), keys=keys,
                                              sessions=ro.cfg.sessions)
                buf.teacher_calls[group] += 1
            calls.append(_Call(pending, "draft", pen, group))

    def send_verify(call: _Call, draft) -> None:
        rows = call.rows
        sequences = [prefix + draft.tokens[i, : draft.lengths[i]].tolist() for i, prefix in enumerate(buf.prefixes(rows))]
        starts = (buf.prompt_lengths[rows] + buf.length[rows]).tolist()
        verifier = ro.teacher if call.pen == STUDENT else ro.student
        pending = verifier.score(sequences, starts, k, keys=row_ids[rows].tolist())
        (buf.teacher_calls if call.pen == STUDENT else buf.student_calls)[rows] += 1
        calls.append(_Call(pending, "verify", call.pen, rows, draft))

    # Rows that finished a hand-over wait here and draft together: a call per small group would
    # pay the per-call overhead of both engines many times over (rows drift apart quickly when
    # the pen changes hands every few tokens). They go out once `regroup_fraction` of the live
    # rows are waiting, or when nothing else is in flight.
    waiting = np.flatnonzero(~buf.done)
    while waiting.size or calls:
        live = int((~buf.done).sum())
        if waiting.size and (not calls or waiting.size >= ro.cfg.regroup_fraction * live):
            send_drafts(waiting)
            waiting = waiting[:0]
        if not any(c.pending.ready() for c in calls):
            wait_any([c.pending for c in calls])
        for call in [c for c in calls if c.pending.ready()]:
            calls.remove(call)
            result = call.pending.result()
            raise_errors(result, ("student" if (call.pen == STUDENT) == (call.phase == "draft") else "teacher") + " request")
            if (call.pen == STUDENT) == (call.phase == "draft"):
                _check_version(result, policy_version)
            if call.phase == "draft":
                if call.pen == STUDENT or teacher_hands_back(ro.policy):
                    send_verify(call, result)
                    continue
                _accept_teacher_draft(ro, buf, call.rows, result)
            elif call.pen == STUDENT:
                kept = _cut_student_draft(ro, buf, state, call.rows, call.draft, result.topk, seed, row_ids[call.rows])
            else:
                kept = _cut_teacher_draft(ro, buf, state, call.rows, call.draft, result.topk)
            if call.phase == "verify" and adaptive:
                draft_length[call.rows] = next_draft_lengths(kept, max_draft)
            waiting = np.concatenate([waiting, call.rows[~buf.done[call.rows]]])


def next_draft_lengths(kept: np.ndarray, cap: int, shortest: int = 4) -> np.ndarray:
    """Each row's next draft: twice the drafted tokens the verifier kept last time, within
    [shortest, cap]. A fully kept draft doubles; a draft cut at once shrinks to ``shortest``."""
    return np.clip(2 * kept, min(shortest, cap), cap)


def _cut_student_draft(ro, buf, state, rows, draft, teacher: TopK, seed: int, row_keys: np.ndarray) -> np.ndarray:
    """The student drafted, the teacher scored: keep up to the first hand-over, where the
    teacher writes a token drawn from its top-k. Returns the drafted tokens kept per row."""
    tokens, width = draft.tokens, draft.tokens.shape[1]
    teacher = teacher.fitted(width)
    valid = np.arange(width)[None, :] < draft.lengths[:, None]
    positions = buf.length[rows][:, None] + np.arange(width)[None, :]
    rows_state = state.rows(rows)
    d = decide(ro.policy, teacher.ids, teacher.logprobs, draft.topk.ids, draft.topk.logprobs, positions, tokens, rows_state)
    handover = (d.writer == TEACHER) & valid
    has = handover.any(1)
    at = handover.argmax(1)
    count = np.where(has, at + 1, draft.lengths)

    idx = np.flatnonzero(has)
    if idx.size:
        p_ids, p_lp = teacher.ids[idx, at[idx]], teacher.logprobs[idx, at[idx]]
        top = ro.cfg.top_k
        drawn = draw_from_topk(p_ids[:, :top], p_lp[:, :top], ro.cfg.teacher_temperature, seed, row_keys[idx],
                               buf.length[rows][idx] + at[idx])
        tokens = tokens.copy()
        tokens[idx, at[idx]] = drawn
        # The score gave the logprob of the student's token there; the teacher's own is listed.
        teacher.token_logprob[idx, at[idx]] = _listed_logprob(p_ids, p_lp, drawn)
    writer = np.where(has[:, None] & (np.arange(width)[None, :] == at[:, None]), TEACHER, STUDENT).astype(np.int8)
    buf.write(rows, tokens, count, writer, teacher, d.divergence, ro.eos_token_id)
    kept = np.arange(width)[None, :] < count[:, None]
    state.set_rows(rows, advance(ro.policy, rows_state, d, kept))
    kept_draft = np.where(has, at, draft.lengths)
    buf.pen[rows] = np.where(has, pen_after_teacher_token(ro.policy, kept_draft), STUDENT)
    return kept_draft


def _cut_teacher_draft(ro, buf, state, rows, draft, student: TopK) -> np.ndarray:
    """The teacher drafted, the student scored (SWITCH): keep the teacher's tokens up to the
    first position where the rule gives the student the pen; the student drafts from there.
    Returns the drafted tokens kept per row."""
    width = draft.tokens.shape[1]
    student = student.fitted(width)
    valid = np.arange(width)[None, :] < draft.lengths[:, None]
    positions = buf.length[rows][:, None] + np.arange(width)[None, :]
    rows_state = state.rows(rows)
    d = decide(ro.policy, draft.topk.ids, draft.topk.logprobs, student.ids, student.logprobs, positions,
               draft.tokens, rows_state)
    back = (d.writer == STUDENT) & valid
    has = back.any(1)
    count = np.where(has, back.argmax(1), draft.lengths)
    buf.write(rows, draft.tokens, count, np.full(draft.tokens.shape, TEACHER, np.int8), draft.topk, d.divergence,
              ro.eos_token_id)
    state.set_rows(rows, advance(ro.policy, rows_state, d, np.arange(width)[None, :] < count[:, None]))
    buf.pen[rows] = np.where(has, STUDENT, TEACHER)
    return count


def _accept_teacher_draft(ro, buf, rows, draft) -> None:
    """A teacher draft no rule can hand back (AdaSwitch after its switch, `teacher`): all kept."""
    nan = np.full(draft.tokens.shape, np.nan)
    buf.write(rows, draft.tokens, draft.lengths, np.full(draft.tokens.shape, TEACHER, np.int8), draft.topk, nan,
              ro.eos_token_id)


# -- shared ----------------------------------------------------------------------------------------


def _write_references(ro: Rollout, buf: RolloutBuffer, references, state: PolicyState) -> None:
    """Rows the dataset's reference writes (`ground_truth`, `mixed`): one teacher scoring pass
    gives their targets; both strategies treat them alike."""
    rows = np.flatnonzero(state.use_reference)
    if not rows.size:
        return
    if references is None:
        raise ValueError(f"policy {ro.policy.name!r} needs the dataset's reference responses")
    refs = [references[r][: buf.budget[r]] for r in rows]
    if any(len(r) == 0 for r in refs):
        raise ValueError(f"empty reference response for prompt {rows[[len(r) == 0 for r in refs]][0]}")
    sequences = [buf.prompts[r] + ref for r, ref in zip(rows, refs)]
    scored = ro.teacher.score(sequences, buf.prompt_lengths[rows].tolist(), ro.cfg.top_k).result()
    raise_errors(scored, "teacher request")
    width = scored.topk.ids.shape[1]
    tokens = np.zeros((rows.size, width), dtype=np.int64)
    lengths = np.array([len(r) for r in refs])
    tokens[np.arange(width)[None, :] < lengths[:, None]] = np.concatenate(refs)
    buf.write(rows, tokens, lengths, np.full((rows.size, width), REFERENCE, np.int8), scored.topk,
              np.full((rows.size, width), np.nan), ro.eos_token_id)
    buf.done[rows] = True  # a reference is complete even without EOS
    buf.teacher_calls[rows] += 1


def _check_version(student_result, policy_version: int) -> None:
    if student_result.version != policy_version:
        raise RuntimeError(
            f"the student service answered with weight version {student_result.version}, "
            f"but this rollout is for version {policy_version}"
        )


def _listed_logprob(ids: np.ndarray, logprobs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Each row's logprob of ``tokens[i]`` from its top-k list ([N, k]); NaN where it is not listed."""
    listed = ids == tokens[:, None]
    return np.where(listed.any(1), np.where(listed, logprobs, -np.inf).max(1), np.nan)


def _seeds(seed: int, row_ids: np.ndarray, positions: np.ndarray) -> list[int]:
    """One vLLM sampling seed per (run seed, row, position): reproducible, distinct per draft."""
    mixed = (np.int64(seed) * 1_000_003 + row_ids.astype(np.int64) * 10_007 + positions.astype(np.int64)) % (2**31 - 1)
    return mixed.tolist()
