"""Does OBS compensation at each pruning event help? (issue 16) A pruning run without and with
``--prune-compensation obs`` on the built-in corpus, from one common trained start.

    python bench/compensation.py [--start-iters 100] [--iters 120] [--interval 6] [--target-ratio 0.5]
    python bench/compensation.py --real /tmp/saliency_real [--calibration-batches 16]

One debug model is first trained ``--start-iters`` steps without pruning (compensation refits
surviving weights from correlated features, which a random initialisation does not have); every
arm then continues from that checkpoint with the same data order and prunes to the target over
the first two thirds of ``--iters``. Arms: ``none``; ``obs`` with the Hessian of the event's own
step (window 1, the default); ``obs`` with the Hessian of the last ``--interval`` steps.

Per arm: the held-out loss just before and just after each event on the same fixed sequences
(a test split of built-in documents the runs never train on), so the jump of one arm compares to
the other's on the same batches; the held-out loss at the end; the compensation's extra seconds
and the Hessian memory per event; the relative output reconstruction error of the updated
linears on the captured inputs without / with the update (mean over events).

``--real WORK_DIR``: one-shot pruning of a real pretrained model instead (SmolLM2-135M, prepared
and cached by ``bench/saliency_real.py`` in the same work dir), no recovery: obs saliency from a
few scoring batches, the masks of each target and allocation, then the held-out loss of the
masked parent with and without the update (the Hessians from ``--calibration-batches`` batches of
4 x 256 tokens of the scoring documents, SparseGPT's calibration set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tiny_corpus import build_tiny_corpus  # noqa: E402



def _worker(data: dict, start_iters: int, iters: int, interval: int, ratio: float, eval_batches: int,
            root: str, seed: int = 1) -> dict:
    import dataclasses

    from pretrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 PretrainConfig, TrainConfig, MODEL_PRESETS)
    from pretrain.pruning.callback import PruningCallback
    from pretrain.run.segments import run

    def config(train_iters: int, load: str | None = None, save: str | None = None):
        return PretrainConfig(
            model=ModelConfig(**MODEL_PRESETS["debug"]), parallel=ParallelConfig(),
            data=DataConfig(data_path=[data["train"]], tokenizer_model=data["tokenizer"], split="100,0,0",
                            test_data_path=[data["held_out"]]),
            optim=OptimConfig(lr=2e-3, min_lr=2e-4, lr_warmup_iters=5),
            train=TrainConfig(micro_batch_size=4, global_batch_size=8, train_iters=train_iters, seed=seed,
                              log_interval=10**6),
            checkpoint=CheckpointConfig(load=load, save=save, save_interval=train_iters if save else None))

    run(config(start_iters, save=f"{root}/start"))
    events: list = []
    original = PruningCallback.prune_event

    def probed(self, trainer, iteration, tokens):
        """The held-out loss on the same sequences just before and just after the event."""
        params = self.current_params()
        before = trainer.evaluate_test(eval_batches)
        original(self, trainer, iteration, tokens)
        if self.current_params() < params:
            record = self.history[-1]
            events.append({"iteration": iteration, "before": before, "after": trainer.evaluate_test(eval_batches),
                           "compensation": record.get("compensation")})

    PruningCallback.prune_event = probed
    arms = {"none": ("none", 1), "obs (window 1)": ("obs", 1), f"obs (window {interval})": ("obs", interval)}
    out = {}
    for name, (compensation, window) in arms.items():
        events.clear()
        cfg = config(start_iters + iters, load=f"{root}/start")
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        cfg.prune = dataclasses.replace(
            cfg.prune, target_ratio=ratio, interval=interval, saliency="fisher",
            start_tokens=start_iters * tokens_per_step,
            end_tokens=(start_iters + iters * 2 // 3) * tokens_per_step,
            compensation=compensation, compensation_window=window)
        began = time.time()
        summary = run(cfg)
        seconds = time.time() - began
        trainer = summary["trainer"]
        out[name] = {"events": [dict(e) for e in events], "final": trainer.evaluate_test(eval_batches),
                     "seconds": seconds, "params": next(c for c in trainer.callbacks if c.name == "pruning")
                     .current_params()}
    PruningCallback.prune_event = original
    return out


def _real_worker(ckpt: str, hf_dir: str, data: dict, calibration: int, eval_batches: int, damp: float,
                 seq_length: int = 256) -> list:
    import torch

    from bench.saliency_real import _config, _heldout_batches, _heldout_loss
    from pretrain.model.build import unwrap
    from pretrain.pruning.compensation import Compensator
    from pretrain.pruning.masks import GroupScores, build_local_masks
    from pretrain.pruning.solver import SolverConstraints, solve
    from pretrain.run.segments import run

    summary = run(_config(ckpt, hf_dir, data, "obs", 2, seq_length))
    pruner = next(c for c in summary["trainer"].callbacks if c.name == "pruning")
    chunks = summary["trainer"].model_chunks
    model = unwrap(chunks[0])
    model.eval()
    parent = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
    shape, table = pruner.shape, pruner.ema
    heldout = _heldout_batches(data["heldout"], seq_length, eval_batches)
    compensator = Compensator(shape, chunks, None, ("heads", "ffn", "hidden"), damp)
    began = time.time()
    compensator.begin_capture()
    with torch.no_grad():
        for batch in _heldout_batches(data["score"], seq_length, calibration):
            model(batch[:, :-1], torch.arange(seq_length).expand(batch.shape[0], seq_length), None)
    compensator.end_capture()
    captured, capture_seconds = compensator.state_dict(), time.time() - began
    rows = [{"arm": "parent", "loss": _heldout_loss(model, heldout)}]
    print(json.dumps(rows[-1]), flush=True)
    for ratio in (0.7, 0.5):
        for allocation in ("global", "proportional"):
            c = SolverConstraints(align=64, granularity="uniform", allocation=allocation, min_groups=1,
                                  max_step_fraction=1.0)
            full = shape.full_masks()
            masks, _ = solve(shape, full, GroupScores(table.heads, table.ffn, table.hidden),
                             int(shape.parameter_count(full) * ratio), c)
            for compensation in ("none", "obs"):
                model.load_state_dict(parent, strict=False)
                record = None
                if compensation == "obs":
                    compensator.load_state_dict(captured)
                    record = compensator.compensate(full, masks)
                build_local_masks(chunks, masks, shape).apply_to_weights()
                rows.append({"arm": compensation, "ratio": ratio, "allocation": allocation,
                             "loss": _heldout_loss(model, heldout),
                             **{f"kept_{k}": float(getattr(masks, k).float().mean()) for k in ("heads", "ffn", "hidden")},
                             "seconds": record["seconds"] if record else 0.0,
                             "hessian_bytes": record["hessian_bytes"] if record else 0,
                             "error_by_role": record["error_by_role"] if record else None})
                print(json.dumps(rows[-1]), flush=True)
                build_local_masks(chunks, full, shape)  # the norms forget the hidden mask
    rows[0]["capture_seconds"] = capture_seconds
    return rows


def _real(work: str, calibration: int, eval_batches: int, damp: float) -> None:
    from bench.saliency_real import prepare_data, prepare_model
    from tests.dist_helper import run_distributed

    ckpt, hf_dir = prepare_model(work)
    data = prepare_data(work, hf_dir, 600)
    rows = run_distributed(_real_worker, 1, ckpt, hf_dir, data, calibration, eval_batches, damp)[0]
    print(f"\nSmolLM2-135M-Instruct, one shot, no recovery; obs saliency; Hessians from {calibration} x 4 x 256 "
          f"calibration tokens ({rows[0]['capture_seconds']:.0f} s to capture); damping {damp}\n")
    print(f"parent held-out loss {rows[0]['loss']:.3f}\n")
    print("| target | allocation | kept heads / FFN / hidden | held-out loss, none | with obs | "
          "compensation s | Hessian MiB | output error without -> with |")
    print("|---|---|---|---|---|---|---|---|")
    for plain, comp in zip(rows[1::2], rows[2::2]):
        errors = ", ".join(f"{k} {v[0]:.3f}->{v[1]:.3f}" for k, v in sorted(comp["error_by_role"].items()))
        print(f"| {plain['ratio']:.0%} | {plain['allocation']} | {plain['kept_heads']:.0%} / {plain['kept_ffn']:.0%} / "
              f"{plain['kept_hidden']:.0%} | {plain['loss']:.3f} | {comp['loss']:.3f} | {comp['seconds']:.1f} | "
              f"{comp['hessian_bytes'] / 2**20:.0f} | {errors} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start-iters", type=int, default=100, help="training steps before pruning (the common start)")
    p.add_argument("--iters", type=int, default=120, help="steps of each arm (pruning in the first two thirds)")
    p.add_argument("--interval", type=int, default=6, help="steps between pruning events")
    p.add_argument("--target-ratio", type=float, default=0.5)
    p.add_argument("--documents", type=int, default=1500, help="built-in documents to train on")
    p.add_argument("--held-out", type=int, default=150, help="further built-in documents for the held-out loss")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out global batches per loss")
    p.add_argument("--seed", type=int, default=1, help="initialisation and data order")
    p.add_argument("--real", metavar="WORK_DIR", help="one-shot pruning of SmolLM2-135M instead (see above)")
    p.add_argument("--calibration-batches", type=int, default=16, help="--real: batches of 4 x 256 tokens for H")
    p.add_argument("--damp", type=float, default=0.01, help="--real: --prune-compensation-damp")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if args.real:
        _real(args.real, args.calibration_batches, args.eval_batches, args.damp)
        return
    from tests.dist_helper import run_distributed

    with tempfile.TemporaryDirectory() as root:
        data = build_tiny_corpus(root, args.documents, args.held_out)
        arms = run_distributed(_worker, 1, data, args.start_iters, args.iters, args.interval, args.target_ratio,
                               args.eval_batches, root, args.seed)[0]
    print(f"\ndebug model (seed {args.seed}), {args.start_iters} steps of training, then {args.iters} steps pruning to "
          f"{args.target_ratio} of the parameters every {args.interval} steps (fisher saliency)\n")
    print("| arm | events | held-out jump per event, mean (max) | held-out loss at end | "
          "compensation s/event | Hessian MiB/event | output error without -> with |")
    print("|---|---|---|---|---|---|---|")
    for name, arm in arms.items():
        jumps = [e["after"] - e["before"] for e in arm["events"]]
        comp = [e["compensation"] for e in arm["events"] if e["compensation"]]
        seconds = f"{statistics.mean(c['seconds'] for c in comp):.3f}" if comp else "-"
        memory = f"{max(c['hessian_bytes'] for c in comp) / 2**20:.2f}" if comp else "-"
        if comp:
            pairs = [v for c in comp for v in c["linears"].values()]
            error = f"{statistics.mean(v[0] for v in pairs):.3f} -> {statistics.mean(v[1] for v in pairs):.3f}"
        else:
            error = "-"
        print(f"| {name} | {len(jumps)} | {statistics.mean(jumps):+.4f} ({max(jumps):+.4f}) | {arm['final']:.4f} | "
              f"{seconds} | {memory} | {error} |")
    print("\nper event (held-out loss before -> after):")
    for name, arm in arms.items():
        print(f"  {name}: " + ", ".join(f"{e['before']:.3f}->{e['after']:.3f}" for e in arm["events"]))
    print("\nrun wall seconds per arm: " + ", ".join(f"{n} {a['seconds']:.1f}" for n, a in arms.items()))


if __name__ == "__main__":
    main()
