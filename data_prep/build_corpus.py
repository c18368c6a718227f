"""Build a JSONL corpus of real English text with no download.

Two sources:

* ``--builtin`` (the default): the documentation that every CPython install carries. We parse
  (never import: some stdlib modules have side effects on import) every ``.py`` file of the
  standard library with :mod:`ast` and take the docstrings of modules, classes and functions,
  plus the long help topics in ``pydoc_data.topics``. Documents shorter than ``--min-chars`` are
  dropped and exact duplicates (after whitespace normalisation) are removed, so the corpus is
  deterministic for a given Python version.
* ``--text-dir DIR``: a folder of plain-text files, one document per file (or per blank-line
  separated paragraph block with ``--split-paragraphs``), for users who have text but no JSONL.

Each output line is ``{"text": ..., "source": ...}``.

Usage::

    python -m data_prep.build_corpus --output corpus.jsonl
    python -m data_prep.build_corpus --text-dir my_texts/ --output mine.jsonl
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
import warnings
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MIN_CHARS = 200
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


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
        digest = hashlib.sha1(_normalise(text).encode("utf-8")).hexdigest()
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


def write_jsonl(documents: Iterator[dict], output: str) -> tuple[int, int]:
    """Write documents atomically (temporary name, then rename). Returns (docs, chars); with no
    documents nothing is written (an existing ``output`` stays as it was)."""
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    n_docs = n_chars = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in documents:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(doc["text"])
        if n_docs:
            os.replace(tmp, out)
    except OSError as err:  # a read-only or full disk, a file where the folder should be
        raise SystemExit(f"error: --output {output}: cannot write it ({err.strerror or err}); "
                         "nothing was written. Choose a writable folder with free space") from None
    finally:
        if tmp.exists():
            tmp.unlink()  # an error or no documents: leave nothing under the output's names
    return n_docs, n_chars


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--text-dir", help="build from this folder of .txt files instead")
    parser.add_argument("--suffixes", default=".txt", help="with --text-dir: comma-separated")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="with --text-dir: one document per blank-line separated block")
    parser.add_argument("--min-chars", type=int, default=None,
                        help=f"drop shorter documents (default {DEFAULT_MIN_CHARS} for the "
                             "built-in corpus, 1 for --text-dir)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="write the corpus this many times (to make a larger test corpus)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    def documents() -> Iterator[dict]:
        for r in range(args.repeat):
            if args.text_dir:
                docs = text_dir_documents(
                    args.text_dir, args.min_chars or 1, args.split_paragraphs,
                    tuple(s.strip() for s in args.suffixes.split(",")),
                )
            else:
                docs = builtin_documents(args.min_chars or DEFAULT_MIN_CHARS)
            for doc in docs:
                if r:
                    doc = dict(doc, source=f"{doc['source']}@{r}")
                yield doc

    n_docs, n_chars = write_jsonl(documents(), args.output)
    if n_docs == 0:
        source = (f"--text-dir {args.text_dir}: no document found (no {args.suffixes} file there with at "
                  f"least {args.min_chars or 1} character(s) of text)" if args.text_dir
                  else "the built-in corpus is empty")
        print(f"error: {source}; nothing was written to {args.output}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {n_docs} documents ({n_chars / 1e6:.1f} M characters) to {args.output}")


if __name__ == "__main__":
    main()
