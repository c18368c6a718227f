"""The parallelism section (TP, PP, the engine) and the policy for a ``--deepspeed-config`` file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

from pretrain.config.flags import flag, require, require_choice
from pretrain.config.model import ModelConfig
from pretrain.errors import ConfigError


@dataclass(kw_only=True)
class ParallelConfig:
    cli_group: ClassVar[str] = "parallelism"

    tensor_model_parallel_size: int = flag(1, at_least=1)
    pipeline_model_parallel_size: int = flag(1, at_least=1)
    use_distributed_optimizer: bool = flag(True, name="--no-use-distributed-optimizer", action="store_false",
                                           help="plain DDP optimizer instead of the distributed one")
    # issue 17: the DeepSpeed engine (ZeRO 1/2/3, optimizer offload) under the same trainer
    engine: Literal["megatron", "deepspeed"] = flag(
        "megatron", help="megatron: megatron-core DDP and its distributed optimizer; deepspeed: DeepSpeed ZeRO "
                         "over megatron-core's data-parallel group (TP inside the model as before; PP must be 1)")
    zero_stage: int | None = flag(
        None,
        help="--engine deepspeed: ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters) sharded "
             "over data parallel; default: the --deepspeed-config's, else 1", at_least=1, at_most=3)
    deepspeed_config: str | None = flag(
        None, metavar="FILE.json",
        help="--engine deepspeed: a DeepSpeed JSON config for everything else it offers; where it and our "
             "flags both set something, the flag wins (with a message)")
    offload_optimizer: Literal["none", "cpu"] | None = flag(
        None,
        help="--engine deepspeed: keep the fp32 master weights and Adam moments in host memory (ZeRO-Offload); "
             "default: the --deepspeed-config's, else none")

    def validate(self, model: ModelConfig, world_size: int) -> None:
        self.validate_engine()
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        require(tp >= 1 and pp >= 1, f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp}: "
                 "both must be >= 1")
        require(
            world_size % (tp * pp) == 0,
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}); launch a multiple of {tp * pp} processes",
        )
        for i, (groups, heads, ffn) in enumerate(model.layer_widths() if model.layer_shapes else []):
            require(groups % tp == 0 and ffn % tp == 0,
                     f"layer {i}: {groups} query groups / FFN {ffn} do not divide over "
                     f"--tensor-model-parallel-size ({tp})")
        require(
            model.num_attention_heads % tp == 0,
            f"--num-attention-heads ({model.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        require(
            model.query_groups % tp == 0,
            f"--num-query-groups ({model.query_groups}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        require(
            model.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size ({model.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})",
        )
        require(
            model.num_layers % pp == 0,
            f"--num-layers ({model.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({pp})",
        )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def validate_engine(self) -> None:
        """The engine flags on their own (no process group needed; runs before any starts)."""
        require_choice(self, "engine", "--engine")
        if self.engine != "deepspeed":
            given = [name for name, value in (("--zero-stage", self.zero_stage),
                                              ("--deepspeed-config", self.deepspeed_config),
                                              ("--offload-optimizer", self.offload_optimizer)) if value is not None]
            require(not given, f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --engine deepspeed")
            return
        require(self.zero_stage is None or self.zero_stage in (1, 2, 3),
                 f"--zero-stage {self.zero_stage}: DeepSpeed ZeRO has stages 1, 2 and 3")
        if self.offload_optimizer is not None:
            require_choice(self, "offload_optimizer", "--offload-optimizer")
        require(self.pipeline_model_parallel_size == 1,
                 f"--engine deepspeed with --pipeline-model-parallel-size {self.pipeline_model_parallel_size}: "
                 "not supported (DeepSpeed's pipeline engine cannot run megatron-core's pipeline schedule); use "
                 "--engine megatron for PP > 1, or PP 1 with --zero-stage 3 to shard the parameters instead")
        read_deepspeed_json(self.deepspeed_config)

    def deepspeed_zero(self) -> tuple[int, str]:
        """The ZeRO stage and optimizer-offload device this run uses: the flag, else the
        --deepspeed-config's, else stage 1 and "none"."""
        zero = read_deepspeed_json(self.deepspeed_config).get("zero_optimization", {})
        stage = self.zero_stage or zero.get("stage", 1)
        offload = self.offload_optimizer or (zero.get("offload_optimizer") or {}).get("device", "none")
        return stage, offload


# DeepSpeed JSON sections a run cannot take from the file: the trainer builds the optimizer and the
# LR schedule from our flags, and has no fp16 loss scaler (bf16 needs none)
_DEEPSPEED_REFUSED = {
    "optimizer": "the optimizer is AdamW from --lr, --adam-beta1/2, --adam-eps and --weight-decay",
    "scheduler": "the LR schedule is --lr-decay-style, --lr-warmup-iters and --min-lr",
    "pipeline": "pipeline parallelism is refused with --engine deepspeed",
}


def read_deepspeed_json(path: str | None) -> dict:
    """The --deepspeed-config file as a dict ({} without one); a ConfigError names what is wrong."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"--deepspeed-config {path}: cannot read it ({err.strerror})") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed-config {path} line {err.lineno} column {err.colno}: "
                          f"not valid JSON ({err.msg})") from None
    require(isinstance(settings, dict), f"--deepspeed-config {path}: a JSON object is needed, not "
                                         f"{type(settings).__name__}")
    for key, why in _DEEPSPEED_REFUSED.items():
        require(key not in settings, f"--deepspeed-config {path}: remove its \"{key}\" section ({why})")
    require(not (settings.get("fp16") or {}).get("enabled", False),
             f"--deepspeed-config {path}: fp16 is not supported (no loss scaler in the trainer); use --bf16")
    zero = settings.get("zero_optimization", {})
    require(isinstance(zero, dict), f"--deepspeed-config {path}: \"zero_optimization\" must be an object")
    for section in ("offload_optimizer", "offload_param"):
        device = (zero.get(section) or {}).get("device") if isinstance(zero.get(section), dict) else None
        require(device != "nvme", f"--deepspeed-config {path}: zero_optimization.{section}.device nvme is not "
                                   "supported (pruning writes the optimizer state in place; NVMe swaps it out): use cpu")
    checkpoint = settings.get("checkpoint")
    require(not (isinstance(checkpoint, dict) and checkpoint.get("use_node_local_storage")),
             f"--deepspeed-config {path}: checkpoint.use_node_local_storage is not supported: checkpoints go to "
             "--save, one folder every node shares (checked at start), where each node's first rank would write "
             "the same files; remove it")
    stage = zero.get("stage", 1)
    require(stage in (1, 2, 3), f"--deepspeed-config {path}: zero_optimization.stage {stage!r}: DeepSpeed ZeRO "
                                 "has stages 1, 2 and 3 (stage 0 is plain data parallel: use --engine megatron)")
    return settings
