"""Start-up checks that the model can be masked correctly (DESIGN invariant 1, "never skip silently").

When the hidden mask can change (hidden pruning is on, or a checkpoint's masks already drop hidden
channels), a masked model only computes what the shrunk model computes if

* every norm of the model is our mask-aware ``RMSNorm`` (it normalises over the kept channels):
  a norm fused into a Transformer Engine linear (``layer_norm_weight``), an ``IdentityOp`` where
  a layer's norm should be, or any other norm class would normalise over all channels; and
* every parameter of the model gets a mask: in a Llama-shaped GPT every weight touches the hidden
  dimension, so a parameter that the mask builder does not know would keep pruned channels alive.

Both checks raise ``MaskInvariantError`` naming the module or parameter. They run on the model
itself (not on the spec that built it), so they hold whichever spec or engine built the model;
``pretrain.pruning.masks.check_hidden_masking_invariants`` runs both at build, over the masks the
builder makes.
"""

from __future__ import annotations

import torch

from megatron_patches.norms import RMSNorm
from pretrain.errors import MaskInvariantError
from pretrain.model.params import unwrap


def hidden_masking_possible(prune_cfg=None, checkpoint_pruning_state: dict | None = None) -> bool:
    """Whether this run's hidden mask can change, or is already partly False.

    ``prune_cfg``: the run's ``PruneConfig`` (None: no pruning flags). ``checkpoint_pruning_state``:
    the pruning callback's state in the checkpoint being loaded (its ``masks["hidden"]``), if any.
    """
    if prune_cfg is not None and prune_cfg.enabled and "hidden" in tuple(prune_cfg.types):
        if not getattr(prune_cfg, "end_pruning", False):
            return True
    masks = (checkpoint_pruning_state or {}).get("masks") or {}
    hidden = masks.get("hidden")
    dropping_state = prune_cfg is not None and getattr(prune_cfg, "drop_state", False)
    return hidden is not None and not dropping_state and not bool(torch.as_tensor(hidden).bool().all())


def _chunk_prefix(model_chunks: list, index: int) -> str:
    return f"model{index}." if len(model_chunks) > 1 else ""


def norms_not_mask_aware(model_chunks: list) -> list[str]:
    """Names of the modules that normalise the hidden states without our hidden mask."""
    from megatron.core.transformer.transformer_layer import TransformerLayer  # lazy: megatron-core is heavy

    bad: dict[str, str] = {}  # module name -> what it is
    for i, chunk in enumerate(model_chunks):
        model, prefix = unwrap(chunk), _chunk_prefix(model_chunks, i)
        for name, module in model.named_modules():
            full = prefix + name
            if isinstance(module, RMSNorm) or full in bad:
                continue
            if isinstance(module, TransformerLayer):
                # the two slots a Llama layer's norms must fill (IdentityOp under the fused TE spec)
                for slot in ("input_layernorm", "pre_mlp_layernorm"):
                    norm = getattr(module, slot, None)
                    if not isinstance(norm, RMSNorm):
                        bad[f"{full}.{slot}"] = f"{type(norm).__name__}, not the mask-aware RMSNorm"
            elif "layer_norm_weight" in dict(module.named_parameters(recurse=False)):
                bad[full] = f"{type(module).__name__}: a norm fused into the linear"
            elif "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False)):
                bad[full] = type(module).__name__
        final = getattr(getattr(model, "decoder", None), "final_layernorm", None)
        if final is not None and not isinstance(final, RMSNorm):
            bad.setdefault(f"{prefix}decoder.final_layernorm", f"{type(final).__name__}, not the mask-aware RMSNorm")
    return [f"{name} ({what})" for name, what in bad.items()]


def check_norms_mask_aware(model_chunks: list) -> None:
    bad = norms_not_mask_aware(model_chunks)
    if bad:
        raise MaskInvariantError(
            "hidden pruning needs every norm to be the mask-aware RMSNorm (megatron_patches/norms.py), "
            f"but {len(bad)} module(s) are not: " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
            + ". Build the model with the 'local' or 'te-unfused' layer spec "
            "(megatron_patches.layer_specs.choose_spec_kind with hidden_masking=True)")


def unmasked_parameters(model_chunks: list, param_masks: dict) -> list[str]:
    """Names of this rank's parameters that ``param_masks`` (param -> mask) has no mask for."""
    missing = []
    for i, chunk in enumerate(model_chunks):
        prefix = _chunk_prefix(model_chunks, i)
        for name, param in unwrap(chunk).named_parameters():
            if param not in param_masks:
                missing.append(prefix + name)
    return missing


def check_masks_cover_model(model_chunks: list, param_masks: dict) -> None:
    missing = unmasked_parameters(model_chunks, param_masks)
    if missing:
        raise MaskInvariantError(
            f"hidden pruning masks every parameter, but {len(missing)} parameter(s) of the model got "
            "no mask from pretrain/pruning/masks.py: " + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
            + ". The layer spec has a module the mask builder does not know; extend the builder "
            "(and pretrain/model/shrunk.py's layout) for it before pruning the hidden dimension")
