"""`m3 pretrain`: the two training stages of DESIGN §2–3, through `accelerate`.

- warmup: ordinary next-token training, no memory.
- continual: sequences are cut into chunks of `chunk_length` tokens; each chunk retrieves one
  reference from the bank's text with its own text as query, dropping references that overlap
  the chunk by more than 90% (paper Eq. 6); each chunk reads its own and the previous
  `train_prev_chunks` chunks' memories (one block mask); the memories are encoded in real time
  by the current model, with gradient unless `detach_memory`, and the same top-k as inference.

Data order is a pure function of (seed, step), so a run killed and resumed from its last
checkpoint ends with the same weights as an uninterrupted one. Checkpoints hold the weights as
safetensors and the optimizer state as a tensor-only file loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention import score_gaps
from .errors import M3Error

STAGES = ("warmup", "continual")
SCHEDULES = ("wsd", "cosine", "constant")
TRAINABLE = ("all", "memory-attention", "reader")
DISTRACTORS = ("retrieved", "title")
CONTINUAL_MAX_OVERLAP = 0.9


@dataclass
class TrainArgs:
    stage: str
    corpus: str
    output: Path
    config: str | None = None  # preset name (from scratch)
    init_from: Path | None = None  # existing model dir
    bank: Path | None = None  # continual: references to retrieve (text + index)
    tokenizer: Path | None = None  # from scratch: a model dir whose tokenizer to use
    vocab_size: int | None = None  # from scratch: BPE vocabulary (default: the preset's)
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "wsd"
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    detach_memory: bool = False
    train: str = "all"
    max_overlap: float = CONTINUAL_MAX_OVERLAP
    memory_selection: str | None = None  # override the config's token-selection score
    memory_top_k: int | None = None  # override the config's tokens kept per memory layer and KV head
    memory_layers: str | None = None  # override the layers that read memory: "all" or "0,1,2"
    refs_per_chunk: int = 1  # continual: references each chunk retrieves (1 = the paper)
    single_ref_steps: int = 0  # continual: for the first N steps each chunk reads only its top-1 reference
    align_docs: bool = False  # every document starts at a chunk boundary (padding gets no loss)
    prev_chunks: int | None = None  # continual: chunk c also reads chunks c-N..c-1 (default: config)
    memory_match_loss: float = 0.0  # continual: weight of the memory-match loss (`memory_match_loss`)
    distractors: str = "retrieved"  # continual: the other k-1 references (see `retrieve_for_chunks`)
    embedder: str | None = None  # continual: the encoder or static embedder dir the bank was indexed with
    score_prior: bool = False  # give the model the retriever-score prior (M3Config.memory_score_prior)
    reader_rank: int = 16  # --train reader: rank of the memory reader (M3Config.memory_reader_rank)
    compile: bool = False  # --train reader: torch.compile the model
    max_time: float = 0.0  # --train reader: seconds of training before a clean stop (0: none)
    device: str = "auto"
    state_dir: Path | None = None

    def check(self) -> None:
        if self.stage not in STAGES:
            raise M3Error(f"unknown stage {self.stage!r}; choose warmup or continual")
        if (self.config is None) == (self.init_from is None):
            raise M3Error("give exactly one of --config PRESET (from scratch) or --init-from MODEL_DIR")
        if self.stage == "continual" and self.bank is None:
            raise M3Error("--stage continual needs --bank BANK (the references each chunk retrieves)")
        if self.schedule not in SCHEDULES:
            raise M3Error(f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}")
        if self.train not in TRAINABLE:
            raise M3Error(f"unknown --train {self.train!r}; choose {', '.join(TRAINABLE)}")
        for name in ("steps", "batch_size", "seq_len", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise M3Error(f"--{name.replace('_', '-')} must be at least 1")
        if self.refs_per_chunk < 1 or (self.prev_chunks is not None and self.prev_chunks < 0):
            raise M3Error("--refs-per-chunk must be at least 1 and --prev-chunks at least 0")
        if self.distractors not in DISTRACTORS:
            raise M3Error(f"unknown --distractors {self.distractors!r}; choose {', '.join(DISTRACTORS)}")
        if self.score_prior and self.stage != "continual":
            raise M3Error("--memory-score-prior needs --stage continual (its gains learn from reading memories)")
        if not 0 <= self.memory_match_loss <= 1000:
            raise M3Error("--memory-match-loss must be a weight between 0 and 1000")
        if self.memory_top_k is not None and self.memory_top_k < 1:
            raise M3Error("--memory-top-k must be at least 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise M3Error("--lr must be > 0, --min-lr-ratio in [0, 1], --warmup-steps >= 0")

    def key(self) -> dict:
        """What must match for --resume to continue a run."""
        d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        for k in ("save_every", "log_every", "device", "state_dir", "embedder"):
            d.pop(k)  # may change between a run and its resumption (steps may not: the schedule uses it)
        if not d["score_prior"]:
            d.pop("score_prior")  # added later: runs started before it still resume
        d.pop("compile")
        d.pop("max_time")
        if d["train"] != "reader":
            d.pop("reader_rank")
        return d


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning-rate multiplier: linear warmup, then constant-then-decay (wsd: the last 20% of
    steps decay linearly to min_lr_ratio), cosine, or constant."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return 1.0
    if args.schedule == "cosine":
        t = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    decay_start = max(args.warmup_steps, int(args.steps * 0.8))
    if step < decay_start:
        return 1.0
    t = (step + 1 - decay_start) / max(1, args.steps - decay_start)  # the last step reaches min_lr
    return 1.0 - (1.0 - args.min_lr_ratio) * min(1.0, t)


def memory_overrides(args: "TrainArgs", cfg) -> dict:
    """Config fields the memory options of a training run set: --memory-selection,
    --memory-top-k, --memory-layers."""
    overrides = {}
    if args.memory_selection is not None:
        overrides["memory_selection"] = args.memory_selection
    if args.memory_top_k is not None:
        overrides["memory_top_k"] = args.memory_top_k
    if args.memory_layers is not None:
        overrides["memory_layers"] = parse_layers(args.memory_layers, cfg.n_layers)
    return overrides


def parse_layers(text: str, n_layers: int) -> tuple[int, ...] | None:
    """--memory-layers: "all", "first-half" (None: the config's default), or layer indices."""
    if text == "all":
        return tuple(range(n_layers))
    if text == "first-half":
        return None
    try:
        layers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise M3Error(f"--memory-layers must be all, first-half or layer indices like 0,1; got {text!r}") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise M3Error(f"--memory-layers {text!r}: the model has layers 0..{n_layers - 1}")
    return layers


# --- data -----------------------------------------------------------------------------------
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
        raise M3Error(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}; "
                      "lower --seq-len or add text")
    return np.asarray(stream[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1)


def batch_indices(step: int, n_rows: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Rows of the global batch of `step` taken by process `rank`: epochs are fresh permutations
    of all rows, a pure function of (seed, epoch), so resuming at a step needs no saved RNG."""
    per_epoch = max(1, n_rows // (batch * world))
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    start = k * batch * world
    rows = perm[start:start + batch * world]
    if len(rows) < batch * world:  # fewer rows than one global batch: wrap around
        rows = np.resize(perm, batch * world)
    return rows[rank::world]


def retrieve_for_chunks(rows: np.ndarray, tokenizer, bank_path: Path, chunk_length: int, max_overlap: float,
                        device, log=print, model_dir: Path | None = None, k: int = 1,
                        distractors: str = "retrieved", encoder: str | None = None, with_scores: bool = False):
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
        queries = [tokenizer.decode([t for t in rows[r, c * chunk_length:min(T, (c + 1) * chunk_length)].tolist()
                                     if t != PAD], skip_special_tokens=True)
                   for r in range(n_rows) for c in range(n_chunks)]
        for start in range(0, len(queries), 256):
            batch = queries[start:start + 256]
            vectors = retriever.embedder.embed(batch)
            hits = retriever.search(batch, k=k, max_overlap=max_overlap, vectors=vectors)
            if distractors == "title" and k > 1:
                firsts = [h[0] if h else None for h in hits]
                by_title = retriever.search([f.title or f.text if f else "" for f in firsts], k=4 * k)
                hits = [[f] + [x for x in near if x.doc_id != f.doc_id  # other documents only
                               and overlap(words(x.text), words(q)) <= max_overlap][:k - 1] if f else []
                        for f, near, q in zip(firsts, by_title, batch)]
            for j, h in enumerate(hits):
                r, c = divmod(start + j, n_chunks)
                for rank, hit in enumerate(h[:k]):
                    out[r, c, rank] = hit.ref
                    if emb is not None:
                        scores[r, c, rank] = float(vectors[j] @ emb[hit.ref])
    log(f"retrieved references for {len(queries)} chunks in {time.perf_counter() - t0:.0f} s "
        f"({(out[:, :, 0] >= 0).mean():.0%} found one)")
    return (out, scores) if with_scores else out


def title_targets(rows: np.ndarray, chunk_refs: np.ndarray, titles: list[str], tokenizer) -> np.ndarray:
    """The reference each input token is about: the retrieved reference (of any of the row's
    chunks) whose document title was mentioned last, as whole words, at or before the token
    in the same document (of two mentions ending at the same place, the longer: "Ann Lee" over
    "Lee"); -1 where none was. Returns (rows, seq_len) int64.

    The label of the memory-match loss: a token after "… Kaeth Dorvan born? Answer:" should
    read Kaeth Dorvan's memory rather than a namesake's. Text is matched in the concatenation
    of the tokens' decoded pieces (a title split inside a multi-byte character is not found)."""
    import re

    n_rows, T = rows.shape[0], rows.shape[1] - 1
    special = {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, PAD) if t is not None}
    pieces: dict[int, str] = {}
    out = np.full((n_rows, T), -1, dtype=np.int64)
    patterns: dict[int, re.Pattern] = {}
    for r in range(n_rows):
        ids = rows[r, :T].tolist()
        parts = []
        for t in ids:
            if t not in pieces:
                pieces[t] = "\n" if t in special else tokenizer.decode([t]).replace("\n", " ")
            parts.append(pieces[t])
        ends = np.cumsum([len(x) for x in parts])  # text[:ends[i]] holds tokens 0..i
        text = "".join(parts)
        mentions = []  # (end char, ref)
        for ref in {int(x) for x in chunk_refs[r].flatten() if x >= 0}:
            if not titles[ref].strip():
                continue
            if ref not in patterns:
                patterns[ref] = re.compile(r"(?<!\w)" + re.escape(titles[ref]) + r"(?!\w)")
            mentions += [(m.end(), m.end() - m.start(), ref) for m in patterns[ref].finditer(text)]
        doc_start = np.maximum.accumulate(np.where([t in special for t in ids], np.arange(T), -1))
        for end, _, ref in sorted(mentions):  # of two mentions ending together, the longer wins
            first = int(np.searchsorted(ends, end))  # the token that completes the mention
            if first >= T:
                continue
            same_doc = doc_start[first:] == doc_start[first]
            stop = first + int(same_doc.argmin()) if not same_doc.all() else T
            out[r, first:stop] = ref  # later mentions overwrite earlier ones
    return out


def memory_match_loss(scores: list, targets: torch.Tensor, slot_refs: torch.Tensor, visible: torch.Tensor,
                      skip_layer0: bool = True) -> torch.Tensor | None:
    """Cross-entropy of the memory layers' preference among the memories a token may read,
    towards the memory of the reference the token is about (`title_targets`).

    scores: (layer, (B, H, T, S)) per memory layer from `Memory3Model.forward(memory_scores=)`:
    logsumexp of each slot's attention logits. targets (B, T) what each token is about, as
    reference or document ids (-1: none); slot_refs (B, S) the same kind of id for each slot
    (training passes document ids, so every reference of the right document counts);
    visible (B, T, S). Averaged over heads,
    layers and the tokens whose target is readable; layer 0 is left out (its queries see only
    their own token, so they cannot know whom the text is about). None when no token counts."""
    target = (slot_refs[:, None, :] == targets[:, :, None]) & (targets[:, :, None] >= 0) & visible  # (B, T, S)
    has = target.any(-1)  # (B, T)
    if not bool(has.any()):
        return None
    losses = []
    for layer, s in scores:
        if skip_layer0 and layer == 0:
            continue
        s = s.float()
        finite = torch.isfinite(s).any(-1)  # (B, H, T): the token reads some memory in this layer
        all_lse = s.logsumexp(-1)
        tgt_lse = s.masked_fill(~target[:, None], float("-inf")).logsumexp(-1)
        ok = has[:, None] & finite & torch.isfinite(tgt_lse)
        if bool(ok.any()):
            losses.append((all_lse - tgt_lse)[ok].mean())
    return torch.stack(losses).mean() if losses else None


class ReferenceTokens:
    """Token ids of the bank's references under the training tokenizer, cut to reference_length."""

    def __init__(self, bank_path: Path, tokenizer, limit: int) -> None:
        from .bank import Bank
        from .corpus import reference_ids

        with Bank(bank_path) as bank:
            refs = [bank.reference(i) for i in range(bank.n_refs)]
            self.ids = [reference_ids(tokenizer, r.text)[:limit] or [tokenizer.eos_token_id or 0] for r in refs]
            self.titles = [bank.document(r.doc_index).title for r in refs]
            self.docs = np.array([r.doc_index for r in refs] + [-1], dtype=np.int64)  # [-1]: ref -1 -> no doc

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
    return Memory(kv=kv.view(B, n_chunks * per_chunk, *kv.shape[1:]),
                  valid=valid.view(B, n_chunks * per_chunk, *valid.shape[1:]),
                  sink=sink if not detach else sink.detach(), visible=visible)


# --- the loop -----------------------------------------------------------------------------------
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _set_trainable(model, what: str) -> None:
    if what == "all":
        return
    mem = set(model.config.mem_layers)
    for name, p in model.named_parameters():
        parts = name.split(".")
        p.requires_grad = (parts[0] == "layers" and int(parts[1]) in mem and parts[2] == "attn") \
            or name == "memory_score_gain"


def pretrain(args: TrainArgs, resume: bool = False, force: bool = False, show_progress: bool = True,
             log=print) -> dict:
    """Run one stage; returns a summary. The model dir `args.output` is written at the end;
    checkpoints, metrics.jsonl and the chunk retrievals live in the state dir."""
    from accelerate import Accelerator
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from safetensors.torch import load_file, save_file

    from .atomic import atomic_dir, atomic_file
    from .checkpoint import is_model_dir, load_model_dir, load_tokenizer, model_fingerprint, save_model_dir
    from .config import preset
    from .corpus import read_corpus
    from .device import resolve_device
    from .tokenizer import new_model, train_bpe

    args.check()
    if args.train == "reader":
        from .reader_train import train_reader

        return train_reader(args, resume=resume, force=force, show_progress=show_progress, log=log)
    out = Path(args.output)
    state_dir = Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".train")
    if out.exists() and not force and not resume:
        raise M3Error(f"{out} already exists; pass --force to replace it (or --resume to continue a run)")
    if out.exists() and not is_model_dir(out):
        raise M3Error(f"{out} exists and is not a model dir m3 wrote; refusing to replace it")
    texts = [d.text for d in read_corpus(args.corpus) if d.text.strip()]
    if not texts:
        raise M3Error(f"the corpus {args.corpus} holds no text")
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # accelerate uses the current device
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    device = accelerator.device
    old_fingerprint = None

    # model and tokenizer
    if args.init_from is not None:
        tokenizer = load_tokenizer(args.init_from)
        model = load_model_dir(args.init_from, "cpu", torch.float32)
        old_fingerprint = model_fingerprint(args.init_from)
    else:
        cfg = preset(args.config)
        saved_tok = state_dir / "tokenizer"
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
        elif resume and (saved_tok / "tokenizer.json").is_file():  # the run's own tokenizer
            tokenizer = load_tokenizer(saved_tok)
        else:
            vocab = args.vocab_size or cfg.vocab_size
            tokenizer = train_bpe(texts, vocab_size=min(vocab, cfg.vocab_size))
            state_dir.mkdir(parents=True, exist_ok=True)
            if int(os.environ.get("RANK", "0")) == 0:  # every process trains the same BPE; one saves it
                with atomic_dir(saved_tok, overwrite=True,
                                replaceable=lambda d: (d / "tokenizer.json").is_file()) as tmp:
                    tokenizer.save_pretrained(str(tmp))
        model = new_model(cfg, tokenizer, seed=args.seed)
    overrides = memory_overrides(args, model.config)
    if args.prev_chunks is not None and args.stage == "continual":
        overrides["train_prev_chunks"] = args.prev_chunks  # so a later --init-from stage keeps it
    overrides = {k: v for k, v in overrides.items() if getattr(model.config, k) != v}
    if overrides:
        model.config = model.config.replace(**overrides)  # validated there
    if "memory_layers" in overrides and model.config.memory_score_prior:
        raise M3Error("--memory-layers cannot change a model with the retriever-score prior (its gains are per "
                      "memory layer)")
    if args.score_prior and model.enable_score_prior():
        log("added the retriever-score prior (zero gains: the model reads as before until trained)")
    cfg = model.config
    if args.seq_len > cfg.context_length:
        raise M3Error(f"--seq-len {args.seq_len} exceeds the model's context of {cfg.context_length}")
    rows = pack_sequences(texts, tokenizer, args.seq_len, args.seed,
                          align=cfg.chunk_length if args.align_docs else None)
    fill = pad_fill(tokenizer)

    # resume state
    state_dir.mkdir(parents=True, exist_ok=True)
    key = {**args.key(), "corpus_rows": _sha(rows[:, :8].tolist()), "n_rows": int(rows.shape[0])}
    ckpt = state_dir / "checkpoint"
    start_step = 0
    if resume and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("key") != key:
            raise M3Error(f"{state_dir} holds a run with other settings; run without --resume (and --force)")
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        start_step = int(saved["step"])
        log(f"resuming at step {start_step} of {args.steps}")
        metrics_path = state_dir / "metrics.jsonl"
        if metrics_path.is_file():  # drop rows logged after the checkpoint: they are redone
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            with atomic_file(metrics_path) as f:
                f.write("".join(k + "\n" for k in kept).encode())
    elif not resume:
        metrics_path = state_dir / "metrics.jsonl"
        metrics_path.unlink(missing_ok=True)

    chunk_refs = chunk_scores = ref_tokens = targets = None
    match_sum, match_n = 0.0, 0
    if args.stage == "continual":
        if not cfg.reference_prefix_ids:
            raise M3Error("the model has no reference prefix; it cannot read memory")
        from .bank import Bank, require_same_model

        with Bank(Path(args.bank)) as b:  # only its text and index are used, but it must be this model's
            if old_fingerprint is not None:
                require_same_model(b, old_fingerprint)
        cache = state_dir / "retrieval.npy"
        score_cache = state_dir / "retrieval-scores.npy"  # only for a model with the retriever-score prior
        cache_key = state_dir / "retrieval.json"
        want_scores = cfg.memory_score_prior
        rkey = {"key": key, "bank": str(Path(args.bank).resolve()), "bank_size": Path(args.bank).stat().st_size,
                "embedder": args.embedder, **({"scores": True} if want_scores else {})}
        if cache.is_file() and cache_key.is_file() and json.loads(cache_key.read_text()) == rkey \
                and (score_cache.is_file() or not want_scores):
            chunk_refs = np.load(cache, allow_pickle=False)
            chunk_scores = np.load(score_cache, allow_pickle=False) if want_scores else None
            if chunk_scores is not None and chunk_scores.shape != chunk_refs.shape:
                raise M3Error(f"{score_cache} does not match {cache}; delete both to retrieve again")
        else:
            found = retrieve_for_chunks(rows, tokenizer, Path(args.bank), cfg.chunk_length, args.max_overlap,
                                        device, log, model_dir=args.init_from, k=args.refs_per_chunk,
                                        distractors=args.distractors, encoder=args.embedder, with_scores=want_scores)
            chunk_refs, chunk_scores = found if want_scores else (found, None)
            with atomic_file(cache) as tmp:
                np.save(tmp, chunk_refs, allow_pickle=False)
            if want_scores:
                with atomic_file(score_cache) as tmp:
                    np.save(tmp, chunk_scores, allow_pickle=False)
            with atomic_file(cache_key) as f:
                f.write(json.dumps(rkey).encode())
        ref_tokens = ReferenceTokens(Path(args.bank), tokenizer, cfg.reference_length)
        if args.memory_match_loss > 0:
            t0 = time.perf_counter()
            targets = title_targets(rows, chunk_refs, ref_tokens.titles, tokenizer)
            log(f"memory-match targets: {(targets >= 0).mean():.0%} of tokens follow a mention of a retrieved "
                f"reference's title ({time.perf_counter() - t0:.0f} s)")

    _set_trainable(model, args.train)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gain = getattr(model, "memory_score_gain", None)
    decay = [p for p in params if p.dim() >= 2 and p is not gain]
    no_decay = [p for p in params if p.dim() < 2 or p is gain]  # weight decay would pull the prior to none
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    if start_step:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    def save_checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        with atomic_dir(ckpt, overwrite=True, replaceable=lambda d: (d / "state.json").is_file()) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in raw.state_dict().items()},
                      str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}))

    console = Console(stderr=True)
    progress = Progress(TextColumn(f"{args.stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not show_progress or not console.is_terminal or not accelerator.is_main_process)
    metrics = open(state_dir / "metrics.jsonl", "a")
    t_start = time.perf_counter()
    tokens_done, window_loss, window_n, step_times = 0, 0.0, 0, []
    loss_value = float("nan")
    try:
        with progress:
            task = progress.add_task("train", total=args.steps, completed=start_step, loss="-", tps="-")
            for step in range(start_step, args.steps):
                t0 = time.perf_counter()
                lr = args.lr * lr_at(step, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = batch_indices(step, rows.shape[0], args.batch_size, args.seed, accelerator.process_index,
                                    accelerator.num_processes)
                x, y = split_rows(torch.from_numpy(rows[idx]).to(device), fill)
                with accelerator.autocast():
                    memory = None
                    scores = [] if targets is not None else None
                    if chunk_refs is not None:
                        refs = chunk_refs[idx][:, :, :1] if step < args.single_ref_steps else chunk_refs[idx]
                        memory = continual_memory(raw, torch.from_numpy(refs), ref_tokens, args.seq_len,
                                                  args.detach_memory)
                        if memory is not None and chunk_scores is not None:
                            memory.scores = score_gaps(refs, chunk_scores[idx][:, :, :refs.shape[2]]).to(device)
                    logits = model(x, memory=memory, memory_scores=scores if memory is not None else None)
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           ignore_index=-100)
                    match = None
                    if scores:  # compared by document: a document's references are all right
                        docs = ref_tokens.docs
                        slot_docs = torch.from_numpy(docs[refs.reshape(len(idx), -1)]).to(device)
                        match = memory_match_loss(scores, torch.from_numpy(docs[targets[idx]]).to(device), slot_docs,
                                                  memory.visible.to(device))
                    lm_loss = loss.detach()  # what metrics report as the loss
                    if match is not None:
                        match_sum, match_n = match_sum + float(match.detach()), match_n + 1
                        loss = loss + args.memory_match_loss * match
                accelerator.backward(loss)
                if args.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(lm_loss)
                window_loss += loss_value
                window_n += 1
                tokens_done += x.numel() * accelerator.num_processes
                step_times.append(time.perf_counter() - t0)
                done = step + 1
                if done % args.log_every == 0 or done == args.steps:
                    elapsed = time.perf_counter() - t_start
                    row = {"step": done, "stage": args.stage, "loss": round(window_loss / window_n, 5),
                           "lr": round(lr, 8), "tokens_per_s": round(tokens_done / elapsed, 1),
                           "step_s": round(float(np.mean(step_times[-args.log_every:])), 4),
                           "elapsed_s": round(elapsed, 1)}
                    if match_n:
                        row["memory_match"] = round(match_sum / match_n, 5)
                        match_sum, match_n = 0.0, 0
                    if cfg.memory_score_prior:  # the learned gains: how far the reading trusts the retriever
                        row["score_gain"] = round(float(raw.memory_score_gain.detach().mean()), 4)
                    if accelerator.is_main_process:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    progress.update(task, completed=done, loss=f"{row['loss']:.3f}", tps=f"{row['tokens_per_s']:.0f}")
                    window_loss, window_n = 0.0, 0
                if done % args.save_every == 0 and done < args.steps:
                    save_checkpoint(done)
    finally:
        metrics.close()
    accelerator.wait_for_everyone()
    save_checkpoint(args.steps)
    summary = {"stage": args.stage, "steps": args.steps, "final_loss": loss_value,
               "tokens_per_s": round(tokens_done / max(1e-9, time.perf_counter() - t_start), 1),
               "mean_step_s": round(float(np.mean(step_times)) if step_times else 0.0, 4),
               "state_dir": str(state_dir), "output": str(out)}
    if accelerator.is_main_process:
        raw.eval()
        save_model_dir(raw.to(torch.float32), tokenizer, out, overwrite=True)
        summary["fingerprint"] = model_fingerprint(out)
        summary["previous_fingerprint"] = old_fingerprint
    return summary
