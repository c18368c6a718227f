"""Make megatron-core run on CPU with the gloo backend.

megatron-core has no CPU path: it assumes CUDA in a handful of places. Each patch below names
the failure it fixes. They are applied only when CUDA is absent (``apply_cpu_shims`` refuses to
activate on a machine with a GPU unless forced), once per process, before megatron-core builds
anything. Fixes that are not about a missing GPU live elsewhere (the torch-Adam ``step`` fix:
``megatron_patches/optimizer_compat.py``, applied on every device that needs it). None of them edits
megatron-core's files or replaces one of its classes; they redirect the CUDA runtime calls that
megatron-core makes to their CPU equivalents.

Checked on megatron-core 0.16.1; the targets also exist in 0.17-0.19 (patches whose target is
missing in a version are skipped, not failed).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_applied = False
_mode: "_CudaToCpuMode | None" = None


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Patch 2: literal ``device="cuda"`` tensors.

    e.g. ``total_num_tokens = torch.zeros([], device="cuda")`` in
    ``pipeline_parallel/schedules.py``, ``found_inf``/``_scale_one`` in ``optimizer/optimizer.py``,
    ``clip_grads.py`` norms, ``param_and_grad_buffer.py``: each raises "Torch not compiled with CUDA
    enabled". This mode rewrites a cuda ``device=`` argument (and ``Tensor.to("cuda")``) to cpu.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and args:
            args = tuple(_to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


def _noop(*args, **kwargs):
    return None


class _NoopStream:
    """Patch 6: 0.19's DDP grad sync records/waits on ``torch.cuda.current_stream()`` events.
    A class (not a factory function): other libraries use ``torch.cuda.Stream`` in type hints
    (``torch.cuda.Stream | None`` in transformers' generation code)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NoopEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_CUDA_TYPE_STRINGS = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def apply_cpu_shims(force: bool = False) -> bool:
    """Apply the CPU shims if CUDA is absent. Returns whether they are active.

    With CUDA present they would redirect real GPU work to the CPU, so they refuse (return False,
    and change nothing) unless ``force`` is given (tests that fake a CPU-only process)."""
    global _applied, _mode
    if _applied:
        return True
    if torch.cuda.is_available():
        if not force:
            logger.debug("CUDA is available: the CPU shims stay off")
            return False
        logger.warning("CPU shims forced on although CUDA is available: GPU calls go to the CPU")

    # Patch 1: ``torch.cuda.current_device()`` used as a device (global memory buffer, TP gathers in
    # tensor_parallel/mappings.py, p2p shape tensors, RotaryEmbedding's inv_freq) raises
    # "Torch not compiled with CUDA enabled"; on CPU the current device is "cpu".
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    # Patch 3: ``Tensor.cuda()`` calls and ``torch.cuda.synchronize()`` fail without CUDA; on CPU
    # the tensor already is where it should be and there is nothing to wait for.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    torch.cuda.synchronize = _noop  # type: ignore[assignment]
    torch.cuda.empty_cache = _noop  # type: ignore[assignment]

    # Patch 4: the CUDA RNG tracker (tensor_parallel/random.py: model_parallel_cuda_manual_seed,
    # CudaRNGStatesTracker.add/fork) reads and writes CUDA generator states; map them to the CPU
    # generator so forks (attention dropout, TP-local init) are reproducible on CPU too.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore
    try:
        from megatron.core.tensor_parallel import random as mcore_random

        mcore_random._get_cuda_rng_state = (
            lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
        )
        mcore_random._set_cuda_rng_state = (
            lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
        )
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        logger.warning("megatron-core not importable; RNG tracker patch skipped")

    # Patch 5: optimizer code checks ``param.type() == 'torch.cuda.FloatTensor'`` (float16 and
    # distributed optimizers, clip_grads) and rejects CPU params ("Wrapped parameters must be one
    # of torch.cuda.FloatTensor, ..."). Report the CUDA type string for CPU float tensors when
    # ``.type()`` is called with no argument; casting calls (``.type(dtype)``) are unchanged.
    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            cuda_name = _CUDA_TYPE_STRINGS.get(self.dtype)
            if cuda_name is not None:
                return cuda_name
        if dtype is None:
            return original_type(self)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type  # type: ignore[assignment]

    # Patch 6: streams and events (0.19 DDP grad sync, dist_checkpointing async paths).
    torch.cuda.current_stream = lambda device=None: _NoopStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: _NoopStream()  # type: ignore[assignment]
    torch.cuda.Stream = _NoopStream  # type: ignore[assignment]
    torch.cuda.Event = _NoopEvent  # type: ignore[assignment]
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()  # type: ignore[assignment]
    # memory statistics used in logging
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]

    # Patch 2 (see _CudaToCpuMode): process-wide, for the rest of the process.
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _applied = True
    logger.info("megatron-core CPU shims applied (no CUDA)")
    return True


def cpu_shims_active() -> bool:
    return _applied
