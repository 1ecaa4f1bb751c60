"""The data of `m3 pretrain`: corpus rows packed into sequences, the batches of each step, and for
the continual stage each chunk's retrieved references and their memories, encoded by the model
being trained. Pure functions of (seed, step) where order matters, so a resumed run sees the
same batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .bankset import bank_identity
from .errors import M3Error


PAD = -1  # alignment padding in packed rows: not a token id; no loss, fed as `pad_fill`


def pad_fill(tokenizer) -> int:
    """The token fed where a packed row holds PAD: the pad token, else the end token (a
    converted model may have no pad token, or one equal to its end token: either way PAD
    positions, not token ids, decide what the loss ignores)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def split_rows(batch: torch.Tensor, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (B, T + 1) -> inputs (B, T) with PAD fed as `fill`, and targets (B, T) with
    PAD as -100 (ignored by the loss)."""
    x, y = batch[:, :-1], batch[:, 1:]
    return x.masked_fill(x == PAD, fill), y.masked_fill(y == PAD, -100)


def pack_sequences(texts: list[str], tokenizer, seq_len: int, seed: int, align: int | None = None) -> np.ndarray:
    """Documents (shuffled once by seed) as [BOS] text [EOS], concatenated and cut into rows of
    seq_len + 1 tokens (inputs and shifted targets). Returns (N, seq_len + 1) int64.

    align=L: every document starts at a multiple of L tokens within its row (the gap is filled
    with PAD, which is not a token: `split_rows` feeds it as the tokenizer's pad (or end) token
    and the loss ignores it), so a chunk of L tokens never mixes two documents and its retrieval
    query is about one document only."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if align is not None and seq_len % align:
        raise M3Error(f"aligned documents need --seq-len a multiple of {align}")
    stream: list[int] = []
    for i in order:
        ids = list(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if align is not None:
            at = len(stream) % (seq_len + 1)  # position within the row being filled
            start = -(-at // align) * align  # the next chunk boundary
            # rows hold seq_len + 1 tokens and only 0..seq_len-1 are inputs: past them, the next row
            stream += [PAD] * (start - at if start < seq_len else seq_len + 1 - at)
        stream += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise M3Error(
            f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}; "
            "lower --seq-len or add text"
        )
    return np.asarray(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)


def batch_indices(step: int, n_rows: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Rows of the global batch of `step` taken by process `rank`: epochs are fresh permutations
    of all rows, a pure function of (seed, epoch), so resuming at a step needs no saved RNG."""
    per_epoch = max(1, n_rows // (batch * world))
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    start = k * batch * world
    rows = perm[start : start + batch * world]
    if len(rows) < batch * world:  # fewer rows than one global batch: wrap around
        rows = np.resize(perm, batch * world)
    return rows[rank::world]


def retrieve_for_chunks(
    rows: np.ndarray,
    tokenizer,
    bank_path: Path,
    chunk_length: int,
    max_overlap: float,
    device,
    log=print,
    model_dir: Path | None = None,
    k: int = 1,
    distractors: str = "retrieved",
    encoder: str | None = None,
    with_scores: bool = False,
):
    """Reference indices per (row, chunk, rank): the top-k of the bank's retriever for the
    chunk's text, skipping references that overlap it by more than max_overlap; -1 where fewer
    qualify. Returns (rows, chunks, k) int64; with_scores, also (rows, chunks, k) float32: each
    reference's retriever score for the chunk's text (the inner product of their embeddings,
    which a title distractor gets too; 0 where -1), for the retriever-score prior.

    distractors="title": rank 0 as above; ranks 1..k-1 are the references retrieved with the
    *title* of rank 0's document as the query (that document's references left out, and the
    same overlap filter applied against the chunk) — the near namesakes that a
    question naming that title retrieves at inference. (The chunk's own text also holds the
    facts it states, so its other hits tend to share those facts and teach little.)"""
    from .bank import Bank
    from .overlap import overlap, words
    from .retrieval import Retriever, embeddings_of, query_embedder

    n_rows, T = rows.shape[0], rows.shape[1] - 1
    n_chunks = -(-T // chunk_length)
    out = np.full((n_rows, n_chunks, k), -1, dtype=np.int64)
    scores = np.zeros((n_rows, n_chunks, k), dtype=np.float32)
    t0 = time.perf_counter()
    with Bank(bank_path) as bank:
        retriever = Retriever(bank, query_embedder(bank, model_dir=model_dir, encoder=encoder, device=device))
        emb = embeddings_of(bank) if with_scores else None
        if with_scores and emb is None:
            raise M3Error(f"{bank_path} stores no reference embeddings; re-index it with `m3 index`")
        queries = [
            tokenizer.decode(
                [t for t in rows[r, c * chunk_length : min(T, (c + 1) * chunk_length)].tolist() if t != PAD],
                skip_special_tokens=True,
            )
            for r in range(n_rows)
            for c in range(n_chunks)
        ]
        for start in range(0, len(queries), 256):
            batch = queries[start : start + 256]
            vectors = retriever.embedder.embed(batch)
            hits = retriever.search(batch, k=k, max_overlap=max_overlap, vectors=vectors)
            if distractors == "title" and k > 1:
                firsts = [h[0] if h else None for h in hits]
                by_title = retriever.search([f.title or f.text if f else "" for f in firsts], k=4 * k)
                hits = [
                    [f]
                    + [
                        x
                        for x in near
                        if x.doc_id != f.doc_id  # other documents only
                        and overlap(words(x.text), words(q)) <= max_overlap
                    ][: k - 1]
                    if f
                    else []
                    for f, near, q in zip(firsts, by_title, batch)
                ]
            for j, h in enumerate(hits):
                r, c = divmod(start + j, n_chunks)
                for rank, hit in enumerate(h[:k]):
                    out[r, c, rank] = hit.ref
                    if emb is not None:
                        scores[r, c, rank] = float(vectors[j] @ emb[hit.ref])
    log(
        f"retrieved references for {len(queries)} chunks in {time.perf_counter() - t0:.0f} s "
        f"({(out[:, :, 0] >= 0).mean():.0%} found one)"
    )
    return (out, scores) if with_scores else out


class ReferenceTokens:
    """Token ids of the bank's references under the training tokenizer, cut to reference_length."""

    def __init__(self, bank_path: Path, tokenizer, limit: int) -> None:
        from .bank import Bank
        from .corpus import reference_ids

        with Bank(bank_path) as bank:
            refs = [bank.reference(i) for i in range(bank.n_refs)]
            self.ids = [reference_ids(tokenizer, r.text)[:limit] or [tokenizer.eos_token_id or 0] for r in refs]

    def batch(self, refs: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(self.ids[r]) for r in refs)
        x = torch.zeros((len(refs), n), dtype=torch.long)
        for j, r in enumerate(refs):
            x[j, : len(self.ids[r])] = torch.tensor(self.ids[r])
        return x.to(device), torch.tensor([len(self.ids[r]) for r in refs], device=device)


def continual_memory(model, chunk_refs: torch.Tensor, ref_tokens: ReferenceTokens, seq_len: int, detach: bool):
    """The Memory of one training batch, encoded now by the current model.

    chunk_refs (B, n_chunks) or (B, n_chunks, k): the references each chunk retrieved (-1 =
    none). Chunk c reads its own k and those of chunks c-N..c-1, N = the config's
    train_prev_chunks (which --prev-chunks sets)."""
    from .attention import Memory, training_visibility

    cfg = model.config
    if chunk_refs.dim() == 2:
        chunk_refs = chunk_refs[:, :, None]
    B, n_chunks, per_chunk = chunk_refs.shape
    device = model.embed.weight.device
    flat = chunk_refs.flatten().tolist()
    unique = sorted({r for r in flat if r >= 0})
    sink = model.encode_prefix()
    visible = training_visibility(seq_len, per_chunk, B, cfg.chunk_length, cfg.train_prev_chunks, device)
    if not unique:
        return None
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        ids, lengths = ref_tokens.batch(unique, device)
        enc = model.encode_references(ids, lengths)
    where = {r: j for j, r in enumerate(unique)}
    index = torch.tensor([where.get(r, 0) for r in flat], device=device)
    real = torch.tensor([r >= 0 for r in flat], device=device)
    kv = enc.kv[index] * real[:, None, None, None, None, None].to(enc.kv.dtype)
    valid = enc.valid[index] & real[:, None, None, None]
    return Memory(
        kv=kv.view(B, n_chunks * per_chunk, *kv.shape[1:]),
        valid=valid.view(B, n_chunks * per_chunk, *valid.shape[1:]),
        sink=sink if not detach else sink.detach(),
        visible=visible,
    )


def cached_retrievals(
    args, rows: np.ndarray, tokenizer, cfg, key: dict, state_dir: Path, device, old_fingerprint: str | None, log=print
):
    """The continual stage's references per (row, chunk, rank) and, for a model with the
    retriever-score prior, their scores: retrieved once before training (`retrieve_for_chunks`) and
    kept in the state dir, reused while the run's key, the bank and the embedder are the same."""
    from .atomic import atomic_file
    from .bank import Bank, require_same_model

    if not cfg.reference_prefix_ids:
        raise M3Error("the model has no reference prefix; it cannot read memory")
    with Bank(Path(args.bank)) as b:  # only its text and index are used, but it must be this model's
        if old_fingerprint is not None:
            require_same_model(b, old_fingerprint)
    cache = state_dir / "retrieval.npy"
    score_cache = state_dir / "retrieval-scores.npy"  # only for a model with the retriever-score prior
    cache_key = state_dir / "retrieval.json"
    want_scores = cfg.memory_score_prior
    rkey = {
        "key": key,
        "bank": str(Path(args.bank).resolve()),
        "bank_size": bank_identity(Path(args.bank)),
        "embedder": args.embedder,
        **({"scores": True} if want_scores else {}),
    }
    if (
        cache.is_file()
        and cache_key.is_file()
        and json.loads(cache_key.read_text()) == rkey
        and (score_cache.is_file() or not want_scores)
    ):
        chunk_refs = np.load(cache, allow_pickle=False)
        chunk_scores = np.load(score_cache, allow_pickle=False) if want_scores else None
        if chunk_scores is not None and chunk_scores.shape != chunk_refs.shape:
            raise M3Error(f"{score_cache} does not match {cache}; delete both to retrieve again")
    else:
        found = retrieve_for_chunks(
            rows,
            tokenizer,
            Path(args.bank),
            cfg.chunk_length,
            args.max_overlap,
            device,
            log,
            model_dir=args.init_from,
            k=args.refs_per_chunk,
            distractors=args.distractors,
            encoder=args.embedder,
            with_scores=want_scores,
        )
        chunk_refs, chunk_scores = found if want_scores else (found, None)
        with atomic_file(cache) as tmp:
            np.save(tmp, chunk_refs, allow_pickle=False)
        if want_scores:
            with atomic_file(score_cache) as tmp:
                np.save(tmp, chunk_scores, allow_pickle=False)
        with atomic_file(cache_key) as f:
            f.write(json.dumps(rkey).encode())
    return chunk_refs, chunk_scores
