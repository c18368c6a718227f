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

from dataclasses import dataclass

import torch

from pretrain.pruning.masks import ModelShape
from pretrain.pruning.optim_state import is_distributed, iter_param_slots

ESTIMATORS = ("taylor", "fisher", "obs", "activation")


@dataclass
class Table:
    heads: torch.Tensor  # float64 [L, G]
    ffn: torch.Tensor  # float64 [L, F]
    hidden: torch.Tensor  # float64 [H]
    # partial tables only (``reduce_table`` folds them into ``hidden``): the input embedding's
    # share of each hidden channel's score, and how many of the channel's embedding entries
    # received any signal (a non-zero score)
    embedding: torch.Tensor | None = None  # float64 [H]
    embedding_signal: torch.Tensor | None = None  # float64 [H]

    @classmethod
    def zeros(cls, shape: ModelShape, with_embedding: bool = False) -> "Table":
        extra = [torch.zeros(shape.hidden, dtype=torch.float64) for _ in range(2)] if with_embedding else []
        return cls(torch.zeros(shape.num_layers, shape.num_groups, dtype=torch.float64),
                   torch.zeros(shape.num_layers, shape.ffn, dtype=torch.float64),
                   torch.zeros(shape.hidden, dtype=torch.float64), *extra)

    def pack(self) -> torch.Tensor:
        extra = [self.embedding, self.embedding_signal] if self.embedding is not None else []
        return torch.cat([self.heads.flatten(), self.ffn.flatten(), self.hidden, *extra])

    @classmethod
    def unpack(cls, flat: torch.Tensor, shape: ModelShape) -> "Table":
        a = shape.num_layers * shape.num_groups
        b = a + shape.num_layers * shape.ffn
        h = shape.hidden
        extra = [flat[b + h:b + 2 * h].clone(), flat[b + 2 * h:b + 3 * h].clone()] if len(flat) > b + h else []
        return cls(flat[:a].view(shape.num_layers, shape.num_groups).clone(),
                   flat[a:b].view(shape.num_layers, shape.ffn).clone(), flat[b:b + h].clone(), *extra)

    def state_dict(self) -> dict:
        return {"heads": self.heads, "ffn": self.ffn, "hidden": self.hidden}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Table":
        return cls(d["heads"].double(), d["ffn"].double(), d["hidden"].double())


def fold_embedding(table: Table, vocab_rows: int) -> torch.Tensor:
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


@dataclass
class _Entry:
    param: torch.nn.Parameter | None
    role: str  # qkv | proj | fc1 | fc2 | norm | embedding | output
    layer: int  # global layer index (-1 for model-level params)
    module: torch.nn.Module | None = None
    input_weight: torch.Tensor | None = None  # the weight applied to the module's input (obs)


def _model_entries(model_chunks: list) -> list[_Entry]:
    from megatron_patches.norms import RMSNorm
    from pretrain.model import unwrap

    entries = []
    for chunk in model_chunks:
        model = unwrap(chunk)
        tied = getattr(model, "share_embeddings_and_output_weights", False)
        if getattr(model, "pre_process", False):
            entries.append(_Entry(model.embedding.word_embeddings.weight, "embedding", -1))
        for layer in model.decoder.layers:
            i = layer.layer_number - 1
            attn, mlp = layer.self_attention, layer.mlp
            entries += [_Entry(attn.linear_qkv.weight, "qkv", i, attn.linear_qkv),
                        _Entry(attn.linear_proj.weight, "proj", i, attn.linear_proj),
                        _Entry(mlp.linear_fc1.weight, "fc1", i, mlp.linear_fc1),
                        _Entry(mlp.linear_fc2.weight, "fc2", i, mlp.linear_fc2)]
            qkv_bias = getattr(attn.linear_qkv, "bias", None)
            if isinstance(qkv_bias, torch.nn.Parameter):  # Qwen2: part of its query group
                entries.append(_Entry(qkv_bias, "qkv_bias", i))
            for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
                if isinstance(norm, RMSNorm):
                    entries.append(_Entry(norm.weight, "norm", i))
        final = getattr(model.decoder, "final_layernorm", None)
        if isinstance(final, RMSNorm):
            entries.append(_Entry(final.weight, "norm", -1))
        if getattr(model, "post_process", False):
            # the output layer's weight: its own (untied), the last stage's copy of the embedding
            # (tied, PP > 1: its gradient is synced with the embedding's, counted there), or the
            # embedding itself (tied, PP = 1: counted as the embedding)
            weight = model.output_layer.weight
            applied = weight if weight is not None else model.shared_embedding_or_output_weight()
            entries.append(_Entry(None if tied else weight, "output", -1, model.output_layer, applied))
    return entries


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
        self.entries = _model_entries(model_chunks)
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
            if e.module is not None and e.role in ("qkv", "proj", "fc1", "fc2", "output"):
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

    def _add_by_role(self, table: Table, entry: _Entry, rows_cols: torch.Tensor, tp: int,
                     tp_rank: int) -> None:
        """Add an element-score tensor E (the local weight's shape) into the table."""
        E = rows_cols
        s = self.shape
        l = entry.layer
        g_loc, f_loc = s.groups_of(max(l, 0)) // tp, s.ffn_of(max(l, 0)) // tp
        gs = slice(tp_rank * g_loc, (tp_rank + 1) * g_loc)
        fs = slice(tp_rank * f_loc, (tp_rank + 1) * f_loc)
        if entry.role == "qkv":
            table.heads[l, gs] += E.sum(1).view(g_loc, -1).sum(1).double()
            table.hidden += E.sum(0).double()
        elif entry.role == "proj":
            table.heads[l, gs] += E.sum(0).view(g_loc, -1).sum(1).double()
            table.hidden += E.sum(1).double()
        elif entry.role == "qkv_bias":
            table.heads[l, gs] += E.view(g_loc, -1).sum(1).double()
        elif entry.role == "fc1":
            table.ffn[l, fs] += E.sum(1).view(2, f_loc).sum(0).double()
            table.hidden += E.sum(0).double()
        elif entry.role == "fc2":
            table.ffn[l, fs] += E.sum(0).double()
            table.hidden += E.sum(1).double()
        elif entry.role == "norm":
            if tp_rank == 0:  # replicated across TP
                table.hidden += E.double()
        elif entry.role == "embedding":
            table.embedding += E.sum(0).double()
            # each element counts once over all ranks (owned by one DP rank, or 1/DP on each)
            table.embedding_signal += (E != 0).sum(0).double() * self._count_weight
        elif entry.role == "output":
            table.hidden += E.sum(0).double()

    @torch.no_grad()
    def partial_table(self) -> Table:
        """This rank's partial table for the step that just ran backward (grads reduced)."""
        tp, tp_rank, dp = self._layout()
        table = Table.zeros(self.shape, with_embedding=True)
        if self.kind in ("taylor", "fisher"):
            self._gradient_scores(table, tp, tp_rank, dp)
        else:
            self._activation_scores(table, tp, tp_rank, dp)
        return table

    def _gradient_scores(self, table: Table, tp: int, tp_rank: int, dp: int) -> None:
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
            self._add_by_role(table, entry, full.view_as(param).cpu(), tp, tp_rank)

    def _weight_of(self, entry: _Entry) -> torch.Tensor | None:
        return entry.input_weight if entry.input_weight is not None else entry.param

    def _activation_scores(self, table: Table, tp: int, tp_rank: int, dp: int) -> None:
        s = self.shape
        for entry in self.entries:
            g_loc, f_loc = s.groups_of(max(entry.layer, 0)) // tp, s.ffn_of(max(entry.layer, 0)) // tp
            gs = slice(tp_rank * g_loc, (tp_rank + 1) * g_loc)
            fs = slice(tp_rank * f_loc, (tp_rank + 1) * f_loc)
            stats = self._stats.get(entry.module) if entry.module is not None else None
            if stats is None or stats[2] == 0:
                continue
            second, absolute, tokens = stats
            if self.kind == "activation":
                per_channel = absolute / tokens
                hidden_input = entry.role in ("qkv", "fc1", "output")
                if hidden_input and tp_rank != 0:
                    continue  # the full hidden input is replicated across TP
            else:
                weight = self._weight_of(entry)
                if weight is None:
                    continue
                w2 = weight.detach().float().pow(2).sum(0).double().cpu()  # per input column
                if self.obs_exact:
                    h = second / tokens
                    damp = self.obs_damp * torch.diagonal(h).mean().clamp(min=1e-12)
                    hinv_diag = torch.diagonal(torch.linalg.inv(h + damp * torch.eye(h.shape[0], dtype=h.dtype)))
                    per_channel = w2 / hinv_diag
                else:
                    per_channel = w2 * (second / tokens)
            per_channel = per_channel / dp
            l = entry.layer
            if entry.role == "proj":
                table.heads[l, gs] += per_channel.view(g_loc, -1).sum(1)
            elif entry.role == "fc2":
                table.ffn[l, fs] += per_channel
            elif entry.role in ("qkv", "fc1", "output"):
                table.hidden += per_channel


def reduce_table(partial: Table, shape: ModelShape, signed: bool) -> Table:
    """The distributed reducer: one all-reduce of the packed partial tables over all ranks."""
    flat = partial.pack()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.cuda.is_available():  # NCCL reduces device tensors
            flat = flat.cuda()
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
    table = Table.unpack(flat, shape)
    table = Table(table.heads, table.ffn, fold_embedding(table, shape.vocab))
    if signed:
        table = Table(table.heads.abs(), table.ffn.abs(), table.hidden.abs())
    return table
