"""Pruning-aware pretraining on megatron-core: configs, model, data, loop, checkpoints."""
