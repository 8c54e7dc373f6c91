"""Corpus readers and the batch plan (mlx_engine/store/corpus.py, plan.py), without a model.

Every input format yields the same documents in the same order; malformed input is a
clear error naming the file and line; windows and packing cover every token once.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlx_engine.store.corpus import Corpus, Document
from mlx_engine.store.errors import CorpusError
from mlx_engine.store.plan import plan_batches


def texts() -> list[str]:
    """Real text: the non-blank lines of textwrap's source, one document each."""
    return [line for line in inspect.getsource(textwrap).splitlines() if line.strip()][:25]


def write_all_formats(folder: Path, docs: list[str]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"txt": folder / "c.txt", "jsonl": folder / "c.jsonl", "parquet": folder / "c.parquet", "datasets": folder / "ds"}
    paths["txt"].write_text("\n".join(docs) + "\n", encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    pq.write_table(pa.table({"text": docs}), paths["parquet"])
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(paths["datasets"]))
    paths["folder"] = folder / "files"
    paths["folder"].mkdir()
    for i, d in enumerate(docs):
        (paths["folder"] / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    return paths


def test_every_format_reads_the_same_documents(tmp_path: Path) -> None:
    docs = texts()
    for kind, path in write_all_formats(tmp_path, docs).items():
        corpus = Corpus(path)
        assert corpus.kind == kind
        got = list(corpus)
        assert [d.text for d in got] == docs, kind
        summary = corpus.describe()
        assert summary.documents == len(docs) and summary.characters == sum(map(len, docs))
        assert summary.sha256 == Corpus(path).describe().sha256  # stable
    assert list(Corpus(tmp_path / "c.jsonl"))[3].source == "c.jsonl:4"
    assert list(Corpus(tmp_path / "c.parquet"))[3].source == "c.parquet[3]"
    assert [d.text for d in Corpus(docs)] == docs and [d.text for d in Corpus([{"text": d} for d in docs])] == docs


def test_the_corpus_hash_follows_the_content(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("one\ntwo\n")
    first = Corpus(a).describe().sha256
    a.write_text("one\ntwo!\n")
    assert Corpus(a).describe().sha256 != first


def test_malformed_input_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: no 'text' field \(found: body\)"):
        Corpus(bad).describe()
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        Corpus(bad).describe()
    with pytest.raises(CorpusError, match="not found"):
        Corpus(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="Unknown corpus format"):
        Corpus(tmp_path / "x.csv")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        Corpus(empty).describe()
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorpusError, match="not UTF-8"):
        Corpus(tmp_path / "binary").describe()


def fake_tokens(text: str) -> list[int]:
    """A deterministic stand-in tokenizer for the plan alone: one token per character, BOS first."""
    return [0] + [ord(c) % 200 + 1 for c in text]


def test_windows_cover_every_token_once_in_document_order() -> None:
    docs = [Document(t, f"d{i}") for i, t in enumerate(["a" * 3, "b" * 40, "c", "d" * 17])]
    batches = list(plan_batches(docs, fake_tokens, context_size=8, batch_size=3))
    windows = [w for b in batches for w in b.windows]
    assert all(len(b.windows) <= 3 for b in batches) and all(len(w) <= 8 for w in windows)
    doc = np.concatenate([w.doc for w in windows])
    pos = np.concatenate([w.pos for w in windows])
    expected = [(d, p) for d, t in enumerate(docs) for p in range(len(fake_tokens(t.text)))]
    assert list(zip(doc.tolist(), pos.tolist())) == expected
    for w in windows:  # a window is one document's positions [start, start + len)
        assert len(set(w.doc.tolist())) == 1 and w.pos[0] % 8 == 0
        assert w.tokens.tolist() == fake_tokens(docs[w.doc[0]].text)[w.pos[0] : w.pos[-1] + 1]
    assert [n for b in batches for n, _ in b.documents] == [0, 1, 2, 3]


def test_packing_fills_windows_across_documents() -> None:
    docs = [Document(t, f"d{i}") for i, t in enumerate(["a" * 3, "b" * 10, "c", "d" * 17])]
    windows = [w for b in plan_batches(docs, fake_tokens, context_size=8, batch_size=2, packed=True) for w in b.windows]
    stream = np.concatenate([fake_tokens(d.text) for d in docs])
    assert [len(w) for w in windows[:-1]] == [8] * (len(windows) - 1)
    assert np.concatenate([w.tokens for w in windows]).tolist() == stream.tolist()
    assert windows[0].doc.tolist() == [0] * 4 + [1] * 4 and windows[0].pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_max_tokens_cuts_the_stream_exactly() -> None:
    docs = [Document("x" * 30, "d0"), Document("y" * 30, "d1"), Document("z" * 30, "d2")]
    batches = list(plan_batches(docs, fake_tokens, context_size=8, batch_size=2, max_tokens=45))
    assert sum(b.rows for b in batches) == 45
    assert [n for b in batches for n, _ in b.documents] == [0, 1]  # the third document is never read
