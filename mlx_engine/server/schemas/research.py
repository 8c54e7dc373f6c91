"""Request schemas of the research routes: activation stores, analyses on a loaded model, attached SAEs.

Query strings arrive as text, so the store queries validate in lax mode (`"3"` is the integer 3)
but still refuse unknown parameters; bodies are strict like every other request. The limits here
bound what one request may ask of the engine thread (see routes/analysis.py for the work caps).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import Annotated

from .common import StrictModel

MAX_TOP_K = 100
MAX_EXAMPLES = 100
MAX_CONTEXT = 64
MAX_NGRAM = 8
MAX_BINS = 1024
MAX_POLY_TOP = 500
MAX_POLY_NEURONS = 4096  # neurons named in one polysemantic request
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=1 << 16)]
Prompt = Union[Annotated[str, Field(min_length=1, max_length=1 << 20)], TokenIds]
Token = Union[Annotated[int, Field(ge=0, le=2**31)], Annotated[str, Field(min_length=1, max_length=200)]]
ModelName = Annotated[str, Field(min_length=1, max_length=500)]
HookName = Annotated[str, Field(min_length=1, max_length=200)]


class LaxQuery(BaseModel):
    """A query string: numbers given as text are converted; an unknown parameter is an error."""

    model_config = ConfigDict(extra="forbid")


class StoreStatsQuery(LaxQuery):
    hook: HookName = Field(description="A hook id the store holds (GET /v1/stores lists them).")


class TopExamplesQuery(LaxQuery):
    hook: HookName = Field(description="A hook id the store holds.")
    neuron: int = Field(ge=0, le=2**31, description="The neuron (column) of the hook.")
    k: Optional[int] = Field(default=None, ge=1, le=MAX_EXAMPLES, description="Examples to return (default: all the store kept).")
    context: int = Field(default=8, ge=0, le=MAX_CONTEXT, description="Positions of context on each side of the peak.")


class ReverseQuery(LaxQuery):
    hook: Optional[HookName] = Field(default=None, description="The hook to read (an n-gram query: default every hook).")
    ngram: Optional[Annotated[str, Field(min_length=1, max_length=400)]] = Field(
        default=None, description="n-gram -> neurons: token ids ('#12 #40', or '12,40') or text (the store's tokenizer)."
    )
    neuron: Optional[int] = Field(default=None, ge=0, le=2**31, description="neuron -> n-grams: the column of `hook`.")
    n: int = Field(default=3, ge=1, le=MAX_NGRAM, description="neuron -> n-grams: n-grams of 1..n tokens.")
    k: int = Field(default=10, ge=1, le=MAX_TOP_K, description="Entries per ranking.")
    min_count: int = Field(default=2, ge=1, le=1 << 20, description="neuron -> n-grams: occurrences an n-gram (n > 1) needs.")


class DistributionQuery(LaxQuery):
    hook: HookName = Field(description="A hook id the store holds.")
    neuron: int = Field(ge=0, le=2**31, description="The neuron (column) of the hook.")
    bins: int = Field(default=64, ge=1, le=MAX_BINS, description="Equal bins between the neuron's online min and max.")


class PolysemanticQuery(LaxQuery):
    hook: HookName = Field(description="A hook id the store holds.")
    top: int = Field(default=20, ge=1, le=MAX_POLY_TOP, description="Ranked neurons returned (the ranking covers all scored).")
    neurons: Optional[Annotated[str, Field(min_length=1, max_length=8 * MAX_POLY_NEURONS, pattern=r"^[0-9]+(,[0-9]+)*$")]] = Field(
        default=None, description=f"Neurons to score, as '3,17,40' (at most {MAX_POLY_NEURONS}); default every neuron of the hook.")
    k: Optional[int] = Field(default=None, ge=2, le=MAX_EXAMPLES, description="Top examples clustered per neuron (default: all the store kept).")
    distance: float = Field(default=0.5, gt=0.0, le=2.0, description="The cosine distance at which clusters stop merging.")

    def neuron_list(self) -> Optional[list[int]]:
        """The `neurons` asked for, in order, as integers (None: every neuron)."""
        return None if self.neurons is None else [int(n) for n in self.neurons.split(",")]


class LogitLensRequest(StrictModel):
    """POST /v1/analysis/logit_lens: mlx_engine.analysis.logit_lens on a loaded model."""

    model: Optional[ModelName] = None
    prompt: Prompt = Field(description="Text (tokenized without a chat template) or token ids.")
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description="Tokens listed per layer and position.")


class AttributionRequest(StrictModel):
    """POST /v1/analysis/attribution: direct logit attribution of logit(target) - logit(foil)."""

    model: Optional[ModelName] = None
    prompt: Prompt
    target: Optional[Token] = Field(default=None, description="An id, a vocabulary entry or one-token text (default: the top token).")
    foil: Optional[Token] = Field(default=None, description="As target (default: the runner-up).")
    position: int = Field(default=-1, ge=-(2**31), le=2**31, description="The position read (negative: from the end).")


class HeadsRequest(StrictModel):
    """POST /v1/analysis/heads: pattern scores on a repeated random sequence, and on `prompt` when given."""

    model: Optional[ModelName] = None
    prompt: Optional[Prompt] = Field(default=None, description="A text for entropy, previous-token and importance scores.")
    repeat_length: int = Field(default=20, ge=2, le=512, description="Length of the random sequence that is repeated.")
    seed: int = Field(default=0, ge=0, le=2**31)
    importance: bool = Field(default=False, description="Ablate each head (zero and mean) on `prompt`: 2 x layers x heads passes.")


class PatchingRequest(StrictModel):
    """POST /v1/analysis/patching: restore each site from the clean run into the corrupted one."""

    model: Optional[ModelName] = None
    clean: Prompt
    corrupted: Optional[Prompt] = Field(default=None, description="A prompt of as many tokens as `clean`; or give noise_positions.")
    noise_positions: Optional[Annotated[list[Annotated[int, Field(ge=-(2**31), le=2**31)]], Field(min_length=1, max_length=4096)]] = None
    component: Literal["residual", "attention", "mlp", "resid_mid", "z"] = "residual"
    metric: Literal["logit_diff", "prob"] = "logit_diff"
    target: Optional[Token] = None
    foil: Optional[Token] = None
    position: int = Field(default=-1, ge=-(2**31), le=2**31)
    layers: Optional[Annotated[list[Annotated[int, Field(ge=-(2**31), le=2**31)]], Field(min_length=1, max_length=4096)]] = None
    positions: Optional[Annotated[list[Annotated[int, Field(ge=-(2**31), le=2**31)]], Field(min_length=1, max_length=4096)]] = None
    heads: Optional[Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(min_length=1, max_length=4096)]] = None
    seed: int = Field(default=0, ge=0, le=2**31)


class SAEAttachRequest(StrictModel):
    """POST /v1/models/{model_id}/saes: an SAE folder under a --sae-root or model root, or a Hub repo id."""

    source: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="A folder under one of the server's --sae-root (or --model-root) folders, relative to it, "
        "or a Hugging Face repo id 'owner/name' (unless the server runs with --no-hub)."
    )
    folder: Optional[Annotated[str, Field(min_length=1, max_length=300)]] = Field(
        default=None, description="A subfolder of the source (a repo holding many SAEs).")
    hook: Optional[HookName] = Field(default=None, description="Attach here instead of the hook the SAE's cfg.json names.")
    top_k: Optional[int] = Field(default=None, ge=1, le=1 << 20, description="Capture only the k largest features per position.")


class Open(BaseModel):
    """A JSON object whose fields are the Python function's own (documented on the route)."""

    model_config = ConfigDict(extra="allow")


class StoreStatsResponse(Open):
    store: str
    hook: str
    summary: dict[str, Any] = Field(description="mlx_engine.analysis.neurons.layer_summary of the hook.")
    neurons: list[dict[str, Any]] = Field(description="neuron_table(store, hook).rows(): one row per neuron.")


class TopExamplesResponse(Open):
    store: str
    hook: str
    neuron: int
    examples: list[dict[str, Any]] = Field(description="Neuronpedia's fields: tokens, values, maxValue, maxValueTokenIndex.")


class ReverseResponse(Open):
    store: str
    count: Optional[int] = Field(default=None, description="n-gram -> neurons: the n-gram's occurrences.")
    hooks: Optional[dict[str, Any]] = Field(default=None, description="n-gram -> neurons: per hook, the neurons ranked.")
    ngrams: Optional[dict[str, list[dict[str, Any]]]] = Field(default=None, description="neuron -> n-grams: per length.")


class DistributionResponse(Open):
    store: str
    hook: str
    neuron: int
    edges: list[float] = Field(description="bins + 1 bin edges, between the neuron's online min and max.")
    counts: list[int] = Field(description="np.histogram counts of the sampled rows in each bin.")
    range: list[float] = Field(description="[first edge, last edge].")
    q1: Optional[float]
    median: Optional[float]
    q3: Optional[float]
    sample_rows: int = Field(description="Rows the histogram counts (every row when the store is small enough).")
    total_rows: int


class PolysemanticResponse(Open):
    store: str
    hook: str
    scored: int = Field(description="Neurons scored and ranked; `neurons` holds the first `top` of them.")
    neurons: list[dict[str, Any]] = Field(description="polysemanticity(...) rows in rank order: clusters, token_entropy, "
                                          "distinct_tokens, examples, rank, cluster_examples.")


class LogitLensResponse(Open):
    model: str
    tokens: list[int]
    layers: list[str]
    top_strings: list[Any]
    top_probs: list[Any]
    next_rank: list[Any]


class AttributionResponse(Open):
    model: str
    total: float
    terms: list[dict[str, Any]]
    target_string: str
    foil_string: str


class HeadScoresResponse(Open):
    model: str
    tables: dict[str, Any]
    ranked: dict[str, Any]


class PatchingResponse(Open):
    model: str
    fractions: list[list[Optional[float]]]
    layers: list[int]
    columns: list[int]
    clean_metric: float
    corrupted_metric: float


class SAEObject(Open):
    id: str
    hook_id: str
    site: str
    d_sae: int
    top_k: Optional[int]


class SAEList(BaseModel):
    object: Literal["list"]
    model: str
    data: list[dict]


class StoreList(BaseModel):
    object: Literal["list"]
    data: list[dict]

