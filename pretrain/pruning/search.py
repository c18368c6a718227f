"""Minitron's architecture search for a pruning event (``--prune-allocation search``).

NVIDIA's Minitron (Model-Optimizer ``mcore_minitron`` with a ``params`` constraint) does not rank
heads, FFN channels and hidden channels on one scale. It ranks the groups *within* each axis by
their activation importance, and chooses how wide each axis stays by a search:

1. the choices of each axis are the multiples of a divisor up to its size (hidden 256, FFN 512 in
   Model-Optimizer's defaults), of which only the widest ``1 - max_width_pruning`` part is kept
   (``sorted(choices)[int((1 - max_width_pruning) * len(choices)):]``; 40% by default);
2. every combination is a homogeneous candidate (the same width in every layer); those at or
   under the parameter target are sorted by parameters, largest first, and the first ``top_k``
   (10) are kept;
3. each of them is applied (the most important groups of each axis kept) and scored by a score
   function, here the loss on the same ``--eval-iters`` batches of the validation split (never
   the test set); the lowest loss wins.

Here the axes are the hidden channels, the FFN channels per layer and the query groups per layer
(whole groups: the unit this system shrinks; Model-Optimizer can also prune heads inside a
group), each only if it is in ``--prune-types``. Depth is not searched (Model-Optimizer's
``hparams_to_skip=["num_layers"]``; its default allows 20% of the layers to go). Which groups of
an axis stay is the saliency table's ranking (``--saliency activation`` is Minitron's). Masks only
shrink: a later event searches under what is kept.

The candidates' forward passes are charged to the run (``search_flops``: the comparison adds them).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from pretrain.model.shape import GroupMasks, ModelShape
from pretrain.pruning.masks import GroupScores


@dataclass(frozen=True)
class SearchSettings:
    top_k: int = 10
    max_width_pruning: float = 0.4
    hidden_divisor: int = 256
    ffn_divisor: int = 512
    group_unit: int = 1  # query groups come in multiples of TP
    types: tuple = ("heads", "ffn", "hidden")


@dataclass(frozen=True)
class Candidate:
    """One homogeneous shape: the kept hidden channels, FFN channels and query groups of every layer."""

    hidden: int
    ffn: int
    groups: int
    params: int

    def as_dict(self) -> dict:
        return {"hidden": self.hidden, "ffn": self.ffn, "groups": self.groups, "params": self.params}


def axis_choices(size: int, divisor: int, max_width_pruning: float) -> list[int]:
    """Model-Optimizer's choices of one axis of ``size``: the multiples of ``divisor`` below it and
    the size itself, of which the widest ``1 - max_width_pruning`` part."""
    values = sorted({*range(divisor, size, divisor), size})
    return values[int((1 - max_width_pruning) * len(values)):]


def _kept(masks: GroupMasks) -> tuple[int, int, int]:
    """The widths every alive layer still has (the narrowest layer's, so a candidate fits every layer)."""
    alive = masks.layers
    return int(masks.hidden.sum()), int(masks.ffn[alive].sum(1).min()), int(masks.heads[alive].sum(1).min())


def candidates(shape: ModelShape, masks: GroupMasks, target_params: int, settings: SearchSettings) -> list[Candidate]:
    """The ``top_k`` largest homogeneous shapes at or under ``target_params`` that ``masks`` can
    still reach; ties in size go to the wider hidden, then FFN (a pure function of its inputs)."""
    hidden, ffn, groups = _kept(masks)

    def axis(kind: str, size: int, kept: int, divisor: int) -> list[int]:
        if kind not in settings.types:
            return [kept]
        return [c for c in axis_choices(size, divisor, settings.max_width_pruning) if c <= kept] or [kept]

    layers = int(masks.layers.sum())
    found = []
    for h, f, g in itertools.product(axis("hidden", shape.hidden, hidden, settings.hidden_divisor),
                                     axis("ffn", shape.ffn, ffn, settings.ffn_divisor),
                                     axis("heads", shape.num_groups, groups, settings.group_unit)):
        # every alive layer keeps at least these widths (``_kept``), so each ends with exactly them
        params = shape.homogeneous_parameter_count(layers, g, f, h)
        if params <= target_params:
            found.append(Candidate(h, f, g, params))
    found.sort(key=lambda c: (-c.params, -c.hidden, -c.ffn, -c.groups))
    return found[:settings.top_k]


def _most_important(scores: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring kept entries (ties to the lower index), as a mask."""
    index = torch.nonzero(kept).flatten()
    order = torch.sort(-scores[index].double(), stable=True).indices
    out = torch.zeros_like(kept)
    out[index[order[:count]]] = True
    return out


def apply(masks: GroupMasks, scores: GroupScores, candidate: Candidate) -> GroupMasks:
    """``masks`` narrowed to ``candidate``: each axis keeps its most important groups (hidden
    channels over the whole model, FFN channels and query groups within each layer)."""
    new = masks.clone()
    new.hidden = _most_important(scores.hidden, masks.hidden, candidate.hidden)
    for layer in torch.nonzero(masks.layers).flatten().tolist():
        new.ffn[layer] = _most_important(scores.ffn[layer], masks.ffn[layer], candidate.ffn)
        new.heads[layer] = _most_important(scores.heads[layer], masks.heads[layer], candidate.groups)
    return new


def smallest_reachable(shape: ModelShape, masks: GroupMasks, settings: SearchSettings) -> int:
    """Parameters of the narrowest shape the search space holds (to refuse an unreachable target
    before any training)."""
    found = candidates(shape, masks, shape.parameter_count(masks), dataclasses.replace(settings, top_k=10**9))
    return found[-1].params if found else shape.parameter_count(masks)
