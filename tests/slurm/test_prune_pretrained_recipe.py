"""slurm/prune_pretrained.sbatch (issue 20): DRY_RUN=1 imports the parent once and validates the
recipe's flags with no model or tokenizer flag: both come from the imported checkpoint."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_recipe_imports_the_parent_and_validates(tiny_dataset, tmp_path):
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
