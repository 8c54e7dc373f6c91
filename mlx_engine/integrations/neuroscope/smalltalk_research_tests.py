"""The SUnit tests of the research endpoints, shared by the three dialects like smalltalk_tests.py.

Stores, store analyses, analyses on the model, SAEs, extraction jobs, steering vectors and text
completions with activations, each checked against what the answer itself must satisfy (sums,
shapes, orders), not against recorded numbers. They need a server started with --store-root
holding `STORE` (hook `STORE_HOOK`, at least 6 documents) and a copy of it under an id beyond ASCII,
and an --sae-root holding the SAE folder `SAE_SOURCE` at that hook (tests/neuroscope_server.py
makes them). The extraction tests write new stores under that root.
"""

from __future__ import annotations

from .smalltalk_source import Method, method, st_string

STORE = "tiny"
STORE_HOOK = "layers.1.residual"
SAE_SOURCE = "resid1"
EXTRACTION_DOCUMENTS = 6  # the completed job's corpus
CANCELLED_DOCUMENTS = 2000  # the cancelled job's: far more batches than run before the cancel arrives
POLL_MS = 100


def research_test_methods() -> list[Method]:
    """The research tests, with the fixture names above as literals."""
    store, hook, sae = st_string(STORE), st_string(STORE_HOOK), st_string(SAE_SOURCE)
    return _stores(store, hook) + _analyses() + _saes(sae) + _jobs(hook) + _completion()


def _stores(store: str, hook: str) -> list[Method]:
    return [
        method("tests - stores", f"""
testStoresAreListed
    ^ self check: client listStores then: [ :json |
        | tiny |
        tiny := (json at: 'data') detect: [ :each | (each at: 'id') = {store} ].
        self assert: (tiny at: 'status') equals: 'complete'.
        self assert: ((tiny at: 'hooks') first at: 'hook') equals: {hook} ]
"""),
        method("tests - stores", f"""
testStoreStatsDescribeEveryNeuron
    ^ self check: (client storeStats: {store} hook: {hook}) then: [ :stats |
        | neurons |
        neurons := stats at: 'neurons'.
        self assert: neurons size equals: ((stats at: 'summary') at: 'width').
        neurons do: [ :each |
            self assert: (each at: 'min') <= (each at: 'mean').
            self assert: (each at: 'mean') <= (each at: 'max') ] ]
"""),
        method("tests - stores", f"""
testTopExamplesAreInNeuronpediasFormat
    ^ self check: (client topExamples: {store} hook: {hook} neuron: 2 k: 3) then: [ :json |
        | examples previous |
        examples := json at: 'examples'.
        self assert: (examples size between: 1 and: 3).
        previous := nil.
        examples do: [ :each |
            | values peak |
            values := each at: 'values'.
            self assert: values size equals: (each at: 'tokens') size.
            peak := values inject: values first into: [ :a :b | a max: b ].
            self assert: (each at: 'maxValue') equals: peak.
            self assert: (values at: (each at: 'maxValueTokenIndex') + 1) equals: peak.
            previous isNil ifFalse: [ self assert: peak <= previous ].
            previous := peak ] ]
"""),
        method("tests - stores", f"""
testReverseQueriesAnswerBothWays
    ^ self check: (client ngramNeurons: {store} ngram: '#5') then: [ :byToken |
        self assert: (byToken at: 'count') >= 0.
        self check: (client neuronNgrams: {store} hook: {hook} neuron: 2) then: [ :byNeuron |
            self assert: ((byNeuron at: 'ngrams') at: '1') notEmpty ] ]
"""),
        method("tests - stores", f"""
testNeuronDistributionCountsEveryRow
    ^ self check: (client neuronDistribution: {store} hook: {hook} neuron: 2 bins: 8) then: [ :dist |
        | edges counts |
        edges := dist at: 'edges'.
        counts := dist at: 'counts'.
        self assert: edges size equals: 9.
        self assert: counts size equals: 8.
        self assert: (counts inject: 0 into: [ :a :b | a + b ]) equals: (dist at: 'sample_rows').
        self assert: (dist at: 'range') first equals: edges first.
        1 to: 8 do: [ :i | self assert: (edges at: i) < (edges at: i + 1) ].
        self assert: ((dist at: 'median') between: edges first and: edges last) ]
"""),
        method("tests - stores", f"""
testPolysemanticNeuronsAreRanked
    ^ self check: (client polysemanticNeurons: {store} hook: {hook} top: 3) then: [ :json |
        | neurons |
        neurons := json at: 'neurons'.
        self assert: neurons size equals: 3.
        self assert: (json at: 'scored') >= 3.
        1 to: 2 do: [ :i | self assert: ((neurons at: i) at: 'clusters') >= ((neurons at: i + 1) at: 'clusters') ] ]
"""),
        method("tests - stores", f"""
testIdsBeyondAsciiReachTheServerIntact
    "The test server holds a copy of the store under an id with an accented letter, a space and an arrow:
    sent percent-encoded as UTF-8, it comes back as it was, and so does a hook name beyond ASCII."
    ^ self check: client listStores then: [ :stores |
        | id |
        id := ((stores at: 'data')
            detect: [ :each | ((each at: 'id') detect: [ :c | c asciiValue > 127 ] ifNone: [ nil ]) notNil ]) at: 'id'.
        self check: (client storeStats: id hook: {hook}) then: [ :stats |
            self assert: (stats at: 'store') equals: id.
            self errorMessageOf: [ client storeStats: {store} hook: id ] then: [ :message |
                self assert: (self text: message includes: id) ] ] ]
"""),
    ]


def _analyses() -> list[Method]:
    return [
        method("tests - analysis", """
testLogitLensReadsEveryLayer
    ^ self check: (client logitLens: 'Once upon a time' topK: 3) then: [ :lens |
        self assert: (lens at: 'top_probs') size equals: (lens at: 'layers') size.
        (lens at: 'top_probs') do: [ :layer |
            self assert: layer size equals: (lens at: 'tokens') size.
            layer do: [ :probs |
                self assert: probs size equals: 3.
                self assert: (probs first between: 0 and: 1).
                self assert: probs first >= probs last ] ] ]
"""),
        method("tests - analysis", """
testAttributionTermsSumToTheTotal
    "The embedding's, every attention and MLP sublayer's (heads and biases inside) and the constant terms add up
    to logit(target) - logit(foil)."
    ^ self check: (client attribution: 'Once upon a time') then: [ :dla |
        | sum |
        sum := (dla at: 'embedding')
            + ((dla at: 'attention') inject: 0 into: [ :a :b | a + b ])
            + ((dla at: 'mlp') inject: 0 into: [ :a :b | a + b ]).
        (dla at: 'constants') do: [ :each | sum := sum + each ].
        self assert: ((dla at: 'total') - sum) abs < 0.001 ]
"""),
        method("tests - analysis", """
testHeadScoresCoverEveryHead
    ^ self check: (client headScores: 'Once upon a time' repeatLength: 6) then: [ :scores |
        | induction |
        induction := (scores at: 'tables') at: 'induction'.
        self assert: induction size equals: (scores at: 'n_layers').
        induction do: [ :row | self assert: row size equals: (scores at: 'n_heads') ] ]
"""),
        method("tests - analysis", """
testPatchingTheLastResidualRestoresTheCleanRun
    "Patching the last layer's residual at the last position is the clean run itself; positions
    before the corrupted token are the same in both runs and restore nothing."
    ^ self check: (client patchClean: { 5. 6. 7. 8. 9 } corrupted: { 5. 6. 40. 8. 9 }) then: [ :patching |
        | fractions |
        fractions := patching at: 'fractions'.
        self assert: fractions size equals: (patching at: 'layers') size.
        self assert: (fractions last last - 1) abs < 0.000001.
        self assert: fractions first first equals: 0 ]
"""),
    ]


def _saes(sae: str) -> list[Method]:
    return [
        method("tests - saes", f"""
testSaesAttachListAndDetach
    ^ self check: (client attachSae: {sae} topK: 2) then: [ :attached |
        | id |
        id := attached at: 'id'.
        self assert: (attached at: 'top_k') equals: 2.
        self check: client saes then: [ :listed |
            self assert: ((listed at: 'data') collect: [ :each | each at: 'hook_id' ]) asArray equals: {{ attached at: 'hook_id' }}.
            self check: (client detachSae: id) then: [ :detached |
                self assert: (detached at: 'data') isEmpty ] ] ]
"""),
    ]


def _jobs(hook: str) -> list[Method]:
    documents = "(1 to: {n}) collect: [ :i | 'Document ' , i printString , ': the cat sat on the mat.' ]"
    return [
        method("tests - extraction", f"""
testExtractionRunsToCompletion
    "A tiny corpus extracted into a new store, polled until done; the job is listed, and its store reads back."
    | documents |
    documents := ({documents.format(n=EXTRACTION_DOCUMENTS)}) asArray.
    ^ self check: (client startExtraction: documents hooks: {{ {hook} }} contextSize: 32 batchSize: 4) then: [ :job |
        self assert: (job at: 'state') equals: 'running'.
        self check: (client waitForExtraction: (job at: 'id') every: {POLL_MS}) then: [ :done |
            self assert: (done at: 'state') equals: 'completed'.
            self assert: (done at: 'documents_done') equals: documents size.
            self assert: (done at: 'tokens_done') > documents size.
            self check: client extractions then: [ :jobs |
                self assert: (((jobs at: 'data') collect: [ :each | each at: 'id' ]) includes: (job at: 'id')).
                self check: (client storeStats: (job at: 'store') hook: {hook}) then: [ :stats |
                    self assert: ((stats at: 'summary') at: 'tokens') equals: (done at: 'tokens_done') ] ] ] ]
"""),
        method("tests - extraction", f"""
testCancelledExtractionStopsEarly
    | documents |
    documents := ({documents.format(n=CANCELLED_DOCUMENTS)}) asArray.
    ^ self check: (client startExtraction: documents hooks: {{ {hook} }} contextSize: 32 batchSize: 1) then: [ :job |
        self check: (client cancelExtraction: (job at: 'id')) then: [ :cancelled |
            self assert: (cancelled at: 'state') equals: 'cancelled'.
            self assert: (cancelled at: 'documents_done') < documents size.
            self check: (client extractionProgress: (job at: 'id')) then: [ :after |
                self assert: (after at: 'state') equals: 'cancelled' ] ] ]
"""),
        method("tests - steering", """
testSteeringVectorNormIsItsDataNorm
    ^ self check: (client steeringVectorLayer: 1 positive: { 'I love this.' } negative: { 'I hate this.' }) then: [ :sv |
        | vector squares |
        vector := sv at: 'vector'.
        self assert: (sv at: 'hook_id') equals: 'layers.1.residual'.
        self assert: (sv at: 'n_positive') equals: 1.
        self assert: (vector at: 'data') size equals: (vector at: 'shape') first.
        squares := (vector at: 'data') inject: 0 into: [ :a :b | a + (b * b) ].
        self assert: (squares sqrt - (sv at: 'norm')) abs < ((sv at: 'norm') * 0.0001).
        self assert: ((sv at: 'intervention') at: 'op') equals: 'add' ]
"""),
    ]


def _completion() -> list[Method]:
    return [
        method("tests - completions", """
testCompleteWithActivationsReadsTheRawPrompt
    ^ self check: (client completeWithActivations: 'Once upon a time' hooks: { 'layers.0.residual' } maxTokens: 2 temperature: 0) then: [ :response |
        | converted entries |
        converted := client convertActivations: response.
        self assert: (converted at: 'generated_tokens') size equals: 2.
        self assert: (converted at: 'text') isString.
        self assert: (response at: 'prompt_token_ids') size equals: (converted at: 'prompt_tokens') size.
        entries := (converted at: 'activations') at: 'layers.0.residual'.
        self assert: entries size equals: 2.
        self assert: (entries first at: 'positions') asArray equals: { 0. (response at: 'prompt_token_ids') size } ]
"""),
    ]
