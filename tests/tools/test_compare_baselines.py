"""tools/compare_baselines.py: the plan, the accounting (against hand counts), bad input, and the
cpu-tiny recipe end to end (every arm trains; tokens, FLOPs and the report check out)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from pretrain.compare import arms
from pretrain.compare.accounting import cumulative_flops_at, kept_flops_per_token, run_flops
from pretrain.compare.recipes import RECIPES, get_recipe
from pretrain.config import ConfigError, ModelConfig
from pretrain.model.flops import flops_per_token_of, training_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "compare_baselines.py")


def test_flops_per_token_matches_a_hand_count():
    # L2, hidden 64, 4 heads in 2 groups of head size 16, FFN 192, vocab 1024, sequence 64:
    # q/k/v 64*16*(4+2*2) = 8192, output 4*16*64 = 4096, SwiGLU 3*64*192 = 36864 -> 49152 weights;
    # attention 2 matmuls x 2*4*16 FLOPs x 32 keys = 8192; forward per layer 2*49152 + 8192 = 106496;
    # output layer 2*1024*64 = 131072; forward 2*106496 + 131072 = 344064; training 3x = 1032192
    assert flops_per_token_of([(2, 4, 192)] * 2, 64, 16, 1024, 64) == 1032192
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=192, seq_length=64)
    assert training_flops_per_token(model, 1024) == 1032192
    per_layer = ModelConfig(**{**model.__dict__, "layer_shapes": [
        {"num_query_groups": 2, "num_attention_heads": 4, "ffn_hidden_size": 192},
        {"num_query_groups": 1, "num_attention_heads": 2, "ffn_hidden_size": 64}]})
    # the narrow layer: 64*16*(2+2) + 2*16*64 + 3*64*64 = 4096 + 2048 + 12288 = 18432; attention 2*2*32*32 = 4096
    assert training_flops_per_token(per_layer, 1024) == 3 * (106496 + 2 * 18432 + 4096 + 131072)


def test_ideal_flops_switch_one_step_after_each_event():
    parent = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 192, "seq_length": 64}
    full = flops_per_token_of([(2, 4, 192)] * 2, 64, 16, 1024, 64)
    metrics = [{"iteration": i, "flops_per_token": full} for i in range(1, 5)]
    kept = {"layers": [True, True], "heads": [1, 2], "ffn": [64, 192], "hidden": 64}
    small = kept_flops_per_token(kept, parent, 1024)
    assert small == flops_per_token_of([(1, 2, 64), (2, 4, 192)], 64, 16, 1024, 64)
    out = run_flops(metrics, 10, [{"iteration": 2, "kept_per_layer": kept}], parent, 1024)
    # steps 1 and 2 compute with the full model; 3 and 4 with what the event at 2 kept
    assert out == {"actual": 40 * full, "ideal": 20 * full + 20 * small, "teacher": 0}
    dropped = {"layers": [True, False], "heads": [2, 0], "ffn": [192, 0], "hidden": 32}
    assert kept_flops_per_token(dropped, parent, 1024) == flops_per_token_of([(2, 4, 192)], 32, 16, 1024, 64)


def test_runs_for_adds_what_an_arm_needs_and_refuses_unknown_arms():
    runs, notes = arms.runs_for(["B-found"])
    assert runs == ["parent", "A", "B-found-i", "B-found-ii"]
    assert any("A added" in n for n in notes) and any("parent added" in n for n in notes)
    with pytest.raises(ConfigError, match="no such arm"):
        arms.runs_for(["A", "D"])


def test_hand_shape_is_uniform_within_two_percent_by_its_rule():
    parent = dict(RECIPES["cpu-small"].model)
    vocab = 4032
    target = arms.parameters(parent, vocab) // 2
    shape = arms.hand_shape(parent, target, vocab)
    assert shape["num_layers"] == parent["num_layers"]
    assert shape["num_attention_heads"] == parent["num_attention_heads"]
    assert shape["hidden_size"] % 8 == 0 and shape["ffn_hidden_size"] % 8 == 0
    assert abs(arms.parameters(shape, vocab) - target) <= 0.02 * target
    with pytest.raises(ConfigError, match="within 2%"):
        arms.hand_shape(parent, 1000, vocab)  # smaller than the embedding alone


def test_recipes_validate_and_refuse_a_window_too_small():
    for name in RECIPES:
        get_recipe(name)
    with pytest.raises(ConfigError, match="shorter than one --prune-interval"):
        get_recipe("cpu-tiny", window=(0.0, 0.05))
    with pytest.raises(ConfigError, match="does not exist"):
        get_recipe("cpu-huge")


def test_the_validation_split_must_hold_the_longest_runs_evaluations_in_one_epoch():
    from pretrain.compare.campaign import check_validation_split

    recipe = get_recipe("cpu-real")  # 8 x 256 tokens a step, 4 batches every 40 steps
    check_validation_split(recipe, 120 * 2048, 4 * 4 * 2048)  # T: evaluations at 0 (none), 40, 80, 120 + 1
    with pytest.raises(ConfigError, match=r"evaluates 32,768 validation tokens, but the validation share of "
                                          r"--data-path \(--split 98,2,0\) holds 32,767"):
        check_validation_split(recipe, 120 * 2048, 4 * 4 * 2048 - 1)


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> dict:
    """Training and held-out test data from disjoint documents of the built-in corpus."""
    from data_prep.build_corpus import builtin_documents
    from data_prep.train_tokenizer import train_tokenizer
    from data_prep.preprocess import preprocess

    root = tmp_path_factory.mktemp("cmp")
    docs = list(itertools.islice(builtin_documents(), 1000))
    for name, part in (("train", docs[:850]), ("test", docs[850:])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in part)
    tok = train_tokenizer([str(root / "train.jsonl")], str(root / "tok"), vocab_size=1000, num_threads=1)
    out = {"tok": tok, "root": str(root)}
    for name in ("train", "test"):
        out[name] = preprocess([str(root / f"{name}.jsonl")], str(root / name), "GPTSentencePieceTokenizer", tok,
                               append_eod=True, workers=0, progress=False).outputs[0]
    return out


def _tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def _args(data: dict, out: str, *extra: str, test: str | None = None) -> list[str]:
    return ["--recipe", "cpu-tiny", "--data-path", data["train"], "--tokenizer-model", data["tok"],
            "--test-data-path", test or data["test"], "--seeds", "1", "--out", out, *extra]


def test_bad_input_is_refused_before_any_training(split_data, tmp_path):
    import shutil

    copy = os.path.join(split_data["root"], "copy_of_train")
    for ext in (".bin", ".idx"):
        shutil.copy(split_data["train"] + ext, copy + ext)
    from data_prep.preprocess import preprocess

    # the training documents again, without end-of-document tokens: other bytes, the same source file
    same_source = preprocess([os.path.join(split_data["root"], "train.jsonl")], os.path.join(split_data["root"], "again"),
                             "GPTSentencePieceTokenizer", split_data["tok"], append_eod=False, workers=0,
                             progress=False).outputs[0]
    cases = [
        (_args(split_data, str(tmp_path / "a"), test=split_data["train"]), "is also in --data-path"),
        (_args(split_data, str(tmp_path / "a1"), test=same_source), "were made from the same source files"),
        (_args(split_data, str(tmp_path / "a2"), test=copy), "is the training data"),
        (_args(split_data, str(tmp_path / "b"), "--arms", "A,Z"), "no such arm"),
        (["--recipe", "cpu-big", *_args(split_data, str(tmp_path / "c"))[2:]], "--recipe 'cpu-big' does not exist"),
        (["--recipe", "cpu-small", *_args(split_data, str(tmp_path / "d"))[2:]], "no arm may repeat data"),
        (_args(split_data, str(tmp_path / "e"), "--dry-run", "--launcher", "slurm", "--only", "A:0"),
         "--dry-run starts nothing, --only does something"),
    ]
    for args, message in cases:
        proc = _tool(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not any(os.listdir(tmp_path))  # nothing was started or written


def test_slurm_dry_run_chains_the_runs_by_dependency(split_data, tmp_path):
    proc = _tool(*_args(split_data, str(tmp_path / "s"), "--launcher", "slurm", "--dry-run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch")]
    names = [line.split("--job-name=")[1].split()[0] for line in lines]
    assert names == ["cmp-parent:0", "cmp-A:0", "cmp-A0:0", "cmp-C:0", "cmp-B-found-i:0", "cmp-B-found-ii:0",
                     "cmp-B-hand-i:0", "cmp-B-hand-ii:0", "cmp-report"]
    jobs = {name: f"DRYRUN{i + 1}" for i, name in enumerate(names)}
    assert f"--dependency=afterany:{jobs['cmp-parent:0']}" in lines[names.index("cmp-A:0")]
    assert f"--dependency=afterany:{jobs['cmp-A:0']}" in lines[names.index("cmp-B-hand-ii:0")]
    assert "--dependency" not in lines[names.index("cmp-A0:0")]
    assert "--only B-found-i:0" in lines[names.index("cmp-B-found-i:0")]
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.slow
def test_cpu_tiny_runs_every_arm_with_exact_accounting(split_data, tmp_path):
    out = str(tmp_path / "cmp")
    every_arm = ("--arms", ",".join(arms.ARMS))  # the opt-in distillation arms too
    proc = _tool(*_args(split_data, out, *every_arm, "--tasks", "none"))  # tasks: test_compare_real_parent.py
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recipe = get_recipe("cpu-tiny")
    results = {run: json.load(open(os.path.join(out, run, "seed0", "result.json"))) for run in arms.RUNS}
    assert {run: r["status"] for run, r in results.items()} == {run: "ok" for run in arms.RUNS}
    for run in arms.RUNS:
        assert os.path.isfile(os.path.join(out, run, "seed0", "command.sh"))
    step = recipe.tokens_per_step
    parent, a = results["parent"], results["A"]
    vocab = parent["vocab_size"]
    full = arms.total_tokens(recipe)
    # tokens: the parent is the first P, A and C continue it to P + T, the from-scratch runs do P + T
    assert parent["tokens_trained"] == recipe.parent_tokens and parent["end_tokens"] == recipe.parent_tokens
    assert a["tokens_trained"] == results["C"]["tokens_trained"] == recipe.continue_tokens
    assert a["end_tokens"] == results["A0"]["tokens_trained"] == results["B-found-i"]["tokens_trained"] == full
    # FLOPs: the parent computes at its full size all along (hand count in test_flops_per_token...)
    m = recipe.model
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    per_layer = 2 * (m["hidden_size"] * head_dim * (m["num_attention_heads"] + 2 * m["num_query_groups"])
                     + m["num_attention_heads"] * head_dim * m["hidden_size"] + 3 * m["hidden_size"] * m["ffn_hidden_size"]) \
        + 2 * 2 * m["num_attention_heads"] * head_dim * (m["seq_length"] // 2)
    parent_per_token = 3 * (m["num_layers"] * per_layer + 2 * vocab * m["hidden_size"])
    assert parent["flops"]["actual"] == parent["flops"]["ideal"] == parent_per_token * recipe.parent_tokens
    # A: full size until its in-run shrink, the shrunk size after; ideal below actual while masked
    assert a["flops"]["ideal"] < a["flops"]["actual"] < parent_per_token * recipe.continue_tokens
    assert a["params"] <= recipe.target_ratio * parent["params"] * 1.02
    assert a["final_model"] != parent["final_model"]  # shrunk
    # matched FLOPs: the most whole steps of the small model within parent + A's actual FLOPs
    budget = parent["flops"]["actual"] + a["flops"]["actual"]
    for run in ("B-found-ii", "B-hand-ii"):
        spent = results[run]["flops"]["actual"]
        assert spent <= budget < spent + results[run]["flops_per_token_final"] * step
    assert results["B-found-i"]["final_model"]["hidden_size"] == a["final_model"]["hidden_size"]
    assert abs(results["B-hand-i"]["params"] - a["params"]) <= 0.02 * a["params"]
    assert results["B-hand-i"]["final_model"].get("layer_shapes") is None
    # C: one pruning event at the end of A's window
    assert len(results["C"]["pruning"]) == 1
    assert results["C"]["pruning"][0]["tokens"] == recipe.parent_tokens + recipe.window_tokens[1]
    # the distillation arms: A's and C's tokens; their teacher's forward passes are charged to them
    for kd, plain in (("A-KD", "A"), ("C-KD", "C")):
        assert results[kd]["tokens_trained"] == results[plain]["tokens_trained"]
        assert results[kd]["flops"]["actual"] > results[plain]["flops"]["actual"]
    # every run was tested on the same sequences at its end
    assert all(r["curve"][-1]["test_loss"] == r["test_loss"] for r in results.values())
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["runs"]) == set(arms.RUNS)
    assert report["runs"]["B-found-i"]["minus_A"]["per_seed"]["0"] == pytest.approx(
        results["B-found-i"]["test_loss"] - a["test_loss"])
    text = open(os.path.join(out, "report.md")).read()
    for run in arms.RUNS:
        assert f"| {run} |" in text
    for png in ("test_loss_vs_tokens.png", "test_loss_vs_flops.png", "pruning_trajectory.png", "found_shapes.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    # resuming a finished comparison runs nothing again; a fresh start in the same folder is refused
    proc = _tool(*_args(split_data, out, *every_arm, "--tasks", "none", "--resume"))
    assert proc.returncode == 0 and "bash " not in proc.stdout, proc.stdout[-2000:]
    proc = _tool(*_args(split_data, out, *every_arm))
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_gpu_1b_sbatch_dry_run_checks_every_flag_at_the_cluster_size(split_data, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "DATA_PATH": split_data["train"],
           "TOKENIZER_MODEL": split_data["tok"], "TEST_DATA_PATH": split_data["test"], "OUT": str(tmp_path / "g"),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "slurm", "compare_baselines.sbatch")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for run in ("parent", "A", "A0", "C"):
        assert f"checked {run}: flags valid for 32 ranks" in proc.stdout
    assert "WARNING (a real run stops here)" in proc.stdout  # 21 B tokens are not in the tiny corpus
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch")]
    job = {line.split("--job-name=")[1].split()[0]: f"DRYRUN{i + 1}" for i, line in enumerate(lines)}
    sweep = next(line for line in lines if "--job-name=cmp-sweep-B-hand-lr0.0003" in line)
    assert f"--dependency=afterany:{job['cmp-A:0']}" in sweep and "--gpus-per-node=8" in sweep
    assert len([n for n in job if n.startswith("cmp-sweep-")]) == 12
    assert len(lines) == 12 + 8 * 3 + 1


def test_kd_arms_are_opt_in_distil_from_the_parent_and_pay_for_the_teacher(tmp_path):
    assert "A-KD" not in arms.DEFAULT_ARMS and "C-KD" not in arms.DEFAULT_ARMS
    assert arms.runs_for(list(arms.DEFAULT_ARMS))[0] == [r for r in arms.RUNS if not r.endswith("-KD")]
    assert arms.runs_for(["C-KD"])[0] == ["parent", "C-KD"]
    recipe = RECIPES["cpu-tiny"]
    ctx = arms.Context(out=str(tmp_path), data=arms.Data(data_path=["d"], tokenizer_model="t", test_data_path=["x"]))
    for run, plain in (("A-KD", "A"), ("C-KD", "C")):
        kd, base = arms.plan_run(recipe, ctx, run, 0), arms.plan_run(recipe, ctx, plain, 0)
        teacher = kd.flags[kd.flags.index("--kd-teacher") + 1]
        assert teacher == kd.first_load == base.first_load == ctx.run_dir("parent", 0) + "/ckpt"
        without = [f for f in kd.flags if f not in ("--kd-teacher", teacher)]
        assert without == [f.replace(base.folder, kd.folder) for f in base.flags]
    metrics = [{"iteration": 1, "flops_per_token": 100, "kd_teacher_flops_per_token": 30},
               {"iteration": 2, "flops_per_token": 100}]
    assert run_flops(metrics, 10) == {"actual": 2300, "ideal": 2300, "teacher": 300}
    # a step that also ran the CE pass of its own for saliency (issue 28) pays for it
    metrics[0]["lm_pass_flops_per_token"] = 100
    assert run_flops(metrics, 10) == {"actual": 3300, "ideal": 3300, "teacher": 300}
    assert cumulative_flops_at(metrics, 10) == {1: 2300, 2: 3300}


def test_finished_runs_are_scored_on_the_tasks_once_per_settings(tmp_path, monkeypatch):
    """Issue 27 item 4: a finished run's checkpoint is scored by tools/evaluate.py (FOLDER/tasks.sh)
    into tasks.json and result.json; a run scored with the same tasks, documents and checkpoint is
    not scored again, one scored otherwise (another --task-limit, an older tasks.json) is; a failed
    scoring leaves the result as it was. The report prints the documents and the table."""
    import shlex
    from types import SimpleNamespace

    from pretrain.compare import campaign as campaign_module
    from pretrain.compare.campaign import Campaign
    from pretrain.compare.report import _tasks_lines, task_settings

    ckpt = str(tmp_path / "A" / "seed0" / "ckpt" / "iter_0000004")
    monkeypatch.setattr(campaign_module.StoredCheckpoint, "find", classmethod(
        lambda cls, path, skipped=None: SimpleNamespace(folder=ckpt)))
    calls, outcome = [], {"code": 0}

    def execute(command: str, log: str) -> int:  # tools/evaluate.py, as tasks.sh asks it
        argv = shlex.split(open(command).read().splitlines()[-1])[1:]
        value = {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--")}
        calls.append(value)
        if outcome["code"] == 0:
            tasks = {t: {"score": 0.25 * (i + 1), "primary": "acc"} for i, t in enumerate(value["--tasks"].split(","))}
            with open(value["--output"], "w") as f:
                json.dump({"tasks": [] if outcome.get("partial") else tasks, "limit": int(value["--limit"])}, f)
        return outcome["code"]

    recipe = get_recipe("cpu-tiny")
    ctx = arms.Context(out=str(tmp_path), data=arms.Data(data_path=["d"], tokenizer_model="t", test_data_path=["x"]),
                       tasks=("boolq", "piqa"), task_limit=3)
    camp = Campaign(recipe, ctx, [0], ["A"], execute=execute)
    folder = str(tmp_path / "A" / "seed0")
    os.makedirs(folder)
    plan = SimpleNamespace(name="A", seed=0, folder=folder, flags=[], first_load=None, lr=1e-3)
    finished = {"status": "ok", "run": "A", "seed": 0, "tasks": None}
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(finished, f)

    result = camp.run_one(plan)  # finished before: scored now
    assert len(calls) == 1 and calls[0]["--load"] == ckpt and calls[0]["--limit"] == "3"
    assert result["tasks"] == {"boolq": 0.25, "piqa": 0.5}
    assert json.load(open(os.path.join(folder, "result.json")))["tasks"] == result["tasks"]
    stored = json.load(open(os.path.join(folder, "tasks.json")))
    assert stored["settings"]["limit"] == 3 and stored["settings"]["primary"] == {"boolq": "acc", "piqa": "acc"}
    assert not os.path.exists(os.path.join(folder, "tasks_results.json"))
    assert camp.run_one(plan) == result and len(calls) == 1  # the same settings: not again
    import dataclasses

    camp.ctx = ctx = dataclasses.replace(ctx, task_limit=5)
    assert camp.run_one(plan)["tasks_settings"]["limit"] == 5 and len(calls) == 2  # other documents: again
    with open(os.path.join(folder, "tasks.json"), "w") as f:
        json.dump({"boolq": 0.5}, f)  # the older form, settings unknown: scored again
    outcome["code"] = 1
    kept = camp.run_one(plan)  # a failed scoring: said, the result untouched, tried again on resume
    assert len(calls) == 3 and kept["tasks_settings"]["limit"] == 5
    outcome.update(code=0, partial=True)  # exit 0 with no scores: said, kept to be read, tried again on resume
    assert camp.run_one(plan)["tasks_settings"]["limit"] == 5 and len(calls) == 4
    assert os.path.exists(os.path.join(folder, "tasks_results.json"))
    calls.pop()
    outcome["partial"] = False
    result = camp.run_one(plan)
    assert len(calls) == 4 and json.load(open(os.path.join(folder, "tasks.json")))["settings"]["limit"] == 5
    assert camp.run_one(plan, score=False) and len(calls) == 4
    camp.ctx = dataclasses.replace(ctx, tasks=())  # --tasks none
    assert camp.run_one(plan) == result and len(calls) == 4

    settings = task_settings({("A", 0): result})  # what report.json and report.md say of the tasks
    assert settings["limit"] == 5 and settings["same_for_every_run"] and "checkpoint" not in settings
    text = "\n".join(_tasks_lines({"A": {"tasks": result["tasks"]}}, settings))
    assert "the first 5 documents of each task (0-shot), the same documents for every run" in text
    assert "| run | boolq | piqa |" in text and "| A | 0.250 | 0.500 |" in text


def test_finished_runs_are_measured_on_a_larger_test_sample_once_per_settings(tmp_path, monkeypatch):
    """Issue 28: a finished run's final checkpoint is measured by tools/evaluate.py on the first N
    sequences of the test data (FOLDER/final_test.sh) into final_test.json and result.json's
    ``final_test``; the same data, N and checkpoint are not measured again, another N is; a failed
    measurement leaves no measurement of other settings in the result; N = 0 measures nothing."""
    import dataclasses
    import shlex
    from types import SimpleNamespace

    from pretrain.compare import campaign as campaign_module
    from pretrain.compare.campaign import Campaign

    ckpt = str(tmp_path / "M" / "seed1" / "ckpt" / "iter_0000004")
    monkeypatch.setattr(campaign_module.StoredCheckpoint, "find", classmethod(
        lambda cls, path, skipped=None: SimpleNamespace(folder=ckpt)))
    calls, outcome = [], {"code": 0, "loss": 4.25}

    def execute(command: str, log: str) -> int:  # tools/evaluate.py, as final_test.sh asks it
        argv = shlex.split(open(command).read().splitlines()[-1])[1:]
        calls.append(argv)
        if outcome["code"] == 0:
            samples = int(argv[argv.index("--max-samples") + 1])
            with open(argv[argv.index("--output") + 1], "w") as f:
                json.dump({"loss": outcome["loss"], "perplexity": 70.1, "samples": samples, "tokens": samples * 64,
                           "checkpoint": ckpt}, f)
        return outcome["code"]

    recipe = get_recipe("cpu-tiny-real")
    ctx = arms.Context(out=str(tmp_path), data=arms.Data(data_path=["d"], tokenizer_model="t",
                                                         test_data_path=["/data/held_out_a", "/data/held_out_b"]),
                       final_test_samples=16)
    camp = Campaign(recipe, ctx, [1], ["M"], execute=execute)
    folder = str(tmp_path / "M" / "seed1")
    os.makedirs(folder)
    plan = SimpleNamespace(name="M", seed=1, folder=folder, flags=[], first_load=None, lr=1e-3)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"status": "ok", "run": "M", "seed": 1, "test_loss": 4.5}, f)

    result = camp.run_one(plan)  # finished before the measurement: measured now
    argv = calls[0]
    assert argv[argv.index("--load") + 1] == ckpt and argv[argv.index("--max-samples") + 1] == "16"
    assert argv[argv.index("--data-path") + 1:argv.index("--data-path") + 3] == ["/data/held_out_a", "/data/held_out_b"]
    assert argv[argv.index("--seq-length") + 1] == "64"
    assert argv[argv.index("--micro-batch-size") + 1] == str(recipe.micro_batch_size)
    assert result["final_test"] == {"loss": 4.25, "samples": 16, "tokens": 1024} and result["test_loss"] == 4.5
    assert json.load(open(os.path.join(folder, "result.json")))["final_test"] == result["final_test"]
    assert json.load(open(os.path.join(folder, "final_test.json")))["settings"]["samples"] == 16
    assert not os.path.exists(os.path.join(folder, "final_test_results.json"))
    assert camp.run_one(plan) == result and len(calls) == 1  # the same settings: not again
    camp.ctx = dataclasses.replace(ctx, final_test_samples=32)
    outcome["code"] = 1
    # another N, failed: said; the old measurement is not this comparison's and leaves the result
    assert "final_test" not in camp.run_one(plan) and len(calls) == 2
    assert "final_test" not in json.load(open(os.path.join(folder, "result.json")))
    outcome.update(code=0, loss=4.3)
    assert camp.run_one(plan)["final_test"] == {"loss": 4.3, "samples": 32, "tokens": 2048} and len(calls) == 3
    # evaluate.py exited 0 but its output has no finite loss: said, the output kept to be read
    camp.ctx = dataclasses.replace(ctx, final_test_samples=16)
    outcome["loss"] = float("nan")
    assert "final_test" not in camp.run_one(plan) and len(calls) == 4
    assert os.path.exists(os.path.join(folder, "final_test_results.json"))
    outcome["loss"] = 4.3
    camp.ctx = dataclasses.replace(ctx, final_test_samples=32)  # final_test.json still holds N = 32's
    assert camp.run_one(plan)["final_test"]["loss"] == 4.3 and len(calls) == 4
    with open(os.path.join(folder, "final_test.json"), "w") as f:
        f.write("{damaged")
    assert camp.run_one(plan)["final_test"]["loss"] == 4.3 and len(calls) == 5  # a damaged file: again
    camp.ctx = dataclasses.replace(ctx, final_test_samples=0)
    assert camp.run_one(plan)["final_test"]["loss"] == 4.3 and len(calls) == 5  # none asked: nothing run


def test_final_test_samples_fewer_than_a_batch_are_refused():
    with pytest.raises(ConfigError, match=r"final_test_samples \(--final-test-samples\) 3 is fewer than one batch of 8"):
        get_recipe("cpu-tiny-real", final_test_samples=3)
    assert get_recipe("cpu-tiny-real", final_test_samples=0).final_test_samples == 0


def test_a_sweep_rate_that_failed_holds_back_the_runs_it_decides(tmp_path):
    """A learning-rate sweep with a failed rate decides nothing: the runs whose rate it sets are
    recorded as waiting (not trained at a rate nobody chose, whose result a resume would keep), and
    the resume that finishes the rate chooses and runs them."""
    from pretrain.compare.campaign import Campaign

    recipe = get_recipe("cpu-real")
    assert len(recipe.lrs) == 2
    ctx = arms.Context(out=str(tmp_path), data=arms.Data(data_path=["d"], tokenizer_model="t", test_data_path=["x"]))
    sweep = "parent-cont"

    def sweep_results(statuses):
        for lr, status in zip(recipe.lrs, statuses):
            folder = ctx.sweep_dir(sweep, lr)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "result.json"), "w") as f:
                json.dump({"status": status, "valid_loss": 5.0 if lr == recipe.lrs[1] else 6.0}, f)

    def campaign():
        camp = Campaign(recipe, ctx, [0], ["parent-cont"], execute=lambda command, log: 1)
        camp.run_if_possible = lambda run, seed, sweep=False, lr=None, _real=camp.run_if_possible: (
            None if sweep else _real(run, seed, sweep, lr))  # the rates' runs: their result.json above
        return camp

    sweep_results(["failed", "ok"])
    camp = campaign()
    camp._sweep(sweep)
    assert sweep not in ctx.lrs and camp.undecided_sweeps == {sweep}
    ctx.results[("parent", 0)] = {"status": "ok"}
    assert camp.run_if_possible("parent-cont", 0) is None
    waiting = json.load(open(os.path.join(ctx.run_dir("parent-cont", 0), "result.json")))
    assert waiting["status"] == "missing" and "--resume retries" in waiting["reason"], waiting
    sweep_results(["ok", "ok"])  # the resume finished the failed rate
    camp = campaign()
    camp._sweep(sweep)
    assert ctx.lrs[sweep] == recipe.lrs[1] and not camp.undecided_sweeps


def test_a_second_campaign_on_one_folder_is_refused_and_the_report_still_reads_it(split_data, tmp_path):
    from pretrain.compare.campaign import hold_campaign_folder, release_campaign_folder

    out = str(tmp_path / "busy")
    hold_campaign_folder(out, "a running campaign")  # this process plays the campaign already running
    try:
        proc = _tool(*_args(split_data, out, "--resume"))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"--out {out} is in use by another campaign" in proc.stderr and "a running campaign" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert sorted(os.listdir(out)) == ["run.lock"]  # nothing was started or written
        proc = _tool(*_args(split_data, out, "--resume", "--launcher", "slurm"))  # nor submitted
        assert proc.returncode == 2 and "is in use by another campaign" in proc.stderr, proc.stderr[-2000:]
        assert sorted(os.listdir(out)) == ["run.lock"]
        proc = _tool(*_args(split_data, out, "--report-only"))  # reading what finished needs no lock
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    finally:
        release_campaign_folder(out)
