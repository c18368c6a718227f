"""tools/reshard_checkpoint.py: the shrunk model continues the masked run's loss curve; Adam
moments of kept weights are carried exactly; layouts change; bad inputs are refused."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config, losses_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS_PER_STEP = 8 * 64


def _cfg(data, granularity="uniform", **kw):
    cfg = debug_config(data, **kw)
    cfg.prune = dataclasses.replace(cfg.prune, target_ratio=0.55, interval=2, start_tokens=0,
                                    end_tokens=6 * TOKENS_PER_STEP, granularity=granularity,
                                    # vector form prunes hidden channels of this tiny model too: the
                                    # shrunk shape (hidden < 128) is what these tests look for
                                    taylor_form="vector")
    return cfg


def masked_worker(data, root, tp, pp):
    from pretrain.run.segments import run

    # pruning ends at step 6; save at 8 and keep going to 12 on the masked model
    full = run(_cfg(data, tp=tp, pp=pp, iters=12, save=f"{root}/masked", save_interval=8))
    return {"losses": losses_of(full)}


def shrink_worker(root, target_tp):
    from pretrain.shrink import reshard_checkpoint

    r = reshard_checkpoint(f"{root}/masked/iter_0000008", f"{root}/small", shrink=True,
                           target_tp=target_tp, progress=False)
    return {"params_before": r["params_before"], "params_after": r["params_after"],
            "model": dataclasses.asdict(r["config"].model)}


def resume_worker(data, root, tp, pp):
    from pretrain.run.segments import run

    cfg = _cfg(data, tp=tp, pp=pp, iters=12, load=f"{root}/small")
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, use_checkpoint_args=True)
    small = run(cfg)
    return {"losses": losses_of(small), "params": sum(p.numel() for p in small["trainer"].model_chunks[0].parameters())}


def _build(cfg, vocab):
    from pretrain.model.build import build_model
    from pretrain.engines.optim import build_optimizer

    single = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    chunks = build_model(cfg.model, single, cfg.train, vocab)
    return chunks, build_optimizer(chunks, cfg.optim, single, cfg.train)


def moments_worker(root, masked="masked/iter_0000008", small="small/iter_0000008"):
    """Adam moments and fp32 weights of the small model equal the kept entries of the masked
    model's (read back through megatron-core's loader, not through the shrink's own reader)."""
    from pretrain import checkpoint as ckpt
    from pretrain.config import PretrainConfig
    from pretrain.distributed import init_distributed
    from pretrain.model.build import unwrap
    from pretrain.pruning.masks import GroupMasks
    from pretrain.engines.slots import iter_param_slots
    from pretrain.shrink import _shape_of
    from pretrain.model.shrunk import shrink_parameter, source_name

    init_distributed(1, 1)
    out = []
    states = {}
    for name in (masked, small):
        folder = f"{root}/{name}"
        ts = ckpt.read_trainer_state(folder)
        cfg = PretrainConfig.from_dict(ts["config"])
        chunks, opt = _build(cfg, ts["vocab_size"])
        ckpt.load_checkpoint(folder, chunks, opt)
        names = {p: n for n, p in unwrap(chunks[0]).named_parameters()}
        states[name] = ({names[s.param]: (s.param.shape, {**s.state, "main_param": s.main_param, "param": s.param})
                         for s in iter_param_slots(opt)}, ts, cfg)
    big, ts_big, cfg_big = states[masked]
    small, _, _ = states[small]
    masks = GroupMasks.from_state_dict(ts_big["callbacks"]["pruning"]["masks"])
    shape = _shape_of(cfg_big, ts_big["vocab_size"])
    for name, (shape_small, st_small) in small.items():
        source = source_name(name, masks)
        shape_big, st_big = big[source]
        for key in ("exp_avg", "exp_avg_sq", "main_param", "param"):
            if st_small.get(key) is None:
                continue
            expected = shrink_parameter(source, st_big[key].detach().view(shape_big), masks, shape)
            out.append(bool(torch.equal(expected.reshape(-1), st_small[key].detach().reshape(-1))))
        out.append(float(st_big["step"]) == float(st_small["step"]))
    return out


def test_shrink_continues_the_masked_run(tiny_dataset, tmp_path):
    root = str(tmp_path)
    masked = run_distributed(masked_worker, 4, tiny_dataset, root, 2, 2)[0]
    info = run_distributed(shrink_worker, 1, root, 2)[0]
    assert info["params_after"] < 0.6 * info["params_before"]
    # continue on the small model with another layout: TP=2 x PP=1 on 2 ranks
    small = run_distributed(resume_worker, 2, tiny_dataset, root, 2, 1)[0]
    assert len(small["losses"]) == 4
    for a, b in zip(small["losses"], masked["losses"][8:]):
        assert abs(a - b) < 2e-4 * abs(b), (small["losses"], masked["losses"][8:])
    assert all(run_distributed(moments_worker, 1, root)[0])


def drop_layer_worker(data, root):
    """A masked checkpoint whose layer 1 is dropped (layers renumbered, stacked keys rewritten),
    of a model with q/k/v biases (their rows are cut with the weights')."""
    import shutil

    from pretrain import checkpoint as ckpt
    from pretrain.pruning.masks import GroupMasks
    from pretrain.run.segments import run

    run(_cfg(data, iters=4, save=f"{root}/run", save_interval=4, num_layers=3, add_qkv_bias=True))
    source = f"{root}/run/iter_0000004"
    tmp = f"{root}/edited/iter_0000004.tmp"
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("manifest.json"))
    state = ckpt.read_trainer_state(source)
    masks = GroupMasks.from_state_dict(state["callbacks"]["pruning"]["masks"])
    masks.layers[1] = False
    masks.heads[1] = False
    masks.ffn[1] = False
    state["callbacks"]["pruning"]["masks"] = masks.state_dict()
    torch.save(state, f"{tmp}/{ckpt.TRAINER_STATE}")
    ckpt.publish_checkpoint(f"{root}/edited", 4, tmp)
    return 0


def shrink_only_worker(load, save):
    from pretrain.shrink import reshard_checkpoint

    r = reshard_checkpoint(load, save, shrink=True, progress=False, max_file_bytes=2**16)
    return {"layers": r["config"].model.num_layers, "params": (r["params_before"], r["params_after"])}


def perplexity_of(data, load):
    from pretrain.evaluate import evaluate_perplexity

    return evaluate_perplexity(load, [data["prefix"]], max_samples=16)["loss"]


def test_dropped_layer_shrinks_to_the_same_model(tiny_dataset, tmp_path):
    """Masked (layer 1 of 3 dropped) and shrunk checkpoints give the same held-out loss; weights,
    fp32 masters and Adam moments of the kept layers are carried exactly (checked through
    megatron-core's loader); the output is split into several files (small max_file_bytes)."""
    root = str(tmp_path)
    run_distributed(drop_layer_worker, 1, tiny_dataset, root)
    info = run_distributed(shrink_only_worker, 1, f"{root}/edited", f"{root}/small")[0]
    assert info["layers"] == 2 and info["params"][1] < info["params"][0]
    assert len([f for f in os.listdir(tmp_path / "small/iter_0000004/model_optim") if f.endswith(".distcp")]) > 3
    masked = run_distributed(perplexity_of, 1, tiny_dataset, f"{root}/edited")[0]
    small = run_distributed(perplexity_of, 1, tiny_dataset, f"{root}/small")[0]
    assert abs(masked - small) < 1e-5 * masked, (masked, small)
    checks = run_distributed(moments_worker, 1, root, "edited/iter_0000004", "small/iter_0000004")[0]
    assert checks and all(checks)


def refuse_worker(data, root):
    from pretrain.shrink import ShrinkError, reshard_checkpoint
    from pretrain.run.segments import run

    run(_cfg(data, iters=6, save=f"{root}/pruned"))
    cfg = debug_config(data, iters=2, save=f"{root}/plain")
    run(cfg)
    messages = []
    for args in [(f"{root}/pruned", f"{root}/pruned", True, None), (f"{root}/plain", f"{root}/y", True, None),
                 (f"{root}/plain", f"{root}/z", False, 3), (f"{root}/nothing", f"{root}/w", True, None)]:
        try:
            reshard_checkpoint(*args, progress=False)
            messages.append("no error")
        except ShrinkError as err:
            messages.append(str(err))
    return messages


def test_bad_inputs_are_refused(tiny_dataset, tmp_path):
    msgs = run_distributed(refuse_worker, 1, tiny_dataset, str(tmp_path))[0]
    assert "--save must differ from --load" in msgs[0]
    assert "no pruning state" in msgs[1]
    assert "does not fit TP=3" in msgs[2]
    assert "no valid checkpoint" in msgs[3]
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "z")
    cli = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "reshard_checkpoint.py"), "--load",
                          str(tmp_path / "plain"), "--save", str(tmp_path / "q"), "--shrink"],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "error:" in cli.stderr and "Traceback" not in cli.stderr


def inrun_worker(data, root):
    from pretrain.run.segments import run

    def cfg(shrink: bool, save: str):
        c = _cfg(data, tp=2, iters=10, save=save, save_interval=100)
        c.prune = dataclasses.replace(c.prune, shrink_auto=shrink)
        return c

    masked = run(cfg(False, f"{root}/m"))
    shrunk = run(cfg(True, f"{root}/s"))
    # resuming the shrunk run with the flags that started it adopts the checkpoint's smaller shape
    more = cfg(True, f"{root}/s")
    more.train = dataclasses.replace(more.train, train_iters=12)
    # two more iterations at the end of the checkpoint's schedule (a longer run must say which)
    more.checkpoint = dataclasses.replace(more.checkpoint, load=f"{root}/s", use_checkpoint_opt_param_scheduler=True)
    resumed = run(more)
    return {"masked": losses_of(masked), "shrunk": losses_of(shrunk), "segments": shrunk.get("segments"),
            "final_hidden": shrunk["trainer"].config.model.hidden_size,
            "resumed_hidden": resumed["trainer"].config.model.hidden_size,
            "resumed_iters": [h["iteration"] for h in resumed["history"]]}


def test_in_run_shrink_continues_the_curve(tiny_dataset, tmp_path):
    res = run_distributed(inrun_worker, 2, tiny_dataset, str(tmp_path))[0]
    assert res["segments"] and len(res["segments"]) == 2, res
    assert res["segments"][1]["params"] < res["segments"][0]["params"] or res["final_hidden"] < 128
    assert len(res["shrunk"]) == len(res["masked"]) == 10
    for a, b in zip(res["shrunk"], res["masked"]):
        assert abs(a - b) < 2e-4 * abs(b), (res["shrunk"], res["masked"])
    assert os.path.isdir(tmp_path / "s" / "shrunk_iter_0000006")
    assert res["resumed_hidden"] == res["final_hidden"] < 128 and res["resumed_iters"] == [11, 12]


def layout_change_worker(data, root):
    """In-run shrink that continues on another layout in the same processes (TP=2 -> TP=1, DP=2)."""
    from pretrain.run.segments import run

    def cfg(shrink: bool, save: str):
        c = _cfg(data, tp=2, iters=10, save=save, save_interval=100)
        c.prune = dataclasses.replace(c.prune, shrink_auto=shrink, shrink_tensor_parallel_size=1 if shrink else None)
        return c

    masked = run(cfg(False, f"{root}/m"))
    shrunk = run(cfg(True, f"{root}/s"))
    return {"masked": losses_of(masked), "shrunk": losses_of(shrunk), "segments": shrunk.get("segments"),
            "layout": shrunk["layout"]}


def test_in_run_shrink_can_continue_on_another_layout(tiny_dataset, tmp_path):
    res = run_distributed(layout_change_worker, 2, tiny_dataset, str(tmp_path))[0]
    assert res["segments"] and len(res["segments"]) == 2, res
    assert res["layout"]["tp_size"] == 1 and res["layout"]["dp_size"] == 2, res["layout"]
    assert len(res["shrunk"]) == len(res["masked"]) == 10
    for a, b in zip(res["shrunk"], res["masked"]):
        assert abs(a - b) < 2e-4 * abs(b), (res["shrunk"], res["masked"])


def per_layer_worker(data, root):
    """Per-layer pruning, shrunk in-run several times into heterogeneous models (TP=2)."""
    from pretrain.run.segments import run

    def cfg(shrink: bool, save: str, iters: int = 10):
        c = _cfg(data, tp=2, iters=iters, save=save, save_interval=100, granularity="per-layer")
        c.prune = dataclasses.replace(c.prune, shrink_auto=shrink,
                                      shrink_every_fraction=0.2 if shrink else None)
        return c

    masked = run(cfg(False, f"{root}/m"))
    shrunk = run(cfg(True, f"{root}/s"))
    more = cfg(True, f"{root}/s", iters=12)
    # two more iterations at the end of the checkpoint's schedule (a longer run must say which)
    more.checkpoint = dataclasses.replace(more.checkpoint, load=f"{root}/s", use_checkpoint_opt_param_scheduler=True)
    resumed = run(more)
    model = shrunk["trainer"].config.model
    return {"masked": losses_of(masked), "shrunk": losses_of(shrunk), "segments": shrunk.get("segments"),
            "layer_shapes": model.layer_shapes, "resumed_iters": [h["iteration"] for h in resumed["history"]],
            "resumed_shapes": resumed["trainer"].config.model.layer_shapes}


def test_per_layer_shrinks_into_heterogeneous_models(tiny_dataset, tmp_path):
    res = run_distributed(per_layer_worker, 2, tiny_dataset, str(tmp_path))[0]
    assert res["segments"] and len(res["segments"]) >= 3, res["segments"]  # shrunk at least twice
    widths = {(s["num_query_groups"], s["ffn_hidden_size"]) for s in res["layer_shapes"]}
    assert len(widths) > 1, res["layer_shapes"]  # really heterogeneous
    for a, b in zip(res["shrunk"], res["masked"]):
        assert abs(a - b) < 3e-4 * abs(b), (res["shrunk"], res["masked"])
    assert res["resumed_iters"] == [11, 12] and res["resumed_shapes"] == res["layer_shapes"]
