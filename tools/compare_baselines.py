"""Pruning-aware pretraining against matched-compute baselines, on your data, published as measured.

    python tools/compare_baselines.py --recipe cpu-small --data-path data/train_text_document \\
        --tokenizer-model tok.model --test-data-path data/held_out_text_document --seeds 3 --out cmp/

Runs (each an ordinary ``python -m pretrain`` whose command is ``OUT/<run>/seed<k>/command.sh``):
``parent`` (the large shape, first P tokens), ``A`` (pruning-aware continued pretraining from it),
``A0`` (the same from random init), ``C`` (prune once after training), ``B-found`` and ``B-hand``
(the found shape and a hand shape from scratch, at matched tokens (i) and matched FLOPs (ii)).
See ``pretrain/compare/arms.py`` for the exact definitions and ``docs/RESULTS.md`` for a result.

Learning rates are swept on seed 0 at a shorter horizon and chosen on the validation split of
the training data; the test set (``--test-data-path``) is only ever measured. ``OUT/report.md``
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
from pretrain.compare.arms import ARMS, RUNS, Context, Data  # noqa: E402
from pretrain.compare.campaign import (Campaign, check_corpus, check_test_set, check_tokenizer,  # noqa: E402
                                       format_command, training_tokens_available)
from pretrain.compare.recipes import RECIPES, get_recipe  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402

# what must not change when a comparison is resumed
_SETTINGS = ("recipe", "data_path", "tokenizer_model", "tokenizer_type", "test_data_path", "seeds")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/compare_baselines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--data-path", nargs="+", required=True, help="training data (PREFIX or W1 PREFIX1 ...)")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--tokenizer-type", help="default: from the tokenizer file, as in python -m pretrain")
    p.add_argument("--test-data-path", nargs="+", required=True,
                   help="held-out data that no run trains or selects on (not a --data-path prefix)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1; every run is repeated per seed")
    p.add_argument("--out", required=True, help="folder of the comparison")
    p.add_argument("--arms", default=",".join(arms.DEFAULT_ARMS), help=f"comma-separated, from {', '.join(ARMS)} "
                   f"(what they need is added; {', '.join(arms.OPT_IN)} only when named)")
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
                              f"comparison in {args.out} ({plan_path}); resume with the same settings")
    elif os.path.isdir(args.out) and os.listdir(args.out) and not args.dry_run:
        raise ConfigError(f"--out {args.out} is not empty and holds no comparison: give an empty or new folder")


def _validate(args: argparse.Namespace):
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    recipe = get_recipe(args.recipe)
    runs, notes = arms.runs_for([a.strip() for a in args.arms.split(",") if a.strip()])
    from pretrain.config import DataConfig

    data = DataConfig(data_path=args.data_path, tokenizer_model=args.tokenizer_model,
                      tokenizer_type=args.tokenizer_type or "GPTSentencePieceTokenizer",
                      test_data_path=args.test_data_path)
    data.validate()
    check_tokenizer(data)
    check_test_set(args.data_path, args.test_data_path)
    available = training_tokens_available(args.data_path, recipe.split)
    full = arms.total_tokens(recipe)
    try:
        check_corpus(recipe, full, available, f"a from-scratch run (P + T = {full:,} tokens)")
    except ConfigError as err:
        if not args.dry_run:
            raise
        notes.append(f"WARNING (a real run stops here): {err}")
    if any(r.endswith("-ii") for r in runs):
        # a matched-FLOPs run trains the small model longer: at most (P + T) / target ratio tokens
        estimate = int(full / recipe.target_ratio)
        if estimate > available:
            notes.append(f"the matched-FLOPs runs may need up to ~{estimate:,} tokens and the training split holds "
                         f"{available:,}; they are checked exactly once A has run")
    _check_out(args)
    return recipe, runs, notes, available


def _validate_flags(recipe, ctx: Context, runs: list[str], seed: int) -> list[str]:
    """Each planned run's flags through ``python -m pretrain``'s own parser and config checks, at
    the recipe's world size (what a dry run can check before any job starts). B runs are planned
    once A has run; they are checked then."""
    from pretrain.arguments import build_parser as pretrain_parser, config_from_args

    lines = []
    for run in runs:
        if run.startswith("B-"):
            continue
        plan = arms.plan_run(recipe, ctx, run, seed)
        flags = list(plan.flags)
        if plan.first_load:  # the shape comes from the parent's checkpoint, not there yet
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

    sweeps: dict[str, list[str]] = {s: [] for s in arms.SWEEPS}

    def submit_sweep(sweep: str) -> None:
        if len(recipe.lrs) > 1 and any(arms.SWEEP_OF[r] == sweep for r in runs):
            needs = [f"{n}:{seeds[0]}" for n in arms.NEEDS[arms.SWEEP_RUN[sweep]]]
            for lr in recipe.lrs:
                name = f"sweep-{sweep}-lr{lr:g}"
                submit(name, needs, f"sweep:{sweep}:{lr!r}", recipe.nodes)
                sweeps[sweep].append(name)

    def submit_run(run: str, seed: int) -> None:
        needs = [f"{n}:{seed}" for n in arms.NEEDS[run]] + sweeps[arms.SWEEP_OF[run]]
        submit(f"{run}:{seed}", needs, f"{run}:{seed}", recipe.nodes)

    # the order of Campaign.run_all: B's sweeps need A's shape on the first seed
    submit_sweep("parent")
    submit_sweep("A0")
    for seed in seeds:
        for run in [r for r in runs if not r.startswith("B-")]:
            submit_run(run, seed)
        if seed == seeds[0]:
            submit_sweep("B-found")
            submit_sweep("B-hand")
        for run in [r for r in runs if r.startswith("B-")]:
            submit_run(run, seed)
    submit("report", list(job_ids), None, 1)


def _run_only(campaign: Campaign, only: str) -> None:
    """One run (a Slurm job): plan it from the results on disk, run it."""
    campaign.load_results()
    parts = only.split(":")
    if parts[0] == "sweep":
        sweep, lr = parts[1], float(parts[2])
        campaign._run_if_possible(arms.SWEEP_RUN[sweep], campaign.seeds[0], sweep=True, lr=lr)
        return
    run, seed = parts[0], int(parts[1])
    if run not in RUNS:
        raise ConfigError(f"--only {only}: no run {run}")
    for sweep in arms.SWEEPS:  # a sweep whose rates all finished decides; otherwise the recipe's first
        campaign.ctx.lrs.setdefault(sweep, campaign._chosen_lr(sweep) or campaign.recipe.lrs[0])
    campaign._run_if_possible(run, seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe, runs, notes, available = _validate(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds))
    ctx = Context(out=os.path.abspath(args.out), launcher=args.launcher,
                  data=Data(data_path=[os.path.abspath(p) if os.path.exists(p + ".bin") else p for p in args.data_path],
                            tokenizer_model=os.path.abspath(args.tokenizer_model),
                            test_data_path=[os.path.abspath(p) if os.path.exists(p + ".bin") else p
                                            for p in args.test_data_path],
                            tokenizer_type=args.tokenizer_type))
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
        print(f"runs {', '.join(runs)} x seeds {seeds}; learning rates {recipe.lrs}; "
              f"training split holds {available:,} tokens")
        for run in runs:
            if not run.startswith("B-"):
                plan = arms.plan_run(recipe, ctx, run, seeds[0])
                print(f"\n# {run}, seed {seeds[0]}:\n{format_command(['python', '-m', 'pretrain', *plan.flags])}")
        print("\n# B runs: planned once A has finished (the shape it found, the FLOPs it spent)")
        return 0
    if args.launcher == "slurm" and not args.only and not args.report_only:
        if not args.dry_run:
            _save_plan(args, recipe, runs, seeds)
        _submit_slurm(args, recipe, runs, seeds, args.dry_run)
        return 0
    if not args.only:
        _save_plan(args, recipe, runs, seeds)
    try:
        if args.only:
            _run_only(campaign, args.only)
            return 0
        if not args.report_only:
            campaign.run_all()
        else:
            campaign.load_results()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.compare.report import write_report

    write_report(ctx.out, recipe, seeds, ctx.results, ctx.lrs, notes, command)
    print(f"report: {os.path.join(ctx.out, 'report.md')}")
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
