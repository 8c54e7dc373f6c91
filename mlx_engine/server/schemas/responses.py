"""Response schemas: the OpenAPI document's description of what the server answers.

Responses are built as plain dicts on the hot path; these models document them and the
tests check real responses against the generated document. A capture's fields come
from the one table in wire/fields.py.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from ...wire.fields import CAPTURE_FIELDS



class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]]


class PromptTokensDetails(Open):
    cached_tokens: int = Field(description="Prompt tokens whose KV cache was reused from an earlier request with the same prefix.")


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


_PYTHON_TYPES: dict[str, Any] = {"string": str, "integer": int, "boolean": bool, "array": list[int]}


def _capture_field(f: Any) -> tuple[Any, Any]:
    kind: Any = Literal[f.choices] if f.choices else _PYTHON_TYPES[f.json_type]
    if f.nullable:
        kind = Optional[kind]
    default = ... if f.required else None
    return kind, Field(default=default, description=f.description)


def _capture_wire_model() -> type[BaseModel]:
    """One capture on the wire (docs/architecture.md, Wire formats)."""
    always = {f.name: _capture_field(f) for f in CAPTURE_FIELDS if not f.optional}
    sometimes = {f.name: _capture_field(f) for f in CAPTURE_FIELDS if f.optional}
    encoding = {"encoding": (str, Field(description="json, base64 or none.")), "data": (Any, None)}
    return create_model(
        "CaptureWire", __base__=Open, __doc__=_capture_wire_model.__doc__, **always, **encoding, **sometimes
    )


CaptureWire = _capture_wire_model()


Activations = dict[str, list[CaptureWire]]


class AppliedIntervention(Open):
    """An intervention as the server resolved it (no array data): echoed in responses and stored captures."""

    index: int
    hook_id: str
    layer_name: str
    layer: Optional[int]
    component: str
    is_input: bool
    op: str
    positions: Union[str, list[int]]
    scale: Optional[float] = None
    min: Optional[float] = None
    max: Optional[float] = None
    indices: Optional[list[int]] = None
    heads: Optional[list[int]] = None
    source_positions: Optional[list[int]] = Field(default=None, description="patch: the positions [start, end) its source covers.")
    capture_id: Optional[str] = None
    capture_hook: Optional[str] = None


class ActivationExtras(BaseModel):
    """What a response with activations or interventions adds to the OpenAI shape."""

    interventions: Optional[list[AppliedIntervention]] = None
    capture_id: Optional[str] = None
    activations: Optional[Activations] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_tokens_text: Optional[list[str]] = None
    generated_token_ids: Optional[list[int]] = None
    generated_tokens_text: Optional[list[str]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    reasoning_content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: Optional[ChoiceLogprobs]


class ChatCompletion(ActivationExtras):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChunkDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: Optional[ChoiceLogprobs] = None


class StreamedCaptureFields(BaseModel):
    """What a streamed chunk with activations adds: the first names the capture and the prompt's tokens, each
    token's chunk carries that token and that step's captures (chat and text completions alike)."""

    capture_id: Optional[str] = None
    activations: Optional[Activations] = None
    token_id: Optional[int] = None
    token_text: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_tokens_text: Optional[list[str]] = None


class ChatCompletionChunk(StreamedCaptureFields):
    """One SSE event of a streamed chat completion (`data: {chunk}`), before `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    interventions: Optional[list[AppliedIntervention]] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: Optional[list[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: Optional[CompletionLogprobs]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None
    interventions: Optional[list[AppliedIntervention]] = None


class ActivationCompletion(Completion, ActivationExtras):
    """A text completion with activations: OpenAI's object plus the capture fields of a chat answer."""


class ActivationCompletionChunk(Completion, StreamedCaptureFields):
    """One SSE event of a streamed text completion with activations: each step's captures ride on its token's chunk."""


class EncodedVector(BaseModel):
    shape: list[int]
    dtype: str
    encoding: Literal["json", "base64"]
    data: Union[str, list[float]]


class SteeringIntervention(BaseModel):
    """The `add` intervention that applies a steering vector where it was measured (scale 1)."""

    layer_name: str
    component: str
    capture_input: bool
    op: Literal["add"]
    vector: EncodedVector
    scale: float
    positions: Literal["all"]


class SteeringVectorResponse(BaseModel):
    object: Literal["steering_vector"]
    model: str
    hook_id: str
    layer_name: str
    layer: Optional[int]
    component: str
    capture_input: bool
    position: Literal["mean", "last"]
    drop_bos: bool
    n_positive: int
    n_negative: int
    norm: float = Field(description="The vector's L2 norm.")
    vector: EncodedVector
    intervention: SteeringIntervention = Field(description="Ready to send in `interventions` (set `scale` to taste).")


class ModelObject(Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"]
    deleted: bool


class RegisteredHook(BaseModel):
    hook_id: str
    layer_name: str
    layer: Optional[int]
    component: str
    is_input: bool


class HookListResponse(BaseModel):
    object: Literal["list"]
    model: str
    data: list[RegisteredHook]


class HookPointsResponse(Open):
    model: str
    num_layers: int
    components: list[str]
    layers: list[dict[str, Any]]


class CaptureInfo(BaseModel):
    capture_id: str
    model: str
    bytes: int
    created: int


class CaptureListResponse(BaseModel):
    object: Literal["list"]
    data: list[CaptureInfo]


class EngineStatus(BaseModel):
    alive: bool
    busy: bool
    queue_depth: int
    completed_generations: int
    cancelled_generations: int
    cancelled_in_prefill: int = Field(description="Of the cancelled generations, those stopped between two prefill chunks.")
    failed_generations: int


class CaptureStoreStatus(BaseModel):
    items: int
    bytes: int
    max_items: int
    max_bytes: int


class PromptCacheStatus(BaseModel):
    entries: int
    bytes: int
    max_bytes: int
    hits: int = Field(description="Requests that reused a stored prompt prefix.")
    cached_tokens: int = Field(description="Prompt tokens served from the cache, over all hits.")


class BatchingStatus(BaseModel):
    max_batch_size: int
    rows: int = Field(description="Generations decoding in the batch now.")
    largest_batch: int = Field(description="The most generations one decode step has run together.")
    decode_steps: int
    batched_steps: int = Field(description="Decode steps that ran more than one generation.")
    solo_generations: int = Field(description="Generations that could not be batched (GPT-2, fallback classes, Gemma 2/3) and ran alone.")
    prompt_cache: Optional[PromptCacheStatus] = Field(description="null when the prompt cache is off.")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "shutting_down"]
    models: list[str]
    engine: EngineStatus
    capture_store: CaptureStoreStatus
    batching: BatchingStatus


class ProcessMemory(BaseModel):
    rss_bytes: Optional[int] = Field(description="Resident set size now; null where the system offers no reading (it comes from /proc).")
    peak_rss_bytes: Optional[int] = Field(description="Largest resident set size so far; null where the platform has no getrusage.")


class MLXMemory(BaseModel):
    active_bytes: int = Field(description="Bytes MLX's allocator holds in live arrays.")
    cache_bytes: int = Field(description="Bytes MLX keeps cached for reuse (freed arrays not yet returned).")
    peak_bytes: int = Field(description="Largest active_bytes since the process started.")
    limit_bytes: int = Field(description="The allocator's memory limit.")


class ModelMemory(BaseModel):
    id: str
    parameter_bytes: int = Field(description="Bytes of the model's weights as stored (packed for quantized layers).")


class MemoryResponse(BaseModel):
    object: Literal["memory"]
    process: ProcessMemory
    mlx: MLXMemory
    models: list[ModelMemory]
