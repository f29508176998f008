"""The distill recipe: roll out with a switching policy -> train the student -> push its weights.

    python -m orchestrator.run --config deploy/configs/embedded.yaml policy.name=adaswitch

Policies (policy.name): on_policy, teacher, ground_truth, mixed, skd, switch, adaswitch
(DESIGN.md). Each step's batch is kept on disk until a checkpoint covers it, so a restarted
learner or a resumed run trains on the very same tokens. With schedule.max_policy_lag=1 the
rollout of step n+1 runs while step n trains (TrainingLoop.train_on's ``while_training``).
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import RunConfig
from orchestrator.launcher import check_cluster_fits, connect_ray, start_learner, start_service
from orchestrator.metrics import RunMetrics
from orchestrator.rollout import Rollout, run_rollout
from orchestrator.rollout_store import drop_rollout, load_rollout, save_rollout
from orchestrator.steps import EvalSet, TrainingLoop, engine_pids, fresh_kept_weights, prepare_inputs
from orchestrator.stop import StopRequested
from services.pool import ServiceError


def distill(cfg: RunConfig, services: tuple | None = None) -> Path:
    """One distillation run. ``services`` (teacher pool, student pool) reuses engines a caller
    started (bench/methods.py runs many methods on one pair); the run then leaves them up."""
    started = time.perf_counter()
    run_dir, tokenizer, train, held_out = prepare_inputs(cfg)
    connect_ray(cfg)
    check_cluster_fits(cfg)
    eos = tokenizer.eos_token_id

    # Engines and learner start together: each spends much of its start-up waiting (process
    # spawns, imports, a gloo rendezvous), so overlapping them shortens the run's start-up.
    if services is not None:
        (teacher, student), pools = services, []  # the caller's: not ended here
    else:
        teacher = start_service("teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed, wait=False,
                                wait_s=cfg.ray.node_wait_s)
        student = start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed,
                                fresh_kept_weights(run_dir), wait=False, wait_s=cfg.ray.node_wait_s)
        pools = [teacher, student]
    learner = start_learner(cfg.models.student, cfg.learner, cfg.loss, cfg.schedule.steps, cfg.ray.node_wait_s)
    for pool in pools:
        pool.wait_ready()

    max_model_len = min(cfg.services.teacher.max_model_len, cfg.services.student.max_model_len)
    rollout = Rollout(cfg.policy, cfg.rollout, teacher, student, eos, max_model_len, teacher.vocab_size)
    metrics = RunMetrics(run_dir, cfg.policy.name)
    metrics.event("started", {"policy": cfg.policy.name, "strategy": cfg.rollout.strategy,
                              "pids": engine_pids(pools)})
    loop = TrainingLoop(cfg, run_dir, metrics, learner, student, EvalSet(held_out, tokenizer, max_model_len),
                        pools, teacher=teacher, started=started)
    loop.restore(reused_student=services is not None)
    loop.evaluate_baseline()

    def batch_for(step: int) -> tuple | None:
        """Step ``step``'s batch: the one saved on disk if it was rolled out before a learner
        restart or a stop and is fresh enough to train on, else rolled out now by the weights the
        student serves. (batch, rollout seconds, weights_step, replayed), or None after a stop."""
        saved = load_rollout(run_dir, step)
        if saved is not None and not loop.too_stale(saved[2]):
            return (*saved, True)
        if saved is not None:
            drop_rollout(run_dir, step)
            loop.metrics.event("stale_rollout_dropped", {"step": step, "weights_step": saved[2]})
        indices, sample_ids = loop.next_rows(len(train), ahead=step - loop.step - 1)
        weights_step = loop.weights_step()
        try:
            with loop.stop.interruptible():
                batch = run_rollout(rollout, [train.prompt_ids[i] for i in indices],
                                    [train.reference_ids[i] for i in indices], sample_ids,
                                    seed=cfg.seed * 1_000_003 + step, policy_version=loop.version)
        except StopRequested:
            return None
        seconds = rollout.timings["rollout_seconds"]
        save_rollout(run_dir, step, batch, seconds, weights_step)
        return batch, seconds, weights_step, False

    rolled_ahead: dict[int, tuple | ServiceError | None] = {}  # step -> its batch, rolled out while the step before trained

    def roll_ahead(step: int) -> None:
        try:
            rolled_ahead[step] = batch_for(step)
        except ServiceError as err:  # raised once the step it overlapped is trained and logged
            rolled_ahead[step] = err

    try:
        while loop.more_steps():
            step = loop.step + 1
            # The batch rolled out ahead is this step's unless a learner restart sent the loop back
            # to its checkpoint (the batches since then, that one too, are replayed from disk).
            ready = rolled_ahead.pop(step, None) or batch_for(step)
            rolled_ahead.clear()
            if isinstance(ready, ServiceError):
                raise ready
            if ready is None:  # a stop interrupted the rollout
                break
            batch, rollout_seconds, weights_step, replayed = ready
            overlap = cfg.schedule.max_policy_lag > 0 and not loop.is_last(batch)
            loop.train_on(batch, rollout_seconds, cfg.rollout.prompts_per_step, replayed=replayed, weights_step=weights_step,
                          while_training=(lambda: roll_ahead(step + 1)) if overlap else None)
    except ServiceError as err:  # a replica lost for good (e.g. no node came back within ray.node_wait_s)
        loop.failed(err)
        raise

    if loop.stop.requested:
        return loop.stopped()
    return loop.finish(f"switchkd: {cfg.policy.name} ({cfg.rollout.strategy})",
                       {"policy": cfg.policy.name, "strategy": cfg.rollout.strategy})
