"""Atomic writes: a target path holds either its old content or the complete new one.

Files and directories are written under a temporary name beside the target (created
exclusively, never through a pre-existing link) and renamed into place only when complete; on
any error the temporary is removed. A writer holds `output_lock` on its target for its whole
run, so a second writer of the same path fails at once instead of racing it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import M3Error

_held: dict[str, int] = {}  # lock files this process holds -> nesting depth
_held_guard = threading.Lock()


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target` (through `.<name>.lock` beside it) for the block.

    A second process that wants the same output fails with one line, whatever --force says;
    the same process may nest. The lock file is opened without following links and removed
    on release; a lock taken on a file someone else just removed is detected and retaken.
    """
    target = Path(target)
    make_parent(target)
    path = lock_path(target)
    key = str(path.parent.resolve() / path.name)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = -1
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise M3Error(f"{path} is a symbolic link; remove it and try again") from None
            raise M3Error(f"cannot write beside {target}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise M3Error(f"another m3 process is writing {target}; wait for it to finish (lock {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file we locked: lock the new one
        fd = -1
    if fd < 0:
        raise M3Error(f"cannot lock {path}")
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def crash_point(name: str) -> None:
    """Die at once, as from SIGKILL, when $M3_CRASH_AT names this point: how the tests check that
    an update killed at any step leaves the old bank or the new one, never a mix."""
    if os.environ.get("M3_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def remove_path(path: Path) -> None:
    """Remove a file, a link (never its target) or a directory tree; absent is fine."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def open_new(path: Path, mode: str = "wb"):
    """Create `path` for writing; a file or link already there is removed first, and the new
    file is created exclusively (O_EXCL), so a planted link is never followed."""
    remove_path(path)
    fd = os.open(
        path, (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )
    return os.fdopen(fd, mode)


def open_existing(path: Path, mode: str = "r+b"):
    """Open a regular file we wrote earlier (a spool being resumed), refusing links and
    anything that is not a regular file."""
    flags = os.O_RDWR if "+" in mode else os.O_RDONLY
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise M3Error(f"{path} is not a regular file")
    return os.fdopen(fd, mode)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small file atomically (a link at `path` is replaced, not followed)."""
    with atomic_file(path, "w") as f:
        f.write(text)


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
    with output_lock(target):
        yield from _atomic_dir(target)


def _atomic_dir(target: Path) -> Iterator[Path]:
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
def atomic_file(target: Path, mode: str = "wb", validate: Callable[[Path], None] | None = None) -> Iterator:
    """Yield an open temporary file; on success it is fsynced, passed to `validate` (which
    raises to refuse it) and renamed onto `target`."""
    target = Path(target)
    make_parent(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if validate is not None:
            validate(Path(tmp))
        crash_point("rename")
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
