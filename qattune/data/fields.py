"""Text out of a dataset row: nulls and values that are not text are refused, never trained as "None"."""

from __future__ import annotations

from typing import Any

from qattune.errors import QattuneError


def text_of(value: Any, where: str) -> str:
    """`value` as text: a string as is, a number written out; null, a list or a mapping refused.

    `where` names the place, e.g. "dataset 'a.jsonl' row 3 column 'output'".
    """
    if value is None:
        raise QattuneError(f"{where} is null; fill it in or remove the row")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise QattuneError(f"{where} holds a {type(value).__name__}, not text; fix the row")
    return str(value)


def content_text(content: Any, where: str) -> str:
    """An OpenAI message's `content`: a string, or a list of content parts whose text parts are joined
    (as torchtune does); a part of another type (an image, audio) is refused."""
    if not isinstance(content, list):
        return text_of(content, f"{where} content")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise QattuneError(f"{where} content part {index} has type {kind!r}; only text parts can be "
                               "trained on (remove the other parts, or the row)")
        texts.append(text_of(part.get("text"), f"{where} content part {index} text"))
    return "".join(texts)


def column_text(row: dict[str, Any], column: str, where: str, optional: bool = False) -> str:
    """The text in `row[column]` (`where` names the row); with `optional`, null is the empty string."""
    value = row[column]
    if value is None and optional:
        return ""
    return text_of(value, f"{where} column {column!r}")
