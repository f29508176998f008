"""Rollout benchmark: lockstep vs draft-verify vs the floor, measured side by side in one run.

    python bench/rollout.py [--config deploy/configs/embedded.yaml] [--prompts 32] [--new-tokens 256]
    python bench/rollout.py --config deploy/configs/smollm2.yaml --prompts 8 --new-tokens 128 \
        --policies adaswitch --switch-tau0 --learner      # the SmolLM2 figures of README

For each policy (on-policy, SKD, SWITCH, AdaSwitch) on the same prompts: wall time of lockstep, of draft-verify, of a
student-only rollout and of one teacher scoring pass over the student's tokens. Prints
draft-verify / lockstep, draft-verify / (student-only + teacher scoring) = "the floor", the
coordinator's own CPU time as a share of the rollout's wall time, and round trips per sequence.
"The floor" is on-policy distillation's; each policy's own floor ("policy floor") is every response
token of its draft-verify batch decoded once, at full batch, by the model that wrote it, plus one
scoring pass by the other model over the rows it did not write alone; SWITCH needs both models'
distributions at every position before it decides, so its floor is both models decoding the whole
response once (what lockstep would cost with no overhead).
With --rollout FIELD=VALUE[,FIELD=VALUE] ..., also draft-verify with those rollout.* fields
changed, one run per argument, and its ratio to the config's (e.g. regroup_fraction=0: each
call's rows draft again at once, rows stream; first_draft_tokens=null: every student draft runs
to the cap; sessions=true: rows keep their requests in the engines between calls;
strategy=lockstep,sessions=true: lockstep so). With --engines block_size=32 ..., also lockstep and draft-verify on one more engine
pair per argument, with those services.* fields changed (comma-separated), and its speed-up over
the config's engines (concurrent_calls=1: engines that serve one call at a time, as services ran
before calls shared the running batch). With --async, the same on a pair served by vLLM's AsyncLLM
in async actors (services/async_model_service.py). Each --rollout variant runs on every extra
engine pair too. vLLM's prefix cache reuses whole KV blocks only (128
tokens on its CPU build), and every draft and verify call sends its row's whole prefix again.
With --exact, SWITCH and AdaSwitch also run with rollout.divergence=exact (both engines return the
whole vocabulary and the rules decide on exact divergences) next to the config's mode, on the same
engines. With --learner, also a DeepSpeed learner on the student: train tokens/s on the
draft-verify batch and the weight push's time as a share of the whole step (rollout + train + push).
Figures only: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from functools import partial

import numpy as np


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deploy/configs/embedded.yaml")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--switch-tau0", type=float, nargs="*", default=[0.35, 0.5],
                        help="extra SWITCH runs at these thresholds: fewer hand-overs, to show what limits the ratio")
    parser.add_argument("--policies", nargs="+", default=["on_policy", "skd", "switch", "adaswitch"],
                        choices=["on_policy", "skd", "switch", "adaswitch"])
    parser.add_argument("--learner", action="store_true", help="also time a train step and a weight push")
    parser.add_argument("--exact", action="store_true",
                        help="also run SWITCH and AdaSwitch with rollout.divergence=exact (whole-vocabulary divergences)")
    parser.add_argument("--rollout", nargs="*", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="also draft-verify with these rollout.* fields changed, one run per argument "
                             "(e.g. regroup_fraction=0 or first_draft_tokens=null)")
    parser.add_argument("--engines", nargs="*", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="also lockstep and draft-verify on one more engine pair per argument, with these "
                             "services.* fields changed (e.g. block_size=32 or score_reads_prefix_cache=false)")
    parser.add_argument("--async", dest="async_engines", action="store_true",
                        help="also lockstep and draft-verify (and each --rollout variant) on one more engine pair served "
                             "by vLLM's AsyncLLM in async actors (services/async_model_service.py)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from build.ensure import ensure_models
    from orchestrator.config import load_config
    from orchestrator.data import load_split
    from orchestrator.launcher import connect_ray, start_service
    from orchestrator.models import check_pair
    from orchestrator.rollout import Rollout, run_rollout
    from services.async_model_service import AsyncModelService
    from services.model_service import raise_errors

    # With --exact the engines start able to return the whole vocabulary (max_logprobs -1).
    exact_engines = ["rollout.divergence=exact"] if args.exact else []
    cfg = load_config(args.config, [*args.overrides, f"rollout.max_new_tokens={args.new_tokens}", "ray.dashboard=false",
                                    *exact_engines])
    ensure_models(cfg)
    tokenizer = check_pair(cfg.models.teacher, cfg.models.student)
    examples = load_split(cfg.data, cfg.data.eval_split, tokenizer)
    prompts = [examples.prompt_ids[i % len(examples)] for i in range(args.prompts)]
    # Enough logical CPUs for both engines and, with --learner, a learner rank (Ray counts 2 cores as 2).
    connect_ray(cfg)
    eos = tokenizer.eos_token_id
    teacher = start_service("teacher", cfg.models.teacher, cfg.services.teacher, eos, cfg.seed)
    student = start_service("student", cfg.models.student, cfg.services.student, eos, cfg.seed)
    # One more engine pair per --engines variant. Ray's logical CPUs are sized for the config's
    # engines; these ask for none (every engine shares the same cores anyway), or they would wait
    # for room forever.
    variants = {}
    for n, variant in enumerate(args.engines):
        changes = [f"services.{role}.{change}" for role in ("teacher", "student") for change in variant.split(",")]
        engine_cfg = load_config(args.config, [*args.overrides, *changes, *exact_engines])
        variants[variant] = tuple(start_service(f"{role}-variant{n}", getattr(cfg.models, role),
                                                replace(getattr(engine_cfg.services, role), num_cpus=0), eos, cfg.seed)
                                  for role in ("teacher", "student"))
    if args.async_engines:
        variants["AsyncLLM in async actors"] = tuple(
            start_service(f"{role}-async", getattr(cfg.models, role), replace(getattr(cfg.services, role), num_cpus=0),
                          eos, cfg.seed, actor_class=AsyncModelService) for role in ("teacher", "student"))
    max_model_len = min(cfg.services.teacher.max_model_len, cfg.services.student.max_model_len)
    k, rows = cfg.rollout.top_k, np.arange(len(prompts))
    print(f"{len(prompts)} prompts x {args.new_tokens} new tokens, k={k}, "
          f"student T={cfg.rollout.student_temperature}, teacher T={cfg.rollout.teacher_temperature}")

    def best(fn, repeats=args.repeats):  # the quickest of ``repeats`` timed calls of fn
        return min((timed(fn) for _ in range(repeats)), key=lambda r: r[1])

    # The floor: the student writes everything, the teacher scores it once.
    def student_only():
        out = student.generate(prompts, args.new_tokens, k, cfg.rollout.student_temperature,
                               seeds=rows.tolist()).result()
        raise_errors(out)
        return out

    student_out, student_s, _ = best(student_only)
    sequences = [p + student_out.tokens[i, : student_out.lengths[i]].tolist() for i, p in enumerate(prompts)]
    starts = [len(p) for p in prompts]
    _, score_s, _ = best(lambda: teacher.score(sequences, starts, k).result())
    floor = student_s + score_s
    tokens = int(student_out.lengths.sum())
    scored = sum(len(s) for s in sequences)
    print(f"floor: student-only {student_s:.2f}s ({tokens / student_s:.0f} generated tok/s with top-{k}) + teacher "
          f"scoring {score_s:.2f}s ({tokens / score_s:.0f} response tok/s, {scored / score_s:.0f} tok/s with the "
          f"prompts) = {floor:.2f}s")

    # SKD's top-K must be within the exchanged k.
    runs = [(policy, [f"policy.skd.top_k={min(cfg.policy.skd.top_k, k)}"] if policy == "skd" else [])
            for policy in args.policies]
    runs += [("switch", [f"policy.switch.tau0={tau0}"]) for tau0 in args.switch_tau0 if "switch" in args.policies]
    if args.exact:
        runs += [(policy, ["rollout.divergence=exact"]) for policy in ("switch", "adaswitch") if policy in args.policies]

    def fastest(ro, repeats=args.repeats):  # the quickest rollout of the same prompts
        return best(partial(run_rollout, ro, prompts, None, rows, cfg.seed, 0), repeats)

    last_batch = None
    for policy, extra in runs:
        results = {}
        # The lockstep and draft-verify columns run without sessions (configs may turn them on);
        # --rollout sessions=true adds them, and an override given here wins.
        run_overrides = ["rollout.sessions=false", *args.overrides, f"policy.name={policy}", *extra,
                         f"rollout.max_new_tokens={args.new_tokens}"]
        for strategy in ("lockstep", "draft_verify"):
            cfg_run = load_config(args.config, [*run_overrides, f"rollout.strategy={strategy}"])
            ro = Rollout(cfg_run.policy, cfg_run.rollout, teacher, student, eos, max_model_len, teacher.vocab_size)
            repeats = 1 if strategy == "lockstep" else args.repeats  # lockstep is the slow reference
            results[strategy] = fastest(ro, repeats)
        rollout_variants = {variant: load_config(args.config, [*run_overrides, "rollout.strategy=draft_verify",
                                                               *(f"rollout.{change}" for change in variant.split(","))])
                            for variant in args.rollout}
        for variant, cfg_variant in rollout_variants.items():
            ro = Rollout(cfg_variant.policy, cfg_variant.rollout, teacher, student, eos, max_model_len,
                         teacher.vocab_size)
            results[f"rollout {variant}"] = fastest(ro)
        for variant, pair in variants.items():
            for strategy in ("lockstep", "draft_verify"):
                ro = Rollout(cfg_run.policy, replace(cfg_run.rollout, strategy=strategy), *pair, eos, max_model_len,
                             teacher.vocab_size)
                results[f"{variant} {strategy}"] = fastest(ro, 1 if strategy == "lockstep" else args.repeats)
            for rollout_variant, cfg_variant in rollout_variants.items():
                ro = Rollout(cfg_variant.policy, cfg_variant.rollout, *pair, eos, max_model_len, teacher.vocab_size)
                results[f"{variant} rollout {rollout_variant}"] = fastest(ro)
        dv_batch, dv_s, dv_cpu = results["draft_verify"]
        _, lock_s, lock_cpu = results["lockstep"]
        s = dv_batch.stats
        calls = s["teacher_calls"] + s["student_calls"]
        print(f"\n{policy} {' '.join(extra) or '(defaults)'}: teacher-token fraction {s['teacher_fraction'].mean():.3f}, "
              f"switched {s['switched'].mean():.2f}, response length {s['response_length'].mean():.0f}, "
              f"tokens per round trip {s['response_length'].sum() / calls.sum():.1f}")
        print(f"  lockstep      {lock_s:8.2f}s   coordinator CPU {lock_cpu / lock_s:6.1%}")
        print(f"  draft-verify  {dv_s:8.2f}s   coordinator CPU {dv_cpu / dv_s:6.1%}   "
              f"round trips/seq {calls.mean():.2f} (teacher {s['teacher_calls'].mean():.2f}, student {s['student_calls'].mean():.2f})")
        print(f"  draft-verify / lockstep = {dv_s / lock_s:.3f}  (speed-up {lock_s / dv_s:.1f}x)")
        print(f"  draft-verify / floor    = {dv_s / floor:.3f}")
        own_floor = policy_floor(policy, dv_batch, prompts, teacher, student, k, best)
        print(f"  policy floor {own_floor:.2f}s: draft-verify / policy floor = {dv_s / own_floor:.3f}")
        for variant in args.rollout:
            batch, seconds, _ = results[f"rollout {variant}"]
            calls_v = batch.stats["teacher_calls"] + batch.stats["student_calls"]
            print(f"  with {variant}: {seconds:8.2f}s (round trips/seq {calls_v.mean():.2f}, teacher "
                  f"tokens {batch.stats['teacher_fraction'].mean():.3f}) = {seconds / dv_s:.3f}x the config's draft-verify, "
                  f"{lock_s / seconds:.2f}x faster than its lockstep; {seconds / own_floor:.3f} of the policy floor")
        for variant in variants:
            _, variant_lock_s, _ = results[f"{variant} lockstep"]
            _, variant_dv_s, _ = results[f"{variant} draft_verify"]
            print(f"  engines with {variant}: lockstep {variant_lock_s:8.2f}s ({lock_s / variant_lock_s:.2f}x faster than "
                  f"the config's), draft-verify {variant_dv_s:8.2f}s ({dv_s / variant_dv_s:.2f}x faster; "
                  f"{variant_dv_s / own_floor:.3f} of the policy floor)")
            for rollout_variant in args.rollout:
                _, seconds, _ = results[f"{variant} rollout {rollout_variant}"]
                _, config_s, _ = results[f"rollout {rollout_variant}"]
                print(f"    with {rollout_variant}: {seconds:8.2f}s ({config_s / seconds:.2f}x faster than on the "
                      f"config's engines; {seconds / own_floor:.3f} of the policy floor)")
        last_batch, last_rollout_s = dv_batch, dv_s
    if args.learner:
        learner_figures(cfg, student, last_batch, last_rollout_s)
    ray.shutdown()


def policy_floor(policy: str, batch, prompts, teacher, student, k: int, best) -> float:
    """Seconds for the policy's own floor on ``batch`` (module docstring). Rows decode exactly
    their counts (ignore_eos), at temperature 1: the number of steps, not the tokens, sets the time."""
    from protocol.batch import STUDENT, TEACHER

    mask, lengths = batch.response_mask, batch.response_lengths
    if policy == "switch":
        decoded = {"student": lengths, "teacher": lengths}
    else:
        decoded = {"student": ((batch.writer == STUDENT) & mask).sum(1), "teacher": ((batch.writer == TEACHER) & mask).sum(1)}
    sequences = [batch.tokens[i, : batch.prompt_lengths[i] + lengths[i]].tolist() for i in range(len(batch))]
    seconds = 0.0
    for writer, other in ((student, teacher), (teacher, student)):
        counts = decoded["student" if writer is student else "teacher"]
        rows = np.flatnonzero(counts > 0)
        if not rows.size:
            continue
        prefixes, budgets = [prompts[i] for i in rows], counts[rows].tolist()
        seconds += best(lambda w=writer, p=prefixes, b=budgets: w.generate(p, b, k, 1.0, ignore_eos=True).result())[1]
        if policy != "switch":  # the other model scores what this one wrote
            written, starts = [sequences[i] for i in rows], batch.prompt_lengths[rows].tolist()
            seconds += best(lambda o=other, w=written, s=starts: o.score(w, s, k).result())[1]
    return seconds


def learner_figures(cfg, student, batch, rollout_s: float) -> None:
    """Train steps on the last draft-verify batch and weight pushes into the student service."""
    from orchestrator.launcher import start_learner
    from orchestrator.steps import push_weights

    group = start_learner(cfg.models.student, cfg.learner, cfg.loss, total_steps=10)
    try:
        steps = []
        for version in (1, 2):  # the first step also builds the optimizer state: the second is reported
            trained = group.train_step(batch.for_learner())
            pushed = push_weights(group, student, version, cfg.learner.push_bucket_mb)
            steps.append((trained, pushed))
        trained, pushed = steps[-1]
    finally:
        group.shutdown()
    push_s = pushed["push_s"]
    step_s = rollout_s + trained["seconds"] + push_s
    print(f"\nlearner ({cfg.learner.world_size} rank(s), ZeRO-{cfg.learner.zero_stage}): "
          f"{int(batch.response_lengths.sum())} response tokens in {trained['seconds']:.2f}s = "
          f"{trained['tokens_per_s']:.0f} train tok/s (first step {steps[0][0]['tokens_per_s']:.0f})")
    print(f"weight push: {push_s:.2f}s for {pushed['bytes'] / 2**20:.0f} MiB in {pushed['buckets']} bucket(s) "
          f"(gather, pack and load into vLLM overlap)")
    print(f"one step (draft-verify rollout {rollout_s:.2f}s + train {trained['seconds']:.2f}s + push {push_s:.2f}s "
          f"= {step_s:.2f}s): rollout {rollout_s / step_s:.1%}, train {trained['seconds'] / step_s:.1%}, "
          f"push {push_s / step_s:.1%}")


if __name__ == "__main__":
    main()
