"""JSON Schema coverage of constrained decoding on the embedded model: 34 schemas (patterns, formats, numeric
bounds, enums, nested arrays of objects, ``$ref``, ``anyOf``, ``additionalProperties: false``, ...), five outputs
each at temperature 1.0, all generated in one batch through the engine; every output must parse and validate
with ``jsonschema`` (formats checked too)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

import phi4flash
from phi4flash import GenerationConfig
from phi4flash.constrained import constraint_for

SAMPLES = 5
MAX_NEW_TOKENS = 96


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            **extra}


ADDRESS = _object({"street": {"type": "string", "maxLength": 30}, "city": {"type": "string", "maxLength": 20},
                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, additionalProperties=False)
SCHEMAS: dict[str, Any] = {
    "integer": {"type": "integer"},
    "bounded integer": {"type": "integer", "minimum": 10, "maximum": 99},
    "exclusive number": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "multiple of 5": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "bounded string": {"type": "string", "minLength": 3, "maxLength": 8},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
    "date": {"type": "string", "format": "date"},
    "email": {"type": "string", "format": "email"},
    "uuid": {"type": "string", "format": "uuid"},
    "enum": {"enum": ["red", "green", "blue"]},
    "mixed enum": {"enum": [1, "two", None, True]},
    "const": {"const": {"version": 2}},
    "type list": {"type": ["string", "integer"]},
    "person": _object({"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 130}},
                      additionalProperties=False),
    "optional keys": _object({"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
                             required=[]),
    "open object": _object({"id": {"type": "integer"}}),
    "map of integers": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "array of integers": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    "tuple": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False,
              "minItems": 2},
    "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
               "maxItems": 3},
    "array of objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": _object(
        {"sku": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}, "qty": {"type": "integer", "minimum": 1}},
        additionalProperties=False)},
    "nested three levels": _object({"a": _object({"b": _object({"c": {"type": "string", "maxLength": 10}})})}),
    "$ref": {**_object({"home": {"$ref": "#/$defs/Address"}, "work": {"$ref": "#/$defs/Address"}}),
             "$defs": {"Address": ADDRESS}},
    "recursive $ref": {"$ref": "#/$defs/Node", "$defs": {"Node": _object(
        {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"},
                                                    "maxItems": 2}}, additionalProperties=False)}},
    "anyOf nullable": _object({"note": {"anyOf": [{"type": "string", "maxLength": 15}, {"type": "null"}]}}),
    "anyOf objects": {"anyOf": [_object({"cat": {"type": "string"}}, additionalProperties=False),
                                _object({"dog": {"type": "integer"}}, additionalProperties=False)]},
    "oneOf by type": {"oneOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}]},
    "allOf": {"allOf": [_object({"a": {"type": "integer"}}), _object({"b": {"type": "boolean"}})]},
    "booking": _object({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                        "day": {"type": "string", "format": "date"},
                        "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                        "price": {"type": "number", "minimum": 0, "maximum": 10000},
                        "status": {"enum": ["new", "paid", "cancelled"]}}, additionalProperties=False),
    "order": {**_object({"customer": {"type": "string", "maxLength": 20},
                         "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1,
                                   "maxItems": 2},
                         "ship_to": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]}},
                        additionalProperties=False),
              "$defs": {"Address": ADDRESS, "Item": _object({"sku": {"type": "string", "maxLength": 8},
                                                             "qty": {"type": "integer", "minimum": 1,
                                                                     "maximum": 9}}, additionalProperties=False)}},
    "LangChain magic_function": _object({"input": {"type": "integer", "exclusiveMinimum": -1000,
                                                   "exclusiveMaximum": 1000}}),
    "LangChain Joke": {"title": "Joke", "description": "Joke to tell user.", **_object(
        {"setup": {"title": "Setup", "description": "question to set up a joke", "type": "string"},
         "punchline": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}}, required=["setup"])},
}


@pytest.fixture(scope="module")
def engine() -> Any:
    return phi4flash.load("embedded", max_batch=16)


def test_every_schema_is_followed_at_temperature_one(engine: Any) -> None:
    assert len(SCHEMAS) >= 30
    jobs, configs = [], []
    for name, schema in SCHEMAS.items():
        for seed in range(SAMPLES):
            constraint = constraint_for(engine.tokenizer, schema=schema, max_new_tokens=MAX_NEW_TOKENS,
                                        max_reasoning_tokens=16)
            jobs.append((name, schema))
            configs.append(GenerationConfig(temperature=1.0, top_p=1.0, seed=seed, max_new_tokens=MAX_NEW_TOKENS,
                                            constraint=constraint))
    prompt = [{"role": "user", "content": "Reply with a JSON value."}]
    results = engine.generate_batch([prompt] * len(jobs), configs)
    failures = []
    for (name, schema), result in zip(jobs, results, strict=True):
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        try:
            validator.validate(json.loads(result.answer))
        except (ValueError, jsonschema.ValidationError) as err:
            failures.append(f"{name}: {result.finish_reason} {result.answer!r}: {str(err)[:120]}")
        assert result.usage.completion_tokens <= MAX_NEW_TOKENS
    assert not failures, "\n".join(failures)
