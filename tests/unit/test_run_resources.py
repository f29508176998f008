"""The run checks, before starting any actor, that the cluster can hold them all (pure logic)."""
from orchestrator.config import load_config
from orchestrator.launcher import missing_resources, needed_resources


def test_needed_resources_count_every_replica_and_rank():
    cfg = load_config(None, ["services.teacher.replicas=2", "learner.world_size=2", "services.student.num_gpus=1"])
    assert needed_resources(cfg) == {"CPU": 2 + 1 + 2, "GPU": 1}


def test_missing_resources_name_what_is_short():
    needed = {"CPU": 3.0, "GPU": 0.0}
    assert missing_resources(needed, {"CPU": 4.0}) is None
    assert missing_resources(needed, {"CPU": 2.0}) == "3 CPU (the cluster has 2)"
    assert missing_resources({"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0}) == "2 GPU (the cluster has 0)"
