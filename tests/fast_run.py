"""One short run of the whole pipeline on the fast embedded build, shared by the tests that read it.

`submit_fast_run` runs it as users do on a cluster of two Ray nodes: `ray start --head` on
127.0.0.1 (token auth on) advertising `learner_node`, a second `ray start --address ...` advertising
`teacher_node`, `ray job submit` from the repository root with the roles placed by those resources
(``TWO_NODES``: the teacher's replicas on the second node, the student and the learner ranks on
the head, so top-k arrays cross nodes through Ray's object store), wait, then stop the nodes.

Midway the teacher's node is lost: once step 2 is logged, its `ray start` process group (raylet,
workers, vLLM engines) gets SIGKILL, and ``TEACHER_NODE_DOWN_S`` later a new node with the same
resources joins; the run must wait for it, bring the replicas back there and lose no step.

The end-to-end tests read what it leaves (status, logs, the run directory, the metrics endpoint
scraped while it ran, where Ray placed each actor), and the fault test compares its faulted,
stopped and resumed run on one local node with it step by step: both use ``fast_run_overrides``,
so they are the same run, on one node and on two that lost a node midway.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 2400  # a limit for a stuck job, not a speed check: the job took 1,050+ s on a slow day
STEPS = 6
LOSE_TEACHER_NODE_AFTER_STEP = 2
TEACHER_NODE_DOWN_S = 10.0  # from the SIGKILL to the replacement node's `ray start`


def fast_run_overrides(build: Path, run_dir: Path) -> list[str]:
    """deploy/configs/embedded-fast.yaml, shortened, with every actor kind twice over (two teacher
    replicas, two learner ranks) so that faults have a replica or a rank to kill."""
    return [
        f"output_dir={run_dir}", f"models.teacher={build / 'teacher'}", f"models.student={build / 'student'}",
        *[f"data.data_files.{split}={build / 'data' / (split + '.jsonl')}" for split in ("train", "validation", "test")],
        f"schedule.steps={STEPS}", "schedule.checkpoint_every=2", "schedule.eval_every=100", "schedule.eval_examples=8",
        "rollout.max_new_tokens=48", "learner.world_size=2", "learner.micro_batch_size=4",
        "services.teacher.replicas=2", "ray.dashboard=false",
    ]


# Where each role runs on the two-node cluster (orchestrator.launcher reads these resources).
TWO_NODES = ["services.teacher.resources.teacher_node=1", "services.student.resources.learner_node=1",
             "learner.resources.learner_node=1"]


def fast_run_command(build: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.run", "--config", "deploy/configs/embedded-fast.yaml",
            *fast_run_overrides(build, run_dir)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True)


def _start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` in its own session: stopping it stops this node and nothing else
    (`ray stop` would stop every Ray on the machine)."""
    # Each node's dashboard agent on its own port: the default (52365) is one per machine, and a
    # head whose agent cannot bind answers every job submission with "No available agent".
    return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={_free_port()}", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_node(node: subprocess.Popen) -> None:
    try:
        os.killpg(node.pid, signal.SIGTERM)
    except ProcessLookupError:  # the node lost on purpose
        pass
    node.wait(60)
    try:  # the GCS server can outlive its `ray start` by minutes
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_teacher_node(port: int, env: dict) -> subprocess.Popen:
    return _start_node([f"--address=127.0.0.1:{port}", "--num-cpus=4", '--resources={"teacher_node": 2}',
                        "--object-store-memory=1000000000"], env)


@contextmanager
def ray_cluster_of_two():
    """Two Ray nodes started the way an operator starts them: loopback only, token auth on; the
    head advertises `learner_node`, the second node `teacher_node` (TWO_NODES places the roles).
    ``nodes`` in what it yields: the `ray start` processes, the teacher's node last."""
    dashboard, metrics, port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "RAY_metrics_report_interval_ms": "1000"}  # gauges reach the endpoint within a second
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, env=env, capture_output=True)
    nodes = [_start_node(["--head", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                          f"--metrics-export-port={metrics}", f"--port={port}", "--num-cpus=4",
                          '--resources={"learner_node": 3}'], env)]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while not _cli(["job", "list", "--address", address], env).returncode == 0:
            assert nodes[0].poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
        nodes.append(_start_teacher_node(port, env))
        while '"teacher_node"' not in _cli(["list", "nodes", "--address", address, "--detail", "--format", "json"], env).stdout:
            assert nodes[1].poll() is None and time.time() < deadline, "the second Ray node did not join"
            time.sleep(2)
        yield {"address": address, "metrics": metrics, "env": env, "port": port, "nodes": nodes}
    finally:
        for node in reversed(nodes):
            _stop_node(node)


def _listed(what: str, address: str, env: dict) -> list[dict]:
    """Ray's state API (`ray list actors|nodes`), dead actors included."""
    answer = _cli(["list", what, "--address", address, "--detail", "--format", "json", "--limit", "10000"], env)
    assert answer.returncode == 0, answer.stderr[-2000:]
    return json.loads(answer.stdout)


def submit_fast_run(build: Path, run_dir: Path) -> dict:
    """Submit the fast run from the repository root, as the README says, to two nodes, and wait.

    base_dir points the job (which runs in Ray's unpacked copy of the code) at this checkout's
    cached fast build. Returns the job's status and logs, ``run_dir``, the last scrape of Ray's
    metrics endpoint that carried the switch rate, and Ray's records of the actors and nodes."""
    with ray_cluster_of_two() as head:
        env, address = head["env"], head["address"]
        command = [RAY, "job", "submit", "--address", address, "--no-wait", "--working-dir", ".", "--",
                   *fast_run_command(build, run_dir), *TWO_NODES, f"base_dir={REPO}",
                   # The replacement node's engines start in minutes on a slow day (9.5 min seen
                   # on 2026-12-06): the default 600 s would end the run, which is not this test's claim.
                   "ray.node_wait_s=1800",
                   f"models.embedded_dir={build.parent}"]
        for _ in range(30):  # a fresh head answers before its job agent is up: "No available agent"
            submit = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
            if submit.returncode == 0 or "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
        job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)

        # Scrape in the background twice a second while the job runs: one `ray job status` call takes
        # seconds on 2 cores, and the job's gauges leave the endpoint soon after it exits.
        scrapes, done = [], threading.Event()

        def scrape() -> None:
            while not done.is_set():
                text = _get(f"http://127.0.0.1:{head['metrics']}/metrics")
                if "ray_switchkd_" in text:
                    scrapes.append(text)
                done.wait(0.5)

        # Lose the teacher's node once step 2 is logged (the run then rolls out step 3), then bring
        # a node with the same resources back.
        lost = {}

        def lose_the_teacher_node() -> None:
            while not done.is_set() and _steps_logged(run_dir) < LOSE_TEACHER_NODE_AFTER_STEP:
                done.wait(0.2)
            if done.is_set():
                return
            os.killpg(head["nodes"][-1].pid, signal.SIGKILL)
            lost["after_step"] = _steps_logged(run_dir)
            done.wait(TEACHER_NODE_DOWN_S)
            head["nodes"].append(_start_teacher_node(head["port"], env))

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        loser = threading.Thread(target=lose_the_teacher_node, daemon=True)
        loser.start()
        status, deadline = "", time.time() + JOB_TIMEOUT_S
        while time.time() < deadline:
            answer = _cli(["job", "status", "--address", address, job_id], env)
            status = (answer.stdout + answer.stderr).upper()  # the CLI says "Job '...' succeeded"
            if re.search(r"\b(SUCCEEDED|FAILED|STOPPED)\b", status):
                break
            time.sleep(10)  # each `ray job status` costs a second or more of CPU the job needs
        done.set()
        scraper.join()
        loser.join()
        # The last scrape that carries the switch rate: the run keeps every gauge's last value alive,
        # so it holds the baseline eval, the last step and the stage timings together.
        scraped = next((text for text in reversed(scrapes) if "ray_switchkd_teacher_fraction" in text), "")
        logs = _cli(["job", "logs", "--address", address, job_id], env).stdout
        actors, nodes = _listed("actors", address, env), _listed("nodes", address, env)
    return {"status": status, "logs": logs, "run_dir": run_dir, "metrics_text": scraped, "actors": actors,
            "nodes": nodes, "teacher_node_lost_after_step": lost.get("after_step")}


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum("loss" in json.loads(line) for line in path.read_text().splitlines() if line.strip())
