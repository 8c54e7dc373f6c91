"""Where documents come from: a text file, a folder, JSON lines, parquet, a saved `datasets` folder, or memory.

A corpus is read twice, in the same order: once by `describe` (before anything is
written, so a bad line fails the run while the output folder is still untouched; it
also hashes the bytes), and once by the extraction itself, which may be a resume that
replays the corpus from the start. Each document carries its source (`file:line`,
`file[row]`) so a stored row can be traced to the input. Empty documents are skipped:
they have no text to tokenize, and skipping them everywhere keeps document numbers
the same whatever the input format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from .errors import CorpusError

FORMATS = "a .txt file (one document per line), a folder of text files, .jsonl, .parquet, or a `datasets` save_to_disk folder"
BATCH_ROWS = 1024  # parquet and datasets are read this many rows at a time (bounded memory)


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from."""

    text: str
    source: str


@dataclass(frozen=True)
class CorpusSummary:
    """What the manifest records of a corpus: its kind, location, content hash and size."""

    kind: str
    location: str
    text_field: Optional[str]
    sha256: str
    documents: int
    characters: int

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "location": self.location, "text_field": self.text_field,
            "sha256": self.sha256, "documents": self.documents, "characters": self.characters,
        }


def _is_datasets_folder(path: Path) -> bool:
    return (path / "state.json").exists() and (path / "dataset_info.json").exists()


def _is_datasets_dict_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").exists()


class Corpus:
    """A re-readable sequence of documents (see the module docstring)."""

    def __init__(self, data: Union[str, Path, Sequence[Any], Any], text_field: str = "text") -> None:
        self.text_field = text_field
        self._memory: Optional[Sequence[Any]] = None
        self.path: Optional[Path] = None
        if isinstance(data, (str, Path)):
            self.path = Path(data).expanduser()
            self.kind = self._file_kind(self.path)
        else:
            # A generator is read once here: a resume must replay the same documents.
            self._memory = data if hasattr(data, "__getitem__") else list(data)
            self.kind = "datasets" if hasattr(data, "column_names") else "memory"
            if self.kind == "datasets" and text_field not in data.column_names:
                raise CorpusError(f"The dataset has no {text_field!r} column (columns: {', '.join(data.column_names)}).")

    def _file_kind(self, path: Path) -> str:
        if not path.exists():
            raise CorpusError(f"Corpus {path} not found; give {FORMATS}.")
        if path.is_dir():
            if _is_datasets_dict_folder(path):
                splits = sorted(p.name for p in path.iterdir() if p.is_dir())
                raise CorpusError(f"{path} holds a DatasetDict; give one split's folder ({', '.join(splits)}).")
            return "datasets" if _is_datasets_folder(path) else "folder"
        suffix = path.suffix.lower()
        kinds = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
        if suffix not in kinds:
            raise CorpusError(f"Unknown corpus format {path.name!r}; give {FORMATS}.")
        return kinds[suffix]

    @property
    def location(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self._memory or ())} documents in memory>"

    def __iter__(self) -> Iterator[Document]:
        readers = {
            "txt": self._read_txt, "folder": self._read_folder, "jsonl": self._read_jsonl,
            "parquet": self._read_parquet, "datasets": self._read_datasets, "memory": self._read_memory,
        }
        for doc in readers[self.kind]():
            if doc.text:
                yield doc

    def _read_txt(self) -> Iterator[Document]:
        assert self.path is not None
        with open(self.path, encoding="utf-8", newline="") as fh:
            for number, line in enumerate(_decoded_lines(fh, self.path), start=1):
                yield Document(line.rstrip("\r\n"), f"{self.path.name}:{number}")

    def _folder_files(self) -> list[Path]:
        assert self.path is not None
        return sorted(
            p for p in self.path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
        )

    def _read_folder(self) -> Iterator[Document]:
        assert self.path is not None
        for file in self._folder_files():
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
            yield Document(text, str(file.relative_to(self.path)))

    def _read_jsonl(self) -> Iterator[Document]:
        assert self.path is not None
        field = self.text_field
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(_decoded_lines(fh, self.path), start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{where}: not valid JSON ({exc.msg}).") from None
                if not isinstance(record, dict) or field not in record:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise CorpusError(f"{where}: no {field!r} field (found: {keys}); set --text-field.")
                if not isinstance(record[field], str):
                    raise CorpusError(f"{where}: {field!r} is {type(record[field]).__name__}, not a string.")
                yield Document(record[field], f"{self.path.name}:{number}")

    def _read_parquet(self) -> Iterator[Document]:
        import pyarrow.parquet as pq

        assert self.path is not None
        try:
            table = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid for a broken file
            raise CorpusError(f"{self.path} is not a readable parquet file ({exc}).") from None
        names = table.schema_arrow.names
        if self.text_field not in names:
            raise CorpusError(f"{self.path} has no {self.text_field!r} column (columns: {', '.join(names)}); set --text-field.")
        yield from self._rows(table.iter_batches(batch_size=BATCH_ROWS, columns=[self.text_field]), self.path.name)

    def _read_datasets(self) -> Iterator[Document]:
        dataset = self._memory
        name = "dataset"
        if dataset is None:
            import datasets

            assert self.path is not None
            dataset = datasets.load_from_disk(str(self.path))
            name = self.path.name
            if self.text_field not in dataset.column_names:
                raise CorpusError(
                    f"{self.path} has no {self.text_field!r} column (columns: {', '.join(dataset.column_names)}); set --text-field."
                )
        batches = dataset.select_columns([self.text_field]).with_format("arrow").iter(batch_size=BATCH_ROWS)
        yield from self._rows(batches, name)

    def _rows(self, batches: Iterable[Any], name: str) -> Iterator[Document]:
        row = 0
        for batch in batches:
            for text in batch.column(self.text_field).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise CorpusError(f"{name}[{row}]: {self.text_field!r} is {type(text).__name__}, not a string.")
                yield Document(text or "", f"{name}[{row}]")
                row += 1

    def _read_memory(self) -> Iterator[Document]:
        for index, item in enumerate(self._memory or ()):
            if isinstance(item, dict):
                if self.text_field not in item or not isinstance(item[self.text_field], str):
                    raise CorpusError(f"documents[{index}]: no string {self.text_field!r} field (found: {', '.join(item)}).")
                yield Document(item[self.text_field], str(item.get("source", f"documents[{index}]")))
            elif isinstance(item, str):
                yield Document(item, f"documents[{index}]")
            else:
                raise CorpusError(f"documents[{index}] is {type(item).__name__}; give strings or dicts with {self.text_field!r}.")

    def _hash_files(self) -> str:
        """sha256 over the input's bytes (file names included for a folder), streamed."""
        assert self.path is not None
        digest = hashlib.sha256()
        files = [self.path] if self.path.is_file() else self._folder_files()
        for file in files:
            if self.path.is_dir():
                digest.update(str(file.relative_to(self.path)).encode() + b"\0")
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def describe(self) -> CorpusSummary:
        """Read every document once (so a malformed one fails now) and hash the corpus.

        Files are hashed by their bytes; documents in memory by their texts and sources.
        """
        digest = hashlib.sha256()
        count = characters = 0
        for doc in self:
            count += 1
            characters += len(doc.text)
            if self.path is None:
                for part in (doc.source, doc.text):
                    data = part.encode("utf-8")
                    digest.update(len(data).to_bytes(8, "little") + data)
        if count == 0:
            raise CorpusError(f"The corpus {self.location} has no non-empty documents.")
        sha = digest.hexdigest() if self.path is None else self._hash_files()
        field = self.text_field if self.kind in ("jsonl", "parquet", "datasets", "memory") else None
        return CorpusSummary(self.kind, self.location, field, sha, count, characters)


def _decoded_lines(fh: Any, path: Path) -> Iterator[str]:
    """The file's lines, with a decoding error named by its line."""
    number = 0
    try:
        for number, line in enumerate(fh, start=1):
            yield line
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}:{number + 1}: not UTF-8 text ({exc.reason}).") from None
