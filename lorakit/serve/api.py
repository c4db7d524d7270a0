"""The OpenAI-compatible request bodies and error shape of ``lorakit serve``.

Bodies are validated strictly: an unknown field, a value of the wrong JSON type or out of range is a 400
naming the field (``param``), in OpenAI's error shape, before anything is queued.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
             499: "client_closed_request", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# OpenAI settings this server does not implement, by the value that changes nothing: accepted at it (clients such as
# LangChain send them so), refused at any other
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    user: str | None = None

    frequency_penalty: float | None = None  # these four: see NEUTRAL
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None

    @field_validator(*NEUTRAL)
    @classmethod
    def _neutral(cls, value, info: ValidationInfo):
        neutral = NEUTRAL[info.field_name]
        if value is not None and (value is not neutral if isinstance(neutral, bool) else value != neutral):
            raise ValueError("not supported by this server; leave it out or at its default")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them (OpenAI's "developer" is the template's "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class LoadAdapterRequest(_Body):
    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1)


class VLLMLoadRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class VLLMUnloadRequest(_Body):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def parse(model: type[BaseModel], raw: bytes):
    """``raw`` (a request body) as ``model``, or the APIError (400) naming the first field at fault."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        kind = first["type"]
        if kind == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}", code="invalid_json") from None
        if kind == "extra_forbidden":
            message = f"unknown field {where!r} (this server takes {', '.join(model.model_fields)})"
        elif kind == "missing":
            message = f"{where!r} is required"
        else:
            message = f"{where}: {first['msg']}" + (f" (got {first['input']!r})" if "input" in first else "")
        raise APIError(400, message, param=where, code=kind) from None
