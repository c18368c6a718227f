"""What a run will do, said before it starts: the plan block, the data blend, and pruning settings
that would silently do nothing."""

from __future__ import annotations

import torch

from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.config import PretrainConfig
from pretrain.data import blend_report
from pretrain.distributed import is_rank0, print_rank0


def print_plan(cfg: PretrainConfig, layout: dict, vocab_size: int, counts: dict, stored: StoredCheckpoint | None,
               pruning_note: str) -> None:
    print_rank0(_plan(cfg, layout, vocab_size, counts, num_microbatches(cfg, layout)))
    if is_rank0():  # the report reads every dataset's index: once, not on every rank
        for line in blend_report(cfg.data, cfg.total_iters() * cfg.train.global_batch_size, cfg.model.seq_length):
            print_rank0(line)
    for note in ([pruning_note] if pruning_note else []) + pruning_warnings(cfg, counts, cfg.total_iters(), stored):
        print_rank0(note)


def num_microbatches(cfg: PretrainConfig, layout: dict) -> int:
    return cfg.train.micro_batches_per_step(layout["dp_size"])


def pruning_warnings(cfg: PretrainConfig, counts: dict, total_iters: int,
                     stored: StoredCheckpoint | None) -> list[str]:
    """Pruning settings that would silently do nothing in this run."""
    prune = cfg.prune
    if not prune.enabled or prune.end_pruning:
        return []
    notes = []
    run_tokens = total_iters * cfg.tokens_per_step()
    if prune.start_tokens >= run_tokens:
        notes.append(f"WARNING: the pruning window starts at {prune.start_tokens:,} tokens "
                     f"(--prune-start-tokens), after this run's last token ({run_tokens:,}): this run prunes nothing")
    elif prune.end_tokens is not None and prune.end_tokens > run_tokens:
        done = (run_tokens - prune.start_tokens) / (prune.end_tokens - prune.start_tokens)
        notes.append(f"WARNING: --prune-end-tokens {prune.end_tokens:,} is past this run's last token "
                     f"({run_tokens:,}): it stops {done:.0%} of the way through the pruning window, above the target; "
                     "continue it with --load and a longer --train-iters/--train-tokens to reach the target")
    late = [t for t in prune.shrink_at if t > run_tokens]
    if late:
        notes.append(f"WARNING: --shrink-at {','.join(map(str, late))}: past this run's last token ({run_tokens:,}), "
                     "so no shrink there in this run (a resumed, longer run does it)")
    resumed = bool(stored) and stored.pruning is not None
    if prune.target_params is not None and not resumed and prune.target_params >= counts["total"]:
        notes.append(f"WARNING: --prune-target-params {prune.target_params:,} is not below the model's "
                     f"{counts['total']:,} parameters: nothing will be pruned")
    return notes


def _plan(cfg: PretrainConfig, layout: dict, vocab_size: int, counts: dict, num_microbatches: int) -> str:
    m, t = cfg.model, cfg.train
    total_iters, tokens = cfg.total_iters(), cfg.total_tokens()
    lines = [
        "=" * 72,
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"(query groups {m.query_groups}, head dim {m.head_dim}), FFN {m.ffn_hidden_size}, "
        f"vocab {vocab_size} (padded), seq {m.seq_length}, "
        f"{'untied' if m.untie_embeddings_and_output_weights else 'tied'} embeddings",
        f"parameters: {counts['total'] / 1e6:,.2f} M total, {counts['non_embedding'] / 1e6:,.2f} M "
        f"non-embedding ({counts['per_layer'] / 1e6:,.3f} M per layer)",
        f"layout: world {layout['world_size']} = TP {layout['tp_size']} x PP {layout['pp_size']} x "
        f"DP {layout['dp_size']}; backend {'nccl' if torch.cuda.is_available() else 'gloo (CPU)'}; "
        f"{'bf16' if t.bf16 else 'fp32'}" + _engine_summary(cfg.parallel),
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x DP {layout['dp_size']} "
        f"x {num_microbatches} micro-batches; {cfg.tokens_per_step():,} tokens/step",
        f"plan: {total_iters} iterations, {tokens / 1e6:,.2f} M tokens; lr {cfg.optim.lr} "
        f"({cfg.optim.lr_decay_style}, warmup {cfg.optim.lr_warmup_iters}, decay over "
        f"{cfg.optim.lr_decay_iters or total_iters}, min {cfg.optim.min_lr})",
        "data: " + ("mock" if cfg.data.mock_data else
                    f"train {_data_summary(cfg.data.train_data_path)}, valid {_data_summary(cfg.data.valid_data_path)}"
                    if cfg.data.per_split else f"{_data_summary(cfg.data.data_path)} split {cfg.data.split}"),
        f"checkpoints: save {cfg.checkpoint.save} every {cfg.checkpoint.save_interval}; "
        f"load {cfg.checkpoint.load}",
    ]
    if t.scores_tasks:
        every = t.eval_interval if t.eval_tasks_interval is None else t.eval_tasks_interval
        where = f"every {every} iterations and at the end" if every else "at the end"
        lines.append(f"benchmarks: {t.eval_tasks}, {t.eval_tasks_num_fewshot}-shot, "
                     + (f"the first {t.eval_tasks_limit} documents of each" if t.eval_tasks_limit else "every document")
                     + f", scored on the training model {where} (--eval-tasks)")
    lines.append("=" * 72)
    return "\n".join(lines)


def _engine_summary(parallel) -> str:
    """The plan's words for --engine deepspeed (nothing for the default engine)."""
    if parallel.engine != "deepspeed":
        return ""
    stage, offload = parallel.deepspeed_zero()
    return f"; engine DeepSpeed ZeRO-{stage}, optimizer offload {offload}"


def _data_summary(data_path: list[str], most: int = 8) -> str:
    """``--data-path`` for the plan; a long blend (--data-args-path) as its ends and its length."""
    if len(data_path) <= most:
        return " ".join(data_path)
    return f"{' '.join(data_path[:4])} ... {' '.join(data_path[-2:])} ({len(data_path):,} items)"
