"""What one finished run cost and reached, read from the files every run writes.

* ``metrics.jsonl`` (one line per step): tokens and the FLOPs per token of the model in memory;
* ``evals.jsonl``: validation and test loss along the run;
* ``pruning_history.jsonl``: the kept shape after each pruning event;
* the newest checkpoint: the final shape.

Two FLOP counts: *actual*, what was computed (a masked model computes at its full size until the
in-run shrink), and *ideal*, what the kept shape alone would have cost (a perfect sparse kernel).
"""

from __future__ import annotations

from bisect import bisect_left

from pretrain.model.flops import flops_per_token_of


def kept_flops_per_token(kept: dict, model: dict, vocab_size: int) -> int:
    """FLOPs per token of the shape a pruning event kept (``kept_per_layer`` of its history line).

    ``model`` is the parent's ModelConfig fields: head size and heads per query group do not change."""
    heads = model["num_attention_heads"]
    groups = model.get("num_query_groups") or heads
    head_dim = model.get("kv_channels") or model["hidden_size"] // heads
    per_group = heads // groups
    widths = [(g, g * per_group, f) for alive, g, f in zip(kept["layers"], kept["heads"], kept["ffn"]) if alive]
    return flops_per_token_of(widths, kept["hidden"], head_dim, vocab_size, model["seq_length"])


def run_flops(metrics: list[dict], tokens_per_step: int, pruning: list[dict] = (), parent_model: dict | None = None,
              vocab_size: int | None = None) -> dict:
    """Actual and ideal training FLOPs of the steps in ``metrics`` (both with the teacher's forward
    passes of a distilled run, which ``teacher`` gives alone).

    A step computes with the masks of the last event *before* it (an event happens at the end of
    its step), so the ideal count switches one step after each event."""
    # a distilled step also ran the teacher's forward pass (logged by pretrain/distill.py)
    teacher = sum(tokens_per_step * r.get("kd_teacher_flops_per_token", 0) for r in metrics)
    # Minitron's architecture search scored its candidate shapes with forward passes of their own
    search = sum(r.get("search_flops", 0) for r in metrics)
    actual = sum(tokens_per_step * _model_flops_per_token(r) for r in metrics) + teacher + search
    if not pruning:
        return {"actual": actual, "ideal": actual, "teacher": teacher}
    event_iters = [e["iteration"] for e in pruning]
    kept = [kept_flops_per_token(e["kept_per_layer"], parent_model, vocab_size) for e in pruning]
    ideal = 0
    for r in metrics:
        last_event = bisect_left(event_iters, r["iteration"]) - 1  # events strictly before this step
        per_token = r["flops_per_token"] if last_event < 0 else min(kept[last_event], r["flops_per_token"])
        ideal += tokens_per_step * per_token * (2 if r.get("lm_pass_flops_per_token") else 1)
    return {"actual": actual, "ideal": ideal + teacher + search, "teacher": teacher}


def _model_flops_per_token(record: dict) -> int:
    """What a step's model computed per token: its training pass, and the language-model loss's
    pass of its own where it ran one (gradient saliency while distilling: ``lm_pass_flops_per_token``)."""
    return record["flops_per_token"] + record.get("lm_pass_flops_per_token", 0)


def cumulative_flops_at(metrics: list[dict], tokens_per_step: int) -> dict[int, int]:
    """Iteration -> actual FLOPs spent up to and including it."""
    out, total = {}, 0
    for r in metrics:
        total += tokens_per_step * (_model_flops_per_token(r) + r.get("kd_teacher_flops_per_token", 0)) \
            + r.get("search_flops", 0)
        out[r["iteration"]] = total
    return out
