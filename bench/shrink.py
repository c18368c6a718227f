"""Shrink benchmark: tool throughput vs a plain copy of the checkpoint, and step time of the shrunk
model vs the same shape built directly (target <= 1.02) and vs the masked model before shrinking.

    python bench/shrink.py [--hidden 256 --ffn 1024 --layers 4] [--iters 16] [--rounds 3] [--tool-rounds 3]
    python bench/shrink.py --rounds 0      # the tool's speed against a copy only (about a minute)
    python bench/shrink.py --rounds 0 --threads 2   # ... with torch's threads as the command-line tool has them
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _peak_rss_of(code: str) -> int:
    """Peak resident memory (bytes) of a fresh interpreter running ``code``."""
    import subprocess

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) forking process
    out = subprocess.run([sys.executable, "-c", code + "\nprint('PEAK', [l.split()[1] for l in "
                          "open('/proc/self/status') if l.startswith('VmHWM')][0])"],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split("PEAK")[-1]) * 1024


_FLOOR_BUFFER = bytearray()


def _io_floor(src: str, out: str) -> float:
    """Seconds of a shrink that is I/O alone: read the kept half of the data files (512 KB preads
    into a buffer already in memory), the source's CRC-32 on another thread meanwhile, write the
    half in 4 MB writes, its CRC-32 from memory, fsync file and folder. No tensor, no Python per
    chunk, no archive format: what any shrink that keeps the integrity checks costs at least."""
    import threading
    import zlib

    from pretrain.checkpoint.atomic import file_crc32

    data = os.path.join(src, "model_optim")
    files = [os.path.join(data, f) for f in sorted(os.listdir(data)) if f.endswith(".distcp")]
    keep = sum(os.path.getsize(f) for f in files) // 2
    if len(_FLOOR_BUFFER) != keep:  # one buffer for every round: its pages are not the kernel's to find again
        _FLOOR_BUFFER[:] = bytearray(keep)
    buffer = memoryview(_FLOOR_BUFFER)
    os.makedirs(out)
    start = time.perf_counter()
    source = threading.Thread(target=lambda: [file_crc32(f) for f in files])
    source.start()
    done, offset = 0, 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        size = os.path.getsize(f)
        while done < keep and offset + min(512 * 1024, keep - done) <= size:
            n = min(512 * 1024, keep - done)
            os.preadv(fd, [buffer[done:done + n]], offset)
            done, offset = done + n, offset + 2 * n  # every other region: the kept half
        os.close(fd)
        offset = 0
    with open(os.path.join(out, "data.distcp"), "wb", buffering=0) as f:
        for s in range(0, done, 4 << 20):
            f.write(buffer[s:s + (4 << 20)])
        zlib.crc32(buffer[:done])
        os.fsync(f.fileno())
    source.join()
    folder = os.open(out, os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)
    return time.perf_counter() - start


def _worker(root: str, hidden: int, ffn: int, layers: int, iters: int, rounds: int, tool_rounds: int,
            threads: int) -> dict:
    from pretrain.config import (CheckpointConfig, DataConfig, ModelConfig, OptimConfig,
                                 ParallelConfig, PretrainConfig, PruneConfig, TrainConfig)
    from pretrain.checkpoint import atomic
    from pretrain.shrink import reshard_checkpoint
    from pretrain.run.segments import run

    seq, gbs = 128, 8
    model = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=ffn, seq_length=seq, vocab_size=8192)

    def cfg(model_cfg, iters_total, save=None, load=None, prune=False, use_ckpt=False):
        c = PretrainConfig(
            model=model_cfg, parallel=ParallelConfig(), data=DataConfig(mock_data=True, split="100,0,0"),
            optim=OptimConfig(lr=1e-4, min_lr=1e-5),
            train=TrainConfig(micro_batch_size=4, global_batch_size=gbs, train_iters=iters_total,
                              log_interval=10**6),
            checkpoint=CheckpointConfig(save=save, load=load, use_checkpoint_args=use_ckpt))
        if prune:
            c.prune = PruneConfig(target_ratio=0.5, interval=1, start_tokens=0, end_tokens=3 * gbs * seq,
                                  granularity="uniform")
        return c

    # a masked checkpoint: pruned to 50% over 3 steps, saved at 4
    masked_dir = f"{root}/masked"
    run(cfg(model, 4, save=masked_dir, prune=True))
    src = f"{masked_dir}/iter_0000004"
    size = _folder_bytes(src)
    # copy and shrink alternate, several times: the median of each (the page cache is warm for both)
    # wall and CPU time (user + system, every thread of this process: the shrink's checksum thread too).
    # Each output is deleted once timed: on this VM a write into pages the kernel must first reclaim
    # runs 5-10x slower (46 MB: 10 ms or 110 ms, for cp's sendfile and write alike), so outputs left
    # behind would time the page allocator's state rather than the tools; freed pages serve each next one.
    import torch

    torch.set_num_threads(threads)
    copies, synced_copies, shrinks, copies_cpu, shrinks_cpu, floors = [], [], [], [], [], []
    for i in range(tool_rounds):
        t, c = time.time(), time.process_time()
        shutil.copytree(src, f"{root}/copy")
        copies.append(time.time() - t)
        copies_cpu.append(time.process_time() - c)
        shutil.rmtree(f"{root}/copy")
        # a copy that is on the disk when it returns, as every checkpoint the shrink publishes is
        t = time.time()
        shutil.copytree(src, f"{root}/synced_copy")
        for rel in atomic._files_of(f"{root}/synced_copy", every=True):
            atomic.sync_file(f"{root}/synced_copy/{rel}")
        atomic._sync_folders(f"{root}/synced_copy")
        synced_copies.append(time.time() - t)
        shutil.rmtree(f"{root}/synced_copy")
        floors.append(_io_floor(src, f"{root}/floor"))
        shutil.rmtree(f"{root}/floor")
        atomic._verified.clear()  # as the tool in a new process: the source's checksums are verified
        t, c = time.time(), time.process_time()
        r = reshard_checkpoint(src, f"{root}/small", shrink=True, progress=False)
        shrinks.append(time.time() - t)
        shrinks_cpu.append(time.process_time() - c)
        if i < tool_rounds - 1:
            shutil.rmtree(f"{root}/small")
    copy_s, shrink_s = statistics.median(copies), statistics.median(shrinks)
    ratios = [c / s for c, s in zip(copies, shrinks)]
    cpu_ratios = [c / s for c, s in zip(copies_cpu, shrinks_cpu)]
    small = f"{root}/small"
    # the command-line tool in its own process: wall time with start-up, and its peak memory
    tool = str(ROOT / "tools" / "reshard_checkpoint.py")
    t = time.time()
    cli_peak = _peak_rss_of(f"import sys, runpy; sys.argv = [{tool!r}, '--load', {src!r}, '--save', "
                            f"{root + '/small_cli'!r}, '--shrink']; sys.path.insert(0, {str(ROOT)!r})\n"
                            f"try:\n    runpy.run_path({tool!r}, run_name='__main__')\nexcept SystemExit as e:\n"
                            f"    assert not e.code, e.code")
    cli_s = time.time() - t
    import_peak = _peak_rss_of(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tools._single_process; "
                               "import pretrain.shrink, pretrain.checkpoint.stream, pretrain.pruning.masks, "
                               "pretrain.checkpoint")
    small_model = r["config"].model

    masked, shrunk, direct = [], [], []
    for _ in range(rounds):
        h = run(cfg(model, 4 + iters, load=masked_dir, prune=True))["history"][2:]
        masked += [x["step_seconds"] for x in h]
        h = run(cfg(small_model, 4 + iters, load=small, use_ckpt=True))["history"][2:]
        shrunk += [x["step_seconds"] for x in h]
        h = run(cfg(dataclasses.replace(small_model), iters))["history"][2:]
        direct += [x["step_seconds"] for x in h]
    return {"bytes": size, "copy_s": copy_s, "shrink_s": shrink_s, "synced_copy_s": statistics.median(synced_copies),
            "floor_s": statistics.median(floors), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "copy_cpu": statistics.median(copies_cpu), "shrink_cpu": statistics.median(shrinks_cpu),
            "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
            "cpu_ratio_max": max(cpu_ratios),
            "cli_s": cli_s, "cli_peak": cli_peak, "import_peak": import_peak, "params_before": r["params_before"],
            "params_after": r["params_after"], "masked": statistics.median(masked) if masked else None,
            "shrunk": statistics.median(shrunk) if shrunk else None, "direct": statistics.median(direct) if direct else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="rounds of step timings (0: the tool alone)")
    p.add_argument("--tool-rounds", type=int, default=3, help="copies and shrinks timed, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads while they are timed (the training "
                   "processes run 1; the command-line tool starts with torch's default, one per core)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.dist_helper import run_distributed

    with tempfile.TemporaryDirectory() as root:
        r = run_distributed(_worker, 1, root, args.hidden, args.ffn, args.layers, args.iters, args.rounds,
                            args.tool_rounds, args.threads)[0]
    gb = r["bytes"] / 1e9
    print(f"checkpoint {gb * 1000:.1f} MB; plain copy {gb / r['copy_s']:.3f} GB/s; shrink tool "
          f"{gb / r['shrink_s']:.3f} GB/s (ratio to the copy {r['copy_s'] / r['shrink_s']:.3f}, spread "
          f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}; streaming, in process; medians of {args.tool_rounds}); "
          f"command line {r['cli_s']:.1f}s with start-up")
    print(f"a copy synced to the disk (fsync of every file and folder, as the shrink's output is) "
          f"{gb / r['synced_copy_s']:.3f} GB/s: shrink/synced copy {r['synced_copy_s'] / r['shrink_s']:.3f}")
    print(f"an I/O-only shrink (read and write the kept half, CRC-32 of both, fsync; no tensors) "
          f"{r['floor_s'] * 1000:.0f} ms: ratio to the copy {r['copy_s'] / r['floor_s']:.3f}, about the best a shrink "
          f"that keeps the integrity checks can reach here")
    print(f"by CPU time: copy {r['copy_cpu'] * 1000:.0f} ms, shrink {r['shrink_cpu'] * 1000:.0f} ms (ratio to the copy "
          f"{r['cpu_ratio']:.3f}, spread {r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f})")
    print(f"tool peak memory {r['cli_peak'] / 1e6:.0f} MB (of which {r['import_peak'] / 1e6:.0f} MB is the "
          f"interpreter and imports) for a {gb * 1000:.0f} MB checkpoint")
    print(f"parameters {r['params_before'] / 1e6:.2f} M -> {r['params_after'] / 1e6:.2f} M "
          f"(ratio {r['params_after'] / r['params_before']:.3f})")
    if r["masked"] is None:
        return
    print(f"step time: masked {r['masked'] * 1000:.0f} ms, shrunk {r['shrunk'] * 1000:.0f} ms, same shape "
          f"built directly {r['direct'] * 1000:.0f} ms; shrunk/direct {r['shrunk'] / r['direct']:.3f} "
          f"(target <= 1.02); shrunk/masked {r['shrunk'] / r['masked']:.3f}")


if __name__ == "__main__":
    main()
