"""What of JSON Schema xgrammar compiles but would not enforce, found before a schema is compiled: its outputs
would break the schema (or not be JSON) with finish_reason stop, so such schemas are refused with where and what,
as vLLM's xgrammar backend refuses some of them. Plain Python over the schema's dicts: no xgrammar here.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

# JSON Schema keywords xgrammar compiles but does not enforce (its outputs break them: [2, 2] under uniqueItems,
# {"v": 3} under not), refused rather than broken silently, as vLLM's xgrammar backend refuses them.
UNENFORCED = ("contains", "minContains", "maxContains", "uniqueItems", "patternProperties", "propertyNames",
              "dependentSchemas", "dependentRequired", "not", "if", "then", "else", "unevaluatedItems",
              "unevaluatedProperties")
SCHEMA_MAPS = ("properties", "$defs", "definitions")  # their values are schemas (their keys are names)
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems")
ANNOTATIONS = frozenset({"$ref", "$defs", "definitions", "$schema", "$id", "$comment", "title", "description",
                         "default", "examples", "deprecated", "readOnly", "writeOnly"})
STRING_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                            "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})


# What a JSON string may not hold unescaped: a string's `pattern` becomes its grammar as it is, so a pattern that
# can match one of these would make output that is not JSON ({"s": "a"b"}) and is refused
JSON_ESCAPED = frozenset({ord('"'), ord("\\")} | set(range(0x20)))
# What of JSON_ESCAPED each class escape matches (the rest matches none of it: \d, \w)
CATEGORY_ESCAPED = {"CATEGORY_SPACE": frozenset(range(0x09, 0x0e)) | {0x1c, 0x1d, 0x1e, 0x1f},
                    "CATEGORY_NOT_DIGIT": JSON_ESCAPED, "CATEGORY_NOT_WORD": JSON_ESCAPED,
                    "CATEGORY_NOT_SPACE": JSON_ESCAPED - set(range(0x09, 0x0e)) - {0x1c, 0x1d, 0x1e, 0x1f}}


def _escaped_matches(pattern: str) -> bool:
    """Whether `pattern` (a regular expression, as Python's re reads it) can match a character that JSON
    escapes in strings (JSON_ESCAPED): any character (.), a negated class that keeps one, or one named."""
    from re import _parser

    def in_set(items) -> set[int]:
        found = set()
        for op, value in items:
            if str(op) == "LITERAL":
                found |= {value} & JSON_ESCAPED
            elif str(op) == "RANGE":
                found |= {c for c in JSON_ESCAPED if value[0] <= c <= value[1]}
            elif str(op) == "CATEGORY":
                found |= CATEGORY_ESCAPED.get(str(value), set())
        return found

    def walk(nodes) -> bool:
        for op, value in nodes:
            name = str(op)
            if name in ("ANY", "NOT_LITERAL") or name == "LITERAL" and value in JSON_ESCAPED:
                return True
            if name == "IN":
                negated = bool(value) and str(value[0][0]) == "NEGATE"
                found = in_set(value[1:] if negated else value)
                if (found != JSON_ESCAPED) if negated else found:
                    return True
            elif name == "SUBPATTERN" and walk(value[3]) or name == "BRANCH" and any(walk(b) for b in value[1]):
                return True
            elif name in ("MAX_REPEAT", "MIN_REPEAT") and value[1] > 0 and walk(value[2]):
                return True
        return False

    try:
        return walk(_parser.parse(pattern))
    except (re.error, RecursionError):
        return False  # (xgrammar says what is wrong with it)


# How deep a schema may nest (as JSON): arrays nested 900 deep, 22 KB, took xgrammar 38 s to compile
MAX_SCHEMA_DEPTH = 64


def nesting_depth(value: Any) -> int:
    """How many lists and objects deep a JSON value nests (0 for a scalar), without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            level.extend((child, depth + 1) for child in children)
    return deepest


def unenforced(schema: object, at: str = "#", root: object = None) -> str | None:
    """Where and what of the first constraint in `schema` that xgrammar would not enforce, or None: the
    UNENFORCED keywords, allOf of several schemas, constraints beside a $ref, a $ref outside the schema,
    multipleOf on non-integers, formats it does not know, a string's pattern or format together with length
    bounds (its grammar keeps the one and drops the other), a pattern that can match what JSON escapes,
    required properties that additionalProperties false leaves out, and oneOf branches one value may meet
    (xgrammar enforces oneOf as anyOf). `root` is the whole schema, which local $refs point into."""
    root = schema if root is None else root
    if isinstance(schema, list):
        return next((found for i, item in enumerate(schema) if (found := unenforced(item, f"{at}/{i}", root))), None)
    if not isinstance(schema, dict):
        return None
    types = schema.get("type")
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    problem = next((f"`{key}`" for key in UNENFORCED if key in schema), None)
    if problem is None and isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        problem = "`allOf` of several schemas"
    if problem is None and "$ref" in schema and set(schema) - ANNOTATIONS:
        problem = f"`{sorted(set(schema) - ANNOTATIONS)[0]}` beside `$ref`"
    if problem is None and "multipleOf" in schema and types != {"integer"}:
        problem = "`multipleOf` on other than integers"
    if problem is None and "format" in schema and schema["format"] not in STRING_FORMATS:
        problem = f"format `{schema['format']}`"
    if problem is None and ({"pattern", "format"} & set(schema)) and ({"minLength", "maxLength"} & set(schema)):
        problem = "a string's length bounds beside its pattern or format"
    if problem is None and isinstance(schema.get("pattern"), str) and _escaped_matches(schema["pattern"]):
        problem = ("a `pattern` that can match a quote, a backslash or a control character (written into the JSON "
                   "string unescaped; exclude them, e.g. [^\"\\\\\\x00-\\x1f] for .)")
    if problem is None and isinstance(schema.get("$ref"), str) and not schema["$ref"].startswith("#"):
        problem = f"`$ref` {schema['$ref']} outside the schema"
    if problem is None and schema.get("additionalProperties") is False and isinstance(schema.get("required"), list):
        missing = [name for name in schema["required"] if name not in (schema.get("properties") or {})]
        if missing:
            problem = f"required `{missing[0]}` that additionalProperties false leaves out"
    if problem is None and isinstance(schema.get("oneOf"), list) and \
            (pair := _overlapping_branches(schema["oneOf"], root)) is not None:
        problem = (f"`oneOf` branches {pair[0]} and {pair[1]} that one value may meet both of (it is enforced as "
                   "anyOf: use anyOf, or tell the branches apart by type, a const property or number bounds)")
    if problem is not None:
        return f"{problem} (at {at})"
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            found = next((found for name, sub in value.items() if (found := unenforced(sub, f"{at}/{key}/{name}", root))),
                         None)
        elif key in SCHEMA_LISTS or key in SCHEMA_VALUES:
            found = unenforced(value, f"{at}/{key}", root)
        else:
            continue
        if found:
            return found
    return None


JSON_TYPES = frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})
MAX_DEPTH = 16  # how deep the disjointness test follows properties and references before it says "may overlap"


def _resolved(schema: object, root: object) -> object:
    """`schema`, or what its local `$ref` points to (followed to a schema without one; a cycle or a missing
    target gives True, any value, which xgrammar refuses in its own words)."""
    seen: set[str] = set()
    while isinstance(schema, dict) and isinstance(ref := schema.get("$ref"), str) and ref.startswith("#"):
        if ref in seen:
            return True
        seen.add(ref)
        schema = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(schema, dict) or part not in schema:
                return True
            schema = schema[part]
    return schema


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if float(value).is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "object")


def _values(schema: dict) -> list[Any] | None:
    """The values `const` or `enum` allows, or None where they do not bound them."""
    if "const" in schema:
        return [schema["const"]]
    return schema["enum"] if isinstance(schema.get("enum"), list) else None


def _value_key(value: Any) -> str:
    """Equal for values JSON Schema calls equal (1 and 1.0, within lists and objects too; not 1 and true)."""
    def plain(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [plain(item) for item in v]
        return {key: plain(item) for key, item in v.items()} if isinstance(v, dict) else v
    return json.dumps(plain(value), sort_keys=True)


def _types(schema: object, root: object, depth: int) -> frozenset[str]:
    """The JSON types a value of `schema` may have ("integer" within "number": a number's branch takes both)."""
    schema = _resolved(schema, root)
    if schema is False:
        return frozenset()
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return JSON_TYPES
    declared = schema.get("type", list(JSON_TYPES))
    types = {declared} if isinstance(declared, str) else set(declared) if isinstance(declared, list) else JSON_TYPES
    if "number" in types:
        types |= {"integer"}
    if (values := _values(schema)) is not None:
        types &= {_json_type(v) for v in values}
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            types &= set().union(*(_types(branch, root, depth + 1) for branch in schema[key]))
    return frozenset(types & JSON_TYPES)


def _interval(schema: dict) -> tuple[float, bool, float, bool]:
    """A number schema's bounds: lowest, whether it is excluded, highest, whether it is excluded."""
    low, low_open, high, high_open = -math.inf, False, math.inf, False
    for key, sign in (("minimum", 1), ("exclusiveMinimum", 1), ("maximum", -1), ("exclusiveMaximum", -1)):
        bound = schema.get(key)
        if isinstance(bound, bool):  # draft 4: exclusiveMinimum true makes minimum exclusive
            if bound and sign > 0:
                low_open = True
            elif bound:
                high_open = True
        elif isinstance(bound, (int, float)):
            exclusive = key.startswith("exclusive")
            if sign > 0 and (bound > low or bound == low and exclusive):
                low, low_open = bound, exclusive or low_open and bound == low
            elif sign < 0 and (bound < high or bound == high and exclusive):
                high, high_open = bound, exclusive or high_open and bound == high
    return low, low_open, high, high_open


def _apart(first: dict, second: dict) -> bool:
    """Whether two number schemas' bounds leave no number to both."""
    low_a, low_a_open, high_a, high_a_open = _interval(first)
    low_b, low_b_open, high_b, high_b_open = _interval(second)
    return (high_a < low_b or high_a == low_b and (high_a_open or low_b_open)
            or high_b < low_a or high_b == low_a and (high_b_open or low_a_open))


def _properties(schema: dict) -> dict:
    return schema["properties"] if isinstance(schema.get("properties"), dict) else {}


def _required(schema: dict) -> set[str]:
    names = schema.get("required")
    return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()


def _cannot_meet(made: dict, other: dict, root: object, depth: int) -> bool:
    """Whether no object the grammar of `made` writes meets `other`. xgrammar's strict mode writes only declared
    properties where additionalProperties is left out; `other` is read as JSON Schema reads it."""
    made_properties, other_properties = _properties(made), _properties(other)
    if any(_disjoint(made_properties[name], other_properties[name], root, depth + 1)
           for name in _required(made) & _required(other) & set(made_properties) & set(other_properties)):
        return True  # a discriminator: a property both require, its values apart (a const each)
    if made.get("additionalProperties", False) is False and _required(other) - set(made_properties):
        return True
    return other.get("additionalProperties") is False and bool(_required(made) - set(other_properties))


def _disjoint(first: object, second: object, root: object, depth: int = 0) -> bool:
    """Whether no value the grammar of either schema writes meets the other, as far as told by their types,
    const and enum values, number bounds and object properties; False (they may overlap) where that does not tell."""
    first, second = _resolved(first, root), _resolved(second, root)
    if first is False or second is False:
        return True
    shared = _types(first, root, depth) & _types(second, root, depth)
    if not shared:
        return True
    if not isinstance(first, dict) or not isinstance(second, dict) or depth > MAX_DEPTH:
        return False
    values = _values(first), _values(second)
    if values[0] is not None and values[1] is not None:
        return not {_value_key(v) for v in values[0]} & {_value_key(v) for v in values[1]}
    if shared <= {"integer", "number"}:
        return _apart(first, second)
    if shared == {"object"}:
        return _cannot_meet(first, second, root, depth) and _cannot_meet(second, first, root, depth)
    return False


def _overlapping_branches(branches: list, root: object) -> tuple[int, int] | None:
    """The first two branches of a oneOf that one value may meet both of, or None."""
    return next(((i, j) for i in range(len(branches)) for j in range(i + 1, len(branches))
                 if not _disjoint(branches[i], branches[j], root)), None)
