"""Bodies held to OpenAI's published schema: openai_schemas.json is a trimmed copy of the components.schemas of
openai/openai-openapi's openapi.yaml (its "source" names the commit). The spec writes OpenAPI 3.0's `nullable: true`
inside a 3.1 document; read here as "or null", as its generated clients read it."""
import json
import os

import jsonschema

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "openai_schemas.json")) as f:
    SPEC = json.load(f)


def _or_null(x):
    if isinstance(x, list):
        return [_or_null(v) for v in x]
    if not isinstance(x, dict):
        return x
    inner = {k: _or_null(v) for k, v in x.items() if k != "nullable"}
    return {"anyOf": [inner, {"type": "null"}]} if x.get("nullable") is True else inner


COMPONENTS = _or_null(SPEC["components"])


def validate(body: dict, name: str):
    """Raise jsonschema.ValidationError unless body is a valid components.schemas[name]."""
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{name}", "components": COMPONENTS},
                        cls=jsonschema.Draft202012Validator)
