"""Copy a comparison's records (``tools/compare_baselines.py --out``) without its checkpoints.

    python tools/campaign_records.py cmp_real/ docs/results/cpu-real/

A campaign of many hours outlives the disk it ran on (a scratch folder purged, a machine given
back): its checkpoints are gigabytes, but what the report and ``--resume`` read of a finished run
is small: ``plan.json``, each run's ``result.json`` (losses, curves, FLOPs, the found shape),
``tasks.json``, ``final_test.json``, the commands it ran and its ``tb/*.jsonl`` logs. This copies
exactly those, so they can be kept (e.g. committed) and the campaign continued elsewhere:

    cp -r docs/results/cpu-real/ cmp_real/ && python tools/compare_baselines.py ... --out cmp_real/ --resume

reads every finished run from its record and trains only what did not finish (a run's
``result.json`` with status ``ok`` is finished). What needs a finished run's checkpoint cannot be
redone there: scoring it on other tasks or measuring it on another test sample (said by the
campaign, which leaves its result as it was). Unfinished runs and failed ones are copied as they
are recorded; a resume retrains them from the start (their checkpoints are not copied).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.outputs import OutputError, require_writable  # noqa: E402

# what a record is: the campaign's and each run's small files (never a checkpoint, nor a log that
# may be large: the run's log.txt, the tasks' and final test's logs)
RECORD_SUFFIXES = (".json", ".jsonl", ".sh", ".md", ".png")
SKIPPED_FOLDERS = {"ckpt", "slurm"}
MAX_RECORD_BYTES = 20 * 1024 * 1024


def record_files(out: str) -> list[str]:
    """The records under ``out``, as paths relative to it, sorted."""
    found = []
    for root, folders, files in os.walk(out):
        folders[:] = sorted(f for f in folders if f not in SKIPPED_FOLDERS
                            and not os.path.isfile(os.path.join(root, f, "latest_checkpointed_iteration.txt")))
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(RECORD_SUFFIXES) and os.path.isfile(path) and not os.path.islink(path) \
                    and os.path.getsize(path) <= MAX_RECORD_BYTES and not name.startswith(".") \
                    and not name.endswith(".tmp"):
                found.append(os.path.relpath(path, out))
    return sorted(found)


def copy_records(out: str, dest: str) -> list[str]:
    """Copies ``out``'s records into ``dest`` (made; files there of the same names replaced, each
    whole or not at all); returns what it copied."""
    if not os.path.isfile(os.path.join(out, "plan.json")):
        raise OutputError(f"{out} holds no comparison (no plan.json): give a tools/compare_baselines.py --out")
    if os.path.realpath(dest) == os.path.realpath(out):
        raise OutputError(f"{dest} is the comparison itself: give another folder")
    require_writable(dest, "DEST")
    files = record_files(out)
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".tmp"
        shutil.copyfile(os.path.join(out, rel), partial)
        os.replace(partial, target)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/campaign_records.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the comparison's folder (tools/compare_baselines.py --out)")
    p.add_argument("dest", help="where the records go")
    args = p.parse_args(argv)
    try:
        files = copy_records(args.out, args.dest)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = sum(1 for f in files if os.path.basename(f) == "result.json")
    print(f"copied {len(files)} files ({runs} run records) from {args.out} to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
