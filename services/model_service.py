"""One vLLM engine that speaks top-k arrays: the teacher server and the student rollout worker.

The teacher and the student need the same three calls (the student scores a chunk when the
teacher holds the pen; the teacher generates when it drafts), so one class serves both roles:

    score(sequences, response_starts, k)    one prefill per sequence (prompt_logprobs = k)
    generate(prefixes, max_new_tokens, k, temperature, top_k, seeds)
    begin_weights(version); load_bucket(blob)...; end_weights(version)
                                            new weights in place, streamed bucket by bucket
    load_weights(blob, version)             the same with one bucket

With ``weights_dir`` set, every load also leaves its buckets there (``v000007/part-00000.safetensors``
...), and an engine starting up loads the newest complete version before it serves: a replica Ray
restarts after a crash comes back at the latest weight version, never at the base weights.

Requests go in as token ids (no tokenizer in the engine: teacher and student share one, and the
coordinator owns it). Results come back as padded numpy arrays (TopK) plus the weight version
that produced them. A bad request (too long, empty, ids outside the vocabulary, k above
max_logprobs) is reported in ``errors`` for its index; the others are served.

A row can keep its place in the engine between calls (``generate(..., session_keys=...)``): its
request stays alive after a call as a vLLM resumable request (a streaming-input session), holding
the KV of what it has computed, and a later call whose prefix extends that context sends only the
new tokens. Lockstep asks for one token per row per call: without a session every call
prefills the row again from its last whole cached block. A prefix that does not extend the
session's context (a draft cut short) ends it and starts a new one from the whole prefix, so
callers always send whole prefixes and a lost session (a restarted replica) costs time, never a
wrong answer. A weight load ends every session (their KV is the old weights').

Calls share the engine. Started with ``max_concurrency`` > 1 (``services.*.concurrent_calls``),
Ray runs several calls at once in threads; each adds its requests to the one engine, and
whichever call holds the engine lock steps it for all of them, so a one-row verify joins the
batch of a running 200-token draft and returns as soon as its own rows finish, instead of
waiting for the draft. A weight load waits until no call is in flight (stepping the engine
meanwhile), so every answer was computed by one weight version, the one it reports.

Every script that creates one must sit under ``if __name__ == "__main__":``: vLLM spawns its
engine process.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.files import fsync_dir, write_atomic
from protocol.topk import PAD_ID, TopK
from services.config import EngineConfig
from services.convert import fill_topk, flat_to_arrays
from services.metrics import vllm_stat_loggers
from services.process_guard import guard_children


@dataclass
class CallTimes:
    """Where a call's time went inside the actor. ``received_at``/``answered_at`` are wall-clock
    (time.time()) so a caller on the same machine can tell Ray's share from the service's."""

    received_at: float = 0.0  # the method started
    answered_at: float = 0.0  # the method returned its answer
    engine_seconds: float = 0.0  # in vLLM's engine.step() calls
    engine_steps: int = 0
    convert_seconds: float = 0.0  # vLLM's outputs to arrays
    prompt_tokens: int = 0  # sent to the engine as prompts (a row scored again counts twice)
    cached_tokens: int = 0  # of those, read from the prefix cache instead of computed

    @property
    def seconds(self) -> float:
        return self.answered_at - self.received_at


def merge_times(parts: list[CallTimes]) -> CallTimes:
    """The times of one call split over replicas that ran side by side: the span, and each part's slowest."""
    return CallTimes(min(t.received_at for t in parts), max(t.answered_at for t in parts),
                     max(t.engine_seconds for t in parts), max(t.engine_steps for t in parts),
                     max(t.convert_seconds for t in parts), sum(t.prompt_tokens for t in parts),
                     sum(t.cached_tokens for t in parts))


@dataclass
class _Session:
    """A row's resumable vLLM request, between calls."""

    request_id: str  # the id vLLM's engine knows it by
    external_id: str  # the id its outputs carry
    tokens: list[int]  # the context the engine holds KV for: its prompts so far, less each turn's last sampled token
    outputs: int  # tokens it has returned over all its turns (vLLM's outputs are cumulative)


MAX_SESSION_OUTPUTS = 1_000_000  # logprob entries vLLM keeps per session (it accumulates them): restart past it


@dataclass
class ScoreResult:
    topk: TopK  # [N, T, k]: response positions of each sequence, padded
    version: int
    errors: list[str | None]
    times: CallTimes = field(default_factory=CallTimes)


@dataclass
class GenerateResult:
    tokens: np.ndarray  # int64 [N, T], PAD_ID after each row's length
    lengths: np.ndarray  # int64 [N]
    finished_eos: np.ndarray  # bool [N]: the row ended with EOS (EOS is its last token)
    topk: TopK  # [N, T, k]; token_logprob is the sampled token's logprob
    version: int
    errors: list[str | None]
    times: CallTimes = field(default_factory=CallTimes)


class RequestError(ValueError):
    """Requests a service refused; the message names each one by its index in the batch."""


def raise_errors(result, what: str = "request") -> None:
    bad = [f"{what} {i}: {e}" for i, e in enumerate(result.errors) if e is not None]
    if bad:
        raise RequestError("; ".join(bad))


class ModelService:
    def __init__(self, model: str, engine: EngineConfig, eos_token_id: int, seed: int = 0, name: str = "model",
                 weights_dir: str | None = None):
        guard_children()  # before vLLM starts its engine processes: they must die with this actor
        self.name = name
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_model_len = engine.max_model_len
        self.max_logprobs = engine.max_logprobs
        self.score_reads_prefix_cache = engine.enable_prefix_caching and engine.score_reads_prefix_cache
        self.version = 0
        self._request_counter = 0
        # The engine is shared by the calls in flight: one thread at a time adds requests, steps
        # it or loads weights (_engine_lock). One call steps it for all (_stepping); the others
        # wait on _stepped and look after each step whether their requests are done, so a finished
        # short call returns at once instead of queueing for the lock behind a long one.
        self._engine_lock = threading.Lock()
        self._stepped = threading.Condition()
        self._stepping = False
        self._in_flight: dict[int, CallTimes] = {}  # calls between admission and answer, by id()
        self._owners: dict[str, tuple[dict, int]] = {}  # request id -> (its call's outputs, its index)
        self._prefilling: dict[str, int] = {}  # request id -> prompt tokens, until its first output
        self._prefill_tokens = 0  # their sum (read without the lock: an int, not a dict being changed)
        self._sessions: OrderedDict[object, _Session] = OrderedDict()  # rows' requests kept between calls, by key
        self._open_sessions: dict[str, _Session] = {}  # sessions in a turn, by the id their outputs carry
        self._session_tokens = 0  # the context the kept sessions hold KV for, in tokens
        self._sessions_ended_for_room = 0  # kept sessions ended to stay within the budget below
        self.engine = _make_engine(model, engine, seed)
        self.vocab_size = self.engine.model_config.get_vocab_size()
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        self._step_token_budget = self.engine.vllm_config.scheduler_config.max_num_batched_tokens
        self._max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        self._supported_tasks = self.engine.get_supported_tasks()
        self._session_kv_tokens = session_kv_budget(engine, self.engine.vllm_config)
        self._incoming: dict | None = None  # the streamed weight load in progress
        self.weights_dir = Path(weights_dir) if weights_dir else None
        if self.weights_dir is not None:
            self._load_kept_weights()

    # -- calls ---------------------------------------------------------------------------------

    def score(self, sequences: list[list[int]], response_starts: list[int], k: int) -> ScoreResult:
        """The model's top-k at positions ``response_starts[i]:`` of each sequence, in one prefill."""
        times = CallTimes(received_at=time.time())
        errors = score_errors(sequences, response_starts, lambda seq: self._check_sequence(seq, k, extra_tokens=1))
        kk = min(k, self.vocab_size)
        params = score_params(kk, read_cache=self.score_reads_prefix_cache)
        outputs, version = self._run({i: (sequences[i], params) for i in range(len(sequences)) if errors[i] is None},
                                     times)
        cached_too_far = rows_to_score_again(outputs, sequences, response_starts, kk)
        if cached_too_far:
            again, again_version = self._run(cached_too_far, times)
            outputs.update(again)
            version = min(version, again_version)  # a load in between: the older version, which a rollout refuses

        convert_started = time.perf_counter()
        topk = score_arrays(outputs, sequences, response_starts, errors, k, kk)
        times.convert_seconds = time.perf_counter() - convert_started
        times.answered_at = time.time()
        return ScoreResult(topk, version, errors, times)

    def generate(
        self,
        prefixes: list[list[int]],
        max_new_tokens: int | list[int],
        k: int,
        temperature: float = 1.0,
        top_k: int = -1,
        seeds: list[int] | None = None,
        ignore_eos: bool = False,
        session_keys: list | None = None,
    ) -> GenerateResult:
        """Continue each prefix; per generated position the sampled token and the top-k.

        ``top_k`` > 0 samples from the model's top ``top_k`` only (the teacher samples from its
        top-k, exactly as the coordinator draws teacher tokens); -1 samples the full vocabulary.
        ``seeds`` make sampling reproducible per request. ``ignore_eos``: every row runs to its
        budget (benchmarks that need a fixed number of decoding steps). ``session_keys``: one key
        per row; the row's request stays in the engine after the call, and its next call under
        the same key sends only what its prefix adds (module docstring).
        """
        times = CallTimes(received_at=time.time())
        n = len(prefixes)
        kk = min(k, self.vocab_size)
        requests, errors = generate_requests(prefixes, max_new_tokens, kk, temperature, top_k, seeds, ignore_eos,
                                             self.eos_token_id, lambda p, b: self._check_sequence(p, k, extra_tokens=b))
        sessions = {} if session_keys is None else {i: session_keys[i] for i in requests}
        first: dict[int, int] = {}  # per session row, its outputs before this call
        outputs, version = self._run(requests, times, sessions, first)

        convert_started = time.perf_counter()
        tokens, lengths, finished_eos, topk = generate_arrays(outputs, n, first, k, kk, self.eos_token_id)
        times.convert_seconds = time.perf_counter() - convert_started
        times.answered_at = time.time()
        return GenerateResult(tokens, lengths, finished_eos, topk, version, errors, times)

    def begin_weights(self, version: int) -> None:
        """Open a streamed load of weight ``version``: its buckets follow (``load_bucket``), then
        ``end_weights``. No request is served until then. A stream left open by a push cut short
        is closed first; this load then replaces its partial one."""
        if version <= self.version:
            raise ValueError(f"{self.name}: weight version {version} is not newer than the loaded {self.version}")
        while True:  # the calls in flight finish on the weights they started with
            self._step_until(lambda: not self._in_flight)
            with self._engine_lock:
                if not self._in_flight:  # none admitted since
                    self._open_stream(version, keep=self.weights_dir is not None)
                    return

    def load_bucket(self, blob: bytes) -> int:
        """One bucket (a safetensors blob of some of the HF state dict's tensors) into the open
        load; returns its size in bytes."""
        # One bucket at a time, start to end: the pool sends the next bucket before the last one is
        # answered, and the actor serves calls on several threads; two at once would take the same
        # part number.
        with self._engine_lock:
            if self._incoming is None:
                raise ValueError(f"{self.name}: load_bucket without begin_weights")
            self.engine.collective_rpc("feed_weight_bucket", args=(blob,))
            if self._incoming["staging"] is not None:
                write_atomic(self._incoming["staging"] / f"part-{self._incoming['parts']:05d}.safetensors", blob)
            self._incoming["parts"] += 1
        return len(blob)

    def end_weights(self, version: int) -> int:
        """Close the load of ``version`` (every bucket was sent): the engine serves it from now."""
        if self._incoming is None or self._incoming["version"] != version:
            raise ValueError(f"{self.name}: end_weights({version}) without its begin_weights")
        staging = self._incoming["staging"]
        with self._engine_lock:
            self._close_stream()
            self.engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            self.version = version
        if staging is not None:  # the complete version replaces the kept one
            kept = staging.with_name(f"v{version:06d}")
            os.replace(staging, kept)
            fsync_dir(kept.parent)
            for old in self.weights_dir.glob("v*"):
                if old != kept:
                    shutil.rmtree(old, ignore_errors=True)
        return version

    def load_weights(self, blob: bytes, version: int) -> int:
        """Replace the weights with one blob (the whole HF state dict) as ``version``."""
        self.begin_weights(version)
        self.load_bucket(blob)
        return self.end_weights(version)

    def end_sessions(self, keys: list | None = None) -> int:
        """End the sessions of ``keys`` (all when None), freeing their KV; returns how many ended."""
        with self._engine_lock:
            return self._end_kept_sessions(keys)

    def _open_stream(self, version: int, keep: bool) -> None:
        """Start the engine's reload of ``version``; ``keep``: its buckets are staged in weights_dir."""
        if self._incoming is not None:
            self._close_stream()
        self._end_kept_sessions()  # their KV is the old weights'
        self.engine.collective_rpc("begin_weight_stream")
        staging = None
        if keep:
            staging = self.weights_dir / f".v{version:06d}.incoming"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self._incoming = {"version": version, "parts": 0, "staging": staging}

    def _close_stream(self) -> None:
        self._incoming = None
        try:
            self.engine.collective_rpc("finish_weight_stream")
        except Exception:
            # The engine holds some new weights and some old, and vLLM cannot reload in place after
            # a failed reload: version -1 (every rollout refuses it) until Ray restarts this replica
            # (the pool does) and it comes back at its kept version.
            self.version = -1
            raise

    def _load_kept_weights(self) -> None:
        """The newest complete version ``end_weights`` kept (a restart of this replica), if any."""
        kept = sorted(self.weights_dir.glob("v[0-9]*"))  # zero-padded: the newest sorts last
        if not kept:
            return
        version = int(kept[-1].name.removeprefix("v"))
        self._open_stream(version, keep=False)  # already kept: nothing to write again
        for part in sorted(kept[-1].glob("part-*.safetensors")):
            self.load_bucket(part.read_bytes())
        self.end_weights(version)

    def __repr__(self) -> str:
        # Ray's dashboard and logs label an actor by its repr.
        return f"ModelService({self.name})"

    def info(self) -> dict:
        return {"name": self.name, "model": self.model, "version": self.version, "vocab_size": self.vocab_size,
                "max_model_len": self.max_model_len, "max_logprobs": self.max_logprobs, "pid": os.getpid(),
                "sessions": len(self._sessions), "session_tokens": self._session_tokens,
                "session_kv_tokens": self._session_kv_tokens, "sessions_ended_for_room": self._sessions_ended_for_room}

    # -- internals -------------------------------------------------------------------------------

    def _check_sequence(self, tokens, k: int, extra_tokens: int) -> str | None:
        return check_sequence(tokens, k, extra_tokens, self.max_model_len, self.vocab_size, self.max_logprobs)

    def _run(self, requests: dict, times: CallTimes, sessions: dict | None = None,
             first: dict | None = None) -> tuple[dict, int]:
        """Run the requests through the engine, beside those of the other calls in flight; their
        outputs by index and the weight version that computed them. ``times`` gets the engine
        steps taken while the call was in flight. ``sessions``: index -> key of the rows that run
        as sessions; ``first`` gets, for each, the outputs its request had before this call."""
        with self._engine_lock:
            if self._incoming is not None:
                raise RuntimeError(f"{self.name}: weight version {self._incoming['version']} is being loaded; "
                                   "requests wait for end_weights")
            self._in_flight[id(times)] = times
            version = self.version  # no load starts while this call is in flight
        try:
            outputs = {}
            for wave in self._waves(requests):
                outputs.update(self._run_wave(wave, times, sessions or {}, first if first is not None else {}))
            times.cached_tokens += sum(out.num_cached_tokens or 0 for out in outputs.values())
            return outputs, version
        finally:
            with self._engine_lock:
                del self._in_flight[id(times)]

    def _waves(self, requests: dict) -> list[dict]:
        """All requests at once, except for seeded sampling on vLLM's CPU build: there a prompt
        prefilled in chunks fails ("CPU Generator does not use offset"), so requests go in waves
        whose prompts fit one step's token budget and are never chunked."""
        seeded = any(params.seed is not None for _, params in requests.values())
        if not (seeded and self._on_cpu):
            return [requests]
        waves, wave, tokens = [], {}, 0
        for index, (prompt, params) in requests.items():
            if wave and tokens + len(prompt) > self._step_token_budget:
                waves.append(wave)
                wave, tokens = {}, 0
            wave[index] = (prompt, params)
            tokens += len(prompt)
        return waves + [wave] if wave else waves

    def _run_wave(self, requests: dict, times: CallTimes, sessions: dict, first: dict) -> dict:
        """Add the requests to the engine and step it until every one of them has finished."""
        outputs = {}
        unchunked = self._on_cpu and any(params.seed is not None for _, params in requests.values())
        prompt_tokens = sum(len(tokens) for tokens, _ in requests.values())
        while True:
            if unchunked:  # seeded prompts must not be chunked (see _waves): wait for room in one step
                self._step_until(lambda: self._fits_one_step(len(requests), prompt_tokens))
            with self._engine_lock:
                if not unchunked or self._fits_one_step(len(requests), prompt_tokens):
                    for index, (tokens, params) in requests.items():
                        request_id, sent = self._add_request(list(map(int, tokens)), params, sessions.get(index),
                                                             first, index)
                        self._owners[request_id] = (outputs, index)
                        self._prefilling[request_id] = sent
                        self._prefill_tokens += sent
                        times.prompt_tokens += sent
                    break
        self._step_until(lambda: len(outputs) == len(requests))
        with self._engine_lock:  # each session waits for its row's next call
            for index, key in sessions.items():
                if index in requests:
                    self._keep_session(key, requests[index][0], outputs[index])
        return outputs

    def _add_request(self, tokens: list[int], params, key, first: dict, index: int) -> tuple[str, int]:
        """Hand one request to the engine (lock held): a plain one, or a turn of the session of
        ``key``, resumed when ``tokens`` extends its context. Returns the id its outputs carry and
        the prompt tokens sent."""
        from vllm.inputs import TokensPrompt

        self._request_counter += 1
        if key is None:
            request_id = f"{self.name}-{self._request_counter}"
            self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=tokens), params)
            return request_id, len(tokens)
        session = self._pop_session(key)
        if session is not None and not session_continues(session.tokens, session.outputs, tokens, params.logprobs):
            self._end_session(session)
            session = None
        sent = tokens[len(session.tokens):] if session else tokens
        processor = self.engine.input_processor
        request = processor.process_inputs(session.request_id if session else f"{self.name}-s{self._request_counter}",
                                           TokensPrompt(prompt_token_ids=list(sent)), params,
                                           supported_tasks=self._supported_tasks, resumable=True)
        if session is None:
            processor.assign_request_id(request)  # vLLM's internal id: external id + a random suffix
            session = _Session(request.request_id, request.external_req_id, [], 0)
        else:
            request.external_req_id = session.external_id
        first[index] = session.outputs
        self._open_sessions[session.external_id] = session
        self.engine.output_processor.add_request(request, None, None, 0)
        self.engine.engine_core.add_request(request)
        return session.external_id, len(sent)

    def _keep_session(self, key, tokens: list[int], out) -> None:
        """After a session's turn (lock held): the engine computed ``tokens`` and each token this
        turn returned except the last, which vLLM drops when the next turn's tokens come in."""
        session = self._open_sessions.pop(out.request_id)
        returned = out.outputs[0].token_ids
        session.tokens = list(map(int, tokens)) + list(returned[session.outputs: -1])
        session.outputs = len(returned)
        if key in self._sessions:  # another call under the same key kept its own meanwhile
            self._end_session(self._pop_session(key))
        self._sessions[key] = session
        self._session_tokens += len(session.tokens)
        while len(self._sessions) > self._max_num_seqs or self._session_tokens > self._session_kv_tokens:
            self._end_session(self._pop_session(next(iter(self._sessions))))  # the oldest give their KV back
            self._sessions_ended_for_room += 1

    def _end_kept_sessions(self, keys: list | None = None) -> int:
        """End the kept sessions of ``keys`` (all when None; lock held); returns how many ended."""
        ending = list(self._sessions) if keys is None else [key for key in keys if key in self._sessions]
        for key in ending:
            self._end_session(self._pop_session(key))
        return len(ending)

    def _pop_session(self, key) -> _Session | None:
        session = self._sessions.pop(key, None)
        if session is not None:
            self._session_tokens -= len(session.tokens)
        return session

    def _end_session(self, session: _Session) -> None:
        self.engine.abort_request([session.request_id], internal=True)

    def _fits_one_step(self, n: int, prompt_tokens: int) -> bool:
        """``n`` prompts of ``prompt_tokens`` in all would be prefilled whole in the next step, beside
        the prompts still waiting for theirs and one decode token per running request."""
        if not self._owners:
            return True
        return (len(self._owners) + n <= self._max_num_seqs
                and self._prefill_tokens + len(self._owners) + prompt_tokens <= self._step_token_budget)

    def _step_until(self, done) -> None:
        """Step the engine, for every call in flight, until ``done()``. One thread steps at a time;
        the others wait and check ``done()`` after each step (another call's thread may step this
        one's requests to the end)."""
        while True:
            with self._stepped:
                while self._stepping and not done():
                    self._stepped.wait()
                if done():
                    return
                self._stepping = True
            try:
                stepped = self._step_once()
            finally:
                with self._stepped:
                    self._stepping = False
                    self._stepped.notify_all()
            if not stepped:
                time.sleep(0.001)  # nothing to step: another call is between its waves, or admitting

    def _step_once(self) -> bool:
        """One engine step; hands each finished request's output to its call. False: nothing to step."""
        with self._engine_lock:
            if not self.engine.has_unfinished_requests():
                return False
            started = time.perf_counter()
            step_outputs = self.engine.step()
            spent = time.perf_counter() - started
            for times in self._in_flight.values():
                times.engine_seconds += spent
                times.engine_steps += 1
            for out in step_outputs:
                self._prefill_tokens -= self._prefilling.pop(out.request_id, 0)
                # A session's turn ends with a finish reason but not `finished` (it waits for more input).
                if out.finished or out.outputs[0].finish_reason is not None:
                    outputs, index = self._owners.pop(out.request_id)
                    outputs[index] = out
            return True


def session_kv_budget(engine: EngineConfig, vllm_config) -> int:
    """The KV tokens kept sessions may hold together. They hold it between calls, where vLLM cannot
    preempt them: at most half the cache (or ``engine.session_kv_tokens``), so the calls in flight
    always find room (the oldest sessions end first)."""
    cache = vllm_config.cache_config
    return engine.session_kv_tokens or (cache.num_gpu_blocks or 0) * cache.block_size // 2


def session_continues(context: list[int], returned: int, tokens: list[int], logprobs: int) -> bool:
    """Whether a kept session (KV for ``context``, ``returned`` tokens over its turns) can take
    ``tokens`` as its next turn: they extend its context, and vLLM's accumulated logprob entries
    stay within MAX_SESSION_OUTPUTS. Otherwise it ends and a new one starts from ``tokens``."""
    return (len(context) < len(tokens) and tokens[: len(context)] == context
            and returned * (logprobs + 1) < MAX_SESSION_OUTPUTS)


def check_sequence(tokens, k: int, extra_tokens: int, max_model_len: int, vocab_size: int,
                   max_logprobs: int) -> str | None:
    """What is wrong with one request (None: nothing), in words that name the limit."""
    if len(tokens) == 0:
        return "empty sequence"
    if len(tokens) + extra_tokens > max_model_len:
        return f"{len(tokens)} tokens + {extra_tokens} to generate exceed max_model_len {max_model_len}"
    ids = np.asarray(tokens)
    if ids.min() < 0 or ids.max() >= vocab_size:
        return f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}"
    if k > max_logprobs != -1:  # -1: vLLM serves the whole vocabulary
        return f"k={k} is above this engine's max_logprobs={max_logprobs}"
    return None


def score_errors(sequences, response_starts, check) -> list[str | None]:
    """Per sequence, ``check(sequence)`` or what is wrong with its response start (None: nothing)."""
    errors = [check(seq) for seq in sequences]
    for i, (seq, start) in enumerate(zip(sequences, response_starts)):
        if errors[i] is None and not 1 <= start <= len(seq):
            errors[i] = f"response_start {start} must be in [1, {len(seq)}] (the first token has no logprob)"
    return errors


def score_params(kk: int, read_cache: bool):
    """A scoring request: the prompt's top-``kk`` logprobs. max_tokens=1: vLLM needs one step to
    return; only the prompt's logprobs are read. vLLM skips the prefix cache for prompt logprobs
    unless told otherwise, and then prefills every verify from the first prompt token; reading it,
    prompt logprobs are filled from the first uncached position on, and a verify needs them from
    its response start only."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=kk, flat_logprobs=True, detokenize=False,
                          skip_reading_prefix_cache=not read_cache)


def rows_to_score_again(outputs: dict, sequences, response_starts, kk: int) -> dict:
    """The scoring requests, by index, of the rows whose prefix-cache hit reached into their
    response (the same tokens scored before): vLLM has no logprobs there, so they are scored again
    without the cache."""
    return {i: (sequences[i], score_params(kk, read_cache=False))
            for i, out in outputs.items() if (out.num_cached_tokens or 0) > response_starts[i] - 1}


def generate_requests(prefixes, max_new_tokens: int | list[int], kk: int, temperature: float, top_k: int, seeds,
                      ignore_eos: bool, eos_token_id: int, check) -> tuple[dict, list[str | None]]:
    """Each row's decoding request (prefix, parameters) by index, and per row what is wrong with it
    (``check(prefix, budget)``; rows with an error get no request)."""
    n = len(prefixes)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    errors = [check(p, b) for p, b in zip(prefixes, budgets)]
    requests = {i: (prefixes[i], generate_params(budgets[i], kk, temperature, top_k, None if seeds is None else seeds[i],
                                                 ignore_eos, eos_token_id))
                for i in range(n) if errors[i] is None}
    return requests, errors


def generate_params(budget: int, kk: int, temperature: float, top_k: int, seed: int | None, ignore_eos: bool,
                    eos_token_id: int):
    """One row's decoding request: ``budget`` tokens, each with its top-``kk``."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=budget,
        temperature=temperature,
        top_k=top_k if top_k > 0 else -1,
        logprobs=kk,
        flat_logprobs=True,
        detokenize=False,
        stop_token_ids=[] if ignore_eos else [eos_token_id],
        ignore_eos=ignore_eos,
        seed=None if seed is None else int(seed),
        # A session's outputs grow over its calls: `first` (generate_arrays) says where this call's begin.
        output_kind=RequestOutputKind.CUMULATIVE,
    )


def score_arrays(outputs: dict, sequences, response_starts, errors, k: int, kk: int) -> TopK:
    """vLLM's scoring outputs (by row index) as one padded TopK over the response positions."""
    length = max([len(s) - r for s, r, e in zip(sequences, response_starts, errors) if e is None] or [0])
    topk = TopK.empty((len(sequences), length), k)
    for i, out in outputs.items():
        ids, logprobs = flat_to_arrays(out.prompt_logprobs, response_starts[i], kk)
        fill_topk(topk, i, ids, logprobs)
    return topk


def generate_arrays(outputs: dict, n: int, first: dict, k: int, kk: int, eos_token_id: int):
    """vLLM's decoding outputs (by row index) as padded tokens, lengths, ended-with-EOS flags and
    TopK; ``first``: per session row, the outputs its request returned before this call."""
    lengths = np.zeros(n, dtype=np.int64)
    for i, out in outputs.items():
        lengths[i] = len(out.outputs[0].token_ids) - first.get(i, 0)
    tokens = np.full((n, int(lengths.max(initial=0))), PAD_ID, dtype=np.int64)
    topk = TopK.empty(tokens.shape, k)
    finished_eos = np.zeros(n, dtype=bool)
    for i, out in outputs.items():
        completion = out.outputs[0]
        tokens[i, : lengths[i]] = completion.token_ids[first.get(i, 0):]
        finished_eos[i] = lengths[i] > 0 and completion.token_ids[-1] == eos_token_id
        ids, logprobs = flat_to_arrays(completion.logprobs, first.get(i, 0), kk)
        fill_topk(topk, i, ids, logprobs)
    return tokens, lengths, finished_eos, topk


def engine_args(model: str, cfg: EngineConfig, seed: int, args_class=None):
    """vLLM's engine arguments for ``cfg`` (``args_class``: EngineArgs, or AsyncEngineArgs)."""
    from vllm import EngineArgs

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gb))
    return (args_class or EngineArgs)(
        model=model,
        skip_tokenizer_init=True,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_logprobs=cfg.max_logprobs,
        enable_prefix_caching=cfg.enable_prefix_caching,
        **({"block_size": cfg.block_size} if cfg.block_size else {}),
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        seed=seed,
        disable_log_stats=not cfg.export_engine_metrics,
        worker_extension_cls="services.weight_sync.WeightSyncExtension",
        # Split over GPUs: vLLM's Ray executor puts one worker in each bundle of the placement
        # group this actor runs in (orchestrator.launcher.start_service makes it).
        **({"distributed_executor_backend": "ray"} if cfg.splits_over_gpus else {})
        | cfg.extra,
    )


def _make_engine(model: str, cfg: EngineConfig, seed: int):
    from vllm.v1.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(engine_args(model, cfg, seed), stat_loggers=vllm_stat_loggers(cfg.export_engine_metrics))
