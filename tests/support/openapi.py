"""Checks JSON bodies against the public API's published OpenAPI schemas (tests/contract).

A small validator for the parts of JSON Schema those documents use: $ref, anyOf, type,
enum, required, properties, items, minimum, maximum.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

CONTRACT_DIR = Path(__file__).resolve().parent.parent / "contract"

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


@cache
def _document(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CONTRACT_DIR / f"{name}.openapi.yaml").read_text())
    return loaded


def schema_errors(document: str, schema_name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks components.schemas[schema_name] of the document."""
    components = _document(document)["components"]["schemas"]
    return _check(instance, components[schema_name], components, "$")


def _check(value: Any, schema: dict[str, Any], components: dict[str, Any], path: str) -> list[str]:
    if "$ref" in schema:
        return _check(value, components[schema["$ref"].rsplit("/", 1)[-1]], components, path)
    if "anyOf" in schema:
        if any(not _check(value, option, components, path) for option in schema["anyOf"]):
            return []
        return [f"{path}: {value!r} matches none of {schema['anyOf']}"]
    errors: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        allowed = _TYPES[expected]
        if not isinstance(value, allowed) or (expected in ("number", "integer") and isinstance(value, bool)):
            return [f"{path}: {value!r} is not of type {expected}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path}: {value} < minimum {schema['minimum']}")
    if "maximum" in schema and isinstance(value, (int, float)) and value > schema["maximum"]:
        errors.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        for required in schema.get("required", []):
            if required not in value:
                errors.append(f"{path}: missing required {required!r}")
        for name, subschema in schema.get("properties", {}).items():
            if name in value:
                errors.extend(_check(value[name], subschema, components, f"{path}.{name}"))
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors.extend(_check(item, schema["items"], components, f"{path}[{index}]"))
    return errors
