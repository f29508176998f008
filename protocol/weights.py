"""The student's weights as one safetensors blob: plain bytes, safe to accept from any process
(no code runs when it is read, unlike pickle), and one object in Ray's object store."""
from __future__ import annotations


def pack_state(state: dict) -> bytes:
    """A state dict of torch tensors as one safetensors blob (tied/shared tensors are written once each)."""
    # torch only here, where weights are packed: the driver imports this package without it.
    from safetensors.torch import save

    return save({name: t.detach().contiguous().cpu() for name, t in state.items()})


def unpack_state(blob: bytes) -> dict:
    """The blob's tensors by name (torch tensors)."""
    from safetensors.torch import load

    return load(blob)
