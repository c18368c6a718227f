"""slurm/preprocess.sbatch (issue 18): a job array over input files, then a dependent merge.

Fast tests run the recipe's stages with bash (a stand-in sbatch records the submissions); the slow
one runs it on the local Slurm cluster (slurm/local_cluster.sh) with 3 array tasks and checks the
merged dataset against one preprocessing run over the same files."""

import os
import stat
import subprocess
import sys

import pytest

from tests.slurm.test_slurm import _env, _wait, cluster  # noqa: F401 (cluster: the fixture)
from data_prep.preprocess import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "slurm", "preprocess.sbatch")


@pytest.fixture(scope="module")
def inputs(tiny_dataset, tmp_path_factory):
    """The tiny corpus cut into 3 files, and the dataset of one run over them."""
    root = tmp_path_factory.mktemp("recipe_inputs")
    with open(tiny_dataset["corpus"], "rb") as f:
        lines = f.readlines()
    files = []
    for i, part in enumerate((lines[:200], lines[200:400], lines[400:])):
        path = root / f"part{i}.jsonl"
        path.write_bytes(b"".join(part))
        files.append(str(path))
    (root / "list.txt").write_text("# three shards\n" + "\n".join(files) + "\n")
    whole = preprocess(files, str(root / "whole"), None, tiny_dataset["tokenizer"], append_eod=True,
                       workers=0, progress=False).outputs[0]
    return {"files": files, "list": str(root / "list.txt"), "whole": whole, "tokenizer": tiny_dataset["tokenizer"]}


def _same_dataset(a, b):
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx", ".json"))


def _run(env, stage=None, task=None, args=()):
    full = {**os.environ, "REPO": ROOT, "PYTHON": sys.executable, **env}
    full.pop("SLURM_ARRAY_TASK_ID", None)
    if stage:
        full["STAGE"] = stage
    if task is not None:
        full["SLURM_ARRAY_TASK_ID"] = str(task)
    return subprocess.run(["bash", RECIPE, *args], capture_output=True, text=True, env=full, timeout=300)


@pytest.fixture
def fake_sbatch(tmp_path):
    """An sbatch that records its arguments and answers job ids 101, 102, ..."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/bash\necho "$@" >> {log}\necho $((100 + $(wc -l < {log})))\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "log": log}


def test_stages_by_hand_skip_done_shards_and_redo_half_written_ones(inputs, tmp_path, fake_sbatch):
    out = str(tmp_path / "data" / "corpus")
    env = {"INPUT_LIST": inputs["list"], "OUTPUT_PREFIX": out, "TOKENIZER_MODEL": inputs["tokenizer"],
           "PATH": fake_sbatch["PATH"], "KEEP_SHARDS": "1"}
    r = _run(env, args=("--cpus-per-task=1",))
    assert r.returncode == 0, r.stderr
    calls = fake_sbatch["log"].read_text().splitlines()
    assert "--array=0-2" in calls[0] and "STAGE=shard" in calls[0] and "--cpus-per-task=1" in calls[0]
    assert "--dependency=afterok:101" in calls[1] and "STAGE=merge" in calls[1]
    assert "array job 101 (3 tasks) -> merge job 102" in r.stdout

    shards = tmp_path / "data" / "corpus.shards"
    merge_early = _run(env, "merge")
    assert merge_early.returncode == 1 and "3 shard(s) missing" in merge_early.stderr
    for task in range(3):
        assert _run(env, "shard", task).returncode == 0
    done = _run(env, "shard", 1)
    assert done.returncode == 0 and "complete already; skipped" in done.stdout
    # a requeued task whose first run was killed mid-write: the temporaries go, the shard is redone
    for ext in (".bin", ".idx", ".json"):
        os.remove(f"{shards}/shard_00002_text_document{ext}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = shards / f"shard_00002_text_document.bin.tmp-{int(dead.stdout)}"
    partial.write_bytes(b"half")
    redo = _run(env, "shard", 2)
    assert redo.returncode == 0 and "removed 1 temporary file" in redo.stderr and not partial.exists()
    merged = _run(env, "merge")
    assert merged.returncode == 0, merged.stderr
    assert _same_dataset(out + "_text_document", inputs["whole"])
    assert "complete already" in _run(env, "merge").stdout


def test_bad_input_lists_submit_nothing(inputs, tmp_path, fake_sbatch):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{inputs['files'][0]}\n{tmp_path / 'missing.jsonl'}\n")
    env = {"INPUT_LIST": str(listing), "OUTPUT_PREFIX": str(tmp_path / "o"), "TOKENIZER_MODEL": inputs["tokenizer"],
           "PATH": fake_sbatch["PATH"]}
    r = _run(env)
    assert r.returncode == 1 and f"input {tmp_path / 'missing.jsonl'}: no such file" in r.stderr
    assert not fake_sbatch["log"].exists(), "nothing may be submitted"
    r = _run({**env, "INPUT_LIST": "", "INPUTS": str(tmp_path / "*.nothing")})
    assert r.returncode == 1 and "matches no file" in r.stderr


@pytest.mark.slow
def test_array_of_three_then_merge_on_local_slurm(cluster, inputs, tmp_path):  # noqa: F811
    out = str(tmp_path / "corpus")
    env = {"INPUT_LIST": inputs["list"], "OUTPUT_PREFIX": out, "TOKENIZER_MODEL": inputs["tokenizer"],
           "SLURM_CONF": _env()["SLURM_CONF"], "OMP_NUM_THREADS": "1"}
    r = _run(env, args=("--cpus-per-task=1", "--time=10", f"--output={tmp_path}/slurm-%A_%a.out"))
    assert r.returncode == 0, r.stderr
    ids = dict(item.split("=") for item in r.stdout.split("\n")[-2].split())
    state = _wait(ids["merge"], ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    logs = "\n".join(open(os.path.join(tmp_path, n)).read() for n in sorted(os.listdir(tmp_path)) if n.endswith(".out"))
    assert state == "COMPLETED", (state, logs[-3000:])
    assert len([n for n in os.listdir(tmp_path) if n.startswith(f"slurm-{ids['array']}_")]) == 3  # 3 array tasks
    assert _same_dataset(out + "_text_document", inputs["whole"])
    assert not os.path.exists(out + ".shards"), "the shards are removed after the merge"
