"""N replicas of a ModelService in Ray actors, behind one handle.

A batch is split over the replicas: each sequence goes to the replica with the least work in
flight (work = tokens), except that a sequence with a key (its prompt's id) stays on the replica
that served that key before while that replica is not overloaded, so vLLM's prefix cache pays.
The parts run concurrently; ``Pending.result()`` puts the rows back in the caller's order.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Hashable, Sequence

import numpy as np

from services.config import EngineConfig
from services.model_service import ModelService
from services.protocol import PAD_ID, TopK

STICKY_KEYS_KEPT = 100_000


def start_service(
    name: str, model: str, engine: EngineConfig, eos_token_id: int, seed: int = 0, max_restarts: int = 0
) -> "ServicePool":
    """Start ``engine.replicas`` ModelService actors for ``model`` and wait until they serve.

    The actors are not Ray-named (a name is global to the cluster, so two runs or a rerun after a
    crash would collide); ``name`` labels them instead: ModelService's repr shows it in the Ray
    dashboard and in every error message.
    """
    import ray

    actor_cls = ray.remote(ModelService)
    actors = [
        actor_cls.options(
            num_cpus=engine.num_cpus,
            num_gpus=engine.num_gpus,
            max_restarts=max_restarts,
            max_task_retries=0,
            # vLLM's INFO and WARNING lines (per engine step, per weight load) drown the progress line.
            runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}},
        ).remote(model, engine, eos_token_id, seed + i, f"{name}-{i}")
        for i in range(engine.replicas)
    ]
    pool = ServicePool(actors)
    pool.infos = ray.get([a.info.remote() for a in actors])  # waits for every engine to start
    return pool


@dataclass
class Pending:
    """Results of one batch call, still running on one or more replicas."""

    refs: list  # one ObjectRef per replica part
    rows: list[np.ndarray]  # the caller's row indices in each part
    n: int

    def result(self, timeout: float | None = None):
        import ray

        parts = ray.get(self.refs, timeout=timeout)
        return merge_parts(parts, self.rows, self.n)

    def ready(self) -> bool:
        import ray

        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(done) == len(self.refs)


class ServicePool:
    def __init__(self, actors: list):
        self.actors = actors
        self.infos: list[dict] = []
        self._inflight: list[list[tuple[Any, int]]] = [[] for _ in actors]  # (ref, work) per replica
        self._sticky: OrderedDict[Hashable, int] = OrderedDict()
        self.calls_per_replica = np.zeros(len(actors), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.actors)

    # -- the service calls, spread over replicas --------------------------------------------

    def score(self, sequences, response_starts, k: int, keys: Sequence[Hashable] | None = None) -> Pending:
        parts = self._split([len(s) for s in sequences], keys)
        refs = [
            self._submit(r, "score", [sequences[i] for i in rows], [response_starts[i] for i in rows], k,
                         work=sum(len(sequences[i]) for i in rows))
            for r, rows in parts
        ]
        return Pending(refs, [rows for _, rows in parts], len(sequences))

    def generate(self, prefixes, max_new_tokens, k: int, temperature: float = 1.0, top_k: int = -1,
                 seeds: Sequence[int] | None = None, keys: Sequence[Hashable] | None = None) -> Pending:
        budgets = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        parts = self._split([len(p) + b for p, b in zip(prefixes, budgets)], keys)
        refs = [
            self._submit(r, "generate", [prefixes[i] for i in rows], [budgets[i] for i in rows], k, temperature,
                         top_k, None if seeds is None else [seeds[i] for i in rows],
                         work=sum(len(prefixes[i]) + budgets[i] for i in rows))
            for r, rows in parts
        ]
        return Pending(refs, [rows for _, rows in parts], len(prefixes))

    def load_weights(self, blob: bytes, version: int) -> list[int]:
        """Every replica gets the same weights; returns once all have them."""
        import ray

        ref = ray.put(blob)  # one copy in the object store, not one per replica
        return ray.get([a.load_weights.remote(ref, version) for a in self.actors])

    def versions(self) -> list[int]:
        import ray

        return ray.get([a.get_version.remote() for a in self.actors])

    # -- placement ------------------------------------------------------------------------------

    def load(self) -> np.ndarray:
        """Work (tokens) still in flight on each replica."""
        import ray

        loads = np.zeros(len(self.actors), dtype=np.int64)
        for r, inflight in enumerate(self._inflight):
            if inflight:
                refs = [ref for ref, _ in inflight]
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                done = set(done)
                self._inflight[r] = inflight = [(ref, w) for ref, w in inflight if ref not in done]
            loads[r] = sum(w for _, w in inflight)
        return loads

    def _split(self, work: list[int], keys) -> list[tuple[int, np.ndarray]]:
        """Assign each row to a replica; returns (replica, rows) for replicas that got any."""
        loads = self.load().astype(np.float64)
        slack = max(work, default=0) * 4  # how much busier a sticky replica may be than the idlest
        owner = np.empty(len(work), dtype=np.int64)
        for i, w in enumerate(work):  # per sequence, not per token: placement needs the running loads
            key = None if keys is None else keys[i]
            r = self._sticky.get(key) if key is not None else None
            if r is None or loads[r] > loads.min() + slack:
                r = int(loads.argmin())
            if key is not None:
                self._sticky[key] = r
                self._sticky.move_to_end(key)
                if len(self._sticky) > STICKY_KEYS_KEPT:
                    self._sticky.popitem(last=False)
            owner[i] = r
            loads[r] += w
        return [(r, np.flatnonzero(owner == r)) for r in range(len(self.actors)) if (owner == r).any()]

    def _submit(self, replica: int, method: str, *args, work: int):
        ref = getattr(self.actors[replica], method).remote(*args)
        self._inflight[replica].append((ref, work))
        self.calls_per_replica[replica] += 1
        return ref


def merge_parts(parts: list, rows: list[np.ndarray], n: int):
    """Reassemble per-replica results (ScoreResult or GenerateResult) into one, in caller order."""
    first = parts[0]
    merged = {}
    for f in fields(first):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], TopK):
            merged[f.name] = _merge_topk(values, rows, n)
        elif isinstance(values[0], np.ndarray):
            merged[f.name] = _merge_arrays(values, rows, n, PAD_ID if f.name == "tokens" else 0)
        elif f.name == "errors":
            errors = [None] * n
            for part, idx in zip(values, rows):
                for i, e in zip(idx, part):
                    errors[i] = e
            merged[f.name] = errors
        elif f.name == "version":
            merged[f.name] = min(values)  # replicas always agree after load_weights; min is the safe side
        elif f.name in ("seconds", "convert_seconds"):
            merged[f.name] = max(values)
        else:
            merged[f.name] = values[0]
    return replace(first, **merged)


def _merge_arrays(values: list[np.ndarray], rows, n: int, fill) -> np.ndarray:
    width = max(v.shape[1] for v in values) if values[0].ndim > 1 else None
    shape = (n,) if width is None else (n, width, *values[0].shape[2:])
    out = np.full(shape, fill, dtype=values[0].dtype)
    for v, idx in zip(values, rows):
        if width is None:
            out[idx] = v
        else:
            out[idx, : v.shape[1]] = v
    return out


def _merge_topk(values: list[TopK], rows, n: int) -> TopK:
    width = max(v.ids.shape[1] for v in values)
    out = TopK.empty((n, width), values[0].k)
    for v, idx in zip(values, rows):
        t = v.ids.shape[1]
        out.ids[idx, :t] = v.ids
        out.logprobs[idx, :t] = v.logprobs
        out.token_logprob[idx, :t] = v.token_logprob
        out.mask[idx, :t] = v.mask
    return out
