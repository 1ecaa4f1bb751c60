"""m3: Memory3 language models with explicit memory."""

__version__ = "0.1.0"
