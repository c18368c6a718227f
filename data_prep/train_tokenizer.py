"""Train a sentencepiece BPE tokenizer (with byte fallback) on a JSONL corpus.

Special ids (fixed, so every tool agrees on them; see ``data_prep.tokenizers``)::

    0 <unk>   1 <s> (bos)   2 </s> (eos; also the end-of-document token)   3 <pad>

Byte fallback means every UTF-8 string encodes without ``<unk>``. Training is reproducible for a
given corpus, vocabulary size and ``--seed``. Large corpora are sampled with
``--input-sentence-size`` lines (sentencepiece's own sampler).

Usage::

    python -m data_prep.train_tokenizer --input corpus.jsonl --vocab-size 8000 --output tok
    # writes tok.model and tok.vocab
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from data_prep.durable import replace_durably, sync_folder

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# sentencepiece skips training "sentences" longer than this many bytes; we cut lines to fit.
_MAX_SENTENCE_BYTES = 4096


def iter_training_lines(paths: list[str], json_key: str) -> Iterator[str]:
    """Non-empty lines of the documents in JSONL files, cut to sentencepiece's length limit."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise SystemExit(f"error: {path}:{line_no}: cannot read key {json_key!r}: {err}")
                for piece in str(text).splitlines():
                    piece = piece.strip()
                    while piece:
                        head = piece.encode("utf-8")[:_MAX_SENTENCE_BYTES].decode("utf-8", "ignore")
                        yield head
                        piece = piece[len(head):]


def _strip_output_path(model_path: str, name: str) -> None:
    """sentencepiece records the output path in the model; keep only the name, so the same
    corpus and settings give the same bytes wherever the model is written."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:  # protobuf missing: the model is still valid, only not path-independent
        return
    proto = model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = name
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())


def train_tokenizer(
    inputs: list[str],
    output_prefix: str,
    vocab_size: int = 8000,
    json_key: str = "text",
    seed: int = 1234,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
) -> str:
    """Train and write ``{output_prefix}.model``/``.vocab``; returns the model path."""
    import sentencepiece as spm

    for path in inputs:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --input {path!r} does not exist")
    lines = iter_training_lines(inputs, json_key)
    first = next(lines, None)
    if first is None:  # sentencepiece would only say "!sentences_.empty()"
        raise SystemExit(f"error: --input {' '.join(inputs)}: no text to train on (no non-empty "
                         f"{json_key!r} value); give JSONL with one {{\"{json_key}\": ...}} object per line")
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    tmp_prefix = str(out) + ".tmp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], lines),
        model_prefix=tmp_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES * 2,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=2,
    )
    _strip_output_path(tmp_prefix + ".model", out.name)
    for ext in (".model", ".vocab"):
        replace_durably(tmp_prefix + ext, str(out) + ext)
    sync_folder(os.path.dirname(os.path.abspath(str(out))))
    return str(out) + ".model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    parser.add_argument("--output", required=True, help="output prefix (writes PREFIX.model)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="sample at most this many lines for training")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.vocab_size < 260 + 4:
        parser.error("--vocab-size must be at least 264 (256 byte pieces + 4 special tokens + merges)")
    for name, value in (("--input-sentence-size", args.input_sentence_size), ("--num-threads", args.num_threads)):
        if value is not None and value < 1:
            parser.error(f"{name} must be >= 1, not {value}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2^32), not {args.seed}")
    try:
        path = train_tokenizer(args.input, args.output, args.vocab_size, args.json_key, args.seed,
                               args.input_sentence_size, num_threads=args.num_threads)
    except RuntimeError as err:  # sentencepiece reports e.g. a too-large vocab this way
        print(f"error: sentencepiece training failed: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path} (vocab {args.vocab_size}; unk={UNK_ID} bos={BOS_ID} eos/eod={EOS_ID} "
          f"pad={PAD_ID})")


if __name__ == "__main__":
    main()
