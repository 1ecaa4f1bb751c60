"""The examples `m3 pretrain --train reader` learns from: chat turns and plain text, cut into
segments and packed into rows where each token sees only its own example (reader_train.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import M3Error

IGNORE = -100


# --- examples ---------------------------------------------------------------------------------
@dataclass
class Segment:
    """One tokenized example: ids, which positions are scored, and each token's chunk query."""

    ids: list[int]
    loss: list[bool]  # loss[i]: token i+1 is a target (predicted at position i)
    queries: list[str | None]  # retrieval query of each of its chunks (None: no memory)
    token_query: list[int]  # index into queries per token (-1: reads no memory)
    exclude: str | None = None  # a document whose references its chunks never read


def read_examples(path: str) -> list[dict]:
    """{"prompt", "answer"} and {"text"} records from JSONL or Parquet; either may name
    "exclude_document", a knowledge-base document id its chunks must not read (a text that is
    itself in the bank would otherwise learn to copy its own continuation)."""
    p = Path(path)
    if not p.is_file():
        raise M3Error(f"training data {path} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        rows = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise M3Error(f"{path} line {n}: invalid JSON ({e.msg})") from None
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise M3Error(f"{path} record {n} is not an object")
        chat = isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)
        if not chat and not isinstance(r.get("text"), str):
            raise M3Error(f'{path} record {n} needs "prompt" and "answer", or "text"')
        if r.get("exclude_document") is not None and not isinstance(r["exclude_document"], str):
            raise M3Error(f'{path} record {n}: "exclude_document" must be a document id (a string)')
        if (chat and r["prompt"].strip() and r["answer"].strip()) or (not chat and r["text"].strip()):
            out.append(r)
    if not out:
        raise M3Error(f"{path} holds no training examples")
    return out


def chat_prompt(tokenizer, prompt: str) -> tuple[list[int], list[bool]]:
    """The prompt in the tokenizer's chat template, as `m3 generate --chat` builds it, and which of
    its tokens hold the user's text (the retrieval query)."""
    from .generate import user_token_mask

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    users = user_token_mask(tokenizer, prompt, text)
    return ids, users if users is not None and len(users) == len(ids) else [True] * len(ids)


def segments(examples: list[dict], tokenizer, seq_len: int, chunk: int) -> list[Segment]:
    """Tokenize examples; texts longer than seq_len are cut into pieces of seq_len tokens."""
    from .generate import chat_queries, prompt_chunks

    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise M3Error("the tokenizer has no end token")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for ex in examples:
        if "prompt" in ex and "answer" in ex:
            if not has_chat:
                raise M3Error('chat examples ({"prompt", "answer"}) need a model whose tokenizer has a chat template')
            p_ids, users = chat_prompt(tokenizer, ex["prompt"])
            a_ids = [int(i) for i in tokenizer(ex["answer"], add_special_tokens=False)["input_ids"]] + [int(eos)]
            ids = (p_ids + a_ids)[:seq_len]
            if len(ids) <= len(p_ids):
                continue  # the prompt alone fills the row: nothing to learn
            queries = chat_queries(tokenizer, p_ids, users, prompt_chunks(len(p_ids), chunk), chunk)
            n_prompt = len(p_ids)
            token_query = [i // chunk if queries[i // chunk] is not None else -1 for i in range(n_prompt)]
            last = len(queries) - 1
            token_query += [last if queries[last] is not None else -1] * (len(ids) - n_prompt)
            loss = [n_prompt - 1 <= i < len(ids) - 1 for i in range(len(ids))]
            out.append(Segment(ids, loss, queries, token_query, ex.get("exclude_document") or None))
        else:
            body = (
                ([bos] if bos is not None else [])
                + [int(i) for i in tokenizer(ex["text"], add_special_tokens=False)["input_ids"]]
                + [int(eos)]
            )
            for s in range(0, len(body) - 1, seq_len):
                ids = body[s : s + seq_len]
                if len(ids) < 2:
                    continue
                queries = [
                    tokenizer.decode(ids[c : c + chunk], skip_special_tokens=True) for c in range(0, len(ids), chunk)
                ]
                token_query = [i // chunk for i in range(len(ids))]
                scored = [i < len(ids) - 1 for i in range(len(ids))]
                out.append(Segment(ids, scored, queries, token_query, ex.get("exclude_document") or None))
    if not out:
        raise M3Error("no training example fits --seq-len")
    return out


@dataclass
class Packed:
    """Rows of seq_len tokens holding whole segments (padding: segment -1)."""

    ids: np.ndarray  # (N, T) int64
    targets: np.ndarray  # (N, T) int64, IGNORE where no loss
    segment: np.ndarray  # (N, T) int32, -1 = padding
    position: np.ndarray  # (N, T) int32, position within the segment
    query: np.ndarray  # (N, T) int32, global chunk-query id, -1 = reads no memory
    row_queries: list[list[int]]  # the chunk-query ids each row uses (its memory slots, in order)
    query_exclude: list[str | None] = field(default_factory=list)  # per chunk query: a document it never reads


def pack(segs: list[Segment], seq_len: int, seed: int, fill: int) -> tuple[Packed, list[str]]:
    """Segments in a seed-shuffled order, each put into the first open row it fits (rows stay open
    for the last 64 rows seen); returns the rows and the global list of chunk queries."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(segs))
    rows: list[list[int]] = []  # segment indices per row
    used: list[int] = []
    open_rows: list[int] = []
    for i in order:
        n = len(segs[i].ids)
        for r in open_rows:
            if used[r] + n <= seq_len:
                rows[r].append(int(i))
                used[r] += n
                break
        else:
            rows.append([int(i)])
            used.append(n)
            open_rows.append(len(rows) - 1)
            if len(open_rows) > 64:
                open_rows.pop(0)
        open_rows = [r for r in open_rows if used[r] < seq_len - 8]
    N = len(rows)
    ids = np.full((N, seq_len), fill, dtype=np.int64)
    targets = np.full((N, seq_len), IGNORE, dtype=np.int64)
    segment = np.full((N, seq_len), -1, dtype=np.int32)
    position = np.zeros((N, seq_len), dtype=np.int32)
    query = np.full((N, seq_len), -1, dtype=np.int32)
    queries: list[str] = []
    exclude: list[str | None] = []
    row_queries: list[list[int]] = []
    for r, members in enumerate(rows):
        at, mine = 0, []
        for j, i in enumerate(members):
            s = segs[i]
            n = len(s.ids)
            ids[r, at : at + n] = s.ids
            tg = np.asarray(s.ids[1:] + [IGNORE], dtype=np.int64)
            targets[r, at : at + n] = np.where(np.asarray(s.loss), tg, IGNORE)
            segment[r, at : at + n] = j
            position[r, at : at + n] = np.arange(n)
            local = []
            for q in s.queries:
                if q is None:
                    local.append(-1)
                else:
                    local.append(len(queries))
                    mine.append(len(queries))
                    queries.append(q)
                    exclude.append(s.exclude)
            query[r, at : at + n] = [local[t] if t >= 0 else -1 for t in s.token_query]
            at += n
        row_queries.append(mine)
    return Packed(ids, targets, segment, position, query, row_queries, exclude), queries
