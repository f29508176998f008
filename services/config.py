"""Settings of one vLLM engine (teacher or student), passed through to ``vllm.LLM``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EngineConfig:
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_model_len: int = 512
    # Raised to the rollout's top_k at start when lower (vLLM refuses k above it).
    max_logprobs: int = 20
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    # On CPU builds this is the share of the NUMA node's memory vLLM may reserve: keep it low
    # there (two engines and a learner share one machine).
    gpu_memory_utilization: float = 0.9
    # CPU builds of vLLM size their KV cache in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gb: int = 1
    # Skip torch.compile / CUDA graphs: starts in ~20 s instead of ~45 s on CPU; leave off on GPUs.
    enforce_eager: bool = False
    # vLLM's own engine metrics (queue, KV cache, throughput) on Ray's Prometheus endpoint.
    export_engine_metrics: bool = True
    replicas: int = 1
    # Ray resources per replica: GPU clusters set num_gpus = tensor_parallel_size.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Anything else vllm.LLM takes, verbatim (e.g. {enforce_eager: true}).
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_logprobs", "tensor_parallel_size", "replicas", "cpu_kv_cache_gb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus / num_gpus: must be >= 0")
