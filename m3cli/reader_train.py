"""`m3 pretrain --stage continual --train reader`: teach a frozen pretrained model to read memory.

Only the memory reader trains (`M3Config.memory_reader_rank`: per memory layer, a query delta
that only memory keys see and an output path that only memory values feed); every weight of the
model it starts from stays as it was. Three things follow:

- the memory encoder is the frozen model, so every reference the training retrieves is encoded
  once, in batches, before the first step (DESIGN §3.5), and a step costs little more than a
  plain forward and backward;
- the model reading no memory (closed book, RAG, the encoder) computes exactly what it did;
- the trained delta is small: `OUTPUT.train/reader.safetensors` (see `reader.py`).

Training examples (JSONL or Parquet):
  {"prompt", "answer"}  a chat turn: the loss is on the answer; the prompt's 64-token chunks
                        retrieve with the user's text, as `m3 generate --chat` does, and the
                        answer reads the last prompt chunk's memories
  {"text"}              plain text: the loss is on every token; each 64-token chunk retrieves
                        with its own text, references overlapping it by > max_overlap dropped
Rows pack several examples; a token sees only its own example (positions restart in each, as a
prompt's do at inference) and reads only its own chunk's memories. Retrieval runs once, before
training. Data order is a pure function of (seed, step): a killed run resumes exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .bankset import bank_identity
from .errors import M3Error
from .reader_data import IGNORE, Packed, Segment, chat_prompt, pack, read_examples, segments  # noqa: F401

# Dense bf16 peak of the accelerators we meet, for model-FLOPs utilisation (MFU).
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "4090": 165.0,
}


def _sha_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# --- retrieval and frozen memories -------------------------------------------------------------
EXCLUDE_EXTRA = 8  # hits fetched beyond k when a query excludes a document (its own references)


def retrieve(
    queries: list[str],
    bank_path: Path,
    k: int,
    max_overlap: float,
    embedder,
    model_dir,
    device,
    log,
    exclude: list[str | None] | None = None,
):
    """(len(queries), k) reference ids (-1 where fewer qualify) and their scores, once.
    exclude[i]: a document whose references query i never gets (up to EXCLUDE_EXTRA of them)."""
    from .bank import Bank
    from .retrieval import Retriever, query_embedder

    refs = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.zeros((len(queries), k), dtype=np.float32)
    keyed = list(zip(queries, exclude or [None] * len(queries)))
    # those that exclude a document last: only they fetch EXCLUDE_EXTRA more hits
    unique = sorted(set(keyed), key=lambda x: (x[1] is not None, x[0], x[1] or ""))
    where = {q: j for j, q in enumerate(unique)}
    t0 = time.perf_counter()
    u_refs = np.full((len(unique), k), -1, dtype=np.int64)
    u_scores = np.zeros((len(unique), k), dtype=np.float32)
    with Bank(bank_path) as bank:
        retriever = Retriever(bank, query_embedder(bank, model_dir=model_dir, encoder=embedder, device=device))
        s = 0
        while s < len(unique):
            excluding = unique[s][1] is not None
            part = [x for x in unique[s : s + 256] if (x[1] is not None) == excluding]
            extra = EXCLUDE_EXTRA if excluding else 0
            found = retriever.search([q for q, _ in part], k=k + extra, max_overlap=max_overlap)
            for j, hits in enumerate(found):
                hits = [h for h in hits if h.doc_id != part[j][1]][:k]
                for rank, h in enumerate(hits):
                    u_refs[s + j, rank], u_scores[s + j, rank] = h.ref, h.score
            s += len(part)
    idx = np.array([where[q] for q in keyed], dtype=np.int64)
    refs[:], scores[:] = u_refs[idx], u_scores[idx]
    log(
        f"retrieved {k} references for {len(unique):,} distinct chunk queries in {time.perf_counter() - t0:.0f} s "
        f"({(refs[:, 0] >= 0).mean():.0%} found one)"
    )
    return refs, scores


@torch.no_grad()
def encode_once(model, bank_path: Path, tokenizer, refs: list[int], device, dtype, batch: int = 64, log=print):
    """Memories of the listed references by the frozen model, in one tensor on `device`:
    kv (U, L, 2, Hkv, k, D) in `dtype`, valid (U, L, Hkv, k)."""
    from .bank import Bank
    from .corpus import reference_ids

    cfg = model.config
    with Bank(bank_path) as bank:
        ids = [
            reference_ids(tokenizer, bank.reference(r).text)[: cfg.reference_length] or [tokenizer.eos_token_id]
            for r in refs
        ]
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: little padding
    kv = torch.zeros((len(refs),) + cfg.memory_shape, dtype=dtype, device=device)
    valid = torch.zeros(
        (len(refs), cfg.n_mem_layers, cfg.n_kv_heads, cfg.memory_top_k), dtype=torch.bool, device=device
    )
    t0 = time.perf_counter()
    for s in range(0, len(refs), batch):
        part = order[s : s + batch]
        n = max(len(ids[i]) for i in part)
        x = torch.zeros((len(part), n), dtype=torch.long)
        for j, i in enumerate(part):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
        lengths = torch.tensor([len(ids[i]) for i in part])
        enc = model.encode_references(x.to(device), lengths.to(device))
        at = torch.as_tensor(part, device=device)
        kv[at] = enc.kv.to(dtype)
        valid[at] = enc.valid
    log(
        f"encoded {len(refs):,} references once with the frozen model in {time.perf_counter() - t0:.0f} s "
        f"({kv.numel() * kv.element_size() / 2**20:.0f} MiB)"
    )
    return kv, valid


# --- FLOPs ---------------------------------------------------------------------------------------
def step_flops(cfg, n_tokens: int, n_targets: int, keys_per_token: float, reader_params: int) -> float:
    """FLOPs one step performs: forward (matmuls of every layer for every token, the output head for
    scored tokens only, attention over keys_per_token keys, doubled head width where memory is
    read), backward to the activations (the same again; frozen weights need no weight
    gradients) and the reader's weight gradients."""
    C, I, H, Hkv, D, L = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.n_layers,
    )
    per_layer = 2 * (C * H * D * 2 + C * Hkv * D * 2 + 3 * C * I)  # q, o, k, v, gate/up/down
    attn = 2 * 2 * H * (2 * D) * keys_per_token  # logits and values, doubled width
    fwd = n_tokens * (L * (per_layer + attn)) + 2 * n_targets * C * cfg.vocab_size + 2 * n_tokens * reader_params
    return 2 * fwd + 2 * n_tokens * reader_params


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


PROFILE_AFTER = 5  # --profile: steps left out first (allocator and kernel warm-up)


def write_profile(profiler, path: Path, device: torch.device, steps: int) -> None:
    """Stop `profiler` and write its table of operators by total time (`--profile`)."""
    from .atomic import atomic_file

    profiler.stop()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=key, row_limit=40)
    with atomic_file(path) as f:
        f.write(f"m3 pretrain --train reader --profile: {steps} steps on {device}, sorted by {key}\n{table}\n".encode())


# --- the loop ------------------------------------------------------------------------------------
def reader_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".attn.mem_" in n]


def train_reader(args, resume: bool = False, force: bool = False, show_progress: bool = True, log=print) -> dict:
    """Run `m3 pretrain --train reader` (see the module docstring); returns a summary."""
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from .atomic import atomic_dir, atomic_file
    from .attention import Memory, score_gaps
    from .bank import Bank, require_same_model
    from .checkpoint import (
        is_model_dir,
        load_model_dir,
        load_tokenizer,
        model_fingerprint,
        save_model_dir,
        weights_fingerprint,
    )
    from .device import resolve_device
    from .model import rope_cos_sin
    from .reader import save_reader
    from .train import _sha, batch_indices, lr_at, memory_overrides, pad_fill, step_progress

    if args.stage != "continual" or args.init_from is None or args.bank is None:
        raise M3Error("--train reader needs --stage continual, --init-from MODEL_DIR and --bank BANK")
    if args.reader_rank < 1:
        raise M3Error("--reader-rank must be at least 1")
    out = Path(args.output)
    state_dir = Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".train")
    if out.exists() and not force and not resume:
        raise M3Error(f"{out} already exists; pass --force to replace it (or --resume to continue a run)")
    if out.exists() and not is_model_dir(out):
        raise M3Error(f"{out} exists and is not a model dir m3 wrote; refusing to replace it")
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    device = accelerator.device

    tokenizer = load_tokenizer(args.init_from)
    base_fingerprint = model_fingerprint(args.init_from)
    base_weights = weights_fingerprint(args.init_from)
    model = load_model_dir(args.init_from, "cpu", torch.float32)
    with Bank(Path(args.bank)) as b:
        require_same_model(b, base_fingerprint)
    init_reader_sha = None
    if args.init_reader is not None:  # go on training a reader of this base: it sets layers, tokens, rank
        from .reader import apply_reader

        apply_reader(model, Path(args.init_reader), base_fingerprint, base_weights)
        init_reader_sha = _sha_file(Path(args.init_reader))
    overrides = memory_overrides(args, model.config)
    overrides["train_prev_chunks"] = 0  # a chunk reads its own memories, as at inference
    overrides = {k: v for k, v in overrides.items() if getattr(model.config, k) != v}
    if overrides and model.config.memory_reader_rank:
        raise M3Error("the model already has a memory reader: its memory layers and tokens cannot change")
    if overrides:
        model.config = model.config.replace(**overrides)
    if args.score_prior:
        model.enable_score_prior()
    torch.manual_seed(args.seed)  # the reader's initial factors: a function of the seed
    if args.init_reader is None:
        try:
            model.enable_reader(args.reader_rank)
        except ValueError as e:  # --init-from a model with a reader of another rank
            raise M3Error(f"{e}; train it with --reader-rank {model.config.memory_reader_rank}") from None
    cfg = model.config
    if not cfg.reference_prefix_ids:
        raise M3Error("the model has no reference prefix; it cannot read memory")
    if args.seq_len > cfg.context_length:
        raise M3Error(f"--seq-len {args.seq_len} exceeds the model's context of {cfg.context_length}")
    for p in model.parameters():
        p.requires_grad = False
    params = reader_params(model)
    if cfg.memory_score_prior:
        params.append(model.memory_score_gain)
    for p in params:
        p.requires_grad = True

    segs = segments(read_examples(args.corpus), tokenizer, args.seq_len, cfg.chunk_length)
    packed, queries = pack(segs, args.seq_len, args.seed, pad_fill(tokenizer))
    n_rows = packed.ids.shape[0]
    key = {**args.key(), "rows": _sha(packed.ids[:, :16].tolist()), "n_rows": n_rows, "base": base_fingerprint}
    if init_reader_sha is not None:
        key["init_reader"] = init_reader_sha
    if any(packed.query_exclude):  # which documents each chunk may not read changes what it retrieves
        key["exclude"] = _sha(packed.query_exclude)
    log(
        f"{len(segs):,} examples in {n_rows:,} rows of {args.seq_len} tokens "
        f"({(packed.segment >= 0).mean():.0%} filled, {(packed.targets != IGNORE).mean():.0%} scored)"
    )

    state_dir.mkdir(parents=True, exist_ok=True)
    ckpt = state_dir / "checkpoint"
    start_step = 0
    metrics_path = state_dir / "metrics.jsonl"
    saved_reader = None
    resumed_row: dict = {}
    if resume and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved.get("key") != key:
            raise M3Error(f"{state_dir} holds a run with other settings; run without --resume (and --force)")
        saved_reader = load_file(str(ckpt / "reader.safetensors"))
        start_step = int(saved["step"])
        log(f"resuming at step {start_step} of {args.steps}")
        if metrics_path.is_file():
            kept = [
                ln
                for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= start_step
            ]
            with atomic_file(metrics_path) as f:
                f.write("".join(k + "\n" for k in kept).encode())
            resumed_row = json.loads(kept[-1]) if kept else {}  # what a finished run reports again
    elif not resume:
        metrics_path.unlink(missing_ok=True)
    if saved_reader is not None:
        names = dict(model.named_parameters())
        for k, v in saved_reader.items():
            if k not in names or tuple(names[k].shape) != tuple(v.shape):
                raise M3Error(f"{ckpt} does not match this model ({k})")
            names[k].data.copy_(v)

    # retrieval once; the retrieved references encoded once by the frozen model. Both only for the
    # rows this run's steps use (a pure function of the seed), so a short run on a large corpus
    # pays for what it reads; the set does not depend on where a resumed run starts.
    k = args.refs_per_chunk
    used = np.unique(
        np.concatenate(
            [
                batch_indices(s, n_rows, args.batch_size, args.seed, r, accelerator.num_processes)
                for s in range(args.steps)
                for r in range(accelerator.num_processes)
            ]
        )
    )
    needed = sorted({q for r in used.tolist() for q in packed.row_queries[r]})
    log(f"{args.steps:,} steps of {args.batch_size} rows use {len(used):,} rows, {len(needed):,} chunk queries")
    cache = state_dir / "retrieval.npz"
    rkey = {"key": key, "bank": str(Path(args.bank).resolve()), "bank_size": bank_identity(Path(args.bank))}
    cache_key = state_dir / "retrieval.json"
    if cache.is_file() and cache_key.is_file() and json.loads(cache_key.read_text()) == rkey:
        with np.load(cache, allow_pickle=False) as z:
            q_refs, q_scores = z["refs"], z["scores"]
        if q_refs.shape != (len(queries), k):
            raise M3Error(f"{cache} does not match this run; delete it to retrieve again")
    else:
        q_refs = np.full((len(queries), k), -1, dtype=np.int64)
        q_scores = np.zeros((len(queries), k), dtype=np.float32)
        if needed:
            q_refs[needed], q_scores[needed] = retrieve(
                [queries[q] for q in needed],
                Path(args.bank),
                k,
                args.max_overlap,
                args.embedder,
                args.init_from,
                device,
                log,
                [packed.query_exclude[q] for q in needed],
            )
        with atomic_file(cache) as tmp:
            np.savez(tmp, refs=q_refs, scores=q_scores)
        with atomic_file(cache_key) as f:
            f.write(json.dumps(rkey).encode())
    unique = np.unique(q_refs[q_refs >= 0])
    local = np.full(max(int(unique.max()) + 1 if len(unique) else 1, 1), -1, dtype=np.int64)
    local[unique] = np.arange(len(unique))
    mem_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(device)
    model.eval()
    mem_kv, mem_valid = encode_once(model, Path(args.bank), tokenizer, unique.tolist(), device, mem_dtype, log=log)
    sink = model.encode_prefix().detach()

    # per row: its slots (reference, chunk query, score gap), padded to the widest row
    S = max(1, max(len(r) for r in packed.row_queries) * k)
    slot_ref = np.full((n_rows, S), -1, dtype=np.int64)
    slot_query = np.full((n_rows, S), -2, dtype=np.int64)
    slot_gap = np.zeros((n_rows, S), dtype=np.float32)
    for r, qs in enumerate(packed.row_queries):
        if not qs:
            continue
        refs = q_refs[qs]  # (n, k)
        slot_ref[r, : refs.size] = np.where(refs >= 0, local[np.maximum(refs, 0)], -1).reshape(-1)
        slot_query[r, : refs.size] = np.repeat(np.asarray(qs), k)
        slot_gap[r, : refs.size] = score_gaps(torch.from_numpy(refs)[None], torch.from_numpy(q_scores[qs])[None])[
            0
        ].numpy()
    on = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    t_ids, t_targets, t_segment = on(packed.ids), on(packed.targets), on(packed.segment.astype(np.int64))
    t_position, t_query = on(packed.position.astype(np.int64)), on(packed.query.astype(np.int64))
    t_slot_ref, t_slot_query, t_slot_gap = on(slot_ref), on(slot_query), on(slot_gap)

    model.train()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2 or p is getattr(model, "memory_score_gain", None)]
    decay = [p for p in decay if not any(p is q for q in no_decay)]  # weight decay would pull the prior to none
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    if start_step:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    forward = torch.compile(model) if args.compile else model
    n_reader = sum(p.numel() for p in params)
    peak = peak_flops(device)

    def reader_state() -> dict:
        return {n: p.detach().float().contiguous().cpu() for n, p in raw.named_parameters() if p.requires_grad}

    def save_checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        with atomic_dir(ckpt, overwrite=True, replaceable=lambda d: (d / "state.json").is_file()) as tmp:
            save_file(reader_state(), str(tmp / "reader.safetensors"), metadata={"format": "pt"})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "key": key}))

    pinned = device.type == "cuda"

    def to_device(a: np.ndarray) -> torch.Tensor:  # from pinned memory, without waiting for the GPU
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        return t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)

    def batch(step: int):
        rows = batch_indices(
            step, n_rows, args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes
        )
        idx = to_device(rows)
        # the scored positions (flat over the batch's rows and tokens), found on the host: finding
        # them on the GPU would make the host wait for it at every step
        scored = np.flatnonzero(packed.targets[rows] != IGNORE)
        refs, qid = t_slot_ref[idx], t_slot_query[idx]  # (B, S)
        real = refs >= 0
        kv = mem_kv[refs.clamp_min(0)]  # an empty slot holds some reference's keys, none of them valid
        valid = mem_valid[refs.clamp_min(0)] & real[:, :, None, None, None]
        query = t_query[idx]  # (B, T)
        visible = (query[:, :, None] == qid[:, None, :]) & (query[:, :, None] >= 0) & real[:, None, :]
        memory = Memory(
            kv=kv, valid=valid, sink=sink, visible=visible, scores=t_slot_gap[idx] if cfg.memory_score_prior else None
        )
        # every row reads something, and a reference's real keys are the same in every layer and head
        # (encode_references keeps min(k, its length) of them); asking would stall the GPU
        memory.prepared["readable"] = True
        memory.prepared["valid_flags"] = (True, False)  # (uniform, all real): False is always safe
        position = t_position[idx] + cfg.context_offset
        rope = rope_cos_sin(position, cfg.head_dim, cfg.rope_theta, raw.embed.weight.dtype)  # outside the graph
        return (t_ids[idx], t_targets[idx], t_segment[idx], rope, memory, to_device(scored), len(scored))

    profiler = None
    if args.profile and accelerator.is_main_process:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        first = min(start_step + PROFILE_AFTER, max(start_step, args.steps - args.profile))
        warm = 1 if first > start_step else 0  # the step before the window warms the profiler up
        plan = schedule(wait=first - start_step - warm, warmup=warm, active=args.profile)
        profiler = profile(activities=acts, schedule=plan)
        profiler.start()
    progress = step_progress("reader", show_progress and accelerator.is_main_process)
    metrics = open(metrics_path, "a")
    keys_per_token = (
        args.seq_len / 2 + k * cfg.memory_top_k + cfg.prefix_length
    )  # causal context + one chunk's memories
    t_start = time.perf_counter()
    tokens = 0
    window_loss = torch.zeros((), device=device)
    window_scored = 0
    window_n, window_t0, window_tokens, window_targets = 0, time.perf_counter(), 0, 0
    loss_value, step_times, last_row = float(resumed_row.get("loss", "nan")), [], resumed_row
    stopped_at = None
    try:
        with progress:
            task = progress.add_task("train", total=args.steps, completed=start_step, loss="-", tps="-")
            for step in range(start_step, args.steps):
                lr = args.lr * lr_at(step, args)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                ids, targets, segment, rope, memory, sel, n_scored = batch(step)
                with accelerator.autocast():
                    h = forward(ids, memory=memory, rope=rope, segment_ids=segment, return_hidden=True)
                    logits = F.linear(h.flatten(0, 1)[sel], raw.output_weight())  # scored positions only
                    loss = F.cross_entropy(logits.float(), targets.flatten()[sel])
                accelerator.backward(loss)
                if args.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach()
                window_scored += n_scored
                window_n += 1
                n_tok = int(args.batch_size * args.seq_len * accelerator.num_processes)
                tokens += n_tok
                window_tokens += n_tok
                done = step + 1
                if done % args.log_every == 0 or done == args.steps:
                    window_targets = window_scored * accelerator.num_processes
                    loss_value = float(window_loss) / window_n
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    dt = time.perf_counter() - window_t0
                    flops = step_flops(cfg, window_tokens, window_targets, keys_per_token, n_reader)
                    row = {
                        "step": done,
                        "stage": "continual-reader",
                        "loss": round(loss_value, 5),
                        "lr": round(lr, 8),
                        "tokens_per_s": round(window_tokens / dt, 1),
                        "step_s": round(dt / window_n, 4),
                        "tflops": round(flops / dt / 1e12, 3),
                        "mfu": round(flops / dt / peak, 4) if peak else None,
                        "elapsed_s": round(time.perf_counter() - t_start, 1),
                    }
                    last_row = row
                    step_times.append(dt / window_n)
                    if accelerator.is_main_process:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    progress.update(task, completed=done, loss=f"{loss_value:.3f}", tps=f"{row['tokens_per_s']:.0f}")
                    window_loss.zero_()
                    window_scored = 0
                    window_n, window_t0, window_tokens, window_targets = 0, time.perf_counter(), 0, 0
                if profiler is not None:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    profiler.step()
                    if done >= first + args.profile or done == args.steps:
                        write_profile(profiler, state_dir / "profile.txt", device, done - first)
                        profiler = None
                if done % args.save_every == 0 and done < args.steps:
                    save_checkpoint(done)
                if args.max_time and time.perf_counter() - t_start >= args.max_time and done < args.steps:
                    stopped_at = done
                    break
    finally:
        metrics.close()
        if profiler is not None:
            profiler.stop()
    accelerator.wait_for_everyone()
    if stopped_at is not None:
        save_checkpoint(stopped_at)
        if accelerator.is_main_process:  # the reader so far, usable as it is (`m3 pretrain --resume` goes on)
            save_reader(raw, state_dir / "reader.safetensors", base_fingerprint, base_weights)
        return {
            "stage": "continual",
            "train": "reader",
            "steps": args.steps,
            "stopped_at": stopped_at,
            "final_loss": loss_value,
            "last_tokens_per_s": last_row.get("tokens_per_s"),
            "mfu": last_row.get("mfu"),
            "state_dir": str(state_dir),
            "reader": str(state_dir / "reader.safetensors"),
        }
    save_checkpoint(args.steps)
    elapsed = time.perf_counter() - t_start
    summary = {
        "stage": "continual",
        "train": "reader",
        "steps": args.steps,
        "final_loss": loss_value,
        # a resumed run that had finished trains nothing: it reports the run's last window again
        "tokens_per_s": round(tokens / max(1e-9, elapsed), 1) if tokens else last_row.get("tokens_per_s", 0.0),
        "last_tokens_per_s": last_row.get("tokens_per_s"),
        "mfu": last_row.get("mfu"),
        "tflops": last_row.get("tflops"),
        "mean_step_s": round(float(np.mean(step_times)), 4) if step_times else last_row.get("step_s", 0.0),
        "reader_parameters": n_reader,
        "state_dir": str(state_dir),
        "output": str(out),
    }
    if accelerator.is_main_process:
        raw.eval()
        save_model_dir(raw.to(torch.float32), tokenizer, out, overwrite=True)
        save_reader(raw, state_dir / "reader.safetensors", base_fingerprint, base_weights)
        summary["fingerprint"] = model_fingerprint(out)
        summary["previous_fingerprint"] = base_fingerprint
        summary["reader"] = str(state_dir / "reader.safetensors")
        with atomic_file(state_dir / "summary.json") as f:
            f.write((json.dumps(summary, indent=1) + "\n").encode())
    return summary
