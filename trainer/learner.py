"""One rank of the DeepSpeed ZeRO learner: a plain class that a Ray actor wraps (trainer/group.py).

Each rank holds a DeepSpeed engine over the student. ``train_step`` takes the whole global
batch (every rank gets the same object from Ray's object store), keeps its own rows, runs them
in micro-batches of at most ``micro_batch_size`` rows (at least ``gradient_accumulation_steps``
of them), and takes ONE optimizer step: whatever the batch size, one call is one step. The
loss is the mean over ALL response tokens of the global batch: each rank's token sum is divided
by the global token count, so ranks with more tokens weigh more (a mean of per-rank means would
not).

Runs the same on CPU (gloo, DeepSpeed's CPU accelerator) and on GPUs (NCCL).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from protocol.batch import STUDENT, TrainBatch
from protocol.weights import pack_state
from trainer import checkpoint
from trainer.config import LearnerConfig, LossConfig
from trainer.losses import distillation_loss
from trainer.schedule import lr_scheduler


# Weight export gathers ZeRO-3 shards this many bytes at a time: few collectives, bounded memory.
GATHER_CHUNK_BYTES = 256 * 2**20


# -- configuration --------------------------------------------------------------------------------


def deepspeed_config(cfg: LearnerConfig, on_gpu: bool) -> dict:
    """The DeepSpeed config dict for ``cfg`` (the optimizer and scheduler are passed as objects)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # gloo has no reduce_scatter; all-reduce gives the same sums.
            "reduce_scatter": on_gpu,
            # DeepSpeed allows overlap with caller-owned accumulation (below) only from stage 2 on.
            "overlap_comm": on_gpu and cfg.zero_stage >= 2,
        },
        # backward() accumulates, step() is the boundary: the number of micro-batches may change
        # from batch to batch (train_step sizes them from the batch).
        "managed_gradient_accumulation": False,
        # A torch optimizer passed in is fine for ZeRO; SGD is just not on DeepSpeed's tested list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def make_optimizer(params, cfg: LearnerConfig) -> torch.optim.Optimizer:
    """A torch optimizer: DeepSpeed's own (FusedAdam, CPUAdam) need compiled ops, the CPU
    accelerator has none prebuilt, and ZeRO partitions a torch optimizer's state just the same."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"learner.optimizer: unknown optimizer {cfg.optimizer!r}")


# -- batch -> tensors -----------------------------------------------------------------------------


def shard_rows(n_rows: int, world_size: int, rank: int, min_micro_batches: int,
               micro_batch_size: int) -> list[np.ndarray]:
    """This rank's rows of an ``n_rows`` global batch, as micro-batches of at most ``micro_batch_size`` rows.

    Every rank gets the same number of micro-batches (ZeRO's collectives run per forward and
    backward, so the ranks must take the same number of them), at least ``min_micro_batches``.
    """
    micro_batches = max(min_micro_batches, math.ceil(n_rows / (world_size * micro_batch_size)))
    if n_rows < world_size * micro_batches:
        raise ValueError(
            f"batch of {n_rows} rows cannot give {world_size} ranks x {micro_batches} micro-batches one row each "
            f"(gradient_accumulation_steps {min_micro_batches}, micro_batch_size {micro_batch_size})"
        )
    parts = np.array_split(np.arange(n_rows), world_size * micro_batches)
    return parts[rank * micro_batches: (rank + 1) * micro_batches]


def batch_tensors(batch: TrainBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The arrays the loss needs, as tensors, cut to this batch's longest sequence/response."""
    total = batch.prompt_lengths + batch.response_lengths
    if (batch.prompt_lengths < 1).any():
        raise ValueError("every row needs a prompt of at least one token (position p - 1 predicts response token 0)")
    width, resp = int(total.max()), int(batch.response_lengths.max())
    # torch.tensor copies: arrays from Ray's object store are read-only views.
    as_tensor = partial(torch.tensor, device=device)
    return {
        "tokens": as_tensor(batch.tokens[:, :width]),
        "prompt_lengths": as_tensor(batch.prompt_lengths),
        "lengths": as_tensor(total),
        "teacher_ids": as_tensor(batch.teacher.ids[:, :resp]),
        "teacher_logprobs": as_tensor(batch.teacher.logprobs[:, :resp]),
        "mask": as_tensor(batch.teacher.mask[:, :resp]),
        "teacher_token_logprob": as_tensor(batch.teacher.token_logprob[:, :resp]),
        "sampled": as_tensor(np.zeros((len(batch), resp), bool) if batch.writer is None
                             else batch.writer[:, :resp] == STUDENT),
    }


def check_sampled_tokens(batch: TrainBatch) -> None:
    """loss.kind=sampled_reverse_kl needs who wrote each token and the teacher's logprob of every
    student-written one."""
    if batch.writer is None:
        raise ValueError("loss.kind=sampled_reverse_kl: the batch has no writer (fixed text has no sampled tokens)")
    sampled = (batch.writer == STUDENT) & batch.teacher.mask
    unknown = int((sampled & ~np.isfinite(batch.teacher.token_logprob)).sum())
    if unknown:
        raise ValueError(f"loss.kind=sampled_reverse_kl: the teacher's logprob of {unknown} of {int(sampled.sum())} "
                         "student-written tokens is unknown (lockstep knows it only where the teacher's top-k lists "
                         "the token; rollout.strategy=draft_verify scores every one)")


def response_logits(model, tokens: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor,
                    response_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each response token, [B, R, V], and those tokens, [B, R].

    Position p + j - 1 predicts response token j (p = prompt length). Only the positions from
    the shortest prompt on go through the LM head (``logits_to_keep``): prompt logits are
    never needed, and the head is the biggest activation for large vocabularies.
    """
    batch, width = tokens.shape
    positions = torch.arange(width, device=tokens.device)
    attention_mask = (positions[None, :] < lengths[:, None]).long()
    first = int(prompt_lengths.min()) - 1
    kept = positions[first:]
    logits = model(input_ids=tokens, attention_mask=attention_mask, logits_to_keep=kept).logits
    # Padding slots (j >= a row's response length) may point past the sequence: clamp; masked later.
    predicting = (prompt_lengths[:, None] - 1 + torch.arange(response_width, device=tokens.device)[None, :])
    rows = torch.arange(batch, device=tokens.device)[:, None]
    targets = tokens[rows, (predicting + 1).clamp(max=width - 1)]
    return logits[rows, (predicting - first).clamp(max=len(kept) - 1)], targets


def chunk_by_bytes(params: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters in groups of at most ``limit`` bytes (full size; one oversized alone)."""
    chunks: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()  # ds_numel: full size under ZeRO-3
        if chunks[-1] and size + nbytes > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += nbytes
    return [c for c in chunks if c]


def free_port() -> int:
    # Bind-then-close can race with another process taking the port; init fails loudly then.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


# -- the rank ---------------------------------------------------------------------------------------


class LearnerRank:
    """One data-parallel rank. Construct, then (rank 0) ``address()``, then ``setup(...)`` on all ranks."""

    def __init__(self, rank: int, cfg: LearnerConfig, total_steps: int | None = None):
        self.rank = rank
        self.cfg = cfg
        self.world_size = cfg.world_size
        self.total_steps = total_steps
        self.engine = None

    def __repr__(self) -> str:
        # Ray's dashboard and logs label an actor by its repr.
        return f"LearnerRank({self.rank}/{self.world_size})"

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group (called on rank 0 before ``setup``)."""
        return node_ip(), free_port()

    def setup(self, master_addr: str, master_port: int, model_path: str) -> dict:
        """Join the process group, load the student, build the DeepSpeed engine. All ranks at once."""
        import deepspeed
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        on_gpu = torch.cuda.is_available()
        if self.cfg.precision == "bf16" and not (on_gpu and torch.cuda.is_bf16_supported()):
            raise ValueError("learner.precision: bf16 needs a GPU with bf16 support; use fp32 on this machine")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")  # Ray gives each rank its own GPU
        if master_addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo would otherwise pick the host's address
        if on_gpu:
            torch.cuda.set_device(0)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                                       verbose=False)

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        optimizer = make_optimizer(model.parameters(), self.cfg)
        scheduler = lr_scheduler(optimizer, self.cfg.lr_schedule, self.cfg.warmup_steps,
                                 self.cfg.decay_steps or self.total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, on_gpu),
        )
        self.device = self.engine.device
        return {"rank": self.rank, "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                      for p in model.parameters())}

    # -- training -----------------------------------------------------------------------------

    def train_step(self, batch: TrainBatch, loss_cfg: LossConfig) -> dict:
        """One optimizer step on the global batch; every rank must call it with the same batch."""
        import torch.distributed as dist

        started = time.perf_counter()
        mask = batch.teacher.mask
        if (mask & (np.arange(mask.shape[1])[None, :] >= batch.response_lengths[:, None])).any():
            raise ValueError("train_step: teacher.mask marks positions at or past a row's response_lengths")
        global_tokens = int(mask.sum())
        if global_tokens == 0:
            raise ValueError("train_step: the batch has no response tokens (teacher.mask is all False)")
        if loss_cfg.kind == "sampled_reverse_kl":
            check_sampled_tokens(batch)
        micro_batches = shard_rows(len(batch), self.world_size, self.rank, self.cfg.gradient_accumulation_steps,
                                   self.cfg.micro_batch_size)
        # ZeRO averages gradients over ranks; times world_size undoes that, so the gradient is the
        # one of sum(token losses over all ranks) / global_tokens.
        scale = self.world_size / global_tokens
        token_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        forward_s = backward_s = 0.0
        self.engine.train()
        for rows in micro_batches:
            t0 = time.perf_counter()
            x = batch_tensors(batch.rows(rows), self.device)
            logits, targets = response_logits(self.engine, x["tokens"], x["prompt_lengths"], x["lengths"],
                                              x["mask"].shape[1])
            mean = distillation_loss(logits, x["teacher_ids"], x["teacher_logprobs"], x["mask"], loss_cfg, targets,
                                     x["teacher_token_logprob"], x["sampled"])
            token_sum = mean * x["mask"].sum()  # distillation_loss is a mean over this micro-batch's tokens
            t1 = time.perf_counter()
            self.engine.backward(token_sum * scale, scale_wrt_gas=False)  # already normalised globally
            t2 = time.perf_counter()
            token_loss_sum += token_sum.detach().double()
            forward_s, backward_s = forward_s + t1 - t0, backward_s + t2 - t1
        lr = float(self.engine.get_lr()[0])  # the lr this step uses; step() advances the schedule
        t3 = time.perf_counter()
        self.engine.step()  # reduces the accumulated gradients (ZeRO 1), clips, updates
        step_s = time.perf_counter() - t3
        if self.world_size > 1:
            dist.all_reduce(token_loss_sum)
        grad_norm = self.engine.get_global_grad_norm()
        seconds = time.perf_counter() - started
        return {
            "loss": float(token_loss_sum) / global_tokens,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / seconds,
            "seconds": seconds,
            "forward_s": forward_s,
            "backward_s": backward_s,
            "step_s": step_s,
            "optimizer_step": int(self.engine.global_steps),  # steps applied to these weights so far
        }

    # -- weights out ------------------------------------------------------------------------------

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Every entry of ``model.state_dict()`` (HF names), full and on CPU, on rank 0; None elsewhere.

        A collective under ZeRO-3: parameters are gathered in chunks of at most GATHER_CHUNK_BYTES,
        so rank 0 holds at most one chunk's gathered copy beyond the result, in few collectives.
        Tied names share one tensor.
        """
        import deepspeed

        module = self.engine.module
        zero3 = self.cfg.zero_stage == 3
        names = list(module.state_dict().keys())  # under ZeRO-3 the values are empty shards: only the names
        entries = {**dict(module.named_parameters(remove_duplicate=False)),
                   **dict(module.named_buffers(remove_duplicate=False))}
        params = list({id(p): p for p in module.parameters()}.values())

        copies: dict[int, torch.Tensor] = {}  # id of a (possibly tied) parameter -> its full copy
        for chunk in chunk_by_bytes(params, GATHER_CHUNK_BYTES):
            with deepspeed.zero.GatheredParameters(chunk, modifier_rank=None, enabled=zero3):
                if self.rank == 0:  # copy: ZeRO-3 frees the gathered storage on exit
                    copies.update({id(p): p.detach().to("cpu", copy=True) for p in chunk})
        if self.rank != 0:
            return None
        return {name: copies[id(entries[name])] if id(entries[name]) in copies
                else entries[name].detach().to("cpu", copy=True) for name in names}

    def export_state(self) -> dict[str, torch.Tensor] | None:
        """The weights to push to vLLM, on rank 0: every ``model.state_dict()`` name, HF naming.

        A tied name (``lm_head.weight`` tied to ``model.embed_tokens.weight``) gets its own copy:
        vLLM's in-place reload re-creates its lm_head and leaves it unloaded unless the name is
        there (checked against the real student service), and safetensors refuses two names
        for one tensor.
        """
        state = self.full_state()
        if state is None:
            return None
        seen: set[int] = set()
        for name, tensor in state.items():
            if id(tensor) in seen:
                state[name] = tensor.clone()
            seen.add(id(tensor))
        return state

    def weight_buckets(self, bucket_bytes: int):
        """The weights to push, streamed (a generator; Ray streams what it yields): on rank 0 one
        safetensors blob per bucket of parameters of at most ``bucket_bytes`` (one larger
        parameter alone), yielded as soon as it is packed, then one of the buffers; the other
        ranks join each bucket's gather (ZeRO-3) and yield nothing. Every ``model.state_dict()``
        name is sent, a tied name as its own copy: vLLM's in-place reload re-creates its lm_head
        and leaves it unloaded unless the name is there (checked against the real student
        service), and safetensors refuses two names for one tensor."""
        import deepspeed

        module = self.engine.module
        zero3 = self.cfg.zero_stage == 3
        names = set(module.state_dict().keys())  # under ZeRO-3 the values are empty shards: only the names
        names_of: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if name in names:
                names_of.setdefault(id(p), []).append(name)
        params = list({id(p): p for p in module.parameters()}.values())
        for chunk in chunk_by_bytes(params, bucket_bytes):
            with deepspeed.zero.GatheredParameters(chunk, modifier_rank=None, enabled=zero3):
                # copy: ZeRO-3 frees the gathered storage on exit
                bucket = {name: p.detach().to("cpu", copy=True) for p in chunk
                          for name in names_of.get(id(p), [])} if self.rank == 0 else {}
            if bucket:
                yield pack_state(bucket)
        buffers = {name: b.detach().to("cpu", copy=True) for name, b in module.named_buffers(remove_duplicate=False)
                   if name in names}
        if self.rank == 0 and buffers:
            yield pack_state(buffers)

    def export_hf(self, out_dir: str, tokenizer_dir: str | None = None) -> str | None:
        """Write a Hugging Face model directory (config, safetensors, tokenizer) on rank 0."""
        state = self.full_state()
        if state is None:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # save_pretrained with an explicit state dict: under ZeRO-3 the module's own params are shards.
        self.engine.module.save_pretrained(out, state_dict=state)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
        return str(out)

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, run_dir: str, step: int, run_state: dict) -> str | None:
        """Every rank writes its DeepSpeed shards into ``step-N.tmp``; rank 0 then commits it."""
        staged = checkpoint.staging_dir(run_dir, step)
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)  # a crashed earlier attempt at this step
            staged.parent.mkdir(parents=True, exist_ok=True)
        self._barrier()
        # save_dir/tag = checkpoints/step-N.tmp: DeepSpeed's files land right in the step directory.
        self.engine.save_checkpoint(str(staged.parent), tag=staged.name, save_latest=False)
        self._barrier()  # every rank's shards are written
        final = None
        if self.rank == 0:
            state = dict(run_state)
            state.setdefault("learner_config", dataclasses.asdict(self.cfg))
            final = str(checkpoint.commit(run_dir, step, state, keep=self.cfg.keep_checkpoints))
        self._barrier()
        return final

    def load_checkpoint(self, checkpoint_dir: str) -> dict:
        """Restore engine, optimizer and lr scheduler from a committed step directory; returns its run state."""
        path = Path(checkpoint_dir)
        if not (path / checkpoint.RUN_STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a committed checkpoint (no {checkpoint.RUN_STATE_FILE})")
        # DeepSpeed reads its own files with torch.load(weights_only=False) (TorchCheckpointEngine):
        # they pickle optimizer and scheduler state. Only load checkpoints this project wrote.
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        return checkpoint.read_run_state(path)

    def shutdown(self) -> None:
        """Drop the engine. The process group stays until the process exits (the actor is killed
        next): DeepSpeed caches its groups, so a destroyed one cannot be re-made in this process."""
        self.engine = None

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()
