"""Models far bigger than memory (issue 31 item 9): a shape from flags, a HF config.json, a GGUF
header or a checkpoint's trainer state is checked against the memory available before anything
is allocated; the message names the size and what to do (no out-of-memory kill, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.bad_inputs.cases_checkpoint import _copy_checkpoint, _republish
from tests.bad_inputs.harness import BadInput, Fixtures, python, tool

# ~3.9e12 parameters (~14 TiB in fp32): more than any machine running these tests
HUGE = {"num_layers": 64, "hidden_size": 65536, "ffn_hidden_size": 262144, "num_attention_heads": 512,
        "num_query_groups": 8}
_REFUSED = r"{what}: 3,8\d\d\.\d\d B parameters held as .* needs at least [\d,.]+ GiB, more than the [\d,.]+ GiB available"


def _huge_checkpoint(d: Path, f: Fixtures) -> str:
    """The fixture checkpoint with a trainer state that describes the huge shape (manifest redone)."""
    from pretrain.checkpoint import TRAINER_STATE

    folder = _copy_checkpoint(d, f)
    state = torch.load(folder / TRAINER_STATE, weights_only=True)
    state["config"]["model"].update(HUGE)
    torch.save(state, folder / TRAINER_STATE)
    _republish(folder)
    return str(folder)


def _huge_hf(d: Path) -> str:
    folder = d / "hf"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "hidden_size": HUGE["hidden_size"], "intermediate_size": HUGE["ffn_hidden_size"],
              "num_hidden_layers": HUGE["num_layers"], "num_attention_heads": HUGE["num_attention_heads"],
              "num_key_value_heads": HUGE["num_query_groups"], "max_position_embeddings": 4096}
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(4, 8)}, str(folder / "model.safetensors"))  # read later
    return str(folder)


def _huge_gguf(d: Path) -> str:
    """A GGUF whose header describes the huge model (one tiny tensor: only the header is read)."""
    import gguf
    import numpy as np

    path = d / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(HUGE["num_layers"])
    w.add_embedding_length(HUGE["hidden_size"])
    w.add_feed_forward_length(HUGE["ffn_hidden_size"])
    w.add_head_count(HUGE["num_attention_heads"])
    w.add_head_count_kv(HUGE["num_query_groups"])
    w.add_context_length(4096)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}".encode() for i in range(512)])
    w.add_token_scores([0.0] * 512)
    w.add_token_types([1] * 512)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _train_huge(f: Fixtures) -> list[str]:
    return python("-m", "pretrain", "--model", "debug", "--seq-length", "32", "--data-path", f.dataset,
                  "--tokenizer-model", f.tokenizer, "--split", "98,2,0", "--micro-batch-size", "2",
                  "--global-batch-size", "2", "--train-iters", "2",
                  *[a for k, v in HUGE.items() for a in ("--" + k.replace("_", "-"), str(v))])


CASES = [
    BadInput("memory-train-huge-shape-flags", lambda d, f: _train_huge(f),
             message=r"the model \(3,8\d\d\.\d\d B parameters: weights, gradients and Adam state, per rank at "
                     r"TP x PP = 1\) needs at least [\d,.]+ GiB, more than the [\d,.]+ GiB available .*: a smaller "
                     r"shape"),
    BadInput("memory-import-huge-hf-config",
             lambda d, f: tool("convert_from_hf.py", "--load", _huge_hf(d), "--save", str(d / "out")),
             message=_REFUSED.format(what=r"config\.json") + r".*import it on a machine with more memory",
             leftovers=("out", "out.tmp")),
    BadInput("memory-import-huge-gguf-header",
             lambda d, f: tool("convert_from_hf.py", "--load", _huge_gguf(d), "--save", str(d / "out")),
             message=_REFUSED.format(what=r"huge\.gguf"), leftovers=("out", "out.tmp")),
    BadInput("memory-export-huge-checkpoint",
             lambda d, f: tool("convert_to_hf.py", "--load", _huge_checkpoint(d, f), "--save", str(d / "out")),
             message=_REFUSED.format(what=r"iter_0000003") + r".*convert it on a machine with more memory",
             leftovers=("out", "out.tmp")),
    BadInput("memory-evaluate-huge-checkpoint",
             lambda d, f: tool("evaluate.py", "--load", _huge_checkpoint(d, f), "--data-path", f.dataset,
                               "--seq-length", "32", "--max-samples", "4"),
             message=_REFUSED.format(what=r"iter_0000003") + r".*evaluate it over more ranks"),
]
