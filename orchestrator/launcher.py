"""The one place that connects to Ray and starts every actor: engine replicas, learner ranks,
attribution workers, and the placement groups some of them need. What each actor asks of the
cluster (CPUs, GPUs, the custom resources that tie a role to a node group) comes from one function
of its config (``engine_bundles``, ``learner_bundle``, ``attribution_bundle``), used both to
create it and to count what a run needs from the cluster, so the two never disagree.

Actors are not Ray-named: a name is global to the cluster, so two runs, or a rerun after a
crash, would collide. Their repr labels them in Ray's dashboard and in error messages instead.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import RunConfig, SftConfig
from orchestrator.rationale.worker import AttributionSettings, AttributionWorker
from services.config import EngineConfig
from services.model_service import ModelService
from services.pool import ServicePool, missing_resources
from trainer.config import LearnerConfig, LossConfig
from trainer.group import LearnerGroup
from trainer.learner import LearnerRank


def connect_ray(cfg: RunConfig):
    """Join the cluster a job was submitted to (or ``ray.address``), else start a local Ray on
    ``ray.host`` (loopback by default) with room for every actor of ``cfg``."""
    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
    else:
        ray.init(address="local", _node_ip_address=cfg.ray.host, dashboard_host=cfg.ray.host,
                 include_dashboard=cfg.ray.dashboard, logging_level="ERROR", num_cpus=local_cpus(cfg))
    return ray


# -- what each actor asks of the cluster -----------------------------------------------------------


def engine_bundles(engine: EngineConfig) -> list[dict[str, float]]:
    """One replica's resources as placement-group bundles: one bundle (the actor) for an engine on
    one device; for an engine split over GPUs, one bundle per GPU worker (vLLM's Ray executor puts
    a worker in each), the actor with its CPUs and custom resources in the first."""
    first = nonzero({"CPU": engine.num_cpus, "GPU": 1.0 if engine.splits_over_gpus else engine.num_gpus,
                     **engine.resources})
    return [first] + [{"GPU": 1.0}] * (engine.tensor_parallel_size - 1 if engine.splits_over_gpus else 0)


def engine_options(engine: EngineConfig, group=None) -> dict:
    """A replica's Ray options; ``group``: its placement group (an engine split over GPUs), where
    the actor holds no GPU itself and vLLM's workers, started from inside it, land in its bundles."""
    if group is None:
        return {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus, "resources": dict(engine.resources)}
    return {"num_cpus": engine.num_cpus, "num_gpus": 0, "resources": dict(engine.resources),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def learner_bundle(learner: LearnerConfig) -> dict[str, float]:
    """One rank's resources: a bundle of the learner's placement group."""
    return nonzero({"CPU": learner.num_cpus, "GPU": learner.num_gpus, **learner.resources})


def attribution_options(sft: SftConfig) -> dict:
    return {"num_cpus": sft.num_cpus, "num_gpus": sft.num_gpus, "resources": dict(sft.resources)}


def attribution_bundle(sft: SftConfig) -> dict[str, float]:
    """One attribution worker's resources, counted like a bundle."""
    return nonzero({"CPU": sft.num_cpus, "GPU": sft.num_gpus, **sft.resources})


def nonzero(resources: dict[str, float]) -> dict[str, float]:
    return {name: float(amount) for name, amount in resources.items() if amount > 0}


def needed_resources(cfg: RunConfig) -> dict[str, float]:
    """Ray resources of every actor the run holds at once, custom ones included: engine replicas
    and learner ranks (the sft recipe has no teacher engine; its attribution workers end before
    the rest starts)."""
    bundles = [*engine_bundles(cfg.services.student) * cfg.services.student.replicas,
               *[learner_bundle(cfg.learner)] * cfg.learner.world_size]
    if cfg.method == "distill":
        bundles += engine_bundles(cfg.services.teacher) * cfg.services.teacher.replicas
    needed = {"CPU": 0.0, "GPU": 0.0}
    for bundle in bundles:
        for name, amount in bundle.items():
            needed[name] = needed.get(name, 0.0) + amount
    if cfg.method == "sft":  # one attribution worker is enough to make progress
        worker = attribution_bundle(cfg.sft)
        needed = {name: max(needed.get(name, 0.0), worker.get(name, 0.0)) for name in {*needed, *worker}}
    return needed


class ClusterError(RuntimeError):
    """The cluster cannot hold the run's actors; the message names what is missing."""


def check_cluster_fits(cfg: RunConfig) -> None:
    """Fail before starting anything if the cluster cannot hold every actor: Ray would leave the
    last actor pending forever, and the run would hang without a word."""
    lacking = missing_resources(needed_resources(cfg), ray.cluster_resources())
    if lacking is None:
        return
    message = (f"the run needs {lacking}: start Ray with more logical CPUs/GPUs (ray start --num-cpus N), "
               "nodes with the custom resources the roles name (ray start --resources '{\"name\": N}'), "
               "or lower services.*.replicas, services.*.num_cpus, learner.world_size or learner.num_cpus")
    if not cfg.ray.wait_for_resources:
        raise ClusterError(message)
    print(f"warning: {message}; waiting for the autoscaler (ray.wait_for_resources=true)")


def local_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for a local Ray: every actor the run starts must fit, or it waits forever."""
    if cfg.ray.num_cpus is not None:
        return cfg.ray.num_cpus
    return max(os.cpu_count() or 1, int(np.ceil(needed_resources(cfg)["CPU"])))


# -- starting the actors ---------------------------------------------------------------------------


def start_service(name: str, model: str, engine: EngineConfig, eos_token_id: int, seed: int = 0,
                  weights_dir: str | None = None, wait: bool = True, wait_s: float = 600.0,
                  actor_class: type = ModelService) -> ServicePool:
    """``engine.replicas`` ModelService actors for ``model`` behind one pool, serving once returned.

    ``wait=False`` returns at once, the engines loading in the background: the caller starts
    other things meanwhile (a run starts teacher, student and learner together) and calls
    ``pool.wait_ready()`` before the first request. Ray restarts a dead replica
    (``engine.max_restarts``), on another node if its own was lost, waiting up to ``wait_s``
    (ray.node_wait_s) for room; with ``weights_dir`` each replica keeps its latest loaded weights
    there and comes back with them, and one back where that directory is not (no shared storage)
    gets them from the pool's copy in the object store. ``actor_class``: what serves the calls
    (benchmarks compare services.async_model_service.AsyncModelService).
    """
    actor_cls = ray.remote(actor_class)
    # An engine split over GPUs gets a placement group per replica, its GPUs on one node.
    groups = [reserve(engine_bundles(engine), "STRICT_PACK", f"{name} replica {i}", wait_s)
              if engine.splits_over_gpus else None for i in range(engine.replicas)]
    actors = [
        actor_cls.options(
            **engine_options(engine, groups[i]),
            max_restarts=engine.max_restarts,
            max_concurrency=engine.concurrent_calls,  # calls share the running batch (services/model_service.py)
            max_task_retries=0,  # the pool retries, so it can move a call to another replica and count it
            # vLLM's INFO and WARNING lines (per engine step, per weight load) drown the progress line.
            runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}},
        ).remote(model, engine, eos_token_id, seed + i, f"{name}-{i}",
                 None if weights_dir is None else os.path.join(weights_dir, f"{name}-{i}"))
        for i in range(engine.replicas)
    ]
    pool = ServicePool(actors, name, engine.request_timeout_s, engine.request_retries,
                       ready=[a.info.remote() for a in actors],  # each answers once its engine has started
                       placement_groups=[g for g in groups if g is not None], node_wait_s=wait_s,
                       needs=engine_bundles(engine)[0])
    return pool.wait_ready() if wait else pool


def start_learner(model_path: str, learner: LearnerConfig, loss: LossConfig,
                  total_steps: int | None = None, wait_s: float = 600.0) -> LearnerGroup:
    """``learner.world_size`` LearnerRank actors with their DeepSpeed engines built (blocks until
    ready), one placement group for all (``learner.placement_strategy``), a bundle per rank."""
    group = reserve([learner_bundle(learner)] * learner.world_size, learner.placement_strategy, "the learner ranks",
                    wait_s)
    rank_cls = ray.remote(LearnerRank)
    ranks = [rank_cls.options(num_cpus=learner.num_cpus, num_gpus=learner.num_gpus, resources=dict(learner.resources),
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank))
             .remote(rank, learner, total_steps) for rank in range(learner.world_size)]
    return LearnerGroup(ranks, model_path, loss, placement_group=group)


def reserve(bundles: list[dict[str, float]], strategy: str, what: str, wait_s: float):
    """A placement group of ``bundles``, once the cluster has placed it; after ``wait_s`` without
    room, a ClusterError naming what was asked (Ray would otherwise keep the actors pending forever)."""
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ClusterError(
            f"{what}: no room for {len(bundles)} bundle(s) {bundles} ({strategy}) after {wait_s:g} s "
            f"(ray.node_wait_s); the cluster has {ray.cluster_resources()}: start nodes with these resources "
            "(ray start --resources for custom ones) or change the role's resources or placement_strategy") from None
    return group


def start_attribution_workers(cfg: RunConfig, count: int) -> list:
    """``count`` teacher copies that turn rows into rationales (orchestrator.rationale.worker)."""
    s = cfg.sft
    worker_cls = ray.remote(AttributionWorker).options(**attribution_options(s), max_restarts=s.max_restarts)
    threads = max(1, int(s.num_cpus)) if s.num_gpus == 0 else None
    settings = AttributionSettings.of(s, cfg.data.use_chat_template)
    return [worker_cls.remote(cfg.models.teacher, settings, s.batch_size, threads) for _ in range(count)]


def check_run_dir_shared(run_dir: str | Path, actors: dict[str, object]) -> None:
    """Fail at start unless every actor in ``actors`` (label -> actor) sees ``run_dir``: learner
    ranks write checkpoints there and student replicas their kept weights, each on its own node,
    so on a cluster the run directory must be on storage every node mounts."""
    marker = Path(run_dir) / f".visible-{uuid.uuid4().hex}"
    marker.write_text("written by the driver; every actor that writes to the run directory must see it\n")
    try:
        seen = ray.get([actor.__ray_call__.remote(_sees, str(marker)) for actor in actors.values()])
    finally:
        marker.unlink()
    blind = [label for label, ok in zip(actors, seen) if not ok]
    if blind:
        raise ClusterError(f"output_dir {run_dir} is not visible from {', '.join(blind)} (another node, another "
                           "file system): on a cluster put output_dir on storage every node mounts at the same "
                           "path (README 'On a cluster')")


def _sees(_actor, path: str) -> bool:
    return os.path.exists(path)


def stop_actors(actors: list) -> None:
    """End actors for good (no restart)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
