"""m3: Memory3 language models with explicit memory."""

__version__ = "0.2.0"

__all__ = ["Bank", "Model", "add", "compact", "encode", "remove", "__version__"]


def __getattr__(name: str):
    """`from m3cli import Bank, Model, encode` (m3cli/api.py), imported on first use so that
    `m3 --help` stays instant."""
    if name in ("Bank", "Model", "encode", "add", "remove", "compact", "Answer", "Reference"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'm3cli' has no attribute {name!r}")
