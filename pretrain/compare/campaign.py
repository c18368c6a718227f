"""Running a comparison: the learning-rate sweeps, every arm for every seed, resumable.

Each run's folder holds ``command.sh`` (the run, by hand), ``log.txt``, ``ckpt/``, ``tb/`` and,
once it has finished, ``result.json`` (``accounting``'s numbers). ``--resume`` skips the runs
whose result is there and reruns the others (a run that was killed resumes from its checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import subprocess
import time
from collections.abc import Callable

from pretrain.checkpoint.atomic import atomic_write_text
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.compare import arms
from pretrain.compare.accounting import cumulative_flops_at, run_flops
from pretrain.report import read_jsonl
from pretrain.run import run_lock
from pretrain.compare.arms import Context, RunPlan, family_of, plan_run
from pretrain.compare.recipes import Recipe
from pretrain.config import ConfigError, DataConfig, ModelConfig
from pretrain.data import check_tokenizer_matches_data, load_tokenizer
from pretrain.pruning.masks import ModelShape
from pretrain.pruning.solver import SolverConstraints, unit_size


def _log(message: str) -> None:
    print(f"[compare] {message}", flush=True)


def run_local(command: str, log_path: str) -> int:
    """Runs one ``command.sh``; its output goes to ``log_path`` (appended: attempts stay readable).
    The run inherits the campaign's lock (``hold_campaign_folder``)."""
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} bash {command}\n")
        log.flush()
        run = subprocess.Popen(["bash", command], stdout=log, stderr=subprocess.STDOUT,
                               pass_fds=run_lock.held_descriptors())
        try:
            return run.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the run too (one process group): it is saving a checkpoint before it
            # exits; subprocess.run would kill it 0.25 s later, mid-save
            _log("interrupted: the run saves a checkpoint and stops (Ctrl-C again kills it; --resume goes on)")
            try:
                run.wait()
            except KeyboardInterrupt:
                run.kill()
                run.wait()
            raise


def hold_campaign_folder(out: str, command: str) -> str:
    """One campaign per ``--out``: the folder's lock (``pretrain.run.run_lock``) for the campaign's
    whole life, passed on to the runs it starts (``run_local``). A second campaign on the same
    folder would start the same runs (each refused by its run's own lock and recorded as failed)
    and move on to the next, both writing results; a campaign killed alone leaves its run
    training, and a new one must wait for it. Returns a note when a dead campaign's lock was taken
    over. Raises ConfigError naming the holder."""
    try:
        return run_lock.acquire(out, "--out", command)
    except run_lock.FolderInUseError as err:
        raise ConfigError(
            f"--out {out} is in use by another campaign ({err.owner}): two campaigns on one folder run the "
            "same arms twice and overwrite each other's results. "
            + ("Its campaign process has exited but a run it started is still going (a stopped run saves "
               "its checkpoint first; OUT/RUN/seedK/ckpt/run.lock names its pid): wait for it to end, or stop "
               "it, then --resume" if err.orphaned else
               "Wait for it to end, stop it (kill its process group: its runs save a checkpoint and stop), "
               "then --resume; or give another --out")
            + (f" ({err.hint})" if err.hint else "")) from None


def release_campaign_folder(out: str) -> None:
    """Drop the lock (a campaign that ended; not one that was interrupted, whose runs may still be
    saving: its lock is taken over once they have exited)."""
    run_lock.release(out)


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of every finished child process and their descendants so far:
    the difference around a local run is that run's CPU time, which a shared machine's load does
    not inflate the way it inflates wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def expected_final_iteration(recipe: Recipe, plan: RunPlan) -> int:
    if "--skip-train" in plan.flags:  # an imported parent, measured where it is
        return 0
    if plan.name == "parent" and "--exit-interval" in plan.flags:
        return recipe.iters(recipe.parent_tokens)
    return plan.train_tokens // recipe.tokens_per_step


def collect(recipe: Recipe, plan: RunPlan, wall_seconds: float) -> dict:
    """The result of a finished run from its files (see ``accounting``)."""
    if "--skip-train" in plan.flags:
        return _collect_measured(recipe, plan, wall_seconds)
    stored = StoredCheckpoint.find(os.path.join(plan.folder, "ckpt"))
    if stored is None:
        return {"status": "failed", "reason": "no checkpoint was written"}
    state = stored.trainer_state
    expected = expected_final_iteration(recipe, plan)
    if state["iteration"] != expected:
        return {"status": "failed", "reason": f"stopped at iteration {state['iteration']} of {expected}"}
    tb = os.path.join(plan.folder, "tb")
    metrics = read_jsonl(os.path.join(tb, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(tb, "evals.jsonl"))
    pruning = read_jsonl(os.path.join(tb, "pruning_history.jsonl"))
    model, vocab = state["config"]["model"], state["vocab_size"]
    step = recipe.tokens_per_step
    flops = run_flops(metrics, step, pruning, recipe.model, vocab)
    spent = cumulative_flops_at(metrics, step)
    final = [e for e in evals if e["iteration"] == expected and e.get("test_loss") is not None]
    if not final:
        return {"status": "failed", "reason": f"no test evaluation at iteration {expected} (tb/evals.jsonl)"}
    return {
        "status": "ok", "run": plan.name, "seed": plan.seed, "lr": plan.lr,
        "final_model": model, "vocab_size": vocab, "params": arms.parameters(model, vocab),
        "first_iteration": metrics[0]["iteration"] if metrics else 0, "final_iteration": expected,
        "tokens_trained": len(metrics) * step, "end_tokens": expected * step,
        "flops": flops, "flops_per_token_final": arms.training_flops(model, vocab),
        # what one more token at the end costs (the teacher's forward included): the -ii extensions
        "flops_per_token_last_step": (metrics[-1]["flops_per_token"] + metrics[-1].get("kd_teacher_flops_per_token", 0)
                                      if metrics else 0),
        "tasks": _tasks(plan.folder),
        "test_loss": final[-1]["test_loss"], "valid_loss": final[-1].get("valid_loss"),
        "wall_seconds": wall_seconds, **train_seconds(metrics), **task_curve_seconds(evals),
        "curve": [{"iteration": e["iteration"], "tokens": e["tokens"], "flops": spent.get(e["iteration"], 0),
                   "test_loss": e.get("test_loss"), "valid_loss": e.get("valid_loss"),
                   **({"tasks": curve_tasks(e["benchmarks"]), "tasks_limit": e["benchmarks"].get("limit")}
                      if e.get("benchmarks") else {})} for e in evals],
        "pruning": [{"iteration": e["iteration"], "tokens": e["tokens"], "params": e["params"],
                     **{k: e[f"kept_{k}"] for k in ("heads", "ffn", "hidden", "layers") if f"kept_{k}" in e},
                     "kept_per_layer": e["kept_per_layer"], **({"search": e["search"]} if "search" in e else {})}
                    for e in pruning],
    }


def train_seconds(metrics: list[dict]) -> dict:
    """The run's own account of its time (``LoggingCallback``): wall and process CPU seconds summed
    over its steps, each step once (a resumed step's record replaces the lost attempt's), the
    evaluations and saves between steps included, the task curve's scoring not (its own
    ``tasks_seconds``: a benchmark, not training, and not in every run). Unlike the campaign's
    clock around each attempt (``wall_seconds.json``), it keeps the attempts a killed campaign
    never saw return. Empty for a run whose records predate these fields."""
    if not metrics or not all("process_cpu_seconds" in r for r in metrics):
        return {}
    return {"train_wall_seconds": sum(r["elapsed_seconds"] - r.get("tasks_seconds", 0.0) for r in metrics),
            "train_cpu_seconds": sum(r["process_cpu_seconds"] - r.get("tasks_cpu_seconds", 0.0) for r in metrics)}


def curve_tasks(benchmarks: dict) -> dict:
    """A point of the task curve (an ``evals.jsonl`` line's ``benchmarks``): {task: score,
    "average": the paper's seven, when they were all scored}."""
    scores = {name: m["score"] for name, m in benchmarks["tasks"].items()}
    if benchmarks.get("paper_average") is not None:
        scores["average"] = benchmarks["paper_average"]
    return scores


def task_curve_seconds(evals: list[dict]) -> dict:
    """What scoring the task curve during the run took (its end's scoring included); empty
    without one."""
    scored = [e["benchmarks"] for e in evals if e.get("benchmarks") and "seconds" in e["benchmarks"]]
    if not scored:
        return {}
    return {"task_curve_wall_seconds": sum(b["seconds"] for b in scored),
            "task_curve_cpu_seconds": sum(b["cpu_seconds"] for b in scored)}


def _collect_measured(recipe: Recipe, plan: RunPlan, wall_seconds: float) -> dict:
    """An imported parent measured with --skip-train: its losses at iteration 0, nothing trained or charged."""
    stored = StoredCheckpoint.find(plan.first_load)
    evals = [e for e in read_jsonl(os.path.join(plan.folder, "tb", "evals.jsonl")) if e.get("test_loss") is not None]
    if stored is None or not evals:
        return {"status": "failed", "reason": "no test evaluation was written (tb/evals.jsonl)"}
    state = stored.trainer_state
    model, vocab = state["config"]["model"], state["vocab_size"]
    return {"status": "ok", "run": plan.name, "seed": plan.seed, "lr": plan.lr, "final_model": model,
            "vocab_size": vocab, "params": arms.parameters(model, vocab), "first_iteration": 0, "final_iteration": 0,
            "tokens_trained": 0, "end_tokens": 0, "flops": {"actual": 0, "ideal": 0, "teacher": 0},
            "flops_per_token_final": arms.training_flops(model, vocab), "flops_per_token_last_step": 0,
            "test_loss": evals[-1]["test_loss"], "valid_loss": evals[-1].get("valid_loss"),
            "wall_seconds": wall_seconds, "tasks": _tasks(plan.folder),
            "curve": [{"iteration": 0, "tokens": 0, "flops": 0, "test_loss": evals[-1]["test_loss"],
                       "valid_loss": evals[-1].get("valid_loss")}], "pruning": []}


# A run's benchmark scores (issue 27 item 4): ``{"settings": {"tasks", "limit", "num_fewshot",
# "checkpoint", "primary"}, "scores": {task: primary metric, "average": the paper's seven},
# "results": tools/evaluate.py's JSON}``. An older file of the form ``{"task": accuracy}`` still reads.
TASKS_FILE = "tasks.json"


def _read_tasks_file(folder: str) -> dict | None:
    return _read_json(os.path.join(folder, TASKS_FILE))  # a damaged file is scored again


def _tasks(folder: str) -> dict | None:
    """{task: score} of the run's ``TASKS_FILE`` (the report's task table), or None."""
    data = _read_tasks_file(folder)
    if not data:
        return None
    return data["scores"] if isinstance(data.get("scores"), dict) else data


def task_settings(ctx: Context, checkpoint: str) -> dict:
    """What a ``TASKS_FILE`` must have been made with to stand: the tasks, the documents (the first
    ``task_limit`` of each: the same for every run) and the checkpoint scored."""
    return {"tasks": list(ctx.tasks), "limit": ctx.task_limit, "num_fewshot": 0, "checkpoint": checkpoint}


# A run's final test loss on a larger sample (``Campaign.measure_final_test``): ``{"settings":
# final_test_settings(...), "loss", "samples", "tokens"}``.
FINAL_TEST_FILE = "final_test.json"


def _read_json(path: str) -> dict | None:
    try:
        data = json.load(open(path)) if os.path.isfile(path) else None
    except (OSError, json.JSONDecodeError):
        return None  # a damaged file: measured again
    return data if isinstance(data, dict) else None


def final_test_settings(ctx: Context, recipe: Recipe, checkpoint: str) -> dict:
    """What a ``FINAL_TEST_FILE`` must have been made with to stand: the test data, the sequences
    (the first ``final_test_samples`` of it, at the recipe's length) and the checkpoint."""
    return {"test_data_path": list(ctx.data.test_data_path), "samples": ctx.final_test_samples,
            "seq_length": recipe.seq_length, "checkpoint": checkpoint}


def _made_with(recorded: dict | None, settings: dict, checkpoint_known: bool) -> bool:
    """Whether a recorded measurement (``TASKS_FILE``, ``FINAL_TEST_FILE``) was made with every one
    of ``settings`` (it may record more); of a finished run whose checkpoint is gone (its records
    copied from another disk, ``tools/campaign_records.py``), with every one but the checkpoint."""
    made = (recorded or {}).get("settings") or {}
    return bool(recorded) and all(k in made and made[k] == v for k, v in settings.items()
                                  if checkpoint_known or k != "checkpoint")


def _gone(plan: RunPlan, undone: str, so: str) -> None:
    _log(f"{plan.name} seed {plan.seed}: its final checkpoint is gone (only its record is here: "
         f"tools/campaign_records.py), so it cannot be {undone}; {so} in the report")


class Campaign:
    """The sweeps, then every run of every seed, in dependency order; results kept on disk."""

    def __init__(self, recipe: Recipe, ctx: Context, seeds: list[int], runs: list[str],
                 execute: Callable[[str, str], int] = run_local):
        self.recipe, self.ctx, self.seeds, self.runs = recipe, ctx, seeds, runs
        self.family = family_of(recipe)
        self.execute = execute
        self.undecided_sweeps: set[str] = set()  # a rate failed: the runs it would set the rate of wait

    # ------------------------------------------------------------------ results on disk
    def result_path(self, plan: RunPlan) -> str:
        return os.path.join(plan.folder, "result.json")

    def load_results(self) -> None:
        """Every finished run's result into ``ctx.results``, and the sweeps' choices into ``ctx.lrs``."""
        for run in self.family.runs:
            for seed in self.seeds:
                path = os.path.join(self.ctx.run_dir(run, seed), "result.json")
                if os.path.isfile(path):
                    self.ctx.results[(run, seed)] = json.load(open(path))
        for sweep in self.family.sweeps:
            chosen = self.chosen_lr(sweep)
            if chosen is not None:
                self.ctx.lrs[sweep] = chosen

    def _sweep_results(self, sweep: str) -> dict[float, dict]:
        out = {}
        for lr in self.recipe.lrs:
            path = os.path.join(self.ctx.sweep_dir(sweep, lr), "result.json")
            if os.path.isfile(path):
                out[lr] = json.load(open(path))
        return out

    def chosen_lr(self, sweep: str) -> float | None:
        """The rate with the lowest validation loss (the training data's split; never the test set)."""
        if len(self.recipe.lrs) == 1:
            return self.recipe.lrs[0]
        done = {lr: r for lr, r in self._sweep_results(sweep).items() if r.get("status") == "ok"}
        if len(done) < len(self.recipe.lrs):
            return None
        return min(done, key=lambda lr: done[lr]["valid_loss"])

    # ------------------------------------------------------------------ one run
    def run_one(self, plan: RunPlan, score: bool = True) -> dict:
        """The run's result: read when it finished already, else from running (or resuming) it;
        then, with ``score``, its final checkpoint scored on the tasks (``score_tasks``)."""
        path = self.result_path(plan)
        if os.path.isfile(path):
            result = json.load(open(path))
            if result.get("status") == "ok":
                return self.measure(plan, result) if score else result
        command = arms.write_command(plan, self.recipe, self.ctx)
        wall_path = os.path.join(plan.folder, "wall_seconds.json")
        spent = json.load(open(wall_path)) if os.path.isfile(wall_path) else {"seconds": 0.0, "cpu_seconds": 0.0}
        wall, cpu = spent["seconds"], spent.get("cpu_seconds")  # None: an attempt before CPU time was kept
        already = collect(self.recipe, plan, wall)
        if already.get("status") == "ok":  # finished by an earlier attempt the campaign did not see end
            result = already
        elif self._start_is_gone(plan):
            result = {"status": "missing", "reason": (
                f"it starts from {plan.first_load}, which holds no checkpoint: the run that saved it finished, but "
                "only its record is here (tools/campaign_records.py copies no checkpoint). Copy that checkpoint "
                f"here, or delete {os.path.join(os.path.dirname(plan.first_load), 'result.json')} so that --resume "
                "trains it again")}
        else:  # not finished by an earlier attempt: run (or resume) it
            self._check_not_running(plan)
            _log(f"{plan.name} seed {plan.seed} (lr {plan.lr:g}, {plan.train_tokens:,} tokens): bash {command}")
            start, cpu_start = time.time(), children_cpu_seconds()
            code = self.execute(command, os.path.join(plan.folder, "log.txt"))
            wall += time.time() - start
            if cpu is not None and self.execute is run_local:  # a Slurm job's CPU time is not this process's child's
                cpu += children_cpu_seconds() - cpu_start
            else:
                cpu = None
            atomic_write_text(wall_path, json.dumps({"seconds": wall, "cpu_seconds": cpu}))
            result = collect(self.recipe, plan, wall) if code == 0 else {
                "status": "failed", "reason": f"exit code {code}; see {os.path.join(plan.folder, 'log.txt')}"}
        if result.get("status") == "ok":
            result["cpu_seconds"] = cpu
        result.update(run=plan.name, seed=plan.seed, lr=plan.lr, command=command)
        atomic_write_text(path, json.dumps(result, indent=1))
        _log(f"{plan.name} seed {plan.seed}: {result['status']}"
             + (f", test loss {result['test_loss']:.4f}, {result['wall_seconds']:.0f} s" if result["status"] == "ok"
                else f" ({result['reason']})"))
        return self.measure(plan, result) if score and result["status"] == "ok" else result

    @staticmethod
    def _start_is_gone(plan: RunPlan) -> bool:
        """A run that has no checkpoint of its own and would start from another run's (a
        trained-parent recipe's A and C from ``parent``), which is not here."""
        return bool(plan.first_load) and StoredCheckpoint.find(os.path.join(plan.folder, "ckpt")) is None \
            and StoredCheckpoint.find(plan.first_load) is None

    def measure(self, plan: RunPlan, result: dict) -> dict:
        """A finished run's final checkpoint judged beyond its in-run test loss: scored on the
        campaign's tasks, then its loss measured on a larger sample of the test data."""
        return self.measure_final_test(plan, self.score_tasks(plan, result))

    def _check_not_running(self, plan: RunPlan) -> None:
        """A run still trained by another process (left by a stopped campaign, or started by hand)
        stops the campaign: started again it would be refused by its own lock and recorded as failed,
        and the campaign would go on past it. (The campaign's lock catches this where the run
        inherits it; not on NFS, whose locks are not inherited.)"""
        save = os.path.join(plan.folder, "ckpt")
        try:
            run_lock.check_free(save)
        except run_lock.FolderInUseError as err:
            raise ConfigError(f"{plan.name} seed {plan.seed} is being trained by another process ({err.owner}): "
                              "wait for it to end or stop it, then --resume") from None

    def score_tasks(self, plan: RunPlan, result: dict) -> dict:
        """A finished run's final checkpoint (an imported parent's: the checkpoint it measured)
        scored on the campaign's tasks by ``tools/evaluate.py`` (``FOLDER/tasks.sh``), unless its
        ``TASKS_FILE`` was made with the same tasks, documents and checkpoint: a resumed campaign
        scores the runs finished before (or under other settings) and nothing twice. The scores go
        into ``result.json``; a scoring that fails is said and leaves the run's result as it was."""
        if not self.ctx.tasks:
            return result
        stored = self._final_checkpoint(plan)
        settings = task_settings(self.ctx, stored.folder if stored else None)
        existing = _read_tasks_file(plan.folder)
        if not _made_with(existing, settings, checkpoint_known=stored is not None):
            if stored is None:
                _gone(plan, f"scored on {', '.join(self.ctx.tasks)} (first {self.ctx.task_limit} documents)",
                      "its task scores are" + (" those recorded under other settings" if existing else " missing"))
                return result
            scored = self._run_tasks(plan, settings)
            if scored is None:
                return result
            atomic_write_text(os.path.join(plan.folder, TASKS_FILE), json.dumps(scored, indent=1))
            existing = scored
        if result.get("tasks") != existing["scores"] or result.get("tasks_settings") != existing["settings"]:
            result = {**result, "tasks": existing["scores"], "tasks_settings": existing["settings"]}
            atomic_write_text(self.result_path(plan), json.dumps(result, indent=1))
        return result

    def _run_tasks(self, plan: RunPlan, settings: dict) -> dict | None:
        """``tools/evaluate.py --tasks`` on ``settings['checkpoint']``: the ``TASKS_FILE`` contents, or
        None (said) when it failed."""
        output = os.path.join(plan.folder, "tasks_results.json")
        command = arms.write_tasks_command(plan, self.recipe, settings, output)
        _log(f"{plan.name} seed {plan.seed}: scoring {', '.join(settings['tasks'])} (first {settings['limit']} "
             f"documents each) on {settings['checkpoint']}: bash {command}")
        results = self._evaluate(plan, command, output, "tasks_log.txt", "the tasks were not scored",
                                 lambda r: isinstance(r.get("tasks"), dict) and all(
                                     isinstance(m, dict) and {"score", "primary"} <= set(m)
                                     for m in r["tasks"].values()))
        if results is None:
            return None
        scores = {name: m["score"] for name, m in results["tasks"].items()}
        if "average" in results:
            scores["average"] = results["average"]
        primary = {name: m["primary"] for name, m in results["tasks"].items()}
        _log(f"{plan.name} seed {plan.seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return {"settings": {**settings, "primary": primary}, "scores": scores, "results": results}

    def _final_checkpoint(self, plan: RunPlan) -> StoredCheckpoint | None:
        """What a finished run is judged by: its last checkpoint (an imported parent's: the
        checkpoint it measured)."""
        return StoredCheckpoint.find(plan.first_load if "--skip-train" in plan.flags
                                     else os.path.join(plan.folder, "ckpt"))

    def measure_final_test(self, plan: RunPlan, result: dict) -> dict:
        """A finished run's final checkpoint measured on the first ``ctx.final_test_samples``
        sequences of the test data by ``tools/evaluate.py`` (``FOLDER/final_test.sh``; the same
        sequences for every run, whatever its seed), unless its ``FINAL_TEST_FILE`` was made with
        the same data, sample count and checkpoint. The in-run test loss is a few batches (what
        the curves can afford at every evaluation); this one is large enough to tell measurement
        from seed spread. The loss goes into ``result.json`` as ``final_test``; a measurement that
        fails is said and leaves the result as it was (``--resume`` tries again)."""
        if not self.ctx.final_test_samples:
            return result
        stored = self._final_checkpoint(plan)
        settings = final_test_settings(self.ctx, self.recipe, stored.folder if stored else None)
        existing = _read_json(os.path.join(plan.folder, FINAL_TEST_FILE))
        if not _made_with(existing, settings, checkpoint_known=stored is not None):
            if "final_test" in result:  # made otherwise: not this comparison's, whether or not this one succeeds
                result = {k: v for k, v in result.items() if k != "final_test"}
                atomic_write_text(self.result_path(plan), json.dumps(result, indent=1))
            if stored is None:
                _gone(plan, f"measured on the first {self.ctx.final_test_samples} test sequences",
                      "its final test loss is missing")
                return result
            existing = self._run_final_test(plan, settings)
            if existing is None:
                return result
            atomic_write_text(os.path.join(plan.folder, FINAL_TEST_FILE), json.dumps(existing, indent=1))
        measured = {k: existing[k] for k in ("loss", "samples", "tokens")}
        if result.get("final_test") != measured:
            result = {**result, "final_test": measured}
            atomic_write_text(self.result_path(plan), json.dumps(result, indent=1))
        return result

    def _evaluate(self, plan: RunPlan, command: str, output: str, log_name: str, failed: str,
                  complete: Callable[[dict], bool]) -> dict | None:
        """Runs one ``tools/evaluate.py`` script of the run: its ``--output`` JSON (whose contents
        go into the run's own files), or None, said, when it failed or the output is not
        ``complete`` (the output is then kept to be read; ``--resume`` tries again)."""
        log = os.path.join(plan.folder, log_name)
        if os.path.exists(output):
            os.remove(output)  # an earlier attempt's: only this one's counts
        code = self.execute(command, log)
        results = _read_json(output) if code == 0 else None
        if not results or not complete(results):
            _log(f"{plan.name} seed {plan.seed}: {failed} (exit code {code}; see {log}"
                 + (f" and {output}" if os.path.exists(output) else "") + "); --resume tries again")
            return None
        os.remove(output)
        return results

    def _run_final_test(self, plan: RunPlan, settings: dict) -> dict | None:
        output = os.path.join(plan.folder, "final_test_results.json")
        command = arms.write_final_test_command(plan, self.recipe, settings, output)
        _log(f"{plan.name} seed {plan.seed}: test loss on the first {settings['samples']} sequences of the test data "
             f"({settings['checkpoint']}): bash {command}")
        measured = self._evaluate(plan, command, output, "final_test_log.txt", "the final test loss was not measured",
                                  lambda r: isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
                                  and isinstance(r.get("samples"), int) and isinstance(r.get("tokens"), int))
        if measured is None:
            return None
        _log(f"{plan.name} seed {plan.seed}: final test loss {measured['loss']:.4f} over {measured['tokens']:,} tokens")
        return {"settings": settings, "loss": measured["loss"], "samples": measured["samples"],
                "tokens": measured["tokens"]}

    def run_if_possible(self, run: str, seed: int, sweep: bool = False, lr: float | None = None) -> dict | None:
        missing = [need for need in self.family.needs[run]
                   if self.ctx.results.get((need, seed), {}).get("status") != "ok"]
        if missing:
            reason = f"needs {', '.join(missing)} (seed {seed}), which did not finish"
            if not sweep:
                self._record_missing(run, seed, reason)
            return None
        if self.family.late(run) and not sweep:
            # what its job would wait for (``Family.submit_after``): for an -ii run every pruned arm
            # of the seed, whose most expensive sets the budget; planned from fewer, the budget
            # could be too small and its result would stand on a resume
            waiting = [r for r in self.family.submit_after(run, self.runs)
                       if self.ctx.results.get((r, seed), {}).get("status") != "ok"]
            if waiting:
                self._record_missing(run, seed, f"its FLOPs budget waits for {', '.join(waiting)} (seed {seed}), "
                                     "which did not finish; --resume retries them and then this run")
                return None
        undecided = self.family.sweep_of.get(run)
        if not sweep and undecided in self.undecided_sweeps:
            # never trained at a rate the sweep did not choose: its result would stand on a resume
            self._record_missing(run, seed, f"its learning-rate sweep ({undecided}) did not finish every rate; "
                                 "--resume retries the failed rate and then this run")
            return None
        try:
            plan = plan_run(self.recipe, self.ctx, run, seed, lr=lr, sweep=sweep)
        except ConfigError as err:  # a late run whose inputs did not all finish (e.g. no FLOPs budget)
            if sweep or not self.family.late(run):
                raise
            self._record_missing(run, seed, str(err))
            return None
        base = self.ctx.results.get((run[:-3], seed)) if self.family.name == "imported" and run.endswith("-ii") else None
        if base and not sweep and plan.train_tokens == base["tokens_trained"]:
            result = self._same_as(plan, base)  # the arm that set the budget: matched tokens is matched FLOPs
        else:
            result = self.run_one(plan, score=not sweep)  # the sweeps choose a rate: no tasks
        if not sweep:
            self.ctx.results[(run, seed)] = result
        return result

    def _same_as(self, plan: RunPlan, base: dict) -> dict:
        result = {**base, "run": plan.name, "same_as": base["run"]}
        os.makedirs(plan.folder, exist_ok=True)
        atomic_write_text(self.result_path(plan), json.dumps(result, indent=1))
        _log(f"{plan.name} seed {plan.seed}: {base['run']} already spent the matched FLOPs; the same run")
        return result

    def _record_missing(self, run: str, seed: int, reason: str) -> None:
        folder = self.ctx.run_dir(run, seed)
        os.makedirs(folder, exist_ok=True)
        result = {"status": "missing", "run": run, "seed": seed, "reason": reason}
        atomic_write_text(os.path.join(folder, "result.json"), json.dumps(result, indent=1))
        self.ctx.results[(run, seed)] = result
        _log(f"{run} seed {seed}: not run ({reason})")

    def _sweep(self, sweep: str) -> None:
        """Every rate of the recipe at the sweep's shorter horizon, seed 0; the choice goes to ``ctx.lrs``."""
        if len(self.recipe.lrs) == 1 or sweep in self.ctx.lrs:
            return
        run = self.family.sweep_run[sweep]
        for lr in self.recipe.lrs:
            self.run_if_possible(run, self.seeds[0], sweep=True, lr=lr)
        chosen = self.chosen_lr(sweep)
        if chosen is None:
            failed = [f"{lr:g}" for lr in self.recipe.lrs
                      if self._sweep_results(sweep).get(lr, {}).get("status") != "ok"]
            _log(f"sweep {sweep}: rate(s) {', '.join(failed)} did not finish (see their log.txt under "
                 f"{os.path.dirname(self.ctx.sweep_dir(sweep, self.recipe.lrs[0]))}); the runs it decides wait "
                 "for --resume")
            self.undecided_sweeps.add(sweep)
            return
        losses = {lr: r["valid_loss"] for lr, r in self._sweep_results(sweep).items()}
        _log(f"sweep {sweep}: validation loss " + ", ".join(f"lr {lr:g}: {v:.4f}" for lr, v in losses.items())
             + f" -> lr {chosen:g}")
        self.ctx.lrs[sweep] = chosen

    # ------------------------------------------------------------------ all of it
    def run_all(self) -> None:
        self.load_results()
        family, first = self.family, self.seeds[0]
        wanted = set(self.runs)
        for sweep in family.early_sweeps:
            if any(family.sweep_of[r] == sweep for r in wanted):
                self._sweep(sweep)
        # The deciding runs' seeds first (at matched tokens, then at matched FLOPs), the references
        # last: a long campaign gives its answers in that order, one session at a time.
        for run, seed in family.campaign_order(self.runs, self.seeds):
            if run is not None:
                self.run_if_possible(run, seed)
                continue
            # the first seed's matched-token runs are done: B's sweeps need A's shape on it
            for sweep in family.sweeps:
                if sweep not in family.early_sweeps and any(family.sweep_of[r] == sweep for r in wanted) and \
                        self.ctx.results.get(("A", first), {}).get("status") == "ok":
                    self._sweep(sweep)


# ---------------------------------------------------------------------- checks before any training
def check_tokenizer(data) -> None:
    """Every arm trains with the comparison's --tokenizer-model: the training and test data must be
    made with it (the tokenizer identity rule, ``pretrain.data.tokenizer_identity_problem``),
    refused here before any run starts."""
    check_tokenizer_matches_data(data, load_tokenizer(data))


def check_test_set(data_path: list[str], test_data_path: list[str]) -> None:
    """The test set must be data no arm trains on: not a --data-path prefix, not the same bytes,
    and not made from the same source files (when the manifests name them)."""
    train = DataConfig(data_path=data_path).blend()[0]
    test = DataConfig(data_path=test_data_path).blend()[0]
    for t in test:
        for d in train:
            if os.path.realpath(t) == os.path.realpath(d) or _same_bytes(t + ".bin", d + ".bin"):
                raise ConfigError(f"--test-data-path {t} is the training data {d} (--data-path): a test set must be "
                                  "held out, e.g. python -m data_prep.build_corpus ... --holdout-fraction")
            shared = _manifest_sources(t) & _manifest_sources(d)
            if shared:
                raise ConfigError(f"--test-data-path {t} and --data-path {d} were made from the same source files "
                                  f"({', '.join(sorted(shared)[:3])}): the test set would overlap the training data")


def _same_bytes(a: str, b: str) -> bool:
    import filecmp

    return os.path.isfile(a) and os.path.isfile(b) and os.path.getsize(a) == os.path.getsize(b) and \
        filecmp.cmp(a, b, shallow=False)


def _manifest_sources(prefix: str) -> set[str]:
    """sha256 of each source file the manifest lists (older manifests list none)."""
    path = prefix + ".json"
    if not os.path.isfile(path):
        return set()
    try:
        manifest = json.load(open(path))
    except (OSError, json.JSONDecodeError):
        return set()
    sources = manifest.get("sources") or manifest.get("source_files") or []
    return {s["sha256"] for s in sources if isinstance(s, dict) and s.get("sha256")}


def training_tokens_available(data_path: list[str], split: str) -> int:
    """Tokens in the training share of --data-path's documents (megatron-core splits by document)."""
    return split_tokens_available(data_path, split, 0)


def split_tokens_available(data_path: list[str], split: str, part: int) -> int:
    """Tokens in share ``part`` (0 training, 1 validation) of --data-path's documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = DataConfig(data_path=data_path).blend()
    shares = [float(x) for x in split.replace("/", ",").split(",")]
    bounds = [sum(shares[:i]) / sum(shares) for i in (part, part + 1)]
    total = 0.0
    for i, prefix in enumerate(prefixes):
        dataset = IndexedDataset(prefix, mmap=True)  # kept alive: its lengths are a view of its mmap
        lengths = dataset.sequence_lengths
        first, last = (int(round(b * len(lengths))) for b in bounds)
        tokens = int(lengths[first:last].sum())
        del lengths, dataset
        # a blend reads each prefix in proportion to its weight: the scarcest one bounds the whole
        share = (weights[i] / sum(weights)) if weights else 1.0
        total = tokens / share if i == 0 else min(total, tokens / share)
    return int(total)


def check_validation_split(recipe: Recipe, longest_tokens: int, available: int) -> None:
    """The validation share holds every evaluation of the longest run in one epoch: megatron-core
    shuffles a split by its epoch count, so a run that needed a second epoch would read other
    validation batches than a shorter one, and Minitron's search (the M arms and their longer -ii
    runs) must choose on the same ones. (Learning-rate sweeps compare runs of one length.)"""
    iters = longest_tokens // recipe.tokens_per_step
    needed = (iters // recipe.eval_interval + 1) * recipe.eval_iters * recipe.global_batch_size * recipe.seq_length
    if needed > available:
        raise ConfigError(f"the longest run evaluates {needed:,} validation tokens, but the validation share of "
                          f"--data-path (--split {recipe.split}) holds {available:,}: runs of different lengths "
                          "would read different validation batches. Build a bigger corpus (python -m "
                          "data_prep.build_corpus --source debian-docs)")


def check_corpus(recipe: Recipe, needed_tokens: int, available: int, what: str) -> None:
    if needed_tokens > available:
        raise ConfigError(f"{what} reads {needed_tokens:,} training tokens, but the training share of --data-path "
                          f"(--split {recipe.split}) holds {available:,}: no arm may repeat data. Build a bigger "
                          "corpus (python -m data_prep.build_corpus --source debian-docs) or pick a smaller recipe")


def format_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------- an imported parent's checks
def check_parent(parent: str) -> tuple[dict, int, tuple[str, str]]:
    """(its model config, its padded vocabulary, (tokenizer type, tokenizer path)) of ``--parent``,
    which must be a checkpoint made by ``tools/convert_from_hf.py`` with its tokenizer beside it."""
    importer = (f"import it first: python tools/convert_from_hf.py --load {parent} --save {parent.rstrip('/')}_ckpt, "
                "then give that folder as --parent")
    if not os.path.exists(parent):
        raise ConfigError(f"--parent {parent} does not exist: give the folder tools/convert_from_hf.py wrote")
    if parent.endswith(".gguf") or os.path.isfile(os.path.join(parent, "config.json")):
        raise ConfigError(f"--parent {parent} is a HuggingFace model or GGUF file, not an imported checkpoint: {importer}")
    stored = StoredCheckpoint.find(parent)
    if stored is None:
        raise ConfigError(f"--parent {parent} holds no valid checkpoint: {importer}")
    state = stored.trainer_state
    if not state.get("imported_from"):
        raise ConfigError(f"--parent {parent} is a checkpoint trained here, not a pretrained model imported by "
                          "tools/convert_from_hf.py: a real-parent recipe starts from a released model (a trained "
                          "parent is what the cpu-tiny, cpu-small and gpu-1b recipes train themselves)")
    tokenizer = stored.tokenizer_files
    if tokenizer is None or not os.path.exists(tokenizer[1]):
        where = f" ({tokenizer[1]} is missing)" if tokenizer else ""
        raise ConfigError(f"--parent {parent} has no tokenizer{where}: the corpus must be tokenized with the parent's "
                          "own; import the model again with its tokenizer files (tokenizer.json or tokenizer.model "
                          "beside its config), or a GGUF, which carries one")
    return state["config"]["model"], int(state["vocab_size"]), tokenizer


def check_parent_tokenizer(parent: str, tokenizer: tuple[str, str], data_path: list[str],
                           test_data_path: list[str]) -> None:
    """The training and test corpora were made with the parent's tokenizer (their manifests say)."""
    data = DataConfig(data_path=data_path, tokenizer_type=tokenizer[0], tokenizer_model=tokenizer[1],
                      test_data_path=test_data_path)
    loaded = load_tokenizer(data)
    for what, config in (("--data-path", data), ("--test-data-path", data.test_data())):
        try:
            check_tokenizer_matches_data(config, loaded)
        except ConfigError as err:
            raise ConfigError(f"{what} was not made with the tokenizer of --parent {parent} ({tokenizer[1]}): "
                              f"tokenize the corpus with it (tools/preprocess_data.py --tokenizer-model "
                              f"{tokenizer[1]}). {err}") from None


def smallest_model(recipe: Recipe, vocab: int) -> tuple[int, int, int]:
    """(parameters, hidden width, align) of the smallest model the solver can leave of the recipe's
    parent: every type taken down unit by unit by the solver's own rule (``solver.unit_size``, the
    floors of ``SolverConstraints``) until no unit may go. The solver itself, asked for 0 parameters,
    gives the same masks one greedy move at a time (half a minute for a 30-layer model)."""
    shape = ModelShape.from_config(ModelConfig(**recipe.model), vocab)
    align = recipe.prune_align or (64 if recipe.gpus_per_node else 8)  # the trainer's default per device
    c = SolverConstraints(tensor_parallel=recipe.tensor_parallel, align=align)

    def floor(kept: int, unit: int, minimum: int) -> int:
        while size := unit_size(kept, unit, minimum):
            kept -= size
        return kept

    masks = shape.full_masks()
    for layer in range(shape.num_layers):
        masks.heads[layer, floor(shape.groups_of(layer), c.group_unit(), max(c.min_groups, c.group_unit())):] = False
        masks.ffn[layer, floor(shape.ffn_of(layer), c.ffn_unit(), c.min_ffn):] = False
    hidden = floor(shape.hidden, c.hidden_unit(), c.min_hidden)
    masks.hidden[hidden:] = False
    return shape.parameter_count(masks), hidden, align


def check_reachable(recipe: Recipe, vocab: int) -> None:
    """The recipe's target is at or above the smallest model the parent can be pruned to with the
    recipe's alignment and floors."""
    floor, hidden, align = smallest_model(recipe, vocab)
    total = ModelConfig(**recipe.model).num_parameters(vocab)["total"]
    target = int(recipe.target_ratio * total)
    if target < floor:
        raise ConfigError(
            f"recipe {recipe.name}: the target, {recipe.target_ratio:g} of the parent's {total:,} parameters "
            f"({target:,}), is below the smallest model the parent can be pruned to with alignment {align} "
            f"({floor:,} parameters: hidden {hidden}, at least one query group and {align} FFN channels per layer; "
            f"the embeddings alone are {vocab * hidden:,}): raise --target-ratio")
