"""Export a checkpoint (any TP/PP; a pruned one is shrunk first) as a GGUF file for llama.cpp.

    python tools/convert_to_gguf.py --load ckpt --save model.gguf [--dtype f32|f16|bf16|q8_0]

Uniform shapes are written as llama.cpp's ``llama`` (``qwen2`` with q/k/v biases); per-layer
shapes as its ``deci`` (per-layer head counts, query groups and FFN widths). The tokenizer
recorded in the checkpoint is embedded (``--tokenizer-model`` if it has moved). Runs in one
process; the file appears under its name only when complete.
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
    p.add_argument("--load", required=True, help="checkpoint folder (or its parent with latest_...)")
    p.add_argument("--save", required=True, help="the .gguf file to write")
    # not argparse choices: an unknown value gets the project's one-line message, like the HF export's
    p.add_argument("--dtype", default="f16", help="f32, f16, bf16 or q8_0 (norms stay f32)")
    p.add_argument("--tokenizer-model", help="the tokenizer, when the path in the checkpoint is stale")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    quiet_start()
    from pretrain.checkpoint import CheckpointError  # lazy: torch after quiet_start()
    from pretrain.interop.gguf_export import ConversionError, export_gguf  # lazy: likewise

    r, status = run_reporting_errors(lambda: export_gguf(
        args.load, args.save, args.dtype, args.tokenizer_model, args.overwrite, not args.no_progress),
        (ConversionError, CheckpointError))
    if status:
        return status
    types = ", ".join(f"{n} {k}" for k, n in sorted(r["types"].items()))
    print(f"wrote {r['file']}: llama.cpp architecture {r['architecture']}, {r['parameters'] / 1e6:.3f} M parameters"
          f"{', shrunk from the pruning masks' if r['shrunk'] else ''}, vocabulary {r['vocab_size']} "
          f"({r['tokenizer']}), {r['bytes'] / 2**20:.1f} MiB, tensors: {types}; from {r['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
