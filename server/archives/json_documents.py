"""JSON read from tenants' archives (safetensors headers, config.json) under budgets.

Python's json module accepts documents that are valid yet hostile: integers of thousands
of digits (slow to convert, and refused past 4300 digits with a ValueError), nesting deep
enough to exhaust the recursion limit, invalid UTF-8. Each of those becomes an
`InvalidArchive` naming the member, never an internal error.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from server.errors import InvalidArchive

MAX_JSON_DEPTH = 32
"""Deepest nesting accepted (safetensors headers need 3; config files rarely pass 6)."""
MAX_INTEGER_DIGITS = 24
"""Longest integer literal accepted (an int64 has 19 digits)."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer has more than {MAX_INTEGER_DIGITS} digits")
    return int(text)


_DECODER = json.JSONDecoder(parse_int=_bounded_int)


def parse_json_object(data: bytes, *, member: str, check: str) -> dict[str, Any]:
    """The JSON object in `data`; InvalidArchive(check=...) naming `member` otherwise."""
    try:
        text = data.decode("utf-8")
        document = _DECODER.decode(text)
    except UnicodeDecodeError:
        _refuse(member, check, "is not UTF-8 text")
    except RecursionError:
        _refuse(member, check, f"nests deeper than {MAX_JSON_DEPTH} levels")
    except ValueError as error:  # JSONDecodeError and our digit limit
        reason = str(error).split(":")[0] if isinstance(error, json.JSONDecodeError) else str(error)
        _refuse(member, check, f"is not valid JSON ({reason})")
    if not isinstance(document, dict):
        _refuse(member, check, "is not a JSON object")
    if _depth(document) > MAX_JSON_DEPTH:
        _refuse(member, check, f"nests deeper than {MAX_JSON_DEPTH} levels")
    return document


def _depth(document: Any) -> int:
    """Nesting depth, iteratively (no recursion for a tenant to exhaust)."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        value, level = pending.pop()
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        pending.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _refuse(member: str, check: str, why: str) -> NoReturn:
    raise InvalidArchive(f"{member} {why}", check=check, member=member)
