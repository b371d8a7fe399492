"""Backward-compatibility check between two versions of a JSON Schema.

The rule (what a consumer written for version N+1 needs to still read version N data, and what
partners may rely on): a new version may **add optional fields** and **relax constraints**. It may
not remove a field, change a field's type, add a required field, or make an optional field
required. :func:`breaking_changes` lists what violates the rule; an empty list means compatible.
"""

from __future__ import annotations

from typing import Any

_CONSTRAINTS_THAT_TIGHTEN_UPWARD = ("minimum", "exclusiveMinimum", "minLength", "minItems")
_CONSTRAINTS_THAT_TIGHTEN_DOWNWARD = ("maximum", "exclusiveMaximum", "maxLength", "maxItems")


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _resolve(schema, schema["$defs"][ref.removeprefix("#/$defs/")])
    return node


def _types(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    """The set of JSON types (with formats and const/enum values) a node admits."""
    node = _resolve(schema, node)
    if "anyOf" in node:
        return set().union(*(_types(schema, option) for option in node["anyOf"]))
    kind = node.get("type", "any")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if "format" in node:
        kinds = {f"{k}:{node['format']}" for k in kinds}
    if "const" in node:
        kinds = {f"{k}={node['const']!r}" for k in kinds}
    if "enum" in node:
        kinds = {f"{k}={v!r}" for k in kinds for v in node["enum"]}
    return kinds


def breaking_changes(old: dict[str, Any], new: dict[str, Any], path: str = "") -> list[str]:
    """Why ``new`` is not a backward-compatible successor of ``old`` (empty: it is)."""
    problems: list[str] = []
    old_props: dict[str, Any] = old.get("properties", {})
    new_props: dict[str, Any] = new.get("properties", {})
    old_required = set(old.get("required", []))
    new_required = set(new.get("required", []))
    for name in old_props:
        where = f"{path}{name}"
        if name not in new_props:
            problems.append(f"{where}: removed")
            continue
        old_node, new_node = _resolve(old, old_props[name]), _resolve(new, new_props[name])
        # Nested objects are compared field by field; a new accepted type is a relaxation.
        if "properties" in old_node and "properties" in new_node:
            problems += breaking_changes(
                {**old_node, "$defs": old.get("$defs", {})},
                {**new_node, "$defs": new.get("$defs", {})},
                path=f"{where}.",
            )
        else:
            lost = _types(old, old_node) - _types(new, new_node)
            if lost and _types(new, new_node) != {"any"}:
                problems.append(f"{where}: no longer accepts {sorted(lost)}")
        for key in _CONSTRAINTS_THAT_TIGHTEN_UPWARD:
            if key in new_node and new_node[key] > old_node.get(key, float("-inf")):
                problems.append(f"{where}: {key} tightened to {new_node[key]}")
        for key in _CONSTRAINTS_THAT_TIGHTEN_DOWNWARD:
            if key in new_node and new_node[key] < old_node.get(key, float("inf")):
                problems.append(f"{where}: {key} tightened to {new_node[key]}")
        if "pattern" in new_node and new_node.get("pattern") != old_node.get("pattern"):
            problems.append(f"{where}: pattern changed")
    for name in sorted(new_required - old_required):
        if name in old_props:
            problems.append(f"{path}{name}: optional field made required")
        else:
            problems.append(f"{path}{name}: new required field")
    return problems
