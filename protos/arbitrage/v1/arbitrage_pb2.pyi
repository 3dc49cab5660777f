from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_DRAFT: _ClassVar[Source]
    SOURCE_TARGET: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
SOURCE_DRAFT: Source
SOURCE_TARGET: Source

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "policy", "threshold", "max_steps", "max_new_tokens", "sampling", "request_id", "timeout_s")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    policy: str
    threshold: float
    max_steps: int
    max_new_tokens: int
    sampling: SamplingOptions
    request_id: str
    timeout_s: float
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., policy: _Optional[str] = ..., threshold: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StageMs(_message.Message):
    __slots__ = ("draft", "target", "router", "prm")
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    PRM_FIELD_NUMBER: _ClassVar[int]
    draft: float
    target: float
    router: float
    prm: float
    def __init__(self, draft: _Optional[float] = ..., target: _Optional[float] = ..., router: _Optional[float] = ..., prm: _Optional[float] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("index", "text", "source", "score", "draft_discarded", "tokens", "finish_reason", "stage_ms", "discarded_draft_text", "draft_score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_DRAFT_TEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    source: Source
    score: float
    draft_discarded: bool
    tokens: int
    finish_reason: str
    stage_ms: StageMs
    discarded_draft_text: str
    draft_score: float
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., source: _Optional[_Union[Source, str]] = ..., score: _Optional[float] = ..., draft_discarded: _Optional[bool] = ..., tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., stage_ms: _Optional[_Union[StageMs, _Mapping]] = ..., discarded_draft_text: _Optional[str] = ..., draft_score: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("draft_tokens_kept", "draft_tokens_discarded", "target_tokens", "acceptance_rate", "target_steps", "draft_steps", "target_step_fraction", "router_calls", "prm_calls", "stage_ms", "speculative_drafts_used", "speculative_drafts_discarded", "speculative_draft_tokens_discarded")
    DRAFT_TOKENS_KEPT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STEPS_FIELD_NUMBER: _ClassVar[int]
    TARGET_STEP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ROUTER_CALLS_FIELD_NUMBER: _ClassVar[int]
    PRM_CALLS_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_DRAFTS_USED_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_DRAFTS_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_DRAFT_TOKENS_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    draft_tokens_kept: int
    draft_tokens_discarded: int
    target_tokens: int
    acceptance_rate: float
    target_steps: int
    draft_steps: int
    target_step_fraction: float
    router_calls: int
    prm_calls: int
    stage_ms: StageMs
    speculative_drafts_used: int
    speculative_drafts_discarded: int
    speculative_draft_tokens_discarded: int
    def __init__(self, draft_tokens_kept: _Optional[int] = ..., draft_tokens_discarded: _Optional[int] = ..., target_tokens: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., target_steps: _Optional[int] = ..., draft_steps: _Optional[int] = ..., target_step_fraction: _Optional[float] = ..., router_calls: _Optional[int] = ..., prm_calls: _Optional[int] = ..., stage_ms: _Optional[_Union[StageMs, _Mapping]] = ..., speculative_drafts_used: _Optional[int] = ..., speculative_drafts_discarded: _Optional[int] = ..., speculative_draft_tokens_discarded: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "answer", "steps", "usage", "finish_reason", "policy", "threshold", "total_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    answer: int
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    usage: Usage
    finish_reason: str
    policy: str
    threshold: float
    total_ms: float
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., answer: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., finish_reason: _Optional[str] = ..., policy: _Optional[str] = ..., threshold: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("step", "summary")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    step: Step
    summary: GenerateResponse
    def __init__(self, step: _Optional[_Union[Step, _Mapping]] = ..., summary: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
