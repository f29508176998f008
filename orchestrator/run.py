"""The switchkd run: rollout -> train -> push weights -> eval -> checkpoint, then export and report.

    python -m orchestrator.run --config deploy/configs/embedded.yaml policy.name=adaswitch

Under ``ray job submit`` it joins the job's cluster (RAY_ADDRESS); run directly it starts a local
Ray on 127.0.0.1. With ``resume: true`` (the default) a run directory that holds a checkpoint
continues from it: the learner, the data cursor and the student's weight version are restored.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from orchestrator.config import ConfigError, RunConfig, load_config, resume_conflicts, save_config, to_dict
from orchestrator.data import load_split
from orchestrator.embedded import ensure_embedded
from orchestrator.evaluate import evaluate
from orchestrator.metrics import RunMetrics, read_records, rollout_record, step_records
from orchestrator.models import check_pair
from orchestrator.report import write_report
from orchestrator.rollout import Rollout, run_rollout
from orchestrator.rollout_store import drop_rollouts, load_rollout, rollouts_dir, save_rollout
from orchestrator.stop import GracefulStop, StopRequested
from trainer import checkpoint


def connect_ray(cfg: RunConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
    else:
        ray.init(address="local", _node_ip_address=cfg.ray.host, dashboard_host=cfg.ray.host,
                 include_dashboard=cfg.ray.dashboard, logging_level="ERROR", num_cpus=local_cpus(cfg))
    return ray


def needed_resources(cfg: RunConfig) -> dict[str, float]:
    """Ray resources of every actor the run holds at once: engine replicas and learner ranks (the
    rationale method has no teacher engine; its attribution workers end before the rest starts)."""
    engines = [cfg.services.student] if cfg.policy.name == "rationale" else [cfg.services.teacher, cfg.services.student]
    needed = {
        "CPU": sum(e.replicas * e.num_cpus for e in engines) + cfg.learner.world_size * cfg.learner.num_cpus,
        "GPU": sum(e.replicas * e.num_gpus for e in engines) + cfg.learner.world_size * cfg.learner.num_gpus,
    }
    if cfg.policy.name == "rationale":
        needed["CPU"] = max(needed["CPU"], cfg.rationale.num_cpus)  # one worker is enough to make progress
        needed["GPU"] = max(needed["GPU"], cfg.rationale.num_gpus)
    return needed


def missing_resources(needed: dict[str, float], available: dict[str, float]) -> str | None:
    """What the cluster lacks for ``needed``, in words; None when everything fits."""
    short = [f"{needed[name]:g} {name} (the cluster has {available.get(name, 0):g})"
             for name in needed if needed[name] > available.get(name, 0) + 1e-9]
    return ", ".join(short) or None


def check_cluster_fits(cfg: RunConfig) -> None:
    """Fail before starting anything if the cluster cannot hold every actor: Ray would leave the
    last actor pending forever, and the run would hang without a word."""
    import ray

    lacking = missing_resources(needed_resources(cfg), ray.cluster_resources())
    if lacking is None:
        return
    message = (f"the run needs {lacking}: start Ray with more logical CPUs/GPUs (ray start --num-cpus N) "
               "or lower services.*.replicas, services.*.num_cpus, learner.world_size or learner.num_cpus")
    if not cfg.ray.wait_for_resources:
        raise RuntimeError(message)
    print(f"warning: {message}; waiting for the autoscaler (ray.wait_for_resources=true)")


def local_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for a local Ray: every actor the run starts must fit, or it waits forever."""
    if cfg.ray.num_cpus is not None:
        return cfg.ray.num_cpus
    return max(os.cpu_count() or 1, int(np.ceil(needed_resources(cfg)["CPU"])))


def batch_rows(n_examples: int, cursor: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Example indices for the next ``size`` samples from ``cursor``: a fresh seeded permutation
    of the split every epoch. Returns (indices, global sample ids)."""
    samples = cursor + np.arange(size)
    epochs = samples // n_examples
    indices = np.empty(size, dtype=np.int64)
    for epoch in np.unique(epochs):  # at most two epochs per batch
        order = np.random.default_rng([seed, int(epoch)]).permutation(n_examples)
        here = epochs == epoch
        indices[here] = order[samples[here] % n_examples]
    return indices, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchkd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded.yaml", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. policy.name=adaswitch")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run(cfg)
    return 0


def run(cfg: RunConfig, services: tuple | None = None) -> Path:
    """One run. ``services`` (teacher pool, student pool) reuses engines a caller started
    (bench/methods.py runs many methods on one pair); the run then leaves them up."""
    started = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Everything that can be wrong with the inputs fails here, before any engine starts.
    ensure_embedded(cfg)
    tokenizer = check_pair(cfg.models.teacher, cfg.models.student)
    train = load_split(cfg.data, cfg.data.train_split, tokenizer)
    held_out = load_split(cfg.data, cfg.data.eval_split, tokenizer)
    for split in (train, held_out):
        if split.skipped_long:
            print(f"{split.source}: skipped {split.skipped_long} prompts longer than {cfg.data.max_prompt_tokens} tokens")
    check_resumable(cfg, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    if not cfg.resume:
        start_afresh(run_dir)

    ray = connect_ray(cfg)
    check_cluster_fits(cfg)
    from services.pool import start_service

    metrics = RunMetrics(run_dir, cfg.policy.name)
    rationale_rows, postprocess = None, None
    if cfg.policy.name == "rationale":  # the attribution stage first: it needs the CPUs/GPUs to itself
        from orchestrator.rationale_data import prepare

        rationale_rows, held_out, postprocess, summary = prepare(cfg, tokenizer, train, held_out, metrics)
        metrics.event("rationales_ready", summary)
        print(f"rationales: {summary}")

    stop = GracefulStop()
    # Kept weights let a restarted student replica come back at the latest version within this
    # job; a new job's services start from the base weights and get the checkpoint's pushed.
    student_weights = run_dir / "service_weights"
    shutil.rmtree(student_weights, ignore_errors=True)
    eos = tokenizer.eos_token_id
    if services is not None:
        teacher, student = services
        pools = []  # the caller's: not ended here
    else:
        # Engines and learner start together: each spends much of its start-up waiting (process
        # spawns, imports, a gloo rendezvous), so overlapping them shortens the run's start-up.
        teacher = None if rationale_rows is not None else start_service(
            "teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed, wait=False)
        student = start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed,
                                str(student_weights), wait=False)
        pools = [p for p in (teacher, student) if p is not None]
    learner = start_learner(cfg)
    for pool in pools:
        pool.wait_ready()
    max_model_len = min(cfg.services.teacher.max_model_len, cfg.services.student.max_model_len)
    ro = Rollout(cfg.policy, cfg.rollout, teacher, student, eos, max_model_len) if teacher is not None else None
    n_train = len(train) if rationale_rows is None else len(rationale_rows)

    metrics.event("started", {"policy": cfg.policy.name, "strategy": cfg.rollout.strategy,
                              "pids": {info["name"]: info["pid"] for pool in pools for info in pool.infos}})
    step, cursor, version = 0, 0, 0
    state = learner.load_latest_checkpoint(str(run_dir)) if cfg.resume else None
    if state is not None:
        step, cursor, version = state["step"], state["cursor"], state["weight_version"]
        if version > 0:  # the student service starts from the base weights: give it the checkpoint's
            learner.push_weights(student, version)
        metrics.event("resumed", {"step": step, "weight_version": version})
        print(f"resumed from step {step} (weight version {version})")
    elif services is not None and max(student.versions()) > 0:  # a reused student: back to the base weights
        version = max(student.versions()) + 1
        learner.push_weights(student, version)
    startup_seconds = time.perf_counter() - started

    def run_eval(at_step: int) -> dict:
        t = time.perf_counter()
        result = evaluate(student, held_out, tokenizer, cfg.schedule.eval_examples, cfg.rollout.max_new_tokens,
                          max_model_len, postprocess)
        (run_dir / "eval").mkdir(exist_ok=True)  # per-row outputs and scores, for reading and for bench/
        with open(run_dir / "eval" / f"step-{at_step:06d}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in result["rows"])
        return {"step": at_step, "eval_exact_match": result["exact_match"], "eval_rouge_l": result["rouge_l"],
                "eval_n": result["n"], "eval_seconds": time.perf_counter() - t, "weight_version": result["version"]}

    def save_checkpoint(at_step: int) -> float:
        t = time.perf_counter()
        learner.save_checkpoint(str(run_dir), at_step, {"step": at_step, "cursor": cursor, "weight_version": version,
                                                        "config": to_dict(cfg)})
        drop_rollouts(run_dir, at_step)
        return time.perf_counter() - t

    def release() -> None:
        """End what the run started, so a driver that runs several (bench/) does not pile engines up."""
        metrics.close()
        learner.shutdown()
        for pool in pools:
            pool.shutdown()

    def log_service_events() -> None:
        for event in [e for pool in pools for e in pool.take_events()]:
            metrics.event(event.pop("event"), event)

    if step == 0:
        baseline = run_eval(0)
        baseline["startup_seconds"] = startup_seconds
        metrics.log(baseline)

    progress = _progress(cfg.schedule.steps, step)
    learner_restarts = 0
    token_budget = cfg.schedule.max_train_tokens or np.inf
    trained_tokens = sum(r.get("rollout_tokens", 0) for r in step_records(read_records(run_dir))) if step else 0
    while step < cfg.schedule.steps and not stop.requested and trained_tokens < token_budget:
        record = {"step": step + 1}
        indices, sample_ids = batch_rows(n_train, cursor, cfg.rollout.prompts_per_step, cfg.seed)
        saved = load_rollout(run_dir, step + 1)
        if saved is not None:  # rolled out before a learner restart or a stop: train on the same tokens
            batch, rollout_seconds = saved
            record["replayed"] = True
        elif rationale_rows is not None:  # fixed text: nothing to roll out
            t = time.perf_counter()
            batch = rationale_rows.batch(indices, version)
            rollout_seconds = time.perf_counter() - t
        else:
            try:
                with stop.interruptible():
                    batch = run_rollout(ro, [train.prompt_ids[i] for i in indices],
                                        [train.reference_ids[i] for i in indices], sample_ids,
                                        seed=cfg.seed * 1_000_003 + step + 1, policy_version=version)
            except StopRequested:
                break
            rollout_seconds = ro.timings["rollout_seconds"]
            save_rollout(run_dir, step + 1, batch, rollout_seconds)
        record.update(rollout_record(batch, rollout_seconds))
        record["rollout_seconds"] = rollout_seconds

        # The run's last step: the step count or the token budget is reached with this batch.
        last = step + 1 == cfg.schedule.steps or trained_tokens + int(batch.response_lengths.sum()) >= token_budget
        try:
            trained = learner.train_step(batch)
            pushed = None
            if (step + 1) % cfg.schedule.push_every == 0 or last:
                pushed = learner.push_weights(student, version + 1)
        except ray.exceptions.RayActorError as err:
            dead = learner.dead_ranks()
            if not dead:
                raise
            learner_restarts += 1
            if learner_restarts > cfg.learner.max_restarts:
                raise RuntimeError(f"learner rank(s) {dead} died; gave up after "
                                   f"learner.max_restarts={cfg.learner.max_restarts} restarts") from err
            learner.shutdown(graceful=False)
            learner = start_learner(cfg)
            state = learner.load_latest_checkpoint(str(run_dir))
            step, cursor = (state["step"], state["cursor"]) if state else (0, 0)
            version += 1  # the checkpoint's weights (or the base ones), as a new version
            learner.push_weights(student, version)
            metrics.event("learner_restarted", {"dead_ranks": dead, "resumed_step": step, "weight_version": version,
                                                "cause": type(err).__name__})
            print(f"learner rank(s) {dead} died: new learner group resumed from step {step}")
            continue
        step += 1
        cursor += len(indices)
        trained_tokens += int(batch.response_lengths.sum())
        record.update(loss=trained["loss"], grad_norm=trained["grad_norm"], lr=trained["lr"],
                      train_tokens_per_second=trained["tokens_per_s"], train_seconds=trained["seconds"],
                      optimizer_step=trained["optimizer_step"])
        record["policy_lag"] = 0  # synchronous: every batch is rolled out by the weights it trains
        if pushed is not None:
            version += 1
            record["push_seconds"] = pushed["push_s"]
        record["weight_version"] = version
        if teacher is not None:
            record["teacher_replica_calls"] = teacher.calls_per_replica.tolist()
        # A stop skips the eval: the job has seconds before SIGKILL, and the checkpoint comes first.
        if (step % cfg.schedule.eval_every == 0 or last) and not stop.requested:
            record.update(run_eval(step))
        if step % cfg.schedule.checkpoint_every == 0 or last:
            record["checkpoint_seconds"] = save_checkpoint(step)
        log_service_events()
        metrics.log(record)
        progress(step, record)

    if stop.requested:
        log_service_events()
        latest = checkpoint.latest_checkpoint(run_dir)
        if step > 0 and (latest is None or checkpoint.read_run_state(latest)["step"] < step):
            save_checkpoint(step)
        metrics.event("stopped", {"signal": stop.signal_name, "step": step})
        print(f"\nstopped by {stop.signal_name} after step {step}: checkpoint in {run_dir / 'checkpoints'}; "
              "run again with the same config to resume")
        release()
        return run_dir

    export_dir = run_dir / "student"
    learner.export_hf(str(export_dir), cfg.models.student)
    evals = [r for r in read_records(run_dir) if r.get("eval_exact_match") is not None]
    summary = {
        "policy": cfg.policy.name, "strategy": cfg.rollout.strategy, "loss": cfg.loss.kind, "steps": step,
        "teacher": cfg.models.teacher, "student (start)": cfg.models.student, "exported student": str(export_dir),
        "eval exact match (first -> last)": f"{evals[0]['eval_exact_match']:.3f} -> {evals[-1]['eval_exact_match']:.3f}" if evals else "n/a",
        "eval Rouge-L (first -> last)": f"{evals[0]['eval_rouge_l']:.3f} -> {evals[-1]['eval_rouge_l']:.3f}" if evals else "n/a",
        "wall time (s)": f"{time.perf_counter() - started:.1f}",
    }
    report = write_report(run_dir, f"switchkd: {cfg.policy.name} ({cfg.rollout.strategy})", summary)
    print(f"\ndone: exported student {export_dir}, report {report}")
    release()
    return run_dir


def start_learner(cfg: RunConfig):
    from trainer.group import LearnerGroup

    return LearnerGroup(cfg.models.student, cfg.learner, cfg.loss, total_steps=cfg.schedule.steps)


def start_afresh(run_dir: Path) -> None:
    """resume=false: an earlier run's outputs here would mix with this run's (its batches replayed,
    its step records and evaluations read as this run's, its checkpoints resumed later), so they go."""
    removed = []
    for path in (run_dir / "metrics.jsonl", run_dir / "eval", run_dir / "checkpoints", rollouts_dir(run_dir)):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    if removed:
        print(f"resume=false: removed the earlier run's {', '.join(removed)} from {run_dir}")


def check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse, before any engine starts, to resume a checkpoint written by an incompatible run."""
    latest = checkpoint.latest_checkpoint(run_dir) if cfg.resume else None
    if latest is None:
        return
    conflicts = resume_conflicts(checkpoint.read_run_state(latest).get("config", {}), to_dict(cfg))
    if conflicts:
        raise ConfigError(f"{latest}: this run cannot resume the checkpoint: {'; '.join(conflicts)}. "
                          "Use another output_dir, or resume=false to start over in this one")


def _progress(total: int, start: int):
    """A one-line progress display: step, loss, switch rate, tokens/s, ETA."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)

    def update(step: int, record: dict) -> None:
        bar.set_postfix_str(
            f"loss {record['loss']:.4f} switch {record['teacher_fraction']:.3f} "
            f"rollout {record['rollout_tokens_per_second']:.0f} tok/s"
            + (f" EM {record['eval_exact_match']:.3f}" if "eval_exact_match" in record else ""),
            refresh=False,
        )
        bar.update(step - bar.n)

    return update


if __name__ == "__main__":
    sys.exit(main())
