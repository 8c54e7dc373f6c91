"""Request schemas: the one place a request body is parsed.

Requests are validated strictly (a string is not a number, unknown fields are errors)
so a client's mistake comes back as a 400 naming the field instead of being guessed
at. Fields OpenAI clients commonly send and we cannot honour are declared so their
error says why (`n` must be 1; penalties must be 0). The vocabularies (components,
ops, position sets) come from the engine's own definitions, so the schema and the
engine cannot disagree.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import AliasChoices, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from typing_extensions import Annotated

from ...hooks.components import DIRECTION_COMPONENTS
from ...wire.codec import FORMATS
from .common import MAX_HOOKS, MAX_STEERING_PROMPTS, MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS, StrictModel
from .hooks_and_edits import HookList_, InterventionList, LayerName, RegisteredHookItem

ActivationFormat = Literal[FORMATS]  # type: ignore[valid-type]


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


class CaptureFields(StrictModel):
    """What asks for activations, the same in chat and text requests: the hooks, and how captures are encoded."""

    activation_hooks: Optional[HookList_] = None
    activation_format: ActivationFormat = "json"


class ChatCompletionRequest(CaptureFields, SamplingFields):
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


class ActivationCompletionRequest(CaptureFields, CompletionRequest):
    """POST /v1/completions/with_activations: a raw prompt (no chat template) with activations; without
    hooks, the registered ones are used."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "The cat sat on the", "max_tokens": 4, "activation_hooks": [{"layer_name": 0, "component": "residual"}]},
                {"prompt": [1, 2, 3], "activation_hooks": ["blocks.0.attn.hook_pattern"], "activation_format": "base64", "stream": True},
            ]
        }
    )


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
    component: Literal[tuple(c.value for c in DIRECTION_COMPONENTS)] = "residual"  # type: ignore[valid-type]
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
