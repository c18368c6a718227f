"""Bad checkpoints and checkpoint tools: corrupt or malicious files, another shape, an existing
--save, a bad target layout, HF folders with NaN weights or a truncated safetensors file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from tests.bad_inputs.harness import BadInput, Fixtures, python, tool

MARKER = "code_ran"  # a malicious pickle writes this file beside itself when unpickled


class _WritesMarker:
    """Unpickles into a call of ``open(path, 'w')``: proof that loading the file ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _copy_checkpoint(case_dir: Path, f: Fixtures) -> Path:
    """A private copy of the fixture checkpoint; returns its iteration folder."""
    root = case_dir / "ckpt"
    shutil.copytree(f.checkpoint, root)
    latest = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    return root / f"iter_{int(latest):07d}"


def _flip_one_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _republish(folder: Path) -> None:
    """Rewrite the manifest to match the files (as someone handing us a crafted checkpoint would)."""
    from pretrain.checkpoint import MANIFEST
    from pretrain.checkpoint.atomic import _describe_files, _files_of

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = _describe_files(str(folder), _files_of(str(folder)))
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _sizes_only_manifest(folder: Path) -> None:
    """The manifest format before checksums: sizes only."""
    from pretrain.checkpoint import MANIFEST

    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {rel: entry["size"] for rel, entry in manifest["files"].items()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _train_from(f: Fixtures, load: Path, *extra: str) -> list[str]:
    # --train-iters as the checkpoint's run (3): its LR schedule, so that the one fault is the case's
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--data-path", f.dataset,
                  "--tokenizer-model", f.tokenizer, "--split", "98,2,0", "--micro-batch-size", "2",
                  "--global-batch-size", "2", "--train-iters", "3", "--load", str(load), *extra)


def corrupt_metadata_same_size(d: Path, f: Fixtures) -> list[str]:
    folder = _copy_checkpoint(d, f)
    _flip_one_byte(folder / "model_optim" / ".metadata")
    return tool("reshard_checkpoint.py", "--load", str(d / "ckpt"), "--save", str(d / "out"), "--shrink")


def corrupt_metadata_old_manifest(d: Path, f: Fixtures) -> list[str]:
    folder = _copy_checkpoint(d, f)
    _flip_one_byte(folder / "model_optim" / ".metadata")
    _sizes_only_manifest(folder)  # a checkpoint from before checksums: only the load can tell
    return _train_from(f, d / "ckpt", "--save", str(d / "run"))


def malicious_common_pt(d: Path, f: Fixtures) -> list[str]:
    folder = _copy_checkpoint(d, f)
    torch.save({"payload": _WritesMarker(str(d / MARKER))}, folder / "model_optim" / "common.pt")
    _republish(folder)
    return _train_from(f, d / "ckpt")


def malicious_metadata(d: Path, f: Fixtures) -> list[str]:
    folder = _copy_checkpoint(d, f)
    (folder / "model_optim" / ".metadata").write_bytes(pickle.dumps(_WritesMarker(str(d / MARKER))))
    _republish(folder)
    return tool("reshard_checkpoint.py", "--load", str(d / "ckpt"), "--save", str(d / "out"), "--shrink")


def reshard_into_existing_run(d: Path, f: Fixtures) -> list[str]:
    folder = _copy_checkpoint(d, f)
    return tool("reshard_checkpoint.py", "--load", str(folder), "--save", str(d / "ckpt"), "--shrink")


def _hf_folder(d: Path) -> Path:
    folder = d / "hf"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128,
              "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_nan_weights(d: Path, f: Fixtures) -> list[str]:
    from safetensors.torch import save_file

    folder = _hf_folder(d)
    embedding = torch.zeros(128, 32)
    embedding[5, 7] = float("nan")
    save_file({"model.embed_tokens.weight": embedding}, str(folder / "model.safetensors"))
    return tool("convert_from_hf.py", "--load", str(folder), "--save", str(d / "imported"))


def hf_truncated_safetensors(d: Path, f: Fixtures) -> list[str]:
    from safetensors.torch import save_file

    folder = _hf_folder(d)
    path = folder / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(128, 32)}, str(path))
    os.truncate(path, path.stat().st_size // 2)
    return tool("convert_from_hf.py", "--load", str(folder), "--save", str(d / "imported"))


CASES = [
    BadInput("ckpt-metadata-corrupt-same-size", corrupt_metadata_same_size,
             message=r"\.metadata is corrupt \(its CRC-32 differs", leftovers=("out",)),
    BadInput("ckpt-metadata-corrupt-old-manifest", corrupt_metadata_old_manifest,
             message=r"\.metadata: corrupt checkpoint metadata", leftovers=("run",)),
    BadInput("ckpt-malicious-common-pt", malicious_common_pt,
             message=r"common\.pt: refused: it holds Python objects", leftovers=(MARKER,)),
    BadInput("ckpt-malicious-metadata", malicious_metadata,
             message=r"\.metadata: refused, not plain checkpoint metadata", leftovers=(MARKER, "out")),
    BadInput("ckpt-other-shape", lambda d, f: _train_from(f, Path(f.checkpoint), "--num-layers", "3"),
             message=r"--num-layers says num-layers 3, but the checkpoint .* \(--load\) has num-layers 4"),
    BadInput("ckpt-reshard-into-existing-run", reshard_into_existing_run,
             message=r"--save .* already exists and is not empty .* pass --overwrite",
             leftovers=("ckpt/iter_0000003.tmp",)),
    BadInput("ckpt-reshard-target-tp-zero",
             lambda d, f: tool("reshard_checkpoint.py", "--load", f.checkpoint, "--save", str(d / "out"),
                               "--target-tensor-parallel-size", "0"),
             message=r"--target-tensor-parallel-size 0: must be at least 1", leftovers=("out",)),
    BadInput("hf-import-nan-weights", hf_nan_weights,
             message=r"tensor 'model\.embed_tokens\.weight' holds 1 NaN/inf values", leftovers=("imported",)),
    BadInput("hf-import-truncated-safetensors", hf_truncated_safetensors,
             message=r"model\.safetensors: .*truncated or corrupt", leftovers=("imported",)),
]
