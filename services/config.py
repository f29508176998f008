"""Settings of one vLLM engine (teacher or student), passed through to ``vllm.LLM``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EngineConfig:
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_model_len: int = 512
    # Raised to the rollout's top_k (and divergence_k) at start when lower (vLLM refuses k above
    # it); -1: the whole vocabulary (rollout.divergence=exact sets it).
    max_logprobs: int = 20
    enable_prefix_caching: bool = True
    # KV-cache block size in tokens. The prefix cache reuses whole blocks only, and every draft and
    # verify call sends its row's whole prefix again: with 128-token blocks a 150-token prefix is
    # computed 22 tokens short of the start. null: vLLM's default (usually 16 on GPUs, 128 on its CPU build).
    block_size: int | None = None
    # A verify sends its row's whole prefix again. false (vLLM's own default for prompt logprobs):
    # prefill it all. true: read the part an earlier call computed from the prefix cache. Off by
    # default: with 128-token blocks it measured no faster (README "Rollout strategies").
    score_reads_prefix_cache: bool = False
    tensor_parallel_size: int = 1
    # On CPU builds this is the share of the NUMA node's memory vLLM may reserve: keep it low
    # there (two engines and a learner share one machine).
    gpu_memory_utilization: float = 0.9
    # CPU builds of vLLM size their KV cache in GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gb: int = 1
    # rollout.sessions: the context, in tokens, that one replica's kept sessions may hold KV for
    # (the oldest end first past it). vLLM cannot preempt a waiting session, so this leaves the
    # rest of the cache to the requests in flight. null: half the KV cache.
    session_kv_tokens: int | None = None
    # Skip torch.compile / CUDA graphs: starts in ~20 s instead of ~45 s on CPU; leave off on GPUs.
    enforce_eager: bool = False
    # vLLM's own engine metrics (queue, KV cache, throughput) on Ray's Prometheus endpoint.
    export_engine_metrics: bool = True
    replicas: int = 1
    # Calls one replica serves at once (Ray's max_concurrency): their requests share the engine's
    # running batch, so a short verify returns beside a long draft instead of after it. 1: one
    # call at a time, each waiting for the one before (how services ran before; bench/rollout.py
    # compares the two).
    concurrent_calls: int = 16
    # Ray resources per replica: GPU clusters set num_gpus = tensor_parallel_size.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Custom Ray resources each replica needs besides CPUs/GPUs, e.g. {teacher_node: 1}: the
    # replicas then run only on nodes started with that resource (`ray start --resources`), which
    # is how a role is tied to a node group (README "On a cluster").
    resources: dict[str, float] = field(default_factory=dict)
    # Faults. A call part unanswered after request_timeout_s (null: wait forever) counts as hung:
    # its replica is killed (Ray restarts it) and the part is sent again, at most request_retries
    # times. A part whose replica died (a crash, a lost node) is sent again to a replica that is up,
    # or waits up to ray.node_wait_s for Ray to bring one back; Ray restarts a dead replica up to
    # max_restarts times (a lost node counts as one).
    request_timeout_s: float | None = 300.0
    request_retries: int = 1
    max_restarts: int = 3
    # Anything else vllm.LLM takes, verbatim (e.g. {enforce_eager: true}).
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_logprobs", "tensor_parallel_size", "replicas", "cpu_kv_cache_gb",
                     "concurrent_calls"):
            if getattr(self, name) < 1 and not (name == "max_logprobs" and self.max_logprobs == -1):
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.session_kv_tokens is not None and self.session_kv_tokens < 1:
            raise ValueError(f"session_kv_tokens: must be >= 1 or null, got {self.session_kv_tokens}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1 or null, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s: must be > 0 or null, got {self.request_timeout_s}")
        if self.request_retries < 0 or self.max_restarts < 0:
            raise ValueError("request_retries / max_restarts: must be >= 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus / num_gpus: must be >= 0")
        if self.splits_over_gpus and self.num_gpus != self.tensor_parallel_size:
            raise ValueError(f"num_gpus: an engine split over GPUs (tensor_parallel_size "
                             f"{self.tensor_parallel_size}) takes one GPU per worker, got num_gpus {self.num_gpus}")

    @property
    def splits_over_gpus(self) -> bool:
        """The model is split over several GPUs: vLLM runs one Ray worker per GPU."""
        return self.tensor_parallel_size > 1 and self.num_gpus > 0
