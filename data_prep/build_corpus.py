"""Build a JSONL corpus of real English text with no download.

Three sources:

* ``--source builtin`` (the default): the documentation that every CPython install carries. We parse
  (never import: some stdlib modules have side effects on import) every ``.py`` file of the
  standard library with :mod:`ast` and take the docstrings of modules, classes and functions,
  plus the long help topics in ``pydoc_data.topics``. Documents shorter than ``--min-chars`` are
  dropped and exact duplicates (after whitespace normalisation) are removed, so the corpus is
  deterministic for a given Python version.
* ``--source debian-docs``: the documentation that Debian packages ship (about 30 M tokens;
  see :mod:`data_prep.debian_docs`), unpacked from their ``.deb`` files into a cache folder
  (``--fetch-packages`` downloads them with ``apt-get download``; nothing is installed).
* ``--text-dir DIR``: a folder of plain-text files, one document per file (or per blank-line
  separated paragraph block with ``--split-paragraphs``), for users who have text but no JSONL.

Each output line is ``{"text": ..., "source": ...}``. ``--holdout-fraction F --holdout-output
HELD.jsonl`` sends a fixed, hash-chosen fraction of the documents to a second file, so a test set
never shares a document with the training set.

Usage::

    python -m data_prep.build_corpus --output corpus.jsonl
    python -m data_prep.build_corpus --text-dir my_texts/ --output mine.jsonl
    python -m data_prep.build_corpus --source debian-docs --fetch-packages --output big.jsonl \
        --holdout-fraction 0.01 --holdout-output held_out.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep import debian_docs
from data_prep.durable import replace_durably, sync_folder
from data_prep.text import duplicate_key

DEFAULT_MIN_CHARS = 200
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def _clean_docstring(text: str) -> str:
    # inspect.cleandoc removes the common indentation the way help() shows docstrings.
    import inspect

    return inspect.cleandoc(text).strip()


def _docstrings_of_module(path: Path, module_name: str) -> Iterator[tuple[str, str]]:
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    module_doc = ast.get_docstring(tree, clean=False)
    if module_doc:
        yield module_name, module_doc

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=False)
                if doc:
                    yield qualname, doc
                yield from visit(child, qualname)

    yield from visit(tree, module_name)


def stdlib_python_files(stdlib_dir: str | None = None) -> list[tuple[Path, str]]:
    """Every stdlib source file with its dotted module name, in a deterministic order."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if not parts:
                continue
            files.append((path, ".".join(parts)))
    return files


def builtin_documents(min_chars: int = DEFAULT_MIN_CHARS) -> Iterator[dict]:
    """The built-in corpus: stdlib docstrings and pydoc help topics, deduplicated."""
    seen: set[str] = set()

    def emit(source: str, text: str) -> Iterator[dict]:
        text = _clean_docstring(text)
        if len(text) < min_chars:
            return
        digest = duplicate_key(text)
        if digest in seen:
            return
        seen.add(digest)
        yield {"text": text, "source": source}

    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        yield from emit(f"pydoc_topic:{name}", topics[name])
    for path, module_name in stdlib_python_files():
        for qualname, doc in _docstrings_of_module(path, module_name):
            yield from emit(f"stdlib:{qualname}", doc)


def text_dir_documents(
    folder: str, min_chars: int = 1, split_paragraphs: bool = False, suffixes: tuple = (".txt",)
) -> Iterator[dict]:
    """Documents from a folder of plain-text files (recursively, sorted)."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"error: --text-dir {folder!r} is not a folder")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise SystemExit(
                f"error: {path}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                "convert it to UTF-8 or remove it"
            ) from None
        chunks = re.split(r"\n\s*\n", text) if split_paragraphs else [text]
        for i, chunk in enumerate(chunks):
            chunk = chunk.strip()
            if len(chunk) >= min_chars:
                source = str(path.relative_to(root)) + (f"#{i}" if split_paragraphs else "")
                yield {"text": chunk, "source": source}


def is_held_out(source: str, fraction: float) -> bool:
    """Whether the document named ``source`` belongs to the held-out split: a fixed hash of the
    name (without a ``#part`` suffix, so the parts of one file stay together) below ``fraction``.
    The same name always lands on the same side, whatever else the corpus holds."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(source.split("#", 1)[0].encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass
class WriteCounts:
    documents: int = 0
    characters: int = 0
    holdout_documents: int = 0
    holdout_characters: int = 0


def write_jsonl(
    documents: Iterator[dict],
    output: str,
    holdout_output: str | None = None,
    holdout_fraction: float = 0.0,
    min_total_chars: int = 0,
) -> WriteCounts:
    """Write documents atomically (temporary names, then rename). With ``holdout_output``, the
    documents that :func:`is_held_out` picks go there instead of ``output``. Nothing is written
    (existing files stay as they were) when there is no document or fewer than
    ``min_total_chars`` characters would go to ``output``; the caller reports which."""
    names = [("--output", Path(output))]
    if holdout_output:
        names.append(("--holdout-output", Path(holdout_output)))
    temporaries = [path.with_name(path.name + ".tmp") for _, path in names]
    counts = WriteCounts()
    flag, path = names[0]
    files = []
    try:
        for (flag, path), tmp in zip(names, temporaries):
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(open(tmp, "w", encoding="utf-8"))
        for doc in documents:
            held_out = holdout_output is not None and is_held_out(doc["source"], holdout_fraction)
            flag, path = names[held_out]
            files[held_out].write(json.dumps(doc, ensure_ascii=False) + "\n")
            if held_out:
                counts.holdout_documents += 1
                counts.holdout_characters += len(doc["text"])
            else:
                counts.documents += 1
                counts.characters += len(doc["text"])
        for (flag, path), f in zip(names, files):
            f.close()  # a full disk can show only here, when the last buffer is flushed
        if counts.documents and counts.characters >= min_total_chars:
            for (flag, path), tmp in zip(names, temporaries):
                replace_durably(tmp, path)
                sync_folder(os.path.dirname(os.path.abspath(path)))
    except OSError as err:  # a read-only or full disk, a file where the folder should be
        raise SystemExit(f"error: {flag} {path}: cannot write it ({err.strerror or err}); nothing was "
                         "written. Choose a writable folder with free space") from None
    finally:
        for f in files:
            if not f.closed:
                try:
                    f.close()
                except OSError:
                    pass  # the error being raised already says why
        for tmp in temporaries:
            if tmp.exists():
                tmp.unlink()  # an error or too little text: leave nothing under the output's names
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--source", choices=("builtin", "debian-docs"), default="builtin",
                        help="builtin (default): the Python standard library's docstrings (~0.5 M "
                             "tokens); debian-docs: the documentation of Debian packages (~30 M tokens, "
                             "see data_prep/debian_docs.py)")
    parser.add_argument("--text-dir", help="build from this folder of .txt files instead")
    parser.add_argument("--suffixes", default=".txt", help="with --text-dir: comma-separated")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="with --text-dir: one document per blank-line separated block")
    parser.add_argument("--debian-docs-dir", default=None,
                        help="with --source debian-docs: the folder the packages are unpacked in "
                             "(default ~/.cache/efficientllm/debian-docs)")
    parser.add_argument("--fetch-packages", action="store_true",
                        help="with --source debian-docs: download the missing packages with apt-get "
                             "download and unpack them into --debian-docs-dir (nothing is installed)")
    parser.add_argument("--min-chars", type=int, default=None,
                        help=f"drop shorter documents (default {DEFAULT_MIN_CHARS} for the "
                             "built-in and debian-docs corpora, 1 for --text-dir)")
    parser.add_argument("--min-total-chars", type=int, default=0,
                        help="fail, writing nothing, when --output would get fewer characters")
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="with --holdout-output: this fraction of the documents (picked by a hash "
                             "of their source name, so always the same ones) goes there, not to --output")
    parser.add_argument("--holdout-output", help="JSONL file for the held-out documents")
    parser.add_argument("--repeat", type=int, default=1,
                        help="write the corpus this many times (to make a larger test corpus); "
                             "held-out documents are written once")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if (args.min_chars is not None and args.min_chars < 0) or args.min_total_chars < 0:
        parser.error("--min-chars and --min-total-chars must be >= 0")
    if args.text_dir and args.source != "builtin":
        parser.error("--text-dir and --source debian-docs are two different sources; give one")
    if args.source != "debian-docs" and (args.fetch_packages or args.debian_docs_dir):
        parser.error("--fetch-packages and --debian-docs-dir go with --source debian-docs")
    if bool(args.holdout_output) != (args.holdout_fraction > 0):
        parser.error("--holdout-fraction (above 0) and --holdout-output go together")
    if not 0 <= args.holdout_fraction < 1:
        parser.error(f"--holdout-fraction must be in [0, 1), not {args.holdout_fraction}")
    if args.holdout_output and Path(args.holdout_output).resolve() == Path(args.output).resolve():
        parser.error("--holdout-output must differ from --output")

    def base_documents() -> Iterator[dict]:
        if args.text_dir:
            return text_dir_documents(args.text_dir, args.min_chars or 1, args.split_paragraphs,
                                      tuple(s.strip() for s in args.suffixes.split(",")))
        if args.source == "debian-docs":
            return _debian_documents(args.debian_docs_dir, args.fetch_packages,
                                     args.min_chars or DEFAULT_MIN_CHARS)
        return builtin_documents(args.min_chars or DEFAULT_MIN_CHARS)

    def documents() -> Iterator[dict]:
        for r in range(args.repeat):
            for doc in base_documents():
                if r:
                    if args.holdout_output and is_held_out(doc["source"], args.holdout_fraction):
                        continue  # held out: written once, on the first pass
                    doc = dict(doc, source=f"{doc['source']}@{r}")
                yield doc

    started = time.perf_counter()
    counts = write_jsonl(documents(), args.output, args.holdout_output, args.holdout_fraction,
                         args.min_total_chars)
    if counts.documents == 0:
        if args.text_dir:
            source = (f"--text-dir {args.text_dir}: no document found (no {args.suffixes} file there with "
                      f"at least {args.min_chars or 1} character(s) of text)")
        else:
            source = f"the {args.source} corpus has no document" + (" outside the held-out split"
                                                                    if args.holdout_output else "")
        print(f"error: {source}; nothing was written to {args.output}", file=sys.stderr)
        sys.exit(1)
    if counts.characters < args.min_total_chars:
        print(f"error: --min-total-chars {args.min_total_chars}: the corpus has only {counts.characters} "
              f"characters in {counts.documents} documents; nothing was written to {args.output}",
              file=sys.stderr)
        sys.exit(1)
    print(f"wrote {counts.documents} documents ({counts.characters / 1e6:.1f} M characters) to "
          f"{args.output} in {time.perf_counter() - started:.0f} s")
    if args.holdout_output:
        print(f"wrote {counts.holdout_documents} held-out documents ({counts.holdout_characters / 1e6:.2f} M "
              f"characters) to {args.holdout_output}")


def _debian_documents(cache_dir: str | None, fetch: bool, min_chars: int) -> Iterator[dict]:
    cache = Path(cache_dir) if cache_dir else debian_docs.DEFAULT_CACHE_DIR
    try:
        missing = debian_docs.missing_packages(cache, list(debian_docs.DEBIAN_DOC_PACKAGES))
        if missing and not fetch:
            raise debian_docs.DebianDocsError(debian_docs.missing_packages_message(cache, missing))
        if missing:
            debian_docs.fetch_packages(cache, missing)
        print(f"reading the Debian documentation packages in {cache}:")
        yield from debian_docs.debian_doc_documents(cache, min_chars)
    except debian_docs.DebianDocsError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
