"""Evaluate a model: held-out perplexity of a checkpoint, or lm-evaluation-harness tasks on an export.

Perplexity of a checkpoint on an indexed dataset (any TP/PP; torchrun for more than one rank)::

    python tools/evaluate.py --load ckpt --data-path data/held_out_text_document \\
        [--tensor-model-parallel-size 2] [--seq-length 2048] [--max-samples 1000]

lm-evaluation-harness on a HuggingFace export (``tools/convert_to_hf.py``); the local task
``pydoc_next_sentence`` (``eval/lm_eval_tasks``) runs offline::

    python tools/evaluate.py --hf-model hf_model --tasks pydoc_next_sentence [--limit 50]

The paper's eight common-sense tasks need their datasets from the Hub (on a machine with
internet, or with a populated HF cache), run with lm-eval's own command line::

    lm_eval --model hf --model_args pretrained=hf_model,dtype=bfloat16 \\
        --tasks arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,social_iqa,winogrande \\
        --batch_size 16

(add ``trust_remote_code=True`` to ``--model_args`` for a per-layer export).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import ranged  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCAL_TASKS = REPO / "eval" / "lm_eval_tasks"


def _local_task_dir(out: str) -> str:
    """The local tasks with their data paths made absolute (lm-eval reads them relative to the cwd)."""
    for yaml_path in LOCAL_TASKS.glob("*/*.yaml"):
        text = yaml_path.read_text().replace("eval/lm_eval_tasks/", str(LOCAL_TASKS) + "/")
        target = Path(out) / yaml_path.parent.name
        target.mkdir(parents=True, exist_ok=True)
        (target / yaml_path.name).write_text(text)
    return out


def run_lm_eval(hf_model: str, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                trust_remote_code: bool = True, device: str | None = None) -> dict:
    """lm-evaluation-harness on an exported folder; returns {task: {metric: value}}."""
    if not os.path.isfile(os.path.join(hf_model, "config.json")):
        raise SystemExit(f"error: --hf-model {hf_model}: no config.json (export with tools/convert_to_hf.py)")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks only; never reach for the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as include:
        manager = TaskManager(include_path=_local_task_dir(include))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise SystemExit(f"error: --tasks {','.join(unknown)}: unknown to lm-eval and not in {LOCAL_TASKS}")
        model_args = f"pretrained={os.path.abspath(hf_model)},dtype=float32"
        if trust_remote_code:
            model_args += ",trust_remote_code=True"
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
            batch_size=batch_size, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k}
            for task, metrics in results["results"].items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", help="checkpoint for held-out perplexity")
    p.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), as for pretraining")
    p.add_argument("--tokenizer-type")
    p.add_argument("--tokenizer-model", help="default: the tokenizer recorded in the checkpoint")
    p.add_argument("--tensor-model-parallel-size", type=ranged(int, at_least=1), default=1)
    p.add_argument("--pipeline-model-parallel-size", type=ranged(int, at_least=1), default=1)
    p.add_argument("--micro-batch-size", type=ranged(int, at_least=1), default=1)
    p.add_argument("--seq-length", type=ranged(int, at_least=1))
    p.add_argument("--max-samples", type=ranged(int, at_least=1), help="evaluate at most this many sequences")
    p.add_argument("--data-cache-path", help="where the dataset's index cache goes (default: beside the dataset)")
    p.add_argument("--hf-model", help="HuggingFace folder for lm-evaluation-harness tasks")
    p.add_argument("--tasks", default="pydoc_next_sentence", help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=ranged(int, at_least=1), help="lm-eval: at most this many documents per task")
    p.add_argument("--batch-size", type=ranged(int, at_least=1), default=8, help="lm-eval batch size")
    p.add_argument("--output", help="write the results here as JSON")
    args = p.parse_args(argv)
    if bool(args.load) == bool(args.hf_model):
        p.error("give either --load (with --data-path) for perplexity, or --hf-model for lm-eval tasks")
    from pretrain.outputs import OutputError, require_writable, write_output_file

    try:
        if args.output:  # before the evaluation, not after it
            require_writable(args.output, "--output", folder=False)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    if args.hf_model:
        results = run_lm_eval(args.hf_model, [t for t in args.tasks.split(",") if t], args.limit, args.batch_size)
        for task, metrics in results.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    else:
        if not args.data_path:
            p.error("--load needs --data-path (an indexed dataset to evaluate on)")
        from data_prep.tokenizers import TokenizerError
        from pretrain.checkpoint import CheckpointError
        from pretrain.config import ConfigError
        from pretrain.distributed import destroy_distributed, print_rank0
        from pretrain.evaluate import evaluate_perplexity

        try:
            results = evaluate_perplexity(
                args.load, args.data_path, args.tokenizer_type, args.tokenizer_model,
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.micro_batch_size,
                args.seq_length, args.max_samples, args.data_cache_path)
        except (ConfigError, CheckpointError, TokenizerError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            destroy_distributed()
        results.pop("layout")
        print_rank0(f"{results['checkpoint']}: loss {results['loss']:.4f}, perplexity {results['perplexity']:.3f} "
                    f"over {results['samples']} sequences ({results['tokens']:,} tokens)")
    if args.output:
        try:
            write_output_file(args.output, json.dumps(results, indent=2), "--output")
        except OutputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
