"""The comparison report of an imported parent, from fabricated runs: the found architecture of
every pruned arm and the plots item 3 of issue 28 asks for (tasks against FLOPs, per-layer widths)."""

import json
import os

import pytest

from pretrain.compare.arms import PRUNED_REAL
from pretrain.compare.recipes import get_recipe
from pretrain.compare.report import write_report


def _run(run: str, seed: int, flops: float, loss: float, average: float, heads: list | None = None) -> dict:
    model = {"num_layers": 2, "hidden_size": 48, "num_attention_heads": 4, "num_query_groups": 2,
             "ffn_hidden_size": 96}
    result = {"status": "ok", "run": run, "seed": seed, "lr": 1e-3, "final_model": model, "params": 1000 + seed,
              "tokens_trained": 4096, "flops": {"actual": flops, "ideal": flops, "teacher": 0},
              "wall_seconds": 10.0, "cpu_seconds": 9.0, "test_loss": loss,
              "curve": [{"tokens": 4096, "flops": flops, "test_loss": loss}],
              "tasks": {"boolq": average, "average": average}, "pruning": []}
    if heads is not None:
        result["pruning"] = [{"iteration": 4, "tokens": 2048, "params": 900 + seed, "heads": 0.75, "ffn": 0.5,
                              "hidden": 0.75, "kept_per_layer": {"layers": [True, False, True], "heads": heads,
                                                                 "ffn": [64, 0, 32], "hidden": 48}}]
        if run == "M":
            result["pruning"][0]["search"] = {"chosen": 1, "candidates": [
                {"hidden": 48, "ffn": 64, "groups": 2, "params": 950, "valid_loss": 4.5},
                {"hidden": 40, "ffn": 96, "groups": 2, "params": 940, "valid_loss": 4.25}]}
    return result


def test_imported_report_has_every_pruned_arms_shape_and_the_task_curve(tmp_path):
    seeds = [0, 1]
    results = {("parent", s): {**_run("parent", s, 0, 3.0, 0.40), "pruning": []} for s in seeds}
    for i, run in enumerate(PRUNED_REAL):
        for s in seeds:
            results[(run, s)] = _run(run, s, 1e9 * (i + 1), 3.5 + 0.1 * i, 0.3, heads=[2, 0, i % 2 + 1])
            results[(f"{run}-ii", s)] = _run(f"{run}-ii", s, 6e9, 3.4, 0.32)
    results[("scratch", 0)] = _run("scratch", 0, 2e9, 5.0, 0.26)
    results[("M-OBS", 1)] = {"status": "failed", "reason": "exit code 1"}  # a seed that did not finish
    out = str(tmp_path)
    write_report(out, get_recipe("cpu-tiny-real"), seeds, results, {"A": 1e-3, "M": 1e-3}, [], "cmd")
    text = open(os.path.join(out, "report.md")).read()
    table = text.split("## Found architecture per arm")[1].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    # every finished pruned run, per seed; the dead middle layer is left out of the per-layer widths
    assert len(rows) == 2 * len(PRUNED_REAL) - 1
    assert "| A | 0 | 900 | 75% | 50% | 75% | 2 1 | 64 32 |" in rows
    assert "| M-CE | 1 | 901 | 75% | 50% | 75% | 2 2 | 64 32 |" in rows
    assert not any(row.startswith("| M-OBS | 1 ") for row in rows) and not any("scratch" in row for row in rows)
    assert "- M seed 1: chose 40 / 96 / 2 of 48 / 64 / 2 4.5000, 40 / 96 / 2 4.2500" in text
    # the test loss says over how many seeds it is a mean: M-OBS and scratch finished one
    assert "| 3.5000 ± 0.0000 (2 seeds) |" in text and "| 3.9000 (1 seed) |" in text and "| 5.0000 (1 seed) |" in text
    # seed 1's budget is provisional while M-OBS has not finished: it could raise it
    assert "seed 0: 5G (M-OBS); seed 1: 4G (M-CE, so far: 4 of 5 pruned arms)" in text
    for png in ("found_shapes_per_arm.png", "tasks_vs_flops.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000 and f"({png})" in text, png


def test_imported_report_without_pruned_runs_has_no_architecture_section(tmp_path):
    results = {("parent", 0): _run("parent", 0, 0, 3.0, 0.4)}
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    assert "Found architecture" not in text and not os.path.exists(os.path.join(str(tmp_path), "tasks_vs_flops.png"))


def test_the_verdict_says_who_won_by_how_much_and_against_the_seed_spread(tmp_path):
    """Item 3 of issue 28: which recipe won, by how much, and whether the difference is larger
    than the seed spread (the rule ``verdict_lines`` states)."""
    losses = {"A-KD": (3.89, 3.91), "M": (4.05, 4.08), "A": (3.95, 4.20), "M-CE": (4.04, 4.00)}
    results = {(run, s): _run(run, s, 1e9, loss, 0.3) for run, pair in losses.items() for s, loss in enumerate(pair)}
    results[("M-OBS", 0)] = _run("M-OBS", 0, 1e9, 4.5, 0.3)  # one seed only
    results[("A-ii", 0)] = _run("A-ii", 0, 2e9, 3.70, 0.3)
    results[("M-ii", 0)] = _run("M-ii", 0, 2e9, 3.80, 0.3)
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    verdict = text.split("## Verdict")[1].split("\nRuns:")[0]
    assert "- At matched tokens, by mean test loss: A-KD 3.9000 (2 seeds), M-CE 4.0200 (2 seeds), M 4.0650 " \
           "(2 seeds), A 4.0750 (2 seeds), M-OBS 4.5000 (1 seed)." in verdict
    # A-KD: lower on both seeds by 0.16 and 0.17, more than any spread (0.0212 is M's std)
    assert "- A-KD is lower than M by 0.1650 (mean of 2 seeds, paired; M better on 0 of 2): larger than the seed " \
           "spread (0.0212)." in verdict
    # A: lower on one seed, higher on the other
    assert "- A is higher than M by 0.0100 (mean of 2 seeds, paired; M better on 1 of 2): within the seed spread" \
        in verdict
    # M-CE: lower on both seeds, but by less than the paired differences' own spread
    assert "- M-CE is lower than M by 0.0450 (mean of 2 seeds, paired; M better on 0 of 2): within the seed " \
           "spread (0.0495)." in verdict
    assert "- M-OBS is higher than M by 0.4500 on 1 seed: no seed spread yet." in verdict
    assert "- At matched FLOPs, by mean test loss: A-ii 3.7000 (1 seed), M-ii 3.8000 (1 seed)." in verdict
    assert "- A-ii is lower than M-ii by 0.1000 on 1 seed: no seed spread yet." in verdict
    assert "| -0.1650 ± 0.0071 | 0/2 |" in text  # the paired difference's own spread in the table
    # no reference yet; a tie; a zero difference on one seed is no sign
    del results[("M", 0)], results[("M", 1)]
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    assert "- M has not finished: no paired comparison yet." in open(os.path.join(str(tmp_path), "report.md")).read()
    results[("M", 0)] = _run("M", 0, 1e9, 3.89, 0.3)
    results[("M", 1)] = _run("M", 1, 1e9, 4.41, 0.3)
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    verdict = open(os.path.join(str(tmp_path), "report.md")).read().split("## Verdict")[1]
    assert "- A-KD is lower than M by 0.2500 (mean of 2 seeds, paired; M better on 0 of 2): within" in verdict
    results[("M", 0)] = _run("M", 0, 1e9, 3.99, 0.3)
    results[("M", 1)] = _run("M", 1, 1e9, 3.81, 0.3)
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    verdict = open(os.path.join(str(tmp_path), "report.md")).read().split("## Verdict")[1]
    assert "- A-KD equals M (mean of 2 seeds" in verdict


def test_a_diverged_run_ranks_last_and_is_paired_with_no_number(tmp_path):
    """A NaN test loss (a run that diverged) is neither the winner nor "higher by nan"."""
    losses = {"A-KD": (3.89, float("nan")), "M": (4.05, 4.08), "A": (3.95, 4.00)}
    results = {(run, s): _run(run, s, 1e9, loss, 0.3) for run, pair in losses.items() for s, loss in enumerate(pair)}
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    verdict = open(os.path.join(str(tmp_path), "report.md")).read().split("## Verdict")[1].split("\nRuns:")[0]
    assert "- At matched tokens, by mean test loss: A 3.9750 (2 seeds), M 4.0650 (2 seeds), A-KD nan (2 seeds)." \
        in verdict
    assert "- A-KD against M: no difference, a test loss is not a number" in verdict
    assert "- A is lower than M by 0.0900" in verdict


def test_the_final_test_loss_on_a_larger_sample_has_its_own_table_and_verdict(tmp_path):
    """The final checkpoints measured on more test data (``campaign.measure_final_test``): a table
    per setting beside the in-run loss, paired with M / M-ii, and the verdict's own lines; a run
    not measured (a campaign resumed with the measurement turned on, mid-way) is left out."""
    in_run = {"A-KD": (3.89, 3.89), "M": (4.06, 3.93)}
    final = {"A-KD": (3.95, 3.97), "M": (4.00, 4.03)}
    results = {}
    for run in in_run:
        for s in (0, 1):
            results[(run, s)] = {**_run(run, s, 1e9, in_run[run][s], 0.3),
                                 "final_test": {"loss": final[run][s], "samples": 256, "tokens": 65536}}
    results[("A", 0)] = _run("A", 0, 1e9, 3.89, 0.3)  # finished before the measurement was asked for
    results[("A-ii", 0)] = {**_run("A-ii", 0, 2e9, 3.70, 0.3),
                            "final_test": {"loss": 3.75, "samples": 256, "tokens": 65536}}
    results[("M-ii", 0)] = {**_run("M-ii", 0, 2e9, 3.80, 0.3),
                            "final_test": {"loss": 3.70, "samples": 256, "tokens": 65536}}
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    section = text.split("## Final test loss on a larger sample (65,536 tokens)")[1].split("## Verdict")[0]
    assert "| A-KD | 3.9600 ± 0.0141 (2 seeds) | -0.0550 ± 0.0071 | 0/2 | 3.8900 |" in section
    assert "| M | 4.0150 ± 0.0212 (2 seeds) |  |  | 3.9950 |" in section
    assert "| A |" not in section
    assert "| A-ii | 3.7500 (1 seed) | +0.0500 | 1/1 | 3.7000 |" in section
    verdict = text.split("## Verdict")[1].split("\nRuns:")[0]
    # the in-run loss says A-KD by 0.10, larger than the spread; the larger sample says 0.055, still on both seeds
    assert "- A-KD is lower than M by 0.1050 (mean of 2 seeds, paired; M better on 0 of 2): larger than" in verdict
    assert "- At matched tokens, by mean final test loss: A-KD 3.9600 (2 seeds), M 4.0150 (2 seeds)." in verdict
    assert "- A-KD is lower than M by 0.0550 (mean of 2 seeds, paired; M better on 0 of 2): larger than the seed " \
           "spread (0.0212)." in verdict
    assert "- A-ii is higher than M-ii by 0.0500 on 1 seed: no seed spread yet." in verdict
    # a run measured on another number of tokens (a failed measurement after another N) is neither
    # averaged nor paired: it is named
    results[("A-KD", 1)]["final_test"] = {"loss": 3.5, "samples": 512, "tokens": 131072}
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    section = text.split("## Final test loss on a larger sample (65,536 tokens)")[1].split("## Verdict")[0]
    assert "Left out, measured on another number of tokens" in section and "A-KD seed 1 (131,072)" in section
    assert "| A-KD | 3.9500 (1 seed) | -0.0500 | 0/1 | 3.8900 |" in section
    assert "- A-KD is lower than M by 0.0500 on 1 seed: no seed spread yet." in text.split("## Verdict")[1]
    # with no run measured, no section and no final-test verdict
    for r in results.values():
        r.pop("final_test", None)
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0, 1], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    assert "larger sample" not in text and "final test loss" not in text


def test_the_seconds_are_the_runs_own_where_they_have_them_and_marked_where_not(tmp_path):
    """A run's own account of its steps (``campaign.train_seconds``) survives a campaign killed
    mid-run; the campaign's clock does not: a row without the former is marked."""
    results = {("parent", 0): {**_run("parent", 0, 0, 3.0, 0.4), "tokens_trained": 0, "wall_seconds": 80.0,
                               "cpu_seconds": 60.0}}
    results[("A", 0)] = {**_run("A", 0, 1e9, 3.5, 0.3), "train_wall_seconds": 1900.0, "train_cpu_seconds": 3700.0}
    results[("M", 0)] = _run("M", 0, 1e9, 3.6, 0.3)  # begun before the runs kept their own account
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    table = text.split("## At matched tokens")[1].split("## At matched FLOPs")[0]
    assert "| 1900 (3700) |" in table and "| 10 (9)* |" in table and "| 80 (60) |" in table
    assert "*: seconds measured by the campaign around each attempt" in table
    del results[("M", 0)]
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0], results, {}, [], "cmd")
    assert "*: seconds measured" not in open(os.path.join(str(tmp_path), "report.md")).read()


def _with_curve(result: dict, points: list[tuple[int, float | None]], seconds: float = 30.0) -> dict:
    """``result`` with a task curve: (iteration, average) points, scored during training (None:
    an evaluation without the tasks)."""
    curve = []
    for it, average in points:
        point = {"iteration": it, "tokens": it * 512, "flops": it * 1e6, "test_loss": 4.0}
        if average is not None:
            point.update(tasks={"boolq": average - 0.1, "average": average}, tasks_limit=4)
        curve.append(point)
    return {**result, "curve": curve, "task_curve_wall_seconds": seconds, "task_curve_cpu_seconds": seconds}


def test_the_task_curve_is_a_table_and_a_plot_of_what_each_run_scored_during_training(tmp_path):
    """Item 3 of issue 28: the task curve per arm. Points are means over the seeds that have them
    (marked when fewer than all); an -ii run that is its arm (same_as) is not a second row; a run
    scored only at its end (no curve) has no row."""
    seeds = [0, 1]
    results = {("parent", s): {**_run("parent", s, 0, 3.0, 0.40), "pruning": []} for s in seeds}
    results[("A", 0)] = _with_curve(_run("A", 0, 1e9, 3.5, 0.3), [(4, 0.30), (6, None), (8, 0.34)], 20.0)
    results[("A", 1)] = _with_curve(_run("A", 1, 1e9, 3.5, 0.3), [(4, 0.32), (8, 0.36)], 40.0)
    results[("A-ii", 0)] = {**results[("A", 0)], "run": "A-ii", "same_as": "A"}
    results[("M", 0)] = _with_curve(_run("M", 0, 1e9, 3.7, 0.3), [(4, 0.28), (8, 0.29)])
    results[("M-ii", 0)] = _with_curve(_run("M-ii", 0, 2e9, 3.6, 0.3), [(4, 0.28), (8, 0.29), (12, 0.31)])
    # each seed's -ii run ends where its budget does: their ends are one column
    results[("M-ii", 1)] = _with_curve(_run("M-ii", 1, 2e9, 3.6, 0.3), [(4, 0.30), (8, 0.31), (10, 0.33)])
    results[("M-CE", 0)] = _run("M-CE", 0, 1e9, 3.7, 0.3)  # scored at its end only
    out = str(tmp_path)
    write_report(out, get_recipe("cpu-tiny-real"), seeds, results, {}, [], "cmd")
    text = open(os.path.join(out, "report.md")).read()
    section = text.split("## Task curves")[1].split("\n\n")
    assert "the first 4 documents of each task" in section[1]
    assert "Scoring took 30 s of wall clock per run on average" in section[1]  # (20 + 40 + 30 + 30 + 30) / 5
    rows = section[2].splitlines()
    assert rows[0] == "| run | iter 4 | iter 8 | last |"
    assert "| A | 0.310 |  | 0.350 |" in rows  # both seeds: no mark
    assert "| M | 0.280 (1) |  | 0.290 (1) |" in rows and "| M-ii | 0.290 | 0.300 | 0.320 |" in rows
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["task_curves"]["M-ii"][-1] == {"iteration": "last", "tokens": 11 * 512, "score": pytest.approx(0.32),
                                                 "seeds": 2}
    assert not any(r.startswith(("| A-ii ", "| M-CE ", "| parent ")) for r in rows)
    assert os.path.getsize(os.path.join(out, "task_curves.png")) > 1000 and "(task_curves.png)" in text


def test_no_task_curve_section_without_one(tmp_path):
    open(os.path.join(str(tmp_path), "task_curves.png"), "w").close()  # an earlier report's
    results = {("A", 0): _run("A", 0, 1e9, 3.5, 0.3)}
    write_report(str(tmp_path), get_recipe("cpu-tiny-real"), [0], results, {}, [], "cmd")
    text = open(os.path.join(str(tmp_path), "report.md")).read()
    assert "Task curves" not in text and not os.path.exists(os.path.join(str(tmp_path), "task_curves.png"))
    assert "task_curves" not in json.load(open(os.path.join(str(tmp_path), "report.json")))
