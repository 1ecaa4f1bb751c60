"""Generation that reads explicit memory (DESIGN §2), and the closed-book and RAG baselines.

Schedule, per sequence:
- the prompt is cut into chunks of `chunk_length` (64) tokens; each chunk retrieves its own
  memories with its own text and only its tokens read them (the prompt is prefilled a chunk's
  width at a time, each block reading the memories of the chunks it overlaps);
- the first decoded chunk inherits the last prompt chunk's memories;
- after every `retrieve_every` (64) generated tokens, those tokens are the query for the next
  decoded chunk's memories. The context KV cache is never recomputed when memories change:
  only the keys in front of it are replaced (`KVCache`).

Memories come from the bank by memory-map through an LRU cache on the model's device, so a
reference used again costs nothing. Retrieval for all sequences of a batch is one call.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .attention import KVCache, Memory, chunk_visibility, score_gaps
from .errors import M3Error
from .retrieval import check_max_gap
from .memory_cache import MemoryCache, keep_freed_memory  # noqa: F401 (imported from here too)
from .chat import chat_queries, user_token_mask  # noqa: F401 (imported from here too)

MODES = ("memory", "none", "rag")


# --- the schedule, as plain functions (unit-tested) ----------------------------------------
def prompt_chunks(n_tokens: int, chunk_length: int) -> list[tuple[int, int]]:
    """[start, end) of each prompt chunk: full chunks of chunk_length, the last one may be short."""
    return [(s, min(s + chunk_length, n_tokens)) for s in range(0, n_tokens, chunk_length)]


def retrieval_due(generated_index: int, every: int) -> bool:
    """True when the generated token with this 0-based index starts a new decoded chunk that
    retrieves its own memories (queried with the `every` tokens before it). Index 0 starts the
    first decoded chunk, which inherits the last prompt chunk's memories instead."""
    return generated_index > 0 and generated_index % every == 0


def decoded_chunk(generated_index: int, every: int) -> int:
    return generated_index // every


MAX_MEMORIES = 256  # memories per chunk (--memories); a bank with fewer references gives all it has
MAX_NEW_TOKENS = 1 << 20


@dataclass
class Options:
    mode: str = "memory"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    memories: int = 5
    retrieve_every: int = 64
    max_overlap: float | None = None
    max_gap: float | None = None  # drop hits scoring more than this below the chunk's best (None = keep top-k)
    chat: bool | None = None  # the prompt in the chat template; None: where the model's tokenizer has one
    stop_at_eos: bool = True
    cite: bool = False  # measure the attention share of every memory (explicit logits; cheap read chunk-aligned)
    templated: bool = False  # prompts already hold the chat template's text: add no special tokens
    score_prior: bool = True  # a model with the retriever-score prior reads the hits' scores (False: content alone)

    def check(self) -> None:
        if self.mode not in MODES:
            raise M3Error(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise M3Error(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise M3Error("--temperature must be a finite number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise M3Error("--top-p must be in (0, 1]")
        if self.top_k < 0:
            raise M3Error("--top-k must be >= 0 (0 = off)")
        if not 1 <= self.memories <= MAX_MEMORIES:
            raise M3Error(f"--memories must be in 1..{MAX_MEMORIES}")
        if self.retrieve_every < 1:
            raise M3Error("--retrieve-every must be at least 1")
        if self.max_overlap is not None and not 0 <= self.max_overlap <= 1:
            raise M3Error("--max-overlap must be in [0, 1]")
        check_max_gap(self.max_gap)


@dataclass
class ChunkRecord:
    chunk: int
    source: str  # "prompt", "inherited" (first decoded chunk) or "generated"
    tokens: tuple[int, int]  # [start, end) in the prompt, or in the generated tokens
    query: str | None
    hits: list  # retrieval.Hit
    attention: list[float] | None = None  # share of memory-layer attention per hit (cite)
    last_attention: list[float] | None = None  # prompt chunks, cite: the same at the chunk's last token

    def to_json(self) -> dict:
        refs = []
        for j, h in enumerate(self.hits):
            r = {"ref": h.ref, "score": round(h.score, 6), "doc_id": h.doc_id, "title": h.title}
            if self.attention is not None:
                r["attention"] = round(self.attention[j], 6)
            refs.append(r)
        return {
            "chunk": self.chunk,
            "source": self.source,
            "tokens": list(self.tokens),
            "query": self.query,
            "references": refs,
        }


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "length" (max new tokens), "context" (the context is full) or "cancelled"
    chunks: list[ChunkRecord] = field(default_factory=list)

    def to_json(self, mode: str) -> dict:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "mode": mode,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "chunks": [c.to_json() for c in self.chunks],
        }


def _sample(logits: torch.Tensor, opts: Options, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits (B, V): greedy at temperature 0, else top-k / top-p sampling."""
    if opts.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if opts.top_k > 0:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= opts.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@dataclass
class _Row:
    """One sequence of a batch while it decodes."""

    limit: int  # new tokens it may generate (max_new_tokens, or what its context leaves)
    finish: str  # why it stops if nothing else stops it first: "length" or "context"
    chunks: list[ChunkRecord]  # what each of its chunks read (the citations)
    hits: list = field(default_factory=list)  # the memories its current decoded chunk reads
    done: bool = False
    n_out: int = 0  # tokens it generated
    printed: str = ""  # text already passed to on_text


class Generator:
    """Generates for batches of prompts in one of three modes on one loaded model.

    retriever: a `retrieval.Retriever` over a bank encoded by this model (memory, rag).
    """

    # a memory-mode prompt longer than a chunk is prefilled a chunk's width at a time
    # (`_chunked_prefill`) when a block has at least this many rows (batch x chunk_length; fewer
    # re-read every weight per block for too little work: at batch 1 on 2 CPU cores one call is
    # faster); else in one call through a block mask (the same function, every chunk's memories
    # per token)
    chunked_prefill_rows = 256

    def __init__(self, model, tokenizer, retriever=None, cache_capacity: int = 4096) -> None:
        self.model, self.tokenizer, self.retriever = model, tokenizer, retriever
        self.cfg = model.config
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.timings: dict[str, float] = defaultdict(float)
        if self.device.type == "cpu":
            keep_freed_memory()  # no fresh page faults for each call's buffers
        self.memory_cache = None
        self._sink = None
        if retriever is not None:
            from .bank import require_geometry

            require_geometry(retriever.bank, self.cfg)
            self.memory_cache = MemoryCache(retriever.bank, self.device, self.dtype, cache_capacity)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.pad_id = eos if isinstance(eos, int) else 0
        bos = getattr(tokenizer, "bos_token_id", None)
        if isinstance(bos, int) and self.eos:  # a model that starts a new text or turn (SmolLM2's
            self.eos.add(bos)  # <|im_start|>) has ended this one

    # -- helpers ------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tick(self, name: str, t0: float) -> float:
        self._sync()
        t = time.perf_counter()
        self.timings[name] += t - t0
        return t

    def sink(self) -> torch.Tensor:
        if self._sink is None:
            with torch.inference_mode():
                self._sink = self.model.encode_prefix()
        return self._sink

    def _retrieve(self, queries: list[str | None], opts: Options) -> list[list]:
        """Hits per query; None (a chat prompt's chunk of template text only) gets none."""
        t0 = time.perf_counter()
        asked = [i for i, q in enumerate(queries) if q is not None]
        found = (
            self.retriever.search(
                [queries[i] for i in asked], k=opts.memories, max_overlap=opts.max_overlap, max_gap=opts.max_gap
            )
            if asked
            else []
        )
        hits: list[list] = [[] for _ in queries]
        for i, h in zip(asked, found):
            hits[i] = h
        self._tick("retrieval", t0)
        return hits

    def _memory(
        self, rows: list[list], n_slots: int, visible=None, group: int | None = None, scored: bool = True
    ) -> Memory:
        """Memory whose sequence b holds rows[b]'s hits (None = an empty slot) in its first slots.
        group: slots per chunk (each chunk's hits fill `group` consecutive slots; default: all of
        a row is one chunk's) — the retriever-score prior compares a hit with its chunk's best.
        scored=False leaves the scores out (the prior then adds nothing: the paper's reading)."""
        t0 = time.perf_counter()
        ids = [[None if h is None else h.ref for h in row] + [None] * (n_slots - len(row)) for row in rows]
        kv, valid = self.memory_cache.stack(ids, n_slots, self.retriever.bank.memory_shape)
        scores = None
        if self.cfg.memory_score_prior and scored and n_slots:
            step = group or n_slots
            hit_scores = [[0.0 if h is None else h.score for h in row] + [0.0] * (n_slots - len(row)) for row in rows]
            refs = torch.tensor([[-1 if r is None else r for r in row] for row in ids]).view(len(rows), -1, step)
            scores = score_gaps(refs, torch.tensor(hit_scores).view(refs.shape)).to(self.device)
        mem = Memory(kv=kv, valid=valid, sink=self.sink(), visible=visible, scores=scores)
        self._tick("memory_load", t0)
        return mem

    def _prompt_memory(
        self,
        spans: list[list[tuple[int, int]]],
        queries: list[list[str | None]],
        pads: list[int],
        T: int,
        opts: Options,
    ) -> tuple[Memory, list[list[ChunkRecord]], tuple]:
        """Each prompt chunk retrieves with its own query; one Memory holds every chunk's hits, and
        a block mask lets only that chunk's tokens read them (left padding reads nothing). Returns
        it with the chunks' records and (token_chunk (B, T), slot_chunk (B, slots), slots per
        chunk) for `_chunked_prefill`. Shared by generate and score."""
        m = opts.memories
        found = iter(self._retrieve([q for qs in queries for q in qs], opts))
        B, n_chunks = len(spans), max(len(s) for s in spans)
        slot_chunk = torch.full((B, n_chunks * m), -1, dtype=torch.long)
        token_chunk = torch.full((B, T), -2, dtype=torch.long)  # padding reads no chunk's memories
        records: list[list[ChunkRecord]] = [[] for _ in range(B)]
        rows = []
        for b in range(B):
            row: list = []
            for c, (s, e) in enumerate(spans[b]):
                hs = next(found)
                records[b].append(ChunkRecord(c, "prompt", (s, e), queries[b][c], hs))
                slot_chunk[b, c * m : c * m + len(hs)] = c
                row.extend(hs + [None] * (m - len(hs)))
                token_chunk[b, pads[b] + s : pads[b] + e] = c
            rows.append(row)
        visible = chunk_visibility(token_chunk, slot_chunk, 0).to(self.device)
        memory = self._memory(rows, n_chunks * m, visible, group=m, scored=opts.score_prior)
        if not any(pads) and all(h is not None for row in rows for h in row):
            memory.prepared["aligned"] = self.cfg.chunk_length  # chunk c's tokens read slots c*m.. (`reads_aligned`)
        return memory, records, (token_chunk.to(self.device), slot_chunk.to(self.device), m)

    def _chunked_prefill(self, x, memory: Memory, chunking: tuple, cache: KVCache, positions, key_mask, cite: bool):
        """Prefill the prompt in blocks of chunk_length columns, each reading only the memories of
        the chunks it overlaps (at most two per sequence: a sequence's chunks start where it
        starts): every token sees the keys it sees in one call through the block mask, but each
        attends over a block's 2 x memories slots instead of every chunk's. Returns the last
        position's logits (B, vocab) and, with `cite`, each token's attention share per slot of
        `memory` (B, T, slots)."""
        token_chunk, slot_chunk, m = chunking
        B, T = x.shape
        L, S = self.cfg.chunk_length, memory.n_slots
        rows = torch.arange(B, device=self.device)[:, None]
        share = torch.zeros(B, T, S, device=self.device) if cite else None
        out = None
        for c0 in range(0, T, L):
            c1 = min(c0 + L, T)
            tc = token_chunk[:, c0:c1]  # (B, t): chunk of each token, < 0 for padding
            first = tc.masked_fill(tc < 0, 1 << 30).amin(dim=1).masked_fill((tc < 0).all(dim=1), 0)  # (B,)
            spans = int((tc.amax(dim=1) > first).any()) + 1  # 2 when a sequence's chunks meet in the block
            idx = first[:, None] * m + torch.arange(spans * m, device=self.device)[None]  # (B, spans * m) slots
            inside = idx < S
            idx = idx.clamp_max(S - 1)
            sc = slot_chunk.gather(1, idx).masked_fill(~inside, -1)
            visible = (tc[:, :, None] == sc[:, None, :]) & (sc[:, None, :] >= 0)
            f0, f1 = torch.stack([first.min(), first.max()]).tolist()
            if f0 == f1 and (f0 + spans) * m <= S:  # every sequence at the same slots: views, no gather
                sl = slice(f0 * m, (f0 + spans) * m)
                scores = None if memory.scores is None else memory.scores[:, sl]
                block = Memory(memory.kv[:, sl], memory.valid[:, sl], memory.sink, visible, scores)
            else:
                block = Memory(
                    kv=memory.kv[rows, idx],
                    valid=memory.valid[rows, idx] & inside[:, :, None, None, None],
                    sink=memory.sink,
                    visible=visible,
                    scores=None if memory.scores is None else memory.scores.gather(1, idx),
                )
            probe = [] if cite else None
            out = self.model(
                x[:, c0:c1],
                memory=block,
                cache=cache,
                position_ids=None if positions is None else positions[:, c0:c1],
                key_mask=None if key_mask is None else key_mask[:, :c1],
                last_only=True,
                return_hidden=c1 < T,  # only the last block's logits are needed
                attention_probe=probe,
            )
            if share is not None and probe:
                got = torch.stack(probe).mean(0) * inside[:, None, :]  # (B, t, spans * m)
                share[:, c0:c1].scatter_add_(2, idx[:, None, :].expand(-1, c1 - c0, -1), got.to(share.dtype))
        assert out is not None
        return out[:, -1], share

    def _prompt_queries(
        self, prompt: str, ids: list[int], spans: list[tuple[int, int]], opts: Options, forced: bool = False
    ) -> list[str | None]:
        """Each prompt chunk's retrieval query: its text, or with --chat the user's text in it."""
        users = None if forced else self.user_tokens(prompt, opts)
        if users is None or len(users) != len(ids):
            return [self.tokenizer.decode(ids[s:e], skip_special_tokens=True) for s, e in spans]
        return self.chat_queries(ids, users, spans)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def uses_chat(self, opts: Options) -> bool:
        """Whether prompts go in the chat template: --chat/--no-chat, or by default (None) where the
        model's tokenizer has one (an instruct model's reader is trained on its chat turns)."""
        if opts.chat is None:
            return not opts.templated and self.has_chat_template()
        return opts.chat

    def _chat(self, text: str) -> str:
        if not self.has_chat_template():
            raise M3Error("--chat: this model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def encode_prompt(self, prompt: str, opts: Options, context: list[str] | None = None) -> list[int]:
        """Token ids of a prompt: with the references' text in front (rag), in the chat template."""
        text = prompt if not context else "\n\n".join(context) + "\n\n" + prompt
        if self.uses_chat(opts):
            return [int(i) for i in self.tokenizer(self._chat(text), add_special_tokens=False)["input_ids"]]
        return [int(i) for i in self.tokenizer(text, add_special_tokens=not opts.templated)["input_ids"]]

    def user_tokens(self, prompt: str, opts: Options) -> list[bool] | None:
        """In the chat template, which of encode_prompt's tokens hold the user's text
        (`user_token_mask`); None for a plain prompt."""
        if not self.uses_chat(opts) or not prompt:
            return None
        return user_token_mask(self.tokenizer, prompt, self._chat(prompt))

    def chat_queries(self, ids: list[int], users: list[bool], spans: list[tuple[int, int]]) -> list[str | None]:
        return chat_queries(self.tokenizer, ids, users, spans, self.cfg.chunk_length)

    def _prompt_ids(
        self, prompts: list[str], opts: Options, forced_ids: list[list[int]] | None, first_number: int
    ) -> tuple[list[list[int]], list[list[ChunkRecord]]]:
        """Each prompt's token ids (rag: with its references' text in front) and, for rag, the
        record of what it read; every prompt is checked to fit the context."""
        B, cfg = len(prompts), self.cfg
        chunks: list[list[ChunkRecord]] = [[] for _ in range(B)]
        if opts.mode == "rag":
            hits = self._retrieve(prompts, opts)
            ids = [self.encode_prompt(p, opts, [h.text for h in hs]) for p, hs in zip(prompts, hits)]
            for b in range(B):
                chunks[b].append(ChunkRecord(0, "prompt", (0, len(ids[b])), prompts[b], hits[b]))
        else:
            ids = forced_ids if forced_ids is not None else [self.encode_prompt(p, opts) for p in prompts]
        for b, seq in enumerate(ids):
            if not seq:
                raise M3Error(f"prompt {b + first_number} is empty")
            if len(seq) >= cfg.context_length:
                raise M3Error(
                    f"prompt {b + first_number} has {len(seq)} tokens"
                    f"{' with the references in front (rag)' if opts.mode == 'rag' else ''}; "
                    f"the model's context is {cfg.context_length} tokens"
                )
        return ids, chunks

    # -- the main loop -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        opts: Options,
        on_text=None,
        forced_ids: list[list[int]] | None = None,
        first_number: int = 1,
        max_new_tokens: list[int] | None = None,
        stop=None,
    ) -> list[Completion]:
        """Complete each prompt. on_text(b, piece) receives text as it is generated.

        forced_ids: token ids to use instead of tokenizing the prompts (benchmarks).
        first_number: how errors number the first prompt of this batch (1-based, for messages).
        max_new_tokens: per prompt, at most opts.max_new_tokens each (a server's batch of requests).
        stop(b) -> bool: asked after every token; True ends sequence b there ("cancelled": its
        client went away), the others go on.
        """
        started = time.perf_counter()
        opts.check()
        if opts.mode != "none" and self.retriever is None:
            raise M3Error(f"--mode {opts.mode} needs --bank (a bank encoded by this model, with an index)")
        if self.retriever is not None and opts.memories > self.retriever.bank.n_refs:
            opts = dataclasses.replace(opts, memories=self.retriever.bank.n_refs)  # all the bank has
        B = len(prompts)
        if max_new_tokens is not None and len(max_new_tokens) != B:
            raise ValueError("max_new_tokens needs one limit per prompt")
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(opts.seed) if opts.temperature > 0 else None
        ids, chunks = self._prompt_ids(prompts, opts, forced_ids, first_number)
        lengths = [len(seq) for seq in ids]
        T = max(lengths)
        pads = [T - n for n in lengths]
        padded = any(pads)
        x = torch.full((B, T), self.pad_id, dtype=torch.long, device=self.device)
        for b, seq in enumerate(ids):
            x[b, pads[b] :] = torch.tensor(seq, device=self.device)
        key_mask = positions = None
        if padded:
            key_mask = torch.arange(T, device=self.device)[None] >= torch.tensor(pads, device=self.device)[:, None]
            positions = (
                torch.arange(T, device=self.device)[None] - torch.tensor(pads, device=self.device)[:, None]
            ).clamp_min(0) + cfg.context_offset

        # prompt chunks retrieve with their own text; each chunk's tokens read only its memories
        memory = None
        if opts.mode == "memory":
            spans = [prompt_chunks(n, cfg.chunk_length) for n in lengths]
            queries = [
                self._prompt_queries(p, seq, sp, opts, forced=forced_ids is not None)
                for p, seq, sp in zip(prompts, ids, spans)
            ]
            memory, chunks, chunking = self._prompt_memory(spans, queries, pads, T, opts)
        cite = opts.cite and opts.mode == "memory"
        t0 = time.perf_counter()
        cache = KVCache(cfg.n_layers)
        share = None
        if (
            memory is not None
            and T > cfg.chunk_length
            and B * cfg.chunk_length >= self.chunked_prefill_rows
            and not self.model.reads_aligned(memory, T, self.dtype, self.device)
        ):  # in blocks, unless one call reads chunk-aligned memory (`aligned_reader_attention`)
            logits, share = self._chunked_prefill(x, memory, chunking, cache, positions, key_mask, cite)
        else:
            probe = [] if cite else None
            logits = self.model(
                x,
                memory=memory,
                cache=cache,
                position_ids=positions,
                key_mask=key_mask,
                last_only=True,
                attention_probe=probe,
            )[:, -1]
            if probe:
                share = torch.stack(probe).mean(0)  # (B, T, S)
        t0 = self._tick("prefill", t0)
        if share is not None:
            for b in range(B):
                for rec in chunks[b]:
                    s, e = rec.tokens
                    cols = share[
                        b,
                        pads[b] + s : pads[b] + e,
                        rec.chunk * opts.memories : rec.chunk * opts.memories + len(rec.hits),
                    ]
                    rec.attention = cols.mean(0).tolist()
                    rec.last_attention = cols[-1].tolist()  # the last prompt chunk's: what writes token 0

        # decoding; each sequence may fill its own context (a short prompt batched with a long one is not cut)
        rows = []
        for b, n in enumerate(lengths):
            wanted = opts.max_new_tokens if max_new_tokens is None else min(max_new_tokens[b], opts.max_new_tokens)
            limit = min(wanted, cfg.context_length - n)
            rows.append(_Row(limit, "length" if limit == wanted else "context", chunks[b]))
        if opts.mode == "memory":  # the first decoded chunk inherits the last prompt chunk's memories
            for row in rows:
                row.hits = row.chunks[-1].hits
                row.chunks.append(ChunkRecord(len(row.chunks), "inherited", (0, opts.retrieve_every), None, row.hits))
            memory = self._memory([row.hits for row in rows], opts.memories, scored=opts.score_prior)
        steps = max(row.limit for row in rows)
        out = torch.full((B, steps), self.pad_id, dtype=torch.long, device=self.device)
        share_sum = torch.zeros(B, opts.memories, device=self.device) if cite else None
        share_n = 0
        t0 = time.perf_counter()
        for step in range(steps):
            token = _sample(logits, opts, gen)
            out[:, step] = token
            if step == 0:  # from the call to the first token: what a decoding rate leaves out (`m3 bench`)
                self._sync()
                self.timings["first_token"] += time.perf_counter() - started
            if opts.stop_at_eos or on_text is not None or stop is not None:
                toks = token.tolist()
                for b, row in enumerate(rows):
                    if row.done:
                        continue
                    if step >= row.limit:
                        row.done = True
                        continue
                    if opts.stop_at_eos and toks[b] in self.eos:
                        row.done, row.finish = True, "eos"
                        continue
                    if stop is not None and stop(b):
                        row.done, row.finish = True, "cancelled"
                        continue
                    row.n_out = step + 1
                    if on_text is not None:
                        text = self.tokenizer.decode(out[b, : step + 1].tolist(), skip_special_tokens=True)
                        if not text.endswith("\ufffd") and len(text) > len(row.printed):
                            on_text(b, text[len(row.printed) :])
                            row.printed = text
                if all(row.done for row in rows):
                    break
            else:
                for row in rows:
                    row.n_out = min(step + 1, row.limit)
            if step + 1 == steps:
                break
            # feed the token just generated (index `step`); it may start a new decoded chunk
            if opts.mode == "memory" and retrieval_due(step, opts.retrieve_every):
                if cite and share_n:
                    self._close_chunk(rows, share_sum / share_n)
                    share_sum.zero_()
                    share_n = 0
                t0 = self._tick("decode", t0)
                live = [b for b, row in enumerate(rows) if not row.done]
                qs = [
                    self.tokenizer.decode(out[b, step - opts.retrieve_every : step].tolist(), skip_special_tokens=True)
                    for b in live
                ]
                for b, q, hs in zip(live, qs, self._retrieve(qs, opts)):
                    rows[b].hits = hs
                    rows[b].chunks.append(
                        ChunkRecord(len(rows[b].chunks), "generated", (step, step + opts.retrieve_every), q, hs)
                    )
                memory = self._memory([row.hits for row in rows], opts.memories, scored=opts.score_prior)
                t0 = time.perf_counter()
            pos = None
            if padded:
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
                pos = (torch.tensor(lengths, device=self.device) + step + cfg.context_offset)[:, None]
            step_probe = [] if cite else None
            logits = self.model(
                token[:, None],
                memory=memory,
                cache=cache,
                position_ids=pos,
                key_mask=key_mask,
                attention_probe=step_probe,
            )[:, -1]
            if step_probe:
                share_sum += torch.stack(step_probe).mean(0)[:, 0]
                share_n += 1
        self._tick("decode", t0)
        if cite and share_n:
            self._close_chunk(rows, share_sum / share_n)
        results = []
        for b, row in enumerate(rows):
            for rec in row.chunks:  # decoded chunks end where generation ended
                if rec.source != "prompt":
                    rec.tokens = (rec.tokens[0], min(rec.tokens[1], row.n_out))
            toks = out[b, : row.n_out].tolist()
            results.append(
                Completion(
                    prompts[b],
                    self.tokenizer.decode(toks, skip_special_tokens=True),
                    toks,
                    lengths[b],
                    row.finish,
                    row.chunks,
                )
            )
        return results

    @staticmethod
    def _close_chunk(rows: list[_Row], share: torch.Tensor) -> None:
        """Give the last decoded chunk of each sequence its mean attention share per memory."""
        for b, row in enumerate(rows):
            rec = row.chunks[-1]
            if rec.source != "prompt" and rec.attention is None:
                rec.attention = share[b, : len(rec.hits)].tolist()

    # -- scoring with memory -----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, text: str, opts: Options) -> dict:
        """Per-token log-probs of `text` in one mode: {token_ids, logprobs, perplexity, mode, chunks}.

        The same tokens are scored in every mode (all but the first), so perplexities compare:
        `memory` reads each 64-token chunk's own memories (retrieved with its text), `rag` puts
        the references retrieved with the whole text in front, `none` reads nothing.
        """
        import math

        import torch.nn.functional as F

        opts.check()
        if opts.mode != "none" and self.retriever is None:
            raise M3Error(f"--mode {opts.mode} needs --bank (a bank encoded by this model, with an index)")
        if self.retriever is not None and opts.memories > self.retriever.bank.n_refs:
            opts = dataclasses.replace(opts, memories=self.retriever.bank.n_refs)  # all the bank has
        ids = [int(i) for i in self.tokenizer(text)["input_ids"]]
        if len(ids) < 2:
            raise M3Error("the text has fewer than 2 tokens: nothing to score")
        cfg = self.cfg
        seq, first, memory, chunks = ids, 0, None, []
        if opts.mode == "rag":
            hits = self._retrieve([text], opts)[0]
            chunks.append(ChunkRecord(0, "prompt", (0, len(ids)), text, hits))
            if hits:  # otherwise nothing goes in front: the same as mode none
                ctx = [int(i) for i in self.tokenizer("\n\n".join(h.text for h in hits) + "\n\n")["input_ids"]]
                bos = getattr(self.tokenizer, "bos_token_id", None)
                rest = ids[1:] if bos is not None and ids[0] == bos else ids
                seq = ctx + rest
                first = len(seq) - len(ids)  # scored tokens are seq[first+1:], i.e. ids[1:]
        if len(seq) > cfg.context_length:
            raise M3Error(
                f"the text has {len(seq)} tokens in mode {opts.mode}, more than the model's context of "
                f"{cfg.context_length}"
            )
        if opts.mode == "memory":
            spans = prompt_chunks(len(ids), cfg.chunk_length)
            queries = [self.tokenizer.decode(ids[s:e], skip_special_tokens=True) for s, e in spans]
            memory, (chunks,), _ = self._prompt_memory([spans], [queries], [0], len(ids), opts)
        x = torch.tensor([seq], device=self.device)
        t0 = time.perf_counter()
        logits = self.model(x, memory=memory).float()[0, first:-1]
        self._tick("prefill", t0)
        target = x[0, first + 1 :]
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0].tolist()
        return {
            "token_ids": ids,
            "logprobs": logprobs,
            "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
            "mode": opts.mode,
            "chunks": [c.to_json() for c in chunks],
        }
