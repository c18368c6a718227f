"""``report.md``, ``report.json`` and the plots of a comparison, from its runs' ``result.json``."""

from __future__ import annotations

import json
import math
import os
import statistics

from pretrain.checkpoint import atomic_write_text
from pretrain.compare.arms import IMPORTED, PRUNED_REAL, TRAINED, Family, family_of

DESCRIPTIONS = {
    "parent": "the parent shape, first P tokens (its cost is charged to A and C)",
    "A": "pruning-aware: from parent, pruned in the window, shrunk, to P+T",
    "A0": "pruning-aware from random init, P+T tokens",
    "C": "prune once after training (parent to the window's end, one event, shrink), to P+T",
    "B-found-i": "A's found shape from scratch, P+T tokens",
    "B-found-ii": "A's found shape from scratch, parent+A's actual FLOPs",
    "B-hand-i": "uniform hand shape, A's parameters, P+T tokens",
    "B-hand-ii": "uniform hand shape, A's parameters, parent+A's actual FLOPs",
    "A-KD": "A distilling from the parent (KL only); the teacher's forward FLOPs charged",
    "C-KD": "C distilling from the parent: prune once + KD (Minitron); teacher's FLOPs charged",
}
# an imported parent's runs (arms.IMPORTED); the parent is free: its FLOPs are charged to nobody
REAL_DESCRIPTIONS = {
    "parent": "the imported parent itself, measured on the same batches (free: not charged)",
    "A": "pruning-aware: gradual pruning over the window, global allocation, shrunk in-run, CE",
    "A-KD": "A distilling from the parent (KL only) for all of T; the teacher's FLOPs charged",
    "M": "Minitron: one-shot activation saliency on the calibration steps, the homogeneous shape its search "
         "chooses (validation loss of the 10 largest under the target), shrink, KD (KL only)",
    "M-CE": "the same one-shot, then CE",
    "M-OBS": "the one-shot with OBS compensation, then KD",
    "parent-cont": "the parent continued unpruned for T (CE)",
    "scratch": "the target shape (uniform, the target's parameters) from scratch for T",
}
REAL_DESCRIPTIONS.update({f"{r}-ii": f"{r} extended to the matched FLOPs budget" for r in (*PRUNED_REAL, "scratch")})

# runs that continue the parent: its FLOPs are charged to them
_FROM_PARENT = ("A", "C", "A-KD", "C-KD")


def _shape_text(model: dict) -> str:
    text = f"L{model['num_layers']} h{model['hidden_size']} "
    shapes = model.get("layer_shapes")
    if shapes:
        groups = sorted({s["num_query_groups"] for s in shapes})
        ffn = [s["ffn_hidden_size"] for s in shapes]
        return text + f"groups {groups[0]}-{groups[-1]} ffn {min(ffn)}-{max(ffn)} (per layer)"
    return text + f"groups {model.get('num_query_groups') or model['num_attention_heads']} ffn {model['ffn_hidden_size']}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    if not all(math.isfinite(v) for v in values):  # (statistics.stdev raises on a NaN)
        return sum(values) / len(values), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _reference(family: Family, run: str) -> str | None:
    """The run each row is paired with: A (trained parent); M, Minitron's recipe, at matched tokens
    and M-ii at matched FLOPs (imported parent)."""
    if family.name == "trained":
        return None if run in ("A", "parent") else "A"
    ref = "M-ii" if run.endswith("-ii") else "M"
    return None if run in (ref, "parent", "M" if ref == "M-ii" else "") else ref


def summarise(results: dict, seeds: list[int], family: Family = TRAINED) -> dict:
    """Per run: what it cost and reached, over seeds, and its paired difference to the reference
    run (``_reference``: ``minus_A`` or ``minus_M``/``minus_M-ii``)."""
    parent = {s: results.get(("parent", s)) for s in seeds}
    final_tokens = _final_test_tokens(results)
    descriptions = DESCRIPTIONS if family.name == "trained" else REAL_DESCRIPTIONS
    charge_parent = family.name == "trained"
    out = {}
    for run in family.runs:
        per_seed = {s: results.get((run, s)) for s in seeds}
        ok = {s: r for s, r in per_seed.items() if r and r.get("status") == "ok"}
        if not any(per_seed.values()):
            continue
        row = {"run": run, "description": descriptions[run], "seeds_ok": sorted(ok),
               "not_ok": {s: (r or {}).get("reason", "not run") for s, r in per_seed.items() if s not in ok}}
        if ok:
            any_ok = next(iter(ok.values()))
            charged = {s: r["flops"]["actual"] + ((parent[s] or {}).get("flops", {}).get("actual", 0)
                                                  if charge_parent and run in _FROM_PARENT else 0)
                       for s, r in ok.items()}
            row.update({
                "shape": {s: _shape_text(r["final_model"]) for s, r in ok.items()},
                "params": statistics.mean(r["params"] for r in ok.values()),
                "tokens": statistics.mean(r["tokens_trained"] for r in ok.values()),
                "flops_actual": statistics.mean(r["flops"]["actual"] for r in ok.values()),
                "flops_ideal": statistics.mean(r["flops"]["ideal"] for r in ok.values()),
                "flops_teacher": statistics.mean(r["flops"].get("teacher", 0) for r in ok.values()),
                "flops_with_parent": statistics.mean(charged.values()),
                **_seconds(ok.values()),
                "lr": any_ok["lr"],
                "test_loss": {**dict(zip(("mean", "std"), _mean_std([r["test_loss"] for r in ok.values()]))),
                              "seeds": len(ok)},
                "test_loss_per_seed": {s: r["test_loss"] for s, r in ok.items()},
            })
            ref = _reference(family, run)
            paired = _paired(ok, results, ref, lambda r: r["test_loss"])
            if paired:
                row[f"minus_{ref}"] = paired
            # the larger measurement of the final checkpoints (campaign.measure_final_test): only
            # losses over the same sequences are averaged or paired
            def final_loss(r: dict) -> float | None:
                f = r.get("final_test") or {}
                return f["loss"] if f and f.get("tokens") == final_tokens else None

            measured = {s: r["final_test"] for s, r in ok.items() if r.get("final_test")}
            final = {s: f["loss"] for s, f in measured.items() if f.get("tokens") == final_tokens}
            others = {s: f["tokens"] for s, f in measured.items() if s not in final}
            if others:
                row["final_test_other_sizes"] = others
            if final:
                row["final_test"] = {**dict(zip(("mean", "std"), _mean_std(list(final.values())))),
                                     "seeds": len(final), "per_seed": final, "tokens": final_tokens,
                                     "test_loss": statistics.mean(ok[s]["test_loss"] for s in final)}
                paired = _paired({s: ok[s] for s in final}, results, ref, final_loss)
                if paired:
                    row[f"final_test_minus_{ref}"] = paired
            tasks = [r["tasks"] for r in ok.values() if r.get("tasks")]
            if tasks:  # the campaign's TASKS_FILE: each task's score, mean over the seeds that have it
                row["tasks"] = {t: statistics.mean(x[t] for x in tasks if t in x) for t in sorted(set().union(*tasks))}
        out[run] = row
    return out


def _final_test_tokens(results: dict) -> int | None:
    """The size of the final test measurement that the report compares: the one most runs have
    (the larger on a tie). A resumed campaign measures again what another --final-test-samples
    made, so other sizes are runs whose measurement failed or has not come yet."""
    sizes = [r["final_test"]["tokens"] for r in results.values()
             if r and r.get("status") == "ok" and (r.get("final_test") or {}).get("tokens")]
    if not sizes:
        return None
    return max(set(sizes), key=lambda t: (sizes.count(t), t))


def _seconds(runs) -> dict:
    """Mean wall and CPU seconds of a row's runs: the runs' own account of their steps
    (``campaign.train_seconds``) where every run has one, else the campaign's clock around each
    attempt, which misses an attempt whose campaign was killed before it returned (``source``)."""
    runs = list(runs)
    if all(r.get("train_cpu_seconds") is not None for r in runs):
        return {"wall_seconds": statistics.mean(r["train_wall_seconds"] for r in runs),
                "cpu_seconds": statistics.mean(r["train_cpu_seconds"] for r in runs), "seconds_source": "run"}
    return {"wall_seconds": statistics.mean(r["wall_seconds"] for r in runs),
            "cpu_seconds": (statistics.mean(r["cpu_seconds"] for r in runs)
                            if all(r.get("cpu_seconds") is not None for r in runs) else None),
            "seconds_source": "campaign" if any(r.get("tokens_trained") for r in runs) else "measured"}


def _paired(ok: dict, results: dict, ref: str | None, value) -> dict | None:
    """``value`` of each seed's run minus the reference run's on the same seed, with its mean, std
    and the seeds where the reference is better; None without a finished reference (the parent is
    a starting point, not an alternative to it)."""
    if not ref:
        return None
    diffs = {}
    for s, r in ok.items():
        other = results.get((ref, s)) or {}
        mine, theirs = value(r), (value(other) if other.get("status") == "ok" else None)
        if mine is not None and theirs is not None:
            diffs[s] = mine - theirs
    if not diffs:
        return None
    return {"mean": statistics.mean(diffs.values()), "per_seed": diffs, "std": _mean_std(list(diffs.values()))[1],
            f"{ref}_better_in": sum(1 for d in diffs.values() if d > 0), "seeds": len(diffs)}


def _fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def write_report(out: str, recipe, seeds: list[int], results: dict, lrs: dict, notes: list[str],
                 command: str) -> dict:
    family = family_of(recipe)
    summary = summarise(results, seeds, family)
    tasks = task_settings(results)
    curves = task_curves(results, seeds, family)
    report = {"recipe": recipe.name, "seeds": seeds, "command": command, "learning_rates": lrs, "runs": summary,
              "notes": notes, **({"tasks": tasks} if tasks else {}),
              **({"task_curves": {run: [{"iteration": k, "tokens": t, "score": v, "seeds": n}
                                        for k, (t, v, n) in c.items()] for run, c in curves.items()}}
                 if curves else {})}
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1, default=str))
    plots = _plots(out, results, seeds, family, curves)
    lines = [f"# Baseline comparison: recipe `{recipe.name}`", "", recipe.summary, "",
             f"Command: `{command}`", ""]
    if family.name == "trained":
        lines += [f"Seeds {seeds}; P = {recipe.parent_tokens:,} parent tokens, T = {recipe.continue_tokens:,} after "
                  f"it; target {recipe.target_ratio:.0%} of the parent's parameters; saliency {recipe.saliency}, "
                  f"{recipe.granularity}; test loss on --test-data-path (no run trains or selects on it).", "",
                  _lr_line(recipe, lrs, "Learning rates"), ""]
        lines += _table(summary, list(summary), "A", "FLOPs + parent")
        lines += final_test_lines(summary, [("matched tokens or FLOPs", list(summary), "A")])
        lines += ["", "Runs: " + "; ".join(f"**{k}** {v}" for k, v in DESCRIPTIONS.items()), "",
                  "*minus A*: the run's test loss minus A's, per seed, averaged, ± their standard deviation over seeds "
                  "(positive: A is better); "
                  "*A better*: seeds where A's loss is lower. *FLOPs actual*: what the run computed (a masked "
                  "model at full size until the in-run shrink); *ideal*: the kept shape alone; *+ parent*: A and C "
                  "charged with the parent's FLOPs (the matched-compute B runs spend exactly that).", ""]
    else:
        lines += _imported_lines(recipe, seeds, summary, results, lrs)
    lines += _stability_lines(results, seeds)
    if family.name != "trained":
        lines += _architecture_lines(results, seeds)
    lines += _tasks_lines(summary, tasks)
    lines += _task_curve_lines(curves, results, seeds)
    lines += [f"![{name}]({os.path.basename(path)})" for name, path in plots.items()]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    return report


def _table(summary: dict, runs: list[str], ref: str, last_flops: str) -> list[str]:
    """One table of ``runs``: cost, loss and the paired difference to ``ref``."""
    lines = [f"| run | shape (seed 0) | params | tokens | FLOPs actual | FLOPs ideal | {last_flops} | wall s (CPU s) | "
             f"test loss | minus {ref} (paired) | {ref} better |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        row = summary.get(run)
        if row is None:
            continue
        if "test_loss" not in row:
            lines.append(f"| {run} | not finished: {'; '.join(f'seed {s}: {r}' for s, r in row['not_ok'].items())} "
                         "| | | | | | | | | |")
            continue
        shape = next(iter(row["shape"].values()))
        diff = row.get(f"minus_{ref}")
        loss = row["test_loss"]
        third = row["flops_with_parent"] if last_flops.endswith("parent") else row["flops_teacher"]
        lines.append(
            f"| {run} | {shape} | {_fmt_count(row['params'])} | {_fmt_count(row['tokens'])} | "
            f"{_fmt_count(row['flops_actual'])} | {_fmt_count(row['flops_ideal'])} | "
            f"{_fmt_count(third)} | {row['wall_seconds']:.0f}"
            + (f" ({row['cpu_seconds']:.0f})" if row.get("cpu_seconds") is not None else "")
            + ("*" if row.get("seconds_source") == "campaign" else "") + " | "
            + (f"{loss['mean']:.4f} ± {loss['std']:.4f} ({loss['seeds']} seeds) | " if loss["seeds"] > 1
               else f"{loss['mean']:.4f} (1 seed) | ")
            + (f"{diff['mean']:+.4f}" + (f" ± {diff['std']:.4f}" if diff["seeds"] > 1 else "")
               + f" | {diff[f'{ref}_better_in']}/{diff['seeds']} |" if diff else " | |"))
        if row["not_ok"]:
            lines.append(f"| | missing seeds: {row['not_ok']} | | | | | | | | | |")
    if any(summary.get(run, {}).get("seconds_source") == "campaign" for run in runs):
        lines += ["", "*: seconds measured by the campaign around each attempt of the run (its steps' own account "
                  "is missing: a run begun before it was kept); an attempt whose campaign was killed before it "
                  "returned (a session's end) is not in them. The others: the run's own wall and process CPU "
                  "seconds over its steps, evaluations and saves included, each step once."]
    return lines


def _lr_line(recipe, lrs: dict, what: str) -> str:
    """How the runs' learning rates were set: one given rate (the recipe's only one, or --lr) is
    no sweep's choice."""
    if len(recipe.lrs) == 1:
        return f"Learning rate {recipe.lrs[0]:g} for every run, given (the recipe's only rate, or --lr): no sweep."
    return (f"{what} (chosen on the training data's validation split, seed 0): "
            + ", ".join(f"{k} {v:g}" for k, v in lrs.items()))


def _imported_lines(recipe, seeds: list[int], summary: dict, results: dict, lrs: dict) -> list[str]:
    """An imported parent's two tables: every arm at T tokens, and the pruned arms and scratch at
    the FLOPs of the most expensive pruned arm (the ``-ii`` runs)."""
    budgets = []
    for s in seeds:
        done = {r: results[(r, s)]["flops"]["actual"] for r in PRUNED_REAL
                if (results.get((r, s)) or {}).get("status") == "ok"}
        if done:
            top = max(done, key=done.get)
            # until every pruned arm of the seed finished, a later one may raise the budget
            so_far = "" if len(done) == len(PRUNED_REAL) else f", so far: {len(done)} of {len(PRUNED_REAL)} pruned arms"
            budgets.append(f"seed {s}: {_fmt_count(done[top])} ({top}{so_far})")
    base = [r for r in IMPORTED.runs if not IMPORTED.late(r)]
    late = [r for r in IMPORTED.runs if IMPORTED.late(r)]
    lines = [f"Seeds {seeds}; the parent is imported and free (its FLOPs are charged to no run); every arm starts "
             f"from it and reads the same data in the same order; T = {recipe.continue_tokens:,} tokens; target "
             f"{recipe.target_ratio:.0%} of the parent's parameters; A prunes over {recipe.window[0]:.0%}-"
             f"{recipe.window[1]:.0%} of T, the M arms calibrate for {recipe.oneshot_scoring_steps} steps; test loss "
             "on --test-data-path (no run trains or selects on it).", "",
             _lr_line(recipe, lrs, "Learning rates per arm family"), "",
             "## At matched tokens (T each)", ""]
    lines += _table(summary, base, "M", "FLOPs teacher")
    lines += ["", "## At matched FLOPs (the most expensive pruned arm's actual FLOPs: "
              + ("; ".join(budgets) or "none finished") + ")", "",
              "Each arm continued after its window until it has spent the budget (whole steps); the arm that set "
              "it is its own -ii row.", ""]
    lines += _table(summary, late, "M-ii", "FLOPs teacher")
    lines += final_test_lines(summary, [("matched tokens", base, "M"), ("matched FLOPs", late, "M-ii")])
    lines += ["", "## Verdict", "",
              "Each pruned arm against Minitron's recipe, paired by seed. A difference is called larger than the "
              "seed spread when it has the same sign on every seed (2 at least) and its mean exceeds each arm's "
              "standard deviation over seeds and that of the paired differences: a rule for few seeds, not a "
              "significance test.", ""] + \
        verdict_lines(summary, base, "M", "matched tokens") + verdict_lines(summary, late, "M-ii", "matched FLOPs") + \
        verdict_lines(summary, base, "M", "matched tokens", "final_test") + \
        verdict_lines(summary, late, "M-ii", "matched FLOPs", "final_test")
    lines += ["", "Runs: " + "; ".join(f"**{k}** {v}" for k, v in REAL_DESCRIPTIONS.items() if not k.endswith("-ii")),
              "", "*minus M*: the run's test loss minus M's (Minitron's recipe), per seed, averaged, ± the standard "
              "deviation of those paired differences over seeds (positive: M is better); *FLOPs actual*: what the run computed, the teacher's forward passes included (a masked model "
              "at full size until the in-run shrink); *ideal*: the kept shape alone; *teacher*: the teacher's share.",
              ""]
    return lines


def final_test_lines(summary: dict, tables: list[tuple[str, list[str], str]]) -> list[str]:
    """The final checkpoints' test loss on the larger sample (``campaign.measure_final_test``):
    one table per (setting, runs, reference), beside the in-run measurement; nothing when no run
    was measured."""
    measured = [row for row in summary.values() if "final_test" in row]
    if not measured:
        return []
    other = {run: row["final_test_other_sizes"] for run, row in summary.items() if row.get("final_test_other_sizes")}
    lines = ["", f"## Final test loss on a larger sample ({measured[0]['final_test']['tokens']:,} tokens)", "",
             "Each run's final checkpoint (the parent: the checkpoint it starts from) measured by `tools/evaluate.py` "
             "on the first sequences of --test-data-path, the same for every run: the in-run test loss (the tables "
             "above, and the curves) is a few batches of them."
             + (" Left out, measured on another number of tokens (a --resume with this --final-test-samples "
                "measures them again): " + "; ".join(f"{run} seed {s} ({t:,})" for run, by_seed in other.items()
                                                     for s, t in by_seed.items()) + "." if other else ""), ""]
    for setting, runs, ref in tables:
        rows = [r for r in runs if "final_test" in summary.get(r, {})]
        if not rows:
            continue
        lines += [f"At {setting}:", "", f"| run | final test loss | minus {ref} (paired) | {ref} better | "
                  "in-run test loss (the same seeds) |", "|---|---|---|---|---|"]
        for run in rows:
            row = summary[run]
            loss, diff = row["final_test"], row.get(f"final_test_minus_{ref}")
            cells = [run, f"{loss['mean']:.4f}" + (f" ± {loss['std']:.4f}" if loss["seeds"] > 1 else "")
                     + f" ({loss['seeds']} seed{'s' if loss['seeds'] > 1 else ''})"]
            cells += ([f"{diff['mean']:+.4f}" + (f" ± {diff['std']:.4f}" if diff["seeds"] > 1 else ""),
                       f"{diff[f'{ref}_better_in']}/{diff['seeds']}"] if diff else ["", ""])
            lines.append("| " + " | ".join(cells + [f"{loss['test_loss']:.4f}"]) + " |")
        lines.append("")
    return lines


def verdict_lines(summary: dict, runs: list[str], ref: str, setting: str, metric: str = "test_loss") -> list[str]:
    """Plain sentences for one table: the ranking by mean test loss, and each pruned arm against
    ``ref`` (Minitron's recipe). A difference is *larger than the seed spread* when it has the
    same sign on every seed (at least 2) and its mean exceeds each arm's own standard deviation
    over seeds and the paired differences' own: a stated rule for few seeds, not a significance
    test. ``metric``: ``test_loss`` (the in-run measurement, on every curve) or ``final_test``
    (the final checkpoints on a larger sample)."""
    what = "test loss" if metric == "test_loss" else "final test loss"
    finished = [r for r in runs if metric in summary.get(r, {})]
    if not finished:
        return [f"- At {setting}: no run has finished yet."] if metric == "test_loss" else []
    def order(run: str) -> tuple[bool, float]:  # a NaN (a diverged run) last, not wherever sorted() leaves it
        mean = summary[run][metric]["mean"]
        return math.isnan(mean), 0.0 if math.isnan(mean) else mean

    ranked = sorted(finished, key=order)
    lines = [f"- At {setting}, by mean {what}: " + ", ".join(
        f"{r} {summary[r][metric]['mean']:.4f} ({summary[r][metric]['seeds']} "
        f"seed{'s' if summary[r][metric]['seeds'] > 1 else ''})" for r in ranked) + "."]
    ref_row = summary.get(ref, {})
    if metric not in ref_row:
        return lines + [f"- {ref} has not finished" + ("" if metric == "test_loss" else " or was not measured")
                        + ": no paired comparison yet."]
    prefix = "" if metric == "test_loss" else "final_test_"
    for run in finished:
        diff = summary[run].get(f"{prefix}minus_{ref}")
        if not diff or run.removesuffix("-ii") not in PRUNED_REAL:
            continue
        gap, n = -diff["mean"], diff["seeds"]
        if math.isnan(gap):
            lines.append(f"- {run} against {ref}: no difference, a test loss is not a number (a run diverged; see "
                         "its log.txt).")
            continue
        who = (f"{run} equals {ref}" if gap == 0 else
               f"{run} is {'lower' if gap > 0 else 'higher'} than {ref} by {abs(gap):.4f}")
        if n < 2:
            lines.append(f"- {who} on 1 seed: no seed spread yet.")
            continue
        spread = max(summary[run][metric]["std"], ref_row[metric]["std"], diff["std"])
        per_seed = list(diff["per_seed"].values())
        same_sign = all(d > 0 for d in per_seed) or all(d < 0 for d in per_seed)
        larger = same_sign and abs(gap) > spread  # (False when a spread is NaN)
        lines.append(f"- {who} (mean of {n} seeds, paired; {ref} better on {diff[f'{ref}_better_in']} of {n}): "
                     + ("larger than" if larger else "within") + f" the seed spread ({spread:.4f}).")
    return lines


def task_settings(results: dict) -> dict | None:
    """How the runs' tasks were scored (``campaign.task_settings`` less the checkpoint: the tasks,
    the documents per task, the shots, each task's metric); every scored run the same, since a
    resumed campaign scores again what other settings made. None when no run is scored."""
    found = [r["tasks_settings"] for r in results.values()
             if r and r.get("status") == "ok" and r.get("tasks") and r.get("tasks_settings")]
    if not found:
        return None
    settings = {k: v for k, v in found[-1].items() if k != "checkpoint"}
    settings["same_for_every_run"] = all({k: v for k, v in f.items() if k != "checkpoint"} == settings
                                         for f in found[:-1])
    return settings


def _tasks_lines(summary: dict, settings: dict | None) -> list[str]:
    """The task table: each run's scores (``campaign.TASKS_FILE``), mean over its seeds."""
    rows = {run: row["tasks"] for run, row in summary.items() if row.get("tasks")}
    if not rows:
        return []
    names = list(settings["tasks"]) if settings else sorted(set().union(*rows.values()) - {"average"})
    names += sorted(set().union(*rows.values()) - set(names) - {"average"})  # an older file's other tasks
    if any("average" in t for t in rows.values()):
        names.append("average")
    lines = ["## Tasks (mean over seeds)", ""]
    if settings:
        limit = settings.get("limit")
        metrics = settings.get("primary") or {}
        lines += [f"Each run's final checkpoint (the parent: the checkpoint it starts from) scored by "
                  f"`tools/evaluate.py --tasks {','.join(settings['tasks'])}` on "
                  + (f"the first {limit} documents of each task" if limit else "every document of each task")
                  + f" ({settings.get('num_fewshot', 0)}-shot), the same documents for every run"
                  + ("" if settings.get("same_for_every_run", True) else
                     " (WARNING: not every run was scored with these settings; --resume scores them again)")
                  + ". Metric per task: " + ", ".join(f"{n} {metrics.get(n, 'acc')}" for n in settings["tasks"])
                  + ("; average: the mean of the seven common-sense tasks" if "average" in names else "") + ".", ""]
    lines += ["| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {run} | " + " | ".join(f"{t[k]:.3f}" if k in t else "" for k in names) + " |"
              for run, t in rows.items()]
    return lines + [""]


def _curve_score(tasks: dict) -> float:
    """A task-curve point's one number: the paper's seven's average, else the mean of what was scored."""
    if tasks.get("average") is not None:
        return tasks["average"]
    return statistics.mean(v for k, v in tasks.items() if k != "average")


LAST = "last"  # a task curve's column: each run's last scored point, wherever its seed ended


def task_curves(results: dict, seeds: list[int], family: Family = TRAINED) -> dict[str, dict]:
    """Per run, the task curve it scored during training (``campaign.curve_tasks``): {iteration, or
    ``LAST`` for each seed's last point: (tokens, score, each a mean over the seeds that have the
    point, seeds)}. The last points are one column: an -ii run ends where its seed's FLOPs budget
    does, a different iteration on each seed."""
    curves = {}
    for run in family.runs:
        points: dict = {}
        for s in seeds:
            r = results.get((run, s)) or {}
            if r.get("status") != "ok" or r.get("same_as"):  # an -ii that is its arm: the arm's row has it
                continue
            scored = [c for c in r.get("curve", []) if c.get("tasks")]
            for i, c in enumerate(scored):
                key = LAST if i == len(scored) - 1 else c["iteration"]
                points.setdefault(key, []).append((c["tokens"], _curve_score(c["tasks"])))
        if points:
            ordered = sorted((k for k in points if k != LAST)) + ([LAST] if LAST in points else [])
            curves[run] = {k: (statistics.mean(t for t, _ in points[k]), statistics.mean(v for _, v in points[k]),
                               len(points[k])) for k in ordered}
    return curves


def _task_curve_lines(curves: dict, results: dict, seeds: list[int]) -> list[str]:
    """The task curve table (``task_curves``): each run's scores during training, one column per
    scored iteration."""
    if not curves:
        return []
    iterations = sorted(set().union(*curves.values()) - {LAST}) + [LAST]
    scored = [r for r in results.values()
              if r and r.get("status") == "ok" and r.get("task_curve_wall_seconds") and not r.get("same_as")]
    limits = {c.get("tasks_limit") for r in scored for c in r.get("curve", []) if c.get("tasks")}
    lines = ["## Task curves (scored by each run during training; mean over seeds)", "",
             "Each run scored the tasks itself (`python -m pretrain --eval-tasks`) at its evaluations of every "
             "`--task-curve-interval` iterations and at its end, on the model as it trained (a pruned arm: masked, "
             "then shrunk in-run), "
             + (f"the first {limits.pop()} documents of each task" if len(limits) == 1 and None not in limits
                else "the documents of each task listed in the runs' evals.jsonl")
             + "; one number per point: the average of the seven common-sense tasks where they were all scored, "
               "else the mean of the tasks scored. *last*: each seed's last point, the run's final model (an -ii "
               "run ends where its seed's budget does; the task table scores the saved checkpoint with "
               "tools/evaluate.py)."
             + (f" Scoring took {statistics.mean(r['task_curve_wall_seconds'] for r in scored):,.0f} s of wall "
                "clock per run on average, kept out of the runs' own account of their seconds." if scored else ""), "",
             "| run | " + " | ".join(f"iter {it}" if it != LAST else LAST for it in iterations) + " |",
             "|---|" + "---|" * len(iterations)]
    for run, curve in curves.items():
        lines.append(f"| {run} | " + " | ".join(f"{curve[it][1]:.3f}" + (f" ({curve[it][2]})" if curve[it][2] < len(seeds)
                                                                          else "")
                                                 if it in curve else "" for it in iterations) + " |")
    if any(p[2] < len(seeds) for c in curves.values() for p in c.values()):
        lines += ["", "(n): a point only n seeds have."]
    return lines + [""]


def _stability_lines(results: dict, seeds: list[int]) -> list[str]:
    """The shape A found per seed, and how much it varies (bench/seed_stability.py's measures).
    Each seed has its own parent, so which groups survive cannot be compared across seeds; their
    numbers per layer can."""
    found = [(s, event) for s in seeds if (event := _found(results, "A", s))]
    if not found:
        return []
    lines = ["Found shape per seed (last pruning event: kept query groups / FFN channels per layer, hidden):", ""]
    per_layer_ffn = []
    for s, event in found:
        kept = event["kept_per_layer"]
        alive = [i for i, a in enumerate(kept["layers"]) if a]
        lines.append(f"- seed {s}: " + " ".join(f"{kept['heads'][i]}/{kept['ffn'][i]}" for i in alive)
                     + f", hidden {kept['hidden']}; kept heads {event.get('heads', 0):.0%}, "
                       f"FFN {event.get('ffn', 0):.0%}, hidden {event.get('hidden', 0):.0%}")
        per_layer_ffn.append([kept["ffn"][i] for i in alive])
    if len(found) > 1 and len({len(x) for x in per_layer_ffn}) == 1:
        spread = [statistics.pstdev(col) for col in zip(*per_layer_ffn)]
        lines.append(f"- per-layer FFN width std across seeds: {' '.join(f'{x:.1f}' for x in spread)}")
        for kind in ("heads", "ffn", "hidden"):
            values = [event.get(kind, 0) for _, event in found]
            lines.append(f"- kept {kind}: mean {statistics.mean(values):.3f}, std {statistics.pstdev(values):.3f}")
    return lines + [""]


def _found(results: dict, run: str, seed: int) -> dict | None:
    """The last pruning event of a finished run (its kept fractions and per-layer widths), or None."""
    r = results.get((run, seed)) or {}
    return r["pruning"][-1] if r.get("status") == "ok" and r.get("pruning") else None


def _architecture_lines(results: dict, seeds: list[int]) -> list[str]:
    """What each pruned arm of an imported parent kept, per seed: the kept fractions per group type
    and the per-layer widths the shrink built (one recipe's arms differ in how they score and when
    they prune, so their shapes are the first thing to compare)."""
    lines = ["## Found architecture per arm (the last pruning event)", "",
             "| arm | seed | params | kept heads | kept FFN | kept hidden | query groups per layer | "
             "FFN channels per layer |", "|---|---|---|---|---|---|---|---|"]
    rows = 0
    for run in PRUNED_REAL:
        for s in seeds:
            event = _found(results, run, s)
            if event is None:
                continue
            kept = event.get("kept_per_layer") or {}
            alive = [i for i, a in enumerate(kept.get("layers", [])) if a]
            lines.append(f"| {run} | {s} | {_fmt_count(event['params'])} | {event.get('heads', 1.0):.0%} | "
                         f"{event.get('ffn', 1.0):.0%} | {event.get('hidden', 1.0):.0%} | "
                         + " ".join(str(kept["heads"][i]) for i in alive) + " | "
                         + " ".join(str(kept["ffn"][i]) for i in alive) + " |")
            rows += 1
    searches = [(run, s, event["search"]) for run in PRUNED_REAL for s in seeds
                if (event := _found(results, run, s)) and event.get("search")]
    if searches:
        lines += ["", "Minitron's search (each candidate: hidden / FFN / query groups per layer, validation loss):", ""]
        for run, s, found in searches:
            chosen = found["candidates"][found["chosen"]]
            lines.append(f"- {run} seed {s}: chose {chosen['hidden']} / {chosen['ffn']} / {chosen['groups']} of "
                         + ", ".join(f"{c['hidden']} / {c['ffn']} / {c['groups']} {c['valid_loss']:.4f}"
                                     for c in found["candidates"]))
    return lines + [""] if rows else []


def _plots(out: str, results: dict, seeds: list[int], family: Family = TRAINED, curves: dict | None = None) -> dict:
    """The report's PNGs; ``curves``: ``task_curves`` (none: no task-curve plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    parent_flops = {s: (results.get(("parent", s)) or {}).get("flops", {}).get("actual", 0) for s in seeds}
    for axis in ("tokens", "flops"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, run in enumerate(family.runs):
            for s in seeds:
                r = results.get((run, s))
                if not r or r.get("status") != "ok":
                    continue
                points = [c for c in r["curve"] if c.get("test_loss") is not None]
                charged = family.name == "trained" and run in _FROM_PARENT
                offset = parent_flops[s] if axis == "flops" and charged else 0
                xs = [c[axis] + offset for c in points]
                ax.plot(xs, [c["test_loss"] for c in points], color=f"C{i}", alpha=0.8,
                        label=run if s == seeds[0] else None, marker="." if run == "parent" else None)
        _label(ax, "training tokens (position in the data)" if axis == "tokens" else
               "training FLOPs (actual; A and C include the parent's)" if family.name == "trained" else
               "training FLOPs (actual, teacher included; the parent is free)", "test loss")
        paths[f"test loss vs {axis}"] = _save(fig, out, f"test_loss_vs_{axis}.png")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    styles = (("A", "-"), ("A0", ":"), ("C", "--"), ("A-KD", "-."), ("C-KD", (0, (1, 3)))) if family.name == "trained" \
        else (("A", "-"), ("A-KD", "-."), ("M", "--"), ("M-CE", ":"), ("M-OBS", (0, (1, 3))))
    for run, style in styles:
        for s in seeds:
            r = results.get((run, s))
            if not r or r.get("status") != "ok" or not r.get("pruning"):
                continue
            for j, kind in enumerate(("heads", "ffn", "hidden")):
                ax.step([p["tokens"] for p in r["pruning"]], [p.get(kind, 1.0) for p in r["pruning"]], where="post",
                        color=f"C{j}", linestyle=style, alpha=0.8,
                        label=f"{run} {kind}" if s == seeds[0] else None)
                drawn = True
    if drawn:
        _label(ax, "tokens", "kept fraction")
        paths["pruning trajectory"] = _save(fig, out, "pruning_trajectory.png")
    plt.close(fig)
    found = [(f"seed {s}", event["kept_per_layer"]) for s in seeds if (event := _found(results, "A", s))]
    if found:
        paths["found shape per seed"] = _widths_plot(plt, out, "found_shapes.png", "A's ", found)
    stale = os.path.join(out, "task_curves.png")
    if not curves and os.path.exists(stale):  # an earlier report's, of runs since scored again without a curve
        os.remove(stale)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, run in enumerate(family.runs):
            if run in curves:
                points = sorted(curves[run].values())  # by tokens (the last column: a mean over the seeds' ends)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", color=f"C{i % 10}", label=run,
                        linestyle="--" if run.endswith("-ii") else "-")
        start = [r["tasks"] for s in seeds if (r := results.get(("parent", s))) and r.get("status") == "ok"
                 and r.get("tasks") and family.name != "trained"]
        if start:  # an imported parent: where every arm starts from
            ax.axhline(statistics.mean(_curve_score(t) for t in start), color="gray", linewidth=0.8, linestyle=":",
                       label="parent")
        _label(ax, "training tokens (position in the data)", "tasks during training (mean over seeds)")
        paths["task curves"] = _save(fig, out, "task_curves.png")
        plt.close(fig)
    if family.name != "trained":
        paths.update(_imported_plots(out, results, seeds, plt))
    return paths


def _imported_plots(out: str, results: dict, seeds: list[int], plt) -> dict:
    """Every pruned arm's per-layer widths (seed 0 of those that have it), and the tasks' average
    against FLOPs: the parent at 0 (it is free), each arm after T tokens and after its matched-FLOPs
    extension (-ii): the task curve the finished checkpoints give without scoring during training."""
    paths = {}
    shapes = [(run, s, event["kept_per_layer"]) for run in PRUNED_REAL
              for s in seeds[:1] if (event := _found(results, run, s)) and event.get("kept_per_layer")]
    if shapes:
        paths["found shape per arm"] = _widths_plot(plt, out, "found_shapes_per_arm.png", f"seed {seeds[0]}: ",
                                                    [(run, kept) for run, _, kept in shapes])

    def mean_point(run: str) -> tuple[float, float] | None:
        done = [r for s in seeds if (r := results.get((run, s))) and r.get("status") == "ok"
                and (r.get("tasks") or {}).get("average") is not None]
        if not done:
            return None
        return (statistics.mean(r["flops"]["actual"] for r in done),
                statistics.mean(r["tasks"]["average"] for r in done))

    start = mean_point("parent")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for i, run in enumerate((*PRUNED_REAL, "parent-cont", "scratch")):
        own = [p for p in (mean_point(run), mean_point(f"{run}-ii")) if p is not None]
        if not own:
            continue
        points = ([start] if start and run != "scratch" else []) + own  # scratch does not start from the parent
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=f"C{i}", label=run)
        drawn = True
    if drawn:
        if start:
            ax.axhline(start[1], color="gray", linewidth=0.8, linestyle=":", label="parent")
        _label(ax, "training FLOPs (actual, teacher included; the parent is free)",
               "tasks: average score (mean over seeds)")
        paths["tasks vs FLOPs"] = _save(fig, out, "tasks_vs_flops.png")
    plt.close(fig)
    return paths


def _widths_plot(plt, out: str, name: str, title: str, curves: list[tuple[str, dict]]) -> str:
    """Kept FFN channels and query groups per layer, one line per (label, ``kept_per_layer``)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, kept) in enumerate(curves):
        layers = range(len(kept["ffn"]))
        axes[0].plot(layers, kept["ffn"], marker=".", color=f"C{i}", label=f"{label} (hidden {kept['hidden']})")
        axes[1].plot(layers, kept["heads"], marker=".", color=f"C{i}", label=label)
    axes[0].set_title(f"{title}kept FFN channels per layer")
    axes[1].set_title(f"{title}kept query groups per layer")
    for ax in axes:
        _label(ax, "layer")
    path = _save(fig, out, name)
    plt.close(fig)
    return path


def _label(ax, xlabel: str, ylabel: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
