"""The OpenAI API's request and response bodies, as far as the server supports them.

Requests forbid unknown fields; OpenAI options the server does not implement are declared so
that a request using them gets a 400 naming the field (not silence); their neutral values
(`n: 1`, `logprobs: false`, zero penalties ...) are accepted, as some clients always send them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Options an OpenAI client may send that this server does not implement, with the values that mean
# "not used".
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (False,),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": ({},),
    "web_search_options": (),
}


class UnsupportedOption(ValueError):
    """A request asks for an OpenAI option this server does not implement."""

    def __init__(self, field: str, value: Any):
        self.field = field
        super().__init__(f"{field}={value!r} is not supported by this server")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the base model's id (no adapter) or an adapter's name")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (default: the server's bound "
                                                            "or what fits the context)")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; omitted: the bundle's default (greedy)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens (extension; 0: all)")
    min_tokens: int = Field(0, ge=0, description="generate at least this many tokens, end-of-text ignored before "
                                                  "(extension, as vLLM's; benchmarks use it for fixed lengths)")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="seed of the sampler (a signed 64-bit integer, as OpenAI's): same seed, same output")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer (not included)")
    stream: bool = Field(False, description="stream server-sent events")
    stream_options: "StreamOptions | None" = Field(None, description="streaming options (include_usage)")
    user: str | None = Field(None, description="an end-user id; accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in UNSUPPORTED.items():
            if data.get(name) is not None and data[name] not in neutral:
                raise UnsupportedOption(name, data[name])
        return {k: v for k, v in data.items() if k not in UNSUPPORTED}

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("give at most 4 non-empty strings")
        return stop

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with usage and no choices")
    include_obfuscation: bool | None = Field(None, description="accepted and ignored (no obfuscation padding)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = Field(description="only text parts are supported")
    text: str = Field(description="the text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"] = Field(description="who speaks")
    content: str | list[TextPart] = Field(description="the text, or a list of text parts")
    name: str | None = Field(None, description="accepted and ignored")

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # a chat template knows system/user/assistant; OpenAI's "developer" is the new name of system
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str = Field(description="the text to continue, sent to the model as is")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, description="the adapter's name in the bundle's manifest (the request model id)")
    lora_path: str = Field(min_length=1, description="its .onnx_adapter file, relative to the bundle or absolute inside it")


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, description="the adapter to stop serving")
    lora_int_id: int | None = Field(None, description="accepted and ignored (vLLM's numeric id)")


ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients parse."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(model_id: str, created: int, parent: str | None) -> dict[str, Any]:
    """One /v1/models entry; adapters name the base model as `parent`, as vLLM lists LoRA modules."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "phi-pipeline",
            "root": parent or model_id, "parent": parent}


class Completion:
    """Response bodies of one request, chat or text completion, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._envelope(self.object, [choice], usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False,
              include_usage: bool = False) -> dict[str, Any]:
        """A stream chunk: the chat stream's first delta carries the role; the last one the finish reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice, obj = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}, "text_completion"
        return self._envelope(obj, [choice], **({"usage": None} if include_usage else {}))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(prompt_tokens, completion_tokens))
