"""Placement checks on a real Ray cluster that need no engine: the learner's placement group that
finds no room stops with an error naming it, and a run directory an actor cannot see stops the run
at start (tests/e2e places real roles on two nodes)."""
import os

import pytest

from orchestrator.launcher import ClusterError, check_run_dir_shared, start_learner
from trainer.config import LearnerConfig, LossConfig


def test_a_run_dir_some_actor_cannot_see_is_named_at_start(ray_cluster, tmp_path, monkeypatch):
    class Worker:  # defined here: Ray ships it by value (the test modules are not importable in workers)
        """An actor working in its own directory: a relative path names another file there (a
        stand-in for a node that does not mount the run directory; the check itself is the real one)."""

        def __init__(self, cwd: str):
            os.chdir(cwd)

    here, elsewhere = tmp_path / "driver", tmp_path / "other-node"
    (here / "run").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    worker = ray_cluster.remote(num_cpus=0)(Worker)
    sees, blind = worker.remote(str(here)), worker.remote(str(elsewhere))
    check_run_dir_shared("run", {"learner rank 0": sees})  # the same directory: passes
    with pytest.raises(ClusterError, match=r"output_dir run is not visible from student replica 1"):
        check_run_dir_shared("run", {"learner rank 0": sees, "student replica 1": blind})
    assert list((here / "run").iterdir()) == []  # the marker is gone either way


def test_learner_ranks_that_cannot_be_placed_stop_with_what_was_asked(ray_cluster):
    """STRICT_SPREAD wants each rank on its own node; this cluster has one."""
    learner = LearnerConfig(world_size=2, placement_strategy="STRICT_SPREAD", resources={})
    with pytest.raises(ClusterError, match=r"the learner ranks: no room for 2 bundle\(s\).*STRICT_SPREAD.*after 3 s"):
        start_learner("unused-model-path", learner, LossConfig(), wait_s=3)
    from ray.util import placement_group_table

    spread = [g for g in placement_group_table().values() if g["strategy"] == "STRICT_SPREAD"]
    assert spread and all(g["state"] == "REMOVED" for g in spread), spread  # nothing left pending
