"""The generated Smalltalk clients: every method parses with a real Pharo grammar, and only
the transport differs between dialects."""

from __future__ import annotations

from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_pharo

from mlx_engine.integrations.neuroscope.cli import main_smalltalk
from mlx_engine.integrations.neuroscope.endpoints import ENDPOINTS
from mlx_engine.integrations.neuroscope.smalltalk import (
    CLIENT_CLASS,
    COMPAT_CLASS,
    DIALECTS,
    TEST_CLASS,
    generate_smalltalk_client,
)
from mlx_engine.integrations.neuroscope.smalltalk_source import FiledMethod, read_file_in, split_chunks

REQUIRED_CLIENT_SELECTORS = {
    "baseUrl:", "health", "models", "loadModel:", "hookPoints", "registerHooks:", "clearHooks",
    "generateWithActivations:hooks:", "generateWithActivations:hooks:maxTokens:temperature:",
    "createCircuitAnalysisHooks:", "createAttentionAnalysisHooks:", "createNeuronHooks:component:indices:",
    "convertActivations:", "convertActivationsForNeuroScope:", "generateWithActivations:hooks:onStep:",
}
# The protocols allowed to differ between dialects.
DIALECT_PROTOCOLS = {"transport", "checking", "*NeuroScope-Integration"}
PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_pharo.language()))


def problems(source: str) -> list[str]:
    """Every ERROR or MISSING node of `source` parsed as one Pharo method."""
    tree = PARSER.parse(source.encode("utf-8"))
    found = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            found.append(f"{'MISSING' if node.is_missing else 'ERROR'} at {node.start_point}: {node.text!r}")
        stack.extend(node.children)
    return found


def parsed_selector(source: str) -> str:
    """The selector the grammar reads from the method's pattern."""
    method = PARSER.parse(source.encode("utf-8")).root_node.children[0]
    assert method.type == "method", method.type
    pattern = method.children[0]
    parts = [c.text.decode() for c in pattern.children if c.type in ("keyword", "unary_identifier", "binary_operator")]
    return "".join(parts)


@pytest.fixture(scope="module", params=DIALECTS)
def filed(request: pytest.FixtureRequest) -> tuple[str, list[FiledMethod], list[str]]:
    file_in = read_file_in(generate_smalltalk_client(request.param, "http://127.0.0.1:9911"))
    return request.param, file_in.methods, file_in.doits


def test_every_method_parses_without_error(filed: tuple[str, list[FiledMethod], list[str]]) -> None:
    dialect, methods, _ = filed
    assert len(methods) > 40
    for m in methods:
        assert problems(m.source) == [], f"{dialect} {m.class_name}>>{m.selector}"
        assert parsed_selector(m.source) == m.selector


def test_every_doit_parses_without_error(filed: tuple[str, list[FiledMethod], list[str]]) -> None:
    dialect, _, doits = filed
    definitions = [d for d in doits if "subclass: #" in d]
    assert len(definitions) == 3
    for doit in doits:
        assert problems("doIt\n" + doit) == [], f"{dialect}: {doit[:80]}"


def test_a_broken_method_is_caught() -> None:
    methods = read_file_in(generate_smalltalk_client("pharo")).methods
    source = next(m.source for m in methods if m.selector == "createCircuitAnalysisHooks:")
    assert problems(source) == []
    unclosed = source.replace("component: component) ] ].", "component: component) ].", 1)
    assert unclosed != source and problems(unclosed)
    stray_paren = source.replace("^ hooks asArray", "^ hooks asArray)", 1)
    assert stray_paren != source and problems(stray_paren)
    unterminated = source.replace("'embedding' component:", "'embedding component:", 1)
    assert unterminated != source and problems(unterminated)
    dangling_keyword = source.replace("hooks add: (self hookSpecLayer: 'embedding' component: 'embedding')", "hooks add: ", 1)
    assert problems(dangling_keyword)


def test_required_selectors_in_every_dialect(filed: tuple[str, list[FiledMethod], list[str]]) -> None:
    _, methods, doits = filed
    instance = {m.selector for m in methods if m.class_name == CLIENT_CLASS and not m.class_side}
    class_side = {m.selector for m in methods if m.class_name == CLIENT_CLASS and m.class_side}
    assert REQUIRED_CLIENT_SELECTORS <= instance
    assert class_side == {"default"}
    assert {ep.smalltalk.selector for ep in ENDPOINTS} <= instance
    tests = {m.selector for m in methods if m.class_name == TEST_CLASS and m.selector.startswith("test")}
    assert {"testHealth", "testModels", "testRegisterAndClearHooks"} <= tests
    assert any(d.startswith(f"{CLIENT_CLASS} subclass: #{COMPAT_CLASS}") for d in doits)


def test_only_the_transport_differs_between_dialects() -> None:
    shared: dict[str, dict[tuple[str, bool, str], str]] = {}
    for dialect in DIALECTS:
        methods = read_file_in(generate_smalltalk_client(dialect)).methods
        shared[dialect] = {
            (m.class_name, m.class_side, m.selector): m.source for m in methods if m.protocol not in DIALECT_PROTOCOLS
        }
        selectors = {m.selector for m in methods if m.protocol == "transport"}
        common = {"request:path:body:", "parseJson:", "jsonStringOf:", "when:do:", "newList", "positiveInfinity", "streamChat:onStep:",
                  "pause:then:"}
        # Amber alone orders its asynchronous requests (send:) and reads fetch's body stream.
        assert common <= selectors and selectors - common <= {"send:", "readLines:decoder:buffer:onLine:"}
    assert shared["pharo"] == shared["squeak"] == shared["amber"]


@pytest.mark.parametrize(
    ("dialect", "transport", "json"),
    [
        ("pharo", "ZnClient new", "STON fromString:"),
        ("squeak", "WebClient new", "Json readFrom:"),
        ("amber", "Platform fetchUrl:", "JSON parse:"),
    ],
)
def test_each_dialect_uses_its_own_transport(dialect: str, transport: str, json: str) -> None:
    file_in = read_file_in(generate_smalltalk_client(dialect))
    request = next(m.source for m in file_in.methods if m.selector == "request:path:body:")
    parse = next(m.source for m in file_in.methods if m.selector == "parseJson:")
    assert transport in request and json in parse
    assert transport.split()[0] in file_in.comments[CLIENT_CLASS]
    others = [t for d, t in (("pharo", "ZnClient"), ("squeak", "WebClient"), ("amber", "fetch")) if d != dialect]
    assert not any(t in request for t in others)


def test_amber_says_it_is_asynchronous() -> None:
    comment = read_file_in(generate_smalltalk_client("amber")).comments[CLIENT_CLASS]
    assert "Promise" in comment and "asynchronous" in comment


def test_file_in_syntax_per_dialect() -> None:
    assert "package: 'NeuroScope-Integration'" in generate_smalltalk_client("pharo")
    assert "category: 'NeuroScope-Integration'" in generate_smalltalk_client("squeak")
    amber = generate_smalltalk_client("amber")
    assert amber.count("Smalltalk createPackage:") == 2 and "slots: {#baseUrl. #apiKey. #model. #pending}" in amber


def test_base_url_and_quotes_are_escaped() -> None:
    source = generate_smalltalk_client("pharo", "http://host:1/it's/")
    default = next(m.source for m in read_file_in(source).methods if m.selector == "default")
    assert "baseUrl: 'http://host:1/it''s'" in default
    assert problems(default) == []


def test_chunk_reader_undoes_doubled_bangs() -> None:
    assert split_chunks("a!!b!c") == ["a!b", "c"]
    file_in = read_file_in("!Foo methodsFor: 'x'!\nbar\n\t^ 'hi!!'\n! !")
    assert [m.source for m in file_in.methods] == ["bar\n\t^ 'hi!'"]


def test_unknown_dialect_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown dialect 'visualworks'"):
        generate_smalltalk_client("visualworks")


def test_cli_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "client.st"
    assert main_smalltalk(["--dialect", "squeak", "--base-url", "http://10.0.0.2:9000", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text == generate_smalltalk_client("squeak", "http://10.0.0.2:9000")
    assert "'http://10.0.0.2:9000'" in text


def test_the_url_encoder_is_utf8_and_the_same_in_every_dialect() -> None:
    """urlEncode: sends each character outside the unreserved set as the %XX of its UTF-8 bytes, with the
    same source in Pharo and Squeak as in Amber, where the Amber tests run it against the server."""
    encoders = {}
    for dialect in DIALECTS:
        methods = {m.selector: m.source for m in read_file_in(generate_smalltalk_client(dialect)).methods if m.class_name == CLIENT_CLASS}
        encoders[dialect] = tuple(methods[s] for s in ("urlEncode:", "utf8BytesOf:", "percentByte:"))
        for source in encoders[dialect]:
            assert problems(source) == []
    assert encoders["pharo"] == encoders["squeak"] == encoders["amber"]
    url_encode, utf8_bytes, _ = encoders["pharo"]
    assert "(self utf8BytesOf: code) do: [ :byte | out := out , (self percentByte: byte) ]" in url_encode
    assert "16rD800" in url_encode and "16rFFFD" in url_encode  # surrogate pairs joined, lone ones replaced
    # One branch per UTF-8 length, each leading byte's marker where UTF-8 puts it.
    assert [marker in utf8_bytes for marker in ("^ { code }", "16rC0 +", "16rE0 +", "16rF0 +")] == [True] * 4
