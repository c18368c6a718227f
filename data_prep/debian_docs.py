"""A large English corpus from the documentation that Debian packages ship (no web download).

``python -m data_prep.build_corpus --source debian-docs`` reads the documentation of a fixed list
of 23 Debian 12 ("bookworm") packages (:data:`DEBIAN_DOC_PACKAGES`): the Linux kernel's
documentation; the Python, Django, SQLAlchemy, SciPy, Sphinx, PostgreSQL, SQLite, LLVM, Clang,
CMake, Erlang/OTP, node.js and git manuals; perl's pod pages; the Linux man-pages project; the
bash reference; GIMP's user manual; and Debian's policy, reference, developers' reference and
handbook. All are in Debian's ``main`` archive, so their licences are free (DFSG). Measured with
bookworm's versions including its security updates (the build prints each version): 15,944
documents, 122.5 M characters, about 37 M tokens with a sentencepiece BPE tokenizer of
vocabulary 8000 trained on it (3.3 characters per token); a build takes about 2.5 minutes of one
core's CPU time.

The packages are never installed: ``--fetch-packages`` runs ``apt-get download`` (Debian's own
client; no root needed; about 245 MB) and unpacks each ``.deb`` with ``dpkg-deb -x`` into a cache
folder (``--debian-docs-dir``, default ``~/.cache/efficientllm/debian-docs``; about 1.1 GB), one
sub-folder per package holding the package's file tree and a ``VERSION`` file. Nothing on the
system changes, and dpkg's ``path-exclude`` settings (which strip ``/usr/share/doc`` in many
container images) do not apply. A package already in the cache is not fetched again; delete its
folder to refresh it.

What determines the output: the versions of the packages in the cache (printed by
``build_corpus``; ``apt-get download`` takes the candidate version of the machine's apt sources,
so two machines with the same package versions produce the same bytes), ``--min-chars`` and this
module's code. Files are read in the order of the package list, then sorted by path; documents
are deduplicated exactly after whitespace normalisation; documents longer than
:data:`MAX_DOCUMENT_CHARS` are cut at paragraph boundaries into parts. A package that gives no
document (its files moved in another release) is an error, never a silently smaller corpus.

Text extraction uses the standard library only: :class:`html.parser.HTMLParser` for HTML (the
page's main content when it marks one, navigation removed), regular expressions for roff man
pages and perl's pod, plain reading for text files; ``.gz`` files are decompressed with
:mod:`gzip`. Symbolic links (pages that point at other pages) are skipped.
"""

from __future__ import annotations

import gzip
import html.parser
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.text import duplicate_key

MAX_DOCUMENT_CHARS = 50_000
DEFAULT_CACHE_DIR = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                     / "efficientllm" / "debian-docs")

# Sphinx's generated pages (indexes, search) and copied sources are not prose.
_SPHINX_EXCLUDES = (r"(?:.*/)?(?:_sources|_static|_images|_downloads|_modules)/"
                    r"|(?:.*/)?(?:genindex[^/]*|search|py-modindex|modindex)\.html$")


@dataclass(frozen=True)
class DocFiles:
    """The files of one package to read: paths (inside the package) that match ``include``
    and not ``exclude``, read as ``kind`` (html, man, pod or text)."""

    include: str
    kind: str
    exclude: str | None = None


# Debian 12 (bookworm) package names. Each entry: package -> the files taken from it. Where a
# package ships the same text in two formats (HTML and its sources, pod and the man pages made
# from it, a single-page and a split manual) only one is taken.
DEBIAN_DOC_PACKAGES: dict[str, tuple[DocFiles, ...]] = {
    "linux-doc-6.1": (DocFiles(r"usr/share/doc/linux-doc-6\.1/html/.+\.html", "html",
                               exclude=_SPHINX_EXCLUDES + r"|.*/translations/"),),
    "python3.11-doc": (DocFiles(r"usr/share/doc/python3\.11/html/.+\.html", "html",
                                exclude=_SPHINX_EXCLUDES),),
    "python-django-doc": (DocFiles(r"usr/share/doc/python-django-doc/html/.+\.html", "html",
                                   exclude=_SPHINX_EXCLUDES),),
    "postgresql-doc-15": (DocFiles(r"usr/share/doc/postgresql-doc-15/html/.+\.html", "html"),),
    "perl-doc": (DocFiles(r"usr/share/perl/[^/]+/pod/.+\.pod", "pod"),
                 # core modules' documentation; man1 only repeats the pod files above
                 DocFiles(r"usr/share/man/man3/.+\.3perl\.gz", "man")),
    "manpages": (DocFiles(r"usr/share/man/man\d/.+\.gz", "man"),),
    "manpages-dev": (DocFiles(r"usr/share/man/man\d/.+\.gz", "man"),),
    "git-doc": (DocFiles(r"usr/share/doc/git-doc/.+\.html", "html"),),
    "bash-doc": (DocFiles(r"usr/share/doc/bash/bash(ref)?\.html", "html"),),
    "nodejs-doc": (DocFiles(r"usr/share/doc/nodejs/api/.+\.html", "html", exclude=r".*/all\.html$"),),
    "debian-reference-en": (DocFiles(r"usr/share/debian-reference/.+\.en\.html", "html"),),
    "debian-policy": (DocFiles(r"usr/share/doc/debian-policy/.+\.txt\.gz", "text"),),
    "developers-reference": (DocFiles(r"usr/share/developers-reference/.+\.html", "html",
                                      exclude=_SPHINX_EXCLUDES + r"|.*/developers-reference\.html$"),),
    "debian-handbook": (DocFiles(r"usr/share/doc/debian-handbook/html/en-US/.+\.html", "html"),),
    "sqlite3-doc": (DocFiles(r"usr/share/doc/sqlite3/.+\.html", "html"),),
    "python-sqlalchemy-doc": (DocFiles(r"usr/share/doc/python-sqlalchemy-doc/html/.+\.html", "html",
                                       exclude=_SPHINX_EXCLUDES),),
    "python-scipy-doc": (DocFiles(r"usr/share/doc/python-scipy-doc/html/.+\.html", "html",
                                  exclude=_SPHINX_EXCLUDES),),
    "llvm-14-doc": (DocFiles(r"usr/share/doc/llvm-14-doc/html/.+\.html", "html", exclude=_SPHINX_EXCLUDES),),
    "clang-14-doc": (DocFiles(r"usr/share/doc/clang-14/html/.+\.html", "html", exclude=_SPHINX_EXCLUDES),),
    "cmake-doc": (DocFiles(r"usr/share/doc/cmake-data/html/.+\.html", "html", exclude=_SPHINX_EXCLUDES),),
    "sphinx-doc": (DocFiles(r"usr/share/doc/sphinx-doc/html/.+\.html", "html", exclude=_SPHINX_EXCLUDES),),
    # Erlang/OTP's manuals; the Java interface's javadoc pages are mostly signatures
    "erlang-doc": (DocFiles(r"usr/share/doc/erlang-doc/.+\.html", "html", exclude=r".*/java/"),),
    "gimp-help-en": (DocFiles(r"usr/share/gimp/2\.0/help/en/.+\.html", "html"),),
}


def _print_now(line: str) -> None:
    print(line, flush=True)  # progress while a long build runs, even into a pipe


class DebianDocsError(Exception):
    """A problem with the package cache that the user can fix; the message says how."""


# --------------------------------------------------------------------------------------------
# Text extraction
# --------------------------------------------------------------------------------------------

_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
              "source", "track", "wbr"}
_BLOCK_TAGS = {"address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt",
               "figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "main", "ol",
               "p", "pre", "section", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul"}
_SKIPPED_TAGS = {"button", "footer", "form", "head", "nav", "noscript", "script", "select", "style",
                 "svg", "template", "title"}
# Navigation of the themes these packages use: sphinx (classic, read-the-docs), DocBook,
# publican, asciidoc, pydata, Django's, node.js's and SQLite's own.
_SKIPPED_CLASSES = {"headerlink", "navfooter", "navheader", "nosearch", "prev-next-area", "related",
                    "rst-versions", "sphinxsidebar", "toc", "wy-nav-side"}
_SKIPPED_IDS = {"banner", "column2", "footer", "ft", "global-nav", "gtoc", "hd", "sidebar", "toc"}
_SKIPPED_ROLES = {"navigation", "search"}


class _HTMLText(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, skips its content, is the main content)
        self._skip_depth = 0
        self._main_depth = 0
        self._pre_depth = 0
        self.saw_main = False
        self.all_parts: list[str] = []
        self.main_parts: list[str] = []

    def _emit(self, text: str) -> None:
        if self._skip_depth:
            return
        self.all_parts.append(text)
        if self._main_depth:
            self.main_parts.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self._emit("\n")
        if tag in _VOID_TAGS:
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        skip = (tag in _SKIPPED_TAGS or bool(classes & _SKIPPED_CLASSES)
                or attributes.get("id") in _SKIPPED_IDS or attributes.get("role") in _SKIPPED_ROLES)
        main = attributes.get("role") == "main" or tag == "main"
        self._stack.append((tag, skip, main))
        self._skip_depth += skip
        self._main_depth += main
        self.saw_main |= main
        self._pre_depth += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._emit("\n")
        if not any(open_tag == tag for open_tag, _, _ in self._stack):
            return  # a stray end tag
        while self._stack:  # unclosed elements inside this one end with it
            open_tag, skip, main = self._stack.pop()
            self._skip_depth -= skip
            self._main_depth -= main
            self._pre_depth -= open_tag == "pre"
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self._emit(data if self._pre_depth else re.sub(r"\s+", " ", data))


def _tidy(text: str) -> str:
    """Strip line ends and starts of filled text, and collapse runs of blank lines."""
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(markup: str) -> str:
    """The readable text of an HTML page: its main content when the page marks one
    (``role="main"`` or ``<main>``), otherwise its body, without scripts, styles and navigation."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    parts = parser.main_parts if parser.saw_main else parser.all_parts
    text = "".join(parts)
    # filled text: a block boundary leaves a leading space on the next line
    text = "\n".join(line.strip() if line.startswith(" ") and not line.startswith("    ") else line
                     for line in text.split("\n"))
    return _tidy(text)


_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "bu": "\u2022", "lq": "\u201c",
               "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "co": "\u00a9", "rg": "\u00ae",
               "tm": "\u2122", "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264",
               ">=": "\u2265", "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "hy": "-", "ti": "~",
               "ha": "^", "rs": "\\", "ga": "`", "de": "\u00b0", "pc": "\u00b7", "at": "@", "sh": "#",
               "Do": "$", "ba": "|", "fo": "\u00ab", "fc": "\u00bb", "lB": "[", "rB": "]", "lC": "{",
               "rC": "}", "sl": "/", "ru": "_", "ul": "_", "ss": "\u00df", "mc": "\u00b5"}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "": ""}
_ROFF_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_ROFF_FONT = {"B", "I", "SM", "SB", "R"}
_ROFF_BREAKS = {"PP", "LP", "P", "TP", "TQ", "HP", "SH", "SS", "IP", "sp", "br", "nf", "fi", "EX", "EE",
                "RS", "RE", "in", "TS", "TE", "UR", "UE", "MT", "ME", "INDENT", "UNINDENT", "bp"}


def _roff_inline(text: str) -> str:
    text = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", text)  # font changes
    text = re.sub(r"\\s[+-]?\d", "", text)  # size changes
    text = re.sub(r"\\\*(?:\[([^\]]*)\]|\((..)|(.))",
                  lambda m: _ROFF_STRINGS.get(m.group(1) or m.group(2) or m.group(3), ""), text)
    text = re.sub(r"\\(?:\[([^\]]*)\]|\((..))",
                  lambda m: _ROFF_CHARS.get(m.group(1) or m.group(2), ""), text)
    text = re.sub(r"\\[hvwlLbDoxXkz]'[^']*'", "", text)  # motions and other escapes with arguments
    text = re.sub(r"\\n(?:\[[^\]]*\]|\(..|.)", "", text)  # number registers
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    text = re.sub(r"\\[&|^c:%)/,0dut!]", "", text)  # zero-width and spacing escapes
    return text.replace("\\\\", "\\").replace("\\'", "'").replace("\\`", "`").replace("\\.", ".")


def _roff_arguments(rest: str) -> list[str]:
    return [a[1:-1].replace('""', '"') if a.startswith('"') else a
            for a in re.findall(r'"(?:[^"]|"")*"?|\S+', rest)]


def roff_to_text(source: str) -> str:
    """The text of a man page written in roff (the man macros): requests become paragraph
    breaks or their arguments, escapes become characters, filled lines are joined."""
    source = re.sub(r"\\\n", "", source)  # continued lines
    paragraphs: list[list[str]] = [[]]
    filled = True
    in_table_format = False

    def new_paragraph() -> None:
        if paragraphs[-1]:
            paragraphs.append([])

    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line.startswith(".\\#"):
            continue
        if in_table_format:  # tbl: the option and format lines up to the one ending in "."
            if line.rstrip().endswith("."):
                in_table_format = False
            continue
        if line.startswith((".", "'")):
            match = re.match(r"[.']\s*(\S*)\s*(.*)", line)
            macro, rest = match.group(1), match.group(2)
            if macro == "so":
                return ""  # a stub that includes another page
            if macro in _ROFF_BREAKS:
                new_paragraph()
                if macro in ("SH", "SS", "IP") and rest:
                    heading = _roff_inline(" ".join(_roff_arguments(rest)[:1] if macro == "IP"
                                                    else _roff_arguments(rest)))
                    paragraphs[-1].append(heading)
                    if macro != "IP":
                        new_paragraph()
                if macro in ("nf", "EX"):
                    filled = False
                elif macro in ("fi", "EE"):
                    filled = True
                elif macro == "TS":
                    in_table_format = True
                continue
            if macro in _ROFF_ALTERNATING or macro in _ROFF_FONT:
                joiner = "" if macro in _ROFF_ALTERNATING else " "
                text = _roff_inline(joiner.join(_roff_arguments(rest)))
                paragraphs[-1].append(text if filled else text + "\n")
            continue  # other requests (TH, ad, nh, ft, PD, de, if, ...) carry no text
        if not line.strip():
            new_paragraph()
            continue
        text = _roff_inline(line).replace("\t", " ")
        if filled:
            paragraphs[-1].append(text.strip())
        else:
            paragraphs[-1].append(text.rstrip() + "\n")
    out = []
    for paragraph in paragraphs:
        text = ""
        for piece in paragraph:
            if text and not text.endswith("\n") and not piece.startswith("\n"):
                text += " "
            text += piece
        if text.strip():
            out.append(text.rstrip())
    return _tidy("\n\n".join(out))


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(letter: str, content: str) -> str:
    if letter in "XZ":
        return ""
    if letter == "E":
        if content.isdigit():
            return chr(int(content))
        if content.lower().startswith("0x"):
            return chr(int(content, 16))
        return _POD_ESCAPES.get(content, "")
    if letter == "L":
        if "|" in content:
            return content.split("|", 1)[0]
        return content.replace('/"', " ").replace('"', "").replace("/", " ")
    return content


def _pod_inline(text: str) -> str:
    for n in range(6, 1, -1):  # C<< text >> forms, longest delimiters first
        text = re.sub(r"([A-Z])" + "<" * n + r"\s+(.*?)\s+" + ">" * n,
                      lambda m: _pod_code(m.group(1), m.group(2)), text, flags=re.S)
    while True:
        changed = re.sub(r"([A-Z])<([^<>]*)>", lambda m: _pod_code(m.group(1), m.group(2)), text)
        if changed == text:
            return text
        text = changed


def pod_to_text(source: str) -> str:
    """The text of a perl pod page: headings and items keep their text, formatting codes
    (B<>, C<>, L<>, E<>...) become their content, verbatim (indented) blocks are kept."""
    out = []
    in_pod = not source.lstrip().startswith(("#", "package", "use "))
    skipping_block = False
    for block in re.split(r"\n[ \t]*\n", source):
        if not block.strip():
            continue
        if block.startswith("="):
            command, _, rest = block[1:].partition(" ")
            command = command.strip()
            if command == "cut":
                in_pod = False
                continue
            in_pod = True
            if command == "begin":
                skipping_block = True
            elif command == "end":
                skipping_block = False
            elif command.startswith("head") or command == "item":
                rest = rest.strip()
                if rest and rest != "*":
                    out.append(_pod_inline(re.sub(r"\s+", " ", rest)))
            continue  # over, back, pod, encoding, for, and the ones above
        if not in_pod or skipping_block:
            continue
        if block[0] in " \t":
            out.append(block.rstrip())  # verbatim
        else:
            out.append(_pod_inline(re.sub(r"\s+", " ", block.strip())))
    return _tidy("\n\n".join(out))


def plain_text(source: str) -> str:
    return _tidy(source.replace("\r\n", "\n"))


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "html": html_to_text, "man": roff_to_text, "pod": pod_to_text, "text": plain_text,
}


def read_source_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    # man pages and pod predating UTF-8 are Latin-1; fall back to it rather than fail
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def split_long_text(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Cut a text into parts of at most about ``max_chars`` at paragraph (blank-line)
    boundaries; a single longer paragraph stays whole."""
    if len(text) <= max_chars:
        return [text]
    parts, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            parts.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        parts.append("\n\n".join(current))
    return parts


# --------------------------------------------------------------------------------------------
# The package cache
# --------------------------------------------------------------------------------------------


def cached_version(cache_dir: Path, package: str) -> str | None:
    """The version of ``package`` unpacked in the cache, or None when it is not there."""
    version_file = cache_dir / package / "VERSION"
    return version_file.read_text().strip() if version_file.is_file() else None


def missing_packages(cache_dir: Path, packages: list[str]) -> list[str]:
    return [p for p in packages if cached_version(cache_dir, p) is None]


def missing_packages_message(cache_dir: Path, missing: list[str]) -> str:
    names = " ".join(missing)
    return (f"the debian-docs corpus needs {len(missing)} Debian package(s) not unpacked in "
            f"{cache_dir}: {names}.\n"
            f"Add --fetch-packages to download and unpack them there (apt-get download + "
            f"dpkg-deb -x: no root needed, nothing is installed), or by hand:\n"
            f"  cd $(mktemp -d) && apt-get download {names} && for f in *.deb; do "
            f"p=$(dpkg-deb -f $f Package); mkdir -p {cache_dir}/$p && dpkg-deb -x $f {cache_dir}/$p && "
            f"dpkg-deb -f $f Version > {cache_dir}/$p/VERSION; done\n"
            f"(if apt-get cannot locate them, run apt-get update first; the names are Debian 12's)")


def fetch_packages(cache_dir: Path, packages: list[str], log: Callable[[str], None] = _print_now) -> None:
    """Download ``packages`` with ``apt-get download`` and unpack each into
    ``cache_dir/<package>/`` (with a ``VERSION`` file), atomically per package."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DebianDocsError(
                f"--fetch-packages needs {tool} (Debian or Ubuntu); it is not on PATH. On another "
                f"system, unpack the .deb files of {' '.join(packages)} into {cache_dir}/<package>/ "
                "with a VERSION file each")
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {len(packages)} Debian documentation package(s) with apt-get download into "
        f"{cache_dir} (nothing is installed): {' '.join(packages)}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        result = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise DebianDocsError(
                f"apt-get download {' '.join(packages)} failed:\n{result.stderr.strip()}\n"
                "If a package cannot be located, run apt-get update (as root) first; the package "
                "names are Debian 12's (bookworm)")
        for deb in sorted(Path(tmp).glob("*.deb")):
            fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"],
                                    capture_output=True, text=True, check=True).stdout
            info = dict(line.split(": ", 1) for line in fields.strip().splitlines())
            package, version = info["Package"], info["Version"]
            unpacked = Path(tmp) / f"{package}.unpacked"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
            (unpacked / "VERSION").write_text(version + "\n")
            target = cache_dir / package
            if target.exists():
                shutil.rmtree(target)
            os.replace(unpacked, target)
            log(f"  {package} {version}")
    still_missing = missing_packages(cache_dir, packages)
    if still_missing:
        raise DebianDocsError(f"apt-get download did not deliver {' '.join(still_missing)}")


def package_files(cache_dir: Path, package: str, rules: tuple[DocFiles, ...]) -> list[tuple[str, str]]:
    """(path inside the package, kind) of the files to read, sorted; symbolic links skipped."""
    root = cache_dir / package
    chosen = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            relative = path.relative_to(root).as_posix()
            for rule in rules:
                if re.fullmatch(rule.include, relative) and not (
                        rule.exclude and re.match(rule.exclude, relative)):
                    chosen.append((relative, rule.kind))
                    break
    return sorted(chosen)


def debian_doc_documents(
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    min_chars: int = 200,
    packages: dict[str, tuple[DocFiles, ...]] | None = None,
    seen: set[str] | None = None,
    log: Callable[[str], None] = _print_now,
) -> Iterator[dict]:
    """Documents ``{"text", "source"}`` of the packages unpacked in ``cache_dir``, in a fixed
    order; ``source`` is ``package:path`` (``#k`` for the k-th part of a long one). Raises
    :class:`DebianDocsError` when a package is missing or yields no document."""
    cache_dir = Path(cache_dir)
    packages = DEBIAN_DOC_PACKAGES if packages is None else packages
    seen = set() if seen is None else seen
    missing = missing_packages(cache_dir, list(packages))
    if missing:
        raise DebianDocsError(missing_packages_message(cache_dir, missing))
    for package, rules in packages.items():
        n_docs = n_chars = 0
        for relative, kind in package_files(cache_dir, package, rules):
            text = EXTRACTORS[kind](read_source_file(cache_dir / package / relative))
            parts = split_long_text(text)
            for k, part in enumerate(parts):
                if len(part) < min_chars:
                    continue
                digest = duplicate_key(part)
                if digest in seen:
                    continue
                seen.add(digest)
                n_docs += 1
                n_chars += len(part)
                yield {"text": part, "source": f"{package}:{relative}" + (f"#{k}" if len(parts) > 1 else "")}
        if n_docs == 0:
            raise DebianDocsError(
                f"package {package} {cached_version(cache_dir, package)} in {cache_dir / package} gave no "
                "document: its files are not where this version of data_prep.debian_docs expects them "
                "(a different Debian release?). Delete that folder and fetch again, or fix the rule in "
                "DEBIAN_DOC_PACKAGES")
        log(f"  {package} {cached_version(cache_dir, package)}: {n_docs} documents, "
            f"{n_chars / 1e6:.1f} M characters")
