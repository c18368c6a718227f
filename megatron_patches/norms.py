"""Norms supplied to megatron-core through our layer spec."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """Llama RMSNorm with megatron-core's norm constructor signature.

    ``build_module(spec, config=..., hidden_size=..., eps=...)`` is how megatron-core's
    TransformerLayer and TransformerBlock build their norms, so this class plugs into a layer spec
    in place of ``WrappedTorchNorm``. Owning the class (instead of ``torch.nn.RMSNorm``) is what lets
    the pruning code make it mask-aware without touching megatron-core. The statistic is computed in
    float32 whatever the activation dtype, as in HF Llama, so exports compare exactly.
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **unused):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"RMSNorm needs a positive hidden_size, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        if config is not None:
            # megatron-core marks replicated (non-TP-split) params this way for grad all-reduce.
            setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
