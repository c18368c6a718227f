"""A memory counter for torch ops on any device: the bytes of the tensors that ops run under it
allocate, how many are alive at once, and the peak.

CPU has no ``torch.cuda.max_memory_allocated``; this counts at the dispatcher instead. Every op's
outputs whose storage is new (not one of the op's inputs, not counted already) are counted while
they are alive (a weak reference to the storage tells when it is freed). What an op allocates
and frees inside itself (a kernel's scratch buffer) is not seen; what it returns is.

    with AllocationCounter() as counter:
        estimator.partial_table()
    counter.peak_bytes
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationCounter(TorchDispatchMode):
    """Peak bytes of the tensors allocated (and still referenced) by the ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self._alive: dict = {}  # (device, data_ptr) -> (weak reference, bytes)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0  # the largest single allocation

    def _forget_freed(self) -> None:
        for key in [k for k, (ref, _) in self._alive.items() if ref.expired()]:
            self.current_bytes -= self._alive.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._forget_freed()
        inputs = {(t.device, t.untyped_storage().data_ptr())
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if storage.nbytes() == 0 or key in inputs or key in self._alive:
                continue
            self._alive[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current_bytes += storage.nbytes()
            self.largest_bytes = max(self.largest_bytes, storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
