"""The DeepSpeed engine (issue 17): ZeRO-1/2/3 at TP=2 x DP=2 train the megatron engine's curve.

One 4-rank launch trains the same run (seed, data, model, pruning on) under the megatron engine
(distributed optimizer) and under DeepSpeed ZeRO-1, 2 and 3, and compares per step: the loss,
the gradient norm, and the reduced saliency table (the pruning EMA after the run). The engines
compute the same maths (same AdamW, same no-decay groups, same clipping norm, the same
data-parallel mean) in a different order of float sums, hence a tolerance, not equality.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ITERS = 4
TOLERANCE = 1e-5  # relative and absolute, per step (measured differences: <= 2e-7)


def _with_partitioned_zero3(data: dict, root) -> dict:
    """``data`` with a --deepspeed-config for ZeRO-3 runs under which some weights are truly
    partitioned: DeepSpeed keeps a parameter of at most 1e5 elements gathered on every rank
    ("persistent"), which is every weight of the debug model; at 20,000, fc1, fc2 and the embedding
    are partitioned while qkv, proj and the norms persist."""
    import json
    import os

    path = os.path.join(str(root), "zero3.json")
    with open(path, "w") as f:
        json.dump({"zero_optimization": {"stage3_param_persistence_threshold": 20000}}, f)
    return {**data, "zero3_settings": path}


def _config(data: dict, engine: str, stage: int | None, **parallel):
    from pretrain.config import PruneConfig

    cfg = debug_config(data, tp=2, iters=ITERS, gbs=8, mbs=1)
    if stage == 3:
        parallel.setdefault("deepspeed_config", data.get("zero3_settings"))
    prune = PruneConfig(target_ratio=0.8, start_tokens=0, interval=2, saliency="taylor")
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, engine=engine, zero_stage=stage, **parallel), prune=prune)


def _train_engines(data: dict, runs: list) -> dict:
    """Rank worker: one training run per (engine, stage); its losses, norms and pruning tables."""
    from pretrain.run.segments import run

    out = {}
    for engine, stage in runs:
        cfg = _config(data, engine, stage)
        # one validation batch at the end: evaluation runs the model outside DeepSpeed's engine; so
        # do the benchmarks (--eval-tasks), each DP rank a share (ZeRO-3 gathers in every forward)
        summary = run(dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, eval_interval=ITERS, eval_iters=1, eval_tasks="boolq,arc_easy", eval_tasks_limit=3)))
        pruning = next(c for c in summary["trainer"].callbacks if c.name == "pruning")
        out[(engine, stage)] = {
            "losses": [h["loss"] for h in summary["history"]],
            "grad_norms": [h["grad_norm"] for h in summary["history"]],
            "ema": {k: v.clone() for k, v in pruning.ema.state_dict().items()},
            "masks": pruning.masks.state_dict(),
            "params": summary["params"],
            "layout": summary["layout"],
            "masked_nonzero": _masked_nonzero(summary["trainer"], pruning),
            "valid": next(c for c in summary["trainer"].callbacks if c.name == "eval").last_loss,
            "tasks": {k: v for k, v in next(c for c in summary["trainer"].callbacks if c.name == "eval")
                      .last_benchmarks.items() if k not in ("seconds", "cpu_seconds")},  # the scores, not their time
        }
        del summary
    return out


def _masked_nonzero(trainer, pruning) -> dict:
    """Masked elements that are not zero in the weights, the fp32 masters and the Adam moments
    this rank holds (the pruning invariant: all must be zero)."""
    import torch

    from pretrain.engines.slots import iter_param_slots

    counts = {"weights": 0, "master": 0, "exp_avg": 0, "exp_avg_sq": 0, "slots": 0}
    masks = pruning.local.param_masks
    for slot in iter_param_slots(trainer.optimizer):
        mask = masks.get(slot.param)
        if mask is None or slot.end <= slot.start:
            continue
        dropped = ~mask.reshape(-1)[slot.start:slot.end]
        values = slot.values if slot.values is not None else slot.param.detach().reshape(-1)[slot.start:slot.end]
        counts["slots"] += 1
        counts["weights"] += int(torch.count_nonzero(values[dropped]))
        counts["master"] += int(torch.count_nonzero(slot.main_param[dropped]))
        for key in ("exp_avg", "exp_avg_sq"):
            counts[key] += int(torch.count_nonzero(slot.state[key].reshape(-1)[dropped]))
    return counts


def _close(a: list, b: list, what: str, steps: int = ITERS, tolerance: float = TOLERANCE) -> None:
    assert len(a) == len(b) == steps, f"{what}: {a} vs {b}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert math.isclose(x, y, rel_tol=tolerance, abs_tol=tolerance), f"{what}: step {i + 1}: {x} vs {y}\n{a}\n{b}"


def test_zero_stages_match_the_megatron_engine(tiny_dataset, tmp_path):
    import torch

    runs = [("megatron", None), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]
    results = run_distributed(_train_engines, 4, _with_partitioned_zero3(tiny_dataset, tmp_path), runs)[0]
    ref = results[("megatron", None)]
    assert ref["layout"]["tp_size"] == 2 and ref["layout"]["dp_size"] == 2
    assert ref["losses"][-1] < ref["losses"][0]
    assert not all(bool(m.all()) for m in ref["masks"].values()), "the run should have pruned something"
    for key in runs[1:]:
        got = results[key]
        _close(got["losses"], ref["losses"], f"ZeRO-{key[1]} losses")
        _close(got["grad_norms"], ref["grad_norms"], f"ZeRO-{key[1]} grad norms")
        assert math.isclose(got["valid"], ref["valid"], rel_tol=TOLERANCE), f"ZeRO-{key[1]}: {got['valid']} vs {ref['valid']}"
        assert got["tasks"] == ref["tasks"] and ref["tasks"]["tasks"]["boolq"]["documents"] == 3, f"ZeRO-{key[1]}"
        assert got["params"] == ref["params"], f"ZeRO-{key[1]}: parameter count"
        for name, table in ref["ema"].items():
            assert torch.allclose(got["ema"][name], table, rtol=1e-5, atol=1e-9), f"ZeRO-{key[1]}: saliency {name}"
        nonzero = {k: v for k, v in got["masked_nonzero"].items() if k != "slots"}
        assert got["masked_nonzero"]["slots"] > 0 and not any(nonzero.values()), f"ZeRO-{key[1]}: {nonzero}"
        for name, mask in ref["masks"].items():
            assert torch.equal(got["masks"][name], mask), f"ZeRO-{key[1]}: masks {name} differ"


def _resume_runs(data: dict, root: str, variants: list) -> dict:
    """Rank worker: per variant, an unbroken 4-step run saving at step 2, then a resume from that
    step-2 checkpoint (the step-4 one removed); the losses of both and the end state."""
    import os
    import shutil

    import torch

    from pretrain.checkpoint import LATEST_FILE, atomic_write_text, iteration_dir
    from pretrain.run.segments import run

    out = {}
    for name, stage, offload in variants:
        save = os.path.join(root, name)
        cfg = _config(data, "deepspeed", stage, offload_optimizer=offload)
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save=save, save_interval=2))
        whole = run(cfg)
        whole_pruning = next(c for c in whole["trainer"].callbacks if c.name == "pruning")
        result = {"whole": [h["loss"] for h in whole["history"]], "whole_masks": whole_pruning.masks.state_dict(),
                  "files": sorted(os.listdir(os.path.join(iteration_dir(save, 2), "deepspeed", "state")))}
        del whole
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(iteration_dir(save, 4))
            atomic_write_text(os.path.join(save, LATEST_FILE), "2")
        torch.distributed.barrier()
        resumed = run(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=save)))
        pruning = next(c for c in resumed["trainer"].callbacks if c.name == "pruning")
        partitioned = sum(hasattr(p, "ds_id") and not p.ds_persist for p in resumed["trainer"].model_chunks[0].parameters())
        result.update(resumed=[h["loss"] for h in resumed["history"]], masks=pruning.masks.state_dict(),
                      partitioned=partitioned,
                      masked_nonzero=_masked_nonzero(resumed["trainer"], pruning),
                      iteration=resumed["iteration"])
        del resumed
        result.update(_change_engine(data, cfg, save, root, name))
        result.update(_from_megatron(cfg, root, name))
        # in-run shrink after the pruning event of step 2: the run goes on under DeepSpeed, smaller
        tokens = 2 * cfg.tokens_per_step()
        shrunk = run(dataclasses.replace(
            cfg, prune=dataclasses.replace(cfg.prune, shrink_at=(tokens,)),
            checkpoint=dataclasses.replace(cfg.checkpoint, save=os.path.join(root, f"{name}-inrun"), save_interval=None)))
        result.update(shrunk=[h["loss"] for h in shrunk["history"]], shrunk_params=shrunk["params"],
                      shrunk_segments=len(shrunk.get("segments", [])), shrunk_engine=shrunk["trainer"].engine is not None)
        del shrunk
        out[name] = result
    return out


def _tool(*argv: str) -> dict:
    import subprocess
    import sys

    from tests.dist_helper import _ROOT, subprocess_env

    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=subprocess_env(), cwd=_ROOT,
                       timeout=300)
    return {"rc": r.returncode, "out": (r.stdout + r.stderr)[-3000:]}


def _change_engine(data: dict, cfg, save: str, root: str, name: str) -> dict:
    """Rank worker: the DeepSpeed checkpoint at step 2 converted (rank 0, the tool) to the megatron
    format, continued by the megatron engine on the same layout; then shrunk and exported to HF."""
    import os
    import shutil

    import torch

    from pretrain.checkpoint import LATEST_FILE, atomic_write_text, iteration_dir
    from pretrain.run.segments import run

    converted, small, hf = (os.path.join(root, f"{name}-{what}") for what in ("megatron", "small", "hf"))
    tools = {}
    if torch.distributed.get_rank() == 0:
        # the resumed run saved step 4 again: convert the step-2 checkpoint, so a step is left to compare
        shutil.rmtree(iteration_dir(save, 4))
        atomic_write_text(os.path.join(save, LATEST_FILE), "2")
        tools["convert"] = _tool("tools/convert_checkpoint.py", "--load", save, "--save", converted, "--to", "megatron")
    torch.distributed.barrier()
    continued = run(dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, engine="megatron", zero_stage=None, offload_optimizer=None,
                                        deepspeed_config=None),
        checkpoint=dataclasses.replace(cfg.checkpoint, load=converted, save=None, save_interval=None)))
    losses = [h["loss"] for h in continued["history"]]
    del continued
    if torch.distributed.get_rank() == 0:
        tools["shrink"] = _tool("tools/reshard_checkpoint.py", "--load", converted, "--save", small, "--shrink",
                                "--target-tensor-parallel-size", "1")
        tools["hf"] = _tool("tools/convert_to_hf.py", "--load", small, "--save", hf)
        tools["hf_files"] = sorted(os.listdir(hf)) if os.path.isdir(hf) else []
    torch.distributed.barrier()
    return {"megatron_continued": losses, "tools": tools}


def _from_megatron(cfg, root: str, name: str) -> dict:
    """Rank worker: the megatron engine's run of ``cfg`` saving at step 2; its step-2 checkpoint
    converted --to deepspeed (rank 0, the tool) and continued under ``cfg``'s DeepSpeed settings."""
    import os
    import shutil

    import torch

    from pretrain.checkpoint import LATEST_FILE, atomic_write_text, iteration_dir
    from pretrain.run.segments import run

    save, converted = os.path.join(root, f"{name}-from-megatron"), os.path.join(root, f"{name}-to-deepspeed")
    whole = run(dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, engine="megatron", zero_stage=None, offload_optimizer=None,
                                        deepspeed_config=None),
        checkpoint=dataclasses.replace(cfg.checkpoint, save=save, save_interval=2)))
    losses = [h["loss"] for h in whole["history"]]
    del whole
    tool = {}
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(iteration_dir(save, 4))
        atomic_write_text(os.path.join(save, LATEST_FILE), "2")
        tool = _tool("tools/convert_checkpoint.py", "--load", save, "--save", converted, "--to", "deepspeed")
    torch.distributed.barrier()
    continued = run(dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=converted, save=None, save_interval=None)))
    result = {"megatron_whole": losses, "deepspeed_continued": [h["loss"] for h in continued["history"]],
              "to_deepspeed": tool}
    del continued
    return result


def test_resume_is_exact_under_zero3_with_offload(tiny_dataset, tmp_path):
    import torch

    # ZeRO-3 with the optimizer offloaded to host memory: the most partitioned state there is
    variants = [("zero3-offload", 3, "cpu")]
    results = run_distributed(_resume_runs, 4, _with_partitioned_zero3(tiny_dataset, tmp_path), str(tmp_path),
                              variants)[0]
    for name, _, _ in variants:
        got = results[name]
        assert any("optim_states" in f for f in got["files"]), f"{name}: no ZeRO partition files: {got['files']}"
        assert got["iteration"] == ITERS
        assert got["partitioned"] == 4 * 2 + 1, f"{name}: fc1, fc2 of 4 layers and the embedding: {got['partitioned']}"
        # the same arithmetic in the same order on the same state: equal, not just close
        assert got["resumed"] == got["whole"][2:], f"{name}: resumed {got['resumed']} vs {got['whole']}"
        for key, mask in got["whole_masks"].items():
            assert torch.equal(got["masks"][key], mask), f"{name}: masks {key}"
        nonzero = {k: v for k, v in got["masked_nonzero"].items() if k != "slots"}
        assert got["masked_nonzero"]["slots"] > 0 and not any(nonzero.values()), f"{name}: {nonzero}"
        tools = got["tools"]
        for step in ("convert", "shrink", "hf"):
            assert tools[step]["rc"] == 0, f"{name}: {step}: {tools[step]['out']}"
        assert "config.json" in tools["hf_files"], tools["hf_files"]
        # the converted checkpoint carries weights, fp32 masters, Adam moments and step: the megatron
        # engine continues the DeepSpeed run's curve (the same maths in another order of sums)
        _close(got["megatron_continued"], got["whole"][2:], f"{name}: megatron from the converted checkpoint", 2)
        # and back: the megatron engine's own run, converted --to deepspeed, continues under ZeRO
        assert got["to_deepspeed"]["rc"] == 0, got["to_deepspeed"]["out"]
        _close(got["deepspeed_continued"], got["megatron_whole"][2:], f"{name}: DeepSpeed from --to deepspeed", 2)
        # the shrunk model with its sliced optimizer state computes what the masked one did, step after step
        assert got["shrunk_segments"] == 2 and got["shrunk_engine"], got
        assert got["shrunk"][:2] == got["whole"][:2]
        _close(got["shrunk"][2:], got["whole"][2:], f"{name}: in-run shrink vs masked", 2)


def _shrink_under(data: dict, root: str, stage: int) -> dict:
    """Rank worker: a masked ZeRO-``stage`` run, and the same run shrunk in-run after step 2."""
    import os

    from pretrain.run.segments import run

    cfg = _config(data, "deepspeed", stage)
    masked = run(cfg)
    out = {"masked": [h["loss"] for h in masked["history"]]}
    del masked
    shrunk = run(dataclasses.replace(
        cfg, prune=dataclasses.replace(cfg.prune, shrink_at=(2 * cfg.tokens_per_step(),)),
        checkpoint=dataclasses.replace(cfg.checkpoint, save=os.path.join(root, "inrun"), save_interval=None)))
    out.update(shrunk=[h["loss"] for h in shrunk["history"]], segments=len(shrunk.get("segments", [])))
    return out


def test_in_run_shrink_carries_sliced_adam_state_under_zero2(tiny_dataset, tmp_path):
    # ZeRO-1/2 keep AdamW state in fragment mappings (ZeRO-3's path is the test above): the
    # gathered, sliced and re-scattered masters and moments must continue the masked curve
    got = run_distributed(_shrink_under, 4, tiny_dataset, str(tmp_path), 2)[0]
    assert got["segments"] == 2, got
    assert got["shrunk"][:2] == got["masked"][:2]
    _close(got["shrunk"][2:], got["masked"][2:], "ZeRO-2 in-run shrink vs masked", 2)


def _round_trips(data: dict, runs: list) -> dict:
    """Rank worker: per (engine, ZeRO stage, bf16), a 2-step run, then its AdamW state gathered in
    model space, changed, scattered back into the engine and gathered again."""
    import torch

    from pretrain.engines.adam_state import adam_step, gather_from_engine, scatter_into_engine
    from pretrain.run.segments import run

    out = {}
    for engine, stage, bf16 in runs:
        cfg = _config(data, engine, stage)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, train_iters=2, bf16=bf16))
        trainer = run(cfg)["trainer"]
        before, step = gather_from_engine(trainer.optimizer, trainer.model_chunks)
        # masters apart from the weights (as in any bf16 run), moments apart from each other
        changed = {name: {"param": t["param"] + 0.5, "exp_avg": 2 * t["exp_avg"] + 0.25,
                          "exp_avg_sq": 3 * t["exp_avg_sq"] + 0.125} for name, t in before.items()}
        scatter_into_engine(trainer.optimizer, trainer.model_chunks, changed, step + 5)
        after, step_after = gather_from_engine(trainer.optimizer, trainer.model_chunks)
        out[(engine, stage, bf16)] = {
            "step": step, "step_after": step_after, "engine_step": adam_step(trainer.optimizer),
            "params": len(before), "worst": max(float((after[n][k] - changed[n][k]).abs().max())
                                                for n in changed for k in changed[n]),
            "moments_nonzero": all(bool(torch.count_nonzero(t["exp_avg_sq"])) for t in before.values())}
        del trainer
    return out


def test_adam_state_round_trips_through_every_engine(tiny_dataset, tmp_path):
    # what crosses engines and shrinks: each engine's masters, both moments and the step, read out
    # and written back exactly, fp32 and bf16 (whose masters are not the weights)
    runs = [("megatron", None, False), ("megatron", None, True), ("deepspeed", 1, True), ("deepspeed", 2, False),
            ("deepspeed", 3, True)]
    results = run_distributed(_round_trips, 4, _with_partitioned_zero3(tiny_dataset, tmp_path), runs)
    for rank, per_rank in enumerate(results):
        for run_key, got in per_rank.items():
            assert got["step"] == 2 and got["step_after"] == got["engine_step"] == 7, (rank, run_key, got)
            assert got["params"] > 0 and got["moments_nonzero"], (rank, run_key, got)
            assert got["worst"] == 0.0, f"rank {rank}, {run_key}: written and read back differ by {got['worst']}"


def _from_plain_optimizer(data: dict, root: str) -> dict:
    """Rank worker: a bf16 megatron-engine run with megatron-core's non-distributed optimizer
    (--no-use-distributed-optimizer: masters under "fp32_param", the step as "common_step") saving
    at step 2; a ZeRO-1 bf16 run started from that checkpoint directly (--load, no tool)."""
    import os
    import shutil

    import torch

    from pretrain.checkpoint import LATEST_FILE, atomic_write_text, iteration_dir
    from pretrain.run.segments import run

    save = os.path.join(root, "plain")
    cfg = _config(data, "megatron", None, use_distributed_optimizer=False)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=True),
                              checkpoint=dataclasses.replace(cfg.checkpoint, save=save, save_interval=2))
    whole = [h["loss"] for h in run(cfg)["history"]]
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(iteration_dir(save, 4))
        atomic_write_text(os.path.join(save, LATEST_FILE), "2")
    torch.distributed.barrier()
    continued = run(dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, engine="deepspeed", zero_stage=1),
        checkpoint=dataclasses.replace(cfg.checkpoint, load=save, save=None, save_interval=None)))
    return {"whole": whole, "continued": [h["loss"] for h in continued["history"]]}


def test_deepspeed_continues_a_non_distributed_optimizers_checkpoint(tiny_dataset, tmp_path):
    # bf16 on both engines: DeepSpeed reduces gradients in bf16, megatron-core in fp32 (measured loss
    # differences ~1e-5); losing the moments at the change would move step 4 by ~6e-3
    got = run_distributed(_from_plain_optimizer, 4, tiny_dataset, str(tmp_path))[0]
    _close(got["continued"], got["whole"][2:], "ZeRO-1 from --no-use-distributed-optimizer", 2, tolerance=1e-4)
