"""GGUF export (tools/convert_to_gguf.py, pretrain/interop/gguf_export.py), checked by llama.cpp
itself: tiny models of every shape we make (uniform GQA, per-layer heads/groups/FFN widths with
Llama 3 RoPE scaling and untied embeddings, a pruned hidden width that is not a multiple of the
heads, Qwen2 q/k/v biases) are imported, exported, loaded by llama.cpp (built here once and
cached: ``tools/build_llama_cpp.py``; the first test that needs it builds it, ~3 min) and must
reproduce our next-token log-probabilities and greedy text.

Tolerances. f32: the largest absolute difference of a log-probability over the whole vocabulary,
every position of three prompts, below 1e-4 (measured <= 1e-5: the same f32 arithmetic in another
order), and greedy ids and text identical. q8_0: the largest difference over our top-20 tokens at
every position below 0.35 (measured 0.17-0.20 on these tiny models, whose weights are sharpened
to std 0.15: q8_0's own rounding)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.dist_helper import run_distributed

pytestmark = [pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F32_TOLERANCE = 1e-4
Q8_0_TOP20_TOLERANCE = 0.35
TEXTS = ("The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2  # 12345",
         "Debian is a free operating system, developed by volunteers.")
GREEDY_TOKENS = 8
# the shapes of the tiny models (hidden, heads, groups, FFN, head size, per-layer widths or None)
CASES = {
    "uniform": dict(hidden=64, heads=4, groups=2, ffn=128, head_dim=16, layers=None),
    # per layer (heads, groups, FFN); an FFN width that is not whole q8_0 blocks
    "per_layer": dict(hidden=64, heads=6, groups=3, ffn=128, head_dim=16,
                      layers=[(6, 3, 128), (2, 1, 48), (4, 2, 96)]),
    # hidden pruned to 40 with 3 heads of 16: not hidden / heads (llama.cpp's default head size)
    "hidden": dict(hidden=40, heads=3, groups=1, ffn=64, head_dim=16, layers=None),
    "qwen2": dict(hidden=64, heads=4, groups=2, ffn=128, head_dim=16, layers=None),
    # a Qwen2 pruned per layer: q/k/v biases in llama.cpp's ``deci`` (its RoPE, not Qwen2's)
    "per_layer_qwen2": dict(hidden=64, heads=4, groups=2, ffn=128, head_dim=16, layers=[(4, 2, 128), (2, 1, 64)],
                            qkv_bias=True),
}


def _hf_folder(case: str, folder: str, tokenizer_model: str, vocab: int = 1000) -> str:
    """A random HF model of the case's shape (weights sharpened: std 0.15, so that the next-token
    distributions are peaked and greedy text is not decided by rounding), with the tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    from pretrain.config import ModelConfig
    from pretrain.interop.hf_export import REMOTE_CODE, hf_config_dict

    c = CASES[case]
    torch.manual_seed(7)
    common = dict(vocab_size=vocab, hidden_size=c["hidden"], intermediate_size=c["ffn"], num_hidden_layers=2,
                  num_attention_heads=c["heads"], num_key_value_heads=c["groups"], max_position_embeddings=256,
                  initializer_range=0.15, tie_word_embeddings=True)
    if case == "uniform":
        LlamaForCausalLM(LlamaConfig(**common, head_dim=c["head_dim"])).save_pretrained(folder)
    elif case == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # biases that matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
        model.save_pretrained(folder)
    else:
        shapes = [{"num_attention_heads": h, "num_query_groups": g, "ffn_hidden_size": f}
                  for h, g, f in c["layers"]] if c["layers"] else None
        qwen2 = c.get("qkv_bias", False)  # Qwen2's RoPE base, no Llama 3 scaling, tied output
        model_cfg = ModelConfig(num_layers=len(shapes) if shapes else 2, hidden_size=c["hidden"],
                                num_attention_heads=c["heads"], num_query_groups=c["groups"],
                                ffn_hidden_size=c["ffn"], kv_channels=c["head_dim"], seq_length=256,
                                untie_embeddings_and_output_weights=bool(shapes) and not qwen2, layer_shapes=shapes,
                                use_rope_scaling=bool(shapes) and not qwen2, rope_scaling_factor=8.0,
                                rotary_base=1000000.0 if qwen2 else 500000.0, add_qkv_bias=qwen2)
        os.makedirs(folder)
        config = hf_config_dict(model_cfg, vocab, {}, torch.float32)
        config["initializer_range"] = 0.15
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        for file in os.listdir(REMOTE_CODE):
            if file.endswith(".py"):
                shutil.copyfile(os.path.join(REMOTE_CODE, file), os.path.join(folder, file))
        loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_config(loaded, trust_remote_code=True)
        with torch.no_grad():  # biases that matter
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    p.normal_(0, 0.3)
        # the weights alone: transformers' save_pretrained re-validates the config and refuses 64 / 6
        save_file({k: v.contiguous() for k, v in model.state_dict().items()
                   if not (k == "lm_head.weight" and config["tie_word_embeddings"])},
                  os.path.join(folder, "model.safetensors"))
    shutil.copyfile(tokenizer_model, os.path.join(folder, "tokenizer.model"))
    return folder


class OurModel:
    """Our model on a checkpoint's weights (shrunk if masked), fp32, one process."""

    def __init__(self, load: str, vocab: int):
        from pretrain.checkpoint.full_weights import build_single, load_full_weights

        weights = load_full_weights(load)
        self.model, self.vocab = build_single(weights.config.model, weights.vocab_size), vocab
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(weights.tensors[name])

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        """Next-token log-probabilities at every position."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :, :self.vocab]
        return torch.log_softmax(logits.double(), -1)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(self.log_probs(out)[-1].argmax()))
        return out[len(ids):]


class LlamaCpp:
    """A GGUF loaded by llama.cpp (f32 KV cache: the comparison measures the weights' format, not
    the cache's)."""

    def __init__(self, path: str, n_ctx: int = 256):
        import numpy as np

        from tools.build_llama_cpp import import_llama_cpp

        self._np = np
        self.lib = import_llama_cpp()
        f32 = self.lib.GGML_TYPE_F32
        self.llm = self.lib.Llama(path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1,
                                  n_threads_batch=1, type_k=f32, type_v=f32)

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        scores = torch.tensor(self._np.array(self.llm.scores[:len(ids)]), dtype=torch.float64)
        return torch.log_softmax(scores, -1)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(self._np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "replace")

    def close(self) -> None:
        self.llm.close()  # before the interpreter exits: its finaliser raises at shutdown otherwise


def log_prob_diff(theirs: torch.Tensor, ours: torch.Tensor, top: int | None = None) -> float:
    """The largest absolute difference of log-probabilities: over the whole vocabulary, or over our
    ``top`` most likely tokens at each position."""
    if top is None:
        return float((theirs - ours).abs().max())
    idx = ours.topk(top, -1).indices
    return float((theirs.gather(-1, idx) - ours.gather(-1, idx)).abs().max())


def compare(gguf: str, load: str, prompts: list[list[int]], vocab: int, greedy: bool = True) -> dict:
    cpp, ours = LlamaCpp(gguf), OurModel(load, vocab)
    try:
        out = {"max_diff": 0.0, "top20_diff": 0.0}
        for p in prompts:
            theirs, mine = cpp.log_probs(p), ours.log_probs(p)
            out["max_diff"] = max(out["max_diff"], log_prob_diff(theirs, mine))
            out["top20_diff"] = max(out["top20_diff"], log_prob_diff(theirs, mine, top=20))
        if greedy:
            out["greedy_cpp"] = [cpp.greedy(p, GREEDY_TOKENS) for p in prompts]
            out["greedy_ours"] = [ours.greedy(p, GREEDY_TOKENS) for p in prompts]
            # the whole text: llama.cpp keeps the space a first piece's "▁" stands for, sentencepiece drops it
            out["text_cpp"] = [cpp.detokenize(p + g).removeprefix(" ") for p, g in zip(prompts, out["greedy_cpp"])]
        out["tokens_cpp"] = [cpp.tokenize(t) for t in TEXTS]
        return out
    finally:
        cpp.close()


def export_worker(tokenizer_model: str, root: str) -> dict:
    import gguf

    from data_prep.tokenizers import build_tokenizer
    from pretrain.interop.gguf_export import export_gguf
    from pretrain.interop.hf_import import import_hf
    from pretrain.checkpoint.full_weights import load_full_weights

    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model)
    prompts = [tok.tokenize(t) for t in TEXTS]
    out = {"tokens_ours": prompts, "text_ours": {}}
    for case in CASES:
        import_hf(_hf_folder(case, f"{root}/hf_{case}", tokenizer_model), f"{root}/{case}")
        summary = export_gguf(f"{root}/{case}", f"{root}/{case}.gguf", "f32", progress=False)
        reader = gguf.GGUFReader(f"{root}/{case}.gguf")
        arch = summary["architecture"]
        fields = {k: reader.fields[f"{arch}.{k}"].contents() for k in (
            "attention.head_count", "attention.head_count_kv", "feed_forward_length", "attention.key_length")}
        out[case] = {"summary": summary, "fields": fields, "f32": compare(f"{root}/{case}.gguf", f"{root}/{case}",
                                                                          prompts, 1000),
                     "biases": sum(t.name.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias"))
                                   for t in reader.tensors)}
        out["text_ours"][case] = [tok.detokenize(p + g) for p, g in zip(prompts, out[case]["f32"]["greedy_ours"])]
        for dtype in {"uniform": ("q8_0", "f16", "bf16"), "per_layer": ("q8_0",)}.get(case, ()):
            low = export_gguf(f"{root}/{case}", f"{root}/{case}_{dtype}.gguf", dtype, progress=False)
            out[case][dtype] = {"summary": low, **compare(f"{root}/{case}_{dtype}.gguf", f"{root}/{case}", prompts,
                                                          1000, greedy=False)}
    # ours -> GGUF -> ours (our GGUF reader: through transformers, or our own for deci): the same
    # weights and shape come back; q8_0 within its rounding
    out["round_trip"] = {}
    for case, file in (("uniform", "uniform"), ("per_layer", "per_layer"), ("per_layer_qwen2", "per_layer_qwen2"),
                       ("per_layer", "per_layer_q8_0")):
        import_hf(f"{root}/{file}.gguf", f"{root}/back_{file}")
        exported, back = load_full_weights(f"{root}/{case}"), load_full_weights(f"{root}/back_{file}")
        out["round_trip"][file] = {
            "diff": {n: float((t[:1000] - back.tensors[n][:1000]).abs().max()) for n, t in exported.tensors.items()},
            "missing": sorted(set(exported.tensors) ^ set(back.tensors)),
            "shape": (back.config.model.layer_widths(), back.config.model.add_qkv_bias,
                      back.config.model.use_rope_scaling) == (exported.config.model.layer_widths(),
                                                              exported.config.model.add_qkv_bias,
                                                              exported.config.model.use_rope_scaling)}
    return out


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    from tools.build_llama_cpp import ensure_llama_cpp

    ensure_llama_cpp()  # the build (once per machine) is not a test's time
    root = str(tmp_path_factory.mktemp("gguf_export"))
    return run_distributed(export_worker, 1, tiny_tokenizer, root)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_reproduces_our_log_probs_and_greedy_text(exported, case):
    r = exported[case]["f32"]
    assert r["max_diff"] < F32_TOLERANCE, r["max_diff"]
    assert r["greedy_cpp"] == r["greedy_ours"]
    assert r["text_cpp"] == exported["text_ours"][case]


@pytest.mark.parametrize("case", ["uniform", "per_layer"])
def test_q8_0_stays_close(exported, case):
    r = exported[case]["q8_0"]
    assert F32_TOLERANCE < r["top20_diff"] < Q8_0_TOP20_TOLERANCE, r  # quantized, and close
    # q8_0 where rows are whole 32-value blocks; the per-layer FFN width 48 stays f16; norms f32
    assert r["summary"]["types"].get("Q8_0", 0) >= 8 and r["summary"]["types"]["F32"] >= 5
    assert r["summary"]["bytes"] < 0.4 * exported[case]["summary"]["bytes"]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_f16_and_bf16_load_and_stay_close(exported, dtype):
    r = exported["uniform"][dtype]
    assert F32_TOLERANCE < r["top20_diff"] < Q8_0_TOP20_TOLERANCE, r
    assert r["summary"]["types"] == {dtype.upper(): 15, "F32": 5}


def test_architectures_and_per_layer_arrays(exported):
    assert exported["uniform"]["summary"]["architecture"] == "llama"
    assert exported["qwen2"]["summary"]["architecture"] == "qwen2"
    assert exported["per_layer_qwen2"]["summary"]["architecture"] == "deci"
    assert exported["per_layer_qwen2"]["fields"]["attention.head_count"] == [4, 2]
    assert exported["per_layer_qwen2"]["biases"] == 2 * 3  # q, k and v of each layer went into the file
    assert exported["hidden"]["summary"]["architecture"] == "llama"
    per_layer = exported["per_layer"]
    assert per_layer["summary"]["architecture"] == "deci"
    assert per_layer["fields"]["attention.head_count"] == [6, 2, 4]
    assert per_layer["fields"]["attention.head_count_kv"] == [3, 1, 2]
    assert per_layer["fields"]["feed_forward_length"] == [128, 48, 96]
    assert exported["hidden"]["fields"]["attention.key_length"] == 16  # not 40 / 3


def test_llama_cpp_tokenizes_like_ours(exported):
    for case in CASES:
        assert exported[case]["f32"]["tokens_cpp"] == exported["tokens_ours"], case


@pytest.mark.parametrize("file", ["uniform", "per_layer", "per_layer_qwen2"])
def test_ours_to_gguf_to_ours_is_exact(exported, file):
    """f32 GGUF read back: every weight exact, the same per-layer shape, biases and RoPE scaling
    (deci, llama.cpp's per-layer architecture, which transformers does not read, by our reader)."""
    r = exported["round_trip"][file]
    assert r["diff"] and max(r["diff"].values()) == 0.0 and not r["missing"] and r["shape"], r


def test_a_q8_0_per_layer_gguf_reads_back_within_its_rounding(exported):
    r = exported["round_trip"]["per_layer_q8_0"]
    assert not r["missing"] and r["shape"], r
    # q8_0: a block's 32 values share one scale, max|w| / 127; the random weights have std 0.15
    assert 0.0 < max(r["diff"].values()) < 0.01, r["diff"]


def test_what_llama_cpp_cannot_hold_is_refused_naming_the_field():
    from pretrain.config import ModelConfig
    from pretrain.interop.gguf_export import ConversionError, _pre_tokenizer, check_expressible

    deep = ModelConfig(num_layers=513, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=32)
    with pytest.raises(ConversionError, match=r"ckpt: cannot be written as GGUF: num_layers 513 \(llama\.cpp holds "
                                              r"at most 512 layers"):
        check_expressible(deep, "ckpt")
    assert _pre_tokenizer({"type": "ByteLevel", "use_regex": True}, "t.json") == "gpt-2"
    assert _pre_tokenizer({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}, "t.json") == "smollm"
    with pytest.raises(ConversionError, match=r"t\.json: its pre_tokenizer .*Metaspace.* is not one llama\.cpp names"):
        _pre_tokenizer({"type": "Metaspace", "replacement": "▁"}, "t.json")


def masked_worker(ckpt: str, tokenizer_model: str, root: str) -> dict:
    from data_prep.tokenizers import build_tokenizer
    from pretrain.interop.gguf_export import export_gguf
    from tests.tools.test_convert_hf import _our_logits

    prompts = [build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model).tokenize(t) for t in TEXTS]
    summary = export_gguf(ckpt, f"{root}/masked.gguf", "f32", progress=False)
    cpp = LlamaCpp(f"{root}/masked.gguf")
    try:
        diff = 0.0
        for p in prompts:
            # the checkpoint as it trains: full shape, masks applied
            ours = torch.log_softmax(_our_logits(ckpt, torch.tensor([p]))[0, :, :1000].double(), -1)
            diff = max(diff, float((cpp.log_probs(p) - ours).abs().max()))
    finally:
        cpp.close()
    return {"summary": summary, "max_diff": diff}


def test_a_masked_checkpoint_is_shrunk_on_the_way(tiny_dataset, tmp_path):
    """A pruning run's checkpoint (masks, not shrunk: per-layer heads, FFN and hidden) exports to a
    GGUF that llama.cpp computes like the masked model it trained."""
    import subprocess
    import sys

    from tests.dist_helper import subprocess_env

    save = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, "-m", "pretrain", "--model", "debug", "--seq-length", "32",
                           "--data-path", tiny_dataset["prefix"], "--tokenizer-model", tiny_dataset["tokenizer"],
                           "--split", "98,2,0", "--micro-batch-size", "2", "--global-batch-size", "2",
                           "--train-iters", "3", "--lr", "1e-3", "--save", str(save), "--save-interval", "3",
                           "--prune-target-ratio", "0.6", "--prune-start-tokens", "0", "--prune-end-tokens", "128",
                           "--prune-interval", "1"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = run_distributed(masked_worker, 1, str(save), tiny_dataset["tokenizer"], str(tmp_path))[0]
    assert r["summary"]["shrunk"] and r["summary"]["architecture"] == "deci", r["summary"]
    assert r["max_diff"] < F32_TOLERANCE, r["max_diff"]
