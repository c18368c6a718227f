"""Distillation from a frozen teacher (issue 19): the vocab-parallel KL and its gradient are exact,
α = 0 changes nothing, a student equal to its teacher has KL 0, the KL and the whole step agree
across TP/PP layouts, and KD + pruning + in-run shrink + resume continues exactly; a student
distilling from its own parent prunes what CE training would (issue 28: saliency from the CE)."""

import dataclasses
import math

import pytest
import torch

from pretrain.config import ConfigError, DistillConfig, PruneConfig
from pretrain.distill import vocab_parallel_kl
from tests.dist_helper import run_distributed
from tests.pretrain.common import debug_config


def _reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_kl_and_its_gradient_match_the_full_softmax():
    torch.manual_seed(0)
    student = (3 * torch.randn(2, 5, 37, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 37, dtype=torch.float64)
    for temperature in (1.0, 2.5):
        ours = vocab_parallel_kl(student, teacher, temperature)
        ref = _reference_kl(student, teacher, temperature)
        assert torch.allclose(ours, ref, atol=1e-12)
        weights = torch.rand_like(ref)
        (g_ours,) = torch.autograd.grad((ours * weights).sum(), student)
        (g_ref,) = torch.autograd.grad((ref * weights).sum(), student)
        assert torch.allclose(g_ours, g_ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: vocab_parallel_kl(s, teacher, 1.7), (student,))
    # the student equal to the teacher: KL 0 and no gradient
    same = vocab_parallel_kl(teacher.clone().requires_grad_(), teacher, 2.0)
    assert same.abs().max() < 1e-12
    # bf16 logits: computed in fp32, the gradient comes back in the student's dtype
    s16 = student.detach().to(torch.bfloat16).requires_grad_()
    kl16 = vocab_parallel_kl(s16, teacher.to(torch.bfloat16), 1.0)
    kl16.sum().backward()
    assert kl16.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16


def test_kl_over_a_padded_vocabulary_is_the_kl_over_the_real_one():
    """Issue 31 item 4: padded logits are -inf in student and teacher (pretrain.model.build.mask_padded_logits);
    the KL and its gradient are those of the unpadded vocabulary, finite (not 0 * inf = NaN)."""
    torch.manual_seed(1)
    real, padded = 37, 40
    student = 3 * torch.randn(2, 5, padded, dtype=torch.float64)
    teacher = 3 * torch.randn(2, 5, padded, dtype=torch.float64)
    student[..., real:] = teacher[..., real:] = float("-inf")
    student.requires_grad_()
    for temperature in (1.0, 0.5):
        ours = vocab_parallel_kl(student, teacher, temperature)
        ref = _reference_kl(student[..., :real], teacher[..., :real], temperature)
        assert torch.allclose(ours, ref, atol=1e-12)
        (grad,) = torch.autograd.grad(ours.sum(), student)
        (g_ref,) = torch.autograd.grad(ref.sum(), student)
        assert torch.allclose(grad[..., :real], g_ref[..., :real], atol=1e-12) and not grad[..., real:].any()


def test_kd_flags_are_checked():
    with pytest.raises(ConfigError, match=r"--kd-weight 1.5: must be in \[0, 1\]"):
        DistillConfig(teacher="t", weight=1.5).validate()
    with pytest.raises(ConfigError, match="--kd-weight -0.1"):
        DistillConfig(teacher="t", weight=-0.1).validate()
    with pytest.raises(ConfigError, match="--kd-temperature 0"):
        DistillConfig(teacher="t", temperature=0).validate()
    with pytest.raises(ConfigError, match="--kd-until-tokens 0"):
        DistillConfig(teacher="t", until_tokens=0).validate()
    with pytest.raises(ConfigError, match="--kd-weight given without --kd-teacher"):
        DistillConfig(weight=0.5).validate()
    DistillConfig(teacher="t", weight=0.0, temperature=2.0, until_tokens=10).validate()


def test_a_per_layer_shrunk_teacher_is_taken_and_a_pruned_one_refused(tmp_path):
    """Issue 30: the teacher check is ``PruningState.removes_groups``, the one rule. A per-layer
    shrink stores masks that are False past each narrower layer's width (entries that do not
    exist), so a rule of "any False mask" refused such a teacher as pruned but not shrunk. The
    checkpoints are trainer states only, made by the shrink's own functions: the check reads no weight."""
    from pretrain import checkpoint as ckpt
    from pretrain.distill import resolve_teacher
    from pretrain.model.shape import ModelShape
    from pretrain.pruning.state import PruningState
    from pretrain.shrink import _new_trainer_state, _target_config

    vocab = 256
    cfg = debug_config({"prefix": str(tmp_path / "data"), "tokenizer": None})
    shape = ModelShape.from_config(cfg.model, vocab)
    pruning = PruningState.fresh(shape, None, 0.5)
    pruning.masks.heads[0, 1] = False  # layer 0 keeps 1 of 2 query groups, layer 1 half its FFN
    pruning.masks.ffn[1, 192:] = False
    pruned = {"iteration": 3, "vocab_size": vocab, "config": cfg.to_dict(), "callbacks": {"pruning": pruning.to_dict()}}
    shrunk_cfg = _target_config(cfg, pruning.masks, shape, vocab, None, None)
    shrunk = _new_trainer_state(pruned, cfg, shrunk_cfg, pruning, shape)
    assert shrunk_cfg.model.layer_shapes and not bool(shrunk["callbacks"]["pruning"]["masks"]["heads"].all())
    for name, state in (("pruned", pruned), ("shrunk", shrunk)):
        tmp = tmp_path / name / "iter_0000003.tmp"
        tmp.mkdir(parents=True)
        torch.save(state, tmp / ckpt.TRAINER_STATE)
        ckpt.publish_checkpoint(str(tmp_path / name), 3, str(tmp))

    def teacher_of(folder: str):
        return resolve_teacher(dataclasses.replace(cfg, distill=DistillConfig(teacher=folder)), vocab, None, 1)

    assert teacher_of(str(tmp_path / "shrunk")).model.layer_shapes == shrunk_cfg.model.layer_shapes
    with pytest.raises(ConfigError, match="its weights carry pruning masks with removed groups; shrink it first"):
        teacher_of(str(tmp_path / "pruned"))


def _split_kl_worker(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float):
    torch.distributed.init_process_group("gloo")  # the two ranks are one TP group
    rank, part = torch.distributed.get_rank(), student.shape[-1] // 2
    local = student[..., rank * part:(rank + 1) * part].clone().requires_grad_()
    kl = vocab_parallel_kl(local, teacher[..., rank * part:(rank + 1) * part], temperature,
                           torch.distributed.group.WORLD)
    (kl * weights).sum().backward()
    return kl.detach(), local.grad


@pytest.mark.distributed
def test_vocab_parallel_kl_at_tp2_equals_tp1():
    torch.manual_seed(1)
    student = 4 * torch.randn(3, 4, 64)
    teacher = 4 * torch.randn(3, 4, 64)
    weights = torch.rand(3, 4)
    full = student.clone().requires_grad_()
    ref = vocab_parallel_kl(full, teacher, 2.0)
    (ref * weights).sum().backward()
    results = run_distributed(_split_kl_worker, 2, student, teacher, weights, 2.0)
    for rank, (kl, grad) in enumerate(results):
        assert torch.allclose(kl, ref.detach(), rtol=1e-5, atol=1e-6)  # every TP rank holds the whole KL
        assert torch.allclose(grad, full.grad[..., rank * 32:(rank + 1) * 32], rtol=1e-5, atol=1e-7)


# -- end to end, in one world of 2 ranks ---------------------------------------------------------

ITERS = 3


def _kd(cfg, teacher: str, **kw):
    return dataclasses.replace(cfg, distill=DistillConfig(teacher=teacher, **kw))


def _curve(summary: dict) -> dict:
    h = summary["history"]
    return {"loss": [x["loss"] for x in h], "grad_norm": [x["grad_norm"] for x in h],
            "kd_kl": [x.get("kd_kl") for x in h], "teacher_seconds": [x.get("kd_teacher_seconds") for x in h],
            "lm_pass_flops": [x.get("lm_pass_flops_per_token") for x in h], "flops": [x["flops_per_token"] for x in h]}


def _kd_worker(data: dict, root: str) -> dict:
    from pretrain.run.segments import run

    def cfg(**kw):
        return debug_config(data, iters=ITERS, gbs=4, seq_length=32, **kw)

    teacher = f"{root}/teacher"
    run(cfg(save=teacher, save_interval=ITERS))  # the parent: 3 steps away from the student's init
    # with pruning (Taylor saliency, an event every step): α = 0 scores from the training pass, as without a teacher
    scored = dataclasses.replace(cfg(), prune=PruneConfig(target_ratio=0.8, start_tokens=0, interval=1))
    out = {"plain": _curve(run(scored)), "alpha0": _curve(run(_kd(scored, teacher, weight=0.0)))}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        out[f"kd{tp}{pp}"] = _curve(run(_kd(cfg(tp=tp, pp=pp), teacher, weight=0.5, temperature=2.0)))
    for tp, pp in ((2, 1), (1, 2)):  # the student starts as the teacher: KL 0 at the first step,
        same = cfg(tp=tp, pp=pp, load=teacher)
        same = dataclasses.replace(same, checkpoint=dataclasses.replace(same.checkpoint, finetune=True))
        # and distils only over its first 2 steps (128 tokens a step)
        out[f"same{tp}{pp}"] = _curve(run(_kd(same, teacher, weight=0.5, until_tokens=256)))

    # KD + pruning + an in-run shrink + resume, at PP=2 (the shrunk student's stage shapes differ from
    # the teacher's): 256 tokens a step, pruning over steps 1-2, shrink after 3
    def pruned(save: str, **kw):
        c = debug_config(data, pp=2, iters=5, gbs=8, seq_length=32, save=save, **kw)
        prune = PruneConfig(target_ratio=0.7, start_tokens=0, end_tokens=512, interval=1, shrink_at=(768,),
                            types=("hidden",))  # the hidden size: every p2p shape changes
        return _kd(dataclasses.replace(c, prune=prune), teacher, weight=0.5)

    # issue 28: distilling from its own parent (α = 1: the KL and its gradient are exactly 0 at first),
    # the student prunes what CE training would on the same batch from the same weights: one event
    # at the first step, scored from the language-model loss's gradients
    def from_parent(**kd):
        c = debug_config(data, iters=1, gbs=4, seq_length=32, load=teacher)
        c = dataclasses.replace(c, checkpoint=dataclasses.replace(c.checkpoint, finetune=True),
                                prune=PruneConfig(target_ratio=0.7, start_tokens=0, end_tokens=256, interval=1))
        return _kd(c, teacher, **kd) if kd else c

    for name, c in (("parent_ce", from_parent()), ("parent_kd", from_parent(weight=1.0))):
        summary = run(c)
        pruning = next(cb for cb in summary["trainer"].callbacks if cb.name == "pruning")
        out[name] = {**_curve(summary), "masks": pruning.masks.state_dict(), "ema": pruning.ema.pack(),
                     "events": len(pruning.history), "full": pruning.shape.full_masks().state_dict()}

    straight = run(pruned(f"{root}/straight"))
    first = run(pruned(f"{root}/broken", exit_interval=2))
    # resumed with no --kd-* or --prune-* flags: the checkpoint's teacher and pruning continue
    resumed = run(debug_config(data, pp=2, iters=5, gbs=8, seq_length=32, save=f"{root}/broken",
                               load=f"{root}/broken"))
    out.update(straight=_curve(straight), first=_curve(first), resumed=_curve(resumed),
               straight_params=straight["params"], resumed_params=resumed["params"],
               segment_params=[s["params"] for s in straight.get("segments", [])],
               final_hidden=straight["trainer"].config.model.hidden_size,
               resumed_segments=len(resumed.get("segments", [])))
    return out


@pytest.fixture(scope="module")
def kd_results(tiny_dataset, tmp_path_factory) -> dict:
    return run_distributed(_kd_worker, 2, tiny_dataset, str(tmp_path_factory.mktemp("kd")))[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_distillation_end_to_end(kd_results):
    res = kd_results
    # α = 0: the teacher runs, and the run is bit-identical to one without a teacher
    assert res["alpha0"]["loss"] == res["plain"]["loss"]
    assert res["alpha0"]["grad_norm"] == res["plain"]["grad_norm"]
    assert all(kl > 0 for kl in res["alpha0"]["kd_kl"]) and all(t > 0 for t in res["alpha0"]["teacher_seconds"])
    assert res["plain"]["kd_kl"] == [None] * ITERS
    # the KL's gradient reaches the student: α = 0.5 moves it differently from α = 0
    assert res["kd11"]["grad_norm"][0] != res["alpha0"]["grad_norm"][0]
    # the KL, the CE and the gradients agree across TP=1, TP=2 and PP=2 (vocab-parallel softmax is exact)
    for layout in ("kd21", "kd12"):
        for key in ("loss", "grad_norm", "kd_kl"):
            for a, b in zip(res[layout][key], res["kd11"][key]):
                assert math.isclose(a, b, rel_tol=2e-5), (layout, key, res[layout][key], res["kd11"][key])
    # the student equal to its teacher: KL 0 at any layout
    for layout in ("same21", "same12"):
        assert abs(res[layout]["kd_kl"][0]) < 1e-6, res[layout]
        assert res[layout]["kd_kl"][1] is not None and res[layout]["kd_kl"][2] is None  # --kd-until-tokens 256
        assert res[layout]["teacher_seconds"][2] is None
    # KD + pruning + shrink: the shrunk student keeps distilling from the unpruned teacher
    assert len(res["segment_params"]) == 2 and res["segment_params"][1] < 0.8 * res["segment_params"][0]
    assert res["final_hidden"] < 128  # the teacher's pipeline keeps hidden 128 (the debug model's)
    assert all(kl is not None and kl > 0 for kl in res["straight"]["kd_kl"])
    # ... and a stop before the shrink + resume continues exactly as the uninterrupted run
    assert res["first"]["loss"] == res["straight"]["loss"][:2]
    assert res["first"]["loss"] + res["resumed"]["loss"] == res["straight"]["loss"], res
    assert res["first"]["kd_kl"] + res["resumed"]["kd_kl"] == res["straight"]["kd_kl"]
    assert res["resumed_segments"] == 2 and res["resumed_params"] == res["straight_params"]


@pytest.mark.distributed
@pytest.mark.slow
def test_distilling_from_the_parent_prunes_what_ce_training_would(kd_results):
    """Issue 28. The KD step's gradient is exactly 0 (the student is its teacher), yet the first
    event removes exactly the groups a CE run removes on the same batch from the same weights: the
    saliency table is the language-model loss's, bit for bit (before: all zero, and the solver's
    tie-break chose)."""
    ce, kd = kd_results["parent_ce"], kd_results["parent_kd"]
    assert kd["grad_norm"][0] < 1e-6 and abs(kd["kd_kl"][0]) < 1e-6, kd  # the defect's setting
    assert kd["loss"] == ce["loss"]  # the same CE of the same batch from the same weights
    assert ce["events"] == kd["events"] == 1
    assert torch.equal(kd["ema"], ce["ema"]) and bool(ce["ema"].abs().sum() > 0)
    for part in ("heads", "ffn", "hidden"):
        assert torch.equal(kd["masks"][part], ce["masks"][part]), part
    assert any(not torch.equal(ce["masks"][p], ce["full"][p]) for p in ("heads", "ffn", "hidden"))
    # the CE pass of its own is charged to the run (a forward and backward of the student)
    assert kd["lm_pass_flops"] == kd["flops"] and ce["lm_pass_flops"] == [None]
    # a KD + pruning run scores its window's steps so too (PP = 2, resumed exactly: the end-to-end test)
    assert kd_results["straight"]["lm_pass_flops"][:2] == kd_results["straight"]["flops"][:2]
    assert kd_results["straight"]["lm_pass_flops"][2:] == [None] * 3
    assert kd_results["alpha0"]["lm_pass_flops"] == [None] * ITERS
