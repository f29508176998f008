"""Where a service call's time goes: one round trip, split into its parts, on each engine.

    python -m bench.round_trip [--config deploy/configs/embedded.yaml] [--repeats 7]

One replica of the teacher and one of the student (the config's engines otherwise). For a
one-token ``generate``, the same as a lockstep step with sessions (``rollout.sessions``: each
call adds one token to every row and sends only that), and a short ``score`` (``--score-tokens``
response positions) at batch 1 and 32, the round trip as the coordinator sees it (``ServicePool``
call to merged answer), split into:

    coordinator  the pool splitting the call over replicas and submitting it, then merging answers
    Ray in       submission to the actor's method starting (queueing behind other calls included)
    service      the actor's own Python: checks, sampling parameters, adding requests
    engine       vLLM's engine steps (the ``engine.step()`` calls), and how many
    conversion   vLLM's outputs to ``TopK`` arrays
    Ray out      the method's return to the answer in the coordinator (serialisation, transfer)

and the round trip over the engine's time for the same call. A one-token call is one forward
step of the engine plus an empty first ``step()`` (vLLM's engine core has not picked the new
requests up yet; ~0.1 ms), so at batch 1 the engine time is vLLM's own step time: the issue's
goal is a batch-1 round trip within 2x of it. The actor stamps its times (``CallTimes``) with the wall
clock, and caller and actors share one machine, so the parts add up to the round trip. Then the
queueing behind a long call: a one-row score sent to the student engine while a 32-row draft of
``--draft-tokens`` runs there, on the replica the config makes (calls share its running batch)
and, side by side, on one that serves one call at a time (``concurrent_calls=1``). With --async,
the same rows and the queueing for each engine served by vLLM's AsyncLLM in an async actor
(services/async_model_service.py; its "engine" part is the time its requests were awaited). Each figure is the median
over ``--repeats`` calls after one warm-up. Figures only: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import numpy as np

PARTS = ("coordinator", "ray_in", "service", "engine", "conversion", "ray_out")


@dataclass
class Split:
    """One call's round trip (seconds) and its parts."""

    total: float
    coordinator: float
    ray_in: float
    service: float
    engine: float
    conversion: float
    ray_out: float
    engine_steps: int


def timed_call(send) -> Split:
    """``send()`` makes one pool call (returns its Pending); its answer, waited for and merged here
    as ``Pending.result`` does, with the time of each part."""
    import ray

    from services.pool import merge_parts

    started = time.perf_counter()
    pending = send()
    sent_at = time.time()
    submitted = time.perf_counter()
    answers = ray.get(pending.refs)
    got_at, got = time.time(), time.perf_counter()
    merged = merge_parts(answers, [p.rows for p in pending.parts], pending.n)
    done = time.perf_counter()
    times = merged.times
    service_s = times.answered_at - times.received_at
    return Split(total=done - started, coordinator=(submitted - started) + (done - got),
                 ray_in=times.received_at - sent_at, service=service_s - times.engine_seconds - times.convert_seconds,
                 engine=times.engine_seconds, conversion=times.convert_seconds, ray_out=got_at - times.answered_at,
                 engine_steps=times.engine_steps)


def median_split(splits: list[Split]) -> Split:
    """Each part's median over the calls."""
    return Split(**{name: float(np.median([getattr(s, name) for s in splits]))
                    for name in ("total", *PARTS)}, engine_steps=int(np.median([s.engine_steps for s in splits])))


def measure(send, repeats: int) -> Split:
    send().result()  # warm-up: the first call of a shape pays for compiling and allocating
    return median_split([timed_call(send) for _ in range(repeats)])


def session_step(pool, prompts: list[list[int]], k: int, label: str):
    """``send()`` for lockstep steps with sessions: each call adds one token to every row, so every
    call after the first (measure's warm-up, which starts the sessions) sends one token per row."""
    prefixes = [list(p) for p in prompts]
    keys = [f"{label}-{len(prompts)}-{i}" for i in range(len(prompts))]

    def send():
        for prefix in prefixes:
            prefix.append(prefix[-1])  # which token it is does not change the time
        return pool.generate(prefixes, 1, k, 0.0, keys=keys, sessions=True)
    return send


def row(engine: str, call: str, batch: int, s: Split) -> str:
    ms = lambda x: f"{1000 * x:.1f}"  # noqa: E731
    return (f"| {engine} | {call} | {batch} | {ms(s.total)} | {ms(s.coordinator)} | {ms(s.ray_in)} | {ms(s.service)} | "
            f"{ms(s.engine)} ({s.engine_steps}) | {ms(s.conversion)} | {ms(s.ray_out)} | {s.total / s.engine:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded.yaml")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--score-tokens", type=int, default=8, help="response positions a short score reads")
    parser.add_argument("--draft-tokens", type=int, default=128, help="the long draft a one-row score waits behind")
    parser.add_argument("--async", dest="async_engines", action="store_true",
                        help="also each engine served by vLLM's AsyncLLM in an async actor (services/async_model_service.py)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from build.ensure import ensure_models
    from orchestrator.config import load_config
    from orchestrator.data import load_split
    from orchestrator.launcher import connect_ray, start_service
    from orchestrator.models import check_pair
    from services.async_model_service import AsyncModelService
    from services.model_service import raise_errors

    cfg = load_config(args.config, [*args.overrides, "services.teacher.replicas=1", "services.student.replicas=1",
                                    "ray.dashboard=false"])
    ensure_models(cfg)
    tokenizer = check_pair(cfg.models.teacher, cfg.models.student)
    examples = load_split(cfg.data, cfg.data.eval_split, tokenizer)
    n = max(args.batches)
    prompts = [examples.prompt_ids[i % len(examples)] for i in range(n)]
    connect_ray(cfg)
    eos, k = tokenizer.eos_token_id, cfg.rollout.top_k
    engines = {"teacher": start_service("teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed),
               "student": start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed)}
    if args.async_engines:  # the same engines, served by AsyncLLM in async actors
        for role in ("teacher", "student"):
            # num_cpus=0: Ray's logical CPUs are sized for the config's engines (all share the same cores)
            engines[f"{role}, AsyncLLM"] = start_service(f"{role}-async", getattr(cfg.models, role),
                                                         replace(getattr(cfg.services, role), num_cpus=0), eos,
                                                         cfg.seed, actor_class=AsyncModelService)
    # What a short score reads: each prompt and --score-tokens the student wrote after it.
    drafted = engines["student"].generate(prompts, args.score_tokens, k, 0.0).result()
    raise_errors(drafted)
    sequences = [p + drafted.tokens[i, : drafted.lengths[i]].tolist() for i, p in enumerate(prompts)]
    starts = [len(p) for p in prompts]
    print(f"{cfg.models.teacher} / {cfg.models.student}: k={k}, prompts of {np.mean(starts):.0f} tokens on average, "
          f"short score = {args.score_tokens} response positions; median of {args.repeats} calls, in ms\n")
    print("| engine | call | batch | round trip | coordinator | Ray in | service | engine (steps) | conversion "
          "| Ray out | round trip / engine |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, pool in engines.items():
        for batch in args.batches:
            split = measure(lambda: pool.generate(prompts[:batch], 1, k, 0.0), args.repeats)
            print(row(name, "generate 1 token", batch, split), flush=True)
            split = measure(session_step(pool, prompts[:batch], k, name), args.repeats)
            print(row(name, "generate 1 token, session", batch, split), flush=True)
            split = measure(lambda: pool.score(sequences[:batch], starts[:batch], k), args.repeats)
            print(row(name, f"score {args.score_tokens} positions", batch, split), flush=True)

    # Queueing: a one-row verify sent while a draft runs on the same replica. It joins the draft's
    # running batch (services.*.concurrent_calls); side by side, a replica serving one call at a
    # time (concurrent_calls=1, how services ran before), where it waits for the draft to finish.
    serial = start_service("student-serial", cfg.models.student,
                           replace(cfg.services.student, concurrent_calls=1), eos, cfg.seed)
    serial.score(sequences[:1], starts[:1], k).result()  # warm-up
    print()
    students = [("shared batch", engines["student"]), ("one call at a time", serial)]
    if args.async_engines:
        students.append(("AsyncLLM", engines["student, AsyncLLM"]))
    for label, student in students:
        alone = measure(lambda: student.score(sequences[:1], starts[:1], k), args.repeats)
        behind = []
        for _ in range(args.repeats):
            draft = student.generate(prompts, args.draft_tokens, k, 0.0)
            time.sleep(0.05)  # the draft is running
            behind.append(timed_call(lambda: student.score(sequences[:1], starts[:1], k)))
            draft.result()
        behind = median_split(behind)
        print(f"one-row score on the student engine ({label}): {1000 * alone.total:.1f} ms alone, "
              f"{1000 * behind.total:.1f} ms sent while a {n}-row draft of {args.draft_tokens} tokens runs there, "
              f"of which {1000 * behind.ray_in:.1f} ms waiting to start (Ray in) and {1000 * behind.engine:.1f} ms "
              f"in the engine ({behind.engine_steps} steps)", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
