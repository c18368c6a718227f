"""The pruning section: target, schedule, saliency, solver constraints, the in-run shrink."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

from pretrain.config.flags import comma_list, flag, require, require_choice, token_count, whole_number


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


# what can be pruned: query groups, FFN channels, hidden channels, whole layers (the one list: the
# --prune-types choices; the masks' tensors are pretrain.model.shape.MASK_TYPES)
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
    allocation: Literal["global", "proportional", "search"] = flag(
        "global", name="--prune-allocation",
        help="global: one saliency-per-parameter ranking over all types; proportional: every type pruned by "
             "the same fraction (a baseline); search: Minitron's architecture search (homogeneous shapes "
             "scored by the validation loss; needs --prune-granularity uniform and --eval-iters)")
    # Minitron's search (pretrain/pruning/search.py): Model-Optimizer's mcore_minitron settings and defaults
    search_top_k: int = flag(10, name="--prune-search-top-k",
                             help="--prune-allocation search: the largest shapes under the target that are scored",
                             at_least=1)
    search_max_width_pruning: float = flag(
        0.4, name="--prune-search-max-width-pruning",
        help="--prune-allocation search: each axis keeps the widest (1 - this) part of its choices", above=0,
        at_most=1)
    search_hidden_divisor: int = flag(
        256, name="--prune-search-hidden-divisor",
        help="--prune-allocation search: hidden widths are multiples of this (or the full width)", at_least=1)
    search_ffn_divisor: int = flag(
        512, name="--prune-search-ffn-divisor",
        help="--prune-allocation search: FFN widths are multiples of this (or the full width)", at_least=1)
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
        require(self.target_params is None or self.target_ratio is None,
                 "give --prune-target-params or --prune-target-ratio, not both")
        if self.target_ratio is not None:
            require(0 < self.target_ratio < 1, "--prune-target-ratio must be in (0, 1)")
        if self.target_params is not None:
            require(self.target_params > 0, "--prune-target-params must be positive")
        end = self.end_tokens if self.end_tokens is not None else total_tokens
        require(0 <= self.start_tokens < end,
                 f"--prune-start-tokens ({self.start_tokens}) must be below --prune-end-tokens ({end})")
        require(self.interval >= 1, "--prune-interval must be >= 1")
        for name, flag_name in (("ramp", "--prune-ramp"), ("saliency", "--saliency"),
                                ("taylor_form", "--saliency-taylor-form"), ("granularity", "--prune-granularity"),
                                ("allocation", "--prune-allocation")):
            require_choice(self, name, flag_name)
        require(0 <= self.saliency_ema < 1, "--saliency-ema must be in [0, 1)")
        bad = [t for t in self.types if t not in PRUNE_TYPES]
        require(not bad and len(self.types) > 0,
                 f"--prune-types: {','.join(bad) or 'empty'}; use {', '.join(PRUNE_TYPES)}")
        require(self.align is None or self.align >= 1, "--prune-align must be >= 1")
        if self.allocation == "search":
            require(self.granularity == "uniform", "--prune-allocation search chooses homogeneous shapes (Minitron): "
                    "add --prune-granularity uniform")
            for divisor, name in ((self.search_hidden_divisor, "--prune-search-hidden-divisor"),
                                  (self.search_ffn_divisor, "--prune-search-ffn-divisor")):
                require(self.align is None or divisor % self.align == 0,
                        f"{name} {divisor} must be a multiple of --prune-align {self.align}")
        if self.shrink_every_fraction is not None:
            require(0 < self.shrink_every_fraction < 1, "--shrink-every-fraction must be in (0, 1)")
            require(self.shrink_auto, "--shrink-every-fraction needs --shrink-at auto")
        self.validate_safety()

    def validate_safety(self) -> None:
        require(0 < self.max_step_fraction <= 1, "--prune-max-step-fraction must be in (0, 1]")
        require(self.loss_jump_warn > 0, "--prune-loss-jump-warn must be positive (nats)")
        require_choice(self, "compensation", "--prune-compensation")
        require(self.compensation_window >= 1, "--prune-compensation-window must be >= 1 (steps)")
        require(self.compensation_window <= self.interval,
                 f"--prune-compensation-window ({self.compensation_window}) must not exceed --prune-interval "
                 f"({self.interval}): the Hessian is freed at every event")
        require(0 < self.compensation_damp < 1e3, "--prune-compensation-damp must be positive (and below 1000)")
        require(not self.compensation_probe or self.compensation == "obs",
                 "--prune-compensation-probe needs --prune-compensation obs")
