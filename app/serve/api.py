"""OpenAI-compatible request and response bodies (the subset dynpart serves), validated at the edge.

Requests forbid unknown fields, so a typo is a clear 400 rather than a silently ignored option. Fields OpenAI and
vLLM clients commonly send are accepted: the sampling controls are honoured (``SamplingParams``); fields that do not
change the answer (``user``, ``service_tier``, ``metadata``, ``store``, ``parallel_tool_calls``...) are accepted and
unused; a field that would change the answer in a way dynpart cannot honour (``suffix``, ``tools``,
``response_format`` other than text, guided decoding, beam search) is a 400 naming it, unless sent with its "off"
value. Log-probs are served (completions: ``logprobs`` 0..20 and ``echo``, with ``max_tokens: 0`` scoring the prompt
only; chat: ``logprobs`` and ``top_logprobs`` 0..20). Several choices are served: a completions ``prompt`` may be a
list (of strings or of token-id lists), ``n`` choices per prompt, ``best_of`` sampled per prompt and the ``n`` with
the highest cumulative log-prob returned; at most ``MAX_CHOICES`` sequences per request (``choices``). Every
response's ``usage`` carries a ``dynpart`` object. Sampling fields share their ranges with ``SamplingParams``; a
server's own caps (``max_tokens_limit``, context, vocabulary) are checked by the ingress and router, which know them.
A ``max_tokens`` the client did not send is the endpoint's default, lowered by the ingress to what the limit and the
context leave for the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.engine.messages import RequestError
from app.engine.params import (LogitBias, MaxTokens, MinP, MinTokens, Penalty, RepetitionPenalty, SamplingParams,
                                 Seed, Stop, StopTokenIds, Temperature, TopK, TopLogprobs, TopP)

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions (and gRPC's when max_tokens is 0)
CHAT_MAX_TOKENS = 256
MAX_CHOICES = 64  # sequences one request may sample: prompts x max(n, best_of)
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]


def only(allowed: Callable[[Any], bool], why: str) -> AfterValidator:
    """A field dynpart accepts only with values that leave the answer as it serves it: any other value is a 400
    naming the field and saying ``why`` (never silently ignored)."""
    def check(value):
        if not allowed(value):
            raise ValueError(why)
        return value
    return AfterValidator(check)


def _off(value) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == ""


NOT_YET = "not supported by dynpart yet"
Off = Annotated[Any, only(_off, f"{NOT_YET}: omit it or send null")]  # a feature dynpart does not have, unused


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    # vLLM's (guidellm sends it with every stream): with include_usage, every chunk also carries its choice's usage
    # so far (its prompt's tokens, its tokens generated up to and with this chunk), as vLLM does
    continuous_usage_stats: bool | None = None


def sampling_params(default_max_tokens: int, max_tokens: int | None, stop: str | list[str] | None,
                    **fields: Any) -> SamplingParams:
    """The one mapping from a request's fields (an HTTP body or a gRPC message) to the engine's ``SamplingParams``:
    no ``max_tokens`` (None; gRPC passes its 0 as None) means the endpoint's default (marked so:
    ``max_tokens_default``), one ``stop`` string means a list of one."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    fields = {k: v for k, v in fields.items() if v is not None}  # unset: SamplingParams' default
    params = SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens, stop=stop, **fields)
    params._max_tokens_default = max_tokens is None
    return params


def check_max_tokens(value: int | None, limit: int, field: str = "max_tokens") -> None:
    """A ``max_tokens`` (or the chat's ``max_completion_tokens``: ``field``) past the server's ``max_tokens_limit``
    is the client's mistake, named; the request model itself sets no ceiling, so the configured limit is the one."""
    if value is not None and value > limit:
        raise RequestError(f"{field} ({value}) exceeds this server's limit of {limit} generated tokens per request",
                           param=field)


TextFormat = Annotated[dict[str, Any] | None, only(lambda f: f is None or f == {"type": "text"},
                                                   f"structured output is {NOT_YET}: only {{'type': 'text'}}")]
TOOLS = f"tool calling is {NOT_YET}"
# The request fields that map one to one onto ``SamplingParams`` (max_tokens and stop have their own rules)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "ignore_eos", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logit_bias", "min_p", "min_tokens", "stop_token_ids", "skip_special_tokens",
                   "include_stop_str_in_output")


class GenerationRequest(BaseModel):
    """What completions and chat requests share: the model, the sampling fields, and the fields other servers accept
    (unused here, or refused unless "off": see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0  # OpenAI's default; 0 is greedy
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: Annotated[str, Field(min_length=1, max_length=64)] | Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None  # token id (a JSON key: a string of digits) -> -100..100
    min_p: MinP | None = None
    min_tokens: MinTokens | None = None
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # accepted, no effect on the answer
    user: str | None = Field(None, max_length=256)
    service_tier: str | None = Field(None, max_length=64)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    request_id: str | None = Field(None, max_length=256)  # vLLM's; dynpart names its responses itself
    n: Choices | None = 1  # choices per prompt
    best_of: Choices | None = None  # sequences sampled per prompt (>= n): the n most likely returned
    # refused unless "off"
    use_beam_search: Off = None
    response_format: TextFormat = None
    tools: Annotated[list[Any] | None, only(_off, TOOLS)] = None
    tool_choice: Annotated[Any, only(lambda c: c in (None, "none", "auto"), TOOLS)] = None
    guided_json: Off = None
    guided_regex: Off = None
    guided_choice: Off = None
    guided_grammar: Off = None
    structured_outputs: Off = None
    prompt_logprobs: Off = None
    priority: Off = None  # vLLM's priority scheduling (0: off)
    truncate_prompt_tokens: Off = None
    allowed_token_ids: Off = None
    bad_words: Off = None

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, v: int | None, info: ValidationInfo) -> int | None:
        most = info.data.get("max_tokens")
        if v is not None and most is not None and v > most:
            raise ValueError(f"min_tokens ({v}) is more than max_tokens ({most})")
        return v

    @field_validator("best_of")
    @classmethod
    def _at_least_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if v is not None and v < n:
            raise ValueError(f"best_of ({v}) must be at least n ({n})")
        return v

    def choices(self, prompts: int = 1) -> int:
        """Sequences to sample per prompt (``best_of``, else ``n``), checked against ``MAX_CHOICES`` for the request's
        ``prompts``; best_of > n cannot stream (the n kept are known only at the end)."""
        n = self.n or 1
        sampled = max(self.best_of or n, n)
        field = "best_of" if sampled > n else "n"
        if prompts * sampled > MAX_CHOICES:
            raise RequestError(f"{prompts} prompt(s) x {field} {sampled} = {prompts * sampled} sequences, more than "
                               f"this server's limit of {MAX_CHOICES} per request",
                               param="prompt" if prompts > MAX_CHOICES else field)
        if self.stream and sampled > n:
            raise RequestError(f"best_of ({sampled}) > n ({n}) cannot be streamed: the n kept are known only at "
                               "the end", param="best_of")
        return sampled

    def sampling(self, default_max_tokens: int, **fields: Any) -> SamplingParams:
        return sampling_params(default_max_tokens, self.max_tokens, self.stop,
                               **{name: getattr(self, name) for name in SAMPLING_FIELDS}, **fields)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(GenerationRequest):
    # one prompt (text or token ids) or a list of them, n choices each (token ids checked against the vocabulary later)
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds],
                                                                                      Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: with echo only (the prompt scored, nothing generated)
    logprobs: TopLogprobs | None = None  # each token's log-prob and this many alternatives (OpenAI's legacy shape)
    echo: bool | None = None  # the prompt before the completion (with ``logprobs``: its tokens' log-probs too)
    suffix: Annotated[str | None, only(_off, "the model has no fill-in-the-middle: suffix is not supported")] = None

    def sampling(self, default_max_tokens: int, **fields: Any) -> SamplingParams:
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens: 0 is allowed only with echo: true (the prompt scored, nothing generated)",
                               param="max_tokens")
        return super().sampling(default_max_tokens, logprobs=self.logprobs,
                                prompt_logprobs=self.logprobs if self.echo else None, **fields)

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, v):
        if v == "" or v == []:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and any(p == "" or p == [] for p in v):
            raise ValueError(f"prompt {next(i for i, p in enumerate(v) if p == '' or p == [])} of the list is empty")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one or a list of them, each a string or token ids."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] = Field(max_length=1024)

    def text(self) -> str:
        """Text content; a list of parts may hold only text parts."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise RequestError(f"message content of type {part.get('type')!r} is not supported (text only)",
                                   param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None  # each generated token's log-prob (OpenAI's chat shape)
    top_logprobs: TopLogprobs | None = None  # and this many alternatives; needs logprobs: true

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def sampling(self, default_max_tokens: int, **fields: Any) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                                **fields)


def choice_params(params: SamplingParams, j: int, sampled: int, kept: int) -> SamplingParams:
    """The params of a prompt's ``j``-th of ``sampled`` sequences (``kept`` of them returned): ``seed + j`` (vLLM's
    rule for ``n``: reproducible, and distinct per choice); the prompt scored (``prompt_logprobs``) by the first only,
    so the others find its blocks in the prefix cache; the generated tokens' log-probs whenever ``best_of`` keeps the
    most likely."""
    update: dict[str, Any] = {"prompt_logprobs": params.prompt_logprobs if j == 0 else None}
    if params.seed is not None:
        update["seed"] = (params.seed + j) % 2**63
    if sampled > kept and params.logprobs is None:
        update["logprobs"] = 0
    return params.model_copy(update=update)
