"""The OpenAI chat-completions wire format as pydantic models, and the OpenAI error object.

FastAPI validates request bodies against these models (and lists them on ``/openapi.json`` and ``/docs``);
:func:`validation_error` turns pydantic's first complaint into a 400 that names the field the way OpenAI does
(``messages[0].role``). Types and shapes are checked here; sampling values are checked once, by
:meth:`phi4flash.GenerationConfig.validate`, which names the bad field too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from phi4flash import GenerationConfig


class APIError(Exception):
    """An error returned to the client as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 for the first of pydantic's (or FastAPI's) validation errors, naming its field OpenAI-style."""
    error = errors[0]
    if error.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {error.get('msg')}", code="invalid_json")
    param = _param(part for part in error.get("loc", ()) if part != "body") or None
    kind = str(error.get("type", ""))
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid {'type' if code == 'invalid_type' else 'value'} for {where}: {error.get('msg')}.",
                    param=param, code=code)


_UNION_TAGS = ("str", "int", "float", "bool", "none")


def _param(loc: Any) -> str:
    """``messages[0].role`` from pydantic's ``("messages", 0, "role")``, leaving out the tags it adds for the
    member of a union it tried (``str``, ``list[str]``, ``literal[...]``)."""
    parts = [p for p in loc if isinstance(p, int) or not (p in _UNION_TAGS or any(c in p for c in "[]'(,"))]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


class _Model(BaseModel):
    # Strict: "1" is not a number and true is not 1, as in OpenAI's API. Unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="allow")


class TextContentPart(_Model):
    """A text part of a message's content (the only kind this server reads)."""

    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    """The function an earlier assistant message called."""

    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Model):
    """A call in an earlier assistant message (written back into the prompt in the model's format)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    """One message of the conversation; ``developer`` is read as ``system``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None
    content: str | list[TextContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _text(cls, value: Any, handler: Any, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("role") == "assistant" and info.data.get("tool_calls"):
                return None
            raise PydanticCustomError("missing", "content is required for this role")
        try:
            content = handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_content", "expected a string or an array of text parts "
                                      '({"type": "text", "text": ...}); only text is supported') from None
        return content if isinstance(content, str) else "".join(part.text for part in content)

    def plain(self) -> dict[str, Any]:
        """The phi4flash message dict (tool calls as OpenAI dicts, for the chat template)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Model):
    """A function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(_Model):
    """A tool in ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class JsonSchemaFormat(_Model):
    """``response_format.json_schema``."""

    name: str = "output"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    """``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", 'json_schema needs "json_schema": {"name": ..., "schema": {...}}')
        return self

    def schema(self) -> dict[str, Any] | bool | None:  # type: ignore[override]
        """The JSON schema the answer must follow; None for free text."""
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class StreamOptions(_Model):
    """``stream_options``."""

    include_usage: bool = False


Number = Annotated[float, Field(description="a JSON number")]
_EXPECTED = {"stop": "a string or an array of strings",
             "tools": 'an array of {"type": "function", "function": {"name": ..., "parameters": {...}}}'}


class ChatCompletionRequest(_Model):
    """The body of ``POST /v1/chat/completions`` (OpenAI's, plus vLLM's ``top_k``, ``min_p`` and
    ``repetition_penalty``)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: int | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logprobs: bool | None = None

    @field_validator("stop", "tools", mode="wrap")
    @classmethod
    def _one_error(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        # One error for the whole field ("stop", "tools"), saying what it should be and where it is not.
        try:
            return handler(value)
        except ValidationError as err:
            detail = err.errors()[0]
            where = _param(detail["loc"])
            raise PydanticCustomError("invalid_value", "expected {expected}; {where}{message}", {
                "expected": _EXPECTED[str(info.field_name)], "where": f"at {where}: " if where else "",
                "message": detail["msg"]}) from None

    @field_validator("presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            use = "; use 'repetition_penalty'" if "penalty" in str(info.field_name) else ""
            raise PydanticCustomError("unsupported", "only {default} is supported{use}",
                                      {"default": "false" if info.field_name == "logprobs" else "0", "use": use})
        return value

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("unsupported", "only allowed when 'stream' is true")
        return value

    @property
    def max_tokens_param(self) -> str:
        """The name the client gave the token budget under."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def generation_config(self) -> GenerationConfig:
        """The sampling settings, validated by :meth:`GenerationConfig.validate`.

        Raises:
            APIError: 400 naming the bad field.
        """
        budget = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "repetition_penalty": self.repetition_penalty, "max_new_tokens": budget}
        config = GenerationConfig(**{k: v for k, v in values.items() if v is not None}, seed=self.seed,
                                  stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []))
        try:
            return config.validate()
        except ValueError as exc:
            param = str(exc).removeprefix("invalid ").split("=", 1)[0]
            param = self.max_tokens_param if param == "max_new_tokens" else param
            raise APIError(400, str(exc), param=param, code="invalid_value") from None


class TokenizeRequest(_Model):
    """The body of ``POST /v1/tokenize`` (vLLM's shape)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
