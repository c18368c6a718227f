"""tools/preprocess_data.py: megatron-core reads the output; workers do not change a byte; bad
input stops with file:line and leaves no final-named output."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep.tokenizers import build_tokenizer
from data_prep.preprocess import PreprocessError, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _docs(corpus, n=None):
    with open(corpus) as f:
        docs = [json.loads(line)["text"] for line in f]
    return docs[:n] if n else docs


def test_round_trip_with_megatron_indexed_dataset(tiny_dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer("GPTSentencePieceTokenizer", tiny_dataset["tokenizer"])
    ds = IndexedDataset(tiny_dataset["prefix"])
    docs = _docs(tiny_dataset["corpus"])
    assert len(ds) == len(docs)
    assert ds.index.dtype == np.uint16
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        expected = tok.tokenize(docs[i]) + [tok.eod]
        assert ds[i].tolist() == expected


def test_matches_megatron_builder_byte_for_byte(tiny_dataset, tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = build_tokenizer("GPTSentencePieceTokenizer", tiny_dataset["tokenizer"])
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for text in _docs(tiny_dataset["corpus"]):
        ids = tok.tokenize(text) + [tok.eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ref{ext}").read_bytes() == open(tiny_dataset["prefix"] + ext, "rb").read()


def test_workers_do_not_change_output(tiny_dataset, tmp_path):
    outs = []
    for workers in (1, 3):
        prefix = str(tmp_path / f"w{workers}")
        # small chunks so that several workers really share the input
        preprocess([tiny_dataset["corpus"]], prefix, "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], append_eod=True, workers=workers, chunk_bytes=20000,
                   progress=False)
        outs.append([open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx")])
    assert outs[0] == outs[1]


def test_gzip_glob_and_several_keys(tiny_dataset, tmp_path):
    docs = _docs(tiny_dataset["corpus"], 20)
    for part in range(2):
        with gzip.open(tmp_path / f"part{part}.jsonl.gz", "wt") as f:
            for text in docs[part * 10:(part + 1) * 10]:
                f.write(json.dumps({"text": text, "title": text[:30]}) + "\n")
    summary = preprocess([str(tmp_path / "part*.jsonl.gz")], str(tmp_path / "out"),
                         "GPTSentencePieceTokenizer", tiny_dataset["tokenizer"],
                         json_keys=("text", "title"), workers=2, progress=False)
    assert summary.documents == 20
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer("GPTSentencePieceTokenizer", tiny_dataset["tokenizer"])
    titles = IndexedDataset(str(tmp_path / "out_title_document"))
    assert titles[15].tolist() == tok.tokenize(docs[15][:30])  # no --append-eod


BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated\n',
    "missing key": b'{"body": "no text key here"}\n',
    "is a int, not a string": b'{"text": 42}\n',
    "invalid UTF-8": b'{"text": "bad \xff\xfe bytes"}\n',
    "empty document": b'{"text": "   "}\n',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line(tiny_dataset, tmp_path, reason):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "A good line of text."}).encode() + b"\n"
    path.write_bytes(good * 3 + BAD_LINES[reason] + good)
    with pytest.raises(PreprocessError) as err:
        preprocess([str(path)], str(tmp_path / "out"), "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], workers=1, progress=False)
    assert f"{path}:4:" in str(err.value) and reason in str(err.value)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")], "no output may remain"

    summary = preprocess([str(path)], str(tmp_path / "skip"), "GPTSentencePieceTokenizer",
                         tiny_dataset["tokenizer"], workers=1, skip_bad_lines=True, progress=False)
    assert summary.documents == 4 and sum(summary.skipped.values()) == 1


def test_missing_or_unreadable_tokenizer_and_input(tiny_dataset, tmp_path):
    from data_prep.tokenizers import TokenizerError

    with pytest.raises(TokenizerError, match="no such file"):
        preprocess([tiny_dataset["corpus"]], str(tmp_path / "o"), "GPTSentencePieceTokenizer",
                   str(tmp_path / "missing.model"), progress=False)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable sentencepiece model"):
        preprocess([tiny_dataset["corpus"]], str(tmp_path / "o"), "GPTSentencePieceTokenizer",
                   str(junk), progress=False)
    with pytest.raises(PreprocessError, match="no such file"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], progress=False)
    with pytest.raises(PreprocessError, match="matches no file"):
        preprocess([str(tmp_path / "*.nothing")], str(tmp_path / "o"), "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], progress=False)


def test_unwritable_output_folder(tiny_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(PreprocessError, match="cannot create"):
        preprocess([tiny_dataset["corpus"]], str(blocker / "sub" / "out"), "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], progress=False)


def test_cli_reports_summary_and_errors(tiny_dataset, tmp_path):
    script = os.path.join(ROOT, "tools", "preprocess_data.py")
    ok = subprocess.run([sys.executable, script, "--input", tiny_dataset["corpus"], "--output-prefix",
                         str(tmp_path / "cli"), "--tokenizer-type", "GPTSentencePieceTokenizer",
                         "--tokenizer-model", tiny_dataset["tokenizer"], "--append-eod",
                         "--workers", "2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "documents" in ok.stdout and "tokens/s" in ok.stdout
    # an existing dataset is not replaced unless asked
    again = [sys.executable, script, "--input", tiny_dataset["corpus"], "--output-prefix", str(tmp_path / "cli"),
             "--tokenizer-model", tiny_dataset["tokenizer"], "--append-eod"]
    before = (tmp_path / "cli_text_document.bin").stat().st_mtime_ns
    refused = subprocess.run(again, capture_output=True, text=True)
    assert refused.returncode == 1 and "exists; add --overwrite" in refused.stderr, refused.stderr
    assert (tmp_path / "cli_text_document.bin").stat().st_mtime_ns == before
    assert subprocess.run(again + ["--overwrite"], capture_output=True, text=True).returncode == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    fail = subprocess.run([sys.executable, script, "--input", str(bad), "--output-prefix",
                           str(tmp_path / "bad"), "--tokenizer-type", "GPTSentencePieceTokenizer",
                           "--tokenizer-model", tiny_dataset["tokenizer"]], capture_output=True, text=True)
    assert fail.returncode == 1
    assert f"{bad}:2: malformed JSON" in fail.stderr and "Traceback" not in fail.stderr


def test_null_tokenizer(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n')
    preprocess([str(path)], str(tmp_path / "n"), "NullTokenizer", vocab_size=100, append_eod=True,
               workers=0, progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert ds[0].tolist() == [1, 2, 3, 99] and ds[1].tolist() == [4, 5, 99]


def test_gpt_dataset_builds_training_samples(tiny_dataset):
    """What the trainer uses: megatron-core's GPTDataset over our output."""
    import torch

    from pretrain.config import DataConfig
    from pretrain.data import build_datasets, load_tokenizer

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        cfg = DataConfig(data_path=[tiny_dataset["prefix"]], tokenizer_model=tiny_dataset["tokenizer"],
                         split="90,10,0")
        tok = load_tokenizer(cfg)
        train, valid, test = build_datasets(cfg, tok, seq_length=32, seed=1, num_samples=(50, 10, 0))
        sample = train[0]
        assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
        assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
        assert len(train) >= 50 and valid is not None and test is None
    finally:
        torch.distributed.destroy_process_group()


def test_inspect_dataset(tiny_dataset):
    from tools.inspect_dataset import main as inspect_main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert inspect_main([tiny_dataset["prefix"], "--tokenizer-model", tiny_dataset["tokenizer"],
                             "--num-docs", "1"]) == 0
    out = buf.getvalue()
    first_doc = _docs(tiny_dataset["corpus"], 1)[0]
    assert "documents: 600" in out and "token dtype: uint16" in out
    assert first_doc[:60] in out
    assert inspect_main(["/nonexistent/prefix"]) == 1


def test_manifest_records_largest_id_and_tokenizer(tiny_dataset):
    from data_prep.indexed_dataset import file_sha256, read_manifest

    manifest = read_manifest(tiny_dataset["prefix"])
    tokens = np.fromfile(tiny_dataset["prefix"] + ".bin", dtype=np.uint16)
    assert manifest.max_token_id == int(tokens.max()) and manifest.tokens == len(tokens)
    assert manifest.documents == 600 and manifest.vocab_size == 1000 and manifest.dtype == "uint16"
    assert manifest.tokenizer_model_sha256 == file_sha256(tiny_dataset["tokenizer"])


@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank-lines"])
def test_input_without_documents_is_an_error_and_writes_nothing(tiny_dataset, tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(PreprocessError, match=f"--input {path}: it holds no documents"):
        preprocess([str(path)], str(tmp_path / "out"), "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], workers=0, progress=False)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")], "no output may remain"


def test_only_bad_lines_skipped_is_an_error(tiny_dataset, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_LINES["malformed JSON"] * 2)
    with pytest.raises(PreprocessError, match="all 2 non-blank lines were skipped"):
        preprocess([str(path)], str(tmp_path / "out"), "GPTSentencePieceTokenizer",
                   tiny_dataset["tokenizer"], workers=0, skip_bad_lines=True, progress=False)


def test_stale_temporaries_of_dead_runs_are_removed_live_ones_kept(tiny_dataset, tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
    dead_pid, live_pid = int(finished.stdout), os.getppid()
    prefix = tmp_path / "out_text_document"
    dead = [tmp_path / f"out_text_document{ext}.tmp-{dead_pid}" for ext in (".bin", ".idx", ".json")]
    live = tmp_path / f"out_text_document.bin.tmp-{live_pid}"
    for path in (*dead, live):
        path.write_bytes(b"partial")
    preprocess([tiny_dataset["corpus"]], str(tmp_path / "out"), "GPTSentencePieceTokenizer",
               tiny_dataset["tokenizer"], workers=0, progress=False)
    assert not any(p.exists() for p in dead) and live.read_bytes() == b"partial"
    note = capsys.readouterr().err
    assert "removed 3 temporary file(s)" in note and str(live) not in note
    assert os.path.getsize(str(prefix) + ".bin") > 0


def _session_processes(session: int) -> list[int]:
    """The live processes of a session (what a killed process group leaves behind, reparented)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":  # field 6 of stat: the session id
                pids.append(int(entry))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")
def test_sigkill_with_partitions_leaves_no_process_and_a_rerun_cleans_up(tiny_dataset, tmp_path):
    """Issue 31 item 8: SIGKILL of ``--partitions 2 --workers 2`` takes its shares and their encoders
    with it, and the next run removes the killed run's working folder (not a live run's)."""
    import signal
    import time

    big = tmp_path / "big.jsonl"
    with open(tiny_dataset["corpus"], "rb") as src:
        corpus = src.read()
    big.write_bytes(corpus * 30)  # ~25 MB: the shares encode for many seconds after the kill
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--output-prefix", str(out),
            "--tokenizer-model", tiny_dataset["tokenizer"], "--partitions", "2", "--workers", "2"]
    run = subprocess.Popen([*argv, "--input", str(big)], start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    workdir = tmp_path / f"out.partitions.tmp-{run.pid}"
    deadline = time.time() + 120
    while not (workdir.is_dir() and any(workdir.glob("part*"))) and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed: give it more input"
    time.sleep(0.5)  # the shares' pools have started
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.time() + 3  # the parent-death signal is immediate; orphans would encode on
    while _session_processes(run.pid) and time.time() < deadline:
        time.sleep(0.1)
    left = _session_processes(run.pid)
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} process(es) of the killed run still running"
    assert workdir.is_dir(), "the killed run's working folder should be there for the rerun to remove"
    live = tmp_path / f"out.partitions.tmp-{os.getpid()}"  # a run still going (this process): kept
    live.mkdir()
    done = subprocess.run([*argv, "--input", tiny_dataset["corpus"]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not workdir.exists() and live.is_dir()
    assert f"removed 1 temporary file(s) of an earlier run that is no longer running: {workdir}" in done.stderr


def test_the_dataset_is_on_disk_before_its_names_appear(tiny_dataset, tmp_path, monkeypatch):
    """A rename is only as durable as what it renames: the .bin, the manifest and the .idx are
    each synced before the rename that gives them their names, and the folder after the last; a
    power cut never leaves an .idx beside a named .bin without its tokens. Before: no sync."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    prefix = str(tmp_path / "d")
    preprocess([tiny_dataset["corpus"]], prefix, "GPTSentencePieceTokenizer", tiny_dataset["tokenizer"],
               append_eod=True, workers=1, progress=False)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    finals = [events[i][1] for i in renames]
    assert finals == [f"{prefix}_text_document{e}" for e in (".bin", ".json", ".idx")], events
    for i in renames:  # the file renamed into place was synced just before
        assert events[i - 1][0] == "sync" and events[i - 1][1].startswith(f"{prefix}_text_document"), events
    assert events[renames[-1] + 1] == ("sync", str(tmp_path)), events
