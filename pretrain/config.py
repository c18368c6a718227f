"""Typed configs, one per component; each validates itself with a message that names the flag.

The command line (``pretrain/arguments.py``) only fills these; nothing reads a global namespace.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad setting; the message names the flag and what to do."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, GQA; no biases, or Qwen2's q/k/v biases."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: int | None = None  # None: MHA (one group per head)
    kv_channels: int | None = None  # head size; default hidden_size // heads
    seq_length: int = 2048
    max_position_embeddings: int | None = None
    vocab_size: int | None = None  # None: the tokenizer's, padded
    make_vocab_size_divisible_by: int = 128
    untie_embeddings_and_output_weights: bool = False
    add_qkv_bias: bool = False  # biases on q, k and v only (Qwen2); no other linear has one
    rotary_base: float = 10000.0
    # Llama 3.x RoPE scaling (megatron-core's: low/high frequency factors 1 and 4, original
    # context 8192; Megatron-LM's --use-rope-scaling / --rope-scaling-factor)
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # a heterogeneous model (after a per-layer shrink): per layer {num_query_groups,
    # num_attention_heads, ffn_hidden_size}; the fields above then hold the widest layer's
    layer_shapes: list | None = None

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"):
            _require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        groups = self.query_groups
        _require(
            self.num_attention_heads % groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({groups})",
        )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size ({self.hidden_size}) must be a multiple of --num-attention-heads "
                f"({self.num_attention_heads}), or set --kv-channels",
            )
        _require(self.head_dim % 2 == 0, f"head size {self.head_dim} must be even for RoPE")
        _require(self.rope_scaling_factor >= 1, f"--rope-scaling-factor {self.rope_scaling_factor} must be >= 1")
        if self.layer_shapes is not None:
            _require(len(self.layer_shapes) == self.num_layers,
                     f"layer_shapes has {len(self.layer_shapes)} entries for {self.num_layers} layers")
            hpg = self.num_attention_heads // self.query_groups
            for i, shape in enumerate(self.layer_shapes):
                _require(shape["num_query_groups"] >= 1 and shape["ffn_hidden_size"] >= 1
                         and shape["num_attention_heads"] == shape["num_query_groups"] * hpg,
                         f"layer {i}: inconsistent per-layer shape {shape}")

    def layer_widths(self) -> list[tuple[int, int, int]]:
        """(query groups, heads, FFN width) of every layer."""
        if self.layer_shapes is None:
            return [(self.query_groups, self.num_attention_heads, self.ffn_hidden_size)] * self.num_layers
        return [(s["num_query_groups"], s["num_attention_heads"], s["ffn_hidden_size"]) for s in self.layer_shapes]

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tokenizer_vocab: int, tensor_parallel: int) -> int:
        """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by x TP."""
        if self.vocab_size is not None:
            _require(
                self.vocab_size >= tokenizer_vocab,
                f"--vocab-size {self.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer_vocab}); raise it or use another tokenizer",
            )
            base = self.vocab_size
        else:
            base = tokenizer_vocab
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(base / multiple) * multiple)

    def num_parameters(self, vocab_size: int) -> dict[str, int]:
        """Parameter counts by part (tied embeddings counted once; ``per_layer``, ``attention`` and
        ``mlp`` are the first layer's). The formula is ``ModelShape``'s, the one the pruning uses."""
        from pretrain.pruning.masks import ModelShape

        shape = ModelShape.from_config(self, vocab_size)
        full = shape.full_masks()
        h = self.hidden_size
        embedding, output = shape.vocab_cost(h)
        total = shape.parameter_count(full)
        return {"per_layer": int(shape.layer_costs(full)[0]), "attention": shape.groups_of(0) * shape.group_cost(h),
                "mlp": shape.ffn_of(0) * shape.ffn_channel_cost(h), "embedding": embedding,
                "output_layer": output, "total": total, "non_embedding": total - embedding - output}


MODEL_PRESETS: dict[str, dict] = {
    # tiny, for tests and the CPU demo; heads/groups/ffn divide by TP=2 and PP=2
    "debug": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=384, seq_length=128, make_vocab_size_divisible_by=64),
    # HuggingFaceTB/SmolLM-135M
    "smollm-135m": dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                        ffn_hidden_size=1536, seq_length=2048, vocab_size=49152,
                        rotary_base=10000.0),
    # HuggingFaceTB/SmolLM-360M
    "smollm-360m": dict(num_layers=32, hidden_size=960, num_attention_heads=15, num_query_groups=5,
                        ffn_hidden_size=2560, seq_length=2048, vocab_size=49152,
                        rotary_base=10000.0),
    # HuggingFaceTB/SmolLM-1.7B (the paper's starting model)
    "smollm-1.7b": dict(num_layers=24, hidden_size=2048, num_attention_heads=32, num_query_groups=32,
                        ffn_hidden_size=8192, seq_length=2048, vocab_size=49152,
                        rotary_base=10000.0),
    # meta-llama/Llama-3.2-1B shape (GQA 32/8, tied, Llama 3 RoPE scaling x32)
    "llama-3.2-1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                         ffn_hidden_size=8192, seq_length=2048, vocab_size=128256,
                         rotary_base=500000.0, kv_channels=64, use_rope_scaling=True,
                         rope_scaling_factor=32.0),
    # Qwen/Qwen2.5-0.5B shape (GQA 14/2, tied, q/k/v biases)
    "qwen2.5-0.5b": dict(num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2,
                         ffn_hidden_size=4864, seq_length=2048, vocab_size=151936, rotary_base=1000000.0,
                         norm_epsilon=1e-6, add_qkv_bias=True),
}


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = True

    def validate(self, model: ModelConfig, world_size: int) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        _require(tp >= 1 and pp >= 1, "--tensor/pipeline-model-parallel-size must be >= 1")
        _require(
            world_size % (tp * pp) == 0,
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}); launch a multiple of {tp * pp} processes",
        )
        for i, (groups, heads, ffn) in enumerate(model.layer_widths() if model.layer_shapes else []):
            _require(groups % tp == 0 and ffn % tp == 0,
                     f"layer {i}: {groups} query groups / FFN {ffn} do not divide over "
                     f"--tensor-model-parallel-size ({tp})")
        _require(
            model.num_attention_heads % tp == 0,
            f"--num-attention-heads ({model.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        _require(
            model.query_groups % tp == 0,
            f"--num-query-groups ({model.query_groups}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        _require(
            model.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size ({model.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        _require(
            model.num_layers % pp == 0,
            f"--num-layers ({model.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({pp})",
        )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass(kw_only=True)
class DataConfig:
    data_path: list[str] = field(default_factory=list)  # [w1, prefix1, w2, prefix2] or [prefix]
    split: str = "969,30,1"
    tokenizer_type: str = "GPTSentencePieceTokenizer"
    tokenizer_model: str | None = None
    vocab_size_for_null_tokenizer: int | None = None
    mock_data: bool = False
    data_cache_path: str | None = None
    num_workers: int = 0
    # Megatron-LM's --test-data-path: a separate held-out set (the --split test share is then
    # unused); evaluated on the same sequences at every evaluation, whatever the run's seed
    test_data_path: list[str] = field(default_factory=list)

    def blend(self) -> tuple[list[str], list[float] | None]:
        """Megatron-LM's ``--data-path`` forms: ``PREFIX``, ``W1 PREFIX1 W2 PREFIX2 ...``, or
        ``PREFIX1 PREFIX2 ...`` (no weights: each dataset once, weighted by its size)."""
        items = self.data_path
        if len(items) == 1:
            return [items[0]], None
        if not any(_is_number(item) for item in items):
            return list(items), None
        _require(
            len(items) % 2 == 0,
            "--data-path takes one prefix, or weight/prefix pairs: W1 PREFIX1 W2 PREFIX2 ...",
        )
        weights, prefixes = [], []
        for weight, prefix in zip(items[0::2], items[1::2]):
            try:
                weights.append(float(weight))
            except ValueError:
                raise ConfigError(f"--data-path: {weight!r} is not a weight (pairs are W PREFIX)") from None
            _require(weights[-1] >= 0, f"--data-path: weight {weight} must be >= 0")
            prefixes.append(prefix)
        return prefixes, weights

    def test_data(self) -> "DataConfig":
        """The --test-data-path set as a dataset config of its own (all of it is test data)."""
        return dataclasses.replace(self, data_path=list(self.test_data_path), split="0,0,100", test_data_path=[])

    def validate(self) -> None:
        if self.mock_data:
            return
        _require(bool(self.data_path), "--data-path is required (or --mock-data for synthetic data)")
        prefixes, _ = self.blend()
        test_prefixes = self.test_data().blend()[0] if self.test_data_path else []
        for flag, group in (("--data-path", prefixes), ("--test-data-path", test_prefixes)):
            for prefix in group:
                for ext in (".bin", ".idx"):
                    _require(
                        os.path.isfile(prefix + ext),
                        f"{flag}: {prefix + ext} does not exist; build it with "
                        "tools/preprocess_data.py (give the prefix without .bin/.idx)",
                    )
        shared = {os.path.realpath(p) for p in prefixes} & {os.path.realpath(p) for p in test_prefixes}
        _require(not shared, f"--test-data-path {' '.join(sorted(shared))} is also in --data-path: a test set "
                 "must be data that training never reads")
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split {self.split!r}: expected numbers like 969,30,1") from None
        _require(len(values) <= 3 and sum(values) > 0 and min(values) >= 0,
                 f"--split {self.split!r}: up to three non-negative numbers, not all zero")
        if self.tokenizer_type != "NullTokenizer":
            _require(bool(self.tokenizer_model), f"--tokenizer-model is required for {self.tokenizer_type}")
            _require(os.path.exists(self.tokenizer_model or ""),
                     f"--tokenizer-model {self.tokenizer_model!r} does not exist")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_data_args(path: str) -> list[str]:
    """Megatron-LM's ``--data-args-path``: a file holding what ``--data-path`` would (weights and
    prefixes separated by any whitespace, e.g. one ``W PREFIX`` a line), for blends too long for a
    command line."""
    try:
        with open(path) as f:
            items = f.read().split()
    except OSError as err:
        raise ConfigError(f"--data-args-path {path}: cannot read it ({err.strerror or err})") from None
    _require(bool(items), f"--data-args-path {path}: the file is empty; list 'W PREFIX' pairs or prefixes in it")
    return items


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: str = "cosine"

    def validate(self) -> None:
        _require(self.lr > 0, "--lr must be positive")
        _require(0 <= self.min_lr <= self.lr, "--min-lr must be between 0 and --lr")
        _require(self.lr_decay_style in ("cosine", "linear", "constant", "WSD", "inverse-square-root"),
                 f"--lr-decay-style {self.lr_decay_style!r}: use cosine, linear, constant, WSD or "
                 "inverse-square-root")
        _require(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int | None = None
    train_tokens: int | None = None
    seed: int = 1234
    bf16: bool = False
    eval_interval: int = 0  # 0: no evaluation during training
    eval_iters: int = 10
    log_interval: int = 10
    exit_interval: int | None = None  # stop (after saving) at this iteration
    dry_run: bool = False
    # a step whose loss or gradients are not finite is skipped (no update); after this many such
    # steps in one run, training stops with an error and the last checkpoint stays the newest
    max_skipped_nonfinite_steps: int = 3

    def validate(self, data_parallel_size: int, seq_length: int) -> None:
        _require(self.micro_batch_size > 0, "--micro-batch-size must be positive")
        per_step = self.micro_batch_size * data_parallel_size
        _require(
            self.global_batch_size % per_step == 0,
            f"--global-batch-size ({self.global_batch_size}) must be divisible by "
            f"--micro-batch-size ({self.micro_batch_size}) x data-parallel size "
            f"({data_parallel_size}) = {per_step}",
        )
        _require((self.train_iters is None) != (self.train_tokens is None),
                 "give exactly one of --train-iters and --train-tokens")
        _require(self.total_iters(seq_length) > 0, "training length must be at least one iteration")
        _require(self.log_interval > 0, "--log-interval must be positive")
        _require(self.eval_interval >= 0 and self.eval_iters >= 0, "--eval-interval/--eval-iters must be >= 0")
        _require(self.max_skipped_nonfinite_steps >= 0, "--max-skipped-nonfinite-steps must be >= 0")

    def total_iters(self, seq_length: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return int(math.ceil(self.train_tokens / (self.global_batch_size * seq_length)))


@dataclass(kw_only=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights only; iteration and data position start at 0
    keep_last: int | None = None  # keep only this many newest checkpoints
    use_checkpoint_args: bool = False  # take the model shape from the checkpoint (e.g. shrunk)
    exit_signal_handler: bool = True

    def validate(self) -> None:
        if self.save_interval is not None:
            _require(self.save_interval > 0, "--save-interval must be positive")
            _require(self.save is not None, "--save-interval needs --save")
        if self.keep_last is not None:
            _require(self.keep_last >= 1, "--keep-last must be >= 1")


@dataclass(kw_only=True)
class PruneConfig:
    """Pruning-aware pretraining (off unless a target is given)."""

    target_params: int | None = None
    target_ratio: float | None = None
    # resuming a checkpoint that carries pruning state: it is kept and applied (and, without
    # --prune-* flags, its own pruning settings continue) unless one of these says otherwise
    end_pruning: bool = False  # keep the masks so far, remove no further groups
    drop_state: bool = False  # discard the masks: pruned groups train again
    start_tokens: int = 0
    end_tokens: int | None = None
    interval: int = 10  # steps between pruning events
    ramp: str = "linear"
    saliency: str = "taylor"
    taylor_form: str = "element"  # vector-form sums cancel like sqrt(group size): README, issue 21
    saliency_ema: float = 0.9
    obs_exact: bool = False
    types: tuple = ("heads", "ffn", "hidden")
    granularity: str = "per-layer"
    align: int | None = None  # None: 8 on CPU, 64 on GPU
    min_heads: int = 1  # query groups per layer
    min_ffn: int = 0
    min_hidden: int = 0
    min_layers: int = 1
    # in-run shrink: token counts, or "auto" (end of pruning, and each time the kept parameter
    # fraction has fallen by shrink_every_fraction since the last shrink)
    shrink_at: tuple = ()
    shrink_auto: bool = False
    shrink_every_fraction: float | None = None
    # the layout to continue on after an in-run shrink (None: keep the current one)
    shrink_tensor_parallel_size: int | None = None
    shrink_pipeline_parallel_size: int | None = None

    @property
    def enabled(self) -> bool:
        return self.target_params is not None or self.target_ratio is not None

    def validate(self, total_tokens: int) -> None:
        if not self.enabled:
            return
        _require(self.target_params is None or self.target_ratio is None,
                 "give --prune-target-params or --prune-target-ratio, not both")
        if self.target_ratio is not None:
            _require(0 < self.target_ratio < 1, "--prune-target-ratio must be in (0, 1)")
        if self.target_params is not None:
            _require(self.target_params > 0, "--prune-target-params must be positive")
        end = self.end_tokens if self.end_tokens is not None else total_tokens
        _require(0 <= self.start_tokens < end,
                 f"--prune-start-tokens ({self.start_tokens}) must be below --prune-end-tokens ({end})")
        _require(self.interval >= 1, "--prune-interval must be >= 1")
        _require(self.ramp in ("linear", "cubic"), f"--prune-ramp {self.ramp!r}: linear or cubic")
        _require(self.saliency in ("taylor", "fisher", "obs", "activation"),
                 f"--saliency {self.saliency!r}: taylor, fisher, obs or activation")
        _require(self.taylor_form in ("vector", "element"), "--saliency-taylor-form: vector or element")
        _require(0 <= self.saliency_ema < 1, "--saliency-ema must be in [0, 1)")
        bad = [t for t in self.types if t not in ("heads", "ffn", "hidden", "layers")]
        _require(not bad and len(self.types) > 0,
                 f"--prune-types: {','.join(bad) or 'empty'}; use heads, ffn, hidden, layers")
        _require(self.granularity in ("uniform", "per-layer"), "--prune-granularity: uniform or per-layer")
        _require(self.align is None or self.align >= 1, "--prune-align must be >= 1")
        if self.shrink_every_fraction is not None:
            _require(0 < self.shrink_every_fraction < 1, "--shrink-every-fraction must be in (0, 1)")
            _require(self.shrink_auto, "--shrink-every-fraction needs --shrink-at auto")
        self.validate_safety()

    # -- issue 21: allocation across types and safety on real pretrained models
    allocation: str = "global"  # "proportional": every type pruned by the same fraction (a baseline)
    max_step_fraction: float = 0.25  # one event removes at most this fraction of the model
    loss_jump_warn: float = 0.5  # warn when the loss after an event rises by more than this (nats)

    def validate_safety(self) -> None:
        _require(self.allocation in ("global", "proportional"), "--prune-allocation: global or proportional")
        _require(0 < self.max_step_fraction <= 1, "--prune-max-step-fraction must be in (0, 1]")
        _require(self.loss_jump_warn > 0, "--prune-loss-jump-warn must be positive (nats)")


@dataclass(kw_only=True)
class LoggingConfig:
    tensorboard_dir: str | None = None


@dataclass(kw_only=True)
class PretrainConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def validate(self, world_size: int) -> None:
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.data.validate()
        self.optim.validate()
        self.train.validate(self.parallel.data_parallel_size(world_size), self.model.seq_length)
        self.checkpoint.validate()
        total_tokens = self.train.total_iters(self.model.seq_length) * self.train.global_batch_size * self.model.seq_length
        self.prune.validate(total_tokens)
        shrinks = bool(self.prune.shrink_at or self.prune.shrink_auto)
        if shrinks:
            _require(self.checkpoint.save is not None, "--shrink-at needs --save (the shrink goes through a checkpoint)")
            _require(self.prune.enabled, "--shrink-at needs pruning: give --prune-target-ratio or "
                     "--prune-target-params, or --load a checkpoint that carries pruning state")
        new_tp, new_pp = self.prune.shrink_tensor_parallel_size, self.prune.shrink_pipeline_parallel_size
        if new_tp or new_pp:
            _require(shrinks, "--shrink-tensor/pipeline-model-parallel-size need --shrink-at")
            after = dataclasses.replace(
                self.parallel, tensor_model_parallel_size=new_tp or self.parallel.tensor_model_parallel_size,
                pipeline_model_parallel_size=new_pp or self.parallel.pipeline_model_parallel_size)
            sizes = after.tensor_model_parallel_size * after.pipeline_model_parallel_size
            _require(world_size % sizes == 0,
                     f"--shrink-tensor-model-parallel-size x --shrink-pipeline-model-parallel-size ({sizes}) "
                     f"must divide the world size ({world_size})")
            try:
                self.train.validate(after.data_parallel_size(world_size), self.model.seq_length)
            except ConfigError as err:
                raise ConfigError(f"after the shrink's layout change: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        return cls(
            model=ModelConfig(**d["model"]), parallel=ParallelConfig(**d["parallel"]),
            data=DataConfig(**d["data"]), optim=OptimConfig(**d["optim"]),
            train=TrainConfig(**d["train"]), checkpoint=CheckpointConfig(**d["checkpoint"]),
            logging=LoggingConfig(**d["logging"]),
            prune=PruneConfig(**{**d.get("prune", {}),
                                 "types": tuple(d.get("prune", {}).get("types", ("heads", "ffn", "hidden"))),
                                 "shrink_at": tuple(d.get("prune", {}).get("shrink_at", ()))}),
        )
