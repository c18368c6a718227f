"""megatron-core extensions: layer specs with our submodules, and the CPU/gloo shim."""

from megatron_patches.cpu_shim import apply_cpu_shims, cpu_shims_active

__all__ = ["apply_cpu_shims", "cpu_shims_active"]
