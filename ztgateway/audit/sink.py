"""The JSON-lines mirror of the chain, for a SIEM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("ztgateway.audit")


def append_lines(path: Path, data: bytes) -> None:
    """Append whole lines or nothing: a failed write is cut back so a retry leaves no torn line.

    Opened per batch so that a rotated (moved) file is followed by a fresh one and a broken
    directory is noticed instead of writing into an unlinked inode.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_sink_tail(path: Path) -> tuple[int, str] | None:
    """(seq, hash) of the file's last complete line, dropping a line torn by a crash.

    The torn line's event is in the database (the file is only written after the commit), so
    the writer re-exports it; keeping the fragment would make the file unverifiable forever.
    """
    try:
        f = path.open("r+b")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        pos, tail = size, b""
        while pos > 0 and tail.count(b"\n") < 2:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
        if tail and not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1
            logger.warning("audit sink %s ends with a torn line; truncating it", path)
            f.truncate(pos + cut)
            tail = tail[:cut]
        if not tail:
            return None
        last = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        event = json.loads(last)
        seq, link = event["seq"], event["hash"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(seq, int) or not isinstance(link, str):
        return None
    return seq, link
