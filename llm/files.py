"""Files and standard output, the project's I/O helpers in one place: atomic file writes (a reader,
or DVC, never sees a half-written output), JSON and CSV written that way, an exclusive lock file
(two runs of a stage never share its resume state), UTF-8 text read with one-line errors, and
standard output written so that a failure is one line (`llm.errors.report_error`), not a traceback."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from llm.errors import STDOUT, LLMError, os_reason

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

_UMASK = os.umask(0o022)  # read once: os.umask can only be read by setting it
os.umask(_UMASK)

# A temporary is `.<name>.<pid>-<token>-<random>.tmp`: the writing process and, since a pid is
# reused (a container's stage often gets the same one), a token of this process.
_TOKEN = secrets.token_hex(4)
_TMP_TAIL = re.compile(r"(?:(\d+)-([0-9a-f]{8})-)?[a-z0-9_]{8}")  # tempfile's 8 random characters


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that `atomic_path(path)` left behind in a process that died (SIGKILL,
    power loss) before it could; returns them. A temporary of a live process, this one's included
    (another thread may be writing it), is kept; one with no pid in its name (an older version's) is
    stale."""
    path = Path(path)
    prefix, suffix = f".{path.name}.", ".tmp"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        tail = _TMP_TAIL.fullmatch(name[len(prefix) : len(name) - len(suffix)])
        if tail is None:  # another file's temporary (`.<name>.x.<random>.tmp` is that of `<name>.x`)
            continue
        pid, token = tail.groups()
        if pid is not None:
            if int(pid) == os.getpid() and token == _TOKEN:
                continue
            if int(pid) != os.getpid() and _alive(int(pid)):
                continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` when the block succeeds.

    The temporary gets the permissions a plain `open` would give (mkstemp's are 0600), and is
    removed if the block fails, so `path` is always absent, the old file, or the whole new one.
    A process killed while writing cannot remove its temporary: the next write of `path` does.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a directory, or a device renaming would replace
        raise LLMError(f"{path} is not a regular file: cannot replace it with the output")
    for parent in (path.parent, *path.parent.parents):  # mkdir under a regular file says "File exists"
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-{_TOKEN}-", suffix=".tmp")
    except OSError as exc:  # read-only, full, no permission: name the user's file, not a temporary
        exc.filename = str(path)
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing: some writers (safetensors) recreate the file
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename == tmp:
            exc.filename = str(path)
        raise


class LockHeld(LLMError):
    """Another run holds the lock: two runs of a stage would share (and spoil) one resume state."""


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive lock; None where it cannot be had."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise LockHeld(f"another run holds {path}" + (f" (pid {pid})" if pid else "")) from None
        except OSError:
            os.close(fd)
            return None
        # The previous holder removes the file on release: if it did so between our open and our
        # flock, we hold a lock on a removed file. Lock the one that is there now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except OSError:
            pass
        os.close(fd)
    with suppress(OSError):  # the pid only names the holder in the other run's message
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the file `path` for the block, or raise `LockHeld` at once.

    `flock` on a file holding the owner's pid: the kernel drops the lock when its process dies, so
    a killed run never blocks the next one, and the file is removed on release. Two opens of the
    file conflict even within one process. Where the file cannot be created or locked (a read-only
    directory, a file system without locks) the block runs unlocked: the lock guards against a
    second run, it is no reason to stop the first.
    """
    path = Path(path)
    fd = _lock(path) if fcntl is not None else None
    try:
        yield path
    finally:
        if fd is not None:
            with suppress(OSError):
                path.unlink(missing_ok=True)  # while still locked: whoever opened it meanwhile retries
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def finite_or_none(x: Any) -> Any:
    """`x`, with a numpy or torch scalar as a Python number; None for NaN, inf and -inf."""
    if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def sanitize(obj: Any) -> Any:
    """`obj` with every non-finite float, in nested dicts, lists and tuples too, replaced by None."""
    if isinstance(obj, dict):
        return {key: sanitize(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(value) for value in obj]
    return finite_or_none(obj)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented UTF-8 JSON; NaN and infinities become null, so the file is strict JSON."""
    text = json.dumps(sanitize(obj), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = list(rows)
    buf = io.StringIO()
    fields = list(rows[0]) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode())


# --- text in, standard output out ---------------------------------------------------------------


@contextmanager
def naming(filename: str | os.PathLike) -> Iterator[None]:
    """Attach `filename` to an OSError raised in the block that names no file: writes that fail
    (ENOSPC, EIO) carry none. `naming(STDOUT)` marks errors of standard output."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(filename)
        raise


@contextmanager
def writing(label: str) -> Iterator[None]:
    """An OSError in the block, which writes the file `label` names (e.g. "--output out.csv"),
    as one LLMError naming it, not a temporary file beside it: `cannot write LABEL: reason`."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise LLMError(f"cannot write {label}: {os_reason(exc)}") from None


def write_stdout(text: str, flush: bool = False) -> None:
    """Write `text` to standard output: an OSError (a full disk, a closed descriptor) names it
    (`report_error` then gives one line), a broken pipe stays a BrokenPipeError (quiet, 141)."""
    with naming(STDOUT):
        if sys.stdout is None:  # started with standard output closed (`>&-`)
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()


def flush_stdout() -> None:
    """Flush standard output now, so that a failure (a full disk, a closed pipe) is reported as
    one line rather than by the interpreter at exit."""
    if sys.stdout is not None:
        with naming(STDOUT):
            sys.stdout.flush()


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """A UTF-8 text file as `str`, with a leading byte-order mark dropped (Excel writes one) and
    line ends made "\\n" (as `open` reads them). A file that is not UTF-8 is an LLMError naming
    the file, the line and the byte offset; one that cannot be read names the reason."""
    label = f"{what} {path}" if what else str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LLMError(f"cannot read {label}: {os_reason(exc)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1]
        raise LLMError(
            f"{label} is not UTF-8 text: byte {bad!r} at offset {exc.start} (line {line}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
