"""response_format (and the tool choices that force a call) as a grammar the worker enforces.

OpenAI's shapes: {"type": "text"}, {"type": "json_object"}, {"type": "json_schema",
"json_schema": {"name", "description", "schema", "strict"}}. The grammar is llguidance's
serialized form of a JSON schema (prism/engine/structured.py); it is checked here, against the
model's tokenizer, so a bad schema is a 400 before the request is queued.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from prism.engine.structured import choice_grammar, compiler_for, json_schema_grammar, regex_grammar
from prism.engine.tokenizer import Tokenizer
from prism.server.errors import bad_request

ANY_OBJECT: dict = {"type": "object"}  # json_object: any JSON object


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict | bool | None = Field(None, alias="schema")  # `schema` shadows a BaseModel attribute
    strict: bool | None = None  # the schema is always enforced: strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_or_none(self) -> Any:
        """The JSON schema the output must match; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ANY_OBJECT
        if self.json_schema is None:
            raise bad_request("response_format of type json_schema needs a json_schema object", "response_format")
        schema = self.json_schema.json_schema
        return ANY_OBJECT if schema is None else schema


class StructuredOutputs(BaseModel):
    """vLLM's extension (both endpoints): exactly one of a JSON schema, a regex, a choice."""

    model_config = ConfigDict(extra="ignore")
    json_: dict | bool | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)

    def grammar(self) -> str:
        given = [k for k in ("json_", "regex", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise bad_request("structured_outputs needs exactly one of json, regex, choice", "structured_outputs")
        if self.json_ is not None:
            return schema_grammar(self.json_, "structured_outputs")
        try:
            return regex_grammar(self.regex) if self.regex is not None else choice_grammar(self.choice)
        except ValueError as e:
            raise bad_request(f"structured_outputs: {e}", "structured_outputs") from None


def schema_grammar(schema: Any, param: str) -> str:
    """The grammar of JSON matching `schema`; a 400 naming `param` when it is no schema."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise bad_request(f"{param}: a JSON schema must be an object", param)
    try:
        return json_schema_grammar(schema)
    except ValueError as e:  # GrammarError (a RequestError), or the library's own ValueError
        raise bad_request(f"{param}: {e}", param) from None


def check_grammar(grammar: str, tokenizer: Tokenizer, param: str) -> None:
    """A 400 naming `param` when the grammar does not compile for this model's tokenizer.
    Runs in the tokenize thread: the first call per tokenizer builds llguidance's vocabulary."""
    try:
        compiler_for(tokenizer).check(grammar)
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param) from None
