"""The sft recipe: fixed text -> train the student with cross-entropy; no teacher engine.

    python -m orchestrator.run --config deploy/configs/embedded-rationale.yaml

sft.format picks the text: answer_only is plain supervised fine-tuning on the dataset's
references; multitask, single_sequence and input_augmentation add the teacher's rationales
(Ballout et al. 2409.12586), made first by the attribution stage (orchestrator.rationale.stage:
teacher copies in Ray actors, cached next to the data). The student service only evaluates.
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import RunConfig
from orchestrator.launcher import check_cluster_fits, connect_ray, start_learner, start_service
from orchestrator.metrics import RunMetrics
from orchestrator.rationale.data import prepare
from orchestrator.steps import EvalSet, TrainingLoop, engine_pids, fresh_kept_weights, prepare_inputs


def sft(cfg: RunConfig, student=None) -> Path:
    """One fine-tuning run. ``student`` reuses a student pool a caller started (bench/), left up."""
    started = time.perf_counter()
    run_dir, tokenizer, train, held_out = prepare_inputs(cfg)
    connect_ray(cfg)
    check_cluster_fits(cfg)
    metrics = RunMetrics(run_dir, "sft")

    # The attribution stage first: it needs the CPUs/GPUs to itself.
    rows, held_out, postprocess, summary = prepare(cfg, tokenizer, train, held_out, metrics)
    metrics.event("rationales_ready", summary)
    print(f"training rows: {summary}")

    reused_student, pools = student is not None, []
    if student is None:
        student = start_service("student", cfg.models.student, cfg.services.student, tokenizer.eos_token_id,
                                cfg.seed, fresh_kept_weights(run_dir), wait=False, wait_s=cfg.ray.node_wait_s)
        pools = [student]
    learner = start_learner(cfg.models.student, cfg.learner, cfg.loss, cfg.schedule.steps, cfg.ray.node_wait_s)
    for pool in pools:
        pool.wait_ready()
    metrics.event("started", {"method": "sft", "format": cfg.sft.format,
                              "pids": engine_pids(pools)})
    eval_set = EvalSet(held_out, tokenizer, cfg.services.student.max_model_len, postprocess)
    loop = TrainingLoop(cfg, run_dir, metrics, learner, student, eval_set, pools, started=started)
    loop.restore(reused_student)
    loop.evaluate_baseline()

    while loop.more_steps():
        indices, _ = loop.next_rows(len(rows))
        t = time.perf_counter()
        batch = rows.batch(indices, loop.version)  # the dataset writes every token: nothing to roll out
        loop.train_on(batch, time.perf_counter() - t, len(indices))

    if loop.stop.requested:
        return loop.stopped()
    return loop.finish(f"switchkd: sft ({cfg.sft.format})", {"method": "sft", "format": cfg.sft.format})
