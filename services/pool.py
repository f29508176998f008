"""N replicas of a ModelService in Ray actors, behind one handle (orchestrator.launcher starts them).

A batch is split over the replicas: each sequence goes to the replica with the least work in
flight (work = tokens), except that a sequence with a key (its prompt's id) stays on the replica
that served that key before while that replica is not overloaded, so vLLM's prefix cache pays.
The parts run concurrently; ``Pending.result()`` puts the rows back in the caller's order.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np
import ray
from ray._private import state as ray_state
from ray.util.placement_group import remove_placement_group

from protocol.topk import PAD_ID, TopK
from services.model_service import merge_times

STICKY_KEYS_KEPT = 100_000
RESTART_TIMEOUT_S = 600.0  # how long a call waits for Ray to bring a replica back (the run passes ray.node_wait_s)


def wait_until_answers(call: Callable[[], Any], timeout_s: float, label: str):
    """Block until the actor call ``call()`` makes is answered, asking again while Ray restarts the
    actor (it refuses calls meanwhile); the answer. Raises TimeoutError naming ``label``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call(), timeout=max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label} did not come back within {timeout_s:g} s of a restart") from None
            time.sleep(1.0)


class ServiceError(RuntimeError):
    """A service call that failed on every attempt (replica dead or hung); says which and why."""


def missing_resources(needed: dict[str, float], available: dict[str, float]) -> str | None:
    """What ``available`` lacks for ``needed``, in words; None when everything fits."""
    short = [f"{needed[name]:g} {name} (the cluster has {available.get(name, 0):g})"
             for name in needed if needed[name] > available.get(name, 0) + 1e-9]
    return ", ".join(short) or None


@dataclass
class _Part:
    """The rows of one call sent to one replica, with what it takes to send them again."""

    replica: int
    method: str
    args: tuple
    rows: np.ndarray  # the caller's row indices
    work: int
    ref: Any = None
    sent_at: float = 0.0
    attempts: int = 0


@dataclass
class Pending:
    """Results of one batch call, still running on one or more replicas."""

    pool: "ServicePool"
    parts: list[_Part]
    n: int

    @property
    def refs(self) -> list:
        return [p.ref for p in self.parts]

    def result(self):
        """Every part's answer, in the caller's row order; failed parts are sent again first."""
        return merge_parts([self.pool.collect(p) for p in self.parts], [p.rows for p in self.parts], self.n)

    def ready(self) -> bool:
        """All parts answered (or failed, or overran the timeout: ``result`` deals with those)."""
        done, _ = ray.wait(self.refs, num_returns=len(self.parts), timeout=0)
        return len(done) == len(self.parts) or self.pool.overdue(self.parts)


def placed(actor) -> bool:
    """Ray has ``actor`` up (not restarting, not waiting for a node with room). Read from the GCS
    actor table: Ray's public state API needs the dashboard, which a run may leave off."""
    try:
        return ray_state.actors(actor._actor_id.hex())["State"] == "ALIVE"
    except Exception:  # the table could not be read: take the actor as up, as before this check
        return True


def wait_any(pendings: list[Pending]) -> None:
    """Block until one of ``pendings`` is ready or its oldest part reaches the request timeout."""
    refs, deadlines = [], []
    for pending in pendings:
        refs += pending.refs
        deadlines += [d for p in pending.parts if (d := pending.pool.deadline(p)) is not None]
    timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
    ray.wait(refs, num_returns=1, timeout=timeout)


class ServicePool:
    """``actors``: started ModelService actors; ``ready``: their info() calls, answered once each
    engine serves (``wait_ready`` collects them); ``needs``: the Ray resources one replica needs
    (named when a lost replica finds no room to come back within ``node_wait_s``)."""

    def __init__(self, actors: list, name: str = "service", request_timeout_s: float | None = None,
                 request_retries: int = 0, ready: list | None = None, placement_groups: list | None = None,
                 node_wait_s: float = RESTART_TIMEOUT_S, needs: dict[str, float] | None = None):
        self.actors = actors
        self.node_wait_s = node_wait_s
        self.needs = needs or {}
        self.placement_groups = placement_groups or []  # an engine split over GPUs: one per replica
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.request_retries = request_retries
        self.infos: list[dict] = []
        self.ready: list = ready or []
        self._inflight: list[list[tuple[Any, int]]] = [[] for _ in actors]  # (ref, work) per replica
        self._sticky: OrderedDict[Hashable, int] = OrderedDict()
        self.calls_per_replica = np.zeros(len(actors), dtype=np.int64)
        self.events: list[dict] = []  # faults and retries since the caller last took them
        self._probes: dict[int, Any] = {}  # replicas seen failing -> an info() call that answers once back
        # The latest weights pushed to every replica, as object references (version, buckets): a
        # replica Ray brings back on a node that cannot see its kept weights (no shared storage)
        # answers at an older version and is brought up to date from them (``collect``).
        self.latest_weights: tuple[int, list] | None = None

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def vocab_size(self) -> int | None:
        """The served model's vocabulary (known once ``wait_ready`` has returned)."""
        return self.infos[0]["vocab_size"] if self.infos else None

    def wait_ready(self) -> "ServicePool":
        """Block until every replica's engine has started (raises if one failed to)."""
        self.infos = ray.get(self.ready)
        return self

    def shutdown(self) -> None:
        """End every replica (its vLLM engine process goes with it)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for group in self.placement_groups:
            remove_placement_group(group)

    # -- the service calls, spread over replicas --------------------------------------------

    def score(self, sequences, response_starts, k: int, keys: Sequence[Hashable] | None = None) -> Pending:
        parts = [
            self._send(_Part(r, "score", ([sequences[i] for i in rows], [response_starts[i] for i in rows], k),
                             rows, sum(len(sequences[i]) for i in rows)))
            for r, rows in self._split([len(s) for s in sequences], keys)
        ]
        return Pending(self, parts, len(sequences))

    def generate(self, prefixes, max_new_tokens, k: int, temperature: float = 1.0, top_k: int = -1,
                 seeds: Sequence[int] | None = None, keys: Sequence[Hashable] | None = None,
                 ignore_eos: bool = False, sessions: bool = False) -> Pending:
        """``sessions``: each row's request stays in its replica's engine under its key, and the
        row's next call there sends only what its prefix adds (ModelService.generate)."""
        if sessions and keys is None:
            raise ValueError("generate(sessions=True) needs a key per row")
        budgets = [max_new_tokens] * len(prefixes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        parts = [
            self._send(_Part(r, "generate", ([prefixes[i] for i in rows], [budgets[i] for i in rows], k, temperature,
                                             top_k, None if seeds is None else [seeds[i] for i in rows], ignore_eos,
                                             [keys[i] for i in rows] if sessions else None),
                             rows, sum(len(prefixes[i]) + budgets[i] for i in rows)))
            for r, rows in self._split([len(p) + b for p, b in zip(prefixes, budgets)], keys)
        ]
        return Pending(self, parts, len(prefixes))

    def end_sessions(self, keys: Sequence[Hashable] | None = None) -> int:
        """End the sessions of ``keys`` (all when None) on every replica that is up, freeing their
        KV; how many ended. A replica that is down has lost its sessions already."""
        down = self.down()
        calls = [actor.end_sessions.remote(None if keys is None else list(keys))
                 for r, actor in enumerate(self.actors) if r not in down]
        ended = 0
        for call in calls:
            try:
                ended += ray.get(call, timeout=self.request_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # died or hung meanwhile: a restart takes its sessions along; else its next weight load ends them
        return ended

    def load_weights(self, blob, version: int) -> list[int]:
        """Every replica gets the same weights (a safetensors blob, or a Ray object reference to
        one: the learner's rank 0 leaves it in the object store); returns their versions once all
        have them. A replica that died meanwhile is waited for: it comes back with its kept
        weights, and gets these if it kept older ones."""
        ref = blob if isinstance(blob, ray.ObjectRef) else ray.put(blob)  # one copy, not one per replica
        self.latest_weights = (version, [ref])
        calls = [a.load_weights.remote(ref, version) for a in self.actors]
        versions = []
        for replica, call in enumerate(calls):
            try:
                versions.append(ray.get(call))
            except ray.exceptions.RayActorError:
                kept = self.wait_until_serving(replica)["version"]
                versions.append(kept if kept >= version else ray.get(self.actors[replica].load_weights.remote(ref, version)))
        return versions

    def load_weight_buckets(self, buckets: Iterable, version: int, replicas: Sequence[int] | None = None) -> dict:
        """Stream weight ``version`` into ``replicas`` (default: all), bucket by bucket (blobs or
        Ray object references to them, e.g. the learner's streamed buckets). Each bucket goes to
        every replica at once, and the next one is taken only when the one before has loaded
        everywhere, so at most two buckets are in flight whatever the model's size. A replica that
        dies on the way drops out of this push (Ray brings it back at an older version): it is in
        the result's ``failed``, for the caller to push again. Returns {failed, bytes, buckets}.
        The buckets of a push to every replica stay in the object store until the next one
        (``latest_weights``)."""
        live = list(range(len(self.actors)) if replicas is None else replicas)
        failed: list[int] = []
        kept: list = []

        def settle(calls: dict) -> list:
            """The answers of ``calls`` (replica -> call); a replica that died drops out, and so
            does one whose engine failed to load (restarted: vLLM cannot reload in place after a
            failed reload, and Ray brings the replica back at its kept version)."""
            answers = []
            for replica, call in calls.items():
                try:
                    answers.append(ray.get(call))
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                    if isinstance(err, ray.exceptions.RayTaskError):
                        self._restart(replica)
                        self.events.append({"event": "replica_restarted_after_failed_load", "service": self.name,
                                            "replica": replica, "version": version, "error": str(err)[-500:]})
                    if replica in live:
                        live.remove(replica)
                        failed.append(replica)
            return answers

        settle({r: self.actors[r].begin_weights.remote(version) for r in live})
        sizes, previous, count = [], {}, 0
        for bucket in buckets:
            bucket = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
            kept.append(bucket)
            current = {r: self.actors[r].load_bucket.remote(bucket) for r in live}
            sizes += settle(previous)[:1]  # the bucket before has loaded everywhere (or its replica is out)
            previous = {r: call for r, call in current.items() if r in live}
            count += 1
        sizes += settle(previous)[:1]
        settle({r: self.actors[r].end_weights.remote(version) for r in live})
        if replicas is None:
            self.latest_weights = (version, kept)
        return {"failed": failed, "bytes": int(sum(sizes)), "buckets": count}

    def _restart(self, replica: int) -> None:
        """Have Ray restart ``replica`` and return once its old process is gone: the kill lands
        asynchronously, and until then the old process answers calls (version -1 after a failed
        reload) as if it were the restarted replica."""
        ray.kill(self.actors[replica], no_restart=False)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if ray.get(self.actors[replica].info.remote())["version"] != -1:
                    return  # already the restarted one
            except ray.exceptions.RayActorError:
                return  # the old one is gone; Ray is bringing it back
            time.sleep(0.1)

    def versions(self) -> list[int]:
        return [self.wait_until_serving(r)["version"] for r in range(len(self.actors))]

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    # -- faults -----------------------------------------------------------------------------------

    def deadline(self, part: _Part) -> float | None:
        return None if self.request_timeout_s is None else part.sent_at + self.request_timeout_s

    def overdue(self, parts: list[_Part]) -> bool:
        now = time.monotonic()
        return any((d := self.deadline(p)) is not None and now >= d for p in parts)

    def collect(self, part: _Part):
        """The answer to ``part``, sent again where needed. A hung replica (no answer within the
        request timeout) is killed, Ray restarts it, and the part costs one of its
        ``request_retries``. A part whose replica died (a crash, its node lost) costs none: a lost
        node is not the request's fault, and Ray's ``max_restarts`` bounds how often a replica may
        die. Either way the part goes to the least-loaded other replica that is up, or waits (up
        to ``node_wait_s``) for Ray to bring one back. A replica that answers at an older weight
        version than the pool's latest (back on a node without its kept weights) is brought up to
        date and asked again."""
        while True:
            deadline = self.deadline(part)
            try:
                answer = ray.get(part.ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                if not self._behind(answer):
                    return answer
                self._bring_up_to_date(part.replica)
                self._send(part)
                continue
            except ray.exceptions.GetTimeoutError:
                hung = placed(self.actors[part.replica])  # else it waits for a node with room, not hung
                if hung:
                    cause = f"no answer within request_timeout_s={self.request_timeout_s:g}"
                    ray.kill(self.actors[part.replica], no_restart=False)
                else:
                    cause = "the replica is waiting for a node with room (its node was lost)"
            except ray.exceptions.RayActorError as err:
                cause = f"the replica died ({type(err).__name__})"
                hung = False
            self._probes.setdefault(part.replica, self.actors[part.replica].info.remote())
            label = f"{self.name}-{part.replica}.{part.method} ({len(part.rows)} sequences)"
            if hung and part.attempts >= self.request_retries:
                raise ServiceError(f"{label}: {cause}; gave up after {part.attempts + 1} attempt(s) "
                                   f"(services.*.request_retries={self.request_retries})")
            self.events.append({"event": "request_retried", "service": self.name, "replica": part.replica,
                                "method": part.method, "cause": cause})
            part.attempts += hung
            part.replica = self._replacement(part.replica)
            self._send(part)

    def _behind(self, answer) -> bool:
        """A call's answer came from weights older than the latest pushed to every replica."""
        version = getattr(answer, "version", None)
        return self.latest_weights is not None and version is not None and version < self.latest_weights[0]

    def _bring_up_to_date(self, replica: int) -> None:
        """Load the latest pushed weights (kept in the object store) into ``replica``."""
        version, buckets = self.latest_weights
        if self.load_weight_buckets(buckets, version, [replica])["failed"]:
            self._probes.setdefault(replica, self.actors[replica].info.remote())
            self.wait_until_serving(replica)
            self.load_weight_buckets(buckets, version, [replica])
        self.events.append({"event": "replica_brought_up_to_date", "service": self.name, "replica": replica,
                            "version": version})

    def _replacement(self, failed: int) -> int:
        """The least-loaded other replica; with none, ``failed`` itself once Ray has restarted it."""
        down = self.down()
        others = [r for r in range(len(self.actors)) if r != failed and r not in down]
        if others:
            loads = self.load()
            return min(others, key=lambda r: loads[r])
        self.wait_until_serving(failed)
        return failed

    def wait_until_serving(self, replica: int) -> dict:
        """Block until ``replica`` answers (Ray refuses calls while it restarts, and a replica whose
        node was lost waits for a node with room); its info. After ``node_wait_s`` a ServiceError
        names what the replica needs that the cluster lacks."""
        label = f"{self.name}-{replica}"
        try:
            info = wait_until_answers(self.actors[replica].info.remote, self.node_wait_s, label)
        except TimeoutError:
            # The nodes' totals, not what is free: a replica placed and still starting holds its share.
            lacking = missing_resources(self.needs, ray.cluster_resources())
            why = (f"the cluster is short of {lacking}: start a node with them (ray start --resources for "
                   "custom ones)" if lacking else "the cluster has nodes with what it needs (it may still be "
                   "starting there, or failing to: see the replica's log)")
            raise ServiceError(f"{label} did not come back within {self.node_wait_s:g} s (ray.node_wait_s) after "
                               f"it was lost; one replica needs {self.needs}; {why}") from None
        except ray.exceptions.RayActorError as err:
            raise ServiceError(f"{label} is dead for good (Ray restarts a replica services.*.max_restarts "
                               f"times): {err}") from None
        if self._probes.pop(replica, None) is not None:  # it was down: say so now, at the version it came back with
            self._back(replica, info)
        return info

    def down(self) -> set[int]:
        """Replicas that failed and have not answered since (Ray is restarting them)."""
        for replica, probe in list(self._probes.items()):
            if not ray.wait([probe], timeout=0)[0]:
                continue
            try:
                info = ray.get(probe)
            except ray.exceptions.RayActorError:  # still restarting: ask again
                self._probes[replica] = self.actors[replica].info.remote()
                continue
            del self._probes[replica]
            self._back(replica, info)
        return set(self._probes)

    def _back(self, replica: int, info: dict) -> None:
        self.events.append({"event": "replica_restarted", "service": self.name, "replica": replica,
                            "pid": info["pid"], "version": info["version"]})

    # -- placement ------------------------------------------------------------------------------

    def load(self) -> np.ndarray:
        """Work (tokens) still in flight on each replica."""
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
        down = self.down()
        if down and len(down) == len(self.actors):  # every replica lost (a node): wait for one to come back
            self.wait_until_serving(min(down))
            down = self.down()
        if len(down) < len(self.actors):  # new work avoids replicas Ray is restarting
            loads[list(down)] = np.inf
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

    def _send(self, part: _Part) -> _Part:
        part.ref = getattr(self.actors[part.replica], part.method).remote(*part.args)
        part.sent_at = time.monotonic()
        self._inflight[part.replica].append((part.ref, part.work))
        self.calls_per_replica[part.replica] += 1
        return part


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
        elif f.name == "times":
            merged[f.name] = merge_times(values)
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
        out.put((idx, slice(0, v.ids.shape[1])), v)
    return out
