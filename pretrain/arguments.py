"""Command line -> typed configs. Flag names are Megatron-LM's where one exists."""

from __future__ import annotations

import argparse

from pretrain.config import (
    MODEL_PRESETS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PretrainConfig,
    PruneConfig,
    TrainConfig,
)

_MODEL_FIELDS = ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "kv_channels", "seq_length", "max_position_embeddings",
                 "vocab_size", "make_vocab_size_divisible_by", "rotary_base", "rope_scaling_factor",
                 "norm_epsilon", "init_method_std"]


def _token_count(text: str) -> int:
    """A count written as an integer or in scientific notation (5e10)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def _layer_shapes(path: str) -> list:
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


def _shrink_points(text: str) -> str:
    """'auto', or comma-separated token counts (checked here so a typo is a usage error)."""
    if text.strip() != "auto":
        for item in text.split(","):
            if item.strip():
                _token_count(item.strip())
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain",
                                description="Pruning-aware pretraining on megatron-core.")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODEL_PRESETS), default=None,
                   help="a preset shape; explicit flags below override its values")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int, help="GQA groups (default: one per head)")
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron-LM compatibility")
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--kv-channels", type=int, help="head size (default hidden/heads)")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="model vocabulary (default: tokenizer's, padded)")
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true", help="biases on q, k and v (Qwen2)")
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x RoPE scaling (low/high frequency factors 1 and 4, original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, help="with --use-rope-scaling (default 8)")
    g.add_argument("--layer-shapes", type=_layer_shapes, metavar="FILE.json",
                   help="a per-layer model (what a per-layer shrink makes), trained from scratch: a JSON list with "
                        "one {num_query_groups, num_attention_heads, ffn_hidden_size} per layer; the flags above "
                        "then give the widest layer")
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--init-method-std", type=float)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--no-use-distributed-optimizer", dest="use_distributed_optimizer",
                   action="store_false", help="plain DDP optimizer instead of the distributed one")
    g.add_argument("--launcher", choices=["auto", "torchrun", "slurm", "mpi"], default="auto",
                   help="how ranks are found: torchrun's variables, an srun step with one task per "
                        "device, or MPI (mpirun; mpi4py gives ranks and the master address). auto "
                        "tries them in that order")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--data-args-path", help="a file holding the --data-path list (whitespace-separated, e.g. "
                   "one 'W PREFIX' a line): for blends of thousands of datasets")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--test-data-path", nargs="+", default=[],
                   help="a held-out test set (PREFIX, or weight/prefix pairs), evaluated with validation and at "
                        "the end on the same sequences every time; the test share of --split is then unused")
    g.add_argument("--tokenizer-type", help="default: the --load checkpoint's, else HuggingFaceTokenizer for a "
                   "HF folder or tokenizer.json, else GPTSentencePieceTokenizer")
    g.add_argument("--tokenizer-model", help="a sentencepiece model, a HF tokenizer folder or a tokenizer.json; "
                   "default: the tokenizer recorded in the --load checkpoint")
    g.add_argument("--null-vocab-size", type=int, help="vocabulary of NullTokenizer")
    g.add_argument("--mock-data", action="store_true", help="synthetic data (no --data-path)")
    g.add_argument("--data-cache-path")

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--lr-decay-style", default="cosine")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-tokens", type=_token_count, help="e.g. 5e10 (instead of --train-iters)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--exit-interval", type=int, help="save and exit at this iteration")
    g.add_argument("--dry-run", action="store_true", help="build everything, print the plan, exit")
    g.add_argument("--max-skipped-nonfinite-steps", type=int, default=3,
                   help="skip a step whose loss or gradients are NaN/inf (no update); after this many "
                        "in one run, stop with an error (the last checkpoint stays the newest)")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape from the --load checkpoint (e.g. after a shrink)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only; start at iteration 0 with a fresh optimizer")
    g.add_argument("--tensorboard-dir")

    g = p.add_argument_group("pruning-aware pretraining (off unless a target is given)")
    g.add_argument("--prune-target-params", type=float, help="final parameter count (e.g. 4e8)")
    g.add_argument("--prune-target-ratio", type=float, help="final parameters / initial parameters")
    g.add_argument("--end-pruning", action="store_true",
                   help="with --load of a pruning checkpoint: keep its masks, remove no further groups")
    g.add_argument("--drop-pruning-state", action="store_true",
                   help="with --load of a pruning checkpoint: discard its masks (pruned groups train again)")
    g.add_argument("--prune-start-tokens", type=float, default=0)
    g.add_argument("--prune-end-tokens", type=float, help="default: the end of training")
    g.add_argument("--prune-interval", type=int, default=10, help="steps between pruning events")
    g.add_argument("--prune-ramp", choices=["linear", "cubic"], default="linear")
    g.add_argument("--saliency", choices=["taylor", "fisher", "obs", "activation"], default="taylor")
    g.add_argument("--saliency-taylor-form", choices=["vector", "element"], default="element")
    g.add_argument("--saliency-ema", type=float, default=0.9, help="EMA factor across scoring steps")
    g.add_argument("--saliency-obs-exact", action="store_true",
                   help="obs: exact inverse of the layer-input Hessian (small layers)")
    g.add_argument("--prune-types", default="heads,ffn,hidden",
                   help="comma-separated: heads, ffn, hidden, and optionally layers (whole layers)")
    g.add_argument("--prune-granularity", choices=["uniform", "per-layer"], default="per-layer")
    g.add_argument("--prune-align", type=int, help="channel alignment (default 8 on CPU, 64 on GPU)")
    g.add_argument("--prune-min-heads", type=int, default=1, help="minimum query groups per layer")
    g.add_argument("--prune-min-ffn", type=int, default=0)
    g.add_argument("--prune-min-hidden", type=int, default=0)
    g.add_argument("--prune-min-layers", type=int, default=1)
    g.add_argument("--shrink-at", default=None, type=_shrink_points,
                   help="shrink the model in-run at these token counts (comma-separated), or 'auto': "
                        "at the end of pruning (and see --shrink-every-fraction); needs --save")
    g.add_argument("--shrink-tensor-model-parallel-size", type=int,
                   help="continue on this TP size after an in-run shrink (default: unchanged)")
    g.add_argument("--shrink-pipeline-model-parallel-size", type=int,
                   help="continue on this PP size after an in-run shrink (default: unchanged)")
    g.add_argument("--shrink-every-fraction", type=float,
                   help="with --shrink-at auto: also shrink whenever the kept parameter fraction "
                        "has fallen by this much since the last shrink")
    # issue 21: allocation across types and safety on real pretrained models
    g.add_argument("--prune-allocation", choices=["global", "proportional"], default="global",
                   help="global: one saliency-per-parameter ranking over all types; proportional: "
                        "every type pruned by the same fraction (a baseline)")
    g.add_argument("--prune-max-step-fraction", type=float, default=0.25,
                   help="one pruning event removes at most this fraction of the model's parameters")
    g.add_argument("--prune-loss-jump-warn", type=float, default=0.5,
                   help="warn (log, tensorboard, history) when the loss rises by more than this many "
                        "nats from the step before a pruning event to the step after it")
    return p


# what the weights' shapes depend on: a --load checkpoint's values win, and flags must agree
_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "kv_channels", "untie_embeddings_and_output_weights", "add_qkv_bias", "layer_shapes")
_REQUIRED_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def _given_model_values(args: argparse.Namespace) -> tuple[dict, dict]:
    """(values, where each came from: '--model P' or the flag) from the preset and explicit flags."""
    values = dict(MODEL_PRESETS[args.model]) if args.model else {}
    sources = {name: f"--model {args.model}" for name in values}
    for name in _MODEL_FIELDS:
        if getattr(args, name) is not None:
            values[name], sources[name] = getattr(args, name), "--" + name.replace("_", "-")
    if args.layer_shapes is not None:
        values["layer_shapes"], sources["layer_shapes"] = args.layer_shapes, "--layer-shapes"
    for name in ("untie_embeddings_and_output_weights", "add_qkv_bias", "use_rope_scaling"):  # store_true flags
        if getattr(args, name):
            values[name], sources[name] = True, "--" + name.replace("_", "-")
    return values, sources


def peek_checkpoint(load: str | None) -> tuple[str, dict] | None:
    """(folder, trainer state) of the checkpoint under ``load``, or None when there is none yet."""
    from pretrain import checkpoint as ckpt

    folder = ckpt.find_checkpoint(load) if load else None
    return None if folder is None else (folder, ckpt.read_trainer_state(folder))


def _effective(model: ModelConfig, name: str):
    return {"num_query_groups": model.query_groups, "kv_channels": model.head_dim}.get(name, getattr(model, name))


def checkpoint_model_values(saved: ModelConfig, given: dict, sources: dict, folder: str,
                            check_agreement: bool) -> dict:
    """The model of a --load checkpoint, with the given non-shape values (sequence length, RoPE
    base, ...) on top. A given shape value that differs from the checkpoint's is refused: the
    weights could not load into it (a preset's non-shape values are the checkpoint's business)."""
    import dataclasses

    values = dataclasses.asdict(saved)
    for name, value in given.items():
        if name in _SHAPE_FIELDS:
            if check_agreement and value != _effective(saved, name):
                label = name.replace("_", "-")
                raise ConfigError(
                    f"{sources[name]} says {label} {value}, but the checkpoint {folder} (--load) has {label} "
                    f"{_effective(saved, name)}: drop the shape flags to take the checkpoint's shape, or "
                    "--load another checkpoint")
        elif not sources[name].startswith("--model "):
            values[name] = value
    return values


def _model_values(args: argparse.Namespace, peeked: tuple[str, dict] | None) -> dict:
    given, sources = _given_model_values(args)
    if peeked is not None:
        folder, state = peeked
        # a shrunk checkpoint is smaller than the flags of the run that made it, which describe its parent;
        # --use-checkpoint-args takes the checkpoint's shape whatever the flags say
        check = not (args.use_checkpoint_args or state.get("shrink_history"))
        return checkpoint_model_values(PretrainConfig.from_dict(state["config"]).model, given, sources, folder, check)
    missing = [n for n in _REQUIRED_SHAPE if n not in given]
    if missing:
        raise ConfigError(
            "the model shape is incomplete: give --model PRESET or "
            + ", ".join("--" + n.replace("_", "-") for n in missing)
            + (f" (--load {args.load} holds no checkpoint to take it from)" if args.load else ""))
    return given


def _tokenizer_values(args: argparse.Namespace, peeked: tuple[str, dict] | None) -> tuple[str, str | None]:
    """(--tokenizer-type, --tokenizer-model): the flags, else the --load checkpoint's recorded tokenizer."""
    from data_prep.tokenizers import infer_tokenizer_type
    from pretrain.hf import checkpoint_tokenizer

    model = args.tokenizer_model
    if model is None and peeked is not None and not args.mock_data and args.tokenizer_type != "NullTokenizer":
        recorded = checkpoint_tokenizer(*peeked)
        if recorded is not None:
            return args.tokenizer_type or recorded[0], recorded[1]
    return args.tokenizer_type or infer_tokenizer_type(model), model


def _data_path(args: argparse.Namespace) -> list[str]:
    from pretrain.config import read_data_args

    if args.data_args_path is None:
        return args.data_path
    if args.data_path:
        raise ConfigError("--data-path and --data-args-path both give the data: give one of them")
    return read_data_args(args.data_args_path)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    peeked = peek_checkpoint(args.load)
    model_values = _model_values(args, peeked)
    tokenizer_type, tokenizer_model = _tokenizer_values(args, peeked)
    return PretrainConfig(
        model=ModelConfig(**model_values),
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        data=DataConfig(
            data_path=_data_path(args), split=args.split, tokenizer_type=tokenizer_type,
            tokenizer_model=tokenizer_model, vocab_size_for_null_tokenizer=args.null_vocab_size,
            mock_data=args.mock_data, data_cache_path=args.data_cache_path, test_data_path=args.test_data_path,
        ),
        optim=OptimConfig(
            lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, lr_warmup_iters=args.lr_warmup_iters,
            lr_decay_iters=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
        ),
        train=TrainConfig(
            micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
            train_iters=args.train_iters, train_tokens=args.train_tokens, seed=args.seed,
            bf16=args.bf16, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
            log_interval=args.log_interval, exit_interval=args.exit_interval, dry_run=args.dry_run,
            max_skipped_nonfinite_steps=args.max_skipped_nonfinite_steps,
        ),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval,
            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, finetune=args.finetune,
            keep_last=args.keep_last, use_checkpoint_args=args.use_checkpoint_args,
        ),
        logging=LoggingConfig(tensorboard_dir=args.tensorboard_dir),
        prune=PruneConfig(
            target_params=int(args.prune_target_params) if args.prune_target_params else None,
            target_ratio=args.prune_target_ratio, start_tokens=int(args.prune_start_tokens),
            end_pruning=args.end_pruning, drop_state=args.drop_pruning_state,
            end_tokens=int(args.prune_end_tokens) if args.prune_end_tokens is not None else None,
            interval=args.prune_interval, ramp=args.prune_ramp, saliency=args.saliency,
            taylor_form=args.saliency_taylor_form, saliency_ema=args.saliency_ema,
            obs_exact=args.saliency_obs_exact,
            types=tuple(t.strip() for t in args.prune_types.split(",") if t.strip()),
            granularity=args.prune_granularity, align=args.prune_align,
            min_heads=args.prune_min_heads, min_ffn=args.prune_min_ffn, min_hidden=args.prune_min_hidden,
            min_layers=args.prune_min_layers,
            shrink_auto=(args.shrink_at or "").strip() == "auto",
            shrink_at=tuple(int(float(t)) for t in (args.shrink_at or "").split(",")
                            if t.strip() and t.strip() != "auto"),
            shrink_every_fraction=args.shrink_every_fraction,
            shrink_tensor_parallel_size=args.shrink_tensor_model_parallel_size,
            shrink_pipeline_parallel_size=args.shrink_pipeline_model_parallel_size,
            allocation=args.prune_allocation, max_step_fraction=args.prune_max_step_fraction,
            loss_jump_warn=args.prune_loss_jump_warn,
        ),
    )
