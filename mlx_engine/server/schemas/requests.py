"""Request and response schemas: validation for requests, the OpenAPI document for both.

Requests are validated strictly (a string is not a number, unknown fields are errors)
so a client's mistake comes back as a 400 naming the field instead of being guessed
at. Fields OpenAI clients commonly send and we cannot honour are declared so their
error says why (`n` must be 1; penalties must be 0). Responses are built as plain
dicts on the hot path; these models document them and the tests check real responses
against the generated document.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from typing_extensions import Annotated

from ..hooks import ComponentType

MAX_STOP_SEQUENCES = 16
MAX_HOOKS = 256
MAX_TOP_LOGPROBS = 20
MAX_INTERVENTIONS = 64
MAX_STEERING_PROMPTS = 256
ActivationFormat = Literal["json", "base64", "none"]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _check_max_tokens(value: Optional[int], info: ValidationInfo) -> Optional[int]:
    limit = (info.context or {}).get("max_tokens_limit")
    if value is not None and limit is not None and value > limit:
        raise ValueError(f"must be at most {limit}, this server's limit (--max-tokens-limit)")
    return value


PositiveInt = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, description="Accepted only as 0.")]
StopItem = Annotated[str, Field(min_length=1, max_length=256)]
Stop = Union[StopItem, Annotated[list[StopItem], Field(max_length=MAX_STOP_SEQUENCES)]]
ModelName = Annotated[str, Field(min_length=1, max_length=512)]


class StreamOptions(StrictModel):
    include_usage: bool = False


# ----------------------------------------------------------------------------- hooks


class HookSpec(StrictModel):
    """One activation hook: a layer name (or TransformerLens hook name) and a component."""

    layer_name: Union[Annotated[int, Field(ge=-(2**31), le=2**31)], Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        validation_alias=AliasChoices("layer_name", "layer"),
        description="5, 'layers.5', 'model.layers.5', 'transformer.h.5', 'blocks.5', 'embedding', 'final_norm', "
        "or a TransformerLens name such as 'blocks.5.hook_resid_post'.",
    )
    component: Optional[ComponentType] = None
    # Hook ids name tensors in safetensors files and keys in JSON; keep them plain.
    hook_id: Optional[Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]] = None
    capture_input: bool = False
    capture_output: bool = True

    def to_engine(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "layer_name": self.layer_name,
            "capture_input": self.capture_input,
            "capture_output": self.capture_output,
        }
        if self.component is not None:
            spec["component"] = self.component.value
        if self.hook_id is not None:
            spec["hook_id"] = self.hook_id
        return spec


class CaptureHookSpec(HookSpec):
    """A hook of one request; `edit` places it before or after an intervention at the same hook point."""

    edit: Optional[Literal["before", "after"]] = Field(
        default=None,
        description="Where an intervention edits this hook point too: capture the tensor 'before' the edit or "
        "'after' it (the default, what the rest of the model sees). Ignored where nothing is edited.",
    )

    def to_engine(self) -> dict[str, Any]:
        spec = super().to_engine()
        if self.edit is not None:
            spec["edit"] = self.edit
        return spec


# A hook is a spec object or just a name ("blocks.5.hook_resid_post"); the tags keep
# validation errors about one form from being reported against the other.
HOOK_NAME_TAG, HOOK_SPEC_TAG = "name", "spec"
HookName = Annotated[str, Field(min_length=1, max_length=200)]


def _hook_tag(value: Any) -> str:
    return HOOK_NAME_TAG if isinstance(value, str) else HOOK_SPEC_TAG


HookRequestItem = Annotated[
    Union[Annotated[HookName, Tag(HOOK_NAME_TAG)], Annotated[CaptureHookSpec, Tag(HOOK_SPEC_TAG)]],
    Discriminator(_hook_tag),
]
# Registered hooks serve later requests whatever they edit, so they carry no `edit`.
RegisteredHookItem = Annotated[
    Union[Annotated[HookName, Tag(HOOK_NAME_TAG)], Annotated[HookSpec, Tag(HOOK_SPEC_TAG)]],
    Discriminator(_hook_tag),
]
HookList_ = Annotated[list[HookRequestItem], Field(max_length=MAX_HOOKS)]


def hooks_to_engine(hooks: Optional[list[Any]]) -> list[Any]:
    return [h.to_engine() if isinstance(h, HookSpec) else h for h in hooks or []]


# ----------------------------------------------------------------------------- interventions

# Arrays arrive as nested JSON lists (rank 1 to 3) or as a wire-format object; a
# discriminator picks the form by looking, so an error names only the form that was sent.
ARRAY_TAGS = ("rank1", "rank2", "rank3", "encoded", "base64")
POSITION_TAGS = ("set", "list")
Number = float  # strict mode still takes JSON integers for a float
Rank1 = Annotated[list[Number], Field(min_length=1)]
Rank2 = Annotated[list[Rank1], Field(min_length=1)]
Rank3 = Annotated[list[Rank2], Field(min_length=1)]


def _rank_tag(value: Any) -> str:
    depth = 0
    while isinstance(value, list) and value:
        depth += 1
        value = value[0]
    return f"rank{min(max(depth, 1), 3)}"


def _array_tag(value: Any) -> str:
    return "encoded" if isinstance(value, dict) else _rank_tag(value)


def _data_tag(value: Any) -> str:
    return "base64" if isinstance(value, str) else _rank_tag(value)


NestedNumbers = Union[Annotated[Rank1, Tag("rank1")], Annotated[Rank2, Tag("rank2")], Annotated[Rank3, Tag("rank3")]]


class WireArray(StrictModel):
    """An array in the activation wire format (ARCHITECTURE.md, Wire formats).

    `data` is the base64 of the raw little-endian bytes in `dtype` (bfloat16 as its
    16-bit pattern), or nested lists of numbers; `encoding` may be left out, the form of
    `data` tells. A capture or steering vector from a response can be sent back as is.
    """

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"shape": [4], "dtype": "float32", "data": "AACAPwAAAEAAAEBAAACAQA=="}]}
    )

    shape: Annotated[list[Annotated[int, Field(ge=1, le=2**31)]], Field(min_length=1, max_length=3)]
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    encoding: Optional[Literal["base64", "json"]] = None
    data: Annotated[
        Union[Annotated[str, Tag("base64")], Annotated[Rank1, Tag("rank1")], Annotated[Rank2, Tag("rank2")], Annotated[Rank3, Tag("rank3")]],
        Discriminator(_data_tag),
    ]

    @model_validator(mode="after")
    def _encoding_matches_data(self) -> "WireArray":
        given = "base64" if isinstance(self.data, str) else "json"
        if self.encoding is not None and self.encoding != given:
            raise ValueError(f"encoding is {self.encoding!r} but data is {'a string' if given == 'base64' else 'a list'}")
        return self


ArrayInput = Annotated[
    Union[Annotated[Rank1, Tag("rank1")], Annotated[Rank2, Tag("rank2")], Annotated[Rank3, Tag("rank3")], Annotated[WireArray, Tag("encoded")]],
    Discriminator(_array_tag),
]
TokenPosition = Annotated[int, Field(ge=0, le=2**31)]
Positions = Annotated[
    Union[
        Annotated[Literal["all", "prompt", "generated"], Tag("set")],
        Annotated[list[TokenPosition], Field(min_length=1, max_length=1 << 20), Tag("list")],
    ],
    Discriminator(lambda v: "list" if isinstance(v, list) else "set"),
]
FeatureList = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=1 << 20)]
EditableComponent = Literal["embedding", "residual", "attention", "mlp", "layernorm", "query", "key", "value", "z"]
InterventionOp = Literal["add", "zero", "mean", "clamp", "scale", "patch"]
LayerName = Union[Annotated[int, Field(ge=-(2**31), le=2**31)], Annotated[str, Field(min_length=1, max_length=200)]]


class Intervention(StrictModel):
    """One edit of a hook point's tensor while the model runs (mlx_engine.interventions).

    Ops: add (x + scale * vector), zero, mean (a mean vector from `values` or a stored
    capture), clamp (`min`/`max`), scale, patch (a stored capture's or `values`' rows at
    the same positions). Which fields an op takes, and every shape, are checked against
    the model before generating; a mistake is a 400 with code `invalid_intervention`.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"layer_name": 1, "component": "residual", "op": "add", "vector": [0.5, -1.0], "scale": 4.0, "positions": "generated"},
                {"layer_name": 0, "component": "z", "op": "zero", "heads": [1]},
                {"layer_name": 1, "component": "residual", "op": "patch", "capture_id": "cap-0123", "positions": [3, 4]},
            ]
        }
    )

    layer_name: LayerName = Field(
        validation_alias=AliasChoices("layer_name", "layer"),
        description="Named as in activation_hooks: 5, 'layers.5', 'model.layers.5', 'embedding', "
        "or a TransformerLens name such as 'blocks.5.hook_resid_post'.",
    )
    component: Optional[EditableComponent] = None
    capture_input: bool = False
    op: InterventionOp
    positions: Positions = Field(
        default="all",
        description="'all', 'prompt', 'generated' (from the first generated token's own position), "
        "or absolute token positions.",
    )
    vector: Optional[ArrayInput] = Field(
        default=None,
        description="add: one position's shape ([d_model], or [n_heads, head_dim] / [head_dim] on query, key, value, z).",
    )
    scale: Optional[Number] = Field(default=None, description="add: the vector's factor (default 1); scale: the factor.")
    indices: Optional[FeatureList] = Field(default=None, description="Features along the last axis to edit (default all).")
    heads: Optional[FeatureList] = Field(default=None, description="Heads of query, key, value or z to edit (default all).")
    min: Optional[Number] = None
    max: Optional[Number] = None
    values: Optional[ArrayInput] = Field(
        default=None, description="mean: a mean vector, or rows to average; patch: rows for positions 0..T-1."
    )
    capture_id: Optional[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default=None, description="mean, patch: a capture this server stored for an earlier response (its capture_id)."
    )
    capture_hook: Optional[Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]] = Field(
        default=None,
        description="The hook id inside that capture to read; by default the intervention's own hook id.",
    )


InterventionList = Annotated[list[Intervention], Field(max_length=MAX_INTERVENTIONS)]


# ----------------------------------------------------------------------------- chat


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextContentPart], Field(min_length=1)]]
    name: Optional[Annotated[str, Field(max_length=256)]] = None
    # Clients that append a previous answer to the history send these back; like OpenAI,
    # the earlier reasoning is not shown to the model again.
    reasoning_content: Optional[str] = None
    refusal: Optional[str] = None

    def to_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class SamplingFields(StrictModel):
    """Fields shared by chat and text completions."""

    model: Optional[ModelName] = Field(default=None, description="A loaded model id; the only loaded model if omitted.")
    max_tokens: Optional[PositiveInt] = None
    # OpenAI's API takes null for these; null means the default.
    temperature: Optional[Temperature] = 1.0
    top_p: Optional[TopP] = 1.0
    seed: Optional[Seed] = None
    stop: Optional[Stop] = None
    n: Optional[int] = Field(default=None, json_schema_extra={"minimum": 1, "maximum": 1}, description="Only 1 is supported.")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[Annotated[str, Field(max_length=512)]] = None
    frequency_penalty: Optional[Penalty] = None
    presence_penalty: Optional[Penalty] = None
    interventions: Optional[InterventionList] = Field(
        default=None,
        description="Edits applied while generating (steering, ablation, patching), in order; captures "
        "requested in the same call see the edited model.",
    )

    @field_validator("n")
    @classmethod
    def check_n(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value != 1:
            raise ValueError("n must be 1: this server generates one choice per request")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def check_penalty(cls, value: Optional[float]) -> Optional[float]:
        if value not in (None, 0.0):
            raise ValueError("penalties are not supported; leave it out or send 0")
        return value

    @field_validator("max_tokens")
    @classmethod
    def check_max_tokens(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        return _check_max_tokens(value, info)

    @model_validator(mode="after")
    def _nulls_mean_defaults(self) -> "SamplingFields":
        """Replace nulls with defaults, then check stream_options belongs to a stream."""
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("stream", False)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def sampling(self) -> dict[str, Any]:
        """temperature, top_p and seed for a GenerationPlan (nulls already replaced by defaults)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. `activation_hooks` may ride along (the SDK's extra_body)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0},
                {"messages": [{"role": "user", "content": "Hello!"}], "stream": True, "logprobs": True, "top_logprobs": 2},
                {
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "activation_hooks": [{"layer_name": 0, "component": "residual"}],
                    "activation_format": "base64",
                },
                {
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "interventions": [{"layer_name": 0, "component": "mlp", "op": "scale", "scale": 0.5, "positions": "generated"}],
                },
            ]
        }
    )

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Optional[PositiveInt] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    activation_hooks: Optional[HookList_] = None
    activation_format: ActivationFormat = "json"

    @field_validator("max_completion_tokens")
    @classmethod
    def check_max_completion_tokens(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        return _check_max_tokens(value, info)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.logprobs is None:
            self.logprobs = False
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ActivationChatRequest(ChatCompletionRequest):
    """POST /v1/chat/completions/with_activations: without hooks, the registered ones are used."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "activation_hooks": [
                        {"layer_name": 0, "component": "residual"},
                        "blocks.0.attn.hook_pattern",
                    ],
                    "activation_format": "json",
                },
                {
                    "messages": [{"role": "user", "content": "Hello!"}],
                    "activation_hooks": [{"layer_name": "model.layers.0", "component": "mlp", "capture_input": True}],
                    "activation_format": "none",
                    "stream": True,
                },
            ]
        }
    )


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=1 << 20)]


class CompletionRequest(SamplingFields):
    """POST /v1/completions: raw text (or token ids) in, text out; no chat template."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"prompt": "def main():", "logprobs": 2}, {"prompt": [1, 2, 3], "stream": True}]}
    )

    prompt: Union[
        Annotated[str, Field(min_length=1)],
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)],
        TokenIds,
        Annotated[list[TokenIds], Field(min_length=1, max_length=1)],
    ] = Field(description="One prompt: a string or a list of token ids (a one-element batch is accepted).")
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None
    echo: Literal[False] = False

    @property
    def prompt_value(self) -> Union[str, list[int]]:
        """The one prompt, unwrapped from a one-element batch."""
        p: Any = self.prompt
        return p[0] if isinstance(p, list) and isinstance(p[0], (str, list)) else p


# ----------------------------------------------------------------------------- steering vectors

SteeringPrompt = Union[Annotated[str, Field(min_length=1)], TokenIds]
SteeringPrompts = Annotated[list[SteeringPrompt], Field(min_length=1, max_length=MAX_STEERING_PROMPTS)]


class SteeringVectorRequest(StrictModel):
    """POST /v1/steering/vectors: mean residual of `positive` prompts minus that of `negative` ones."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"layer_name": 1, "positive": ["I love this.", "What a joy!"], "negative": ["I hate this.", "How awful."]},
                {"layer_name": "model.layers.0", "component": "residual", "positive": ["yes"], "negative": ["no"], "position": "last", "format": "base64"},
            ]
        }
    )

    model: Optional[ModelName] = Field(default=None, description="A loaded model id; the only loaded model if omitted.")
    layer_name: LayerName = Field(
        validation_alias=AliasChoices("layer_name", "layer"),
        description="The layer whose tensor is averaged, named as in activation_hooks.",
    )
    component: Literal["residual", "attention", "mlp", "layernorm", "embedding"] = "residual"
    capture_input: bool = False
    positive: SteeringPrompts = Field(description="Prompts with the property: strings (tokenized as is, no chat template) or token ids.")
    negative: SteeringPrompts = Field(description="Prompts without it.")
    position: Literal["mean", "last"] = Field(
        default="mean",
        description="'mean': each prompt's positions are averaged (a leading BOS left out with drop_bos); "
        "'last': each prompt's last position only. Then the prompts are averaged.",
    )
    drop_bos: bool = True
    format: Literal["json", "base64"] = Field(default="json", description="How `vector` is encoded (the activation wire formats).")


# ----------------------------------------------------------------------------- hook registry and models


class HookRegistrationRequest(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"hooks": ["blocks.0.hook_resid_post", {"layer_name": 0, "component": "query", "hook_id": "q0"}]}]}
    )

    model: Optional[ModelName] = None
    hooks: Annotated[list[RegisteredHookItem], Field(min_length=1, max_length=MAX_HOOKS)]


class HookQuery(StrictModel):
    model: Optional[ModelName] = None
    hook_id: Optional[Annotated[str, Field(min_length=1, max_length=200)]] = None


class ModelLoadRequest(StrictModel):
    model: ModelName = Field(
        description="A folder under one of the server's --model-root folders (relative to it, or an absolute "
        "path inside it), or a Hugging Face repo id 'owner/name'."
    )


class ModelUnloadRequest(StrictModel):
    model: ModelName


# ----------------------------------------------------------------------------- responses (documentation)


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


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CaptureWire(Open):
    """One capture on the wire (ARCHITECTURE.md, Wire formats)."""

    hook_id: str
    layer_name: str
    layer: Optional[int]
    component: str
    step: int
    positions: list[int]
    key_positions: Optional[list[int]] = None
    is_input: bool
    shape: list[int]
    dtype: str
    encoding: str
    data: Any = None
    edit: Optional[Literal["before", "after"]] = Field(
        default=None, description="Present where an intervention edits the same hook point: the tensor before or after the edit."
    )


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


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (`data: {chunk}`), before `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    interventions: Optional[list[AppliedIntervention]] = None
    capture_id: Optional[str] = None
    activations: Optional[Activations] = None
    token_id: Optional[int] = None
    token_text: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_tokens_text: Optional[list[str]] = None


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
    failed_generations: int


class CaptureStoreStatus(BaseModel):
    items: int
    bytes: int
    max_items: int
    max_bytes: int


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    models: list[str]
    engine: EngineStatus
    capture_store: CaptureStoreStatus
