"""The rationale method on the fast embedded build: the attribution stage in real Ray actors,
killed mid-way (a worker, then the whole stage) and restarted, gives the same rationales as an
uninterrupted run; then a short run trains the student on them with the real DeepSpeed learner
and evaluates it through the real vLLM student service."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from processes import child_pids

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


def _overrides(build: Path, cache: Path) -> list[str]:
    return [f"models.teacher={build / 'teacher'}", f"models.student={build / 'student'}", "models.build_embedded=null",
            *[f"data.data_files.{s}={build / 'data' / (s + '.jsonl')}" for s in ("train", "validation", "test")],
            f"sft.cache_dir={cache}", "sft.shard_rows=16", "sft.batch_size=8",
            "sft.max_new_tokens=96", "ray.dashboard=false"]


def _stage(build: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.rationale.stage", "--config", "deploy/configs/embedded-rationale.yaml",
            *_overrides(build, cache), "sft.train_rows=48", "sft.shard_rows=8"]


def _shards(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(cache.glob("*/train/shard-*.jsonl"))}


def _wait_shards(run: subprocess.Popen, cache: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_shards(cache)) < n:
        assert run.poll() is None, f"the stage exited ({run.returncode}) before {n} shards"
        assert time.monotonic() < deadline, f"timed out waiting for {n} shards"
        time.sleep(0.2)


def test_killed_stage_resumes_to_the_same_rationales_and_a_run_trains_on_them(embedded_fast, tmp_path):
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    whole = subprocess.run(_stage(embedded_fast, clean), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    expected = _shards(clean)
    assert len(expected) == 6  # 48 rows in shards of 8

    # Kill the worker once (Ray restarts it, its shard is sent again), then the whole stage.
    run = subprocess.Popen(_stage(embedded_fast, broken), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_shards(run, broken, 1)
        workers = child_pids(run.pid, "AttributionWorker")
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        _wait_shards(run, broken, 3)
        os.killpg(run.pid, signal.SIGKILL)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "attribution worker died on shard" in out, out[-3000:]
    before = {name: path.stat().st_mtime_ns for name, path in _shards(broken).items()}
    assert 3 <= len(before) < 6

    resumed = subprocess.run(_stage(embedded_fast, broken), cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=1800)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{6 - len(before)} of 6 shards to do" in resumed.stdout
    got = _shards(broken)
    assert {name: got[name].stat().st_mtime_ns for name in before} == before  # finished shards not redone
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].read_text() == expected[name].read_text(), name
    rows = [json.loads(line) for p in got.values() for line in p.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(48))
    assert all(1 <= len(r["rationale"]) <= 10 for r in rows)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 48 and 0.0 < summary["answer_overlap"] <= 1.0

    # A short run on a fresh cache: the stage reports to the run's metrics, then the learner trains,
    # every step on the same 32 examples (answer + rationale rows), so the loss must fall.
    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "--config", "deploy/configs/embedded-rationale.yaml",
         *_overrides(embedded_fast, tmp_path / "run-cache"), f"output_dir={run_dir}", "sft.train_rows=32",
         "rollout.prompts_per_step=32", "rollout.max_new_tokens=96", "schedule.steps=8", "schedule.eval_every=100",
         "schedule.checkpoint_every=100", "schedule.eval_examples=8", "schedule.max_train_tokens=7000"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = [r["attribution_progress"] for r in records if "attribution_progress" in r]
    assert progress == [0.5, 1.0] and all(r["attribution_rows_per_second"] > 0 for r in records
                                          if "attribution_rows_per_second" in r)
    ready = next(r for r in records if r.get("event") == "rationales_ready")
    assert ready["rationale_format"] == "multitask" and ready["rationale_train_rows"] == 32
    steps = [r for r in records if "loss" in r]
    # The token budget ends the run: the last step crossed it, the one before had not.
    seen = np.cumsum([r["rollout_tokens"] for r in steps])
    assert 3 <= len(steps) < 8 and seen[-1] >= 7000 > seen[-2], seen
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["weight_version"] == len(steps) and "eval_exact_match" in steps[-1]
    final_eval = [json.loads(line) for line in (run_dir / "eval" / f"step-{len(steps):06d}.jsonl").read_text().splitlines()]
    assert len(final_eval) == 8 and {"exact_match", "rouge_l", "reference_tokens", "output"} <= set(final_eval[0])
    assert np.mean([r["rouge_l"] for r in final_eval]) == pytest.approx(steps[-1]["eval_rouge_l"])
    assert not any(r.get("event") == "started" and "teacher-0" in r["pids"] for r in records)  # no teacher engine
    assert (run_dir / "student" / "model.safetensors").exists()
