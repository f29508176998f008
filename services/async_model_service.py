"""``ModelService``'s two calls served by vLLM's ``AsyncLLM`` in an async Ray actor, to measure
side by side what issue #22 proposes (bench/round_trip.py --async, bench/rollout.py --async).
``orchestrator.launcher.start_service(..., actor_class=AsyncModelService)`` starts it.

``ModelService`` drives vLLM's ``LLMEngine``: its engine core already runs its own busy loop in a
process of its own, calls in flight share its running batch, and one of the calls' threads
collects outputs for all (``engine.step()``). Here ``AsyncLLM`` collects them instead, on an
asyncio task, and each request is awaited on its own. The requests, their sampling parameters
and the conversion to ``TopK`` are ModelService's own functions, so the two differ only in who
collects vLLM's outputs and how calls wait for them.

Sessions (``generate(..., session_keys=...)``) follow ModelService's rule: a row's request stays
in the engine between calls and a call that extends its context sends only the new tokens. Here
a session is vLLM's streaming-input request (``AsyncLLM.generate`` fed by an async generator):
each call's new tokens are one more ``StreamingInput`` chunk. The kept sessions stay within the
same KV budget (the oldest end first).

What it leaves out (a benchmark needs none of them): kept weights, which it refuses (a start with
``weights_dir``); weight loads, which it has no method for; and the waves that keep seeded prompts
unchunked on vLLM's CPU build, so a seeded call there is not kept from the failure those waves
avoid (``ModelService._waves``).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from services.config import EngineConfig
from services.metrics import vllm_stat_loggers
from services.model_service import (CallTimes, GenerateResult, ScoreResult, check_sequence, engine_args,
                                    generate_arrays, generate_requests, rows_to_score_again, score_arrays,
                                    score_errors, score_params, session_continues,
                                    session_kv_budget)
from services.process_guard import guard_children


@dataclass
class _StreamSession:
    """A row's streaming-input request, between calls."""

    inputs: asyncio.Queue  # its turns' StreamingInput chunks (it ends by abort)
    outputs: object  # vLLM's RequestOutputCollector: its latest (cumulative) output
    tokens: list[int]  # the context the engine holds KV for (as ModelService's _Session)
    returned: int  # tokens returned over all its turns


class AsyncModelService:
    def __init__(self, model: str, engine: EngineConfig, eos_token_id: int, seed: int = 0, name: str = "model",
                 weights_dir: str | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if weights_dir is not None:
            raise ValueError("AsyncModelService keeps no weights (a benchmark variant)")
        guard_children()
        self.name, self.model, self.eos_token_id, self.version = name, model, eos_token_id, 0
        self.score_reads_prefix_cache = engine.enable_prefix_caching and engine.score_reads_prefix_cache
        self.engine = AsyncLLM.from_engine_args(engine_args(model, engine, seed, AsyncEngineArgs),
                                                stat_loggers=vllm_stat_loggers(engine.export_engine_metrics))
        self.vocab_size = self.engine.model_config.get_vocab_size()
        self.max_model_len, self.max_logprobs = engine.max_model_len, engine.max_logprobs
        self._request_counter = 0
        self._max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        self._session_kv_tokens = session_kv_budget(engine, self.engine.vllm_config)
        self._sessions: OrderedDict[object, _StreamSession] = OrderedDict()
        self._session_tokens = 0
        self._sessions_ended_for_room = 0

    def __repr__(self) -> str:
        return f"AsyncModelService({self.name})"

    def info(self) -> dict:
        return {"name": self.name, "model": self.model, "version": self.version, "vocab_size": self.vocab_size,
                "max_model_len": self.max_model_len, "max_logprobs": self.max_logprobs, "pid": os.getpid(),
                "sessions": len(self._sessions), "session_tokens": self._session_tokens,
                "session_kv_tokens": self._session_kv_tokens, "sessions_ended_for_room": self._sessions_ended_for_room}

    def _check(self, tokens, k: int, extra_tokens: int) -> str | None:
        return check_sequence(tokens, k, extra_tokens, self.max_model_len, self.vocab_size, self.max_logprobs)

    async def score(self, sequences, response_starts, k: int) -> ScoreResult:
        times = CallTimes(received_at=time.time())
        errors = score_errors(sequences, response_starts, lambda seq: self._check(seq, k, extra_tokens=1))
        kk = min(k, self.vocab_size)
        params = score_params(kk, read_cache=self.score_reads_prefix_cache)
        outputs = await self._run({i: (sequences[i], params) for i in range(len(sequences)) if errors[i] is None},
                                  times)
        cached_too_far = rows_to_score_again(outputs, sequences, response_starts, kk)
        if cached_too_far:
            outputs.update(await self._run(cached_too_far, times))
        convert_started = time.perf_counter()
        topk = score_arrays(outputs, sequences, response_starts, errors, k, kk)
        times.convert_seconds = time.perf_counter() - convert_started
        times.answered_at = time.time()
        return ScoreResult(topk, self.version, errors, times)

    async def generate(self, prefixes, max_new_tokens, k: int, temperature: float = 1.0, top_k: int = -1,
                       seeds=None, ignore_eos: bool = False, session_keys=None) -> GenerateResult:
        from vllm.sampling_params import RequestOutputKind

        times = CallTimes(received_at=time.time())
        n = len(prefixes)
        kk = min(k, self.vocab_size)
        requests, errors = generate_requests(prefixes, max_new_tokens, kk, temperature, top_k, seeds, ignore_eos,
                                             self.eos_token_id, lambda p, b: self._check(p, k, extra_tokens=b))
        first: dict[int, int] = {}  # per session row, its outputs before this call
        if session_keys is None:
            for _, params in requests.values():
                params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, at its end
            outputs = await self._run(requests, times)
        else:
            outputs = await self._run_turns(requests, {i: session_keys[i] for i in requests}, first, times)
        convert_started = time.perf_counter()
        tokens, lengths, finished_eos, topk = generate_arrays(outputs, n, first, k, kk, self.eos_token_id)
        times.convert_seconds = time.perf_counter() - convert_started
        times.answered_at = time.time()
        return GenerateResult(tokens, lengths, finished_eos, topk, self.version, errors, times)

    async def end_sessions(self, keys=None) -> int:
        """End the sessions of ``keys`` (all when None), freeing their KV; returns how many ended."""
        ending = list(self._sessions) if keys is None else [key for key in keys if key in self._sessions]
        for key in ending:
            await self._end_session(self._pop_session(key))
        return len(ending)

    async def _run(self, requests: dict, times: CallTimes) -> dict:
        """Every request at once into the running batch; their final outputs by index. The time
        awaited counts as the engine's (the engine core steps in its own process meanwhile)."""
        from vllm.inputs import TokensPrompt

        async def final(index: int, tokens, params):
            self._request_counter += 1
            last = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(map(int, tokens))), params,
                                                  f"{self.name}-{self._request_counter}"):
                last = out
            return index, last

        started = time.perf_counter()
        done = await asyncio.gather(*(final(i, tokens, params) for i, (tokens, params) in requests.items()))
        times.engine_seconds += time.perf_counter() - started
        times.prompt_tokens += sum(len(tokens) for tokens, _ in requests.values())
        times.cached_tokens += sum(out.num_cached_tokens or 0 for _, out in done)
        return dict(done)

    async def _run_turns(self, requests: dict, keys: dict, first: dict, times: CallTimes) -> dict:
        """Each request as a turn of its row's session; their outputs by index (``first``: where
        each row's outputs of this call begin)."""
        started = time.perf_counter()
        done = await asyncio.gather(*(self._turn(keys[i], list(map(int, tokens)), params, i, first, times)
                                      for i, (tokens, params) in requests.items()))
        times.engine_seconds += time.perf_counter() - started
        return dict(done)

    async def _turn(self, key, tokens: list[int], params, index: int, first: dict, times: CallTimes):
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt

        session = self._pop_session(key)
        if session is not None and not session_continues(session.tokens, session.returned, tokens, params.logprobs):
            await self._end_session(session)
            session = None
        if session is None:
            inputs: asyncio.Queue = asyncio.Queue()

            async def chunks():
                while True:
                    yield await inputs.get()

            self._request_counter += 1
            collector = await self.engine.add_request(f"{self.name}-s{self._request_counter}", chunks(), params)
            session = _StreamSession(inputs, collector, [], 0)
        sent = tokens[len(session.tokens):]
        first[index] = session.returned
        times.prompt_tokens += len(sent)
        session.inputs.put_nowait(StreamingInput(TokensPrompt(prompt_token_ids=sent), params))
        while True:  # a turn ends with a finish reason, the request stays (it waits for more input)
            out = session.outputs.get_nowait() or await session.outputs.get()
            if out.finished or out.outputs[0].finish_reason is not None:
                break
        times.cached_tokens += out.num_cached_tokens or 0
        returned = out.outputs[0].token_ids
        # As in ModelService._keep_session: vLLM drops each turn's last token when the next turn's come in.
        session.tokens = tokens + list(returned[session.returned: -1])
        session.returned = len(returned)
        if out.finished:
            return index, out
        if key in self._sessions:  # another call under the same key kept its own meanwhile
            await self._end_session(self._pop_session(key))
        self._sessions[key] = session
        self._session_tokens += len(session.tokens)
        while len(self._sessions) > self._max_num_seqs or self._session_tokens > self._session_kv_tokens:
            await self._end_session(self._pop_session(next(iter(self._sessions))))  # the oldest give their KV back
            self._sessions_ended_for_room += 1
        return index, out

    def _pop_session(self, key) -> _StreamSession | None:
        session = self._sessions.pop(key, None)
        if session is not None:
            self._session_tokens -= len(session.tokens)
        return session

    async def _end_session(self, session: _StreamSession) -> None:
        await self.engine.abort(session.outputs.request_id, internal=True)
