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
        dtype = getattr(config, "params_dtype", None) or torch.float32
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        if config is not None:
            # megatron-core marks replicated (non-TP-split) params this way for grad all-reduce.
            setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

        # Pruning: the hidden ("stem") channels still kept. The RMS is taken over kept channels
        # only, so a masked model normalises exactly as the physically smaller model will.
        # Not persistent: masks are saved with the pruning state, not in the model weights.
        self.register_buffer("hidden_mask", None, persistent=False)
        self._num_kept: int | None = None

    def set_hidden_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None or bool(mask.all()):
            self.hidden_mask, self._num_kept = None, None
            return
        if mask.shape != (self.hidden_size,):
            raise ValueError(f"hidden mask of shape {tuple(mask.shape)} for a norm of size {self.hidden_size}")
        self.hidden_mask = mask.to(device=self.weight.device, dtype=torch.float32)
        self._num_kept = int(mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x if input_dtype == torch.float32 else x.float()
        if self.hidden_mask is None:
            # torch's own kernel: bit-identical (forward and backward, fp32 and bf16) to the
            # pow/mean/rsqrt formula below, in one op instead of five (each op costs a dispatch
            # through the CPU shim's TorchFunctionMode on every step)
            h = torch.nn.functional.rms_norm(h, (self.hidden_size,), None, self.eps)
        else:
            mean_square = (h.pow(2) * self.hidden_mask).sum(-1, keepdim=True) / self._num_kept
            h = h * torch.rsqrt(mean_square + self.eps)
        return self.weight * (h if input_dtype == torch.float32 else h.to(input_dtype))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
