"""m3: Memory3 language models with explicit memory."""

__version__ = "0.2.0"
