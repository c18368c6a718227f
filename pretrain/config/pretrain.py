"""The whole run's config: every section, and the checks that cross sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pretrain.config.data import DataConfig
from pretrain.config.distill import DistillConfig
from pretrain.config.flags import check_ranges, require
from pretrain.config.model import ModelConfig
from pretrain.config.parallel import ParallelConfig, read_deepspeed_json
from pretrain.config.prune import PruneConfig
from pretrain.config.training import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from pretrain.errors import ConfigError


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
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self, world_size: int) -> None:
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.data.validate()
        self.optim.validate()
        self.train.validate(self.parallel.data_parallel_size(world_size), self.model.seq_length)
        self.checkpoint.validate()
        self.prune.validate(self.total_tokens())
        self.distill.validate()
        if self.prune.enabled and self.prune.compensation_probe:
            require(bool(self.data.test_data_path) and self.train.eval_iters > 0,
                     "--prune-compensation-probe needs --test-data-path (and --eval-iters > 0): it evaluates there")
        if self.train.scores_tasks:
            require(self.train.eval_interval > 0 or bool(self.data.test_data_path) or self.train.skip_train,
                     f"--eval-tasks {self.train.eval_tasks}: the tasks are scored where the held-out loss is evaluated, "
                     "and this run evaluates nowhere: give --eval-interval N (or --test-data-path, evaluated at the "
                     "end), or --eval-tasks none")
        for section in (self.model, self.parallel, self.data, self.optim, self.train, self.checkpoint, self.prune,
                        self.distill):
            check_ranges(section)  # after each section's own checks, which say more where they exist
        if self.parallel.engine == "deepspeed":
            self._validate_deepspeed_batch(world_size)
            self._validate_deepspeed_optimizer()
        shrinks = bool(self.prune.shrink_at or self.prune.shrink_auto)
        if shrinks:
            require(self.checkpoint.save is not None, "--shrink-at needs --save (the shrink goes through a checkpoint)")
            require(self.prune.enabled, "--shrink-at needs pruning: give --prune-target-ratio or "
                     "--prune-target-params, or --load a checkpoint that carries pruning state")
        new_tp, new_pp = self.prune.shrink_tensor_parallel_size, self.prune.shrink_pipeline_parallel_size
        if new_tp or new_pp:
            require(shrinks, "--shrink-tensor/pipeline-model-parallel-size need --shrink-at")
            after = dataclasses.replace(
                self.parallel, tensor_model_parallel_size=new_tp or self.parallel.tensor_model_parallel_size,
                pipeline_model_parallel_size=new_pp or self.parallel.pipeline_model_parallel_size)
            sizes = after.tensor_model_parallel_size * after.pipeline_model_parallel_size
            require(world_size % sizes == 0,
                     f"--shrink-tensor-model-parallel-size x --shrink-pipeline-model-parallel-size ({sizes}) "
                     f"must divide the world size ({world_size})")
            try:
                self.train.validate(after.data_parallel_size(world_size), self.model.seq_length)
            except ConfigError as err:
                raise ConfigError(f"after the shrink's layout change: {err}") from None

    def _validate_deepspeed_batch(self, world_size: int) -> None:
        """A --deepspeed-config batch size must be ours: the data position, the token counts and
        the LR schedule are computed from --global-batch-size and --micro-batch-size."""
        settings = read_deepspeed_json(self.parallel.deepspeed_config)
        dp = self.parallel.data_parallel_size(world_size)
        ours = {"train_batch_size": ("--global-batch-size", self.train.global_batch_size),
                "train_micro_batch_size_per_gpu": ("--micro-batch-size", self.train.micro_batch_size),
                "gradient_accumulation_steps": ("--global-batch-size / (--micro-batch-size x data parallel)",
                                                self.train.micro_batches_per_step(dp))}
        for key, (flag_name, value) in ours.items():
            require(key not in settings or settings[key] == value,
                     f"--deepspeed-config {self.parallel.deepspeed_config}: {key} {settings.get(key)!r} contradicts "
                     f"{flag_name} ({value}); remove it from the file (the flags decide the batch)")

    def _validate_deepspeed_optimizer(self) -> None:
        """DeepSpeed swaps ZeRO-1 for its separate BF16_Optimizer when bf16 weights accumulate
        gradients in fp32 (``data_types.grad_accum_dtype``) without offload: pruning, checkpoints
        and the conversions reach ZeRO's partitions, not that optimizer's."""
        stage, offload = self.parallel.deepspeed_zero()
        data_types = read_deepspeed_json(self.parallel.deepspeed_config).get("data_types") or {}
        accumulate = str(data_types.get("grad_accum_dtype", "")).lower()
        require(not (self.train.bf16 and stage == 1 and offload != "cpu"
                      and accumulate in ("fp32", "float32", "float", "torch.float32")),
                 f"--deepspeed-config {self.parallel.deepspeed_config}: data_types.grad_accum_dtype {accumulate} with "
                 "--bf16 and ZeRO-1 makes DeepSpeed use its BF16_Optimizer, which this engine does not drive; use "
                 "--zero-stage 2 (or 3), or remove data_types.grad_accum_dtype")

    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.model.seq_length

    def total_iters(self) -> int:
        return self.train.total_iters(self.model.seq_length)

    def total_tokens(self) -> int:
        """Tokens of the whole run (the trainer's ``tokens_seen`` at its last step)."""
        return self.total_iters() * self.tokens_per_step()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """The config stored in a checkpoint; fields since retired (``_RETIRED``) are dropped."""
        def section(name: str, section_cls):
            values = {k: v for k, v in d.get(name, {}).items() if k not in _RETIRED.get(name, ())}
            return section_cls(**values)

        prune = d.get("prune", {})
        return cls(
            model=section("model", ModelConfig), parallel=section("parallel", ParallelConfig),
            data=section("data", DataConfig), optim=section("optim", OptimConfig),
            train=section("train", TrainConfig), checkpoint=section("checkpoint", CheckpointConfig),
            logging=section("logging", LoggingConfig),
            prune=PruneConfig(**{**prune, "types": tuple(prune.get("types", ("heads", "ffn", "hidden"))),
                                 "shrink_at": tuple(prune.get("shrink_at", ()))}),
            distill=section("distill", DistillConfig),  # absent in checkpoints from before distillation
        )


# fields older checkpoints store that no config has any more
_RETIRED = {"data": ("num_workers",)}
