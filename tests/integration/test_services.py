"""Teacher and student services: real vLLM engines in real Ray actors, on the embedded models."""
import time

import numpy as np
import pytest
import torch
from topk_checks import assert_topk_matches_model

from protocol.weights import pack_state
from services.model_service import RequestError, raise_errors
from tests.reference_rollout import load_model

K = 20


@pytest.fixture(scope="module")
def models(embedded_data):
    data = embedded_data
    prompts = data["prompts"][:6]
    sequences = [p + r for p, r in zip(prompts, data["references"][:6])]
    return {"dir": data["dir"], "eos": data["eos"], "prompts": prompts, "sequences": sequences}


@pytest.mark.parametrize("path", ["score", "generate"])
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_topk_matches_transformers_full_vocabulary(teacher_pool, student_pool, models, role, path):
    """Both engines, both paths: the student's top-k is what SWITCH and AdaSwitch decide on, the
    generate path is what every draft returns."""
    pool = teacher_pool if role == "teacher" else student_pool
    prompts = models["prompts"]
    if path == "score":
        sequences, starts = models["sequences"], [len(p) for p in prompts]
        result = pool.score(sequences, starts, K).result()
    else:  # sampled (seeded), so the checked positions are not only the model's own argmax
        result = pool.generate(prompts, 24, K, temperature=1.0, seeds=list(range(len(prompts)))).result()
        sequences = [p + result.tokens[i, : result.lengths[i]].tolist() for i, p in enumerate(prompts)]
        starts = [len(p) for p in prompts]
    raise_errors(result)
    # against transformers' full softmax of the same model: logprobs within 1e-4, ids where not a near-tie
    assert_topk_matches_model(result.topk, sequences, starts, load_model(models["dir"] / role))


def test_generation_returns_k_entries_and_is_deterministic_when_greedy(student_pool, models):
    prompts = models["prompts"]
    first = student_pool.generate(prompts, 40, K, temperature=0.0).result()
    second = student_pool.generate(prompts, 40, K, temperature=0.0).result()
    raise_errors(first)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    assert first.topk.ids.shape == (*first.tokens.shape, K)
    for i, n in enumerate(first.lengths):
        assert 0 < n <= 40
        assert first.topk.mask[i, :n].all() and not first.topk.mask[i, n:].any()
        # Greedy: the sampled token is the top-1 entry and its logprob is the top logprob.
        np.testing.assert_array_equal(first.tokens[i, :n], first.topk.ids[i, :n, 0])
        np.testing.assert_allclose(first.topk.token_logprob[i, :n], first.topk.logprobs[i, :n, 0], atol=1e-6)
        assert first.finished_eos[i] == (first.tokens[i, n - 1] == models["eos"])
    # Sampling from the top-k only: every sampled token is listed in that position's top-k.
    sampled = student_pool.generate(prompts, 40, K, temperature=1.0, top_k=K, seeds=list(range(len(prompts)))).result()
    listed = (sampled.topk.ids == sampled.tokens[..., None]).any(-1)
    assert listed[sampled.topk.mask].all()
    again = student_pool.generate(prompts, 40, K, temperature=1.0, top_k=K, seeds=list(range(len(prompts)))).result()
    np.testing.assert_array_equal(sampled.tokens, again.tokens)  # seeded sampling is reproducible


def test_load_weights_changes_output_and_restores_it_exactly(student_pool, models):
    from safetensors.torch import load_file

    prompts = models["prompts"][:3]
    before = student_pool.generate(prompts, 30, K, temperature=0.0).result()
    original = load_file(models["dir"] / "student" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    perturbed = {n: t + 0.5 * t.std() * torch.randn(t.shape, generator=g) for n, t in original.items()}
    version = before.version + 1
    assert student_pool.load_weights(pack_state(perturbed), version) == [version]
    changed = student_pool.generate(prompts, 30, K, temperature=0.0).result()
    assert changed.version == version
    assert not np.array_equal(changed.tokens, before.tokens)
    student_pool.load_weights(pack_state(original), version + 1)
    restored = student_pool.generate(prompts, 30, K, temperature=0.0).result()
    assert restored.version == version + 1
    np.testing.assert_array_equal(restored.tokens, before.tokens)
    np.testing.assert_array_equal(restored.topk.logprobs, before.topk.logprobs)
    with pytest.raises(Exception, match="not newer"):
        import ray

        ray.get(student_pool.actors[0].load_weights.remote(pack_state(original), 1))


def lockstep_turns_match_fresh_calls(pool, reference, prefixes, keys, steps: int, after_turn=lambda: None):
    """``steps`` lockstep turns with sessions on ``pool``, growing ``prefixes`` in place: each answer
    is ``reference``'s to the same prefixes without a session, each turn after the first sends one
    token per row, and odd turns then write a token the model did not pick (a hand-over)."""
    for step in range(steps):
        turn = pool.generate(prefixes, 1, K, temperature=0.0, keys=keys, sessions=True).result()
        fresh = reference.generate(prefixes, 1, K, temperature=0.0).result()
        raise_errors(turn)
        np.testing.assert_array_equal(turn.tokens, fresh.tokens)
        np.testing.assert_allclose(turn.topk.logprobs, fresh.topk.logprobs, atol=1e-4)
        assert turn.times.prompt_tokens == (len(prefixes) if step else sum(map(len, prefixes)))
        after_turn()
        for i, prefix in enumerate(prefixes):
            prefix.append(int(turn.topk.ids[i, 0, step % 2]))


def test_a_session_sends_only_new_tokens_and_answers_as_a_fresh_call(student_pool, models):
    """generate(sessions=True) keeps each row's request in the engine between calls: lockstep's next
    step sends one token per row, also where the coordinator wrote a token the model did not
    sample; a prefix that does not extend the session (a draft cut short) starts it over; the
    answers are always those of a call with no session; a weight load ends every session."""
    import ray

    keys = ["session-a", "session-b", "session-c"]
    prefixes = [list(p) for p in models["prompts"][:3]]

    def kv_held():  # each session holds KV for the prefix it was sent
        info = ray.get(student_pool.actors[0].info.remote())
        assert info["sessions"] == 3 and info["session_tokens"] == sum(map(len, prefixes)) <= info["session_kv_tokens"]

    lockstep_turns_match_fresh_calls(student_pool, student_pool, prefixes, keys, 6, after_turn=kv_held)

    cut = [p[:-3] for p in prefixes]
    draft = student_pool.generate(cut, 4, K, temperature=0.0, keys=keys, sessions=True).result()
    fresh = student_pool.generate(cut, 4, K, temperature=0.0).result()
    assert draft.times.prompt_tokens == sum(map(len, cut))  # started over from the whole prefix
    np.testing.assert_array_equal(draft.tokens, fresh.tokens)
    np.testing.assert_allclose(draft.topk.logprobs, fresh.topk.logprobs, atol=1e-4)
    # The draft kept whole: the next call sends its last token only (the engine computed the rest).
    kept = [c + draft.tokens[i, : draft.lengths[i]].tolist() for i, c in enumerate(cut)]
    assert (draft.lengths == 4).all()
    after = student_pool.generate(kept, 1, K, temperature=0.0, keys=keys, sessions=True).result()
    assert after.times.prompt_tokens == len(kept)
    np.testing.assert_array_equal(after.tokens, student_pool.generate(kept, 1, K, temperature=0.0).result().tokens)

    assert student_pool.end_sessions(keys[:1]) == 1 and student_pool.end_sessions(keys[:1]) == 0
    from safetensors.torch import load_file

    weights = pack_state(load_file(models["dir"] / "student" / "model.safetensors"))
    student_pool.load_weights(weights, after.version + 1)  # the same weights, a new version
    assert student_pool.end_sessions() == 0  # the load ended the other two


def test_streamed_buckets_load_like_one_blob_and_a_failed_load_serves_no_version(student_pool, models):
    """The weights in three buckets give the very outputs of the weights they came from; a bucket
    the engine cannot load (a tensor of the wrong shape) takes the replica out of the push and has
    Ray restart it (vLLM cannot reload in place after a failed reload), and the next push loads."""
    import ray
    from safetensors.torch import load_file

    prompts = models["prompts"][:3]
    before = student_pool.generate(prompts, 30, K, temperature=0.0).result()
    original = load_file(models["dir"] / "student" / "model.safetensors")
    names = list(original)
    buckets = [pack_state({n: original[n] for n in names[i::3]}) for i in range(3)]
    version = max(student_pool.versions()) + 1
    pushed = student_pool.load_weight_buckets(buckets, version)
    assert pushed == {"failed": [], "bytes": sum(len(b) for b in buckets), "buckets": 3}
    streamed = student_pool.generate(prompts, 30, K, temperature=0.0).result()
    assert streamed.version == version
    np.testing.assert_array_equal(streamed.tokens, before.tokens)
    np.testing.assert_array_equal(streamed.topk.logprobs, before.topk.logprobs)

    wrong = pack_state({name: torch.zeros(3, 3) if name == names[0] else t for name, t in original.items()})
    assert ray.get(student_pool.actors[0].info.remote())["version"] == version
    assert student_pool.load_weight_buckets([wrong], version + 1)["failed"] == [0]
    assert "replica_restarted_after_failed_load" in [e["event"] for e in student_pool.take_events()]
    assert student_pool.versions() == [0]  # restarted, at its base weights (this pool keeps none)
    assert student_pool.load_weight_buckets(buckets, version + 2)["failed"] == []
    again = student_pool.generate(prompts, 30, K, temperature=0.0).result()
    assert again.version == version + 2
    np.testing.assert_array_equal(again.tokens, before.tokens)


def test_calls_share_the_running_batch_and_a_weight_load_waits_for_them(student_pool, models):
    """A one-row score sent while a long 48-row generate runs on the same replica joins its batch:
    it is answered first, with what it gives alone. A weight load sent meanwhile waits for the
    long call, which reports the version it ran on; the next call sees the new one."""
    import ray
    from safetensors.torch import load_file

    replica = student_pool.actors[0]
    sequence, start = models["sequences"][:1], [len(models["prompts"][0])]
    alone = ray.get(replica.score.remote(sequence, start, K))
    version = alone.version
    prompts = (models["prompts"] * 8)[:48]
    room = ray.get(replica.info.remote())["max_model_len"] - max(len(p) for p in prompts)
    # ignore_eos: every row runs to the context's end, so the long call lasts seconds, not a lucky few steps
    long_call = replica.generate.remote(prompts, room, K, 1.0, -1, list(range(48)), True)
    time.sleep(0.5)  # the long call is running
    short = ray.get(replica.score.remote(sequence, start, K))
    original = load_file(models["dir"] / "student" / "model.safetensors")
    load_sent_at = time.time()
    load = replica.load_weights.remote(pack_state(original), version + 1)
    ray.wait([load], num_returns=1)
    load_done_at = time.time()
    long = ray.get(long_call)
    assert long.times.answered_at > load_sent_at  # the load was sent while the long call ran...
    # ...and was done only after the long call's engine work ended (its conversion may overlap the load)
    assert load_done_at > long.times.answered_at - long.times.convert_seconds
    assert short.times.received_at < long.times.answered_at and short.times.answered_at < long.times.answered_at
    assert short.times.engine_steps < long.times.engine_steps
    np.testing.assert_array_equal(short.topk.mask, alone.topk.mask)
    np.testing.assert_allclose(short.topk.logprobs, alone.topk.logprobs, atol=1e-4)  # another batch, same numbers
    assert ray.get(load) == version + 1
    assert long.version == version and short.version == version
    assert ray.get(replica.score.remote(sequence, start, K)).version == version + 1


def test_a_verify_reads_the_prefix_cache_and_stays_exact(ray_cluster, cpu_engine, student_pool, models):
    """With services.*.score_reads_prefix_cache, a verify's prefix computed by the call before
    comes from vLLM's prefix cache (128-token blocks on its CPU build), and the answer is the
    model's. The same rows scored again hit the cache past their response start, where vLLM has no
    logprobs: those rows are scored again without it, and are still the model's."""
    from dataclasses import replace

    from orchestrator.launcher import start_service

    reading = start_service("student-reads-cache", str(models["dir"] / "student"),
                            replace(cpu_engine, score_reads_prefix_cache=True), models["eos"])
    try:
        long = [t for s in models["sequences"] for t in s][:300]
        assert len(long) == 300
        rows = [long, long[::-1]]  # two rows that share no prefix
        # A 100-token "draft" at 200: the call before leaves one whole block (128) of each prefix in
        # the cache; the verify then leaves two (256), past the start.
        starts = [200, 200]
        raise_errors(reading.score([r[: starts[0]] for r in rows], [1, 1], K).result())  # the call before
        verify = reading.score(rows, starts, K).result()
        raise_errors(verify)
        assert verify.times.cached_tokens >= 2 * 128  # at least one whole block of each prefix
        assert verify.times.prompt_tokens == sum(map(len, rows))  # no row scored again
        model = load_model(models["dir"] / "student")
        assert_topk_matches_model(verify.topk, rows, starts, model)
        again = reading.score(rows, starts, K).result()
        assert again.times.prompt_tokens == 2 * sum(map(len, rows))  # both rows hit past their start: scored again
        assert_topk_matches_model(again.topk, rows, starts, model)
        # The default (vLLM's): a verify prefills its whole prefix, cached or not.
        default = student_pool.score(rows, starts, K).result()
        assert default.times.cached_tokens == 0 and default.times.prompt_tokens == sum(map(len, rows))
    finally:
        for actor in reading.actors:
            ray_cluster.kill(actor)


def test_the_asyncllm_variant_answers_as_the_service(ray_cluster, cpu_engine, student_pool, models):
    """bench/round_trip.py and bench/rollout.py --async time the same engine served by vLLM's
    AsyncLLM in an async actor: calls in flight together give ModelService's answers there, also
    as sessions (vLLM's streaming input), which send only each turn's new tokens."""
    from dataclasses import replace

    from orchestrator.launcher import start_service
    from services.async_model_service import AsyncModelService

    variant = start_service("student-async", str(models["dir"] / "student"), replace(cpu_engine, num_cpus=0),
                            models["eos"], actor_class=AsyncModelService)
    try:
        prompts, sequences = models["prompts"], models["sequences"]
        starts = [len(p) for p in prompts]
        drafts = [pool.generate(prompts, 24, K, temperature=0.0) for pool in (variant, student_pool)]
        scores = [pool.score(sequences, starts, K) for pool in (variant, student_pool)]  # beside the drafts
        (draft, expected_draft), (score, expected_score) = [[p.result() for p in pair] for pair in (drafts, scores)]
        for got, expected in ((draft, expected_draft), (score, expected_score)):
            raise_errors(got)
            np.testing.assert_array_equal(got.topk.mask, expected.topk.mask)
            np.testing.assert_allclose(got.topk.logprobs, expected.topk.logprobs, atol=1e-4)
        np.testing.assert_array_equal(draft.tokens, expected_draft.tokens)
        np.testing.assert_array_equal(draft.finished_eos, expected_draft.finished_eos)
        keys, prefixes = ["async-a", "async-b"], [list(p) for p in prompts[:2]]
        lockstep_turns_match_fresh_calls(variant, student_pool, prefixes, keys, 3)
        cut = [p[:-2] for p in prefixes]  # a draft cut short: its session starts over
        draft = variant.generate(cut, 4, K, temperature=0.0, keys=keys, sessions=True).result()
        assert draft.times.prompt_tokens == sum(map(len, cut))
        np.testing.assert_array_equal(draft.tokens, student_pool.generate(cut, 4, K, temperature=0.0).result().tokens)
        assert variant.end_sessions(keys[:1]) == 1 and variant.end_sessions() == 1
    finally:
        for actor in variant.actors:
            ray_cluster.kill(actor)


def test_two_replicas_spread_requests_and_match_one_replica(teacher_pool, models):
    import ray

    seqs = models["sequences"] * 3
    starts = [len(p) for p in models["prompts"]] * 3
    calls_before = teacher_pool.calls_per_replica.copy()
    spread = teacher_pool.score(seqs, starts, K, keys=list(range(len(seqs)))).result()
    assert ((teacher_pool.calls_per_replica - calls_before) > 0).all()  # both replicas served part
    single = ray.get(teacher_pool.actors[0].score.remote(seqs, starts, K))
    np.testing.assert_array_equal(spread.topk.ids, single.topk.ids)
    np.testing.assert_allclose(spread.topk.logprobs, single.topk.logprobs, atol=1e-5)
    gen = teacher_pool.generate(models["prompts"] * 2, 20, K, temperature=0.0, keys=list(range(12))).result()
    gen_single = ray.get(teacher_pool.actors[1].generate.remote(models["prompts"] * 2, 20, K, 0.0))
    np.testing.assert_array_equal(gen.tokens, gen_single.tokens)


def test_sticky_keys_keep_a_sequence_on_its_replica(teacher_pool, models):
    seqs = models["sequences"][:2]
    starts = [len(p) for p in models["prompts"][:2]]
    teacher_pool.score(seqs, starts, K, keys=["a", "b"]).result()
    owners = dict(teacher_pool._sticky)
    teacher_pool.score(seqs, starts, K, keys=["a", "b"]).result()
    assert teacher_pool._sticky["a"] == owners["a"] and teacher_pool._sticky["b"] == owners["b"]


def test_bad_requests_are_named_and_the_rest_are_served(teacher_pool, models):
    import ray

    good = models["sequences"][0]
    start = len(models["prompts"][0])
    vocab = teacher_pool.infos[0]["vocab_size"]
    batch = [good, [], [1] * 600, [1, vocab + 5, 2], good]
    result = ray.get(teacher_pool.actors[0].score.remote(batch, [start, 1, 1, 1, start], K))
    assert result.errors[0] is None and result.errors[4] is None
    assert "empty sequence" in result.errors[1]
    assert "exceed max_model_len" in result.errors[2]
    assert "token ids must be in [0," in result.errors[3]
    assert not result.topk.mask[1:4].any()
    alone = ray.get(teacher_pool.actors[0].score.remote([good], [start], K))
    np.testing.assert_allclose(result.topk.logprobs[0], alone.topk.logprobs[0][: result.topk.logprobs.shape[1]], atol=1e-6)
    with pytest.raises(RequestError, match=r"request 1: empty sequence; request 2: .*max_model_len"):
        raise_errors(result)
    too_many = ray.get(teacher_pool.actors[0].score.remote([good], [start], 513))
    assert "k=513 is above this engine's max_logprobs=512" in too_many.errors[0]
    # Still serving after all that.
    assert ray.get(teacher_pool.actors[0].score.remote([good], [start], K)).errors == [None]
