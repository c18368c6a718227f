"""Typed configs, one per component; each validates itself with a message that names the flag.

Every command-line flag is declared here, once, on the field it sets (``flag(...)``: Megatron-LM's
name where one exists, default, help; choices are ``Literal`` types). ``pretrain/run/arguments.py``
builds the parser from these declarations and only fills the configs; nothing reads a global
namespace. This module is the bottom layer: it imports nothing else of the project.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

from pretrain.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Flag:
    """How a config field is set from the command line."""

    name: str | None = None  # default: --field-name
    help: str = ""
    parse: Callable | None = None  # text -> value; a bad value is a usage error naming the flag
    metavar: str | None = None
    action: str | None = None  # "store_false" for a --no-... flag of a field that defaults to True
    # the command line leaves it None: resolved later (a --model preset, the --load checkpoint,
    # the tokenizer file); the field's own default applies when nothing else gives it
    resolved_later: bool = False
    expand: Callable | None = None  # value -> {field: value} for a flag that sets several fields
    # the range of a numeric flag (issue 31): every int/float flag declares one (its test walks them
    # all); ``check_ranges`` refuses a value outside it, and NaN/inf always
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def range_words(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``: the range as a message says it."""
        def text(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        low = (f"[{text(self.at_least)}" if self.at_least is not None else
               f"({text(self.above)}" if self.above is not None else None)
        high = (f"{text(self.at_most)}]" if self.at_most is not None else
                f"{text(self.below)})" if self.below is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1] if high else "a finite number"

    def in_range(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most) and (self.below is None or value < self.below))


def flag(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **spec):
    """A config field with its command-line flag (see ``Flag``)."""
    return field(default=default, default_factory=default_factory, metadata={"flag": Flag(**spec)})


def flag_of(cls, name: str) -> str:
    """The command-line flag of field ``name`` of config class ``cls``."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["flag"]
    return spec.name or "--" + name.replace("_", "-")


def ranged(kind: type, **bounds) -> Callable[[str], int | float]:
    """The argparse ``type`` of a tool's numeric flag (the tools' own flags are not config fields):
    ``kind`` (int also in scientific notation, 4e8) within ``bounds`` (``Flag``'s ``at_least``,
    ``above``, ``at_most``, ``below``), else a usage error naming the flag and the range."""
    spec = Flag(**bounds)

    def parse(text: str) -> int | float:
        value = whole_number(text) if kind is int else _number(text)
        if not spec.in_range(value):
            raise argparse.ArgumentTypeError(f"{text}: must be {spec.range_words()}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def check_ranges(section) -> None:
    """Refuse a numeric field of ``section`` (a config dataclass) outside its flag's range
    (``Flag.at_least`` ...), naming the flag: a value the code would otherwise take silently (a
    negative minimum, a NaN epsilon) or read as "not given" (0 for an optional size)."""
    for f in dataclasses.fields(section):
        spec = f.metadata.get("flag")
        value = getattr(section, f.name)
        if spec is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = spec.name or "--" + f.name.replace("_", "-")
        _require(spec.in_range(value), f"{name} {value}: must be {spec.range_words()}")


def choices(cls, name: str) -> tuple:
    """The values a ``Literal``-typed field of ``cls`` allows (the one list of them)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is not Literal:  # Literal[...] | None
        hint = next(a for a in typing.get_args(hint) if typing.get_origin(a) is Literal)
    return typing.get_args(hint)


def _require_choice(obj, name: str, flag_name: str) -> None:
    allowed = choices(type(obj), name)
    value = getattr(obj, name)
    _require(value in allowed, f"{flag_name} {value!r}: use {', '.join(map(str, allowed))}")


# -- value parsers of flags whose text is not a plain int/float/str
def token_count(text: str) -> int:
    """A count written as an integer or in scientific notation (5e10)."""
    value = _number(text)
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def whole_number(text: str) -> int:
    """An integer, also in scientific notation (4e8); range checks are the config's."""
    value = _number(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
    return int(value)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def comma_list(text: str) -> tuple:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def layer_shapes_file(path: str) -> list:
    """A JSON file: one {num_query_groups, num_attention_heads, ffn_hidden_size} per layer."""
    import json

    try:
        with open(path) as f:
            shapes = json.load(f)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{path} line {err.lineno}: not JSON ({err.msg})") from None
    keys = {"num_query_groups", "num_attention_heads", "ffn_hidden_size"}
    if not isinstance(shapes, list) or not shapes or not all(
            isinstance(s, dict) and set(s) == keys and all(isinstance(v, int) and v > 0 for v in s.values())
            for s in shapes):
        raise argparse.ArgumentTypeError(f"{path}: expected a list with one object per layer, each exactly "
                                         f"{sorted(keys)} as positive integers")
    return shapes


def shrink_points(text: str) -> str:
    """'auto', or comma-separated token counts (checked here so a typo is a usage error)."""
    if text.strip() != "auto":
        for item in comma_list(text):
            token_count(item)
    return text


def _expand_shrink_points(text: str | None) -> dict:
    text = (text or "").strip()
    return {"shrink_auto": text == "auto",
            "shrink_at": () if text == "auto" else tuple(token_count(t) for t in comma_list(text))}


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, GQA; no biases, or Qwen2's q/k/v biases."""

    cli_group: ClassVar[str] = "model"

    # the command line leaves every model flag unset unless given: a --model preset or the --load
    # checkpoint fills the rest (pretrain.run.arguments)
    num_layers: int = flag(resolved_later=True, at_least=1)
    hidden_size: int = flag(resolved_later=True, at_least=1)
    num_attention_heads: int = flag(resolved_later=True, at_least=1)
    ffn_hidden_size: int = flag(resolved_later=True, at_least=1)
    num_query_groups: int | None = flag(
        None, resolved_later=True, at_least=1,
        help="GQA groups (default: one per head, or 1 with --group-query-attention)")
    kv_channels: int | None = flag(None, resolved_later=True, help="head size (default hidden/heads)", at_least=1)
    seq_length: int = flag(2048, resolved_later=True, at_least=1)
    max_position_embeddings: int | None = flag(None, resolved_later=True, at_least=1)
    vocab_size: int | None = flag(None, resolved_later=True, at_least=1,
                                  help="model vocabulary (default: tokenizer's, padded)")
    make_vocab_size_divisible_by: int = flag(128, resolved_later=True, at_least=1)
    untie_embeddings_and_output_weights: bool = flag(False)
    add_qkv_bias: bool = flag(False, help="biases on q, k and v (Qwen2); no other linear has one")
    rotary_base: float = flag(10000.0, resolved_later=True, above=0)
    # megatron-core's Llama 3.x RoPE scaling (Megatron-LM's --use-rope-scaling / --rope-scaling-factor)
    use_rope_scaling: bool = flag(
        False, help="Llama 3.x RoPE scaling (low/high frequency factors 1 and 4, original context 8192)")
    rope_scaling_factor: float = flag(8.0, resolved_later=True, help="with --use-rope-scaling", at_least=1)
    norm_epsilon: float = flag(1e-5, resolved_later=True, above=0)
    init_method_std: float = flag(0.02, resolved_later=True, above=0)
    # a heterogeneous model (after a per-layer shrink): per layer {num_query_groups,
    # num_attention_heads, ffn_hidden_size}; the fields above then hold the widest layer's
    layer_shapes: list | None = flag(
        None, resolved_later=True, parse=layer_shapes_file, metavar="FILE.json",
        help="a per-layer model (what a per-layer shrink makes), trained from scratch: a JSON list with one "
             "{num_query_groups, num_attention_heads, ffn_hidden_size} per layer; the flags above then give "
             "the widest layer")

    # not a flag: the vocabulary the softmax covers (the tokenizer's, or an imported model's own),
    # set by the run (pretrain.resume.with_unpadded_vocab) and saved with the config. The rows past
    # it are megatron's padding (--make-vocab-size-divisible-by x TP): their logits are -inf
    # (pretrain.model.build.mask_padded_logits), so the model trained is the one exported. None: a
    # checkpoint from before it was recorded.
    unpadded_vocab_size: int | None = None

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
                self._check_layer_within_global(i, shape)
        check_ranges(self)

    def _check_layer_within_global(self, i: int, shape: dict) -> None:
        """The global flags are the widest layer's: the parameter count, the HF export and every
        rebuild read them, so a wider layer would train and then break everything after."""
        for key, widest in (("num_query_groups", self.query_groups), ("num_attention_heads", self.num_attention_heads),
                            ("ffn_hidden_size", self.ffn_hidden_size)):
            flag_name = "--" + key.replace("_", "-")
            _require(shape[key] <= widest,
                     f"--layer-shapes: layer {i} has {key} {shape[key]}, more than {flag_name} {widest}; the "
                     f"global flags must give the widest layer: raise {flag_name} to at least {shape[key]}")

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
        from pretrain.model.shape import ModelShape  # lazy: torch, which importing the configs (every --help) must not pay for

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
        _require(tp >= 1 and pp >= 1, f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp}: "
                 "both must be >= 1")
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

    def validate_engine(self) -> None:
        """The engine flags on their own (no process group needed; runs before any starts)."""
        _require_choice(self, "engine", "--engine")
        if self.engine != "deepspeed":
            given = [name for name, value in (("--zero-stage", self.zero_stage),
                                              ("--deepspeed-config", self.deepspeed_config),
                                              ("--offload-optimizer", self.offload_optimizer)) if value is not None]
            _require(not given, f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --engine deepspeed")
            return
        _require(self.zero_stage is None or self.zero_stage in (1, 2, 3),
                 f"--zero-stage {self.zero_stage}: DeepSpeed ZeRO has stages 1, 2 and 3")
        if self.offload_optimizer is not None:
            _require_choice(self, "offload_optimizer", "--offload-optimizer")
        _require(self.pipeline_model_parallel_size == 1,
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
    import json

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
    _require(isinstance(settings, dict), f"--deepspeed-config {path}: a JSON object is needed, not "
                                         f"{type(settings).__name__}")
    for key, why in _DEEPSPEED_REFUSED.items():
        _require(key not in settings, f"--deepspeed-config {path}: remove its \"{key}\" section ({why})")
    _require(not (settings.get("fp16") or {}).get("enabled", False),
             f"--deepspeed-config {path}: fp16 is not supported (no loss scaler in the trainer); use --bf16")
    zero = settings.get("zero_optimization", {})
    _require(isinstance(zero, dict), f"--deepspeed-config {path}: \"zero_optimization\" must be an object")
    for section in ("offload_optimizer", "offload_param"):
        device = (zero.get(section) or {}).get("device") if isinstance(zero.get(section), dict) else None
        _require(device != "nvme", f"--deepspeed-config {path}: zero_optimization.{section}.device nvme is not "
                                   "supported (pruning writes the optimizer state in place; NVMe swaps it out): use cpu")
    checkpoint = settings.get("checkpoint")
    _require(not (isinstance(checkpoint, dict) and checkpoint.get("use_node_local_storage")),
             f"--deepspeed-config {path}: checkpoint.use_node_local_storage is not supported: checkpoints go to "
             "--save, one folder every node shares (checked at start), where each node's first rank would write "
             "the same files; remove it")
    stage = zero.get("stage", 1)
    _require(stage in (1, 2, 3), f"--deepspeed-config {path}: zero_optimization.stage {stage!r}: DeepSpeed ZeRO "
                                 "has stages 1, 2 and 3 (stage 0 is plain data parallel: use --engine megatron)")
    return settings


@dataclass(kw_only=True)
class DataConfig:
    cli_group: ClassVar[str] = "data"

    data_path: list[str] = flag(default_factory=list, help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    # left None by the command line, so that a --split beside per-split data is seen (and refused)
    split: str = flag("969,30,1", resolved_later=True, help="train,valid,test shares of --data-path "
                      "(default 969,30,1)")
    # the command line leaves both to the --load checkpoint's recorded tokenizer, else infers the
    # type from the model file (pretrain.run.arguments)
    tokenizer_type: str = flag(
        "GPTSentencePieceTokenizer", resolved_later=True,
        help="default: the --load checkpoint's, else HuggingFaceTokenizer for a HF folder or tokenizer.json, "
             "else GPTSentencePieceTokenizer")
    tokenizer_model: str | None = flag(
        None, resolved_later=True, help="a sentencepiece model, a HF tokenizer folder or a tokenizer.json; "
        "default: the tokenizer recorded in the --load checkpoint")
    vocab_size_for_null_tokenizer: int | None = flag(None, name="--null-vocab-size", at_least=1,
                                                     help="vocabulary of NullTokenizer")
    mock_data: bool = flag(False, help="synthetic data (no --data-path)")
    data_cache_path: str | None = flag(None)
    # Megatron-LM's --test-data-path: a separate held-out set (the --split test share is then
    # unused); evaluated on the same sequences at every evaluation, whatever the run's seed
    test_data_path: list[str] = flag(
        default_factory=list, help="a held-out test set (PREFIX, or weight/prefix pairs), evaluated with validation "
        "and at the end on the same sequences every time; the test share of --split is then unused")
    # Megatron-LM's per-split blends: training and validation data of their own, instead of
    # --data-path cut by --split
    train_data_path: list[str] = flag(default_factory=list, help="training data of its own (instead of --data-path "
                                      "and --split): PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    valid_data_path: list[str] = flag(default_factory=list, help="validation data of its own (with "
                                      "--train-data-path)")
    # megatron-core builds the index files of several datasets of a blend in parallel (rank 0 first)
    num_dataset_builder_threads: int = flag(1, help="threads building the datasets of a blend at start-up", at_least=1)

    def blend(self, flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
        """Megatron-LM's ``--data-path`` forms (``parse_blend``) of ``data_path``."""
        return parse_blend(self.data_path, flag)

    @property
    def per_split(self) -> bool:
        """Training (and validation) data given per split, not cut from --data-path by --split."""
        return bool(self.train_data_path)

    def training_blend(self) -> tuple[list[str], list[float] | None]:
        """What training reads: --train-data-path's blend, else --data-path's."""
        return parse_blend(self.train_data_path, "--train-data-path") if self.per_split else self.blend()

    def blend_per_split(self) -> list:
        """megatron-core's ``blend_per_split``: [train, valid, test] (the test set is built apart)."""
        valid = parse_blend(self.valid_data_path, "--valid-data-path") if self.valid_data_path else None
        return [self.training_blend(), valid, None]

    def all_prefixes(self) -> list[str]:
        """Every dataset training or validation reads (not --test-data-path)."""
        if not self.per_split:
            return self.blend()[0]
        valid = parse_blend(self.valid_data_path, "--valid-data-path")[0] if self.valid_data_path else []
        return self.training_blend()[0] + valid

    def test_data(self) -> "DataConfig":
        """The --test-data-path set as a dataset config of its own (all of it is test data)."""
        return dataclasses.replace(self, data_path=list(self.test_data_path), split="0,0,100", test_data_path=[],
                                   train_data_path=[], valid_data_path=[])

    def validate(self) -> None:
        _require(self.num_dataset_builder_threads >= 1,
                 f"--num-dataset-builder-threads {self.num_dataset_builder_threads}: must be at least 1")
        if self.mock_data:
            return
        if self.per_split:
            _require(not self.data_path, "--data-path and --train-data-path both give the training data: give "
                     "--data-path (cut by --split) or --train-data-path/--valid-data-path, not both")
        else:
            _require(not self.valid_data_path, "--valid-data-path goes with --train-data-path (with --data-path, "
                     "--split cuts the validation data)")
            _require(bool(self.data_path), "--data-path is required (or --train-data-path, or --mock-data for "
                     "synthetic data)")
        prefixes = self.all_prefixes()
        test_prefixes = parse_blend(self.test_data_path, "--test-data-path")[0] if self.test_data_path else []
        training_flag = "--train-data-path/--valid-data-path" if self.per_split else "--data-path"
        for flag, group in ((training_flag, prefixes), ("--test-data-path", test_prefixes)):
            for prefix in group:
                for ext in (".bin", ".idx"):
                    _require(
                        os.path.isfile(prefix + ext),
                        f"{flag}: {prefix + ext} does not exist; build it with "
                        "tools/preprocess_data.py (give the prefix without .bin/.idx)",
                    )
        shared = {os.path.realpath(p) for p in prefixes} & {os.path.realpath(p) for p in test_prefixes}
        _require(not shared, f"--test-data-path {' '.join(sorted(shared))} is also in {training_flag}: a test "
                 "set must be data that training never reads")
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


def parse_blend(items: list[str], flag: str) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's ``--data-path`` forms: ``PREFIX``, ``W1 PREFIX1 W2 PREFIX2 ...``, or
    ``PREFIX1 PREFIX2 ...`` (no weights: each dataset once, weighted by its size). Every weight
    must be a finite number > 0: megatron-core's blend never finishes sampling a dataset of weight
    0 (``_get_num_epochs`` loops forever), and a negative one has no meaning."""
    if len(items) == 1:
        return [items[0]], None
    if not any(_is_number(item) for item in items):
        return list(items), None
    _require(len(items) % 2 == 0, f"{flag} takes one prefix, or weight/prefix pairs: W1 PREFIX1 W2 PREFIX2 ...")
    weights, prefixes = [], []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(weight))
        except ValueError:
            raise ConfigError(f"{flag}: {weight!r} is not a weight (pairs are W PREFIX)") from None
        _require(math.isfinite(weights[-1]) and weights[-1] > 0,
                 f"{flag}: weight {weight} of {prefix}: a weight must be a number > 0; leave the dataset out of "
                 "the blend to not train on it")
        prefixes.append(prefix)
    return prefixes, weights


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
    parse_blend(items, f"--data-args-path {path}")  # its own name in the message, not --data-path's
    return items


@dataclass(kw_only=True)
class OptimConfig:
    cli_group: ClassVar[str] = "optimizer"

    lr: float = flag(3e-4, above=0)
    min_lr: float = flag(3e-5, at_least=0)
    weight_decay: float = flag(0.1, at_least=0)
    adam_beta1: float = flag(0.9, at_least=0, below=1)
    adam_beta2: float = flag(0.95, at_least=0, below=1)
    adam_eps: float = flag(1e-8, above=0)
    clip_grad: float = flag(1.0, at_least=0)
    lr_warmup_iters: int = flag(0, at_least=0)
    lr_decay_iters: int | None = flag(None, help="default: the training length", at_least=1)
    lr_decay_style: Literal["cosine", "linear", "constant", "WSD", "inverse-square-root"] = flag("cosine")

    def validate(self) -> None:
        _require(self.lr > 0, "--lr must be positive")
        _require(0 <= self.min_lr <= self.lr, "--min-lr must be between 0 and --lr")
        _require_choice(self, "lr_decay_style", "--lr-decay-style")
        _require(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")


@dataclass(kw_only=True)
class TrainConfig:
    cli_group: ClassVar[str] = "training"

    micro_batch_size: int = flag(1, at_least=1)
    global_batch_size: int = flag(8, at_least=1)
    train_iters: int | None = flag(None, at_least=1)
    train_tokens: int | None = flag(None, parse=token_count, help="e.g. 5e10 (instead of --train-iters)", at_least=1)
    seed: int = flag(1234, at_least=0, at_most=2**32 - 1)
    bf16: bool = flag(False)
    eval_interval: int = flag(0, help="0: no evaluation during training", at_least=0)
    eval_iters: int = flag(10, at_least=0)
    log_interval: int = flag(10, at_least=1)
    exit_interval: int | None = flag(None, help="save and exit at this iteration", at_least=1)
    dry_run: bool = flag(False, help="build everything, print the plan, exit")
    # Megatron-LM's flag: measure a checkpoint (a released parent) on the run's own validation and
    # test batches, so its losses compare with the runs trained from it
    skip_train: bool = flag(False, help="load, evaluate the validation split and --test-data-path once "
                                        "(--eval-iters batches), save nothing, exit")
    max_skipped_nonfinite_steps: int = flag(
        3, help="skip a step whose loss or gradients are NaN/inf (no update); after this many in one run, "
                "stop with an error (the last checkpoint stays the newest)", at_least=0)

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
        _require(self.total_iters(seq_length) > 0,
                 "--train-iters/--train-tokens: the training length must be at least one iteration")
        _require(self.log_interval > 0, "--log-interval must be positive")
        _require(self.eval_interval >= 0 and self.eval_iters >= 0, "--eval-interval/--eval-iters must be >= 0")
        _require(self.max_skipped_nonfinite_steps >= 0, "--max-skipped-nonfinite-steps must be >= 0")

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        """Micro-batches each data-parallel rank runs per step (gradient accumulation steps): the one
        count the trainer, the DeepSpeed engine's settings and the plan use."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)

    def total_iters(self, seq_length: int) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return int(math.ceil(self.train_tokens / (self.global_batch_size * seq_length)))


@dataclass(kw_only=True)
class CheckpointConfig:
    cli_group: ClassVar[str] = "checkpointing and logging"

    save: str | None = flag(None)
    load: str | None = flag(None)
    save_interval: int | None = flag(None, at_least=1)
    no_load_optim: bool = flag(False)
    no_load_rng: bool = flag(False)
    finetune: bool = flag(False, help="load weights only; start at iteration 0 with a fresh optimizer")
    keep_last: int | None = flag(None, help="keep only the newest N checkpoints", at_least=1)
    use_checkpoint_args: bool = flag(
        False, help="take the model shape from the --load checkpoint (e.g. after a shrink)")
    # Megatron-LM's names and meaning; without either, a resume whose schedule flags differ from
    # the checkpoint's schedule stops and says what each would do (pretrain.resume)
    override_opt_param_scheduler: bool = flag(
        False, name="--override-opt_param-scheduler",
        help="on resume, follow this command's LR schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-style, "
             "--lr-decay-iters or the training length, --weight-decay) from the checkpoint's iteration on")
    use_checkpoint_opt_param_scheduler: bool = flag(
        False, name="--use-checkpoint-opt_param-scheduler",
        help="on resume, keep the checkpoint's LR schedule whatever the schedule flags say")
    # not a flag: the command line always saves and stops cleanly on SIGTERM/SIGUSR1/SIGINT
    exit_signal_handler: bool = True

    def validate(self) -> None:
        if self.save_interval is not None:
            _require(self.save_interval > 0, "--save-interval must be positive")
            _require(self.save is not None, "--save-interval needs --save")
        if self.keep_last is not None:
            _require(self.keep_last >= 1, "--keep-last must be >= 1")
        _require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                 "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other: pick one")


# what can be pruned: query groups, FFN channels, hidden channels, whole layers (the one list)
PruneType = Literal["heads", "ffn", "hidden", "layers"]
PRUNE_TYPES: tuple = typing.get_args(PruneType)


@dataclass(kw_only=True)
class PruneConfig:
    """Pruning-aware pretraining (off unless a target is given)."""

    cli_group: ClassVar[str] = "pruning-aware pretraining (off unless a target is given)"

    target_params: int | None = flag(None, name="--prune-target-params", parse=whole_number,
                                     help="final parameter count (e.g. 4e8)", at_least=1)
    target_ratio: float | None = flag(None, name="--prune-target-ratio", above=0, below=1,
                                      help="final parameters / initial parameters")
    # resuming a checkpoint that carries pruning state: it is kept and applied (and, without
    # --prune-* flags, its own pruning settings continue) unless one of these says otherwise
    end_pruning: bool = flag(
        False, help="with --load of a pruning checkpoint: keep its masks, remove no further groups")
    drop_state: bool = flag(False, name="--drop-pruning-state",
                            help="with --load of a pruning checkpoint: discard its masks (pruned groups train again)")
    start_tokens: int = flag(0, name="--prune-start-tokens", parse=whole_number, at_least=0)
    end_tokens: int | None = flag(None, name="--prune-end-tokens", parse=whole_number,
                                  help="default: the end of training", at_least=1)
    interval: int = flag(10, name="--prune-interval", help="steps between pruning events", at_least=1)
    ramp: Literal["linear", "cubic"] = flag("linear", name="--prune-ramp")
    saliency: Literal["taylor", "fisher", "obs", "activation"] = flag("taylor")
    # vector-form sums cancel like sqrt(group size): README, issue 21
    taylor_form: Literal["vector", "element"] = flag("element", name="--saliency-taylor-form")
    saliency_ema: float = flag(0.9, help="EMA factor across scoring steps", at_least=0, below=1)
    obs_exact: bool = flag(False, name="--saliency-obs-exact",
                           help="obs: exact inverse of the layer-input Hessian (small layers)")
    types: tuple[PruneType, ...] = flag(
        ("heads", "ffn", "hidden"), name="--prune-types", parse=comma_list,
        help="comma-separated: heads, ffn, hidden, and optionally layers (whole layers)")
    granularity: Literal["uniform", "per-layer"] = flag("per-layer", name="--prune-granularity")
    align: int | None = flag(None, name="--prune-align", at_least=1,
                             help="channel alignment (default 8 on CPU, 64 on GPU)")
    min_heads: int = flag(1, name="--prune-min-heads", help="minimum query groups per layer", at_least=1)
    min_ffn: int = flag(0, name="--prune-min-ffn", at_least=0)
    min_hidden: int = flag(0, name="--prune-min-hidden", at_least=0)
    min_layers: int = flag(1, name="--prune-min-layers", at_least=1)
    # in-run shrink: token counts, or "auto" (end of pruning, and each time the kept parameter
    # fraction has fallen by shrink_every_fraction since the last shrink); --shrink-at sets both
    shrink_at: tuple = flag(
        (), parse=shrink_points, expand=_expand_shrink_points,
        help="shrink the model in-run at these token counts (comma-separated), or 'auto': at the end of "
             "pruning (and see --shrink-every-fraction); needs --save")
    shrink_auto: bool = False
    shrink_every_fraction: float | None = flag(
        None, help="with --shrink-at auto: also shrink whenever the kept parameter fraction has fallen by "
                   "this much since the last shrink", above=0, below=1)
    # the layout to continue on after an in-run shrink (None: keep the current one)
    shrink_tensor_parallel_size: int | None = flag(
        None, name="--shrink-tensor-model-parallel-size",
        help="continue on this TP size after an in-run shrink (default: unchanged)", at_least=1)
    shrink_pipeline_parallel_size: int | None = flag(
        None, name="--shrink-pipeline-model-parallel-size",
        help="continue on this PP size after an in-run shrink (default: unchanged)", at_least=1)
    # issue 21: allocation across types and safety on real pretrained models
    allocation: Literal["global", "proportional"] = flag(
        "global", name="--prune-allocation",
        help="global: one saliency-per-parameter ranking over all types; proportional: every type pruned by "
             "the same fraction (a baseline)")
    max_step_fraction: float = flag(
        0.25, name="--prune-max-step-fraction",
        help="one pruning event removes at most this fraction of the model's parameters", above=0, at_most=1)
    loss_jump_warn: float = flag(
        0.5, name="--prune-loss-jump-warn",
        help="warn (log, tensorboard, history) when the loss rises by more than this many nats from the step "
             "before a pruning event to the step after it", above=0)
    # issue 16: OBS compensation of the surviving weights at each event (pretrain/pruning/compensation.py)
    compensation: Literal["none", "obs"] = flag(
        "none", name="--prune-compensation",
        help="obs: at each pruning event, update the surviving input columns of the linears that read the "
             "removed channels (SparseGPT's OBS update with the input Hessian of recent steps)")
    compensation_window: int = flag(
        1, name="--prune-compensation-window",
        help="--prune-compensation obs: steps before each event whose layer inputs form the Hessian", at_least=1)
    compensation_damp: float = flag(
        0.01, name="--prune-compensation-damp",
        help="--prune-compensation obs: damping added to the Hessian's diagonal, as a fraction of its mean",
        above=0, below=1e3)
    compensation_probe: bool = flag(
        False, name="--prune-compensation-probe",
        help="--prune-compensation obs: at each event, the --test-data-path loss (first --eval-iters batches) "
             "before it and after it without and with the update (three evaluations per event)")

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
        for name, flag_name in (("ramp", "--prune-ramp"), ("saliency", "--saliency"),
                                ("taylor_form", "--saliency-taylor-form"), ("granularity", "--prune-granularity"),
                                ("allocation", "--prune-allocation")):
            _require_choice(self, name, flag_name)
        _require(0 <= self.saliency_ema < 1, "--saliency-ema must be in [0, 1)")
        bad = [t for t in self.types if t not in PRUNE_TYPES]
        _require(not bad and len(self.types) > 0,
                 f"--prune-types: {','.join(bad) or 'empty'}; use {', '.join(PRUNE_TYPES)}")
        _require(self.align is None or self.align >= 1, "--prune-align must be >= 1")
        if self.shrink_every_fraction is not None:
            _require(0 < self.shrink_every_fraction < 1, "--shrink-every-fraction must be in (0, 1)")
            _require(self.shrink_auto, "--shrink-every-fraction needs --shrink-at auto")
        self.validate_safety()

    def validate_safety(self) -> None:
        _require(0 < self.max_step_fraction <= 1, "--prune-max-step-fraction must be in (0, 1]")
        _require(self.loss_jump_warn > 0, "--prune-loss-jump-warn must be positive (nats)")
        _require_choice(self, "compensation", "--prune-compensation")
        _require(self.compensation_window >= 1, "--prune-compensation-window must be >= 1 (steps)")
        _require(self.compensation_window <= self.interval,
                 f"--prune-compensation-window ({self.compensation_window}) must not exceed --prune-interval "
                 f"({self.interval}): the Hessian is freed at every event")
        _require(0 < self.compensation_damp < 1e3, "--prune-compensation-damp must be positive (and below 1000)")
        _require(not self.compensation_probe or self.compensation == "obs",
                 "--prune-compensation-probe needs --prune-compensation obs")


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher checkpoint (pretrain/distill.py).

    loss = (1 - α)·CE + α·T²·KL(teacher_T ‖ student_T), both softmaxes at temperature T; the T²
    keeps the KL's gradient on the scale of the CE's whatever T is (Hinton et al.)."""

    cli_group: ClassVar[str] = "distillation"

    # absolute: the path is recorded in the student's checkpoints and read again on resume
    teacher: str | None = flag(None, name="--kd-teacher", metavar="CKPT", parse=os.path.abspath,
                               help="a checkpoint (ours, or tools/convert_from_hf.py's) to distil from: frozen, "
                                    "same vocabulary and tokenizer; its own shape")
    weight: float = flag(1.0, name="--kd-weight", help="α: the KL's share of the loss, in [0, 1] "
                                                        "(1: distillation only, Minitron's recipe)",
                   at_least=0, at_most=1)
    temperature: float = flag(1.0, name="--kd-temperature", help="T of both softmaxes", above=0)
    until_tokens: int | None = flag(None, name="--kd-until-tokens", parse=whole_number,
                                    help="distil until this many training tokens, then train on CE alone", at_least=1)

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    def validate(self) -> None:
        _require(0.0 <= self.weight <= 1.0, f"--kd-weight {self.weight}: must be in [0, 1] "
                 "(the KL's share of the loss; the CE gets 1 - it)")
        _require(self.temperature > 0 and math.isfinite(self.temperature),
                 f"--kd-temperature {self.temperature}: must be a positive number")
        _require(self.until_tokens is None or self.until_tokens > 0,
                 f"--kd-until-tokens {self.until_tokens}: must be positive")
        if not self.enabled:
            unused = [name for name, value, default in (("--kd-weight", self.weight, 1.0),
                                                        ("--kd-temperature", self.temperature, 1.0),
                                                        ("--kd-until-tokens", self.until_tokens, None))
                      if value != default]
            _require(not unused, f"{', '.join(unused)} given without --kd-teacher: name the teacher checkpoint")


@dataclass(kw_only=True)
class LoggingConfig:
    cli_group: ClassVar[str] = "checkpointing and logging"

    tensorboard_dir: str | None = flag(None)


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
            _require(bool(self.data.test_data_path) and self.train.eval_iters > 0,
                     "--prune-compensation-probe needs --test-data-path (and --eval-iters > 0): it evaluates there")
        for section in (self.model, self.parallel, self.data, self.optim, self.train, self.checkpoint, self.prune,
                        self.distill):
            check_ranges(section)  # after each section's own checks, which say more where they exist
        if self.parallel.engine == "deepspeed":
            self._validate_deepspeed_batch(world_size)
            self._validate_deepspeed_optimizer()
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
            _require(key not in settings or settings[key] == value,
                     f"--deepspeed-config {self.parallel.deepspeed_config}: {key} {settings.get(key)!r} contradicts "
                     f"{flag_name} ({value}); remove it from the file (the flags decide the batch)")

    def _validate_deepspeed_optimizer(self) -> None:
        """DeepSpeed swaps ZeRO-1 for its separate BF16_Optimizer when bf16 weights accumulate
        gradients in fp32 (``data_types.grad_accum_dtype``) without offload: pruning, checkpoints
        and the conversions reach ZeRO's partitions, not that optimizer's."""
        stage, offload = self.parallel.deepspeed_zero()
        data_types = read_deepspeed_json(self.parallel.deepspeed_config).get("data_types") or {}
        accumulate = str(data_types.get("grad_accum_dtype", "")).lower()
        _require(not (self.train.bf16 and stage == 1 and offload != "cpu"
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
