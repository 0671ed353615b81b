"""Reading the JSON Holdfast sends, field by field, with types checked.

Every reader takes only the fields it knows and ignores the rest, so a server
that adds fields (``schema_version``, say) never breaks an older client. A
field that is missing or of the wrong type raises :class:`ProtocolError`
naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import ProtocolError

JsonObject = Mapping[str, Any]


def loads_object(body: bytes | str, what: str) -> JsonObject:
    """Parse ``body`` as one JSON object."""
    try:
        value = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value


def obj(d: JsonObject, key: str) -> JsonObject:
    value = d.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"field `{key}` is missing or not an object")
    return value


def opt_obj(d: JsonObject, key: str) -> JsonObject | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"field `{key}` is not an object")
    return value


def string(d: JsonObject, key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"field `{key}` is missing or not a string")
    return value


def opt_string(d: JsonObject, key: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"field `{key}` is not a string")
    return value


def integer(d: JsonObject, key: str, default: int | None = None) -> int:
    value = d.get(key)
    if value is None and default is not None:
        return default
    # bool is an int in Python; JSON true is not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"field `{key}` is missing or not an integer")
    return value


def opt_integer(d: JsonObject, key: str) -> int | None:
    if d.get(key) is None:
        return None
    return integer(d, key)


def boolean(d: JsonObject, key: str) -> bool:
    value = d.get(key)
    if not isinstance(value, bool):
        raise ProtocolError(f"field `{key}` is missing or not a boolean")
    return value


def objects(d: JsonObject, key: str) -> list[JsonObject]:
    """A list of objects; an absent field is an empty list."""
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ProtocolError(f"field `{key}` is not a list of objects")
    return value


def strings(d: JsonObject, key: str) -> tuple[str, ...]:
    """A list of strings; an absent field is empty."""
    value = d.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"field `{key}` is not a list of strings")
    return tuple(value)
