"""Durable file writes: a complete new file or the old one, never a torn one.

Data goes to ``<path>.tmp`` in the same folder, is flushed and fsynced, then renamed
over ``path`` (atomic on POSIX), and the folder is fsynced so that the rename itself
survives a power loss. A failed write removes its temporary file and leaves ``path``
as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
from typing import Any, Iterator, Optional, TextIO

from utils.errors import UserError


def _file_above(path):
    """The nearest existing parent of ``path`` that is not a folder."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent):
        if os.path.exists(parent):
            return parent
        parent = os.path.dirname(parent)
    return parent


# How the documentation writes a location the reader fills in.
PLACEHOLDER = "/path/to/"


def path_problem(path: str, want: str = "file") -> Optional[str]:
    """Why ``path`` is not a usable regular file (``want="file"``), folder (``"folder"``) or
    either (``"any"``), in words for an error line; ``None`` when it is.

    Devices, pipes and sockets are refused: reading one can block forever or never end.
    """
    if "\x00" in str(path):
        return "holds a NUL character, which no file name can"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if exc.errno == errno.ENOTDIR:
            return f"lies under {_file_above(path)}, which is a file"
        if exc.errno == errno.EACCES:
            return "cannot be reached (permission denied)"
        if os.path.islink(path):
            return "is a broken symbolic link"
        if str(path).startswith(PLACEHOLDER):
            return (f"does not exist: {PLACEHOLDER}... is the documentation's placeholder; put "
                    f"the real location there")
        return "does not exist"
    if stat.S_ISREG(mode):
        return "is a file, not a folder" if want == "folder" else None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file" if want == "file" else None
    return "is not a regular file (a device, pipe or socket)"


# What an OS error means for a file that is read, in words; any other is damage or a fault.
_READ_ERRORS = {
    errno.EACCES: "cannot be read (permission denied): fix its permissions or copy it",
    errno.EPERM: "cannot be read (operation not permitted): fix its permissions or copy it",
    errno.ENOENT: "does not exist (it vanished while read)",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOSPC: "could not be unpacked: no space left on the device",
    errno.EIO: "could not be read (input/output error: a failing disk or an unmounted data "
               "set)",
}


def read_error_words(exc: OSError) -> Optional[str]:
    """What ``exc``, raised while a file was read, says about it (permission denied, not
    found, a folder, no space, a failing disk), in words for an error line; ``None`` for an
    error that means the file itself is damaged."""
    return _READ_ERRORS.get(getattr(exc, "errno", None))


# A text file a setting names (a list file of millions of lines fits): a bound on the read.
MAX_TEXT_BYTES = 256 << 20


def read_text(path: str, what: str, limit: int = MAX_TEXT_BYTES, errors: str = "strict") -> str:
    """The UTF-8 text of the file ``path`` (a byte-order mark dropped: Windows editors write
    one), or one :class:`UserError` naming ``what``: not a regular file (a pipe would block,
    ``/dev/zero`` never ends), larger than ``limit`` bytes, not UTF-8
    (``errors="surrogateescape"`` keeps undecodable bytes, e.g. of file names)."""
    problem = path_problem(path)
    if problem:
        raise UserError(f"{what} {path} {problem}")
    if os.path.getsize(path) > limit:
        raise UserError(f"{what} {path} is larger than {limit} bytes; is it the right file?")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    try:
        return data.decode("utf-8-sig", errors)
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        f"save it as UTF-8") from None


def read_text_lines(path: str, what: str, errors: str = "strict") -> list[str]:
    """The lines of :func:`read_text`."""
    return read_text(path, what, errors=errors).splitlines()


def ensure_folder(path: str, what: str) -> str:
    """Create the folder ``path`` (named by ``what``, e.g. a config key) if it is missing;
    one :class:`UserError` when it cannot be (a file is in the way)."""
    if not path:
        raise UserError(f"{what} is empty; name a folder")
    problem = path_problem(path, "folder")
    if problem and problem != "does not exist":
        raise UserError(f"{what} {path} {problem}; choose another {what}")
    os.makedirs(path, exist_ok=True)
    return path


def refuse_link(path: str, what: str = "the file") -> None:
    """One :class:`UserError` when ``path`` is a symbolic link: a file this project writes
    never replaces a link it did not make, nor writes through one (``/dev/stdout`` is a link:
    replaced, it would become a regular file)."""
    if os.path.islink(path):
        raise UserError(f"{what} {path} is a symbolic link; files are never written through "
                        f"or over a link: remove it or name the real file")


def open_unlinked(path: str, mode: str = "w") -> TextIO:
    """``path`` opened as UTF-8 text to write (``"w"``) or append (``"a"``), never through a
    symbolic link (one :class:`UserError` when it is one)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    refuse_link(path)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a link since the check above
            refuse_link(path)
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


def check_writable(path: str, what: str) -> None:
    """Stop before any work when the file ``path`` (named by option ``what``) cannot be
    written: its folder is missing or not writable, or it is not a regular file."""
    folder = os.path.dirname(os.path.abspath(path))
    problem = path_problem(folder, "folder")
    if problem:
        raise UserError(f"{what} {path}: its folder {folder} {problem}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{what} {path}: its folder {folder} is not writable")
    refuse_link(path, what)
    if os.path.lexists(path) and path_problem(path):
        raise UserError(f"{what} {path} {path_problem(path)}")


def refuse_input_as_output(output: str, inputs: list[str], what: str) -> None:
    """One error when ``output`` (the option ``what`` names it) is one of ``inputs``, the
    files the command reads (the same file by any name: a link, a hard link, ``./``):
    writing it would destroy what was read."""
    try:
        target = os.stat(output)
    except OSError:
        return  # not there yet: nothing read could be it
    for path in inputs:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), target):
                raise UserError(f"{what} {output} is {path}, which this command reads; "
                                f"write the output elsewhere")


@contextlib.contextmanager
def held_exclusively(lock_path: str, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block: ranks, or
    runs, that need the same file take turns. A process that must wait prints ``waiting``
    first; the kernel releases the lock of a process that dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process at a time is the user's to keep
        yield
        return
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_digest(path: str) -> str:
    """The SHA-256 of the regular file ``path`` (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: str) -> None:
    """Make renames and new entries in ``folder`` durable."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` (bytes) durably and atomically; never a symbolic link
    (:func:`refuse_link`), and the temporary file is made afresh, not opened through one."""
    tmp = f"{path}.tmp"
    refuse_link(path)
    if os.path.islink(tmp) or os.path.isfile(tmp):  # left by a crash, or planted
        os.remove(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # never created, or already renamed
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise no_space(path, len(data)) from None
        raise
    fsync_dir(os.path.dirname(path))


def no_space(path: str, needed: int) -> OSError:
    """The ``ENOSPC`` error of a write of ``needed`` bytes to ``path``, with the space it
    needs and the space there is (what one ``error:`` line then says)."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return OSError(errno.ENOSPC, f"No space left on device (needs about {needed / 1e6:.1f} MB, "
                                 f"{free / 1e6:.1f} MB free)", path)


# The lone surrogates os.fsdecode gives bytes that are not UTF-8 (U+DC80 to U+DCFF).
_UNDECODED = re.compile("[\udc80-\udcff]")


def json_text(record: Any, indent: Optional[int] = None) -> str:
    """``record`` as standard JSON: a non-finite number (which JSON has no word for) is null;
    text as its characters (a class named 圆形 stays readable; files are written as UTF-8),
    but a file name that is not UTF-8 (GBK or Latin-1 bytes from a Windows archive, which
    Python holds as lone surrogates) with those as ``\\udcXX`` escapes: ``json.load`` gives
    the exact name back."""
    text = json.dumps(_finite(record), indent=indent, allow_nan=False, ensure_ascii=False)
    return _UNDECODED.sub(lambda match: f"\\u{ord(match[0]):04x}", text)


def shown(text: str) -> str:
    """``text`` as it can be shown and encoded: a name decoded from bytes that are not UTF-8
    (``os.fsdecode`` keeps them as surrogates) with U+FFFD in their place."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: str, record: Any) -> None:
    """Write ``record`` as indented standard JSON, durably and atomically."""
    write_atomically(path, (json_text(record, indent=2) + "\n").encode("utf-8"))


def read_json(path: str) -> Any:
    """The JSON record at ``path``, or ``None`` when there is none (no regular file)."""
    if path_problem(path):
        return None
    with open(path, "rb") as handle:
        try:
            return json.loads(handle.read().decode("utf-8"), parse_constant=_no_constant)
        except ValueError as exc:  # also UnicodeDecodeError
            raise UserError(f"{path} is not valid JSON ({exc}); it is damaged: use another "
                            f"copy") from None


def _no_constant(name):
    raise ValueError(f"the non-standard number {name}")
