"""The whole pipeline as users run it: `ray start --head` on 127.0.0.1, `ray job submit`, wait.

The job must SUCCEED and leave the exported student, the report and the JSONL metrics; Ray's
metrics endpoint (scraped over loopback while the job runs) must carry the switch rate; every
Grafana panel must query a metric the run really exported.

This directory sorts before tests/integration, so its Ray head is up and gone before the
integration tests start their own local Ray.
"""
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
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started the way an operator starts one: loopback only, token auth on.

    `--block` keeps the head in this one process group, so the teardown stops this head and
    nothing else (`ray stop` would stop every Ray on the machine)."""
    dashboard, metrics = _free_port(), _free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "RAY_metrics_report_interval_ms": "1000"}  # gauges reach the endpoint within a second
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, env=env, capture_output=True)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}", f"--port={_free_port()}",
         "--num-cpus=8", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while not _cli(["job", "list", "--address", address], env).returncode == 0:
        assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
        time.sleep(2)
    yield {"address": address, "metrics": metrics, "env": env}
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(60)


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def finished_job(ray_head, embedded_fast, tmp_path_factory):
    """Submit the embedded-fast config from the repository root, as the README says, and wait.

    base_dir points the job (which runs in Ray's unpacked copy of the code) at this checkout's
    cached fast build; output_dir is a fresh temporary directory."""
    run_dir = tmp_path_factory.mktemp("job") / "run"
    embedded_dir = embedded_fast.parent
    overrides = [f"base_dir={REPO}", f"output_dir={run_dir}", f"models.embedded_dir={embedded_dir}"]
    for role in ("teacher", "student"):
        overrides.append(f"models.{role}={embedded_fast / role}")
    for split in ("train", "validation", "test"):
        overrides.append(f"data.data_files.{split}={embedded_fast / 'data' / (split + '.jsonl')}")
    env, address = ray_head["env"], ray_head["address"]
    command = [RAY, "job", "submit", "--address", address, "--no-wait", "--working-dir", ".", "--",
               sys.executable, "-m", "orchestrator.run", "--config", "deploy/configs/embedded-fast.yaml", *overrides]
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
            text = _get(f"http://127.0.0.1:{ray_head['metrics']}/metrics")
            if "ray_switchkd_" in text:
                scrapes.append(text)
            done.wait(0.5)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    status, deadline = "", time.time() + JOB_TIMEOUT_S
    while time.time() < deadline:
        answer = _cli(["job", "status", "--address", address, job_id], env)
        status = (answer.stdout + answer.stderr).upper()  # the CLI says "Job '...' succeeded"
        if re.search(r"\b(SUCCEEDED|FAILED|STOPPED)\b", status):
            break
        time.sleep(2)
    done.set()
    scraper.join()
    # The last scrape that carries the switch rate: the run keeps every gauge's last value alive,
    # so it holds the baseline eval, the last step and the stage timings together.
    scraped = next((text for text in reversed(scrapes) if "ray_switchkd_teacher_fraction" in text), "")
    logs = _cli(["job", "logs", "--address", address, job_id], env).stdout
    return {"status": status, "logs": logs, "run_dir": run_dir, "metrics_text": scraped}


def test_job_succeeds_and_leaves_student_report_and_metrics(finished_job):
    assert "SUCCEEDED" in finished_job["status"], finished_job["logs"][-4000:]
    run_dir = finished_job["run_dir"]
    student = run_dir / "student"
    assert (student / "config.json").exists() and (student / "model.safetensors").exists()
    assert (student / "tokenizer.json").exists()
    assert (run_dir / "report.md").exists() and (run_dir / "report.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.0 <= r["teacher_fraction"] <= 1.0 and r["loss"] > 0 for r in steps)
    assert steps[-1]["weight_version"] == 3
    assert (run_dir / "checkpoints" / "latest").exists()


def test_metrics_endpoint_carries_a_plausible_switch_rate(finished_job):
    text = finished_job["metrics_text"]
    values = [float(m.group(1)) for m in
              re.finditer(r'^ray_switchkd_teacher_fraction\{[^}]*policy="switch"[^}]*\} (\S+)$', text, re.M)]
    assert values, "the switch-rate gauge never reached Ray's metrics endpoint"
    assert all(0.0 <= v <= 1.0 for v in values)


# Set only by the rationale method's attribution stage (this job runs `switch`);
# tests/integration/test_rationale.py checks the stage writes them.
RATIONALE_ONLY = {"ray_switchkd_attribution_rows_per_second", "ray_switchkd_attribution_progress"}


def test_every_dashboard_panel_queries_an_exported_metric(finished_job):
    scraped = set(re.findall(r"^(ray_switchkd_\w+)\{", finished_job["metrics_text"], re.M))
    assert scraped, "no switchkd metric reached the endpoint"
    exported = scraped | RATIONALE_ONLY
    exported |= {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "switchkd-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"ray_switchkd_\w+", target["expr"]))
            assert names, f"panel {panel['title']!r} queries no switchkd metric"
            for name in names:
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert name in exported or base in exported, f"panel {panel['title']!r}: {name} is not exported"


def test_manifests_parse_and_name_the_entrypoint():
    rayjob = yaml.safe_load((REPO / "deploy" / "k8s" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob"
    module = re.search(r"-m (\S+)", rayjob["spec"]["entrypoint"]).group(1)
    config = re.search(r"--config (\S+)", rayjob["spec"]["entrypoint"]).group(1)
    assert (REPO / (module.replace(".", "/") + ".py")).exists()
    assert (REPO / config).exists()
    cluster = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    readme = (REPO / "README.md").read_text()
    assert "ray job submit" in readme and "-m orchestrator.run" in readme
