"""One way to open a stored checkpoint (issue 30): ``StoredCheckpoint`` finds the newest valid
one (the invalid ones it skipped named in its refusal), reads its trainer state once and on first
use, and says which engine wrote it; ``require_new_folder`` has one message; ``staged`` leaves
nothing behind on failure. Plain files, no process group: milliseconds."""

import os

import pytest
import torch

from pretrain.checkpoint import atomic, stored as stored_module
from pretrain.checkpoint.atomic import publish_checkpoint, require_new_folder, staged
from pretrain.checkpoint.files import ENGINE_DIR, TRAINER_STATE, engine_of, iteration_dir
from pretrain.checkpoint.stored import StoredCheckpoint
from pretrain.config import ConfigError, ModelConfig, PretrainConfig
from pretrain.outputs import OutputError

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    seq_length=32, vocab_size=100)


def _checkpoint(root: str, iteration: int, **extra) -> str:
    tmp = iteration_dir(root, iteration) + ".tmp"
    os.makedirs(tmp)
    torch.save({"iteration": iteration, "config": PretrainConfig(model=MODEL).to_dict(), "vocab_size": 128, **extra},
               os.path.join(tmp, TRAINER_STATE))
    return publish_checkpoint(root, iteration, tmp)


def test_found_once_read_once_with_named_attributes(tmp_path, monkeypatch):
    root = str(tmp_path / "ckpt")
    _checkpoint(root, 3)
    newest = _checkpoint(root, 7, shrink_history=[{"iteration": 5}])
    reads = []
    monkeypatch.setattr(stored_module, "load_without_code",
                        lambda path, what: reads.append(path) or torch.load(path, weights_only=True))
    found = StoredCheckpoint.find(root)
    assert found.folder == newest and reads == []  # found: nothing read yet
    assert (found.iteration, found.vocab_size, found.engine) == (7, 128, "megatron")
    assert found.config.model == MODEL and found.lineage == {"shrink_history": [{"iteration": 5}]}
    assert found.deepspeed_only is None and not found.weights_only and found.pruning is None
    assert len(reads) == 1  # the trainer state, once
    assert StoredCheckpoint.find(None) is None and StoredCheckpoint.find(str(tmp_path / "none")) is None
    pair = StoredCheckpoint.of(("ckpt/iter_0000001", {"iteration": 1}))
    assert (pair.folder, pair.iteration) == ("ckpt/iter_0000001", 1)


def test_invalid_ones_skipped_and_named(tmp_path):
    root = str(tmp_path / "ckpt")
    good = _checkpoint(root, 2)
    broken = _checkpoint(root, 4)
    os.remove(os.path.join(broken, "manifest.json"))
    skipped: list[str] = []
    assert StoredCheckpoint.find(root, skipped).folder == good
    assert skipped == [f"{broken}: no manifest.json; the save did not complete"]
    os.remove(os.path.join(good, TRAINER_STATE))
    with pytest.raises(ConfigError, match=r"^--load .*ckpt: no valid checkpoint there \(.*iter_0000004: no manifest"
                                          r".*iter_0000002: file trainer_state.pt is missing\)$"):
        StoredCheckpoint.open(root, "--load", ConfigError)


def test_engine_of_is_the_one_test(tmp_path):
    folder = _checkpoint(str(tmp_path), 1)
    assert engine_of(folder) == "megatron"
    os.makedirs(os.path.join(folder, ENGINE_DIR))
    stored = StoredCheckpoint(folder)
    assert stored.engine == "deepspeed" and "is a DeepSpeed checkpoint" in stored.deepspeed_only


def test_require_new_folder_one_message(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "iter_0000010").mkdir()
    (full / "iter_0000011.tmp").mkdir()
    with pytest.raises(OutputError, match=r"^--save .*full already exists and is not empty \(iter_0000010, "
                                          r"iter_0000011.tmp\): choose a new folder or remove it$"):
        require_new_folder(str(full), "--save")
    with pytest.raises(OutputError, match=r"already exists and is not empty \(iter_0000010\): choose a new folder "
                                          r"or remove it, or pass --overwrite"):
        require_new_folder(str(full), "--save", overwrite=False)
    require_new_folder(str(full), "--save", overwrite=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="already exists and is not a folder"):
        require_new_folder(str(tmp_path / "a_file"), "--out")
    require_new_folder(str(tmp_path / "new"), "--save")


def test_staged_leaves_nothing_on_failure(tmp_path):
    tmp = str(tmp_path / "out.tmp")
    os.makedirs(os.path.join(tmp, "leftover"))  # an interrupted earlier attempt's
    with pytest.raises(RuntimeError, match="disk"):
        with staged(tmp) as folder:
            assert os.listdir(folder) == []
            open(os.path.join(folder, "half"), "w").close()
            raise RuntimeError("disk")
    assert not os.path.exists(tmp)
    with staged(tmp, temporary=True) as folder:
        open(os.path.join(folder, "step"), "w").close()
    assert not os.path.exists(tmp)
    with atomic.staged_checkpoint(str(tmp_path / "root"), 5) as folder:
        torch.save({"iteration": 5}, os.path.join(folder, TRAINER_STATE))
    assert StoredCheckpoint.find(str(tmp_path / "root")).iteration == 5


def test_a_run_looks_for_its_load_checkpoint_once(tmp_path, monkeypatch, capsys):
    """The command line resolves the config against the --load checkpoint and the run goes on with
    the same one: an invalid newer checkpoint is skipped (and said) once, not once per reader."""
    from pretrain.run import arguments
    from pretrain.run.cli import main

    flags = ["--model", "debug", "--train-iters", "2", "--mock-data"]
    cfg = arguments.config_from_args(arguments.build_parser().parse_args(flags))
    root = tmp_path / "ckpt"
    tmp = root / "iter_0000002.tmp"
    tmp.mkdir(parents=True)
    torch.save({"iteration": 2, "consumed_samples": 0, "config": cfg.to_dict()}, tmp / TRAINER_STATE)
    publish_checkpoint(str(root), 2, str(tmp))
    (root / "iter_0000004").mkdir()  # newer, never completed: no manifest
    (root / "latest_checkpointed_iteration.txt").write_text("4")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert main([*flags, "--load", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipping invalid checkpoint") == 1, out
    assert f"load {root}" in out
