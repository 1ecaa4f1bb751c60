"""Memory-reader files: the small trained delta that makes a pretrained model read memory.

A reader file is one safetensors file: the memory reader's tensors under their model names
(`layers.<i>.attn.mem_q_a`, `mem_q_b`, `mem_o_a`, `mem_o_b`, and `memory_score_gain` when the
model has the retriever-score prior), float32, and one metadata key, `m3.reader`, a JSON object:

  {"format": "m3-reader", "version": 1,
   "base_fingerprint": "sha256:…",      the model dir it was trained on (`model_fingerprint`)
   "base_weights": "sha256:…",          its config and weights alone (`weights_fingerprint`)
   "config": {"memory_layers": [...], "memory_top_k": 16, "memory_selection": "...",
              "memory_reader_rank": 16, "memory_score_prior": false, "train_prev_chunks": 0}}

Applying it to the base model gives exactly the trained model (same weights, same fingerprint).
No pickle; every name and shape is checked before use. Knows nothing about training or banks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import M3Error

READER_FORMAT = "m3-reader"
READER_VERSION = 1
READER_CONFIG_KEYS = (
    "memory_layers",
    "memory_top_k",
    "memory_selection",
    "memory_reader_rank",
    "memory_score_prior",
    "train_prev_chunks",
)
MAX_READER_BYTES = 256 * 2**20


def reader_tensors(model) -> dict[str, torch.Tensor]:
    names = {n for n in dict(model.named_parameters()) if ".attn.mem_" in n or n == "memory_score_gain"}
    return {n: p.detach().float().contiguous().cpu() for n, p in model.named_parameters() if n in names}


def save_reader(model, path: Path, base_fingerprint: str, base_weights: str | None = None) -> Path:
    """Write the model's memory reader to `path` (atomically). base_fingerprint and base_weights:
    `model_fingerprint` and `weights_fingerprint` of the model dir it was trained on."""
    from safetensors.torch import save

    from .atomic import atomic_file

    cfg = model.config
    if not cfg.memory_reader_rank:
        raise M3Error("the model has no memory reader to save")
    conf = {k: getattr(cfg, k) for k in READER_CONFIG_KEYS}
    conf["memory_layers"] = list(cfg.mem_layers)
    meta = {"format": READER_FORMAT, "version": READER_VERSION, "base_fingerprint": base_fingerprint, "config": conf}
    if base_weights is not None:
        meta["base_weights"] = base_weights
    path = Path(path)
    with atomic_file(path) as f:
        f.write(save(reader_tensors(model), metadata={"m3.reader": json.dumps(meta, sort_keys=True)}))
    return path


def read_reader(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a reader file, checked."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise M3Error(f"reader file {path} does not exist")
    if path.stat().st_size > MAX_READER_BYTES:
        raise M3Error(f"{path} is larger than a reader file may be ({MAX_READER_BYTES >> 20} MiB)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("m3.reader")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise M3Error(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        meta = json.loads(raw) if raw else None
    except (json.JSONDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != READER_FORMAT:
        raise M3Error(f"{path} is not an m3 reader file (no m3.reader metadata)")
    if meta.get("version") != READER_VERSION:
        raise M3Error(f"{path}: unsupported reader version {meta.get('version')!r} (this m3 reads {READER_VERSION})")
    conf = meta.get("config")
    if (
        not isinstance(conf, dict)
        or set(conf) != set(READER_CONFIG_KEYS)
        or not isinstance(meta.get("base_fingerprint"), str)
        or not _is_sha(meta.get("base_weights", "sha256:" + "0" * 64))
    ):
        raise M3Error(f"{path}: the reader's metadata is incomplete")
    return meta, tensors


def _is_sha(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None


def apply_reader(model, path: Path, base_fingerprint: str | None = None, base_weights: str | None = None):
    """Give `model` (the base it was trained on) the reader in `path`; returns the model.
    The base is checked when the caller gives its identity: against the reader's `base_weights`
    when both have one (the tokenizer files may be written differently by another transformers
    version), else against its `base_fingerprint`."""
    from .config import ConfigError

    meta, tensors = read_reader(path)
    if base_weights is not None and "base_weights" in meta:
        want, have = meta["base_weights"], base_weights
    else:
        want, have = meta["base_fingerprint"], base_fingerprint
    if have is None and (base_fingerprint is not None or base_weights is not None):
        raise M3Error(f"{path} records no base this model's identity can be checked against")
    if have is not None and want != have:
        raise M3Error(f"{path} was trained on the model {want[:19]}…, not on {have[:19]}…")
    if model.config.memory_reader_rank:
        raise M3Error("the model already has a memory reader")
    conf = dict(meta["config"])
    try:
        cfg = model.config.replace(
            **{
                k: (tuple(v) if k == "memory_layers" else v)
                for k, v in conf.items()
                if k not in ("memory_reader_rank", "memory_score_prior")
            }
        )
    except (ConfigError, TypeError) as e:
        raise M3Error(f"{path}: the reader's config does not fit the model ({e})") from None
    model.config = cfg
    if conf["memory_score_prior"]:
        model.enable_score_prior()
    rank = conf["memory_reader_rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 4096:
        raise M3Error(f"{path}: invalid memory_reader_rank {rank!r}")
    model.enable_reader(rank)
    params = dict(model.named_parameters())
    want = set(reader_tensors(model))
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise M3Error(f"{path} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if tuple(t.shape) != tuple(p.shape) or not t.dtype.is_floating_point:
                raise M3Error(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise M3Error(f"{path}: tensor {name} holds NaN or infinite values")
            p.copy_(t.to(p.dtype))
    return model
