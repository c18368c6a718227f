"""The DeepSpeed engine (issue 17) with the features test_engine_deepspeed.py leaves out: bf16,
hidden-dimension pruning, activation/Fisher/OBS saliency, the non-finite step policy,
distillation (``--kd-teacher``, with Taylor pruning scored from the CE: issue 28) and OBS compensation
(``--prune-compensation obs``).

One 4-rank launch (TP=2 x DP=2) trains every scenario under the megatron engine (distributed
optimizer) and under DeepSpeed ZeRO on the same seed, data and layout; each test checks one
scenario's results. The engines compute the same maths in a different order of float sums: fp32
results agree to ``TOLERANCE`` (as in test_engine_deepspeed.py), bf16 ones to ``BF16_TOLERANCE``.
CI cost: the one launch, 46 s on 2 cores (up to 100 s measured while other jobs shared them);
each scenario's seconds are in its results.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from pretrain.trainer import Callback
from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ITERS = 4
TOLERANCE = 1e-5  # relative and absolute, per step (fp32)
# bf16: every matmul rounds to 8 bits of mantissa, and the engines round at different points
# (megatron-core reduces bf16 gradients into fp32 buffers, DeepSpeed ZeRO-3 reduces them in bf16).
# Measured: losses within 1.2e-5, gradient norms within 5.6e-4 (relative); saliency entries within
# 2.2e-4 of the table's largest (a small entry can be 9% off: |w g| of bf16 values)
BF16_TOLERANCE = 5e-3


def _config(data: dict, engine: str, stage: int | None, *, iters: int = ITERS, prune: dict | None = None,
            **train):
    from pretrain.config import PruneConfig

    cfg = debug_config(data, tp=2, iters=iters, gbs=8, mbs=2)
    settings = data.get("zero3_settings") if stage == 3 else None
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, engine=engine, zero_stage=stage,
                                                                deepspeed_config=settings),
                              train=dataclasses.replace(cfg.train, **train))
    if prune is not None:
        cfg = dataclasses.replace(cfg, prune=PruneConfig(**{"target_ratio": 0.8, "start_tokens": 0, "interval": 2,
                                                            **prune}))
    return cfg


def _callback(summary: dict, name: str):
    return next((c for c in summary["trainer"].callbacks if c.name == name), None)


def _whole_weights(trainer) -> dict:
    """This rank's whole (TP-local) weights by name, fp32 copies (ZeRO-3: gathered; collective)."""
    from pretrain.model.build import unwrap
    from pretrain.engines.slots import whole_weight

    return {name: whole_weight(trainer.optimizer, p).float().clone()
            for name, p in unwrap(trainer.model_chunks[0]).named_parameters()}


def _masked_nonzero(trainer, pruning) -> dict:
    """Masked elements that are not zero in the weights, fp32 masters and Adam moments this rank
    holds, and the largest |master - weight| over its owned ranges (the masters got every update)."""
    import torch

    from pretrain.engines.slots import iter_param_slots

    counts = {"weights": 0, "master": 0, "exp_avg": 0, "exp_avg_sq": 0, "slots": 0, "master_gap": 0.0}
    masks = pruning.local.param_masks
    for slot in iter_param_slots(trainer.optimizer):
        if slot.end <= slot.start:
            continue
        values = slot.values if slot.values is not None else slot.param.detach().reshape(-1)[slot.start:slot.end]
        counts["master_gap"] = max(counts["master_gap"], float((slot.main_param.float() - values.float()).abs().max()))
        mask = masks.get(slot.param)
        if mask is None:
            continue
        dropped = ~mask.reshape(-1)[slot.start:slot.end]
        counts["slots"] += 1
        counts["weights"] += int(torch.count_nonzero(values[dropped]))
        counts["master"] += int(torch.count_nonzero(slot.main_param[dropped]))
        for key in ("exp_avg", "exp_avg_sq"):
            counts[key] += int(torch.count_nonzero(slot.state[key].reshape(-1)[dropped]))
    for param, mask in masks.items():  # whole weights where this rank holds them (a persistent ZeRO-3 one too)
        if param.data.shape == mask.shape:
            counts["weights"] += int(torch.count_nonzero(param.data[~mask]))
    return counts


def _record(summary: dict, weights: bool = False) -> dict:
    """What the tests compare of one run (on this rank)."""
    params = list(summary["trainer"].model_chunks[0].parameters())
    out = {"losses": [h["loss"] for h in summary["history"]],
           "grad_norms": [h["grad_norm"] for h in summary["history"]],
           "kd_kl": [h.get("kd_kl") for h in summary["history"]],
           # ZeRO-3 parameters that hold only their partition between forwards (not persistent)
           "partitioned": sum(hasattr(p, "ds_id") and not p.ds_persist for p in params)}
    pruning = _callback(summary, "pruning")
    if pruning is not None:
        out.update(masks=pruning.masks.state_dict(), ema=pruning.ema.pack().clone(), history=pruning.history,
                   masked_nonzero=_masked_nonzero(summary["trainer"], pruning),
                   local=pruning.local_state_dict())
    if weights:
        out["weights"] = _whole_weights(summary["trainer"])
    return out


class PoisonedStep(Callback):
    """Makes one step's gradients NaN on one rank (its loss for backward times NaN; the reported
    loss stays finite, so only the gradient check can see it), and records each step's ``skipped``."""

    name = "poison"

    def __init__(self, iteration: int, rank: int):
        self.iteration, self.rank, self.skipped = iteration, rank, []

    def wrap_forward_step(self, trainer, step_func, data_iterator):
        import torch

        if trainer.state.iteration != self.iteration or torch.distributed.get_rank() != self.rank:
            return step_func, data_iterator

        def poisoned(iterator, model):
            output, loss_func = step_func(iterator, model)

            def nan_loss(output_tensor):
                loss, reported = loss_func(output_tensor)
                return loss * float("nan"), reported

            return output, nan_loss

        return poisoned, data_iterator

    def on_step_end(self, trainer, metrics) -> None:
        self.skipped.append(metrics.skipped)


def _nonfinite(data: dict, engine: str, stage: int | None, save: str | None) -> dict:
    import contextlib
    import io

    from pretrain.run.segments import run

    poison = PoisonedStep(iteration=1, rank=3)  # step 2, on TP rank 1 of DP rank 1
    cfg = _config(data, engine, stage, iters=3)
    if save:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save=save, save_interval=3))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run(cfg, extra_callbacks=[poison])
    weights = _whole_weights(summary["trainer"])
    return {**_record(summary), "skipped": poison.skipped, "printed": printed.getvalue(),
            "skipped_count": summary["trainer"].state.skipped_nonfinite_steps,
            "finite": all(bool(w.isfinite().all()) for w in weights.values())}


def _fisher_resume(data: dict, root: str, stage: int) -> dict:
    """A 4-step run saving at step 2, then a resume from that step-2 checkpoint."""
    import os
    import shutil

    import torch

    from pretrain.checkpoint import LATEST_FILE, atomic_write_text, iteration_dir
    from pretrain.run.segments import run

    save = os.path.join(root, f"fisher-zero{stage}")
    cfg = _config(data, "deepspeed", stage, prune={"saliency": "fisher"})
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save=save, save_interval=2))
    whole = _record(run(cfg))
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(iteration_dir(save, 4))
        atomic_write_text(os.path.join(save, LATEST_FILE), "2")
    torch.distributed.barrier()
    resumed = _record(run(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=save))))
    return {"whole": whole, "resumed": resumed}


def _scenarios(data: dict, root: str, names: tuple) -> dict:
    """Rank worker: every scenario in ``names`` under both engines; what each test compares."""
    import os
    import time

    from pretrain.run.segments import run

    out: dict = {}

    def timed(name, fn):
        start = time.time()
        out[name] = fn()
        out[name]["seconds"] = time.time() - start

    if "bf16" in names:  # bf16 weights, DeepSpeed's bf16 optimizer wrapper, pruning on
        timed("bf16", lambda: {key: _record(run(_config(data, engine, stage, iters=3, bf16=True, prune={})))
                               for key, (engine, stage) in {"megatron": ("megatron", None),
                                                            "zero3": ("deepspeed", 3)}.items()})
    if "hidden" in names:  # hidden channels pruned by activation saliency: columns across ZeRO-3 partitions
        prune = {"types": ("hidden",), "saliency": "activation"}
        timed("hidden", lambda: {key: _record(run(_config(data, engine, stage, prune=prune)))
                                 for key, (engine, stage) in {"megatron": ("megatron", None),
                                                              "zero3": ("deepspeed", 3)}.items()})
    if "fisher" in names:  # per-rank running means over each rank's ZeRO partition, saved with the checkpoint
        fisher = {"saliency": "fisher"}
        timed("fisher", lambda: {"megatron": _record(run(_config(data, "megatron", None, prune=fisher))),
                                 **_fisher_resume(data, root, 2)})
    teacher = os.path.join(root, "teacher")
    if "nonfinite" in names:  # the megatron run's checkpoint is the distillation's teacher
        timed("nonfinite", lambda: {"megatron": _nonfinite(data, "megatron", None, teacher),
                                    "zero2": _nonfinite(data, "deepspeed", 2, None)})
    if "kd" in names:
        from pretrain.config import DistillConfig

        def distilled(engine, stage):
            # Taylor saliency on every step: each runs a CE pass of its own first, whose gradients
            # DeepSpeed must drop before the KD pass (issue 28)
            cfg = _config(data, engine, stage, iters=2, prune={"interval": 1})
            return _record(run(dataclasses.replace(cfg, distill=DistillConfig(teacher=teacher, weight=0.5,
                                                                              temperature=2.0))))

        def from_parent(engine, stage, **kd):  # one step and one event from the teacher's own weights
            cfg = _config(data, engine, stage, iters=1, prune={"interval": 1})
            cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=teacher, finetune=True))
            return _record(run(dataclasses.replace(cfg, distill=DistillConfig(teacher=teacher, **kd)) if kd else cfg))

        # ZeRO-3 only: its forward gathers every module's weights around the hooks the KL reads
        # (ZeRO-1/2 run the plain module); ZeRO-2 for the parent's case (its own way of dropping gradients)
        timed("kd", lambda: {"megatron": distilled("megatron", None), "zero3": distilled("deepspeed", 3),
                             "parent_ce": from_parent("megatron", None),
                             "parent_kd_zero2": from_parent("deepspeed", 2, weight=1.0)})
    if "obs" in names:
        test_prefix = os.path.join(root, "test")  # written by ``prepare`` before the launch

        def compensated(engine, stage):
            # OBS saliency too (it reads the whole weights: gathered under ZeRO-3), and the probe's
            # held-out losses around each event (it masks ZeRO-3 partitions and puts them back)
            cfg = _config(data, engine, stage, eval_iters=1,
                          prune={"saliency": "obs", "target_ratio": 0.7, "allocation": "proportional",
                                 "compensation": "obs",
                                 "compensation_window": 1, "compensation_probe": True})
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_data_path=[test_prefix]))
            return _record(run(cfg), weights=True)

        timed("obs", lambda: {"megatron": compensated("megatron", None), "zero2": compensated("deepspeed", 2),
                              "zero3": compensated("deepspeed", 3)})
    return out


ALL = ("bf16", "hidden", "fisher", "nonfinite", "kd", "obs")


# DeepSpeed keeps a ZeRO-3 parameter of at most 1e5 elements gathered on every rank ("persistent"):
# every weight of the debug model. At 20,000, fc1, fc2 and the embedding are partitioned (nothing
# of them outside their partition between forwards) while qkv, proj and the norms persist, as the
# norms of a real model do: both kinds in every ZeRO-3 run
ZERO3_SETTINGS = {"zero_optimization": {"stage3_param_persistence_threshold": 20000}}


def prepare(data: dict, root: str) -> dict:
    """Files every rank reads, written before the launch: ``root/test``, a copy of the data as the
    compensation probe's held-out set (a test set must be data that training never reads), and the
    ZeRO-3 --deepspeed-config. ``data`` with the latter's path."""
    import json
    import shutil

    for ext in (".bin", ".idx"):
        shutil.copyfile(data["prefix"] + ext, f"{root}/test{ext}")
    with open(f"{root}/zero3.json", "w") as f:
        json.dump(ZERO3_SETTINGS, f)
    return {**data, "zero3_settings": f"{root}/zero3.json"}


@pytest.fixture(scope="module")
def results(tiny_dataset, tmp_path_factory) -> list:
    """Every rank's results (one launch for the whole file)."""
    root = str(tmp_path_factory.mktemp("ds-features"))
    return run_distributed(_scenarios, 4, prepare(tiny_dataset, root), root, ALL)


def _close(a: list, b: list, what: str, tolerance: float = TOLERANCE) -> None:
    assert len(a) == len(b) and a, f"{what}: {a} vs {b}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=tolerance, abs_tol=tolerance), f"{what}: step {i + 1}: {x} vs {y}\n{a}\n{b}"


def _close_tables(got, ref, what: str, tolerance: float = TOLERANCE) -> None:
    """Two packed saliency tables agree entry by entry within ``tolerance`` of the larger's largest entry."""
    gap, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert scale > 0 and gap <= tolerance * scale, f"{what}: largest difference {gap} (largest entry {scale})"


def _same_masks(got: dict, ref: dict, what: str) -> None:
    import torch

    for name, mask in ref["masks"].items():
        assert torch.equal(got["masks"][name], mask), f"{what}: masks {name} differ"


def _masked_state_zero(got: dict, what: str) -> None:
    counts = got["masked_nonzero"]
    nonzero = {k: v for k, v in counts.items() if k not in ("slots", "master_gap")}
    assert counts["slots"] > 0 and not any(nonzero.values()), f"{what}: {counts}"


def _zero3_partitions(got: dict) -> None:
    assert got["partitioned"] == 4 * 2 + 1, f"fc1, fc2 of 4 layers and the embedding: {got['partitioned']}"


def _pruned_something(ref: dict) -> bool:
    return not all(bool(m.all()) for m in ref["masks"].values())


def test_bf16_under_zero3_follows_the_megatron_engine(results):
    import torch

    got, ref = results[0]["bf16"]["zero3"], results[0]["bf16"]["megatron"]
    assert _pruned_something(ref)
    _zero3_partitions(got)
    _close(got["losses"], ref["losses"], "bf16 ZeRO-3 losses", BF16_TOLERANCE)
    _close(got["grad_norms"], ref["grad_norms"], "bf16 ZeRO-3 grad norms", BF16_TOLERANCE)
    scale = float(ref["ema"].abs().max())
    assert torch.allclose(got["ema"], ref["ema"], rtol=BF16_TOLERANCE, atol=2e-3 * scale), "bf16 saliency"
    # channels whose saliencies are that close may swap places: the same counts, not the same channels
    assert [r["params"] for r in got["history"]] == [r["params"] for r in ref["history"]]
    for rank in results:
        _masked_state_zero(rank["bf16"]["zero3"], "bf16 ZeRO-3")


def test_hidden_pruning_by_activation_saliency_under_zero3(results):
    import torch

    got, ref = results[0]["hidden"]["zero3"], results[0]["hidden"]["megatron"]
    assert not bool(ref["masks"]["hidden"].all()), "the run should have pruned hidden channels"
    _zero3_partitions(got)
    _same_masks(got, ref, "hidden ZeRO-3")
    _close(got["losses"], ref["losses"], "hidden ZeRO-3 losses")
    # activation statistics do not depend on the engine: the same tables up to float sums
    assert torch.allclose(got["ema"], ref["ema"], rtol=1e-5, atol=1e-9), "activation saliency tables"
    for rank in results:
        _masked_state_zero(rank["hidden"]["zero3"], "hidden ZeRO-3")


def test_fisher_saliency_and_its_exact_resume_under_zero2(results):
    import torch

    fisher = results[0]["fisher"]
    ref, whole, resumed = fisher["megatron"], fisher["whole"], fisher["resumed"]
    assert _pruned_something(ref)
    _close(whole["losses"], ref["losses"], "Fisher ZeRO-2 losses")
    assert torch.allclose(whole["ema"], ref["ema"], rtol=1e-5, atol=1e-9), "Fisher saliency tables"
    _same_masks(whole, ref, "Fisher ZeRO-2")
    # the resume: the same arithmetic in the same order on the same state, so equal, not just close
    assert resumed["losses"] == whole["losses"][2:], f"resumed {resumed['losses']} vs {whole['losses']}"
    assert torch.equal(resumed["ema"], whole["ema"])
    _same_masks(resumed, whole, "Fisher resume")
    for rank in results:
        mine_whole, mine_resumed = rank["fisher"]["whole"]["local"], rank["fisher"]["resumed"]["local"]
        assert mine_whole["fisher"] and mine_resumed["fisher_count"] == mine_whole["fisher_count"]
        assert mine_resumed["fisher"].keys() == mine_whole["fisher"].keys()
        for index, running in mine_whole["fisher"].items():
            assert torch.equal(mine_resumed["fisher"][index], running), f"Fisher running mean {index}"
        _masked_state_zero(rank["fisher"]["resumed"], "Fisher resume")


def test_a_nonfinite_step_is_skipped_under_zero2_as_under_megatron(results):
    for rank in results:
        for key in ("megatron", "zero2"):
            got = rank["nonfinite"][key]
            assert got["skipped"] == [False, True, False], f"{key}: {got['skipped']}"
            assert got["skipped_count"] == 1 and got["finite"], f"{key}: {got}"
    ref, got = results[0]["nonfinite"]["megatron"], results[0]["nonfinite"]["zero2"]
    # the skipped step changed nothing: the next step's loss is the same on both engines
    _close(got["losses"], ref["losses"], "losses around the skipped step")
    assert math.isnan(got["grad_norms"][1]) or math.isinf(got["grad_norms"][1]), got["grad_norms"]
    _close([got["grad_norms"][i] for i in (0, 2)], [ref["grad_norms"][i] for i in (0, 2)], "grad norms")
    for key in ("megatron", "zero2"):
        printed = results[0]["nonfinite"][key]["printed"]
        assert "iteration 2: loss" in printed and "the step was skipped (1 of at most" in printed, printed[-2000:]


def test_distillation_under_zero3(results):
    kd = results[0]["kd"]
    ref = kd["megatron"]
    assert all(kl is not None and kl > 0 for kl in ref["kd_kl"]), ref["kd_kl"]
    _zero3_partitions(kd["zero3"])
    for key in ("zero3",):
        _close(kd[key]["losses"], ref["losses"], f"KD {key} losses")
        _close(kd[key]["kd_kl"], ref["kd_kl"], f"KD {key} KL")
        # the CE pass's gradients were dropped before the KD pass: the step's gradients are the KD loss's
        _close(kd[key]["grad_norms"], ref["grad_norms"], f"KD {key} grad norms")
        _close_tables(kd[key]["ema"], ref["ema"], f"KD {key} saliency")
        _same_masks(kd[key], ref, f"KD {key}")
    assert _pruned_something(ref)


def test_distilling_from_the_parent_under_zero2_prunes_what_ce_training_would(results):
    """Issue 28 under DeepSpeed: the student is its teacher (α = 1: the KD step's gradient is 0), the
    first event's table is the CE's and removes the groups a CE run removes from the same weights."""
    kd, ce = results[0]["kd"]["parent_kd_zero2"], results[0]["kd"]["parent_ce"]
    assert kd["grad_norms"][0] < 1e-6 and abs(kd["kd_kl"][0]) < 1e-6, kd  # nothing of the CE pass is left
    _close(kd["losses"], ce["losses"], "the CE of the same batch")
    _close_tables(kd["ema"], ce["ema"], "saliency")
    _same_masks(kd, ce, "KD from the parent")
    assert _pruned_something(ce) and len(kd["history"]) == len(ce["history"]) == 1


def test_obs_compensation_under_zero2_and_zero3(results):
    import torch

    ref = results[0]["obs"]["megatron"]
    events = [r["compensation"] for r in ref["history"] if "compensation" in r]
    assert len(events) == 2 and _pruned_something(ref), ref["history"]
    # the updated linears: fc2 (row-parallel) and fc1, qkv (their rows split): partitioned and persistent ones
    assert {name.split(".")[1] for name in events[0]["linears"]} == {"fc1", "fc2", "qkv"}, events[0]["linears"]
    _zero3_partitions(results[0]["obs"]["zero3"])
    for key in ("zero2", "zero3"):
        got = results[0]["obs"][key]
        _same_masks(got, ref, f"OBS {key}")
        _close(got["losses"], ref["losses"], f"OBS {key} losses")
        assert torch.allclose(got["ema"], ref["ema"], rtol=1e-5, atol=1e-9), f"OBS {key}: obs saliency tables"
        theirs = [r["compensation"] for r in got["history"] if "compensation" in r]
        for mine, their in zip(events, theirs):
            for name, errors in mine["linears"].items():
                _close(their["linears"][name], errors, f"OBS {key}: reconstruction errors of {name}")
            probes = sorted(mine["probe"])  # the held-out losses before, after without and with the update
            _close([their["probe"][k] for k in probes], [mine["probe"][k] for k in probes], f"OBS {key}: probe losses")
    for rank in results:
        ref = rank["obs"]["megatron"]
        for key in ("zero2", "zero3"):
            got = rank["obs"][key]
            # the run ends on an event: its weights are the compensated ones, and the masters got the update
            for name, weight in ref["weights"].items():
                assert torch.allclose(got["weights"][name], weight, rtol=1e-4, atol=1e-6), f"OBS {key}: weight {name}"
            _masked_state_zero(got, f"OBS {key}")
            assert got["masked_nonzero"]["master_gap"] < 1e-6, f"OBS {key}: {got['masked_nonzero']}"
