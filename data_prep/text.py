"""Text normalisation shared by the corpus builders (``build_corpus``, ``debian_docs``).

Documents are deduplicated exactly after whitespace normalisation: two documents that differ only
in spacing, line breaks or indentation are one document, whichever source gives them.
"""

from __future__ import annotations

import hashlib
import re


def normalise_whitespace(text: str) -> str:
    """``text`` with every run of whitespace one space, and none at either end."""
    return re.sub(r"\s+", " ", text).strip()


def duplicate_key(text: str) -> str:
    """The key under which a document counts as a duplicate of another (sha1 of its normalised text)."""
    return hashlib.sha1(normalise_whitespace(text).encode("utf-8")).hexdigest()
