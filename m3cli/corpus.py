"""Reading corpora and cutting documents into references.

Corpora: Parquet (column `text`; optional `id`, `title`, `source`), JSONL (one object per line
with the same fields), CSV with the same columns, text and Markdown files (one document each), a
directory of them, or `-` for standard input (JSONL, or plain text as one document). Documents
stream one at a time, so memory use does not grow with the corpus. A record (JSONL line, CSV
row, Parquet cell) is read whole and may hold at most `max_doc_bytes` (one-line error past it);
text files larger than STREAM_BYTES and plain text on standard input are read in pieces when the
caller asks (`stream=True`, as `m3 encode` does), so one document of any size is cut into
references in bounded memory. References are ≤ max_tokens tokens, cut at sentence boundaries
where possible. Knows nothing about models beyond a tokenizer.
"""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import M3Error

_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")
MAX_DOC_BYTES = 64 << 20  # default largest record (--max-doc-bytes)
STREAM_BYTES = 1 << 20  # text files above this are read in pieces of this size when streaming
PIECE_CHARS = 16384  # a "sentence" longer than this is cut (at whitespace if it can) before tokenizing


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    source: str
    text: str  # the whole text; "" for a streamed document (see pieces)
    stream: Callable[[], Iterator[str]] | None = field(default=None, compare=False, repr=False)

    def pieces(self) -> Iterator[str]:
        """The text in order, as pieces (one piece unless the document is streamed)."""
        return self.stream() if self.stream is not None else iter((self.text,))


def _text_chunks(read: Callable[[int], bytes], where: str) -> Iterator[str]:
    """Decode UTF-8 read in STREAM_BYTES pieces; refuses binary data (NUL bytes)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    first, offset = True, 0
    while True:
        data = read(STREAM_BYTES)
        nul = data.find(b"\0")
        if nul >= 0:
            raise M3Error(f"{where} is not text (a NUL byte at offset {offset + nul})")
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            raise M3Error(f"{where} is not valid UTF-8 text (near byte {offset})") from None
        if first and text.startswith("\ufeff"):
            text = text[1:]
        first = first and not text
        offset += len(data)
        if text:
            yield text
        if not data:
            return


def _document(obj, where: str, n: int) -> Document:
    if not isinstance(obj, dict):
        raise M3Error(f"{where}: line {n} is not a JSON object")
    text = obj.get("text")
    if not isinstance(text, str):
        raise M3Error(f"{where}: record {n} has no string field 'text'")
    doc = Document(
        id=str(obj.get("id") if obj.get("id") is not None else n),
        title=str(obj.get("title") or ""),
        source=str(obj.get("source") or ""),
        text=text,
    )
    for name in ("id", "title", "source", "text"):
        try:
            getattr(doc, name).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes such as \ud800
            raise M3Error(f"{where}: record {n} has invalid Unicode in field '{name}'") from None
    return doc


def _lines(stream, where: str, limit: int) -> Iterator[bytes | str]:
    """Lines of a stream, none longer than `limit` bytes (checked before it is read whole)."""
    n = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        n += 1
        if len(raw) > limit and not (len(raw) == limit + 1 and raw[-1:] in (b"\n", "\n")):
            raise M3Error(
                f"{where}: line {n} is longer than {limit:,} bytes; split the document or raise --max-doc-bytes"
            )
        yield raw


def _jsonl(stream, where: str, limit: int = MAX_DOC_BYTES) -> Iterator[Document]:
    for n, raw in enumerate(_lines(stream, where, limit), start=1):
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


def _check_size(doc: Document, where: str, n: int, limit: int) -> Document:
    size = len(doc.text) + len(doc.id) + len(doc.title) + len(doc.source)
    if size > limit:  # characters: at least this many bytes
        raise M3Error(
            f"{where}: record {n} holds more than {limit:,} bytes; split the document or raise --max-doc-bytes"
        )
    return doc


def _parquet(path: Path, limit: int = MAX_DOC_BYTES) -> Iterator[Document]:
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
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield _check_size(_document(row, str(path), n), str(path), n, limit)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # corrupt pages, bad compression
        raise M3Error(f"{path}: cannot read row {n + 1} ({(str(e).splitlines() or ['unreadable'])[0]})") from None


TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text", ".rst")


def _text_file(path: Path, name: str, stream: bool = False) -> Document:
    if stream and path.stat().st_size > STREAM_BYTES:

        def pieces() -> Iterator[str]:
            with open(path, "rb") as f:
                yield from _text_chunks(f.read, str(path))

        return Document(id=name, title=name, source=name, text="", stream=pieces)
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise M3Error(f"{path} is not text (a NUL byte at offset {nul})")
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


def _directory(directory: Path, stream: bool = False) -> Iterator[Document]:
    files = corpus_files(directory)
    if not files:
        raise M3Error(f"{directory} holds no text or Markdown files ({', '.join(TEXT_SUFFIXES)})")
    for path in files:
        name = path.relative_to(directory).as_posix()
        yield _text_file(path, name, stream)


def _csv(path: Path, limit: int = MAX_DOC_BYTES) -> Iterator[Document]:
    import csv

    csv.field_size_limit(limit)
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
            hint = "; split the document or raise --max-doc-bytes" if "field larger" in str(e) else ""
            raise M3Error(f"{path}: not readable as CSV ({e}){hint}") from None


def _stdin(stream_text: bool = False, limit: int = MAX_DOC_BYTES) -> Iterator[Document]:
    """JSONL when the first non-blank byte is `{`, else the whole input is one plain-text document
    (read in pieces with `stream_text`, else whole, up to `limit` bytes)."""
    if not hasattr(sys.stdin, "buffer"):  # a text stream without bytes underneath
        stream = io.BytesIO(sys.stdin.read().encode("utf-8", "surrogateescape"))
    else:
        stream = io.BufferedReader(sys.stdin.buffer)
    head = stream.peek(1)
    while head and not head.strip():  # skip leading blank bytes
        stream.read(len(head))
        head = stream.peek(1)
    if head.lstrip()[:1] == b"{":
        yield from _jsonl(stream, "stdin", limit)
        return
    if not head:
        return
    if stream_text:
        yield Document(
            id="stdin", title="", source="stdin", text="", stream=lambda: _text_chunks(stream.read, "standard input")
        )
        return
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise M3Error(f"standard input holds more than {limit:,} bytes of text; raise --max-doc-bytes")
    text = "".join(_text_chunks(io.BytesIO(data).read, "standard input"))
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


def read_corpus(source: str | Path, stream: bool = False, max_doc_bytes: int = MAX_DOC_BYTES) -> Iterator[Document]:
    """Documents of a corpus: Parquet, JSONL (.jsonl, .json or any other name), CSV with a `text`
    column, one text or Markdown file (one document), a directory of them (one document per file,
    recursively, the relative path as id and title), or '-': standard input, JSONL when it starts
    with `{`, else one plain-text document.

    stream: large text files and plain standard input come as streamed documents (Document.pieces);
    max_doc_bytes: the largest record read whole (JSONL line, CSV field, Parquet row, text on stdin)."""
    if max_doc_bytes < 1:
        raise M3Error("--max-doc-bytes must be at least 1")
    if str(source) == "-":
        yield from _stdin(stream, max_doc_bytes)
        return
    path = Path(source)
    if not path.exists():
        raise M3Error(f"corpus {path} does not exist")
    kind = corpus_kind(path)
    if kind == "directory":
        yield from _directory(path, stream)
        return
    if not path.is_file():
        raise M3Error(f"corpus {path} is not a file")
    if kind == "parquet":
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise M3Error(f"{path} is not a readable Parquet file (bad magic)")
        yield from _parquet(path, max_doc_bytes)
    elif kind == "csv":
        yield from _csv(path, max_doc_bytes)
    elif kind == "text":
        yield _text_file(path, path.name, stream)
    else:
        with open(path, "rb") as f:
            yield from _jsonl(f, str(path), max_doc_bytes)


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
    return list(iter_references((text,), tokenizer, max_tokens))


def _sentences(pieces: Iterable[str]) -> Iterator[str]:
    """Sentences of a text given in pieces, as `_SENTENCE_END` splits the whole text, except
    that an unfinished sentence longer than 2 × PIECE_CHARS at the end of a piece is cut into
    parts of about PIECE_CHARS (at whitespace where there is some), so memory stays bounded. A
    long sentence that ends within a piece comes out whole: iter_references cuts it between
    tokens anyway. Deterministic for a given piece size."""
    tail = ""
    for piece in pieces:
        tail += piece
        start = 0
        for m in _SENTENCE_END.finditer(tail):
            sentence = tail[start : m.start()].strip()
            if sentence:
                yield sentence
            start = m.end()
        tail = yield from _cut_runs(tail[start:], 2 * PIECE_CHARS)
    tail = yield from _cut_runs(tail, PIECE_CHARS)
    if tail.strip():
        yield tail.strip()


def _cut_runs(tail: str, longer_than: int):
    """Yield parts of about PIECE_CHARS (cut at whitespace where there is some) from the front of
    `tail` while it is longer than `longer_than`; return what is left."""
    while len(tail) > longer_than:
        cut = tail.rfind(" ", PIECE_CHARS // 2, PIECE_CHARS)
        cut = cut if cut > 0 else PIECE_CHARS
        if tail[:cut].strip():
            yield tail[:cut].strip()
        tail = tail[cut:]
    return tail


def iter_references(pieces: Iterable[str], tokenizer, max_tokens: int) -> Iterator[tuple[str, list[int]]]:
    """References of a document given as text pieces (Document.pieces()), in order: whole
    sentences packed greedily into ≤ max_tokens tokens, a longer sentence cut between tokens.
    Memory is bounded by a piece and a reference, whatever the document's length."""
    current: list[str] = []

    def flush():
        if current:
            joined = " ".join(current)
            ids = reference_ids(tokenizer, joined)
            current.clear()
            if ids:
                return (joined, ids)
        return None

    for sentence in _sentences(pieces):
        if len(reference_ids(tokenizer, sentence)) > max_tokens:
            ref = flush()
            if ref:
                yield ref
            enc = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            for start in range(0, len(ids), max_tokens):
                a, b = offsets[start][0], offsets[min(start + max_tokens, len(ids)) - 1][1]
                piece = sentence[a:b].strip()
                piece_ids = reference_ids(tokenizer, piece)
                if len(piece_ids) > max_tokens:  # re-tokenisation grew: keep the exact token slice
                    piece_ids = ids[start : start + max_tokens]
                if piece_ids:
                    yield (piece, piece_ids)
            continue
        if current and len(reference_ids(tokenizer, " ".join(current + [sentence]))) > max_tokens:
            ref = flush()
            if ref:
                yield ref
        current.append(sentence)
    ref = flush()
    if ref:
        yield ref
