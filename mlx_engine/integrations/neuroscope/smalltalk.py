"""Generate the NeuroScope Smalltalk client as one file-in source per dialect.

One client, three dialects: Pharo (ZnClient + STON), Squeak (WebClient + the JSON
package) and Amber (Smalltalk on JavaScript: the host's `fetch` and `JSON`). Everything
but the transport layer is shared source: the endpoint methods are generated from
`endpoints.ENDPOINTS`, the hook presets from `presets`, and the conversion to
NeuroScope's format mirrors `format.py`.

Amber is asynchronous (fetch answers a Promise), so the shared code never uses a
response directly: it goes through `when:do:`, which in Pharo and Squeak applies the
block to the value at once and in Amber chains it onto the Promise. The same shared
source therefore answers values in Pharo and Squeak and Promises in Amber. The SUnit
tests are shared the same way through `check:then:`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...wire.fields import REQUIRED_FIELD_NAMES
from .endpoints import ENDPOINTS, Endpoint
from .presets import ATTENTION_COMPONENTS, CIRCUIT_COMPONENTS
from .smalltalk_dialects import DIALECT_BY_NAME, Dialect
from .smalltalk_requests import ARGUMENT_CONVERSION, QUERY_METHODS, body_plan, path_expression
from .smalltalk_analysis import conversion_methods as analysis_conversion_methods
from .smalltalk_source import ClassSpec, Method, escape_chunk, method, st_literal, st_string, st_string_array
from .smalltalk_streaming import TRANSPORT as STREAM_TRANSPORT
from .smalltalk_streaming import shared_methods as streaming_methods
from .smalltalk_research_tests import SAE_SOURCE, STORE, STORE_HOOK, research_test_methods
from .smalltalk_tests import CLIENT_CLASS, test_methods

DIALECTS: tuple[str, ...] = ("pharo", "squeak", "amber")
COMPAT_CLASS = "LMStudioRESTClient"
TEST_CLASS = "NeuroScopeMLXClientTest"
CATEGORY = "NeuroScope-Integration"
TEST_CATEGORY = "NeuroScope-Integration-Tests"
DEFAULT_BASE_URL = "http://127.0.0.1:8080"
CLIENT_IVARS: tuple[str, ...] = ("baseUrl", "apiKey", "model")


# ----------------------------------------------------------------------------- shared methods


def _accessing_methods(base_url: str) -> list[Method]:
    return [
        method("instance creation", f"""
default
    "A client of the server this file was generated for."
    ^ self new baseUrl: {st_string(base_url)}
""", class_side=True),
        method("accessing", """
baseUrl
    ^ baseUrl
"""),
        method("accessing", """
baseUrl: aString
    "The server's root URL; a trailing slash is dropped so paths can be appended."
    baseUrl := (aString notEmpty and: [ aString last = $/ ])
        ifTrue: [ aString allButLast ]
        ifFalse: [ aString ]
"""),
        method("accessing", """
apiKey: aString
    "Sent as a Bearer token when the server was started with an API key."
    apiKey := aString
"""),
        method("accessing", """
model
    ^ model
"""),
        method("accessing", """
model: aString
    "The model requests name; loadModel: sets it too."
    model := aString
"""),
        method("private", """
currentModel
    "The chosen model, else the server's first loaded one (remembered)."
    model isNil ifFalse: [ ^ model ].
    ^ self when: self models do: [ :json |
        model := ((json at: 'data') first) at: 'id'.
        model ]
"""),
        method("private", """
modelQuery
    model isNil ifTrue: [ ^ '' ].
    ^ '?model=' , model
"""),
        method("private", """
handleStatus: anInteger body: aString
    "The parsed JSON of a 2xx answer; otherwise an error carrying the server's message."
    | json error |
    json := self parseJson: aString.
    (anInteger between: 200 and: 299) ifTrue: [ ^ json ].
    error := json at: 'error' ifAbsent: [ nil ].
    ^ self error: 'mlx-engine HTTP ' , anInteger printString , ': ' , (error isNil
        ifTrue: [ aString ]
        ifFalse: [ error at: 'message' ])
"""),
        method("private", """
messagesFrom: messagesOrString
    "A bare string is one user turn."
    | message |
    messagesOrString isString ifFalse: [ ^ messagesOrString asArray ].
    message := Dictionary new.
    message at: 'role' put: 'user'.
    message at: 'content' put: messagesOrString.
    ^ { message }
"""),
    ]


# What a client remembers from an answer, by endpoint name.
_AFTER_RESPONSE = {"load_model": "model := json at: 'id'."}


def _keyword_args(selector: str, args: Sequence[str]) -> tuple[str, list[str]]:
    """A message pattern for `selector` with argument names derived from the field names."""
    keywords = selector.split(":")[:-1]
    names = []
    for a in args:
        camel = a.split("_")[0] + "".join(p.capitalize() for p in a.split("_")[1:])
        # An argument may not shadow an instance variable (`model`).
        names.append("a" + camel[0].upper() + camel[1:] if camel in CLIENT_IVARS else camel)
    pattern = " ".join(f"{k}: {n}" for k, n in zip(keywords, names))
    return pattern, names


def _endpoint_methods(ep: Endpoint) -> list[Method]:
    binding = ep.smalltalk
    pattern, arg_names = _keyword_args(binding.selector, binding.args) if binding.args else (binding.selector, [])
    bound = dict(zip(binding.args, arg_names))
    lines = [pattern, f'    "{ep.method} {ep.path}: {ep.summary.replace(chr(34), chr(39))}"']
    if ep.body:
        lines.append("    | body |")
        lines.append("    body := Dictionary new.")
        for part in body_plan(ep):  # smalltalk_request() reads the same plan for the contract test
            if part.source == "argument":
                value = ARGUMENT_CONVERSION.get(part.field, ("{arg}", None))[0].format(arg=bound[part.field])
                lines.append(f"    body at: {st_string(part.field)} put: {value}.")
            elif part.source == "model":
                lines.append("    model isNil ifFalse: [ body at: 'model' put: model ].")
            else:
                lines.append(f"    body at: {st_string(part.field)} put: {st_literal(part.value)}.")
    body_expr = "body" if ep.body else "nil"
    call = f"self request: {st_string(ep.method)} path: {path_expression(ep, bound, st_literal, st_string)} body: {body_expr}"
    if "{model_id}" in ep.path:
        call = f"self when: self currentModel do: [ :id | {call} ]"
    after = _AFTER_RESPONSE.get(ep.name)
    if after:
        lines.append(f"    ^ self when: ({call}) do: [ :json |")
        lines.append(f"        {after}")
        lines.append("        json ]")
    else:
        lines.append(f"    ^ {call}")
    methods = [method("endpoints", "\n".join(lines))]
    for short in binding.short_selectors:
        n = len(short.split(":")) - 1
        short_pattern, short_names = _keyword_args(short, binding.args[:n])
        full_args = short_names + [st_literal(ep.field(a).default) for a in binding.args[n:]]
        keywords = binding.selector.split(":")[:-1]
        send = " ".join(f"{k}: {v}" for k, v in zip(keywords, full_args))
        defaults = ", ".join(f"{a} {st_literal(ep.field(a).default)}" for a in binding.args[n:])
        methods.append(method("endpoints", f"""
{short_pattern}
    "As {binding.selector} with the clients' defaults: {defaults}."
    ^ self {send}
"""))
    return methods


def _preset_methods() -> list[Method]:
    return [
        method("presets", """
hookSpecLayer: layerName component: component
    | spec |
    spec := Dictionary new.
    spec at: 'layer_name' put: layerName.
    spec at: 'component' put: component.
    ^ spec
"""),
        method("presets", f"""
createCircuitAnalysisHooks: numLayers
    "The embedding, then {', '.join(CIRCUIT_COMPONENTS)} of layers 0 to numLayers - 1 (mlx-engine's circuit preset)."
    | hooks |
    hooks := self newList.
    hooks add: (self hookSpecLayer: 'embedding' component: 'embedding').
    0 to: numLayers - 1 do: [ :layer |
        {st_string_array(CIRCUIT_COMPONENTS)} do: [ :component |
            hooks add: (self hookSpecLayer: 'layers.' , layer printString component: component) ] ].
    ^ hooks asArray
"""),
        method("presets", """
createNeuronHooks: layers component: component indices: indices
    "The MLP neurons of each of layers: component is 'mlp_post' (a dense model) or 'expert_post'
    (a mixture of experts: the routed experts' units); indices, when not nil, asks for those
    neurons only (mlx-engine's neuron preset)."
    | hooks |
    hooks := self newList.
    layers do: [ :layer |
        | spec |
        spec := self hookSpecLayer: 'layers.' , layer printString component: component.
        indices isNil ifFalse: [ spec at: 'indices' put: indices asArray ].
        hooks add: spec ].
    ^ hooks asArray
"""),
        method("presets", f"""
createAttentionAnalysisHooks: layers
    "{', '.join(ATTENTION_COMPONENTS)} of each of layers (mlx-engine's attention preset)."
    | hooks |
    hooks := self newList.
    layers do: [ :layer |
        {st_string_array(ATTENTION_COMPONENTS)} do: [ :component |
            hooks add: (self hookSpecLayer: 'layers.' , layer printString component: component) ] ].
    ^ hooks asArray
"""),
    ]


# The metadata a NeuroScope entry copies from a wire capture: the fields every capture carries.
_ENTRY_KEYS = REQUIRED_FIELD_NAMES


def _conversion_methods() -> list[Method]:
    return [
        method("converting", """
convertActivations: aResponse
    "aResponse is the answer of generateWithActivations:... or completeWithActivations:... Answers
    NeuroScope's activation format (docs/neuroscope-format.md) as a Dictionary: per hook id its captures
    in step order, each with flat row-major data, plus the prompt and generated tokens as strings.
    Infinities and NaN, which JSON spells as strings, become Floats here."
    | result activations choice message |
    result := Dictionary new.
    result at: 'format' put: 'neuroscope-activations'.
    result at: 'version' put: 1.
    result at: 'model' put: (aResponse at: 'model' ifAbsent: [ nil ]).
    choice := (aResponse at: 'choices') first.
    message := choice at: 'message' ifAbsent: [ nil ].
    result at: 'text' put: ((message isNil
        ifTrue: [ choice at: 'text' ifAbsent: [ nil ] ]
        ifFalse: [ message at: 'content' ifAbsent: [ nil ] ]) ifNil: [ '' ]).
    result at: 'prompt_tokens' put: (aResponse at: 'prompt_tokens_text' ifAbsent: [ {} ]).
    result at: 'generated_tokens' put: (aResponse at: 'generated_tokens_text' ifAbsent: [ {} ]).
    result at: 'prompt_token_ids' put: (aResponse at: 'prompt_token_ids' ifAbsent: [ {} ]).
    result at: 'generated_token_ids' put: (aResponse at: 'generated_token_ids' ifAbsent: [ {} ]).
    activations := Dictionary new.
    (aResponse at: 'activations') keysAndValuesDo: [ :hookId :captures |
        activations at: hookId put: (captures collect: [ :each | self convertCapture: each ]) ].
    result at: 'activations' put: activations.
    ^ result
"""),
        method("converting", f"""
convertCapture: aCapture
    "One wire capture as a NeuroScope entry with flat data (and flat router extras)."
    | entry extras |
    entry := Dictionary new.
    {st_string_array(_ENTRY_KEYS)} do: [ :key |
        entry at: key put: (aCapture at: key ifAbsent: [ nil ]) ].
    entry at: 'data' put: (self flatValues: (aCapture at: 'data' ifAbsent: [ nil ])).
    extras := Dictionary new.
    {{ 'experts'. 'weights' }} do: [ :key |
        (aCapture includesKey: key) ifTrue: [
            | extra |
            extra := Dictionary new.
            extra at: 'shape' put: ((aCapture at: key) at: 'shape').
            extra at: 'dtype' put: ((aCapture at: key) at: 'dtype').
            extra at: 'data' put: (self flatValues: ((aCapture at: key) at: 'data')).
            extras at: key put: extra ] ].
    extras isEmpty ifFalse: [ entry at: 'extras' put: extras ].
    ^ entry
"""),
        method("converting", """
flatValues: nested
    "Nested JSON lists flattened row-major; nil stays nil (activation_format none)."
    | flat |
    nested isNil ifTrue: [ ^ nil ].
    flat := self newList.
    self flatten: nested into: flat.
    ^ flat asArray
"""),
        method("converting", """
flatten: aValue into: aList
    aValue isNumber ifTrue: [ ^ aList add: aValue ].
    aValue isString ifTrue: [ ^ aList add: (self floatNamed: aValue) ].
    aValue do: [ :each | self flatten: each into: aList ]
"""),
        method("converting", """
floatNamed: aString
    "JSON has no infinities or NaN; the server sends them as these strings."
    aString = 'Infinity' ifTrue: [ ^ self positiveInfinity ].
    aString = '-Infinity' ifTrue: [ ^ self positiveInfinity negated ].
    aString = 'NaN' ifTrue: [ ^ self positiveInfinity - self positiveInfinity ].
    ^ self error: 'not a number: ' , aString
"""),
    ]


# ----------------------------------------------------------------------------- assembly


def _client_comment(dialect: Dialect, base_url: str) -> str:
    lines = [
        f"I am the NeuroScope client of an mlx-engine server (default {base_url}): I list and load models,",
        "read a model's hook points, register and clear activation hooks, and run chat and text completions",
        "that return activations, which convertActivations: turns into NeuroScope's activation format;",
        "I read activation stores, run analyses, attach SAEs, start and follow extraction jobs",
        "(waitForExtraction:every: polls one until it ends) and build steering vectors;",
        "generateWithActivations:hooks:onStep: hands each step to a block as it arrives, and",
        "convertAnalysisForNeuroScope: converts analysis results (docs/neuroscope-format.md).",
        "",
        f"Transport: {dialect.transport}.",
    ]
    if dialect.synchronous:
        lines.append("Every request method answers the parsed JSON (Dictionary / Array) or signals an Error")
        lines.append("carrying the server's message.")
    else:
        lines += [
            "Amber runs on JavaScript, where HTTP is asynchronous: every request method answers a Promise",
            "of the parsed JSON, rejected with an Error carrying the server's message. Use it as",
            "    (NeuroScopeMLXClient default health) then: [ :json | ... ] catch: [ :error | ... ]",
            "Methods that need no server (createCircuitAnalysisHooks:, createAttentionAnalysisHooks:,",
            "convertActivations:) answer their result directly. Requests go out in the order they were made,",
            "and a Promise answers at: with a Promise of that value, so synchronous-style sessions run as written.",
        ]
    lines += [
        "",
        "Generated by `mlx-engine smalltalk` from the server's endpoint description; edit the generator,",
        "not this file.",
    ]
    return "\n".join(lines)


def client_classes(dialect: Dialect, base_url: str) -> list[ClassSpec]:
    """The client, its compatibility subclass and the SUnit test case, as generated for `dialect`."""
    methods = _accessing_methods(base_url)
    for ep in ENDPOINTS:
        methods.extend(_endpoint_methods(ep))
    methods += [method(category, source) for category, source in QUERY_METHODS]
    methods += _preset_methods() + _conversion_methods() + analysis_conversion_methods() + streaming_methods()
    methods += list(dialect.transport_methods) + list(STREAM_TRANSPORT[dialect.name])
    ivars = CLIENT_IVARS + dialect.client_ivars
    client = ClassSpec(CLIENT_CLASS, "Object", ivars, CATEGORY, _client_comment(dialect, base_url), methods)
    compat = ClassSpec(
        COMPAT_CLASS,
        CLIENT_CLASS,
        (),
        CATEGORY,
        "I keep code written against the earlier LM Studio REST bridge running: I am a NeuroScopeMLXClient\n"
        "under the old name, with nothing added.",
    )
    test = ClassSpec(
        TEST_CLASS,
        "TestCase",
        ("client",),
        TEST_CATEGORY,
        f"I test {CLIENT_CLASS} against a live mlx-engine server at its default URL: health, models, hook\n"
        "points, registering and clearing hooks, server errors, and chat with activations whose numbers\n"
        "must be finite, shaped as the hook points promise, and causally masked; streaming step by step,\n"
        "the seed's session as written, and analysis results converted. The research tests (stores, analyses,\n"
        f"SAEs, extraction jobs, steering vectors, text completions) need the server's --store-root to hold the\n"
        f"store {STORE} (hook {STORE_HOOK}) and a copy of it under an id beyond ASCII, and its --sae-root the\n"
        f"SAE folder {SAE_SOURCE} at that hook; the extraction tests write new stores under the store root.",
        test_methods() + research_test_methods() + list(dialect.test_support_methods),
    )
    return [client, compat, test]


def _protocol_chunks(spec: ClassSpec) -> list[str]:
    chunks = []
    for class_side in (True, False):
        groups: dict[str, list[Method]] = {}
        for m in spec.methods:
            if m.class_side == class_side:
                groups.setdefault(m.protocol, []).append(m)
        owner = f"{spec.name} class" if class_side else spec.name
        for protocol, methods in groups.items():
            body = "\n\n".join(escape_chunk(m.source) + "\n!" for m in methods)
            chunks.append(f"!{owner} methodsFor: {st_string(protocol)}!\n\n{body} !")
    return chunks


def generate_smalltalk_client(dialect: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """One file-in source for `dialect` (pharo, squeak or amber) holding the client and its tests."""
    try:
        d = DIALECT_BY_NAME[dialect]
    except KeyError:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}") from None
    base_url = base_url.rstrip("/")
    specs = client_classes(d, base_url)
    parts = [
        f'"NeuroScope client for mlx-engine, {d.name} dialect. Generated by: mlx-engine smalltalk --dialect {d.name}"!',
        d.preamble([CATEGORY, TEST_CATEGORY]),
    ]
    for spec in specs:
        parts.append(d.class_definition(spec))
        parts.append(d.comment_chunk(spec))
        parts.extend(_protocol_chunks(spec))
    for host, m in d.extensions:
        parts.append(f"!{host} methodsFor: {st_string(m.protocol)}!\n\n{escape_chunk(m.source)}\n! !")
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"
