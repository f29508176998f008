"""The learner group: one Ray actor per DeepSpeed rank, driven as one object.

Every call fans out to all ranks (DeepSpeed's collectives need every rank) and returns rank
0's result. The batch is put into Ray's object store once and every rank reads the same copy.
orchestrator.launcher starts the rank actors; this class sets them up and drives them.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import remove_placement_group

from protocol.batch import TrainBatch
from trainer import checkpoint
from trainer.config import LossConfig


class LearnerGroup:
    def __init__(self, ranks: list, model_path: str, loss: LossConfig, placement_group=None):
        """Build the DeepSpeed engines of ``ranks`` (started LearnerRank actors, rank order) on
        ``model_path``; blocks until every rank is ready. ``placement_group``: the ranks' own,
        removed with them."""
        self.loss = loss
        self.ranks = ranks
        self.placement_group = placement_group
        try:
            master_addr, master_port = ray.get(self.ranks[0].address.remote())
            self.info = self._all("setup", master_addr, master_port, model_path)
        except Exception:
            self.shutdown()
            raise

    def _all(self, method: str, *args):
        """Call ``method`` on every rank at once; rank 0's result."""
        return self._wait([getattr(r, method).remote(*args) for r in self.ranks])

    @staticmethod
    def _wait(refs: list):
        """Rank 0's result. Raises as soon as any rank fails: the others may be stuck in a
        collective waiting for it, and the caller's way out is shutdown() and a new group."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs[0])

    def train_step(self, batch: TrainBatch, loss: LossConfig | None = None) -> dict:
        """One optimizer step on ``batch``; loss, grad norm, tokens, tokens/s, timings (rank 0's)."""
        return self._all("train_step", ray.put(batch), loss or self.loss)

    def export_state(self) -> dict:
        """The full weights (HF names, CPU tensors), gathered on rank 0."""
        return self._all("export_state")

    def weight_buckets(self, bucket_bytes: int):
        """Rank 0's weight buckets as Ray object references, in order, as they are packed (every
        rank joins each gather). Ray's backpressure keeps rank 0 at most two buckets ahead of
        the caller, so the buckets in the object store stay few whatever the model's size.
        Raises at the end if a rank failed."""
        streams = [r.weight_buckets.options(num_returns="streaming", _generator_backpressure_num_objects=2)
                   .remote(bucket_bytes) for r in self.ranks]
        yield from streams[0]
        ray.get([stream.completed() for stream in streams])

    def save_checkpoint(self, run_dir: str, step: int, run_state: dict) -> str:
        """Write ``<run_dir>/checkpoints/step-N`` atomically; returns its path."""
        return self._all("save_checkpoint", str(run_dir), step, run_state)

    def load_latest_checkpoint(self, run_dir: str) -> dict | None:
        """Restore every rank from the newest committed checkpoint; its run state, or None if there is none."""
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is None:
            return None
        return self._all("load_checkpoint", str(latest))

    def export_hf(self, out_dir: str, tokenizer_dir: str | None = None) -> str:
        return self._all("export_hf", str(out_dir), tokenizer_dir)

    def dead_ranks(self, timeout_s: float = 10.0) -> list[int]:
        """Ranks whose process is gone. A rank that does not answer in time counts as alive: it may
        be stuck in a collective, waiting for a dead peer."""
        pings = [r.address.remote() for r in self.ranks]
        answered, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        dead = []
        for rank, ping in enumerate(pings):
            if ping in answered:
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError:
                    dead.append(rank)
        return dead

    def shutdown(self, graceful: bool = True) -> None:
        """Drop the engines and end the rank actors (their process groups end with them).
        ``graceful=False`` (a rank died; the others may be stuck in a collective) just kills them."""
        if graceful and self.ranks:
            try:
                ray.get([r.shutdown.remote() for r in self.ranks], timeout=60)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # a dead rank cannot leave cleanly; killing it below is enough
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
