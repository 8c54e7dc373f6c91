"""Smalltalk source building blocks: methods, class specs, literals, and the chunk format.

The chunk format (Smalltalk Interchange Format, what `fileIn` reads) separates chunks
with `!` and doubles a literal `!`. A chunk that follows an empty one is a declaration
(`X methodsFor: 'p'`, `X commentStamp...`) that reads the chunks after it. `read_file_in`
is the same reading in Python, so tests can check each method of a generated file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    """One method: its protocol and source (first line is the message pattern)."""

    protocol: str
    source: str
    class_side: bool = False

    @property
    def selector(self) -> str:
        return selector_of(self.source)


@dataclass
class ClassSpec:
    name: str
    superclass: str
    ivars: tuple[str, ...]
    category: str
    comment: str
    methods: list[Method] = field(default_factory=list)


def selector_of(source: str) -> str:
    """The selector a method's source defines, read from its message pattern."""
    pattern = source.strip().splitlines()[0].strip()
    keywords = re.findall(r"([A-Za-z_][A-Za-z0-9_]*:)", pattern)
    if keywords:
        return "".join(keywords)
    return pattern.split()[0]


def st_string(text: str) -> str:
    """A Smalltalk string literal."""
    return "'" + text.replace("'", "''") + "'"


def st_literal(value: Any) -> str:
    """A Smalltalk literal for a JSON default value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return st_string(value)
    raise TypeError(f"no Smalltalk literal for {value!r}")


def st_string_array(items: Sequence[str]) -> str:
    return "{ " + ". ".join(st_string(i) for i in items) + " }"


def method(protocol: str, source: str, class_side: bool = False) -> Method:
    """A method from an indented Python literal: leading 4-space groups become tabs."""
    lines = source.strip("\n").splitlines()
    out = []
    for line in lines:
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 4
        out.append("\t" * depth + stripped)
    return Method(protocol, "\n".join(out), class_side)


def escape_chunk(text: str) -> str:
    """Chunk format: a literal exclamation mark is doubled."""
    return text.replace("!", "!!")


@dataclass(frozen=True)
class FiledMethod:
    """A method as a file-in defines it."""

    class_name: str
    class_side: bool
    protocol: str
    source: str

    @property
    def selector(self) -> str:
        return selector_of(self.source)


@dataclass
class FileIn:
    """What a chunk-format source holds: expressions to evaluate, class comments, methods."""

    doits: list[str] = field(default_factory=list)
    comments: dict[str, str] = field(default_factory=dict)
    methods: list[FiledMethod] = field(default_factory=list)


_METHODS_FOR = re.compile(r"^(\w+)( class)? methodsFor: '((?:[^']|'')*)'$")
_COMMENT_STAMP = re.compile(r"^(\w+) commentStamp(?:: '[^']*' prior: \d+)?$")


def split_chunks(source: str) -> list[str]:
    """The chunks of a chunk-format source, with doubled `!` undone."""
    return [c.replace("\0", "!") for c in source.replace("!!", "\0").split("!")]


def read_file_in(source: str) -> FileIn:
    """Read a chunk-format source the way a Smalltalk file-in does."""
    chunks = split_chunks(source)
    result = FileIn()
    i = 0
    while i < len(chunks):
        chunk = chunks[i]
        if chunk.strip():
            result.doits.append(chunk.strip())
            i += 1
            continue
        if i + 1 >= len(chunks) or not chunks[i + 1].strip():
            i += 1
            continue
        declaration = chunks[i + 1].strip()
        comment = _COMMENT_STAMP.match(declaration)
        if comment:
            result.comments[comment.group(1)] = chunks[i + 2].strip("\n")
            i += 3
            continue
        methods_for = _METHODS_FOR.match(declaration)
        if not methods_for:
            raise ValueError(f"unknown declaration chunk: {declaration[:80]!r}")
        name, class_side, protocol = methods_for.group(1), bool(methods_for.group(2)), methods_for.group(3)
        i += 2
        while i < len(chunks) and chunks[i].strip():
            result.methods.append(FiledMethod(name, class_side, protocol.replace("''", "'"), chunks[i].strip("\n")))
            i += 1
        i += 1
    return result
