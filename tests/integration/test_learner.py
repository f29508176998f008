"""The DeepSpeed learner on CPU: real DeepSpeed (gloo), real Ray actors, tiny random Llamas.

The reference everywhere is the pure ``distillation_loss`` on logits from a plain transformers
model, computed one row at a time without padding, so the learner's batching, attention mask,
response-position gather and global-token normalisation are all checked against it.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner_helpers import make_batch, model_with, reference_loss, tiny_llama
from orchestrator.launcher import start_learner
from protocol.batch import TrainBatch
from trainer import checkpoint
from trainer.config import LearnerConfig, LossConfig
from trainer.learner import LearnerRank, shard_rows
from trainer.losses import distillation_loss
from trainer.schedule import lr_factor

LOSS_KINDS = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_llama(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=1)


def batches(teacher, n: int, rows: int = 8) -> list[TrainBatch]:
    """Step i's batch. The first half of the rows has far fewer response tokens than the second,
    so rank 0's and rank 1's shards differ in token count and a mean of per-rank means is wrong."""
    half = rows // 2
    response = [1, 2] * (half // 2) + [7, 9] * (half // 2)
    prompt = [1, 3, 5, 2] * (rows // 4)
    return [make_batch(teacher, seed=100 + i, prompt_lengths=prompt, response_lengths=response) for i in range(n)]


# -- 1. loss through the engine == the pure function ----------------------------------------------


def test_engine_loss_equals_pure_loss_for_every_kind(student_dir, teacher):
    """World size 1, LearnerRank in this process (no Ray): DeepSpeed runs fine with a 1-rank gloo group."""
    rank = LearnerRank(0, LearnerConfig(world_size=1, zero_stage=2, optimizer="sgd", lr=0.5, micro_batch_size=8))
    rank.setup(*rank.address(), student_dir)
    try:
        data = batches(teacher, len(LOSS_KINDS) + 3)
        kinds = [LossConfig(kind=k) for k in LOSS_KINDS] + [
            LossConfig(kind="jsd", beta=0.3, ce_weight=0.5), LossConfig(kind="sampled_reverse_kl"),
            LossConfig(kind="sampled_reverse_kl", estimator="k1", forward_kl_weight=0.5)]
        losses = []
        for batch, loss in zip(data, kinds):
            expected = reference_loss(model_with(rank.full_state(), student_dir), batch, loss)
            got = rank.train_step(batch, loss)
            assert got["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), loss
            assert got["tokens"] == int(batch.teacher.mask.sum())
            assert got["grad_norm"] > 0 and got["tokens_per_s"] > 0
            losses.append(got["loss"])
        assert min(losses) > 1e-3  # the comparison is not between zeros

        unknown = data[0]
        unknown.teacher.token_logprob[:, 0] = np.nan  # student-written (as lockstep leaves an unlisted token)
        with pytest.raises(ValueError, match="the teacher.s logprob of 8 of 22 student-written tokens is unknown"):
            rank.train_step(unknown, kinds[-1])

        bad = data[0]
        bad.teacher.mask[0, :] = True  # row 0 has a 1-token response
        with pytest.raises(ValueError, match="teacher.mask marks positions at or past a row's response_lengths"):
            rank.train_step(bad, kinds[0])
    finally:
        rank.shutdown()


def test_micro_batches_are_sized_from_the_batch():
    # 8 rows, 2 ranks, at most 3 rows a micro-batch: 2 micro-batches per rank, all rows used once.
    parts = [shard_rows(8, 2, rank, 1, 3) for rank in (0, 1)]
    assert [[len(p) for p in rank] for rank in parts] == [[2, 2], [2, 2]]
    assert sorted(np.concatenate([np.concatenate(rank) for rank in parts]).tolist()) == list(range(8))
    assert [len(p) for p in shard_rows(8, 1, 0, 4, 8)] == [2, 2, 2, 2]  # gradient_accumulation_steps is a minimum
    with pytest.raises(ValueError, match="batch of 3 rows cannot give 2 ranks x 2 micro-batches"):
        shard_rows(3, 2, 0, 1, 1)


def test_lr_schedule_warms_up_then_decays():
    cosine = [lr_factor(step, "cosine", 2, 6) for step in range(8)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[4] == pytest.approx(0.5) and cosine[6:] == [0.0, 0.0]
    assert [lr_factor(step, "linear", 0, 4) for step in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(100, "constant", 0, None) == 1.0
    with pytest.raises(ValueError, match="lr_schedule 'cosine' needs learner.decay_steps"):
        lr_factor(0, "cosine", 0, None)


def test_group_that_cannot_start_fails_fast(ray_cluster, tmp_path):
    """A rank that fails during setup raises at once (no hang in the process group), actors gone."""
    with pytest.raises(Exception, match="no_such_model"):
        start_learner(str(tmp_path / "no_such_model"), LearnerConfig(world_size=2), LossConfig())
    deadline = time.monotonic() + 20  # ray.kill is asynchronous
    while [a for a in ray.util.list_named_actors() if a.startswith("learner-rank")] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [a for a in ray.util.list_named_actors() if a.startswith("learner-rank")] == []


# -- 2. ZeRO 1/2/3 at world size 2 == world size 1 ------------------------------------------------


def run_steps(student_dir, data, loss: LossConfig, **cfg) -> list[dict]:
    group = start_learner(student_dir, LearnerConfig(**cfg), loss)
    try:
        return [group.train_step(batch) for batch in data]
    finally:
        group.shutdown()


def test_zero_stages_at_world_size_2_match_world_size_1(ray_cluster, student_dir, teacher):
    data = batches(teacher, 3)
    # SGD with a large lr: a wrongly scaled gradient changes the trajectory (Adam would hide it).
    common = dict(optimizer="sgd", lr=2.0, max_grad_norm=100.0, micro_batch_size=8)
    loss = LossConfig(kind="forward_kl")
    reference = run_steps(student_dir, data, loss, world_size=1, zero_stage=1, **common)
    ref_losses = [s["loss"] for s in reference]
    assert abs(ref_losses[-1] - ref_losses[0]) > 1e-2 * ref_losses[0]  # the steps really move the weights

    # Rank 0's shard (rows 0-3) has far fewer tokens than rank 1's: a mean of per-rank means
    # would weigh its tokens more and give a different loss and gradient.
    mask = data[0].teacher.mask
    assert mask[:4].sum() * 3 < mask[4:].sum()

    # One group per stage (each start costs a DeepSpeed world of 2). Two of them also sum the step
    # over micro-batches: ZeRO-1 over 2 per rank from gradient_accumulation_steps (it reduces at
    # step()), ZeRO-3 over 4 from micro_batch_size 1 (it gathers and reduce-scatters per micro-batch).
    for stage, accumulation, micro in ((1, 2, 8), (2, 1, 8), (3, 1, 1)):
        steps = run_steps(student_dir, data, loss, world_size=2, zero_stage=stage,
                          gradient_accumulation_steps=accumulation, **{**common, "micro_batch_size": micro})
        assert [s["loss"] for s in steps] == pytest.approx(ref_losses, rel=1e-4), f"ZeRO-{stage}"
        assert [s["grad_norm"] for s in steps] == pytest.approx([s["grad_norm"] for s in reference], rel=1e-4)
        assert [s["tokens"] for s in steps] == [s["tokens"] for s in reference]


def plain_adamw_step(student_dir, batch: TrainBatch, loss: LossConfig, cfg: LearnerConfig) -> dict:
    """The step the learner should take, written with plain PyTorch: every row's logits from its own
    forward (no padding), the loss as the mean over all response tokens, clipping, torch's AdamW."""
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows, width = batch.teacher.mask.shape
    logits, targets = [], torch.zeros(rows, width, dtype=torch.long)
    for b in range(rows):  # a reference: one row at a time on purpose
        p, r = int(batch.prompt_lengths[b]), int(batch.response_lengths[b])
        seq = torch.tensor(batch.tokens[b, : p + r])
        logits.append(torch.nn.functional.pad(model(seq[None]).logits[0, p - 1: p + r - 1], (0, 0, 0, width - r)))
        targets[b, :r] = seq[p:]
    t = batch.teacher
    value = distillation_loss(torch.stack(logits), torch.tensor(t.ids), torch.tensor(t.logprobs), torch.tensor(t.mask),
                              loss, targets)
    value.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def test_one_learner_step_equals_a_plain_pytorch_adamw_step(ray_cluster, student_dir, teacher):
    """ZeRO 1, 2 and 3 at world size 2 (each rank a different shard of rows, unequal token counts)
    take the very step plain PyTorch takes on the whole batch: the same weights within 2e-6, 0.2 %
    of one lr-1e-3 Adam step (float32 summation order differs: measured up to 1.2e-6 on 1 of 2,048
    elements; a wrong step, e.g. a missed clip or a mis-scaled gradient, moves weights ~1e-3)."""
    batch = batches(teacher, 1)[0]
    loss = LossConfig(kind="skew_reverse_kl")
    for stage in (1, 2, 3):
        # lr 1e-3 and clipping at 0.1 (the gradient norm is about 0.3, so the clip is exercised).
        cfg = LearnerConfig(world_size=2, zero_stage=stage, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                            max_grad_norm=0.1, micro_batch_size=2)
        expected = plain_adamw_step(student_dir, batch, loss, cfg)
        group = start_learner(student_dir, cfg, loss)
        try:
            stats = group.train_step(batch)
            got = group.export_state()
        finally:
            group.shutdown()
        assert stats["grad_norm"] > cfg.max_grad_norm, f"ZeRO-{stage}: the clip was not exercised"
        initial = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).state_dict()
        for name, tensor in expected.items():
            assert not torch.equal(tensor, initial[name]) or name.endswith("rotary_emb.inv_freq"), name
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=2e-6, msg=lambda m: f"ZeRO-{stage} {name}: {m}")


# -- 3. kill and resume == uninterrupted ----------------------------------------------------------


RESUME_CFG = dict(world_size=2, zero_stage=2, optimizer="adamw", lr=3e-2, weight_decay=0.01, lr_schedule="cosine",
                  warmup_steps=2, decay_steps=6, micro_batch_size=2, gradient_accumulation_steps=2,
                  keep_checkpoints=2)


def test_kill_and_resume_equals_uninterrupted_run(ray_cluster, student_dir, teacher, tmp_path):
    data = batches(teacher, 5)
    loss = LossConfig(kind="skew_reverse_kl")
    uninterrupted = run_steps(student_dir, data, loss, **RESUME_CFG)

    run_dir = tmp_path / "run"
    group = start_learner(student_dir, LearnerConfig(**RESUME_CFG), loss)
    for step in (1, 2, 3):
        group.train_step(data[step - 1])
        group.save_checkpoint(str(run_dir), step, {"step": step, "data_cursor": step * 8, "weight_version": step})
    for rank in group.ranks:  # a crash, not a clean shutdown
        ray.kill(rank)
    group.shutdown(graceful=False)  # what the run does after a crash: its placement group goes too

    # keep_checkpoints=2: step 1 is gone, 2 and 3 remain, `latest` names step 3.
    kept = [p.name for p in checkpoint.complete_checkpoints(run_dir)]
    assert kept == ["step-000002", "step-000003"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000003"

    resumed = start_learner(student_dir, LearnerConfig(**RESUME_CFG), loss)
    try:
        state = resumed.load_latest_checkpoint(str(run_dir))
        assert state["step"] == 3 and state["data_cursor"] == 24 and state["weight_version"] == 3
        assert state["learner_config"]["zero_stage"] == 2
        after = [resumed.train_step(batch) for batch in data[3:]]
    finally:
        resumed.shutdown()
    assert [s["loss"] for s in after] == pytest.approx([s["loss"] for s in uninterrupted[3:]], rel=1e-6)
    assert [s["lr"] for s in after] == pytest.approx([s["lr"] for s in uninterrupted[3:]], rel=1e-9)
    # Without the restored optimizer moments and schedule the 4th step would differ from the 3rd's lr.
    assert uninterrupted[3]["lr"] != uninterrupted[2]["lr"]


# -- 4. a crashed checkpoint write is ignored -----------------------------------------------------


def test_leftover_tmp_checkpoint_is_ignored(ray_cluster, student_dir, teacher, tmp_path):
    data = batches(teacher, 3)
    loss = LossConfig(kind="tvd")
    cfg = LearnerConfig(world_size=1, zero_stage=3, optimizer="adam", lr=1e-2)
    run_dir = tmp_path / "run"
    group = start_learner(student_dir, cfg, loss)
    try:
        for step in (1, 2):
            group.train_step(data[step - 1])
            group.save_checkpoint(str(run_dir), step, {"step": step})
        third = group.train_step(data[2])
    finally:
        group.shutdown()

    # A crash while step 3 was being written: a half-written staging directory, `latest` untouched.
    crashed = checkpoint.staging_dir(run_dir, 3)
    crashed.mkdir()
    (crashed / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\x00" * 100)
    (crashed / checkpoint.RUN_STATE_FILE).write_text('{"step": 3')
    assert checkpoint.latest_checkpoint(run_dir).name == "step-000002"

    resumed = start_learner(student_dir, cfg, loss)
    try:
        assert resumed.load_latest_checkpoint(str(run_dir))["step"] == 2
        assert resumed.train_step(data[2])["loss"] == pytest.approx(third["loss"], rel=1e-6)
        # The next save at step 3 replaces the crashed staging directory.
        resumed.save_checkpoint(str(run_dir), 3, {"step": 3})
    finally:
        resumed.shutdown()
    assert not crashed.exists()
    assert checkpoint.read_run_state(checkpoint.latest_checkpoint(run_dir))["step"] == 3


def test_checkpoint_pointer_and_pruning_without_deepspeed(tmp_path):
    for step in (5, 10, 15):
        checkpoint.staging_dir(tmp_path, step).mkdir(parents=True)
        checkpoint.commit(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-000010", "step-000015"]
    # A stale pointer (its directory gone) falls back to the newest complete checkpoint.
    (tmp_path / "checkpoints" / "latest").write_text("step-000099")
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000015"
    assert checkpoint.latest_checkpoint(tmp_path / "nowhere") is None
    # Run state must be JSON: a numpy array is refused by name, and nothing is committed.
    checkpoint.staging_dir(tmp_path, 20).mkdir()
    with pytest.raises(TypeError, match="step 20 is not plain JSON"):
        checkpoint.commit(tmp_path, 20, {"cursor": np.arange(3)})
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000015"


# -- 5. the exported HF directory ------------------------------------------------------------------


def test_export_hf_loads_and_matches_learner_weights(ray_cluster, teacher, tmp_path):
    from build.embedded.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat", "1 + 2 = 3"], vocab_size=64)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    student = tmp_path / "student"
    tiny_llama(seed=0, vocab=len(tokenizer), tied=True).save_pretrained(student)
    big_teacher = tiny_llama(seed=1, vocab=len(tokenizer))
    data = [make_batch(big_teacher, 200 + i, [2, 1, 4, 3], [3, 5, 2, 6]) for i in range(2)]
    loss = LossConfig(kind="jsd")

    # ZeRO-3 at world size 2: each rank holds half of every parameter; export gathers them.
    group = start_learner(str(student), LearnerConfig(world_size=2, zero_stage=3, lr=1e-2), loss)
    try:
        group.train_step(data[0])
        out = group.export_hf(str(tmp_path / "export"), str(tokenizer_dir))
        state = group.export_state()
        next_loss = group.train_step(data[1])["loss"]  # computed by the engine with the exported weights
    finally:
        group.shutdown()

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    # The exported weights are the trained ones, not the initial ones.
    initial = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    assert not torch.equal(initial.model.embed_tokens.weight, exported.model.embed_tokens.weight)

    tokens = torch.tensor(data[1].tokens)
    with torch.no_grad():
        exported_logits = exported(tokens).logits
        learner_logits = model_with(state, out)(tokens).logits
    torch.testing.assert_close(exported_logits, learner_logits, rtol=0, atol=1e-6)
    assert reference_loss(exported, data[1], loss) == pytest.approx(next_loss, rel=1e-5)
