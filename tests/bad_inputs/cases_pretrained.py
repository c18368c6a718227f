"""The pretrained-parent workflow (issue 20): GGUF files we cannot import, shape flags that
contradict the --load checkpoint, and a tokenizer that did not make the data."""

from __future__ import annotations

from pathlib import Path

from tests.bad_inputs.harness import BadInput, Fixtures, python, tool


def _gguf(path: Path, architecture: str, quantization: str = "F32") -> Path:
    """A one-tensor GGUF file with this architecture and tensor type."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    if quantization == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    else:  # raw blocks: 40 bytes is one Q8_1 block of 32 values
        writer.add_tensor("token_embd.weight", np.zeros((4, 40), np.uint8),
                          raw_dtype=getattr(GGMLQuantizationType, quantization))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_deci_linear_attention(d: Path, f: Fixtures) -> list[str]:
    """A deci file (llama.cpp's per-layer architecture) whose second block is deci's linear
    attention (query heads, no key/value heads): not a block our model computes."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(d / "model.gguf"), "deci")
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_head_count([2, 2])
    writer.add_head_count_kv([1, 0])
    writer.add_feed_forward_length([16, 16])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tool("convert_from_hf.py", "--load", str(d / "model.gguf"), "--save", str(d / "out"))


def gguf_other_architecture(d: Path, f: Fixtures) -> list[str]:
    return tool("convert_from_hf.py", "--load", str(_gguf(d / "model.gguf", "gpt2")), "--save", str(d / "out"))


def gguf_unsupported_quantization(d: Path, f: Fixtures) -> list[str]:
    (d / "hf").mkdir()
    _gguf(d / "hf" / "model.Q8_1.gguf", "llama", "Q8_1")
    return tool("convert_from_hf.py", "--load", str(d / "hf"), "--save", str(d / "out"))


def data_made_by_another_tokenizer(d: Path, f: Fixtures) -> list[str]:
    from tokenizers import Tokenizer, models

    (d / "hf").mkdir()
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>")).save(str(d / "hf" / "tokenizer.json"))
    return python("-m", "pretrain", "--load", f.checkpoint, "--data-path", f.dataset, "--tokenizer-model",
                  str(d / "hf"), "--split", "98,2,0", "--seq-length", "32", "--micro-batch-size", "2",
                  "--global-batch-size", "2", "--train-iters", "4", "--save", str(d / "run"))


CASES: list[BadInput] = [
    BadInput("pretrained-gguf-other-architecture", gguf_other_architecture,
             message=r"model\.gguf: GGUF architecture 'gpt2' is not supported", leftovers=("out", "out.tmp")),
    BadInput("pretrained-gguf-deci-linear-attention", gguf_deci_linear_attention,
             message=r"model\.gguf: a layer without attention or FFN \(deci's linear-attention or no-op blocks\) is "
                     r"not a model ours computes", leftovers=("out", "out.tmp")),
    BadInput("pretrained-gguf-unsupported-quantization", gguf_unsupported_quantization,
             message=r"model\.Q8_1\.gguf: quantization type\(s\) Q8_1 cannot be dequantized",
             leftovers=("out", "out.tmp")),
    BadInput("pretrained-preset-contradicts-checkpoint",
             lambda d, f: python("-m", "pretrain", "--model", "smollm-135m", "--load", f.checkpoint, "--mock-data",
                                 "--train-iters", "2"),
             message=r"--model smollm-135m says num-layers 30, but the checkpoint .* \(--load\) has num-layers 4"),
    BadInput("pretrained-data-made-by-another-tokenizer", data_made_by_another_tokenizer,
             message=r"the data was made with 1000 tokens .*not with the tokenizer .*hf/tokenizer\.json \(3 tokens\)",
             leftovers=("run",)),
]
