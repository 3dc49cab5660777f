"""Client requests (gRPC proto, HTTP JSON, OpenAI JSON) -> one validated ``LoopRequest``.

Every transport first maps its message to ``RequestFields`` (a field is None when the
client did not set it), then ``prepare`` applies the configured defaults and limits. Bad
input raises ``InvalidArgument`` naming the field; the coordinator turns it into gRPC
INVALID_ARGUMENT or HTTP 422. No Ray imports: tested without a cluster.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from arbitrage_common.config import AppConfig
from arbitrage_common.errors import InvalidArgument
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.loop import LoopRequest
from arbitrage_common.policies import POLICIES, make_policy

from .proxy_status import UnparsedRequest

CHAT_ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
MAX_REQUEST_ID_CHARS = 128
SEED_RANGE = (-2**63, 2**63 - 1)  # the proto's int64, whatever the transport
GREEDY_BELOW = 1e-5  # a temperature this small samples as greedy (as vLLM does); float32 would make it 0
MIN_SAMPLED_TEMPERATURE = 0.01  # vLLM raises any smaller one to this: both backends get the same
MAX_TEMPERATURE = 2.0  # OpenAI's bound; beyond it a step is noise (1e308 overflows float32 to a uniform draw)


@dataclass
class RequestFields:
    """What a client asked for, transport-neutral; None = not set (use the default)."""

    prompt: str | None = None
    messages: list[tuple[str, str]] | None = None
    policy: str | None = None
    threshold: float | None = None
    max_steps: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    request_id: str | None = None
    timeout_s: float | None = None
    budget_field: str = "max_new_tokens"  # what the client called the token budget (OpenAI: max_tokens)


def new_session_id() -> str:
    """A key no other request holds: the client's request_id need not be unique."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Prepared:
    """A validated request: the loop request plus what the response echoes.

    ``request_id`` is the client's (echoed, logged); ``session_id`` is the server's own key
    for the pools (replica affinity, merge lane, prefix cache, its release), so two requests
    that send one request_id never share a session. ``prompt_field`` names the field the
    prompt came from (``prompt`` or ``messages[i].content``), for errors found later."""

    request: LoopRequest
    policy: str
    threshold: float | None
    request_id: str
    session_id: str = field(default_factory=new_session_id)
    prompt_field: str = "prompt"
    threshold_explicit: bool = False  # the client set the threshold (load control leaves it)


def _int_in(name: str, value: Any, default: int, limit: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if value <= 0:
        raise InvalidArgument(name, f"must be > 0, got {value}")
    if value > limit:
        raise InvalidArgument(name, f"must be <= {limit} (the server's limit), got {value}")
    return value


def _utf8(name: str, text: str) -> None:
    """JSON can carry a lone surrogate (\\ud800) that no UTF-8 encoder, tokenizer or reply takes;
    gRPC refuses it on the wire."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(name, f"is not valid Unicode text (a lone surrogate at character {exc.start})") from None


def _prompt(fields: RequestFields, limit: int) -> tuple[str, str]:
    """The problem text and the field it came from (chat: the last user message's content)."""
    if fields.prompt and fields.messages is not None:
        raise InvalidArgument("prompt", "set prompt or messages, not both")
    if fields.messages is not None:
        for i, (role, content) in enumerate(fields.messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
            if isinstance(content, str):
                _utf8(f"messages[{i}].content", content)
        users = [i for i, (role, _) in enumerate(fields.messages) if role == "user"]
        if not users:
            raise InvalidArgument("messages", "needs at least one 'user' message (the problem)")
        prompt, name = fields.messages[users[-1]][1], f"messages[{users[-1]}].content"
    else:
        prompt, name = fields.prompt or "", "prompt"
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgument(name, "must not be empty")
    if len(prompt) > limit:
        raise InvalidArgument(name, f"is {len(prompt)} characters; the limit is {limit}")
    _utf8(name, prompt)
    return prompt, name


def _allowed_policy(fields: RequestFields, cfg: AppConfig) -> str:
    """The policy the request runs with; one the operator did not allow is refused, and so is
    an explicit threshold where ``policy.threshold_override`` is off."""
    name = fields.policy or cfg.policy.default
    allowed = cfg.policy.allowed
    if fields.policy is not None and allowed is not None and name in POLICIES and name not in allowed:
        raise InvalidArgument("policy", f"{name!r} is not allowed on this server; allowed: {', '.join(allowed)}")
    if fields.threshold is not None and not cfg.policy.threshold_override:
        raise InvalidArgument("threshold", "is set by the server here (policy.threshold_override is off); "
                                           "leave it unset")
    return name


def prepare(fields: RequestFields, cfg: AppConfig) -> Prepared:
    """Apply defaults and limits; raise ``InvalidArgument`` naming the first bad field."""
    limits = cfg.limits
    prompt, prompt_field = _prompt(fields, limits.max_prompt_chars)
    name = _allowed_policy(fields, cfg)
    threshold = fields.threshold
    if threshold is None and name == cfg.policy.default:
        threshold = cfg.policy.threshold
    seed = fields.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument("seed", f"must be an integer, got {seed!r}")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidArgument("seed", f"must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {seed}")
    policy = make_policy(name, threshold, seed)  # 'policy' / 'threshold' errors
    max_steps = _int_in("max_steps", fields.max_steps, limits.default_max_steps, limits.max_steps)
    max_new_tokens = _int_in(fields.budget_field, fields.max_new_tokens, limits.default_max_new_tokens,
                             limits.max_new_tokens)
    temperature = 0.0 if fields.temperature is None else fields.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}], got {temperature!r}")
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    elif temperature < MIN_SAMPLED_TEMPERATURE:
        temperature = MIN_SAMPLED_TEMPERATURE
    timeout = limits.request_timeout_s
    if fields.timeout_s is not None:
        t = fields.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InvalidArgument("timeout_s", f"must be a finite number of seconds > 0, got {t!r}")
        timeout = min(float(t), timeout)
    request_id = fields.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    _utf8("request_id", request_id)
    request = LoopRequest(prompt=prompt, policy=policy, max_steps=max_steps, max_new_tokens=max_new_tokens,
                          step_max_tokens=limits.step_max_tokens,
                          options=GenerationOptions(temperature=float(temperature), seed=seed),
                          deadline_s=timeout, prompt_template=cfg.prompt.template,
                          pipeline=limits.step_pipelining, lookahead=limits.draft_lookahead,
                          prompt_field=prompt_field)
    return Prepared(request=request, policy=name, threshold=policy.threshold, request_id=request_id,
                    prompt_field=prompt_field, threshold_explicit=fields.threshold is not None)


# -- gRPC ---------------------------------------------------------------------------------
def fields_from_proto(req: Any) -> RequestFields:
    """``arbitrage.v1.GenerateRequest`` -> fields (unset optionals stay None)."""
    if isinstance(req, UnparsedRequest):  # bytes that did not parse (services.proxy_status)
        raise InvalidArgument("request", f"is not a valid {req.message_type} message: its bytes do not parse "
                                         f"(check the client's serializer)")

    def opt(msg: Any, name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    sampling = req.sampling if req.HasField("sampling") else None
    return RequestFields(
        prompt=req.prompt or None,
        messages=[(m.role, m.content) for m in req.messages] or None,
        policy=req.policy or None,
        threshold=opt(req, "threshold"),
        max_steps=opt(req, "max_steps"),
        max_new_tokens=opt(req, "max_new_tokens"),
        temperature=opt(sampling, "temperature") if sampling is not None else None,
        seed=opt(sampling, "seed") if sampling is not None else None,
        request_id=req.request_id or None,
        timeout_s=opt(req, "timeout_s"),
    )


# -- HTTP bodies --------------------------------------------------------------------------
# Strict types: JSON's true, "8" or 8.0 is not an integer here (gRPC could not send them either).
class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr = Field(description="system (or developer), user or assistant")
    content: StrictStr | list[Any] = Field(description="The message text, or a list of text parts "
                                                       "({\"type\": \"text\", \"text\": ...}, joined by a "
                                                       "newline); the prompt is the last user message.")


class _Extensions(BaseModel):
    """Arbitrage fields accepted by every HTTP route (OpenAI clients pass them in extra_body)."""

    policy: StrictStr | None = Field(None, description=f"Routing policy: {', '.join(POLICIES)}.")
    threshold: StrictFloat | None = Field(None, description="Policy threshold (unset: the config's policy.threshold for "
                                                               "the default policy, else the policy's own default).")
    max_steps: StrictInt | None = Field(None, description="Most reasoning steps.")
    seed: StrictInt | None = Field(None, description="Sampling / random-policy seed (64-bit).")
    temperature: StrictFloat | None = Field(None, description="0 = greedy.")
    request_id: StrictStr | None = Field(None, description="Echoed in the response and logged (the server keys "
                                                           "its caches by its own id).")
    timeout_s: StrictFloat | None = Field(None, description="Deadline in seconds (capped by the server).")

    def named_policy(self) -> str | None:
        """The policy the client named (before validation): for metrics labels."""
        return self.policy


class GenerateBody(_Extensions):
    """``POST /v1/generate``."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr | None = Field(None, description="The problem text (or messages).")
    messages: list[ChatMessageBody] | None = Field(None, description="Chat form of the prompt.")
    max_new_tokens: StrictInt | None = Field(None, description="Token budget over all kept steps.")
    stream: StrictBool = Field(False, description="Server-sent events: one 'step' event per decided step, then 'summary'.")

    def fields(self) -> RequestFields:
        # [] is unset, as an empty repeated field is over gRPC (the same fields on both)
        return RequestFields(prompt=self.prompt, messages=_messages(self.messages) or None, policy=self.policy,
                             threshold=self.threshold, max_steps=self.max_steps, max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature, seed=self.seed, request_id=self.request_id,
                             timeout_s=self.timeout_s)


# OpenAI request fields this service does not implement, and the values that ask for nothing
# (clients send some of them by default): any other value is refused, naming the field, rather
# than silently ignored, since each would change the output.
UNSUPPORTED_OPENAI = {"stop": (None, [], ""), "logprobs": (None, False), "top_logprobs": (None, 0),
                      "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "top_p": (None, 1, 1.0),
                      "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
                      "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
                      "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
                      "reasoning_effort": (None,), "modalities": (None, ["text"]), "audio": (None,),
                      "prediction": (None,),
                      # vLLM's extensions that clients of vLLM servers send
                      "top_k": (None, -1, 0), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
                      "stop_token_ids": (None, []), "min_tokens": (None, 0), "ignore_eos": (None, False),
                      "bad_words": (None, []), "guided_json": (None,), "guided_choice": (None,),
                      "guided_regex": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
                      "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
                      "allowed_token_ids": (None, []), "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,),
                      "chat_template": (None,), "chat_template_kwargs": (None, {}),
                      "continue_final_message": (None, False), "verbosity": (None,)}


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    """``value`` is one of ``defaults`` as JSON means it (``True`` is not 1, nor ``0`` False)."""
    return any(type(value) is type(d) and value == d or value is d for d in defaults)


class StreamOptionsBody(BaseModel):
    """OpenAI's ``stream_options``; its other keys (``include_obfuscation``, ...) change no text."""

    include_usage: StrictBool | None = Field(None, description="Send a last chunk with empty choices and the "
                                                               "usage; every other chunk then has usage null.")


class _OpenAIBody(_Extensions):
    model_config = ConfigDict(extra="allow")  # other OpenAI knobs: see ``UNSUPPORTED_OPENAI``
    model: StrictStr | None = Field(None, description="'arbitrage-serve' (default policy) or a policy name.")
    max_tokens: StrictInt | None = Field(None, description="Token budget over all kept steps.")
    max_new_tokens: StrictInt | None = Field(None, description="This API's name for max_tokens.")
    max_completion_tokens: StrictInt | None = Field(None, description="Alias of max_tokens (set one).")
    n: StrictInt = Field(1, description="Only 1 is supported (null: 1).")
    stream: StrictBool = Field(False, description="Server-sent events (null: false).")
    stream_options: StreamOptionsBody | None = Field(None, description="Only with stream true (as OpenAI and vLLM).")

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        """OpenAI types ``n`` and ``stream`` nullable; null asks for the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def named_policy(self) -> str | None:
        """The policy the client named: ``policy``, else ``model`` when it is a policy name."""
        return self.policy or (self.model if self.model in POLICIES else None)

    def _openai_budget(self) -> tuple[str, int | None]:
        return self._budget(("max_completion_tokens", self.max_completion_tokens), ("max_tokens", self.max_tokens))

    def _budget(self, *named: tuple[str, int | None]) -> tuple[str, int | None]:
        given = [(name, value) for name, value in named if value is not None]
        if len(given) > 1:
            raise InvalidArgument(given[1][0], f"set one token budget, not both {given[0][0]} and {given[1][0]}")
        return given[0] if given else (named[0][0], None)

    def _common(self, cfg: AppConfig, budget: tuple[str, int | None], **kw: Any) -> RequestFields:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_OPENAI and not _is_default(value, UNSUPPORTED_OPENAI[name]):
                raise InvalidArgument(name, f"is not supported by this server (got {str(value)[:80]!r})")
        if self.n != 1:
            raise InvalidArgument("n", f"only n=1 is supported, got {self.n}")
        if self.stream_options and self.stream_options.model_dump(exclude_none=True) and not self.stream:
            # As vLLM: an empty object (or nulls), which some clients always send, asks for nothing
            raise InvalidArgument("stream_options", "is only allowed when stream is true")
        policy = self.policy
        if self.model is not None and self.model != cfg.served_model_name:
            if self.model not in POLICIES:
                raise InvalidArgument("model", f"unknown model {self.model!r}; expected {cfg.served_model_name!r} "
                                               f"or a policy name ({', '.join(POLICIES)})")
            if policy is not None and policy != self.model:
                raise InvalidArgument("policy", f"{policy!r} conflicts with model {self.model!r}; set one of them")
            if cfg.policy.allowed is not None and self.model not in cfg.policy.allowed:
                raise InvalidArgument("model", f"{self.model!r} is not allowed on this server; allowed: "
                                               f"{cfg.served_model_name!r} or {', '.join(cfg.policy.allowed)}")
            scorer = POLICIES[self.model].scorer
            if scorer is not None and getattr(cfg.pools, scorer) is None:  # the loop would blame 'policy'
                raise InvalidArgument("model", f"{self.model!r} needs a {scorer} pool, and none is configured; "
                                               f"GET /v1/models lists the models this server runs")
            policy = self.model
        budget_field, budget_value = self._budget(budget, ("max_new_tokens", self.max_new_tokens))
        return RequestFields(policy=policy, threshold=self.threshold, max_steps=self.max_steps,
                             max_new_tokens=budget_value, budget_field=budget_field, temperature=self.temperature,
                             seed=self.seed, request_id=self.request_id, timeout_s=self.timeout_s, **kw)


class CompletionBody(_OpenAIBody):
    """``POST /v1/completions`` (OpenAI-compatible)."""

    prompt: StrictStr | list[StrictStr] | None = Field(None, description="The problem text (a one-element list is accepted).")

    def fields(self, cfg: AppConfig) -> RequestFields:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidArgument("prompt", f"only one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]
        return self._common(cfg, self._openai_budget(), prompt=prompt)


class ChatCompletionBody(_OpenAIBody):
    """``POST /v1/chat/completions`` (OpenAI-compatible)."""

    messages: list[ChatMessageBody] = Field(description="The conversation; the last user message is the problem.")

    def fields(self, cfg: AppConfig) -> RequestFields:
        return self._common(cfg, self._openai_budget(), messages=_messages(self.messages))


def _messages(msgs: list[ChatMessageBody] | None) -> list[tuple[str, str]] | None:
    return None if msgs is None else [(m.role, _text_of(i, m.content)) for i, m in enumerate(msgs)]


def _text_of(i: int, content: str | list[Any]) -> str:
    """A message's text: the string, or its text parts joined by a newline (as vLLM joins them);
    other parts (images, audio, files) are refused, naming the part."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidArgument(f"messages[{i}].content[{j}]",
                                  f"only text parts ({{\"type\": \"text\", \"text\": \"...\"}}) are supported, "
                                  f"got {str(kind)[:40]!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def field_from_loc(loc: tuple[Any, ...] | list[Any], error_type: str = "") -> str:
    """Pydantic/FastAPI error location -> a field name ('max_steps', 'messages[0].content');
    'body' for malformed JSON or a missing body."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    if error_type == "json_invalid" or not parts:
        return "body"
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "list[str]", "function-after", "int", "float") and name:
            continue  # union branch names pydantic appends
        else:
            name += ("." if name else "") + str(part)
    return name

