"""Training FLOPs per token of a model shape: one formula, used by the logs and the comparisons.

Counted (forward + backward = 3x forward, multiply-add = 2 FLOPs):

* every matrix multiply with a weight: q/k/v, the attention output, the three SwiGLU matrices of
  every layer and the output layer (tied or not, it is a vocab x hidden product); the input
  embedding is a lookup and costs nothing;
* causal self-attention: scores and the weighted sum, each ``2 * heads * head_dim`` FLOPs per
  key, over ``seq_length / 2`` keys on average (the causal half, as FlashAttention counts).

Norms, RoPE, softmax and the loss are left out (well under 1% at these shapes). A masked model
computes at its full size: pass the shape that is in memory, not the kept one.
"""

from __future__ import annotations


def flops_per_token_of(layer_widths: list[tuple[int, int, int]], hidden_size: int, head_dim: int,
                       vocab_size: int, seq_length: int) -> int:
    """FLOPs to train on one token: ``layer_widths`` is (query groups, heads, FFN width) per layer."""
    forward = 0
    for groups, heads, ffn in layer_widths:
        weights = hidden_size * head_dim * (heads + 2 * groups) + heads * head_dim * hidden_size \
            + 3 * hidden_size * ffn
        attention = 2 * (2 * heads * head_dim) * (seq_length // 2)
        forward += 2 * weights + attention
    forward += 2 * vocab_size * hidden_size
    return 3 * forward


def training_flops_per_token(model_cfg, vocab_size: int) -> int:
    """FLOPs per training token of a ``ModelConfig`` (its per-layer shapes when it has them)."""
    return flops_per_token_of(model_cfg.layer_widths(), model_cfg.hidden_size, model_cfg.head_dim, vocab_size,
                              model_cfg.seq_length)
