"""The single-GPU check of bench/gpu_check.sh: one table, also written as JSON.

    python bench/gpu_check.py [--out gpu_check.json] [--iters 8] [--layers N]

1. environment: torch, CUDA, GPU, Transformer Engine, apex, megatron-core, private names;
2. masked == shrunk logits under the spec this GPU gets (TE with separate mask-aware norms when
   TE imports, the local spec otherwise: the table says which ran), heads, FFN and hidden pruned;
3. bf16 + distributed optimizer: after pruning events, masked fp32 master weights, Adam moments
   and bf16 weights are all zero;
4. step time, tokens/s and MFU (6·N·tokens / time / peak) for smollm-1.7b- and 1B-shaped
   models, plain vs masked + saliency scoring every step;
5. the speed-up of an in-run shrink (tokens/s after vs before).
Needs CUDA: without it, exits 2 at once with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dense bf16 peak FLOP/s by GPU name (vendor data sheets, SXM parts); the first match wins
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12), ("4090", 165e12))


def peak_flops(gpu_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in gpu_name), None)


def mfu(params: int, tokens_per_second: float, peak: float | None) -> float | None:
    return None if not peak else 6 * params * tokens_per_second / peak


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("error: bench/gpu_check needs a CUDA GPU and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Run it on the GPU machine; nothing was measured.", file=sys.stderr)
        raise SystemExit(2)


def environment() -> dict:
    import torch

    def version(name):
        try:
            module = __import__(name)
            return getattr(module, "__version__", "importable")
        except Exception as err:  # TE/apex missing or broken: report, do not fail
            return f"absent ({type(err).__name__})"

    from megatron_patches.layer_specs import transformer_engine_available
    from megatron_patches.private_api import missing_names
    from megatron_patches.versions import installed_megatron_core_version

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "transformer_engine": version("transformer_engine"),
            "apex": version("apex"), "megatron_core": installed_megatron_core_version(),
            "te_usable": transformer_engine_available(),
            "private_names_missing": [e.target for e, _ in missing_names()]}


def _model_cfg(preset: str, seq: int, layers: int | None):
    from pretrain.config import MODEL_PRESETS, ModelConfig

    values = dict(MODEL_PRESETS[preset], seq_length=seq)
    if layers:
        values["num_layers"] = layers
    return ModelConfig(**values)


def masked_equals_shrunk(layers: int | None) -> dict:
    """Logits of a masked model vs the physically smaller one (fp32, TF32 off)."""
    import torch

    from pretrain.config import ParallelConfig, TrainConfig
    from pretrain.distributed import destroy_distributed, init_distributed, set_random_seed
    from pretrain.model.init import deterministic_init
    from pretrain.model.build import build_model
    from pretrain.pruning.masks import ModelShape, build_local_masks
    from pretrain.model.shrunk import shrink_parameter, shrunk_model_config, source_name

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    init_distributed(1, 1)
    set_random_seed(1)
    cfg = _model_cfg("smollm-135m", 256, layers or 4)
    vocab = 1024
    train = TrainConfig(seed=1)
    big = build_model(cfg, ParallelConfig(), train, vocab, wrap_ddp=False)[0]
    deterministic_init(big, 1, cfg.init_method_std, cfg.num_layers)
    shape = ModelShape.from_config(cfg, vocab)
    masks = shape.full_masks()
    g = torch.Generator().manual_seed(0)
    masks.heads[:, 1] = False  # one query group of three in every layer (uniform)
    for layer in range(cfg.num_layers):
        masks.ffn[layer, torch.randperm(shape.ffn, generator=g)[:512]] = False
    masks.hidden[torch.randperm(shape.hidden, generator=g)[:64]] = False
    local = build_local_masks([big], masks, shape)
    local.apply_to_weights()
    small_cfg = shrunk_model_config(cfg, masks, shape)
    small = build_model(small_cfg, ParallelConfig(), train, vocab, wrap_ddp=False)[0]
    big_params = dict(big.named_parameters())
    with torch.no_grad():
        for name, p in small.named_parameters():
            source = source_name(name, masks)
            p.copy_(shrink_parameter(source, big_params[source].detach().cpu(), masks, shape).to(p.device))
    tokens = torch.randint(0, vocab, (2, cfg.seq_length), generator=g).cuda()
    position = torch.arange(cfg.seq_length, device="cuda").expand(2, -1)
    with torch.no_grad():
        a, b = big.eval()(tokens, position, None), small.eval()(tokens, position, None)
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    destroy_distributed()
    return {"spec": big.spec_kind, "max_abs_diff": diff, "logit_scale": scale, "ok": diff <= 2e-3 * max(scale, 1)}


def _train_cfg(model_cfg, iters: int, mbs: int, prune: bool, bf16: bool = True, **prune_kw):
    from pretrain.config import DataConfig, OptimConfig, ParallelConfig, PretrainConfig, TrainConfig

    c = PretrainConfig(model=model_cfg, parallel=ParallelConfig(), data=DataConfig(mock_data=True, split="100,0,0"),
                       optim=OptimConfig(lr=1e-4, min_lr=1e-5),
                       train=TrainConfig(micro_batch_size=mbs, global_batch_size=mbs, train_iters=iters,
                                         log_interval=iters, bf16=bf16))
    if prune:
        # one event at step 2 (masks set), then scoring every step, no further events
        c.prune = dataclasses.replace(c.prune, target_ratio=0.9, saliency="taylor", interval=2, start_tokens=0,
                                      end_tokens=10**15, **prune_kw)
    return c


def bf16_masked_state(layers: int | None) -> dict:
    """Masked master weights, Adam moments and bf16 weights stay zero (distributed optimizer)."""
    from pretrain.engines.slots import iter_param_slots
    from pretrain.run.segments import run

    cfg = _train_cfg(_model_cfg("smollm-135m", 512, layers or 6), 8, 4, prune=True)
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.6, end_tokens=6 * 4 * 512)
    summary = run(cfg)
    pruner = next(c for c in summary["trainer"].callbacks if c.name == "pruning")
    bad, checked = [], 0
    for slot in iter_param_slots(summary["trainer"].optimizer):
        mask = pruner.local.param_masks.get(slot.param)
        if mask is None or slot.end <= slot.start:
            continue
        dropped = ~mask.reshape(-1)[slot.start:slot.end]
        for name, t in [("main", slot.main_param)] + list(slot.state.items()):
            if name != "step" and t is not None:
                checked += int(dropped.sum())
                bad += [name] if bool((t.reshape(-1)[dropped] != 0).any()) else []
    for param, mask in pruner.local.param_masks.items():
        bad += ["param"] if bool((param.detach()[~mask] != 0).any()) else []
    dtype = str(next(summary["trainer"].model_chunks[0].parameters()).dtype)
    return {"dtype": dtype, "events": len(pruner.history), "checked": checked, "bad": sorted(set(bad)),
            "ok": checked > 0 and not bad and dtype == "torch.bfloat16"}


def throughput(preset: str, layers: int | None, iters: int, mbs: int, seq: int, peak: float | None) -> list[dict]:
    from pretrain.run.segments import run

    model_cfg = _model_cfg(preset, seq, layers)
    rows = []
    for label, prune in (("plain", False), ("masked+saliency", True)):
        summary = run(_train_cfg(model_cfg, iters, mbs, prune))
        steps = [h["step_seconds"] for h in summary["history"][2:]]
        step = statistics.median(steps)
        tps = mbs * seq / step
        rows.append({"model": preset + (f" ({layers} layers)" if layers else ""), "mode": label,
                     "params": summary["params"], "step_ms": step * 1000, "tokens_per_s": tps,
                     "mfu": mfu(summary["params"], tps, peak)})
    rows[1]["ratio_to_plain"] = rows[1]["step_ms"] / rows[0]["step_ms"]
    return rows


def shrink_speedup(layers: int | None, iters: int, seq: int) -> dict:
    from pretrain.run.segments import run

    with tempfile.TemporaryDirectory() as save:
        cfg = _train_cfg(_model_cfg("smollm-360m", seq, layers), iters, 4, prune=True)
        tokens_per_step = 4 * seq
        cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.5, interval=1, end_tokens=3 * tokens_per_step,
                                        shrink_at=(4 * tokens_per_step,))
        cfg.checkpoint = dataclasses.replace(cfg.checkpoint, save=save)
        summary = run(cfg)
    segments = summary.get("segments") or []
    if len(segments) < 2:
        return {"ok": False, "note": "no shrink happened"}
    before, after = segments[0]["tokens_per_second"]["end"], segments[1]["tokens_per_second"]["start"]
    return {"params_before": segments[0]["params"], "params_after": segments[1]["params"],
            "tokens_per_s_before": before, "tokens_per_s_after": after, "speedup": after / max(before, 1e-9),
            "ok": True}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(report: dict) -> None:
    print("\n== bench/gpu_check ==")
    for key, value in report["environment"].items():
        print(f"  {key:24s} {_fmt(value)}")
    for section in ("masked_equals_shrunk", "bf16_masked_state", "shrink"):
        print(f"  {section:24s} " + ", ".join(f"{k}={_fmt(v)}" for k, v in report[section].items()))
    print(f"  {'model':28s} {'mode':16s} {'params':>12s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'ratio':>6s}")
    for row in report["throughput"]:
        print(f"  {row['model']:28s} {row['mode']:16s} {row['params']:12,d} {row['step_ms']:9.1f} "
              f"{row['tokens_per_s']:10,.0f} {_fmt(row['mfu']):>6s} {_fmt(row.get('ratio_to_plain', '')):>6s}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--layers", type=int, default=None, help="cut every throughput model to N layers (time)")
    args = p.parse_args(argv)
    require_cuda()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    start = time.time()
    report = {"environment": environment()}
    peak = peak_flops(report["environment"]["gpu"])
    report["environment"]["peak_bf16_flops"] = peak
    report["masked_equals_shrunk"] = masked_equals_shrunk(None)
    report["bf16_masked_state"] = bf16_masked_state(None)
    report["throughput"] = []
    for preset in ("smollm-1.7b", "llama-3.2-1b"):
        report["throughput"] += throughput(preset, args.layers, args.iters, args.micro_batch_size,
                                           args.seq_length, peak)
    report["shrink"] = shrink_speedup(args.layers, 12, 1024)
    report["seconds"] = time.time() - start
    print_table(report)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, args.out)
    print(f"written: {args.out} ({report['seconds']:.0f} s)")
    ok = report["masked_equals_shrunk"]["ok"] and report["bf16_masked_state"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
