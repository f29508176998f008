"""The distill recipe: roll out with a switching policy -> train the student -> push its weights.

    python -m orchestrator.run --config deploy/configs/embedded.yaml policy.name=adaswitch

Policies (policy.name): on_policy, teacher, ground_truth, mixed, skd, switch, adaswitch
(DESIGN.md). Each step's batch is kept on disk until a checkpoint covers it, so a restarted
learner or a resumed run trains on the very same tokens.
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import RunConfig
from orchestrator.launcher import check_cluster_fits, connect_ray, start_learner, start_service
from orchestrator.metrics import RunMetrics
from orchestrator.rollout import Rollout, run_rollout
from orchestrator.rollout_store import load_rollout, save_rollout
from orchestrator.steps import EvalSet, TrainingLoop, engine_pids, fresh_kept_weights, prepare_inputs
from orchestrator.stop import StopRequested


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

    while loop.more_steps():
        indices, sample_ids = loop.next_rows(len(train))
        saved = load_rollout(run_dir, loop.step + 1)  # rolled out before a learner restart or a stop
        if saved is not None:
            batch, rollout_seconds = saved
        else:
            try:
                with loop.stop.interruptible():
                    batch = run_rollout(rollout, [train.prompt_ids[i] for i in indices],
                                        [train.reference_ids[i] for i in indices], sample_ids,
                                        seed=cfg.seed * 1_000_003 + loop.step + 1, policy_version=loop.version)
            except StopRequested:
                break
            rollout_seconds = rollout.timings["rollout_seconds"]
            save_rollout(run_dir, loop.step + 1, batch, rollout_seconds)
        loop.train_on(batch, rollout_seconds, len(indices), replayed=saved is not None)

    if loop.stop.requested:
        return loop.stopped()
    return loop.finish(f"switchkd: {cfg.policy.name} ({cfg.rollout.strategy})",
                       {"policy": cfg.policy.name, "strategy": cfg.rollout.strategy})
