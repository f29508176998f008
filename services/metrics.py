"""vLLM's engine metrics on Ray's Prometheus endpoint, when the engine lives in a Ray actor."""
from __future__ import annotations


def vllm_stat_loggers(enabled: bool):
    """[RayPrometheusStatLogger] inside an initialised Ray worker, else None (vLLM's default).

    vLLM ships a Prometheus stat logger that writes through ``ray.util.metrics``; Ray's metrics
    agent then serves it with the rest of the job's metrics (names start with ``vllm:``/``vllm_``).
    """
    if not enabled:
        return None
    try:
        import ray

        if not ray.is_initialized():
            return None
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except ImportError:
        return None
    return [RayPrometheusStatLogger]
