"""Request bodies, validated by pydantic: OpenAI's fields that make sense for these models, plus
`top_k` and `seed`. Unknown fields are ignored, as OpenAI-compatible servers do; a value of the wrong
type (strict: "0.5" is not a number) or out of range is a 400 naming the field; the seed, temperature
and top_p bounds are `llm.bounds`', the same as `llm generate`'s and params.yaml's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm.bounds import MAX_SEED, temperature_problem, top_p_problem


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = None  # may be left out when the server holds one model of the right kind
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # extension
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # extension (OpenAI's beta field)
    ignore_eos: bool = False  # extension (as vLLM's): go on past <|endoftext|>, e.g. for benchmarks
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        problem = temperature_problem(value)  # 0 < t < MIN_TEMPERATURE overflows the logits
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        problem = top_p_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class ClassifyRequest(_Request):
    model: str | None = None
    input: str | list[str]
