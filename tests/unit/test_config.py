"""Config loading: YAML, dotted overrides, and errors that name the field (pure logic)."""
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, RunConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_shipped_configs_load():
    assert isinstance(load_config(), RunConfig)
    for path in sorted((REPO / "deploy" / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig), path


def test_auto_strategy_is_lockstep_for_switch_only_and_resolves_after_overrides(tmp_path):
    shipped = REPO / "deploy/configs/embedded.yaml"
    assert load_config(shipped).rollout.strategy == "lockstep"  # its policy is SWITCH
    for policy in ("on_policy", "skd", "adaswitch", "teacher"):
        assert load_config(shipped, [f"policy.name={policy}", "policy.skd.top_k=20"]).rollout.strategy == "draft_verify"
    # The sampled loss needs draft-verify's scoring pass: auto picks it where lockstep is refused.
    assert load_config(shipped, ["loss.kind=sampled_reverse_kl"]).rollout.strategy == "draft_verify"
    with pytest.raises(ValueError, match="sampled_reverse_kl needs"):
        load_config(shipped, ["loss.kind=sampled_reverse_kl", "rollout.strategy=lockstep"])
    cfg = load_config(shipped)
    save_config(cfg, tmp_path / "c.yaml")  # a run saves what it ran
    assert load_config(tmp_path / "c.yaml").rollout.strategy == "lockstep"


def test_overrides_apply_with_types():
    cfg = load_config(REPO / "deploy/configs/embedded.yaml",
                      ["policy.name=adaswitch", "policy.adaswitch.window=12", "learner.lr=3e-5",
                       "rollout.max_draft_tokens=null", "services.teacher.replicas=2", "loss.kind=jsd"])
    assert cfg.policy.name == "adaswitch" and cfg.policy.adaswitch.window == 12
    assert cfg.learner.lr == pytest.approx(3e-5) and isinstance(cfg.learner.lr, float)
    assert cfg.rollout.max_draft_tokens is None
    assert cfg.services.teacher.replicas == 2
    assert cfg.loss.kind == "jsd"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["policy.name=skd", "rollout.top_k=32"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy.name=swich", "policy.name: 'swich' is not one of on_policy, teacher, ground_truth, mixed, skd"),
        ("policy.nmae=switch", "unknown key policy.nmae (did you mean policy.name?)"),
        ("learner.zero_stage=4", "learner.zero_stage: 4 is not one of 1, 2, 3"),
        ("learner.zero_stage=true", "learner.zero_stage: True is not one of 1, 2, 3"),
        ("learner.lr=fast", "learner.lr: expected a number, got 'fast'"),
        ("learner.lr=-1", "learner.lr: must be > 0"),
        ("rollout.top_k=2.5", "rollout.top_k: expected an integer, got 2.5"),
        ("rollout.top_k=0", "rollout.top_k: must be >= 1"),
        ("data.use_chat_template=yes please", "data.use_chat_template: expected true or false"),
        ("loss.alpha=1.5", "loss.alpha: must be in (0, 1)"),
        ("services.teacher.dtype=int4", "services.teacher.dtype: 'int4' is not one of float32"),
        ("services.student.block_size=0", "block_size: must be >= 1 or null, got 0"),
        ("policy=switch", "policy: expected a mapping"),
        ("nothing", "expected dotted.key=value"),
        ("schedule.max_policy_lag=2", "schedule.max_policy_lag: 0 (synchronous) or 1 (the next rollout runs while a step "
                                      "trains), got 2; a deeper pipeline is not built"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"policy.skd.top_k: 25 exceeds rollout.top_k=10"):
        load_config(None, ["policy.name=skd", "rollout.top_k=10"])
    cfg = load_config(None, ["rollout.top_k=50"])
    assert cfg.services.teacher.max_logprobs == 50 and cfg.services.student.max_logprobs == 50
    sampled = ["loss.kind=sampled_reverse_kl", "policy.name=on_policy"]
    with pytest.raises(ConfigError, match="sampled_reverse_kl needs the teacher's logprob of every student token"):
        load_config(None, [*sampled, "rollout.strategy=lockstep"])
    with pytest.raises(ConfigError, match="schedule.max_policy_lag: method sft trains on fixed text; it has no rollout"):
        load_config(None, ["method=sft", "loss.kind=cross_entropy", "schedule.max_policy_lag=1"])
    with pytest.raises(ConfigError, match="policy 'teacher' writes none"):
        load_config(None, [*sampled, "policy.name=teacher", "rollout.strategy=draft_verify"])
    with pytest.raises(ConfigError, match="loss.forward_kl_weight: only read by kind sampled_reverse_kl"):
        load_config(None, ["loss.forward_kl_weight=0.5"])
    cfg = load_config(None, [*sampled, "rollout.strategy=draft_verify", "loss.estimator=k1", "loss.forward_kl_weight=0.1"])
    assert (cfg.loss.estimator, cfg.loss.forward_kl_weight) == ("k1", 0.1)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  name: switch\n learner: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rollout:\n  topk: 5\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key rollout.topk \(did you mean rollout.top_k\?\)"):
        load_config(unknown)


def test_base_dir_makes_local_paths_absolute_and_leaves_hub_names(tmp_path):
    cfg = load_config(REPO / "deploy/configs/embedded.yaml", [f"base_dir={tmp_path}"])
    assert cfg.output_dir == str(tmp_path / "runs/embedded")
    assert cfg.models.teacher == str(tmp_path / "artifacts/embedded/full/teacher")  # to be built there
    assert cfg.data.data_files["train"] == str(tmp_path / "artifacts/embedded/full/data/train.jsonl")

    hub = load_config(None, [f"base_dir={tmp_path}", "models.build_embedded=null", "models.teacher=Org/Teacher-7B",
                             "output_dir=/abs/run"])
    assert hub.models.teacher == "Org/Teacher-7B" and hub.output_dir == "/abs/run"


def test_recipes_are_chosen_by_method_and_old_rationale_keys_name_the_new_ones(tmp_path):
    assert load_config().method == "distill"
    sft = load_config(None, ["method=sft", "loss.kind=cross_entropy"])
    assert sft.method == "sft" and sft.sft.format == "answer_only"  # plain SFT unless a rationale format is set
    with pytest.raises(ConfigError, match="loss.kind: method sft trains on fixed text and needs loss.kind=cross_entropy"):
        load_config(None, ["method=sft", "loss.kind=forward_kl"])
    old = tmp_path / "old.yaml"
    old.write_text("policy:\n  name: rationale\nrationale:\n  format: multitask\n")
    with pytest.raises(ConfigError, match=r"old.yaml: policy.name: 'rationale' is no longer a policy: set method: sft "
                                          r"and sft.format"):
        load_config(old)
    old.write_text("method: sft\nrationale:\n  format: multitask\n")
    with pytest.raises(ConfigError, match=r"the rationale section is now sft .*rationale.format -> sft.format"):
        load_config(old)
