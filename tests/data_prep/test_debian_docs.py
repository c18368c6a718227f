"""The debian-docs corpus source (issue 13): text extraction from HTML, roff man pages and pod on
small fixtures, the package cache (a fake one: no package is downloaded or installed here), and
the held-out split of build_corpus."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from data_prep import debian_docs
from data_prep.build_corpus import is_held_out, main as build_corpus_main
from data_prep.debian_docs import (DebianDocsError, DocFiles, debian_doc_documents, fetch_packages,
                                   html_to_text, pod_to_text, roff_to_text, split_long_text)

SPHINX_PAGE = """<!DOCTYPE html>
<html><head><title>Ignored title</title><style>p { color: red }</style>
<script>var x = "<p>not text</p>";</script></head>
<body>
<div class="related" role="navigation"><a href="#">previous</a> | <a href="#">next</a></div>
<div class="body" role="main">
<h1>File objects<a class="headerlink" href="#x">&para;</a></h1>
<p>A file is opened with
   <code>open()</code>; it returns a &lt;file&gt; object &amp; more.</p>
<ul><li>first item<li>second item</ul>
<pre>def f():
    return 1</pre>
</span>
<p>Last paragraph.</p>
</div>
<div class="sphinxsidebar" role="navigation"><h3>Table of contents</h3></div>
<footer>Copyright</footer>
</body></html>
"""


def test_html_main_content_without_navigation():
    assert html_to_text(SPHINX_PAGE) == (
        "File objects\n\n"
        "A file is opened with open(); it returns a <file> object & more.\n\n"
        "first item\nsecond item\n\n"
        "def f():\n    return 1\n\n"
        "Last paragraph.")


def test_html_without_a_main_element_keeps_the_body_minus_navigation():
    page = ('<html><body><div class="navheader">Prev Up Next</div>'
            '<div class="sect1"><h2>Joins</h2><p>Queries can access\nmany tables.</p></div>'
            '<div class="navfooter">Home</div></body></html>')
    assert html_to_text(page) == "Joins\n\nQueries can access many tables."


MAN_PAGE = r""".\" Copyright line that is a comment
.TH OPEN 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open \- open and possibly create a file
.SH SYNOPSIS
.nf
.B #include <fcntl.h>
.PP
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
It is \fBfast\fP \(em usually \
very fast.
.TP
.B O_CREAT
Create the file.
.TS
tab(:);
l l.
a:b
.TE
"""


def test_roff_man_page_to_text():
    assert roff_to_text(MAN_PAGE) == (
        "NAME\n\n"
        "open - open and possibly create a file\n\n"
        "SYNOPSIS\n\n"
        "#include <fcntl.h>\n\n"
        "int open(const char *pathname, int flags);\n\n"
        "DESCRIPTION\n\n"
        "The open() system call opens the file specified by pathname. "
        "It is fast \u2014 usually very fast.\n\n"
        "O_CREAT Create the file.\n\n"
        "a:b")


def test_roff_stub_that_includes_another_page_is_empty():
    assert roff_to_text(".so man3/other.3\n") == ""


POD_PAGE = """=head1 NAME

perlfoo - how to B<frobnicate> with C<< $obj->method >>

=head2 Details

See L<the manual|perlfunc/open> and L<perlsyn>. Use E<lt>FHE<gt> X<index>here.

    my $x = 1;  # verbatim

=begin html

<p>skipped</p>

=end html

=over 4

=item * one

=back

=cut

sub not_documentation { 1 }
"""


def test_pod_to_text():
    assert pod_to_text(POD_PAGE) == (
        "NAME\n\n"
        "perlfoo - how to frobnicate with $obj->method\n\n"
        "Details\n\n"
        "See the manual and perlsyn. Use <FH> here.\n\n"
        "    my $x = 1;  # verbatim\n\n"
        "* one")


def test_long_texts_are_split_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 30 for i in range(10))
    parts = split_long_text(text, max_chars=100)
    assert "\n\n".join(parts) == text
    assert all(len(p) <= 100 for p in parts) and len(parts) > 3
    assert split_long_text("short", max_chars=100) == ["short"]


PROSE = "This paragraph is long enough to count as a document in the corpus. " * 4


def _fake_package(cache: Path, package: str, files: dict[str, bytes], version: str = "1.0-1") -> None:
    root = cache / package
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "VERSION").write_text(version + "\n")


FAKE_PACKAGES = {
    "fake-doc": (DocFiles(r"usr/share/doc/fake/.+\.html", "html", exclude=r".*/_sources/"),),
    "fake-manpages": (DocFiles(r"usr/share/man/man\d/.+\.gz", "man"),),
}


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_package(cache, "fake-doc", {
        "usr/share/doc/fake/b.html": f"<html><body><p>{PROSE} B</p></body></html>".encode(),
        "usr/share/doc/fake/a.html": f"<html><body><p>{PROSE} A</p></body></html>".encode(),
        "usr/share/doc/fake/copy.html": f"<html><body><p>{PROSE}\n A</p></body></html>".encode(),
        "usr/share/doc/fake/tiny.html": b"<p>too short</p>",
        "usr/share/doc/fake/_sources/a.txt": PROSE.encode(),
        "usr/share/doc/fake/notes.txt": PROSE.encode(),
    })
    os.symlink("a.html", cache / "fake-doc/usr/share/doc/fake/link.html")
    _fake_package(cache, "fake-manpages", {
        "usr/share/man/man1/tool.1.gz": gzip.compress(f".TH TOOL 1\n.SH NAME\ntool \\- {PROSE}\n".encode()),
    })
    monkeypatch.setattr(debian_docs, "DEBIAN_DOC_PACKAGES", FAKE_PACKAGES)
    return cache


def test_documents_from_the_cache_are_sorted_deduplicated_and_filtered(fake_cache):
    log = []
    docs = list(debian_doc_documents(fake_cache, log=log.append))
    # copy.html repeats a.html up to whitespace; tiny.html is short; the symlink, _sources and
    # the .txt file are not taken
    assert [d["source"] for d in docs] == ["fake-doc:usr/share/doc/fake/a.html",
                                           "fake-doc:usr/share/doc/fake/b.html",
                                           "fake-manpages:usr/share/man/man1/tool.1.gz"]
    assert docs[0]["text"] == PROSE + "A"  # HTML whitespace collapsed
    assert docs[2]["text"].startswith("NAME\n\ntool - This paragraph")
    assert log[0] == "  fake-doc 1.0-1: 2 documents, 0.0 M characters"


def test_debian_docs_cli_output_is_deterministic(fake_cache, tmp_path):
    outputs = []
    for name in ("one.jsonl", "two.jsonl"):
        build_corpus_main(["--source", "debian-docs", "--debian-docs-dir", str(fake_cache),
                           "--output", str(tmp_path / name)])
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 3


def test_missing_packages_name_the_packages_and_the_commands(tmp_path, capsys):
    cache = tmp_path / "empty-cache"
    out = tmp_path / "big.jsonl"
    with pytest.raises(SystemExit) as error:
        build_corpus_main(["--source", "debian-docs", "--debian-docs-dir", str(cache), "--output", str(out)])
    message = str(error.value)
    for package in debian_docs.DEBIAN_DOC_PACKAGES:
        assert package in message
    assert "--fetch-packages" in message and "apt-get download linux-doc-6.1 python3.11-doc" in message
    assert not out.exists() and not (tmp_path / "big.jsonl.tmp").exists()


def test_a_package_that_yields_nothing_is_an_error_not_a_smaller_corpus(fake_cache, tmp_path):
    shutil.rmtree(fake_cache / "fake-manpages" / "usr")
    out = tmp_path / "big.jsonl"
    with pytest.raises(SystemExit, match="package fake-manpages 1.0-1 .* gave no document"):
        build_corpus_main(["--source", "debian-docs", "--debian-docs-dir", str(fake_cache),
                           "--output", str(out)])
    assert not out.exists()


def test_too_small_a_corpus_for_min_total_chars_writes_nothing(fake_cache, tmp_path, capsys):
    out = tmp_path / "big.jsonl"
    with pytest.raises(SystemExit):
        build_corpus_main(["--source", "debian-docs", "--debian-docs-dir", str(fake_cache),
                           "--output", str(out), "--min-total-chars", "1000000"])
    assert "--min-total-chars 1000000: the corpus has only" in capsys.readouterr().err
    assert list(out.parent.glob("big.jsonl*")) == []


def test_fetch_without_apt_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(DebianDocsError, match="--fetch-packages needs apt-get"):
        fetch_packages(tmp_path / "cache", ["fake-doc"])


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
def test_fetch_unpacks_what_apt_get_download_delivers(tmp_path, monkeypatch):
    # a real .deb, and a stand-in apt-get on PATH that "downloads" it: no network, no root
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: fake-doc\nVersion: 2.0-3\nArchitecture: all\nMaintainer: n <n@example.org>\n"
        "Description: test\n")
    page = tree / "usr/share/doc/fake/a.html"
    page.parent.mkdir(parents=True)
    page.write_text(f"<p>{PROSE}</p>")
    deb = tmp_path / "fake-doc_2.0-3_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                   capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\n[ "$1" = download ] && cp {deb} .\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    log = []
    fetch_packages(cache, ["fake-doc"], log=log.append)
    assert (cache / "fake-doc" / "VERSION").read_text() == "2.0-3\n"
    assert (cache / "fake-doc/usr/share/doc/fake/a.html").is_file()
    assert log[-1] == "  fake-doc 2.0-3"
    assert [p.name for p in cache.iterdir()] == ["fake-doc"], "no download folder may be left"
    with pytest.raises(DebianDocsError, match="did not deliver other-doc"):
        fetch_packages(cache, ["other-doc"], log=log.append)


def test_holdout_split_is_disjoint_fixed_and_keeps_parts_together(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"File {i} first part.\n\nFile {i} second part.")
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    args = ["--text-dir", str(folder), "--split-paragraphs", "--output", str(train),
            "--holdout-fraction", "0.25", "--holdout-output", str(held)]
    build_corpus_main(args)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    held_rows = [json.loads(line) for line in held.read_text().splitlines()]
    train_files = {r["source"].split("#")[0] for r in train_rows}
    held_files = {r["source"].split("#")[0] for r in held_rows}
    assert not train_files & held_files and len(train_files | held_files) == 40
    assert 3 <= len(held_files) <= 18  # about a quarter
    assert len(held_rows) == 2 * len(held_files), "both parts of a held-out file are held out"
    first = train.read_bytes(), held.read_bytes()
    build_corpus_main(args + ["--repeat", "2"])
    assert held.read_bytes() == first[1], "held-out documents are written once"
    assert train.read_bytes().startswith(first[0]) and train.read_text().count("\n") == 2 * len(train_rows)
    assert all(is_held_out(s, 0.25) for s in held_files) and not any(is_held_out(s, 0.25) for s in train_files)


@pytest.mark.parametrize("args,message", [
    (["--fetch-packages"], "go with --source debian-docs"),
    (["--holdout-output", "h.jsonl"], "go together"),
    (["--holdout-fraction", "1.5", "--holdout-output", "h.jsonl"], "must be in"),
    (["--source", "debian-docs", "--text-dir", "x"], "two different sources"),
])
def test_bad_flag_combinations(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        build_corpus_main(["--output", str(tmp_path / "o.jsonl"), *args])
    assert message in capsys.readouterr().err
