"""The whole pipeline as users run it: a Ray cluster of two nodes on 127.0.0.1 (`ray start --head`,
then `ray start --address ...`), `ray job submit`, wait (tests/fast_run.py; the session fixture
`submitted_fast_run` runs it once). The teacher runs on one node, the student and learner on the other;
the teacher's node is lost midway (SIGKILL) and a new one joins seconds later.

The job must SUCCEED and leave the exported student, the report and the JSONL metrics; Ray's
metrics endpoint (scraped over loopback while the job runs) must carry the switch rate; every
Grafana panel must query a metric the run really exported. The fault test
(tests/integration/test_faults.py) compares its faulted run with this one, step by step.

This directory sorts before tests/integration, so the job's Ray head is up and gone before the
integration tests start their own local Ray.
"""
import json
import re
from pathlib import Path

import yaml

from tests.fast_run import STEPS

REPO = Path(__file__).resolve().parents[2]


def test_job_succeeds_and_leaves_student_report_and_metrics(submitted_fast_run):
    assert "SUCCEEDED" in submitted_fast_run["status"], submitted_fast_run["logs"][-4000:]
    run_dir = submitted_fast_run["run_dir"]
    student = run_dir / "student"
    assert (student / "config.json").exists() and (student / "model.safetensors").exists()
    assert (student / "tokenizer.json").exists()
    assert (run_dir / "report.md").exists() and (run_dir / "report.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(0.0 <= r["teacher_fraction"] <= 1.0 and r["loss"] > 0 for r in steps)
    assert steps[-1]["weight_version"] == STEPS
    assert (run_dir / "checkpoints" / "latest").exists()


def test_teacher_ran_on_one_node_student_and_learner_on_the_other(submitted_fast_run):
    """The roles went where their resources (tests/fast_run.TWO_NODES) put them, read from Ray's
    state API: the teacher's replicas, after their node was lost, on the node that replaced it;
    the fault test's step-by-step comparison with a one-node run then shows the same tokens and
    losses across nodes and through the loss."""
    nodes = {n["node_id"]: n for n in submitted_fast_run["nodes"]}
    teacher_nodes = {i for i, n in nodes.items() if "teacher_node" in n["resources_total"]}
    assert len(nodes) == 3 and len(teacher_nodes) == 2, nodes  # the head, the lost node, its replacement
    assert sorted(nodes[i]["state"] for i in teacher_nodes) == ["ALIVE", "DEAD"]
    where: dict[str, set] = {}
    for actor in submitted_fast_run["actors"]:
        role = re.match(r"(ModelService\((teacher|student)-\d+\)|LearnerRank)", actor.get("repr_name") or "")
        if role:
            where.setdefault(role.group(2) or "learner", set()).add(actor["node_id"])
    assert set(where) == {"teacher", "student", "learner"}, where
    assert len(where["teacher"]) == 1 and nodes[next(iter(where["teacher"]))]["state"] == "ALIVE"
    assert where["teacher"] <= teacher_nodes
    assert where["student"] == where["learner"] and len(where["learner"]) == 1
    assert "learner_node" in nodes[next(iter(where["learner"]))]["resources_total"]


def test_a_lost_teacher_node_costs_no_step(submitted_fast_run):
    """The teacher's node was killed mid-run (after step 2) and replaced seconds later: the run
    waited, its teacher replicas came back on the new node, and every step was logged once (the
    fault test finds each step's tokens and loss equal to a one-node run's)."""
    assert submitted_fast_run["teacher_node_lost_after_step"] in range(1, STEPS), "the node was lost too late"
    records = [json.loads(line) for line in (submitted_fast_run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    retried = [r for r in records if r.get("event") == "request_retried" and r["service"] == "teacher"]
    assert retried and all("died" in r["cause"] for r in retried), retried
    back = {r["replica"] for r in records if r.get("event") == "replica_restarted" and r["service"] == "teacher"}
    assert back, "no teacher replica was seen back"
    assert not any(r.get("event") in ("service_failed", "learner_restarted") for r in records)


def test_metrics_endpoint_carries_a_plausible_switch_rate(submitted_fast_run):
    text = submitted_fast_run["metrics_text"]
    values = [float(m.group(1)) for m in
              re.finditer(r'^ray_switchkd_teacher_fraction\{[^}]*policy="switch"[^}]*\} (\S+)$', text, re.M)]
    assert values, "the switch-rate gauge never reached Ray's metrics endpoint"
    assert all(0.0 <= v <= 1.0 for v in values)


# Set only by the rationale method's attribution stage (this job runs `switch`);
# tests/integration/test_rationale.py checks the stage writes them.
RATIONALE_ONLY = {"ray_switchkd_attribution_rows_per_second", "ray_switchkd_attribution_progress"}


def test_every_dashboard_panel_queries_an_exported_metric(submitted_fast_run):
    scraped = set(re.findall(r"^(ray_switchkd_\w+)\{", submitted_fast_run["metrics_text"], re.M))
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
