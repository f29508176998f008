"""One typed config describes a whole run; YAML in, dotted overrides on top, checked at load.

    cfg = load_config("deploy/configs/embedded.yaml", ["policy.name=adaswitch", "learner.lr=3e-5"])

Errors name the file, the dotted field and what is allowed, e.g.
``deploy/configs/embedded.yaml: policy.name: 'swich' is not one of on_policy, teacher, ...``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from services.config import EngineConfig
from trainer.config import LearnerConfig, LossConfig

PolicyName = Literal["on_policy", "teacher", "ground_truth", "mixed", "skd", "switch", "adaswitch"]


class ConfigError(ValueError):
    """A config file or override that cannot describe a run; the message names the field."""


@dataclass
class ModelsConfig:
    # Any Hugging Face causal LM directory (or hub name on a cluster that reaches the hub).
    teacher: str = "artifacts/embedded/full/teacher"
    student: str = "artifacts/embedded/full/student"
    # Build the models and data above first, cached: "full" or "fast" (the embedded default: tiny
    # models the project trains, in <embedded_dir>/<variant>), "smollm2" (SmolLM2-135M-Instruct
    # tuned as teacher + a layer-pruned student, in <embedded_dir>: python -m build.smollm2),
    # or null when they come from elsewhere.
    build_embedded: Literal["full", "fast", "smollm2"] | None = "full"
    embedded_dir: str = "artifacts/embedded"


@dataclass
class DataConfig:
    # `datasets.load_dataset(path, data_files=...)`: "json"/"parquet" with local files below,
    # or a hub dataset name (then data_files stays empty and the splits are the hub's).
    path: str = "json"
    name: str | None = None  # the dataset's configuration, e.g. "main" for openai/gsm8k
    data_files: dict[str, str] = field(
        default_factory=lambda: {
            "train": "artifacts/embedded/full/data/train.jsonl",
            "validation": "artifacts/embedded/full/data/validation.jsonl",
            "test": "artifacts/embedded/full/data/test.jsonl",
        }
    )
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    prompt_field: str = "prompt"
    response_field: str = "response"
    answer_field: str = "answer"
    # Prompts are wrapped in the tokenizer's chat template when it has one.
    use_chat_template: bool = True
    max_prompt_tokens: int = 256
    # A prompt longer than max_prompt_tokens is skipped (and counted) or cut from the left.
    long_prompt: Literal["skip", "truncate"] = "skip"

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")


@dataclass
class MixedPolicy:
    student_prob: float = 0.5  # GKD's λ: a sequence is the student's with this probability


@dataclass
class SkdPolicy:
    top_k: int = 25  # the student's token stands if it is in the teacher's top-K


@dataclass
class SwitchPolicy:
    # Teacher iff JSD(p_t, q_t) > tau0·exp(−decay·t). JSD here is a top-k estimate in nats
    # (at most ln 2 ≈ 0.693); README says how these defaults were picked.
    tau0: float = 0.2
    decay: float = 0.005


@dataclass
class AdaSwitchPolicy:
    # Teacher from the first t with KL_t > factor · mean(KL over the previous `window` steps).
    window: int = 8
    factor: float = 3.0


@dataclass
class PolicyConfig:
    name: PolicyName = "switch"
    mixed: MixedPolicy = field(default_factory=MixedPolicy)
    skd: SkdPolicy = field(default_factory=SkdPolicy)
    switch: SwitchPolicy = field(default_factory=SwitchPolicy)
    adaswitch: AdaSwitchPolicy = field(default_factory=AdaSwitchPolicy)

    def __post_init__(self) -> None:
        if not 0 <= self.mixed.student_prob <= 1:
            raise ValueError(f"mixed.student_prob: must be in [0, 1], got {self.mixed.student_prob}")
        if self.skd.top_k < 1:
            raise ValueError(f"skd.top_k: must be >= 1, got {self.skd.top_k}")
        if self.switch.tau0 < 0 or self.switch.decay < 0:
            raise ValueError("switch.tau0 / switch.decay: must be >= 0")
        if self.adaswitch.window < 1 or self.adaswitch.factor <= 0:
            raise ValueError("adaswitch.window: must be >= 1; adaswitch.factor: must be > 0")


@dataclass
class RolloutConfig:
    # "auto": the faster one for the policy, as measured (README "Rows keep their place in the
    # engines"): lockstep for SWITCH, which hands the pen over about once per token; draft-verify
    # for the others. Resolved when the run's config loads (pick_strategy).
    strategy: Literal["lockstep", "draft_verify", "auto"] = "draft_verify"
    top_k: int = 20  # entries of each model's top-k exchanged per position
    prompts_per_step: int = 32
    max_new_tokens: int = 256
    max_draft_tokens: int | None = None  # cap on one draft; None: the rest of the budget
    # Where the verifier can cut a draft (skd, switch, adaswitch), draft-verify drafts adaptively,
    # as speculative decoding does: a row's first draft has this many tokens, each later one
    # twice the run the verifier kept last time (at least 4), up to the cap; a long draft cut
    # after two tokens is wasted decoding. None: always draft to the cap.
    first_draft_tokens: int | None = 16
    # Draft-verify: rows whose hand-over is settled wait to draft again together until this share
    # of the live rows is waiting (or nothing else is in flight), so calls stay batched. 0: each
    # call's rows draft again as soon as it returns (rows stream; cheap where calls share the
    # engines' running batch). The tokens are the same either way.
    regroup_fraction: float = 0.5
    # Each row keeps its request alive in both engines between calls (vLLM resumable requests), so
    # a call sends only the tokens its prefix adds instead of prefilling it again from the last
    # whole cached KV block: what lockstep's one-token steps need. Ended when the rollout ends.
    sessions: bool = False
    student_temperature: float = 1.0  # 0 = greedy
    teacher_temperature: float = 1.0
    # What SWITCH and AdaSwitch decide on. "topk": divergences estimated from both models' top
    # `divergence_k` lists (their union plus one shared tail bucket, orchestrator/divergence.py);
    # the learner still gets the teacher's top `top_k`. "exact": both services return the whole
    # vocabulary at every position, so the rule is the papers' own; costly on a large vocabulary.
    # README ("Deciding on a real vocabulary") gives each one's fidelity and cost on SmolLM2.
    divergence: Literal["topk", "exact"] = "topk"
    divergence_k: int | None = None  # None: top_k

    def __post_init__(self) -> None:
        for name in ("top_k", "prompts_per_step", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_draft_tokens is not None and self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens: must be >= 1 or null, got {self.max_draft_tokens}")
        if self.first_draft_tokens is not None and self.first_draft_tokens < 1:
            raise ValueError(f"first_draft_tokens: must be >= 1 or null, got {self.first_draft_tokens}")
        if not 0 <= self.regroup_fraction <= 1:
            raise ValueError(f"regroup_fraction: must be in [0, 1], got {self.regroup_fraction}")
        if self.divergence_k is not None and self.divergence_k < 1:
            raise ValueError(f"divergence_k: must be >= 1 or null, got {self.divergence_k}")
        if self.student_temperature < 0 or self.teacher_temperature < 0:
            raise ValueError("student_temperature / teacher_temperature: must be >= 0")


@dataclass
class ServicesConfig:
    teacher: EngineConfig = field(default_factory=EngineConfig)
    student: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class ScheduleConfig:
    steps: int = 20
    eval_every: int = 10
    checkpoint_every: int = 10
    push_every: int = 1  # push learner weights to the student service every N steps
    eval_examples: int = 64
    # Stop once the learner has seen this many response tokens (null: no limit): methods whose
    # responses differ in length get the same training budget.
    max_train_tokens: int | None = None
    # 0: rollout -> train -> push, one after the other. 1: the rollout of step n+1 runs while
    # step n trains (its weights are one step behind); the push waits for that rollout to end,
    # so a rollout never mixes two weight versions. A batch whose policy_lag exceeds
    # max_policy_lag + push_every - 1 (what the synchronous loop already has between pushes) is
    # rolled out again, never trained on.
    max_policy_lag: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "checkpoint_every", "push_every", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_policy_lag not in (0, 1):
            raise ValueError(f"max_policy_lag: 0 (synchronous) or 1 (the next rollout runs while a step trains), "
                             f"got {self.max_policy_lag}; a deeper pipeline is not built")

    @property
    def lag_bound(self) -> int:
        """The most policy_lag a trained batch may have."""
        return self.max_policy_lag + self.push_every - 1


@dataclass
class SftConfig:
    """method: sft, training on fixed text: the dataset's references (plain SFT) or references
    with teacher-attribution rationales (the attribution stage's settings below). See README
    "Rationales" for why each default."""

    # answer_only: plain SFT on the references (no teacher at all); multitask: answer row +
    # rationale row per example; single_sequence: "Important words: ...\n<answer>";
    # input_augmentation: the rationale in the prompt, at training and evaluation (an upper
    # bound: needs the teacher at inference).
    format: Literal["answer_only", "multitask", "single_sequence", "input_augmentation"] = "answer_only"
    target: Literal["teacher_greedy", "reference"] = "teacher_greedy"  # the output attributed
    score: Literal["grad_l1", "grad_l2", "grad_x_input"] = "grad_l1"
    word_merge: Literal["max", "sum"] = "max"  # a word's score from its sub-word pieces
    top_words: int = 10  # K, chosen on the validation split (README "Rationales")
    extra_stopwords: list[str] = field(default_factory=list)
    train_rows: int | None = 2048  # the first N train rows are attributed and trained on; null: all
    max_new_tokens: int = 256  # of the teacher's greedy answer
    # Where the rationales are cached; null: next to the split's data file (rationales/<teacher>-<hash>/).
    cache_dir: str | None = None
    shard_rows: int = 256  # rows per shard: the unit that is cached and retried
    workers: int = 1  # teacher copies (Ray actors)
    batch_size: int = 16  # rows per forward/backward in a worker
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker
    max_restarts: int = 3  # of a crashed worker; its shard is sent again

    def __post_init__(self) -> None:
        for name in ("top_words", "shard_rows", "workers", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.train_rows is not None and self.train_rows < 1:
            raise ValueError(f"train_rows: must be >= 1 or null, got {self.train_rows}")


@dataclass
class RayConfig:
    address: str | None = None  # None: the cluster a job was submitted to, else a local one
    # Loopback unless a person says otherwise: a Ray head on 0.0.0.0 is open to the network.
    host: str = "127.0.0.1"
    dashboard: bool = True  # Ray's dashboard (and its metrics endpoint) on `host`
    # Logical CPUs of a local Ray (not used when joining a cluster). None: enough for every
    # engine replica and learner rank the config asks for, and at least the machine's cores.
    num_cpus: int | None = None
    # Joining a cluster that cannot hold every actor fails at once, naming what is missing;
    # true waits instead (an autoscaling cluster adds nodes on demand).
    wait_for_resources: bool = False
    # How long a placement group (the learner ranks, an engine split over GPUs) may wait for nodes
    # with its resources before the run stops with an error naming them.
    node_wait_s: float = 600.0

    def __post_init__(self) -> None:
        if self.node_wait_s <= 0:
            raise ValueError(f"node_wait_s: must be > 0, got {self.node_wait_s}")


@dataclass
class RunConfig:
    # The recipe: distill (rollout with a policy -> train -> push) or sft (fixed text -> train).
    method: Literal["distill", "sft"] = "distill"
    output_dir: str = "runs/embedded"
    # Relative paths (output_dir, models.*, data.data_files) are read against this directory;
    # null: the current one. `ray job submit --working-dir .` runs the job in an unpacked copy of
    # the code, not in your checkout, so the README passes base_dir=$PWD (or use absolute paths).
    base_dir: str | None = None
    seed: int = 0
    resume: bool = True
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    def __post_init__(self) -> None:
        if self.rollout.strategy == "auto":
            self.rollout.strategy = pick_strategy(self.policy.name, self.loss.kind)
        for role, resources in (("services.teacher", self.services.teacher.resources),
                                ("services.student", self.services.student.resources),
                                ("learner", self.learner.resources), ("sft", self.sft.resources)):
            check_custom_resources(role, resources)
        if self.method == "sft" and self.schedule.max_policy_lag:
            raise ValueError("schedule.max_policy_lag: method sft trains on fixed text; it has no rollout to overlap")
        if self.method == "sft" and self.loss.kind != "cross_entropy":
            raise ValueError(f"loss.kind: method sft trains on fixed text and needs loss.kind=cross_entropy, "
                             f"got {self.loss.kind!r}")
        if self.loss.kind == "sampled_reverse_kl" and self.method == "distill":
            if self.policy.name in ("teacher", "ground_truth"):
                raise ValueError(f"loss.kind: sampled_reverse_kl trains on the student's own tokens; policy "
                                 f"{self.policy.name!r} writes none")
            if self.rollout.strategy == "lockstep":
                raise ValueError("loss.kind: sampled_reverse_kl needs the teacher's logprob of every student token; "
                                 "lockstep knows it only where the teacher's top-k lists the token: use "
                                 "rollout.strategy=draft_verify (its scoring pass gives each one exactly)")
        if self.policy.name == "skd" and self.policy.skd.top_k > self.rollout.top_k:
            raise ValueError(
                f"policy.skd.top_k: {self.policy.skd.top_k} exceeds rollout.top_k={self.rollout.top_k}; "
                "the teacher must list at least K ids"
            )
        context = min(self.services.teacher.max_model_len, self.services.student.max_model_len)
        if self.rollout.max_new_tokens > context - 2:
            raise ValueError(
                f"rollout.max_new_tokens: {self.rollout.max_new_tokens} does not fit services.*.max_model_len={context} "
                f"with a prompt and the scoring position (at most {context - 2})"
            )
        if self.data.max_prompt_tokens > context - 2:
            raise ValueError(
                f"data.max_prompt_tokens: {self.data.max_prompt_tokens} leaves no room for a response within "
                f"services.*.max_model_len={context} (at most {context - 2})"
            )
        if self.base_dir is not None:
            self._resolve_paths(Path(self.base_dir))
        # vLLM refuses a request for more logprobs than the engine was started with.
        for engine in (self.services.teacher, self.services.student):
            if self.rollout.divergence == "exact":
                engine.max_logprobs = -1  # vLLM: the whole vocabulary
            elif engine.max_logprobs != -1:
                engine.max_logprobs = max(engine.max_logprobs, self.rollout.top_k, self.rollout.divergence_k or 0)

    def _resolve_paths(self, base: Path) -> None:
        def local(path: str) -> str:
            return path if Path(path).is_absolute() else str(base / path)

        self.output_dir = local(self.output_dir)
        self.models.embedded_dir = local(self.models.embedded_dir)
        for role in ("teacher", "student"):
            path = getattr(self.models, role)
            # A hub name ("Qwen/Qwen2.5-7B") stays as it is; a directory here or to be built is local.
            if (base / path).exists() or self.models.build_embedded is not None:
                setattr(self.models, role, local(path))
        self.data.data_files = {split: local(path) for split, path in self.data.data_files.items()}
        if self.sft.cache_dir is not None:
            self.sft.cache_dir = local(self.sft.cache_dir)


def check_custom_resources(role: str, resources: dict) -> None:
    """A role's custom Ray resources: names other than Ray's own (those have their keys), amounts > 0."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{role}.resources: {name} has its own key ({role}.num_cpus / num_gpus); "
                             "name only custom resources here")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{role}.resources.{name}: must be a number > 0, got {amount!r}")


# What a checkpoint's run must share with the run that resumes it: the student's shape and
# optimizer state, the data order and the method. Anything else (steps, eval cadence, services)
# may change between a stop and a resume.
RESUME_KEYS = (
    "method", "models.teacher", "models.student", "policy.name", "loss.kind", "seed", "data.path", "data.name",
    "data.data_files", "rollout.prompts_per_step", "sft.format", "learner.world_size", "learner.zero_stage",
    "learner.optimizer", "learner.precision", "learner.micro_batch_size", "learner.gradient_accumulation_steps",
)


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """The RESUME_KEYS whose values differ between a checkpoint's config and this run's (pure logic)."""
    def get(cfg: dict, dotted: str):
        for key in dotted.split("."):
            cfg = cfg.get(key) if isinstance(cfg, dict) else None
        return cfg

    return [f"{key} was {get(saved, key)!r}, is now {get(current, key)!r}"
            for key in RESUME_KEYS if get(saved, key) != get(current, key)]


def pick_strategy(policy: str, loss_kind: str) -> str:
    """rollout.strategy=auto. SWITCH needs both models' lists before every token, so a draft is
    cut after about one token and draft-verify pays two round trips per token where lockstep pays
    one to each engine at once. With rollout.sessions on both sides lockstep measured 4.45-4.95 s
    against draft-verify's 10.5 s on the embedded pair, and 11.0 s against 46.5 s on SmolLM2. The
    other policies keep whole runs of a draft: draft-verify is 3-6x faster for them.
    sampled_reverse_kl needs draft-verify's scoring pass whatever the policy."""
    return "lockstep" if policy == "switch" and loss_kind != "sampled_reverse_kl" else "draft_verify"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path`` (YAML; None = all defaults), apply ``key.sub=value`` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected dotted.key=value")
        _set_dotted(data, key.strip().split("."), yaml.safe_load(raw), override)
    _refuse_old_keys(data, source)
    return from_dict(RunConfig, data, source)


def _refuse_old_keys(data: dict, source: str) -> None:
    """Keys of earlier versions, with the key that replaced them."""
    policy = data.get("policy")
    if isinstance(policy, dict) and policy.get("name") == "rationale":
        raise ConfigError(f"{source}: policy.name: 'rationale' is no longer a policy: set method: sft and "
                          "sft.format (multitask, single_sequence or input_augmentation; answer_only is plain SFT)")
    if "rationale" in data:
        raise ConfigError(f"{source}: the rationale section is now sft (with method: sft); "
                          "e.g. rationale.format -> sft.format, rationale.top_words -> sft.top_words")


def from_dict(cls: type, data: Any, source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and type against it."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(data).__name__} {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(
                f"{source}: unknown key {prefix}{key}{suggestion}; {where} takes {', '.join(sorted(known))}"
            )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, source, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix}{err}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _convert(tp: Any, value: Any, source: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{name}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) or value not in allowed:  # True == 1, so bools are refused first
            raise ConfigError(f"{source}: {name}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{source}: {name}: may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, source, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name}: expected a list, got {value!r}")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {name} has a type the loader does not handle: {tp!r}")


def _set_dotted(data: dict, keys: list[str], value: Any, override: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value
