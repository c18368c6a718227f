"""The comparison recipes: the parent shape, the token budgets and the pruning settings.

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
    model: dict  # the parent's shape: ModelConfig fields
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
        parent_iters = self.iters(self.parent_tokens, "the parent")
        continue_iters = self.iters(self.continue_tokens, "the continuation")
        need(parent_iters > 0 and continue_iters > 0, "the parent and the continuation need at least one step each")
        start, end = self.window_tokens
        window_iters = (end - start) // self.tokens_per_step
        need(0 <= start < end <= self.continue_tokens,
             f"the pruning window {self.window} must lie inside the continuation (0 <= start < end <= 1)")
        need(window_iters >= self.prune_interval,
             f"the pruning window ({window_iters} steps) is shorter than one --prune-interval "
             f"({self.prune_interval} steps): a budget too small for the window; raise continue_tokens")
        need(end // self.tokens_per_step >= self.oneshot_scoring_steps,
             f"C scores for {self.oneshot_scoring_steps} steps before its event, more than the "
             f"{end // self.tokens_per_step} steps from the parent to the window's end")
        need(parent_iters % self.eval_interval == 0,
             f"eval_interval {self.eval_interval} must divide the parent's {parent_iters} steps "
             "(the parent's test loss is measured where it ends)")
        need(self.lrs and all(lr > 0 for lr in self.lrs), "lrs must be positive learning rates")
        need(0 < self.sweep_fraction <= 1, "sweep_fraction must be in (0, 1]")
        need(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size must be a multiple of "
             "micro_batch_size")


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
        lrs=(2e-3,), warmup_iters=1, eval_interval=3, eval_iters=2, threads=2,
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
        gpus_per_node=8,
    ),
}


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} does not exist; choose one of {', '.join(RECIPES)}")
    recipe = dataclasses.replace(RECIPES[name], **overrides) if overrides else RECIPES[name]
    recipe.validate()
    return recipe
