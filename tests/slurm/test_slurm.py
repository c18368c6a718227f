"""slurm/: the sbatch recipe on a real single-node Slurm (slurm/local_cluster.sh), preemption with
requeue and exact resume, and the mpirun launch path."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF_DIR = "/tmp/efficientllm-slurm"  # local_cluster.sh's default: one cluster per machine
ITERS = 30  # 1,024 tokens a step


def _env():
    return {**os.environ, "SLURM_CONF": f"{CONF_DIR}/slurm.conf", "SLURM_LOCAL_DIR": CONF_DIR}


def _sh(*cmd, check=True, timeout=120):
    r = subprocess.run(list(cmd), capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("needs root (to install and start Slurm) or an installed Slurm")
    _sh("bash", f"{ROOT}/slurm/local_cluster.sh", "start", timeout=600)
    yield
    _sh("bash", f"{ROOT}/slurm/local_cluster.sh", "stop", check=False)


def _job_field(job: str, field: str) -> str:
    out = _sh("scontrol", "show", "job", job)
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def _wait(job: str, states: tuple, timeout: float = 400) -> str:
    end = time.time() + timeout
    while time.time() < end:
        state = _job_field(job, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout}s (state {state}):\n{_log(job)}")


def _log(job: str) -> str:
    path = _job_field(job, "StdOut")
    return open(path).read() if os.path.isfile(path) else ""


def _submit(tiny_dataset, root: str, prune_args: str, launcher: str = "srun") -> str:
    env = {"LAUNCHER": launcher,
        "REPO": ROOT, "PYTHON": sys.executable, "DATA_PATH": tiny_dataset["prefix"],
        "TOKENIZER_TYPE": "GPTSentencePieceTokenizer", "TOKENIZER_MODEL": tiny_dataset["tokenizer"],
        "MODEL_ARGS": "--model debug", "PRUNE_ARGS": prune_args, "SAVE": f"{root}/ckpt",
        "SEQ_LENGTH": "64", "MICRO_BATCH": "2", "GLOBAL_BATCH": "16", "TRAIN_TOKENS": str(ITERS * 1024),
        "WARMUP_ITERS": "2", "LR": "2e-3", "SAVE_INTERVAL": "1000", "LOG_INTERVAL": "1",
        "EVAL_INTERVAL": "1000", "EXTRA_ARGS": "--split 98,2,0",
    }
    out = _sh("sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
              "--cpus-per-task=1", "--time=15", f"--output={root}/slurm-%j.out",
              "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()), f"{ROOT}/slurm/pretrain_1b.sbatch")
    return out.strip().split(";")[0]


def _final(root: str) -> dict:
    from pretrain import checkpoint as ckpt

    state = ckpt.read_trainer_state(ckpt.find_checkpoint(f"{root}/ckpt"))
    return {"iteration": state["iteration"], "masks": state["callbacks"]["pruning"]["masks"]}


def _losses(log: str) -> dict:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/\d+ \| loss (\S+)", log)}


PRUNE = "--prune-target-ratio 0.5 --prune-start-tokens 0 --prune-end-tokens 20000 --prune-interval 2"


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("slurm_ref"))
    job = _submit(tiny_dataset, root, PRUNE)
    state = _wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    return root, job, state, _log(job)


def test_sbatch_recipe_trains_two_ranks(uninterrupted):
    root, job, state, log = uninterrupted
    assert state == "COMPLETED" and _job_field(job, "ExitCode") == "0:0", log[-3000:]
    assert "2 ranks" in log or "world 2" in log, log[:3000]
    assert _final(root)["iteration"] == ITERS
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{root}/ckpt/tensorboard"))


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(uninterrupted, tiny_dataset, tmp_path, launcher):
    """USR1 mid-pruning -> checkpoint -> requeue -> resume; the run equals the uninterrupted one
    (srun: one task per rank; torchrun: srun starts torchrun, the script signals its workers)."""
    ref_root, _, _, ref_log = uninterrupted
    root = str(tmp_path)
    job = _submit(tiny_dataset, root, PRUNE, launcher=launcher)
    end = time.time() + 300
    while not re.search(r"iteration\s+8/", _log(job)):  # inside the pruning window (steps 1-19)
        assert time.time() < end and _job_field(job, "JobState") in ("PENDING", "RUNNING"), _log(job)
        time.sleep(0.2)
    _sh("scancel", "--signal=USR1", "--batch", job)
    _wait(job, ("PENDING", "REQUEUED", "REQUEUE_HOLD"), timeout=300)
    _wait(job, ("PENDING",), timeout=60)
    # slurmd revokes the previous run's credential; one issued in the same second counts as revoked
    # too ("Killing non-startable batch job: Job credential revoked"), so let a few seconds pass
    time.sleep(3)
    _sh("scontrol", "update", f"JobId={job}", "StartTime=now")  # requeued jobs wait ~2 minutes
    assert _wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) == "COMPLETED", _log(job)[-3000:]
    log = _log(job)
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    stopped = int(re.search(r"stopped at iteration (\d+)", log).group(1))
    assert 8 <= stopped < 19, stopped  # interrupted in the middle of pruning
    final, ref = _final(root), _final(ref_root)
    assert final["iteration"] == ref["iteration"] == ITERS
    for key in ref["masks"]:
        assert torch.equal(final["masks"][key], ref["masks"][key]), key
    assert _losses(log) == _losses(ref_log)  # every step, before and after the interruption


def test_mpirun_trains(tiny_dataset, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun (scripts/setup.sh installs Open MPI)")
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1",
           "-x", "TORCHDYNAMO_DISABLE=1", sys.executable, "-m", "pretrain", "--launcher", "mpi",
           "--model", "debug", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
           "--train-iters", "3", "--tensor-model-parallel-size", "2", "--data-path", tiny_dataset["prefix"],
           "--tokenizer-model", tiny_dataset["tokenizer"], "--split", "98,2,0", "--log-interval", "1",
           "--save", str(tmp_path / "ckpt")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "TP 2" in r.stdout and "iteration       3/3" in r.stdout, r.stdout[-3000:]
    assert os.path.isdir(tmp_path / "ckpt" / "iter_0000003")


@pytest.mark.parametrize("override,message", [
    ({"DATA_PATH": "/nonexistent/corpus"}, "DATA_PATH: /nonexistent/corpus.bin"),
    ({"TOKENIZER_MODEL": "/nonexistent/tok.model"}, "TOKENIZER_MODEL=/nonexistent/tok.model does not exist"),
    ({"TP": "4", "PP": "1"}, "TP=4 x PP=1 does not divide the 2 ranks"),
    ({"TP": "abc"}, "TP=abc: must be a whole number"),
    ({"TP": "0"}, "TP=0: must be at least 1"),
    ({"ENGINE": "deepspeed", "ZERO_STAGE": "4"}, "ZERO_STAGE=4: 1, 2 or 3"),
    ({"ENGINE": "deepspeed", "PP": "2"}, "ENGINE=deepspeed needs PP=1"),
    ({"ENGINE": "fsdp"}, "ENGINE=fsdp: megatron or deepspeed"),
    ({"ZERO_STAGE": "2"}, "ZERO_STAGE, OFFLOAD_OPTIMIZER and DEEPSPEED_CONFIG need ENGINE=deepspeed"),
])
def test_bad_inputs_fail_before_submission(tiny_dataset, override, message):
    """bash slurm/pretrain_1b.sbatch checks its inputs and submits nothing when they are wrong."""
    env = {**os.environ, "REPO": ROOT, "PYTHON": sys.executable, "DATA_PATH": tiny_dataset["prefix"],
           "TOKENIZER_TYPE": "GPTSentencePieceTokenizer", "TOKENIZER_MODEL": tiny_dataset["tokenizer"],
           "NNODES": "1", "GPUS_PER_NODE": "2", "TP": "1", **override}
    env.pop("SLURM_JOB_ID", None)
    r = subprocess.run(["bash", f"{ROOT}/slurm/pretrain_1b.sbatch"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and message in r.stderr, (r.stdout, r.stderr)
    assert "submitting" not in r.stdout


@pytest.mark.parametrize("recipe", ["pretrain_1b", "pretrain_469m", "pretrain_134m"])
def test_recipe_flags_validate(tiny_dataset, recipe):
    """Each recipe's own model and pruning flags parse and validate (DRY_RUN=1: no job, no model)."""
    env = {**os.environ, "REPO": ROOT, "PYTHON": sys.executable, "DATA_PATH": tiny_dataset["prefix"],
           "TOKENIZER_TYPE": "GPTSentencePieceTokenizer", "TOKENIZER_MODEL": tiny_dataset["tokenizer"],
           "NNODES": "1", "GPUS_PER_NODE": "1", "TP": "1", "PP": "1", "DRY_RUN": "1", "SAVE": "/tmp/unused"}
    env.pop("SLURM_JOB_ID", None)
    r = subprocess.run(["bash", f"{ROOT}/slurm/{recipe}.sbatch"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "model: 24 layers, hidden 2048" in r.stdout and "plan:" in r.stdout, r.stdout


def test_recipe_takes_the_deepspeed_engine(tiny_dataset):
    """ENGINE=deepspeed ZERO_STAGE=3 OFFLOAD_OPTIMIZER=cpu reach python -m pretrain (DRY_RUN=1 validates)."""
    env = {**os.environ, "REPO": ROOT, "PYTHON": sys.executable, "DATA_PATH": tiny_dataset["prefix"],
           "TOKENIZER_TYPE": "GPTSentencePieceTokenizer", "TOKENIZER_MODEL": tiny_dataset["tokenizer"],
           "NNODES": "1", "GPUS_PER_NODE": "1", "TP": "1", "PP": "1", "DRY_RUN": "1", "SAVE": "/tmp/unused",
           "ENGINE": "deepspeed", "ZERO_STAGE": "3", "OFFLOAD_OPTIMIZER": "cpu"}
    env.pop("SLURM_JOB_ID", None)
    r = subprocess.run(["bash", f"{ROOT}/slurm/pretrain_134m.sbatch"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "engine DeepSpeed ZeRO-3, optimizer offload cpu" in r.stdout, r.stdout
