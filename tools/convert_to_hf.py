"""Export a checkpoint (any TP/PP; a pruned one is shrunk first) as a HuggingFace folder.

    python tools/convert_to_hf.py --load ckpt --save hf_model [--dtype bf16]

Uniform shapes give a stock ``LlamaForCausalLM`` (no remote code); per-layer shapes give a
``PrunedLlamaForCausalLM`` loaded with ``trust_remote_code=True``. The tokenizer recorded in the
checkpoint goes along (``--tokenizer-model`` if it has moved). Runs in one process.
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
    p.add_argument("--load", required=True, help="checkpoint folder (or its parent with latest_...)")
    p.add_argument("--save", required=True, help="new folder for the HuggingFace model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tokenizer-model", help="the tokenizer, when the path in the checkpoint is stale")
    p.add_argument("--no-tokenizer", action="store_true", help="export the model without a tokenizer")
    p.add_argument("--max-shard-size-gb", type=ranged(float, above=0), default=5.0,
                   help="largest safetensors file (GB)")
    args = p.parse_args(argv)
    quiet_start()
    from pretrain.checkpoint import CheckpointError  # lazy: torch after quiet_start()
    from pretrain.interop.hf import ConversionError, export_hf  # lazy: likewise

    r, status = run_reporting_errors(lambda: export_hf(
        args.load, args.save, args.dtype, args.tokenizer_model, not args.no_tokenizer,
        int(args.max_shard_size_gb * 1024**3)), (ConversionError, CheckpointError))
    if status:
        return status
    remote = " (load with trust_remote_code=True)" if r["architecture"] != "LlamaForCausalLM" else ""
    print(f"wrote {r['folder']}: {r['architecture']}{remote}, {r['parameters'] / 1e6:.3f} M parameters"
          f"{', shrunk from the pruning masks' if r['shrunk'] else ''}, vocabulary {r['vocab_size']}, "
          f"{len(r['files'])} weight file(s){', tokenizer' if r['tokenizer'] else ', no tokenizer'}; "
          f"from {r['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
