"""The pruning callback: score, reduce, solve and mask while the model trains.

Per step (inside the trainer's step): layer inputs are captured on scoring steps (obs/activation);
after the gradients are reduced, dropped groups' gradients are zeroed (so their weights and Adam
moments stay exactly zero) and this step's saliency is reduced over all ranks and folded into an
EMA. Every ``--prune-interval`` steps inside the pruning window, the schedule gives a parameter
target; rank 0 runs the budget solver on the global table, the result is broadcast and checked
against every rank's own, and the newly dropped weights and their optimizer state are zeroed.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from pretrain.distributed import device, is_rank0, print_rank0
from pretrain.errors import ConfigError
from pretrain.pruning.compensation import Compensator, probe_uncompensated_loss
from pretrain.pruning.masks import GroupMasks, ModelShape, build_local_masks
from pretrain.engines.base import Engine
from pretrain.engines.megatron import as_engine
from pretrain.engines.slots import zero_masked_grads, zero_masked_state
from pretrain.pruning.saliency import SaliencyEstimator, nonfinite_parts, reduce_table, table_problem
from pretrain.pruning import search
from pretrain.pruning.schedule import target_params
from pretrain.pruning.solver import SolverConstraints, check_constraints, solve
from pretrain.pruning.trial import loss_under_masks
from pretrain.pruning.state import CHECKPOINT_KEY, PruningState
from pretrain.trainer import Callback, StepMetrics


def _digest(masks: GroupMasks) -> int:
    h = hashlib.sha256()
    for t in (masks.heads, masks.ffn, masks.hidden):
        h.update(t.numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")


class PruningCallback(Callback):
    name = CHECKPOINT_KEY

    def __init__(self, prune_cfg, shape: ModelShape, tensor_parallel: int, total_tokens: int,
                 log_dir: str | None = None, pipeline_parallel: int = 1):
        self.cfg = prune_cfg
        self.shape = shape
        align = prune_cfg.align or (64 if torch.cuda.is_available() else 8)
        self.constraints = SolverConstraints(
            tensor_parallel=tensor_parallel, align=align, min_groups=prune_cfg.min_heads,
            min_ffn=prune_cfg.min_ffn, min_hidden=prune_cfg.min_hidden,
            granularity=prune_cfg.granularity, prune_types=tuple(prune_cfg.types),
            pipeline_parallel=pipeline_parallel, min_layers=prune_cfg.min_layers,
            allocation=prune_cfg.allocation, max_step_fraction=prune_cfg.max_step_fraction)
        # everything a checkpoint keeps of this callback (masks, EMA, the schedule's two ends, ...)
        self.state = PruningState.fresh(shape, prune_cfg.target_params, prune_cfg.target_ratio)
        self.start_tokens = prune_cfg.start_tokens
        self.end_tokens = prune_cfg.end_tokens if prune_cfg.end_tokens is not None else total_tokens
        self.log_dir = log_dir
        self.estimator: SaliencyEstimator | None = None
        self.engine: Engine | None = None  # the trainer's, from on_train_begin
        self.local = None
        self._scoring = False
        # the language-model loss's table of this step, where a pass of its own gave it (distillation)
        self._lm_pass, self._lm_table = False, None
        self._pending_local_state: dict | None = None
        self.compensator: Compensator | None = None  # --prune-compensation obs (issue 16)
        self.search = search.SearchSettings(
            top_k=prune_cfg.search_top_k, max_width_pruning=prune_cfg.search_max_width_pruning,
            hidden_divisor=prune_cfg.search_hidden_divisor, ffn_divisor=prune_cfg.search_ffn_divisor,
            group_unit=tensor_parallel, types=tuple(prune_cfg.types)) if prune_cfg.allocation == "search" else None
        self._search_flops = 0  # the forward passes of this step's search, for metrics.jsonl

    # the parts of the state the hooks below use on every step
    masks = property(lambda self: self.state.masks, lambda self, v: setattr(self.state, "masks", v))
    ema = property(lambda self: self.state.ema, lambda self, v: setattr(self.state, "ema", v))
    history = property(lambda self: self.state.history)
    initial_params = property(lambda self: self.state.initial_params)
    final_params = property(lambda self: self.state.final_params,
                            lambda self, v: setattr(self.state, "final_params", v))

    # ------------------------------------------------------------------ schedule helpers
    def _in_window(self, tokens_before: int) -> bool:
        if self.cfg.end_pruning:  # the masks stay as loaded; nothing is scored or removed
            return False
        return self.start_tokens <= tokens_before < self.end_tokens

    def plan_line(self) -> str:
        """The schedule in one line: its two ends (of the model it started from, whatever was shrunk
        or resumed since) and, once under way, what is left of it."""
        c, now = self.cfg, self.current_params()
        progress = "" if now == self.initial_params else (
            f" (now {now / 1e6:.3f} M; {max(now - self.final_params, 0) / 1e6:.3f} M left to remove)")
        return (f"pruning: {self.initial_params / 1e6:.3f} M -> {self.final_params / 1e6:.3f} M parameters{progress} "
                f"between {self.start_tokens:,} and {self.end_tokens:,} tokens ({c.ramp}), every {c.interval} steps; "
                f"saliency {c.saliency}; types {','.join(c.types)}; {c.granularity}; align {self.constraints.align}")

    def current_params(self) -> int:
        return self.shape.parameter_count(self.masks)

    def kept_ratios(self) -> dict:
        """Kept fraction of each type relative to the original (pre-shrink) model."""
        layers = self.state.original.get("layers", self.shape.num_layers)
        return {"heads": float(self.masks.heads.sum()) / (layers * self.state.original["groups"]),
                "ffn": float(self.masks.ffn.sum()) / (layers * self.state.original["ffn"]),
                "hidden": float(self.masks.hidden.sum()) / self.state.original["hidden"],
                "layers": float(self.masks.layers.sum()) / layers}

    # ------------------------------------------------------------------ trainer hooks
    def on_train_begin(self, trainer) -> None:
        self.engine = as_engine(trainer.optimizer, trainer.model_chunks)
        self.estimator = SaliencyEstimator(self.cfg.saliency, self.shape, trainer.model_chunks,
                                           self.engine, self.cfg.taylor_form, self.cfg.obs_exact)
        if self.cfg.compensation == "obs":
            from megatron.core import parallel_state as ps

            self.compensator = Compensator(self.shape, trainer.model_chunks, self.engine,
                                           tuple(self.cfg.types), self.cfg.compensation_damp)
            print_rank0(f"pruning compensation: obs, Hessian of the last {self.cfg.compensation_window} step(s) "
                        f"before each event, damping {self.cfg.compensation_damp}; "
                        f"{self.compensator.scheme(ps.get_tensor_model_parallel_world_size())}; Adam moments kept")
        if self.search is not None:
            self._check_search(trainer)
        if self._pending_local_state is not None:
            self._load_local_state(self._pending_local_state)
            self._pending_local_state = None
        self._refresh_local(trainer)
        if self.state.shrink_requested_at is not None and self.state.shrink_requested_at == trainer.state.iteration:
            # resumed from the save made for a shrink that was interrupted: do that shrink first
            trainer.request_stop("shrink")

    def _check_search(self, trainer) -> None:
        """Refuse, before any step, a search that has nothing to score or cannot reach the target."""
        c, tp = self.search, self.search.group_unit
        align = self.constraints.align
        problems = [f"{name} {divisor} must be a multiple of {unit} ({what})"
                    for name, divisor, unit, what in (
                        ("--prune-search-hidden-divisor", c.hidden_divisor, align, "the channel alignment"),
                        ("--prune-search-ffn-divisor", c.ffn_divisor, tp * align, "TP x the channel alignment"))
                    if divisor % unit]
        if trainer.valid_iterator_factory is None or trainer.config.train.eval_iters <= 0:
            problems.append("it scores each candidate on the validation split: give --eval-iters > 0 and a "
                            "--split with a validation part")
        smallest = search.smallest_reachable(self.shape, self.masks, c)
        if smallest > self.final_params and not self.cfg.end_pruning:
            problems.append(f"its narrowest shape has {smallest:,} parameters, above the target {self.final_params:,} "
                            f"(each axis keeps at least {1 - c.max_width_pruning:.0%} of its choices): raise "
                            "--prune-search-max-width-pruning or smaller divisors, or a larger target")
        if problems:
            raise ConfigError("--prune-allocation search: " + "; ".join(problems))

    def _refresh_local(self, trainer) -> None:
        self.local = build_local_masks(trainer.model_chunks, self.masks, self.shape, self.engine.full_shape)
        if PruningState.removes_groups(self.masks, self.shape):
            self.local.apply_to_weights()
            zero_masked_state(self.engine, self.local.param_masks)

    def on_step_begin(self, trainer) -> None:
        tokens_before = trainer.state.tokens_seen
        self._scoring = self._in_window(tokens_before)
        if self._scoring:
            self.estimator.begin_capture()
        if self._hessian_due(trainer):
            self.compensator.begin_capture()

    def wants_lm_gradients(self, trainer) -> bool:
        # saliency measures what removing a group costs the language model, whatever loss trains it:
        # under distillation from the student's own parent the KL and its gradient start at exactly 0
        return self.estimator.reads_gradients and self._in_window(trainer.state.tokens_seen)

    def on_lm_gradients(self, trainer) -> None:
        self._lm_pass = True
        if not trainer.state.nonfinite_step:  # a NaN pass would poison the EMA
            self._lm_table = reduce_table(self.estimator.partial_table(), self.shape, self.estimator.signed)

    def on_before_optimizer_step(self, trainer) -> None:
        self.estimator.end_capture()
        if self.compensator is not None:
            self.compensator.end_capture()
        if self._scoring and not trainer.state.nonfinite_step:  # a NaN step would poison the EMA
            if self._lm_pass:
                table = self._lm_table
            else:
                table = reduce_table(self.estimator.partial_table(), self.shape, self.estimator.signed)
            if table is not None:
                self._add_to_ema(table, trainer.state.iteration + 1)
        self._lm_pass, self._lm_table = False, None
        if self.local is not None and self.current_params() < self.initial_params:
            self.local.apply_to_grads()
            if self.engine.grads_outside_params:
                zero_masked_grads(self.engine, self.local.param_masks)  # an engine's partitioned gradients

    def _add_to_ema(self, table, iteration: int) -> None:
        bad = nonfinite_parts(table)
        if bad:  # finite gradients can still give one (an overflowing square): it would poison the EMA
            if is_rank0():
                print(f"WARNING: iteration {iteration}: the saliency table of this step has non-finite entries "
                      f"({', '.join(bad)}); it is left out of the running saliency (EMA)", flush=True)
            return
        self.ema = table if self.ema is None else self.ema.blend(table, self.cfg.saliency_ema)
        self.state.ema_steps += 1

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        it = trainer.state.iteration
        tokens = trainer.state.tokens_seen
        tokens_before = tokens - trainer.tokens_per_step
        event = self._in_window(tokens_before) and (it % self.cfg.interval == 0 or tokens >= self.end_tokens)
        self._check_loss_jump(trainer, it, metrics.loss)
        if event:
            params_before, records_before = self.current_params(), len(self.history)
            self.prune_event(trainer, it, tokens)
            if self.current_params() < params_before:
                self.state.loss_before_event = (it, metrics.loss)
            elif len(self.history) > records_before:
                self._write_history_line(self.history[-1])  # nothing removed: no jump to wait for
            if tokens >= self.end_tokens:
                self._warn_if_target_missed()
        if self.compensator is not None and not self._hessian_due(trainer):
            self.compensator.reset()  # no event uses what was captured: hold no Hessian between events
        if self._shrink_due(tokens):
            self.state.shrink_requested_at = it
            trainer.request_stop("shrink")
        if self._search_flops:
            metrics.extra["search_flops"], self._search_flops = self._search_flops, 0
        params = self.current_params()
        ratios = self.kept_ratios()
        metrics.extra.update({"params": params, "kept_heads": ratios["heads"],
                              "kept_ffn": ratios["ffn"], "kept_hidden": ratios["hidden"],
                              "kept_layers": ratios["layers"]})
        logger = next((c for c in trainer.callbacks if c.name == "logging"), None)
        if logger is not None:
            logger.log_scalar("pruning/params", params, it)
            for k, v in ratios.items():
                logger.log_scalar(f"pruning/kept_{k}", v, it)

    def _hessian_due(self, trainer) -> bool:
        """Whether the next step (the one about to run, from on_step_begin) is one of the last
        --prune-compensation-window steps before an event (on the interval grid, or the window's end)."""
        if self.compensator is None or not self._in_window(trainer.state.tokens_seen):
            return False
        window = self.cfg.compensation_window
        if (-(trainer.state.iteration + 1)) % self.cfg.interval < window:
            return True
        return trainer.state.tokens_seen + window * trainer.tokens_per_step >= self.end_tokens

    # ------------------------------------------------------------------ loss jump after an event (issue 21)
    def _check_loss_jump(self, trainer, iteration: int, loss: float) -> None:
        """The step after an event: record how much the loss rose; warn past --prune-loss-jump-warn."""
        if self.state.loss_before_event is None:
            return
        event_iteration, before = self.state.loss_before_event
        self.state.loss_before_event = None
        jump = loss - before
        if self.history and self.history[-1]["iteration"] == event_iteration:
            self.history[-1].update({"loss_before": before, "loss_after": loss, "loss_jump": jump,
                                     "loss_jump_warning": bool(jump > self.cfg.loss_jump_warn)})
            self._write_history_line(self.history[-1])
        logger = next((c for c in trainer.callbacks if c.name == "logging"), None)
        if logger is not None:
            logger.log_scalar("pruning/loss_jump", jump, event_iteration)
        if jump > self.cfg.loss_jump_warn and is_rank0():
            print(f"WARNING: the loss rose by {jump:.3f} ({before:.3f} -> {loss:.3f}) after the pruning event at "
                  f"iteration {event_iteration}, more than --prune-loss-jump-warn {self.cfg.loss_jump_warn}: "
                  "prune more slowly (--prune-max-step-fraction, a later --prune-end-tokens) or check "
                  "the saliency (--saliency)", flush=True)

    def _shrink_due(self, tokens: int) -> bool:
        """Whether to shrink now: only when something is masked (zeros to remove)."""
        c = self.cfg
        if not (c.shrink_at or c.shrink_auto) or self.current_params() >= self.shape.parameter_count(
                self.shape.full_masks()):
            return False
        for point in c.shrink_at:
            if tokens >= point and point not in self.state.shrink_points_done:
                self.state.shrink_points_done.append(point)
                return True
        if c.shrink_auto:
            if tokens >= self.end_tokens:
                return True
            if c.shrink_every_fraction:
                reference = self.state.shrunk_at_params or self.initial_params
                if (reference - self.current_params()) / self.initial_params >= c.shrink_every_fraction:
                    return True
        return False

    def prune_event(self, trainer, iteration: int, tokens: int) -> None:
        target = target_params(tokens, self.initial_params, self.final_params, self.start_tokens,
                               self.end_tokens, self.cfg.ramp)
        if self.current_params() <= target:
            return
        problem = table_problem(self.ema, self.masks, tuple(self.cfg.types))
        if problem:
            self._warn_event_skipped(iteration, problem)
            return
        found = None
        if self.search is not None:
            local_masks, found = self._search_event(trainer, target)
            moves = []
        else:
            local_masks, moves = solve(self.shape, self.masks, self.ema, target, self.constraints,
                                       final_params=self.final_params)
        decided = [local_masks.state_dict(), moves]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(decided, src=0)
            # verify: every rank's own solution must equal rank 0's (determinism check)
            mine = torch.tensor([_digest(local_masks)], dtype=torch.int64, device=device())
            low, high = mine.clone(), mine.clone()
            torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
            if int(low) != int(high) and is_rank0():
                print("WARNING: pruning decisions differed between ranks; rank 0's is used", flush=True)
        new_masks = GroupMasks.from_state_dict(decided[0])
        moves = decided[1]
        # masks only shrink
        assert not bool((new_masks.heads & ~self.masks.heads).any() | (new_masks.ffn & ~self.masks.ffn).any()
                        | (new_masks.hidden & ~self.masks.hidden).any()
                        | (new_masks.layers & ~self.masks.layers).any()), "a pruned group would regrow"
        problems = check_constraints(self.shape, new_masks, self.constraints)
        if problems:
            raise RuntimeError("pruning produced an unshrinkable model: " + "; ".join(problems[:5]))
        probe = {}
        if self.compensator is not None and self.cfg.compensation_probe:
            batches = trainer.config.train.eval_iters
            probe = {"loss_before": trainer.evaluate_test(batches),
                     "loss_after_without": probe_uncompensated_loss(trainer, self.shape, self.masks, new_masks, batches)}
        compensation = self.compensator.compensate(self.masks, new_masks) if self.compensator is not None else None
        self.masks = new_masks
        self._refresh_local(trainer)
        if probe:
            compensation["probe"] = {**probe, "loss_after_with": trainer.evaluate_test(trainer.config.train.eval_iters)}
        record = {"iteration": iteration, "tokens": tokens, "target": target,
                  "initial_params": self.initial_params,
                  "params": self.current_params(), **{f"kept_{k}": v for k, v in self.kept_ratios().items()},
                  "kept_per_layer": {"layers": self.masks.layers.tolist(),
                                     "heads": self.masks.heads.sum(1).tolist(),
                                     "ffn": self.masks.ffn.sum(1).tolist(),
                                     "hidden": int(self.masks.hidden.sum())},
                  "mean_saliency": self._mean_saliency(),
                  "moves": [{k: m[k] for k in ("type", "layers", "count", "saliency_per_param")} for m in moves]}
        if compensation is not None:
            record["compensation"] = compensation
        if found is not None:
            record["search"] = found
        self.history.append(record)
        if is_rank0():
            print(f"pruning at iteration {iteration}: {record['params'] / 1e6:.3f} M params "
                  f"(target {target / 1e6:.3f} M); kept heads {record['kept_heads']:.1%}, "
                  f"FFN {record['kept_ffn']:.1%}, hidden {record['kept_hidden']:.1%}", flush=True)
        logger = next((c for c in trainer.callbacks if c.name == "logging"), None)
        if logger is not None:
            for k, v in record["mean_saliency"].items():
                logger.log_scalar(f"pruning/mean_saliency_{k}", v, iteration)
            if compensation is not None:
                for role, (without, with_) in compensation["error_by_role"].items():
                    logger.log_scalar(f"pruning/compensation_error_{role}_without", without, iteration)
                    logger.log_scalar(f"pruning/compensation_error_{role}_with", with_, iteration)
                logger.log_scalar("pruning/compensation_seconds", compensation["seconds"], iteration)
                for k, v in compensation.get("probe", {}).items():
                    logger.log_scalar(f"pruning/compensation_{k}", v, iteration)
                logger.log_scalar("pruning/compensation_hessian_mb", compensation["hessian_bytes"] / 2**20, iteration)

    def _search_event(self, trainer, target: int) -> tuple[GroupMasks, dict]:
        """Minitron's search (``pretrain/pruning/search.py``): the ``top_k`` largest homogeneous
        shapes under ``target``, each kept by its most salient groups, scored on the same
        validation batches; the lowest loss wins. Every rank scores every candidate (collective)."""
        listed = search.candidates(self.shape, self.masks, target, self.search)
        if not listed:
            raise ConfigError(f"--prune-allocation search: no homogeneous shape of the search space is at or under "
                              f"{target:,} parameters; raise --prune-search-max-width-pruning or use smaller divisors")
        batches = trainer.config.train.eval_iters
        trials = [search.apply(self.masks, self.ema, candidate) for candidate in listed]
        scored = [{**candidate.as_dict(), "valid_loss": loss_under_masks(
            trainer, self.shape, self.masks, trial, lambda: trainer.score_on_validation(batches))}
            for candidate, trial in zip(listed, trials)]
        best = min(range(len(scored)), key=lambda i: (not scored[i]["valid_loss"] < float("inf"),
                                                      scored[i]["valid_loss"], i))
        logger = next((c for c in trainer.callbacks if c.name == "logging"), None)
        if logger is not None and getattr(logger, "flops_per_token", None):
            tokens = len(listed) * batches * trainer.config.train.global_batch_size * trainer.config.model.seq_length
            self._search_flops = tokens * (logger.flops_per_token // 3)  # forward passes only
        if is_rank0():
            print(f"pruning search: {len(listed)} shapes under {target / 1e6:.3f} M parameters scored on "
                  f"{batches} validation batches; chosen hidden {scored[best]['hidden']}, FFN {scored[best]['ffn']}, "
                  f"query groups {scored[best]['groups']} (validation loss {scored[best]['valid_loss']:.4f})",
                  flush=True)
        return trials[best], {"candidates": scored, "chosen": best}

    def _warn_event_skipped(self, iteration: int, problem: str) -> None:
        """A table that cannot rank the groups is never a choice (the solver would pick by its
        tie-break): the event is skipped, and a later event whose table can rank catches the
        schedule up (its target is a function of tokens seen)."""
        if not is_rank0():
            return
        kind = self.cfg.saliency
        if "zero" in problem:
            read = ("the gradients these scores multiply the weights by were all zero: the step's loss has no "
                    "gradient (a loss scaled by zero, frozen weights)" if self.estimator.reads_gradients else
                    "the layer inputs or weights these scores read were all zero")
            cause = f" --saliency {kind}: {read}."
        else:
            cause = ""
        print(f"WARNING: pruning event at iteration {iteration} skipped: {problem} after "
              f"{self.state.ema_steps} scoring step(s).{cause} Nothing was pruned on it; the next event whose "
              "table ranks the groups prunes to the schedule's target", flush=True)

    def _mean_saliency(self) -> dict:
        """Mean saliency per parameter of the kept groups of each type (for plots)."""
        s = self.shape
        h_kept = int(self.masks.hidden.sum())
        out = {}
        if self.ema is None:
            return out
        kept = self.masks.heads
        out["heads"] = float(self.ema.heads[kept].mean() / s.group_cost(max(h_kept, 1))) if kept.any() else 0.0
        kept = self.masks.ffn
        out["ffn"] = float(self.ema.ffn[kept].mean() / s.ffn_channel_cost(max(h_kept, 1))) if kept.any() else 0.0
        kept = self.masks.hidden
        out["hidden"] = float(self.ema.hidden[kept].mean() / s.hidden_channel_cost(self.masks)) if kept.any() else 0.0
        return out

    def _write_history_line(self, record: dict) -> None:
        if self.log_dir and is_rank0():
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "pruning_history.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _warn_if_target_missed(self) -> None:
        """The window's last event: the solver reaches the target (overshooting by at most one
        unit) unless the per-event cap or the floors stopped it; say so rather than end above it."""
        if self.current_params() > self.final_params and is_rank0():
            print(f"WARNING: the pruning window ends at {self.current_params():,} parameters, above the target "
                  f"{self.final_params:,}: the per-event cap (--prune-max-step-fraction "
                  f"{self.cfg.max_step_fraction}) or the floors (--prune-min-*) stopped the last events. "
                  "Prune over more events (a later --prune-end-tokens, a smaller --prune-interval), "
                  "raise the cap or lower the floors", flush=True)

    def on_train_end(self, trainer) -> None:
        if self.estimator is not None:
            self.estimator.remove_hooks()
        if self.compensator is not None:
            self.compensator.remove_hooks()
        if self.state.loss_before_event is not None and trainer.state.iteration >= trainer.total_iters:
            # the run ends right after an event: no step will give its jump (a run that stopped
            # early keeps it pending in the checkpoint, and the resumed run writes the line)
            self.state.loss_before_event = None
            self._write_history_line(self.history[-1])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's state; a target that differs from this run's (--prune-target-* changed
        on resume) is applied from here on, with a message (README, "Resuming")."""
        # a fresh state of the current model fills what an older checkpoint did not store
        loaded = PruningState.from_dict(state, fallback=self.state)
        wanted = loaded.target_for(self.cfg.target_params, self.cfg.target_ratio)
        if wanted != loaded.final_params and not self.cfg.end_pruning:
            print_rank0(retarget_message(loaded, wanted))
            loaded.final_params = wanted
        self.state = loaded

    def local_state_dict(self) -> dict:
        """Per-rank state (the fisher running means over this rank's owned elements; the Hessian sums of
        a compensation window that a checkpoint cuts in two)."""
        out = {}
        if self.compensator is not None and self.compensator.hessian_bytes:
            out["compensation"] = self.compensator.state_dict()
        if self.estimator is None or not self.estimator.fisher:
            return out
        names = {p: i for i, p in enumerate(self.local.param_masks)} if self.local else {}
        return {**out, "fisher_count": self.estimator.fisher_count,
                "fisher": {names[p]: v.clone() for p, v in self.estimator.fisher.items() if p in names}}

    def load_local_state_dict(self, state: dict) -> None:
        if self.estimator is None:
            self._pending_local_state = state
        else:
            self._load_local_state(state)

    def _load_local_state(self, state: dict) -> None:
        if not state:
            return
        if self.compensator is not None and state.get("compensation"):
            self.compensator.load_state_dict(state["compensation"])
        params = list(build_local_masks(self.estimator._model_chunks, self.masks, self.shape,
                                        self.engine.full_shape).param_masks)
        self.estimator.fisher_count = state.get("fisher_count", 0)
        self.estimator.fisher = {params[i]: v for i, v in state.get("fisher", {}).items() if i < len(params)}


def retarget_message(state: PruningState, wanted: int) -> str:
    ratio = wanted / state.initial_params
    return (f"pruning target changed on resume: {state.final_params:,} -> {wanted:,} parameters "
            f"({ratio:.3f} of the {state.initial_params:,} the schedule started from); the schedule continues "
            "towards the new target from this point (groups already removed stay removed)")
