"""`m3 pretrain`: the two training stages of DESIGN §2–3, through `accelerate`.

- warmup: ordinary next-token training, no memory.
- continual: sequences are cut into chunks of `chunk_length` tokens; each chunk retrieves
  `refs_per_chunk` references from the bank's text with its own text as query, dropping references
  that overlap the chunk by more than `max_overlap` (paper Eq. 6: 2/3); each chunk reads its own and the previous
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

from .attention import score_gaps  # noqa: F401 (tests and scripts import it from here)
from .errors import M3Error
from .train_data import PAD as PAD  # the data half of training; PAD is imported from here too
from .train_data import (
    ReferenceTokens,
    batch_indices,
    cached_retrievals,
    continual_memory,
    pack_sequences,
    pad_fill,
    split_rows,
)

STAGES = ("warmup", "continual")
SCHEDULES = ("wsd", "cosine", "constant")
TRAINABLE = ("all", "memory-attention", "reader")
DISTRACTORS = ("retrieved", "title")


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
    max_overlap: float = 0.67  # the paper's 2/3 (recipes of the recorded runs use 0.9)
    memory_selection: str | None = None  # override the config's token-selection score
    memory_top_k: int | None = None  # override the config's tokens kept per memory layer and KV head
    memory_layers: str | None = None  # override the layers that read memory: "all" or "0,1,2"
    refs_per_chunk: int = 5  # continual: references each chunk retrieves (`--memories`; 1 = the paper)
    align_docs: bool = False  # every document starts at a chunk boundary (padding gets no loss)
    prev_chunks: int | None = None  # continual: chunk c also reads chunks c-N..c-1 (default: config)
    distractors: str = "retrieved"  # continual: the other k-1 references (see `retrieve_for_chunks`)
    embedder: str | None = None  # continual: the encoder or static embedder dir the bank was indexed with
    score_prior: bool = False  # give the model the retriever-score prior (M3Config.memory_score_prior)
    reader_rank: int = 16  # --train reader: rank of the memory reader (M3Config.memory_reader_rank)
    init_reader: Path | None = None  # --train reader: the reader file to go on training (None: a new one)
    compile: bool = False  # --train reader: torch.compile the model
    max_time: float = 0.0  # --train reader: seconds of training before a clean stop (0: none)
    profile: int = 0  # --train reader: profile this many steps (after PROFILE_AFTER) into profile.txt
    device: str = "auto"
    state_dir: Path | None = None

    def check(self) -> None:
        if self.stage not in STAGES:
            raise M3Error(f"unknown stage {self.stage!r}; choose warmup or continual")
        if (self.config is None) == (self.init_from is None):
            raise M3Error("give exactly one of --preset PRESET (from scratch) or --init-from MODEL_DIR")
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
            raise M3Error("--memories must be at least 1 and --prev-chunks at least 0")
        if self.distractors not in DISTRACTORS:
            raise M3Error(f"unknown --distractors {self.distractors!r}; choose {', '.join(DISTRACTORS)}")
        if self.score_prior and self.stage != "continual":
            raise M3Error("--memory-score-prior needs --stage continual (its gains learn from reading memories)")
        if self.init_reader is not None and self.train != "reader":
            raise M3Error("--init-reader needs --train reader")
        if self.profile < 0:
            raise M3Error("--profile must be at least 0")
        if self.memory_top_k is not None and self.memory_top_k < 1:
            raise M3Error("--memory-top-k must be at least 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise M3Error("--lr must be > 0, --min-lr-ratio in [0, 1], --warmup-steps >= 0")

    def key(self) -> dict:
        """What must match for --resume to continue a run."""
        d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        for k in ("save_every", "log_every", "device", "state_dir", "embedder"):
            d.pop(k)  # may change between a run and its resumption (steps may not: the schedule uses it)
        d.pop("compile")
        d.pop("max_time")
        d.pop("profile")
        if d["train"] != "reader":
            d.pop("reader_rank")
        d.pop("init_reader")  # where it lies may change; what it holds may not (`reader_train` keys its hash)
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


# --- the model -----------------------------------------------------------------------------------
def build_model(args: TrainArgs, texts: list[str], state_dir: Path, resume: bool, log=print):
    """The model a stage starts from, on the CPU in float32: --init-from's weights, or a preset's
    shape with random weights and a BPE tokenizer trained on the corpus (saved in the state dir,
    so a resumed run tokenizes as before); then the memory options of this run and, with
    --memory-score-prior, the prior's zero gains. Returns (model, tokenizer, the fingerprint of
    --init-from or None)."""
    from .atomic import atomic_dir
    from .checkpoint import load_model_dir, load_tokenizer, model_fingerprint, new_model
    from .config import preset
    from .tokenizer import train_bpe

    old_fingerprint = None
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
                with atomic_dir(
                    saved_tok, overwrite=True, replaceable=lambda d: (d / "tokenizer.json").is_file()
                ) as tmp:
                    tokenizer.save_pretrained(str(tmp))
        model = new_model(cfg, tokenizer, seed=args.seed)
    overrides = memory_overrides(args, model.config)
    if args.prev_chunks is not None and args.stage == "continual":
        overrides["train_prev_chunks"] = args.prev_chunks  # so a later --init-from stage keeps it
    overrides = {k: v for k, v in overrides.items() if getattr(model.config, k) != v}
    if overrides:
        model.config = model.config.replace(**overrides)  # validated there
    if "memory_layers" in overrides and model.config.memory_score_prior:
        raise M3Error(
            "--memory-layers cannot change a model with the retriever-score prior (its gains are per memory layer)"
        )
    if args.score_prior and model.enable_score_prior():
        log("added the retriever-score prior (zero gains: the model reads as before until trained)")
    return model, tokenizer, old_fingerprint


# --- the run's state on disk ------------------------------------------------------------------------
class RunState:
    """A run's checkpoint (weights as safetensors, the optimizer's tensors, the step) and its
    metrics.jsonl in the state dir. `key` is what must match for --resume to continue."""

    def __init__(self, state_dir: Path, key: dict) -> None:
        self.dir, self.key = state_dir, key
        self.ckpt = state_dir / "checkpoint"
        self.metrics_path = state_dir / "metrics.jsonl"

    def restore(self, model, resume: bool, steps: int, log=print) -> int:
        """Load the checkpoint into `model` when resuming; returns the step to start from. Metrics
        logged after the checkpoint are dropped (those steps are redone); a fresh run starts them anew."""
        from safetensors.torch import load_file

        from .atomic import atomic_file

        if resume and (self.ckpt / "state.json").is_file():
            saved = json.loads((self.ckpt / "state.json").read_text())
            if saved.get("key") != self.key:
                raise M3Error(f"{self.dir} holds a run with other settings; run without --resume (and --force)")
            model.load_state_dict(load_file(str(self.ckpt / "model.safetensors")))
            start = int(saved["step"])
            log(f"resuming at step {start} of {steps}")
            if self.metrics_path.is_file():
                kept = [
                    ln
                    for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start
                ]
                with atomic_file(self.metrics_path) as f:
                    f.write("".join(k + "\n" for k in kept).encode())
            return start
        if not resume:
            self.metrics_path.unlink(missing_ok=True)
        return 0

    def restore_optimizer(self, optimizer) -> None:
        optimizer.load_state_dict(torch.load(self.ckpt / "optimizer.pt", weights_only=True))

    def save(self, step: int, model, optimizer) -> None:
        """Weights, optimizer and step, replacing the previous checkpoint whole (atomic dir)."""
        from safetensors.torch import save_file

        from .atomic import atomic_dir

        with atomic_dir(self.ckpt, overwrite=True, replaceable=lambda d: (d / "state.json").is_file()) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                str(tmp / "model.safetensors"),
            )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "key": self.key}))


# --- the step --------------------------------------------------------------------------------------
def step_loss(model, raw, x, y, idx, chunk_refs, chunk_scores, ref_tokens, args: TrainArgs, device):
    """The LM loss of one batch (rows idx: inputs x, targets y); in the continual stage every chunk
    reads the memories of its retrieved references, encoded now by the model being trained (raw:
    the model without accelerate's wrapper), with the retriever-score gaps for the prior."""
    memory = None
    if chunk_refs is not None:
        refs = chunk_refs[idx]
        memory = continual_memory(raw, torch.from_numpy(refs), ref_tokens, args.seq_len, args.detach_memory)
        if memory is not None and chunk_scores is not None:
            memory.scores = score_gaps(refs, chunk_scores[idx][:, :, : refs.shape[2]]).to(device)
    logits = model(x, memory=memory)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def step_progress(label: str, show: bool):
    """The training bar on stderr (terminals only): steps, loss, tokens/s, time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show or not console.is_terminal,
    )


# --- the loop -----------------------------------------------------------------------------------
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _set_trainable(model, what: str) -> None:
    if what == "all":
        return
    mem = set(model.config.mem_layers)
    for name, p in model.named_parameters():
        parts = name.split(".")
        p.requires_grad = (
            parts[0] == "layers" and int(parts[1]) in mem and parts[2] == "attn"
        ) or name == "memory_score_gain"


def pretrain(args: TrainArgs, resume: bool = False, force: bool = False, show_progress: bool = True, log=print) -> dict:
    """Run one stage; returns a summary. The model dir `args.output` is written at the end;
    checkpoints, metrics.jsonl and the chunk retrievals live in the state dir."""
    from accelerate import Accelerator

    from .checkpoint import is_model_dir, model_fingerprint, save_model_dir
    from .corpus import read_corpus
    from .device import resolve_device

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

    model, tokenizer, old_fingerprint = build_model(args, texts, state_dir, resume, log)
    cfg = model.config
    if args.seq_len > cfg.context_length:
        raise M3Error(f"--seq-len {args.seq_len} exceeds the model's context of {cfg.context_length}")
    rows = pack_sequences(
        texts, tokenizer, args.seq_len, args.seed, align=cfg.chunk_length if args.align_docs else None
    )
    fill = pad_fill(tokenizer)

    state_dir.mkdir(parents=True, exist_ok=True)
    key = {**args.key(), "corpus_rows": _sha(rows[:, :8].tolist()), "n_rows": int(rows.shape[0])}
    run_state = RunState(state_dir, key)
    start_step = run_state.restore(model, resume, args.steps, log)
    chunk_refs = chunk_scores = ref_tokens = None
    if args.stage == "continual":
        chunk_refs, chunk_scores = cached_retrievals(
            args, rows, tokenizer, cfg, key, state_dir, device, old_fingerprint, log
        )
        ref_tokens = ReferenceTokens(Path(args.bank), tokenizer, cfg.reference_length)
    _set_trainable(model, args.train)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gain = getattr(model, "memory_score_gain", None)
    decay = [p for p in params if p.dim() >= 2 and p is not gain]
    no_decay = [p for p in params if p.dim() < 2 or p is gain]  # weight decay would pull the prior to none
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    if start_step:
        run_state.restore_optimizer(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    def save_checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            run_state.save(step, raw, optimizer)

    progress = step_progress(args.stage, show_progress and accelerator.is_main_process)
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
                idx = batch_indices(
                    step,
                    rows.shape[0],
                    args.batch_size,
                    args.seed,
                    accelerator.process_index,
                    accelerator.num_processes,
                )
                x, y = split_rows(torch.from_numpy(rows[idx]).to(device), fill)
                with accelerator.autocast():
                    loss = step_loss(model, raw, x, y, idx, chunk_refs, chunk_scores, ref_tokens, args, device)
                accelerator.backward(loss)
                if args.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(loss.detach())
                window_loss += loss_value
                window_n += 1
                tokens_done += x.numel() * accelerator.num_processes
                step_times.append(time.perf_counter() - t0)
                done = step + 1
                if done % args.log_every == 0 or done == args.steps:
                    elapsed = time.perf_counter() - t_start
                    row = {
                        "step": done,
                        "stage": args.stage,
                        "loss": round(window_loss / window_n, 5),
                        "lr": round(lr, 8),
                        "tokens_per_s": round(tokens_done / elapsed, 1),
                        "step_s": round(float(np.mean(step_times[-args.log_every :])), 4),
                        "elapsed_s": round(elapsed, 1),
                    }
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
    summary = {
        "stage": args.stage,
        "steps": args.steps,
        "final_loss": loss_value,
        "tokens_per_s": round(tokens_done / max(1e-9, time.perf_counter() - t_start), 1),
        "mean_step_s": round(float(np.mean(step_times)) if step_times else 0.0, 4),
        "state_dir": str(state_dir),
        "output": str(out),
    }
    if accelerator.is_main_process:
        raw.eval()
        save_model_dir(raw.to(torch.float32), tokenizer, out, overwrite=True)
        summary["fingerprint"] = model_fingerprint(out)
        summary["previous_fingerprint"] = old_fingerprint
    return summary
