"""The one place that connects to Ray and starts every actor: engine replicas, learner ranks,
attribution workers. Each actor's Ray options come from one function of its config
(``engine_options``, ``learner_options``, ``attribution_options``), used both to create it and
to count what a run needs from the cluster, so the two never disagree.

Actors are not Ray-named: a name is global to the cluster, so two runs, or a rerun after a
crash, would collide. Their repr labels them in Ray's dashboard and in error messages instead.
"""
from __future__ import annotations

import os

import numpy as np
import ray

from orchestrator.config import RunConfig, SftConfig
from orchestrator.rationale.worker import AttributionSettings, AttributionWorker
from services.config import EngineConfig
from services.model_service import ModelService
from services.pool import ServicePool
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


def engine_options(engine: EngineConfig) -> dict:
    return {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus}


def learner_options(learner: LearnerConfig) -> dict:
    return {"num_cpus": learner.num_cpus, "num_gpus": learner.num_gpus}


def attribution_options(sft: SftConfig) -> dict:
    return {"num_cpus": sft.num_cpus, "num_gpus": sft.num_gpus}


def needed_resources(cfg: RunConfig) -> dict[str, float]:
    """Ray resources of every actor the run holds at once: engine replicas and learner ranks (the
    sft recipe has no teacher engine; its attribution workers end before the rest starts)."""
    groups = [(engine_options(cfg.services.student), cfg.services.student.replicas),
              (learner_options(cfg.learner), cfg.learner.world_size)]
    if cfg.method == "distill":
        groups.append((engine_options(cfg.services.teacher), cfg.services.teacher.replicas))
    needed = {name: sum(options[key] * count for options, count in groups)
              for name, key in (("CPU", "num_cpus"), ("GPU", "num_gpus"))}
    if cfg.method == "sft":  # one attribution worker is enough to make progress
        worker = attribution_options(cfg.sft)
        needed = {"CPU": max(needed["CPU"], worker["num_cpus"]), "GPU": max(needed["GPU"], worker["num_gpus"])}
    return needed


class ClusterError(RuntimeError):
    """The cluster cannot hold the run's actors; the message names what is missing."""


def missing_resources(needed: dict[str, float], available: dict[str, float]) -> str | None:
    """What the cluster lacks for ``needed``, in words; None when everything fits."""
    short = [f"{needed[name]:g} {name} (the cluster has {available.get(name, 0):g})"
             for name in needed if needed[name] > available.get(name, 0) + 1e-9]
    return ", ".join(short) or None


def check_cluster_fits(cfg: RunConfig) -> None:
    """Fail before starting anything if the cluster cannot hold every actor: Ray would leave the
    last actor pending forever, and the run would hang without a word."""
    lacking = missing_resources(needed_resources(cfg), ray.cluster_resources())
    if lacking is None:
        return
    message = (f"the run needs {lacking}: start Ray with more logical CPUs/GPUs (ray start --num-cpus N) "
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
                  weights_dir: str | None = None, wait: bool = True) -> ServicePool:
    """``engine.replicas`` ModelService actors for ``model`` behind one pool, serving once returned.

    ``wait=False`` returns at once, the engines loading in the background: the caller starts
    other things meanwhile (a run starts teacher, student and learner together) and calls
    ``pool.wait_ready()`` before the first request. Ray restarts a dead replica
    (``engine.max_restarts``); with ``weights_dir`` each replica keeps its latest loaded weights
    there and comes back with them.
    """
    actor_cls = ray.remote(ModelService)
    actors = [
        actor_cls.options(
            **engine_options(engine),
            max_restarts=engine.max_restarts,
            max_task_retries=0,  # the pool retries, so it can move a call to another replica and count it
            # vLLM's INFO and WARNING lines (per engine step, per weight load) drown the progress line.
            runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}},
        ).remote(model, engine, eos_token_id, seed + i, f"{name}-{i}",
                 None if weights_dir is None else os.path.join(weights_dir, f"{name}-{i}"))
        for i in range(engine.replicas)
    ]
    pool = ServicePool(actors, name, engine.request_timeout_s, engine.request_retries,
                       ready=[a.info.remote() for a in actors])  # each answers once its engine has started
    return pool.wait_ready() if wait else pool


def start_learner(model_path: str, learner: LearnerConfig, loss: LossConfig,
                  total_steps: int | None = None) -> LearnerGroup:
    """``learner.world_size`` LearnerRank actors with their DeepSpeed engines built (blocks until ready)."""
    rank_cls = ray.remote(LearnerRank).options(**learner_options(learner))
    ranks = [rank_cls.remote(rank, learner, total_steps) for rank in range(learner.world_size)]
    return LearnerGroup(ranks, model_path, loss)


def start_attribution_workers(cfg: RunConfig, count: int) -> list:
    """``count`` teacher copies that turn rows into rationales (orchestrator.rationale.worker)."""
    s = cfg.sft
    worker_cls = ray.remote(AttributionWorker).options(**attribution_options(s), max_restarts=s.max_restarts)
    threads = max(1, int(s.num_cpus)) if s.num_gpus == 0 else None
    settings = AttributionSettings.of(s, cfg.data.use_chat_template)
    return [worker_cls.remote(cfg.models.teacher, settings, s.batch_size, threads) for _ in range(count)]


def stop_actors(actors: list) -> None:
    """End actors for good (no restart)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
