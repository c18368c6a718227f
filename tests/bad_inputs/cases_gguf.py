"""GGUF export (issue 29): an unknown ``--dtype``, an existing output file without ``--overwrite``,
a checkpoint that names no tokenizer, a ``--save`` that is a folder. Each stops with one line
naming the flag and what to do, and leaves no ``.tmp`` file. (A full disk mid-write is in
``test_output_disks.py``; an architecture llama.cpp cannot hold, in
``tests/tools/test_convert_gguf.py``.)"""

from __future__ import annotations

from pathlib import Path

from tests.bad_inputs.harness import PYTHON, ROOT, BadInput, Fixtures, tool


def _gguf(f: Fixtures, save: Path, *extra: str) -> list[str]:
    return tool("convert_to_gguf.py", "--load", f.checkpoint, "--save", str(save), "--no-progress", *extra)


def existing_output(d: Path, f: Fixtures) -> list[str]:
    (d / "model.gguf").write_text("an earlier export the user keeps")
    return _gguf(f, d / "model.gguf")


def no_tokenizer(d: Path, f: Fixtures) -> list[str]:
    """A HF model without tokenizer files, imported (the checkpoint names no tokenizer), exported."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(d / "hf")
    imported, out = d / "imported", d / "model.gguf"
    return ["sh", "-c", f"'{PYTHON}' '{ROOT}/tools/convert_from_hf.py' --load '{d}/hf' --save '{imported}' "
            f">/dev/null && '{PYTHON}' '{ROOT}/tools/convert_to_gguf.py' --load '{imported}' --save '{out}'"]


CASES = [
    BadInput("gguf-unknown-dtype", lambda d, f: _gguf(f, d / "model.gguf", "--dtype", "q4_k"),
             message=r"error: --dtype 'q4_k': choose one of f32, f16, bf16, q8_0",
             leftovers=("model.gguf", "model.gguf.tmp")),
    BadInput("gguf-existing-output", existing_output,
             message=r"error: --save .*model\.gguf already exists: choose a new name, or pass --overwrite",
             leftovers=("model.gguf.tmp",)),
    BadInput("gguf-save-is-a-folder", lambda d, f: _gguf(f, d),
             message=r"error: --save .* is a folder; give the name of the \.gguf file to write"),
    BadInput("gguf-no-tokenizer", no_tokenizer,
             message=r"error: --load .*imported/iter_0000000: the checkpoint names no tokenizer, and llama\.cpp "
                     r"needs one in the GGUF: pass the one it was trained with as --tokenizer-model",
             leftovers=("model.gguf", "model.gguf.tmp")),
]
