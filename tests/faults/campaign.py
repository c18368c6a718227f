"""Fault injection: SIGKILL a rank of a real 2-rank run at random moments, resume, compare.

The run is the system's hardest path on CPU: TP=2, pruning on, an in-run shrink in the middle,
checkpoints every 2 steps. A *trial* starts it under torchrun, kills one rank (chosen at random)
at a random moment of one phase (a training step, a pruning event, a checkpoint save, the in-run
shrink), lets torchrun bring the rest down, then restarts the same command (``--load`` = ``--save``)
until it completes. A trial passes when every step's loss, the final masks and every tensor of
the final checkpoint (weights, fp32 masters, Adam moments) equal the uninterrupted run's bit for
bit, and no process of the run is left over (checked through an environment marker that every
descendant inherits, so orphans such as a shrink child or an async-save server are found too).

``python -m tests.faults --n 20`` is the campaign; the test suite runs a few trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.dist_helper import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("step", "pruning", "save", "shrink")
ITERS, SAVE_INTERVAL, PRUNE_INTERVAL = 14, 2, 2
TOKENS_PER_STEP = 8 * 64
PRUNE_START, PRUNE_END = 2 * TOKENS_PER_STEP, 8 * TOKENS_PER_STEP  # events at 4, 6, 8; shrink at 8
MARKER = "EFFICIENTLLM_FAULT_RUN"


def command(dataset: str, tokenizer: str, save: Path, tensorboard: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pretrain",
            "--model", "debug", "--tensor-model-parallel-size", "2", "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
            "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "2", "--seed", "7",
            "--data-path", dataset, "--tokenizer-model", tokenizer, "--split", "98,2,0",
            "--save", str(save), "--load", str(save), "--save-interval", str(SAVE_INTERVAL),
            "--tensorboard-dir", str(tensorboard), "--log-interval", "1",
            "--prune-target-ratio", "0.5", "--prune-start-tokens", str(PRUNE_START),
            "--prune-end-tokens", str(PRUNE_END), "--prune-interval", str(PRUNE_INTERVAL),
            "--shrink-at", "auto"]


@dataclasses.dataclass
class Outcome:
    losses: dict[int, float]
    masks: dict
    tensors: dict  # key -> tensor of the final checkpoint's model_optim
    iteration: int


@dataclasses.dataclass
class TrialResult:
    phase: str
    killed_rank: int | None
    killed_after: str  # the log line the kill followed
    attempts: int
    differences: list[str]
    leftovers: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences and not self.leftovers and self.killed_rank is not None


def marked_processes(run_id: str) -> list[tuple[int, str]]:
    """Live processes (pid, command line) whose environment carries this run's marker."""
    found, needle = [], f"{MARKER}={run_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie holds no resources; its parent reaps it
        except OSError:
            continue
        found.append((int(entry), cmdline))
    return found


def _workers(torchrun_pid: int) -> list[int]:
    try:
        with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except OSError:
        return []


def _trigger(phase: str, line: str) -> bool:
    """Whether this rank-0 log line opens the window in which ``phase`` runs next."""
    step = re.match(r"iteration\s+(\d+)/", line)
    if phase == "step":
        return bool(step) and int(step.group(1)) >= 1
    if phase == "pruning":  # the next step ends with a pruning event
        return bool(step) and (int(step.group(1)) + 1) % PRUNE_INTERVAL == 0 and \
            PRUNE_START < (int(step.group(1)) + 1) * TOKENS_PER_STEP <= PRUNE_END
    if phase == "save":  # the save follows this step's log line
        return bool(step) and int(step.group(1)) % SAVE_INTERVAL == 0
    return line.startswith("stopped at iteration") and line.rstrip().endswith("shrink")


def _attempt(cmd: list[str], env: dict, log, kill: tuple[str, float, random.Random] | None):
    """Run the command once; with ``kill``, SIGKILL one worker in the chosen phase's window.
    Returns (returncode, killed rank or None, the line the kill followed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed: dict = {"rank": None, "line": ""}

    def fire(line: str) -> None:
        phase, delay, rng = kill
        time.sleep(delay)
        workers = _workers(proc.pid)
        if workers and killed["rank"] is None:
            rank = rng.randrange(len(workers))
            try:
                os.kill(workers[rank], signal.SIGKILL)
                killed.update(rank=rank, line=line.strip())
            except ProcessLookupError:
                pass

    def read() -> None:
        armed = kill is not None
        for line in proc.stdout:
            log.write(line)
            if armed and _trigger(kill[0], line):
                armed = False
                threading.Thread(target=fire, args=(line,), daemon=True).start()

    # read in a thread: a leftover process that inherited the pipe would keep it open forever
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait()
    reader.join(timeout=15)
    return proc.returncode, killed["rank"], killed["line"]


def run_to_completion(cmd: list[str], run_id: str, log_path: Path, kill=None, max_attempts: int = 6):
    """Attempts until one exits 0; the first may be killed. Returns (attempts, kill info, leftovers)."""
    env, leftovers, killed = subprocess_env(**{MARKER: run_id}), [], (None, "")
    with open(log_path, "a") as log:
        for attempt in range(1, max_attempts + 1):
            rc, rank, line = _attempt(cmd, env, log, kill if attempt == 1 else None)
            if rank is not None:
                killed = (rank, line)
            # torchrun has brought the surviving rank down; nothing of the run may outlive it
            deadline = time.time() + 10
            while marked_processes(run_id) and time.time() < deadline:
                time.sleep(0.2)
            for pid, cmdline in marked_processes(run_id):
                leftovers.append(f"attempt {attempt}: pid {pid} still running: {cmdline[:200]}")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if rc == 0:
                return attempt, killed, leftovers
            if attempt == 1 and kill is not None and rank is None:
                raise RuntimeError(f"the run failed (rc {rc}) without being killed; see {log_path}")
    raise RuntimeError(f"no attempt completed in {max_attempts}; see {log_path}")


def outcome(save: Path, tensorboard: Path) -> Outcome:
    from pretrain.checkpoint import find_checkpoint, read_trainer_state
    from pretrain.checkpoint.stream import CheckpointReader

    losses = {}
    for line in (tensorboard / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["iteration"]] = record["loss"]  # a redone step: its last record counts
    folder = find_checkpoint(str(save))
    state = read_trainer_state(folder)
    reader = CheckpointReader(os.path.join(folder, "model_optim"))
    tensors = {key: reader.read(key) for key in reader.keys() if reader.tensor_meta(key) is not None}
    masks = state["callbacks"]["pruning"]["masks"]
    masks = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in masks.items()}
    return Outcome(losses, masks, tensors, state["iteration"])


def differences(reference: Outcome, other: Outcome) -> list[str]:
    import torch

    out = []
    if other.iteration != reference.iteration:
        out.append(f"final iteration {other.iteration} != {reference.iteration}")
    for it, loss in sorted(reference.losses.items()):
        if other.losses.get(it) != loss:
            out.append(f"iteration {it}: loss {other.losses.get(it)!r} != {loss!r}")
    if other.masks != reference.masks:
        out.append("final masks differ")
    if other.tensors.keys() != reference.tensors.keys():
        out.append(f"checkpoint keys differ: {sorted(other.tensors.keys() ^ reference.tensors.keys())[:5]}")
    for key in sorted(reference.tensors.keys() & other.tensors.keys()):
        if not torch.equal(reference.tensors[key], other.tensors[key]):
            out.append(f"tensor {key} differs")
    return out


def reference_run(dataset: str, tokenizer: str, workdir: Path) -> Outcome:
    save, tb = workdir / "reference" / "ckpt", workdir / "reference" / "tb"
    save.parent.mkdir(parents=True, exist_ok=True)
    run_to_completion(command(dataset, tokenizer, save, tb), f"reference-{os.getpid()}",
                      workdir / "reference" / "log.txt", max_attempts=1)
    return outcome(save, tb)


def trial(index: int, phase: str, rng: random.Random, dataset: str, tokenizer: str, workdir: Path,
          reference: Outcome) -> TrialResult:
    folder = workdir / f"trial{index:02d}-{phase}"
    save, tb = folder / "ckpt", folder / "tb"
    folder.mkdir(parents=True, exist_ok=True)
    # the window after the trigger line: a step takes ~0.1-0.3 s here, a save ~0.3 s, a shrink ~3 s
    delay = rng.uniform(0.0, 2.5 if phase == "shrink" else 0.3)
    attempts, (rank, line), leftovers = run_to_completion(
        command(dataset, tokenizer, save, tb), f"trial-{os.getpid()}-{index}", folder / "log.txt",
        kill=(phase, delay, rng))
    diffs = differences(reference, outcome(save, tb)) if rank is not None else []
    return TrialResult(phase, rank, line, attempts, diffs, leftovers)


def campaign(n: int, seed: int, dataset: str, tokenizer: str, workdir: Path, report=print) -> list[TrialResult]:
    rng = random.Random(seed)
    reference = reference_run(dataset, tokenizer, workdir)
    report(f"reference run: {reference.iteration} iterations, final loss {reference.losses[reference.iteration]:.4f}")
    results = []
    for i in range(n):
        phase = PHASES[i % len(PHASES)]
        result = trial(i, phase, rng, dataset, tokenizer, workdir, reference)
        results.append(result)
        verdict = "exact" if result.ok else "FAILED"
        report(f"trial {i + 1:>2}/{n}: killed rank {result.killed_rank} in a {phase} (after {result.killed_after!r}); "
               f"{result.attempts} attempts; {verdict}"
               + "".join(f"\n    {d}" for d in result.differences[:5] + result.leftovers[:5]))
    return results
