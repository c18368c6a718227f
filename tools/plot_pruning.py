"""Plots of a pruning run from its ``pruning_history.jsonl`` (written in --tensorboard-dir).

    python tools/plot_pruning.py RUN_DIR [--out RUN_DIR/plots]

Writes ``saliency.png`` (mean saliency per parameter of each type over tokens),
``kept_ratio.png`` (kept fraction of heads, FFN channels, hidden channels and parameters over
tokens) and ``layers.png`` (per-layer kept query groups and FFN width at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.outputs import require_writable  # noqa: E402


def load_history(run_dir: str) -> list[dict]:
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "pruning_history.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give the run's --tensorboard-dir")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    by_iter = {r["iteration"]: r for r in rows}  # a resumed run may repeat events: keep the last
    return [by_iter[i] for i in sorted(by_iter)]


def plot(run_dir: str, out_dir: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = load_history(run_dir)
    if not history:
        raise ValueError("the pruning history is empty")
    base = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    out_dir = out_dir or os.path.join(base, "plots")
    require_writable(out_dir, "--out")
    os.makedirs(out_dir, exist_ok=True)
    tokens = [r["tokens"] / 1e6 for r in history]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("heads", "ffn", "hidden"):
        ax.plot(tokens, [r["mean_saliency"].get(kind, 0) for r in history], marker="o", label=kind)
    ax.set_xlabel("tokens (M)"); ax.set_ylabel("mean saliency per parameter (kept groups)")
    ax.set_yscale("log"); ax.legend(); ax.set_title("saliency by group type")
    written.append(os.path.join(out_dir, "saliency.png")); fig.tight_layout(); fig.savefig(written[-1]); plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("heads", "ffn", "hidden"):
        ax.plot(tokens, [r[f"kept_{kind}"] for r in history], marker="o", label=f"kept {kind}")
    p0 = history[0].get("initial_params", history[0]["params"])
    ax.plot(tokens, [r["params"] / max(r.get("initial_params", p0), 1) for r in history],
            "k--", label="parameters (fraction of the initial model)")
    ax.set_xlabel("tokens (M)"); ax.set_ylabel("kept fraction"); ax.set_ylim(0, 1.05)
    ax.legend(); ax.set_title("pruning ratio by type")
    written.append(os.path.join(out_dir, "kept_ratio.png")); fig.tight_layout(); fig.savefig(written[-1]); plt.close(fig)

    last = history[-1]["kept_per_layer"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(range(len(last["heads"])), last["heads"]); axes[0].set_title("kept query groups per layer")
    axes[1].bar(range(len(last["ffn"])), last["ffn"]); axes[1].set_title("FFN width per layer")
    for a in axes:
        a.set_xlabel("layer")
    fig.suptitle(f"architecture after pruning (hidden {last['hidden']})")
    written.append(os.path.join(out_dir, "layers.png")); fig.tight_layout(); fig.savefig(written[-1]); plt.close(fig)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out")
    args = p.parse_args(argv)
    try:
        for path in plot(args.run_dir, args.out):
            print(f"wrote {path}")
    except (FileNotFoundError, ValueError) as err:  # OutputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
