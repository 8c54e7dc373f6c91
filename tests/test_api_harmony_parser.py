"""The Harmony parser on token ids from the real tiny gpt-oss tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mlx_engine.generation.harmony import Decode, HarmonyDelta, HarmonyStreamParser, HarmonyTokens, Route


def parse_harmony(decode: Decode, tokens: HarmonyTokens, ids: Sequence[int], in_header: bool = True) -> tuple[str, str]:
    """(content, reasoning) of a whole completion, through the streaming parser token by token."""
    parser = HarmonyStreamParser(decode, tokens, in_header=in_header)
    total = HarmonyDelta()
    for token in ids:
        total = total + parser.push(token)
    total = total + parser.finish()
    return total.content, total.reasoning


@pytest.fixture(scope="module")
def tok(gpt_oss_kit):
    return gpt_oss_kit.tokenizer


@pytest.fixture(scope="module")
def ht(tok) -> HarmonyTokens:
    return HarmonyTokens.from_vocab(tok.get_vocab())


def enc(tok, text: str) -> list[int]:
    ids = list(tok.encode(text, add_special_tokens=False))
    assert tok.decode(ids) == text
    return ids


def completion(tok, ht: HarmonyTokens, reasoning: str, answer: str) -> list[int]:
    """What gpt-oss writes after the template's `<|start|>assistant`."""
    return (
        [ht.channel] + enc(tok, "analysis") + [ht.message] + enc(tok, reasoning) + [ht.end, ht.start]
        + enc(tok, "assistant") + [ht.channel] + enc(tok, "final") + [ht.message] + enc(tok, answer) + [ht.return_]
    )


def stream(tok, ht, ids, in_header=True):
    parser = HarmonyStreamParser(tok.decode, ht, in_header=in_header)
    deltas = [parser.push(t) for t in ids]
    deltas.append(parser.finish())
    return deltas


def test_channels_split_into_reasoning_and_content(tok, ht):
    ids = completion(tok, ht, "Let me think about é and ü.", "Hello wörld, done.")
    content, reasoning = parse_harmony(tok.decode, ht, ids)
    assert reasoning == "Let me think about é and ü."
    assert content == "Hello wörld, done."


def test_streamed_deltas_add_up_and_never_leak_markers_or_half_characters(tok, ht):
    reasoning_text, answer_text = "Reason: naïve café", "Answer: déjà vu"
    ids = completion(tok, ht, reasoning_text, answer_text)
    deltas = stream(tok, ht, ids)
    assert "".join(d.content for d in deltas) == answer_text
    assert "".join(d.reasoning for d in deltas) == reasoning_text
    for d in deltas:
        for text in (d.content, d.reasoning):
            assert "<|" not in text and "\ufffd" not in text
            assert "analysis" not in text and "final" not in text and "assistant" not in text
    # the multi-byte characters are split across byte tokens in this vocabulary, so some
    # body tokens must have produced no text until the character was complete
    body_routes = [d.route for d in deltas[:-1]]
    assert Route.REASONING in body_routes and Route.CONTENT in body_routes
    assert any(d.route is Route.CONTENT and d.content == "" for d in deltas)


def test_routes_mark_each_token(tok, ht):
    ids = completion(tok, ht, "r", "c")
    deltas = stream(tok, ht, ids)[:-1]
    routes = {t: d.route for t, d in zip(ids, deltas)}
    for marker in (ht.channel, ht.message, ht.end, ht.start, ht.return_):
        assert routes[marker] is Route.STRUCTURE
    reasoning_tokens = [t for t, d in zip(ids, deltas) if d.route is Route.REASONING]
    content_tokens = [t for t, d in zip(ids, deltas) if d.route is Route.CONTENT]
    assert tok.decode(reasoning_tokens) == "r"
    assert tok.decode(content_tokens) == "c"


def test_marker_text_inside_a_body_is_just_text(tok, ht):
    # The characters of "<|channel|>" as ordinary tokens (not the special token).
    literal = enc(tok, "<|") + enc(tok, "channel") + enc(tok, "|>")
    assert ht.channel not in literal
    ids = [ht.channel] + enc(tok, "final") + [ht.message] + enc(tok, "see ") + literal + [ht.return_]
    content, reasoning = parse_harmony(tok.decode, ht, ids)
    assert content == "see <|channel|>"
    assert reasoning == ""


def test_commentary_constrain_and_channel_less_messages_are_content(tok, ht):
    ids = (
        [ht.channel] + enc(tok, "commentary to=functions.f ") + [ht.constrain] + enc(tok, "json") + [ht.message]
        + enc(tok, "{}") + [ht.call]
    )
    assert parse_harmony(tok.decode, ht, ids) == ("{}", "")
    no_channel = [ht.message] + enc(tok, "plain") + [ht.end]
    assert parse_harmony(tok.decode, ht, no_channel) == ("plain", "")


def test_header_text_is_never_output(tok, ht):
    # A completion cut off inside a header (max_tokens) yields nothing.
    ids = [ht.channel] + enc(tok, "analysis")
    assert parse_harmony(tok.decode, ht, ids) == ("", "")


def test_text_outside_any_message_is_shown_as_content(tok, ht):
    ids = [ht.channel] + enc(tok, "final") + [ht.message] + enc(tok, "a") + [ht.end] + enc(tok, "b")
    assert parse_harmony(tok.decode, ht, ids) == ("ab", "")


def test_an_unfinished_character_is_flushed_at_the_end(tok, ht):
    e_acute = enc(tok, "é")
    assert len(e_acute) == 2, "this test needs é to span two byte tokens"
    parser = HarmonyStreamParser(tok.decode, ht, in_header=False)
    for t in [ht.start] + enc(tok, "assistant") + [ht.channel] + enc(tok, "final") + [ht.message]:
        parser.push(t)
    assert parser.push(e_acute[0]).content == ""
    tail = parser.finish()
    assert tail.content == "\ufffd"  # the lone lead byte is all there is; it is not dropped


def test_non_harmony_vocabulary_is_rejected(llama_kit):
    with pytest.raises(ValueError, match="not a Harmony model"):
        HarmonyTokens.from_vocab(llama_kit.tokenizer.get_vocab())
