"""Pure pieces of the run loop: the data cursor, metric records, the report."""
import json
import threading

import numpy as np
import pytest

from orchestrator.metrics import RunMetrics, read_records, rollout_record
from orchestrator.report import write_report
from orchestrator.steps import batch_rows
from protocol.batch import MixedBatch
from protocol.topk import TopK


def test_batch_rows_walks_seeded_epochs_without_repeats():
    n = 10
    seen = np.concatenate([batch_rows(n, cursor, 4, seed=7)[0] for cursor in range(0, 20, 4)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # epoch 0: every example once
    assert sorted(seen[10:20].tolist()) == list(range(10))  # epoch 1 too
    assert not np.array_equal(seen[:10], seen[10:20])  # reshuffled
    again = np.concatenate([batch_rows(n, cursor, 4, seed=7)[0] for cursor in range(0, 20, 4)])
    assert np.array_equal(seen, again)  # a resumed run sees the same order
    _, ids = batch_rows(n, 8, 4, seed=7)
    assert ids.tolist() == [8, 9, 10, 11]


def _batch_for_metrics():
    writer = np.array([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=np.int8)
    teacher = TopK.empty((2, 4), 3)
    teacher.mask[:] = [[True] * 4, [True, True, False, False]]
    stats = {"teacher_fraction": np.array([0.5, 0.0]), "switched": np.array([True, False]),
             "first_switch": np.array([2, -1]), "divergence_mean": np.array([0.2, np.nan]),
             "teacher_calls": np.array([2, 1]), "student_calls": np.array([2, 1]),
             "response_length": np.array([4, 2])}
    return MixedBatch(np.zeros((2, 6), np.int64), np.array([2, 2]), np.array([4, 2]), writer, teacher,
                      np.zeros(2, np.int64), stats)


def test_rollout_record_weights_switch_rate_by_tokens():
    record = rollout_record(_batch_for_metrics(), rollout_seconds=2.0)
    assert record["teacher_fraction"] == 2 / 6
    assert record["switched_fraction"] == 0.5
    assert record["first_switch_mean"] == 2.0 and record["first_switch_positions"] == [2]
    assert record["divergence_mean"] == 0.2
    assert record["round_trips_per_sequence"] == 3.0
    assert record["rollout_tokens_per_second"] == 3.0


def test_metrics_log_and_report(tmp_path):
    metrics = RunMetrics(tmp_path, "switch", export_to_ray=False)
    metrics.log({"step": 0, "eval_exact_match": 0.1, "eval_rouge_l": 0.5, "startup_seconds": 3.0})
    for step in (1, 2):
        record = {"step": step, "loss": 1.0 / step, "grad_norm": 1.0, "rollout_seconds": 1.0, "train_seconds": 2.0,
                  **rollout_record(_batch_for_metrics(), 1.0)}
        metrics.log(record)
    metrics.event("resumed", {"step": 2})
    records = read_records(tmp_path)
    assert [r.get("step") for r in records] == [0, 1, 2, 2]
    assert records[1]["divergence_p90"] == json.loads(json.dumps(records[1]))["divergence_p90"]
    report = write_report(tmp_path, "test run", {"policy": "switch"})
    text = report.read_text()
    assert "| loss | 1 | 0.5 |" in text and "| 0 | 0.100 | 0.500 |" in text
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_bench_records_a_resumed_run_but_not_a_stopped_one():
    from bench.methods import stopped_last_time

    started, stopped, step = {"event": "started"}, {"event": "stopped", "signal": "SIGTERM"}, {"step": 1, "loss": 1.0}
    assert not stopped_last_time([started, step])
    assert stopped_last_time([started, step, stopped])
    assert not stopped_last_time([started, step, stopped, started, step])  # stopped, then resumed to the end
    assert stopped_last_time([started, stopped, started, stopped])


def test_peer_bench_leaves_out_the_warm_up_and_an_overlapped_runs_last_step():
    from bench.peers import summary

    steps = {"step_seconds": [50.0, 30.0, 20.0, 10.0], "step_tokens": [100, 300, 100, 500]}
    assert summary(steps)["tokens_per_second"] == 900 / 60
    # With max_policy_lag > 0 the last step rolls out nothing ahead: it would flatter the rate.
    overlapped = summary({**steps, "overlapped": True})
    assert overlapped["tokens_per_second"] == 400 / 50 and overlapped["steps_timed"] == 2


def test_resume_false_clears_the_earlier_run_but_not_the_rest(tmp_path):
    from orchestrator.steps import start_afresh

    for name in ("checkpoints/step-000002", "eval", "rollouts", "student"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "eval" / "step-000004.jsonl").write_text("{}\n")
    start_afresh(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # overwritten by the run's export
    start_afresh(tmp_path)  # nothing left to clear: no error


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    from protocol.files import write_atomic

    target = tmp_path / "state.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_topk_put_and_fitted_copy_all_four_arrays():
    source = TopK.empty((2, 3), 4)
    source.ids[:] = np.arange(4)
    source.logprobs[:] = -1.0
    source.token_logprob[:] = -2.0
    source.mask[:] = True
    wide = source.fitted(5)
    assert wide.ids.shape == (2, 5, 4) and wide.mask[:, :3].all() and not wide.mask[:, 3:].any()
    assert (wide.token_logprob[:, :3] == -2.0).all() and np.isneginf(wide.logprobs[:, 3:]).all()
    assert source.fitted(2).ids.shape == (2, 2, 4)
    target = TopK.empty((3, 6), 4)
    target.put((np.array([0, 2]), slice(1, 4)), source)
    assert target.mask[[0, 2], 1:4].all() and not target.mask[1].any() and (target.ids[2, 2] == np.arange(4)).all()


class FakeLearner:
    """Stands in for the learner group in a test of the loop's bookkeeping (pure logic)."""

    def __init__(self):
        self.steps = 0

    def train_step(self, batch):
        self.steps += 1
        return {"loss": 1.0 / self.steps, "grad_norm": 0.1, "lr": 1e-3, "tokens_per_s": 1.0, "seconds": 0.0,
                "optimizer_step": self.steps}

    def weight_buckets(self, bucket_bytes):
        yield f"weights after {self.steps} steps"

    def save_checkpoint(self, run_dir, step, state):
        self.saved = state

    def shutdown(self, graceful=True):
        self.shut_down = True


class FakeStudentPool:
    """Stands in for the student pool: records which blob each version got (pure logic)."""

    def __init__(self):
        self.loaded = {}

    def load_weight_buckets(self, buckets, version, replicas=None):
        self.loaded[version] = " + ".join(buckets)
        return {"failed": [], "bytes": 1, "buckets": 1}

    def take_events(self):
        return []


def test_training_loop_owns_the_weight_version_and_measures_policy_lag(tmp_path):
    from orchestrator.config import load_config
    from orchestrator.steps import EvalSet, TrainingLoop

    cfg = load_config(None, ["schedule.steps=4", "schedule.push_every=2", "schedule.eval_every=100",
                             "schedule.checkpoint_every=100"])
    learner, student = FakeLearner(), FakeStudentPool()
    loop = TrainingLoop(cfg, tmp_path, RunMetrics(tmp_path, "test", export_to_ray=False), learner, student,
                        EvalSet(None, None, 64), pools=[])
    loop.progress = lambda step, record: None
    loop.evaluate = lambda step: {"eval_rouge_l": 0.5}  # the last step evaluates; no engine here
    while loop.more_steps():
        batch = _batch_for_metrics()
        batch.policy_version[:] = loop.version  # what the rollout stamps on its rows
        assert loop.train_on(batch, 1.0, examples_used=2)
    records = [r for r in read_records(tmp_path) if "loss" in r]
    # push_every=2: steps 1 and 3 train weights the batch's rollout did not see (one step behind).
    assert [r["policy_lag"] for r in records] == [0, 1, 0, 1]
    assert [r["weight_version"] for r in records] == [0, 1, 1, 2]
    assert student.loaded == {1: "weights after 2 steps", 2: "weights after 4 steps"}
    assert loop.cursor == 8 and loop.trained_tokens == 4 * 6 and learner.saved["weight_version"] == 2


def test_rollout_digest_names_the_batch():
    from orchestrator.metrics import rollout_digest

    batch, same = _batch_for_metrics(), _batch_for_metrics()
    assert rollout_digest(batch) == rollout_digest(same) == rollout_record(batch, 1.0)["rollout_digest"]
    same.tokens[1, 3] = 5  # one token differs
    assert rollout_digest(batch) != rollout_digest(same)
    other_writer = _batch_for_metrics()
    other_writer.writer[0, 0] = 1  # the same tokens, another writer
    assert rollout_digest(batch) != rollout_digest(other_writer)


class FakeDyingStudentPool(FakeStudentPool):
    """A student pool whose replica 1 dies during every push (pure logic)."""

    def load_weight_buckets(self, buckets, version, replicas=None):
        list(buckets)
        return {"failed": [1], "bytes": 1, "buckets": 1}

    def wait_until_serving(self, replica):
        return {"version": 0}


def test_a_push_that_cannot_complete_checkpoints_the_step_and_names_the_replica(tmp_path):
    from orchestrator.config import load_config
    from orchestrator.steps import EvalSet, PushError, TrainingLoop

    cfg = load_config(None, ["schedule.steps=4", "schedule.eval_every=100", "schedule.checkpoint_every=100"])
    learner = FakeLearner()
    loop = TrainingLoop(cfg, tmp_path, RunMetrics(tmp_path, "test", export_to_ray=False), learner,
                        FakeDyingStudentPool(), EvalSet(None, None, 64), pools=[])
    loop.progress = lambda step, record: None
    with pytest.raises(PushError, match=r"student replica\(s\) 1 died during every push of weight version 1 \(3 tries\)"):
        loop.train_on(_batch_for_metrics(), 1.0, examples_used=2)
    # The trained step is not lost: checkpointed with its weights as version 1 (a resume pushes them first).
    assert learner.saved["step"] == 1 and learner.saved["weight_version"] == 1
    records = read_records(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert any(r.get("event") == "push_failed" and r["weight_version"] == 1 for r in records)


def test_a_service_lost_for_good_checkpoints_the_last_step_and_says_why(tmp_path):
    """A teacher replica that no node took back within ray.node_wait_s ends the run (distill
    raises the ServiceError after ``failed``): the last finished step is checkpointed first."""
    from orchestrator.config import load_config
    from orchestrator.steps import EvalSet, TrainingLoop
    from services.pool import ServiceError

    cfg = load_config(None, ["schedule.steps=4", "schedule.eval_every=100", "schedule.checkpoint_every=100"])
    learner = FakeLearner()
    loop = TrainingLoop(cfg, tmp_path, RunMetrics(tmp_path, "test", export_to_ray=False), learner,
                        FakeStudentPool(), EvalSet(None, None, 64), pools=[])
    loop.progress = lambda step, record: None
    assert loop.train_on(_batch_for_metrics(), 1.0, examples_used=2)
    assert not hasattr(learner, "saved")  # checkpoint_every=100: nothing saved yet
    loop.failed(ServiceError("teacher-0 did not come back within 600 s (ray.node_wait_s) ..."))
    assert learner.saved["step"] == 1 and learner.shut_down
    failed = [r for r in read_records(tmp_path) if r.get("event") == "service_failed"]
    assert failed == [{"event": "service_failed", "step": 1,
                       "error": "teacher-0 did not come back within 600 s (ray.node_wait_s) ..."}]


class FakeOverlapLearner(FakeLearner):
    """A learner whose train step, once started, waits for the test's rollout to end (pure logic):
    a loop that trained before the overlapped work, not while it ran, times out here."""

    def __init__(self, events: list):
        super().__init__()
        self.events, self.rollout_began = events, threading.Event()

    def train_step(self, batch):
        assert self.rollout_began.wait(timeout=10), "the train step did not run while the next rollout ran"
        self.events.append("trained")
        return super().train_step(batch)


class FakeOrderedStudentPool(FakeStudentPool):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def load_weight_buckets(self, buckets, version, replicas=None):
        self.events.append(f"pushed v{version}")
        return super().load_weight_buckets(buckets, version, replicas)


def test_lag_one_trains_while_the_next_rollout_runs_and_pushes_after_it(tmp_path):
    """schedule.max_policy_lag=1 as orchestrator.distill drives it: the step's batch trains in a
    thread while the next batch rolls out; the push waits for that rollout; each batch records the
    weights that rolled it out, and the lag is one step from step 2 on."""
    from orchestrator.config import load_config
    from orchestrator.steps import EvalSet, TrainingLoop

    cfg = load_config(None, ["schedule.steps=4", "schedule.eval_every=100", "schedule.checkpoint_every=100",
                             "schedule.max_policy_lag=1"])
    events: list[str] = []
    learner, student = FakeOverlapLearner(events), FakeOrderedStudentPool(events)
    loop = TrainingLoop(cfg, tmp_path, RunMetrics(tmp_path, "test", export_to_ray=False), learner, student,
                        EvalSet(None, None, 64), pools=[])
    loop.progress = lambda step, record: None
    loop.evaluate = lambda step: {"eval_rouge_l": 0.5}

    def roll_out() -> tuple:
        batch = _batch_for_metrics()
        batch.policy_version[:] = loop.version  # what the rollout stamps on its rows
        events.append(f"rolled out by v{loop.version}")
        return batch, loop.weights_step()

    ahead = roll_out()
    while loop.more_steps():
        batch, weights_step = ahead

        def next_rollout():
            nonlocal ahead
            ahead = roll_out()
            learner.rollout_began.set()

        assert not loop.too_stale(weights_step)
        assert loop.train_on(batch, 1.0, examples_used=2, weights_step=weights_step, while_training=next_rollout)
        learner.rollout_began.clear()
    records = [r for r in read_records(tmp_path) if "loss" in r]
    assert [r["policy_lag"] for r in records] == [0, 1, 1, 1]
    assert [r["rollout_weight_version"] for r in records] == [0, 0, 1, 2]
    assert [r["weight_version"] for r in records] == [1, 2, 3, 4]
    assert all(r["overlapped"] for r in records) and all(r["step_seconds"] > 0 for r in records)
    # Every push comes after the rollout that overlapped the step: no rollout sees two versions.
    assert events[:7] == ["rolled out by v0", "rolled out by v0", "trained", "pushed v1",
                          "rolled out by v1", "trained", "pushed v2"]
    # A batch two steps behind (a lag-1 run's saved batch replayed by a lag-0 run, say) is not trained on.
    assert loop.too_stale(loop.step - 2) and not loop.too_stale(loop.step - 1)


def test_policy_lag_bound_counts_the_steps_between_pushes():
    from orchestrator.config import load_config

    assert load_config(None, []).schedule.lag_bound == 0
    assert load_config(None, ["schedule.max_policy_lag=1"]).schedule.lag_bound == 1
    assert load_config(None, ["schedule.max_policy_lag=1", "schedule.push_every=3"]).schedule.lag_bound == 3


def test_saved_rollout_keeps_the_weights_step_that_rolled_it_out(tmp_path):
    from orchestrator.rollout_store import drop_rollout, load_rollout, save_rollout

    save_rollout(tmp_path, 3, _batch_for_metrics(), 2.5, weights_step=1)
    batch, seconds, weights_step = load_rollout(tmp_path, 3)
    assert seconds == 2.5 and weights_step == 1 and np.array_equal(batch.writer, _batch_for_metrics().writer)
    drop_rollout(tmp_path, 3)
    assert load_rollout(tmp_path, 3) is None
