"""The SUnit test case every generated Smalltalk client carries, shared by the three dialects.

The tests run against a live server (Amber's on Node in the suite): health, models, hook
points, registering and clearing hooks, server errors, and chat with activations whose
numbers must be finite, shaped as the hook points promise, and causally masked.
"""

from __future__ import annotations

from .smalltalk_source import Method, method

CLIENT_CLASS = "NeuroScopeMLXClient"


def test_methods() -> list[Method]:
    return [
        method("running", f"""
setUp
    client := {CLIENT_CLASS} default
"""),
        method("tests", """
testHealth
    ^ self check: client health then: [ :health |
        self assert: (health at: 'status') equals: 'ok'.
        self assert: (health at: 'models') notEmpty ]
"""),
        method("tests", """
testModels
    ^ self check: client models then: [ :json |
        self assert: (json at: 'data') notEmpty.
        self assert: ((json at: 'data') first at: 'id') isString ]
"""),
        method("tests", """
testHookPointsDescribeEveryLayer
    ^ self check: client hookPoints then: [ :points |
        self assert: (points at: 'layers') size equals: (points at: 'num_layers').
        self assert: ((points at: 'components') includes: 'residual') ]
"""),
        method("tests", """
testRegisterAndClearHooks
    | hooks |
    hooks := client createCircuitAnalysisHooks: 2.
    ^ self check: (client registerHooks: hooks) then: [ :registered |
        self assert: (registered at: 'data') size equals: hooks size.
        self assert: ((registered at: 'data') first at: 'hook_id') equals: 'embedding'.
        self check: client clearHooks then: [ :cleared |
            self assert: (cleared at: 'data') size equals: 0 ] ]
"""),
        method("tests", """
testServerErrorsReachTheCaller
    ^ self errorMessageOf: [ client registerHooks: { 'layers.999.residual' } ] then: [ :message |
        self assert: (self text: message includes: 'out of range') ]
"""),
        method("tests", """
testGenerateWithActivationsGivesFiniteNumbersOfThePromisedShape
    | hooks |
    hooks := client createCircuitAnalysisHooks: 2.
    ^ self check: client hookPoints then: [ :points |
        self check: (client generateWithActivations: 'Hello' hooks: hooks maxTokens: 2 temperature: 0) then: [ :response |
            | converted |
            converted := client convertActivations: response.
            self assert: (converted at: 'format') equals: 'neuroscope-activations'.
            self assert: (converted at: 'prompt_tokens') notEmpty.
            self assert: (converted at: 'generated_tokens') size equals: 2.
            self assert: (converted at: 'activations') size equals: hooks size.
            (converted at: 'activations') keysAndValuesDo: [ :hookId :entries |
                self assert: entries size equals: 2.
                entries do: [ :entry |
                    self assert: (entry at: 'hook_id') equals: hookId.
                    self assertEntry: entry hasShape: (self promisedShapeOf: entry in: points).
                    (entry at: 'data') do: [ :x | self assert: x isFinite ] ] ] ] ]
"""),
        method("tests", """
testNeuronSubsetsComeBackWithTheirIndices
    | hooks |
    hooks := client createNeuronHooks: { 1 } component: 'expert_post' indices: { 3. 17 }.
    ^ self check: (client generateWithActivations: 'Hello' hooks: hooks maxTokens: 1 temperature: 0) then: [ :response |
        | entry |
        entry := ((response at: 'activations') at: 'layers.1.expert_post') first.
        self assert: (entry at: 'indices') asArray equals: { 3. 17 }.
        self assert: (entry at: 'shape') last equals: 2 ]
"""),
        method("tests", """
testAttentionFollowsTheCausalMask
    ^ self check: client hookPoints then: [ :points |
        self check: (client generateWithActivations: 'Hello' hooks: (client createAttentionAnalysisHooks: { 1 }) maxTokens: 1 temperature: 0) then: [ :response |
            | activations scores pattern |
            activations := (client convertActivations: response) at: 'activations'.
            self assert: activations size equals: 6.
            activations do: [ :entries |
                entries do: [ :entry | self assertEntry: entry hasShape: (self promisedShapeOf: entry in: points) ] ].
            scores := (activations at: 'layers.1.attention_scores') first.
            pattern := (activations at: 'layers.1.attention_pattern') first.
            self assertCausal: scores pattern: pattern ] ]
"""),
        method("tests", """
testStreamingCallsTheBlockOncePerStep
    | steps |
    steps := client newList.
    ^ self check: (client generateWithActivations: 'Hello' hooks: { 'layers.0.residual' } onStep: [ :step | steps add: step ]) then: [ :response |
        | ids |
        ids := response at: 'generated_token_ids'.
        self assert: ids notEmpty.
        self assert: steps size equals: ids size.
        1 to: steps size do: [ :i |
            | step entries |
            step := steps at: i.
            self assert: (step at: #step) equals: i - 1.
            self assert: (step at: #tokenId) equals: (ids at: i).
            entries := (step at: #activations) at: 'layers.0.residual'.
            self assert: entries size equals: 1.
            self assert: (entries first at: 'step') equals: i - 1 ].
        self assert: ((response at: 'activations') at: 'layers.0.residual') size equals: ids size ]
"""),
        method("tests", """
testStreamingErrorsReachTheCaller
    ^ self errorMessageOf: [ client generateWithActivations: 'Hi' hooks: { 'layers.999.residual' } onStep: [ :step | nil ] ] then: [ :message |
        self assert: (self text: message includes: 'out of range') ]
"""),
        method("tests", """
testTheSeedSessionRunsAsWritten
    "The seed's session, with the served model's id and its real layer count."
    | hooks result activations messages |
    ^ self check: client models then: [ :models |
        | served |
        served := (models at: 'data') first.
        messages := 'Hello'.
        client loadModel: (served at: 'id').
        hooks := client createCircuitAnalysisHooks: (served at: 'num_layers').
        result := client generateWithActivations: messages hooks: hooks.
        activations := client convertActivationsForNeuroScope: (result at: #activations).
        self check: activations then: [ :converted |
            self assert: converted size equals: hooks size.
            converted keysAndValuesDo: [ :hookId :entries |
                entries do: [ :entry |
                    self assert: (entry at: 'hook_id') equals: hookId.
                    self assert: (entry at: 'data') size equals: ((entry at: 'shape') inject: 1 into: [ :a :b | a * b ]) ] ] ] ]
"""),
        method("tests", """
testAnalysisResultsConvert
    | tables scores converted grid |
    tables := Dictionary new.
    tables at: 'induction' put: #(#(1 2 3) #(4 5 6)).
    tables at: 'previous_token' put: nil.
    scores := Dictionary new.
    scores at: 'n_layers' put: 2.
    scores at: 'n_heads' put: 3.
    scores at: 'tables' put: tables.
    converted := client convertAnalysisForNeuroScope: scores.
    self assert: (converted at: 'format') equals: 'neuroscope-analysis'.
    self assert: (converted at: 'kind') equals: 'head_scores'.
    self assert: ((converted at: 'metrics') includesKey: 'previous_token') not.
    grid := (converted at: 'metrics') at: 'induction'.
    self assert: (grid at: 'shape') asArray equals: #(2 3).
    self assert: (grid at: 'data') asArray equals: #(1 2 3 4 5 6)
"""),
        method("tests", """
testUnknownAnalysisResultsAreRefused
    | message |
    message := [ client convertAnalysisForNeuroScope: (Dictionary new at: 'rows' put: #(1 2); yourself). 'no error' ]
        on: Error do: [ :error | error messageText ].
    self assert: (self text: message includes: 'not an analysis result')
"""),
        method("checking", """
promisedShapeOf: entry in: points
    "The shape the hook-point listing promises, with symbols T (rows) and S (keys)."
    | layer |
    (entry at: 'layer') isNil ifTrue: [ ^ (points at: 'embedding') at: 'shape' ].
    layer := (points at: 'layers') at: (entry at: 'layer') + 1.
    ^ ((layer at: 'components') at: (entry at: 'component')) at: 'shape'
"""),
        method("checking", """
assertEntry: entry hasShape: promised
    | shape positions |
    shape := entry at: 'shape'.
    positions := entry at: 'positions'.
    self assert: shape size equals: promised size.
    1 to: shape size do: [ :i |
        | want |
        want := promised at: i.
        want = 'T' ifTrue: [ want := (positions at: 2) - (positions at: 1) ].
        want = 'S' ifTrue: [ want := (entry at: 'key_positions') size ].
        self assert: (shape at: i) equals: want ].
    self assert: (entry at: 'data') size equals: (shape inject: 1 into: [ :product :each | product * each ])
"""),
        method("checking", """
assertCausal: scores pattern: pattern
    "Row r of head h is position (first + r); a key after it is masked: score -inf, probability 0.
    Visible keys have finite scores and probabilities in [0, 1] summing to at most 1 (sinks take the rest)."
    | shape rows keys first keyPositions scoreData patternData |
    shape := scores at: 'shape'.
    rows := shape at: 2.
    keys := shape at: 3.
    first := (scores at: 'positions') at: 1.
    keyPositions := scores at: 'key_positions'.
    scoreData := scores at: 'data'.
    patternData := pattern at: 'data'.
    0 to: (shape at: 1) - 1 do: [ :h |
        0 to: rows - 1 do: [ :r |
            | sum |
            sum := 0.
            1 to: keys do: [ :k |
                | index score probability |
                index := (h * rows + r) * keys + k.
                score := scoreData at: index.
                probability := patternData at: index.
                sum := sum + probability.
                (keyPositions at: k) > (first + r)
                    ifTrue: [
                        self assert: (score isFinite not and: [ score < 0 ]).
                        self assert: probability = 0 ]
                    ifFalse: [
                        self assert: score isFinite.
                        self assert: (probability between: 0 and: 1) ] ].
            self assert: sum > 0.
            self assert: sum <= 1.0001 ] ]
"""),
    ]
