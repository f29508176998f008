"""Faults injected into real services and a real run: processes killed with SIGKILL, a hung
engine (SIGSTOP), the job stopped with SIGTERM. Nothing may be lost, duplicated or silently stale."""
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file, save

from processes import child_pids
from orchestrator.launcher import start_service
from orchestrator.metrics import step_records
from services.model_service import ModelService
from services.pool import ServiceError, ServicePool
from tests.fast_run import STEPS, fast_run_command

REPO = Path(__file__).resolve().parents[2]


def _perturbed_buckets(model_dir: Path, count: int) -> list[bytes]:
    """The student's weights, visibly changed (a replica serving the base weights would differ),
    in ``count`` buckets."""
    state = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    perturbed = {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in state.items()}
    names = list(perturbed)
    return [save({n: perturbed[n] for n in names[i::count]}) for i in range(count)]


def test_killed_and_hung_replicas_retry_and_come_back_at_the_latest_version(ray_cluster, embedded_data, cpu_engine,
                                                                           tmp_path):
    engine = replace(cpu_engine, replicas=2, request_timeout_s=20.0, request_retries=1)
    pool = start_service("student", str(embedded_data["dir"] / "student"), engine, embedded_data["eos"],
                         weights_dir=str(tmp_path / "weights"))
    try:
        # Six buckets: the pool sends one while the last still loads, and the replicas keep every part.
        pushed = pool.load_weight_buckets(_perturbed_buckets(embedded_data["dir"] / "student", 6), 1)
        assert pushed["failed"] == [] and pushed["buckets"] == 6 and pool.versions() == [1, 1]
        for replica in ("student-0", "student-1"):
            assert len(list((tmp_path / "weights" / replica / "v000001").glob("part-*.safetensors"))) == 6
        prompts = embedded_data["prompts"][:6]
        expected = pool.generate(prompts, 24, 5, 0.0).result()  # greedy: the same on every replica

        # A replica killed mid-call: its rows go to the other replica; every row comes back, in order.
        pending = pool.generate(prompts, 24, 5, 0.0)
        os.kill(pool.infos[0]["pid"], signal.SIGKILL)
        got = pending.result()
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert got.version == 1
        events = pool.take_events()
        assert [e["replica"] for e in events] == [0] and "died" in events[0]["cause"]

        # Ray restarts it; it loads the kept weights before it serves, so it answers like the others.
        assert pool.versions() == [1, 1]
        restarted = ServicePool([pool.actors[0]])  # every row to the restarted replica
        np.testing.assert_array_equal(restarted.generate(prompts, 24, 5, 0.0).result().tokens, expected.tokens)

        # A hung replica: the call times out, the replica is killed and restarted, the call retried.
        hung_pid = pool.infos[1]["pid"]
        os.kill(hung_pid, signal.SIGSTOP)
        started = time.monotonic()
        got = pool.generate(prompts, 24, 5, 0.0).result()
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert time.monotonic() - started >= 20.0 - 1.0
        events = pool.take_events()
        retried = [(e["replica"], e["cause"]) for e in events if e["event"] == "request_retried"]
        assert retried == [(1, "no answer within request_timeout_s=20")]
        assert any(e["event"] == "replica_restarted" and e["replica"] == 0 and e["version"] == 1 for e in events)

        # Back where its kept weights are not (another node, no shared storage: here the directory
        # is gone): it serves the base weights, answers at version 0, and the pool loads it the
        # latest push from the object store before its answer counts.
        shutil.rmtree(tmp_path / "weights" / "student-0")
        os.kill(pool.wait_until_serving(0)["pid"], signal.SIGKILL)
        time.sleep(1.0)
        assert pool.wait_until_serving(0)["version"] == 0
        got = pool.generate(prompts, 24, 5, 0.0).result()
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert got.version == 1 and pool.versions() == [1, 1]
        caught_up = [e for e in pool.take_events() if e["event"] == "replica_brought_up_to_date"]
        assert [(e["replica"], e["version"]) for e in caught_up] == [(0, 1)]

        # Retries spent: a clear error that names the replica, the call and the setting.
        one_shot = ServicePool([pool.actors[0]], "student", request_timeout_s=3.0, request_retries=0)
        os.kill(ray_cluster.get(pool.actors[0].info.remote())["pid"], signal.SIGSTOP)
        with pytest.raises(ServiceError, match=r"student-0.generate \(6 sequences\): no answer within "
                                               r"request_timeout_s=3; gave up after 1 attempt"):
            one_shot.generate(prompts, 24, 5, 0.0).result()
    finally:
        for actor in pool.actors:
            ray_cluster.kill(actor, no_restart=True)


def test_a_replica_with_no_node_to_come_back_to_names_what_is_missing(ray_cluster, embedded_data, cpu_engine):
    """A replica whose node is gone for good waits ray.node_wait_s for room, then a ServiceError
    names the resources no node offers (here a node group the cluster never had: Ray keeps the
    actor pending, as it does a replica whose only node was lost)."""
    needs = {"CPU": 1.0, "lost_node": 1.0}
    orphan = ray_cluster.remote(ModelService).options(num_cpus=1, resources={"lost_node": 1}).remote(
        str(embedded_data["dir"] / "teacher"), cpu_engine, embedded_data["eos"], 0, "teacher-0")
    # A call to it waits (Ray queues it): after request_timeout_s the pool finds the replica not
    # placed, so not hung, and waits node_wait_s for it before giving up.
    pool = ServicePool([orphan], "teacher", request_timeout_s=2.0, node_wait_s=3.0, needs=needs)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError, match=r"teacher-0 did not come back within 3 s \(ray.node_wait_s\).*"
                                               r"short of 1 lost_node \(the cluster has 0\)"):
            pool.generate(embedded_data["prompts"][:2], 8, 5, 0.0).result()
        assert time.monotonic() - started >= 2.0 + 3.0
    finally:
        ray_cluster.kill(orphan, no_restart=True)


# -- a whole run ------------------------------------------------------------------------------------


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(run: subprocess.Popen, run_dir: Path, condition, what: str, timeout: float = 1800) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(run_dir)
        if condition(records):
            return records
        assert run.poll() is None, f"the run exited ({run.returncode}) before {what}: {run.stdout.read()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _step_logged(step: int):
    return lambda records: any(r.get("step") == step and "loss" in r for r in records)


def _processes_of(marker: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``marker``: the run's driver, its local Ray,
    the actors' workers and whatever they spawned (vLLM's engine processes) inherit it."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SWITCHKD_TEST_RUN") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # exited, or not ours to read
            pass
    return found


def _assert_none_left(marker: str, context: str = "") -> None:
    """No process of the run 30 s after its driver exited (Ray and the watchdogs take a moment)."""
    deadline = time.monotonic() + 30
    while _processes_of(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [f"{p.pid} {p.name()}" for p in _processes_of(marker)]
    assert not left, f"processes of the run still running 30 s after it exited: {left} {context}"


def _engine_workers(marker: str) -> list[psutil.Process]:
    """The run's processes that a vLLM engine process started (its workers): the ones that lived on."""
    found = []
    for proc in _processes_of(marker):
        try:
            parent = proc.parent()
            if parent is not None and "VLLM::EngineCore" in parent.name():
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_a_run_stopped_during_start_up_leaves_no_process_behind(embedded_fast, tmp_path):
    """The moment the issue reported: SIGTERM while the engines start, once an engine has started its
    worker process. The driver exits, and within seconds no process of the run remains. (Without
    services/process_guard.py the engines' workers were measured still running 40 s later.)"""
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "SWITCHKD_TEST_RUN": marker}
    # One replica of each kind is enough here, and starts sooner.
    command = [*fast_run_command(embedded_fast, tmp_path / "run"), "services.teacher.replicas=1", "learner.world_size=1"]
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while not _engine_workers(marker):
            assert run.poll() is None, f"the run exited ({run.returncode}) before its engines started"
            assert time.monotonic() < deadline, "no vLLM engine worker appeared within 900 s"
            time.sleep(0.2)
        seen = [f"{p.pid} {p.name()}" for p in _processes_of(marker)]
        run.send_signal(signal.SIGTERM)  # what `ray job stop` sends
        run.communicate(timeout=300)
        _assert_none_left(marker, f"at the stop: {seen}")
    finally:
        if run.poll() is None:
            run.kill()
        for proc in _processes_of(marker):  # leave nothing to the tests after this one
            proc.kill()


def test_run_survives_killed_teacher_student_and_learner_then_stops_and_resumes(embedded_fast, submitted_fast_run,
                                                                                tmp_path):
    """The fast run with a teacher replica, the only student replica and a learner rank killed
    (SIGKILL), then stopped (SIGTERM) and resumed on one local Ray node, against the same run
    straight through on two nodes (the end-to-end test's `ray job submit` run): every step trains
    the same batch to the same loss."""
    run_dir = tmp_path / "run"
    command = fast_run_command(embedded_fast, run_dir)
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "SWITCHKD_TEST_RUN": marker}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        records = _wait_for(run, run_dir, lambda rs: any(r.get("event") == "started" for r in rs), "start")
        pids = next(r for r in records if r.get("event") == "started")["pids"]

        _wait_for(run, run_dir, _step_logged(1), "step 1")
        os.kill(pids["teacher-0"], signal.SIGKILL)  # mid-rollout of step 2, or just before it
        _wait_for(run, run_dir, _step_logged(2), "step 2")
        os.kill(pids["student-0"], signal.SIGKILL)  # the only student replica
        _wait_for(run, run_dir, _step_logged(3), "step 3")  # a checkpoint at 2, step 3 applied after it
        learner = child_pids(run.pid, "ray::LearnerRank")
        assert len(learner) == 2, learner
        os.kill(learner[1], signal.SIGKILL)
        _wait_for(run, run_dir, lambda rs: any(r.get("event") == "learner_restarted" for r in rs)
                  and _step_logged(4)(rs), "the learner restart and step 4")
        run.send_signal(signal.SIGTERM)  # what `ray job stop` sends
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    first = _records(run_dir)
    stopped = [r for r in first if r.get("event") == "stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM", out[-3000:]
    stopped_at = stopped[0]["step"]
    assert 4 <= stopped_at < STEPS

    # The second job resumes from the stop's checkpoint and finishes.
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    records = _records(run_dir)
    events = [r for r in records if "event" in r]
    resumed = [r for r in events if r["event"] == "resumed"]
    assert resumed and resumed[-1]["step"] == stopped_at

    retried = {(r["service"], r["replica"]) for r in events if r["event"] == "request_retried"}
    assert ("teacher", 0) in retried and ("student", 0) in retried, events
    back = {(r["service"], r["replica"], r["version"]) for r in events if r["event"] == "replica_restarted"}
    assert ("teacher", 0, 0) in back and ("student", 0, 2) in back, events  # the student at the version it had
    restart = next(r for r in events if r["event"] == "learner_restarted")
    assert restart["resumed_step"] == 2

    steps = [r for r in records if "loss" in r]
    # Replayed steps train the very same batch from the very same state: the same loss.
    by_step: dict[int, list[dict]] = {}
    for r in steps:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    replayed = by_step[3]
    assert len(replayed) == 2 and replayed[1].get("replayed")
    assert replayed[1]["loss"] == pytest.approx(replayed[0]["loss"], rel=1e-5, abs=1e-7)
    # No step applied twice: the optimizer has taken exactly `step` steps when step is logged.
    assert all(r["optimizer_step"] == r["step"] for r in steps)
    # Synchronous loop: every batch, replayed ones too, trained the weights that rolled it out.
    assert all(r["policy_lag"] == 0 for r in steps), [r["policy_lag"] for r in steps]
    assert (run_dir / "student" / "model.safetensors").exists()

    # Whole-run equivalence: the same run straight through (submitted with `ray job submit` to a
    # cluster of two nodes, the teacher on one, the student and learner on the other; another directory). Whatever was killed, stopped, resumed and replayed here, every
    # step trained the very same batch (tokens, lengths and who wrote each token: the rollout
    # digest) to the same loss.
    assert "SUCCEEDED" in submitted_fast_run["status"], submitted_fast_run["logs"][-3000:]
    faulted = {r["step"]: r for r in step_records(records)}
    clean = {r["step"]: r for r in step_records(_records(submitted_fast_run["run_dir"]))}
    assert sorted(clean) == sorted(faulted) == list(range(1, STEPS + 1))
    assert [faulted[s]["rollout_digest"] for s in clean] == [clean[s]["rollout_digest"] for s in clean]
    assert [faulted[s]["loss"] for s in clean] == pytest.approx([clean[s]["loss"] for s in clean], rel=1e-6, abs=1e-9)

    # Two runs ended (stopped, resumed), with engines, learner ranks and replicas killed on the way:
    # none of their processes is left.
    _assert_none_left(marker)


def test_overlapped_run_survives_a_killed_learner_then_stops_and_resumes(embedded_fast, tmp_path):
    """schedule.max_policy_lag=1 (the rollout of step n+1 runs while step n trains) keeps the
    synchronous loop's guarantees: a learner rank killed mid-step is restarted from the checkpoint
    and the batches since are replayed from disk, the same tokens to the same loss; a stop and a
    resume lose no step and apply none twice; no batch trains with more than one step of lag."""
    run_dir = tmp_path / "run"
    command = [*fast_run_command(embedded_fast, run_dir), "schedule.max_policy_lag=1"]
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "SWITCHKD_TEST_RUN": marker}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # After step 2 (checkpointed) step 3 trains while step 4 rolls out: the kill lands in step 3
        # or 4, and the restart goes back to step 2 either way.
        _wait_for(run, run_dir, _step_logged(2), "step 2")
        learner = child_pids(run.pid, "ray::LearnerRank")
        assert len(learner) == 2, learner
        os.kill(learner[0], signal.SIGKILL)
        _wait_for(run, run_dir, lambda rs: any(r.get("event") == "learner_restarted" for r in rs)
                  and _step_logged(4)(rs), "the learner restart and step 4")
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    stopped = [r for r in _records(run_dir) if r.get("event") == "stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM", out[-3000:]
    stopped_at = stopped[0]["step"]
    assert 4 <= stopped_at < STEPS

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    records = _records(run_dir)
    events = [r for r in records if "event" in r]
    assert [r["step"] for r in events if r["event"] == "resumed"] == [stopped_at]
    assert next(r for r in events if r["event"] == "learner_restarted")["resumed_step"] == 2

    steps = [r for r in records if "loss" in r]
    by_step: dict[int, list[dict]] = {}
    for r in steps:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    # Step 3's batch was rolled out while step 2 trained, before the kill: replayed from disk after
    # the restart. A step that trained before the kill too trained the same batch to the same loss.
    assert by_step[3][-1].get("replayed"), by_step[3]
    for records_of_step in by_step.values():
        first, again = records_of_step[0], records_of_step[-1]
        assert len(records_of_step) <= 2 and again["rollout_digest"] == first["rollout_digest"]
        assert again["loss"] == pytest.approx(first["loss"], rel=1e-5, abs=1e-7)
    assert all(r["optimizer_step"] == r["step"] for r in steps)
    # One step of lag from step 2 on: the next batch rolled out while each step trained. The one
    # exception is the resumed run's first batch when the stop interrupted its rollout: rolled out
    # again by the checkpoint's weights, it has none.
    for r in steps:
        resumed_fresh = r["step"] == stopped_at + 1 and not r.get("replayed")
        assert r["policy_lag"] == (0 if r["step"] == 1 or resumed_fresh else 1), (r["step"], r["policy_lag"])
    assert all(r.get("overlapped") for r in steps if r["step"] < STEPS)
    assert (run_dir / "student" / "model.safetensors").exists()
    _assert_none_left(marker)
