"""Two nodes on this machine: slurm/pretrain_1b.sbatch (LAUNCHER=torchrun) starts one torchrun
agent per node through tests/slurm/fake_nodes/srun (c10d rendezvous on localhost, gloo), each node
with a node-local scratch folder of its own (the dataset index cache). Pruning, a save, a resume
and the in-run shrink give the losses of one node with the same two ranks."""

import os
import re
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE_SLURM = os.path.join(ROOT, "tests", "slurm", "fake_nodes")
ITERS, EXIT_AT = 14, 6  # 512 tokens a step; pruning events at 4, 6 and 8, the shrink at 8
PRUNE = ("--prune-target-ratio 0.5 --prune-start-tokens 1024 --prune-end-tokens 4096 --prune-interval 2 "
         "--shrink-at auto")


def _mount_namespaces() -> bool:
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    try:
        return subprocess.run(["unshare", "--mount", *user, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tiny_dataset: dict, root: str, nodes: int, ranks_per_node: int, job: int, extra: str = "") -> str:
    """One Slurm job of the recipe on ``nodes`` simulated nodes; returns its output."""
    scratch = f"{root}/scratch"  # the node-local folder: one path, each node's own contents
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    env.update({
        "PATH": f"{FAKE_SLURM}:{env['PATH']}", "FAKE_NODES_DIR": f"{root}/nodes", "FAKE_NODE_SCRATCH": scratch,
        "SLURM_JOB_ID": str(job), "SLURM_JOB_NODELIST": f"node[0-{nodes - 1}]", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(ranks_per_node), "GPUS_PER_NODE": "0", "MASTER_PORT": str(_free_port()),
        "LAUNCHER": "torchrun", "REPO": ROOT, "PYTHON": sys.executable, "DATA_PATH": tiny_dataset["prefix"],
        "DATA_CACHE_PATH": f"{scratch}/index-cache",
        "TOKENIZER_TYPE": "GPTSentencePieceTokenizer", "TOKENIZER_MODEL": tiny_dataset["tokenizer"],
        "MODEL_ARGS": "--model debug", "PRUNE_ARGS": PRUNE, "SAVE": f"{root}/ckpt", "TP": "1",
        "SEQ_LENGTH": "64", "MICRO_BATCH": "2", "GLOBAL_BATCH": "8", "TRAIN_TOKENS": str(ITERS * 512),
        "WARMUP_ITERS": "2", "LR": "2e-3", "MIN_LR": "2e-4", "SAVE_INTERVAL": "1000", "LOG_INTERVAL": "1",
        "EVAL_INTERVAL": "1000", "EXTRA_ARGS": f"--split 98,2,0 --seed 7 {extra}",
    })
    r = subprocess.run(["bash", f"{ROOT}/slurm/pretrain_1b.sbatch"], capture_output=True, text=True, env=env,
                       timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    return out


def _losses(log: str) -> dict:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/\d+ \| loss (\S+)", log)}


def test_two_nodes_prune_save_resume_shrink_equal_one_node(tiny_dataset, tmp_path):
    from pretrain.checkpoint import find_checkpoint, read_trainer_state

    if not _mount_namespaces():
        pytest.skip("simulated node-local disks need mount namespaces (root, or unprivileged user namespaces)")
    two = str(tmp_path / "two_nodes")
    first = _launch(tiny_dataset, two, nodes=2, ranks_per_node=1, job=101, extra=f"--exit-interval {EXIT_AT}")
    assert f"stopped at iteration {EXIT_AT}" in first and "saved checkpoint" in first, first[-3000:]
    second = _launch(tiny_dataset, two, nodes=2, ranks_per_node=1, job=102)
    assert f"(iteration {EXIT_AT})" in second and "continuing on the shrunk model" in second, second[-3000:]
    assert read_trainer_state(find_checkpoint(f"{two}/ckpt"))["iteration"] == ITERS
    for node in ("node0", "node1"):  # each node built the indices on its own disk
        cache = os.path.join(two, "nodes", node, "index-cache")
        assert any(f.endswith("shuffle_index.npy") for f in os.listdir(cache)), (node, os.listdir(cache))

    one = _launch(tiny_dataset, str(tmp_path / "one_node"), nodes=1, ranks_per_node=2, job=103)
    assert "continuing on the shrunk model" in one
    reference = _losses(one)
    assert sorted(reference) == list(range(1, ITERS + 1)), one[-3000:]
    assert {**_losses(first), **_losses(second)} == reference
