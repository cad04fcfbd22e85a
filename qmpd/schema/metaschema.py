"""The JSON Schema every file under schema/ must satisfy.

A file is a JSON array of definitions; each definition names its kind by the
key that carries its name (``struct``, ``enum``, ``union``, ``alternate``,
``command``, ``event``), as in QEMU's QAPI language.
"""

from __future__ import annotations

KINDS = ("struct", "enum", "union", "alternate", "command", "event")

_TYPE_NAME = r"^[A-Z][A-Za-z0-9]*$"
_MEMBER_NAME = r"^\*?[a-z][a-z0-9_-]*$"

META_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "doc": {"type": "string"},
        "features": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-z][a-z0-9-]*$"},
            "uniqueItems": True,
        },
        "type-ref": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "prefixItems": [{"type": "string", "minLength": 1}],
                    "minItems": 1,
                    "maxItems": 1,
                },
            ],
        },
        "member": {
            "oneOf": [
                {"$ref": "#/$defs/type-ref"},
                {
                    "type": "object",
                    "properties": {
                        "type": {"$ref": "#/$defs/type-ref"},
                        "features": {"$ref": "#/$defs/features"},
                        "required-unless": {"type": "string", "minLength": 1},
                        "doc": {"$ref": "#/$defs/doc"},
                    },
                    "required": ["type"],
                    "additionalProperties": False,
                },
            ],
        },
        "members": {
            "type": "object",
            "propertyNames": {"pattern": _MEMBER_NAME},
            "additionalProperties": {"$ref": "#/$defs/member"},
        },
        "struct": {
            "type": "object",
            "properties": {
                "struct": {"type": "string", "pattern": _TYPE_NAME},
                "doc": {"$ref": "#/$defs/doc"},
                "base": {"type": "string", "pattern": _TYPE_NAME},
                "data": {"$ref": "#/$defs/members"},
                "features": {"$ref": "#/$defs/features"},
            },
            "required": ["struct", "data"],
            "additionalProperties": False,
        },
        "enum": {
            "type": "object",
            "properties": {
                "enum": {"type": "string", "pattern": _TYPE_NAME},
                "doc": {"$ref": "#/$defs/doc"},
                "data": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "oneOf": [
                            {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]*$"},
                            {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]*$"},
                                    "features": {"$ref": "#/$defs/features"},
                                },
                                "required": ["name"],
                                "additionalProperties": False,
                            },
                        ]
                    },
                },
                "features": {"$ref": "#/$defs/features"},
            },
            "required": ["enum", "data"],
            "additionalProperties": False,
        },
        "union": {
            "type": "object",
            "properties": {
                "union": {"type": "string", "pattern": _TYPE_NAME},
                "doc": {"$ref": "#/$defs/doc"},
                "base": {
                    "oneOf": [
                        {"type": "string", "pattern": _TYPE_NAME},
                        {"$ref": "#/$defs/members"},
                    ]
                },
                "discriminator": {"type": "string", "pattern": r"^[a-z][a-z0-9_-]*$"},
                "data": {
                    "type": "object",
                    "additionalProperties": {"type": "string", "pattern": _TYPE_NAME},
                },
                "features": {"$ref": "#/$defs/features"},
            },
            "required": ["union", "base", "discriminator", "data"],
            "additionalProperties": False,
        },
        "alternate": {
            "type": "object",
            "properties": {
                "alternate": {"type": "string", "pattern": _TYPE_NAME},
                "doc": {"$ref": "#/$defs/doc"},
                "data": {
                    "type": "object",
                    "minProperties": 2,
                    "propertyNames": {"pattern": r"^[a-z][a-z0-9_-]*$"},
                    "additionalProperties": {"type": "string", "minLength": 1},
                },
                "features": {"$ref": "#/$defs/features"},
            },
            "required": ["alternate", "data"],
            "additionalProperties": False,
        },
        "command": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "pattern": r"^[a-z][a-z0-9_-]*$"},
                "doc": {"$ref": "#/$defs/doc"},
                "data": {
                    "oneOf": [
                        {"type": "string", "pattern": _TYPE_NAME},
                        {"$ref": "#/$defs/members"},
                    ]
                },
                "boxed": {"type": "boolean"},
                "returns": {"$ref": "#/$defs/type-ref"},
                "allow-oob": {"type": "boolean"},
                "features": {"$ref": "#/$defs/features"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
        "event": {
            "type": "object",
            "properties": {
                "event": {"type": "string", "pattern": r"^[A-Z][A-Z0-9_]*$"},
                "doc": {"$ref": "#/$defs/doc"},
                "data": {
                    "oneOf": [
                        {"type": "string", "pattern": _TYPE_NAME},
                        {"$ref": "#/$defs/members"},
                    ]
                },
                "boxed": {"type": "boolean"},
                "features": {"$ref": "#/$defs/features"},
            },
            "required": ["event"],
            "additionalProperties": False,
        },
    },
    "type": "array",
    "items": {"type": "object"},
}
