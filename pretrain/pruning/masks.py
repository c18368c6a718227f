"""Global group masks and where each group's weights live on this rank.

The masks are global (every layer, every group), identical on every rank and independent of the
TP/PP layout, so they are checkpointed once with the pruning state and survive resharding.
``LocalModelMasks`` turns them into per-parameter masks for the weights this rank holds, using the
megatron-core layouts documented in FACTS.md:

* ``linear_qkv`` rows: per query group g, ``[q_{g,0..hpg-1}, k_g, v_g]``, each ``head_dim`` rows;
  TP rank r holds groups ``[r*G/TP, (r+1)*G/TP)``.
* ``linear_proj`` columns: this rank's heads in global head order.
* ``linear_fc1`` rows: ``[gate_r; up_r]`` (SwiGLU), channels ``[r*F/TP, (r+1)*F/TP)``.
* ``linear_fc2`` columns: the same channels.
* the hidden dimension is replicated across TP: embedding dim 1, qkv/fc1 input columns,
  proj/fc2 output rows, every norm, output layer dim 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PRUNE_TYPES = ("heads", "ffn", "hidden")
ALL_PRUNE_TYPES = PRUNE_TYPES + ("layers",)


@dataclass
class GroupMasks:
    """Kept (True) / dropped (False) per group. ``heads`` is per query group ([layers, groups]);
    with MHA (groups == heads) that is per head."""

    heads: torch.Tensor  # bool [L, G]
    ffn: torch.Tensor  # bool [L, F]
    hidden: torch.Tensor  # bool [H]
    layers: torch.Tensor | None = None  # bool [L]; a dropped layer has no heads and no FFN left

    def __post_init__(self) -> None:
        if self.layers is None:
            self.layers = torch.ones(self.heads.shape[0], dtype=torch.bool)

    @classmethod
    def full(cls, num_layers: int, num_groups: int, ffn: int, hidden: int) -> "GroupMasks":
        return cls(torch.ones(num_layers, num_groups, dtype=torch.bool),
                   torch.ones(num_layers, ffn, dtype=torch.bool),
                   torch.ones(hidden, dtype=torch.bool))

    def clone(self) -> "GroupMasks":
        return GroupMasks(self.heads.clone(), self.ffn.clone(), self.hidden.clone(), self.layers.clone())

    def state_dict(self) -> dict:
        return {"heads": self.heads.clone(), "ffn": self.ffn.clone(), "hidden": self.hidden.clone(),
                "layers": self.layers.clone()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "GroupMasks":
        layers = d.get("layers")
        return cls(d["heads"].bool().clone(), d["ffn"].bool().clone(), d["hidden"].bool().clone(),
                   layers.bool().clone() if layers is not None else None)

    def drop_layer(self, layer: int) -> None:
        self.layers[layer] = False
        self.heads[layer] = False
        self.ffn[layer] = False

    def equal(self, other: "GroupMasks") -> bool:
        return all(torch.equal(getattr(self, t), getattr(other, t)) for t in ALL_PRUNE_TYPES)


@dataclass(frozen=True)
class ModelShape:
    """The unpruned shape the masks index into."""

    num_layers: int
    hidden: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    # per-layer widths of a heterogeneous (per-layer shrunk) model; None: every layer is full width.
    # num_groups / ffn are then the widest layer's, and mask entries past a layer's width are
    # permanently False (they do not exist).
    layer_groups: tuple | None = None
    layer_ffn: tuple | None = None
    qkv_bias: bool = False  # linear_qkv has a bias (Qwen2): (heads_per_group + 2) * head_dim per group

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    @classmethod
    def from_config(cls, model_cfg, vocab: int) -> "ModelShape":
        widths = model_cfg.layer_widths()
        return cls(num_layers=model_cfg.num_layers, hidden=model_cfg.hidden_size,
                   num_heads=model_cfg.num_attention_heads, num_groups=model_cfg.query_groups,
                   head_dim=model_cfg.head_dim, ffn=model_cfg.ffn_hidden_size, vocab=vocab,
                   tied=not model_cfg.untie_embeddings_and_output_weights,
                   layer_groups=tuple(w[0] for w in widths) if model_cfg.layer_shapes else None,
                   layer_ffn=tuple(w[2] for w in widths) if model_cfg.layer_shapes else None,
                   qkv_bias=model_cfg.add_qkv_bias)

    def groups_of(self, layer: int) -> int:
        return self.layer_groups[layer] if self.layer_groups else self.num_groups

    def ffn_of(self, layer: int) -> int:
        return self.layer_ffn[layer] if self.layer_ffn else self.ffn

    def full_masks(self) -> "GroupMasks":
        masks = GroupMasks.full(self.num_layers, self.num_groups, self.ffn, self.hidden)
        for layer in range(self.num_layers):
            masks.heads[layer, self.groups_of(layer):] = False
            masks.ffn[layer, self.ffn_of(layer):] = False
        return masks

    def group_cost(self, hidden_kept: int) -> int:
        """Parameters of one query group: its q/k/v rows (and their biases) and its heads'
        output-projection columns."""
        return self._group_cost_per_hidden() * hidden_kept + self._group_bias()

    def _group_cost_per_hidden(self) -> int:
        return (2 * self.heads_per_group + 2) * self.head_dim

    def _group_bias(self) -> int:
        return (self.heads_per_group + 2) * self.head_dim if self.qkv_bias else 0

    def ffn_channel_cost(self, hidden_kept: int) -> int:
        """Parameters of one FFN channel: a gate row, an up row, a down column."""
        return 3 * hidden_kept

    def hidden_channel_cost(self, masks: GroupMasks) -> int:
        """Parameters of one hidden channel under ``masks``: embedding (and untied output) column,
        final norm, and in every kept layer its q/k/v/gate/up column, proj/down row and two norms."""
        per_layer = (masks.heads.sum(1) * self._group_cost_per_hidden() + masks.ffn.sum(1) * self.ffn_channel_cost(1)
                     + 2 * masks.layers.long())
        return self.vocab * (1 if self.tied else 2) + 1 + int(per_layer.sum())

    def parameter_count(self, masks: GroupMasks) -> int:
        """Parameters of the model these masks describe once shrunk."""
        h = int(masks.hidden.sum())
        total = self.vocab * h * (1 if self.tied else 2) + h  # embeddings (+ output), final norm
        groups = masks.heads.sum(1)
        ffn = masks.ffn.sum(1)
        hpg, hd = self.heads_per_group, self.head_dim
        per_layer = (groups * (hpg + 2) * hd * h + groups * hpg * hd * h + 3 * ffn * h
                     + groups * self._group_bias()
                     + 2 * h * masks.layers.long())  # a dropped layer loses its two norms too
        return int(total + per_layer.sum())


@dataclass
class LocalModelMasks:
    """Per-parameter masks (bool, the local shape) for the weights this rank holds."""

    param_masks: dict = field(default_factory=dict)  # param -> bool tensor
    norms: list = field(default_factory=list)  # our RMSNorm modules (hidden-mask aware)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for param, mask in self.param_masks.items():
            param.data.mul_(mask)

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        for param, mask in self.param_masks.items():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grad.mul_(mask)


def build_local_masks(model_chunks: list, masks: GroupMasks, shape: ModelShape) -> LocalModelMasks:
    """Per-parameter masks for this rank's model chunks (call again after the masks change)."""
    from megatron.core import parallel_state as ps

    from megatron_patches.norms import RMSNorm
    from pretrain.model import unwrap
    from pretrain.state_adapter import fc1_rows, proj_columns, qkv_rows

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    hidden = masks.hidden
    out = LocalModelMasks()

    def add(param, mask):
        if param is None:
            return
        assert mask.shape == param.shape, (mask.shape, param.shape)
        out.param_masks[param] = mask.to(param.device)

    for chunk in model_chunks:
        model = unwrap(chunk)
        if getattr(model, "pre_process", False):
            emb = model.embedding.word_embeddings.weight
            add(emb, hidden.expand_as(emb).clone())
        for layer in model.decoder.layers:
            index = layer.layer_number - 1
            groups_local = shape.groups_of(index) // tp
            ffn_local = shape.ffn_of(index) // tp
            g_mask = masks.heads[index, tp_rank * groups_local:(tp_rank + 1) * groups_local]
            f_mask = masks.ffn[index, tp_rank * ffn_local:(tp_rank + 1) * ffn_local]
            attn, mlp = layer.self_attention, layer.mlp
            rows = qkv_rows(g_mask, shape.heads_per_group, shape.head_dim)
            add(attn.linear_qkv.weight, rows[:, None] & hidden[None, :])
            if shape.qkv_bias:
                add(attn.linear_qkv.bias, rows.clone())
            cols = proj_columns(g_mask, shape.heads_per_group, shape.head_dim)
            add(attn.linear_proj.weight, hidden[:, None] & cols[None, :])
            add(mlp.linear_fc1.weight, fc1_rows(f_mask)[:, None] & hidden[None, :])
            add(mlp.linear_fc2.weight, hidden[:, None] & f_mask[None, :])
            for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
                if isinstance(norm, RMSNorm):
                    add(norm.weight, hidden.clone() & bool(masks.layers[index]))
                    out.norms.append(norm)
        final = getattr(model.decoder, "final_layernorm", None)
        if isinstance(final, RMSNorm):
            add(final.weight, hidden.clone())
            out.norms.append(final)
        if getattr(model, "post_process", False):
            w = model.output_layer.weight
            if w is not None:
                add(w, hidden.expand_as(w).clone())
    for norm in out.norms:
        norm.set_hidden_mask(hidden)
    return out
