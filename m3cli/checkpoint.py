"""Model directories: `config.json` (m3's config), `model.safetensors`, tokenizer files.

Saving is atomic; loading uses safetensors and JSON only (no pickle) and turns every
problem with the directory into a one-line M3Error. Knows nothing about training or banks.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_dir
from .config import ConfigError, M3Config
from .errors import M3Error

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference_prefix_ids(tokenizer, text: str) -> tuple[int, ...]:
    """BOS (if the tokenizer has one) + the tokens of the reference prefix text (DESIGN §3.3)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if not ids:
        raise M3Error(f"the tokenizer turns the reference prefix {text!r} into no tokens")
    return tuple(int(i) for i in ids)


def save_model_dir(model, tokenizer, out: Path, overwrite: bool = False) -> Path:
    """Write config, weights (safetensors) and tokenizer into `out`, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(Path(out), overwrite=overwrite, replaceable=is_model_dir) as tmp:
        # one metadata key: safetensors writes metadata in hash-map order, so with two keys the
        # same weights gave files (and model fingerprints) that differed from run to run
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(model.config.to_json())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)


def is_model_dir(path: Path) -> bool:
    """True for an empty dir or one whose config.json is an m3 model config."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        return True
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == "m3-model-config"
    except (OSError, ValueError, AttributeError):
        return False


def read_config(model_dir: Path) -> M3Config:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise M3Error(f"model dir {model_dir} does not exist")
    if not model_dir.is_dir():
        raise M3Error(f"{model_dir} is not a directory (a model dir holds config.json and model.safetensors)")
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise M3Error(f"{model_dir} has no {CONFIG_FILE}; is it an m3 model dir? (create one with `m3 convert`)")
    try:
        return M3Config.from_json(path.read_text(encoding="utf-8"))
    except (ConfigError, UnicodeDecodeError) as e:
        raise M3Error(f"{path}: {e}") from None


def load_model_dir(
    model_dir: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_impl: str = "sdpa",
    cfg: M3Config | None = None,
):
    """Build the model from a model dir; weights via safetensors, checked key by key. cfg: the
    dir's config when the caller has read it already."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = cfg if cfg is not None else read_config(model_dir)
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise M3Error(f"{model_dir} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise M3Error(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    bad = next((k for k, v in state.items() if v.dtype not in WEIGHT_DTYPES), None)
    if bad is not None:
        raise M3Error(
            f"{path}: tensor {bad} is {str(state[bad].dtype).replace('torch.', '')}; m3 reads float32, "
            "float16 and bfloat16 weights (convert the model again)"
        )
    return model_from_state(cfg, state, str(path), attn_impl).to(device=device, dtype=dtype).eval()


_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "trunc_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


@contextlib.contextmanager
def _no_weight_init():
    """Build modules without filling their weights (they are about to be replaced). On the meta
    device the fill does nothing but costs about a second: torch routes it through its Python
    reference implementations and imports torch._dynamo on the way."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def model_from_state(cfg: M3Config, state: dict, where: str, attn_impl: str = "sdpa"):
    """A Memory3Model holding exactly `state`: every tensor name and shape is checked against the
    config first (built on the meta device, so nothing is allocated twice)."""
    from .model import Memory3Model

    with torch.device("meta"), _no_weight_init():
        model = Memory3Model(cfg, attn_impl=attn_impl)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise M3Error(f"{where} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise M3Error(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, config says {shape}")
    model.load_state_dict(state, assign=True)
    return model


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path):
    """The model dir's tokenizer, loaded from local files only (no remote code)."""
    if not has_tokenizer(model_dir):
        raise M3Error(f"{model_dir} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise M3Error(f"cannot load the tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None


def config_summary(cfg: M3Config) -> dict:
    """Parameter counts and memory geometry, computed on the meta device (no weights needed)."""
    from .model import Memory3Model

    with torch.device("meta"), _no_weight_init():
        model = Memory3Model(cfg)
    return {
        "name": cfg.name,
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
        "layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "memory_layers": list(cfg.mem_layers),
        "memory_top_k": cfg.memory_top_k,
        "memory_shape": list(cfg.memory_shape),
        "memory_bytes_bf16": cfg.memory_bytes(2),
        "reference_prefix": cfg.reference_prefix,
        "reference_prefix_ids": list(cfg.reference_prefix_ids),
        "memory_score_prior": cfg.memory_score_prior,
        "memory_reader_rank": cfg.memory_reader_rank,
    }


FINGERPRINT_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


HASH_CACHE = "file-hashes.json"
HASH_CACHE_ENTRIES = 256


def _cached_sha256(path: Path) -> str:
    """_file_sha256 of a large file, remembered in the cache dir (M3_HOME) under its path, size,
    inode and modification and change times: a file changed in any way, even with its old
    modification time put back, changes its change time and is hashed again. Saves re-reading
    a model's weights (half a GB for SmolLM2) on every command; any cache problem means hashing."""
    from .atomic import atomic_file
    from .default_model import m3_home

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    cache_path = m3_home() / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, str) and len(hit) == 64 and all(c in "0123456789abcdef" for c in hit):
        return hit
    digest = _file_sha256(path)
    cache.pop(key, None)
    cache[key] = digest
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache_path) as f:  # concurrent commands: the last writer wins, never a torn file
            f.write(json.dumps(dict(list(cache.items())[-HASH_CACHE_ENTRIES:])).encode("utf-8"))
    except OSError:  # a read-only cache dir: just no caching
        pass
    return digest


# Config fields added after the first release; at their default they stay out of the fingerprint,
# so models and banks made before the field existed keep their identity (format_spec.md).
FINGERPRINT_LATER_DEFAULTS = {"memory_selection": "attention", "memory_score_prior": False, "memory_reader_rank": 0}


def model_fingerprint(model_dir: Path, config: M3Config | None = None) -> str:
    """Identity of a model dir as format_spec.md defines it: config (without name/extra),
    weights and tokenizer files. Any change to them changes the fingerprint. config: the dir's
    config when the caller has read it already."""
    return _fingerprint(model_dir, config, tokenizer=True)


def weights_fingerprint(model_dir: Path, config: M3Config | None = None) -> str:
    """The fingerprint without the tokenizer files: config and weights alone (what a memory reader
    is bound to; transformers versions write the same vocabulary's files differently)."""
    return _fingerprint(model_dir, config, tokenizer=False)


def _fingerprint(model_dir: Path, config: M3Config | None, tokenizer: bool) -> str:
    import hashlib

    model_dir = Path(model_dir)
    cfg = (config if config is not None else read_config(model_dir)).to_dict()
    cfg.pop("name", None)
    cfg.pop("extra", None)
    for key, default in FINGERPRINT_LATER_DEFAULTS.items():  # fields added later: only when not default
        if cfg.get(key) == default:
            cfg.pop(key)
    h = hashlib.sha256()

    def part(name: str, data: bytes) -> None:
        h.update(name.encode() + b"\0" + data + b"\0")

    part("config", json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
    part("weights", _cached_sha256(model_dir / WEIGHTS_FILE).encode())
    for name in FINGERPRINT_TOKENIZER_FILES if tokenizer else ():
        if (model_dir / name).is_file():
            part(name, _file_sha256(model_dir / name).encode())
    return "sha256:" + h.hexdigest()


def new_model(cfg, tokenizer, seed: int = 0, device="cpu"):
    """A randomly initialised Memory3Model for `cfg` (built on `device`), with the reference
    prefix of `tokenizer`."""
    import torch

    from .model import Memory3Model

    if len(tokenizer) > cfg.vocab_size:
        raise M3Error(f"the tokenizer has {len(tokenizer)} tokens, more than the config's vocab_size {cfg.vocab_size}")
    cfg = cfg.replace(reference_prefix_ids=reference_prefix_ids(tokenizer, "Reference:"))
    torch.manual_seed(seed)
    with torch.device(device):
        return Memory3Model(cfg).eval()


@dataclass
class LoadedModel:
    """A model dir resolved once: its config, tokenizer, weights and fingerprint, for the commands
    that need all four (generate, eval, score, encode)."""

    path: Path
    config: M3Config
    tokenizer: object
    model: torch.nn.Module
    fingerprint: str


def open_model(
    model_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, check=None
) -> LoadedModel:
    """Read the config once, fingerprint the dir, call check(fingerprint) (e.g. a bank's
    require_same_model, so that a wrong bank fails before any weights load), then load the
    tokenizer and the weights."""
    cfg = read_config(model_dir)
    fingerprint = model_fingerprint(model_dir, cfg)
    if check is not None:
        check(fingerprint)
    tokenizer = load_tokenizer(model_dir)
    model = load_model_dir(model_dir, device, dtype, cfg=cfg)
    return LoadedModel(Path(model_dir), cfg, tokenizer, model, fingerprint)
