"""The launcher's preemption forwarding under LAUNCHER=torchrun signals this job's workers only.

On a node shared with other jobs, `pkill -f "-u -m pretrain "` also reached their ranks (a second
run on the machine saved and exited when the first was preempted). The launcher now checks the job
id each process inherited from srun. Runs without Slurm: the function is taken from the script.
"""
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "slurm", "launch_pretrain.sh")

# Looks like a torchrun worker to pgrep -f (its command line holds "-u -m pretrain "); it writes
# a file when USR1 arrives.
WORKER = 'trap "touch $MARK; exit 0" USR1; for i in $(seq 600); do sleep 0.1; done'


def _function() -> str:
    text = open(SCRIPT).read()
    start = text.index("signal_job_workers() {")
    return text[start:text.index("\n}\n", start) + 3]


def _worker(tmp_path, job_id: str):
    mark = tmp_path / f"got-usr1-{job_id}"
    env = dict(os.environ, SLURM_JOB_ID=job_id, MARK=str(mark))
    proc = subprocess.Popen(["bash", "-c", WORKER, "-u", "-m", "pretrain", "--launcher", "torchrun"],
                            env=env)
    return proc, mark


def test_only_this_jobs_workers_are_signalled(tmp_path):
    mine, my_mark = _worker(tmp_path, "4242")
    other, other_mark = _worker(tmp_path, "4343")
    try:
        time.sleep(0.5)  # both traps installed
        subprocess.run(["bash", "-c", f"{_function()}\nsignal_job_workers 4242"], check=True, timeout=30)
        assert mine.wait(timeout=30) == 0 and my_mark.exists()
        time.sleep(0.5)
        assert other.poll() is None and not other_mark.exists(), "another job's worker was signalled"
    finally:
        for proc in (mine, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
