"""Moving new weights into a running vLLM engine, without a restart and without pickle.

The learner's state dict travels as one safetensors blob (plain bytes: safe to accept from any
process, no code runs when it is read). ``WeightSyncExtension`` is mixed into vLLM's worker
class (``worker_extension_cls``), so ``engine.collective_rpc("load_safetensors", args=(blob,))``
runs ``load_safetensors`` inside every worker process next to the model.
"""
from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


def pack_state(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as one safetensors blob (tied/shared tensors are written once each)."""
    return save_safetensors_bytes({name: t.detach().contiguous().cpu() for name, t in state.items()})


def unpack_state(blob: bytes) -> dict[str, torch.Tensor]:
    return load_safetensors_bytes(blob)


class WeightSyncExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker (``self.model_runner`` exists)."""

    def load_safetensors(self, blob: bytes) -> int:
        state = unpack_state(blob)
        # reload_weights maps Hugging Face names onto vLLM's fused layers and reprocesses them.
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
