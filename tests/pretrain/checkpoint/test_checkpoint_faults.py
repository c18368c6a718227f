"""Checkpoint faults (issue 12): retention never loses the checkpoint just written or the newest
valid one; same-size corruption is caught by checksums; pickles that would run code are refused;
a full disk gives a message and removes the .tmp folder; a killed rank leaves no process."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.checkpoint.stream import DCPFormatError, OutTensor, read_dcp_metadata, write_lazily
from pretrain.shrink import ShrinkError, _check_save_folder, _check_target_sizes
from tests.dist_helper import subprocess_env

ROOT = Path(__file__).resolve().parents[3]


def _publish_fake(root: Path, iteration: int) -> Path:
    """A checkpoint folder published by the real code (manifest with sizes and CRC-32)."""
    tmp = root / f"iter_{iteration:07d}.tmp"
    (tmp / "model_optim").mkdir(parents=True)
    (tmp / "model_optim" / "a.distcp").write_bytes(bytes(range(256)) * 4)
    (tmp / "trainer_state.pt").write_bytes(b"y" * 10)
    return Path(ckpt.publish_checkpoint(str(root), iteration, str(tmp)))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _latest(root: Path) -> int:
    return int((root / ckpt.LATEST_FILE).read_text())


def test_retention_after_falling_back_from_a_corrupt_newest(tmp_path, capsys):
    """iter 10 valid, iter 20 corrupt (same size); the run fell back to 10 and saves 12 with
    keep_last=1: 12 is kept and is `latest`, the corrupt 20 is not counted (and, being newer than
    the save, not touched), 10 goes. Before the fix 12 and 10 were deleted and 20 kept."""
    _publish_fake(tmp_path, 10)
    _flip_byte(_publish_fake(tmp_path, 20) / "model_optim" / "a.distcp")
    assert ckpt.find_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000010")
    _publish_fake(tmp_path, 12)
    deleted = ckpt.prune_old_checkpoints(str(tmp_path), keep_last=1, current=12)
    assert deleted == [str(tmp_path / "iter_0000010")]
    assert _latest(tmp_path) == 12 and (tmp_path / "iter_0000012").is_dir()
    assert ckpt.find_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000012")


def test_retention_counts_only_valid_checkpoints(tmp_path, capsys):
    """keep_last=2 after saving 8, with 4 valid and 6 corrupt: 8 and 4 are kept, 6 goes."""
    _publish_fake(tmp_path, 4)
    _flip_byte(_publish_fake(tmp_path, 6) / "trainer_state.pt")
    _publish_fake(tmp_path, 8)
    assert ckpt.prune_old_checkpoints(str(tmp_path), keep_last=2, current=8) == [str(tmp_path / "iter_0000006")]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000008"]
    assert "not counted among the checkpoints kept" in capsys.readouterr().out


def test_same_size_corruption_falls_back_and_names_the_file(tmp_path, capsys):
    older = _publish_fake(tmp_path, 10)
    newer = _publish_fake(tmp_path, 20)
    _flip_byte(newer / "model_optim" / "a.distcp")
    with pytest.raises(ckpt.CheckpointError, match=r"model_optim/a.distcp is corrupt \(its CRC-32 differs"):
        ckpt.verify_checkpoint(str(newer))
    assert ckpt.find_checkpoint(str(tmp_path)) == str(older)
    assert "skipping invalid checkpoint" in capsys.readouterr().out
    skipped: list[str] = []
    _flip_byte(older / "trainer_state.pt")
    assert ckpt.find_checkpoint(str(tmp_path), skipped) is None
    assert len(skipped) == 2 and "trainer_state.pt is corrupt" in skipped[1]


def test_the_shrink_hashes_its_source_meanwhile_and_skips_a_corrupt_one(tmp_path, monkeypatch, capsys):
    """The shrink verifies its source's checksums on another thread while it rewrites it (issue
    32); a newest checkpoint whose bytes differ is then skipped for the newest valid one, as when
    they were verified first, and nothing read from it is published."""
    import threading

    from pretrain.checkpoint import atomic
    from pretrain.shrink import reshard_checkpoint

    fixture = ROOT / "tests" / "fixtures" / "old_checkpoints" / "megatron" / "iter_0000004"
    for iteration in (4, 8):
        shutil.copytree(fixture, tmp_path / "run" / f"iter_{iteration:07d}")
    _flip_byte(tmp_path / "run" / "iter_0000008" / "model_optim" / "__0_0.distcp")
    hashed_on = []
    crc = atomic.file_crc32
    monkeypatch.setattr(atomic, "file_crc32", lambda path: hashed_on.append(
        (os.path.basename(os.path.dirname(os.path.dirname(path))), threading.current_thread() is
         threading.main_thread())) or crc(path))
    r = reshard_checkpoint(str(tmp_path / "run"), str(tmp_path / "small"), shrink=True, progress=False)
    assert ("iter_0000008", False) in hashed_on  # hashed on another thread, first
    out = capsys.readouterr().out
    assert "skipping invalid checkpoint" in out and "iter_0000008: file model_optim/__0_0.distcp is corrupt" in out
    assert sorted(os.listdir(tmp_path / "small")) == sorted(["iter_0000004", ckpt.LATEST_FILE])
    ckpt.verify_checkpoint(r["folder"])
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000008: file model_optim/__0_0.distcp is corrupt"):
        reshard_checkpoint(str(tmp_path / "run" / "iter_0000008"), str(tmp_path / "other"), shrink=True,
                           progress=False)
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_this_process_published_is_not_hashed_again(tmp_path, monkeypatch):
    """Issue 32: the in-run shrink reads the save it follows, the next segment the shrink's output;
    the CRCs were read back from those files when they were published, so loading them again in the
    same process does not hash them again. A file replaced since (another inode) is hashed again
    and its corruption caught."""
    from pretrain.checkpoint import atomic

    tmp = tmp_path / "iter_0000005.tmp"
    (tmp / "model_optim").mkdir(parents=True)
    (tmp / "model_optim" / "a.distcp").write_bytes(bytes(range(256)) * 4)
    (tmp / "trainer_state.pt").write_bytes(b"y" * 10)
    final = Path(ckpt.publish_checkpoint(str(tmp_path), 5, str(tmp), remember_verified=True))
    hashed = []
    real_crc32 = atomic.file_crc32
    monkeypatch.setattr(atomic, "file_crc32", lambda path: hashed.append(path) or real_crc32(path))
    assert ckpt.find_checkpoint(str(tmp_path)) == str(final)
    assert hashed == []
    replacement = tmp_path / "replacement"
    data = bytearray((final / "model_optim" / "a.distcp").read_bytes())
    data[7] ^= 0xFF
    replacement.write_bytes(bytes(data))
    os.replace(replacement, final / "model_optim" / "a.distcp")
    with pytest.raises(ckpt.CheckpointError, match="a.distcp is corrupt"):
        ckpt.verify_checkpoint(str(final))
    assert hashed


def _record_syncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """[("sync", path) / ("rename", source)] in the order the publishing code issued them."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a))) or real_replace(a, b))
    return events


def test_a_checkpoint_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """A rename is only as durable as what it renames: before ``iter_N.tmp`` becomes ``iter_N``
    (and ``latest`` moves, and retention deletes the older checkpoint), every file in it and every
    folder of it, manifest included, was synced; a power cut cannot leave a published checkpoint
    whose trainer_state.pt or rng files are empty. Before the fix only the DCP data files and the
    manifest were."""
    tmp = tmp_path / "iter_0000003.tmp"
    (tmp / "model_optim").mkdir(parents=True)
    (tmp / "rng").mkdir()
    (tmp / "model_optim" / "a.distcp").write_bytes(b"x" * 100)
    (tmp / "model_optim" / "common.pt").write_bytes(b"c" * 10)
    (tmp / "rng" / "rank_0.pt").write_bytes(b"r" * 10)
    (tmp / "trainer_state.pt").write_bytes(b"y" * 10)
    events = _record_syncs_and_renames(monkeypatch)
    ckpt.publish_checkpoint(str(tmp_path), 3, str(tmp))
    published = events.index(("rename", str(tmp)))
    synced = {path for kind, path in events[:published] if kind == "sync"}
    files = ["model_optim/a.distcp", "model_optim/common.pt", "rng/rank_0.pt", "trainer_state.pt"]
    assert {str(tmp / f) for f in files} <= synced, synced
    assert any(path.startswith(str(tmp / "manifest.json")) for path in synced)  # under its temporary name
    assert {str(tmp), str(tmp / "model_optim"), str(tmp / "rng")} <= synced, synced
    # the folder's own entry (the manifest's name) is synced after the manifest is in it
    manifest_renamed = max(i for i, (kind, path) in enumerate(events) if kind == "rename" and "manifest" in path)
    assert ("sync", str(tmp)) in events[manifest_renamed:published]


def test_an_output_folder_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """The same for the tools' whole output folders (``staged_output``: an HF export, a shrunk or
    converted dataset): synced files and folders, then the rename, then the parent folder."""
    from pretrain.checkpoint.atomic import staged_output

    save = tmp_path / "out"
    events = _record_syncs_and_renames(monkeypatch)
    with staged_output(str(save)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        Path(tmp, "sub", "weights.bin").write_bytes(b"w" * 100)
        Path(tmp, "config.json").write_text("{}")
    published = events.index(("rename", tmp))
    synced = {path for kind, path in events[:published] if kind == "sync"}
    assert {os.path.join(tmp, "sub", "weights.bin"), os.path.join(tmp, "config.json"), tmp,
            os.path.join(tmp, "sub")} <= synced, synced
    assert ("sync", str(tmp_path)) in events[published:]
    assert (save / "sub" / "weights.bin").read_bytes() == b"w" * 100


def _failing_fsync(monkeypatch, code: int, on: str) -> None:
    """os.fsync fails with ``code`` for a descriptor whose path contains ``on``."""
    real = os.fsync

    def fsync(fd):
        if on in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_sync_that_fails_is_the_save_s_failure_named_and_cleaned_up(tmp_path, monkeypatch):
    """A checkpoint file whose sync fails (a full disk: ENOSPC; an I/O error) fails the save with
    the disk-full advice or the error and the file named; the staging folder goes, the previous
    checkpoint stays. A folder's sync that fails is raised too, except on a filesystem that cannot
    sync folders at all (EINVAL)."""
    from pretrain.checkpoint import atomic

    _publish_fake(tmp_path, 2)
    tmp = tmp_path / "iter_0000004.tmp"
    (tmp / "model_optim").mkdir(parents=True)
    (tmp / "trainer_state.pt").write_bytes(b"y" * 10)
    _failing_fsync(monkeypatch, errno.ENOSPC, "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rank 0: no space left on device while saving .*iter_0000004\.tmp"):
        atomic.describe_files_collectively(str(tmp))
    _failing_fsync(monkeypatch, errno.EIO, "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"Input/output error: '.*iter_0000004\.tmp/trainer_state\.pt'"):
        atomic.describe_files_collectively(str(tmp))
    _failing_fsync(monkeypatch, errno.EIO, "iter_0000004.tmp/model_optim")
    with pytest.raises(OSError, match=r"Input/output error: '.*model_optim'"):
        atomic._sync_folders(str(tmp))
    _failing_fsync(monkeypatch, errno.EINVAL, "iter_0000004.tmp")
    atomic._sync_folders(str(tmp))  # a filesystem without folder syncs: nothing to do
    assert ckpt.find_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000002")


def test_an_output_folder_whose_sync_fails_is_an_output_error(tmp_path, monkeypatch):
    """A tool's output folder (``staged_output``): an I/O error on a sync is an OutputError naming
    --save, not a bare OSError without a path; nothing is left."""
    from pretrain.checkpoint.atomic import staged_output
    from pretrain.errors import OutputError

    save = tmp_path / "out"
    _failing_fsync(monkeypatch, errno.EIO, "weights.bin")
    with pytest.raises(OutputError, match=r"--save"):
        with staged_output(str(save)) as tmp:
            Path(tmp, "weights.bin").write_bytes(b"w" * 100)
    assert not save.exists() and not Path(str(save) + ".tmp").exists()


def test_failed_save_removes_tmp_and_keeps_the_previous(tmp_path, monkeypatch):
    """A disk that fills during a save: one clear message, no .tmp left, latest unchanged."""
    _publish_fake(tmp_path, 10)

    def fill_the_disk(tmp, *args):
        (Path(tmp) / "model_optim" / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write_checkpoint_files", fill_the_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"no space left on device while saving .*iter_0000020\.tmp"):
        ckpt.save_checkpoint(str(tmp_path), 20, [], None, {"iteration": 20})
    assert not (tmp_path / "iter_0000020.tmp").exists() and not (tmp_path / "iter_0000020").exists()
    assert _latest(tmp_path) == 10


class _WritesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "iter_0000001"
    folder.mkdir()
    torch.save({"iteration": 1, "x": _WritesMarker(str(marker))}, folder / ckpt.TRAINER_STATE)
    with pytest.raises(ckpt.CheckpointError, match="refused: it holds Python objects"):
        ckpt.read_trainer_state(str(folder))
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    with pytest.raises(DCPFormatError, match=r"io.open is not allowed in checkpoint metadata"):
        read_dcp_metadata(str(tmp_path / "dcp"))
    (tmp_path / "dcp" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DCPFormatError, match="corrupt checkpoint metadata"):
        read_dcp_metadata(str(tmp_path / "dcp"))
    assert not marker.exists()
    # what DCP itself writes is read (a no-process-group save stores its path as a PosixPath)
    write_lazily(str(tmp_path / "ok"), [OutTensor("w", (2, 3), torch.float32, [((0, 0), (2, 3))],
                                                  lambda _: torch.ones(2, 3))], {})
    assert "w" in read_dcp_metadata(str(tmp_path / "ok")).state_dict_metadata


def test_target_layout_sizes_below_one_are_refused():
    for tp, pp, flag in ((0, None, "--target-tensor-parallel-size 0"), (-2, None, "--target-tensor-parallel-size -2"),
                         (None, 0, "--target-pipeline-parallel-size 0")):
        with pytest.raises(ShrinkError, match=flag):
            _check_target_sizes(tp, pp)
    _check_target_sizes(None, 2)


def test_reshard_into_a_non_empty_folder_needs_overwrite(tmp_path):
    """--save of an existing run is refused (its iter_N and latest would be replaced) unless
    --overwrite; the replacement is atomic (rename aside, rename in, then latest)."""
    (tmp_path / "iter_0000010.tmp").mkdir(parents=True)  # an interrupted reshard's leftover
    _check_save_folder(str(tmp_path), overwrite=False)
    first = _publish_fake(tmp_path, 10)
    with pytest.raises(ShrinkError, match=r"already exists and is not empty \(iter_0000010, latest_"):
        _check_save_folder(str(tmp_path), overwrite=False)
    _check_save_folder(str(tmp_path), overwrite=True)
    (first / "old_only").write_text("x")
    again = _publish_fake(tmp_path, 10)
    assert again == first and not (again / "old_only").exists()
    assert [p.name for p in tmp_path.iterdir() if "replaced" in p.name] == []
    ckpt.verify_checkpoint(str(again))


def _train_command(data: dict, save: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--model", "debug", "--seq-length", "32",
            "--data-path", data["prefix"], "--tokenizer-model", data["tokenizer"], "--split", "98,2,0",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--save", str(save), *extra]


@pytest.mark.slow
def test_a_stop_signal_to_the_whole_process_group_still_saves(tiny_dataset, tmp_path):
    """SIGTERM to the run's process group (Slurm signals every process of a step; a campaign is
    stopped with kill -TERM -PGID) after a first save: the save server megatron-core's writer
    uses (a multiprocessing Manager started at that save) got it too and died, so the save the
    run makes on the signal failed with BrokenPipeError and the steps since were lost."""
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(_train_command(tiny_dataset, save, "--train-iters", "100000", "--save-interval", "2"),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    deadline = time.time() + 180
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("saved checkpoint") or time.time() > deadline:
                break
        os.killpg(proc.pid, signal.SIGTERM)
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    assert "signal received: saving a checkpoint" in text and "cannot save" not in text, text[-3000:]
    stopped = int(text.split("signal received: saving a checkpoint at iteration ")[1].split()[0])
    assert stopped > 2 and (save / f"iter_{stopped:07d}").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)


@pytest.mark.slow
def test_killed_rank_leaves_no_process_and_retention_keeps_the_save(tiny_dataset, tmp_path):
    """A real run saving every step with --keep-last 1 into a folder that holds a corrupt
    iter_50 (newer than the run): each save is kept and is `latest`; then kill -9 the rank: the
    megatron-core save helper (a multiprocessing Manager server) must die with it."""
    import psutil

    save = tmp_path / "ckpt"
    _flip_byte(_publish_fake(save, 50) / "model_optim" / "a.distcp")
    proc = subprocess.Popen(_train_command(tiny_dataset, save, "--train-iters", "100000", "--save-interval", "1",
                                           "--keep-last", "1"),
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, saves = [], 0
    deadline = time.time() + 180
    for line in proc.stdout:
        lines.append(line)
        saves += line.startswith("saved checkpoint")
        if saves >= 2 or time.time() > deadline:
            break
    helpers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert saves >= 2, "".join(lines[-40:])
    assert helpers, "expected megatron-core's save helper process"
    _, alive = psutil.wait_procs(helpers, timeout=10)
    try:
        assert not alive, f"left running after kill -9 of their rank: {alive}"
    finally:
        for p in alive:
            p.kill()
    latest = _latest(save)
    assert latest >= 2 and ckpt.find_checkpoint(str(save)) == str(save / f"iter_{latest:07d}")
    assert (save / "iter_0000050").is_dir()  # newer than the run: not retention's to delete


@pytest.mark.slow
def test_full_disk_during_a_real_save(tiny_dataset, tmp_path):
    """A 1 MB tmpfs as --save: the run stops with one clear line and leaves no .tmp folder."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        done = subprocess.run(_train_command(tiny_dataset, mount / "ckpt", "--train-iters", "2"),
                              cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
        out = done.stdout + done.stderr
        assert done.returncode != 0 and "Traceback" not in out, out[-3000:]
        assert "no space left on device while saving" in out, out[-3000:]
        assert not list((mount / "ckpt").glob("*.tmp")), list((mount / "ckpt").iterdir())
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
