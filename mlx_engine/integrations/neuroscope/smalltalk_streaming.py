"""Streaming chat with activations in the Smalltalk clients: `generateWithActivations:hooks:onStep:`.

The server streams a with_activations request as Server-Sent Events: a first chunk with
the prompt's tokens, then one chunk per generated token carrying its `token_id`,
`token_text`, content delta and that step's captures, then the finish reason and
`data: [DONE]`. The shared source reads those events one line at a time
(`absorbEventLine:into:onStep:`), calls the user's block with each step as it arrives,
and assembles the whole response so the method answers what `generateWithActivations:`
answers. Only reading the lines is per dialect: Pharo reads ZnClient's streaming
entity, Amber the host fetch's body reader; Squeak's WebClient gives whole responses,
so Squeak asks without `stream` and replays the steps from the whole response.

`streaming_request` is the request each dialect's method sends, for the contract test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from .endpoints import endpoint
from .smalltalk_requests import ARGUMENT_CONVERSION, SmalltalkRequest, body_plan, smalltalk_request
from .smalltalk_source import Method, method, st_literal, st_string

SELECTOR = "generateWithActivations:hooks:onStep:"
_BASE_SELECTOR = "generateWithActivations:hooks:"
# Dialects whose transport reads the events as they arrive; the others replay the whole response.
STREAMING_DIALECTS: frozenset[str] = frozenset({"pharo", "amber"})
# The keys of the Dictionary the step block gets (Symbols in the generated source).
STEP_KEYS: tuple[str, ...] = ("step", "tokenId", "token", "content", "activations")


def streaming_request(dialect: str, arguments: Sequence[Any], model: Optional[str]) -> SmalltalkRequest:
    """The request `generateWithActivations:hooks:onStep:` sends in `dialect` (messages, hooks)."""
    plain = smalltalk_request(endpoint("generate_with_activations"), _BASE_SELECTOR, arguments, model)
    body = {k: v for k, v in (plain.body or {}).items() if v is not None}  # as the method leaves them out
    body["stream"] = dialect in STREAMING_DIALECTS
    return SmalltalkRequest(plain.method, plain.path, body)


def _generate_method() -> Method:
    ep = endpoint("generate_with_activations")
    bound = {"messages": "messages", "activation_hooks": "hooks"}
    lines = [
        "generateWithActivations: messages hooks: hooks onStep: aBlock",
        '    "As generateWithActivations:hooks:, streamed: aBlock gets one Dictionary per generated token,',
        "    as it arrives, with #step (0 is the prompt's pass), #tokenId, #token (its text), #content (the",
        "    visible text it adds) and #activations (that step's captures in NeuroScope's format, per hook id).",
        '    Answers the whole response, assembled from the events, as generateWithActivations:hooks: does."',
        "    | body |",
        "    body := Dictionary new.",
    ]
    for part in body_plan(ep):
        if part.source == "argument":
            if part.field not in bound:  # max_tokens, temperature: the short selector's defaults
                default = ep.field(part.field).default
                if default is not None:  # a field without a client default is left out
                    lines.append(f"    body at: {st_string(part.field)} put: {st_literal(default)}.")
                continue
            value = ARGUMENT_CONVERSION.get(part.field, ("{arg}", None))[0].format(arg=bound[part.field])
            lines.append(f"    body at: {st_string(part.field)} put: {value}.")
        elif part.source == "model":
            lines.append("    model isNil ifFalse: [ body at: 'model' put: model ].")
        elif part.source == "no_stream":
            lines.append("    body at: 'stream' put: true.")
        else:
            lines.append(f"    body at: {st_string(part.field)} put: {st_literal(part.value)}.")
    lines.append("    ^ self streamChat: body onStep: aBlock")
    return method("streaming", "\n".join(lines))


def shared_methods() -> list[Method]:
    """The streaming methods every dialect shares (the transport's `streamChat:onStep:` aside)."""
    return [
        _generate_method(),
        method("streaming", """
newStreamResponse
    "The response generateWithActivations: answers, to be filled in event by event."
    | response |
    response := Dictionary new.
    response at: 'activations' put: Dictionary new.
    response at: 'generated_token_ids' put: self newList.
    response at: 'generated_tokens_text' put: self newList.
    response at: 'content' put: ''.
    ^ response
"""),
        method("streaming", """
absorbEventLine: aLine into: aResponse onStep: aBlock
    "One line of the Server-Sent Events: a data line carries one JSON chunk; [DONE] and blank lines end events."
    | payload chunk |
    (aLine size > 6 and: [ (aLine copyFrom: 1 to: 6) = 'data: ' ]) ifFalse: [ ^ self ].
    payload := aLine copyFrom: 7 to: aLine size.
    payload = '[DONE]' ifTrue: [ ^ self ].
    chunk := self parseJson: payload.
    (chunk includesKey: 'error') ifTrue: [
        ^ self error: 'mlx-engine stream: ' , ((chunk at: 'error') at: 'message') ].
    ^ self absorbChunk: chunk into: aResponse onStep: aBlock
"""),
        method("streaming", """
absorbChunk: aChunk into: aResponse onStep: aBlock
    "The prompt's tokens come first, then one chunk per generated token with that step's captures."
    | choices delta content activations |
    aResponse at: 'model' put: (aChunk at: 'model' ifAbsent: [ nil ]).
    #('prompt_token_ids' 'prompt_tokens_text' 'capture_id') do: [ :key |
        (aChunk includesKey: key) ifTrue: [ aResponse at: key put: (aChunk at: key) ] ].
    choices := aChunk at: 'choices' ifAbsent: [ #() ].
    choices isEmpty ifTrue: [ ^ self ].
    delta := choices first at: 'delta' ifAbsent: [ Dictionary new ].
    content := (delta at: 'content' ifAbsent: [ nil ]) ifNil: [ '' ].
    aResponse at: 'content' put: (aResponse at: 'content') , content.
    (choices first at: 'finish_reason' ifAbsent: [ nil ]) isNil ifFalse: [
        aResponse at: 'finish_reason' put: (choices first at: 'finish_reason') ].
    (aChunk includesKey: 'token_id') ifFalse: [ ^ self ].
    (aResponse at: 'generated_token_ids') add: (aChunk at: 'token_id').
    (aResponse at: 'generated_tokens_text') add: (aChunk at: 'token_text').
    activations := aChunk at: 'activations' ifAbsent: [ Dictionary new ].
    activations keysAndValuesDo: [ :hookId :captures |
        (aResponse at: 'activations') at: hookId ifAbsent: [ (aResponse at: 'activations') at: hookId put: self newList ].
        ((aResponse at: 'activations') at: hookId) addAll: captures ].
    ^ aBlock value: (self step: (aResponse at: 'generated_token_ids') size - 1
        tokenId: (aChunk at: 'token_id') token: (aChunk at: 'token_text') content: content activations: activations)
"""),
        method("streaming", """
step: anInteger tokenId: tokenId token: aString content: content activations: captures
    "What the onStep: block gets: one generated token and the captures of the pass that chose it."
    | step |
    step := Dictionary new.
    step at: #step put: anInteger.
    step at: #tokenId put: tokenId.
    step at: #token put: aString.
    step at: #content put: content.
    step at: #activations put: (self convertActivationsForNeuroScope: captures).
    ^ step
"""),
        method("streaming", """
finishStream: aResponse
    "The assembled response in the shape of a whole one (choices with the message)."
    | message choice |
    message := Dictionary new.
    message at: 'role' put: 'assistant'.
    message at: 'content' put: (aResponse removeKey: 'content').
    choice := Dictionary new.
    choice at: 'index' put: 0.
    choice at: 'message' put: message.
    choice at: 'finish_reason' put: (aResponse removeKey: 'finish_reason' ifAbsent: [ nil ]).
    aResponse at: 'choices' put: { choice }.
    ^ aResponse
"""),
        method("streaming", """
replaySteps: aResponse onStep: aBlock
    "For a transport without streaming: aBlock once per step, from the whole response (#content is
    empty: a whole response has only the whole text)."
    | ids texts |
    ids := aResponse at: 'generated_token_ids'.
    texts := aResponse at: 'generated_tokens_text'.
    1 to: ids size do: [ :i |
        | captures |
        captures := Dictionary new.
        (aResponse at: 'activations') keysAndValuesDo: [ :hookId :list |
            captures at: hookId put: (list select: [ :each | (each at: 'step') = (i - 1) ]) ].
        aBlock value: (self step: i - 1 tokenId: (ids at: i) token: (texts at: i) content: '' activations: captures) ].
    ^ aResponse
"""),
    ]


_PATH = st_string(endpoint("generate_with_activations").path)

TRANSPORT: dict[str, tuple[Method, ...]] = {
    "pharo": (
        method("transport", f"""
streamChat: aDictionary onStep: aBlock
    "POST with stream true, read line by line from ZnClient's streaming entity as the events arrive."
    | znClient response answer stream line |
    answer := self newStreamResponse.
    znClient := ZnClient new.
    [ znClient
        url: baseUrl , {_PATH};
        method: #POST;
        accept: (ZnMimeType main: 'text' sub: 'event-stream');
        streaming: true.
      apiKey isNil ifFalse: [ znClient headerAt: 'Authorization' put: 'Bearer ' , apiKey ].
      znClient entity: (ZnEntity with: (self jsonStringOf: aDictionary) type: ZnMimeType applicationJson).
      znClient execute.
      response := znClient response.
      response isSuccess ifFalse: [
        ^ self handleStatus: response status body: response entity stream upToEnd utf8Decoded ].
      stream := ZnCharacterReadStream on: response entity stream encoding: 'utf8'.
      [ stream atEnd ] whileFalse: [
        line := WriteStream on: String new.
        [ stream atEnd or: [ stream peek = Character lf ] ] whileFalse: [ line nextPut: stream next ].
        stream atEnd ifFalse: [ stream next ].
        self absorbEventLine: line contents into: answer onStep: aBlock ] ]
        ensure: [ znClient close ].
    ^ self finishStream: answer
"""),
    ),
    "squeak": (
        method("transport", f"""
streamChat: aDictionary onStep: aBlock
    "WebClient hands this client whole responses only, so Squeak does not stream: the request goes
    without stream, and aBlock is called once per step after the whole response has arrived."
    Transcript show: 'NeuroScopeMLXClient: Squeak does not stream; the steps follow the whole response.'; cr.
    aDictionary at: 'stream' put: false.
    ^ self replaySteps: (self request: 'POST' path: {_PATH} body: aDictionary) onStep: aBlock
"""),
    ),
    "amber": (
        method("transport", f"""
streamChat: aDictionary onStep: aBlock
    "POST with stream true through the host's fetch, reading its body stream as the events arrive.
    Answers a Promise of the assembled response."
    | headers options answer |
    answer := self newStreamResponse.
    headers := Dictionary new.
    headers at: 'Accept' put: 'text/event-stream'.
    headers at: 'Content-Type' put: 'application/json'.
    apiKey isNil ifFalse: [ headers at: 'Authorization' put: 'Bearer ' , apiKey ].
    options := Dictionary new.
    options at: 'method' put: 'POST'.
    options at: 'body' put: (self jsonStringOf: aDictionary).
    options at: 'headers' put: headers.
    ^ self send: [
        (Platform fetchUrl: baseUrl , {_PATH} options: options asJavaScriptObject) then: [ :response |
            (response status between: 200 and: 299)
                ifTrue: [
                    (self readLines: response body getReader decoder: (NativeFunction constructorNamed: 'TextDecoder')
                        buffer: '' onLine: [ :line | self absorbEventLine: line into: answer onStep: aBlock ])
                            then: [ :ignored | self finishStream: answer ] ]
                ifFalse: [ response text then: [ :text | self handleStatus: response status body: text ] ] ] ]
"""),
        method("transport", """
readLines: aReader decoder: aDecoder buffer: aString onLine: aBlock
    "Read the body to its end: each complete line goes to aBlock, the incomplete last one waits for more."
    | options |
    options := Dictionary new.
    options at: 'stream' put: true.
    ^ aReader read then: [ :chunk |
        (chunk at: 'done')
            ifTrue: [ aString isEmpty ifFalse: [ aBlock value: aString ]. nil ]
            ifFalse: [
                | lines |
                lines := (aString , (aDecoder decode: (chunk at: 'value') options: options asJavaScriptObject)) tokenize: String lf.
                lines allButLast do: aBlock.
                self readLines: aReader decoder: aDecoder buffer: lines last onLine: aBlock ] ]
"""),
    ),
}
