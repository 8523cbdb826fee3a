"""One spelling of every message: the library writes its advice in Python (``weights='FILE'``,
``load_model('random:NAME')``), and the command line shows the same message in its own syntax (``--weights FILE``,
``random:NAME``) through :func:`cli_syntax`. A message is therefore written once, in Python spelling, and reads
right in both places; ``ModelError.cli`` and ``python -m qklib`` apply the table below."""

from __future__ import annotations

import re

__all__ = ["cli_syntax"]

_END = r"(?=[\s,;:)]|$)"  # an option named without a value: "part= selects", "or weights=, not both"

# Python spellings in library messages -> the command line's, in order.
_CLI_SYNTAX = [
    (re.compile(r"\ballow_partial=True"), "--allow-partial"),
    (re.compile(r"\bresume=True"), "--resume"),
    (re.compile(r"\bcheckpoint=PATH"), "--checkpoint PATH"),
    (re.compile(r"\bshard='([^']*)'"), r"--shard \1"),
    (re.compile(r"\bload_model\('([^']*)', weights='([^']*)'\)"), r"python -m qklib cosine \1 --weights \2"),
    (re.compile(r"\bload_model\(weights='([^']*)'\)"), r"--weights \1 alone"),
    (re.compile(r"\bload_model\('(random:[^']*)'\)"), r"\1"),
    (re.compile(r"\bweights='([^']*)'"), r"--weights \1"),
    (re.compile(r"\bweights=([A-Z][A-Z_]*)\b"), r"--weights \1"),
    (re.compile(r"\bweights=" + _END), "--weights"),
    (re.compile(r"\bpart='([^']*)'"), r"--part \1"),
    (re.compile(r"\bpart=" + _END), "--part"),
    (re.compile(r"\bname=" + _END), "--model"),
    (re.compile(r"\bqklib\.random_control\('([^']*)'\)"), r"'python -m qklib cosine \1 --random-init'"),
]


def cli_syntax(message: str) -> str:
    """A library message with its Python spellings (``weights='FILE'``, ``allow_partial=True``...) in
    command-line syntax (``--weights FILE``, ``--allow-partial``)."""
    for pattern, replacement in _CLI_SYNTAX:
        message = pattern.sub(replacement, message)
    return message
