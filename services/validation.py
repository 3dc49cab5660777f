"""Client requests (gRPC proto, HTTP JSON, OpenAI JSON) -> one validated ``LoopRequest``.

Every transport first maps its message to ``RequestFields`` (a field is None when the
client did not set it), then ``prepare`` applies the configured defaults and limits. Bad
input raises ``InvalidArgument`` naming the field; the coordinator turns it into gRPC
INVALID_ARGUMENT or HTTP 422. No Ray imports: tested without a cluster.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from arbitrage_common.config import AppConfig
from arbitrage_common.errors import InvalidArgument
from arbitrage_common.interfaces import GenerationOptions
from arbitrage_common.loop import LoopRequest
from arbitrage_common.policies import POLICIES, make_policy

CHAT_ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_CHARS = 128


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


@dataclass(frozen=True)
class Prepared:
    """A validated request: the loop request plus what the response echoes."""

    request: LoopRequest
    policy: str
    threshold: float | None
    request_id: str


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


def _prompt(fields: RequestFields, limit: int) -> str:
    if fields.prompt and fields.messages:
        raise InvalidArgument("prompt", "set prompt or messages, not both")
    if fields.messages:
        for i, (role, _) in enumerate(fields.messages):
            if role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        users = [content for role, content in fields.messages if role == "user"]
        if not users:
            raise InvalidArgument("messages", "needs at least one 'user' message (the problem)")
        prompt, name = users[-1], "messages"
    else:
        prompt, name = fields.prompt or "", "prompt"
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgument(name, "must not be empty")
    if len(prompt) > limit:
        raise InvalidArgument(name, f"is {len(prompt)} characters; the limit is {limit}")
    return prompt


def prepare(fields: RequestFields, cfg: AppConfig) -> Prepared:
    """Apply defaults and limits; raise ``InvalidArgument`` naming the first bad field."""
    limits = cfg.limits
    prompt = _prompt(fields, limits.max_prompt_chars)
    name = fields.policy or cfg.policy.default
    threshold = fields.threshold
    if threshold is None and name == cfg.policy.default:
        threshold = cfg.policy.threshold
    seed = fields.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument("seed", f"must be an integer, got {seed!r}")
    policy = make_policy(name, threshold, seed)  # 'policy' / 'threshold' errors
    max_steps = _int_in("max_steps", fields.max_steps, limits.default_max_steps, limits.max_steps)
    max_new_tokens = _int_in("max_new_tokens", fields.max_new_tokens, limits.default_max_new_tokens,
                             limits.max_new_tokens)
    temperature = 0.0 if fields.temperature is None else fields.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument("temperature", f"must be a finite number >= 0, got {temperature!r}")
    timeout = limits.request_timeout_s
    if fields.timeout_s is not None:
        t = fields.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InvalidArgument("timeout_s", f"must be a number of seconds > 0, got {t!r}")
        timeout = min(float(t), timeout)
    request_id = fields.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    request = LoopRequest(prompt=prompt, policy=policy, max_steps=max_steps, max_new_tokens=max_new_tokens,
                          step_max_tokens=limits.step_max_tokens,
                          options=GenerationOptions(temperature=float(temperature), seed=seed),
                          deadline_s=timeout, prompt_template=cfg.prompt.template,
                          pipeline=limits.step_pipelining, lookahead=limits.draft_lookahead)
    return Prepared(request=request, policy=name, threshold=policy.threshold, request_id=request_id)


# -- gRPC ---------------------------------------------------------------------------------
def fields_from_proto(req: Any) -> RequestFields:
    """``arbitrage.v1.GenerateRequest`` -> fields (unset optionals stay None)."""
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
class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(description="system, user or assistant")
    content: str = Field(description="The message text; the prompt is the last user message.")


class _Extensions(BaseModel):
    """Arbitrage fields accepted by every HTTP route (OpenAI clients pass them in extra_body)."""

    policy: str | None = Field(None, description=f"Routing policy: {', '.join(POLICIES)}.")
    threshold: float | None = Field(None, description="Policy threshold (default: the policy's).")
    max_steps: int | None = Field(None, description="Most reasoning steps.")
    seed: int | None = Field(None, description="Sampling / random-policy seed.")
    temperature: float | None = Field(None, description="0 = greedy.")
    request_id: str | None = Field(None, description="Echoed in the response.")
    timeout_s: float | None = Field(None, description="Deadline in seconds (capped by the server).")


class GenerateBody(_Extensions):
    """``POST /v1/generate``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, description="The problem text (or messages).")
    messages: list[ChatMessageBody] | None = Field(None, description="Chat form of the prompt.")
    max_new_tokens: int | None = Field(None, description="Token budget over all kept steps.")
    stream: bool = Field(False, description="Server-sent events: one 'step' event per decided step, then 'summary'.")

    def fields(self) -> RequestFields:
        return RequestFields(prompt=self.prompt, messages=_messages(self.messages), policy=self.policy,
                             threshold=self.threshold, max_steps=self.max_steps, max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature, seed=self.seed, request_id=self.request_id,
                             timeout_s=self.timeout_s)


class _OpenAIBody(_Extensions):
    model_config = ConfigDict(extra="ignore")  # OpenAI knobs we do not implement are ignored
    model: str | None = Field(None, description="'arbitrage-serve' (default policy) or a policy name.")
    max_tokens: int | None = Field(None, description="Token budget over all kept steps.")
    n: int = Field(1, description="Only 1 is supported.")
    stream: bool = False

    def _common(self, cfg: AppConfig, **kw: Any) -> RequestFields:
        if self.n != 1:
            raise InvalidArgument("n", f"only n=1 is supported, got {self.n}")
        policy = self.policy
        if self.model is not None and self.model != cfg.served_model_name:
            if self.model not in POLICIES:
                raise InvalidArgument("model", f"unknown model {self.model!r}; expected {cfg.served_model_name!r} "
                                               f"or a policy name ({', '.join(POLICIES)})")
            policy = policy or self.model
        return RequestFields(policy=policy, threshold=self.threshold, max_steps=self.max_steps,
                             max_new_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed,
                             request_id=self.request_id, timeout_s=self.timeout_s, **kw)


class CompletionBody(_OpenAIBody):
    """``POST /v1/completions`` (OpenAI-compatible)."""

    prompt: str | list[str] | None = Field(None, description="The problem text (a one-element list is accepted).")

    def fields(self, cfg: AppConfig) -> RequestFields:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidArgument("prompt", f"only one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]
        return self._common(cfg, prompt=prompt)


class ChatCompletionBody(_OpenAIBody):
    """``POST /v1/chat/completions`` (OpenAI-compatible)."""

    messages: list[ChatMessageBody] = Field(description="The conversation; the last user message is the problem.")
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens.")

    def fields(self, cfg: AppConfig) -> RequestFields:
        out = self._common(cfg, messages=_messages(self.messages) or [])
        if out.max_new_tokens is None:
            out.max_new_tokens = self.max_completion_tokens
        return out


def _messages(msgs: list[ChatMessageBody] | None) -> list[tuple[str, str]] | None:
    return [(m.role, m.content) for m in msgs] if msgs else None


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

