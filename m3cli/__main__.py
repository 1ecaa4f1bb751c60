"""`python -m m3cli` runs the `m3` command line."""

from .cli import main

main()
