"""Pruning-aware pretraining against matched-compute baselines, on your data, published as measured.

    python tools/compare_baselines.py --recipe cpu-small --data-path data/train_text_document \\
        --tokenizer-model tok.model --test-data-path data/held_out_text_document --seeds 3 --out cmp/

Runs (each an ordinary ``python -m pretrain`` whose command is ``OUT/<run>/seed<k>/command.sh``):
``parent`` (the large shape, first P tokens), ``A`` (pruning-aware continued pretraining from it),
``A0`` (the same from random init), ``C`` (prune once after training), ``B-found`` and ``B-hand``
(the found shape and a hand shape from scratch, at matched tokens (i) and matched FLOPs (ii)).
See ``pretrain/compare/arms.py`` for the exact definitions and ``docs/RESULTS.md`` for a result.

A released model as the parent (``--recipe cpu-real``, ``cpu-real-70``, ``gpu-real``, ``cpu-tiny-real``)::

    python tools/convert_from_hf.py --load SmolLM2-135M.Q4_1.gguf --save parent_ckpt
    python tools/compare_baselines.py --recipe cpu-real --parent parent_ckpt --data-path data/train_text_document \
        --test-data-path data/held_out_text_document --seeds 1 --out cmp_real/

The parent is free (its FLOPs are not charged) and every arm starts from it: ``A`` and ``A-KD``
(pruning-aware continued pretraining, without and with distillation from it), ``M``, ``M-CE``,
``M-OBS`` (Minitron's one-shot prune, then KD, CE, or KD after OBS compensation), references
``parent``, ``parent-cont`` and ``scratch``; the data must be tokenized with the parent's tokenizer.

Learning rates are swept on seed 0 at a shorter horizon and chosen on the validation split of
the training data (``--lr RATE``: one rate for every run, no sweep); the test set
(``--test-data-path``) is only ever measured. ``OUT/report.md``
and ``OUT/report.json`` hold the table; ``--resume`` continues an interrupted comparison.
``--launcher slurm`` submits every run as a Slurm job, chained by dependencies
(``slurm/compare_baselines.sbatch``); ``--dry-run`` prints the plan (and the sbatch lines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import atomic_write_text  # noqa: E402
from pretrain.compare import arms  # noqa: E402
from pretrain.compare.arms import ARMS, Context, Data, family_of  # noqa: E402
from pretrain.compare.campaign import (Campaign, check_corpus, check_parent, check_parent_tokenizer,  # noqa: E402
                                       check_reachable, check_test_set, check_tokenizer,
                                       check_validation_split, format_command, hold_campaign_folder,
                                       release_campaign_folder, split_tokens_available,
                                       training_tokens_available)
from pretrain.compare.recipes import RECIPES, get_recipe  # noqa: E402
from pretrain.compare.report import write_report  # noqa: E402
from pretrain.config import ConfigError, DataConfig, ranged  # noqa: E402
from pretrain.errors import BenchmarkError  # noqa: E402
from pretrain.outputs import require_writable  # noqa: E402
from pretrain.run import run_lock  # noqa: E402
from pretrain.run.arguments import build_parser as pretrain_parser, config_from_args  # noqa: E402

# what must not change when a comparison is resumed
_SETTINGS = ("recipe", "data_path", "tokenizer_model", "tokenizer_type", "test_data_path", "seeds", "parent",
             "train_tokens", "target_ratio", "lr")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/compare_baselines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--data-path", nargs="+", required=True, help="training data (PREFIX or W1 PREFIX1 ...)")
    p.add_argument("--parent", metavar="CKPT", help="an imported pretrained model (tools/convert_from_hf.py): the "
                   "parent of the real-parent recipes (cpu-real, cpu-real-70, gpu-real, cpu-tiny-real)")
    p.add_argument("--tokenizer-model", help="the data's tokenizer (a trained-parent recipe); with --parent, the "
                   "parent's own is used")
    p.add_argument("--tokenizer-type", help="default: from the tokenizer file, as in python -m pretrain")
    p.add_argument("--test-data-path", nargs="+", required=True,
                   help="held-out data that no run trains or selects on (not a --data-path prefix)")
    p.add_argument("--seeds", type=ranged(int, at_least=1), default=3, help="seeds 0..N-1; every run is repeated per seed")
    p.add_argument("--out", required=True, help="folder of the comparison")
    p.add_argument("--arms", help=f"comma-separated, from {', '.join(ARMS)} (what they need is added; "
                   f"{', '.join(arms.OPT_IN)} only when named); a real-parent recipe: from "
                   f"{', '.join(arms.REAL_ARMS)} (default: all)")
    p.add_argument("--train-tokens", type=lambda x: int(float(x)), help="T, the tokens every arm trains after the "
                   "parent (default: the recipe's)")
    p.add_argument("--target-ratio", type=float, help="the pruned arms' final parameters / the parent's "
                   "(default: the recipe's)")
    p.add_argument("--lr", type=ranged(float, above=0), help="one learning rate for every arm, no sweep "
                   "(default: the recipe's rates, swept per arm family on seed 0 at a shorter horizon and chosen "
                   "on the validation split): e.g. the rate an earlier campaign's sweeps chose for every family, given again on another "
                   "machine (where they chose different rates, copy the sweeps' records instead: "
                   "tools/campaign_records.py)")
    p.add_argument("--tasks", help="the benchmarks each finished run's final checkpoint (and the parent) is scored on "
                   "by tools/evaluate.py, into RUN/seedK/tasks.json and the report's task table (tools/evaluate.py "
                   "--tasks names: paper = the seven common-sense tasks, mmlu, ...; none: no scoring; default: the "
                   "recipe's, paper). Not a setting of the comparison: --resume with other tasks scores them")
    p.add_argument("--task-limit", type=ranged(int, at_least=1), help="the first N documents of each task, the same "
                   "for every run (default: the recipe's: 4 for cpu-tiny and cpu-tiny-real, 100 for cpu-small, "
                   "cpu-real and cpu-real-70, 1000 for the GPU recipes)")
    p.add_argument("--final-test-samples", type=ranged(int, at_least=0), help="each finished run's final checkpoint "
                   "(and the parent) measured on the first N sequences of --test-data-path by tools/evaluate.py, into "
                   "RUN/seedK/final_test.json and the report's final test table: the in-run test loss is a few batches "
                   "(default: the recipe's: 256 for cpu-real and cpu-real-70, 1024 for gpu-real, 8 for cpu-tiny-real, "
                   "0 (none) for the trained-parent recipes). Not a setting of the comparison: --resume with another N "
                   "measures again")
    p.add_argument("--task-curve-interval", type=ranged(int, at_least=0), help="the task curve: every run also scores "
                   "the --tasks (on the same documents) during training, at its evaluations of every N iterations and "
                   "at its end (python -m pretrain --eval-tasks-interval), into its tb/evals.jsonl, the report's "
                   "task-curve table and task_curves.png; a multiple of the recipe's evaluation interval; 0: none "
                   "(default: the recipe's: 800 for gpu-real, 4 for cpu-tiny-real, 0 otherwise). Each point is a "
                   "forward pass per scored row: seconds on a GPU, ~10 minutes for the 135M model at 100 documents "
                   "per task on 2 CPU cores. Training is the same with or without it and the scoring's time is kept "
                   "apart from the runs' (the report's CPU seconds are training's). Not a setting of the comparison: "
                   "runs finished before have no curve")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--resume", action="store_true", help="continue the comparison in --out")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and sbatch lines), run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    p.add_argument("--only", help=argparse.SUPPRESS)  # RUN:SEED, one Slurm job of --launcher slurm
    return p


def _settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in _SETTINGS}


def _check_out(args: argparse.Namespace) -> None:
    plan_path = os.path.join(args.out, "plan.json")
    if os.path.isfile(plan_path):
        saved = json.load(open(plan_path))["settings"]
        if not (args.resume or args.report_only or args.only):
            raise ConfigError(f"--out {args.out} holds a comparison already: add --resume to continue it, or give "
                              "another --out")
        changed = [k for k in _SETTINGS if saved.get(k) != _settings(args).get(k)]
        if changed:
            raise ConfigError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the "
                              f"comparison in {args.out} ({plan_path}: "
                              + "; ".join(f"{k} {saved.get(k)!r}, given {_settings(args).get(k)!r}" for k in changed)
                              + "; None: not given); resume with the same settings")
    elif os.path.isdir(args.out) and set(os.listdir(args.out)) - {run_lock.LOCK_NAME} and not args.dry_run:
        # (a lock alone: a campaign starting there now, refused by its lock, or one that died before its plan)
        raise ConfigError(f"--out {args.out} is not empty and holds no comparison: give an empty or new folder")
    if not args.dry_run:
        require_writable(args.out, "--out")


def _validate(args: argparse.Namespace):
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if args.dry_run and (args.only or args.report_only):
        raise ConfigError(f"--dry-run starts nothing, --{'only' if args.only else 'report-only'} does something: "
                          "give one of them")
    overrides = {k: v for k, v in (("continue_tokens", args.train_tokens), ("target_ratio", args.target_ratio),
                                   ("final_test_samples", args.final_test_samples),
                                   ("task_curve_interval", args.task_curve_interval),
                                   ("lrs", (args.lr,) if args.lr is not None else None))
                 if v is not None}
    recipe = get_recipe(args.recipe, **overrides)
    family = family_of(recipe)
    wanted = args.arms or ",".join(family.default_arms)
    runs, notes = arms.runs_for([a.strip() for a in wanted.split(",") if a.strip()], family)
    parent = None
    if recipe.imported_parent:
        if not args.parent:
            raise ConfigError(f"--recipe {recipe.name} starts from a released model: give --parent CKPT, a checkpoint "
                              "made by tools/convert_from_hf.py")
        if args.tokenizer_model:
            raise ConfigError(f"--tokenizer-model: --recipe {recipe.name} uses the tokenizer of --parent (the data "
                              "must be made with it); drop the flag")
        model, vocab, tokenizer = check_parent(args.parent)
        recipe = recipe.with_parent_model(model)
        check_reachable(recipe, vocab)
        parent = {"model": model, "vocab": vocab, "tokenizer": tokenizer}
        tokenizer_type, tokenizer_model = tokenizer
    else:
        if args.parent:
            raise ConfigError(f"--parent: --recipe {recipe.name} trains its own parent; the real-parent recipes are "
                              + ", ".join(n for n, r in RECIPES.items() if r.imported_parent))
        if not args.tokenizer_model:
            raise ConfigError(f"--recipe {recipe.name} needs --tokenizer-model (the tokenizer that made the data)")
        tokenizer_type, tokenizer_model = args.tokenizer_type or "GPTSentencePieceTokenizer", args.tokenizer_model
    data = DataConfig(data_path=args.data_path, tokenizer_model=tokenizer_model, tokenizer_type=tokenizer_type,
                      test_data_path=args.test_data_path)
    data.validate()
    if not recipe.imported_parent:  # a real parent's tokenizer is checked against the data by check_parent_tokenizer
        check_tokenizer(data)
    check_test_set(args.data_path, args.test_data_path)
    if parent:
        check_parent_tokenizer(args.parent, parent["tokenizer"], args.data_path, args.test_data_path)
    available = training_tokens_available(args.data_path, recipe.split)
    full = arms.total_tokens(recipe)
    # a matched-FLOPs run trains the small model longer: at most (P + T) / target ratio tokens
    longest = int(full / recipe.target_ratio) if any(r.endswith("-ii") for r in runs) else full
    try:
        check_corpus(recipe, full, available, f"a from-scratch run (P + T = {full:,} tokens)" if not parent else
                     f"every arm (T = {full:,} tokens)")
        if recipe.imported_parent:  # M and M-ii choose their shape on validation batches (Minitron's search)
            check_validation_split(recipe, longest, split_tokens_available(args.data_path, recipe.split, 1))
    except ConfigError as err:
        if not args.dry_run:
            raise
        notes.append(f"WARNING (a real run stops here): {err}")
    if longest > full and longest > available:
        notes.append(f"the matched-FLOPs runs may need up to ~{longest:,} tokens and the training split holds "
                     f"{available:,}; they are checked exactly once A has run")
    _check_out(args)
    return recipe, runs, notes, available, parent


def _tasks(args: argparse.Namespace, recipe) -> tuple[tuple[str, ...], int | None]:
    """(task names, documents per task) that every finished run is scored on: --tasks and
    --task-limit, else the recipe's; no names for --tasks none."""
    from pretrain.benchmarks import data_root, parse_tasks  # lazy: torch only when the tasks are scored
    spec = args.tasks if args.tasks is not None else recipe.tasks
    if spec.strip().lower() == "none":
        return (), None
    names = tuple(parse_tasks(spec))
    try:
        data_root()  # the benchmark data is installed: said now, not after the first run
    except BenchmarkError as err:
        raise BenchmarkError(f"--tasks {spec}: {err}; or give --tasks none to score no tasks") from None
    return names, args.task_limit if args.task_limit is not None else recipe.task_limit


def _validate_flags(recipe, ctx: Context, runs: list[str], seed: int) -> list[str]:
    """Each planned run's flags through ``python -m pretrain``'s own parser and config checks, at
    the recipe's world size (what a dry run can check before any job starts). B runs are planned
    once A has run; they are checked then."""
    lines = []
    family = family_of(recipe)
    for run in runs:
        if family.late(run):
            continue
        plan = arms.plan_run(recipe, ctx, run, seed)
        flags = list(plan.flags)
        if plan.first_load:  # the shape comes from the parent's checkpoint (the trained parent's is not there yet)
            flags += arms.shape_flags(recipe.model)
        try:
            cfg = config_from_args(pretrain_parser().parse_args(flags))
            cfg.validate(recipe.nodes * recipe.nproc_per_node)
        except ConfigError as err:
            raise ConfigError(f"run {run}: {err}") from None
        lines.append(f"{run}: flags valid for {recipe.nodes * recipe.nproc_per_node} ranks "
                     f"({plan.train_tokens:,} tokens, lr {plan.lr:g})")
    return lines


def _submit_slurm(args, recipe, runs: list[str], seeds: list[int], dry_run: bool) -> None:
    """One job per run (and per sweep rate), chained: a run starts once what it needs has finished."""
    tool = os.path.abspath(__file__)
    base = [sys.executable, tool, *sys.argv[1:]]
    base = [a for a in base if a not in ("--dry-run",)]
    if "--resume" not in base:
        base.append("--resume")
    job_ids: dict[str, str] = {}
    counter = [0]

    def submit(name: str, after: list[str], only: str | None, nodes: int) -> str:
        deps = [job_ids[a] for a in after if a in job_ids]
        cmd = ["sbatch", "--parsable", f"--job-name=cmp-{name}", f"--nodes={nodes}", f"--time={recipe.slurm_time}",
               f"--output={os.path.join(os.path.abspath(args.out), 'slurm', name + '-%j.out')}"]
        if recipe.gpus_per_node and only:
            cmd += [f"--gpus-per-node={recipe.gpus_per_node}", f"--ntasks-per-node={recipe.nproc_per_node}"]
        if deps:
            cmd.append("--dependency=afterany:" + ":".join(deps))
        inner = base + (["--only", only] if only else ["--report-only"])
        cmd.append("--wrap=" + format_command(inner))
        if dry_run:
            counter[0] += 1
            job = f"DRYRUN{counter[0]}"
            print(format_command(cmd))
        else:
            os.makedirs(os.path.join(args.out, "slurm"), exist_ok=True)
            job = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
            print(f"submitted {name}: job {job}")
        job_ids[name] = job
        return job

    family = family_of(recipe)
    sweeps: dict[str, list[str]] = {s: [] for s in family.sweeps}

    def submit_sweep(sweep: str) -> None:
        if len(recipe.lrs) > 1 and any(family.sweep_of[r] == sweep for r in runs):
            needs = [f"{n}:{seeds[0]}" for n in family.needs[family.sweep_run[sweep]]]
            for lr in recipe.lrs:
                name = f"sweep-{sweep}-lr{lr:g}"
                submit(name, needs, f"sweep:{sweep}:{lr!r}", recipe.nodes)
                sweeps[sweep].append(name)

    def submit_run(run: str, seed: int) -> None:
        needs = [f"{n}:{seed}" for n in family.submit_after(run, runs)] + sweeps.get(family.sweep_of[run], [])
        submit(f"{run}:{seed}", needs, f"{run}:{seed}", recipe.nodes)

    # the order of Campaign.run_all (Family.campaign_order); B's sweeps need A's shape on the first
    # seed, so they are submitted once its runs are
    for sweep in family.early_sweeps:
        submit_sweep(sweep)
    for run, seed in family.campaign_order(runs, seeds):
        if run is not None:
            submit_run(run, seed)
            continue
        for sweep in family.sweeps:
            if sweep not in family.early_sweeps:
                submit_sweep(sweep)
    submit("report", list(job_ids), None, 1)


def _run_only(campaign: Campaign, only: str) -> dict | None:
    """One run (a Slurm job): plan it from the results on disk, run it; its result (None: it
    could not start, its prerequisites did not finish)."""
    campaign.load_results()
    parts = only.split(":")
    family = campaign.family
    if parts[0] == "sweep":
        sweep, lr = parts[1], float(parts[2])
        return campaign.run_if_possible(family.sweep_run[sweep], campaign.seeds[0], sweep=True, lr=lr)
    run, seed = parts[0], int(parts[1])
    if run not in family.runs:
        raise ConfigError(f"--only {only}: no run {run}")
    for sweep in family.sweeps:  # a sweep whose rates all finished decides; otherwise the recipe's first
        campaign.ctx.lrs.setdefault(sweep, campaign.chosen_lr(sweep) or campaign.recipe.lrs[0])
    return campaign.run_if_possible(run, seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tasks, task_limit = _tasks(args, get_recipe(args.recipe))  # before the slower checks
        if args.task_curve_interval and not tasks:
            raise ConfigError(f"--task-curve-interval {args.task_curve_interval}: --tasks none scores no task; give "
                              "the tasks, or --task-curve-interval 0")
        recipe, runs, notes, available, parent = _validate(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds))
    tokenizer_model = parent["tokenizer"][1] if parent else args.tokenizer_model
    ctx = Context(out=os.path.abspath(args.out), launcher=args.launcher,
                  parent=os.path.abspath(args.parent) if parent else None,
                  parent_vocab=parent["vocab"] if parent else None,
                  data=Data(data_path=[os.path.abspath(p) if os.path.exists(p + ".bin") else p for p in args.data_path],
                            tokenizer_model=os.path.abspath(tokenizer_model),
                            test_data_path=[os.path.abspath(p) if os.path.exists(p + ".bin") else p
                                            for p in args.test_data_path],
                            tokenizer_type=args.tokenizer_type), tasks=tasks, task_limit=task_limit,
                  final_test_samples=recipe.final_test_samples)
    campaign = Campaign(recipe, ctx, seeds, runs)
    command = format_command(["python", "tools/compare_baselines.py", *(argv if argv is not None else sys.argv[1:])])
    for note in notes:
        print(f"note: {note}")
    if args.dry_run:
        try:
            for line in _validate_flags(recipe, ctx, runs, seeds[0]):
                print(f"checked {line}")
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.dry_run and args.launcher == "local":
        print(f"recipe {recipe.name}: {recipe.summary}")
        rates = (f"learning rate {recipe.lrs[0]:g} for every run (given; no sweep)" if len(recipe.lrs) == 1
                 else f"learning rates {', '.join(f'{lr:g}' for lr in recipe.lrs)} (swept)")
        print(f"runs {', '.join(runs)} x seeds {seeds}; {rates}; "
              f"training split holds {available:,} tokens")
        print(f"tasks: {', '.join(tasks)}, the first {task_limit or 'all'} documents of each, scored on every "
              "finished run (tools/evaluate.py; RUN/seedK/tasks.json)" if tasks else "tasks: none (--tasks none)")
        print(f"task curve: the tasks also scored by every run at its evaluations of every "
              f"{recipe.task_curve_interval} iterations and at its end" if recipe.task_curve_interval and tasks
              else "task curve: none (--tasks none)" if not tasks else "task curve: none (--task-curve-interval 0)")
        print(f"final test loss: the first {ctx.final_test_samples} sequences of --test-data-path, measured on every "
              "finished run (tools/evaluate.py; RUN/seedK/final_test.json)" if ctx.final_test_samples
              else "final test loss: the in-run measurement only (--final-test-samples 0)")
        family = family_of(recipe)
        for run in runs:
            if not family.late(run):
                plan = arms.plan_run(recipe, ctx, run, seeds[0])
                load = ["--load", plan.first_load] if plan.first_load else []
                print(f"\n# {run}, seed {seeds[0]}:\n{format_command(['python', '-m', 'pretrain', *plan.flags, *load])}")
        print("\n# B runs: planned once A has finished (the shape it found, the FLOPs it spent)" if family.name == "trained"
              else "\n# -ii runs: planned once the pruned arms have finished (the FLOPs budget to match)")
        return 0
    # One campaign per --out (a local one holds the lock for its life; a Slurm submission checks
    # that no local one runs there; the Slurm jobs and --report-only take none)
    campaign_lock = not (args.only or args.report_only or args.dry_run)
    if campaign_lock:
        try:
            note = hold_campaign_folder(ctx.out, command)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if note:
            print(note)
    try:
        return _submit_or_run(args, recipe, runs, seeds, campaign, ctx, notes, command)
    except KeyboardInterrupt:  # its run may still be saving: the lock stays until that run exits
        campaign_lock = False
        raise
    finally:
        if campaign_lock:
            release_campaign_folder(ctx.out)


def _submit_or_run(args, recipe, runs: list[str], seeds: list[int], campaign: Campaign, ctx: Context,
                   notes: list[str], command: str) -> int:
    if args.launcher == "slurm" and not args.only and not args.report_only:
        if not args.dry_run:
            _save_plan(args, recipe, runs, seeds)
        _submit_slurm(args, recipe, runs, seeds, args.dry_run)
        return 0
    if not args.only:
        _save_plan(args, recipe, runs, seeds)
    try:
        if args.only:  # a Slurm job: its exit code says whether its run finished
            result = _run_only(campaign, args.only)
            if not result or result.get("status") != "ok":
                print(f"error: --only {args.only}: " + (result or {}).get("reason", "it could not start"),
                      file=sys.stderr)
                return 1
            return 0
        if not args.report_only:
            campaign.run_all()
        else:
            campaign.load_results()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_report(ctx.out, recipe, seeds, ctx.results, ctx.lrs, notes, command)
    print(f"report: {os.path.join(ctx.out, 'report.md')}")
    unfinished = sorted(f"{run}:{seed}" for (run, seed), r in ctx.results.items() if r.get("status") != "ok")
    if unfinished and not args.report_only:  # the report holds what finished; the exit code says not all did
        print(f"error: {len(unfinished)} run(s) did not finish ({', '.join(unfinished[:6])}"
              f"{' ...' if len(unfinished) > 6 else ''}): see the report; --resume retries them", file=sys.stderr)
        return 1
    return 0


def _save_plan(args, recipe, runs, seeds) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "plan.json")
    if not os.path.isfile(path):
        import dataclasses

        atomic_write_text(path, json.dumps({"settings": _settings(args), "runs": runs, "seeds": seeds,
                                             "recipe": dataclasses.asdict(recipe)}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
