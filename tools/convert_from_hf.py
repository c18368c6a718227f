"""Import a HuggingFace Llama-family model (Llama, SmolLM; MHA or GQA; tied or untied) as a checkpoint.

    python tools/convert_from_hf.py --load hf_model --save ckpt \\
        [--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1]

The checkpoint holds the weights only (iteration 0). ``python -m pretrain --load ckpt ...`` starts
from it with a fresh optimizer and takes the model shape from it; use the model's tokenizer with
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model hf_model``. The TP/PP sizes given here
are checked against the model now (the checkpoint itself loads under any layout). One process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools._single_process import quiet_start, run_reporting_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="HuggingFace model folder (config.json + safetensors)")
    p.add_argument("--save", required=True, help="new checkpoint folder")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = p.parse_args(argv)
    quiet_start()
    from pretrain.hf import ConversionError, import_hf

    r, status = run_reporting_errors(lambda: import_hf(
        args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        args.make_vocab_size_divisible_by), (ConversionError,))
    if status:
        return status
    m = r["config"].model
    print(f"wrote {r['folder']}: {r['parameters'] / 1e6:.3f} M parameters, {m.num_layers} layers, hidden "
          f"{m.hidden_size}, heads {m.num_attention_heads} (groups {m.query_groups}), FFN {m.ffn_hidden_size}, "
          f"vocabulary {r['hf_vocab_size']} (padded to {r['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
