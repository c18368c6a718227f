"""Copy a comparison's records (``tools/compare_baselines.py --out``) without its checkpoints.

    python tools/campaign_records.py cmp_real/ docs/results/cpu-real/

A campaign of many hours outlives the disk it ran on (a scratch folder purged, a machine given
back): its checkpoints are gigabytes, but what the report and ``--resume`` read of a finished run
is small: ``plan.json``, each finished run's ``result.json`` (losses, curves, FLOPs, the found
shape), ``tasks.json``, ``final_test.json``, the commands it ran and its ``tb/*.jsonl`` logs.
This copies exactly those, so they can be kept (e.g. committed) and the campaign continued
elsewhere, with the same data paths (a resume checks them; symlinks do):

    mkdir -p cmp_real && cp -r docs/results/cpu-real/. cmp_real/ && python tools/compare_baselines.py ... --resume

reads every finished run from its record and trains only what did not finish. A run that had
not finished (or failed) is not copied: its checkpoint is not, so a resume trains it from the
start. What needs a finished run's checkpoint cannot be redone there and is said: scoring it on
other tasks, measuring it on another test sample, and (trained-parent recipes) starting ``A`` or
``C`` from a finished ``parent`` (copy ``parent/seedK/ckpt`` too, or delete the parent's
``result.json`` to train it again).

``DEST`` is replaced whole (written beside it, then renamed): it must be new, empty, or an earlier
copy of records (nothing in it but records and a ``plan.json``), never the comparison itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.outputs import OutputError, require_writable  # noqa: E402

# what a record is: the campaign's and each finished run's small files (never a checkpoint, nor a
# log, which may be large: the run's log.txt, the tasks' and final test's logs)
RECORD_SUFFIXES = (".json", ".jsonl", ".sh", ".md", ".png")
MAX_RECORD_BYTES = 20 * 1024 * 1024
CHECKPOINT_MARK = "latest_checkpointed_iteration.txt"


def _finished(folder: str) -> bool | None:
    """A run's folder (it has a ``command.sh`` or a ``result.json``): whether the run finished;
    None for any other folder."""
    path = os.path.join(folder, "result.json")
    if not os.path.isfile(path) and not os.path.isfile(os.path.join(folder, "command.sh")):
        return None
    try:
        return json.load(open(path)).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def _record_name(name: str) -> bool:
    return name.endswith(RECORD_SUFFIXES) and not name.startswith(".")


def _is_record(path: str) -> bool:
    """A plain file (a link is not: it may point anywhere, or nowhere) that a copy would hold."""
    return not os.path.islink(path) and os.path.isfile(path) and _record_name(os.path.basename(path)) \
        and os.path.getsize(path) <= MAX_RECORD_BYTES


def record_files(out: str) -> tuple[list[str], list[str]]:
    """(the records under ``out``, what was left out and why), as paths relative to ``out``, sorted."""
    found, left = [], []
    for root, folders, files in os.walk(out):
        rel = os.path.relpath(root, out)
        if _finished(root) is False:
            left.append(f"{rel}/ (a run that did not finish: a resume trains it from the start)")
            folders[:] = []
            continue
        kept = []
        for f in sorted(folders):
            path = os.path.join(root, f)
            if os.path.islink(path):
                left.append(f"{os.path.join(rel, f)}/ (a link)")
            elif f not in ("ckpt", "slurm") and not os.path.isfile(os.path.join(path, CHECKPOINT_MARK)):
                kept.append(f)
        folders[:] = kept
        for name in files:
            path = os.path.join(root, name)
            if not _record_name(name):
                continue
            if os.path.islink(path) or not os.path.isfile(path):
                left.append(f"{os.path.relpath(path, out)} (a link)")
            elif os.path.getsize(path) > MAX_RECORD_BYTES:
                left.append(f"{os.path.relpath(path, out)} (over {MAX_RECORD_BYTES >> 20} MB)")
            else:
                found.append(os.path.relpath(path, out))
    return sorted(found), sorted(left)


def _check_dest(out: str, dest: str) -> None:
    """``dest`` may be replaced: not the comparison, not inside it nor holding it, and nothing in it
    but an earlier copy's records."""
    real_out, real_dest = os.path.realpath(out), os.path.realpath(dest)
    if real_dest == real_out or real_dest.startswith(real_out + os.sep) or real_out.startswith(real_dest + os.sep):
        raise OutputError(f"{dest} is the comparison {out}, inside it or holds it: give a folder apart from it")
    if not os.path.exists(dest):
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise OutputError(f"{dest} exists and is not a folder: give a new folder or an earlier copy of records")
    others = [os.path.relpath(os.path.join(root, f), dest) for root, _, files in os.walk(dest) for f in files
              if not _is_record(os.path.join(root, f))]
    if others or (os.listdir(dest) and not os.path.isfile(os.path.join(dest, "plan.json"))):
        what = f"holds {others[0]}" if others else "holds no plan.json"
        raise OutputError(f"{dest} {what}: it is not an earlier copy of records, and it would be replaced whole. "
                          "Give a new or empty folder")


def copy_records(out: str, dest: str) -> tuple[list[str], list[str]]:
    """Replaces ``dest`` by a copy of ``out``'s records; returns (what it copied, what it left out)."""
    if not os.path.isfile(os.path.join(out, "plan.json")):
        raise OutputError(f"{out} holds no comparison (no plan.json): give a tools/compare_baselines.py --out")
    _check_dest(out, dest)
    require_writable(dest, "DEST")
    files, left = record_files(out)
    dest = os.path.abspath(dest)
    staging, old = f"{dest}.partial-{os.getpid()}", f"{dest}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for rel in files:
        target = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(out, rel), target)
    os.makedirs(staging, exist_ok=True)
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    return files, left


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/campaign_records.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the comparison's folder (tools/compare_baselines.py --out)")
    p.add_argument("dest", help="where the records go")
    args = p.parse_args(argv)
    try:
        files, left = copy_records(args.out, args.dest)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = sum(1 for f in files if os.path.basename(f) == "result.json" and not f.startswith("sweep" + os.sep))
    sweeps = sum(1 for f in files if os.path.basename(f) == "result.json") - runs
    print(f"copied {len(files)} files (the records of {runs} finished runs and {sweeps} sweep runs) "
          f"from {args.out} to {args.dest}")
    for what in left:
        print(f"left out: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
