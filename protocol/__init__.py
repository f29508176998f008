"""The arrays that cross between the parts: top-k lists, rollout batches, weight blobs.

The bottom of the dependency graph: every other package imports it, it imports nothing of
ours (numpy, and safetensors where weights are packed).
"""
