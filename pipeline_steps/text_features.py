"""Text helpers shared by the scikit-learn baselines and the neural wide branch (no torch here).

The clean `text` column is "<product name>. <description>"; the listing title is what sellers
choose most carefully, so both TF-IDF models give it a vectoriser of its own.
"""

from __future__ import annotations

from collections.abc import Iterable


def text_title(text: str, max_chars: int = 120) -> str:
    """The first sentence of a clean `text` (= name + ". " + description): the listing title."""
    head = text.split(". ", 1)[0]
    return head[:max_chars]


def text_titles(texts: Iterable[str]) -> list[str]:
    """`text_title` of each text; a module-level function so a fitted scikit-learn pipeline pickles."""
    return [text_title("" if text is None else str(text)) for text in texts]
