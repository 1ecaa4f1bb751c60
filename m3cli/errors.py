"""The one exception type for user mistakes. The CLI prints its message on one line and
exits non-zero; anything else escaping a command is a bug and keeps its traceback."""


class M3Error(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong flag."""


class BankError(M3Error):
    """The file is not a valid .m3bank (or not one this m3 can read)."""


MAX_BATCH = 4096  # --batch-size of any command: a batch is held in memory whole
