"""Hook and intervention request schemas: what `activation_hooks` and `interventions` may hold.

Arrays arrive as nested JSON lists or as a wire-format object; discriminators pick the
form by looking, so a validation error names only the form that was sent.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import AliasChoices, ConfigDict, Discriminator, Field, Tag, model_validator
from typing_extensions import Annotated

from ...hooks.components import EDITABLE_COMPONENTS, ComponentType
from ...interventions.spec import OPS, POSITION_SETS
from .common import MAX_HOOKS, MAX_INTERVENTIONS, StrictModel


# ----------------------------------------------------------------------------- hooks

SAEName = Annotated[str, Field(min_length=1, max_length=200)]
SAE_DOC = ("An SAE attached to the model (its id in GET /v1/models/{model_id}/saes, e.g. 'layers.1.residual.sae_features'): "
           "its features, instead of layer_name and component.")


def with_sae_site(spec: Any) -> Any:
    """`sae` is shorthand for the SAE's feature hook: layer_name = the SAE id, component sae_features."""
    if spec.sae is None:
        if spec.layer_name is None:
            raise ValueError("give layer_name (a layer or hook name), or sae (an attached SAE's id)")
        return spec
    if spec.layer_name is not None:
        raise ValueError("give layer_name or sae, not both: sae names the SAE's feature hook")
    if spec.component not in (None, ComponentType.SAE_FEATURES, ComponentType.SAE_FEATURES.value):
        raise ValueError(f"sae names the SAE's features; component must be left out or 'sae_features', not {spec.component!r}")
    spec.layer_name, spec.component = spec.sae, ComponentType.SAE_FEATURES
    return spec



class HookSpec(StrictModel):
    """One activation hook: a layer name (or TransformerLens hook name) and a component."""

    layer_name: Optional[Union[Annotated[int, Field(ge=-(2**31), le=2**31)], Annotated[str, Field(min_length=1, max_length=200)]]] = Field(
        default=None,
        validation_alias=AliasChoices("layer_name", "layer"),
        description="5, 'layers.5', 'model.layers.5', 'transformer.h.5', 'blocks.5', 'embedding', 'final_norm', "
        "or a TransformerLens name such as 'blocks.5.hook_resid_post'. Required unless `sae` is given.",
    )
    component: Optional[ComponentType] = None
    sae: Optional[SAEName] = Field(default=None, description=SAE_DOC)
    # Hook ids name tensors in safetensors files and keys in JSON; keep them plain.
    hook_id: Optional[Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")]] = None
    capture_input: bool = False
    capture_output: bool = True
    indices: Optional[Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=1 << 20)]] = Field(
        default=None, description="Capture only these features of the last axis (e.g. chosen neurons of mlp_post)."
    )
    positions: Optional[
        Union[Literal["last"], Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=1 << 20)]]
    ] = Field(default=None, description="Capture only these token positions ('last': each pass's last position).")
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = Field(default=None, description="Capture in this dtype.")

    @model_validator(mode="after")
    def _sae_names_the_site(self) -> "HookSpec":
        return with_sae_site(self)


class CaptureHookSpec(HookSpec):
    """A hook of one request; `edit` places it before or after an intervention at the same hook point."""

    edit: Optional[Literal["before", "after"]] = Field(
        default=None,
        description="Where an intervention edits this hook point too: capture the tensor 'before' the edit or "
        "'after' it (the default, what the rest of the model sees). Ignored where nothing is edited.",
    )


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
    """An array in the activation wire format (docs/architecture.md, Wire formats).

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
PositionSet = Literal[POSITION_SETS]  # type: ignore[valid-type]
Positions = Annotated[
    Union[
        Annotated[PositionSet, Tag("set")],
        Annotated[list[TokenPosition], Field(min_length=1, max_length=1 << 20), Tag("list")],
    ],
    Discriminator(lambda v: "list" if isinstance(v, list) else "set"),
]
FeatureList = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=1 << 20)]
EditableComponent = Literal[tuple(c.value for c in EDITABLE_COMPONENTS)]  # type: ignore[valid-type]
InterventionOp = Literal[tuple(OPS)]  # type: ignore[valid-type]

LayerName = Union[Annotated[int, Field(ge=-(2**31), le=2**31)], Annotated[str, Field(min_length=1, max_length=200)]]


class Intervention(StrictModel):
    """One edit of a hook point's tensor while the model runs (mlx_engine.interventions).

    Ops: add (x + scale * vector), zero, mean (a mean vector from `values` or a stored
    capture), clamp (`min`/`max`), scale, patch (a stored capture's or `values`' rows at
    the same positions), topk (keep the `k` largest-magnitude features per position). Which fields an op takes, and every shape, are checked against
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

    layer_name: Optional[LayerName] = Field(
        default=None,
        validation_alias=AliasChoices("layer_name", "layer"),
        description="Named as in activation_hooks: 5, 'layers.5', 'model.layers.5', 'embedding', "
        "or a TransformerLens name such as 'blocks.5.hook_resid_post'. Required unless `sae` is given.",
    )
    component: Optional[EditableComponent] = None
    sae: Optional[SAEName] = Field(default=None, description=SAE_DOC + " Edits then act on features (indices).")
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
    k: Optional[Annotated[int, Field(ge=1, le=2**31)]] = Field(default=None, description="topk: features kept per position.")
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

    @model_validator(mode="after")
    def _sae_names_the_site(self) -> "Intervention":
        return with_sae_site(self)


InterventionList = Annotated[list[Intervention], Field(max_length=MAX_INTERVENTIONS)]
