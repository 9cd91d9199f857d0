"""Durable file writes: a complete new file or the old one, never a torn one.

Data goes to ``<path>.tmp`` in the same folder, is flushed and fsynced, then renamed
over ``path`` (atomic on POSIX), and the folder is fsynced so that the rename itself
survives a power loss. A failed write removes its temporary file and leaves ``path``
as it was.
"""

import contextlib
import json
import os

from utils.errors import UserError


def fsync_dir(folder):
    """Make renames and new entries in ``folder`` durable."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, data):
    """Replace ``path`` with ``data`` (bytes) durably and atomically."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never created, or already renamed
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def write_json(path, record):
    """Write ``record`` as indented JSON, durably and atomically."""
    write_atomically(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def read_json(path):
    """The JSON record at ``path``, or ``None`` when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); it is damaged: use another "
                            f"copy") from None
