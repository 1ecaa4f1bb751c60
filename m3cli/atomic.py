"""Atomic writes: a target path holds either its old content or the complete new one.

Files and directories are written under a temporary name beside the target and renamed
into place only when complete; on any error the temporary is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import M3Error


def make_parent(target: Path) -> None:
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise M3Error(f"cannot create the directory for {target}: {e.strerror}") from None


def check_replaceable(target: Path, overwrite: bool = False, replaceable=None, what: str = "a model dir") -> None:
    """Fail unless `target` may be written: absent, or (with `overwrite`) a directory that
    replaceable(target) accepts. Long jobs call it first, so they fail before working."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise M3Error(f"{target} already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise M3Error(f"{target} exists and is not a directory")
    if target.exists() and replaceable is not None and not replaceable(target):
        raise M3Error(f"{target} exists and is not {what} m3 wrote; refusing to replace it")


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False, replaceable=None, what: str = "a model dir") -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target`.

    An existing target is replaced only with `overwrite` and, when `replaceable` is given, only
    if replaceable(target) is true (so --force cannot delete an unrelated directory).
    """
    target = Path(target)
    check_replaceable(target, overwrite, replaceable, what)
    make_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "wb") -> Iterator:
    """Yield an open temporary file; on success it is fsynced and renamed onto `target`."""
    target = Path(target)
    make_parent(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(tmp: str | Path, target: Path) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it 0600) and rename
    it onto the target."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)
