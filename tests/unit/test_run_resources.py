"""The run checks, before starting any actor, that the cluster can hold them all (pure logic)."""
import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.launcher import engine_bundles, engine_options, missing_resources, needed_resources


def test_needed_resources_count_every_replica_and_rank():
    cfg = load_config(None, ["services.teacher.replicas=2", "learner.world_size=2", "services.student.num_gpus=1"])
    assert needed_resources(cfg) == {"CPU": 2 + 1 + 2, "GPU": 1}


def test_missing_resources_name_what_is_short():
    needed = {"CPU": 3.0, "GPU": 0.0}
    assert missing_resources(needed, {"CPU": 4.0}) is None
    assert missing_resources(needed, {"CPU": 2.0}) == "3 CPU (the cluster has 2)"
    assert missing_resources({"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0}) == "2 GPU (the cluster has 0)"


def test_custom_resources_are_counted_and_named_when_missing():
    cfg = load_config(None, ["services.teacher.replicas=2", "services.teacher.resources.teacher_node=1",
                             "learner.world_size=2", "learner.resources.learner_node=0.5",
                             "services.student.resources.learner_node=1"])
    needed = needed_resources(cfg)
    assert needed == {"CPU": 5, "GPU": 0, "teacher_node": 2, "learner_node": 2}
    assert missing_resources(needed, {"CPU": 8.0, "teacher_node": 2.0}) == "2 learner_node (the cluster has 0)"


def test_an_engine_split_over_gpus_asks_one_bundle_per_gpu_worker():
    """vLLM's Ray executor starts one worker per GPU inside the replica's placement group: the
    first bundle also holds the actor (its CPUs, its custom resources), the actor itself no GPU."""
    cfg = load_config(None, ["services.teacher.tensor_parallel_size=2", "services.teacher.num_gpus=2",
                             "services.teacher.num_cpus=4", "services.teacher.resources.teacher_node=1"])
    teacher = cfg.services.teacher
    assert engine_bundles(teacher) == [{"CPU": 4, "GPU": 1, "teacher_node": 1}, {"GPU": 1}]
    assert engine_options(teacher) == {"num_cpus": 4, "num_gpus": 2, "resources": {"teacher_node": 1}}
    assert needed_resources(cfg)["GPU"] == 2
    # On one device (or on CPU, where vLLM splits over processes, not Ray workers): one bundle.
    assert engine_bundles(cfg.services.student) == [{"CPU": 1}]


def test_role_resources_are_checked_with_their_dotted_name():
    for override, message in (("learner.resources.learner_node=0", "learner.resources.learner_node: must be a number > 0"),
                              ("services.teacher.resources.GPU=1", "services.teacher.resources: GPU has its own key"),
                              ("learner.placement_strategy=ANYWHERE", "learner.placement_strategy: 'ANYWHERE' is not one of"),
                              ("services.teacher.tensor_parallel_size=2", None)):
        if message is None:  # on CPU (no GPUs asked for) tensor parallelism needs no GPU count
            load_config(None, [override])
            continue
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="num_gpus: an engine split over GPUs"):
        load_config(None, ["services.teacher.tensor_parallel_size=2", "services.teacher.num_gpus=1"])
