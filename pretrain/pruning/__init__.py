"""Pruning-aware pretraining: group masks, saliency, the distributed reducer, the global budget
solver and the schedule, plugged into the trainer as one callback (``PruningCallback``)."""
