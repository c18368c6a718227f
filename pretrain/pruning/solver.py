"""The global budget solver: which groups to drop so the model meets this step's parameter target.

Greedy on one scale for all three group types: at every move it drops the candidate unit with
the lowest saliency per parameter (the sum of its groups' scores over the parameters it removes),
so the data, not a hand-set ratio, decides whether heads, FFN channels or hidden channels go.
A unit is the smallest removal that keeps the model shrinkable and fast:

* attention: TP query groups of one layer (``per-layer``) or of every layer (``uniform``), so
  each layer's kept groups stay a multiple of TP (whole groups keep heads-per-group uniform);
* FFN: TP x align channels of one layer (or of every layer);
* hidden: ``align`` channels (shared by the whole model).

A unit never takes a type below its minimum. Near the target a unit may overshoot it by at most
the cost of the cheapest unit that can still move (so a 64-channel hidden unit of a large-vocabulary
model waits while heads or FFN units close the gap); when the small units ran out first and a
large one had to land far below the target, the most salient units taken earlier are given back
while the model stays at or below it (``_give_back``). One event removes at most
``max_step_fraction`` of the parameters it starts from (a safety cap on real models). With
``allocation="proportional"`` every type shrinks by the same fraction (LLM-Pruner's fixed-ratio
practice, the baseline the global ranking must beat). Masks only shrink. Ties break by type order, then
layer, then channel index, so the result is a pure function of its inputs (every rank computes
the same answer; the callback still broadcasts rank 0's and checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.model.shape import GROUP_TYPES, GroupMasks, ModelShape
from pretrain.pruning.masks import GroupScores

ALLOCATIONS = ("global", "proportional")


@dataclass(frozen=True)
class SolverConstraints:
    tensor_parallel: int = 1
    align: int = 8
    min_groups: int = 1
    min_ffn: int = 0
    min_hidden: int = 0
    granularity: str = "per-layer"  # or "uniform"
    prune_types: tuple = ("heads", "ffn", "hidden")
    pipeline_parallel: int = 1  # dropped layers come in units of PP, so the rest still splits
    min_layers: int = 1
    allocation: str = "global"  # or "proportional": every type by the same fraction
    max_step_fraction: float = 1.0  # one event removes at most this fraction of its parameters

    def group_unit(self) -> int:
        return self.tensor_parallel

    def ffn_unit(self) -> int:
        return self.tensor_parallel * self.align

    def hidden_unit(self) -> int:
        return self.align


def unit_size(kept: int, unit: int, minimum: int) -> int:
    """Groups to remove next: back to a multiple of ``unit`` first, else one unit; 0 if at minimum."""
    size = kept % unit or unit
    return size if kept - size >= max(minimum, unit) else 0


def _lowest(scores: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    idx = torch.nonzero(kept).flatten()
    # stable sort on (score, index): deterministic under ties
    order = torch.sort(scores[idx].double(), stable=True).indices
    return idx[order[:count]]


def _kept_fractions(shape: ModelShape, masks: GroupMasks) -> dict:
    full = shape.full_masks()
    return {"heads": float(masks.heads.sum()) / max(int(full.heads.sum()), 1),
            "ffn": float(masks.ffn.sum()) / max(int(full.ffn.sum()), 1),
            "hidden": float(masks.hidden.sum()) / shape.hidden,
            "layers": float(masks.layers.sum()) / shape.num_layers}


def _candidates(shape: ModelShape, new: GroupMasks, scores: GroupScores, c: SolverConstraints) -> list[tuple]:
    """Every unit that may go next: (saliency per parameter, type order, layer, kind, layers, picks, cost)."""
    h_kept = int(new.hidden.sum())
    groups_kept = new.heads.sum(1)
    ffn_kept = new.ffn.sum(1)
    min_groups = max(c.min_groups, c.group_unit())
    candidates = []
    alive = [l for l in range(shape.num_layers) if bool(new.layers[l])]
    layer_sets = [alive] if c.granularity == "uniform" else [[l] for l in alive]

    def per_layer_units(kind: str, tie_break: int, kept, unit: int, minimum: int, type_scores, type_mask,
                        unit_cost: int) -> None:
        """One candidate per layer set: its ``unit`` least salient kept groups of ``kind``."""
        for layers in layer_sets:
            size = unit_size(int(kept[layers[0]]), unit, minimum)
            if size == 0 or any(int(kept[l]) != int(kept[layers[0]]) for l in layers):
                continue
            picks = [_lowest(type_scores[l], type_mask[l], size) for l in layers]
            cost = len(layers) * size * unit_cost
            score = float(sum(type_scores[l][p].double().sum() for l, p in zip(layers, picks)))
            candidates.append((score / max(cost, 1), tie_break, layers[0], kind, layers, picks, cost))

    if "heads" in c.prune_types:
        per_layer_units("heads", 0, groups_kept, c.group_unit(), min_groups, scores.heads, new.heads,
                        shape.group_cost(h_kept))
    if "ffn" in c.prune_types:
        per_layer_units("ffn", 1, ffn_kept, c.ffn_unit(), c.min_ffn, scores.ffn, new.ffn,
                        shape.ffn_channel_cost(h_kept))
    if "layers" in c.prune_types:
        kept_layers = torch.nonzero(new.layers).flatten()
        size = unit_size(len(kept_layers), c.pipeline_parallel, c.min_layers)
        if size:
            layer_scores = scores.heads.double().mul(new.heads).sum(1) + scores.ffn.double().mul(new.ffn).sum(1)
            order = torch.sort(layer_scores[kept_layers], stable=True).indices[:size]
            picks_l = [int(kept_layers[i]) for i in order]
            cost = sum(shape.layer_cost(int(groups_kept[l]), int(ffn_kept[l]), h_kept) for l in picks_l)
            score = float(sum(layer_scores[l] for l in picks_l))
            candidates.append((score / max(cost, 1), 3, picks_l[0], "layers", picks_l, [], cost))
    if "hidden" in c.prune_types:
        size = unit_size(h_kept, c.hidden_unit(), c.min_hidden)
        if size:
            pick = _lowest(scores.hidden, new.hidden, size)
            cost = size * shape.hidden_channel_cost(new)
            score = float(scores.hidden[pick].double().sum())
            candidates.append((score / max(cost, 1), 2, 0, "hidden", [], [pick], cost))
    return candidates


def _admissible(candidates: list[tuple], deficit: int, budget: int, allocation: str,
                kept: dict, slack: int | None = None) -> list[tuple]:
    """The candidates this move may choose from.

    * the cap: a unit that would take the event past ``budget`` removed parameters is out;
    * the overshoot bound: a unit may overshoot the target by at most the cost of the cheapest
      unit that can still move, so near the target a big hidden unit waits while smaller heads or
      FFN units close the gap (the cheapest unit itself always qualifies); with ``slack`` (how far
      the model is above the *final* target of a gradual schedule) any unit within it qualifies:
      an intermediate event may then run ahead of its step target by one unit and the next
      events wait for the schedule to catch up. Without this, every small step of a gradual
      schedule is closer to its target than one hidden unit, so hidden channels could only go
      once heads and FFN sat at their floors, whatever their saliency;
    * ``proportional``: only the types kept the most (as a fraction of their full size) may move,
      so every type shrinks by the same fraction (LLM-Pruner's fixed ratio), saliency choosing
      only *which* groups of that type go.
    """
    fitting = [t for t in candidates if t[6] <= budget]
    if not fitting:
        return []
    smallest = min(t[6] for t in fitting)
    fitting = [t for t in fitting if t[6] - deficit <= smallest or (slack is not None and t[6] <= slack)]
    if allocation == "proportional":
        most = max(kept[t[3]] for t in fitting)
        fitting = [t for t in fitting if kept[t[3]] >= most - 1e-12]
    return fitting


def solve(shape: ModelShape, masks: GroupMasks, scores: GroupScores, target_params: int,
          constraints: SolverConstraints, final_params: int | None = None) -> tuple[GroupMasks, list[dict]]:
    """Return (new masks, moves); each move says what was dropped, its cost and saliency (moves
    given back at the end, see ``_give_back``, are left out). ``final_params``: the schedule's
    final target, when this event is one step of a gradual schedule (see ``_admissible``).

    The event stops short of the target when the next unit would exceed the cap
    (``constraints.max_step_fraction`` of the parameters before the event)."""
    c = constraints
    if c.granularity not in ("per-layer", "uniform"):
        raise ValueError(f"unknown granularity {c.granularity!r}")
    if c.allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {c.allocation!r}: choose {' or '.join(ALLOCATIONS)}")
    new = masks.clone()
    moves: list[dict] = []
    params = shape.parameter_count(new)
    budget = int(c.max_step_fraction * params)  # parameters this event may remove at most
    while params > target_params:
        removed = shape.parameter_count(masks) - params
        admissible = _admissible(_candidates(shape, new, scores, c), params - target_params, budget - removed,
                                 c.allocation, _kept_fractions(shape, new),
                                 None if final_params is None else params - final_params)
        if not admissible:
            break  # every type is at its minimum, or the cap is reached: the target is not met
        saliency, _, _, kind, layers, picks, cost = min(admissible, key=lambda t: (t[0], t[1], t[2]))
        _drop(new, kind, layers, picks)
        params = shape.parameter_count(new)
        moves.append({"type": kind, "layers": layers,
                      "count": len(layers) if kind == "layers" else int(sum(len(p) for p in picks)),
                      "params_removed": cost, "saliency_per_param": saliency, "params_after": params,
                      "_picks": picks})
    # a step of a gradual schedule keeps its lead (the next events wait); the final one is trimmed
    if params < target_params and (final_params is None or target_params <= final_params) and \
            _give_back(shape, new, moves, target_params, c):
        # the kept moves' costs changed with what went back (a hidden channel's cost counts the
        # FFN channels kept): replay them so each one's cost is again exactly what it removes
        moves = [m for m in moves if not m.get("given_back")]
        replay = masks.clone()
        for m in moves:
            before = shape.parameter_count(replay)
            _drop(replay, m["type"], m["layers"], m["_picks"])
            m["params_after"] = shape.parameter_count(replay)
            m["params_removed"] = before - m["params_after"]
        assert replay.equal(new)
    for m in moves:
        del m["_picks"]
    return new, moves


def _give_back(shape: ModelShape, new: GroupMasks, moves: list[dict], target_params: int,
               c: SolverConstraints) -> bool:
    """Undo the most salient of this event's moves that fit below the target again (in place;
    marks them ``given_back``); whether any went back.

    The greedy takes the cheapest units first, so on a model whose small units (FFN channels,
    query groups) run out before the target, the last move is a large unit (64 hidden channels)
    that lands far below the target, and every small unit taken on the way is a loss for nothing:
    a tiny untied model pruned to 50% in one shot ended at 44.7% with its FFN at its floor.
    Putting back whole earlier units, most salient per parameter first, while the model stays at
    or below the target keeps the greedy's choice of the large unit and spends the overshoot on
    the units that matter most (a knapsack's greedy fill of the gap). A unit is put back only as
    it was taken and only when the result still satisfies the constraints, so masks stay valid;
    dropped layers stay dropped. The overshoot then exceeds the cheapest unit only when no move
    of this event fits back.
    """
    params = shape.parameter_count(new)
    order = sorted(reversed(moves), key=lambda m: -m["saliency_per_param"])  # ties: the later move first
    changed = True
    while changed and params < target_params:  # proportional: a type may become the least kept later
        changed = False
        for m in order:
            if m["type"] == "layers" or m.get("given_back"):
                continue
            if c.allocation == "proportional":  # only the type kept least goes back: fractions stay level
                kept = _kept_fractions(shape, new)
                if kept[m["type"]] > min(kept[t] for t in GROUP_TYPES if t in c.prune_types) + 1e-12:
                    continue
            trial = new.clone()
            _drop(trial, m["type"], m["layers"], m["_picks"], keep=True)
            trial_params = shape.parameter_count(trial)
            if trial_params <= target_params and not check_constraints(shape, trial, c):
                new.heads, new.ffn, new.hidden = trial.heads, trial.ffn, trial.hidden
                params, m["given_back"], changed = trial_params, True, True
    return any(m.get("given_back") for m in moves)


def _drop(masks: GroupMasks, kind: str, layers: list, picks: list, keep: bool = False) -> None:
    """Drop a unit (``keep=True``: put a dropped heads, FFN or hidden unit back; a dropped layer
    is never given back)."""
    if kind in ("heads", "ffn"):
        table = getattr(masks, kind)
        for l, p in zip(layers, picks):
            table[l, p] = keep
    elif kind == "layers":
        for l in layers:
            masks.drop_layer(l)
    else:
        masks.hidden[picks[0]] = keep


def check_constraints(shape: ModelShape, masks: GroupMasks, constraints: SolverConstraints) -> list[str]:
    """Violations of the shrinkability constraints (empty when the masks are valid)."""
    c = constraints
    problems = []
    groups = masks.heads.sum(1)
    ffn = masks.ffn.sum(1)
    hidden = int(masks.hidden.sum())
    kept_layers = int(masks.layers.sum())
    if kept_layers % c.pipeline_parallel:
        problems.append(f"{kept_layers} layers kept, not a multiple of PP {c.pipeline_parallel}")
    if kept_layers < max(c.min_layers, 1):
        problems.append(f"{kept_layers} layers kept, below the minimum")
    for l in range(shape.num_layers):
        if not bool(masks.layers[l]):
            if bool(masks.heads[l].any() or masks.ffn[l].any()):
                problems.append(f"layer {l} is dropped but still has groups")
            continue
        if int(groups[l]) % c.tensor_parallel:
            problems.append(f"layer {l}: {int(groups[l])} query groups kept, not a multiple of TP {c.tensor_parallel}")
        if int(groups[l]) < max(c.min_groups, 1) and int(groups[l]) != shape.groups_of(l):
            problems.append(f"layer {l}: {int(groups[l])} query groups kept, below the minimum")
        if int(ffn[l]) % c.ffn_unit() and int(ffn[l]) != shape.ffn_of(l):
            problems.append(f"layer {l}: FFN width {int(ffn[l])} not a multiple of TP x align {c.ffn_unit()}")
        if int(ffn[l]) < c.min_ffn and int(ffn[l]) != shape.ffn_of(l):
            problems.append(f"layer {l}: FFN width {int(ffn[l])} below the minimum {c.min_ffn}")
    if hidden % c.hidden_unit() and hidden != shape.hidden:
        problems.append(f"hidden width {hidden} not a multiple of align {c.hidden_unit()}")
    if hidden < c.min_hidden and hidden != shape.hidden:
        problems.append(f"hidden width {hidden} below the minimum {c.min_hidden}")
    if c.granularity == "uniform":
        alive = masks.layers
        if len(set(groups[alive].tolist())) > 1 or len(set(ffn[alive].tolist())) > 1:
            problems.append("uniform granularity but layers differ")
    return problems
