"""The whole pipeline as users run it: `ray start --head` on 127.0.0.1, `ray job submit`, wait.

Checks the job SUCCEEDS, the run directory holds the exported student, the report and the JSONL
metrics, Ray's metrics endpoint (scraped over loopback while the job runs) carries the switch
rate, and every Grafana panel queries a metric the run really exported.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started the way an operator starts one, bound to loopback."""
    dashboard, metrics = _free_port(), _free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}", "--num-cpus=8",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True)
    yield {"dashboard": f"http://127.0.0.1:{dashboard}", "metrics": metrics}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def finished_job(ray_head, embedded_fast, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("job") / "run"
    embedded_root = embedded_fast.parent
    overrides = [f"output_dir={run_dir}", f"models.embedded_dir={embedded_root}",
                 f"models.teacher={embedded_fast / 'teacher'}", f"models.student={embedded_fast / 'student'}"]
    for split in ("train", "validation", "test"):
        overrides.append(f"data.data_files.{split}={embedded_fast / 'data' / (split + '.jsonl')}")
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["dashboard"], "--no-wait", "--working-dir", str(REPO),
         "--", sys.executable, "-m", "orchestrator.run", "--config", "deploy/configs/embedded-fast.yaml", *overrides],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    job_id = re.search(r"raysubmit_\w+", submit.stdout).group(0)
    scraped, status, deadline = "", "", time.time() + 900
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", ray_head["dashboard"], job_id],
                                capture_output=True, text=True).stdout
        text = _scrape(ray_head["metrics"])
        if "ray_switchkd_teacher_fraction{" in text:
            scraped = text  # the latest scrape that holds the run's gauges
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head["dashboard"], job_id],
                          capture_output=True, text=True).stdout
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
    assert all(0.0 <= r["teacher_fraction"] <= 1.0 for r in steps)
    assert steps[-1]["weight_version"] == 3
    assert (run_dir / "checkpoints").is_dir()


def test_metrics_endpoint_carries_a_plausible_switch_rate(finished_job):
    text = finished_job["metrics_text"]
    values = [float(m.group(1)) for m in re.finditer(r'^ray_switchkd_teacher_fraction\{[^}]*policy="switch"[^}]*\} (\S+)$',
                                                       text, re.M)]
    assert values, "the switch-rate gauge never reached Ray's metrics endpoint"
    assert all(0.0 <= v <= 1.0 for v in values)


def test_every_dashboard_panel_queries_an_exported_metric(finished_job):
    exported = set(re.findall(r"^(ray_switchkd_\w+?)(?:_bucket|_count|_sum)?\{", finished_job["metrics_text"], re.M))
    exported |= set(re.findall(r"^(ray_switchkd_\w+)\{", finished_job["metrics_text"], re.M))
    dashboard = json.loads((REPO / "deploy" / "grafana" / "switchkd-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"ray_switchkd_\w+", target["expr"]))
            assert names, panel["title"]
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
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])
    readme = (REPO / "README.md").read_text()
    assert "ray job submit" in readme and "-m orchestrator.run" in readme
