"""One spawn helper for distributed tests: run ``fn(*args)`` on ``world_size`` gloo ranks.

Each rank is a fresh (spawned) process with torchrun's environment variables set, so the code
under test initialises exactly as it does under ``torchrun``. Rank results are pickled back; a
failing rank's traceback is raised in the test process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
    )
    import warnings

    warnings.filterwarnings("ignore")
    try:
        result = fn(*args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        raise SystemExit(1)
    finally:
        try:
            from pretrain.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 900) -> list:
    """Run ``fn(*args)`` on every rank; returns the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}; timeout or crash)")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} failed:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra: str) -> dict:
    """The environment for a CLI run in a subprocess, as a user's shell would give it: this
    repository importable, one thread per process, unbuffered output, and no launcher variables
    inherited from the test process (a child would otherwise wait for ranks that never come)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1", **extra)
    return env
