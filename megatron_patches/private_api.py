"""Every private or internal megatron-core name this project uses, in one place.

megatron-core has no public API for these; each entry says where the code uses it and why. On a
new release, run ``python -m megatron_patches.private_api`` (``bench/gpu_check.sh`` does it first):
it lists the names that no longer resolve, so one run tells which ones moved.

Names are ``module:attribute.path``; an attribute path that starts with an instance attribute (set
in ``__init__``, not on the class) is marked ``instance=True`` and checked by source text only.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from megatron_patches.versions import installed_megatron_core_version


@dataclass(frozen=True)
class PrivateName:
    target: str  # "module:attr.attr"
    used_in: str
    why: str
    instance: bool = False  # set on instances in __init__: checked in the class's source
    read_in: str | None = None  # a hook megatron-core calls: the module whose source must call it


PRIVATE_NAMES: tuple[PrivateName, ...] = (
    PrivateName("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._get_model_param_range_map",
                "pretrain/engines/megatron.py", "the range of a parameter this DP rank owns"),
    PrivateName("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._get_main_param_and_optimizer_states",
                "pretrain/engines/megatron.py", "fp32 master and Adam moments of a parameter, to zero masked ones"),
    PrivateName("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
                "megatron_patches/optimizer_compat.py", "torch-Adam 'step' fix on checkpoint load"),
    PrivateName("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.model_param_gbuf_map",
                "pretrain/engines/megatron.py", "recognise a distributed optimizer, list its params", True),
    PrivateName("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.model_param_group_index_map",
                "megatron_patches/optimizer_compat.py", "find a parameter's torch-optimizer state", True),
    PrivateName("megatron.core.optimizer.distrib_optimizer:Adam",
                "megatron_patches/optimizer_compat.py", "which Adam megatron-core picked (torch / apex / TE)"),
    PrivateName("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.float16_groups",
                "pretrain/engines/megatron.py", "bf16 params without the distributed optimizer", True),
    PrivateName("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.fp32_from_float16_groups",
                "pretrain/engines/megatron.py", "their fp32 master copies", True),
    PrivateName("megatron.core.optimizer.optimizer:ChainedOptimizer.chained_optimizers",
                "pretrain/engines/megatron.py", "the optimizers inside a chained one", True),
    PrivateName("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
                "megatron_patches/cpu_shim.py", "CPU only: RNG tracker on the CPU generator"),
    PrivateName("megatron.core.tensor_parallel.random:_set_cuda_rng_state",
                "megatron_patches/cpu_shim.py", "CPU only: RNG tracker on the CPU generator"),
    PrivateName("megatron.core.dist_checkpointing.strategies.filesystem_async:_results_queue",
                "pretrain/checkpoint/__init__.py", "a queue from a manager that survives forked writers"),
    PrivateName("megatron.core.extensions.transformer_engine:HAVE_TE",
                "megatron_patches/layer_specs.py", "whether megatron-core's TE classes are real (not mocks)"),
    PrivateName("megatron.core.transformer.transformer_config:TransformerConfig.heterogeneous_block_specs",
                "megatron_patches/per_layer_config.py", "the block asks the config for each layer's widths",
                True, "megatron.core.transformer.transformer_block"),
    PrivateName("megatron.core.transformer.transformer_config:TransformerConfig.get_config_for_layer",
                "megatron_patches/per_layer_config.py", "per-layer widths: the hook the block calls",
                True, "megatron.core.transformer.transformer_block"),
    PrivateName("megatron.core.transformer.transformer_layer:TransformerLayerSubmodules.sharded_state_dict_keys_map",
                "megatron_patches/layer_specs.py", "same checkpoint keys for fused and separate norms", True),
    PrivateName("megatron.core.models.common.embeddings.rotary_pos_embedding:RotaryEmbedding._apply_scaling",
                "pretrain/interop/hf_config.py", "Llama 3 RoPE scaling constants mirrored for HF export"),
)


def _resolve(target: str):
    module_name, _, path = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _in_class_source(target: str, read_in: str | None = None) -> bool:
    """An instance attribute: the class (or a base) or one of its module's functions sets it; a
    hook (``read_in``): that module's source still uses the name."""
    module_name, _, path = target.partition(":")
    if read_in is not None:
        return path.rpartition(".")[2] in inspect.getsource(importlib.import_module(read_in))
    class_path, _, attribute = path.rpartition(".")
    module = importlib.import_module(module_name)
    cls = _resolve(f"{module_name}:{class_path}")
    sources = [inspect.getsource(module)]
    for base in getattr(cls, "__mro__", ())[1:]:
        try:
            sources.append(inspect.getsource(inspect.getmodule(base)))
        except (TypeError, OSError):
            continue
    return any(attribute in text for text in sources) or hasattr(cls, attribute) or (
        attribute in getattr(cls, "__dataclass_fields__", {}))


def missing_names() -> list[tuple[PrivateName, str]]:
    """The entries that do not resolve on the installed megatron-core, with the error."""
    missing = []
    for entry in PRIVATE_NAMES:
        try:
            if entry.instance:
                if not _in_class_source(entry.target, entry.read_in):
                    missing.append((entry, "attribute no longer set by the class"))
            else:
                _resolve(entry.target)
        except (ImportError, AttributeError, OSError, TypeError) as err:
            missing.append((entry, f"{type(err).__name__}: {err}"))
    return missing


def main() -> int:
    missing = missing_names()
    print(f"megatron-core {installed_megatron_core_version()}: {len(PRIVATE_NAMES) - len(missing)} of "
          f"{len(PRIVATE_NAMES)} private names resolve")
    for entry, error in missing:
        print(f"  MISSING {entry.target} (used in {entry.used_in}: {entry.why}): {error}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
