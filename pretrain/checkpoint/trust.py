"""Reading a checkpoint's pickles without running code from them.

Our own files are read with ``torch.load(weights_only=True)``; DCP's ``.metadata`` through an
allowlist (``pretrain.checkpoint.stream.read_dcp_metadata``); DCP's byte objects and ``common.pt``
are checked with ``weights_only=True`` before megatron-core (which unpickles them freely) reads them.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import torch

from pretrain.checkpoint.files import CheckpointError
from pretrain.checkpoint.stream import CheckpointReader, DCPFormatError


def _numpy_array_globals() -> list:
    """What a pickled numpy array (the numpy RNG state in ``rng/*.pt``) needs: data only."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_without_code(source, what: str):
    """``torch.load`` that never runs code from the file (``weights_only=True``, numpy arrays
    allowed); a file that would is refused with CheckpointError naming ``what``."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{what}: refused: it holds Python objects other than tensors and plain data "
                              f"(a pickle that could run code: {str(err).splitlines()[-1][:300]}). "
                              "Only load checkpoints from a source you trust") from None
    except Exception as err:
        raise CheckpointError(f"{what}: unreadable ({type(err).__name__}: {str(err)[:300]}); "
                              "the file is corrupt or not a checkpoint file") from None


def check_dcp_pickles(dcp_dir: str) -> None:
    """Refuse a DCP folder whose pickles would run code when megatron-core/torch read them:
    ``.metadata`` (read by DCP with plain ``pickle.load``), its byte objects (read by DCP with
    ``weights_only=False``) and ``*.pt`` files (``common.pt``, sharded objects)."""
    try:
        reader = CheckpointReader(dcp_dir)  # reads .metadata through an allowlist
        objects = {key: reader.read_bytes(key) for key in reader.keys() if reader.tensor_meta(key) is None}
    except DCPFormatError as err:
        raise CheckpointError(str(err)) from None
    for key, raw in objects.items():
        load_without_code(io.BytesIO(raw), f"{dcp_dir}: object {key}")
    for name in sorted(os.listdir(dcp_dir)):
        if name.endswith(".pt"):
            load_without_code(os.path.join(dcp_dir, name), os.path.join(dcp_dir, name))
