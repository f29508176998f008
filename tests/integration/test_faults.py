"""Faults injected into real services and a real run: processes killed with SIGKILL, a hung
engine (SIGSTOP), the job stopped with SIGTERM. Nothing may be lost, duplicated or silently stale."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from processes import child_pids
from orchestrator.launcher import start_service
from orchestrator.metrics import step_records
from services.pool import ServiceError, ServicePool

REPO = Path(__file__).resolve().parents[2]


def _perturbed_weights(model_dir: Path) -> bytes:
    """The student's weights, visibly changed: a replica serving the base weights would differ."""
    state = load_file(str(model_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    return save({name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in state.items()})


def test_killed_and_hung_replicas_retry_and_come_back_at_the_latest_version(ray_cluster, embedded_data, cpu_engine,
                                                                           tmp_path):
    engine = replace(cpu_engine, replicas=2, request_timeout_s=20.0, request_retries=1)
    pool = start_service("student", str(embedded_data["dir"] / "student"), engine, embedded_data["eos"],
                         weights_dir=str(tmp_path / "weights"))
    try:
        assert pool.load_weights(_perturbed_weights(embedded_data["dir"] / "student"), 1) == [1, 1]
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

        # Retries spent: a clear error that names the replica, the call and the setting.
        one_shot = ServicePool([pool.actors[0]], "student", request_timeout_s=3.0, request_retries=0)
        os.kill(ray_cluster.get(pool.actors[0].info.remote())["pid"], signal.SIGSTOP)
        with pytest.raises(ServiceError, match=r"student-0.generate \(6 sequences\): no answer within "
                                               r"request_timeout_s=3; gave up after 1 attempt"):
            one_shot.generate(prompts, 24, 5, 0.0).result()
    finally:
        for actor in pool.actors:
            ray_cluster.kill(actor, no_restart=True)


# -- a whole run ------------------------------------------------------------------------------------


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(run: subprocess.Popen, run_dir: Path, condition, what: str, timeout: float = 600) -> list[dict]:
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


def test_run_survives_killed_teacher_student_and_learner_then_stops_and_resumes(embedded_fast, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "orchestrator.run", "--config", "deploy/configs/embedded-fast.yaml",
        f"output_dir={run_dir}", f"models.teacher={embedded_fast / 'teacher'}", f"models.student={embedded_fast / 'student'}",
        *[f"data.data_files.{split}={embedded_fast / 'data' / (split + '.jsonl')}" for split in ("train", "validation", "test")],
        "schedule.steps=8", "schedule.checkpoint_every=2", "schedule.eval_every=100", "schedule.eval_examples=8",
        "rollout.max_new_tokens=48", "learner.world_size=2", "learner.micro_batch_size=4",
        "services.teacher.replicas=2", "ray.dashboard=false",
    ]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        records = _wait_for(run, run_dir, lambda rs: any(r.get("event") == "started" for r in rs), "start")
        pids = next(r for r in records if r.get("event") == "started")["pids"]

        _wait_for(run, run_dir, _step_logged(1), "step 1")
        os.kill(pids["teacher-0"], signal.SIGKILL)  # mid-rollout of step 2, or just before it
        _wait_for(run, run_dir, _step_logged(2), "step 2")
        os.kill(pids["student-0"], signal.SIGKILL)  # the only student replica
        _wait_for(run, run_dir, _step_logged(5), "step 5")  # a checkpoint at 4, step 5 applied after it
        learner = child_pids(run.pid, "ray::LearnerRank")
        assert len(learner) == 2, learner
        os.kill(learner[1], signal.SIGKILL)
        _wait_for(run, run_dir, lambda rs: any(r.get("event") == "learner_restarted" for r in rs)
                  and _step_logged(6)(rs), "the learner restart and step 6")
        run.send_signal(signal.SIGTERM)  # what `ray job stop` sends
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    first = _records(run_dir)
    stopped = [r for r in first if r.get("event") == "stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM", out[-3000:]
    stopped_at = stopped[0]["step"]
    assert 6 <= stopped_at < 8

    # The second job resumes from the stop's checkpoint and finishes.
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
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
    assert restart["resumed_step"] == 4

    steps = [r for r in records if "loss" in r]
    # Replayed steps train the very same batch from the very same state: the same loss.
    by_step: dict[int, list[dict]] = {}
    for r in steps:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == list(range(1, 9))
    replayed = by_step[5]
    assert len(replayed) == 2 and replayed[1].get("replayed")
    assert replayed[1]["loss"] == pytest.approx(replayed[0]["loss"], rel=1e-5, abs=1e-7)
    # No step applied twice: the optimizer has taken exactly `step` steps when step is logged.
    assert all(r["optimizer_step"] == r["step"] for r in steps)
    # Synchronous loop: every batch, replayed ones too, trained the weights that rolled it out.
    assert all(r["policy_lag"] == 0 for r in steps), [r["policy_lag"] for r in steps]

    # Whole-run equivalence: the same command straight through, in another directory. Whatever was
    # killed, stopped, resumed and replayed above, every step trained the very same batch (tokens,
    # lengths and who wrote each token: the rollout digest) to the same loss.
    straight_dir = tmp_path / "straight"
    straight = subprocess.run([*(arg for arg in command if not arg.startswith("output_dir=")), f"output_dir={straight_dir}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    faulted = {r["step"]: r for r in step_records(records)}
    clean = {r["step"]: r for r in step_records(_records(straight_dir))}
    assert sorted(clean) == sorted(faulted) == list(range(1, 9))
    assert [faulted[s]["rollout_digest"] for s in clean] == [clean[s]["rollout_digest"] for s in clean]
    assert [faulted[s]["loss"] for s in clean] == pytest.approx([clean[s]["loss"] for s in clean], rel=1e-6, abs=1e-9)
    assert (run_dir / "student" / "model.safetensors").exists()
