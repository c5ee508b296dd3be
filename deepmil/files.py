"""Result files written atomically: a crash, a full disk or a signal never leaves a partial file.

Torch-free, so that the configuration can be saved without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any


def _file_mode() -> int:
    """Permissions of a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def _os_error(error: BaseException) -> OSError | None:
    """``error`` if it is an ``OSError``, else the ``OSError`` it was raised while handling.

    ``torch.save`` turns a failing ``write`` (disk full...) into a ``RuntimeError`` whose context
    is the original ``OSError``.
    """
    while isinstance(error, Exception) and not isinstance(error, OSError):
        error = error.__context__
    return error if isinstance(error, OSError) else None


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (in the main thread; elsewhere no
    handler can run anyway): the first one received is handled right after the block, by the
    handler that was in place, and a second one meanwhile is not handled twice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda number, _: received.append(number))
        for signum in DEFERRED_SIGNALS
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            else:
                signal.raise_signal(received[0])


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync, then rename.

    A crash or a failing write leaves any previous ``path`` untouched and no partial file; a
    failing write (disk full...) is an ``OSError`` naming ``path``. The file gets the usual
    permissions (``mkstemp`` would leave it readable by its owner only). SIGINT and SIGTERM
    wait until the file is in place, so an interruption never stops a write half-way.
    """
    with signals_deferred():
        _atomic_write(Path(path), write)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """:func:`atomic_write` without the signal deferral."""
    with atomic_file(path) as stream:
        write(stream)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temporary binary file next to ``path`` that replaces ``path`` (fsynced, with the usual
    permissions) when the block ends, and is removed if it raises: for files written over a
    long time, such as the score maps of a whole evaluation. Signals are not deferred."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is None:
            raise
        raise OSError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from error


def write_text(text: str, path: Path) -> None:
    """Write ``text`` (UTF-8), atomically."""
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def write_json(data: Any, path: Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", path)


def write_json_lines(records: list[Mapping[str, Any]], path: Path) -> None:
    """Write one JSON record per line, atomically (the whole file is rewritten)."""
    write_text("".join(json.dumps(record) + "\n" for record in records), path)
