"""The one rule for a text a retro-serve request carries (a lookup's texts, a generation's
prompts): visible characters, valid Unicode, at most ``max_chars``; each failure is one line naming
the field, which the endpoints return as a 4xx."""

from __future__ import annotations

from chunk_store.chunk.text_files import visible


def checked_text(text: str, where: str, max_chars: int) -> str:
    """``text`` if it is acceptable, else ValueError naming ``where`` (e.g. ``texts[2]``)."""
    if not visible(text):
        raise ValueError(f"{where} is empty (no visible characters)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode (a lone surrogate at {e.start})") from None
    if len(text) > max_chars:
        raise ValueError(f"{where} has {len(text)} characters, the limit is {max_chars}")
    return text
