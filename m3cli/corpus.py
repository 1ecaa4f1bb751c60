"""Reading corpora and cutting documents into references.

Corpora: Parquet (column `text`; optional `id`, `title`, `source`), JSONL (one object per line
with the same fields), CSV with the same columns, text and Markdown files (one document each), a
directory of them, or `-` for standard input (JSONL, or plain text as one document). Documents
stream one at a time, so memory use does not grow with the corpus (plain text on stdin excepted). References are ≤ max_tokens tokens, cut at sentence
boundaries where possible. Knows nothing about models beyond a tokenizer.
"""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import M3Error

_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    source: str
    text: str


def _document(obj, where: str, n: int) -> Document:
    if not isinstance(obj, dict):
        raise M3Error(f"{where}: line {n} is not a JSON object")
    text = obj.get("text")
    if not isinstance(text, str):
        raise M3Error(f"{where}: record {n} has no string field 'text'")
    doc = Document(id=str(obj.get("id") if obj.get("id") is not None else n), title=str(obj.get("title") or ""),
                   source=str(obj.get("source") or ""), text=text)
    for name in ("id", "title", "source", "text"):
        try:
            getattr(doc, name).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes such as \ud800
            raise M3Error(f"{where}: record {n} has invalid Unicode in field '{name}'") from None
    return doc


def _jsonl(stream, where: str) -> Iterator[Document]:
    for n, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            raise M3Error(f"{where}: line {n} is not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise M3Error(f"{where}: line {n} is not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # huge integers, deep nesting
            raise M3Error(f"{where}: line {n} cannot be read ({str(e)[:100]})") from None
        yield _document(obj, where, n)


def _parquet(path: Path) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise M3Error(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = set(pf.schema_arrow.names)
    if "text" not in names:
        raise M3Error(f"{path} has no 'text' column (columns: {', '.join(sorted(names)) or 'none'})")
    columns = [c for c in ("id", "title", "source", "text") if c in names]
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield _document(row, str(path), n)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # corrupt pages, bad compression
        raise M3Error(f"{path}: cannot read row {n + 1} ({(str(e).splitlines() or ['unreadable'])[0]})") from None


TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")


def _text_file(path: Path, name: str) -> Document:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise M3Error(f"{path} is not valid UTF-8 text") from None
    return Document(id=name, title=name, source=name, text=text)


def corpus_files(directory: Path) -> list[Path]:
    """The text and Markdown files under a directory, recursively, in a stable (sorted) order;
    hidden files and directories are skipped."""
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            files.append(path)
    return files


def _directory(directory: Path) -> Iterator[Document]:
    files = corpus_files(directory)
    if not files:
        raise M3Error(f"{directory} holds no text or Markdown files ({', '.join(TEXT_SUFFIXES)})")
    for path in files:
        name = path.relative_to(directory).as_posix()
        yield _text_file(path, name)


def _csv(path: Path) -> Iterator[Document]:
    import csv

    csv.field_size_limit(1 << 26)
    with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
        try:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            if "text" not in names:
                raise M3Error(f"{path} has no 'text' column (columns: {', '.join(names) or 'none'})")
            for n, row in enumerate(reader, start=1):
                if row.get("text") is None:
                    raise M3Error(f"{path}: row {n} has no value in column 'text'")
                yield _document({k: row.get(k) for k in ("id", "title", "source", "text")}, str(path), n)
        except UnicodeDecodeError:
            raise M3Error(f"{path} is not valid UTF-8") from None
        except csv.Error as e:
            raise M3Error(f"{path}: not readable as CSV ({e})") from None


def _stdin() -> Iterator[Document]:
    """JSONL when the first non-blank byte is `{`, else the whole input is one plain-text document."""
    if not hasattr(sys.stdin, "buffer"):  # a text stream without bytes underneath
        stream = io.BytesIO(sys.stdin.read().encode("utf-8", "surrogateescape"))
    else:
        stream = io.BufferedReader(sys.stdin.buffer)
    head = stream.peek(1)
    while head and not head.strip():  # skip leading blank bytes
        stream.read(len(head))
        head = stream.peek(1)
    if head.lstrip()[:1] == b"{":
        yield from _jsonl(stream, "stdin")
        return
    try:
        text = stream.read().decode("utf-8")
    except UnicodeDecodeError:
        raise M3Error("standard input is not valid UTF-8") from None
    if text.strip():
        yield Document(id="stdin", title="", source="stdin", text=text)


def corpus_kind(source: str | Path) -> str:
    """How read_corpus reads a source: stdin, directory, parquet, csv, text or jsonl."""
    if str(source) == "-":
        return "stdin"
    path = Path(source)
    if path.is_dir():
        return "directory"
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1" or path.suffix.lower() == ".parquet":
            return "parquet"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "jsonl"


def read_corpus(source: str | Path) -> Iterator[Document]:
    """Documents of a corpus: Parquet, JSONL (.jsonl, .json or any other name), CSV with a `text`
    column, one text or Markdown file (one document), a directory of them (one document per file,
    recursively, the relative path as id and title), or '-': standard input, JSONL when it starts
    with `{`, else one plain-text document."""
    if str(source) == "-":
        yield from _stdin()
        return
    path = Path(source)
    if not path.exists():
        raise M3Error(f"corpus {path} does not exist")
    kind = corpus_kind(path)
    if kind == "directory":
        yield from _directory(path)
        return
    if not path.is_file():
        raise M3Error(f"corpus {path} is not a file")
    if kind == "parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise M3Error(f"{path} is not a readable Parquet file (bad magic)")
        yield from _parquet(path)
    elif kind == "csv":
        yield from _csv(path)
    elif kind == "text":
        yield _text_file(path, path.name)
    else:
        with open(path, "rb") as f:
            yield from _jsonl(f, str(path))


def reference_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a reference's text as it reads after the prefix ("Reference:"): a space, then
    the text. So a word at its start is tokenized as it is mid-sentence (' Kessel', not 'Kessel')
    and matches the same word in a prompt. A leading token that is only whitespace (what
    SentencePiece tokenizers make of the space) is dropped."""
    ids = list(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
    if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids


def split_references(text: str, tokenizer, max_tokens: int) -> list[tuple[str, list[int]]]:
    """Cut a document into references of ≤ max_tokens tokens: whole sentences packed greedily;
    a sentence longer than max_tokens is cut between tokens. Returns (text, token_ids) pairs."""
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    refs: list[tuple[str, list[int]]] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            joined = " ".join(current)
            refs.append((joined, reference_ids(tokenizer, joined)))
            current.clear()

    for sentence in sentences:
        if len(reference_ids(tokenizer, sentence)) > max_tokens:
            flush()
            enc = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            for start in range(0, len(ids), max_tokens):
                a, b = offsets[start][0], offsets[min(start + max_tokens, len(ids)) - 1][1]
                piece = sentence[a:b].strip()
                piece_ids = reference_ids(tokenizer, piece)
                if len(piece_ids) > max_tokens:  # re-tokenisation grew: keep the exact token slice
                    piece_ids = ids[start:start + max_tokens]
                if piece_ids:
                    refs.append((piece, piece_ids))
            continue
        candidate = " ".join(current + [sentence])
        if current and len(reference_ids(tokenizer, candidate)) > max_tokens:
            flush()
        current.append(sentence)
    flush()
    return [(t, ids) for t, ids in refs if ids]
