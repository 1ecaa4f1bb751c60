"""Model configuration: one typed dataclass, its presets, and its JSON form.

Knows the architecture and the explicit-memory hyper-parameters of DESIGN §2–3.
Does not import torch and knows nothing about weights, tokenizers or files beyond
turning itself into / out of a JSON-compatible dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

CONFIG_FORMAT = "m3-model-config"
CONFIG_VERSION = 1
MEMORY_SELECTIONS = ("attention", "attention_x_value_norm")


# The largest model m3 reads (far beyond any real one: these only stop a config from asking for
# unbounded work or memory before its weights are even looked at).
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "n_layers": 1024,
    "n_heads": 1024,
    "n_kv_heads": 1024,
    "head_dim": 1024,
    "intermediate_size": 1 << 20,
    "context_length": 1 << 20,
    "memory_top_k": 1024,
    "reference_length": 1 << 16,
    "chunk_length": 1 << 16,
    "memories_per_chunk": 256,
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class M3Config:
    # --- decoder --------------------------------------------------------------------------
    vocab_size: int  # number of token embeddings (may be padded beyond the tokenizer's size)
    hidden_size: int  # width of the residual stream
    n_layers: int  # number of decoder layers
    n_heads: int  # query heads per layer
    n_kv_heads: int  # key/value heads per layer (grouped-query attention); divides n_heads
    head_dim: int  # width of one attention head
    intermediate_size: int  # width of the gated (SwiGLU) MLP
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # output head shares the input embedding matrix
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    context_length: int = 2048  # longest context (in tokens) the model is meant to read
    # --- explicit memory (DESIGN §2 "Explicit memory", §3) ---------------------------------
    memory_layers: tuple[int, ...] | None = None  # layers that read memory; None = first half
    memory_top_k: int = 8  # tokens kept per memory layer and KV head
    # how tokens are scored for keeping: "attention" (the paper: total attention received from
    # the reference's tokens) or "attention_x_value_norm" (that times the token's value norm:
    # its actual contribution, which discounts attention sinks whose values are near zero)
    memory_selection: str = "attention"
    reference_length: int = 128  # longest reference, in tokens, excluding the prefix
    chunk_length: int = 64  # context tokens per chunk; each chunk reads its own memories
    memories_per_chunk: int = 5  # memories retrieved per chunk at inference
    train_prev_chunks: int = 4  # in training, chunk c also sees the memories of c-4..c-1
    # The retriever-score prior (not in the paper, whose Eq. 4 reads memories by content alone;
    # off by default): a memory slot's attention logits in memory layer l, head h get
    # memory_score_gain[l, h] * SCORE_UNIT * (the slot's retriever score - the best score of the
    # chunk that retrieved it), the gains learned in training (zero-initialised weights).
    memory_score_prior: bool = False
    # The memory reader (not in the paper; 0 = none): in every memory layer, a rank-r query delta
    # that only memory keys see and a rank-r output path that only memory values feed, trained
    # while the rest of a pretrained model stays frozen (`m3 pretrain --train reader`). A call
    # that reads no memory, and the memory encoder, compute exactly the model without it.
    memory_reader_rank: int = 0
    reference_prefix: str = "Reference:"  # text prepended to every reference when encoded
    # token ids of BOS + reference_prefix; set from the tokenizer when a model dir is made.
    # Its KV is the attention sink in front of memories. Empty = memory cannot be used yet.
    reference_prefix_ids: tuple[int, ...] = ()
    # --- identity -----------------------------------------------------------------------------
    name: str = "custom"  # preset or source the model came from (informational)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, e.g. source config

    def __post_init__(self) -> None:
        # normalise JSON lists into tuples so that configs compare and hash consistently
        if self.memory_layers is not None and not isinstance(self.memory_layers, tuple):
            object.__setattr__(self, "memory_layers", tuple(int(x) for x in self.memory_layers))
        if not isinstance(self.reference_prefix_ids, (tuple, list)):
            raise ConfigError("reference_prefix_ids must be a list of token ids")
        if not isinstance(self.reference_prefix_ids, tuple):
            object.__setattr__(self, "reference_prefix_ids", tuple(int(x) for x in self.reference_prefix_ids))
        positive = (
            "vocab_size",
            "hidden_size",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
            "context_length",
            "memory_top_k",
            "reference_length",
            "chunk_length",
            "memories_per_chunk",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {str(value)[:40]!r}")
            if value > LIMITS[name]:
                raise ConfigError(f"config field {name} is {value}; m3 reads models with at most {LIMITS[name]}")
        if len(self.reference_prefix_ids) > 256:
            raise ConfigError("reference_prefix_ids holds more than 256 tokens")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config field {name} must be a finite number, got {str(value)[:40]!r}")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name} must be true or false")
        if (
            not isinstance(self.reference_prefix, str)
            or not isinstance(self.name, str)
            or not isinstance(self.extra, dict)
        ):
            raise ConfigError("config fields reference_prefix and name must be strings, extra an object")
        if self.n_kv_heads > self.n_heads:
            raise ConfigError(f"n_kv_heads ({self.n_kv_heads}) must not exceed n_heads ({self.n_heads})")
        if self.memory_selection not in MEMORY_SELECTIONS:
            raise ConfigError(
                f"memory_selection must be one of {', '.join(MEMORY_SELECTIONS)}, got {self.memory_selection!r}"
            )
        if not isinstance(self.memory_score_prior, bool):
            raise ConfigError(f"memory_score_prior must be true or false, got {self.memory_score_prior!r}")
        if (
            not isinstance(self.memory_reader_rank, int)
            or isinstance(self.memory_reader_rank, bool)
            or not 0 <= self.memory_reader_rank <= 4096
        ):
            raise ConfigError(f"memory_reader_rank must be an integer in 0..4096, got {self.memory_reader_rank!r}")
        if (
            not isinstance(self.train_prev_chunks, int)
            or isinstance(self.train_prev_chunks, bool)
            or not 0 <= self.train_prev_chunks <= 64
        ):
            raise ConfigError(f"train_prev_chunks must be in 0..64, got {self.train_prev_chunks!r}")
        if self.train_prev_chunks < 0:
            raise ConfigError(f"train_prev_chunks must be >= 0, got {self.train_prev_chunks}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and norm_eps must be positive")
        layers = self.memory_layers
        if layers is not None:
            if not layers:
                raise ConfigError("memory_layers must name at least one layer (or be null for the first half)")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ConfigError("memory_layers must be layer numbers")
            if len(set(layers)) != len(layers) or sorted(layers) != list(layers):
                raise ConfigError(f"memory_layers must be strictly increasing, got {list(layers)}")
            if layers and (layers[0] < 0 or layers[-1] >= self.n_layers):
                raise ConfigError(f"memory_layers must lie in 0..{self.n_layers - 1}, got {list(layers)}")
        if any(
            not isinstance(i, int) or isinstance(i, bool) or i < 0 or i >= self.vocab_size
            for i in self.reference_prefix_ids
        ):
            raise ConfigError("reference_prefix_ids must be valid token ids")

    # --- derived values ---------------------------------------------------------------------
    @property
    def mem_layers(self) -> tuple[int, ...]:
        """The memory layers, resolved (default: the first half, layers 0..n_layers/2-1)."""
        if self.memory_layers is None:
            return tuple(range(max(1, self.n_layers // 2)))
        return self.memory_layers

    @property
    def n_mem_layers(self) -> int:
        return len(self.mem_layers)

    @property
    def prefix_length(self) -> int:
        return len(self.reference_prefix_ids)

    @property
    def context_offset(self) -> int:
        """Position of the first context token: prefix 0..p-1, memories [p, p+ref_len), context after."""
        return self.prefix_length + self.reference_length

    @property
    def memory_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one reference's explicit memory: (memory_layers, 2, kv_heads, top_k, head_dim)."""
        return (self.n_mem_layers, 2, self.n_kv_heads, self.memory_top_k, self.head_dim)

    def memory_bytes(self, bytes_per_value: int = 2) -> int:
        """Bytes of one memory, bf16 by default."""
        n = 1
        for s in self.memory_shape:
            n *= s
        return n * bytes_per_value

    # --- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory_layers"] = None if self.memory_layers is None else list(self.memory_layers)
        d["reference_prefix_ids"] = list(self.reference_prefix_ids)
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "M3Config":
        if not isinstance(d, dict):
            raise ConfigError("config must be a JSON object")
        d = dict(d)
        fmt = d.pop("format", None)
        version = d.pop("version", None)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"not an m3 model config (format={fmt!r}, expected {CONFIG_FORMAT!r})")
        if version != CONFIG_VERSION:
            raise ConfigError(f"unsupported m3 config version {version!r} (this m3 reads version {CONFIG_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:  # missing fields, values of the wrong type
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "M3Config":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        except (ValueError, RecursionError) as e:  # huge integers, deep nesting
            raise ConfigError(f"config cannot be read: {str(e)[:100]}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "M3Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, M3Config] = {
    # The paper's Memory3-2.4B (DESIGN §2): 44 layers, 40/8 heads of 80, gated MLP of width
    # 3200, vocab 60416 -> ~2.4B non-embedding parameters; memory (22, 2, 8, 8, 80).
    "memory3-2.4b": M3Config(
        name="memory3-2.4b",
        vocab_size=60416,
        hidden_size=3200,
        n_layers=44,
        n_heads=40,
        n_kv_heads=8,
        head_dim=80,
        intermediate_size=3200,
        context_length=2048,
    ),
    # For unit tests: a few hundred thousand parameters.
    "tiny": M3Config(
        name="tiny",
        vocab_size=512,
        hidden_size=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        context_length=512,
        memory_top_k=4,
        tie_embeddings=True,
    ),
    # The synthetic-knowledge proof model (`make proof`): ~1M parameters, trains on a CPU in minutes.
    "mini": M3Config(
        name="mini",
        vocab_size=4096,
        hidden_size=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        intermediate_size=384,
        context_length=512,
        tie_embeddings=True,
    ),
    # A CPU demo model (~20M parameters with an 8k vocabulary).
    "small": M3Config(
        name="small",
        vocab_size=8192,
        hidden_size=384,
        n_layers=8,
        n_heads=6,
        n_kv_heads=2,
        head_dim=64,
        intermediate_size=1024,
        context_length=1024,
        tie_embeddings=True,
    ),
}


def preset(name: str) -> M3Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
