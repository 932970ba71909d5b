"""Text helpers: missing values, UTF-8 checks, printable and GX-safe text, type names, prompt ids.

Files are read with surrogateescape, so text may hold lone surrogates standing for bytes that are
not UTF-8. These helpers tell such text apart, show it (as \\xNN escapes) and make it safe for GX.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd


def is_missing(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return False


def is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(text: str) -> str:
    """Text safe to print and to encode as UTF-8: undecodable bytes read with surrogateescape
    show as \\xNN, other lone surrogates as \\udNNN."""
    if is_valid_utf8(text):
        return text
    return text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace") \
        .decode("utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    # surrogateescape can encode only U+DC80..U+DCFF (the bytes 0x80..0xFF it decoded).
    return all(not (0xD800 <= ord(c) <= 0xDFFF) or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def clean(text: str) -> str:
    """UTF-8-clean text of the same length for GX: each lone surrogate becomes U+FFFD."""
    if is_valid_utf8(text):
        return text
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def show(value, limit: int = 40) -> str:
    if isinstance(value, str):
        text = printable(value)
        text = text if len(text) <= limit else text[:limit] + "..."
        # Quoted, not repr(): repr would double the backslash of a \xNN byte escape.
        return f"'{text}'"
    return printable(repr(value))[:limit]


def type_name(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "array"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return type(value).__name__


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "surrogatepass")).hexdigest()


def prompt_id_for(text: str) -> str:
    """Deterministic prompt id from the prompt text (the same text gets the same id in every file)."""
    return f"p-{_text_hash(text)[:12]}"
