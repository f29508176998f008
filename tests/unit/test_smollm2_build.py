"""The SmolLM2 build's stages: a stage that fails leaves nothing that looks finished, and a
finished one is skipped."""
from __future__ import annotations

import pytest

from orchestrator.config import load_config
from build.smollm2 import stage


def test_failed_stage_leaves_no_target_and_a_rerun_finishes(tmp_path):
    target = tmp_path / "teacher"

    def crash(work):
        (work / "half-written.safetensors").write_text("x")
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError, match="mid-stage"):
        stage(target, crash)
    assert not target.exists()

    calls = []
    assert stage(target, lambda work: calls.append((work / "config.json").write_text("{}")))
    assert (target / "config.json").exists() and not (target / "half-written.safetensors").exists()
    assert not stage(target, lambda work: calls.append("again"))  # done: skipped
    assert len(calls) == 1


def test_smollm2_config_loads_with_its_build():
    cfg = load_config("deploy/configs/smollm2.yaml")
    assert cfg.models.build_embedded == "smollm2" and cfg.policy.name == "adaswitch"
    assert cfg.models.teacher.endswith("artifacts/smollm2/teacher") and cfg.data.use_chat_template
    teacher_sft = load_config("deploy/configs/smollm2-teacher-sft.yaml")
    assert teacher_sft.method == "sft" and teacher_sft.sft.format == "answer_only"
    assert teacher_sft.loss.kind == "cross_entropy"
