"""What differs between the Smalltalk dialects: file-in syntax, transport, JSON, async style.

Pharo talks HTTP with ZnClient and JSON with STON; Squeak with WebClient and the JSON
package; Amber with its JavaScript host's `fetch` and `JSON`. Each dialect supplies the
same small set of primitives (`request:path:body:`, `parseJson:`, `jsonStringOf:`,
`when:do:`, `newList`, `positiveInfinity`, `pause:then:`) and the SUnit helpers (`check:then:`,
`errorMessageOf:then:`, `text:includes:`); everything else is shared source.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from .smalltalk_source import ClassSpec, Method, escape_chunk, method, st_string

# Milliseconds Amber's SUnit grants one asynchronous step (a server round trip).
AMBER_STEP_TIMEOUT_MS = 60000


@dataclass(frozen=True)
class Dialect(ABC):
    """What differs per dialect: file-in syntax, transport, JSON, collections, async style."""

    name: str
    transport: str  # for the class comment
    synchronous: bool
    transport_methods: tuple[Method, ...]
    test_support_methods: tuple[Method, ...]
    client_ivars: tuple[str, ...] = ()  # the transport's own state, beyond the shared ivars
    extensions: tuple[tuple[str, Method], ...] = ()  # (host class, method) added to the host's classes

    @abstractmethod
    def class_definition(self, spec: ClassSpec) -> str:
        """The chunk that defines the class."""

    @abstractmethod
    def comment_chunk(self, spec: ClassSpec) -> str:
        """The chunk(s) that set the class comment."""

    def preamble(self, categories: Sequence[str]) -> str:
        return ""


_SYNC_TEST_SUPPORT = (
    method("checking", """
check: aValue then: aBlock
    "Synchronous dialect: the answer is already here."
    ^ aBlock value: aValue
"""),
    method("checking", """
errorMessageOf: aBlock then: anotherBlock
    | message |
    message := [ aBlock value. 'no error' ] on: Error do: [ :error | error messageText ].
    ^ anotherBlock value: message
"""),
    method("checking", """
text: aString includes: aSubstring
    ^ aString includesSubstring: aSubstring
"""),
)

# Pharo and Squeak share everything but HTTP and JSON.
_SYNC_COMMON = (
    method("transport", """
when: aValue do: aBlock
    "Synchronous transport: answers arrive before the call returns."
    ^ aBlock value: aValue
"""),
    method("transport", """
newList
    ^ OrderedCollection new
"""),
    method("transport", """
positiveInfinity
    ^ Float infinity
"""),
    method("transport", """
pause: milliseconds then: aBlock
    "Synchronous transport: wait here, then answer aBlock's value."
    (Delay forMilliseconds: milliseconds) wait.
    ^ aBlock value
"""),
)


class _ChunkDialect(Dialect):
    def comment_chunk(self, spec: ClassSpec) -> str:
        return f"!{spec.name} commentStamp: '' prior: 0!\n{escape_chunk(spec.comment)}!"


class PharoDialect(_ChunkDialect):
    def class_definition(self, spec: ClassSpec) -> str:
        return (
            f"{spec.superclass} subclass: #{spec.name}\n"
            f"\tinstanceVariableNames: {st_string(' '.join(spec.ivars))}\n"
            f"\tclassVariableNames: ''\n"
            f"\tpackage: {st_string(spec.category)}!"
        )


class SqueakDialect(_ChunkDialect):
    def class_definition(self, spec: ClassSpec) -> str:
        return (
            f"{spec.superclass} subclass: #{spec.name}\n"
            f"\tinstanceVariableNames: {st_string(' '.join(spec.ivars))}\n"
            f"\tclassVariableNames: ''\n"
            f"\tpoolDictionaries: ''\n"
            f"\tcategory: {st_string(spec.category)}!"
        )


class AmberDialect(Dialect):
    def class_definition(self, spec: ClassSpec) -> str:
        slots = ". ".join(f"#{v}" for v in spec.ivars)
        return f"{spec.superclass} subclass: #{spec.name}\n\tslots: {{{slots}}}\n\tpackage: {st_string(spec.category)}!"

    def comment_chunk(self, spec: ClassSpec) -> str:
        return f"!{spec.name} commentStamp!\n{escape_chunk(spec.comment)}!"

    def preamble(self, categories: Sequence[str]) -> str:
        return "\n".join(f"Smalltalk createPackage: {st_string(c)}!" for c in categories) + "\n"


PHARO = PharoDialect(
    name="pharo",
    transport="ZnClient (Zinc HTTP) for HTTP and STON for JSON",
    synchronous=True,
    transport_methods=(
        method("transport", """
request: method path: path body: aDictionaryOrNil
    "One HTTP exchange with ZnClient; answers the parsed JSON or signals the server's error."
    | znClient response |
    znClient := ZnClient new.
    [ znClient
        url: baseUrl , path;
        method: method asSymbol;
        accept: ZnMimeType applicationJson.
      apiKey isNil ifFalse: [ znClient headerAt: 'Authorization' put: 'Bearer ' , apiKey ].
      aDictionaryOrNil isNil ifFalse: [
        znClient entity: (ZnEntity with: (self jsonStringOf: aDictionaryOrNil) type: ZnMimeType applicationJson) ].
      znClient execute.
      response := znClient response ]
        ensure: [ znClient close ].
    ^ self handleStatus: response status body: response contents
"""),
        method("transport", """
parseJson: aString
    ^ STON fromString: aString
"""),
        method("transport", """
jsonStringOf: anObject
    ^ STON toJsonString: anObject
"""),
        *_SYNC_COMMON,
    ),
    test_support_methods=_SYNC_TEST_SUPPORT,
)

SQUEAK = SqueakDialect(
    name="squeak",
    transport="WebClient for HTTP and the JSON package (Json readFrom:, asJsonString) for JSON",
    synchronous=True,
    transport_methods=(
        method("transport", """
request: method path: path body: aDictionaryOrNil
    "One HTTP exchange with WebClient; answers the parsed JSON or signals the server's error."
    | url webClient request response content |
    url := baseUrl , path.
    webClient := WebClient new initializeFromUrl: url.
    [ request := webClient requestWithUrl: url.
      request method: method.
      request headerAt: 'Accept' put: 'application/json'.
      apiKey isNil ifFalse: [ request headerAt: 'Authorization' put: 'Bearer ' , apiKey ].
      aDictionaryOrNil isNil
        ifTrue: [ response := webClient sendRequest: request ]
        ifFalse: [
            content := (self jsonStringOf: aDictionaryOrNil) squeakToUtf8.
            request headerAt: 'Content-Type' put: 'application/json'.
            request headerAt: 'Content-Length' put: content size printString.
            response := webClient sendRequest: request content: content readStream size: content size ].
      ^ self handleStatus: response code body: response content utf8ToSqueak ]
        ensure: [ webClient close ]
"""),
        method("transport", """
parseJson: aString
    ^ Json readFrom: aString readStream
"""),
        method("transport", """
jsonStringOf: anObject
    ^ anObject asJsonString
"""),
        *_SYNC_COMMON,
    ),
    test_support_methods=_SYNC_TEST_SUPPORT,
)

AMBER = AmberDialect(
    name="amber",
    transport="the JavaScript host's fetch (Platform fetchUrl:options:) for HTTP and its JSON object for JSON",
    synchronous=False,
    transport_methods=(
        method("transport", """
request: method path: path body: aDictionaryOrNil
    "One HTTP exchange with the host's fetch; answers a Promise of the parsed JSON,
    rejected with the server's error."
    | options headers |
    headers := Dictionary new.
    headers at: 'Accept' put: 'application/json'.
    apiKey isNil ifFalse: [ headers at: 'Authorization' put: 'Bearer ' , apiKey ].
    options := Dictionary new.
    options at: 'method' put: method.
    aDictionaryOrNil isNil ifFalse: [
        headers at: 'Content-Type' put: 'application/json'.
        options at: 'body' put: (self jsonStringOf: aDictionaryOrNil) ].
    options at: 'headers' put: headers.
    ^ self send: [
        (Platform fetchUrl: baseUrl , path options: options asJavaScriptObject)
            then: [ :response | response text then: [ :text | self handleStatus: response status body: text ] ] ]
"""),
        method("transport", """
send: aBlock
    "Requests go out one after another, in the order they were made, as they do in Pharo and Squeak:
    after loadModel:, generateWithActivations: runs on the model just loaded."
    | answer |
    answer := (pending ifNil: [ Promise new ]) then: [ :ignored | aBlock value ].
    pending := answer catch: [ :error | nil ].
    ^ answer
"""),
        method("transport", """
parseJson: aString
    ^ Smalltalk readJSObject: (JSON parse: aString)
"""),
        method("transport", """
jsonStringOf: anObject
    ^ anObject asJSONString
"""),
        method("transport", """
when: aValueOrPromise do: aBlock
    "Asynchronous transport: chain aBlock onto a Promise, or apply it to a value already here."
    ^ aValueOrPromise isThenable
        ifTrue: [ aValueOrPromise then: aBlock ]
        ifFalse: [ aBlock value: aValueOrPromise ]
"""),
        method("transport", """
newList
    ^ Array new
"""),
        method("transport", """
positiveInfinity
    ^ Number positiveInfinity
"""),
        method("transport", """
pause: milliseconds then: aBlock
    "Asynchronous transport: a Promise of aBlock's value, milliseconds from now (the host's timer)."
    ^ (Promise delayMilliseconds: milliseconds) then: [ :ignored | aBlock value ]
"""),
    ),
    client_ivars=("pending",),
    extensions=(
        (
            "Promise",
            method("*NeuroScope-Integration", """
at: aKey
    "A Promise of the answer's value at aKey, so code written for a synchronous client
    (result := client generateWithActivations: ... then result at: #activations) runs here too."
    ^ self then: [ :value | value at: aKey ]
"""),
        ),
    ),
    test_support_methods=(
        method("checking", f"""
check: aPromise then: aBlock
    "Amber SUnit runs a test asynchronously when it sends timeout: and answers a Promise."
    self timeout: {AMBER_STEP_TIMEOUT_MS}.
    ^ aPromise then: aBlock
"""),
        method("checking", f"""
errorMessageOf: aBlock then: anotherBlock
    self timeout: {AMBER_STEP_TIMEOUT_MS}.
    ^ ((aBlock value)
        then: [ :ignored | 'no error' ]
        catch: [ :error | (Smalltalk asSmalltalkException: error) messageText ])
            then: anotherBlock
"""),
        method("checking", """
text: aString includes: aSubstring
    ^ aString includesSubString: aSubstring
"""),
    ),
)

DIALECT_BY_NAME: dict[str, Dialect] = {d.name: d for d in (PHARO, SQUEAK, AMBER)}
