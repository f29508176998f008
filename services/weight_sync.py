"""Moving new weights into a running vLLM engine, without a restart and without pickle.

The weights travel as safetensors blobs (protocol.weights), one per bucket of the model.
``WeightSyncExtension`` is mixed into vLLM's worker class (``worker_extension_cls``), so
``engine.collective_rpc(name, args=...)`` runs its methods inside every worker process next to
the model. One push is one in-place reload (vLLM re-creates and reprocesses layers as their
weights arrive, so a model cannot be reloaded piecewise in separate reloads): the reload runs in
a thread of the worker and reads its weights from the buckets the engine is fed one call at a
time, so a push holds a few buckets in memory, never the whole model twice.

    begin_weight_stream()        the reload starts, waiting for weights
    feed_weight_bucket(blob)     one bucket's tensors to it (blocks while one bucket still waits)
    finish_weight_stream()       the last bucket was fed; returns when the reload is done
"""
from __future__ import annotations

import queue
import threading

from protocol.weights import unpack_state

_END = None  # after the last bucket


class WeightSyncExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker (``self.model_runner`` exists)."""

    def begin_weight_stream(self) -> None:
        self._buckets: queue.Queue = queue.Queue(maxsize=1)  # one unpacked bucket waits; the reload holds another
        self._reload_error: BaseException | None = None
        device = getattr(self, "device", None)

        def reload() -> None:
            try:
                if device is not None and device.type == "cuda":
                    import torch

                    torch.cuda.set_device(device)  # a new thread starts on the default device
                # reload_weights maps Hugging Face names onto vLLM's fused layers and reprocesses them.
                self.model_runner.reload_weights(weights_iterator=_tensors_of(self._buckets))
            except BaseException as err:  # handed to the caller of feed/finish
                self._reload_error = err

        self._reload = threading.Thread(target=reload, name="weight-reload", daemon=True)
        self._reload.start()

    def feed_weight_bucket(self, blob: bytes) -> int:
        state = unpack_state(blob)
        self._hand_over(state)
        return len(state)

    def finish_weight_stream(self) -> None:
        self._hand_over(_END)
        self._reload.join()
        if self._reload_error is not None:
            raise RuntimeError(f"weight reload failed: {self._reload_error!r}") from self._reload_error

    def _hand_over(self, item) -> None:
        """Queue ``item`` for the reload, unless the reload has stopped (it would never take it)."""
        while True:
            if self._reload_error is not None or not self._reload.is_alive():
                raise RuntimeError(f"weight reload stopped: {self._reload_error!r}") from self._reload_error
            try:
                self._buckets.put(item, timeout=1.0)
                return
            except queue.Full:
                continue


def _tensors_of(buckets: queue.Queue):
    """(name, tensor) of every bucket as it arrives, until the end marker."""
    while (state := buckets.get()) is not _END:
        yield from state.items()
