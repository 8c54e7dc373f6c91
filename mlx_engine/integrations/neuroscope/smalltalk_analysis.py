"""The Smalltalk clients' converters beyond whole responses: activations alone, and analysis results.

`convertActivationsForNeuroScope:` takes what the seed's NeuroScope session hands it, a
response's `activations` (hook id -> wire captures), and answers them in NeuroScope's
activation format. In Amber that argument may still be a Promise (`result at:
#activations` of an answer not yet here), so the conversion goes through `when:do:`.
`convertAnalysisForNeuroScope:` mirrors `analysis_format.py` on the JSON the analysis
endpoints return.
"""

from __future__ import annotations

from .analysis_fields import ANALYSIS_FORMAT, ANALYSIS_VERSION, EXAMPLE_KEYS, FEATURE_KEYS, PATCHING_KEYS
from .smalltalk_source import Method, method, st_string


def _literal_array(keys: tuple[str, ...]) -> str:
    return "#(" + " ".join(st_string(k) for k in keys) + ")"


def conversion_methods() -> list[Method]:
    return [
        method("converting", """
convertActivationsForNeuroScope: activations
    "A response's activations (hook id -> wire captures) in NeuroScope's format: per hook id its
    entries in step order, as convertActivations: gives them. Given a Promise (Amber), answers one."
    ^ self when: activations do: [ :captures |
        | converted |
        converted := Dictionary new.
        captures keysAndValuesDo: [ :hookId :list |
            converted at: hookId put: (list collect: [ :each | self convertCapture: each ]) asArray ].
        converted ]
"""),
        method("converting", """
convertAnalysisForNeuroScope: aResult
    "An analysis result (top examples, head scores, a patching result, sae_features captures), as the
    analysis endpoints answer it in JSON, in NeuroScope's analysis format (docs/neuroscope-format.md),
    as analysis_format.py converts it. Given a Promise (Amber), answers one."
    ^ self when: aResult do: [ :result | self convertAnalysis: result ]
"""),
        method("converting", """
convertAnalysis: result
    | kind body features |
    kind := self analysisKindOf: result.
    body := result.
    ((self isJsonObject: result) and: [ (#('top_examples' 'sae_features') includes: kind) and: [ (self isFeatureCapture: result) not ] ])
        ifTrue: [ body := (result includesKey: 'activations')
            ifTrue: [ result at: 'activations' ]
            ifFalse: [ result at: 'examples' ifAbsent: [ result at: 'data' ] ] ].
    kind = 'top_examples' ifTrue: [ ^ self convertExamples: body ].
    kind = 'head_scores' ifTrue: [ ^ self convertHeadScores: body ].
    kind = 'patching' ifTrue: [ ^ self convertPatching: body ].
    (self isFeatureCapture: body) ifTrue: [ ^ self convertFeatures: { body } ].
    (self isJsonObject: body) ifFalse: [ ^ self convertFeatures: body ].
    "A response's activations: every sae_features capture, by hook id, then step."
    features := self newList.
    body do: [ :captures | captures do: [ :each | (self isFeatureCapture: each) ifTrue: [ features add: each ] ] ].
    features := features asArray.
    features sort: [ :a :b | (a at: 'hook_id') < (b at: 'hook_id')
        or: [ (a at: 'hook_id') = (b at: 'hook_id') and: [ (a at: 'step') <= (b at: 'step') ] ] ].
    ^ self convertFeatures: features
"""),
        method("converting", """
analysisKindOf: result
    "Which analysis result this is, read from its fields; an error names the results known."
    (self isJsonObject: result) ifTrue: [
        | list |
        ((result includesKey: 'tables') and: [ result includesKey: 'n_heads' ]) ifTrue: [ ^ 'head_scores' ].
        ((result includesKey: 'fractions') and: [ result includesKey: 'column_kind' ]) ifTrue: [ ^ 'patching' ].
        ((self isFeatureCapture: result) or: [ result includesKey: 'activations' ]) ifTrue: [ ^ 'sae_features' ].
        list := result at: 'examples' ifAbsent: [ result at: 'data' ifAbsent: [ nil ] ].
        (self isJsonList: list) ifTrue: [ ^ self analysisKindOf: list ] ].
    (self isJsonList: result) ifTrue: [
        (result notEmpty and: [ result allSatisfy: [ :each | self isFeatureCapture: each ] ]) ifTrue: [ ^ 'sae_features' ].
        (result allSatisfy: [ :each | (self isJsonObject: each) and: [ each includesKey: 'maxValueTokenIndex' ] ])
            ifTrue: [ ^ 'top_examples' ] ].
    ^ self error: 'not an analysis result NeuroScope knows: give top examples (tokens, values, maxValue, maxValueTokenIndex), head scores, a patching result, or sae_features captures'
"""),
        method("converting", """
isJsonObject: aValue
    ^ aValue isKindOf: Dictionary
"""),
        method("converting", """
isJsonList: aValue
    ^ aValue isString not and: [ aValue isKindOf: SequenceableCollection ]
"""),
        method("converting", """
isFeatureCapture: aValue
    ^ (self isJsonObject: aValue) and: [ (aValue at: 'component' ifAbsent: [ nil ]) = 'sae_features' ]
"""),
        method("converting", f"""
analysisOfKind: kind
    | result |
    result := Dictionary new.
    result at: 'format' put: {st_string(ANALYSIS_FORMAT)}.
    result at: 'version' put: {ANALYSIS_VERSION}.
    result at: 'kind' put: kind.
    ^ result
"""),
        method("converting", """
grid: nested
    "A nested table as NeuroScope's shape and flat row-major data."
    | shape level grid |
    shape := self newList.
    level := nested.
    [ self isJsonList: level ] whileTrue: [
        shape add: level size.
        level := level isEmpty ifTrue: [ nil ] ifFalse: [ level first ] ].
    grid := Dictionary new.
    grid at: 'shape' put: shape asArray.
    grid at: 'data' put: (self flatValues: nested).
    ^ grid
"""),
        method("converting", f"""
convertExamples: examples
    "Top-activating examples keep Neuronpedia's fields (and where each comes from), values flat."
    | result |
    result := self analysisOfKind: 'top_examples'.
    result at: 'examples' put: (examples collect: [ :example |
        | entry |
        entry := Dictionary new.
        {_literal_array(EXAMPLE_KEYS)} do: [ :key |
            (example includesKey: key) ifTrue: [ entry at: key put: (example at: key) ] ].
        entry at: 'values' put: (self flatValues: (example at: 'values')).
        entry ]) asArray.
    ^ result
"""),
        method("converting", """
convertHeadScores: scores
    "Each measured metric's [layers, heads] table as a grid; metrics not measured are left out."
    | result metrics |
    result := self analysisOfKind: 'head_scores'.
    result at: 'n_layers' put: (scores at: 'n_layers').
    result at: 'n_heads' put: (scores at: 'n_heads').
    metrics := Dictionary new.
    (scores at: 'tables') keysAndValuesDo: [ :name :table |
        table isNil ifFalse: [ metrics at: name put: (self grid: table) ] ].
    result at: 'metrics' put: metrics.
    result at: 'ranked' put: ((scores at: 'ranked' ifAbsent: [ nil ]) ifNil: [ Dictionary new ]).
    ^ result
"""),
        method("converting", f"""
convertPatching: patching
    "The recovered fractions and the metrics, [layers, columns] each, flat with their shape."
    | result grid |
    result := self analysisOfKind: 'patching'.
    {_literal_array(PATCHING_KEYS)} do: [ :key |
        result at: key put: (patching at: key ifAbsent: [ nil ]) ].
    grid := self grid: (patching at: 'fractions').
    result at: 'shape' put: (grid at: 'shape').
    result at: 'fractions' put: (grid at: 'data').
    result at: 'metrics' put: ((self grid: (patching at: 'metrics')) at: 'data').
    ^ result
"""),
        method("converting", f"""
convertFeatures: captures
    "sae_features captures (activation_format json): dense per-position feature activations, or a
    top-k capture's feature ids with their values."
    | result |
    result := self analysisOfKind: 'sae_features'.
    result at: 'features' put: (captures collect: [ :capture |
        | entry values |
        entry := Dictionary new.
        {_literal_array(FEATURE_KEYS)} do: [ :key | entry at: key put: (capture at: key ifAbsent: [ nil ]) ].
        entry at: 'shape' put: (capture at: 'shape').
        values := capture at: 'values' ifAbsent: [ nil ].
        (self isJsonObject: values)
            ifTrue: [
                entry at: 'mode' put: 'top_k'.
                entry at: 'feature_ids' put: (self flatValues: (capture at: 'data')).
                entry at: 'values' put: (self flatValues: (values at: 'data')) ]
            ifFalse: [
                entry at: 'mode' put: 'dense'.
                entry at: 'values' put: (self flatValues: (capture at: 'data')) ].
        entry ]) asArray.
    ^ result
"""),
    ]
