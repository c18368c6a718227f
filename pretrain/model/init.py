"""Layout-independent weight initialisation.

Every parameter is drawn as its full (global) tensor from a generator seeded by the run seed and
the parameter's checkpoint key (plus its layer index), and each rank keeps its own slice. The
keys and slices come from megatron-core's ``sharded_state_dict``, the same description that
``dist_checkpointing`` uses, so TP=1/PP=1 and TP=2xPP=2 start from bit-identical weights: that is
what lets tests compare layouts step by step, and users reproduce a run on another layout.
Megatron's scheme otherwise: N(0, std); the output projections of attention and MLP use
std / sqrt(2 x num_layers); norms start at one.
"""

from __future__ import annotations

import hashlib
import math

import torch

_SCALED_INIT_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def _seed_for(seed: int, key: str, layer_index: tuple) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{layer_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _iter_sharded_tensors(sharded_state_dict):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stack = [sharded_state_dict]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, ShardedTensorFactory):
            built = node.build()
            stack.extend(built if isinstance(built, list) else [built])
        elif isinstance(node, ShardedTensor):
            yield node


@torch.no_grad()
def deterministic_init(model_chunk, seed: int, std: float, num_layers: int) -> int:
    """Re-initialise ``model_chunk`` in place; returns the number of tensors written."""
    written = 0
    for sh in _iter_sharded_tensors(model_chunk.sharded_state_dict()):
        data = sh.data
        if not isinstance(data, torch.Tensor) or not data.is_floating_point():
            continue
        key = sh.key
        if "layer_norm" in key or key.endswith("norm.weight") or "final_layernorm" in key:
            data.fill_(1.0)
            written += 1
            continue
        if not key.endswith("weight"):
            data.zero_()  # biases (none in Llama-style models, but be exact if enabled)
            written += 1
            continue
        prepend = len(sh.global_shape) - data.ndim
        layer_index = tuple(sh.global_offset[:prepend])
        full_shape = tuple(sh.global_shape[prepend:])
        local_offset = sh.global_offset[prepend:]
        scale = std / math.sqrt(2.0 * num_layers) if key.endswith(_SCALED_INIT_SUFFIXES) else std
        generator = torch.Generator().manual_seed(_seed_for(seed, key, layer_index))
        full = torch.randn(full_shape, generator=generator, dtype=torch.float32) * scale
        index = tuple(slice(o, o + n) for o, n in zip(local_offset, data.shape))
        data.copy_(full[index].to(data.dtype))
        written += 1
    return written
