"""The cluster manifests offer what the cluster config's roles ask for (pure reading of files): every
custom resource that deploy/configs/cluster-7b.yaml names for a role is advertised by a node group of
the KubeRay RayJob and of the Ray cluster launcher config, teacher and learner on different groups,
and the groups hold a role's replicas or ranks."""
import json
from pathlib import Path

import yaml

from orchestrator.config import load_config
from orchestrator.launcher import engine_bundles, learner_bundle

REPO = Path(__file__).resolve().parents[2]


def kuberay_groups() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "deploy" / "k8s" / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    groups = {}
    for group in spec["workerGroupSpecs"]:
        # KubeRay passes rayStartParams.resources to `ray start --resources` as a quoted JSON string.
        custom = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups[group["groupName"]] = {**custom, "GPU": float(limits.get("nvidia.com/gpu", 0)),
                                      "max_nodes": group["maxReplicas"]}
    return groups


def launcher_groups() -> dict[str, dict]:
    cluster = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    return {name: {**node["resources"], "max_nodes": node.get("max_workers", 1)}
            for name, node in cluster["available_node_types"].items()}


def test_every_role_resource_is_offered_by_one_node_group_of_each_manifest():
    cfg = load_config(REPO / "deploy" / "configs" / "cluster-7b.yaml")
    roles = {"teacher": (engine_bundles(cfg.services.teacher), cfg.services.teacher.replicas),
             "student": (engine_bundles(cfg.services.student), cfg.services.student.replicas),
             "learner": ([learner_bundle(cfg.learner)], cfg.learner.world_size)}
    for manifest, groups in (("rayjob.yaml", kuberay_groups()), ("cluster.yaml", launcher_groups())):
        home = {}
        for role, (bundles, count) in roles.items():
            custom = {name for name in bundles[0] if name not in ("CPU", "GPU")}
            assert custom, f"cluster-7b.yaml: {role} names no custom resource, so nothing ties it to a node group"
            offering = [g for g, res in groups.items() if custom <= set(res)]
            assert len(offering) == 1, f"{manifest}: {role} needs {custom}, offered by {offering}"
            home[role] = offering[0]
            group = groups[home[role]]
            for name in custom | {"GPU"}:  # the whole role fits on the group's nodes
                needed = sum(b.get(name, 0.0) for b in bundles) * count
                assert needed <= group.get(name, 0.0) * group["max_nodes"], (manifest, role, name, needed, group)
        assert home["student"] == home["learner"] != home["teacher"], (manifest, home)
