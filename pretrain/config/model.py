"""The model section: a Llama-style decoder's shape (``--num-layers`` ...), and the presets."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from pretrain.config.flags import check_ranges, flag, require


def layer_shapes_file(path: str) -> list:
    """A JSON file: one {num_query_groups, num_attention_heads, ffn_hidden_size} per layer."""
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
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        groups = self.query_groups
        require(
            self.num_attention_heads % groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({groups})",
        )
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size ({self.hidden_size}) must be a multiple of --num-attention-heads "
                f"({self.num_attention_heads}), or set --kv-channels",
            )
        require(self.head_dim % 2 == 0, f"head size {self.head_dim} must be even for RoPE")
        require(self.rope_scaling_factor >= 1, f"--rope-scaling-factor {self.rope_scaling_factor} must be >= 1")
        if self.layer_shapes is not None:
            require(len(self.layer_shapes) == self.num_layers,
                     f"layer_shapes has {len(self.layer_shapes)} entries for {self.num_layers} layers")
            hpg = self.num_attention_heads // self.query_groups
            for i, shape in enumerate(self.layer_shapes):
                require(shape["num_query_groups"] >= 1 and shape["ffn_hidden_size"] >= 1
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
            require(shape[key] <= widest,
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
            require(
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
