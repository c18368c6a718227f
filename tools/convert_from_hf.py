"""Import a HuggingFace Llama-family model (Llama, SmolLM; MHA or GQA; tied or untied) as a checkpoint.

    python tools/convert_from_hf.py --load hf_model --save ckpt \\
        [--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1]
    python tools/convert_from_hf.py --load model.Q4_1.gguf --save ckpt   # or a folder holding one

The checkpoint holds the weights only (iteration 0) and a copy of the model's tokenizer
(``ckpt/tokenizer``). ``python -m pretrain --load ckpt ...`` starts from it with a fresh optimizer
and takes the model shape and the tokenizer from it (``--tokenizer-model`` to use another). A GGUF
is dequantized by transformers' GGUF loader (the ``gguf`` package): the checkpoint computes what the
dequantized GGUF computes. The TP/PP sizes given here are checked against the model now (the
checkpoint itself loads under any layout). One process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._single_process import quiet_start, run_reporting_errors  # noqa: E402
from pretrain.config import ranged  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="HuggingFace model folder (config.json + safetensors), or a .gguf file (or a folder holding one)")
    p.add_argument("--save", required=True, help="new checkpoint folder")
    p.add_argument("--tensor-model-parallel-size", type=ranged(int, at_least=1), default=1)
    p.add_argument("--pipeline-model-parallel-size", type=ranged(int, at_least=1), default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=ranged(int, at_least=1), default=128)
    args = p.parse_args(argv)
    quiet_start()
    from pretrain.checkpoint import CheckpointError  # lazy: torch after quiet_start()
    from pretrain.interop.hf import ConversionError, import_hf  # lazy: likewise

    r, status = run_reporting_errors(lambda: import_hf(
        args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        args.make_vocab_size_divisible_by), (ConversionError, CheckpointError))
    if status:
        return status
    m = r["config"].model
    print(f"wrote {r['folder']}: {r['parameters'] / 1e6:.3f} M parameters, {m.num_layers} layers, hidden "
          f"{m.hidden_size}, heads {m.num_attention_heads} (groups {m.query_groups}), FFN {m.ffn_hidden_size}, "
          f"vocabulary {r['hf_vocab_size']} (padded to {r['vocab_size']}); "
          + (f"tokenizer {r['tokenizer']}" if r["tokenizer"] else "no tokenizer found: pass --tokenizer-model "
             "when training"))
    if r.get("quantization"):
        types = ", ".join(f"{n} x {t}" for t, n in sorted(r["quantization"].items()))
        print(f"dequantized from GGUF tensors ({types}): the checkpoint computes what the dequantized GGUF "
              "computes; the quantization error is the GGUF's own")
    return 0


if __name__ == "__main__":
    sys.exit(main())
