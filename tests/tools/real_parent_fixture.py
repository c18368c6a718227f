"""A tiny released model for the real-parent comparison's tests: a 2-layer HF Llama made with
transformers, whose sentencepiece tokenizer made the test data, imported by
``tools/convert_from_hf.py`` (``tests/tools/test_compare_real_parent.py`` and the bad-input cases)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_hf_llama(folder: str, tokenizer_model: str, vocab_size: int = 1000, hidden: int = 64) -> str:
    """A 2-layer Llama (hidden 64, 4 heads in 2 query groups, FFN 3 x hidden, tied) saved with ``tokenizer_model``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    shutil.copyfile(tokenizer_model, os.path.join(folder, "tokenizer.model"))
    return folder


def import_parent(hf_folder: str, save: str) -> str:
    """``tools/convert_from_hf.py`` on it, as a user runs it."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_from_hf.py"), "--load", hf_folder,
                           "--save", save], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return save


def corpus_split(root: str, tokenizer_model: str | None = None, documents: int = 1000) -> dict:
    """Training and held-out data from disjoint documents of the built-in corpus, tokenized by
    ``tokenizer_model`` (a new sentencepiece tokenizer of 1,000 tokens when None)."""
    from data_prep.build_corpus import builtin_documents
    from data_prep.train_tokenizer import train_tokenizer
    from data_prep.preprocess import preprocess

    docs = list(itertools.islice(builtin_documents(), documents))
    cut = int(documents * 0.85)
    for name, part in (("train", docs[:cut]), ("test", docs[cut:])):
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in part)
    tok = tokenizer_model or train_tokenizer([os.path.join(root, "train.jsonl")], os.path.join(root, "tok"),
                                             vocab_size=1000, num_threads=1)
    out = {"tok": tok, "root": root}
    for name in ("train", "test"):
        out[name] = preprocess([os.path.join(root, f"{name}.jsonl")], os.path.join(root, name),
                               "GPTSentencePieceTokenizer", tok, append_eod=True, workers=0,
                               progress=False).outputs[0]
    return out
