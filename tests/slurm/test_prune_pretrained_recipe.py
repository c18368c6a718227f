"""slurm/prune_pretrained.sbatch (issue 20): DRY_RUN=1 imports the parent once and validates the
recipe's flags with no model or tokenizer flag: both come from the imported checkpoint. TASKS=
(issue 27 item 4): a job (on the simulated nodes of tests/slurm/fake_nodes) scores the parent and
the result on the benchmarks after training; bad TASKS are refused before anything runs."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE_SLURM = os.path.join(ROOT, "tests", "slurm", "fake_nodes")


def _tiny_parent(folder, tokenizer_model):
    """A 2-layer Llama HF folder whose tokenizer (a Llama-2-style tokenizer.model) made the test data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    shutil.copyfile(tokenizer_model, os.path.join(folder, "tokenizer.model"))


def test_recipe_imports_the_parent_validates_and_scores_the_tasks(tiny_dataset, tmp_path):
    parent = str(tmp_path / "parent_hf")
    _tiny_parent(parent, tiny_dataset["tokenizer"])
    env = {**os.environ, "REPO": ROOT, "PYTHON": sys.executable, "PARENT": parent,
           "DATA_PATH": tiny_dataset["prefix"], "SAVE": str(tmp_path / "run"), "SEQ_LENGTH": "64",
           "NNODES": "1", "GPUS_PER_NODE": "1", "TP": "1", "PP": "1", "DRY_RUN": "1"}
    env.pop("SLURM_JOB_ID", None)
    r = subprocess.run(["bash", f"{ROOT}/slurm/prune_pretrained.sbatch"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "model: 2 layers, hidden 64, heads 4 (query groups 2" in r.stdout and "plan:" in r.stdout, r.stdout
    assert os.path.isfile(tmp_path / "run_parent" / "tokenizer" / "tokenizer.model")
    assert not (tmp_path / "run").exists()  # validated only: nothing trained, nothing saved
    # KD_TEACHER=parent: the imported parent teaches (checked: same vocabulary and tokenizer)
    r = subprocess.run(["bash", f"{ROOT}/slurm/prune_pretrained.sbatch"], capture_output=True, text=True,
                       env={**env, "KD_TEACHER": "parent", "KD_WEIGHT": "0.5"}, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert f"distillation: teacher {tmp_path / 'run_parent'}" in r.stdout and "0.5·CE + 0.5·T²·KL" in r.stdout, r.stdout
    # a bad target is refused before anything runs
    r = subprocess.run(["bash", f"{ROOT}/slurm/prune_pretrained.sbatch"], capture_output=True, text=True,
                       env={**env, "PRUNE_TARGET": "-3"}, timeout=60)
    assert r.returncode == 1 and "PRUNE_TARGET=-3" in r.stderr, r.stderr
    # TASKS: a name that is not a task, or a limit that is not a count, is refused before the import
    for bad, says in (({"TASKS": "paper,arc"}, "TASKS arc: unknown task; known: arc_easy"),
                      ({"TASKS": "boolq", "TASKS_LIMIT": "0"}, "TASKS_LIMIT=0: a positive number")):
        r = subprocess.run(["bash", f"{ROOT}/slurm/prune_pretrained.sbatch"], capture_output=True, text=True,
                           env={**env, **bad, "PARENT_CHECKPOINT": str(tmp_path / "never")}, timeout=60)
        assert r.returncode == 1 and says in r.stderr and not (tmp_path / "never").exists(), r.stderr
    _tasks_after_training(tiny_dataset, tmp_path, parent)


def _tasks_after_training(tiny_dataset, tmp_path, parent):
    """A job of three steps (srun: tests/slurm/fake_nodes) from the parent imported above, then
    TASKS=boolq,piqa on the parent and the pruned result: TASKS_OUTPUT/{parent,pruned}.json and
    the run's tensorboard."""
    import json

    from pretrain.checkpoint.stored import StoredCheckpoint

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    save = str(tmp_path / "run")
    env.update({"PATH": f"{FAKE_SLURM}:{env['PATH']}", "FAKE_NODES_DIR": str(tmp_path / "nodes"),
                "FAKE_NODE_SCRATCH": str(tmp_path / "scratch"), "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node0",
                "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1", "GPUS_PER_NODE": "0", "REPO": ROOT,
                "PYTHON": sys.executable, "PARENT": parent, "DATA_PATH": tiny_dataset["prefix"], "SAVE": save,
                "SEQ_LENGTH": "64", "MICRO_BATCH": "4", "GLOBAL_BATCH": "4", "TRAIN_TOKENS": str(3 * 256),
                "WARMUP_ITERS": "1", "EVAL_INTERVAL": "0", "LOG_INTERVAL": "1", "EXPORT": str(tmp_path),
                "PRUNE_ARGS": "--prune-target-ratio 0.8 --prune-interval 1 --prune-end-tokens 512",
                "EXTRA_ARGS": "--split 98,2,0", "TASKS": "boolq,piqa", "TASKS_LIMIT": "3"})
    r = subprocess.run(["bash", f"{ROOT}/slurm/prune_pretrained.sbatch"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = tmp_path / "run_tasks"
    for name, load in (("parent", str(tmp_path / "run_parent")), ("pruned", save)):
        scores = json.load(open(out / f"{name}.json"))
        assert scores["checkpoint"] == StoredCheckpoint.find(load).folder and scores["limit"] == 3, name
        assert {t: m["documents"] for t, m in scores["tasks"].items()} == {"boolq": 3, "piqa": 3}, name
    assert StoredCheckpoint.find(save).iteration == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{save}/tensorboard")
    events.Reload()
    assert [e.step for e in events.Scalars("benchmarks/piqa/acc")] == [0, 3]  # the parent, then the result
    assert "boolq" in r.stdout and "run_tasks/pruned.json exists" not in r.stdout
    assert f"wrote {tmp_path / 'run_parent'}" not in r.stdout  # imported once, by the dry run above
