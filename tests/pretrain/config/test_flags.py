"""The command line is a contract: its flags, their defaults and choices are frozen here.

A rename, a new flag or a changed default fails ``test_the_flag_set_is_frozen`` until this list is
changed with it, deliberately (like torchtitan's test of its job config). Each row is
``FLAG DEFAULT`` as the parser holds it, then, for a value a preset, the --load checkpoint or the
tokenizer file may give, ``(then D)``: the config's default when nothing gives it, and the
choices in braces.
"""

import dataclasses

import pytest

from pretrain.run import arguments
from pretrain.run.arguments import build_parser, config_from_args, flag_name, flagged_fields

FROZEN = """
--adam-beta1 0.9
--adam-beta2 0.95
--adam-eps 1e-08
--add-qkv-bias False
--bf16 False
--clip-grad 1.0
--data-args-path None
--data-cache-path None
--data-path []
--deepspeed-config None
--drop-pruning-state False
--dry-run False
--end-pruning False
--engine 'megatron' {megatron,deepspeed}
--eval-interval 0
--eval-iters 10
--eval-tasks None
--eval-tasks-interval None
--eval-tasks-limit None
--eval-tasks-num-fewshot 0
--exit-interval None
--ffn-hidden-size None (then 'required')
--finetune False
--global-batch-size 8
--group-query-attention False
--hidden-size None (then 'required')
--init-method-std None (then 0.02)
--kd-teacher None
--kd-temperature 1.0
--kd-until-tokens None
--kd-weight 1.0
--keep-last None
--kv-channels None (then None)
--launcher 'auto' {auto,torchrun,slurm,mpi}
--layer-shapes None (then None)
--load None
--log-interval 10
--lr 0.0003
--lr-decay-iters None
--lr-decay-style 'cosine' {cosine,linear,constant,WSD,inverse-square-root}
--lr-warmup-iters 0
--make-vocab-size-divisible-by None (then 128)
--max-position-embeddings None (then None)
--max-skipped-nonfinite-steps 3
--micro-batch-size 1
--min-lr 3e-05
--mock-data False
--model None {debug,llama-3.2-1b,qwen2.5-0.5b,smollm-1.7b,smollm-135m,smollm-360m}
--no-load-optim False
--no-load-rng False
--no-use-distributed-optimizer True
--norm-epsilon None (then 1e-05)
--null-vocab-size None
--num-attention-heads None (then 'required')
--num-dataset-builder-threads 1
--num-layers None (then 'required')
--num-query-groups None (then None)
--offload-optimizer None {none,cpu}
--override-opt_param-scheduler False
--per-split-data-args-path None
--pipeline-model-parallel-size 1
--prune-align None
--prune-allocation 'global' {global,proportional,search}
--prune-compensation 'none' {none,obs}
--prune-compensation-damp 0.01
--prune-compensation-probe False
--prune-compensation-window 1
--prune-end-tokens None
--prune-granularity 'per-layer' {uniform,per-layer}
--prune-interval 10
--prune-loss-jump-warn 0.5
--prune-max-step-fraction 0.25
--prune-min-ffn 0
--prune-min-heads 1
--prune-min-hidden 0
--prune-min-layers 1
--prune-ramp 'linear' {linear,cubic}
--prune-search-ffn-divisor 512
--prune-search-hidden-divisor 256
--prune-search-max-width-pruning 0.4
--prune-search-top-k 10
--prune-start-tokens 0
--prune-target-params None
--prune-target-ratio None
--prune-types ('heads', 'ffn', 'hidden')
--rope-scaling-factor None (then 8.0)
--rotary-base None (then 10000.0)
--saliency 'taylor' {taylor,fisher,obs,activation}
--saliency-ema 0.9
--saliency-obs-exact False
--saliency-taylor-form 'element' {vector,element}
--save None
--save-interval None
--seed 1234
--seq-length None (then 2048)
--shrink-at None
--shrink-every-fraction None
--shrink-pipeline-model-parallel-size None
--shrink-tensor-model-parallel-size None
--skip-train False
--split None (then '969,30,1')
--tensor-model-parallel-size 1
--tensorboard-dir None
--test-data-path []
--tokenizer-model None (then None)
--tokenizer-type None (then 'GPTSentencePieceTokenizer')
--train-data-path []
--train-iters None
--train-tokens None
--untie-embeddings-and-output-weights False
--use-checkpoint-args False
--use-checkpoint-opt_param-scheduler False
--use-rope-scaling False
--valid-data-path []
--vocab-size None (then None)
--weight-decay 0.1
--zero-stage None
"""

# config fields deliberately without a flag of their own
NOT_FLAGS = {
    "checkpoint.exit_signal_handler",  # the command line always saves and stops cleanly on a signal
    "prune.shrink_auto",  # set by --shrink-at auto
    "model.unpadded_vocab_size",  # the tokenizer's (or an imported model's) vocabulary, set by the run
}


def _rows() -> list[str]:
    later = {}
    for _, cls in arguments._sections():
        for f, spec in flagged_fields(cls):
            if spec.resolved_later:
                later[flag_name(f, spec)] = f.default if f.default is not dataclasses.MISSING else "required"
    rows = []
    for action in build_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                row = f"{option} {action.default!r}"
                if option in later:
                    row += f" (then {later[option]!r})"
                if action.choices:
                    row += " {" + ",".join(action.choices) + "}"
                rows.append(row)
    return sorted(rows)


def test_the_flag_set_is_frozen():
    assert _rows() == FROZEN.strip().splitlines()


def test_every_config_field_is_a_flag_or_named_as_not_one():
    unflagged = {f"{section}.{f.name}" for section, cls in arguments._sections()
                 for f in dataclasses.fields(cls) if "flag" not in f.metadata}
    assert unflagged == NOT_FLAGS


def _model(monkeypatch, *flags: str):
    monkeypatch.setattr(arguments, "peek_checkpoint", lambda load: None)
    args = build_parser().parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                      "--ffn-hidden-size", "128", "--mock-data", "--train-iters", "1", *flags])
    return config_from_args(args).model


def test_group_query_attention_has_megatron_lm_semantics(monkeypatch):
    assert _model(monkeypatch).query_groups == 4  # MHA: one group per head
    assert _model(monkeypatch, "--group-query-attention").query_groups == 1  # Megatron-LM's default
    assert _model(monkeypatch, "--group-query-attention", "--num-query-groups", "2").query_groups == 2
    assert _model(monkeypatch, "--num-query-groups", "2").query_groups == 2  # also without the switch


@pytest.mark.parametrize("flags, field, value", [
    (["--prune-target-params", "4e5"], "target_params", 400000),
    (["--prune-types", "heads, layers"], "types", ("heads", "layers")),
    (["--shrink-at", "auto"], "shrink_auto", True),
    (["--shrink-at", "1e3,2000"], "shrink_at", (1000, 2000)),
    (["--drop-pruning-state"], "drop_state", True),
])
def test_flags_that_are_not_plain_values_reach_their_fields(monkeypatch, flags, field, value):
    monkeypatch.setattr(arguments, "peek_checkpoint", lambda load: None)
    args = build_parser().parse_args(["--model", "debug", "--mock-data", "--train-iters", "1",
                                      "--prune-target-ratio", "0.5", *flags])
    assert getattr(config_from_args(args).prune, field) == value
