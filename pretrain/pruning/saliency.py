"""Saliency estimators and the distributed reducer.

Each estimator turns what the training step already has (weights, the reduced gradients, and,
for ``activation``/``obs``, layer inputs captured by forward hooks on scoring steps only) into a
*partial* table on this rank: per query group ``[L, G]``, per FFN channel ``[L, F]`` and per hidden
channel ``[H]``, each entry the sum of per-weight scores over the group's weights. The partial
tables are built so that their **sum over all ranks is the global table** (the reducer is then a
single all-reduce per scoring step):

* weights split over TP (qkv, proj, fc1, fc2, vocab-split embedding/output) contribute to the
  positions of their own groups; for hidden channels every TP rank and every pipeline stage adds
  its partial sum;
* TP-replicated statistics (norm weights, the full hidden input of qkv/fc1) count on TP rank 0;
* with the distributed optimizer each element's data-parallel-mean gradient lives on exactly one
  DP rank, so each DP rank scores the elements it owns; with a replicated optimizer (and for
  activation statistics, which are per-rank data) each DP rank adds 1/DP of its value.

Estimators (per weight w with gradient g):

* ``taylor``: first order, |sum over the group of w*g| (LLM-Pruner's vector form), or with
  ``element`` form sum |w*g|;
* ``fisher``: second order, 1/2 * w^2 * F with F a running mean of g^2 (diagonal Fisher);
* ``obs``: SparseGPT/OBS cost of removing input channel j of a linear: sum_r w_rj^2 / [H^-1]_jj,
  H = mean x x^T of that linear's inputs (diagonal approximation, or the exact inverse);
* ``activation``: mean |input activation| per channel (Minitron-style), no weights.

Removing an FFN channel = removing input channel c of fc2; a query group = the input columns of
its heads in the output projection; a hidden channel = input column j of qkv, fc1 and the output
layer. That is how ``obs`` and ``activation`` map channels to groups.
"""

from __future__ import annotations

import torch

from pretrain import layout
from pretrain.layout import LocalParam, local_parameters
from pretrain.pruning.masks import GroupScores, ModelShape
from pretrain.pruning.optim_state import is_distributed, iter_param_slots

ESTIMATORS = ("taylor", "fisher", "obs", "activation")
_LINEARS = ("qkv", "proj", "fc1", "fc2", "output")  # the weights whose inputs obs/activation read


def fold_embedding(table: GroupScores, vocab_rows: int) -> torch.Tensor:
    """A hidden channel's score with its embedding share counted as if every row had been seen.

    In one batch only the rows of the tokens it holds get a gradient through the input
    embedding; the other rows score exactly zero, not because they do not matter but because
    there is no evidence. Summing those zeros made a hidden channel of a large-vocabulary model
    (SmolLM2: 49,152 rows, about a fifth of the channel's parameters) look cheap per parameter.
    The channel's cost stays every parameter it holds (saliency per parameter, one global
    ranking, as in the paper); its unseen rows are scored at the mean of its seen rows.
    """
    if table.embedding is None:
        return table.hidden
    seen = table.embedding_signal.clamp(min=1.0)
    return table.hidden + table.embedding * (vocab_rows / seen)


class SaliencyEstimator:
    """Computes this rank's partial table on scoring steps (see the module docstring)."""

    def __init__(self, kind: str, shape: ModelShape, model_chunks: list, optimizer,
                 taylor_form: str = "vector", obs_exact: bool = False, obs_damp: float = 0.01):
        if kind not in ESTIMATORS:
            raise ValueError(f"--saliency {kind!r}: choose one of {', '.join(ESTIMATORS)}")
        if taylor_form not in ("vector", "element"):
            raise ValueError(f"--saliency-taylor-form {taylor_form!r}: vector or element")
        self.kind, self.shape, self.optimizer = kind, shape, optimizer
        self.taylor_form, self.obs_exact, self.obs_damp = taylor_form, obs_exact, obs_damp
        self.entries = local_parameters(model_chunks)
        self.fisher: dict = {}  # param -> running mean of g^2 over the owned range
        self.fisher_count = 0
        self._stats: dict = {}  # module -> [sum x^2 (or x x^T), sum |x|, tokens]
        self._hooks = []
        self._capturing = False
        self._model_chunks = model_chunks
        self._count_weight = 1.0
        if kind in ("obs", "activation"):
            self._install_hooks()

    @property
    def signed(self) -> bool:
        """Partial sums are signed and need abs() after the reduction (vector-form Taylor)."""
        return self.kind == "taylor" and self.taylor_form == "vector"

    # ------------------------------------------------------------------ activation capture
    def _install_hooks(self) -> None:
        for e in self.entries:
            if e.layout.role in _LINEARS:
                self._hooks.append(e.module.register_forward_pre_hook(self._make_hook(e.module)))

    def _make_hook(self, module):
        def hook(mod, args):
            if not self._capturing or not args:
                return None
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            stats = self._stats.get(module)
            if stats is None:
                d = x.shape[-1]
                second = torch.zeros(d, d) if (self.kind == "obs" and self.obs_exact) else torch.zeros(d)
                stats = self._stats[module] = [second.double(), torch.zeros(d, dtype=torch.float64), 0]
            if self.kind == "obs" and self.obs_exact:
                stats[0] += (x.T @ x).double().cpu()
            else:
                stats[0] += x.pow(2).sum(0).double().cpu()
            stats[1] += x.abs().sum(0).double().cpu()
            stats[2] += x.shape[0]
            return None

        return hook

    def begin_capture(self) -> None:
        self._capturing = self.kind in ("obs", "activation")
        self._stats = {}

    def end_capture(self) -> None:
        self._capturing = False

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ scoring
    def _layout(self):
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        return tp, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_world_size()

    def _add_element_scores(self, table: GroupScores, entry: LocalParam, scores: torch.Tensor, tp: int,
                             tp_rank: int) -> None:
        """Add an element-score tensor (the local weight's shape) into the table: along every axis of
        the weight, each unit gets the sum of its elements' scores."""
        where = entry.layout
        if where.role == "embedding":
            # folded into the hidden channels by ``reduce_table``
            table.embedding += layout.sum_along(scores, 1).double()
            # each element counts once over all ranks (owned by one DP rank, or 1/DP on each)
            table.embedding_signal += (scores != 0).sum(0).double() * self._count_weight
            return
        if where.replicated_over_tp and tp_rank != 0:
            return  # every TP rank holds the same values: count them once
        for dim, axis in enumerate(where.axes):
            if layout.UNIT[axis] is not None:
                self._add_units(table, axis, where.layer, layout.sum_along(scores, dim), tp, tp_rank)

    def _add_units(self, table: GroupScores, axis: str, layer: int | None, per_index: torch.Tensor, tp: int,
                   tp_rank: int) -> None:
        unit, index = layout.owned_units(axis, layer, self.shape, tp, tp_rank)
        getattr(table, unit)[index] += layout.fold(axis, per_index, self.shape).double()

    @torch.no_grad()
    def partial_table(self) -> GroupScores:
        """This rank's partial table for the step that just ran backward (grads reduced)."""
        tp, tp_rank, dp = self._layout()
        table = GroupScores.zeros(self.shape, with_embedding=True)
        if self.kind in ("taylor", "fisher"):
            self._gradient_scores(table, tp, tp_rank, dp)
        else:
            self._activation_scores(table, tp, tp_rank, dp)
        return table

    def _gradient_scores(self, table: GroupScores, tp: int, tp_rank: int, dp: int) -> None:
        distributed = is_distributed(self.optimizer)
        scale = 1.0 if distributed else 1.0 / dp
        self._count_weight = scale
        by_param = {e.param: e for e in self.entries if e.param is not None}
        seen = set()
        self.fisher_count += 1
        for slot in iter_param_slots(self.optimizer):
            entry = by_param.get(slot.param)
            if entry is None or slot.end <= slot.start or slot.param in seen:
                continue
            seen.add(slot.param)
            param = slot.param
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None:
                continue
            w = param.detach().reshape(-1)[slot.start:slot.end].float()
            g = grad.detach().reshape(-1)[slot.start:slot.end].float()
            if self.kind == "taylor":
                e = w * g if self.signed else (w * g).abs()
            else:
                running = self.fisher.get(param)
                if running is None:
                    running = self.fisher[param] = torch.zeros_like(g)
                running.mul_(1 - 1 / self.fisher_count).add_(g * g, alpha=1 / self.fisher_count)
                e = 0.5 * w * w * running
            full = torch.zeros(param.numel(), dtype=torch.float32, device=e.device)
            full[slot.start:slot.end] = e * scale
            self._add_element_scores(table, entry, full.view_as(param).cpu(), tp, tp_rank)

    def _activation_scores(self, table: GroupScores, tp: int, tp_rank: int, dp: int) -> None:
        """Per input channel of each linear (its last axis): mean |x| (activation) or
        sum_r w_rj^2 / [H^-1]_jj (obs), added to the units that channel belongs to."""
        for entry in self.entries:
            stats = self._stats.get(entry.module) if entry.layout.role in _LINEARS else None
            if stats is None or stats[2] == 0:
                continue
            input_axis = entry.layout.axes[-1]
            second, absolute, tokens = stats
            if self.kind == "activation":
                per_channel = absolute / tokens
                if input_axis not in layout.TP_SPLIT and tp_rank != 0:
                    continue  # the full hidden input is replicated across TP
            else:
                weight = entry.applied_weight if entry.applied_weight is not None else entry.param
                w2 = weight.detach().float().pow(2).sum(0).double().cpu()  # per input column
                if self.obs_exact:
                    h = second / tokens
                    damp = self.obs_damp * torch.diagonal(h).mean().clamp(min=1e-12)
                    hinv_diag = torch.diagonal(torch.linalg.inv(h + damp * torch.eye(h.shape[0], dtype=h.dtype)))
                    per_channel = w2 / hinv_diag
                else:
                    per_channel = w2 * (second / tokens)
            self._add_units(table, input_axis, entry.layout.layer, per_channel / dp, tp, tp_rank)


def reduce_table(partial: GroupScores, shape: ModelShape, signed: bool) -> GroupScores:
    """The distributed reducer: one all-reduce of the packed partial tables over all ranks."""
    flat = partial.pack()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.cuda.is_available():  # NCCL reduces device tensors
            flat = flat.cuda()
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
    table = GroupScores.unpack(flat, shape)
    table = GroupScores(table.heads, table.ffn, fold_embedding(table, shape.vocab))
    return table.abs() if signed else table
