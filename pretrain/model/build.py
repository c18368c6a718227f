"""Build the Llama-style megatron-core GPT for this rank's pipeline stage."""

from __future__ import annotations

import torch

from megatron_patches.optimizer_compat import apply_torch_adam_step_fix
from megatron_patches.versions import UnsupportedVersionError, check_megatron_core_version
from pretrain.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from pretrain.model.memory import memory_available
from pretrain.model.params import unwrap  # noqa: F401 (its old home: callers import it from here)
from pretrain.model.shape import ModelShape
from pretrain.pruning.masks import check_hidden_masking_invariants


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if train.bf16 else torch.float32
    config_cls = TransformerConfig
    extra = {}
    if model.layer_shapes:
        from megatron_patches.per_layer_config import PerLayerTransformerConfig  # lazy: megatron-core is heavy

        config_cls, extra = PerLayerTransformerConfig, {"layer_shapes": list(model.layer_shapes)}
    return config_cls(
        **extra,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        # set explicitly: once heads are pruned, hidden/heads no longer gives the head size
        kv_channels=model.head_dim,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=train.bf16,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # CPU: the full master weight is initialised on CPU and split, so that every TP/PP layout
        # starts from the same weights (see pretrain.model.build.build_model).
        use_cpu_initialization=True,
        perform_initialization=True,
        # fusions are CUDA kernels; keep them off on CPU
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        # pipeline p2p on gloo: the batched isend/irecv path gives wrong results (FACTS.md)
        batch_p2p_comm=False,
    )


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig,
                vocab_size: int, use_te: bool | None = None, wrap_ddp: bool = True,
                plain_megatron_spec: bool = False, hidden_masking: bool | None = None) -> list:
    """The model chunks of this rank (one chunk: no virtual pipeline), wrapped in megatron DDP.

    ``use_te``: None picks Transformer Engine whenever it is usable (a GPU and TE importable).
    ``hidden_masking``: whether this run's hidden mask can change or is already partly False
    (``pretrain.model.invariants.hidden_masking_possible``). None assumes it can: the TE spec then
    keeps separate mask-aware norms (correct whatever the run does, a little slower than the fused
    one). When it is true, the model is checked at build (every norm mask-aware, every parameter
    masked) and a model that could not be masked correctly stops the run here.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    from megatron_patches.layer_specs import (choose_spec_kind, gpt_block_spec,  # lazy: megatron-core is heavy
                                              transformer_engine_available)

    check_supported_megatron_core()
    # before any optimizer exists: loading its checkpoint state needs it (torch Adam, any device)
    apply_torch_adam_step_fix()
    if use_te is None:
        use_te = transformer_engine_available()
    hidden_masking = True if hidden_masking is None else hidden_masking
    spec_kind = choose_spec_kind(bool(use_te), hidden_masking)
    config = build_transformer_config(model_cfg, parallel, train)
    # Same seed on every rank: the CPU master weights are identical and each rank keeps its slice.
    torch.manual_seed(train.seed)
    model = GPTModel(
        config=config,
        # plain_megatron_spec: megatron-core's own local spec, for benchmarks against ours
        transformer_layer_spec=_plain_spec() if plain_megatron_spec else gpt_block_spec(config, spec_kind),
        vocab_size=vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings or model_cfg.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rotary_base),
        rope_scaling=model_cfg.use_rope_scaling,
        rope_scaling_factor=model_cfg.rope_scaling_factor,
    )
    model.spec_kind = "plain-megatron" if plain_megatron_spec else spec_kind.value  # for logs and reports
    mask_padded_logits(model, model_cfg.unpadded_vocab_size, vocab_size)
    if hidden_masking and not plain_megatron_spec:
        check_hidden_masking_invariants([model], ModelShape.from_config(model_cfg, vocab_size))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if not wrap_ddp:
        return [model]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)]


def local_padded_rows(unpadded: int | None, padded: int) -> tuple[int, int] | None:
    """[lo, hi) of this TP rank's vocabulary rows (embedding, output layer, logits) that are
    padding, in local indices; None when this rank holds none (megatron-core splits the padded
    vocabulary evenly over TP in rank order: the padding sits on the last ranks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.utils import VocabUtility

    if unpadded is None or unpadded >= padded:
        return None
    first, last = VocabUtility.vocab_range_from_global_vocab_size(
        padded, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    lo = max(unpadded, first)
    return (lo - first, last - first) if lo < last else None


def mask_padded_logits(model, unpadded: int | None, padded: int) -> None:
    """The padded logits are -inf: they take no part in the softmax of the loss, the evaluation,
    distillation or generation (which can then never pick a token the tokenizer does not have),
    get no gradient, and the model computes exactly what its export (the unpadded rows) computes.
    A forward hook on the output layer, registered first, so every later hook (distillation's)
    sees the masked logits; filled in place (no second logits-sized tensor): the output layer's
    backward does not read its output."""
    rows = local_padded_rows(unpadded, padded) if getattr(model, "post_process", False) else None
    if rows is None:
        return
    lo, hi = rows

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        logits[..., lo:hi] = float("-inf")
        return output

    model.output_layer.register_forward_hook(hook)


@torch.no_grad()
def zero_padded_vocab_rows(model, unpadded: int | None, padded: int) -> None:
    """Zero the padded rows of the embedding and an untied output layer (a fresh model's): with
    their logits masked they get no gradient, so they stay zero, score nothing in saliency, and
    an export (which cuts them) and its re-import (which pads with zeros) hold the same weights."""
    rows = local_padded_rows(unpadded, padded)
    if rows is None:
        return
    for name, param in model.named_parameters():
        if name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
            param[rows[0]:rows[1]].zero_()


def check_supported_megatron_core() -> str:
    """The installed megatron-core version, or a ConfigError saying what to install."""
    try:
        return check_megatron_core_version()
    except UnsupportedVersionError as err:
        raise ConfigError(str(err)) from None


def _plain_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def activation_memory_lower_bound(model_cfg: ModelConfig, micro_batch_size: int, vocab_size: int,
                                  tensor_parallel: int, fused_attention: bool) -> int:
    """Bytes one rank surely needs for one micro-batch's forward: the fp32 logits and their
    softmax, and (without a fused attention kernel) one layer's attention scores and probabilities.
    A lower bound, so a refusal based on it is never wrong; the real need is larger."""
    tokens = micro_batch_size * model_cfg.seq_length
    logits = 2 * tokens * (vocab_size // tensor_parallel) * 4
    scores = 0
    if not fused_attention:
        heads = max(model_cfg.num_attention_heads // tensor_parallel, 1)
        scores = 2 * micro_batch_size * heads * model_cfg.seq_length ** 2 * 4
    return logits + scores


def available_memory_per_rank(local_world_size: int) -> int | None:
    """Bytes this rank may use: the GPU's total, or its share of the host's (cgroup limit included)."""
    have = memory_available(local_world_size, device=True)
    return have[0] if have else None


def check_activation_memory(model_cfg: ModelConfig, train: TrainConfig, vocab_size: int,
                            tensor_parallel: int, local_world_size: int) -> None:
    """Refuse, before anything is built, a micro-batch that cannot fit: otherwise the first step
    dies deep inside torch, or the kernel's out-of-memory killer ends the run without a word."""
    from megatron_patches.layer_specs import transformer_engine_available  # lazy: megatron-core is heavy

    fused = torch.cuda.is_available() and transformer_engine_available()
    need = activation_memory_lower_bound(model_cfg, train.micro_batch_size, vocab_size, tensor_parallel, fused)
    have = available_memory_per_rank(local_world_size)
    if have is not None and need > have:
        raise ConfigError(
            f"--seq-length {model_cfg.seq_length} with --micro-batch-size {train.micro_batch_size} needs at "
            f"least {need / 2**30:,.1f} GiB per rank for one micro-batch's logits"
            + ("" if fused else " and attention scores") + f", more than the {have / 2**30:,.1f} GiB "
            "available to it: lower --micro-batch-size or --seq-length, or raise --tensor-model-parallel-size")
