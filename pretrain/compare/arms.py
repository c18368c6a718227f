"""The arms of a comparison, each an ordinary ``python -m pretrain`` run.

Run names (an arm of the issue's list may be two runs: B at matched tokens (i) and FLOPs (ii)):

=============  ==========================================================================
``parent``     the parent shape, the first P tokens of a P + T-token schedule
``A``          continues ``parent``; pruned over the recipe's window, shrunk in-run, to P + T
``A0``         the same pruning from random init: the window at the same offsets from step 0
``C``          continues ``parent`` unpruned to the end of A's window, prunes once (same
               saliency and solver, scored over the steps just before), shrinks, goes on to P + T
``B-found-i``  A's final shape from scratch for P + T tokens
``B-found-ii`` the same for the FLOPs that ``parent`` + A actually computed
``B-hand-i``   a uniform hand shape with A's parameter count (``hand_shape``), P + T tokens
``B-hand-ii``  the same for the FLOPs of ``parent`` + A
``A-KD``       A distilling from ``parent`` (``--kd-teacher``, KL only) for all of its tokens
``C-KD``       C distilling from ``parent``: prune once + distillation (Minitron's recipe)
=============  ==========================================================================

A-KD and C-KD are opt-in (``OPT_IN``: not in the default arm set; ``--arms A-KD,C-KD``). The
teacher's forward FLOPs are charged to them (``kd_teacher_flops_per_token`` in their logs).

Every run of a seed uses the same ``--seed``, so all read the same data in the same order (the
corpus must hold the longest run without a second epoch: ``check_corpus``).

An imported parent (``--parent``, a released model; recipes with ``imported_parent``) has its own
runs (``IMPORTED``), every one starting from it at step 0 and training T tokens:

===============  ========================================================================
``parent``       the parent itself, measured on the same batches (``--skip-train``); free
``A``            gradual pruning over the recipe's window (default: the first half of T),
                 the default estimator, global allocation, shrunk in-run, CE only
``A-KD``         ``A`` distilling from the parent (KL only) for all of T
``M``            Minitron: one-shot ``--saliency activation`` over the first
                 ``oneshot_scoring_steps`` (calibration) steps, one event to the homogeneous shape
                 Minitron's search chooses (``--prune-allocation search``), shrink, KD (KL only)
``M-CE``         the same one-shot, then CE
``M-OBS``        the one-shot with ``--prune-compensation obs``, then KD
``parent-cont``  the parent continued unpruned for T (CE)
``scratch``      the target shape (``hand_shape`` at the target's parameters) from scratch, T tokens
``X-ii``         ``X`` extended to the FLOPs of the most expensive pruned arm of its seed: the same
                 window, more steps after it (matched FLOPs; ``X`` itself is matched tokens)
===============  ========================================================================

With the parent as teacher the student equals it at the start: the KL and its gradients are 0,
so M's calibration steps change the weights by weight decay alone (M-CE's train at the warm-up's
rates); the calibration batches are the first steps' training batches, not a separate set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys

from pretrain.checkpoint.atomic import atomic_write_text
from pretrain.checkpoint.files import LATEST_FILE
from pretrain.compare.recipes import Recipe
from pretrain.config import ConfigError, ModelConfig
from pretrain.model.flops import training_flops_per_token

RUNS = ("parent", "A", "A0", "C", "B-found-i", "B-found-ii", "B-hand-i", "B-hand-ii", "A-KD", "C-KD")
ARMS = {"parent": ("parent",), "A": ("A",), "A0": ("A0",), "C": ("C",),
        "B-found": ("B-found-i", "B-found-ii"), "B-hand": ("B-hand-i", "B-hand-ii"),
        "A-KD": ("A-KD",), "C-KD": ("C-KD",)}
# arms run only when asked for (--arms): a default campaign stays what it was
OPT_IN = ("A-KD", "C-KD")
DEFAULT_ARMS = tuple(a for a in ARMS if a not in OPT_IN)
NEEDS = {"parent": (), "A": ("parent",), "A0": (), "C": ("parent",), "B-found-i": ("A",), "B-found-ii": ("A",),
         "B-hand-i": ("A",), "B-hand-ii": ("A",), "A-KD": ("parent",), "C-KD": ("parent",)}
# which learning-rate sweep a run takes its rate from (A and C continue the parent's schedule)
SWEEP_OF = {"parent": "parent", "A": "parent", "C": "parent", "A0": "A0", "B-found-i": "B-found",
            "B-found-ii": "B-found", "B-hand-i": "B-hand", "B-hand-ii": "B-hand", "A-KD": "parent", "C-KD": "parent"}
SWEEPS = ("parent", "A0", "B-found", "B-hand")
# the run each sweep trains (at its shorter horizon, on the first seed)
SWEEP_RUN = {"parent": "parent", "A0": "A0", "B-found": "B-found-i", "B-hand": "B-hand-i"}

# ---------------------------------------------------------------------- an imported parent's runs
PRUNED_REAL = ("A", "A-KD", "M", "M-CE", "M-OBS")  # the arms the matched-FLOPs budget comes from
_EXTENDED = (*PRUNED_REAL, "scratch")
REAL_RUNS = ("parent", *PRUNED_REAL, "parent-cont", "scratch", *(f"{r}-ii" for r in _EXTENDED))
REAL_ARMS = {"parent": ("parent",), **{r: (r, f"{r}-ii") for r in PRUNED_REAL}, "parent-cont": ("parent-cont",),
             "scratch": ("scratch", "scratch-ii")}
REAL_NEEDS = {**{r: () for r in REAL_RUNS}, **{f"{r}-ii": (r,) for r in _EXTENDED}}
# learning rates per arm family, chosen on the validation split (seed 0, a shorter horizon)
REAL_SWEEP_OF = {"parent": None, "A": "A", "A-KD": "A", "M": "M", "M-CE": "M", "M-OBS": "M",
                 "parent-cont": "parent-cont", "scratch": "scratch"}
REAL_SWEEP_OF.update({f"{r}-ii": REAL_SWEEP_OF[r] for r in _EXTENDED})
REAL_SWEEPS = ("A", "M", "parent-cont", "scratch")


@dataclasses.dataclass(frozen=True)
class Family:
    """The runs of one kind of parent, what each needs and where its learning rate comes from.
    *Late* runs are planned from earlier results (the B runs from A's shape; the ``-ii`` runs
    from the FLOPs of every pruned arm of their seed), after every other run of the seed."""

    name: str
    runs: tuple
    arms: dict
    needs: dict
    sweep_of: dict
    sweeps: tuple
    sweep_run: dict
    opt_in: tuple
    early_sweeps: tuple  # swept before any run; the others after the first seed's non-late runs
    # the runs the comparison's question turns on, at matched tokens and (late runs) at matched
    # FLOPs: their answers come first (``campaign_order``)
    decisive: tuple = ()
    # reference runs left, with the late runs not decisive, until every seed's decisive runs are done
    deferred: tuple = ()

    @property
    def default_arms(self) -> tuple:
        return tuple(a for a in self.arms if a not in self.opt_in)

    def late(self, run: str) -> bool:
        return run.startswith("B-") if self.name == "trained" else run.endswith("-ii")

    def campaign_order(self, runs: list[str], seeds: list[int]) -> list[tuple[str | None, int]]:
        """Every run of ``runs`` as (run, seed), in the order a campaign runs or submits them, so
        that a campaign longer than a session gives its answers in the order of their weight:
        1. the decisive matched-token runs, every seed (their seed spread is the first answer);
        2. seed by seed: the seed's other matched-token runs (not the deferred references), then
           its late runs (its decisive ones alone when there are deferred runs: the matched-FLOPs
           answer of every seed before the references);
        3. seed by seed: the deferred references, then the remaining late runs.
        ``(None, first seed)`` marks where the first seed's matched-token runs of step 2 are done:
        the sweeps planned from them (B's, from A's shape) go there; it comes before the deferred
        runs, so no sweep may be planned from those."""
        asked = set(runs)
        wanted = [r for r in self.runs if r in asked]
        order: list[tuple[str | None, int]] = [
            (r, s) for s in seeds for r in wanted if r in self.decisive and not self.late(r)]
        for seed in seeds:
            order += [(r, seed) for r in wanted
                      if r not in self.decisive and r not in self.deferred and not self.late(r)]
            if seed == seeds[0]:
                order.append((None, seed))
            order += [(r, seed) for r in wanted if self.late(r) and (r in self.decisive or not self.deferred)]
        if self.deferred:
            for seed in seeds:
                order += [(r, seed) for r in wanted if r in self.deferred]
                order += [(r, seed) for r in wanted if self.late(r) and r not in self.decisive]
        return order

    def submit_after(self, run: str, wanted: list[str]) -> list[str]:
        """What a run's job waits for: its needs, and for a late ``-ii`` run every earlier run of the seed
        (its budget is the most expensive pruned arm's)."""
        if self.name == "imported" and self.late(run):
            return [r for r in wanted if r in PRUNED_REAL or r == run[:-3]]
        return list(self.needs[run])


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TRAINED = Family(name="trained", runs=RUNS, arms=ARMS, needs=NEEDS, sweep_of=SWEEP_OF, sweeps=SWEEPS,
                 sweep_run=SWEEP_RUN, opt_in=OPT_IN, early_sweeps=("parent", "A0"))
IMPORTED = Family(name="imported", runs=REAL_RUNS, arms=REAL_ARMS, needs=REAL_NEEDS, sweep_of=REAL_SWEEP_OF,
                  sweeps=REAL_SWEEPS, sweep_run={s: s for s in REAL_SWEEPS}, opt_in=(), early_sweeps=REAL_SWEEPS,
                  # issue 28: pruning-aware (with KD, and at matched FLOPs the cheaper A) against Minitron
                  # (at matched FLOPs also its OBS variant, the strongest one-shot arm measured)
                  decisive=("A-KD", "M", "A-ii", "A-KD-ii", "M-ii", "M-OBS-ii"), deferred=("parent-cont", "scratch"))


def family_of(recipe: Recipe) -> Family:
    return IMPORTED if recipe.imported_parent else TRAINED


def runs_for(arms: list[str], family: Family = TRAINED) -> tuple[list[str], list[str]]:
    """(the runs to do, in order, with what they need; notes on what was added)."""
    ARMS, NEEDS, RUNS = family.arms, family.needs, family.runs  # noqa: N806
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms {','.join(unknown)}: no such arm; choose from {', '.join(ARMS)}")
    wanted = {run for arm in arms for run in ARMS[arm]}
    notes = []
    changed = True
    while changed:
        changed = False
        for run in sorted(wanted):
            for need in NEEDS[run]:
                if need not in wanted:
                    wanted.add(need)
                    notes.append(f"{need} added: {run} needs it")
                    changed = True
    return [r for r in RUNS if r in wanted], notes


_record = dataclasses.dataclass(frozen=True, kw_only=True)


@_record
class Data:
    """The data every arm reads, and the test set none trains on."""

    data_path: list[str]
    tokenizer_model: str
    test_data_path: list[str]
    tokenizer_type: str | None = None


@_record
class Context:
    """What a run's command depends on beyond the recipe: where things are and what is known."""

    out: str
    data: Data
    launcher: str = "local"
    python: str = sys.executable
    results: dict = dataclasses.field(default_factory=dict)  # (run, seed) -> result of a finished run
    lrs: dict = dataclasses.field(default_factory=dict)  # sweep name -> chosen learning rate
    parent: str | None = None  # an imported parent's checkpoint (--parent)
    parent_vocab: int | None = None  # its padded vocabulary
    # the benchmarks every finished run is scored on (``campaign.Campaign.score_tasks``): task names
    # (none: no scoring) and the first documents of each
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    # every finished run's final test loss on this many sequences of the test data
    # (``campaign.Campaign.measure_final_test``); 0: the in-run test loss alone
    final_test_samples: int = 0

    def run_dir(self, run: str, seed: int) -> str:
        return os.path.join(self.out, run, f"seed{seed}")

    def sweep_dir(self, sweep: str, lr: float) -> str:
        return os.path.join(self.out, "sweep", sweep, f"lr{lr:g}")


def shape_flags(model: dict) -> list[str]:
    flags = ["--num-layers", model["num_layers"], "--hidden-size", model["hidden_size"],
             "--num-attention-heads", model["num_attention_heads"], "--ffn-hidden-size", model["ffn_hidden_size"],
             "--seq-length", model["seq_length"]]
    for name in ("num_query_groups", "kv_channels", "make_vocab_size_divisible_by", "rotary_base"):
        if model.get(name) is not None:
            flags += ["--" + name.replace("_", "-"), model[name]]
    for name in ("untie_embeddings_and_output_weights", "add_qkv_bias"):
        if model.get(name):
            flags.append("--" + name.replace("_", "-"))
    return [str(f) for f in flags]


def _common_flags(recipe: Recipe, ctx: Context, seed: int, lr: float, run_dir: str) -> list[str]:
    data = ctx.data
    flags = ["--data-path", *data.data_path, "--split", recipe.split, "--tokenizer-model", data.tokenizer_model,
             "--test-data-path", *data.test_data_path,
             "--micro-batch-size", recipe.micro_batch_size, "--global-batch-size", recipe.global_batch_size,
             "--lr", lr, "--min-lr", lr * recipe.min_lr_ratio, "--lr-warmup-iters", recipe.warmup_iters,
             "--lr-decay-style", "cosine", "--seed", seed,
             "--eval-interval", recipe.eval_interval, "--eval-iters", recipe.eval_iters,
             "--log-interval", recipe.eval_interval,
             "--tensor-model-parallel-size", recipe.tensor_parallel,
             "--pipeline-model-parallel-size", recipe.pipeline_parallel,
             "--save", os.path.join(run_dir, "ckpt"), "--keep-last", 1,
             "--tensorboard-dir", os.path.join(run_dir, "tb")]
    if data.tokenizer_type:
        flags += ["--tokenizer-type", data.tokenizer_type]
    if recipe.save_interval:
        flags += ["--save-interval", recipe.save_interval]
    if recipe.bf16:
        flags.append("--bf16")
    return [str(f) for f in flags]


def task_curve_flags(recipe: Recipe, ctx: Context, scored: bool = True) -> list[str]:
    """The task curve (``Recipe.task_curve_interval``): the campaign's tasks, on its documents,
    scored by the run itself at its evaluations of every N iterations and at its end (``python -m
    pretrain --eval-tasks``). Training is the same with and without them (no data read, no random
    number drawn); their time is kept apart from the run's (``campaign.train_seconds``). Without
    a curve, ``--eval-tasks none``: a resumed run (or one that starts from a trained parent's
    checkpoint) would otherwise keep the scoring its checkpoint was saved with; so for a run that
    is not ``scored`` (an imported parent, a learning-rate sweep)."""
    if not (scored and recipe.task_curve_interval and ctx.tasks):
        return ["--eval-tasks", "none"]
    flags = ["--eval-tasks", ",".join(ctx.tasks), "--eval-tasks-interval", str(recipe.task_curve_interval)]
    if ctx.task_limit:
        flags += ["--eval-tasks-limit", str(ctx.task_limit)]
    return flags


def _prune_flags(recipe: Recipe, start: int, end: int, oneshot: bool = False) -> list[str]:
    flags = ["--prune-target-ratio", recipe.target_ratio, "--prune-start-tokens", start, "--prune-end-tokens", end,
             "--saliency", recipe.saliency, "--prune-granularity", recipe.granularity, "--shrink-at", "auto"]
    if oneshot:  # scored over the window, one event at its end that may remove everything at once
        flags += ["--prune-interval", 10**9, "--prune-max-step-fraction", 1.0]
    else:
        flags += ["--prune-interval", recipe.prune_interval]
    if recipe.prune_align:
        flags += ["--prune-align", recipe.prune_align]
    return [str(f) for f in flags]


def total_tokens(recipe: Recipe) -> int:
    return recipe.parent_tokens + recipe.continue_tokens


def matched_flops_tokens(recipe: Recipe, flops_budget: int, flops_per_token: int) -> int:
    """The whole steps of a model costing ``flops_per_token`` that fit in ``flops_budget``."""
    return flops_budget // (flops_per_token * recipe.tokens_per_step) * recipe.tokens_per_step


@_record
class RunPlan:
    """One run: its folder, its command line, and where it first loads from (A, C: the parent)."""

    name: str
    seed: int
    folder: str
    flags: list
    train_tokens: int
    lr: float
    first_load: str | None = None  # loaded while the run has no checkpoint of its own
    shape_file: dict | None = None  # per-layer shapes written beside the command (--layer-shapes)


def plan_run(recipe: Recipe, ctx: Context, run: str, seed: int, lr: float | None = None,
             sweep: bool = False) -> RunPlan:
    """The command of ``run`` for ``seed``; ``sweep``: a shorter learning-rate trial on its own folder.

    B runs need A's result (the shape it found, the FLOPs it spent) in ``ctx.results``."""
    if recipe.imported_parent:
        return _plan_imported(recipe, ctx, run, seed, lr, sweep)
    lr = lr if lr is not None else ctx.lrs.get(SWEEP_OF[run], recipe.lrs[0])
    folder = ctx.sweep_dir(SWEEP_OF[run], lr) if sweep else ctx.run_dir(run, seed)
    full = total_tokens(recipe)
    scale = recipe.sweep_fraction if sweep else 1.0

    def steps(tokens: float) -> int:  # whole steps, at least one
        return max(1, int(tokens * scale) // recipe.tokens_per_step) * recipe.tokens_per_step

    flags = _common_flags(recipe, ctx, seed, lr, folder)
    first_load, shape_file, train = None, None, steps(full)
    start, end = recipe.window_tokens
    if run == "parent":
        flags += shape_flags(recipe.model)
        if not sweep:  # the first P tokens of the P + T schedule
            flags += ["--exit-interval", str(recipe.iters(recipe.parent_tokens))]
    elif run in ("A", "A-KD"):
        first_load = ctx.run_dir("parent", seed) + "/ckpt"
        flags += _prune_flags(recipe, recipe.parent_tokens + start, recipe.parent_tokens + end)
    elif run in ("C", "C-KD"):
        first_load = ctx.run_dir("parent", seed) + "/ckpt"
        event = recipe.parent_tokens + end
        flags += _prune_flags(recipe, event - recipe.oneshot_scoring_steps * recipe.tokens_per_step, event,
                              oneshot=True)
    elif run == "A0":
        flags += shape_flags(recipe.model)
        flags += _prune_flags(recipe, steps(start) if start else 0, steps(end))
    else:  # the B runs: a small shape from scratch
        a = ctx.results.get(("A", seed))
        if not a or a.get("status") != "ok":
            raise ConfigError(f"{run} seed {seed} needs A's result for seed {seed}, which is missing or failed")
        model = a["final_model"] if run.startswith("B-found") else hand_shape(
            recipe.model, a["params"], a["vocab_size"], recipe.tensor_parallel)
        layer_shapes = model.get("layer_shapes")
        flags += shape_flags(model)
        if layer_shapes:
            shape_file = layer_shapes
            flags += ["--layer-shapes", os.path.join(folder, "layer_shapes.json")]
        if run.endswith("-ii"):
            parent = ctx.results.get(("parent", seed))
            budget = a["flops"]["actual"] + (parent["flops"]["actual"] if parent else 0)
            per_token = training_flops(model, a["vocab_size"])
            train = steps(matched_flops_tokens(recipe, budget, per_token))
    if run.endswith("-KD"):  # the parent, as it was when A/C started from it, teaches
        flags += ["--kd-teacher", first_load]
    # the sweeps choose a rate on the validation loss: no tasks
    flags += task_curve_flags(recipe, ctx, scored=not sweep)
    flags += ["--train-tokens", str(train)]
    return RunPlan(name=run, seed=seed, folder=folder, flags=flags, train_tokens=train, lr=lr,
                   first_load=first_load, shape_file=shape_file)


def _plan_imported(recipe: Recipe, ctx: Context, run: str, seed: int, lr: float | None, sweep: bool) -> RunPlan:
    """A run from an imported parent (``IMPORTED``): every one starts from ``ctx.parent`` at step 0."""
    family = REAL_SWEEP_OF[run]
    lr = lr if lr is not None else ctx.lrs.get(family, recipe.lrs[0])
    folder = ctx.sweep_dir(family, lr) if sweep else ctx.run_dir(run, seed)
    scale = recipe.sweep_fraction if sweep else 1.0

    def steps(tokens: float) -> int:  # whole steps, at least one
        return max(1, int(tokens * scale) // recipe.tokens_per_step) * recipe.tokens_per_step

    flags = _common_flags(recipe, ctx, seed, lr, folder)
    first_load, shape_file, train = ctx.parent, None, steps(recipe.continue_tokens)
    base = run[:-3] if run.endswith("-ii") else run
    if base != "scratch":  # the shape is the parent's; the sequence length is the recipe's
        flags += ["--seq-length", str(recipe.seq_length)]
    start, end = recipe.window_tokens
    calibration = recipe.oneshot_scoring_steps * recipe.tokens_per_step  # not scaled: the same batches
    if base == "parent":
        flags.append("--skip-train")
    elif base in ("A", "A-KD"):
        flags += _prune_flags(recipe, steps(start) if start else 0, steps(end))
    elif base in ("M", "M-CE", "M-OBS"):
        flags += _prune_flags(dataclasses.replace(recipe, saliency="activation", granularity="uniform"), 0,
                              calibration, oneshot=True)
        # Minitron's shape: homogeneous, each axis ranked on its own, the widths chosen by its search
        flags += ["--prune-allocation", "search", "--prune-search-hidden-divisor", str(recipe.search_hidden_divisor),
                  "--prune-search-ffn-divisor", str(recipe.search_ffn_divisor),
                  "--prune-search-max-width-pruning", str(recipe.search_max_width_pruning)]
        if base == "M-OBS":
            flags += ["--prune-compensation", "obs", "--prune-compensation-window", str(recipe.oneshot_scoring_steps)]
    elif base == "scratch":
        first_load = None
        model = target_shape(recipe, ctx)
        flags += shape_flags(model)
    if base in ("A-KD", "M", "M-OBS"):  # KL only (--kd-weight 1, the default): the parent teaches for all of T
        flags += ["--kd-teacher", ctx.parent]
    if run.endswith("-ii") and not sweep:
        train = matched_flops_tokens_real(recipe, ctx, run, seed)
    # the parent is scored once, by tools/evaluate.py (its tasks.json); the sweeps choose a rate on
    # the validation loss
    flags += task_curve_flags(recipe, ctx, scored=not sweep and base != "parent")
    flags += ["--train-tokens", str(train)]
    return RunPlan(name=run, seed=seed, folder=folder, flags=flags, train_tokens=train, lr=lr,
                   first_load=first_load, shape_file=shape_file)


def target_shape(recipe: Recipe, ctx: Context) -> dict:
    """The scratch reference's shape: the uniform hand shape at the target's parameter count."""
    params = int(recipe.target_ratio * parameters(recipe.model, ctx.parent_vocab))
    return hand_shape(recipe.model, params, ctx.parent_vocab, recipe.tensor_parallel)


def flops_budget_real(ctx: Context, seed: int) -> tuple[int, str]:
    """(the matched-FLOPs budget of a seed, the run that set it): the most expensive finished pruned arm."""
    done = {r: ctx.results[(r, seed)]["flops"]["actual"] for r in PRUNED_REAL
            if ctx.results.get((r, seed), {}).get("status") == "ok"}
    if not done:
        raise ConfigError(f"seed {seed}: no pruned arm finished, so there is no FLOPs budget to match")
    top = max(done, key=done.get)
    return done[top], top


def matched_flops_tokens_real(recipe: Recipe, ctx: Context, run: str, seed: int) -> int:
    """T plus the whole steps at ``run``'s final per-token cost (its last step's, teacher included)
    that fit between what its matched-tokens run spent and the budget."""
    base = ctx.results.get((run[:-3], seed))
    if not base or base.get("status") != "ok":
        raise ConfigError(f"{run} seed {seed} needs {run[:-3]}'s result for seed {seed}, which is missing or failed")
    budget, _ = flops_budget_real(ctx, seed)
    per_token = base["flops_per_token_last_step"]
    extra = matched_flops_tokens(recipe, max(budget - base["flops"]["actual"], 0), per_token)
    return base["tokens_trained"] + extra


def training_flops(model: dict, vocab_size: int) -> int:
    return training_flops_per_token(ModelConfig(**model), vocab_size)


def parameters(model: dict, vocab_size: int) -> int:
    return ModelConfig(**model).num_parameters(vocab_size)["total"]


def hand_shape(parent: dict, target_params: int, vocab_size: int, tensor_parallel: int = 1) -> dict:
    """The hand-designed baseline, by one rule: keep the parent's depth, heads and query groups and
    its FFN-to-hidden ratio; take the hidden size (a multiple of 2 x heads, so heads stay even-sized
    for RoPE, and of 8) whose model is nearest ``target_params``; then move the FFN width in steps of
    8 to come nearest. Must land within 2% of the target (embeddings included), else an error."""
    heads = parent["num_attention_heads"]
    ratio = parent["ffn_hidden_size"] / parent["hidden_size"]
    step = _lcm(2 * heads, 8)

    def model(hidden: int, ffn: int) -> dict:
        return {**{k: v for k, v in parent.items() if k not in ("kv_channels", "layer_shapes")},
                "hidden_size": hidden, "ffn_hidden_size": ffn}

    def round8(x: float) -> int:
        return max(8, int(round(x / 8)) * 8)

    best = min((abs(parameters(model(h, round8(ratio * h)), vocab_size) - target_params), h)
               for h in range(step, parent["hidden_size"] + step, step))[1]
    ffn = round8(ratio * best)
    while True:
        here = abs(parameters(model(best, ffn), vocab_size) - target_params)
        moves = [f for f in (ffn - 8, ffn + 8) if f >= 8 and abs(parameters(model(best, f), vocab_size) -
                                                                     target_params) < here]
        if not moves:
            break
        ffn = moves[0]
    shape = model(best, ffn)
    error = abs(parameters(shape, vocab_size) - target_params) / target_params
    if error > 0.02:
        raise ConfigError(f"no uniform shape by the hand rule comes within 2% of {target_params:,} parameters "
                          f"(nearest: hidden {best}, FFN {ffn}, {error:.1%} off)")
    return shape


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


def write_command(plan: RunPlan, recipe: Recipe, ctx: Context) -> str:
    """``FOLDER/command.sh``: the run, rerunnable by hand (it resumes from its own checkpoint)."""
    os.makedirs(plan.folder, exist_ok=True)
    if plan.shape_file:
        atomic_write_text(os.path.join(plan.folder, "layer_shapes.json"), json.dumps(plan.shape_file, indent=1))
    own = os.path.join(plan.folder, "ckpt")
    lines = ["#!/usr/bin/env bash",
             f"# tools/compare_baselines.py, recipe {recipe.name}: run {plan.name}, seed {plan.seed}, lr {plan.lr:g}.",
             "# Rerun by hand with `bash command.sh`: it resumes from its own checkpoint when it has one.",
             "set -euo pipefail", f"cd {shlex.quote(REPO)}",
             "export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1"]
    if recipe.threads:
        lines.append(f"export OMP_NUM_THREADS={recipe.threads}")
    lines.append(f"LOAD={shlex.quote(own)}")
    if plan.first_load:
        lines.append(f'[ -f "$LOAD/{LATEST_FILE}" ] || LOAD={shlex.quote(plan.first_load)}')
    launch = _launch_prefix(recipe, ctx)
    body = " \\\n    ".join(" ".join(shlex.quote(f) for f in group) for group in _flag_groups(plan.flags))
    lines.append(f'exec {launch} \\\n    {body} \\\n    --load "$LOAD"')
    path = os.path.join(plan.folder, "command.sh")
    atomic_write_text(path, "\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def write_tasks_command(plan: RunPlan, recipe: Recipe, settings: dict, output: str) -> str:
    """``FOLDER/tasks.sh``: ``tools/evaluate.py`` scoring the run's checkpoint on the tasks (one
    process; any checkpoint layout loads into it), rerunnable by hand."""
    return _write_evaluate_script(plan, recipe, "tasks.sh", "the tasks", [
        "--load", settings["checkpoint"], "--tasks", ",".join(settings["tasks"]),
        "--num-fewshot", str(settings["num_fewshot"]),
        *(["--limit", str(settings["limit"])] if settings["limit"] else []), "--output", output])


def write_final_test_command(plan: RunPlan, recipe: Recipe, settings: dict, output: str) -> str:
    """``FOLDER/final_test.sh``: ``tools/evaluate.py`` measuring the run's checkpoint on the first
    ``settings['samples']`` sequences of the test data (one process), rerunnable by hand."""
    return _write_evaluate_script(plan, recipe, "final_test.sh", "the final test loss", [
        "--load", settings["checkpoint"], "--data-path", *settings["test_data_path"],
        "--seq-length", str(settings["seq_length"]), "--max-samples", str(settings["samples"]),
        "--micro-batch-size", str(recipe.micro_batch_size), "--output", output])


def _write_evaluate_script(plan: RunPlan, recipe: Recipe, name: str, what: str, args: list[str]) -> str:
    lines = ["#!/usr/bin/env bash",
             f"# tools/compare_baselines.py, recipe {recipe.name}: {what} of run {plan.name}, seed {plan.seed}.",
             "set -euo pipefail", f"cd {shlex.quote(REPO)}", "export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1"]
    if recipe.threads:
        lines.append(f"export OMP_NUM_THREADS={recipe.threads}")
    argv = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), *args]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    path = os.path.join(plan.folder, name)
    atomic_write_text(path, "\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def _flag_groups(flags: list[str]) -> list[list[str]]:
    """Each flag with its values, one per line of the script."""
    groups: list[list[str]] = []
    for f in flags:
        if f.startswith("--") or not groups:
            groups.append([f])
        else:
            groups[-1].append(f)
    return groups


def _launch_prefix(recipe: Recipe, ctx: Context) -> str:
    python = shlex.quote(ctx.python)
    if ctx.launcher == "slurm":
        return f"srun --ntasks-per-node {recipe.nproc_per_node} {python} -m pretrain --launcher slurm"
    if recipe.nproc_per_node * recipe.nodes > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc-per-node {recipe.nproc_per_node} -m pretrain"
    return f"{python} -m pretrain"
