"""Moving new weights into a running vLLM engine, without a restart and without pickle.

The weights travel as one safetensors blob (protocol.weights). ``WeightSyncExtension`` is mixed
into vLLM's worker class (``worker_extension_cls``), so
``engine.collective_rpc("load_safetensors", args=(blob,))`` runs ``load_safetensors`` inside
every worker process next to the model.
"""
from __future__ import annotations

from protocol.weights import unpack_state


class WeightSyncExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker (``self.model_runner`` exists)."""

    def load_safetensors(self, blob: bytes) -> int:
        state = unpack_state(blob)
        # reload_weights maps Hugging Face names onto vLLM's fused layers and reprocesses them.
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
