"""An English text corpus that every Python install carries: the help topics of ``pydoc_data.topics``.

The standard library ships the language reference's prose for ``help()`` (79 topics, about 65,000 words in
Python 3.11); it needs no download and no licence beyond Python's. Its text changes between Python versions,
so a result on it names the version (``CORPUS_SOURCE``). Code listings, grammar rules and headings are left out:
a snippet is prose, whole sentences of one paragraph.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from pydoc_data.topics import topics

__all__ = ["CORPUS_SOURCE", "Snippet", "pydoc_corpus", "split_sentences"]

CORPUS_SOURCE = f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor})"
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) before a space and a capital or an opener;
# "e.g. the" and "3.11" stay whole.
_BOUNDARY = re.compile(r"(?<=[.!?])([\"')\]]?)\s+(?=[A-Z\"'(\[])")
_RULE = re.compile(r"^[*=\-~^]{3,}$")


@dataclass(frozen=True)
class Snippet:
    """``text``: consecutive whole ``sentences`` of one prose paragraph of help topic ``topic``, joined by spaces."""

    topic: str
    text: str
    sentences: tuple[str, ...]


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences at ``.``, ``!`` or ``?`` followed by whitespace and a capital (or an opening
    quote or bracket), whitespace collapsed. A rule-based splitter: abbreviations before a capital split too."""
    flat = " ".join(text.split())
    if not flat:
        return []
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(flat):
        pieces.append(flat[start:match.start() + len(match.group(1))])
        start = match.end()
    pieces.append(flat[start:])
    return [piece.strip() for piece in pieces if piece.strip()]


def _prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of a help topic that are prose: not indented (code, grammar, tables), not a heading
    (a line followed by a rule of ``*``/``=``/``-``), at least one sentence end."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        indented = any(line.startswith((" ", "\t")) for line in lines)
        if not lines or indented or any(_RULE.match(line.strip()) for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if re.search(r"[.!?][\"')\]]?$", paragraph) and ">>>" not in paragraph:
            found.append(paragraph)
    return found


def pydoc_corpus(max_words: int = 60, min_words: int = 8) -> list[Snippet]:
    """The prose of ``pydoc_data.topics`` as snippets, in topic order then text order (deterministic).

    Each snippet holds as many consecutive sentences of one paragraph as fit in ``max_words`` whitespace words
    (a longer sentence is a snippet by itself); snippets under ``min_words`` words are dropped. Sized for a BERT
    window: 60 words are about 80-100 WordPiece tokens."""
    if max_words < 1 or min_words < 0:
        raise ValueError(f"max_words must be >= 1 and min_words >= 0, got {max_words} and {min_words}")
    snippets = []
    for topic in sorted(topics):
        for paragraph in _prose_paragraphs(topics[topic]):
            group: list[str] = []
            for sentence in split_sentences(paragraph):
                if group and len(" ".join(group + [sentence]).split()) > max_words:
                    snippets.append(Snippet(topic, " ".join(group), tuple(group)))
                    group = []
                group.append(sentence)
            if group:
                snippets.append(Snippet(topic, " ".join(group), tuple(group)))
    return [snippet for snippet in snippets if len(snippet.text.split()) >= min_words]
