"""m3 from Python: the same calls the command line makes, as three names.

    from m3cli import Bank, Model, encode            # and add, remove, compact

    encode("corpus.parquet", "kb.m3bank")                 # m3 encode corpus.parquet -o kb.m3bank
    with Bank.open("kb.m3bank") as bank:
        for hit in bank.search("Where was Ilsa Varenkov born?", k=3):
            print(hit.score, hit.title)
        model = Model.load(bank=bank)                     # the model that encoded the bank
        answer = model.generate("Where was Ilsa Varenkov born?", bank=bank)
        print(answer.text, [r.title for r in answer.references])

Model.load without a path resolves the model as the commands do: $M3_MODEL, else the model the
bank names, else the default model. A bank answers only to the model that encoded it.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import M3Error


@dataclass(frozen=True)
class Reference:
    """A reference a generation read: where it comes from, its retrieval score, and (when
    measured) the share of the memory layers' attention it got."""

    ref: int
    doc_id: str
    title: str
    score: float
    text: str
    chunk: int
    attention: float | None = None


@dataclass
class Answer:
    text: str
    finish_reason: str  # "eos", "length" or "context"
    prompt_tokens: int
    new_tokens: int
    references: list[Reference] = field(default_factory=list)  # every chunk's, in order
    chunks: list[dict] = field(default_factory=list)  # what `m3 generate --json` prints per chunk


class Bank:
    """An indexed .m3bank opened for reading: search it, or pass it to Model.generate."""

    def __init__(self, path: str | Path, embedder: str | None = None, device: str = "auto") -> None:
        from .bank import Bank as BankFile

        self.path = Path(path)
        self._file = BankFile(self.path)
        self._embedder_dir = embedder
        self._device = device
        self._retriever = None
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, *, embedder: str | None = None, device: str = "auto") -> Bank:
        """embedder: the encoder or static embedder dir the bank was indexed with, when it names
        one that is not where it was (minilm and self need none)."""
        return cls(path, embedder=embedder, device=device)

    # the bank's facts
    @property
    def references(self) -> int:
        """References that can be retrieved (removed documents' are not counted)."""
        return self._file.n_refs - self._file.removed_refs

    @property
    def documents(self) -> int:
        return self._file.live_docs

    @property
    def header(self) -> dict:
        return dict(self._file.header)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model that encoded the bank."""
        return str(self._file.header.get("m3.model.fingerprint"))

    def retriever(self, model=None, tokenizer=None, model_dir: Path | None = None):
        """The bank's retriever (its own query embedder); a `self`-indexed bank needs the model."""
        if self._retriever is None:
            from .device import resolve_device
            from .retrieval import Retriever, query_embedder

            emb = query_embedder(
                self._file,
                model_dir=model_dir,
                encoder=self._embedder_dir,
                device=resolve_device(self._device),
                model=model,
                tokenizer=tokenizer,
            )
            self._retriever = Retriever(self._file, emb)
        return self._retriever

    def search(
        self, query: str | Sequence[str], k: int = 5, *, max_overlap: float | None = None, max_gap: float | None = None
    ):
        """The k best references for a query (a list of `Hit`: ref, score, doc_id, title, text), or
        for each of several queries a list of them."""
        from .retrieval import check_max_gap

        if k < 1:
            raise M3Error("k must be at least 1")
        check_max_gap(max_gap)
        if self._file.header.get("m3.embed.name") == "self" and self._retriever is None:
            from .default_model import resolve_model

            self.retriever(model_dir=resolve_model(None, self.path))
        single = isinstance(query, str)
        queries = [query] if isinstance(query, str) else list(query)
        found = self.retriever().search(queries, k=k, max_overlap=max_overlap, max_gap=max_gap)
        return found[0] if single else found

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._file.close()

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Model:
    """A loaded m3 model dir: generate (closed book, with memory or RAG) and score text."""

    def __init__(self, loaded, device) -> None:
        self.loaded = loaded
        self.path = loaded.path
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.device = device
        self._generators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Bank -> Generator
        self._closed_book = None

    @classmethod
    def load(
        cls, path: str | Path | None = None, *, bank: Bank | None = None, device: str = "auto", dtype: str = "auto"
    ) -> Model:
        """path: an m3 model dir or "default"; None resolves it as the commands do. With bank, the
        model must be the one that encoded it (checked before any weights load)."""
        from .checkpoint import open_model
        from .default_model import resolve_model
        from .device import resolve_device, resolve_dtype

        model_dir = resolve_model(path, bank.path if bank is not None else None)
        check = None
        if bank is not None:
            from .bank import require_same_model

            def check(fingerprint: str) -> None:
                require_same_model(bank._file, fingerprint)

        dev = resolve_device(device)
        return cls(open_model(model_dir, dev, resolve_dtype(dev, dtype), check=check), dev)

    def generator(self, bank: Bank | None = None, cache_size: int = 4096):
        """The Generator reading `bank` (one per bank, kept: its memory cache persists)."""
        from .generate import Generator

        if bank is None:
            if self._closed_book is None:
                self._closed_book = Generator(self.loaded.model, self.tokenizer, None, cache_capacity=cache_size)
            return self._closed_book
        if bank.closed:
            raise M3Error(f"{bank.path} is closed; open it again (Bank.open)")
        if bank not in self._generators:
            retriever = None
            if bank is not None:
                from .bank import require_same_model

                require_same_model(bank._file, self.fingerprint)
                retriever = bank.retriever(model=self.loaded.model, tokenizer=self.tokenizer, model_dir=self.path)
            self._generators[bank] = Generator(self.loaded.model, self.tokenizer, retriever, cache_capacity=cache_size)
        return self._generators[bank]

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        bank: Bank | None = None,
        mode: str | None = None,
        memories: int = 5,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        chat: bool | None = None,
        max_overlap: float | None = None,
        max_gap: float | None = None,
        retrieve_every: int = 64,
        cite: bool = True,
        on_text=None,
    ):
        """Complete a prompt (an Answer) or several (a list, generated as one batch). mode: memory
        (default with a bank), rag or none. chat: the prompt in the model's chat template (True),
        as written (False), or where the model's tokenizer has one (None, as `m3 generate`).
        on_text(i, piece) receives text as it is generated."""
        from .generate import Options

        mode = mode or ("memory" if bank is not None else "none")
        if mode != "none" and bank is None:
            raise M3Error(f"mode {mode} needs a bank")
        opts = Options(
            mode=mode,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            memories=memories,
            retrieve_every=retrieve_every,
            max_overlap=max_overlap,
            max_gap=max_gap,
            chat=chat,
            cite=cite and mode == "memory",
        )
        single = isinstance(prompt, str)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        gen = self.generator(bank if mode != "none" else None)
        answers = [_answer(c, mode) for c in gen.generate(prompts, opts, on_text=on_text)]
        return answers[0] if single else answers

    def score(
        self,
        text: str,
        *,
        bank: Bank | None = None,
        mode: str | None = None,
        memories: int = 5,
        max_overlap: float | None = 0.67,
    ) -> dict:
        """Per-token log-probabilities and perplexity ({token_ids, logprobs, perplexity, mode, chunks})."""
        from .generate import Options

        mode = mode or ("memory" if bank is not None else "none")
        gen = self.generator(bank if mode != "none" else None)
        return gen.score(text, Options(mode=mode, memories=memories, max_overlap=max_overlap))


def _answer(c, mode: str) -> Answer:
    refs = []
    for rec in c.chunks:
        for j, h in enumerate(rec.hits):
            share = rec.attention[j] if rec.attention is not None and j < len(rec.attention) else None
            refs.append(Reference(h.ref, h.doc_id, h.title, h.score, h.text, rec.chunk, share))
    return Answer(c.text, c.finish_reason, c.prompt_tokens, len(c.token_ids), refs, [rec.to_json() for rec in c.chunks])


def _corpus_file(stack: contextlib.ExitStack, corpus: str | Path | Iterable[dict]) -> str:
    """A corpus path as the commands take it; an iterable of dicts is written to a temp JSONL."""
    import json
    import tempfile

    if isinstance(corpus, (str, Path)):
        return str(corpus)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="m3-corpus-"))
    path = Path(tmp) / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in corpus:
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise M3Error('every document must be a dict with a string "text"')
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return str(path)


def add(
    bank: str | Path,
    corpus: str | Path | Iterable[dict],
    *,
    replace: bool = False,
    model: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = False,
) -> dict:
    """`m3 add BANK CORPUS`: encode the documents with the bank's model and append them (index
    included), atomically. An id the bank holds is an error unless `replace`."""
    from .bank_update import add_documents
    from .default_model import resolve_model

    with contextlib.ExitStack() as stack:
        return add_documents(
            Path(bank),
            _corpus_file(stack, corpus),
            resolve_model(model, Path(bank)),
            replace=replace,
            batch_size=batch_size,
            device=device,
            show_progress=progress,
        )


def remove(bank: str | Path, doc_ids: Iterable[str]) -> dict:
    """`m3 remove BANK --doc ID…`: the documents are never retrieved again."""
    from .bank_update import remove_documents

    return remove_documents(Path(bank), list(doc_ids))


def compact(bank: str | Path) -> dict:
    """`m3 compact BANK`: rewrite the bank without removed documents, its segments folded into one."""
    from .bank_update import compact_bank

    return compact_bank(Path(bank))


def encode(
    corpus: str | Path | Iterable[dict],
    output: str | Path,
    *,
    model: str | Path | None = None,
    codec: str = "bf16",
    index: str = "auto",
    embedder: str = "minilm",
    batch_size: int = 16,
    device: str = "auto",
    force: bool = False,
    progress: bool = False,
) -> dict:
    """`m3 encode CORPUS -o OUTPUT`: cut the corpus into references, encode their memories, write the
    bank and index it. corpus: a file or dir (Parquet, JSONL, CSV, .txt/.md) or an iterable of
    {"text", "id"?, "title"?, "source"?} dicts. Returns what was written."""
    from .atomic import output_lock
    from .default_model import choose_model, model_hint, resolve_model
    from .device import resolve_device
    from .embed import load_embedder
    from .encoding import encode_corpus
    from .retrieval import index_bank

    hint = model_hint(choose_model(model)[0])
    model_dir = resolve_model(model)
    output = Path(output)
    with contextlib.ExitStack() as stack:
        corpus = _corpus_file(stack, corpus)
        with output_lock(output):
            summary = encode_corpus(
                str(corpus),
                model_dir,
                output,
                codec=codec,
                batch_size=batch_size,
                device=device,
                overwrite=force,
                show_progress=progress,
                model_hint=hint,
            )
            info = summary.to_json()
            if index.lower() != "none":
                emb = load_embedder(embedder, model_dir=model_dir, device=resolve_device(device))
                built = index_bank(output, emb, factory=index, show_progress=progress)
                info["index"] = {k: built[k] for k in ("factory", "embedder", "dim")}
    return info
