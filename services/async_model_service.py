"""``ModelService``'s two calls served by vLLM's ``AsyncLLM`` in an async Ray actor, to measure
side by side what issue #22 proposes (bench/round_trip.py --async, bench/rollout.py --async).
``orchestrator.launcher.start_service(..., actor_class=AsyncModelService)`` starts it.

``ModelService`` drives vLLM's ``LLMEngine``: its engine core already runs its own busy loop in a
process of its own, calls in flight share its running batch, and one of the calls' threads
collects outputs for all (``engine.step()``). Here ``AsyncLLM`` collects them instead, on an
asyncio task, and each request is awaited on its own. The requests, their sampling parameters
and the conversion to ``TopK`` are ModelService's own functions, so the two differ only in who
collects vLLM's outputs and how calls wait for them.

What it leaves out (a benchmark needs none of them): sessions and kept weights, which it refuses
(a call with session keys, a start with ``weights_dir``); weight loads, which it has no method
for; and the waves that keep seeded prompts unchunked on vLLM's CPU build, so a seeded call there
is not kept from the failure those waves avoid (``ModelService._waves``).
"""
from __future__ import annotations

import asyncio
import os
import time

from services.config import EngineConfig
from services.metrics import vllm_stat_loggers
from services.model_service import (CallTimes, GenerateResult, ScoreResult, check_sequence, engine_args,
                                    generate_arrays, generate_requests, rows_to_score_again, score_arrays,
                                    score_errors, score_params)
from services.process_guard import guard_children


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

    def __repr__(self) -> str:
        return f"AsyncModelService({self.name})"

    def info(self) -> dict:
        return {"name": self.name, "model": self.model, "version": self.version, "vocab_size": self.vocab_size,
                "max_model_len": self.max_model_len, "max_logprobs": self.max_logprobs, "pid": os.getpid()}

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

        if session_keys is not None:
            raise ValueError("AsyncModelService keeps no sessions (a benchmark variant)")
        times = CallTimes(received_at=time.time())
        n = len(prefixes)
        kk = min(k, self.vocab_size)
        requests, errors = generate_requests(prefixes, max_new_tokens, kk, temperature, top_k, seeds, ignore_eos,
                                             self.eos_token_id, lambda p, b: self._check(p, k, extra_tokens=b))
        for _, params in requests.values():
            params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, at its end (no sessions)
        outputs = await self._run(requests, times)
        convert_started = time.perf_counter()
        tokens, lengths, finished_eos, topk = generate_arrays(outputs, n, {}, k, kk, self.eos_token_id)
        times.convert_seconds = time.perf_counter() - convert_started
        times.answered_at = time.time()
        return GenerateResult(tokens, lengths, finished_eos, topk, self.version, errors, times)

    async def end_sessions(self, keys=None) -> int:
        return 0

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

