"""The named steps both recipes (orchestrator.distill, orchestrator.sft) are built from.

A recipe prepares its inputs (``prepare_inputs``), starts its actors (orchestrator.launcher),
and hands them to a ``TrainingLoop``, whose steps it calls in order: ``restore`` (resume from the
latest checkpoint), ``evaluate_baseline``, then per batch ``train_on`` (train, push, evaluate,
checkpoint, log; a dead learner rank is recovered there), and at the end ``finish`` (export and
report) or ``stopped`` (a signal: final checkpoint). The recipe owns where batches come from, and
may hand ``train_on`` the next step's rollout to run while the learner trains
(schedule.max_policy_lag=1).

The run owns the weight version: the learner returns packed weights, ``push`` hands them to the
student pool with the next version, and every batch records the version that rolled it out.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from tqdm import tqdm

from orchestrator.config import ConfigError, RunConfig, resume_conflicts, save_config, to_dict
from orchestrator.data import Examples, load_split
from orchestrator.evaluate import evaluate
from orchestrator.launcher import check_run_dir_shared, start_learner
from orchestrator.metrics import RunMetrics, read_records, rollout_record, step_records
from orchestrator.models import check_pair
from orchestrator.report import write_report
from orchestrator.rollout_store import drop_rollouts, rollouts_dir
from orchestrator.stop import GracefulStop
from protocol.batch import MixedBatch
from trainer import checkpoint


# -- before anything starts ------------------------------------------------------------------------


def prepare_inputs(cfg: RunConfig) -> tuple[Path, object, Examples, Examples]:
    """Everything that can be wrong with the inputs fails here, before any engine starts:
    the model pair, both splits, a checkpoint this run cannot resume. Returns (run directory,
    tokenizer, train split, held-out split)."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    return run_dir, tokenizer, train, held_out


def check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse, before any engine starts, to resume a checkpoint written by an incompatible run."""
    latest = checkpoint.latest_checkpoint(run_dir) if cfg.resume else None
    if latest is None:
        return
    conflicts = resume_conflicts(checkpoint.read_run_state(latest).get("config", {}), to_dict(cfg))
    if conflicts:
        raise ConfigError(f"{latest}: this run cannot resume the checkpoint: {'; '.join(conflicts)}. "
                          "Use another output_dir, or resume=false to start over in this one")


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


def fresh_kept_weights(run_dir: Path) -> str:
    """Where the student replicas keep their latest pushed weights, emptied first. Kept weights let
    a restarted replica come back at the latest version within this job; a new job's services
    start from the base weights and get the checkpoint's pushed."""
    kept = run_dir / "service_weights"
    shutil.rmtree(kept, ignore_errors=True)
    return str(kept)


def engine_pids(pools: list) -> dict[str, int]:
    """Each started replica's process id by name (the run's "started" event; fault tests use it)."""
    return {info["name"]: info["pid"] for pool in pools for info in pool.infos}


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


class PushError(RuntimeError):
    """The student replicas named in the message could not load a weight version."""


def push_weights(learner, student, version: int, bucket_mb: float = 256.0, retries: int = 2) -> dict:
    """The learner's weights into the student pool as ``version`` (the run's numbering), streamed
    in buckets of at most ``bucket_mb`` MiB: rank 0 packs a bucket while the engines load the one
    before. A replica that dies on the way is pushed again once Ray has brought it back (at most
    ``retries`` times; then PushError names it). Seconds, bytes and buckets."""
    started = time.perf_counter()
    bucket_bytes = int(bucket_mb * 2**20)
    pushed = student.load_weight_buckets(learner.weight_buckets(bucket_bytes), version)
    failed = pushed["failed"]
    for _ in range(retries):
        if not failed:
            break
        for replica in failed:
            student.wait_until_serving(replica)
        failed = student.load_weight_buckets(learner.weight_buckets(bucket_bytes), version, failed)["failed"]
    if failed:
        raise PushError(f"student replica(s) {', '.join(map(str, failed))} died during every push of weight "
                        f"version {version} ({1 + retries} tries)")
    return {"push_s": time.perf_counter() - started, "bytes": pushed["bytes"], "buckets": pushed["buckets"]}


# -- the loop ----------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """What the held-out evaluation runs on (``postprocess`` cleans an output before scoring)."""

    examples: Examples
    tokenizer: object
    max_model_len: int
    postprocess: Callable[[str], str] | None = None


class TrainingLoop:
    """The state a run carries from step to step (step, data cursor, weight version, trained
    tokens) and the steps that advance it. ``pools`` are the engine pools the run started and
    ends; ``teacher`` (distill only) adds its per-replica call counts to each step record."""

    def __init__(self, cfg: RunConfig, run_dir: Path, metrics: RunMetrics, learner, student, eval_set: EvalSet,
                 pools: list, teacher=None, started: float | None = None):
        self.cfg, self.run_dir, self.metrics = cfg, run_dir, metrics
        self.learner, self.student, self.teacher, self.pools = learner, student, teacher, pools
        self.eval_set = eval_set
        self.started = time.perf_counter() if started is None else started  # the run's start (perf_counter)
        self.stop = GracefulStop()
        self.step = self.cursor = self.version = self.trained_tokens = 0
        self.steps_in_version = {0: 0}  # weight version -> optimizer steps in those weights (for policy_lag)
        self.learner_restarts = 0
        self.step_clock = time.perf_counter()  # when the step in hand began (its record's step_seconds)
        self.progress: Callable[[int, dict], None] | None = None

    # -- weights ----------------------------------------------------------------------------------

    def push(self, version: int, optimizer_steps: int) -> float:
        """The learner's weights (``optimizer_steps`` steps trained) into the student pool as
        ``version``; seconds it took."""
        seconds = push_weights(self.learner, self.student, version, self.cfg.learner.push_bucket_mb)["push_s"]
        self.version = version
        self.steps_in_version[version] = optimizer_steps
        return seconds

    def restore(self, reused_student: bool = False) -> None:
        """Resume from the latest checkpoint (``resume: true``), or give a student pool reused
        from an earlier run this run's starting weights (it may serve another run's, or another
        model's of the same architecture: bench/methods.py's warm start)."""
        check_run_dir_shared(self.run_dir, {**{f"student replica {i}": a for i, a in enumerate(self.student.actors)},
                                            **{f"learner rank {r}": a for r, a in enumerate(self.learner.ranks)}})
        state = self.learner.load_latest_checkpoint(str(self.run_dir)) if self.cfg.resume else None
        if state is not None:
            self.step, self.cursor = state["step"], state["cursor"]
            self.trained_tokens = self._tokens_trained_up_to(self.step)
            if state["weight_version"] > 0:  # the student service starts from the base weights: give it the checkpoint's
                self.push(state["weight_version"], self.step)
            self.metrics.event("resumed", {"step": self.step, "weight_version": self.version})
            print(f"resumed from step {self.step} (weight version {self.version})")
        elif reused_student:
            self.push(max(self.student.versions()) + 1, 0)
        self.progress = _progress(self.cfg.schedule.steps, self.step)

    def _tokens_trained_up_to(self, step: int) -> int:
        return sum(r.get("rollout_tokens", 0) for r in step_records(read_records(self.run_dir)) if r["step"] <= step)

    # -- steps ----------------------------------------------------------------------------------

    def evaluate_baseline(self) -> None:
        if self.step == 0:
            self.metrics.log({**self.evaluate(0), "startup_seconds": time.perf_counter() - self.started})
        self.step_clock = time.perf_counter()

    def more_steps(self) -> bool:
        budget = self.cfg.schedule.max_train_tokens or np.inf
        return self.step < self.cfg.schedule.steps and not self.stop.requested and self.trained_tokens < budget

    def is_last(self, batch: MixedBatch) -> bool:
        """Is training ``batch`` the run's last step (schedule.steps or schedule.max_train_tokens)?"""
        budget = self.cfg.schedule.max_train_tokens or np.inf
        return self.step + 1 == self.cfg.schedule.steps or self.trained_tokens + int(batch.response_lengths.sum()) >= budget

    def next_rows(self, n_examples: int, ahead: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The next batch's example indices and global sample ids (``ahead``: of the batch that
        many steps after the next; every step takes prompts_per_step examples)."""
        size = self.cfg.rollout.prompts_per_step
        return batch_rows(n_examples, self.cursor + ahead * size, size, self.cfg.seed)

    def weights_step(self) -> int:
        """Optimizer steps in the weights the student pool serves now (a rollout records it)."""
        return self.steps_in_version[self.version]

    def too_stale(self, weights_step: int | None) -> bool:
        """Would a batch rolled out by weights of ``weights_step`` steps train the next step with more
        policy lag than schedule.max_policy_lag allows? (None: a batch saved before this was recorded.)"""
        return weights_step is not None and self.step - weights_step > self.cfg.schedule.lag_bound

    def train_on(self, batch: MixedBatch, rollout_seconds: float, examples_used: int, replayed: bool = False,
                 weights_step: int | None = None, while_training: Callable[[], None] | None = None) -> bool:
        """Train one step on ``batch`` (made from ``examples_used`` examples of the split, rolled out
        by weights of ``weights_step`` optimizer steps), push, evaluate, checkpoint, log. With
        ``while_training`` (the next step's rollout) the learner trains in a thread while it runs
        here; the push waits for it, so it never sees two weight versions. False when a learner rank
        died instead: the group was restarted from the last checkpoint and the caller goes on from
        ``self.step`` (the batches since then are replayed from disk)."""
        record = {"step": self.step + 1, **({"replayed": True} if replayed else {})}
        record.update(rollout_record(batch, rollout_seconds))
        record["rollout_seconds"] = rollout_seconds
        schedule = self.cfg.schedule
        tokens = int(batch.response_lengths.sum())
        last = self.is_last(batch)
        rolled_out_version = int(batch.policy_version.min())
        rolled_out_by = weights_step if weights_step is not None else self.steps_in_version.get(rolled_out_version)
        push_failed = None
        try:
            if while_training is None:
                trained = self.learner.train_step(batch.for_learner())
            else:
                trained = self._train_while(batch, while_training)
                record["overlapped"] = True
            if (self.step + 1) % schedule.push_every == 0 or last:
                try:
                    record["push_seconds"] = self.push(self.version + 1, self.step + 1)
                except PushError as err:
                    push_failed = err
        except ray.exceptions.RayActorError as err:
            self.recover_learner(err)
            return False
        self.step += 1
        self.cursor += examples_used
        self.trained_tokens += tokens
        record.update(loss=trained["loss"], grad_norm=trained["grad_norm"], lr=trained["lr"],
                      train_tokens_per_second=trained["tokens_per_s"], train_seconds=trained["seconds"],
                      optimizer_step=trained["optimizer_step"])
        # Optimizer steps between the weights that rolled the batch out and the weights it trained
        # (None: rolled out by weights this job never pushed).
        record["policy_lag"] = None if rolled_out_by is None else self.step - 1 - rolled_out_by
        record["rollout_weight_version"] = rolled_out_version
        record["weight_version"] = self.version
        if self.teacher is not None:
            record["teacher_replica_calls"] = self.teacher.calls_per_replica.tolist()
        if push_failed is not None:
            # Nothing trained is lost: the step's weights are checkpointed as the next version
            # (a resumed run pushes them as that version first), the step is logged, the run stops.
            self.version += 1
            self.steps_in_version[self.version] = self.step
            record["weight_version"] = self.version
            record["checkpoint_seconds"] = self.save_checkpoint()
            self.metrics.event("push_failed", {"step": self.step, "weight_version": self.version,
                                               "error": str(push_failed)})
            self.metrics.log(record)
            raise push_failed
        # A stop skips the eval: the job has seconds before SIGKILL, and the checkpoint comes first.
        if (self.step % schedule.eval_every == 0 or last) and not self.stop.requested:
            record.update(self.evaluate(self.step))
        if self.step % schedule.checkpoint_every == 0 or last:
            record["checkpoint_seconds"] = self.save_checkpoint()
        self.log_service_events()
        record["step_seconds"] = time.perf_counter() - self.step_clock  # wall time since the step before ended
        self.step_clock = time.perf_counter()
        self.metrics.log(record)
        self.progress(self.step, record)
        return True

    def _train_while(self, batch: MixedBatch, work: Callable[[], None]) -> dict:
        """The learner's train step in a thread (it only waits on Ray) while ``work`` runs here, in
        the main thread, where a stop signal can still interrupt it."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-step") as thread:
            training = thread.submit(self.learner.train_step, batch.for_learner())
            try:
                work()
            finally:
                wait([training])  # an error in ``work`` surfaces after the step it overlapped
            return training.result()

    def evaluate(self, at_step: int) -> dict:
        """Greedy held-out evaluation of the student service; per-row outputs in eval/step-N.jsonl."""
        t = time.perf_counter()
        e = self.eval_set
        result = evaluate(self.student, e.examples, e.tokenizer, self.cfg.schedule.eval_examples,
                          self.cfg.rollout.max_new_tokens, e.max_model_len, e.postprocess)
        (self.run_dir / "eval").mkdir(exist_ok=True)  # per-row outputs and scores, for reading and for bench/
        with open(self.run_dir / "eval" / f"step-{at_step:06d}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in result["rows"])
        return {"step": at_step, "eval_exact_match": result["exact_match"], "eval_rouge_l": result["rouge_l"],
                "eval_n": result["n"], "eval_seconds": time.perf_counter() - t, "weight_version": result["version"]}

    def save_checkpoint(self) -> float:
        t = time.perf_counter()
        self.learner.save_checkpoint(str(self.run_dir), self.step, {
            "step": self.step, "cursor": self.cursor, "weight_version": self.version, "config": to_dict(self.cfg)})
        drop_rollouts(self.run_dir, self.step)
        return time.perf_counter() - t

    def recover_learner(self, err: Exception) -> None:
        """A learner rank died: a new group from the last checkpoint, its weights pushed as a new version."""
        dead = self.learner.dead_ranks()
        if not dead:
            raise err
        self.learner_restarts += 1
        if self.learner_restarts > self.cfg.learner.max_restarts:
            raise RuntimeError(f"learner rank(s) {dead} died; gave up after "
                               f"learner.max_restarts={self.cfg.learner.max_restarts} restarts") from err
        self.learner.shutdown(graceful=False)
        self.learner = start_learner(self.cfg.models.student, self.cfg.learner, self.cfg.loss, self.cfg.schedule.steps,
                                     self.cfg.ray.node_wait_s)
        state = self.learner.load_latest_checkpoint(str(self.run_dir))
        self.step, self.cursor = (state["step"], state["cursor"]) if state else (0, 0)
        self.trained_tokens = self._tokens_trained_up_to(self.step)
        self.push(self.version + 1, self.step)  # the checkpoint's weights (or the base ones), as a new version
        self.metrics.event("learner_restarted", {"dead_ranks": dead, "resumed_step": self.step,
                                                 "weight_version": self.version, "cause": type(err).__name__})
        print(f"learner rank(s) {dead} died: new learner group resumed from step {self.step}")

    def log_service_events(self) -> None:
        for event in [e for pool in (self.teacher, self.student) if pool is not None for e in pool.take_events()]:
            self.metrics.event(event.pop("event"), event)

    # -- the end ----------------------------------------------------------------------------------

    def stopped(self) -> Path:
        """After a stop signal: a checkpoint of the last finished step (if newer than the latest), then release."""
        self.checkpoint_last_step()
        self.metrics.event("stopped", {"signal": self.stop.signal_name, "step": self.step})
        print(f"\nstopped by {self.stop.signal_name} after step {self.step}: checkpoint in "
              f"{self.run_dir / 'checkpoints'}; run again with the same config to resume")
        self.release()
        return self.run_dir

    def failed(self, err: Exception) -> None:
        """A service the run cannot go on without is lost (the caller raises ``err`` next): a
        checkpoint of the last finished step, then release; rerun the same config to resume."""
        self.checkpoint_last_step()
        self.metrics.event("service_failed", {"step": self.step, "error": str(err)})
        print(f"\n{err}\nstopped after step {self.step}: checkpoint in {self.run_dir / 'checkpoints'}; "
              "run again with the same config to resume")
        self.release()

    def checkpoint_last_step(self) -> None:
        """Checkpoint the last finished step unless the latest checkpoint has it."""
        self.log_service_events()
        latest = checkpoint.latest_checkpoint(self.run_dir)
        if self.step > 0 and (latest is None or checkpoint.read_run_state(latest)["step"] < self.step):
            self.save_checkpoint()

    def finish(self, title: str, summary: dict) -> Path:
        """Export the student as a Hugging Face directory, write the report, release the actors."""
        export_dir = self.run_dir / "student"
        self.learner.export_hf(str(export_dir), self.cfg.models.student)
        evals = [r for r in read_records(self.run_dir) if r.get("eval_exact_match") is not None]

        def first_last(key: str) -> str:
            return f"{evals[0][key]:.3f} -> {evals[-1][key]:.3f}" if evals else "n/a"

        report = write_report(self.run_dir, title, {
            **summary, "loss": self.cfg.loss.kind, "steps": self.step, "teacher": self.cfg.models.teacher,
            "student (start)": self.cfg.models.student, "exported student": str(export_dir),
            "eval exact match (first -> last)": first_last("eval_exact_match"),
            "eval Rouge-L (first -> last)": first_last("eval_rouge_l"),
            "wall time (s)": f"{time.perf_counter() - self.started:.1f}"})
        print(f"\ndone: exported student {export_dir}, report {report}")
        self.release()
        return self.run_dir

    def release(self) -> None:
        """End what the run started, so a driver that runs several (bench/) does not pile engines up."""
        self.metrics.close()
        self.learner.shutdown()
        for pool in self.pools:
            pool.shutdown()


def _progress(total: int, start: int):
    """A one-line progress display: step, loss, switch rate, tokens/s, ETA."""
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
